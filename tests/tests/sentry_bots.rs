//! Good bots and open paths of the sentry (docs/sentry.md "Good bots and open paths"): the
//! real phantomd in a namespace, in DEFCON_1, clients from chosen loopback addresses. A
//! crawler's user agent passes only from its configured networks; an open path passes for a
//! source that is being challenged; bad `good_bots` / `open_paths` are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a failed test

use std::time::Duration;

use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, HttpReply, NetNs, UpstreamSite, api, http_from, metric_value,
    require_root,
};

const SITE: &str = "127.0.0.1:18080";
/// The crawler's configured network, and addresses inside and outside it.
const BOT_RANGE: &str = "127.0.0.64/28";
const BOT_ADDR: &str = "127.0.0.70";
const ELSEWHERE: &str = "127.0.0.20";
const BROWSER_IN_RANGE: &str = "127.0.0.71";
const GOOGLEBOT_UA: &str =
    "User-Agent: Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
const BROWSER_UA: &str = "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Firefox/140.0";

fn get(ns: &NetNs, from: &str, path: &str, user_agent: &str) -> HttpReply {
    http_from(
        ns,
        from,
        SITE,
        &format!("GET {path}"),
        &[user_agent.to_string(), "Accept: application/json".into()],
        b"",
        Duration::from_secs(5),
    )
    .unwrap_or_else(|e| panic!("GET {path} from {from}: {e}"))
}

fn upstream_page(r: &HttpReply) -> bool {
    r.status == 200 && r.body.starts_with(UpstreamSite::BODY_PREFIX)
}

/// Sends requests from `from` until its 5-second count is over the static threshold (1):
/// the first one is under it and passes.
fn over_threshold(ns: &NetNs, from: &str, user_agent: &str) {
    let first = get(ns, from, "/warm", user_agent);
    assert!(upstream_page(&first), "under the threshold: {first:?}");
}

#[test]
fn good_bot_by_user_agent_and_range_and_open_paths() {
    if !require_root("good_bot_by_user_agent_and_range_and_open_paths") {
        return;
    }
    let ns = NetNs::new("phsb");
    let _site = UpstreamSite::start(&ns, "127.0.0.1:18000");
    let bpffs = BpffsDir::new();
    let lists = tempfile::tempdir().unwrap();
    let list = lists.path().join("googlebot.txt");
    std::fs::write(
        &list,
        format!("# the test's crawler network\n192.0.2.0/24\n{BOT_RANGE}  # loopback\n"),
    )
    .unwrap();
    let mut config = DaemonConfig::new("lo", bpffs.path());
    config.datapath_enabled = false;
    config.extra_toml = format!(
        "[sentry]\nenabled = true\nlisten = {SITE:?}\nupstream = \"http://127.0.0.1:18000\"\n\
         activation_cpu_threshold = 100.0\nip_static_threshold = 1\nticket_ceiling = 20\nhard_block_after = 1000\n\
         base_difficulty = 8\nmax_difficulty = 12\n\
         open_paths = [\"/robots.txt\", \"/.well-known/\"]\n\
         [[sentry.good_bots]]\nname = \"googlebot\"\nuser_agent = \"Googlebot/\"\n\
         ranges_file = {:?}\n",
        list.display().to_string()
    );
    let daemon = Daemon::start(&ns, &config);
    api(&daemon, &["sentry", "set_mode", "mode=DEFCON_1"]);

    // The crawler from its listed network, over the static threshold: passes every time.
    over_threshold(&ns, BOT_ADDR, GOOGLEBOT_UA);
    for _ in 0..3 {
        let r = get(&ns, BOT_ADDR, "/page", GOOGLEBOT_UA);
        assert!(upstream_page(&r), "a good bot from its range: {r:?}");
    }
    // The same user agent from another address: challenged.
    over_threshold(&ns, ELSEWHERE, GOOGLEBOT_UA);
    let r = get(&ns, ELSEWHERE, "/page", GOOGLEBOT_UA);
    assert_eq!(r.status, 429, "the bot's user agent from elsewhere: {r:?}");
    // An ordinary browser from the bot's network: challenged too.
    over_threshold(&ns, BROWSER_IN_RANGE, BROWSER_UA);
    let r = get(&ns, BROWSER_IN_RANGE, "/page", BROWSER_UA);
    assert_eq!(r.status, 429, "a browser from the bot's range: {r:?}");

    // Open paths pass for the challenged source; other paths, and tricks that would resolve
    // elsewhere upstream, stay challenged.
    for path in ["/robots.txt", "/.well-known/security.txt"] {
        let r = get(&ns, ELSEWHERE, path, GOOGLEBOT_UA);
        assert!(upstream_page(&r), "open path {path}: {r:?}");
    }
    for path in [
        "/robots.txt.bak",
        "/.well-known/../page",
        "/.well-known/%2e%2e/page",
    ] {
        let r = get(&ns, ELSEWHERE, path, GOOGLEBOT_UA);
        assert_eq!(r.status, 429, "not an open path {path}: {r:?}");
    }

    // Counted by name in status and metrics, and by outcome.
    let st = api(&daemon, &["sentry", "status"]);
    assert_eq!(st["good_bots"]["googlebot"]["passed"], 3, "{st}");
    assert_eq!(st["requests"]["passed"]["good_bot"], 3, "{st}");
    assert_eq!(st["requests"]["passed"]["open_path"], 2, "{st}");
    let metrics = phantom_tests::http_get(&ns, "127.0.0.1:9469", "/metrics");
    assert_eq!(
        metric_value(
            &metrics,
            "phantom_sentry_good_bot_passes_total{bot=\"googlebot\"}"
        ),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "phantom_sentry_requests_total{outcome=\"open_path\"}"
        ),
        Some(2.0)
    );
}

/// `phantomd --check-config` on a file with only `extra` (the rest are defaults).
fn check_config(dir: &std::path::Path, extra: &str) -> (bool, String) {
    let path = dir.join("phantom.toml");
    std::fs::write(&path, extra).unwrap();
    let out = std::process::Command::new(phantom_tests::bin_dir().join("phantomd"))
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_good_bots_and_open_paths_are_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("bot.txt");
    std::fs::write(&list, "# ok\n66.249.64.0/27\n").unwrap();
    let bot = |body: &str| format!("[sentry]\n[[sentry.good_bots]]\nname = \"g\"\n{body}\n");
    let (ok, err) = check_config(
        dir.path(),
        &bot(&format!(
            "user_agent = \"Googlebot\"\nranges = [\"2001:4860:4801:10::/64\"]\nranges_file = {:?}",
            list.display().to_string()
        )),
    );
    assert!(ok, "a good config: {err}");
    std::fs::write(&list, "66.249.64.0/27\n66.249.640.0/27\n").unwrap();
    for (body, expected) in [
        (
            "user_agent = \"Googlebot(\"\nranges = [\"66.249.64.0/27\"]".to_string(),
            "is not a valid regular expression",
        ),
        (
            "user_agent = \"Googlebot\"\nranges = [\"66.249.64.0/33\"]".into(),
            "\"66.249.64.0/33\" (in ranges) is not a network",
        ),
        (
            format!(
                "user_agent = \"Googlebot\"\nranges_file = {:?}",
                list.display().to_string()
            ),
            "line 2",
        ),
        (
            "user_agent = \"Googlebot\"\nranges_file = \"/nonexistent/googlebot.txt\"".into(),
            "cannot read ranges_file \"/nonexistent/googlebot.txt\"",
        ),
        (
            "user_agent = \"Googlebot\"".into(),
            "never by user agent alone",
        ),
        (
            "user_agent = \"Googlebot\"\nranges = [\"66.249.64.0/27\"]\nrange = []".into(),
            "unknown field `range`",
        ),
    ] {
        let (ok, err) = check_config(dir.path(), &bot(&body));
        assert!(!ok, "{body} was accepted");
        assert!(err.contains(expected), "{body}: {err}");
    }
    let (ok, err) = check_config(dir.path(), "[sentry]\nopen_paths = [\"robots.txt\"]\n");
    assert!(
        !ok && err.contains("sentry.open_paths: \"robots.txt\""),
        "{err}"
    );
    let (ok, err) = check_config(dir.path(), "[sentry]\nopen_paths = [\"/a/../b\"]\n");
    assert!(!ok && err.contains("sentry.open_paths"), "{err}");
}

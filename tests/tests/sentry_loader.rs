//! The sentry's DOOMSDAY loader in a real browser (docs/sentry.md "DOOMSDAY: the loader"):
//! in DOOMSDAY every request but the whitelist's and ticket holders' gets `loader.html`, one
//! document with all its script and style inline, which solves a `max_difficulty` puzzle and
//! renders the page from a snapshot the sentry took of the upstream — once, not per request.
//! A fresh headless Chromium sees the site rendered by the loader with nothing of its own
//! reaching the upstream, and its next navigation passes on the ticket. A screenshot of the
//! loader at work goes to `$PHANTOM_SCREENSHOT_DIR` (docs/screenshots for the docs).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use fantoccini::{Client, Locator};
use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, GuardedLink, HttpReply, NetNs, UpstreamSite, api,
    browser::{Browser, screenshot},
    http_from, require_root,
    wstunnel::block_on_in,
};
use serde_json::Value;

const SENTRY_PORT: u16 = 18080;
const UPSTREAM: &str = "127.0.0.1:18000";

/// phantomd with the sentry on every address of port 18080 in DOOMSDAY (12 to 16 bits:
/// everyone solves 16), snapshots refreshed at most once an hour.
fn daemon(link: &GuardedLink, bpffs: &BpffsDir) -> Daemon {
    let mut config = DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path());
    config.datapath_enabled = false;
    config.extra_toml = format!(
        "[sentry]\nenabled = true\nlisten = \"[::]:{SENTRY_PORT}\"\n\
         upstream = \"http://{UPSTREAM}\"\nactivation_cpu_threshold = 0.0\n\
         ip_static_threshold = 50\nbase_difficulty = 12\nmax_difficulty = 16\n\
         hard_block_after = 100\n\
         [sentry.doomsday]\nsnapshot_refresh_seconds = 3600\n"
    );
    let daemon = Daemon::start(&link.server, &config);
    api(&daemon, &["sentry", "set_mode", "mode=DOOMSDAY"]);
    daemon
}

fn get(ns: &NetNs, from: &str, target: &str, headers: &[&str]) -> HttpReply {
    let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    http_from(
        ns,
        from,
        "192.0.2.1:18080",
        target,
        &headers,
        b"",
        Duration::from_secs(5),
    )
    .unwrap()
}

async fn body_text(c: &Client) -> String {
    c.execute(
        "return document.body ? document.body.innerText : ''",
        vec![],
    )
    .await
    .ok()
    .and_then(|v| v.as_str().map(str::to_string))
    .unwrap_or_default()
}

async fn attr(c: &Client, id: &str, name: &str) -> Option<String> {
    c.find(Locator::Id(id)).await.ok()?.attr(name).await.ok()?
}

/// The loader element's `data-*` attributes, read in one script call. A read that fails
/// (on a loaded machine, with the workers on every CPU, one WebDriver call may time out) is
/// tried again for up to 30 s; the last error comes back if none answered.
async fn loader_data(c: &Client) -> Result<Value, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let read = c
            .execute(
                "const m = document.getElementById('sentry'); \
                 return m ? Object.assign({}, m.dataset) : {missing: location.href};",
                vec![],
            )
            .await
            .map_err(|e| e.to_string());
        match read {
            Ok(v) if v.get("missing").is_none() => return Ok(v),
            other if Instant::now() > deadline => {
                return Err(format!(
                    "{other:?}; the page shows {:?}",
                    body_text(c).await
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn until_text(c: &Client, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let text = body_text(c).await;
        if text.contains(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never showed {want:?}; it shows {text:?} (state {:?}, error {:?})",
            attr(c, "sentry", "data-state").await,
            attr(c, "sentry", "data-error").await,
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn snapshots(daemon: &Daemon) -> Value {
    api(daemon, &["sentry", "status"])["snapshots"].clone()
}

#[test]
fn doomsday_the_loader_renders_the_site_from_a_snapshot_and_the_ticket_passes_after() {
    if !require_root(
        "doomsday_the_loader_renders_the_site_from_a_snapshot_and_the_ticket_passes_after",
    ) {
        return;
    }
    let started = Instant::now();
    let link = GuardedLink::new();
    let site = UpstreamSite::start(&link.server, UPSTREAM);
    let bpffs = BpffsDir::new();
    let daemon = daemon(&link, &bpffs);
    let html = "Accept: text/html,application/xhtml+xml,*/*;q=0.8";

    // The loader as sent: one document, its script and style inline under a policy of their
    // hashes, nothing loaded from elsewhere, the page's sealed snapshot in it.
    let page = get(
        &link.peer,
        GuardedLink::PEER_V4_SECOND,
        "GET /doom/page?x=1",
        &[html],
    );
    assert_eq!(page.status, 429, "{}", page.body);
    assert_eq!(page.header("x-sentry-loader"), Some("1"));
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("script-src 'sha256-") && !csp.contains("unsafe"),
        "{csp}"
    );
    assert!(!page.body.contains(" src=") && !page.body.contains("<link"));
    assert!(page.body.contains("<script>") && page.body.contains("<style>"));
    assert!(!page.body.contains("id=\"sentry-snapshot\">null<"));
    // Without JavaScript: the command-line solver.
    assert!(
        page.body.contains(
            "phantom-api sentry solve &#39;http://192.0.2.1:18080/.sentry/challenge&#39;"
        )
    );
    // The snapshot was taken once, by the sentry (no client address), and is not taken again
    // for each request.
    assert_eq!(site.requests.load(Ordering::Relaxed), 1);
    assert_eq!(site.log.lock().unwrap()[0], "/doom/page?x=1 xff=");
    for _ in 0..5 {
        let again = get(
            &link.peer,
            GuardedLink::PEER_V4_SECOND,
            "GET /doom/page?x=1",
            &[html],
        );
        assert_eq!(again.status, 429);
        assert_eq!(again.header("x-sentry-loader"), Some("1"));
    }
    // A browser's own requests for icons and the like cause no fetch; JSON keeps the package.
    assert_eq!(
        get(
            &link.peer,
            GuardedLink::PEER_V4_SECOND,
            "GET /favicon.ico",
            &["Accept: image/*"]
        )
        .status,
        429
    );
    let json = get(
        &link.peer,
        GuardedLink::PEER_V4_SECOND,
        "GET /doom/page?x=1",
        &["Accept: application/json"],
    );
    assert_eq!(json.header("content-type"), Some("application/json"));
    assert_eq!(site.requests.load(Ordering::Relaxed), 1);
    assert_eq!(
        snapshots(&daemon),
        serde_json::json!({"held": 1, "fetches": 1})
    );

    let browser = Browser::start(&link.server);
    block_on_in(&link.server, || async {
        let c = browser.session(1000, 700).await;
        // A fresh browser: the loader solves 16 bits and renders the snapshot in place.
        c.goto("http://127.0.0.1:18080/doom/page?x=1")
            .await
            .unwrap();
        until_text(
            &c,
            &format!(
                "{} /doom/page?x=1 xff= proto=http body=0",
                UpstreamSite::BODY_PREFIX
            ),
            Duration::from_secs(60),
        )
        .await;
        let url = c.current_url().await.unwrap();
        assert_eq!(url.path(), "/doom/page");
        let record: Value = serde_json::from_str(
            c.execute("return sessionStorage.getItem('sentry-loader')", vec![])
                .await
                .unwrap()
                .as_str()
                .expect("the loader left its record"),
        )
        .unwrap();
        eprintln!("loader: {record}");
        assert_eq!(record["shown"], "snapshot", "{record}");
        assert_eq!(record["difficulty"], 16, "{record}");
        assert!(record["workers"].as_u64().unwrap() >= 1, "{record}");
        // Nothing of the browser's reached the upstream for that page: the page it shows is
        // the sentry's snapshot (no client address), taken before the browser came.
        let log = site.log.lock().unwrap().clone();
        assert!(
            !log.iter()
                .any(|l| l.starts_with("/doom/page") && l != "/doom/page?x=1 xff="),
            "{log:?}"
        );
        assert_eq!(
            log.iter().filter(|l| l.starts_with("/doom/page")).count(),
            1,
            "{log:?}"
        );
        assert!(
            !c.get_named_cookie("sentry_ticket")
                .await
                .unwrap()
                .value()
                .is_empty()
        );
        // The next navigation passes on the ticket: the live page, no loader.
        c.goto("http://127.0.0.1:18080/doom/next").await.unwrap();
        until_text(
            &c,
            &format!("{} /doom/next xff=127.0.0.1 ", UpstreamSite::BODY_PREFIX),
            Duration::from_secs(10),
        )
        .await;

        // The loader at work, seen without a race: another source (::1) at 30 bits.
        api(&daemon, &["sentry", "set_config", "max_difficulty=30"]);
        c.goto("http://[::1]:18080/doom/slow").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while attr(&c, "sentry", "data-rate").await.is_none() {
            assert!(
                Instant::now() < deadline,
                "the loader never started: {:?}",
                body_text(&c).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let data = loader_data(&c).await.expect("the loader's element");
        assert_eq!(data["state"], "solving", "{data}");
        assert_eq!(data["loader"], "1", "{data}");
        let workers: u64 = data["workers"].as_str().unwrap_or("").parse().unwrap_or(0);
        assert!(
            workers >= 1,
            "the loader's blob: workers run under its policy: {data}"
        );
        screenshot(&c, "sentry-loader-solving").await;
        c.close().await.unwrap();
    });
    let st = api(&daemon, &["sentry", "status"]);
    assert_eq!(st["challenges"]["solved"], 1, "{st}");
    // Two snapshots (the page and the slow one); the ticket holder's navigation took none.
    assert_eq!(
        st["snapshots"],
        serde_json::json!({"held": 2, "fetches": 2}),
        "{st}"
    );
    eprintln!(
        "snapshots: {}; took {:?}",
        st["snapshots"],
        started.elapsed()
    );
}

//! The fault suite: the real daemon under the faults a busy host meets (a broken config on
//! SIGHUP, dead and slow DNS upstreams, ...). Each test asserts what an operator sees: the
//! reason in the log, a reply code, a metric, and that nothing acknowledged is lost.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a failed test

use std::time::{Duration, Instant};

use phantom_daemon::sentry::{
    challenge::{Package, Proof},
    solver,
};
use phantom_tests::{
    Daemon, DaemonConfig, HttpReply, NetNs, RedisServer, SmallDisk, UpstreamSite,
    WireguardSettings, api, http_from, http_get, metric_value, phantom_api, require_root,
};
use serde_json::{Value, json};

/// A daemon without eBPF in `ns` (the faults here are above the data plane).
fn plain_config() -> DaemonConfig {
    let mut config = DaemonConfig::new("lo", std::path::Path::new("/nonexistent"));
    config.datapath_enabled = false;
    config.blocklist_extra = "sync_interval_seconds = 0\n".into();
    config
}

/// Waits until the daemon's log holds `needle` `count` times or more; returns the log.
fn wait_for_log(daemon: &Daemon, needle: &str, count: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = daemon.log();
        if log.matches(needle).count() >= count {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "log lacks {needle:?} ({count} times):\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What SIGHUP may change that the daemon reports: the blocklist's sources and brands.
fn reloadable(daemon: &Daemon) -> (Value, Value) {
    let status = api(daemon, &["blocklist", "status"]);
    (
        status["sources"].clone(),
        status["lookalike_brands"].clone(),
    )
}

#[test]
fn sighup_with_an_invalid_file_changes_nothing_and_logs_the_reason() {
    if !require_root("sighup_with_an_invalid_file_changes_nothing_and_logs_the_reason") {
        return;
    }
    let ns = NetNs::new("phf");
    let mut config = plain_config();
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list.txt");
    std::fs::write(&list, "casino-a.example\n").unwrap();
    config.extra_toml = format!(
        "[[blocklist.sources]]\nname = \"local\"\nurl = {:?}\n",
        list.display().to_string()
    );
    let daemon = Daemon::start(&ns, &config);
    let good = std::fs::read_to_string(daemon.config_path()).unwrap();
    let before = reloadable(&daemon);
    assert_eq!(before.0.as_array().unwrap().len(), 1, "{before:?}");

    // Each file also asks for changes SIGHUP would apply (log level, brands, sources): none
    // of them may happen, and the log must say why the file was refused.
    let wanted = good
        .replace("level = \"info\"", "level = \"debug\"")
        .replace(
            "sync_interval_seconds = 0\n",
            "sync_interval_seconds = 0\nbrands = [\"examplebet\"]\n",
        )
        + "[[blocklist.sources]]\nname = \"second\"\nurl = \"/nonexistent/second.txt\"\n";
    let broken = [
        // Not TOML at all.
        (
            format!("{wanted}\nthis is = not [valid toml\n"),
            format!(
                "invalid TOML at line {}, column",
                wanted.lines().count() + 2
            ),
        ),
        // TOML, but a value out of range.
        (
            wanted.replace("[dns]\n", "[dns]\nupstream_timeout_ms = 5\n"),
            "dns.upstream_timeout_ms must be between 100 and 30000".to_string(),
        ),
        // TOML, but an http:// source without a pin.
        (
            format!(
                "{wanted}[[blocklist.sources]]\nname = \"unpinned\"\nurl = \"http://127.0.0.1:9/list.txt\"\n"
            ),
            "unpinned".to_string(),
        ),
        // An unknown key (a typo must not be read as "use the default").
        (
            wanted.replace("[blocklist]\n", "[blocklist]\nsync_intervall_seconds = 5\n"),
            "sync_intervall_seconds".to_string(),
        ),
        // A log filter the tracing layer cannot parse.
        (
            wanted.replace("level = \"debug\"", "level = \"info,[[[\""),
            "[[[".to_string(),
        ),
    ];
    for (n, (text, reason)) in broken.iter().enumerate() {
        std::fs::write(daemon.config_path(), text).unwrap();
        daemon.signal(nix::sys::signal::Signal::SIGHUP);
        let log = wait_for_log(
            &daemon,
            "SIGHUP: configuration rejected, keeping the running one",
            n + 1,
        );
        let line = log
            .lines()
            .filter(|l| l.contains("SIGHUP: configuration rejected"))
            .nth(n)
            .unwrap();
        assert!(
            line.contains(reason.as_str()),
            "file {n}: the log line does not give the reason {reason:?}: {line}"
        );
        assert_eq!(reloadable(&daemon), before, "file {n} changed something");
    }
    // The running config kept the info level: no debug line was written meanwhile.
    assert!(
        !daemon.log().contains(" DEBUG "),
        "debug lines appeared after a rejected reload"
    );
    // A missing file is refused the same way (not replaced by the defaults).
    std::fs::remove_file(daemon.config_path()).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let log = wait_for_log(
        &daemon,
        "SIGHUP: configuration rejected, keeping the running one",
        broken.len() + 1,
    );
    let line = log
        .lines()
        .rfind(|l| l.contains("SIGHUP: configuration rejected"))
        .unwrap();
    assert!(
        line.contains(&daemon.config_path().display().to_string()),
        "{line}"
    );
    assert!(
        !daemon.config_path().exists(),
        "SIGHUP wrote a default file"
    );
    assert_eq!(reloadable(&daemon), before);

    // The daemon still reloads a good file afterwards, and that one does apply.
    std::fs::write(daemon.config_path(), &wanted).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for_log(&daemon, "SIGHUP: configuration reloaded", 1);
    let after = api(&daemon, &["blocklist", "status"]);
    assert_eq!(after["sources"].as_array().unwrap().len(), 2, "{after}");
    assert!(
        after["lookalike_brands"].as_u64().unwrap() > before.1.as_u64().unwrap(),
        "{after}"
    );
}

/// A DNS query for `name` (type A, RD set) with `id`.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// How the fake upstreams behave.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Upstream {
    /// Read every query and never answer (a host that drops them).
    Silent,
    /// Answer every query (NOERROR, no records) two seconds late.
    Slow,
}

/// Two upstream resolvers on the daemon's configured upstream addresses (`127.0.0.53:53` and
/// `127.0.0.54:53` in a namespace) that answer as their mode says; stopped on drop.
struct FakeUpstreams {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl FakeUpstreams {
    fn start(ns: &NetNs, mode: Upstream) -> Self {
        let socks = ns.run(|| {
            ["127.0.0.53:53", "127.0.0.54:53"].map(|a| std::net::UdpSocket::bind(a).unwrap())
        });
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::new();
        for sock in socks {
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let sock = std::sync::Arc::new(sock);
            let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>, std::net::SocketAddr)>();
            let sender = std::sync::Arc::clone(&sock);
            // Answers go out in arrival order, each at its due time; the thread ends when the
            // receiving one drops `tx`.
            threads.push(std::thread::spawn(move || {
                for (due, answer, to) in rx {
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    let _ = sender.send_to(&answer, to);
                }
            }));
            let stop = std::sync::Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok((n, from)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    if mode == Upstream::Slow && n > 12 {
                        let mut answer = buf[..n].to_vec();
                        answer[2] |= 0x80; // QR
                        answer[3] = 0x80; // RA, NOERROR
                        let _ = tx.send((Instant::now() + Duration::from_secs(2), answer, from));
                    }
                }
            }));
        }
        Self { stop, threads }
    }
}

impl Drop for FakeUpstreams {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sends `count` queries at `per_second` from one socket in `ns` to the resolver at
/// `resolver`, polling the daemon's `forwards_in_flight` while they go; returns, per query,
/// the reply's RCODE and how long it took (`None`: no reply within 5 s), and the largest
/// in-flight count seen.
fn query_load(
    ns: &NetNs,
    daemon: &Daemon,
    resolver: &str,
    count: u16,
    per_second: u32,
) -> (Vec<Option<(u8, Duration)>>, u64) {
    let to: std::net::SocketAddr = resolver.parse().unwrap();
    let sock = ns.run(|| std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let sock = std::sync::Arc::new(sock);
    let sent: std::sync::Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
        std::sync::Arc::new(std::sync::Mutex::new(vec![None; usize::from(count)]));
    let sender = {
        let (sock, sent) = (std::sync::Arc::clone(&sock), std::sync::Arc::clone(&sent));
        std::thread::spawn(move || {
            let start = Instant::now();
            for id in 0..count {
                let due = start + Duration::from_secs(1) * u32::from(id) / per_second;
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                sent.lock().unwrap()[usize::from(id)] = Some(Instant::now());
                sock.send_to(&dns_query(id, &format!("q{id}.fault.example")), to)
                    .unwrap();
            }
        })
    };
    let receiver = {
        let (sock, sent) = (std::sync::Arc::clone(&sock), std::sync::Arc::clone(&sent));
        std::thread::spawn(move || {
            let mut replies = vec![None; usize::from(count)];
            let mut last = Instant::now();
            let mut buf = [0u8; 1500];
            while last.elapsed() < Duration::from_secs(5) && replies.iter().any(Option::is_none) {
                let Ok((n, _)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if n < 12 {
                    continue;
                }
                let id = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
                if let Some(Some(at)) = sent.lock().unwrap().get(id).copied() {
                    replies[id] = Some((buf[3] & 0x0f, at.elapsed()));
                }
                last = Instant::now();
            }
            replies
        })
    };
    let mut peak = 0;
    while !sender.is_finished() {
        peak = peak.max(in_flight(daemon));
        std::thread::sleep(Duration::from_millis(100));
    }
    sender.join().unwrap();
    (receiver.join().unwrap(), peak)
}

/// The resolver's forwarded queries waiting on an upstream now.
fn in_flight(daemon: &Daemon) -> u64 {
    api(daemon, &["dns", "stats"])["forwards_in_flight"]
        .as_u64()
        .unwrap()
}

#[test]
fn dead_then_slow_dns_upstreams_give_servfail_in_time_and_nothing_piles_up() {
    if !require_root("dead_then_slow_dns_upstreams_give_servfail_in_time_and_nothing_piles_up") {
        return;
    }
    const TIMEOUT_MS: u64 = 500;
    const RESOLVER: &str = "127.0.0.1:53";
    let ns = NetNs::new("phf");
    let mut config = plain_config();
    // Upstreams 127.0.0.53 and .54 (the harness's defaults), each given 500 ms.
    config.dns_section = format!(
        "listen = {RESOLVER:?}\nprimary = \"127.0.0.53\"\nsecondary = \"127.0.0.54\"\nupstream_timeout_ms = {TIMEOUT_MS}\n"
    );
    let daemon = Daemon::start(&ns, &config);
    let deadline = Instant::now() + Duration::from_secs(10);
    while api(&daemon, &["dns", "stats"])["listening"]
        .as_array()
        .is_none_or(Vec::is_empty)
    {
        assert!(Instant::now() < deadline, "the resolver never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Both upstreams together may take two timeouts; allow a second for a busy machine.
    let limit = Duration::from_millis(2 * TIMEOUT_MS + 1000);
    let check = |phase: &str, replies: &[Option<(u8, Duration)>], peak: u64| {
        let slowest = replies
            .iter()
            .enumerate()
            .map(|(id, r)| {
                let (rcode, took) = r.unwrap_or_else(|| panic!("{phase}: query {id} got no reply"));
                assert_eq!(rcode, 2, "{phase}: query {id} is not SERVFAIL");
                took
            })
            .max()
            .unwrap();
        assert!(
            slowest <= limit,
            "{phase}: slowest SERVFAIL after {slowest:?} (limit {limit:?})"
        );
        // 200 queries a second, each held at most two timeouts (1 s): about 200 at once; a
        // build-up would reach the 600 sent.
        assert!(peak <= 400, "{phase}: {peak} forwards in flight at once");
        // Everything is answered: nothing is left waiting.
        let deadline = Instant::now() + limit;
        while in_flight(&daemon) != 0 {
            assert!(
                Instant::now() < deadline,
                "{phase}: forwards still in flight"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{phase}: slowest SERVFAIL {slowest:?}, at most {peak} in flight");
    };

    // Down: nothing listens on the upstreams' port (refused at once).
    let (replies, peak) = query_load(&ns, &daemon, RESOLVER, 600, 200);
    check("refused", &replies, peak);
    // Down: the upstreams swallow every query.
    let silent = FakeUpstreams::start(&ns, Upstream::Silent);
    let (replies, peak) = query_load(&ns, &daemon, RESOLVER, 600, 200);
    check("silent", &replies, peak);
    let failures = api(&daemon, &["dns", "stats"])["upstream_failures"]
        .as_u64()
        .unwrap();
    assert!(failures >= 2 * 2 * 600, "{failures} upstream failures");
    drop(silent);

    // Slow: both answer after 2 s, four times the timeout.
    let _slow = FakeUpstreams::start(&ns, Upstream::Slow);
    let (replies, peak) = query_load(&ns, &daemon, RESOLVER, 600, 200);
    check("slow", &replies, peak);
    // The late answers arrive to closed sockets and change nothing: still nothing in flight,
    // no answer cached (the next query is a SERVFAIL again, not a cached NOERROR).
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(in_flight(&daemon), 0);
    let (replies, _) = query_load(&ns, &daemon, RESOLVER, 5, 10);
    check("slow, after the late answers", &replies, 0);
    let metrics = phantom_tests::http_get(&ns, "127.0.0.1:9469", "/metrics");
    assert_eq!(
        phantom_tests::metric_value(&metrics, "phantom_dns_forwards_in_flight"),
        Some(0.0)
    );
}

// ---------------------------------------------------------------- disk full

const SITE: &str = "127.0.0.1:18080";
const VPN_SUBNET: &str = "198.51.100.0/24";

/// The sentry in front of an upstream site on 127.0.0.1:18000, challenging every source
/// after one request (cheap proofs: difficulty 8).
fn sentry_toml(extra: &str) -> String {
    format!(
        "[sentry]\nenabled = true\nlisten = {SITE:?}\nupstream = \"http://127.0.0.1:18000\"\n\
         ip_static_threshold = 1\nbase_difficulty = 8\nmax_difficulty = 12\n{extra}\n"
    )
}

fn get(ns: &NetNs, from: &str, path: &str) -> HttpReply {
    http_from(
        ns,
        from,
        SITE,
        &format!("GET {path}"),
        &["Accept: application/json".into()],
        b"",
        Duration::from_secs(5),
    )
    .unwrap_or_else(|e| panic!("GET {path} from {from}: {e}"))
}

/// A proof of work for a fresh challenge to `from` (requests until one is challenged).
fn solved_proof(ns: &NetNs, from: &str) -> Proof {
    for _ in 0..5 {
        let r = get(ns, from, "/page");
        if r.status == 429 {
            let package: Package = serde_json::from_str(&r.body).unwrap();
            let jwks = get(ns, from, "/.sentry/jwks.json").json();
            return solver::solve_package(&package, &jwks).unwrap().1;
        }
        assert_eq!(r.status, 200, "{r:?}");
    }
    panic!("{from} was never challenged");
}

fn post_proof(ns: &NetNs, from: &str, proof: &Proof) -> HttpReply {
    let body = json!({"payload": proof.payload, "signature": proof.signature, "pow_nonce": proof.pow_nonce, "kid": proof.kid});
    http_from(
        ns,
        from,
        SITE,
        "POST /.sentry/proof",
        &["Content-Type: application/json".into()],
        body.to_string().as_bytes(),
        Duration::from_secs(5),
    )
    .unwrap()
}

fn client_names(daemon: &Daemon) -> Vec<String> {
    let mut names: Vec<String> = api(daemon, &["core", "list_clients", "per_page=1000"])["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// (version, checksum, entries) of the blocklist.
fn list_state(daemon: &Daemon) -> (Value, Value, Value) {
    let s = api(daemon, &["blocklist", "status"]);
    (
        s["version"].clone(),
        s["checksum"].clone(),
        s["entries"].clone(),
    )
}

fn blocked(daemon: &Daemon, name: &str) -> bool {
    api(daemon, &["blocklist", "verify", &format!("domain={name}")])["blocked"]
        .as_bool()
        .unwrap()
}

/// A failure reply of `phantom-api args`: (code, message).
fn refused(daemon: &Daemon, args: &[&str]) -> (String, String) {
    let (code, reply, out) = phantom_api(&daemon.socket(), args);
    assert_ne!(code, 0, "phantom-api {args:?} should fail: {out}");
    (
        reply["code"].as_str().unwrap_or_default().to_string(),
        reply["error"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn a_full_disk_refuses_changes_clearly_and_loses_nothing_acknowledged() {
    if !require_root("a_full_disk_refuses_changes_clearly_and_loses_nothing_acknowledged") {
        return;
    }
    // Declared first, dropped last: the daemon is gone before the disk is unmounted.
    let disk = SmallDisk::new(16 * 1024);
    let ns = NetNs::new("phf");
    let _site = UpstreamSite::start(&ns, "127.0.0.1:18000");
    let lists = tempfile::tempdir().unwrap();
    let import = |name: &str, domains: &[&str]| {
        let path = lists.path().join(name);
        std::fs::write(&path, domains.join("\n")).unwrap();
        format!("path={}", path.display())
    };
    let mut config = plain_config();
    config.state_dir = Some(disk.path().join("state"));
    config.wireguard = Some(WireguardSettings::new(VPN_SUBNET, "192.0.2.1"));
    config.extra_toml = sentry_toml("");
    let mut daemon = Daemon::start(&ns, &config);

    // Acknowledged before the disk fills.
    for name in ["early-a", "early-b"] {
        api(
            &daemon,
            &["core", "add_client", &format!("client_name={name}")],
        );
    }
    api(&daemon, &["blocklist", "add", "domain=before-full.example"]);
    api(
        &daemon,
        &[
            "blocklist",
            "import",
            &import("first.txt", &["first-a.example", "first-b.example"]),
        ],
    );
    api(&daemon, &["sentry", "set_mode", "mode=DEFCON_1"]);
    let redeemed = solved_proof(&ns, "127.0.0.1");
    assert_eq!(post_proof(&ns, "127.0.0.1", &redeemed).status, 200);
    let acknowledged = list_state(&daemon);

    disk.fill();
    // Every change is refused with a reply that says the disk is full, and nothing of it
    // stays behind.
    let said_full = |(code, message): (String, String), what: &str| {
        eprintln!("{what} on a full disk: {code}: {message}");
        assert_eq!(code, "DISK_FULL", "{what}: {message}");
        assert!(
            message.contains("disk is full"),
            "{what}: the error does not say the disk is full: {message}"
        );
    };
    said_full(
        refused(&daemon, &["core", "add_client", "client_name=while-full"]),
        "add_client",
    );
    assert_eq!(client_names(&daemon), ["early-a", "early-b"]);
    said_full(
        refused(
            &daemon,
            &[
                "blocklist",
                "import",
                &import("second.txt", &["second-a.example", "second-b.example"]),
            ],
        ),
        "blocklist import",
    );
    said_full(
        refused(&daemon, &["blocklist", "add", "domain=while-full.example"]),
        "blocklist add",
    );
    assert_eq!(list_state(&daemon), acknowledged);
    assert!(!blocked(&daemon, "second-a.example") && !blocked(&daemon, "while-full.example"));
    // A proof is answered 200 only once its nonce is in the journal. The journal's last page
    // still has room for a few lines (a full tmpfs refuses new pages, not the rest of one);
    // once a line needs a new page, the proof gets 503 (its replay could not be refused after
    // a crash) and the client may send it again.
    let mut redeemed = vec![("127.0.0.1".to_string(), redeemed)];
    let pending = (1..=200)
        .find_map(|n| {
            let from = format!("127.0.1.{n}");
            let proof = solved_proof(&ns, &from);
            let r = post_proof(&ns, &from, &proof);
            match r.status {
                200 => {
                    redeemed.push((from, proof));
                    None
                }
                503 => Some((from, proof)),
                _ => panic!("proof from {from}: {r:?}"),
            }
        })
        .expect("every proof was answered 200 on a full disk");
    eprintln!(
        "{} proofs fitted in the journal's last page",
        redeemed.len() - 1
    );
    // Still serving: reads, the site for a ticket holder, new challenges.
    api(&daemon, &["core", "server_status"]);
    assert!(blocked(&daemon, "first-a.example"));
    assert!(
        (0..3).any(|_| get(&ns, "127.0.0.3", "/page").status == 429),
        "no challenge while the disk is full"
    );
    api(&daemon, &["sentry", "status"]);

    // A crash on the full disk: the daemon starts again and serves what it has.
    daemon.kill9();
    daemon.restart();
    assert_eq!(client_names(&daemon), ["early-a", "early-b"]);
    assert_eq!(list_state(&daemon), acknowledged);
    assert!(
        (0..3).any(|_| get(&ns, "127.0.0.4", "/page").status == 429),
        "no challenge after a start on the full disk"
    );
    // Space again: the same changes go through, the refused proof is accepted.
    disk.free();
    api(&daemon, &["core", "add_client", "client_name=while-full"]);
    api(
        &daemon,
        &[
            "blocklist",
            "import",
            &import("second.txt", &["second-a.example", "second-b.example"]),
        ],
    );
    api(&daemon, &["blocklist", "add", "domain=while-full.example"]);
    let r = post_proof(&ns, &pending.0, &pending.1);
    assert_eq!(r.status, 200, "{r:?}");
    redeemed.push(pending);
    let after = list_state(&daemon);
    assert_eq!(after.2, 6, "{after:?}");

    // Everything acknowledged survives kill -9.
    daemon.kill9();
    daemon.restart();
    assert_eq!(client_names(&daemon), ["early-a", "early-b", "while-full"]);
    assert_eq!(list_state(&daemon), after);
    for name in [
        "before-full.example",
        "first-b.example",
        "second-b.example",
        "while-full.example",
    ] {
        assert!(blocked(&daemon, name), "{name} lost");
    }
    assert_eq!(
        api(&daemon, &["sentry", "status"])["current_mode"],
        "DEFCON_1"
    );
    for (from, proof) in &redeemed {
        let again = post_proof(&ns, from, proof);
        assert_eq!(again.status, 409, "{from}: {again:?}");
    }
}

// ---------------------------------------------------------------- kill -9 at random points

/// A small xorshift generator; the seed is printed (and read from `PHANTOM_FAULT_SEED`) so a
/// failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn new(test: &str) -> Self {
        let seed = std::env::var("PHANTOM_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("{test}: PHANTOM_FAULT_SEED={seed}");
        Self(seed)
    }

    /// Uniform in `0..=max`.
    fn below(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let micros = max.as_micros() as u64;
        Duration::from_micros(self.0 % (micros + 1))
    }
}

/// Runs `phantom-api args` in the background, `kill -9`s the daemon after `delay` and
/// restarts it; returns whether the action was acknowledged (a success reply reached the CLI
/// before the kill).
fn kill_during(daemon: &mut Daemon, args: &[&str], delay: Duration) -> bool {
    let child = std::process::Command::new(phantom_tests::bin_dir().join("phantom-api"))
        .arg("--socket")
        .arg(daemon.socket())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    daemon.kill9();
    let out = child.wait_with_output().unwrap();
    daemon.restart();
    out.status.success()
}

/// How long `phantom-api args` takes on a healthy daemon (the window the kills aim at).
fn timed(daemon: &Daemon, args: &[&str]) -> Duration {
    let started = Instant::now();
    api(daemon, args);
    started.elapsed()
}

/// The public API's full list, checked against itself and against `blocklist status`: the
/// checksum recomputed from the entries and patterns equals the one published and the one
/// the admin socket reports, for the same version. Returns the listed domains.
fn consistent_list(ns: &NetNs, daemon: &Daemon) -> std::collections::BTreeSet<String> {
    use sha2::{Digest, Sha256};
    // The public API binds just after the admin socket answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ns
        .run(|| std::net::TcpStream::connect("127.0.0.1:3000"))
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the blocklist API never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let body: Value =
        serde_json::from_str(&http_get(ns, "127.0.0.1:3000", "/api/v1/blocklist")).unwrap();
    let status = api(daemon, &["blocklist", "status"]);
    let mut h = Sha256::new();
    let mut entries: Vec<&Value> = body["entries"].as_array().unwrap().iter().collect();
    entries.sort_by_key(|e| e["domain"].as_str().unwrap().to_string());
    for e in &entries {
        h.update(serde_json::to_vec(e).unwrap());
        h.update(b"\n");
    }
    let mut patterns: Vec<&Value> = body["patterns"].as_array().unwrap().iter().collect();
    patterns.sort_by_key(|p| {
        (
            p["type"].as_str().unwrap().to_string(),
            p["pattern"].as_str().unwrap().to_string(),
        )
    });
    for p in patterns {
        h.update(serde_json::to_vec(p).unwrap());
        h.update(b"\n");
    }
    let recomputed = format!(
        "sha256:{}",
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    assert_eq!(body["checksum"], recomputed.as_str(), "published checksum");
    assert_eq!(status["checksum"], recomputed.as_str(), "status checksum");
    assert_eq!(body["version"], status["version"], "version");
    assert_eq!(status["entries"], entries.len(), "status entries");
    entries
        .iter()
        .map(|e| e["domain"].as_str().unwrap().to_string())
        .collect()
}

/// How many of `domains` are listed.
fn listed_of(list: &std::collections::BTreeSet<String>, domains: &[String]) -> usize {
    domains.iter().filter(|d| list.contains(*d)).count()
}

const ROUNDS: usize = 20;

const PER_LIST: usize = 1_000;

/// `PER_LIST` names `<prefix><round>-<i>.example`.
fn names(prefix: &str, round: usize) -> Vec<String> {
    (0..PER_LIST)
        .map(|i| format!("{prefix}{round}-{i}.example"))
        .collect()
}

/// A daemon with the public blocklist API on 127.0.0.1:3000 and one source, `feed`: the file
/// `source` with its SHA-256 beside it (`write_source`).
fn blocklist_daemon(ns: &NetNs, source: &std::path::Path) -> Daemon {
    let mut config = plain_config();
    config.blocklist_api = Some("127.0.0.1:3000".into());
    config.extra_toml = format!(
        "[[blocklist.sources]]\nname = \"feed\"\nurl = {:?}\nsha256_url = {:?}\n",
        source.display().to_string(),
        source.with_extension("sha256").display().to_string()
    );
    Daemon::start(ns, &config)
}

/// Writes `domains` to the source file and its `sha256sum` line beside it.
fn write_source(source: &std::path::Path, domains: &[String]) {
    use sha2::Digest;
    let text = domains.join("\n") + "\n";
    std::fs::write(source, &text).unwrap();
    let sum: String = sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let name = source.file_name().unwrap().to_string_lossy();
    std::fs::write(source.with_extension("sha256"), format!("{sum}  {name}\n")).unwrap();
}

/// The kernel's domain set, read from the pinned map itself (not the daemon's mirror): keys,
/// and keys whose rule covers subdomains.
fn kernel_domain_keys(bpffs: &phantom_tests::BpffsDir) -> (usize, usize) {
    use phantom_common::dns::DOMAIN_SUBDOMAINS;
    let pinned = aya::maps::MapData::from_pin(bpffs.path().join("PH_DOMAINS")).unwrap();
    let map: aya::maps::HashMap<_, u64, u8> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(pinned)).unwrap();
    let flags: Vec<u8> = map.iter().filter_map(Result::ok).map(|(_, f)| f).collect();
    let subdomains = flags
        .iter()
        .filter(|f| **f & DOMAIN_SUBDOMAINS != 0)
        .count();
    (flags.len(), subdomains)
}

/// A large import writes the kernel's domain set while the store commits it; when the commit
/// fails the import is refused, and the kernel set, the list and the resolver are as before.
/// The same import then goes in whole, kernel set included, and stays after a kill -9.
#[test]
fn a_large_import_whose_commit_fails_leaves_the_kernel_set_as_it_was() {
    if !require_root("a_large_import_whose_commit_fails_leaves_the_kernel_set_as_it_was") {
        return;
    }
    let link = phantom_tests::GuardedLink::new();
    let bpffs = phantom_tests::BpffsDir::new();
    let mut config = DaemonConfig::new(phantom_tests::GuardedLink::SERVER_DEV, bpffs.path());
    config.blocklist_extra = "sync_interval_seconds = 0\n".into();
    config
        .env
        .push(("PHANTOM_FAIL_AT".into(), "blocklist.large_commit".into()));
    let mut daemon = Daemon::start(&link.server, &config);
    // A listed name without its subdomains; the import covers them (a changed kernel rule)
    // and adds 20,000 names.
    api(
        &daemon,
        &[
            "blocklist",
            "add",
            "domain=kept-casino.example",
            "subdomains=false",
        ],
    );
    assert_eq!(kernel_domain_keys(&bpffs), (1, 0));
    let names: Vec<String> = (0..20_000)
        .map(|i| format!("casino{i}.import-fault.example"))
        .chain(["kept-casino.example".to_string()])
        .collect();
    let file = daemon.dir().join("list.txt");
    std::fs::write(&file, names.join("\n")).unwrap();
    let import = |daemon: &Daemon| {
        daemon.client().call(
            "blocklist",
            "import",
            json!({"path": file.display().to_string(), "format": "plain"}),
        )
    };
    let before = api(&daemon, &["blocklist", "status"]);

    let reply = import(&daemon);
    assert_eq!(reply["success"], false, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .is_some_and(|e| e.contains("blocklist.large_commit")),
        "{reply}"
    );
    assert_eq!(
        kernel_domain_keys(&bpffs),
        (1, 0),
        "the kernel set is put back: the added keys out, the changed rule as it was"
    );
    assert_eq!(
        api(&daemon, &["datapath", "dns_rules"])["kernel_entries"],
        1,
        "and the daemon's view of it"
    );
    let after = api(&daemon, &["blocklist", "status"]);
    for field in ["version", "entries", "checksum", "kernel_rules"] {
        assert_eq!(after[field], before[field], "{field}: {before} / {after}");
    }
    let verdict = api(
        &daemon,
        &["blocklist", "verify", "domain=casino7.import-fault.example"],
    );
    assert_eq!(verdict["blocked"], false, "{verdict}");

    // The fault fires once: the same import now goes in, the kernel set with it.
    let reply = import(&daemon);
    assert_eq!(reply["data"]["imported"], 20_001, "{reply}");
    assert_eq!(kernel_domain_keys(&bpffs), (20_001, 20_001));
    let verdict = api(
        &daemon,
        &["blocklist", "verify", "domain=casino7.import-fault.example"],
    );
    assert_eq!(verdict["blocked"], true, "{verdict}");
    daemon.kill9();
    daemon.restart();
    assert_eq!(api(&daemon, &["blocklist", "status"])["entries"], 20_001);
    assert_eq!(kernel_domain_keys(&bpffs), (20_001, 20_001));
}

/// Imports: each round a new file of 1,000 names, `kill -9` at a random point; after the
/// restart the round's names are all listed or none (all when acknowledged), every earlier
/// round that made it stays, and the list's version and checksum agree.
#[test]
fn kill_9_during_blocklist_imports_leaves_whole_versions() {
    if !require_root("kill_9_during_blocklist_imports_leaves_whole_versions") {
        return;
    }
    let mut rng = Rng::new("kill_9_during_blocklist_imports_leaves_whole_versions");
    let ns = NetNs::new("phf");
    let files = tempfile::tempdir().unwrap();
    let mut daemon = blocklist_daemon(&ns, &files.path().join("source.txt"));
    let path = files.path().join("import.txt");
    let import_arg = format!("path={}", path.display());
    std::fs::write(&path, names("warm", 0).join("\n")).unwrap();
    // The CLI's own start comes first: aim past the measured time.
    let window = timed(&daemon, &["blocklist", "import", &import_arg]).mul_f32(3.0);
    eprintln!("import: kills within {window:?}");
    let mut kept: Vec<Vec<String>> = vec![names("warm", 0)];
    let (mut acked_imports, mut applied_imports) = (0, 0);
    for round in 0..ROUNDS {
        let round_names = names("import", round);
        std::fs::write(&path, round_names.join("\n")).unwrap();
        let acked = kill_during(
            &mut daemon,
            &["blocklist", "import", &import_arg],
            rng.below(window),
        );
        let list = consistent_list(&ns, &daemon);
        let n = listed_of(&list, &round_names);
        assert!(
            n == 0 || n == PER_LIST,
            "import round {round}: {n} of {PER_LIST} names listed (half an import)"
        );
        assert!(
            !acked || n == PER_LIST,
            "import round {round}: acknowledged, lost"
        );
        if n == PER_LIST {
            acked_imports += usize::from(acked);
            applied_imports += 1;
            kept.push(round_names);
        }
        for earlier in &kept {
            assert_eq!(
                listed_of(&list, earlier),
                PER_LIST,
                "round {round}: an earlier import lost"
            );
        }
    }
    eprintln!("imports: {applied_imports} of {ROUNDS} applied, {acked_imports} acknowledged");
}

/// Syncs: each round the source holds a new set of 1,000 names (it drops the last round's),
/// `kill -9` at a random point; after the restart exactly one whole set is listed, the new
/// one when acknowledged, the operator's own entries stay, and version and checksum agree.
#[test]
fn kill_9_during_blocklist_syncs_leaves_whole_versions() {
    if !require_root("kill_9_during_blocklist_syncs_leaves_whole_versions") {
        return;
    }
    let mut rng = Rng::new("kill_9_during_blocklist_syncs_leaves_whole_versions");
    let ns = NetNs::new("phf");
    let files = tempfile::tempdir().unwrap();
    let source = files.path().join("source.txt");
    write_source(&source, &names("sync", 0));
    let mut daemon = blocklist_daemon(&ns, &source);
    let path = files.path().join("import.txt");
    std::fs::write(&path, names("operator", 0).join("\n")).unwrap();
    api(
        &daemon,
        &["blocklist", "import", &format!("path={}", path.display())],
    );
    api(&daemon, &["blocklist", "sync"]);
    assert_eq!(
        listed_of(&consistent_list(&ns, &daemon), &names("sync", 0)),
        PER_LIST
    );
    write_source(&source, &names("sync", 1000));
    let window = timed(&daemon, &["blocklist", "sync"]).mul_f32(1.5);
    eprintln!("sync: kills within {window:?}");
    let mut current = names("sync", 1000);
    let (mut acked_syncs, mut applied_syncs) = (0, 0);
    for round in 1..=ROUNDS {
        let round_names = names("sync", round);
        write_source(&source, &round_names);
        let acked = kill_during(&mut daemon, &["blocklist", "sync"], rng.below(window));
        let list = consistent_list(&ns, &daemon);
        let (new, old) = (listed_of(&list, &round_names), listed_of(&list, &current));
        assert!(
            (new, old) == (PER_LIST, 0) || (new, old) == (0, PER_LIST),
            "sync round {round}: {new} new and {old} old names listed (half a sync)"
        );
        assert!(
            !acked || new == PER_LIST,
            "sync round {round}: acknowledged, lost"
        );
        if new == PER_LIST {
            acked_syncs += usize::from(acked);
            applied_syncs += 1;
            current = round_names;
        }
        assert_eq!(
            listed_of(&list, &names("operator", 0)),
            PER_LIST,
            "sync round {round}: the operator's import lost"
        );
    }
    eprintln!("syncs: {applied_syncs} of {ROUNDS} applied, {acked_syncs} acknowledged");
}

#[test]
fn kill_9_during_change_subnet_keeps_every_client_in_one_subnet() {
    if !require_root("kill_9_during_change_subnet_keeps_every_client_in_one_subnet") {
        return;
    }
    const SUBNETS: [&str; 2] = ["10.77.0.0/24", "10.78.0.0/24"];
    let mut rng = Rng::new("kill_9_during_change_subnet_keeps_every_client_in_one_subnet");
    let ns = NetNs::new("phf");
    let mut config = plain_config();
    let wireguard = WireguardSettings::new(SUBNETS[0], "192.0.2.1");
    let iface = wireguard.interface.clone();
    config.wireguard = Some(wireguard);
    let mut daemon = Daemon::start(&ns, &config);
    let mut acknowledged = vec!["first".to_string()];
    api(&daemon, &["core", "add_client", "client_name=first"]);
    let window = {
        let t = timed(
            &daemon,
            &[
                "core",
                "change_subnet",
                &format!("new_subnet={}", SUBNETS[1]),
                "confirm=true",
            ],
        );
        timed(
            &daemon,
            &[
                "core",
                "change_subnet",
                &format!("new_subnet={}", SUBNETS[0]),
                "confirm=true",
            ],
        );
        // The CLI's start is part of the measured time: most kills land inside the change.
        t
    };
    eprintln!("change_subnet: kills within {window:?}");
    let mut moved = 0;
    for round in 0..ROUNDS {
        let name = format!("client-{round}");
        api(
            &daemon,
            &["core", "add_client", &format!("client_name={name}")],
        );
        acknowledged.push(name);
        let before = api(&daemon, &["core", "get_subnet_info"])["current_subnet"]
            .as_str()
            .unwrap()
            .to_string();
        let target = SUBNETS.iter().find(|s| **s != before).unwrap();
        let acked = kill_during(
            &mut daemon,
            &[
                "core",
                "change_subnet",
                &format!("new_subnet={target}"),
                "confirm=true",
            ],
            rng.below(window),
        );
        let now = api(&daemon, &["core", "get_subnet_info"])["current_subnet"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            now == before || now == *target,
            "round {round}: subnet {now}"
        );
        assert!(
            !acked || now == *target,
            "round {round}: an acknowledged change lost"
        );
        moved += usize::from(now == *target);
        // Both subnets are /24s: the first three octets say which.
        let network = now.trim_end_matches("0/24");
        let clients = api(&daemon, &["core", "list_clients", "per_page=1000"])["clients"]
            .as_array()
            .unwrap()
            .clone();
        let mut names: Vec<String> = clients
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        let mut want = acknowledged.clone();
        want.sort();
        assert_eq!(names, want, "round {round}: clients");
        for c in &clients {
            let ip = c["ip"].as_str().unwrap();
            assert!(ip.starts_with(network), "round {round}: {c} outside {now}");
        }
        // The interface carries the server's address in that subnet and no other.
        let out = ns.ip(&["-4", "-o", "addr", "show", "dev", &iface]);
        let addrs: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
            .collect();
        assert_eq!(
            addrs,
            [format!("{network}1/24")],
            "round {round}: interface"
        );
    }
    eprintln!("{moved} of {ROUNDS} subnet changes done before the kill");
    // Afterwards the daemon still adds clients in the subnet it is on.
    api(&daemon, &["core", "add_client", "client_name=last"]);
}

// ---------------------------------------------------------------- a damaged client store

/// The newest `clients-<unix>.db` in the state's `backups/`.
fn newest_backup(state: &std::path::Path) -> std::path::PathBuf {
    let mut found: Vec<_> = std::fs::read_dir(state.join("backups"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("clients-")
        })
        .collect();
    found.sort();
    found.pop().expect("no client store backup")
}

#[test]
fn a_damaged_client_store_stops_the_start_naming_the_file_and_the_newest_good_backup() {
    if !require_root(
        "a_damaged_client_store_stops_the_start_naming_the_file_and_the_newest_good_backup",
    ) {
        return;
    }
    let ns = NetNs::new("phf");
    let state = tempfile::tempdir().unwrap();
    let mut config = plain_config();
    config.state_dir = Some(state.path().to_path_buf());
    config.wireguard = Some(WireguardSettings::new(VPN_SUBNET, "192.0.2.1"));
    let mut daemon = Daemon::start(&ns, &config);
    api(&daemon, &["core", "add_client", "client_name=alice"]);
    api(&daemon, &["core", "add_client", "client_name=bob"]);
    daemon.stop();
    // This start backs up alice and bob; carol comes after the backup.
    daemon.restart();
    let backup = newest_backup(state.path());
    api(&daemon, &["core", "add_client", "client_name=carol"]);
    daemon.stop();
    let db = state.path().join("clients.db");
    let good = std::fs::read(&db).unwrap();

    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let damages: [(&str, Damage); 3] = [
        ("header overwritten", Box::new(|b| b[..100].fill(0x5a))),
        (
            "a page overwritten",
            Box::new(|b| {
                let page = usize::from(u16::from_be_bytes([b[16], b[17]]));
                b[page..2 * page].fill(0xa5);
            }),
        ),
        ("emptied", Box::new(Vec::clear)),
    ];
    for (what, damage) in &damages {
        let mut bytes = good.clone();
        damage(&mut bytes);
        std::fs::write(&db, &bytes).unwrap();
        let before = daemon.log().len();
        let status = daemon.restart_refused();
        assert!(!status.success(), "{what}: {status}");
        let log = daemon.log()[before..].to_string();
        eprintln!(
            "{what}: {}",
            log.lines()
                .find(|l| l.contains("damaged"))
                .unwrap_or_default()
        );
        for needle in [
            db.display().to_string(),
            backup.display().to_string(),
            "damaged".to_string(),
            "nothing reset".to_string(),
        ] {
            assert!(
                log.contains(&needle),
                "{what}: the message lacks {needle:?}:\n{log}"
            );
        }
        // No silent reset: the damaged file is left exactly as it was.
        assert_eq!(
            std::fs::read(&db).unwrap(),
            bytes,
            "{what}: the file changed"
        );
    }

    // Following the message brings back what the backup holds.
    std::fs::copy(&backup, &db).unwrap();
    for side in ["clients.db-wal", "clients.db-shm"] {
        let _ = std::fs::remove_file(state.path().join(side));
    }
    daemon.restart();
    assert_eq!(client_names(&daemon), ["alice", "bob"]);
}

// ---------------------------------------------------------------- Redis under sentry load

/// Sets the flag when dropped: the load threads of a scope stop even when an assertion fails.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

type Counts = std::sync::Mutex<std::collections::BTreeMap<u16, u64>>;

/// Takes the replies counted so far by status (0: none within 5 s), leaving none.
fn take(counts: &Counts) -> std::collections::BTreeMap<u16, u64> {
    std::mem::take(&mut *counts.lock().unwrap())
}

/// Redis stalls (SIGSTOP) for 300 ms, then for 3 s, dies and comes back, while four clients
/// load the sentry with `redis_fail_mode = "closed"`: every request is answered (none hangs
/// on the frozen Redis); a short stall degrades nothing; a long one and the death are an
/// outage (503, `phantom_sentry_store_up 0`); the sentry recovers on its own each time.
#[test]
fn redis_paused_and_killed_under_load_fails_closed_and_recovers() {
    if !require_root("redis_paused_and_killed_under_load_fails_closed_and_recovers") {
        return;
    }
    let mut redis = RedisServer::start();
    let ns = NetNs::new("phf");
    let _site = UpstreamSite::start(&ns, "127.0.0.1:18000");
    let mut config = plain_config();
    // The gate always open and the load past the ticket ceiling: Redis is asked for a ticket
    // (once a second while the answer is "none"; every time once it fails).
    config.extra_toml = format!(
        "[sentry]\nenabled = true\nlisten = {SITE:?}\nupstream = \"http://127.0.0.1:18000\"\n\
         redis_url = {:?}\nactivation_cpu_threshold = 0.0\nredis_fail_mode = \"closed\"\n",
        redis.url()
    );
    let daemon = Daemon::start(&ns, &config);
    let store = |healthy: bool| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let st = api(&daemon, &["sentry", "status"]);
            if st["store"]["healthy"] == healthy {
                let metrics = http_get(&ns, "127.0.0.1:9469", "/metrics");
                assert_eq!(
                    metric_value(&metrics, "phantom_sentry_store_up{backend=\"redis\"}"),
                    Some(f64::from(u8::from(healthy)))
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "store never healthy={healthy}: {st}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let counts: Counts = Counts::default();
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        for _ in 0..4 {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let status = http_from(
                        &ns,
                        "127.0.0.1",
                        SITE,
                        "GET /load",
                        &[],
                        b"",
                        Duration::from_secs(5),
                    )
                    .map_or(0, |r| r.status);
                    *counts.lock().unwrap().entry(status).or_default() += 1;
                }
            });
        }
        std::thread::sleep(Duration::from_millis(700));
        let phase = take(&counts);
        eprintln!("replies by status: {phase:?}");
        assert!(
            phase.get(&200).copied().unwrap_or(0) > 10 && phase.len() == 1,
            "warm: {phase:?}"
        );

        // A short stall: answered and checked, not an outage.
        redis.pause();
        std::thread::sleep(Duration::from_millis(300));
        redis.unpause();
        std::thread::sleep(Duration::from_millis(700));
        let phase = take(&counts);
        eprintln!("replies by status: {phase:?}");
        assert_eq!(
            phase.keys().collect::<Vec<_>>(),
            [&200],
            "short stall: {phase:?}"
        );
        store(true);

        // A long stall: an outage, failing closed, every request still answered.
        redis.pause();
        std::thread::sleep(Duration::from_millis(1_000));
        store(false);
        std::thread::sleep(Duration::from_millis(2_000));
        redis.unpause();
        store(true);
        let phase = take(&counts);
        eprintln!("replies by status: {phase:?}");
        assert!(
            phase.get(&503).is_some_and(|n| *n > 0),
            "long stall: {phase:?}"
        );
        assert!(
            !phase.contains_key(&0),
            "long stall: requests went unanswered: {phase:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
        take(&counts);
        std::thread::sleep(Duration::from_millis(700));
        let phase = take(&counts);
        eprintln!("replies by status: {phase:?}");
        assert_eq!(
            phase.keys().collect::<Vec<_>>(),
            [&200],
            "after the stall: {phase:?}"
        );

        // Dead, then back.
        redis.stop();
        store(false);
        take(&counts);
        std::thread::sleep(Duration::from_millis(500));
        let phase = take(&counts);
        eprintln!("replies by status: {phase:?}");
        assert!(phase.get(&503).is_some_and(|n| *n > 0), "dead: {phase:?}");
        assert!(
            !phase.contains_key(&200) && !phase.contains_key(&0),
            "dead: {phase:?}"
        );
        redis.resume();
        store(true);
        std::thread::sleep(Duration::from_millis(500));
        take(&counts);
        std::thread::sleep(Duration::from_millis(700));
        let phase = take(&counts);
        eprintln!("replies by status: {phase:?}");
        assert_eq!(phase.keys().collect::<Vec<_>>(), [&200], "back: {phase:?}");
    });
    let unavailable = api(&daemon, &["sentry", "status"])["requests"]["unavailable"]
        .as_u64()
        .unwrap();
    assert!(unavailable > 0);
    // Admin changes work again too.
    api(&daemon, &["sentry", "whitelist_add", "ip=198.51.100.9"]);
}

// ---------------------------------------------------------------- kernel maps full

/// The entry of `map` in `datapath status`.
fn map_status(daemon: &Daemon, map: &str) -> Value {
    api(daemon, &["datapath", "status"])["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == map)
        .unwrap_or_else(|| panic!("no map {map}"))
        .clone()
}

/// `datapath list_denied`: (address, reason) of each live deny.
fn denies(daemon: &Daemon) -> Vec<(String, String)> {
    api(daemon, &["datapath", "list_denied"])["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_string(),
                e["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// `count` UDP datagrams from `from` (an address of the peer) to the server, sent from CPU 0,
/// where the guard's pass-cache slots of these sources then are.
fn send_udp_on_cpu0(link: &phantom_tests::GuardedLink, from: &str, count: usize) {
    link.send_udp_on(
        Some(0),
        from,
        phantom_tests::GuardedLink::SERVER_V4,
        count,
        64,
    );
}

/// No line the kernel programs logged names an address of the test's sources (the no-logging
/// policy, docs/dns.md "Privacy").
fn assert_kernel_lines_name_no_address(log: &str) {
    assert!(
        log.lines()
            .filter(|l| l.contains("datapath::kernel"))
            .all(|l| !l.contains("192.0.2.")),
        "{log}"
    );
}

/// A 20-byte frame from the peer to the server whose ethertype says IPv4 and whose IP header
/// stops after six bytes (an AF_PACKET socket writes it as is).
fn send_truncated_ipv4_frame(link: &phantom_tests::GuardedLink) {
    let dst = link
        .server
        .mac_bytes(phantom_tests::GuardedLink::SERVER_DEV);
    let src = link.peer.mac_bytes(phantom_tests::GuardedLink::PEER_DEV);
    let mut frame = [dst, src].concat();
    frame.extend_from_slice(&[0x08, 0x00, 0x45, 0x00, 0x00, 0x14, 0x00, 0x00]);
    link.peer.run(move || {
        let ifindex = nix::net::if_::if_nametoindex(phantom_tests::GuardedLink::PEER_DEV).unwrap();
        // SAFETY: plain socket calls on a descriptor owned here; the address is a zeroed
        // sockaddr_ll with its family and interface set.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            let sent = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            let error = std::io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(sent, frame.len() as isize, "sendto: {error}");
        }
    });
}

/// The kernel maps at small capacities (policy 8, domain set 16, per-source 4), filled by the
/// sentry's penalties, operator denies, a blocklist import, operator DNS rules and traffic
/// from six sources: each full map says so in `datapath status` and `/metrics`, refuses or
/// evicts as docs/datapath.md says, and no operator entry is ever lost, silently or not.
#[test]
fn full_kernel_maps_refuse_or_evict_as_documented_and_keep_operator_entries() {
    if !require_root("full_kernel_maps_refuse_or_evict_as_documented_and_keep_operator_entries") {
        return;
    }
    let link = phantom_tests::GuardedLink::new();
    let bpffs = phantom_tests::BpffsDir::new();
    let ns = &link.server;
    let _site = UpstreamSite::start(ns, "127.0.0.1:18000");
    let mut config = DaemonConfig::new(phantom_tests::GuardedLink::SERVER_DEV, bpffs.path());
    config.datapath_extra = "max_policies = 8\nmax_domains = 16\nmax_sources = 4\n".into();
    config.blocklist_extra = "sync_interval_seconds = 0\n".into();
    config.extra_toml = sentry_toml("hard_block_after = 1\nactivation_cpu_threshold = 0.0\n");
    let mut daemon = Daemon::start(ns, &config);
    let metric = |name: &str| {
        metric_value(&http_get(ns, "127.0.0.1:9469", "/metrics"), name).unwrap_or(-1.0)
    };

    // The policy map: six penalty denies from the sentry (sources hammering through their
    // challenges), then two operator denies fill it.
    api(&daemon, &["sentry", "set_mode", "mode=DEFCON_1"]);
    let penalized: Vec<String> = (11..17).map(|n| format!("127.0.0.{n}")).collect();
    std::thread::scope(|s| {
        for from in &penalized {
            s.spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(20);
                while get(ns, from, "/page").status != 403 {
                    assert!(Instant::now() < deadline, "{from} never hard-blocked");
                    std::thread::sleep(Duration::from_millis(250));
                }
            });
        }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while denies(&daemon)
        .iter()
        .filter(|(_, r)| r == "penalty")
        .count()
        < penalized.len()
    {
        assert!(
            Instant::now() < deadline,
            "penalties: {:?}",
            denies(&daemon)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let operator: Vec<String> = std::iter::once(phantom_tests::GuardedLink::PEER_V4.to_string())
        .chain((1..=7).map(|n| format!("198.51.100.{n}")))
        .collect();
    for ip in &operator[..2] {
        api(&daemon, &["datapath", "deny", &format!("ip={ip}")]);
    }
    let policy = map_status(&daemon, "PH_POLICY");
    assert_eq!(
        (policy["held"].as_u64(), policy["full"].as_bool()),
        (Some(8), Some(true)),
        "{policy}"
    );
    assert!(
        policy["when_full"]
            .as_str()
            .unwrap()
            .contains("never another operator entry")
    );
    assert_eq!(metric("phantom_datapath_map_full{map=\"PH_POLICY\"}"), 1.0);
    // Each further operator deny takes the place of a penalty deny.
    for ip in &operator[2..] {
        api(&daemon, &["datapath", "deny", &format!("ip={ip}")]);
    }
    let listed = denies(&daemon);
    assert_eq!(listed.len(), 8, "{listed:?}");
    assert!(listed.iter().all(|(_, r)| r == "manual"), "{listed:?}");
    // Full of operator entries: the next one is refused, clearly, and changes nothing.
    let (code, message) = refused(&daemon, &["datapath", "deny", "ip=198.51.100.99"]);
    assert_eq!(code, "MAP_FULL", "{message}");
    assert!(
        message.contains("PH_POLICY is full") && message.contains("max_policies"),
        "{message}"
    );
    assert!(!denies(&daemon).iter().any(|(a, _)| a == "198.51.100.99"));
    let policy = map_status(&daemon, "PH_POLICY");
    assert_eq!(
        (policy["refused"].as_u64(), policy["evicted"].as_u64()),
        (Some(1), Some(6)),
        "{policy}"
    );
    assert_eq!(
        metric("phantom_datapath_map_refused_total{map=\"PH_POLICY\"}"),
        1.0
    );
    assert_eq!(
        metric("phantom_datapath_map_evicted_total{map=\"PH_POLICY\"}"),
        6.0
    );
    // The peer's deny is in force.
    link.send_udp(
        phantom_tests::GuardedLink::PEER_V4,
        phantom_tests::GuardedLink::SERVER_V4,
        5,
        64,
    );
    let dropped = api(&daemon, &["datapath", "list_denied"])["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == phantom_tests::GuardedLink::PEER_V4)
        .and_then(|e| e["dropped_packets"].as_u64())
        .unwrap();
    assert_eq!(dropped, 5);

    // The domain set: 100 blocklist rules into 16 places (enough to go to the kernel in a
    // batch, which the full map stops part way): 16 in the kernel, 84 left out and reported;
    // the resolver's engine still blocks all 100.
    let lists = tempfile::tempdir().unwrap();
    let file = lists.path().join("list.txt");
    let listed: Vec<String> = (0..100).map(|i| format!("full-{i}.example")).collect();
    std::fs::write(&file, listed.join("\n")).unwrap();
    api(
        &daemon,
        &["blocklist", "import", &format!("path={}", file.display())],
    );
    let status = api(&daemon, &["blocklist", "status"]);
    assert_eq!(
        (
            status["kernel_rules"].as_u64(),
            status["kernel_entries"].as_u64(),
            status["kernel_left_out"].as_u64()
        ),
        (Some(100), Some(16), Some(84)),
        "{status}"
    );
    assert!(listed.iter().all(|d| blocked(&daemon, d)));
    let domains = map_status(&daemon, "PH_DOMAINS");
    assert_eq!(domains["full"], true, "{domains}");
    assert!(domains["refused"].as_u64().unwrap() >= 84, "{domains}");
    assert_eq!(metric("phantom_dns_filter_rules_left_out"), 84.0);
    assert_eq!(metric("phantom_datapath_map_full{map=\"PH_DOMAINS\"}"), 1.0);
    // Operator rules take the places of blocklist rules, one each, until only operator
    // rules are left; then the next is refused and not kept.
    for i in 0..16 {
        api(
            &daemon,
            &[
                "datapath",
                "dns_block",
                &format!("domain=operator-{i}.example"),
            ],
        );
    }
    let status = api(&daemon, &["blocklist", "status"]);
    assert_eq!(status["kernel_left_out"], 100, "{status}");
    assert_eq!(map_status(&daemon, "PH_DOMAINS")["evicted"], 16);
    let (code, message) = refused(
        &daemon,
        &["datapath", "dns_block", "domain=operator-16.example"],
    );
    assert_eq!(code, "MAP_FULL", "{message}");
    assert!(
        message.contains("PH_DOMAINS is full") && message.contains("max_domains"),
        "{message}"
    );
    let rules = api(&daemon, &["datapath", "dns_rules"]);
    assert_eq!(rules["count"], 16, "{rules}");
    // Room again: removing operator rules lets left-out blocklist rules back in at once.
    for i in 0..4 {
        api(
            &daemon,
            &[
                "datapath",
                "dns_unblock",
                &format!("domain=operator-{i}.example"),
            ],
        );
    }
    assert_eq!(
        api(&daemon, &["blocklist", "status"])["kernel_left_out"],
        96
    );

    // The per-source map: six sources through a map of four; the least recently seen go.
    for n in 4..=7 {
        link.peer.ip(&[
            "addr",
            "add",
            &format!("192.0.2.{n}/24"),
            "dev",
            phantom_tests::GuardedLink::PEER_DEV,
        ]);
    }
    for n in 3..=7 {
        send_udp_on_cpu0(&link, &format!("192.0.2.{n}"), 3);
    }
    let sources = map_status(&daemon, "PH_SOURCES");
    assert_eq!(
        (sources["held"].as_u64(), sources["full"].as_bool()),
        (Some(4), Some(true)),
        "{sources}"
    );
    assert!(
        sources["when_full"]
            .as_str()
            .unwrap()
            .contains("least recently seen")
    );
    let top = api(&daemon, &["datapath", "top_sources", "count=10"])["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["address"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    // The newest source is held (the map holds four, above). Which older one went is the
    // kernel's choice: its LRU is approximate (per-CPU free lists), and the pass cache's
    // counts reach the map when a slot is taken over, which counts as a use.
    assert!(top.contains(&"192.0.2.7".to_string()), "{top:?}");
    assert_eq!(metric("phantom_datapath_map_full{map=\"PH_SOURCES\"}"), 1.0);
    // The guard itself reports the full map through aya-log, into the daemon's log: a source
    // that comes back (after its pass-cache slot lapsed, 1 s) and finds its entry evicted.
    // Five sources never fit in four entries, so every round evicts one of them; all on CPU 0,
    // where their slots are.
    let evicted = "PH_SOURCES is full: it evicted the entry of a source still sending";
    let mut rounds = 0;
    while !daemon.log().contains(evicted) {
        rounds += 1;
        assert!(
            rounds <= 5,
            "no kernel event after {rounds} rounds:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(1100));
        for n in 3..=7 {
            send_udp_on_cpu0(&link, &format!("192.0.2.{n}"), 3);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = daemon.log();
    let line = log.lines().find(|l| l.contains(evicted)).unwrap();
    assert!(
        line.contains("WARN") && line.contains("datapath.max_sources"),
        "{line}"
    );
    assert_kernel_lines_name_no_address(&log);
    assert!(metric("phantom_datapath_kernel_log_records_total{level=\"warn\"}") >= 1.0);
    // Malformed input is skipped and said so (at most once a second per CPU): a frame that
    // claims IPv4 but ends inside the IP header.
    send_truncated_ipv4_frame(&link);
    wait_for_log(
        &daemon,
        "xdp_guard: malformed frame skipped (20 bytes, cut short inside its IP header)",
        1,
    );
    assert!(metric("phantom_datapath_kernel_log_records_total{level=\"info\"}") >= 1.0);
    // Verdict samples are off (`datapath.kernel_samples` defaults to false).
    assert!(!daemon.log().contains("sample:"));
    // The churn touched no deny: the peer is still dropped.
    link.send_udp(
        phantom_tests::GuardedLink::PEER_V4,
        phantom_tests::GuardedLink::SERVER_V4,
        5,
        64,
    );
    let entry = api(&daemon, &["datapath", "list_denied"])["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == phantom_tests::GuardedLink::PEER_V4)
        .cloned()
        .unwrap();
    assert_eq!(entry["dropped_packets"], 10, "{entry}");

    // After kill -9 every operator entry is back: the eight denies and the twelve rules. The
    // start also turns the verdict samples on (`datapath.kernel_samples`, read at load).
    daemon.kill9();
    daemon.edit_config("[datapath]\n", "[datapath]\nkernel_samples = true\n");
    daemon.restart();
    let mut after: Vec<String> = denies(&daemon).into_iter().map(|(a, _)| a).collect();
    after.sort();
    let mut want = operator.clone();
    want.sort();
    assert_eq!(after, want);
    assert_eq!(api(&daemon, &["datapath", "dns_rules"])["count"], 12);
    assert_eq!(
        api(&daemon, &["blocklist", "status"])["kernel_left_out"],
        96
    );
    // With samples on, a passed packet and a dropped one are each sampled, without addresses.
    link.send_udp("192.0.2.4", phantom_tests::GuardedLink::SERVER_V4, 1, 64);
    link.send_udp(
        phantom_tests::GuardedLink::PEER_V4,
        phantom_tests::GuardedLink::SERVER_V4,
        1,
        64,
    );
    wait_for_log(&daemon, "xdp_guard sample: pass ipv4", 1);
    let log = wait_for_log(&daemon, "xdp_guard sample: drop denied_manual", 1);
    assert_kernel_lines_name_no_address(&log);
}

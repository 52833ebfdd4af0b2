//! Sentry tests: the state store suite run against both backends (embedded, and a real
//! redis-server this test starts), the fleet sharing one Redis, Redis outages, and the
//! end-to-end defence in namespaces — steady sources, a burst, DEFCON_1, 429 with a signed
//! package, the reference solver, tickets, every rejection, escalation into XDP drops.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a failed test

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use phantom_daemon::{
    config::SentryConfig,
    sentry::{
        Decision, Mode, Sentry, Tunables, authenticated_index,
        challenge::{Authenticated, Package, Proof, Signer},
        proxy, solver,
        store::{ModeState, Store, TrafficStats, embedded::EmbeddedStore, redis::RedisStore},
    },
    source::{Source, SourcePrefix},
};
use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, GuardedLink, HttpReply, NetNs, RedisServer, UpstreamSite, api,
    api_err, http_from, metric_value, require_root,
};
use serde_json::{Value, json};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn src(s: &str) -> Source {
    s.parse().unwrap()
}

// ---------------------------------------------------------------- store suite

/// The semantics every backend must have. `reopen` gives a second handle on the same
/// state (a restarted daemon for embedded, another host for Redis).
async fn store_semantics(store: &Store, reopen: &dyn Fn() -> Store) {
    let a = ip("198.51.100.1");
    let b = ip("198.51.100.2");
    let (sa, sb) = (Source::from(a), Source::from(b));
    // An IPv6 source is its prefix, one key for the whole /64.
    let net = src("2001:db8:1:2::/64");
    store.ping().await.unwrap();

    // config and state
    assert_eq!(store.get_config().await.unwrap(), None);
    let t = Tunables {
        sensitivity_factor: 2.5,
        ip_static_threshold: 20,
        ..Tunables::default()
    };
    store.set_config(&t).await.unwrap();
    assert_eq!(store.get_config().await.unwrap(), Some(t.clone()));
    assert_eq!(store.get_state().await.unwrap(), None);
    let s = ModeState {
        current_mode: Mode::Defcon1,
        last_incident_time: 1_700_000_000,
    };
    store.set_state(&s).await.unwrap();
    assert_eq!(store.get_state().await.unwrap(), Some(s));

    // whitelist: set semantics
    assert!(store.whitelist_add(a).await.unwrap());
    assert!(!store.whitelist_add(a).await.unwrap());
    assert!(store.whitelist_contains(a).await.unwrap());
    assert!(!store.whitelist_contains(b).await.unwrap());
    assert!(store.whitelist_add(b).await.unwrap());
    assert_eq!(store.whitelist().await.unwrap(), vec![a, b]);
    assert!(store.whitelist_remove(b).await.unwrap());
    assert!(!store.whitelist_remove(b).await.unwrap());

    // tickets
    assert_eq!(store.ticket(sa).await.unwrap(), None);
    let exp = store.set_ticket(sa, 600).await.unwrap();
    let got = store.ticket(sa).await.unwrap().unwrap();
    assert!(got.abs_diff(exp) <= 1, "{got} vs {exp}");
    store.set_ticket(net, 600).await.unwrap();
    assert!(store.ticket(net).await.unwrap().is_some());
    store.clear_ticket(net).await.unwrap();
    assert_eq!(store.ticket(net).await.unwrap(), None);

    // penalty box: count and TTL = unit × count
    assert_eq!(store.penalty_incr(sb, 900).await.unwrap(), 1);
    assert_eq!(store.penalty_incr(sb, 900).await.unwrap(), 2);
    let e = store.penalty(sb).await.unwrap().unwrap();
    assert_eq!(e.count, 2);
    assert!((1_798..=1_800).contains(&e.expires_in_seconds), "{e:?}");
    assert_eq!(store.penalty_incr(sa, 900).await.unwrap(), 1);
    assert_eq!(store.penalty_incr(net, 900).await.unwrap(), 1);
    let list = store.penalties(10).await.unwrap();
    assert_eq!(
        list.iter()
            .map(|e| (e.address, e.count))
            .collect::<Vec<_>>(),
        vec![(sb, 2), (sa, 1), (net, 1)]
    );
    assert_eq!(store.penalties(1).await.unwrap().len(), 1);
    assert!(store.clear_penalty(sa).await.unwrap());
    assert_eq!(store.penalty(sa).await.unwrap(), None);
    assert!(store.clear_penalty(net).await.unwrap());

    // used nonces: exactly one of many concurrent users wins
    let wins = futures_join_nonce(store, "bm9uY2U").await;
    assert_eq!(wins, 1);
    assert!(!store.use_nonce("bm9uY2U", 60).await.unwrap());
    assert!(store.use_nonce("b3RoZXI", 60).await.unwrap());

    // traffic series and stats
    let series: Vec<u64> = (0..310).collect();
    let stats = TrafficStats {
        mean: 12.5,
        std_dev: 3.25,
    };
    store.put_traffic(&series, stats).await.unwrap();
    let (got, got_stats) = store.traffic().await.unwrap();
    assert_eq!(
        got,
        (10..310).collect::<Vec<u64>>(),
        "the last 300, oldest first"
    );
    assert_eq!(got_stats, Some(stats));

    // per-source counts
    store.publish_counts(&[(sa, 17), (net, 40)]).await.unwrap();
    assert_eq!(store.req_count(sa).await.unwrap(), 17);
    assert_eq!(store.req_count(net).await.unwrap(), 40);
    assert_eq!(store.req_count(sb).await.unwrap(), 0);

    // fleet keys
    store.publish_key("kid1", "{\"kty\":\"EC\"}").await.unwrap();
    assert_eq!(
        store.keys().await.unwrap().get("kid1").map(String::as_str),
        Some("{\"kty\":\"EC\"}")
    );

    // issued-package records: kept where a fleet shares the store, for the challenge's life
    store.record_issued("ZGlnZXN0", 60).await.unwrap();
    assert_eq!(
        store.issued_recorded("ZGlnZXN0").await.unwrap(),
        store.records_issued()
    );
    assert!(!store.issued_recorded("b3RoZXI").await.unwrap());

    // What a second handle (restart or other host) sees.
    store.flush().unwrap();
    let other = reopen();
    assert_eq!(other.get_config().await.unwrap(), Some(t));
    assert_eq!(other.get_state().await.unwrap(), Some(s));
    assert_eq!(other.whitelist().await.unwrap(), vec![a]);
    assert!(other.ticket(sa).await.unwrap().is_some());
    assert_eq!(other.penalty(sb).await.unwrap().unwrap().count, 2);
    assert!(
        !other.use_nonce("bm9uY2U", 60).await.unwrap(),
        "a used nonce stays used"
    );
    assert_eq!(other.traffic().await.unwrap().0.len(), 300);
    assert_eq!(
        other.issued_recorded("ZGlnZXN0").await.unwrap(),
        other.records_issued()
    );
}

/// 32 users of one nonce at once: each on its own OS thread with its own runtime, released
/// together by a barrier, so their calls really race (in the store's locks, or in Redis).
/// Returns how many won.
async fn futures_join_nonce(store: &Store, nonce: &str) -> usize {
    const USERS: usize = 32;
    let start = std::sync::Barrier::new(USERS);
    std::thread::scope(|s| {
        let users: Vec<_> = (0..USERS)
            .map(|_| {
                s.spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    start.wait();
                    runtime.block_on(store.use_nonce(nonce, 60)).unwrap()
                })
            })
            .collect();
        users
            .into_iter()
            .map(|u| usize::from(u.join().unwrap()))
            .sum()
    })
}

#[test]
fn store_suite_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let open = move || Store::Embedded(Box::new(EmbeddedStore::open(&path).unwrap()));
    let store = open();
    runtime().block_on(store_semantics(&store, &open));
    // The file is private: it holds tickets and nonces.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("sentry-store.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn store_suite_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    let rt = runtime();
    let open = || Store::Redis(RedisStore::connect(&url).unwrap());
    let store = rt.block_on(async { open() });
    rt.block_on(store_semantics(&store, &|| open()));
}

// ---------------------------------------------------------------- fleet on one Redis

fn sentry_config(redis_url: &str) -> SentryConfig {
    SentryConfig {
        enabled: true,
        redis_url: redis_url.into(),
        tunables: Tunables {
            base_difficulty: 8,
            max_difficulty: 12,
            hard_block_after: 3,
            ip_static_threshold: 1,
            challenge_ttl_seconds: 60,
            ..Tunables::default()
        },
        ..SentryConfig::default()
    }
}

async fn sentry_on(redis: &RedisServer) -> Arc<Sentry> {
    sentry_with(&sentry_config(&redis.url())).await
}

/// A sentry of `config`, on the Redis `config.redis_url` names.
async fn sentry_with(config: &SentryConfig) -> Arc<Sentry> {
    let store = Store::Redis(RedisStore::connect(&config.redis_url).unwrap());
    Sentry::with_parts(
        config,
        store,
        Signer::generate().unwrap(),
        None,
        SourcePrefix::DEFAULT,
    )
    .await
    .unwrap()
}

/// Requests from `client` until the host challenges it (over `ip_static_threshold` = 1).
async fn challenged(s: &Sentry, client: IpAddr) -> Package {
    for _ in 0..3 {
        match s.decide(client, None, "/page").await {
            Decision::Challenge(p) => return *p,
            Decision::Pass(phantom_daemon::sentry::Pass::Normal) => {}
            other => panic!("expected a challenge, got {other:?}"),
        }
    }
    panic!("never challenged")
}

#[test]
fn two_hosts_on_one_redis_share_tickets_penalties_whitelist_and_mode() {
    let redis = RedisServer::start();
    let rt = runtime();
    rt.block_on(async {
        let a = sentry_on(&redis).await;
        let b = sentry_on(&redis).await;
        let client = ip("203.0.113.40");

        // A mode set on one host reaches the other through the store.
        a.set_mode(Mode::Defcon1).await.unwrap();
        let (_keep_b, rx_b) = tokio::sync::watch::channel(false);
        let ticker = tokio::spawn(Arc::clone(&b).run(rx_b));
        let deadline = Instant::now() + Duration::from_secs(5);
        while b.mode_state().current_mode != Mode::Defcon1 {
            assert!(Instant::now() < deadline, "B never saw DEFCON_1");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // A challenges, B verifies A's package (A's public key came through the store) and
        // issues the ticket; A then honours it.
        let package = challenged(&a, client).await;
        let (solution, proof) = solver::solve_package(&package, &a.signer.jwks()).unwrap();
        assert!(String::from_utf8_lossy(&solution.content).contains("/page"));
        b.redeem(client, &proof).await.unwrap();
        assert!(matches!(
            a.decide(client, None, "/page").await,
            Decision::Pass(phantom_daemon::sentry::Pass::Ticket)
        ));
        // The same proof at A is a replay.
        assert!(matches!(
            a.redeem(client, &proof).await,
            Err(phantom_daemon::sentry::ProofError::Rejected(
                phantom_daemon::sentry::challenge::Rejection::Replayed
            ))
        ));
        // B authenticated A's package by the record A left in the store, not by ECDSA; A
        // knew its own package.
        let by = |s: &Sentry, how: Authenticated| {
            s.counters.authenticated[authenticated_index(how)].load(Ordering::Relaxed)
        };
        assert_eq!(by(&b, Authenticated::FleetRecord), 1);
        assert_eq!(by(&b, Authenticated::Signature), 0);
        assert_eq!(by(&a, Authenticated::IssuedHere), 1);
        // Without the record (lost with a Redis restart, say) the signature still does.
        let late = ip("203.0.113.44");
        let package = challenged(&a, late).await;
        let (_, proof) = solver::solve_package(&package, &a.signer.jwks()).unwrap();
        let records = std::process::Command::new("redis-cli")
            .arg("-s")
            .arg(redis.socket())
            .args(["--scan", "--pattern", "sentry:issued:*"])
            .output()
            .unwrap();
        let records = String::from_utf8(records.stdout).unwrap();
        assert!(!records.trim().is_empty(), "A recorded its package");
        for key in records.lines() {
            let del = std::process::Command::new("redis-cli")
                .arg("-s")
                .arg(redis.socket())
                .args(["DEL", key])
                .output()
                .unwrap();
            assert!(del.status.success());
        }
        b.redeem(late, &proof).await.unwrap();
        assert_eq!(by(&b, Authenticated::Signature), 1);

        // A's penalty is B's penalty: B's next challenge for another client of A's is harder.
        let other = ip("203.0.113.41");
        let first = challenged(&a, other).await;
        let first_d = phantom_daemon::sentry::challenge::decode_payload(&first)
            .unwrap()
            .difficulty;
        let listed = b.penalty_list(10).await.unwrap();
        assert!(
            listed
                .iter()
                .any(|e| e.address == Source::from(other) && e.count == 1),
            "{listed:?}"
        );
        let second = challenged(&b, other).await;
        let second_d = phantom_daemon::sentry::challenge::decode_payload(&second)
            .unwrap()
            .difficulty;
        assert_eq!((first_d, second_d), (8, 9));

        // Whitelist added on B is honoured by A after its refresh.
        let trusted = ip("203.0.113.42");
        b.whitelist_add(trusted).await.unwrap();
        let (_keep_a, rx_a) = tokio::sync::watch::channel(false);
        let ticker_a = tokio::spawn(Arc::clone(&a).run(rx_a));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if matches!(
                a.decide(trusted, None, "/").await,
                Decision::Pass(phantom_daemon::sentry::Pass::Whitelisted)
            ) {
                break;
            }
            assert!(Instant::now() < deadline, "A never saw B's whitelist entry");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // DOOMSDAY: every request without a ticket gets the hardest puzzle, and a visitor
        // below the static threshold collects no penalty for it.
        a.set_mode(Mode::Doomsday).await.unwrap();
        let visitor = ip("203.0.113.43");
        let d = match a.decide(visitor, None, "/").await {
            Decision::Challenge(p) => {
                phantom_daemon::sentry::challenge::decode_payload(&p)
                    .unwrap()
                    .difficulty
            }
            other => panic!("DOOMSDAY must challenge: {other:?}"),
        };
        assert_eq!(d, 12);
        assert_eq!(a.store.penalty(visitor.into()).await.unwrap(), None);
        ticker.abort();
        ticker_a.abort();
    });
}

#[test]
fn redis_down_fails_open_by_default_and_closed_on_request() {
    let mut redis = RedisServer::start();
    let rt = runtime();
    rt.block_on(async {
        let open = sentry_on(&redis).await;
        let closed_config = SentryConfig {
            redis_fail_mode: "closed".into(),
            ..sentry_config(&redis.url())
        };
        let closed = Sentry::with_parts(
            &closed_config,
            Store::Redis(RedisStore::connect(&closed_config.redis_url).unwrap()),
            Signer::generate().unwrap(),
            None,
            SourcePrefix::DEFAULT,
        )
        .await
        .unwrap();
        for s in [&open, &closed] {
            s.set_mode(Mode::Defcon1).await.unwrap();
        }
        redis.stop();
        let client = ip("203.0.113.50");
        // One failed call is not an outage: the request is decided on what the host knows.
        // DEGRADE_AFTER_FAILURES in a row over DEGRADE_AFTER are; from then on the fail mode
        // applies.
        let first = open.decide(client, None, "/").await;
        assert!(
            matches!(first, Decision::Pass(phantom_daemon::sentry::Pass::Normal)),
            "{first:?}"
        );
        assert!(open.healthy(), "one failure does not degrade the store");
        let mut calls = 1;
        while open.healthy() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = open.decide(client, None, "/").await;
            calls += 1;
            assert!(calls < 40, "never degraded");
        }
        assert!(
            calls >= phantom_daemon::sentry::DEGRADE_AFTER_FAILURES as usize,
            "degraded after {calls} calls"
        );
        assert!(matches!(
            open.decide(client, None, "/").await,
            Decision::Pass(phantom_daemon::sentry::Pass::FailOpen)
        ));
        while closed.healthy() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = closed.decide(client, None, "/").await;
        }
        assert!(matches!(
            closed.decide(client, None, "/").await,
            Decision::Unavailable
        ));
        // Admin changes fail cleanly while the store is down.
        assert!(open.whitelist_add(ip("203.0.113.51")).await.is_err());
    });
}

/// A sentry on a fresh in-memory embedded store.
async fn in_memory_sentry(config: &SentryConfig) -> Arc<Sentry> {
    Sentry::with_parts(
        config,
        Store::Embedded(Box::new(EmbeddedStore::in_memory())),
        Signer::generate().unwrap(),
        None,
        SourcePrefix::DEFAULT,
    )
    .await
    .unwrap()
}

/// The proxy's threads share the port through SO_REUSEPORT; a port another listener holds is
/// still an error, and port 0 gives every thread the same port.
#[test]
fn proxy_threads_share_one_port_and_a_taken_port_is_an_error() {
    let rt = runtime();
    rt.block_on(async {
        let site = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config = SentryConfig {
            enabled: true,
            upstream: format!("http://{}", site.local_addr().unwrap()),
            ..SentryConfig::default()
        };
        let s = in_memory_sentry(&config).await;
        let (stop, rx) = tokio::sync::watch::channel(false);
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = proxy::serve(taken.local_addr().unwrap(), Arc::clone(&s), rx.clone())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("cannot listen"), "{err}");

        // Port 0: one port for all threads; the JWK set answers on it, then shutdown ends
        // every thread.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let served = proxy::serve(addr, Arc::clone(&s), rx).await.unwrap();
        for _ in 0..8 {
            let reply = tokio::task::spawn_blocking(move || {
                use std::io::{Read, Write};
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                c.write_all(
                    b"GET /.sentry/jwks.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                )
                .unwrap();
                let mut out = String::new();
                c.read_to_string(&mut out).unwrap();
                out
            })
            .await
            .unwrap();
            assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
            assert!(reply.contains("\"keys\""), "{reply}");
        }
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("every proxy thread stops on shutdown")
            .unwrap();
    });
}

#[test]
fn defcon_1_ends_after_a_calm_period() {
    let rt = runtime();
    rt.block_on(async {
        let config = SentryConfig {
            tunables: Tunables {
                calm_seconds: 3,
                ..Tunables::default()
            },
            ..SentryConfig::default()
        };
        let s = in_memory_sentry(&config).await;
        let (_keep, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(Arc::clone(&s).run(rx));
        s.set_mode(Mode::Defcon1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        assert_eq!(
            s.mode_state().current_mode,
            Mode::Defcon1,
            "not calm long enough yet"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.mode_state().current_mode != Mode::Normal {
            assert!(Instant::now() < deadline, "DEFCON_1 never ended");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            s.store.get_state().await.unwrap().unwrap().current_mode,
            Mode::Normal
        );
        // DOOMSDAY is manual: it never ends by itself.
        s.set_mode(Mode::Doomsday).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3_000)).await;
        assert_eq!(s.mode_state().current_mode, Mode::Doomsday);
        task.abort();
    });
}

// ---------------------------------------------------------------- daemons

/// `[sentry]` for a test daemon.
fn sentry_toml(listen: &str, upstream: &str, extra: &str) -> String {
    format!("[sentry]\nenabled = true\nlisten = {listen:?}\nupstream = {upstream:?}\n{extra}\n")
}

/// phantomd in `ns` with the datapath off and the sentry on 127.0.0.1:18080 in front of
/// http://127.0.0.1:18000; `extra` goes into its `[sentry]` section.
fn sentry_daemon(ns: &NetNs, bpffs: &BpffsDir, extra: &str) -> Daemon {
    let mut config = DaemonConfig::new("lo", bpffs.path());
    config.datapath_enabled = false;
    config.extra_toml = sentry_toml("127.0.0.1:18080", "http://127.0.0.1:18000", extra);
    Daemon::start(ns, &config)
}

fn get(ns: &NetNs, from: &str, to: &str, path: &str, headers: &[String]) -> HttpReply {
    http_from(
        ns,
        from,
        to,
        &format!("GET {path}"),
        headers,
        b"",
        Duration::from_secs(5),
    )
    .unwrap_or_else(|e| panic!("GET {path} from {from}: {e}"))
}

fn post_json(ns: &NetNs, from: &str, to: &str, path: &str, body: &Value) -> HttpReply {
    http_from(
        ns,
        from,
        to,
        &format!("POST {path}"),
        &["Content-Type: application/json".into()],
        body.to_string().as_bytes(),
        Duration::from_secs(5),
    )
    .unwrap()
}

fn proof_json(p: &Proof) -> Value {
    json!({"payload": p.payload, "signature": p.signature, "pow_nonce": p.pow_nonce, "kid": p.kid})
}

fn package_of(reply: &HttpReply) -> Package {
    assert_eq!(reply.status, 429, "{reply:?}");
    serde_json::from_str(&reply.body).unwrap()
}

#[test]
fn redis_outage_fails_open_and_recovers() {
    if !require_root("redis_outage_fails_open_and_recovers") {
        return;
    }
    let mut redis = RedisServer::start();
    let ns = NetNs::new("phsr");
    let _site = UpstreamSite::start(&ns, "127.0.0.1:18000");
    let bpffs = BpffsDir::new();
    // The CPU gate is always open and the load soon passes the ticket ceiling, so the store is
    // asked for its ticket (once a second while the answer is "none"; every time once it fails).
    let daemon = sentry_daemon(
        &ns,
        &bpffs,
        &format!(
            "redis_url = {:?}\nactivation_cpu_threshold = 0.0\n",
            redis.url()
        ),
    );
    assert_eq!(
        api(&daemon, &["sentry", "status"])["store"]["healthy"],
        true
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let load = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                match http_from(
                    &ns,
                    "127.0.0.1",
                    "127.0.0.1:18080",
                    "GET /load",
                    &[],
                    b"",
                    Duration::from_secs(5),
                ) {
                    Ok(r) if r.status == 200 && r.body.starts_with(UpstreamSite::BODY_PREFIX) => {
                        ok.fetch_add(1, Ordering::Relaxed)
                    }
                    other => {
                        eprintln!("failed request: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        redis.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = api(&daemon, &["sentry", "status"]);
            if st["store"]["status"] == "degraded" {
                break;
            }
            assert!(Instant::now() < deadline, "never reported degraded: {st}");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            api_err(&daemon, &["sentry", "whitelist_add", "ip=198.51.100.9"]),
            "UNAVAILABLE"
        );
        let during = ok.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            ok.load(Ordering::Relaxed) > during,
            "the proxy kept serving while Redis was down"
        );
        redis.resume();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let st = api(&daemon, &["sentry", "status"]);
            if st["store"]["healthy"] == true {
                break;
            }
            assert!(Instant::now() < deadline, "never recovered: {st}");
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        load.join().unwrap();
    });
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no proxied request may fail in fail-open mode:\n{}",
        daemon.log()
    );
    assert!(ok.load(Ordering::Relaxed) > 20);
    api(&daemon, &["sentry", "whitelist_add", "ip=198.51.100.9"]);
    let metrics = phantom_tests::http_get(&ns, "127.0.0.1:9469", "/metrics");
    assert_eq!(
        metric_value(&metrics, "phantom_sentry_store_up{backend=\"redis\"}"),
        Some(1.0)
    );
    assert!(metric_value(&metrics, "phantom_sentry_store_errors_total").unwrap() >= 1.0);
}

/// Two `phantomd`, each in its own namespace, on one redis-server: A challenges a client, the
/// client solves with B's JWK set (B learned A's key through the store) and proves at B; then
/// both hosts pass it on the ticket, and B lists the penalty A raised.
/// Armed on Redis (the CPU gate open), a request whose decision the store's answer cannot change
/// costs no round trip; one past the ticket ceiling asks, and "no ticket" then stands for a
/// second, so a flooding source costs a round trip a second, not one a request. A ticket another
/// host puts in the store is still found, and revoked past the ceiling, within that second.
#[test]
fn armed_on_redis_the_store_is_asked_only_when_its_answer_decides() {
    let redis = RedisServer::start();
    let rt = runtime();
    rt.block_on(async {
        let config = SentryConfig {
            enabled: true,
            redis_url: redis.url(),
            tunables: Tunables {
                activation_cpu_threshold: 0.0,
                ip_static_threshold: 5,
                ticket_ceiling: 10,
                ..Tunables::default()
            },
            ..SentryConfig::default()
        };
        let a = sentry_with(&config).await;
        let b = sentry_with(&config).await;
        let client = ip("203.0.113.60");
        let normal =
            |d: &Decision| matches!(d, Decision::Pass(phantom_daemon::sentry::Pass::Normal));

        // Up to the ceiling: passed either way, so the store is not asked.
        let trips = a.store.round_trips();
        for _ in 0..10 {
            let d = a.decide(client, None, "/page").await;
            assert!(normal(&d), "{d:?}");
        }
        assert_eq!(a.store.round_trips(), trips, "no lookup under the ceiling");

        // Past it: asked, and the answer stands for a second.
        for _ in 0..100 {
            let d = a.decide(client, None, "/page").await;
            assert!(normal(&d), "{d:?}");
        }
        let asked = a.store.round_trips() - trips;
        assert!(
            (1..=5).contains(&asked),
            "100 requests past the ceiling asked the store {asked} times"
        );

        // Another host's ticket for the source is found within the second and, the source
        // being past the ceiling, revoked: the source is challenged.
        b.store.set_ticket(Source::from(client), 600).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match a.decide(client, None, "/page").await {
                Decision::Challenge(_) => break,
                d => assert!(normal(&d), "{d:?}"),
            }
            assert!(
                Instant::now() < deadline,
                "the store's ticket was never seen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(a.counters.tickets_revoked.load(Ordering::Relaxed), 1);
        assert_eq!(b.store.ticket(Source::from(client)).await.unwrap(), None);
    });
}

#[test]
fn two_daemons_on_one_redis_honour_each_others_tickets_and_penalties() {
    if !require_root("two_daemons_on_one_redis_honour_each_others_tickets_and_penalties") {
        return;
    }
    let redis = RedisServer::start();
    let (ns_a, ns_b) = (NetNs::new("phsfa"), NetNs::new("phsfb"));
    let _site_a = UpstreamSite::start(&ns_a, "127.0.0.1:18000");
    let _site_b = UpstreamSite::start(&ns_b, "127.0.0.1:18000");
    let (bpffs_a, bpffs_b) = (BpffsDir::new(), BpffsDir::new());
    let extra = format!(
        "redis_url = {:?}\nip_static_threshold = 1\nticket_ceiling = 100\nbase_difficulty = 8\nmax_difficulty = 12\nchallenge_ttl_seconds = 60\n",
        redis.url()
    );
    let daemon_on = |ns: &NetNs, bpffs: &BpffsDir| sentry_daemon(ns, bpffs, &extra);
    let a = daemon_on(&ns_a, &bpffs_a);
    let b = daemon_on(&ns_b, &bpffs_b);
    let (client, site) = ("127.0.0.1", "127.0.0.1:18080");

    // A mode set on A reaches B through the store.
    api(&a, &["sentry", "set_mode", "mode=DEFCON_1"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while api(&b, &["sentry", "status"])["current_mode"] != "DEFCON_1" {
        assert!(Instant::now() < deadline, "B never saw DEFCON_1");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Over the static threshold at A: a 429 with A's package.
    let json_accept = vec!["Accept: application/json".to_string()];
    let mut package = None;
    for _ in 0..3 {
        let reply = get(&ns_a, client, site, "/page", &json_accept);
        if reply.status == 429 {
            package = Some(package_of(&reply));
            break;
        }
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    let package = package.expect("A challenged the client");
    assert_eq!(package.kid, api(&a, &["sentry", "status"])["key_id"]);

    // B's JWK set verifies A's package; the proof goes to B.
    let jwks = get(&ns_b, client, site, "/.sentry/jwks.json", &[]).json();
    let (_, proof) = solver::solve_package(&package, &jwks).unwrap();
    let redeemed = post_json(&ns_b, client, site, "/.sentry/proof", &proof_json(&proof));
    assert_eq!(redeemed.status, 200, "{redeemed:?}");
    let b_status = api(&b, &["sentry", "status"]);
    assert_eq!(
        b_status["challenges"]["authenticated_by"]["fleet_record"], 1,
        "B took A's package on A's record: {b_status}"
    );

    // Both hosts honour the ticket B issued.
    for (name, ns, daemon) in [("A", &ns_a, &a), ("B", &ns_b, &b)] {
        let before = api(daemon, &["sentry", "status"])["requests"]["passed"]["ticket"]
            .as_u64()
            .unwrap();
        for _ in 0..3 {
            let reply = get(ns, client, site, "/page", &json_accept);
            assert_eq!(reply.status, 200, "{name}: {reply:?}");
        }
        let after = api(daemon, &["sentry", "status"])["requests"]["passed"]["ticket"]
            .as_u64()
            .unwrap();
        assert_eq!(after - before, 3, "{name} passed the client on the ticket");
    }

    // The penalty A raised is B's too.
    let penalties = api(&b, &["sentry", "penalties"]);
    assert!(
        penalties["penalties"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["address"] == client && e["count"].as_u64() >= Some(1)),
        "{penalties}"
    );
}

#[test]
fn admin_input_is_validated_and_state_survives_kill9() {
    if !require_root("admin_input_is_validated_and_state_survives_kill9") {
        return;
    }
    let ns = NetNs::new("phsa");
    let bpffs = BpffsDir::new();
    let mut daemon = sentry_daemon(&ns, &bpffs, "");
    let before = api(&daemon, &["sentry", "get_config"]);

    for (args, code) in [
        (
            vec!["sentry", "set_config", "sensitivity_factor=abc"],
            "INVALID_PARAMETER",
        ),
        (
            vec!["sentry", "set_config", "sensitivity_factor=NaN"],
            "INVALID_PARAMETER",
        ),
        (
            vec!["sentry", "set_config", "activation_cpu_threshold=101"],
            "INVALID_PARAMETER",
        ),
        (
            vec!["sentry", "set_config", "base_difficulty=50"],
            "INVALID_PARAMETER",
        ),
        (
            vec![
                "sentry",
                "set_config",
                "base_difficulty=20",
                "max_difficulty=18",
            ],
            "INVALID_PARAMETER",
        ),
        (
            vec!["sentry", "set_config", "stats_interval_seconds=0"],
            "INVALID_PARAMETER",
        ),
        (vec!["sentry", "set_config"], "MISSING_PARAMETER"),
        (vec!["sentry", "set_config", "bogus=1"], "UNKNOWN_PARAMETER"),
        (
            vec!["sentry", "set_mode", "mode=PANIC"],
            "INVALID_PARAMETER",
        ),
        (
            vec!["sentry", "whitelist_add", "ip=not-an-ip"],
            "INVALID_PARAMETER",
        ),
        (
            vec!["sentry", "whitelist_remove", "ip=198.51.100.99"],
            "NOT_FOUND",
        ),
        (vec!["sentry", "penalties", "count=0"], "INVALID_PARAMETER"),
    ] {
        assert_eq!(api_err(&daemon, &args), code, "{args:?}");
    }
    assert_eq!(
        api(&daemon, &["sentry", "get_config"]),
        before,
        "bad input changed nothing"
    );

    // Acknowledged changes survive kill -9.
    let set = api(
        &daemon,
        &[
            "sentry",
            "set_config",
            "sensitivity_factor=2.5",
            "ip_static_threshold=40",
        ],
    );
    assert_eq!(set["tunables"]["sensitivity_factor"], 2.5);
    api(&daemon, &["sentry", "whitelist_add", "ip=198.51.100.7"]);
    api(&daemon, &["sentry", "set_mode", "mode=doomsday"]);
    daemon.kill9();
    daemon.restart();
    let cfg = api(&daemon, &["sentry", "get_config"]);
    assert_eq!(cfg["tunables"]["sensitivity_factor"], 2.5);
    assert_eq!(cfg["tunables"]["ip_static_threshold"], 40);
    assert_eq!(cfg["store_backend"], "embedded");
    assert_eq!(
        api(&daemon, &["sentry", "whitelist_list"])["whitelist"],
        json!(["198.51.100.7"])
    );
    assert_eq!(
        api(&daemon, &["sentry", "status"])["current_mode"],
        "DOOMSDAY"
    );
    // The signing key is private and stable across restarts.
    use std::os::unix::fs::PermissionsExt;
    let key = daemon.dir().join("state/sentry-ecdsa-p256.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// Sources on the peer side of the guarded link, beyond the two the harness adds.
const BACKGROUND: [&str; 5] = [
    "192.0.2.4",
    "192.0.2.5",
    "192.0.2.6",
    "192.0.2.7",
    "192.0.2.11",
];
const BURSTER: &str = "192.0.2.9";
const ESCALATOR: &str = "192.0.2.10";
const TRUSTED: &str = "192.0.2.8";

#[test]
fn burst_defcon_challenge_ticket_rejections_and_kernel_drops() {
    if !require_root("burst_defcon_challenge_ticket_rejections_and_kernel_drops") {
        return;
    }
    let link = GuardedLink::new();
    for a in BACKGROUND
        .iter()
        .chain([BURSTER, ESCALATOR, TRUSTED].iter())
    {
        link.peer.ip(&[
            "addr",
            "add",
            &format!("{a}/24"),
            "dev",
            GuardedLink::PEER_DEV,
        ]);
    }
    let _site = UpstreamSite::start(&link.server, "127.0.0.1:18000");
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path());
    config.extra_toml = sentry_toml(
        "192.0.2.1:8080",
        "http://127.0.0.1:18000",
        "activation_cpu_threshold = 0.0\nip_static_threshold = 25\nhard_block_after = 3\n\
         base_difficulty = 8\nmax_difficulty = 12\nchallenge_ttl_seconds = 10\n\
         calm_seconds = 300\nstats_interval_seconds = 1\nsensitivity_factor = 3.0\n\
         max_body_bytes = 4096\n",
    );
    let daemon = Daemon::start(&link.server, &config);
    let site = "192.0.2.1:8080";
    let json_accept = vec!["Accept: application/json".to_string()];

    let stop = AtomicBool::new(false);
    let background_bad = AtomicU64::new(0);
    let background_ok = AtomicU64::new(0);
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        // Steady background: 3 requests/s from each of five sources (15 per 5 s, under the
        // static threshold of 25).
        for src in BACKGROUND {
            let (link, stop, bad, ok) = (&link, &stop, &background_bad, &background_ok);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match http_from(
                        &link.peer,
                        src,
                        site,
                        "GET /bg",
                        &[],
                        b"",
                        Duration::from_secs(5),
                    ) {
                        Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            eprintln!("background {src}: {other:?}");
                            bad.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    std::thread::sleep(Duration::from_millis(333));
                }
            });
        }
        // Learn the normal rate (the threshold needs 10 s of history).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = api(&daemon, &["sentry", "status"]);
            if st["stats"]["dynamic_threshold"].is_number()
                && st["stats"]["samples"].as_u64() >= Some(12)
            {
                assert_eq!(st["current_mode"], "NORMAL", "{st}");
                break;
            }
            assert!(Instant::now() < deadline, "no threshold learned: {st}");
            std::thread::sleep(Duration::from_millis(500));
        }

        // A whitelisted source bursting is never challenged.
        api(
            &daemon,
            &["sentry", "whitelist_add", &format!("ip={TRUSTED}")],
        );

        // The burst: one source, as fast as it can, until it is challenged.
        let mut challenge = None;
        for i in 0..400 {
            let r = get(&link.peer, BURSTER, site, "/secret?x=1", &json_accept);
            if r.status == 429 {
                assert!(i >= 25, "challenged after only {i} requests");
                challenge = Some(r);
                break;
            }
            assert_eq!(r.status, 200, "{r:?}");
        }
        let challenge = challenge.expect("the burst was never challenged");
        let st = api(&daemon, &["sentry", "status"]);
        assert_eq!(st["current_mode"], "DEFCON_1", "{st}");
        assert_eq!(challenge.header("x-sentry-challenge"), Some("1"));
        let package = package_of(&challenge);
        assert_eq!((package.v, package.alg.as_str()), (1, "ES256"));
        // A second package right away: kept for the expiry check.
        let held = package_of(&get(&link.peer, BURSTER, site, "/secret?x=1", &json_accept));
        // Without Accept: JSON, an HTML page embeds the same object.
        let html = get(&link.peer, BURSTER, site, "/secret?x=1", &[]);
        assert_eq!(html.status, 429);
        assert!(
            html.body.contains("id=\"sentry-challenge\""),
            "{}",
            html.body
        );

        // The browser's path: keys, signature, search, decrypt.
        let jwks = get(&link.peer, BURSTER, site, "/.sentry/jwks.json", &[]).json();
        assert_eq!(jwks["keys"][0]["crv"], "P-256");
        let payload = phantom_daemon::sentry::challenge::decode_payload(&package).unwrap();
        assert_eq!(payload.subject, BURSTER);
        assert_eq!(payload.difficulty, 8);
        let (solution, proof) = solver::solve_package(&package, &jwks).unwrap();
        assert!(String::from_utf8_lossy(&solution.content).contains("/secret?x=1"));

        // Rejections, each with its reason and no ticket.
        let reason = |r: HttpReply| (r.status, r.json()["reason"].as_str().unwrap().to_string());
        let mut wrong = proof_json(&proof);
        wrong["pow_nonce"] = json!(proof.pow_nonce + 1);
        assert_eq!(
            reason(post_json(
                &link.peer,
                BURSTER,
                site,
                "/.sentry/proof",
                &wrong
            )),
            (422, "WRONG_PROOF".into())
        );
        let mut altered_bytes = base64_decode(&proof.payload);
        let at = altered_bytes.iter().position(|b| *b == b':').unwrap() + 1;
        altered_bytes[at] ^= 0x01;
        let mut altered = proof_json(&proof);
        altered["payload"] = json!(base64_encode(&altered_bytes));
        assert_eq!(
            reason(post_json(
                &link.peer,
                BURSTER,
                site,
                "/.sentry/proof",
                &altered
            )),
            (403, "BAD_SIGNATURE".into())
        );
        assert_eq!(
            reason(post_json(
                &link.peer,
                BACKGROUND[0],
                site,
                "/.sentry/proof",
                &proof_json(&proof)
            )),
            (403, "WRONG_SUBJECT".into())
        );
        let malformed = http_from(
            &link.peer,
            BURSTER,
            site,
            "POST /.sentry/proof",
            &[],
            b"{not json",
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(reason(malformed), (400, "MALFORMED".into()));
        let oversized = http_from(
            &link.peer,
            BURSTER,
            site,
            "POST /.sentry/proof",
            &[],
            &vec![b'a'; 64 * 1024],
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(oversized.status, 413);
        assert_eq!(
            get(&link.peer, BURSTER, site, "/secret?x=1", &json_accept).status,
            429,
            "no ticket yet"
        );

        // The right proof: a ticket (and its cookie), then 200 without counting.
        let ok = post_json(
            &link.peer,
            BURSTER,
            site,
            "/.sentry/proof",
            &proof_json(&proof),
        );
        assert_eq!(ok.status, 200, "{ok:?}");
        assert!(
            ok.header("set-cookie")
                .unwrap()
                .starts_with("sentry_ticket=")
        );
        let passed_before = api(&daemon, &["sentry", "status"])["requests"]["passed"]["ticket"]
            .as_u64()
            .unwrap();
        for _ in 0..30 {
            let r = get(&link.peer, BURSTER, site, "/secret?x=1", &json_accept);
            assert_eq!(r.status, 200, "{r:?}");
            assert!(r.body.starts_with(UpstreamSite::BODY_PREFIX));
            assert!(
                r.body.contains(&format!("xff={BURSTER}")),
                "client address kept: {}",
                r.body
            );
        }
        let st = api(&daemon, &["sentry", "status"]);
        assert_eq!(
            st["requests"]["passed"]["ticket"].as_u64().unwrap() - passed_before,
            30
        );
        assert_eq!(
            reason(post_json(
                &link.peer,
                BURSTER,
                site,
                "/.sentry/proof",
                &proof_json(&proof)
            )),
            (409, "REPLAYED".into())
        );

        // Whitelisted burst: all 200.
        for _ in 0..60 {
            assert_eq!(
                get(&link.peer, TRUSTED, site, "/", &json_accept).status,
                200
            );
        }

        // Request bodies stream through up to max_body_bytes; larger ones get 413.
        let post = |len: usize| {
            http_from(
                &link.peer,
                TRUSTED,
                site,
                "POST /upload",
                &[],
                &vec![b'x'; len],
                Duration::from_secs(5),
            )
            .unwrap()
        };
        let small = post(3_000);
        assert_eq!(small.status, 200, "{small:?}");
        assert!(small.body.ends_with("body=3000"), "{}", small.body);
        assert_eq!(post(8_192).status, 413);

        // Escalation: a source that ignores its challenges gets harder ones each second,
        // then the kernel drops it.
        // Each step bursts until it is refused (the 5 s window may have rolled over on a
        // slow machine); a step a second raises the penalty once.
        let refused = || {
            for _ in 0..80 {
                let r = get(&link.peer, ESCALATOR, site, "/", &json_accept);
                if r.status != 200 {
                    return r;
                }
            }
            panic!("{ESCALATOR} was never refused");
        };
        let mut difficulties = Vec::new();
        for step in 0..3 {
            if step > 0 {
                std::thread::sleep(Duration::from_millis(1_100));
            }
            let r = refused();
            difficulties.push(
                phantom_daemon::sentry::challenge::decode_payload(&package_of(&r))
                    .unwrap()
                    .difficulty,
            );
        }
        assert_eq!(difficulties, vec![8, 9, 10]);
        std::thread::sleep(Duration::from_millis(1_100));
        let last = refused();
        assert_eq!(last.status, 403, "{last:?}");
        let dropped = http_from(
            &link.peer,
            ESCALATOR,
            site,
            "GET /",
            &[],
            b"",
            Duration::from_secs(2),
        );
        assert!(
            dropped.is_err(),
            "a hard-blocked source must not connect: {dropped:?}"
        );
        let denied = api(&daemon, &["datapath", "list_denied"]);
        let entry = denied["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == ESCALATOR)
            .unwrap_or_else(|| panic!("{denied}"))
            .clone();
        assert_eq!(entry["reason"], "penalty");
        assert!(entry["dropped_packets"].as_u64().unwrap() >= 1, "{entry}");
        assert!(
            entry["expires_in_seconds"].as_u64().unwrap() > 3_000,
            "{entry}"
        );
        let penalties = api(&daemon, &["sentry", "penalties"]);
        let p = penalties["penalties"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == ESCALATOR)
            .unwrap()
            .clone();
        assert_eq!(
            (p["count"].as_u64(), p["hard_blocked"].as_bool()),
            (Some(4), Some(true)),
            "{penalties}"
        );

        // The held package has expired by now (10 s).
        let (_, held_proof) = solver::solve_package(&held, &jwks).unwrap();
        let left = held.clone();
        let exp = phantom_daemon::sentry::challenge::decode_payload(&left)
            .unwrap()
            .expires_at;
        while phantom_daemon::sentry::store::unix_now() < exp {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            reason(post_json(
                &link.peer,
                BURSTER,
                site,
                "/.sentry/proof",
                &proof_json(&held_proof)
            )),
            (410, "EXPIRED".into())
        );

        // Status joins the kernel's per-source counters; metrics count outcomes.
        let st = api(&daemon, &["sentry", "status"]);
        assert!(
            st["top_talkers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["kernel_packets_5s"].is_number()),
            "{st}"
        );
        let metrics = phantom_tests::http_get(&link.server, "127.0.0.1:9469", "/metrics");
        assert_eq!(
            metric_value(&metrics, "phantom_sentry_mode{mode=\"DEFCON_1\"}"),
            Some(1.0)
        );
        for r in [
            "WRONG_PROOF",
            "BAD_SIGNATURE",
            "WRONG_SUBJECT",
            "REPLAYED",
            "EXPIRED",
        ] {
            assert!(
                metric_value(
                    &metrics,
                    &format!("phantom_sentry_challenges_failed_total{{reason=\"{r}\"}}")
                )
                .unwrap()
                    >= 1.0,
                "{r}"
            );
        }
        assert_eq!(
            metric_value(&metrics, "phantom_sentry_challenges_solved_total"),
            Some(1.0)
        );
        assert!(metric_value(&metrics, "phantom_sentry_hard_blocks_total").unwrap() >= 1.0);

        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(
        background_bad.load(Ordering::Relaxed),
        0,
        "the steady sources always got 200"
    );
    assert!(background_ok.load(Ordering::Relaxed) > 100);
}

/// Stops the load threads of a scope even when an assertion fails, so the scope can end.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap()
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

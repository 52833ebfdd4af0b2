//! Ghost mode end to end: a client namespace whose only way to the WireGuard server is the
//! stock wstunnel client's behaviour (reproduced in `phantom_tests::wstunnel`) over wss to
//! the daemon, with a real wg-quick client behind it; the refusals; the lifecycle.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    net::SocketAddr,
    path::Path,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, GuardedLink, NetNs, WgQuickClient, WireguardSettings, api,
    api_err, http_get, metric_value, require_root,
    wstunnel::{self, WstunnelClient, WstunnelOptions},
};
use serde_json::Value;

const VPN_SUBNET: &str = "198.51.100.0/24";
const VPN_SERVER: &str = "198.51.100.1";
/// Decodes offline to the server namespace's address.
const DOMAIN: &str = "192-0-2-1.sslip.io";
const RELAY: &str = "192.0.2.1:443";

/// A certificate and key for `DOMAIN`, made for this run.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ghostcert")
            .tempdir()
            .unwrap();
        Self { dir }
    }

    fn cert(&self) -> std::path::PathBuf {
        self.dir.path().join("cert.pem")
    }

    fn key(&self) -> std::path::PathBuf {
        self.dir.path().join("key.pem")
    }

    fn write_valid(&self) {
        let made = rcgen::generate_simple_self_signed(vec![DOMAIN.to_string()]).unwrap();
        std::fs::write(self.cert(), made.cert.pem()).unwrap();
        std::fs::write(self.key(), made.signing_key.serialize_pem()).unwrap();
    }

    fn ghost_toml(&self) -> String {
        format!(
            "[ghost]\ntls = \"files\"\ncert = {:?}\nkey = {:?}\nport = 443\n",
            self.cert().display().to_string(),
            self.key().display().to_string()
        )
    }
}

fn start_daemon(link: &GuardedLink, bpffs: &BpffsDir, certs: &Certs) -> Daemon {
    Daemon::start(
        &link.server,
        &ghost_daemon_config(bpffs, &certs.ghost_toml()),
    )
}

/// Drops UDP from the client namespace to the server's WireGuard port: only wss gets through.
fn block_direct_wireguard(ns: &NetNs) {
    let rules = format!(
        "table inet ghosttest {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n  ip daddr {} udp dport 51820 counter drop\n }}\n}}\n",
        GuardedLink::SERVER_V4
    );
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(
        child.wait().unwrap().success(),
        "nft rules in the client namespace"
    );
}

fn reachable(link: &GuardedLink, to: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if link.ping(to, 1) == 1 {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn metrics(link: &GuardedLink) -> String {
    http_get(&link.server, "127.0.0.1:9469", "/metrics")
}

fn rejected(link: &GuardedLink, reason: &str) -> f64 {
    metric_value(
        &metrics(link),
        &format!("phantom_ghost_rejected_upgrades_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(-1.0)
}

fn options(secret: &str) -> WstunnelOptions {
    let mut o = WstunnelOptions::new(RELAY.parse().unwrap(), DOMAIN, secret);
    // Pings every second instead of 30 so the test sees pongs; the server answers either way.
    o.ping_every = Duration::from_secs(1);
    o
}

/// One upgrade attempt from the client namespace; the HTTP status, or 0 when the connection
/// ended without an HTTP answer.
fn upgrade_status(
    link: &GuardedLink,
    opts: &WstunnelOptions,
    path: &str,
    jwt: Option<String>,
) -> u16 {
    let opts = opts.clone();
    let path = path.to_string();
    wstunnel::block_on_in(&link.peer, move || async move {
        let Ok(mut tls) = wstunnel::connect_tls(&opts).await else {
            return 0;
        };
        wstunnel::upgrade(&mut tls, DOMAIN, &path, jwt.as_deref())
            .await
            .map(|r| r.status)
            .unwrap_or(0)
    })
}

fn allowed_ips(config: &str) -> String {
    config
        .lines()
        .find_map(|l| l.strip_prefix("AllowedIPs = "))
        .unwrap()
        .to_string()
}

fn covers(list: &str, ip: [u8; 4]) -> bool {
    let ip = u32::from_be_bytes(ip);
    list.split(", ").filter(|p| !p.contains(':')).any(|p| {
        let (net, len) = p.split_once('/').unwrap();
        let net = u32::from(net.parse::<std::net::Ipv4Addr>().unwrap());
        let len: u32 = len.parse().unwrap();
        len == 0 || (net ^ ip) >> (32 - len) == 0
    })
}

/// The daemon these tests run: WireGuard on the guarded link, ghost mode as `ghost_toml` says,
/// no XDP guard (not under test here, and it would count the tests' floods as its own).
fn ghost_daemon_config(bpffs: &BpffsDir, ghost_toml: &str) -> DaemonConfig {
    let mut config = DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path());
    config.datapath_enabled = false;
    config.wireguard = Some(WireguardSettings::new(VPN_SUBNET, GuardedLink::SERVER_V4));
    config.extra_toml = ghost_toml.to_string();
    config
}

#[test]
fn stock_client_carries_wireguard_over_wss_and_refusals_leave_the_tunnel_running() {
    if !require_root(
        "stock_client_carries_wireguard_over_wss_and_refusals_leave_the_tunnel_running",
    ) {
        return;
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let certs = Certs::new();
    certs.write_valid();
    let mut daemon = start_daemon(&link, &bpffs, &certs);
    api(&daemon, &["core", "add_client", "client_name=alice"]);
    assert_eq!(api(&daemon, &["ghost", "status"])["status"], "inactive");
    assert_eq!(
        api(&daemon, &["core", "get_subnet_info"])["blockers"]["ghost_mode"],
        false
    );

    let enabled = api(&daemon, &["ghost", "enable", &format!("domain={DOMAIN}")]);
    assert_eq!(enabled["status"], "active", "{enabled}");
    assert_eq!(enabled["server_ip"], GuardedLink::SERVER_V4);
    assert_eq!(enabled["domain"], DOMAIN);
    assert_eq!(enabled["protocol"], "wss");
    assert_eq!(enabled["port"], 443);
    assert!(
        enabled["activated_at"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    let secret = enabled["secret"].as_str().unwrap().to_string();
    assert!(
        secret.len() >= 16 && secret.chars().all(|c| c.is_ascii_alphanumeric()),
        "{secret}"
    );
    assert_eq!(
        enabled["connection_command"],
        format!(
            "wstunnel client --http-upgrade-path-prefix \"{secret}\" -L 'udp://127.0.0.1:51820:127.0.0.1:51820?timeout_sec=0' wss://{DOMAIN}:443"
        )
    );
    // The secret is on disk only in a 0600 file and never in the log.
    let state_file = daemon.dir().join("state/ghost/ghost-state.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&state_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!daemon.log().contains(&secret), "secret in the log");

    // A second enable fails and changes nothing.
    assert_eq!(
        api_err(&daemon, &["ghost", "enable", &format!("domain={DOMAIN}")]),
        "GHOST_ACTIVE"
    );
    assert_eq!(
        api(&daemon, &["ghost", "status"])["secret"],
        secret.as_str()
    );

    // With ghost on, the subnet cannot move and client configs go through wstunnel.
    let subnet = api(&daemon, &["core", "get_subnet_info"]);
    assert_eq!(subnet["blockers"]["ghost_mode"], true, "{subnet}");
    assert_eq!(subnet["can_change"], false);
    assert_eq!(
        api_err(
            &daemon,
            &[
                "core",
                "change_subnet",
                "new_subnet=198.18.0.0/24",
                "confirm=true"
            ]
        ),
        "SUBNET_CHANGE_REFUSED"
    );
    let export = api(&daemon, &["ghost", "export", "client_name=alice"]);
    assert_eq!(export["connection_command"], enabled["connection_command"]);
    let config = export["config"].as_str().unwrap().to_string();
    assert!(config.contains("Endpoint = 127.0.0.1:51820\n"), "{config}");
    let allowed = allowed_ips(&config);
    assert!(
        !covers(&allowed, [192, 0, 2, 1]),
        "server address must stay outside: {allowed}"
    );
    assert!(
        covers(&allowed, [198, 51, 100, 1]) && covers(&allowed, [8, 8, 8, 8]),
        "{allowed}"
    );
    let core_export = api(&daemon, &["core", "export_client", "client_name=alice"]);
    assert_eq!(core_export["config"].as_str(), Some(config.as_str()));
    // The tunnelled config alone does not connect: the reply says how to start wstunnel.
    assert_eq!(core_export["ghost_mode"], true, "{core_export}");
    assert_eq!(
        core_export["connection_command"],
        enabled["connection_command"]
    );
    assert_eq!(core_export["steps"], export["steps"]);
    assert!(
        core_export["steps"][0]
            .as_str()
            .unwrap()
            .contains(enabled["connection_command"].as_str().unwrap()),
        "{core_export}"
    );
    assert_eq!(
        api_err(&daemon, &["ghost", "export", "client_name=nobody"]),
        "CLIENT_NOT_FOUND"
    );

    // The client namespace cannot reach WireGuard directly; only the wss tunnel carries it.
    block_direct_wireguard(&link.peer);
    let direct_blocked = link.peer.run(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"direct", "192.0.2.1:51820").is_err()
    });
    assert!(
        direct_blocked,
        "UDP to the WireGuard port must be dropped in the client namespace"
    );
    let client = WstunnelClient::start(&link.peer, options(&secret));
    let wg = WgQuickClient::up(&link.peer, &config);
    assert!(
        reachable(&link, VPN_SERVER, Duration::from_secs(20)),
        "ping through wss"
    );
    std::thread::sleep(Duration::from_millis(2500));
    let stats = &client.stats;
    assert!(stats.tunnels_opened.load(Ordering::Relaxed) >= 1);
    assert!(
        stats.frames_sent.load(Ordering::Relaxed) > 0
            && stats.frames_received.load(Ordering::Relaxed) > 0
    );
    assert!(
        stats.pongs_received.load(Ordering::Relaxed) >= 1,
        "pings answered"
    );
    assert_eq!(
        stats.bad_server_frames.load(Ordering::Relaxed),
        0,
        "unfragmented, unmasked"
    );
    let list = api(&daemon, &["core", "list_clients"]);
    let alice = &list["clients"][0];
    assert_eq!(alice["connected"], true, "{alice}");
    assert!(
        alice["connection"]["endpoint"]
            .as_str()
            .is_some_and(|e| e.starts_with("127.0.0.1:")),
        "{alice}"
    );
    let m = metrics(&link);
    assert_eq!(
        metric_value(&m, "phantom_ghost_tunnels_open"),
        Some(1.0),
        "{m}"
    );
    assert!(
        metric_value(&m, "phantom_ghost_bytes_total{direction=\"in\"}").is_some_and(|v| v > 0.0)
    );
    assert!(
        metric_value(&m, "phantom_ghost_bytes_total{direction=\"out\"}").is_some_and(|v| v > 0.0)
    );
    let status = api(&daemon, &["ghost", "status"]);
    assert_eq!(status["enabled"], true);
    assert_eq!(status["services"]["wstunnel"], "running");
    assert!(status["client_export_info"].as_str().is_some());

    let opts = options(&secret);
    let good_jwt = || Some(wstunnel::stock_jwt("127.0.0.1", 51820));
    // The upgrade the stock client makes is accepted...
    assert_eq!(
        upgrade_status(&link, &opts, &format!("/{secret}/events"), good_jwt()),
        101
    );
    // ...a wrong prefix is not...
    assert_eq!(
        upgrade_status(&link, &opts, "/wrongprefix/events", good_jwt()),
        400
    );
    assert_eq!(
        upgrade_status(&link, &opts, &format!("/{secret}x/events"), good_jwt()),
        400
    );
    // ...nor a remote other than the local WireGuard port, nor a missing or broken token.
    for jwt in [
        wstunnel::stock_jwt("127.0.0.1", 22),
        wstunnel::stock_jwt("203.0.113.10", 51820),
        wstunnel::jwt_with_claims(
            r#"{"id":"x","p":{"Tcp":{"proxy_protocol":false}},"r":"127.0.0.1","rp":51820}"#,
        ),
        "garbage".to_string(),
    ] {
        assert_eq!(
            upgrade_status(&link, &opts, &format!("/{secret}/events"), Some(jwt)),
            400
        );
    }
    assert_eq!(
        upgrade_status(&link, &opts, &format!("/{secret}/events"), None),
        400
    );
    assert!(rejected(&link, "wrong_prefix") >= 2.0);
    assert!(rejected(&link, "forbidden_remote") >= 2.0);
    assert!(rejected(&link, "bad_claims") >= 2.0);

    // Plain HTTP to the TLS port gets no HTTP answer at all.
    let plain = link.peer.run(|| {
        use std::io::{Read, Write};
        let mut s =
            std::net::TcpStream::connect_timeout(&RELAY.parse().unwrap(), Duration::from_secs(5))
                .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(
            format!(
                "GET /{secret}/events HTTP/1.1\r\nHost: {DOMAIN}\r\nUpgrade: websocket\r\n\r\n"
            )
            .as_bytes(),
        );
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    });
    assert!(
        !String::from_utf8_lossy(&plain).contains("HTTP/1.1 101"),
        "{plain:?}"
    );
    assert!(rejected(&link, "tls") >= 1.0);

    // An oversized frame on an upgraded connection closes that connection only.
    let closed = wstunnel::block_on_in(&link.peer, {
        let opts = opts.clone();
        let path = format!("/{secret}/events");
        move || async move {
            let mut ws = wstunnel::connect_upgraded(&opts, &path, good_jwt().as_deref())
                .await
                .unwrap();
            let _ =
                wstunnel::write_frame(&mut ws, wstunnel::OP_BINARY, &vec![0u8; 70_000], None).await;
            match tokio::time::timeout(Duration::from_secs(5), wstunnel::read_frame(&mut ws)).await
            {
                Ok(Ok(f)) => f.opcode == wstunnel::OP_CLOSE,
                Ok(Err(_)) => true,
                Err(_) => false,
            }
        }
    });
    assert!(closed, "the oversized frame's connection is closed");
    assert!(
        metric_value(
            &metrics(&link),
            "phantom_ghost_refused_frames_total{fault=\"oversized\"}"
        )
        .is_some_and(|v| v >= 1.0)
    );
    assert!(
        reachable(&link, VPN_SERVER, Duration::from_secs(5)),
        "tunnel after the refusals"
    );

    // A flood of bad upgrades from another address: most are cut off before TLS.
    let mut flood_opts = opts.clone();
    flood_opts.bind = Some(GuardedLink::PEER_V4_SECOND.parse().unwrap());
    let started = Instant::now();
    let answered_400 = wstunnel::block_on_in(&link.peer, move || async move {
        let mut answered = 0u32;
        for _ in 0..400 {
            if let Ok(mut tls) = wstunnel::connect_tls(&flood_opts).await
                && let Ok(r) = wstunnel::upgrade(&mut tls, DOMAIN, "/bad/events", None).await
                && r.status == 400
            {
                answered += 1;
            }
        }
        answered
    });
    let flood_time = started.elapsed();
    eprintln!(
        "flood: 400 bad upgrades in {flood_time:?}, {answered_400} got a 400, the rest were cut off"
    );
    assert!(
        answered_400 < 100,
        "rate limit: {answered_400} of 400 got a full answer"
    );
    assert!(
        rejected(&link, "rate_limited") >= 300.0,
        "{}",
        metrics(&link)
    );
    assert!(
        reachable(&link, VPN_SERVER, Duration::from_secs(5)),
        "tunnel after the flood"
    );
    // The flooding address is limited, the working client's address is not.
    assert_eq!(
        upgrade_status(&link, &opts, &format!("/{secret}/events"), good_jwt()),
        101
    );
    assert_eq!(client.stats.bad_server_frames.load(Ordering::Relaxed), 0);

    // kill -9: the acknowledged enable comes back with the same secret; the client reconnects.
    daemon.kill9();
    daemon.restart();
    let status = api(&daemon, &["ghost", "status"]);
    assert_eq!(status["status"], "active", "{status}");
    assert_eq!(status["secret"], secret.as_str());
    assert!(
        reachable(&link, VPN_SERVER, Duration::from_secs(40)),
        "reconnected after kill -9"
    );

    // Disable closes the relay; configs point at the server again; the subnet may move.
    let disabled = api(&daemon, &["ghost", "disable"]);
    assert_eq!(disabled["status"], "inactive");
    assert_eq!(disabled["restored"], true);
    assert!(
        !reachable(&link, VPN_SERVER, Duration::from_secs(3)),
        "no tunnel once disabled"
    );
    assert_eq!(api(&daemon, &["ghost", "status"])["enabled"], false);
    assert_eq!(api_err(&daemon, &["ghost", "disable"]), "GHOST_INACTIVE");
    assert_eq!(
        api_err(&daemon, &["ghost", "export", "client_name=alice"]),
        "GHOST_INACTIVE"
    );
    let direct = api(&daemon, &["core", "export_client", "client_name=alice"]);
    assert!(
        direct["config"]
            .as_str()
            .unwrap()
            .contains("Endpoint = 192.0.2.1:51820\n")
    );
    assert_eq!(direct["ghost_mode"], false, "{direct}");
    assert!(direct.get("connection_command").is_none(), "{direct}");
    assert_eq!(
        api(&daemon, &["core", "get_subnet_info"])["can_change"],
        true
    );
    let refused = link.peer.run(|| {
        std::net::TcpStream::connect_timeout(
            &RELAY.parse::<SocketAddr>().unwrap(),
            Duration::from_secs(2),
        )
        .is_err()
    });
    assert!(refused, "nothing listens on 443 once disabled");
    drop(wg);
    drop(client);
    assert!(!daemon.log().contains(&secret), "secret in the log");
}

/// Holds `n` TLS connections to the relay from `from` (upgrades never sent) on a thread inside
/// `ns` until the returned sender is dropped; reports how many completed TLS.
fn hold_idle_tls(
    ns: &NetNs,
    opts: WstunnelOptions,
    n: usize,
) -> (
    usize,
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let (count_tx, count_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let path = ns.path();
    let thread = std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        nix::sched::setns(
            std::os::fd::AsFd::as_fd(&file),
            nix::sched::CloneFlags::CLONE_NEWNET,
        )
        .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let mut held = Vec::new();
            for _ in 0..n {
                if let Ok(tls) = wstunnel::connect_tls(&opts).await {
                    held.push(tls);
                }
            }
            count_tx.send(held.len()).unwrap();
            // Until told to stop (the test's own clock, not the runtime's: nothing else runs
            // on it), the connections stay open from this side.
            let _ = stop_rx.recv();
            drop(held);
        });
    });
    let count = count_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    (count, stop_tx, thread)
}

#[test]
fn one_source_holding_idle_tls_connections_does_not_keep_another_client_out() {
    if !require_root("one_source_holding_idle_tls_connections_does_not_keep_another_client_out") {
        return;
    }
    let started = Instant::now();
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let certs = Certs::new();
    certs.write_valid();
    // A quota of two tunnels on the secret, to see it hold.
    let daemon = Daemon::start(
        &link.server,
        &ghost_daemon_config(
            &bpffs,
            &format!("{}tunnels_per_secret = 2\n", certs.ghost_toml()),
        ),
    );
    api(&daemon, &["core", "add_client", "client_name=alice"]);
    let enabled = api(&daemon, &["ghost", "enable", &format!("domain={DOMAIN}")]);
    let secret = enabled["secret"].as_str().unwrap().to_string();
    let config = api(&daemon, &["ghost", "export", "client_name=alice"])["config"]
        .as_str()
        .unwrap()
        .to_string();
    block_direct_wireguard(&link.peer);

    // One source opens 256 TLS connections and sits on them without an upgrade. The relay
    // lets it complete 16 handshakes (its per-source share), refuses 4 more as busy, and
    // from then on its bucket is empty: every further connection is closed at accept.
    let mut attacker = options(&secret);
    attacker.bind = Some(GuardedLink::PEER_V4_SECOND.parse().unwrap());
    let (held, stop, holder) = hold_idle_tls(&link.peer, attacker, 256);
    eprintln!("the attacker holds {held} idle TLS connections");
    assert!((1..=16).contains(&held), "{held} of 256 completed TLS");
    assert!(rejected(&link, "busy") >= 4.0, "{}", metrics(&link));
    assert!(
        rejected(&link, "rate_limited") >= 200.0,
        "{}",
        metrics(&link)
    );

    // While they are held, a client from another address connects and WireGuard works.
    let client = WstunnelClient::start(&link.peer, options(&secret));
    let wg = WgQuickClient::up(&link.peer, &config);
    assert!(
        reachable(&link, VPN_SERVER, Duration::from_secs(20)),
        "ping through wss while another source holds its handshakes"
    );
    assert!(client.stats.tunnels_opened.load(Ordering::Relaxed) >= 1);

    // The quota: the client's tunnel and one more fit, a third is answered 503.
    let opts = options(&secret);
    let path = format!("/{secret}/events");
    let jwt = wstunnel::stock_jwt("127.0.0.1", 51820);
    let (second, third) = wstunnel::block_on_in(&link.peer, {
        let (opts, path, jwt) = (opts.clone(), path.clone(), jwt.clone());
        move || async move {
            let second = wstunnel::connect_upgraded(&opts, &path, Some(&jwt)).await;
            let mut tls = wstunnel::connect_tls(&opts).await.unwrap();
            let third = wstunnel::upgrade(&mut tls, DOMAIN, &path, Some(&jwt))
                .await
                .map(|r| r.status)
                .unwrap_or(0);
            (second.is_ok(), third)
        }
    });
    assert!(second, "a second tunnel fits the quota of two");
    assert_eq!(third, 503, "a third is over the quota");
    assert!(rejected(&link, "quota") >= 1.0);
    // The second tunnel closed (its connection dropped above): the place is free again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while upgrade_status(&link, &opts, &path, Some(jwt.clone())) != 101 {
        assert!(Instant::now() < deadline, "the quota place never came back");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The idle connections get no longer than the upgrade's time (10 s from accept): the
    // relay closes them and counts them as timeouts.
    let deadline = Instant::now() + Duration::from_secs(15);
    while rejected(&link, "timeout") < held as f64 {
        assert!(
            Instant::now() < deadline,
            "idle connections still open: {}",
            metrics(&link)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    drop(stop);
    holder.join().unwrap();
    assert!(
        reachable(&link, VPN_SERVER, Duration::from_secs(5)),
        "tunnel still up"
    );
    // No client address at info level.
    let log = daemon.log();
    for addr in [GuardedLink::PEER_V4, GuardedLink::PEER_V4_SECOND] {
        assert!(!log.contains(addr), "{addr} in the log:\n{log}");
    }
    drop(wg);
    drop(client);
    eprintln!("test took {:?}", started.elapsed());
}

#[test]
fn enable_refuses_bad_domains_and_certificates_and_changes_nothing() {
    if !require_root("enable_refuses_bad_domains_and_certificates_and_changes_nothing") {
        return;
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let certs = Certs::new();
    let daemon = start_daemon(&link, &bpffs, &certs);
    assert_eq!(api_err(&daemon, &["ghost", "disable"]), "GHOST_INACTIVE");
    assert_eq!(api_err(&daemon, &["ghost", "enable"]), "MISSING_PARAMETER");
    for bad in [
        "domain=",
        "domain=not a domain",
        "domain=192.0.2.1",
        "domain=-bad.example",
        "domain=localhost",
        "domain=a..example",
    ] {
        assert_eq!(
            api_err(&daemon, &["ghost", "enable", bad]),
            "INVALID_DOMAIN",
            "{bad}"
        );
    }
    // Resolves, but somewhere else; and does not resolve at all (no DNS in the namespace).
    for elsewhere in [
        "domain=198-51-100-7.sslip.io",
        "domain=203.0.113.9.nip.io",
        "domain=nothing.invalid",
    ] {
        assert_eq!(
            api_err(&daemon, &["ghost", "enable", elsewhere]),
            "DOMAIN_NOT_THIS_SERVER",
            "{elsewhere}"
        );
    }
    // The right domain, but the certificate files are missing, then garbage.
    let enable = format!("domain={DOMAIN}");
    assert_eq!(
        api_err(&daemon, &["ghost", "enable", &enable]),
        "TLS_FAILED"
    );
    std::fs::write(certs.cert(), "not a certificate").unwrap();
    std::fs::write(certs.key(), "not a key").unwrap();
    assert_eq!(
        api_err(&daemon, &["ghost", "enable", &enable]),
        "TLS_FAILED"
    );
    // Nothing changed: inactive, no listener, no state.
    assert_eq!(api(&daemon, &["ghost", "status"])["status"], "inactive");
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(daemon.dir().join("state/ghost/ghost-state.json"))
            .unwrap_or_else(|_| "{}".into()),
    )
    .unwrap();
    assert_ne!(state["enabled"], true);
    let refused = link.peer.run(|| {
        std::net::TcpStream::connect_timeout(
            &RELAY.parse::<SocketAddr>().unwrap(),
            Duration::from_secs(2),
        )
        .is_err()
    });
    assert!(refused);
    // With a valid certificate it works (the same request, nothing left over).
    certs.write_valid();
    assert_eq!(
        api(&daemon, &["ghost", "enable", &enable])["status"],
        "active"
    );
    // The certificate files vanish while the daemon is down: it still starts, says why the
    // relay is stopped, and disable still works.
    let mut daemon = daemon;
    daemon.kill9();
    std::fs::remove_file(certs.cert()).unwrap();
    daemon.restart();
    let status = api(&daemon, &["ghost", "status"]);
    assert_eq!(status["enabled"], true, "{status}");
    assert_eq!(status["services"]["wstunnel"], "stopped");
    assert!(
        status["services"]["relay"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("cert.pem")),
        "{status}"
    );
    assert_eq!(api(&daemon, &["ghost", "disable"])["status"], "inactive");
    assert_eq!(api(&daemon, &["ghost", "status"])["enabled"], false);
}

/// Throughput of one TCP stream from the client namespace to the server's tunnel address,
/// through ghost mode and through direct WireGuard, in the same run. Run with
/// `cargo test --release -p phantom-tests --test ghost -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: run explicitly (see docs/benchmarks.md)"]
fn bench_ghost_throughput_against_direct_wireguard() {
    if !require_root("bench_ghost_throughput_against_direct_wireguard") {
        return;
    }
    let seconds: u64 = std::env::var("GHOST_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let rounds: usize = std::env::var("GHOST_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let certs = Certs::new();
    certs.write_valid();
    let daemon = start_daemon(&link, &bpffs, &certs);
    api(&daemon, &["core", "add_client", "client_name=direct"]);
    api(&daemon, &["core", "add_client", "client_name=ghost"]);
    let direct_config = api(&daemon, &["core", "export_client", "client_name=direct"])["config"]
        .as_str()
        .unwrap()
        .to_string();
    let secret = api(&daemon, &["ghost", "enable", &format!("domain={DOMAIN}")])["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let ghost_config = api(&daemon, &["ghost", "export", "client_name=ghost"])["config"]
        .as_str()
        .unwrap()
        .to_string();

    let sink = link
        .server
        .run(|| std::net::TcpListener::bind((VPN_SERVER, 5201)).unwrap());
    std::thread::spawn(move || {
        for conn in sink.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut buf = vec![0u8; 256 * 1024];
                let mut total: u64 = 0;
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = conn.write_all(&total.to_be_bytes());
            });
        }
    });
    let measure = |label: &str| -> f64 {
        assert!(
            reachable(&link, VPN_SERVER, Duration::from_secs(20)),
            "{label}: tunnel up"
        );
        let secs = seconds;
        link.peer.run(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect((VPN_SERVER, 5201)).unwrap();
            let chunk = vec![0x5au8; 128 * 1024];
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(secs) {
                s.write_all(&chunk).unwrap();
            }
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut total = [0u8; 8];
            s.read_exact(&mut total).unwrap();
            let elapsed = start.elapsed().as_secs_f64();
            u64::from_be_bytes(total) as f64 * 8.0 / elapsed / 1e6
        })
    };
    let mut direct = Vec::new();
    let mut ghost = Vec::new();
    for _ in 0..rounds {
        {
            let _wg = WgQuickClient::up(&link.peer, &direct_config);
            direct.push(measure("direct"));
        }
        {
            let _client = WstunnelClient::start(&link.peer, options(&secret));
            let _wg = WgQuickClient::up(&link.peer, &ghost_config);
            ghost.push(measure("ghost"));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (d, g) = (median(&mut direct), median(&mut ghost));
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    println!(
        "Machine: {cpu}, {} CPUs",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "Method: one TCP stream client -> {VPN_SERVER} for {seconds} s, {rounds} rounds alternating, median; wireguard-go client, embedded boringtun server, release build of phantomd as built"
    );
    println!();
    println!("| path | Mbit/s (median) | rounds | vs direct |");
    println!("| --- | ---: | --- | ---: |");
    println!("| direct WireGuard (UDP 51820) | {d:.0} | {direct:.0?} | 100% |");
    println!(
        "| ghost: WireGuard in wss (TLS 1.3, test client reproducing stock wstunnel) | {g:.0} | {ghost:.0?} | {:.0}% |",
        g / d * 100.0
    );
}

/// A local ACME CA (Debian's `pebble`, the test server Let's Encrypt publishes) with its mock
/// DNS (`pebble-challtestsrv`) answering 192.0.2.1 for every name, both in `ns`.
struct Pebble {
    _dns: phantom_tests::Process,
    _ca: phantom_tests::Process,
    dir: tempfile::TempDir,
}

impl Pebble {
    fn start(ns: &NetNs) -> Self {
        let dir = tempfile::Builder::new().prefix("pebble").tempdir().unwrap();
        // Pebble's own HTTPS: a test root and a leaf for 127.0.0.1 signed by it.
        let mut root = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        root.distinguished_name
            .push(rcgen::DnType::CommonName, "phantom test ACME API root");
        let root_key = rcgen::KeyPair::generate().unwrap();
        let root_cert = root.self_signed(&root_key).unwrap();
        let issuer = rcgen::Issuer::new(root, root_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .unwrap()
                .signed_by(&leaf_key, &issuer)
                .unwrap();
        std::fs::write(dir.path().join("api-root.pem"), root_cert.pem()).unwrap();
        std::fs::write(dir.path().join("api.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("api.key"), leaf_key.serialize_pem()).unwrap();
        let config = serde_json::json!({"pebble": {
            "listenAddress": "127.0.0.1:14000",
            "managementListenAddress": "127.0.0.1:15000",
            "certificate": dir.path().join("api.pem"),
            "privateKey": dir.path().join("api.key"),
            "httpPort": 80,
            "tlsPort": 5001,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(dir.path().join("pebble.json"), config.to_string()).unwrap();
        let dns = phantom_tests::Process::spawn(
            "pebble-challtestsrv",
            ns.command("pebble-challtestsrv").args([
                "-defaultIPv4",
                GuardedLink::SERVER_V4,
                "-defaultIPv6",
                "",
                "-dns01",
                "127.0.0.1:8053",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                "127.0.0.1:8055",
            ]),
        );
        let ca = phantom_tests::Process::spawn(
            "pebble",
            ns.command("env")
                .args([
                    "PEBBLE_VA_NOSLEEP=1",
                    "PEBBLE_WFE_NONCEREJECT=0",
                    "pebble",
                    "-config",
                ])
                .arg(dir.path().join("pebble.json"))
                .args(["-dnsserver", "127.0.0.1:8053"]),
        );
        let pebble = Self {
            _dns: dns,
            _ca: ca,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while pebble.get(ns, "127.0.0.1:14000", "/dir").is_none() {
            assert!(
                Instant::now() < deadline,
                "pebble did not start (is the pebble package installed? scripts/bootstrap.sh installs it)"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        pebble
    }

    fn api_root(&self) -> std::path::PathBuf {
        self.dir.path().join("api-root.pem")
    }

    /// GET over HTTPS (trusting the API root) from inside `ns`; the whole response.
    fn get(&self, ns: &NetNs, addr: &str, path: &str) -> Option<String> {
        let root = std::fs::read(self.api_root()).unwrap();
        tls_request(ns, addr, "127.0.0.1", &root, Some(path))
    }
}

/// TLS to `addr` verifying `server_name` against `root_pem` only; with `path`, a GET whose
/// response is returned; without, just the handshake ("" on success).
fn tls_request(
    ns: &NetNs,
    addr: &str,
    server_name: &str,
    root_pem: &[u8],
    path: Option<&str>,
) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::{
        self,
        pki_types::{CertificateDer, ServerName, pem::PemObject},
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem) {
        roots.add(cert.ok()?).ok()?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .ok()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let addr: SocketAddr = addr.parse().ok()?;
    let name = ServerName::try_from(server_name.to_string()).ok()?;
    let path = path.map(str::to_string);
    let host = server_name.to_string();
    wstunnel::block_on_in(ns, move || async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let mut tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
            .await
            .ok()?
            .ok()?;
        let Some(path) = path else {
            return Some(String::new());
        };
        tls.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        text.starts_with("HTTP/1.1 200").then_some(text)
    })
}

#[test]
fn acme_issues_the_certificate_over_http01_from_a_local_test_ca() {
    if !require_root("acme_issues_the_certificate_over_http01_from_a_local_test_ca") {
        return;
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let pebble = Pebble::start(&link.server);
    let config = ghost_daemon_config(
        &bpffs,
        &format!(
            "[ghost]\ntls = \"acme\"\nport = 443\nacme_http_port = 80\nacme_directory = \"https://127.0.0.1:14000/dir\"\nacme_ca_root = {:?}\n",
            pebble.api_root().display().to_string()
        ),
    );
    let mut daemon = Daemon::start(&link.server, &config);
    let enabled = api(&daemon, &["ghost", "enable", &format!("domain={DOMAIN}")]);
    assert_eq!(enabled["status"], "active", "{enabled}");
    let status = api(&daemon, &["ghost", "status"]);
    assert_eq!(status["services"]["tls"]["source"], "acme", "{status}");
    // Port 80 was open only while the CA validated.
    let port80_closed = link.peer.run(|| {
        std::net::TcpStream::connect_timeout(
            &"192.0.2.1:80".parse().unwrap(),
            Duration::from_secs(2),
        )
        .is_err()
    });
    assert!(
        port80_closed,
        "the HTTP-01 responder is gone after issuance"
    );
    // The relay serves a certificate for the domain that chains to the CA's issuance root.
    let roots = pebble
        .get(&link.server, "127.0.0.1:15000", "/roots/0")
        .expect("pebble root");
    let begin = roots.find("-----BEGIN CERTIFICATE-----").unwrap();
    let end = roots.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
    let issuance_root = roots[begin..end].to_string();
    assert_eq!(
        tls_request(&link.peer, RELAY, DOMAIN, issuance_root.as_bytes(), None).as_deref(),
        Some(""),
        "the relay's certificate verifies for {DOMAIN} against the test CA"
    );
    // (Verification means something: another root does not accept it.)
    let other_root = std::fs::read(pebble.api_root()).unwrap();
    assert_eq!(
        tls_request(&link.peer, RELAY, DOMAIN, &other_root, None),
        None
    );
    assert!(
        daemon.log().contains("ACME certificate issued"),
        "{}",
        daemon.log()
    );
    let tls_dir = daemon.dir().join("state/ghost/tls");
    use std::os::unix::fs::PermissionsExt;
    for file in ["key.pem", "cert.pem", "acme-account.json"] {
        let mode = std::fs::metadata(tls_dir.join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
    // After kill -9 the stored certificate is served again without asking the CA.
    drop(pebble);
    daemon.kill9();
    daemon.restart();
    assert_eq!(
        api(&daemon, &["ghost", "status"])["services"]["wstunnel"],
        "running"
    );
    assert_eq!(
        tls_request(&link.peer, RELAY, DOMAIN, issuance_root.as_bytes(), None).as_deref(),
        Some("")
    );
}

#[test]
fn acme_certificate_is_renewed_before_expiry_and_swapped_into_the_running_relay() {
    if !require_root("acme_certificate_is_renewed_before_expiry_and_swapped_into_the_running_relay")
    {
        return;
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let pebble = Pebble::start(&link.server);
    // Every certificate is "within 100 years of expiry", so the first check renews it.
    let config = ghost_daemon_config(
        &bpffs,
        &format!(
            "[ghost]\ntls = \"acme\"\nacme_directory = \"https://127.0.0.1:14000/dir\"\nacme_ca_root = {:?}\nacme_renew_before_days = 36500\nacme_check_seconds = 2\n",
            pebble.api_root().display().to_string()
        ),
    );
    let daemon = Daemon::start(&link.server, &config);
    api(&daemon, &["ghost", "enable", &format!("domain={DOMAIN}")]);
    let first = api(&daemon, &["ghost", "status"])["services"]["tls"].clone();
    assert!(first["expires_at"].as_str().is_some(), "{first}");
    let state_file = daemon.dir().join("state/ghost/ghost-state.json");
    let issued = |f: &Path| -> i64 {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        v["certificate_issued_at"].as_i64().unwrap()
    };
    let issued_first = issued(&state_file);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon.log().contains("ghost certificate renewed") {
        assert!(Instant::now() < deadline, "no renewal:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(issued(&state_file) > issued_first, "renewal recorded");
    let second = api(&daemon, &["ghost", "status"])["services"]["tls"].clone();
    assert_ne!(second["loaded_at"], first["loaded_at"], "{second}");
    // The renewed certificate is served by the running relay and verifies.
    let roots = pebble
        .get(&link.server, "127.0.0.1:15000", "/roots/0")
        .expect("pebble root");
    let begin = roots.find("-----BEGIN CERTIFICATE-----").unwrap();
    let end = roots.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
    assert_eq!(
        tls_request(
            &link.peer,
            RELAY,
            DOMAIN,
            &roots.as_bytes()[begin..end],
            None
        )
        .as_deref(),
        Some("")
    );
    assert_eq!(
        api(&daemon, &["ghost", "status"])["services"]["wstunnel"],
        "running"
    );
}

#[test]
fn self_signed_certificate_is_made_at_enable_and_serves_the_stock_upgrade() {
    if !require_root("self_signed_certificate_is_made_at_enable_and_serves_the_stock_upgrade") {
        return;
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let config = ghost_daemon_config(&bpffs, "[ghost]\ntls = \"self_signed\"\n");
    let daemon = Daemon::start(&link.server, &config);
    let secret = api(&daemon, &["ghost", "enable", "domain=192.0.2.1.nip.io"])["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let status = api(&daemon, &["ghost", "status"]);
    assert_eq!(
        status["services"]["tls"]["source"], "self_signed",
        "{status}"
    );
    assert!(status["services"]["tls"]["expires_at"].as_str().is_some());
    let mut opts = options(&secret);
    opts.host = "192.0.2.1.nip.io".into();
    let jwt = Some(wstunnel::stock_jwt("127.0.0.1", 51820));
    assert_eq!(
        upgrade_status(&link, &opts, &format!("/{secret}/events"), jwt),
        101
    );
    // The generated certificate names the domain: it verifies against itself as the root.
    let cert = std::fs::read(daemon.dir().join("state/ghost/tls/cert.pem")).unwrap();
    assert_eq!(
        tls_request(&link.peer, RELAY, "192.0.2.1.nip.io", &cert, None).as_deref(),
        Some("")
    );
}

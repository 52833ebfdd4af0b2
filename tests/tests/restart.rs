//! Restarts the VPN clients do not notice: a stock WireGuard client pinging the server every
//! 100 ms through a clean restart (SIGTERM, then start again, as `systemctl restart` does) and
//! through a `kill -9` and start loses at most 20 replies (2 s). The daemon remembers each
//! peer's endpoint and starts the handshake itself; without that the client would wait for its
//! own retry timer (about 14 s).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, GuardedLink, WgQuickClient, WireguardSettings, api,
    require_root,
};

const VPN_SUBNET: &str = "198.51.100.0/24";
const VPN_SERVER: &str = "198.51.100.1";
/// Replies a client may lose across one restart: 2 s of pings every 100 ms.
const MAX_LOST: u32 = 20;

/// `ping -i 0.1` from the client's namespace for `seconds`; returns (sent, received).
struct Pinger {
    child: std::process::Child,
}

impl Pinger {
    fn start(link: &GuardedLink, seconds: u32) -> Self {
        let child = link
            .peer
            .command("ping")
            .args(["-n", "-q", "-i", "0.1", "-W", "1", "-w"])
            .arg(seconds.to_string())
            .arg(VPN_SERVER)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self { child }
    }

    /// Waits for ping to end; (transmitted, received) from its summary.
    fn finish(self) -> (u32, u32) {
        let out = self.child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("no ping summary:\n{text}"));
        let number = |word: &str| -> u32 {
            line.split(',')
                .find(|p| p.contains(word))
                .and_then(|p| p.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no {word} in {line}"))
        };
        (number("transmitted"), number("received"))
    }
}

/// Pings through one restart done by `restart`; returns the replies lost and how long the
/// stop and the start took.
fn lost_through(
    link: &GuardedLink,
    daemon: &mut Daemon,
    restart: impl FnOnce(&mut Daemon) -> Duration,
) -> (u32, Duration, Duration) {
    // One second before, the restart, and several seconds after: a client that comes back
    // only on its own timer (~14 s) would lose far more than MAX_LOST.
    let pinger = Pinger::start(link, 10);
    std::thread::sleep(Duration::from_secs(1));
    let stop = restart(daemon);
    let started = Instant::now();
    daemon.restart();
    let start = started.elapsed();
    let (sent, received) = pinger.finish();
    assert!(sent >= 80, "ping sent only {sent}");
    (sent - received, stop, start)
}

#[test]
fn a_client_pinging_every_100ms_loses_at_most_2s_through_a_restart_and_a_kill_9() {
    if !require_root("a_client_pinging_every_100ms_loses_at_most_2s_through_a_restart_and_a_kill_9")
    {
        return;
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path());
    config.wireguard = Some(WireguardSettings::new(VPN_SUBNET, GuardedLink::SERVER_V4));
    let mut daemon = Daemon::start(&link.server, &config);
    api(&daemon, &["core", "add_client", "client_name=alice"]);
    // A second client that never connects: no endpoint, and none borrowed from alice's when
    // the device is configured with both (boringtun keeps a peer's fields for the next one).
    api(&daemon, &["core", "add_client", "client_name=bob"]);
    let export = api(&daemon, &["core", "export_client", "client_name=alice"]);
    let _client = WgQuickClient::up(&link.peer, export["config"].as_str().unwrap());
    assert_eq!(
        link.ping(VPN_SERVER, 5),
        5,
        "the tunnel works before any restart"
    );

    // A clean restart: SIGTERM, wait for the exit, start again.
    let (lost, stop, start) = lost_through(&link, &mut daemon, |d| {
        let t = Instant::now();
        let status = d.stop();
        assert!(status.success(), "clean exit: {status}");
        t.elapsed()
    });
    eprintln!("clean restart: stop {stop:?}, start {start:?}, {lost} replies lost");
    assert!(
        lost <= MAX_LOST,
        "{lost} replies lost through a clean restart (stop {stop:?}, start {start:?}):\n{}",
        daemon.log()
    );

    // kill -9: no shutdown path at all; the endpoint remembered while running brings it back.
    let (lost, stop, start) = lost_through(&link, &mut daemon, |d| {
        let t = Instant::now();
        d.kill9();
        t.elapsed()
    });
    eprintln!("kill -9 and start: kill {stop:?}, start {start:?}, {lost} replies lost");
    assert!(
        lost <= MAX_LOST,
        "{lost} replies lost through kill -9 and a start (start {start:?}):\n{}",
        daemon.log()
    );
    // The client is shown connected again, with the endpoint it has.
    let list = api(&daemon, &["core", "list_clients"]);
    let alice = &list["clients"][0];
    assert_eq!(alice["connected"], true, "{alice}");
    let status = api(&daemon, &["core", "server_status"]);
    let peers = status["interface"]["peers"].as_array().unwrap();
    let peer = |name: &str| peers.iter().find(|p| p["name"] == name).unwrap();
    assert!(peer("alice")["endpoint"].is_string(), "{status}");
    assert!(
        peer("bob")["endpoint"].is_null(),
        "bob has no endpoint: {status}"
    );
}

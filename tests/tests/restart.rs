//! Restarts the VPN clients barely notice: a stock WireGuard client pinging the server every
//! 100 ms through a clean restart (SIGTERM, then start again, as `systemctl restart` does) and
//! through a `kill -9` and start is back as soon as the daemon is: it loses the replies of the
//! daemon's stop and start and no more. The daemon remembers each peer's endpoint and starts
//! the handshake itself; without that the client would wait for its own retry timer (about
//! 14 s, over 100 replies lost).
//!
//! How fast a start is (most of it the kernel verifying the eBPF programs) is measured by
//! `phantom-bench restart`, not asserted here: this test checks who starts the handshake.
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
/// Replies lost beyond the daemon's own downtime (stop plus start) before the client is back:
/// the handshake the daemon starts and a ping's round, with room for a loaded machine. A
/// client left to its own retry timer loses about 100 more.
const MAX_LOST_AFTER_START: u32 = 20;
// The window after the start (4 s) must hold more pings than that, or a client left to its
// own timer would pass.
const _: () = assert!(MAX_LOST_AFTER_START < 40);

/// Pings (one every 100 ms) that fall into `downtime`.
fn pings_in(downtime: Duration) -> u32 {
    u32::try_from(downtime.as_millis() / 100).unwrap_or(u32::MAX)
}

/// `ping -i 0.1` from the client's namespace until `finish`; returns (sent, received).
struct Pinger {
    child: std::process::Child,
}

impl Pinger {
    fn start(link: &GuardedLink) -> Self {
        let child = link
            .peer
            .command("ping")
            .args(["-n", "-q", "-i", "0.1", "-W", "1", "-w", "120"])
            .arg(VPN_SERVER)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self { child }
    }

    /// Stops ping as Ctrl-C does; (transmitted, received) from its summary.
    fn finish(self) -> (u32, u32) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
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
    // One second before, the restart, and four seconds after the daemon is up: a client that
    // comes back only on its own timer (~14 s) loses all 40 of those.
    let pinger = Pinger::start(link);
    std::thread::sleep(Duration::from_secs(1));
    let stop = restart(daemon);
    let started = Instant::now();
    daemon.restart();
    let start = started.elapsed();
    std::thread::sleep(Duration::from_secs(4));
    let (sent, received) = pinger.finish();
    assert!(sent >= 45, "ping sent only {sent}");
    (sent - received, stop, start)
}

#[test]
fn a_client_pinging_every_100ms_is_back_as_soon_as_the_daemon_after_a_restart_and_a_kill_9() {
    if !require_root(
        "a_client_pinging_every_100ms_is_back_as_soon_as_the_daemon_after_a_restart_and_a_kill_9",
    ) {
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
        lost <= pings_in(stop + start) + MAX_LOST_AFTER_START,
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
        lost <= pings_in(stop + start) + MAX_LOST_AFTER_START,
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

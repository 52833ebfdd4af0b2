//! Client expiry end to end: a real WireGuard client through a real tunnel is cut at its
//! client's expiry, stays cut until the expiry is extended, and the expiry holds across a
//! restart and a `kill -9` of the daemon.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a failed test

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, GuardedLink, WgQuickClient, WireguardSettings, api, api_err,
    http_get, metric_value, require_root,
};
use serde_json::Value;

const VPN_SUBNET: &str = "198.51.100.0/24";
const VPN_SERVER: &str = "198.51.100.1";
const METRICS: &str = "127.0.0.1:9469";

fn start(link: &GuardedLink, bpffs: &BpffsDir) -> Daemon {
    let mut config = DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path());
    config.wireguard = Some(WireguardSettings::new(VPN_SUBNET, GuardedLink::SERVER_V4));
    Daemon::start(&link.server, &config)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Unix seconds as RFC 3339 (UTC), by the stock `date`.
fn rfc3339(unix: i64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{unix}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn client(daemon: &Daemon, name: &str) -> Value {
    api(
        daemon,
        &["core", "get_client", &format!("client_name={name}")],
    )["client"]
        .clone()
}

/// Pings the server's tunnel address from the client namespace until one answers or
/// `within` passes.
fn reachable(link: &GuardedLink, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if link.ping(VPN_SERVER, 1) == 1 {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `name` shows as expired and disabled; returns how long that took.
fn wait_expired(daemon: &Daemon, name: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let c = client(daemon, name);
        if c["expired"] == true && c["enabled"] == false {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{name} not expired in time: {c}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether the server's WireGuard interface has a peer with `public_key`.
fn has_peer(daemon: &Daemon, public_key: &Value) -> bool {
    let status = api(daemon, &["core", "server_status"]);
    status["interface"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["public_key"] == *public_key)
}

/// Whether the peer of `public_key` is gone within 2 s: the expiry marks the client in the
/// store first and then removes its peer, in the same run of the expiry task.
fn peer_removed(daemon: &Daemon, public_key: &Value) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while has_peer(daemon, public_key) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

fn metrics(link: &GuardedLink) -> String {
    http_get(&link.server, METRICS, "/metrics")
}

#[test]
fn expiry_cuts_a_connected_client_refuses_enable_and_extending_restores_it() {
    if !require_root("expiry_cuts_a_connected_client_refuses_enable_and_extending_restores_it") {
        return;
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let daemon = start(&link, &bpffs);

    let added = api(&daemon, &["core", "add_client", "client_name=alice"]);
    assert_eq!(added["client"]["expires_at"], Value::Null, "{added}");
    let alice = client(&daemon, "alice");
    assert_eq!(
        (&alice["expires_at"], &alice["expired"]),
        (&Value::Null, &Value::Bool(false)),
        "{alice}"
    );
    // RFC 3339 is read too; replies carry Unix seconds.
    let later = now() + 3600;
    let carol = api(
        &daemon,
        &[
            "core",
            "add_client",
            "client_name=carol",
            &format!("expires_at={}", rfc3339(later)),
        ],
    );
    assert_eq!(carol["client"]["expires_at"], later, "{carol}");

    // Bad input: a clear code, and nothing changes.
    for (args, code) in [
        (
            vec![
                "core",
                "add_client",
                "client_name=bob",
                &*format!("expires_at={}", now() - 10),
            ],
            "INVALID_EXPIRY",
        ),
        (
            vec![
                "core",
                "add_client",
                "client_name=bob",
                "expires_at=tomorrow",
            ],
            "INVALID_EXPIRY",
        ),
        (
            vec![
                "core",
                "set_client_expiry",
                "client_name=alice",
                "expires_at=2026-13-01T00:00:00Z",
            ],
            "INVALID_EXPIRY",
        ),
        (
            vec![
                "core",
                "set_client_expiry",
                "client_name=alice",
                &*format!("expires_at={}", now() - 1),
            ],
            "INVALID_EXPIRY",
        ),
        (
            vec![
                "core",
                "set_client_expiry",
                "client_name=nobody",
                "expires_at=never",
            ],
            "CLIENT_NOT_FOUND",
        ),
        (
            vec!["core", "set_client_expiry", "client_name=alice"],
            "MISSING_PARAMETER",
        ),
        (
            vec!["core", "get_client", "client_name=nobody"],
            "CLIENT_NOT_FOUND",
        ),
    ] {
        assert_eq!(api_err(&daemon, &args), code, "{args:?}");
    }
    let list = api(&daemon, &["core", "list_clients"]);
    assert_eq!(list["total"], 2, "no bob: {list}");
    assert_eq!(client(&daemon, "alice")["expires_at"], Value::Null);

    // A connected client whose expiry comes is cut.
    let export = api(&daemon, &["core", "export_client", "client_name=alice"]);
    let _wg = WgQuickClient::up(&link.peer, export["config"].as_str().unwrap());
    assert!(reachable(&link, Duration::from_secs(10)), "connected");
    let key = client(&daemon, "alice")["public_key"].clone();
    let at = now() + 3;
    let set = api(
        &daemon,
        &[
            "core",
            "set_client_expiry",
            "client_name=alice",
            &format!("expires_at={at}"),
        ],
    );
    assert_eq!(
        (&set["expires_at"], &set["enabled"], &set["reenabled"]),
        (&Value::from(at), &Value::Bool(true), &Value::Bool(false)),
        "{set}"
    );
    let listed = api(&daemon, &["core", "list_clients", "search=alice"]);
    assert_eq!(listed["clients"][0]["expires_at"], at, "{listed}");
    assert_eq!(listed["clients"][0]["expired"], false, "{listed}");
    let took = wait_expired(&daemon, "alice", Duration::from_secs(15));
    assert!(now() >= at, "not before its time (took {took:?})");
    assert!(peer_removed(&daemon, &key), "the peer is gone");
    assert!(
        !reachable(&link, Duration::from_secs(2)),
        "the expired client is cut off"
    );
    let m = metrics(&link);
    assert_eq!(
        metric_value(&m, "phantom_wireguard_clients_expired_total"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "phantom_wireguard_clients{state=\"expired\"}"),
        Some(1.0)
    );
    assert!(daemon.log().contains("client expired"), "a log line");

    // Enabling is refused until the expiry moves into the future.
    assert_eq!(
        api_err(&daemon, &["core", "enable_client", "client_name=alice"]),
        "CLIENT_EXPIRED"
    );
    assert_eq!(client(&daemon, "alice")["enabled"], false);
    assert!(!has_peer(&daemon, &key));
    let extended = api(
        &daemon,
        &[
            "core",
            "set_client_expiry",
            "client_name=alice",
            "expires_at=never",
        ],
    );
    assert_eq!(
        (&extended["enabled"], &extended["reenabled"]),
        (&Value::Bool(true), &Value::Bool(true)),
        "{extended}"
    );
    let alice = client(&daemon, "alice");
    assert_eq!(
        (&alice["expires_at"], &alice["expired"], &alice["enabled"]),
        (&Value::Null, &Value::Bool(false), &Value::Bool(true)),
        "{alice}"
    );
    assert!(has_peer(&daemon, &key), "the peer is back");
    assert!(
        reachable(&link, Duration::from_secs(30)),
        "the client reconnects"
    );

    // A client the operator disabled stays disabled when its expiry moves.
    api(&daemon, &["core", "disable_client", "client_name=carol"]);
    let moved = api(
        &daemon,
        &[
            "core",
            "set_client_expiry",
            "client_name=carol",
            "expires_at=never",
        ],
    );
    assert_eq!(
        (&moved["enabled"], &moved["reenabled"]),
        (&Value::Bool(false), &Value::Bool(false)),
        "{moved}"
    );
}

#[test]
fn expiry_holds_across_restart_and_kill_9() {
    if !require_root("expiry_holds_across_restart_and_kill_9") {
        return;
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let mut daemon = start(&link, &bpffs);

    api(&daemon, &["core", "add_client", "client_name=alice"]);
    let key = client(&daemon, "alice")["public_key"].clone();
    let export = api(&daemon, &["core", "export_client", "client_name=alice"]);
    let wg = WgQuickClient::up(&link.peer, export["config"].as_str().unwrap());
    assert!(reachable(&link, Duration::from_secs(10)), "connected");
    api(
        &daemon,
        &[
            "core",
            "add_client",
            "client_name=carol",
            &format!("expires_at={}", now() + 2),
        ],
    );
    let carol_key = client(&daemon, "carol")["public_key"].clone();
    wait_expired(&daemon, "carol", Duration::from_secs(15));

    // An acknowledged expiry survives kill -9 and still fires after the restart; an expired
    // client stays expired.
    let at = now() + 12;
    api(
        &daemon,
        &[
            "core",
            "set_client_expiry",
            "client_name=alice",
            &format!("expires_at={at}"),
        ],
    );
    daemon.kill9();
    let restarted = Instant::now();
    daemon.restart();
    // The client would take 15 s to notice the server lost its session and handshake again:
    // bring it up afresh instead.
    drop(wg);
    let _wg = WgQuickClient::up(&link.peer, export["config"].as_str().unwrap());
    eprintln!("restart and reconnect: {:?}", restarted.elapsed());
    let carol = client(&daemon, "carol");
    assert_eq!(
        (&carol["expired"], &carol["enabled"]),
        (&Value::Bool(true), &Value::Bool(false)),
        "{carol}"
    );
    assert!(!has_peer(&daemon, &carol_key), "no peer for carol");
    assert_eq!(
        api_err(&daemon, &["core", "enable_client", "client_name=carol"]),
        "CLIENT_EXPIRED"
    );
    let alice = client(&daemon, "alice");
    assert_eq!(alice["expires_at"], at, "{alice}");
    assert!(
        now() < at,
        "the restart took too long for this check: {} s left",
        at - now()
    );
    assert_eq!(alice["enabled"], true, "pending: {alice}");
    assert!(
        reachable(&link, Duration::from_secs(10)),
        "reconnected until the expiry"
    );
    wait_expired(&daemon, "alice", Duration::from_secs(20));
    assert!(peer_removed(&daemon, &key), "the peer is gone");
    assert!(
        !reachable(&link, Duration::from_secs(2)),
        "cut off after the restart"
    );
    let m = metrics(&link);
    assert_eq!(
        metric_value(&m, "phantom_wireguard_clients_expired_total"),
        Some(1.0),
        "alice since the restart: {m}"
    );

    // An expiry that comes while the daemon is down is applied at start: the peer never
    // comes back.
    let dave_at = now() + 2;
    api(
        &daemon,
        &[
            "core",
            "add_client",
            "client_name=dave",
            &format!("expires_at={dave_at}"),
        ],
    );
    let dave_key = client(&daemon, "dave")["public_key"].clone();
    assert!(daemon.stop().success());
    while now() <= dave_at {
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon.restart();
    for (name, key) in [("alice", &key), ("carol", &carol_key), ("dave", &dave_key)] {
        let c = client(&daemon, name);
        assert_eq!(
            (&c["expired"], &c["enabled"]),
            (&Value::Bool(true), &Value::Bool(false)),
            "{c}"
        );
        assert!(!has_peer(&daemon, key), "no peer for {name}");
    }
    assert!(
        !reachable(&link, Duration::from_secs(2)),
        "alice stays cut off after a restart"
    );
}

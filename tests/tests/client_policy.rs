//! Per-client rules and isolation in the kernel (`tc_client_policy` on WireGuard ingress),
//! with two real WireGuard clients (wg-quick + wireguard-go) and services in an upstream
//! namespace: ordered allow/deny rules decide TCP, UDP and ICMP for one client and leave the
//! other alone; `test_policy` agrees with what the packets did; isolation stops client to
//! client traffic but not the server; the rules survive `kill -9`; bad rules change nothing; a
//! removed client's rules go.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, NetNs, TwoClients, WireguardSettings, api, api_err,
    connect_client, require_root,
};
use serde_json::Value;

const VPN_SUBNET: &str = "198.51.100.0/24";
const SERVER_VPN: &str = "198.51.100.1";
const SERVICE: &str = "203.0.113.80";

/// The shared set-up, the service on the upstream.
type Topology = TwoClients;

fn tcp(ns: &NetNs, port: u16) -> bool {
    ns.run(move || {
        let addr: SocketAddr = format!("{SERVICE}:{port}").parse().unwrap();
        TcpStream::connect_timeout(&addr, Duration::from_millis(1500)).is_ok()
    })
}

/// A UDP datagram from `ns` to the service's `port`: whether it arrived.
fn udp(topo: &Topology, ns: &NetNs, port: u16) -> bool {
    let listener = topo
        .upstream
        .run(move || UdpSocket::bind(format!("{SERVICE}:{port}")).unwrap());
    listener
        .set_read_timeout(Some(Duration::from_millis(1200)))
        .unwrap();
    ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"probe", format!("{SERVICE}:{port}")).unwrap();
    });
    let mut buf = [0u8; 16];
    listener.recv_from(&mut buf).is_ok()
}

fn ping(ns: &NetNs, to: &str) -> bool {
    ns.command("ping")
        .args(["-n", "-q", "-c", "1", "-W", "1", to])
        .status()
        .unwrap()
        .success()
}

fn test_policy(daemon: &Daemon, client: &str, dst: &str, proto: &str, port: u16) -> Value {
    api(
        daemon,
        &[
            "core",
            "test_policy",
            &format!("client_name={client}"),
            &format!("destination={dst}"),
            &format!("protocol={proto}"),
            &format!("port={port}"),
        ],
    )
}

#[test]
fn client_rules_and_isolation_hold_in_the_kernel_and_test_policy_agrees() {
    if !require_root("client_rules_and_isolation_hold_in_the_kernel_and_test_policy_agrees") {
        return;
    }
    let started = Instant::now();
    let topo = Topology::new(SERVICE);
    // Services: TCP 22, 80 and 8080 (the listeners' backlogs accept without an accept call).
    let _listeners: Vec<std::net::TcpListener> = [22u16, 80, 8080]
        .iter()
        .map(|p| {
            let p = *p;
            topo.upstream
                .run(move || std::net::TcpListener::bind(format!("{SERVICE}:{p}")).unwrap())
        })
        .collect();
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new("a0", bpffs.path());
    config.wireguard = Some(WireguardSettings::new(VPN_SUBNET, TwoClients::ENDPOINT));
    let mut daemon = Daemon::start(&topo.server, &config);
    let _alice = connect_client(&daemon, &topo.alice, "alice");
    let _bob = connect_client(&daemon, &topo.bob, "bob");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(ping(&topo.alice, SERVICE) && ping(&topo.bob, SERVICE)) {
        assert!(
            Instant::now() < deadline,
            "the tunnels never carried a ping"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let bob_ip = api(&daemon, &["core", "get_client", "client_name=bob"])["client"]["ip"]
        .as_str()
        .unwrap()
        .to_string();
    // Everything passes before any rule.
    assert!(tcp(&topo.alice, 22) && tcp(&topo.alice, 80) && tcp(&topo.alice, 8080));
    assert!(udp(&topo, &topo.alice, 5353) && udp(&topo, &topo.alice, 7000));
    assert!(
        ping(&topo.alice, &bob_ip),
        "client to client before isolation"
    );

    let rules = serde_json::json!([
        format!("deny tcp {SERVICE} 22"),
        "allow tcp 203.0.113.0/24 80",
        "deny udp 203.0.113.0/24 5000-6000",
        format!("deny icmp {SERVICE}"),
        "deny tcp 203.0.113.0/24",
    ])
    .to_string();
    let set = api(
        &daemon,
        &[
            "core",
            "set_client_acl",
            "client_name=alice",
            &format!("rules={rules}"),
        ],
    );
    assert_eq!(set["rules"].as_array().unwrap().len(), 5, "{set}");

    // What the packets do, and what test_policy says, case by case: (proto, port, passes,
    // deciding rule).
    let cases: [(&str, u16, bool, Option<u64>); 6] = [
        ("tcp", 22, false, Some(0)),
        ("tcp", 80, true, Some(1)),
        ("tcp", 8080, false, Some(4)),
        ("udp", 5353, false, Some(2)),
        ("udp", 7000, true, None),
        ("icmp", 0, false, Some(3)),
    ];
    for (proto, port, passes, rule) in cases {
        let did = match proto {
            "tcp" => tcp(&topo.alice, port),
            "udp" => udp(&topo, &topo.alice, port),
            _ => ping(&topo.alice, SERVICE),
        };
        assert_eq!(did, passes, "{proto} {port}: the packets");
        let said = test_policy(&daemon, "alice", SERVICE, proto, port);
        assert_eq!(said["passes"], passes, "{proto} {port}: {said}");
        assert_eq!(said["rule_index"].as_u64(), rule, "{proto} {port}: {said}");
    }
    // The other client is untouched.
    assert!(tcp(&topo.bob, 22) && ping(&topo.bob, SERVICE));
    assert_eq!(
        test_policy(&daemon, "bob", SERVICE, "tcp", 22)["verdict"],
        "no_match"
    );

    // Live changes: each goes into the other of the client's two kernel entries, then its slot
    // points there. Twenty changes back and forth, then a set that turns the first one's
    // verdicts around, then the first set again.
    let set_rules = |rules: &str| {
        api(
            &daemon,
            &[
                "core",
                "set_client_acl",
                "client_name=alice",
                &format!("rules={rules}"),
            ],
        )
    };
    let opened = serde_json::json!([format!("allow tcp {SERVICE} 22"), "deny tcp 203.0.113.0/24",])
        .to_string();
    for _ in 0..10 {
        set_rules(&opened);
        set_rules(&rules);
    }
    assert!(!tcp(&topo.alice, 22) && tcp(&topo.alice, 80));
    set_rules(&opened);
    assert!(
        tcp(&topo.alice, 22) && !tcp(&topo.alice, 80),
        "the changed rules"
    );
    set_rules(&rules);
    assert!(
        !tcp(&topo.alice, 22) && tcp(&topo.alice, 80),
        "the first rules again"
    );

    // Isolation: client to client stops, the server and the rest stay reachable.
    api(&daemon, &["core", "set_client_isolation", "enabled=true"]);
    assert!(
        !ping(&topo.alice, &bob_ip),
        "isolated clients must not reach each other"
    );
    assert!(!ping(&topo.bob, &alice_ip(&daemon)));
    assert!(ping(&topo.alice, SERVER_VPN) && ping(&topo.bob, SERVICE));
    assert_eq!(
        test_policy(&daemon, "alice", &bob_ip, "icmp", 0)["verdict"],
        "isolated"
    );

    // Bad input changes nothing.
    for (bad, code) in [
        ("rules=[\"deny tcp 1.2.3.400\"]", "INVALID_RULE"),
        ("rules=not json", "INVALID_RULE"),
    ] {
        assert_eq!(
            api_err(
                &daemon,
                &["core", "set_client_acl", "client_name=alice", bad]
            ),
            code
        );
    }
    assert_eq!(
        api_err(
            &daemon,
            &["core", "set_client_acl", "client_name=nobody", "rules=[]"]
        ),
        "CLIENT_NOT_FOUND"
    );
    let status = api(&daemon, &["core", "policy_status"]);
    assert_eq!(status["isolation"], true, "{status}");
    assert_eq!(status["rules"], 5, "{status}");
    for verdict in ["denied", "isolated", "allowed"] {
        assert!(status["packets"][verdict].as_u64().unwrap() > 0, "{status}");
    }
    // Each client's own drops, by reason: alice's rules denied hers, and both pinged the
    // other under isolation; bob has no rules, so nothing of his was denied.
    let drops = |name: &str| {
        api(
            &daemon,
            &["core", "get_client_policy", &format!("client_name={name}")],
        )["policy_drops"]
            .clone()
    };
    let (alice_drops, bob_drops) = (drops("alice"), drops("bob"));
    assert!(
        alice_drops["denied"].as_u64().unwrap() >= 4,
        "{alice_drops}"
    );
    assert!(
        alice_drops["isolated"].as_u64().unwrap() > 0,
        "{alice_drops}"
    );
    assert_eq!(bob_drops["denied"], 0, "{bob_drops}");
    assert!(bob_drops["isolated"].as_u64().unwrap() > 0, "{bob_drops}");
    let metrics = phantom_tests::http_get(&topo.server, "127.0.0.1:9469", "/metrics");
    let series = |name: &str, reason: &str| {
        phantom_tests::metric_value(
            &metrics,
            &format!(
                "phantom_client_policy_dropped_packets_total{{client=\"{name}\",reason=\"{reason}\"}}"
            ),
        )
    };
    assert!(series("alice", "denied").unwrap_or(0.0) >= 4.0, "{metrics}");
    assert!(series("bob", "isolated").unwrap_or(0.0) > 0.0, "{metrics}");

    // Acknowledged policy survives kill -9.
    daemon.kill9();
    daemon.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ping(&topo.bob, SERVICE) {
        assert!(Instant::now() < deadline, "bob never came back");
        std::thread::sleep(Duration::from_millis(200));
    }
    let acl = api(&daemon, &["core", "get_client_acl", "client_name=alice"]);
    assert_eq!(
        acl["rules"][0],
        format!("deny tcp {SERVICE}/32 22"),
        "{acl}"
    );
    assert_eq!(acl["isolation"], true);
    assert!(!tcp(&topo.alice, 22));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !tcp(&topo.alice, 80) {
        assert!(Instant::now() < deadline, "alice never came back");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!ping(&topo.alice, &bob_ip));

    // A removed client's rules go with it.
    api(&daemon, &["core", "remove_client", "client_name=alice"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while api(&daemon, &["core", "policy_status"])["clients_with_rules"] != 0 {
        assert!(
            Instant::now() < deadline,
            "the removed client's rules stayed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "client_rules_and_isolation_hold_in_the_kernel_and_test_policy_agrees: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn alice_ip(daemon: &Daemon) -> String {
    api(daemon, &["core", "get_client", "client_name=alice"])["client"]["ip"]
        .as_str()
        .unwrap()
        .to_string()
}

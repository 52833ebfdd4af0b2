//! Datapath end-to-end tests: the XDP allow/deny lists, the in-kernel DNS answer filter
//! against a real resolver and `dig`, and the multihop mark with real policy routing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a failed test

use std::time::Duration;

use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, GuardedLink, NetNs, Process, api, dig, http_get, metric_value,
    phantom_api, require_root, veth,
};
use serde_json::Value;

fn source(daemon: &Daemon, address: &str) -> Value {
    let data = api(daemon, &["datapath", "top_sources", "count=100"]);
    data["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["address"] == address)
        .cloned()
        .unwrap_or(Value::Null)
}

fn verdict(daemon: &Daemon, reason: &str) -> u64 {
    let data = api(daemon, &["datapath", "counters"]);
    data["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["reason"] == reason)
        .map(|c| c["packets"].as_u64().unwrap())
        .unwrap()
}

fn ping_from(link: &GuardedLink, from: &str, to: &str, count: u32) -> u32 {
    link.ping_from(Some(from), to, count)
}

/// The guarded link with phantomd on its server side, guarding `up0`.
fn guarded_daemon() -> (GuardedLink, BpffsDir, Daemon) {
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let daemon = Daemon::start(
        &link.server,
        &DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path()),
    );
    (link, bpffs, daemon)
}

#[test]
fn deny_allow_unblock_and_ttl_in_xdp() {
    if !require_root("deny_allow_unblock_and_ttl_in_xdp") {
        return;
    }
    let (link, _bpffs, mut daemon) = guarded_daemon();
    let (a, b, a6) = (
        GuardedLink::PEER_V4,
        GuardedLink::PEER_V4_SECOND,
        GuardedLink::PEER_V6,
    );
    let server = GuardedLink::SERVER_V4;

    link.send_udp(a, server, 10, 64);
    link.send_udp(b, server, 10, 64);
    assert_eq!(source(&daemon, a)["packets"], 10);

    // Deny one source: its packets are dropped and counted, the other's pass, exactly.
    let denied = api(&daemon, &["datapath", "deny", &format!("ip={a}")]);
    assert_eq!(denied["denied"], true);
    assert_eq!(denied["expires_in_seconds"], Value::Null);
    link.send_udp(a, server, 10, 64);
    link.send_udp(b, server, 10, 64);
    // Dropped packets are counted against the deny entry (and by reason), not as traffic.
    assert_eq!(source(&daemon, a)["packets"], 10);
    assert_eq!(source(&daemon, b)["packets"], 20);
    let entry = &api(&daemon, &["datapath", "list_denied"])["entries"][0];
    assert_eq!(
        (
            entry["dropped_packets"].as_u64(),
            entry["dropped_bytes"].as_u64()
        ),
        (Some(10), Some(10 * 106)),
        "{entry}"
    );
    assert_eq!(verdict(&daemon, "denied_manual"), 10);
    assert_eq!(
        ping_from(&link, a, server, 3),
        0,
        "denied source gets nothing through"
    );
    assert_eq!(
        ping_from(&link, b, server, 3),
        3,
        "the other source is untouched"
    );
    let list = api(&daemon, &["datapath", "list_denied"]);
    assert_eq!(list["count"], 1);
    assert_eq!(list["entries"][0]["address"], a);
    assert_eq!(list["entries"][0]["reason"], "manual");
    let metrics = http_get(&link.server, "127.0.0.1:9469", "/metrics");
    assert_eq!(
        metric_value(&metrics, "phantom_datapath_policy_entries{list=\"deny\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "phantom_datapath_packets_total{verdict=\"drop\",reason=\"denied_manual\"}"
        ),
        Some(13.0),
        "10 datagrams and 3 pings"
    );

    assert!(
        metric_value(&metrics, "phantom_datapath_packets_per_second").is_some(),
        "{metrics}"
    );

    // Allow wins over deny; removing the allow restores the deny.
    api(&daemon, &["datapath", "allow", &format!("ip={a}")]);
    assert_eq!(ping_from(&link, a, server, 3), 3, "allow overrides deny");
    assert!(verdict(&daemon, "allowed") >= 3);
    assert_eq!(api(&daemon, &["datapath", "list_allowed"])["count"], 1);
    assert_eq!(
        api(&daemon, &["datapath", "disallow", &format!("ip={a}")])["disallowed"],
        true
    );
    assert_eq!(ping_from(&link, a, server, 2), 0, "deny applies again");
    assert_eq!(
        api(&daemon, &["datapath", "unblock", &format!("ip={a}")])["unblocked"],
        true
    );
    assert_eq!(ping_from(&link, a, server, 3), 3, "unblocked");
    assert_eq!(
        api(&daemon, &["datapath", "unblock", &format!("ip={a}")])["unblocked"],
        false
    );

    // A TTL lifts the block by itself, in the kernel.
    let timed = api(
        &daemon,
        &["datapath", "deny", &format!("ip={b}"), "ttl_seconds=2"],
    );
    assert!(
        timed["expires_in_seconds"]
            .as_u64()
            .is_some_and(|s| (1..=2).contains(&s)),
        "{timed}"
    );
    assert_eq!(ping_from(&link, b, server, 2), 0, "denied for now");
    std::thread::sleep(Duration::from_millis(2600));
    assert_eq!(ping_from(&link, b, server, 3), 3, "TTL lifted the block");
    assert_eq!(api(&daemon, &["datapath", "list_denied"])["count"], 0);

    // IPv6 works the same.
    api(&daemon, &["datapath", "deny", &format!("ip={a6}")]);
    link.send_udp(a6, GuardedLink::SERVER_V6, 4, 64);
    assert_eq!(source(&daemon, a6), Value::Null, "never counted as traffic");
    let entry = &api(&daemon, &["datapath", "list_denied"])["entries"][0];
    assert_eq!(
        (entry["address"].as_str(), entry["dropped_packets"].as_u64()),
        (Some(a6), Some(4))
    );
    assert_eq!(ping_from(&link, a6, GuardedLink::SERVER_V6, 2), 0);

    // A deny survives kill -9 and restart (pinned map and the state file).
    daemon.kill9();
    daemon.restart();
    // The restart took the programs the first start verified from their pins.
    assert!(
        daemon
            .log()
            .contains("programs loaded verified=\"\" adopted=6"),
        "{}",
        daemon.log()
    );
    assert_eq!(
        api(&daemon, &["datapath", "list_denied"])["entries"][0]["address"],
        a6
    );
    assert_eq!(ping_from(&link, a6, GuardedLink::SERVER_V6, 2), 0);
    api(&daemon, &["datapath", "unblock", &format!("ip={a6}")]);
    assert_eq!(ping_from(&link, a6, GuardedLink::SERVER_V6, 2), 2);

    // Bad input: clear errors, no change.
    for (args, code) in [
        (
            vec!["datapath", "deny", "ip=300.1.1.1"],
            "INVALID_PARAMETER",
        ),
        (
            vec!["datapath", "deny", "ip=192.0.2.9", "ttl_seconds=0"],
            "INVALID_PARAMETER",
        ),
        (vec!["datapath", "deny"], "MISSING_PARAMETER"),
        (
            vec!["datapath", "allow", "ip=192.0.2.9", "ttl=5"],
            "UNKNOWN_PARAMETER",
        ),
    ] {
        let (exit, reply, _) = phantom_api(&daemon.socket(), &args);
        assert_ne!(exit, 0);
        assert_eq!(reply["code"], code, "{args:?}");
    }
    assert_eq!(api(&daemon, &["datapath", "list_denied"])["count"], 0);
}

/// Dropped packets of `address`'s deny entry, as `list_denied` reports them.
fn dropped(daemon: &Daemon, address: &str) -> Option<u64> {
    api(daemon, &["datapath", "list_denied"])["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == address)
        .and_then(|e| e["dropped_packets"].as_u64())
}

/// The guarded daemon, with this thread pinned to one CPU and a second peer address (from the
/// benchmarking range) whose slot in the guard's per-CPU caches (deny and pass, indexed alike)
/// is the peer's: the caches are per CPU and veth receives on the sending CPU, so senders
/// (threads spawned from here inherit the mask) stay on one CPU and the two sources really
/// meet in one slot.
fn guarded_daemon_with_slot_twin() -> (GuardedLink, BpffsDir, Daemon, String) {
    use phantom_common::xdp::{SourceKey, deny_cache_slot};
    let mut one_cpu = nix::sched::CpuSet::new();
    one_cpu.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one_cpu).unwrap();
    let (link, bpffs, daemon) = guarded_daemon();
    let slot_of =
        |ip: std::net::Ipv4Addr| deny_cache_slot(SourceKey::from_ipv4(ip.octets()).words());
    let a_slot = slot_of(GuardedLink::PEER_V4.parse().unwrap());
    let c = (0u32..1 << 17)
        .map(|i| std::net::Ipv4Addr::from(0xc612_0000 + i))
        .find(|ip| slot_of(*ip) == a_slot)
        .expect("a colliding address in 198.18.0.0/15")
        .to_string();
    link.peer.ip(&[
        "addr",
        "add",
        &format!("{c}/32"),
        "dev",
        GuardedLink::PEER_DEV,
    ]);
    (link, bpffs, daemon, c)
}

/// The guard answers repeat packets of a denied source from a per-CPU cache in front of the
/// policy map. Two denied sources that share a cache slot, a source unblocked and denied
/// again, and a deny shortened to a TTL must all still be dropped and counted exactly.
#[test]
fn deny_cache_keeps_counts_exact_and_follows_every_change() {
    if !require_root("deny_cache_keeps_counts_exact_and_follows_every_change") {
        return;
    }
    let (link, _bpffs, daemon, c) = guarded_daemon_with_slot_twin();
    let (a, server) = (GuardedLink::PEER_V4, GuardedLink::SERVER_V4);

    // Alternating bursts: every burst's first packet evicts the other source from the slot.
    api(&daemon, &["datapath", "deny", &format!("ip={a}")]);
    api(&daemon, &["datapath", "deny", &format!("ip={c}")]);
    for _ in 0..3 {
        link.send_udp(a, server, 5, 64);
        link.send_udp(&c, server, 7, 64);
    }
    assert_eq!(dropped(&daemon, a), Some(15));
    assert_eq!(dropped(&daemon, &c), Some(21));
    assert_eq!(verdict(&daemon, "denied_manual"), 36);
    assert_eq!(source(&daemon, a), Value::Null, "never counted as traffic");

    // Unblocked, the next packet passes at once; denied again, the count starts afresh.
    api(&daemon, &["datapath", "unblock", &format!("ip={a}")]);
    link.send_udp(a, server, 4, 64);
    assert_eq!(source(&daemon, a)["packets"], 4);
    api(&daemon, &["datapath", "deny", &format!("ip={a}")]);
    link.send_udp(a, server, 3, 64);
    assert_eq!(dropped(&daemon, a), Some(3), "a new entry, a new count");
    assert_eq!(
        dropped(&daemon, &c),
        Some(21),
        "the other entry keeps its count"
    );

    // A permanent deny, cached, then shortened to a TTL: the TTL applies.
    link.send_udp(&c, server, 2, 64);
    assert_eq!(dropped(&daemon, &c), Some(23));
    api(
        &daemon,
        &["datapath", "deny", &format!("ip={c}"), "ttl_seconds=1"],
    );
    link.send_udp(&c, server, 2, 64);
    assert_eq!(dropped(&daemon, &c), Some(25), "refreshing keeps the count");
    std::thread::sleep(Duration::from_millis(1600));
    link.send_udp(&c, server, 5, 64);
    assert_eq!(
        source(&daemon, &c)["packets"],
        5,
        "the TTL lifted the cached deny"
    );
    assert_eq!(dropped(&daemon, &c), None);
    assert_eq!(verdict(&daemon, "denied_manual"), 36 + 3 + 2 + 2);
}

/// After a reboot bpffs is empty and the daemon writes every persisted deny into a new map.
/// Prefix denies live in a map the kernel allocates an element for on each insert, which can
/// answer `ENOMEM` to inserts made back to back (seen in `phantom-bench xdp`, which writes
/// 1,000 prefixes in a loop: `map_memory`). 1,000 prefixes are denied here and the daemon
/// restarted three times, each time on a new map: every start must restore all of them, and
/// the peer's own prefix among them must still drop its packets.
#[test]
fn a_thousand_prefix_denies_come_back_after_every_restart() {
    if !require_root("a_thousand_prefix_denies_come_back_after_every_restart") {
        return;
    }
    let (link, bpffs, mut daemon) = guarded_daemon();
    let (peer, server) = (GuardedLink::PEER_V6, GuardedLink::SERVER_V6);
    assert_eq!(ping_from(&link, peer, server, 2), 2);
    let mut client = daemon.client();
    for i in 0..999u32 {
        let prefix = format!("2001:db8:ff{:02x}:{:x}::/64", i >> 8, i & 0xff);
        client.ok("datapath", "deny", serde_json::json!({ "ip": prefix }));
    }
    // The peer's own /64.
    client.ok(
        "datapath",
        "deny",
        serde_json::json!({ "ip": "2001:db8::/64" }),
    );
    drop(client);
    assert_eq!(
        ping_from(&link, peer, server, 2),
        0,
        "the peer's prefix is denied"
    );
    for round in 0..3 {
        daemon.stop();
        // A reboot empties bpffs: the daemon then writes every entry into a new map.
        std::fs::remove_file(bpffs.path().join("PH_POLICY_NET")).unwrap();
        daemon.restart();
        let listed = api(&daemon, &["datapath", "list_denied"]);
        assert_eq!(listed["count"], 1000, "restart {round}: {}", daemon.log());
        assert_eq!(
            ping_from(&link, peer, server, 2),
            0,
            "restart {round}: the peer's prefix still drops"
        );
        assert_eq!(
            ping_from(&link, GuardedLink::PEER_V4, GuardedLink::SERVER_V4, 2),
            2,
            "restart {round}: IPv4 is untouched"
        );
    }
}

/// The guard passes repeat packets of a source from a per-CPU cache (no policy lookup, no
/// per-source map update) and counts them there until they go to the per-source map. Two
/// sources that share a cache slot must still be counted exactly, packets and bytes; a deny
/// must apply to the very next packet of a source whose passes are cached, and an allow with
/// a TTL must lapse on time even while its pass is cached.
#[test]
fn pass_cache_keeps_counts_exact_and_follows_every_change() {
    if !require_root("pass_cache_keeps_counts_exact_and_follows_every_change") {
        return;
    }
    let (link, _bpffs, daemon, c) = guarded_daemon_with_slot_twin();
    let (a, server) = (GuardedLink::PEER_V4, GuardedLink::SERVER_V4);
    let counts = |addr: &str| {
        let s = source(&daemon, addr);
        (s["packets"].as_u64(), s["bytes"].as_u64())
    };

    // Alternating bursts: each burst's first packet moves the other source's counts from the
    // slot into its entry; the last burst's are still in the slot when read.
    for _ in 0..3 {
        link.send_udp(a, server, 5, 64);
        link.send_udp(&c, server, 7, 64);
    }
    assert_eq!(counts(a), (Some(15), Some(15 * 106)));
    assert_eq!(counts(&c), (Some(21), Some(21 * 106)));
    assert_eq!(
        source(&daemon, &c)["window_packets"]
            .as_u64()
            .map(|w| w <= 21),
        Some(true)
    );
    assert_eq!(verdict(&daemon, "ipv4"), 36);

    // Denied while its passes are cached: the next packet is dropped, counts stay.
    link.send_udp(a, server, 3, 64);
    api(&daemon, &["datapath", "deny", &format!("ip={a}")]);
    link.send_udp(a, server, 4, 64);
    assert_eq!(dropped(&daemon, a), Some(4));
    assert_eq!(counts(a), (Some(18), Some(18 * 106)));

    // Allowed for a second on top of the deny: passes (cached), then the deny is back.
    api(
        &daemon,
        &["datapath", "allow", &format!("ip={a}"), "ttl_seconds=1"],
    );
    link.send_udp(a, server, 5, 64);
    assert_eq!(counts(a), (Some(23), Some(23 * 106)));
    std::thread::sleep(Duration::from_millis(1600));
    link.send_udp(a, server, 2, 64);
    assert_eq!(
        dropped(&daemon, a),
        Some(6),
        "the allow lapsed under a cached pass"
    );
    assert_eq!(counts(a), (Some(23), Some(23 * 106)));
    assert_eq!(counts(&c), (Some(21), Some(21 * 106)));
}

/// Pinned maps outlive the daemon; one whose shape no longer matches the program (here the
/// capacity changed in the configuration; an upgrade that changes a layout is the same case)
/// is replaced at start, and the operator's entries are written into the new one.
#[test]
fn a_pinned_map_of_another_shape_is_replaced_and_refilled() {
    if !require_root("a_pinned_map_of_another_shape_is_replaced_and_refilled") {
        return;
    }
    let (link, bpffs, mut daemon) = guarded_daemon();
    let (a, server) = (GuardedLink::PEER_V4, GuardedLink::SERVER_V4);
    api(&daemon, &["datapath", "deny", &format!("ip={a}")]);
    assert_eq!(ping_from(&link, a, server, 2), 0);
    daemon.stop();

    daemon.edit_config("[datapath]\n", "[datapath]\nmax_policies = 4096\n");
    daemon.restart();
    // The kernel's map, not the configuration, has the new capacity.
    let pinned = aya::maps::MapData::from_pin(bpffs.path().join("PH_POLICY")).unwrap();
    assert_eq!(pinned.info().unwrap().max_entries(), 4096);
    assert_eq!(
        api(&daemon, &["datapath", "list_denied"])["entries"][0]["address"],
        a
    );
    assert_eq!(
        ping_from(&link, a, server, 2),
        0,
        "the deny is in force again"
    );
    assert!(
        daemon.log().contains("pinned map has another shape"),
        "{}",
        daemon.log()
    );
    // The guard kept from the first start uses the old map, so it was verified again.
    assert!(
        daemon
            .log()
            .contains("program=\"xdp_guard\" error=datapath: it uses map PH_POLICY"),
        "{}",
        daemon.log()
    );
}

/// Client, router (phantomd, the filtered `vpn0` towards the client) and upstream (dnsmasq).
struct DnsTopology {
    client: NetNs,
    router: NetNs,
    upstream: NetNs,
}

const RESOLVER_V4: &str = "203.0.113.53";
const RESOLVER_V6: &str = "2001:db8:2::53";
const CRAFTER_V4: &str = "203.0.113.54";
const CLIENT_V4: &str = "198.51.100.2";

impl DnsTopology {
    fn new() -> Self {
        let client = NetNs::new("phc");
        let router = NetNs::new("phr");
        let upstream = NetNs::new("phu");
        veth(&router, "vpn0", &client, "cl0");
        veth(&router, "up0", &upstream, "dns0");
        router.ip(&["addr", "add", "198.51.100.1/24", "dev", "vpn0"]);
        router.ip(&["addr", "add", "2001:db8:1::1/64", "dev", "vpn0", "nodad"]);
        router.ip(&["addr", "add", "203.0.113.1/24", "dev", "up0"]);
        router.ip(&["addr", "add", "2001:db8:2::1/64", "dev", "up0", "nodad"]);
        client.ip(&["addr", "add", "198.51.100.2/24", "dev", "cl0"]);
        client.ip(&["addr", "add", "2001:db8:1::2/64", "dev", "cl0", "nodad"]);
        client.ip(&["route", "add", "default", "via", "198.51.100.1"]);
        client.ip(&["-6", "route", "add", "default", "via", "2001:db8:1::1"]);
        upstream.ip(&["addr", "add", "203.0.113.53/24", "dev", "dns0"]);
        upstream.ip(&["addr", "add", "203.0.113.54/24", "dev", "dns0"]);
        upstream.ip(&["addr", "add", "2001:db8:2::53/64", "dev", "dns0", "nodad"]);
        upstream.ip(&["route", "add", "default", "via", "203.0.113.1"]);
        upstream.ip(&["-6", "route", "add", "default", "via", "2001:db8:2::1"]);
        router.sysctl("net.ipv4.ip_forward", "1");
        router.sysctl("net.ipv6.conf.all.forwarding", "1");
        Self {
            client,
            router,
            upstream,
        }
    }

    /// phantomd on the router: uplink `up0`, the kernel DNS filter on `vpn0`.
    fn start(&self, bpffs: &BpffsDir) -> Daemon {
        let mut config = DaemonConfig::new("up0", bpffs.path());
        config.vpn_interface = Some("vpn0".into());
        Daemon::start(&self.router, &config)
    }

    fn dnsmasq(&self) -> Process {
        let mut cmd = self.upstream.command("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=203.0.113.53",
            "--listen-address=2001:db8:2::53",
            "--pid-file=",
            "--user=root",
            "--log-facility=-",
            "--host-record=casino.example,203.0.113.100,2001:db8:2::100",
            "--host-record=www.casino.example,203.0.113.101,2001:db8:2::101",
            "--host-record=deep.www.casino.example,203.0.113.102",
            "--host-record=exact-only.example,203.0.113.103",
            "--host-record=sub.exact-only.example,203.0.113.104",
            "--host-record=fine.example,203.0.113.105,2001:db8:2::105",
            "--host-record=notcasino.example,203.0.113.106",
            // The names the dns module's health check asks for, answered locally.
            "--host-record=google.com,203.0.113.200",
            "--host-record=cloudflare.com,203.0.113.201",
        ]);
        let mut p = Process::spawn("dnsmasq", &mut cmd);
        // Wait until it answers over both families (IPv6 neighbour discovery takes a moment).
        for _ in 0..50 {
            if self.dig(RESOLVER_V4, "fine.example", "A", &[]).0 == "NOERROR"
                && self.dig(RESOLVER_V6, "fine.example", "AAAA", &[]).0 == "NOERROR"
            {
                return p;
            }
            assert!(p.is_running(), "dnsmasq exited");
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("dnsmasq did not answer");
    }

    /// `dig` from the client: (status, answers).
    fn dig(&self, server: &str, name: &str, qtype: &str, extra: &[&str]) -> (String, Vec<String>) {
        let mut args = vec!["+noedns"];
        args.extend_from_slice(extra);
        dig(&self.client, server, name, qtype, &args)
    }
}

/// A DNS message: header fields, one or more questions as raw name bytes, and answer bytes.
fn dns_message(
    flags: [u8; 2],
    qdcount: u16,
    question: &[u8],
    ancount: u16,
    answers: &[u8],
) -> Vec<u8> {
    let mut m = vec![0x12, 0x34, flags[0], flags[1]];
    m.extend_from_slice(&qdcount.to_be_bytes());
    m.extend_from_slice(&ancount.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(question);
    m.extend_from_slice(answers);
    m
}

fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

fn question(name: &str) -> Vec<u8> {
    let mut q = wire_name(name);
    q.extend_from_slice(&[0, 1, 0, 1]);
    q
}

/// One A record answer pointing back at the question name.
const ANSWER_A: [u8; 16] = [0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 203, 0, 113, 7];

#[test]
fn dns_answers_for_blocked_names_become_nxdomain_in_the_kernel() {
    if !require_root("dns_answers_for_blocked_names_become_nxdomain_in_the_kernel") {
        return;
    }
    let topo = DnsTopology::new();
    let bpffs = BpffsDir::new();
    let mut daemon = topo.start(&bpffs);
    let _dnsmasq = topo.dnsmasq();

    // Before any rule, the real answers.
    assert_eq!(
        topo.dig(RESOLVER_V4, "casino.example", "A", &[]).1,
        vec!["203.0.113.100"]
    );

    api(
        &daemon,
        &["datapath", "dns_block", "domain=Casino.Example."],
    );
    api(
        &daemon,
        &[
            "datapath",
            "dns_block",
            "domain=exact-only.example",
            "subdomains=false",
        ],
    );
    let rules = api(&daemon, &["datapath", "dns_rules"]);
    assert_eq!(rules["count"], 2);
    assert_eq!(rules["rules"][0]["domain"], "casino.example");

    for (server, name, qtype) in [
        (RESOLVER_V4, "casino.example", "A"),
        (RESOLVER_V4, "www.casino.example", "A"),
        (RESOLVER_V4, "deep.www.casino.example", "A"),
        (RESOLVER_V4, "WWW.CaSiNo.example", "A"),
        (RESOLVER_V6, "casino.example", "AAAA"),
        (RESOLVER_V6, "www.casino.example", "A"),
        (RESOLVER_V4, "exact-only.example", "A"),
    ] {
        let (status, answers) = topo.dig(server, name, qtype, &[]);
        assert_eq!(status, "NXDOMAIN", "{name} {qtype} via {server}");
        assert!(answers.is_empty(), "{name}: {answers:?}");
    }
    for (server, name, qtype, want) in [
        (RESOLVER_V4, "fine.example", "A", "203.0.113.105"),
        (RESOLVER_V6, "fine.example", "AAAA", "2001:db8:2::105"),
        (RESOLVER_V4, "sub.exact-only.example", "A", "203.0.113.104"),
        (RESOLVER_V4, "notcasino.example", "A", "203.0.113.106"),
    ] {
        let (status, answers) = topo.dig(server, name, qtype, &[]);
        assert_eq!(
            (status.as_str(), answers),
            ("NOERROR", vec![want.to_string()]),
            "{name}"
        );
    }
    // TCP DNS is not touched by the UDP filter: the answer arrives intact.
    let (status, answers) = topo.dig(RESOLVER_V4, "casino.example", "A", &["+tcp"]);
    assert_eq!(
        (status.as_str(), answers),
        ("NOERROR", vec!["203.0.113.100".to_string()])
    );

    let counters = api(&daemon, &["datapath", "counters"]);
    let nx = counters["dns_filter"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["verdict"] == "nxdomain")
        .unwrap()["packets"]
        .as_u64()
        .unwrap();
    assert_eq!(nx, 7, "{counters}");
    let metrics = http_get(&topo.router, "127.0.0.1:9469", "/metrics");
    assert_eq!(
        metric_value(
            &metrics,
            "phantom_dns_filter_packets_total{verdict=\"nxdomain\"}"
        ),
        Some(7.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "phantom_dns_filter_domains"),
        Some(2.0)
    );

    // Crafted packets from port 53 towards the client: everything unusual passes untouched.
    let listener = topo.client.udp_listener(&format!("{CLIENT_V4}:5353"));
    let blocked_q = question("casino.example");
    let mut long_name = String::new();
    for i in 0..60 {
        long_name.push_str(&format!("l{i:03}."));
    }
    long_name.push_str("casino.example");
    let mut overrun = vec![40u8];
    overrun.extend_from_slice(b"casino");
    let corpus: Vec<(&str, Vec<u8>)> = vec![
        ("truncated header", vec![0x12, 0x34, 0x81, 0x80, 0, 1]),
        ("header only", dns_message([0x81, 0x80], 1, &[], 0, &[])),
        (
            "query, not a response",
            dns_message([0x01, 0x00], 1, &blocked_q, 0, &[]),
        ),
        (
            "zero questions",
            dns_message([0x81, 0x80], 0, &[], 1, &ANSWER_A),
        ),
        (
            "two questions",
            dns_message(
                [0x81, 0x80],
                2,
                &[blocked_q.clone(), blocked_q.clone()].concat(),
                0,
                &[],
            ),
        ),
        (
            "label overruns the packet",
            dns_message([0x81, 0x80], 1, &overrun, 0, &[]),
        ),
        (
            "compression pointer in the question",
            dns_message(
                [0x81, 0x80],
                1,
                &[
                    6, b'c', b'a', b's', b'i', b'n', b'o', 0xc0, 0x0c, 0, 1, 0, 1,
                ],
                0,
                &[],
            ),
        ),
        (
            "name of 300 bytes",
            dns_message([0x81, 0x80], 1, &question(&long_name), 0, &[]),
        ),
        (
            "name without QTYPE",
            dns_message([0x81, 0x80], 1, &wire_name("casino.example"), 0, &[]),
        ),
        (
            "label over 63",
            dns_message([0x81, 0x80], 1, &[64, b'x', 0, 0, 1, 0, 1], 0, &[]),
        ),
        (
            "notify opcode",
            dns_message([0xa0, 0x00], 1, &blocked_q, 0, &[]),
        ),
        (
            "unblocked name",
            dns_message([0x81, 0x80], 1, &question("fine.example"), 1, &ANSWER_A),
        ),
    ];
    for (what, payload) in &corpus {
        topo.upstream.send_udp_from(
            &format!("{CRAFTER_V4}:53"),
            &format!("{CLIENT_V4}:5353"),
            payload,
        );
        let (got, from) = listener
            .recv()
            .unwrap_or_else(|| panic!("{what}: nothing arrived"));
        assert_eq!(from.to_string(), format!("{CRAFTER_V4}:53"));
        assert_eq!(&got, payload, "{what} was changed");
    }
    // A well-formed blocked answer is rewritten exactly: NXDOMAIN, no records, trimmed.
    let answer = dns_message(
        [0x85, 0x80],
        1,
        &question("www.casino.example"),
        1,
        &ANSWER_A,
    );
    topo.upstream.send_udp_from(
        &format!("{CRAFTER_V4}:53"),
        &format!("{CLIENT_V4}:5353"),
        &answer,
    );
    let (got, _) = listener.recv().expect("rewritten answer");
    let mut want = dns_message([0x81, 0x83], 1, &question("www.casino.example"), 0, &[]);
    want[3] = 0x83;
    assert_eq!(got, want);

    // Rules are acknowledged state: they survive kill -9, and the TC links are adopted, once.
    daemon.kill9();
    daemon.restart();
    assert_eq!(
        topo.dig(RESOLVER_V4, "www.casino.example", "A", &[]).0,
        "NXDOMAIN"
    );
    assert_eq!(
        topo.router.tcx_programs("vpn0", true),
        vec!["tc_dns_filter", "tc_client_limit"]
    );
    // The kernel keeps 15 characters of a program's name; each ingress program once.
    let mut ingress = topo.router.tcx_programs("vpn0", false);
    ingress.sort();
    assert_eq!(
        ingress,
        vec!["tc_client_polic", "tc_encrypted_dn", "tc_multihop_mar"]
    );

    // Removing the rule restores the real answers; bad rules are refused.
    assert_eq!(
        api(
            &daemon,
            &["datapath", "dns_unblock", "domain=casino.example"]
        )["removed"],
        true
    );
    assert_eq!(
        topo.dig(RESOLVER_V4, "www.casino.example", "A", &[]).1,
        vec!["203.0.113.101"]
    );
    for bad in [
        "domain=com",
        "domain=a..b",
        "domain=bücher.example",
        "domain=-x.example",
    ] {
        let (exit, reply, _) = phantom_api(&daemon.socket(), &["datapath", "dns_block", bad]);
        assert_ne!(exit, 0);
        assert_eq!(reply["code"], "INVALID_PARAMETER", "{bad}");
    }
    assert_eq!(api(&daemon, &["datapath", "dns_rules"])["count"], 1);
}

/// A VPN client behind the router's `vpn0`, a second client behind `vpn1`, the internet host
/// behind the main route, and an exit behind table 100; both far hosts own 203.0.113.10.
struct MultihopTopology {
    client: NetNs,
    other_client: NetNs,
    router: NetNs,
    internet: NetNs,
    exit: NetNs,
}

const MARK: u32 = 0x6d68;

impl MultihopTopology {
    fn new() -> Self {
        let client = NetNs::new("phc");
        let other_client = NetNs::new("pho");
        let router = NetNs::new("phr");
        let internet = NetNs::new("phi");
        let exit = NetNs::new("phe");
        veth(&router, "vpn0", &client, "cl0");
        veth(&router, "vpn1", &other_client, "cl0");
        veth(&router, "up0", &internet, "in0");
        veth(&router, "ex0", &exit, "ex0");
        for (ns, addr) in [
            (&client, "198.51.100.2/32"),
            (&other_client, "198.51.100.3/32"),
        ] {
            ns.ip(&["addr", "add", addr, "dev", "cl0"]);
            ns.ip(&["route", "add", "198.51.100.1", "dev", "cl0"]);
            ns.ip(&["route", "add", "default", "via", "198.51.100.1"]);
        }
        router.ip(&["addr", "add", "198.51.100.1/32", "dev", "vpn0"]);
        router.ip(&["addr", "add", "198.51.100.1/32", "dev", "vpn1"]);
        router.ip(&["route", "add", "198.51.100.2/32", "dev", "vpn0"]);
        router.ip(&["route", "add", "198.51.100.3/32", "dev", "vpn1"]);
        router.ip(&["addr", "add", "203.0.113.1/24", "dev", "up0"]);
        router.ip(&["addr", "add", "192.0.2.1/24", "dev", "ex0"]);
        internet.ip(&["addr", "add", "203.0.113.10/24", "dev", "in0"]);
        internet.ip(&["route", "add", "default", "via", "203.0.113.1"]);
        exit.ip(&["addr", "add", "192.0.2.2/24", "dev", "ex0"]);
        exit.ip(&["addr", "add", "203.0.113.10/32", "dev", "lo"]);
        exit.ip(&["route", "add", "default", "via", "192.0.2.1"]);
        // What the multihop module sets up: table 100 via the exit, chosen by the mark.
        router.ip(&[
            "route",
            "add",
            "default",
            "via",
            "192.0.2.2",
            "table",
            "100",
        ]);
        router.ip(&[
            "rule",
            "add",
            "fwmark",
            &MARK.to_string(),
            "lookup",
            "100",
            "priority",
            "100",
        ]);
        router.sysctl("net.ipv4.ip_forward", "1");
        for dev in ["all", "default", "vpn0", "vpn1", "up0", "ex0"] {
            router.sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0");
        }
        Self {
            client,
            other_client,
            router,
            internet,
            exit,
        }
    }

    /// Sends one datagram from the client to 203.0.113.10 and says who got it.
    fn who_receives(&self, tag: &str) -> &'static str {
        let via_internet = self.internet.udp_listener("203.0.113.10:7000");
        let via_exit = self.exit.udp_listener("203.0.113.10:7000");
        self.client
            .send_udp_from("198.51.100.2:0", "203.0.113.10:7000", tag.as_bytes());
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| via_internet.recv());
            let b = s.spawn(|| via_exit.recv());
            (a.join().unwrap(), b.join().unwrap())
        });
        match (a, b) {
            (Some((p, _)), None) if p == tag.as_bytes() => "internet",
            (None, Some((p, _))) if p == tag.as_bytes() => "exit",
            other => panic!("unexpected delivery for {tag}: {other:?}"),
        }
    }

    fn client_to_client_arrives(&self, tag: &str) -> bool {
        let listener = self.other_client.udp_listener("198.51.100.3:7001");
        self.client
            .send_udp_from("198.51.100.2:0", "198.51.100.3:7001", tag.as_bytes());
        listener.recv().is_some_and(|(p, _)| p == tag.as_bytes())
    }
}

#[test]
fn multihop_mark_routes_client_traffic_to_the_exit_only_while_on() {
    if !require_root("multihop_mark_routes_client_traffic_to_the_exit_only_while_on") {
        return;
    }
    let topo = MultihopTopology::new();
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new("up0", bpffs.path());
    config.vpn_interface = Some("vpn0".into());
    let daemon = Daemon::start(&topo.router, &config);

    assert_eq!(topo.who_receives("off-1"), "internet");
    assert!(topo.client_to_client_arrives("c2c-off"));

    let on = api(
        &daemon,
        &[
            "datapath",
            "multihop_mark",
            "enabled=true",
            "subnet=198.51.100.0/24",
            &format!("mark={MARK}"),
        ],
    );
    assert_eq!(on["enabled"], true);
    assert_eq!(on["client_subnets"][0], "198.51.100.0/24");
    assert_eq!(topo.who_receives("on-1"), "exit");
    assert_eq!(topo.who_receives("on-2"), "exit");
    assert!(
        topo.client_to_client_arrives("c2c-on"),
        "client to client stays local"
    );
    let status = api(&daemon, &["datapath", "multihop_mark"]);
    let count = |v: &str| {
        status["counters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["verdict"] == v)
            .unwrap()["packets"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(count("marked"), 2, "{status}");
    assert_eq!(count("client_to_client"), 1, "{status}");
    let metrics = http_get(&topo.router, "127.0.0.1:9469", "/metrics");
    assert_eq!(
        metric_value(
            &metrics,
            "phantom_multihop_mark_packets_total{verdict=\"marked\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "phantom_multihop_mark_enabled"),
        Some(1.0)
    );

    api(&daemon, &["datapath", "multihop_mark", "enabled=false"]);
    assert_eq!(topo.who_receives("off-2"), "internet");
    let status = api(&daemon, &["datapath", "multihop_mark"]);
    assert_eq!(status["enabled"], false);

    let (exit, reply, _) = phantom_api(
        &daemon.socket(),
        &[
            "datapath",
            "multihop_mark",
            "enabled=true",
            "subnet=198.51.100.0/33",
        ],
    );
    assert_ne!(exit, 0);
    assert_eq!(reply["code"], "INVALID_PARAMETER");
    assert_eq!(
        topo.who_receives("off-3"),
        "internet",
        "a refused change changes nothing"
    );
}

/// The blocklist feeds the kernel filter: clients that ask another resolver still get
/// NXDOMAIN for its exact and subdomain rules.
#[test]
fn blocklist_rules_reach_the_kernel_filter() {
    if !require_root("blocklist_rules_reach_the_kernel_filter") {
        return;
    }
    let topo = DnsTopology::new();
    let bpffs = BpffsDir::new();
    let mut daemon = topo.start(&bpffs);
    let _dnsmasq = topo.dnsmasq();

    let added = api(
        &daemon,
        &["blocklist", "add", "domain=Casino.Example", "reason=test"],
    );
    assert_eq!(added["domain"], "casino.example");
    let v1 = added["version"].as_u64().unwrap();
    assert_eq!(
        topo.dig(RESOLVER_V4, "www.casino.example", "A", &[]).0,
        "NXDOMAIN"
    );
    assert_eq!(topo.dig(RESOLVER_V4, "fine.example", "A", &[]).0, "NOERROR");

    // Import with broken lines: the good ones land, the bad ones are reported.
    let file = daemon.dir().join("list.hosts");
    std::fs::write(&file, "# gambling\n0.0.0.0 exact-only.example\nnot-an-ip x.example\n0.0.0.0 co.za\n0.0.0.0 notcasino.example\n").unwrap();
    let imported = api(
        &daemon,
        &["blocklist", "import", &format!("path={}", file.display())],
    );
    assert_eq!(
        (imported["imported"].as_u64(), imported["skipped"].as_u64()),
        (Some(2), Some(2)),
        "{imported}"
    );
    assert_eq!(imported["format"], "hosts");
    assert!(imported["version"].as_u64().unwrap() > v1);
    assert_eq!(
        topo.dig(RESOLVER_V4, "notcasino.example", "A", &[]).0,
        "NXDOMAIN"
    );

    // A weak pattern matches in verify but stays out of the kernel.
    api(
        &daemon,
        &[
            "blocklist",
            "add_pattern",
            "pattern=fine",
            "type=contains",
            "weight=0.3",
        ],
    );
    let verdict = api(&daemon, &["blocklist", "verify", "domain=fine.example"]);
    assert_eq!(
        (verdict["blocked"].as_bool(), verdict["confidence"].as_f64()),
        (Some(false), Some(0.3)),
        "{verdict}"
    );
    assert_eq!(verdict["matchedPatterns"][0]["type"], "contains");
    let verdict = api(
        &daemon,
        &["blocklist", "verify", "domain=deep.www.casino.example"],
    );
    assert_eq!(
        (
            verdict["blocked"].as_bool(),
            verdict["matchedPatterns"][0]["pattern"].as_str()
        ),
        (Some(true), Some("*.casino.example"))
    );
    assert_eq!(topo.dig(RESOLVER_V4, "fine.example", "A", &[]).0, "NOERROR");

    // Acknowledged changes survive kill -9; the kernel set is rebuilt from the store.
    let status = api(&daemon, &["blocklist", "status"]);
    assert_eq!(
        (status["entries"].as_u64(), status["kernel_rules"].as_u64()),
        (Some(3), Some(3))
    );
    let checksum = status["checksum"].clone();
    daemon.kill9();
    // A rule in the kernel that no owner has (a name removed from the list while the daemon
    // was down) goes at the start, once the blocklist has claimed its own; those stay.
    let stray: u64 = 0x5eed_0000_0000_0001;
    let pinned = aya::maps::MapData::from_pin(bpffs.path().join("PH_DOMAINS")).unwrap();
    let mut domains: aya::maps::HashMap<_, u64, u8> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(pinned)).unwrap();
    domains.insert(&stray, &1, 0).unwrap();
    daemon.restart();
    let status = api(&daemon, &["blocklist", "status"]);
    assert_eq!(status["checksum"], checksum);
    assert_eq!(status["kernel_entries"].as_u64(), Some(3), "{status}");
    assert!(domains.get(&stray, 0).is_err(), "the stray rule is gone");
    assert!(
        daemon
            .log()
            .contains("rules no owner claimed since the start removed deleted=1"),
        "{}",
        daemon.log()
    );
    assert_eq!(
        topo.dig(RESOLVER_V4, "exact-only.example", "A", &[]).0,
        "NXDOMAIN"
    );

    // Removal restores the real answer; bad input is refused with codes.
    api(&daemon, &["blocklist", "remove", "domain=casino.example"]);
    assert_eq!(
        topo.dig(RESOLVER_V4, "www.casino.example", "A", &[]).1,
        vec!["203.0.113.101"]
    );
    for (args, code) in [
        (vec!["blocklist", "add", "domain=co.za"], "PUBLIC_SUFFIX"),
        (vec!["blocklist", "add", "domain=a..b"], "INVALID_DOMAIN"),
        (
            vec!["blocklist", "add", "domain=x.example", "weight=2"],
            "INVALID_PARAMETER",
        ),
        (
            vec!["blocklist", "add_pattern", "pattern=(", "type=regex"],
            "INVALID_PATTERN",
        ),
        (
            vec!["blocklist", "remove", "domain=nothere.example"],
            "DOMAIN_NOT_FOUND",
        ),
        (
            vec!["blocklist", "import", "path=/nonexistent/list"],
            "IMPORT_FAILED",
        ),
    ] {
        let (exit, reply, _) = phantom_api(&daemon.socket(), &args);
        assert_ne!(exit, 0);
        assert_eq!(reply["code"], code, "{args:?}");
    }
    assert_eq!(api(&daemon, &["blocklist", "status"])["entries"], 2);
}

/// The `dns` module against a real resolver: servers changed and kept, live tests with times.
#[test]
fn dns_servers_change_persist_and_answer_live_tests() {
    if !require_root("dns_servers_change_persist_and_answer_live_tests") {
        return;
    }
    let topo = DnsTopology::new();
    let bpffs = BpffsDir::new();
    let mut daemon = topo.start(&bpffs);
    let _dnsmasq = topo.dnsmasq();

    assert_eq!(
        api(&daemon, &["dns", "get_dns_servers"])["primary"],
        "127.0.0.53"
    );
    let changed = api(
        &daemon,
        &[
            "dns",
            "change_dns_servers",
            &format!("primary={RESOLVER_V4}"),
            &format!("secondary={RESOLVER_V6}"),
        ],
    );
    assert_eq!(changed["dns_servers"]["primary"], RESOLVER_V4);
    assert_eq!(changed["dns_servers"]["previous_primary"], "127.0.0.53");
    assert_eq!(changed["client_configs_updated"]["success"], true);

    let tested = api(&daemon, &["dns", "test_dns_servers", "domain=fine.example"]);
    assert_eq!(
        (
            tested["all_passed"].as_bool(),
            tested["servers_tested"].as_u64()
        ),
        (Some(true), Some(2)),
        "{tested}"
    );
    assert!(
        tested["results"][0]["response_time_ms"]
            .as_f64()
            .is_some_and(|t| t > 0.0)
    );
    // Seed 000's result: `status` "OK"/"FAIL", `response` the address the name resolved to.
    assert_eq!(tested["results"][0]["status"], "OK", "{tested}");
    assert_eq!(
        tested["results"][0]["response"], "203.0.113.105",
        "{tested}"
    );
    assert_eq!(tested["results"][0]["test_domain"], "fine.example");
    assert_eq!(tested["results"][0]["error"], Value::Null);
    let mixed = api(
        &daemon,
        &[
            "dns",
            "test_dns_servers",
            &format!("servers=[\"{RESOLVER_V4}\",\"127.0.0.9\"]"),
            "domain=fine.example",
        ],
    );
    assert_eq!(mixed["all_passed"], false);
    assert_eq!(mixed["results"][1]["success"], false);
    assert_eq!(mixed["results"][1]["status"], "FAIL", "{mixed}");
    assert_eq!(mixed["results"][1]["response"], Value::Null);
    assert!(mixed["results"][1]["error"].is_string(), "{mixed}");

    let status = api(&daemon, &["dns", "status"]);
    assert_eq!(
        status["mode"], "filtering",
        "blocklist on and the kernel filter attached: {status}"
    );
    assert_eq!(status["health"]["status"], "healthy", "{status}");
    let first = &status["health"]["test_results"][0];
    assert_eq!(first["server"], RESOLVER_V4, "{status}");
    assert_eq!(
        (
            first["tests"][0]["domain"].as_str(),
            first["tests"][0]["success"].as_bool(),
            first["tests"][0]["response"].as_str()
        ),
        (Some("google.com"), Some(true), Some("203.0.113.200")),
        "{status}"
    );

    for (args, code) in [
        (
            vec!["dns", "change_dns_servers", "primary=dns.google"],
            "INVALID_DNS_SERVER",
        ),
        (vec!["dns", "change_dns_servers"], "MISSING_PARAMETER"),
        (
            vec!["dns", "test_dns_servers", "servers=8.8.8.8"],
            "INVALID_PARAMETER",
        ),
    ] {
        let (exit, reply, _) = phantom_api(&daemon.socket(), &args);
        assert_ne!(exit, 0);
        assert_eq!(reply["code"], code, "{args:?}");
    }
    daemon.kill9();
    daemon.restart();
    let servers = api(&daemon, &["dns", "get_dns_servers"]);
    assert_eq!(
        (servers["primary"].as_str(), servers["secondary"].as_str()),
        (Some(RESOLVER_V4), Some(RESOLVER_V6))
    );
}

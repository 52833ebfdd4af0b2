//! Phantom's resolver end to end: two real WireGuard clients (wg-quick + wireguard-go) ask the
//! daemon's resolver through the tunnel with `dig`; dnsmasq in an upstream namespace holds the
//! real records. Blocking (exact, subdomain, regex mirror, lookalike), the kernel layer for
//! clients that ask the upstream directly, per-client policy, dry run, the cache and TCP.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a failed test

use std::time::{Duration, Instant};

use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, DnsmasqOptions, NetNs, Process, TwoClients, WgQuickClient,
    WireguardSettings, api, api_err, dig, dnsmasq, dnsmasq_with, http_get, metric_value,
    require_root,
};

const VPN_SUBNET: &str = "198.51.100.0/24";
const RESOLVER: &str = "198.51.100.1";
const UPSTREAM: &str = "203.0.113.53";
const CASINO: &str = "203.0.113.100";
const WWW_CASINO: &str = "203.0.113.101";
const FINE: &str = "203.0.113.105";

/// The shared set-up, with this file's services added below.
struct Topology(TwoClients);

impl std::ops::Deref for Topology {
    type Target = TwoClients;
    fn deref(&self) -> &TwoClients {
        &self.0
    }
}

impl Topology {
    fn new() -> Self {
        Self(TwoClients::new(UPSTREAM))
    }

    fn dnsmasq(&self) -> Process {
        dnsmasq(
            &self.upstream,
            &[UPSTREAM],
            &[
                "casino.example,203.0.113.100",
                "www.casino.example,203.0.113.101",
                "fine.example,203.0.113.105",
                "jg0042.com,203.0.113.106",
                "b3t365.com,203.0.113.107",
                "google.com,203.0.113.200",
                "cloudflare.com,203.0.113.201",
            ],
            "fine.example",
        )
    }

    fn start(&self, bpffs: &BpffsDir, dns: &str) -> Daemon {
        let mut config = DaemonConfig::new("a0", bpffs.path());
        config.wireguard = Some(WireguardSettings::new(VPN_SUBNET, TwoClients::ENDPOINT));
        config.dns_section = dns.into();
        Daemon::start(&self.server, &config)
    }
}

fn resolver_section(extra: &str) -> String {
    format!("listen = \"auto\"\nprimary = \"{UPSTREAM}\"\nsecondary = \"{UPSTREAM}\"\n{extra}")
}

/// `dig` until it gets any reply (the tunnel and the resolver's listener come up in their
/// own time), then its result.
fn dig_ready(ns: &NetNs, server: &str, name: &str) -> (String, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = dig(ns, server, name, "A", &[]);
        if !r.0.starts_with("NO REPLY") || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn status(ns: &NetNs, server: &str, name: &str) -> String {
    dig(ns, server, name, "A", &[]).0
}

fn connect(daemon: &Daemon, ns: &NetNs, name: &str) -> WgQuickClient {
    api(
        daemon,
        &["core", "add_client", &format!("client_name={name}")],
    );
    let export = api(
        daemon,
        &["core", "export_client", &format!("client_name={name}")],
    );
    let config = export["config"].as_str().unwrap();
    assert!(
        config.contains(&format!("DNS = {RESOLVER}\n")),
        "exported configs point DNS at the resolver:\n{config}"
    );
    WgQuickClient::up(ns, config)
}

#[test]
fn resolver_blocks_for_vpn_clients_with_per_client_policy_and_dry_run() {
    if !require_root("resolver_blocks_for_vpn_clients_with_per_client_policy_and_dry_run") {
        return;
    }
    let topo = Topology::new();
    let _upstream = topo.dnsmasq();
    let bpffs = BpffsDir::new();
    let daemon = topo.start(&bpffs, &resolver_section(""));
    api(&daemon, &["blocklist", "add", "domain=casino.example"]);
    api(
        &daemon,
        &[
            "blocklist",
            "add_pattern",
            r"pattern=^jg\d{4}\.com$",
            "type=regex",
            "weight=0.9",
        ],
    );
    let _alice = connect(&daemon, &topo.alice, "alice");
    let _bob = connect(&daemon, &topo.bob, "bob");

    // The real answer for what is not blocked, over UDP and TCP.
    let (st, answers) = dig_ready(&topo.alice, RESOLVER, "fine.example");
    assert_eq!((st.as_str(), answers), ("NOERROR", vec![FINE.to_string()]));
    let (st, answers) = dig(&topo.alice, RESOLVER, "fine.example", "A", &["+tcp"]);
    assert_eq!((st.as_str(), answers), ("NOERROR", vec![FINE.to_string()]));
    // NXDOMAIN for the blocked name, its subdomain, the regex mirror and the lookalike.
    for name in [
        "casino.example",
        "www.casino.example",
        "jg0042.com",
        "b3t365.com",
    ] {
        assert_eq!(status(&topo.alice, RESOLVER, name), "NXDOMAIN", "{name}");
    }
    assert_eq!(
        dig(&topo.alice, RESOLVER, "casino.example", "A", &["+tcp"]).0,
        "NXDOMAIN",
        "over TCP too"
    );
    // Asking the upstream directly through the tunnel: the kernel filter rewrites the answers
    // for exact and subdomain rules.
    let (st, _) = dig_ready(&topo.alice, UPSTREAM, "fine.example");
    assert_eq!(st, "NOERROR");
    let st = status(&topo.alice, UPSTREAM, "casino.example");
    assert_eq!(
        st,
        "NXDOMAIN",
        "{}",
        api(&daemon, &["datapath", "counters"])
    );
    assert_eq!(
        status(&topo.alice, UPSTREAM, "www.casino.example"),
        "NXDOMAIN"
    );

    // Per-client policy: bob unfiltered, on both paths; alice still filtered.
    assert_eq!(
        api_err(
            &daemon,
            &[
                "dns",
                "set_client_policy",
                "client_name=nobody",
                "blocking=false"
            ]
        ),
        "CLIENT_NOT_FOUND"
    );
    api(
        &daemon,
        &[
            "dns",
            "set_client_policy",
            "client_name=bob",
            "blocking=false",
        ],
    );
    let policies = api(&daemon, &["dns", "client_policies"]);
    assert_eq!(policies["clients"][0]["client_name"], "bob", "{policies}");
    let (st, answers) = dig_ready(&topo.bob, RESOLVER, "casino.example");
    assert_eq!(
        (st.as_str(), answers),
        ("NOERROR", vec![CASINO.to_string()])
    );
    let (st, answers) = dig(&topo.bob, UPSTREAM, "www.casino.example", "A", &[]);
    assert_eq!(
        (st.as_str(), answers),
        ("NOERROR", vec![WWW_CASINO.to_string()])
    );
    assert_eq!(status(&topo.alice, RESOLVER, "casino.example"), "NXDOMAIN");
    assert_eq!(status(&topo.alice, UPSTREAM, "casino.example"), "NXDOMAIN");
    api(
        &daemon,
        &[
            "dns",
            "set_client_policy",
            "client_name=bob",
            "blocking=true",
        ],
    );
    assert_eq!(status(&topo.bob, RESOLVER, "casino.example"), "NXDOMAIN");
    assert_eq!(status(&topo.bob, UPSTREAM, "casino.example"), "NXDOMAIN");

    // Dry run: counted, not blocked, anywhere.
    let before = api(&daemon, &["dns", "status"])["resolver"]["dry_run_matches"]
        .as_u64()
        .unwrap();
    api(&daemon, &["dns", "set_dry_run", "enabled=true"]);
    let (st, answers) = dig(&topo.alice, RESOLVER, "casino.example", "A", &[]);
    assert_eq!(
        (st.as_str(), answers),
        ("NOERROR", vec![CASINO.to_string()])
    );
    assert_eq!(status(&topo.alice, RESOLVER, "b3t365.com"), "NOERROR");
    assert_eq!(status(&topo.alice, UPSTREAM, "casino.example"), "NOERROR");
    let st = api(&daemon, &["dns", "status"]);
    assert_eq!(st["resolver"]["dry_run"], true);
    assert_eq!(
        st["resolver"]["dry_run_matches"].as_u64().unwrap(),
        before + 2,
        "{st}"
    );
    assert_eq!(st["mode"], "filtering");
    api(&daemon, &["dns", "set_dry_run", "enabled=false"]);
    assert_eq!(status(&topo.alice, RESOLVER, "casino.example"), "NXDOMAIN");
    assert_eq!(status(&topo.alice, UPSTREAM, "casino.example"), "NXDOMAIN");

    // The cache answered the repeats.
    let st = api(&daemon, &["dns", "status"]);
    assert!(
        st["resolver"]["cache"]["hits"].as_u64().unwrap() > 0,
        "{st}"
    );
    assert!(st["resolver"]["blocked"].as_u64().unwrap() >= 6, "{st}");

    // Nothing about who asked or what they asked is in the logs.
    let log = daemon.log();
    for secret in [
        "192.0.2.2",
        "192.0.2.18",
        "198.51.100.2",
        "198.51.100.3",
        "fine.example",
        "jg0042",
        "b3t365",
    ] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

#[test]
fn sinkhole_answers_and_policy_survive_a_restart() {
    if !require_root("sinkhole_answers_and_policy_survive_a_restart") {
        return;
    }
    let topo = Topology::new();
    let _upstream = topo.dnsmasq();
    let bpffs = BpffsDir::new();
    let mut daemon = topo.start(&bpffs, &resolver_section("block_response = \"sinkhole\"\n"));
    api(&daemon, &["blocklist", "add", "domain=casino.example"]);
    let _alice = connect(&daemon, &topo.alice, "alice");
    let (st, answers) = dig_ready(&topo.alice, RESOLVER, "casino.example");
    assert_eq!(
        (st.as_str(), answers),
        ("NOERROR", vec!["0.0.0.0".to_string()])
    );
    let (st, answers) = dig(&topo.alice, RESOLVER, "www.casino.example", "AAAA", &[]);
    assert_eq!((st.as_str(), answers), ("NOERROR", vec!["::".to_string()]));

    api(&daemon, &["dns", "set_dry_run", "enabled=true"]);
    daemon.kill9();
    daemon.restart();
    assert_eq!(
        api(&daemon, &["dns", "status"])["resolver"]["dry_run"],
        true
    );
    let (st, answers) = dig_ready(&topo.alice, RESOLVER, "casino.example");
    assert_eq!(
        (st.as_str(), answers),
        ("NOERROR", vec![CASINO.to_string()])
    );
}

/// `dig` with `extra` options: (the header's flags, the OPT record's flags), e.g.
/// (`qr rd ra cd`, `do`).
fn dig_flags(ns: &NetNs, server: &str, name: &str, extra: &[&str]) -> (String, String) {
    let out = ns
        .command("dig")
        .arg(format!("@{server}"))
        .args([name, "A", "+tries=1", "+time=2"])
        .args(extra)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let after = |marker: &str| {
        text.lines()
            .find_map(|l| l.split(marker).nth(1))
            .map(|rest| {
                rest.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            })
            .unwrap_or_else(|| panic!("no {marker:?} in:\n{text}"))
    };
    (after(";; flags: "), after("; EDNS: version: 0, flags:"))
}

fn cache_counts(daemon: &Daemon) -> (u64, u64) {
    let st = api(daemon, &["dns", "status"]);
    let cache = &st["resolver"]["cache"];
    (
        cache["hits"].as_u64().unwrap(),
        cache["misses"].as_u64().unwrap(),
    )
}

#[test]
fn dnssec_ok_and_checking_disabled_queries_are_cached_apart() {
    if !require_root("dnssec_ok_and_checking_disabled_queries_are_cached_apart") {
        return;
    }
    let started = Instant::now();
    let topo = Topology::new();
    let _upstream = topo.dnsmasq();
    let bpffs = BpffsDir::new();
    let daemon = topo.start(&bpffs, &resolver_section(""));
    let _alice = connect(&daemon, &topo.alice, "alice");
    // A plain query (EDNS without DO, dig's default) fills the cache.
    assert_eq!(
        dig_ready(&topo.alice, RESOLVER, "fine.example").0,
        "NOERROR"
    );
    let (hits, misses) = cache_counts(&daemon);

    // DO: not the plain answer from the cache, but its own from the upstream, with DO back.
    let (_, edns) = dig_flags(&topo.alice, RESOLVER, "fine.example", &["+dnssec"]);
    assert_eq!(edns, "do", "a DO query's answer");
    assert_eq!(
        cache_counts(&daemon),
        (hits, misses + 1),
        "a DO query is a miss"
    );
    // Each kind is then served from its own entry.
    let (_, edns) = dig_flags(&topo.alice, RESOLVER, "fine.example", &[]);
    assert_eq!(edns, "", "a plain query's answer has no DO");
    let (_, edns) = dig_flags(&topo.alice, RESOLVER, "fine.example", &["+dnssec"]);
    assert_eq!(edns, "do");
    assert_eq!(cache_counts(&daemon), (hits + 2, misses + 1), "two hits");

    // CD likewise: its own entry, CD in the answer.
    let (flags, _) = dig_flags(&topo.alice, RESOLVER, "fine.example", &["+cd"]);
    assert!(flags.split(' ').any(|f| f == "cd"), "{flags}");
    let (flags, _) = dig_flags(&topo.alice, RESOLVER, "fine.example", &["+cd"]);
    assert!(flags.split(' ').any(|f| f == "cd"), "{flags}");
    let (flags, _) = dig_flags(&topo.alice, RESOLVER, "fine.example", &[]);
    assert!(!flags.split(' ').any(|f| f == "cd"), "{flags}");
    assert_eq!(
        cache_counts(&daemon),
        (hits + 4, misses + 2),
        "the CD query missed once, then hit; the plain one hit"
    );
    let st = api(&daemon, &["dns", "status"]);
    assert_eq!(st["resolver"]["cache"]["entries"], 3, "{st}");
    eprintln!("test took {:?}", started.elapsed());
}

/// `dig @server name qtype` from `ns`: the whole printed answer.
fn dig_text(ns: &NetNs, server: &str, name: &str, qtype: &str) -> String {
    let out = ns
        .command("dig")
        .arg(format!("@{server}"))
        .args([name, qtype, "+tries=1", "+time=2"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bypass_names_and_ech_keep_clients_on_the_resolver() {
    if !require_root("bypass_names_and_ech_keep_clients_on_the_resolver") {
        return;
    }
    let topo = Topology::new();
    // The upstream answers every special name, so each refusal below is the resolver's.
    let options = DnsmasqOptions {
        args: vec![
            // HTTPS 1 . alpn="h2" ech=3q2+7w==
            "--dns-rr=ech.example,65,0001000001000302683200050004deadbeef".into(),
            // SVCB 1 dot.example. alpn="dot": a designated DoT resolver.
            "--dns-rr=_dns.resolver.arpa,64,000103646f74076578616d706c65000001000403646f74".into(),
        ],
        ..DnsmasqOptions::default()
    };
    let _upstream = dnsmasq_with(
        &topo.upstream,
        &[UPSTREAM],
        &[
            "fine.example,203.0.113.105",
            "use-application-dns.net,203.0.113.150",
            "mask.icloud.com,203.0.113.151",
            "mask-h2.icloud.com,203.0.113.152",
        ],
        "fine.example",
        &options,
    );
    let bpffs = BpffsDir::new();
    let daemon = topo.start(&bpffs, &resolver_section(""));
    let _alice = connect(&daemon, &topo.alice, "alice");
    assert_eq!(
        dig_ready(&topo.alice, RESOLVER, "fine.example").0,
        "NOERROR"
    );

    // The set-up is real: asked directly, the upstream answers every one of them.
    assert_eq!(
        status(&topo.server, UPSTREAM, "use-application-dns.net"),
        "NOERROR"
    );
    let direct = dig_text(&topo.server, UPSTREAM, "ech.example", "HTTPS");
    assert!(direct.contains("ech="), "{direct}");
    let direct = dig_text(&topo.server, UPSTREAM, "_dns.resolver.arpa", "SVCB");
    assert!(direct.contains("dot.example"), "{direct}");

    // Through the tunnel, to Phantom's resolver.
    assert_eq!(
        status(&topo.alice, RESOLVER, "use-application-dns.net"),
        "NXDOMAIN"
    );
    assert_eq!(status(&topo.alice, RESOLVER, "mask.icloud.com"), "NXDOMAIN");
    assert_eq!(
        dig(&topo.alice, RESOLVER, "mask-h2.icloud.com", "AAAA", &[]).0,
        "NXDOMAIN"
    );
    let ddr = dig_text(&topo.alice, RESOLVER, "_dns.resolver.arpa", "SVCB");
    assert!(
        ddr.contains("status: NOERROR") && ddr.contains("ANSWER: 0"),
        "DDR designates nothing:\n{ddr}"
    );
    for _ in 0..2 {
        // The second answer comes from the cache, stripped as well.
        let https = dig_text(&topo.alice, RESOLVER, "ech.example", "HTTPS");
        assert!(https.contains("status: NOERROR"), "{https}");
        assert!(
            https.contains("alpn=\"h2\""),
            "the rest of the record stays:\n{https}"
        );
        assert!(!https.contains("ech="), "ECH removed:\n{https}");
    }

    // Dry run answers them normally, as it does blocked names.
    api(&daemon, &["dns", "set_dry_run", "enabled=true"]);
    assert_eq!(
        status(&topo.alice, RESOLVER, "use-application-dns.net"),
        "NOERROR"
    );
    api(&daemon, &["dns", "set_dry_run", "enabled=false"]);

    let st = api(&daemon, &["dns", "stats"]);
    let bypass = &st["bypass"];
    assert_eq!(bypass["firefox_canary"], 1, "{st}");
    assert_eq!(bypass["private_relay"], 2, "{st}");
    assert_eq!(bypass["ddr"], 1, "{st}");
    assert_eq!(
        bypass["ech_stripped"], 1,
        "one upstream answer, then the cache: {st}"
    );
    let metrics = http_get(&topo.server, "127.0.0.1:9469", "/metrics");
    assert_eq!(
        metric_value(
            &metrics,
            "phantom_dns_bypass_answers_total{reason=\"private_relay\"}"
        ),
        Some(2.0)
    );
    let log = daemon.log();
    assert!(!log.contains("use-application-dns") && !log.contains("192.0.2.2"));
}

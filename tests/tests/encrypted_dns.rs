//! Encrypted DNS around the resolver, closed in the kernel (`tc_encrypted_dns` on the
//! WireGuard interface), through a real WireGuard client (wg-quick + wireguard-go) against a
//! real DoT and DoH server: dnsdist from Debian, on two addresses of an upstream namespace, one
//! of them listed as a DoH resolver. From the VPN client: `kdig +tls` fails, plain DNS to
//! Phantom answers; curl `--doh-url` to the listed address fails and to the unlisted one
//! resolves and fetches; UDP/853 (DoQ) and UDP/443 (HTTP/3) to the listed address never
//! arrive, UDP to another port does. From the server itself (not a VPN client) the same DoT
//! server answers: the set-up works and only clients are held. `dns status` and the metrics
//! count each kind by reason, with no address in them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    net::UdpSocket,
    path::Path,
    time::{Duration, Instant},
};

use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, NetNs, OneClient, Process, WgQuickClient, WireguardSettings,
    api, dig, dnsmasq, http_get, metric_value, require_root,
};

const VPN_SUBNET: &str = "198.51.100.0/24";
const RESOLVER: &str = "198.51.100.1";
const ENDPOINT: &str = OneClient::ENDPOINT;
/// dnsmasq: the resolver's upstream.
const UPSTREAM: &str = "203.0.113.53";
/// dnsdist, listed as a DoH resolver.
const LISTED: &str = "203.0.113.60";
/// dnsdist, not listed.
const UNLISTED: &str = "203.0.113.61";
/// What dnsdist answers every name with: the upstream namespace, where a web server listens.
const WEB: &str = "203.0.113.62";

/// The shared set-up, with this file's services' addresses on the upstream.
fn topology() -> OneClient {
    OneClient::new(&[UPSTREAM, LISTED, UNLISTED, WEB])
}

/// dnsdist serving DoT (853) and DoH (443, `/dns-query`) on both addresses, answering every
/// name with `WEB`.
fn dnsdist(ns: &NetNs, dir: &Path) -> Process {
    let made = rcgen::generate_simple_self_signed(vec![LISTED.into(), UNLISTED.into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let (cert, key) = (cert.display(), key.display());
    let mut conf = String::from(
        "setACL({\"0.0.0.0/0\", \"::/0\"})\nsetSecurityPollSuffix(\"\")\n\
         addAction(AllRule(), SpoofAction(\"203.0.113.62\"))\n",
    );
    for (i, a) in [LISTED, UNLISTED].iter().enumerate() {
        let local = if i == 0 { "setLocal" } else { "addLocal" };
        conf.push_str(&format!(
            "{local}(\"{a}:53\")\naddTLSLocal(\"{a}:853\", \"{cert}\", \"{key}\")\n\
             addDOHLocal(\"{a}:443\", \"{cert}\", \"{key}\", \"/dns-query\")\n"
        ));
    }
    let file = dir.join("dnsdist.lua");
    std::fs::write(&file, conf).unwrap();
    let process = Process::spawn(
        "dnsdist",
        ns.command("dnsdist")
            .args(["--supervised", "--disable-syslog", "-C"])
            .arg(&file),
    );
    // Up when its DoT port answers from inside its own namespace.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !kdig_tls(ns, LISTED) {
        assert!(Instant::now() < deadline, "dnsdist did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    process
}

/// `kdig +tls` to `server`: whether an answer came.
fn kdig_tls(ns: &NetNs, server: &str) -> bool {
    let out = ns
        .command("kdig")
        .args([
            &format!("@{server}"),
            "+tls",
            "+timeout=2",
            "+retry=0",
            "probe.example",
            "A",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("status: NOERROR")
}

/// curl resolving through DoH at `doh` and fetching from the answer: its exit code and body.
fn curl_doh(ns: &NetNs, doh: &str) -> (i32, String) {
    let out = ns
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "4",
            "--doh-insecure",
            "--doh-url",
            &format!("https://{doh}/dns-query"),
            "http://probe.example:8080/",
        ])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A tiny HTTP server in `ns` on `addr` (one fixed answer per connection).
fn web(ns: &NetNs, addr: &str) -> std::thread::JoinHandle<()> {
    let listener = ns.run({
        let addr = addr.to_string();
        move || std::net::TcpListener::bind(addr).unwrap()
    });
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in listener.incoming().flatten() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world",
            );
        }
    })
}

/// Sends one datagram from `from` to `to` and reports whether `listener` got it.
fn datagram_arrives(from: &NetNs, listener: &UdpSocket, to: &str) -> bool {
    let to = to.to_string();
    from.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"probe", to).unwrap();
    });
    listener
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut buf = [0u8; 64];
    listener.recv_from(&mut buf).is_ok()
}

fn packets(daemon: &Daemon, verdict: &str) -> u64 {
    let st = api(daemon, &["dns", "status"]);
    st["resolver"]["encrypted_dns"]["packets"][verdict]
        .as_u64()
        .unwrap_or_else(|| panic!("no {verdict} in {st}"))
}

#[test]
fn dot_doq_and_listed_doh_from_vpn_clients_are_dropped_in_the_kernel() {
    if !require_root("dot_doq_and_listed_doh_from_vpn_clients_are_dropped_in_the_kernel") {
        return;
    }
    let started = Instant::now();
    let topo = topology();
    let _upstream = dnsmasq(
        &topo.upstream,
        &[UPSTREAM],
        &["fine.example,203.0.113.105"],
        "fine.example",
    );
    let files = tempfile::tempdir().unwrap();
    let _dnsdist = dnsdist(&topo.upstream, files.path());
    let _web = web(&topo.upstream, &format!("{WEB}:8080"));
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new("a0", bpffs.path());
    config.wireguard = Some(WireguardSettings::new(VPN_SUBNET, ENDPOINT));
    // A DoH list the team follows (a file source here; http(s) sources take the same
    // checks as the blocklist's): nothing of ours on it yet.
    let team_list = files.path().join("team-doh.txt");
    std::fs::write(&team_list, "# the team's DoH resolvers\n192.0.2.250\n").unwrap();
    config.dns_section = format!(
        "listen = \"auto\"\nprimary = \"{UPSTREAM}\"\nsecondary = \"{UPSTREAM}\"\n\
         doh_resolvers = [\"{LISTED}/32\"]\ndoh_sync_interval_seconds = 0\n\
         [[dns.doh_sources]]\nname = \"team\"\nurl = \"{}\"\n",
        team_list.display()
    );
    let daemon = Daemon::start(&topo.server, &config);
    api(&daemon, &["core", "add_client", "client_name=alice"]);
    let export = api(&daemon, &["core", "export_client", "client_name=alice"]);
    let _alice = WgQuickClient::up(&topo.alice, export["config"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while dig(&topo.alice, RESOLVER, "fine.example", "A", &[]).0 != "NOERROR" {
        assert!(
            Instant::now() < deadline,
            "the resolver never answered alice"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let status = api(&daemon, &["dns", "status"]);
    let enc = &status["resolver"]["encrypted_dns"];
    assert_eq!(enc["drop_dot_doq"], true, "{status}");
    assert_eq!(enc["drop_doh"], true, "{status}");
    assert!(
        enc["doh_prefixes"]["ipv4"].as_u64().unwrap() > 40,
        "{status}"
    );
    assert!(
        !status.to_string().contains("198.51.100.2"),
        "no client address: {status}"
    );

    // The set-up is real: the DoT server answers the server itself, and alice reaches the
    // upstream namespace through the tunnel (plain DNS to dnsdist on port 53).
    assert!(kdig_tls(&topo.server, LISTED), "DoT from the server itself");
    assert_eq!(
        dig(&topo.alice, LISTED, "probe.example", "A", &[]).0,
        "NOERROR"
    );

    // DoT from the VPN client: dropped, to either address (port 853 is DoT wherever it goes).
    assert!(
        !kdig_tls(&topo.alice, LISTED),
        "DoT through the tunnel must fail"
    );
    assert!(
        !kdig_tls(&topo.alice, UNLISTED),
        "DoT through the tunnel must fail"
    );
    assert!(packets(&daemon, "dot_dropped") > 0);

    // DoH: the listed address is dropped (curl's DoH request times out, so the name never
    // resolves and nothing is fetched); the unlisted one resolves and the page comes back.
    let (code, body) = curl_doh(&topo.alice, LISTED);
    assert!(
        matches!(code, 6 | 28) && body.is_empty(),
        "DoH to a listed resolver must fail: exit {code}, {body:?}"
    );
    assert!(packets(&daemon, "doh_tcp_dropped") > 0);
    let (code, body) = curl_doh(&topo.alice, UNLISTED);
    assert_eq!((code, body.as_str()), (0, "hello world"));

    // The team's list now names the other resolver: after `dns sync_doh` it is held too. A
    // list that then arrives broken is rejected and the accepted one stays.
    let sources = &api(&daemon, &["dns", "status"])["resolver"]["encrypted_dns"]["doh_sources"];
    assert_eq!(sources[0]["prefixes"], 1, "synced at start: {sources}");
    std::fs::write(&team_list, format!("{UNLISTED}\n")).unwrap();
    let synced = api(&daemon, &["dns", "sync_doh"]);
    assert_eq!(
        synced["sources"][0]["error"],
        serde_json::Value::Null,
        "{synced}"
    );
    assert_eq!(synced["sources"][0]["prefixes"], 1, "{synced}");
    let (code, body) = curl_doh(&topo.alice, UNLISTED);
    assert!(
        matches!(code, 6 | 28) && body.is_empty(),
        "DoH to a synced resolver must fail: exit {code}, {body:?}"
    );
    std::fs::write(&team_list, "not an address\n").unwrap();
    let rejected = api(&daemon, &["dns", "sync_doh"]);
    let source = &rejected["sources"][0];
    assert!(
        source["error"].as_str().unwrap().contains("no usable"),
        "{rejected}"
    );
    assert_eq!(source["prefixes"], 1, "{rejected}");
    assert!(!curl_doh(&topo.alice, UNLISTED).1.contains("hello"));

    // DoQ (UDP/853) and HTTP/3 to the listed resolver (UDP/443) never arrive; UDP to another
    // port of the same address does.
    let listener = |port: u16| {
        topo.upstream
            .run(move || UdpSocket::bind(format!("{LISTED}:{port}")).unwrap())
    };
    let (doq, h3, other) = (listener(853), listener(443), listener(8853));
    assert!(datagram_arrives(
        &topo.alice,
        &other,
        &format!("{LISTED}:8853")
    ));
    assert!(!datagram_arrives(
        &topo.alice,
        &doq,
        &format!("{LISTED}:853")
    ));
    assert!(!datagram_arrives(
        &topo.alice,
        &h3,
        &format!("{LISTED}:443")
    ));
    assert!(packets(&daemon, "doq_dropped") > 0);
    assert!(packets(&daemon, "doh_udp_dropped") > 0);

    // The same counts in the per-layer summary: what each layer of the block stopped.
    let status = api(&daemon, &["dns", "status"]);
    let stopped = &status["resolver"]["stopped"];
    for layer in ["resolver", "kernel_answer_rewrite", "kernel_encrypted_dns"] {
        assert!(stopped[layer].is_object(), "{layer}: {stopped}");
    }
    assert_eq!(
        stopped["kernel_encrypted_dns"]["dot"].as_u64(),
        Some(packets(&daemon, "dot_dropped")),
        "{stopped}"
    );
    let metrics = http_get(&topo.server, "127.0.0.1:9469", "/metrics");
    let dot = metric_value(
        &metrics,
        "phantom_dns_stopped_total{layer=\"kernel_encrypted_dns\",reason=\"dot\"}",
    );
    assert!(dot.is_some_and(|v| v > 0.0), "{dot:?}");
    for verdict in [
        "dot_dropped",
        "doq_dropped",
        "doh_tcp_dropped",
        "doh_udp_dropped",
    ] {
        let v = metric_value(
            &metrics,
            &format!("phantom_datapath_encrypted_dns_packets_total{{verdict=\"{verdict}\"}}"),
        );
        assert!(v.is_some_and(|v| v > 0.0), "{verdict}: {v:?}");
    }
    eprintln!(
        "dot_doq_and_listed_doh_from_vpn_clients_are_dropped_in_the_kernel: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

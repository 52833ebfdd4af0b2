//! Server names in TLS ClientHellos, read in the kernel (`tc_encrypted_dns` on the WireGuard
//! interface), through a real WireGuard client (wg-quick + wireguard-go). From the VPN client:
//! curl https to `openssl s_server` with an allowed name fetches the page, with a blocked name
//! (`blocklist add`) fails; a hand-built ClientHello for a subdomain of the blocked name, in
//! capitals, never reaches a TCP listener while one for an allowed name does; in dry run, or
//! for a client with blocking off, it does (and is counted so). Then in strict
//! mode (`[dns] sni_strict`, after a restart): UDP/443 (QUIC) never arrives, UDP to another
//! port does; a ClientHello with `encrypted_client_hello` to a shipped ECH front name never
//! arrives, one with ECH to another name or without ECH to the front name does. `dns status`
//! and the metrics count each verdict, with no address and no name in them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    path::Path,
    sync::mpsc,
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
/// `openssl s_server -www`.
const TLS: &str = "203.0.113.70";
/// Raw TCP and UDP listeners on port 443 that report what arrives.
const RAW: &str = "203.0.113.71";
const BLOCKED: &str = "casino-sni.example";
const ALLOWED: &str = "fine-sni.example";
/// In the shipped ECH front list (daemon/data/ech-fronts.txt).
const ECH_FRONT: &str = "cloudflare-ech.com";

/// The shared set-up, with this file's services' addresses on the upstream.
fn topology() -> OneClient {
    OneClient::new(&[UPSTREAM, TLS, RAW])
}

/// `openssl s_server -www` on `TLS:443` with a self-signed certificate for both names.
fn s_server(ns: &NetNs, dir: &Path) -> Process {
    let made = rcgen::generate_simple_self_signed(vec![BLOCKED.into(), ALLOWED.into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let process = Process::spawn(
        "openssl s_server",
        ns.command("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("{TLS}:443"))
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ns.run(|| TcpStream::connect(format!("{TLS}:443")).is_ok()) {
        assert!(Instant::now() < deadline, "s_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    process
}

/// curl https://`name`/ resolved to `TLS`, certificate unchecked: exit code and body.
fn curl(ns: &NetNs, name: &str) -> (i32, String) {
    let out = ns
        .command("curl")
        .args([
            "-sS",
            "-k",
            "--max-time",
            "4",
            "--resolve",
            &format!("{name}:443:{TLS}"),
            &format!("https://{name}/"),
        ])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A TLS 1.2/1.3 ClientHello record for `name`, with an `encrypted_client_hello` extension
/// (outer, a made-up payload) when `ech` is set.
fn client_hello(name: &str, ech: bool) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, ty: u16, data: &[u8]) {
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
    }
    let mut exts = Vec::new();
    // A GREASE extension and supported_groups before the name, as browsers send.
    ext(&mut exts, 0x0a0a, &[]);
    ext(&mut exts, 0x000a, &[0, 4, 0, 0x1d, 0, 0x17]);
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name.as_bytes());
    ext(&mut exts, 0x0000, &sni);
    ext(&mut exts, 0x000d, &[0, 4, 0x04, 0x03, 0x08, 0x04]);
    if ech {
        // outer, HPKE suite, config id, enc, payload.
        let mut e = vec![0, 0, 1, 0, 1, 0x42, 0, 32];
        e.extend_from_slice(&[7; 32]);
        e.extend_from_slice(&[0, 64]);
        e.extend_from_slice(&[9; 64]);
        ext(&mut exts, 0xfe0d, &e);
    }
    ext(&mut exts, 0x002b, &[4, 0x03, 0x04, 0x03, 0x03]);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0x5a; 32]);
    body.push(32);
    body.extend_from_slice(&[0x33; 32]);
    body.extend_from_slice(&[0, 6, 0x13, 0x01, 0xc0, 0x2b, 0xc0, 0x2f]);
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![0x01, 0];
    hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

/// A TCP listener on `RAW:443` that reports, per connection, how many bytes came within 2 s.
fn raw_tcp(ns: &NetNs) -> mpsc::Receiver<usize> {
    let listener = ns.run(|| TcpListener::bind(format!("{RAW}:443")).unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 2048];
            let n = s.read(&mut buf).unwrap_or(0);
            if tx.send(n).is_err() {
                return;
            }
        }
    });
    rx
}

/// Sends `hello` over a new TCP connection from `from` to `RAW:443`: whether it arrived.
fn hello_arrives(from: &NetNs, arrivals: &mpsc::Receiver<usize>, hello: Vec<u8>) -> bool {
    let stream = from.run(move || {
        let mut s = TcpStream::connect_timeout(
            &format!("{RAW}:443").parse().unwrap(),
            Duration::from_secs(3),
        )
        .unwrap();
        s.write_all(&hello).unwrap();
        s
    });
    let n = arrivals.recv_timeout(Duration::from_secs(5)).unwrap();
    drop(stream);
    n > 0
}

/// Sends one datagram from `from` to `to` and reports whether `listener` got it.
fn datagram_arrives(from: &NetNs, listener: &UdpSocket, to: &str) -> bool {
    let to = to.to_string();
    from.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"quic-ish", to).unwrap();
    });
    listener
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut buf = [0u8; 64];
    listener.recv_from(&mut buf).is_ok()
}

fn packets(daemon: &Daemon, verdict: &str) -> u64 {
    let st = api(daemon, &["dns", "status"]);
    st["resolver"]["sni"]["packets"][verdict]
        .as_u64()
        .unwrap_or_else(|| panic!("no {verdict} in {st}"))
}

fn wait_for_resolver(alice: &NetNs) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while dig(alice, RESOLVER, "fine.example", "A", &[]).0 != "NOERROR" {
        assert!(
            Instant::now() < deadline,
            "the resolver never answered alice"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn client_hellos_with_blocked_names_quic_and_ech_fronts_are_dropped_in_the_kernel() {
    if !require_root(
        "client_hellos_with_blocked_names_quic_and_ech_fronts_are_dropped_in_the_kernel",
    ) {
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
    let tls = s_server(&topo.upstream, files.path());
    let arrivals = raw_tcp(&topo.upstream);
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new("a0", bpffs.path());
    config.wireguard = Some(WireguardSettings::new(VPN_SUBNET, ENDPOINT));
    config.dns_section = format!(
        "listen = \"auto\"\nprimary = \"{UPSTREAM}\"\nsecondary = \"{UPSTREAM}\"\n\
         sni_strict = false\n"
    );
    let mut daemon = Daemon::start(&topo.server, &config);
    api(&daemon, &["core", "add_client", "client_name=alice"]);
    let export = api(&daemon, &["core", "export_client", "client_name=alice"]);
    let _alice = WgQuickClient::up(&topo.alice, export["config"].as_str().unwrap());
    wait_for_resolver(&topo.alice);
    api(&daemon, &["blocklist", "add", &format!("domain={BLOCKED}")]);
    let status = api(&daemon, &["dns", "status"]);
    let sni = &status["resolver"]["sni"];
    assert_eq!(sni["filter"], true, "{status}");
    assert_eq!(sni["strict"], false, "{status}");

    // The allowed name fetches s_server's page; the blocked one never gets a ServerHello.
    let (code, body) = curl(&topo.alice, ALLOWED);
    assert_eq!(code, 0, "curl to an allowed name: {body}");
    assert!(body.contains("s_server"), "{body}");
    assert!(packets(&daemon, "passed") > 0);
    let (code, body) = curl(&topo.alice, BLOCKED);
    assert!(
        matches!(code, 28 | 35) && body.is_empty(),
        "curl to a blocked name must fail: exit {code}, {body:?}"
    );
    assert!(packets(&daemon, "blocked_dropped") > 0);
    // s_server serves one connection at a time and now waits for a ClientHello that never
    // comes; it is not needed again.
    drop(tls);

    // The kernel matches as the DNS filter does: a subdomain, case folded.
    assert!(hello_arrives(
        &topo.alice,
        &arrivals,
        client_hello(ALLOWED, false)
    ));
    assert!(!hello_arrives(
        &topo.alice,
        &arrivals,
        client_hello(&format!("WWW.{}", BLOCKED.to_uppercase()), false)
    ));
    // The DNS filter's policy holds here too: dry run counts and passes, and so does a client
    // with blocking switched off; back on, the name is dropped again.
    let blocked_hello = || client_hello(&format!("www.{BLOCKED}"), false);
    api(&daemon, &["dns", "set_dry_run", "enabled=true"]);
    assert!(hello_arrives(&topo.alice, &arrivals, blocked_hello()));
    assert!(packets(&daemon, "dry_run") > 0);
    api(&daemon, &["dns", "set_dry_run", "enabled=false"]);
    api(
        &daemon,
        &[
            "dns",
            "set_client_policy",
            "client_name=alice",
            "blocking=false",
        ],
    );
    assert!(hello_arrives(&topo.alice, &arrivals, blocked_hello()));
    assert!(packets(&daemon, "exempt_client") > 0);
    api(
        &daemon,
        &[
            "dns",
            "set_client_policy",
            "client_name=alice",
            "blocking=true",
        ],
    );
    assert!(!hello_arrives(&topo.alice, &arrivals, blocked_hello()));

    // Without strict mode, QUIC and ECH pass.
    let quic = topo
        .upstream
        .run(|| UdpSocket::bind(format!("{RAW}:443")).unwrap());
    let other = topo
        .upstream
        .run(|| UdpSocket::bind(format!("{RAW}:8443")).unwrap());
    assert!(datagram_arrives(&topo.alice, &quic, &format!("{RAW}:443")));
    assert!(hello_arrives(
        &topo.alice,
        &arrivals,
        client_hello(ECH_FRONT, true)
    ));

    // Strict mode.
    daemon.edit_config("sni_strict = false", "sni_strict = true");
    daemon.stop();
    daemon.restart();
    wait_for_resolver(&topo.alice);
    let status = api(&daemon, &["dns", "status"]);
    let sni = &status["resolver"]["sni"];
    assert_eq!(sni["strict"], true, "{status}");
    assert!(sni["ech_fronts"].as_u64().unwrap() >= 1, "{status}");
    assert!(datagram_arrives(
        &topo.alice,
        &other,
        &format!("{RAW}:8443")
    ));
    assert!(!datagram_arrives(&topo.alice, &quic, &format!("{RAW}:443")));
    assert!(packets(&daemon, "quic_dropped") > 0);
    assert!(!hello_arrives(
        &topo.alice,
        &arrivals,
        client_hello(ECH_FRONT, true)
    ));
    assert!(packets(&daemon, "ech_dropped") > 0);
    assert!(hello_arrives(
        &topo.alice,
        &arrivals,
        client_hello(ALLOWED, true)
    ));
    assert!(hello_arrives(
        &topo.alice,
        &arrivals,
        client_hello(ECH_FRONT, false)
    ));

    // Counted without a client address or a name.
    let status = api(&daemon, &["dns", "status"]).to_string();
    for secret in ["198.51.100.2", BLOCKED, ALLOWED, ECH_FRONT] {
        assert!(!status.contains(secret), "{secret} in {status}");
    }
    let metrics = http_get(&topo.server, "127.0.0.1:9469", "/metrics");
    for verdict in ["passed", "blocked_dropped", "ech_dropped", "quic_dropped"] {
        let v = metric_value(
            &metrics,
            &format!("phantom_datapath_sni_packets_total{{verdict=\"{verdict}\"}}"),
        );
        assert!(v.is_some_and(|v| v > 0.0), "{verdict}: {v:?}");
    }
    eprintln!(
        "client_hellos_with_blocked_names_quic_and_ech_fronts_are_dropped_in_the_kernel: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

//! The resolver's answers, byte for byte: a fixed sequence of queries (forwarded, then the same
//! from the cache, blocked, truncated, the bypass names, malformed) over UDP and TCP to the
//! real daemon, whose upstream is a real dnsmasq, compared with the answers recorded in
//! `tests/data/resolver_answers.txt`. Work on the resolver's hot path must not change a byte
//! of what clients get.
//!
//! `PHANTOM_RECORD_ANSWERS=1` writes the file instead of comparing (done once on the code the
//! recording stands for; the file is committed).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a failed test

use std::{
    io::{Read, Write},
    net::{TcpStream, UdpSocket},
    path::{Path, PathBuf},
    time::Duration,
};

use phantom_tests::{Daemon, DaemonConfig, DnsmasqOptions, NetNs, api, dnsmasq_with, require_root};

const UPSTREAM: &str = "127.0.0.2";
const RESOLVER: &str = "127.0.0.4:53";

/// How a query is sent.
#[derive(Clone, Copy)]
enum Via {
    Udp,
    Tcp,
}

/// One recorded query.
struct Case {
    label: &'static str,
    via: Via,
    query: Vec<u8>,
}

const A: u16 = 1;
const MX: u16 = 15;
const TXT: u16 = 16;
const AAAA: u16 = 28;

/// A query as a stub resolver writes it: RD set, one question, an OPT record with `edns`
/// (UDP size, DO) when given, CD when `cd`.
fn query(id: u16, name: &str, qtype: u16, edns: Option<(u16, bool)>, cd: bool) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&id.to_be_bytes());
    b.push(0x01);
    b.push(if cd { 0x10 } else { 0 });
    b.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        b.push(label.len() as u8);
        b.extend_from_slice(label.as_bytes());
    }
    b.push(0);
    b.extend_from_slice(&qtype.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes());
    if let Some((size, dnssec_ok)) = edns {
        b.push(0);
        b.extend_from_slice(&41u16.to_be_bytes());
        b.extend_from_slice(&size.to_be_bytes());
        b.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
    }
    b
}

/// The sequence: each cached case follows the query that filled the cache, within the same
/// second, so the TTLs it carries are the upstream's.
fn cases() -> Vec<Case> {
    let udp = |label, query| Case {
        label,
        via: Via::Udp,
        query,
    };
    let tcp = |label, query| Case {
        label,
        via: Via::Tcp,
        query,
    };
    let mut two_questions = query(0x0a0a, "host1.example.org", A, None, false);
    two_questions[5] = 2;
    let mut long_label = query(0x0b0b, "host1.example.org", A, None, false);
    long_label[12] = 64;
    vec![
        udp(
            "forwarded A",
            query(0x1001, "host1.example.org", A, None, false),
        ),
        udp(
            "cached A, other ID and letter case",
            query(0x1002, "HoSt1.ExAmPlE.oRg", A, None, false),
        ),
        udp(
            "forwarded A with EDNS",
            query(0x1003, "host1.example.org", A, Some((1232, false)), false),
        ),
        udp(
            "cached A with EDNS",
            query(0x1004, "host1.example.org", A, Some((1232, false)), false),
        ),
        udp(
            "forwarded A with EDNS, DO and CD",
            query(0x1005, "host2.example.org", A, Some((4096, true)), true),
        ),
        udp(
            "cached A with EDNS, DO and CD",
            query(0x1006, "HOST2.example.org", A, Some((4096, true)), true),
        ),
        udp(
            "forwarded AAAA without data",
            query(0x1007, "host1.example.org", AAAA, None, false),
        ),
        udp(
            "forwarded name the upstream refuses",
            query(0x1008, "elsewhere.example.net", A, None, false),
        ),
        udp("blocked A", query(0x2001, "casino.example", A, None, false)),
        udp(
            "blocked subdomain AAAA with EDNS and DO",
            query(
                0x2002,
                "WWW.Casino.example",
                AAAA,
                Some((1232, true)),
                false,
            ),
        ),
        udp(
            "blocked MX",
            query(0x2003, "casino.example", MX, Some((512, false)), false),
        ),
        udp(
            "truncated (forwarded, fetched over TCP)",
            query(0x3001, "big.example.org", TXT, None, false),
        ),
        udp(
            "truncated (cached)",
            query(0x3002, "big.example.org", TXT, None, false),
        ),
        udp(
            "large answer that fits the EDNS size",
            query(0x3003, "big.example.org", TXT, Some((4096, false)), false),
        ),
        udp(
            "large answer cached, EDNS",
            query(0x3004, "big.example.org", TXT, Some((4096, false)), false),
        ),
        udp(
            "large answer cached, EDNS size too small",
            query(0x3005, "big.example.org", TXT, Some((512, false)), false),
        ),
        udp(
            "Firefox canary",
            query(0x4001, "use-application-dns.net", A, None, false),
        ),
        udp("two questions (NOTIMP)", two_questions),
        udp("label over 63 (FORMERR)", long_label),
        tcp(
            "cached A over TCP",
            query(0x5001, "host1.example.org", A, None, false),
        ),
        tcp(
            "blocked A over TCP",
            query(0x5002, "casino.example", A, Some((1232, false)), false),
        ),
        tcp(
            "large answer over TCP",
            query(0x5003, "big.example.org", TXT, None, false),
        ),
        tcp(
            "forwarded over TCP",
            query(0x5004, "host3.example.org", A, None, false),
        ),
    ]
}

fn ask(ns: &NetNs, via: Via, query: &[u8]) -> Vec<u8> {
    let query = query.to_vec();
    ns.run(move || match via {
        Via::Udp => {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            sock.send_to(&query, RESOLVER).unwrap();
            let mut buf = vec![0u8; 65536];
            let n = sock.recv(&mut buf).expect("an answer over UDP");
            buf.truncate(n);
            buf
        }
        Via::Tcp => {
            let mut s = TcpStream::connect(RESOLVER).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut framed = (query.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&query);
            s.write_all(&framed).unwrap();
            let mut len = [0u8; 2];
            s.read_exact(&mut len).unwrap();
            let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut buf).unwrap();
            buf
        }
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn recording() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/resolver_answers.txt")
}

#[test]
fn resolver_answers_are_byte_identical_to_the_recording() {
    if !require_root("resolver_answers_are_byte_identical_to_the_recording") {
        return;
    }
    let ns = NetNs::new("phansw");
    // A TXT record of 8 strings of 200 bytes: over 512 (truncated without EDNS), under 4096.
    let big: Vec<String> = (0..8).map(|i| format!("{i}{}", "x".repeat(199))).collect();
    let _upstream = dnsmasq_with(
        &ns,
        &[UPSTREAM],
        &[],
        "probe.example.org",
        &DnsmasqOptions {
            local_ttl: Some(3600),
            args: vec![
                "--address=/example.org/192.0.2.10".into(),
                format!("--txt-record=big.example.org,{}", big.join(",")),
            ],
            ..DnsmasqOptions::default()
        },
    );
    let mut config = DaemonConfig::new("lo", Path::new("/nonexistent"));
    config.datapath_enabled = false;
    config.metrics_listen = "off".into();
    config.dns_section =
        format!("listen = \"{RESOLVER}\"\nprimary = \"{UPSTREAM}\"\nsecondary = \"{UPSTREAM}\"\n");
    let daemon = Daemon::start(&ns, &config);
    api(&daemon, &["blocklist", "add", "domain=casino.example"]);
    // The listener comes up within the supervisor's first tick.
    let probe = query(0x0001, "casino.example", A, None, false);
    let mut ready = false;
    for _ in 0..50 {
        let p = probe.clone();
        let answered = ns.run(move || {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            sock.send_to(&p, RESOLVER).unwrap();
            sock.recv(&mut [0u8; 512]).is_ok()
        });
        if answered {
            ready = true;
            break;
        }
    }
    assert!(ready, "the resolver did not answer");

    let got: Vec<(Case, Vec<u8>)> = cases()
        .into_iter()
        .map(|c| {
            let answer = ask(&ns, c.via, &c.query);
            (c, answer)
        })
        .collect();
    let text: String = got
        .iter()
        .map(|(c, a)| format!("{}\t{}\t{}\n", c.label, hex(&c.query), hex(a)))
        .collect();
    if std::env::var_os("PHANTOM_RECORD_ANSWERS").is_some() {
        std::fs::create_dir_all(recording().parent().unwrap()).unwrap();
        std::fs::write(recording(), &text).unwrap();
        return;
    }
    let recorded = std::fs::read_to_string(recording()).unwrap();
    let recorded: Vec<&str> = recorded.lines().collect();
    assert_eq!(recorded.len(), got.len(), "the recording has every case");
    for (line, (c, answer)) in recorded.iter().zip(&got) {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields[0], c.label, "the recording's order");
        assert_eq!(fields[1], hex(&c.query), "{}: the query", c.label);
        assert_eq!(
            fields[2],
            hex(answer),
            "{}: the answer differs from the recording",
            c.label
        );
    }
}

//! The public blocklist API end to end: full list, deltas with removals, ETag/304, gzip, the
//! checksum, the units of `version`/`lastUpdated`/`addedAt`, the 500 body with `retryAfter`,
//! verify-domain, health, rate limiting, and no client address or domain in the logs;
//! a burst of full-list downloads of a large list served from one shared body per encoding.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a failed test

use std::{
    io::Read,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use phantom_tests::{BpffsDir, Daemon, DaemonConfig, GuardedLink, api, require_root, wstunnel};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
};

/// `curl` from the peer namespace to the server's API; returns (status, headers, body).
fn curl(link: &GuardedLink, args: &[&str]) -> (u16, String, String) {
    let out = link
        .peer
        .command("curl")
        .args(["-s", "-D", "/dev/stderr", "--max-time", "5"])
        .args(args)
        .output()
        .unwrap();
    let headers = String::from_utf8_lossy(&out.stderr).into_owned();
    let status = headers
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        headers,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

const BASE: &str = "http://192.0.2.1:3000";

fn checksum(body: &Value) -> String {
    let mut h = Sha256::new();
    let mut entries: Vec<&Value> = body["entries"].as_array().unwrap().iter().collect();
    entries.sort_by_key(|e| e["domain"].as_str().unwrap().to_string());
    for e in entries {
        h.update(serde_json::to_vec(e).unwrap());
        h.update(b"\n");
    }
    let mut patterns: Vec<&Value> = body["patterns"].as_array().unwrap().iter().collect();
    patterns.sort_by_key(|p| {
        (
            p["type"].as_str().unwrap().to_string(),
            p["pattern"].as_str().unwrap().to_string(),
        )
    });
    for p in patterns {
        h.update(serde_json::to_vec(p).unwrap());
        h.update(b"\n");
    }
    format!(
        "sha256:{}",
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

#[test]
fn public_api_serves_full_lists_deltas_and_verification() {
    if !require_root("public_api_serves_full_lists_deltas_and_verification") {
        return;
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path());
    config.blocklist_api = Some("0.0.0.0:3000".into());
    // The first delta fails inside the daemon: the seed's 500 body, then a retry succeeds.
    config
        .env
        .push(("PHANTOM_FAIL_AT".into(), "blocklist_api.delta".into()));
    let daemon = Daemon::start(&link.server, &config);

    for d in ["one-bet.example", "two-bet.example", "three-bet.example"] {
        api(&daemon, &["blocklist", "add", &format!("domain={d}")]);
    }
    api(
        &daemon,
        &[
            "blocklist",
            "add_pattern",
            "pattern=^jg0\\d{3}\\.com$",
            "type=regex",
            "weight=0.8",
        ],
    );
    let (status, headers, body) = curl(&link, &[&format!("{BASE}/api/v1/blocklist")]);
    assert_eq!(status, 200, "{headers}");
    let full: Value = serde_json::from_str(&body).unwrap();
    let v1 = full["version"].as_u64().unwrap();
    assert_eq!(full["delta"], false);
    assert_eq!(full["entries"].as_array().unwrap().len(), 3);
    assert!(
        headers
            .to_ascii_lowercase()
            .contains(&format!("etag: \"v{v1}\"")),
        "{headers}"
    );
    assert_eq!(
        full["checksum"].as_str().unwrap(),
        checksum(&full),
        "the checksum verifies"
    );
    assert_eq!(full["entries"][0]["patterns"][1]["type"], "subdomain");
    // Units: `lastUpdated` and `addedAt` are Unix seconds; `version` is the change's time in
    // milliseconds (kept unique and increasing), so `lastUpdated` is `version / 1000`.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let last_updated = full["lastUpdated"].as_u64().unwrap();
    assert_eq!(last_updated, v1 / 1000, "{full}");
    assert!(last_updated <= now && now - last_updated < 120, "{full}");
    for entry in full["entries"].as_array().unwrap() {
        let added = entry["addedAt"].as_u64().unwrap();
        assert!(
            added <= last_updated && last_updated - added < 120,
            "addedAt in the same unit as lastUpdated: {entry}"
        );
    }

    // Add three (one of them later removed) and remove one: the delta says exactly that.
    api(&daemon, &["blocklist", "add", "domain=four-bet.example"]);
    api(&daemon, &["blocklist", "add", "domain=five-bet.example"]);
    api(&daemon, &["blocklist", "add", "domain=six-bet.example"]);
    api(&daemon, &["blocklist", "remove", "domain=two-bet.example"]);
    api(&daemon, &["blocklist", "remove", "domain=six-bet.example"]);
    let (status, headers, body) = curl(&link, &[&format!("{BASE}/api/v1/blocklist?version={v1}")]);
    assert_eq!(status, 500, "{headers}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        serde_json::json!({"success": false, "error": "internal error", "retryAfter": 60})
    );
    assert!(
        headers.to_ascii_lowercase().contains("retry-after: 60"),
        "{headers}"
    );
    let (status, _, body) = curl(&link, &[&format!("{BASE}/api/v1/blocklist?version={v1}")]);
    assert_eq!(status, 200);
    let delta: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(delta["delta"], true);
    let added: Vec<&str> = delta["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["domain"].as_str().unwrap())
        .collect();
    assert_eq!(added, vec!["five-bet.example", "four-bet.example"]);
    assert_eq!(
        delta["removed"],
        serde_json::json!(["six-bet.example", "two-bet.example"])
    );
    let v2 = delta["version"].as_u64().unwrap();
    assert!(v2 > v1);
    assert_eq!(delta["lastUpdated"].as_u64(), Some(v2 / 1000), "{delta}");
    assert_eq!(
        api(&daemon, &["blocklist", "status"])["checksum"],
        delta["checksum"]
    );

    // Current: 304, by ETag or by version.
    let (status, _, _) = curl(
        &link,
        &[
            "-H",
            &format!("If-None-Match: \"v{v2}\""),
            &format!("{BASE}/api/v1/blocklist"),
        ],
    );
    assert_eq!(status, 304);
    let (status, _, _) = curl(&link, &[&format!("{BASE}/api/v1/blocklist?version={v2}")]);
    assert_eq!(status, 304);
    // format=full ignores the version.
    let (_, _, body) = curl(
        &link,
        &[&format!("{BASE}/api/v1/blocklist?version={v1}&format=full")],
    );
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["entries"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    // gzip when asked.
    let (status, headers, body) = curl(
        &link,
        &["--compressed", &format!("{BASE}/api/v1/blocklist")],
    );
    assert_eq!(status, 200);
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("content-encoding: gzip"),
        "{headers}"
    );
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["version"], v2);

    let (_, _, body) = curl(&link, &[&format!("{BASE}/api/v1/patterns")]);
    let patterns: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(patterns["patterns"][0]["type"], "regex");

    let secret = "www.one-bet.example";
    let (status, _, body) = curl(
        &link,
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            &format!("{{\"domain\":\"{secret}\"}}"),
            &format!("{BASE}/api/v1/verify-domain"),
        ],
    );
    assert_eq!(status, 200);
    let verdict: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (verdict["blocked"].as_bool(), verdict["confidence"].as_f64()),
        (Some(true), Some(1.0))
    );
    assert_eq!(
        verdict["matchedPatterns"][0]["pattern"],
        "*.one-bet.example"
    );
    let (_, _, body) = curl(
        &link,
        &[
            "-X",
            "POST",
            "-d",
            "{\"domain\":\"jg0123.com\"}",
            &format!("{BASE}/api/v1/verify-domain"),
        ],
    );
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["matchedPatterns"][0]["type"],
        "regex"
    );
    let (status, _, _) = curl(
        &link,
        &[
            "-X",
            "POST",
            "-d",
            "not json",
            &format!("{BASE}/api/v1/verify-domain"),
        ],
    );
    assert_eq!(status, 400);
    let (status, _, _) = curl(&link, &[&format!("{BASE}/api/v1/blocklist?version=abc")]);
    assert_eq!(status, 400);

    let (_, _, body) = curl(&link, &[&format!("{BASE}/health")]);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["blocklistCount"],
        4
    );

    // Rate limiting: a burst from one client ends in 429s.
    let mut limited = 0;
    for _ in 0..130 {
        let (status, _, _) = curl(&link, &[&format!("{BASE}/api/v1/patterns")]);
        if status == 429 {
            limited += 1;
        }
    }
    assert!(limited > 0, "burst limited");

    // Nothing about the client or what it asked is in the logs.
    let log = daemon.log();
    assert!(
        !log.contains(GuardedLink::PEER_V4),
        "client address logged:\n{log}"
    );
    assert!(!log.contains(secret), "queried domain logged:\n{log}");
}

/// The daemon's resident memory in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// One `GET` over a fresh connection from `source`: the status, the head, and the body, which
/// is either kept (`expected` is `None`) or compared as it arrives with `expected` (then only
/// whether it matched is returned, as an empty or a one-byte body).
async fn get_from(
    source: &str,
    path: &str,
    gzip: bool,
    expected: Option<&[u8]>,
) -> (u16, String, Vec<u8>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    let mut stream = socket
        .connect("192.0.2.1:3000".parse().unwrap())
        .await
        .unwrap();
    let accept = if gzip {
        "Accept-Encoding: gzip\r\n"
    } else {
        ""
    };
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 192.0.2.1\r\n{accept}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut raw = Vec::new();
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the head");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    let mut body = raw.split_off(head_end);
    let Some(expected) = expected else {
        stream.read_to_end(&mut body).await.unwrap();
        return (status, head, body);
    };
    let mut at = body.len();
    let mut same = expected.get(..at) == Some(&body[..]);
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        same = same && expected.get(at..at + n) == Some(&buf[..n]);
        at += n;
    }
    same = same && at == expected.len();
    (status, head, if same { vec![1] } else { Vec::new() })
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

const DOMAINS: usize = 200_000;
const BURST: usize = 64;

#[test]
fn a_burst_of_full_lists_shares_one_body_per_encoding_and_memory_stays_flat() {
    if !require_root("a_burst_of_full_lists_shares_one_body_per_encoding_and_memory_stays_flat") {
        return;
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path());
    // The kernel's share of the list is not under test; the API is.
    config.datapath_enabled = false;
    config.blocklist_api = Some("0.0.0.0:3000".into());
    let daemon = Daemon::start(&link.server, &config);
    let pid = daemon.pid().unwrap();
    // Sixteen sources for the burst: one source may have 4 full lists going at once.
    let sources: Vec<String> = (0..BURST / 4)
        .map(|i| format!("192.0.2.{}", 100 + i))
        .collect();
    for a in &sources {
        link.peer.ip(&[
            "addr",
            "add",
            &format!("{a}/24"),
            "dev",
            GuardedLink::PEER_DEV,
        ]);
    }

    // 200,000 domains through the socket, in one import.
    let file = daemon.dir().join("list.txt");
    let mut text = String::with_capacity(DOMAINS * 32);
    for i in 0..DOMAINS {
        text.push_str(&format!("casino{i}.bet{}.example\n", i % 997));
    }
    std::fs::write(&file, text).unwrap();
    let started = Instant::now();
    let imported = api(
        &daemon,
        &[
            "blocklist",
            "import",
            &format!("path={}", file.display()),
            "format=plain",
        ],
    );
    assert_eq!(imported["imported"], DOMAINS as u64, "{imported}");
    eprintln!("import of {DOMAINS} domains: {:?}", started.elapsed());

    // Idle: the list loaded, no full list asked for yet.
    std::thread::sleep(Duration::from_millis(500));
    let idle = rss_kib(pid);
    let peak = Arc::new(AtomicU64::new(idle));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (Arc::clone(&peak), Arc::clone(&sampling));
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let started = Instant::now();
    let (single_identity, single_gzip, results) =
        wstunnel::block_on_in(&link.peer, || async move {
            // One request of each encoding (the first makes the body)...
            let path = "/api/v1/blocklist?format=full";
            let (status, head, identity) = get_from(GuardedLink::PEER_V4, path, false, None).await;
            assert_eq!(status, 200, "{head}");
            assert_eq!(header(&head, "content-encoding"), None, "{head}");
            let (status, head, gzip) = get_from(GuardedLink::PEER_V4, path, true, None).await;
            assert_eq!(status, 200, "{head}");
            assert_eq!(header(&head, "content-encoding"), Some("gzip"), "{head}");
            assert_eq!(
                header(&head, "content-length"),
                Some(gzip.len().to_string().as_str())
            );
            // ...then 64 at once, half of each, four from each of sixteen sources (a source's
            // share of the transfers).
            let (identity_ref, gzip_ref): (&[u8], &[u8]) = (&identity, &gzip);
            let sources = &sources;
            let burst = (0..BURST).map(|i| async move {
                let source = sources[i / 4].as_str();
                let gz = i % 2 == 1;
                let expected = if gz { gzip_ref } else { identity_ref };
                let (status, head, same) = get_from(source, path, gz, Some(expected)).await;
                (gz, status, head, !same.is_empty())
            });
            let results = join_all(burst).await;
            (identity, gzip, results)
        });
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    eprintln!(
        "{} full lists of {} + {} bytes: {:?}",
        BURST + 2,
        single_identity.len(),
        single_gzip.len(),
        started.elapsed()
    );

    for (gz, status, head, same) in &results {
        assert_eq!(*status, 200, "{head}");
        assert_eq!(
            header(head, "content-encoding") == Some("gzip"),
            *gz,
            "{head}"
        );
        assert!(
            *same,
            "a burst body differs from the single request's ({head})"
        );
    }
    // The bodies are the list: gzip is the identity body compressed, and it parses.
    let mut unzipped = Vec::new();
    flate2::read::GzDecoder::new(&single_gzip[..])
        .read_to_end(&mut unzipped)
        .unwrap();
    assert!(unzipped == single_identity, "gzip and identity differ");
    let full: Value = serde_json::from_slice(&single_identity).unwrap();
    assert_eq!(full["entries"].as_array().unwrap().len(), DOMAINS);
    assert_eq!(
        full["checksum"],
        api(&daemon, &["blocklist", "status"])["checksum"]
    );

    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "resident: idle {} MiB, peak {} MiB during the burst",
        idle / 1024,
        peak / 1024
    );
    assert!(
        peak <= idle + 64 * 1024,
        "resident memory rose from {idle} KiB to {peak} KiB (over +64 MiB)"
    );
}

/// Polls futures together on the current task (no extra crate).
async fn join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<std::pin::Pin<Box<F>>> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in futs.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

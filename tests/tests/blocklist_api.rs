//! The public blocklist API end to end: full list, deltas with removals, ETag/304, gzip, the
//! checksum, verify-domain, health, rate limiting, and no client address or domain in the logs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a failed test

use phantom_tests::{BpffsDir, Daemon, DaemonConfig, GuardedLink, api, require_root};
use serde_json::Value;
use sha2::{Digest, Sha256};

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

    // Add three (one of them later removed) and remove one: the delta says exactly that.
    api(&daemon, &["blocklist", "add", "domain=four-bet.example"]);
    api(&daemon, &["blocklist", "add", "domain=five-bet.example"]);
    api(&daemon, &["blocklist", "add", "domain=six-bet.example"]);
    api(&daemon, &["blocklist", "remove", "domain=two-bet.example"]);
    api(&daemon, &["blocklist", "remove", "domain=six-bet.example"]);
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

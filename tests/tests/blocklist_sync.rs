//! Blocklist imports and syncs through the real daemon: every import format with broken lines,
//! and sources (a file with a published SHA-256, and another Phantom's public API over HTTP)
//! synced on demand, with tampered, empty and unknown sources refused and nothing changed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a failed test

use std::fs;

use phantom_tests::{
    Daemon, DaemonConfig, NetNs, Process, api, api_err, phantom_api, require_root,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn daemon(ns: &NetNs, metrics: &str, api_listen: Option<&str>, extra: &str) -> Daemon {
    let mut config = DaemonConfig::new("lo", std::path::Path::new("/nonexistent"));
    config.datapath_enabled = false;
    config.metrics_listen = metrics.into();
    config.blocklist_api = api_listen.map(str::to_string);
    config.blocklist_extra = "sync_interval_seconds = 0\n".into();
    config.extra_toml = extra.into();
    Daemon::start(ns, &config)
}

fn blocked(d: &Daemon, name: &str) -> bool {
    api(d, &["blocklist", "verify", &format!("domain={name}")])["blocked"]
        .as_bool()
        .unwrap()
}

fn listed(d: &Daemon) -> Vec<String> {
    let list = api(d, &["blocklist", "list", "per_page=1000"]);
    list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["domain"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_import_format_keeps_each_valid_line() {
    if !require_root("every_import_format_keeps_each_valid_line") {
        return;
    }
    let ns = NetNs::new("phi");
    let d = daemon(&ns, "127.0.0.1:9469", None, "");
    let dir = tempfile::tempdir().unwrap();
    let files = [
        (
            "hosts",
            "# a hosts file\n0.0.0.0 hosts-a.example\n127.0.0.1 localhost\nnot-an-ip hosts-x.example\n0.0.0.0\n0.0.0.0 co.za\n:: hosts-b.example # comment\n",
            vec!["hosts-a.example", "hosts-b.example"],
            3,
        ),
        (
            "adblock",
            "! title\n||adblock-a.example^\n||adblock-b.example^$important\n/banner/ads/\n||bad..example^\n",
            vec!["adblock-a.example", "adblock-b.example"],
            2,
        ),
        (
            "plain",
            "plain-a.example\nBÜCHER-bet.example.\nnot a domain\n\nplain-b.example\n",
            vec![
                "plain-a.example",
                "xn--bcher-bet-q9a.example",
                "plain-b.example",
            ],
            1,
        ),
        (
            "json",
            r#"{"entries": [{"domain": "json-a.example", "reason": "seed"}, {"nodomain": 1}, {"domain": "com"}, {"domain": "json-b.example"}]}"#,
            vec!["json-a.example", "json-b.example"],
            2,
        ),
    ];
    for (format, text, valid, broken) in files {
        let path = dir.path().join(format!("{format}.txt"));
        fs::write(&path, text).unwrap();
        let r = api(
            &d,
            &["blocklist", "import", &format!("path={}", path.display())],
        );
        assert_eq!(r["format"], format, "detected: {r}");
        assert_eq!(
            r["imported"].as_u64().unwrap(),
            valid.len() as u64,
            "{format}: {r}"
        );
        assert_eq!(r["skipped"].as_u64().unwrap(), broken, "{format}: {r}");
        assert_eq!(r["skipped_lines"].as_array().unwrap().len() as u64, broken);
        for name in valid {
            assert!(blocked(&d, name), "{format}: {name} imported");
        }
    }
    assert_eq!(listed(&d).len(), 9);
    // A missing file and an unknown format change nothing.
    let v = api(&d, &["blocklist", "status"])["version"].clone();
    assert_eq!(
        api_err(&d, &["blocklist", "import", "path=/nonexistent/list"]),
        "IMPORT_FAILED"
    );
    let (code, reply, _) = phantom_api(
        &d.socket(),
        &[
            "blocklist",
            "import",
            &format!("path={}", dir.path().join("plain.txt").display()),
            "format=csv",
        ],
    );
    assert_ne!(code, 0, "{reply}");
    assert_eq!(api(&d, &["blocklist", "status"])["version"], v);
}

fn write_with_sha(path: &std::path::Path, text: &str) {
    fs::write(path, text).unwrap();
    let sum: String = Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    fs::write(
        path.with_extension("sha256"),
        format!("{sum}  {}\n", path.file_name().unwrap().to_string_lossy()),
    )
    .unwrap();
}

fn source<'a>(reply: &'a Value, name: &str) -> &'a Value {
    reply["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap()
}

#[test]
fn sources_sync_on_demand_and_bad_checksums_change_nothing() {
    if !require_root("sources_sync_on_demand_and_bad_checksums_change_nothing") {
        return;
    }
    let ns = NetNs::new("phy");
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list.txt");
    write_with_sha(&list, "alpha.example\nbeta.example\nbroken..line\n");

    // The publisher: another Phantom whose public API serves its list.
    let publisher = daemon(&ns, "127.0.0.1:9469", Some("127.0.0.1:3101"), "");
    for d in ["casino.example", "poker.example", "bet.example"] {
        api(&publisher, &["blocklist", "add", &format!("domain={d}")]);
    }
    // Its public key, as an operator copies it into the subscriber's configuration: over
    // plain http:// a source is accepted only with the publisher's key (or a pinned sha256).
    let publisher_key = api(&publisher, &["blocklist", "status"])["publisher_key"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(publisher_key.starts_with("RW"), "{publisher_key}");
    let sources = format!(
        "[[blocklist.sources]]\nname = \"file\"\nurl = {:?}\nsha256_url = {:?}\n\
         [[blocklist.sources]]\nname = \"fleet\"\nurl = \"http://127.0.0.1:3101/api/v1/blocklist?format=full\"\nformat = \"json\"\nminisign_key = {publisher_key:?}\n",
        list.display().to_string(),
        list.with_extension("sha256").display().to_string(),
    );
    let d = daemon(&ns, "127.0.0.1:9470", None, &sources);
    // An operator's own entry is never taken over by a source.
    api(
        &d,
        &["blocklist", "add", "domain=delta.example", "reason=by hand"],
    );

    let r = api(&d, &["blocklist", "sync"]);
    assert_eq!(r["success"], true, "{r}");
    let file = source(&r, "file");
    assert_eq!(
        (file["entries"].as_u64(), file["skipped"].as_u64()),
        (Some(2), Some(1)),
        "{r}"
    );
    assert_eq!(file["verified_by"], "sha256_url");
    let fleet = source(&r, "fleet");
    assert_eq!(fleet["entries"], 3, "{r}");
    assert_eq!(
        fleet["verified_by"], "minisign",
        "the publisher's signature (at /api/v1/blocklist.minisig) verified"
    );
    for name in [
        "alpha.example",
        "beta.example",
        "casino.example",
        "www.poker.example",
        "delta.example",
    ] {
        assert!(blocked(&d, name), "{name}");
    }

    // The file changes: beta goes, gamma and delta come; delta stays the operator's.
    write_with_sha(&list, "alpha.example\ngamma.example\ndelta.example\n");
    let r = api(&d, &["blocklist", "sync", "source=file"]);
    let file = source(&r, "file");
    assert_eq!(
        (file["added"].as_u64(), file["removed"].as_u64()),
        (Some(1), Some(1)),
        "{r}"
    );
    assert!(!blocked(&d, "beta.example"));
    assert!(blocked(&d, "gamma.example"));
    let delta = api(&d, &["blocklist", "list", "search=delta"]);
    assert_eq!(delta["entries"][0]["reason"], "by hand", "{delta}");
    // A synced entry's addedAt counts Unix seconds, as an operator's does.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let gamma = api(&d, &["blocklist", "list", "search=gamma"]);
    let added = gamma["entries"][0]["addedAt"].as_u64().unwrap();
    assert!(added <= now && now - added < 120, "{gamma}");
    // Unchanged content is recognised and nothing is rewritten.
    let v = api(&d, &["blocklist", "status"])["version"].clone();
    let r = api(&d, &["blocklist", "sync", "source=file"]);
    assert_eq!(source(&r, "file")["unchanged"], true, "{r}");
    assert_eq!(api(&d, &["blocklist", "status"])["version"], v);

    // Tampered (the published checksum no longer matches) and empty downloads are refused
    // whole: nothing changes.
    let before = listed(&d);
    fs::write(&list, "alpha.example\nevil-takeover.example\n").unwrap();
    let r = api(&d, &["blocklist", "sync", "source=file"]);
    assert_eq!(r["success"], false);
    let err = source(&r, "file")["error"].as_str().unwrap().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    write_with_sha(&list, "\n\n");
    let r = api(&d, &["blocklist", "sync", "source=file"]);
    assert!(
        source(&r, "file")["error"]
            .as_str()
            .unwrap()
            .contains("empty"),
        "{r}"
    );
    assert_eq!(listed(&d), before);
    assert_eq!(api(&d, &["blocklist", "status"])["version"], v);

    // The publisher drops a domain: the next sync drops it too.
    api(&publisher, &["blocklist", "remove", "domain=poker.example"]);
    let r = api(&d, &["blocklist", "sync", "source=fleet"]);
    assert_eq!(source(&r, "fleet")["removed"], 1, "{r}");
    assert!(!blocked(&d, "poker.example"));

    assert_eq!(
        api_err(&d, &["blocklist", "sync", "source=nope"]),
        "INVALID_PARAMETER"
    );
    let status = api(&d, &["blocklist", "status"]);
    let fleet = source(&status, "fleet");
    assert!(fleet["last_success"].as_u64().is_some(), "{status}");
    assert!(
        source(&status, "file")["error"].as_str().is_some(),
        "{status}"
    );
}

/// A plain HTTP file server for `dir` on 127.0.0.1:`port` inside `ns`: a list publisher as
/// lists are published, static files on a web server.
fn file_server(ns: &NetNs, dir: &std::path::Path, port: u16) -> Process {
    let server = Process::spawn(
        "python3 -m http.server",
        ns.command("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .arg("--directory")
            .arg(dir),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while ns
        .command("curl")
        .args([
            "-sf",
            "-o",
            "/dev/null",
            &format!("http://127.0.0.1:{port}/"),
        ])
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the file server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    server
}

fn sign(key: &minisign::KeyPair, data: &str) -> String {
    minisign::sign(
        Some(&key.pk),
        &key.sk,
        std::io::Cursor::new(data.as_bytes()),
        Some("phantom test list"),
        None,
    )
    .unwrap()
    .into_string()
}

#[test]
fn signed_sources_verify_and_tampered_or_foreign_signatures_change_nothing() {
    if !require_root("signed_sources_verify_and_tampered_or_foreign_signatures_change_nothing") {
        return;
    }
    let ns = NetNs::new("phs");
    let web = tempfile::tempdir().unwrap();
    let publisher = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let stranger = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let list = "signed-one.example\nsigned-two.example\n";
    fs::write(web.path().join("list.txt"), list).unwrap();
    fs::write(web.path().join("list.txt.minisig"), sign(&publisher, list)).unwrap();
    let _server = file_server(&ns, web.path(), 8089);

    let sources = format!(
        "[[blocklist.sources]]\nname = \"signed\"\nurl = \"http://127.0.0.1:8089/list.txt\"\nminisign_key = {:?}\n",
        publisher.pk.to_base64()
    );
    let d = daemon(&ns, "127.0.0.1:9471", None, &sources);
    let r = api(&d, &["blocklist", "sync"]);
    assert_eq!(r["success"], true, "{r}");
    assert_eq!(source(&r, "signed")["verified_by"], "minisign", "{r}");
    assert!(blocked(&d, "signed-one.example"));
    let status = api(&d, &["blocklist", "status"]);
    assert_eq!(source(&status, "signed")["verified_by"], "minisign");
    let before = listed(&d);
    let v = status["version"].clone();

    // Tampered in transit or on the server: the old signature no longer matches.
    fs::write(
        web.path().join("list.txt"),
        "signed-one.example\nevil-takeover.example\n",
    )
    .unwrap();
    let r = api(&d, &["blocklist", "sync", "source=signed"]);
    assert_eq!(r["success"], false, "{r}");
    let err = source(&r, "signed")["error"].as_str().unwrap().to_string();
    assert!(err.contains("signature check failed"), "{err}");
    // Signed, but by someone else's key.
    fs::write(
        web.path().join("list.txt.minisig"),
        sign(&stranger, "signed-one.example\nevil-takeover.example\n"),
    )
    .unwrap();
    let r = api(&d, &["blocklist", "sync", "source=signed"]);
    assert_eq!(r["success"], false, "{r}");
    // No signature at all.
    fs::remove_file(web.path().join("list.txt.minisig")).unwrap();
    let r = api(&d, &["blocklist", "sync", "source=signed"]);
    assert_eq!(r["success"], false, "{r}");
    assert_eq!(listed(&d), before);
    assert!(!blocked(&d, "evil-takeover.example"));
    assert_eq!(api(&d, &["blocklist", "status"])["version"], v);

    // The publisher signs the new list: it goes through.
    let new_list = "signed-one.example\nsigned-three.example\n";
    fs::write(web.path().join("list.txt"), new_list).unwrap();
    fs::write(
        web.path().join("list.txt.minisig"),
        sign(&publisher, new_list),
    )
    .unwrap();
    let r = api(&d, &["blocklist", "sync", "source=signed"]);
    assert_eq!(r["success"], true, "{r}");
    assert!(blocked(&d, "signed-three.example"));
    assert!(!blocked(&d, "signed-two.example"));
}

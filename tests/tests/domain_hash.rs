//! The domain hash keyed per installation: a seed made at first start, and two names with the
//! same key refused by the blocklist and by the kernel set.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use phantom_daemon::domain_hash::{self, DomainHasher, SEED_LEN};
use phantom_tests::{BpffsDir, Daemon, DaemonConfig, GuardedLink, api, require_root};
use serde_json::{Value, json};

/// The seed the test chooses for the second installation.
const KNOWN_SEED: [u8; SEED_LEN] = [0x42; SEED_LEN];

/// One request through the socket that must fail: (code, message).
fn refused(daemon: &Daemon, module: &str, action: &str, params: Value) -> (String, String) {
    let reply = daemon.client().call(module, action, params);
    assert_eq!(reply["success"], false, "{module} {action}: {reply}");
    (
        reply["code"].as_str().unwrap_or_default().to_string(),
        reply["error"].as_str().unwrap_or_default().to_string(),
    )
}

fn kernel_entries(daemon: &Daemon) -> u64 {
    api(daemon, &["datapath", "dns_rules"])["kernel_entries"]
        .as_u64()
        .unwrap()
}

#[test]
fn names_with_one_key_are_refused_and_the_key_is_the_installations() {
    if !require_root("names_with_one_key_are_refused_and_the_key_is_the_installations") {
        return;
    }
    // Under a seed we know, someone with the seed makes two names with the same key.
    let started = std::time::Instant::now();
    let (a, b) =
        domain_hash::colliding_pair(&DomainHasher::from_seed(&KNOWN_SEED), "example").unwrap();
    eprintln!("colliding pair {a} / {b} in {:?}", started.elapsed());

    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let config = DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path());

    // A fresh installation makes its own seed (0600, 64 hex digits) and the pair is just two
    // names: both listed, both kernel rules.
    let mut first = Daemon::start(&link.server, &config);
    let seed_file = first.dir().join("state").join(domain_hash::SEED_FILE);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&seed_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let seed_text = std::fs::read_to_string(&seed_file).unwrap();
    assert_eq!(seed_text.trim().len(), 64, "{seed_text:?}");
    assert_ne!(seed_text, domain_hash::seed_text(&KNOWN_SEED));
    for name in [&a, &b] {
        api(&first, &["blocklist", "add", &format!("domain={name}")]);
    }
    for name in [&a, &b] {
        let v = api(&first, &["blocklist", "verify", &format!("domain={name}")]);
        assert_eq!(v["blocked"], true, "{v}");
    }
    assert_eq!(kernel_entries(&first), 2);
    assert!(!first.log().contains("key is taken"), "{}", first.log());
    first.stop();

    // A second installation on the same pinned maps: its first start makes a seed and finds
    // the kernel set keyed by another (emptied, rebuilt); then the test puts the known seed
    // in place, and the next start finds the key changed again.
    let mut second = Daemon::start(&link.server, &config);
    assert_eq!(
        kernel_entries(&second),
        0,
        "the first installation's keys went"
    );
    second.stop();
    let seed_file = second.dir().join("state").join(domain_hash::SEED_FILE);
    std::fs::write(&seed_file, domain_hash::seed_text(&KNOWN_SEED)).unwrap();
    second.restart();
    assert!(
        second.log().matches("had another hash key").count() >= 2,
        "{}",
        second.log()
    );

    // Under the known seed the second name of the pair is refused, naming the first.
    api(&second, &["blocklist", "add", &format!("domain={a}")]);
    let (code, message) = refused(&second, "blocklist", "add", json!({"domain": b}));
    assert_eq!(code, "DOMAIN_KEY_CLASH");
    assert!(
        message.contains(&b) && message.contains(&a),
        "the error names both: {message}"
    );
    let status = api(&second, &["blocklist", "status"]);
    assert_eq!(status["entries"], 1, "{status}");
    // An import skips it and says so; the other names of the file go in. The file is large
    // enough (10,000 names and more) to take the batch path that places names at once.
    let file = second.dir().join("list.txt");
    let filler: String = (0..10_000)
        .map(|i| format!("filler{i}.casino.example\n"))
        .collect();
    std::fs::write(&file, format!("{b}\nfine-casino.example\n{filler}")).unwrap();
    // The import's reply, once it has shown b as the one name refused, naming a.
    let import_refusing_b = |daemon: &Daemon| {
        let imported = api(
            daemon,
            &[
                "blocklist",
                "import",
                &format!("path={}", file.display()),
                "format=plain",
            ],
        );
        assert_eq!(imported["refused"], 1, "{imported}");
        assert_eq!(imported["refused_entries"][0]["domain"], b.as_str());
        assert!(
            imported["refused_entries"][0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains(&a)),
            "{imported}"
        );
        imported
    };
    let imported = import_refusing_b(&second);
    assert_eq!(imported["imported"], 10_001, "{imported}");
    // The kernel set refuses it too, whoever asks: an operator's rule for b while the
    // blocklist's a holds the key.
    let (code, message) = refused(
        &second,
        "datapath",
        "dns_block",
        json!({"domain": b.as_str()}),
    );
    assert_eq!(code, "DOMAIN_KEY_CLASH", "{message}");
    assert!(message.contains(&b), "{message}");
    assert_eq!(
        kernel_entries(&second),
        10_002,
        "a, fine-casino.example and the filler"
    );
    // The same name again is no clash: an update.
    api(&second, &["datapath", "dns_block", &format!("domain={a}")]);
    api(
        &second,
        &["blocklist", "add", &format!("domain={a}"), "weight=0.9"],
    );
    assert_eq!(kernel_entries(&second), 10_002);

    // After a restart (the list reloaded, the kernel set rebuilt) the same holds.
    second.kill9();
    second.restart();
    assert_eq!(kernel_entries(&second), 10_002);
    let (code, _) = refused(&second, "blocklist", "add", json!({"domain": b}));
    assert_eq!(code, "DOMAIN_KEY_CLASH");
    let v = api(&second, &["blocklist", "verify", &format!("domain={a}")]);
    assert_eq!(v["blocked"], true, "{v}");
    assert!(!second.log().contains(&seed_text.trim().to_string()));

    // With a now only an operator's kernel rule, the large import still refuses b, naming a.
    api(&second, &["blocklist", "remove", &format!("domain={a}")]);
    import_refusing_b(&second);

    // The blocklist switched off: at the next start nobody claims its 10,001 kernel keys and
    // they go (in batches where the kernel has them); the operator's rule for a stays.
    second.stop();
    second.edit_config("[blocklist]\n", "[blocklist]\nenabled = false\n");
    second.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while kernel_entries(&second) != 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(kernel_entries(&second), 1, "{}", second.log());
}

//! Mirror detection through the real daemon's `blocklist verify`: mirrors of every built-in
//! brand that the test builds (brand with affixes, numbered, one-edit typos carrying a gambling
//! word) are caught, and no domain of the shipped list of popular legitimate domains is
//! blocked. Prints the catch rate and the false-positive count.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use phantom_daemon::config::DEFAULT_BRANDS;
use phantom_tests::{ApiClient, BpffsDir, Daemon, DaemonConfig, NetNs, api, require_root};
use serde_json::json;

const AFFIXED: [(&str, &str); 6] = [
    ("", "giris"),
    ("", "-tr"),
    ("yeni-", ""),
    ("", "mobil12"),
    ("", "-guncel-giris"),
    ("", "2024"),
];

/// One-edit typos of `brand` (deletions and adjacent swaps) that still hold a gambling word.
fn typos_with_a_word(brand: &str) -> Vec<String> {
    const WORDS: [&str; 4] = ["bet", "bahis", "casino", "poker"];
    let b: Vec<char> = brand.chars().collect();
    let mut out = Vec::new();
    if b.len() < 6 {
        return out;
    }
    for i in 0..b.len() {
        let mut d = b.clone();
        d.remove(i);
        out.push(d.into_iter().collect::<String>());
        if i + 1 < b.len() && b[i] != b[i + 1] {
            let mut s = b.clone();
            s.swap(i, i + 1);
            out.push(s.into_iter().collect());
        }
    }
    out.retain(|t| WORDS.iter().any(|w| t.contains(w)) && t != brand);
    out.sort();
    out.dedup();
    out
}

#[test]
fn mirrors_of_every_brand_are_caught_and_no_legitimate_domain_is_blocked() {
    if !require_root("mirrors_of_every_brand_are_caught_and_no_legitimate_domain_is_blocked") {
        return;
    }
    let ns = NetNs::new("phm");
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new("lo", bpffs.path());
    config.datapath_enabled = false;
    let daemon = Daemon::start(&ns, &config);

    // The example, as a new user tries it.
    api(&daemon, &["blocklist", "add", "domain=bet365.com"]);
    for name in ["bet365-giris.com", "bet366.com"] {
        let v = api(&daemon, &["blocklist", "verify", &format!("domain={name}")]);
        assert_eq!(v["blocked"], true, "{v}");
        assert!(
            v["reason"]
                .as_str()
                .unwrap()
                .starts_with("blocked: lookalike"),
            "{v}"
        );
    }

    let mut mirrors = Vec::new();
    for brand in DEFAULT_BRANDS {
        for (before, after) in AFFIXED {
            mirrors.push(("affixed", format!("{before}{brand}{after}.com")));
        }
        mirrors.push(("numbered", format!("{brand}{}.net", 1000 + brand.len())));
        for t in typos_with_a_word(brand) {
            mirrors.push(("typo with a gambling word", format!("{t}.com")));
        }
    }
    let mut socket = ApiClient::connect(&daemon.socket());
    let mut missed = Vec::new();
    for (kind, name) in &mirrors {
        let v = socket.ok("blocklist", "verify", json!({ "domain": name }));
        assert!(!v["reason"].as_str().unwrap_or("").is_empty(), "{v}");
        if v["blocked"] != true {
            missed.push(format!("{kind}: {name} ({})", v["reason"]));
        }
    }
    let caught = mirrors.len() - missed.len();
    eprintln!(
        "mirror detection: caught {caught} of {} mirrors ({:.1} %); missed: {missed:?}",
        mirrors.len(),
        100.0 * caught as f64 / mirrors.len() as f64
    );

    let legitimate = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../daemon/data/legitimate-domains.txt"
    ))
    .unwrap();
    let mut false_positives = Vec::new();
    let mut checked = 0;
    for domain in legitimate
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        for name in [domain.to_string(), format!("www.{domain}")] {
            checked += 1;
            let v = socket.ok("blocklist", "verify", json!({ "domain": name }));
            if v["blocked"] == true {
                false_positives.push(format!("{name}: {}", v["reason"]));
            }
        }
    }
    eprintln!(
        "legitimate domains: {checked} names checked, {} false positives {false_positives:?}",
        false_positives.len()
    );
    assert!(false_positives.is_empty());
    assert!(
        missed.is_empty(),
        "every mirror the test builds is caught: {missed:?}"
    );
}

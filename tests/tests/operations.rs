//! The operator's kit in `ops/`: the Prometheus alert rules pass `promtool check rules` and
//! their unit tests (`promtool test rules`), every query of the Grafana dashboard is valid
//! PromQL, and every Phantom metric the rules and the dashboard name is one the real daemon
//! exports; the per-client series stop at `[metrics] client_series`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, GuardedLink, WireguardSettings, api, http_get, metric_value,
    require_root,
};
use serde_json::Value;

fn ops(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ops")
        .join(path)
}

/// Runs promtool; panics with its output unless it succeeds.
fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian's prometheus package; scripts/bootstrap.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// Every `phantom_...` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("phantom_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The dashboard's queries, with Grafana's variables given values PromQL accepts.
fn dashboard_queries() -> Vec<String> {
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(ops("grafana/phantom-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            out.push(
                expr.replace("$__rate_interval", "5m")
                    .replace("$instance", ".*"),
            );
        }
    }
    out
}

#[test]
fn alert_rules_and_dashboard_check_with_promtool_and_name_real_metrics() {
    if !require_root("alert_rules_and_dashboard_check_with_promtool_and_name_real_metrics") {
        return;
    }
    let rules_dir = ops("prometheus");
    let checked = promtool(&["check", "rules", "phantom-alerts.yml"], &rules_dir);
    eprintln!("{checked}");
    let tested = promtool(&["test", "rules", "phantom-alerts.test.yml"], &rules_dir);
    assert!(tested.contains("SUCCESS"), "{tested}");

    // Each dashboard query as a recording rule: promtool parses every one.
    let queries = dashboard_queries();
    assert!(queries.len() >= 25, "{} queries", queries.len());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(q).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.yml"), rules).unwrap();
    promtool(&["check", "rules", "dashboard.yml"], dir.path());

    // The real daemon with every module that exports metrics.
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path());
    config.wireguard = Some(WireguardSettings::new(
        "198.51.100.0/24",
        GuardedLink::SERVER_V4,
    ));
    config.dns_section =
        "listen = \"auto\"\nprimary = \"127.0.0.53\"\nsecondary = \"127.0.0.54\"\n".into();
    config.extra_toml = "[sentry]\nenabled = true\nlisten = \"127.0.0.1:18080\"\nupstream = \"http://127.0.0.1:18000\"\n".into();
    // Two clients, one series each allowed: the cardinality guard sums the other.
    config.metrics_extra = "client_series = 1\n".into();
    let daemon = Daemon::start(&link.server, &config);
    for name in ["alice", "bob"] {
        api(
            &daemon,
            &["core", "add_client", &format!("client_name={name}")],
        );
    }
    let exposition = http_get(&link.server, "127.0.0.1:9469", "/metrics");
    let client_series = exposition
        .lines()
        .filter(|l| l.starts_with("phantom_wireguard_received_bytes_total{"))
        .count();
    assert_eq!(client_series, 1, "{exposition}");
    assert_eq!(
        metric_value(&exposition, "phantom_wireguard_unlisted_clients"),
        Some(1.0)
    );
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let referenced =
        metric_names(&std::fs::read_to_string(rules_dir.join("phantom-alerts.yml")).unwrap())
            .into_iter()
            .chain(queries.iter().flat_map(|q| metric_names(q)))
            .collect::<BTreeSet<_>>();
    let missing: Vec<&String> = referenced
        .iter()
        .filter(|m| {
            // Counters are declared without their `_total` suffix.
            !exported.contains(*m)
                && !m
                    .strip_suffix("_total")
                    .is_some_and(|base| exported.contains(base))
        })
        .collect();
    eprintln!(
        "{} Phantom metrics named by the rules and the dashboard, all exported: {}",
        referenced.len(),
        missing.is_empty()
    );
    assert!(
        missing.is_empty(),
        "named but not exported by the daemon: {missing:?}"
    );
    drop(daemon);
}

//! `dns`: the per-answer cost of `tc_dns_filter` with a million blocked domains
//! (BPF_PROG_TEST_RUN), and the time the daemon's own handle takes to sync that set into the
//! kernel, in full and as a delta.

use std::time::Instant;

use aya::{maps::HashMap, programs::SchedClassifier};
use phantom_common::{dns::IfaceInfo, names};
use phantom_daemon::datapath::{DomainFilter, Owner};

use crate::{
    BoxError, Cli,
    bpf::{PER_RUN_TIME, dns_answer, leak, load_object, median_ns, pin_dir, program},
    report::table,
};

pub fn run(cli: &Cli) -> Result<(), BoxError> {
    let pins = pin_dir("dns")?;
    let state = tempfile::Builder::new().prefix("phantom-bench").tempdir()?;
    let mut ebpf = load_object(pins.path(), cli)?;
    program::<SchedClassifier>(&mut ebpf, names::TC_DNS_FILTER)?.load()?;
    // BPF_PROG_TEST_RUN hands skb programs an Ethernet frame on the loopback device.
    let mut ifaces: HashMap<_, u32, IfaceInfo> =
        HashMap::try_from(ebpf.map_mut(names::IFACES_MAP).ok_or("no ifaces map")?)?;
    ifaces.insert(&1, &IfaceInfo { l2_len: 14 }, 0)?;

    // The daemon's own handle syncs the set: the figure an operator waits for.
    let domains = DomainFilter::open(
        ebpf.take_map(names::DOMAINS_MAP)
            .ok_or("no domain map")?
            .try_into()?,
        ebpf.take_map(names::DNS_KEY_MAP)
            .ok_or("no domain hash key map")?
            .try_into()?,
        state.path(),
    )?;
    let rules: Vec<(String, bool)> = (0..cli.domains)
        .map(|i| (format!("casino{i}.bet{}.example", i % 997), i % 2 == 0))
        .collect();
    let started = Instant::now();
    let report = domains.replace(Owner::Blocklist, &rules)?;
    let full_sync = started.elapsed();
    let removed: Vec<String> = rules[rules.len() - 1000..]
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    let added: Vec<(String, bool)> = (0..1000)
        .map(|i| (format!("new{i}.example"), true))
        .collect();
    let started = Instant::now();
    let delta_report = domains.update(
        Owner::Blocklist,
        added.iter().map(|(n, s)| (n.as_str(), *s)),
        removed.iter().map(String::as_str),
    )?;
    let delta_sync = started.elapsed();

    let blocked = leak(dns_answer("www.casino2.bet2.example"));
    let exact = leak(dns_answer("casino3.bet3.example"));
    let passed = leak(dns_answer("www.example.com"));
    let prog = program::<SchedClassifier>(&mut ebpf, names::TC_DNS_FILTER)?;
    let mut rows = Vec::new();
    let n = cli.domains;
    for (label, frame) in [
        (
            format!("answer for a name not blocked (3 labels), {n} domains loaded"),
            passed,
        ),
        (
            format!("answer for an exact rule, rewritten, {n} domains loaded"),
            exact,
        ),
        (
            format!("answer for a subdomain of a rule, rewritten, {n} domains loaded"),
            blocked,
        ),
    ] {
        rows.push(format!(
            "| {label} | {:.1} |",
            median_ns(prog, frame, cli.repeat / 4, cli.rounds)?
        ));
    }
    table(
        "DNS answer filter per-answer cost (BPF_PROG_TEST_RUN)",
        &format!(
            "{} runs per measurement, median of {}; the rewrite rows run the rewrite on every repeat; {PER_RUN_TIME}",
            cli.repeat / 4,
            cli.rounds
        ),
        "| tc_dns_filter input | ns/answer |\n| --- | ---: |",
        &rows,
    );
    table(
        "Kernel domain set sync (DomainFilter handle)",
        "wall time of `DomainFilter::replace`, the call the blocklist makes",
        "| sync | keys written | keys deleted | set size | time |\n| --- | ---: | ---: | ---: | ---: |",
        &[
            format!(
                "| full, {n} domains into an empty map | {} | {} | {} | {:.2} s |",
                report.written,
                report.deleted,
                report.total,
                full_sync.as_secs_f64()
            ),
            format!(
                "| delta, 1,000 removed + 1,000 added | {} | {} | {} | {:.1} ms |",
                delta_report.written,
                delta_report.deleted,
                delta_report.total,
                delta_sync.as_secs_f64() * 1e3
            ),
        ],
    );
    Ok(())
}

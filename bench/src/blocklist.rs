//! `blocklist`: the blocklist engine with a large list: matcher throughput, memory, delta
//! computation.

use std::time::Instant;

use phantom_daemon::blocklist::{
    Blocklist,
    model::{Entry, Pattern, PatternType},
};

use crate::{
    BoxError, Cli,
    report::{percentile, rss_mib, table},
};

pub fn run(cli: &Cli) -> Result<(), BoxError> {
    let state = tempfile::Builder::new().prefix("phantom-bench").tempdir()?;
    let n = cli.domains as usize;
    let before = rss_mib();
    // Exact/subdomain rules alone first: no patterns, no lookalike brands.
    let list = Blocklist::open(state.path(), 0.5, &[], None)?;
    let entries: Vec<Entry> = (0..n)
        .map(|i| {
            Entry::new(
                &format!("casino{i}.bet{}.example", i % 997),
                i % 2 == 0,
                1.0,
                "bench",
                0,
            )
        })
        .collect();
    let started = Instant::now();
    list.upsert(entries)?;
    let load = started.elapsed().as_secs_f64();
    let rss = rss_mib() - before;
    let base = list.version();

    let queries: Vec<String> = (0..1_000_000usize)
        .map(|i| match i % 4 {
            0 => format!("casino{}.bet{}.example", i % n, (i % n) % 997),
            1 => format!(
                "www.casino{}.bet{}.example",
                (i % n) & !1,
                ((i % n) & !1) % 997
            ),
            2 => format!("www.site{i}.example.com"),
            _ => format!("cdn{i}.static.example.org"),
        })
        .collect();
    let rate = |f: &dyn Fn(&str) -> bool| {
        let started = Instant::now();
        let mut blocked = 0usize;
        for q in &queries {
            blocked += usize::from(f(q));
        }
        std::hint::black_box(blocked);
        queries.len() as f64 / started.elapsed().as_secs_f64()
    };
    let suffix_rate = rate(&|q| list.is_blocked(q));
    let suffix_verify_rate = rate(&|q| list.verify(q).blocked);
    list.set_lookalike_brands(
        &phantom_daemon::config::BlocklistConfig::default().lookalike_brands(),
    );

    for i in 0..50 {
        list.add_pattern(Pattern {
            pattern: format!("slot{i:02}"),
            kind: PatternType::Contains,
            weight: 0.7,
        })?;
    }
    for i in 0..20 {
        list.add_pattern(Pattern {
            pattern: format!(r"^jg{i:02}\d{{3}}\.com$"),
            kind: PatternType::Regex,
            weight: 0.8,
        })?;
    }
    let full_rate = rate(&|q| list.is_blocked(q));
    let full_verify_rate = rate(&|q| list.verify(q).blocked);

    let removed: Vec<String> = (0..500)
        .map(|i| format!("casino{i}.bet{}.example", i % 997))
        .collect();
    for d in &removed {
        list.remove(d)?;
    }
    list.upsert(
        (0..500)
            .map(|i| Entry::new(&format!("new{i}.example"), true, 1.0, "bench", 0))
            .collect(),
    )?;
    let mut delta_ms = Vec::new();
    let mut size = 0;
    for _ in 0..20 {
        let started = Instant::now();
        let delta = list.delta(base)?.ok_or("no delta")?;
        size = delta.0.len() + delta.1.len();
        delta_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    table(
        "Blocklist engine with a large list",
        "single thread; 1,000,000 queries (half hits on exact or subdomain rules, half misses); the full engine adds 50 contains and 20 regex patterns and lookalike detection; memory is the resident growth of the process once the list is loaded (the import's transient entries handed back)",
        "| measurement | value | target |\n| --- | ---: | ---: |",
        &[
            format!("| load {n} entries (one version, SQLite + engine) | {load:.2} s | |"),
            format!(
                "| resident memory of the list and engine, {n} entries | {rss:.0} MiB | <= 150 MB |"
            ),
            format!(
                "| exact/subdomain lookups per second (resolver path: blocked or not) | {:.2} M/s | >= 5 M/s |",
                suffix_rate / 1e6
            ),
            format!(
                "| exact/subdomain with the full report (`verify`: matched patterns) | {:.2} M/s | |",
                suffix_verify_rate / 1e6
            ),
            format!(
                "| full engine (suffix + 50 contains + 20 regex + lookalikes of {} brands), resolver path | {:.2} M/s | >= 1 M/s |",
                phantom_daemon::config::BlocklistConfig::default()
                    .lookalike_brands()
                    .len(),
                full_rate / 1e6
            ),
            format!(
                "| full engine with the full report (`verify`) | {:.2} M/s | |",
                full_verify_rate / 1e6
            ),
            format!(
                "| delta of {size} changes among {n} entries, p50 | {:.2} ms | <= 5 ms |",
                percentile(&mut delta_ms, 0.5)
            ),
        ],
    );
    Ok(())
}

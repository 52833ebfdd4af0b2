//! `import`: a large list imported through the admin socket into the real daemon, as an
//! operator does it: the time of the call, the daemon's resident memory after it (with where it
//! lives: heap, file-backed pages), the same after a restart (the list loaded from the store),
//! and the import again with the datapath on (the kernel's domain set filled too).

use std::{path::Path, time::Instant};

use phantom_tests::{BpffsDir, Daemon, DaemonConfig, GuardedLink, NetNs, api};

use crate::{
    BoxError, Cli,
    report::{settle, table},
};

/// The `n`th name of the list (the resolver bench's names).
fn domain(i: usize) -> String {
    format!("casino{i}.bet{}.example", i % 997)
}

/// Fields of `/proc/<pid>/status` and `/proc/<pid>/smaps_rollup`, MiB.
struct Memory {
    rss: f64,
    peak: f64,
    anon: f64,
    file: f64,
    private_dirty: f64,
}

fn kib_field(text: &str, field: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| {
            v.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .map_or(0.0, |kib: f64| kib / 1024.0)
}

/// The daemon's memory once it is idle ([`settle`]), with its peak so far.
fn memory(pid: u32) -> Memory {
    settle(pid);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Memory {
        rss: kib_field(&status, "VmRSS"),
        peak: kib_field(&status, "VmHWM"),
        anon: kib_field(&status, "RssAnon"),
        file: kib_field(&status, "RssFile"),
        private_dirty: kib_field(&rollup, "Private_Dirty"),
    }
}

fn memory_row(label: &str, m: &Memory) -> String {
    format!(
        "| {label} | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.0} MiB |",
        m.rss, m.anon, m.file, m.private_dirty, m.peak
    )
}

/// The daemon's settings: the resolver bench's (resolver on, datapath off) unless `bpffs`.
fn config(uplink: &str, bpffs: Option<&Path>, log: bool) -> DaemonConfig {
    let mut config = DaemonConfig::new(uplink, bpffs.unwrap_or(Path::new("/nonexistent")));
    config.datapath_enabled = bpffs.is_some();
    config.metrics_listen = "off".into();
    config.log_level = if log { "info" } else { "warn" }.into();
    config.dns_section =
        "listen = \"127.0.0.4:53\"\nprimary = \"127.0.0.2\"\nsecondary = \"127.0.0.2\"\n".into();
    config.blocklist_extra = "sync_interval_seconds = 0\n".into();
    config
}

/// One import through the socket: seconds, and the reply.
fn import(daemon: &Daemon, list: &Path) -> (f64, serde_json::Value) {
    let started = Instant::now();
    // A busy machine's disk can keep the commit past the CLI's default minute.
    let reply = api(
        daemon,
        &[
            "--timeout",
            "900",
            "blocklist",
            "import",
            &format!("path={}", list.display()),
        ],
    );
    (started.elapsed().as_secs_f64(), reply)
}

pub fn run(cli: &Cli) -> Result<(), BoxError> {
    let n = cli.domains as usize;
    let dir = tempfile::Builder::new().prefix("phantom-bench").tempdir()?;
    let list = dir.path().join("list.txt");
    {
        use std::io::Write;
        let mut plain = std::io::BufWriter::new(std::fs::File::create(&list)?);
        for i in 0..n {
            writeln!(plain, "{}", domain(i))?;
        }
    }
    let mut rows = Vec::new();
    let mut memory_rows = Vec::new();

    // Without the datapath, as the resolver bench runs it.
    let ns = NetNs::new("phbench-imp");
    let mut daemon = Daemon::start(&ns, &config("lo", None, false));
    let pid = daemon.pid().ok_or("phantomd is not running")?;
    memory_rows.push(memory_row("started, empty list", &memory(pid)));
    let (seconds, reply) = import(&daemon, &list);
    rows.push(format!(
        "| import {n} domains, datapath off (resolver bench's settings) | {seconds:.2} s | {} imported |",
        reply["imported"]
    ));
    memory_rows.push(memory_row(
        &format!("after the import of {n} domains"),
        &memory(pid),
    ));
    let (again, reply) = import(&daemon, &list);
    rows.push(format!(
        "| the same file again (every name listed: no change) | {again:.2} s | {} imported |",
        reply["imported"]
    ));
    let started = Instant::now();
    daemon.stop();
    daemon.restart();
    let restart = started.elapsed().as_secs_f64();
    rows.push(format!(
        "| restart with {n} domains in the store (stop, start, list loaded, socket up) | {restart:.2} s | |"
    ));
    let pid = daemon.pid().ok_or("phantomd is not running")?;
    memory_rows.push(memory_row(
        &format!("after a restart, {n} domains loaded from the store"),
        &memory(pid),
    ));
    let status = api(&daemon, &["blocklist", "status"]);
    drop(daemon);
    drop(ns);

    // With the datapath: the kernel's domain set filled by the same import.
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let daemon = Daemon::start(
        &link.server,
        &config(GuardedLink::SERVER_DEV, Some(bpffs.path()), cli.restart_log),
    );
    let pid = daemon.pid().ok_or("phantomd is not running")?;
    let (seconds, reply) = import(&daemon, &list);
    let kernel = api(&daemon, &["blocklist", "status"]);
    rows.push(format!(
        "| import {n} domains, datapath on (kernel domain set filled) | {seconds:.2} s | {} imported, {} keys in the kernel set |",
        reply["imported"], kernel["kernel_entries"]
    ));
    memory_rows.push(memory_row(
        &format!("datapath on, after the import of {n} domains"),
        &memory(pid),
    ));
    // The kernel set's mirror is read back from the pinned map and checked against the list.
    let mut daemon = daemon;
    let started = Instant::now();
    daemon.stop();
    daemon.restart();
    let restart = started.elapsed().as_secs_f64();
    rows.push(format!(
        "| restart, datapath on (programs adopted, the kernel set's mirror read back and checked) | {restart:.2} s | |"
    ));
    let pid = daemon.pid().ok_or("phantomd is not running")?;
    memory_rows.push(memory_row(
        &format!("datapath on, after a restart with {n} domains"),
        &memory(pid),
    ));
    if cli.restart_log {
        // Where that restart spends its time, from the daemon's own lines.
        for line in daemon.log().lines().filter(|l| l.contains(" INFO ")) {
            eprintln!("{line}");
        }
    }
    drop(daemon);

    table(
        "Blocklist import through the admin socket",
        &format!(
            "the real daemon (release) in a namespace of its own; `phantom-api blocklist import path=<file>` of a plain list of {n} names, timed from the call to the reply (the CLI's own start included); the checksum after the restart: {}",
            status["checksum"]
        ),
        "| measurement | time | result |\n| --- | ---: | --- |",
        &rows,
    );
    table(
        "Daemon memory with the list",
        "/proc/<pid>/status (VmRSS, RssAnon, RssFile, VmHWM) and smaps_rollup (Private_Dirty) of the daemon at each point, read once the daemon is idle (no CPU time used for half a second)",
        "| point | resident | anonymous | file-backed | private dirty | peak resident so far |\n| --- | ---: | ---: | ---: | ---: | ---: |",
        &memory_rows,
    );
    Ok(())
}

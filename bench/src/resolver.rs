//! `resolver`: Phantom's resolver (the real daemon) against dnsmasq, both holding the same
//! 1,000,000 blocked domains and forwarding to the same upstream dnsmasq, in a private
//! namespace on loopback: dnsperf on the blocked path and on the cached path, with each
//! server's CPU time. Beside them the floor (`udp_floor`): the same datagrams answered with no
//! DNS work, which bounds the ratio any socket server can reach against dnsmasq per
//! CPU-second on this machine.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use phantom_tests::{Daemon, DaemonConfig, DnsmasqOptions, NetNs, Process, api, dnsmasq_with};

use crate::{
    BoxError, Cli,
    report::{percentile, rss_of, settle, table},
    udp_floor,
};

/// Runs a command; its stdout, or an error with its stderr.
fn output(cmd: &mut Command) -> Result<String, BoxError> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A server's counters over a run, per query.
struct PerQuery {
    /// CPU microseconds, user and system together.
    cpu_us: f64,
    user_us: f64,
    system_us: f64,
    /// Context switches (voluntary and not, all threads) per 1,000 queries.
    switches_per_k: f64,
}

/// User and system CPU seconds of `pid` (all threads), and its context switches.
fn counters(pid: u32) -> (f64, f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, r)| r)
        .split_whitespace()
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / hz
    };
    let mut switches = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            switches += status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    (field(11), field(12), switches)
}

/// One dnsperf run against the server process `pid`: (queries per second, p50 ms, p99 ms,
/// share of the expected rcode, the server's counters per query).
fn dnsperf_cpu(
    ns: &NetNs,
    server: &str,
    pid: u32,
    queries: &Path,
    seconds: u32,
    expect: &str,
) -> Result<(f64, f64, f64, f64, PerQuery), BoxError> {
    let (user, system, switches) = counters(pid);
    let (qps, p50, p99, share) = dnsperf(ns, server, queries, seconds, expect)?;
    let (user2, system2, switches2) = counters(pid);
    let answered = (qps * f64::from(seconds)).max(1.0);
    let per = |d: f64| d * 1e6 / answered;
    let counts = PerQuery {
        cpu_us: per(user2 - user + system2 - system),
        user_us: per(user2 - user),
        system_us: per(system2 - system),
        switches_per_k: switches2.saturating_sub(switches) as f64 * 1e3 / answered,
    };
    Ok((qps, p50, p99, share, counts))
}

/// One dnsperf run: (queries per second, p50 ms, p99 ms, share of the expected rcode).
fn dnsperf(
    ns: &NetNs,
    server: &str,
    queries: &Path,
    seconds: u32,
    expect: &str,
) -> Result<(f64, f64, f64, f64), BoxError> {
    let out = output(ns.command("dnsperf").args([
        "-s",
        server,
        "-d",
        &queries.display().to_string(),
        "-l",
        &seconds.to_string(),
        "-c",
        "4",
        "-q",
        "200",
        "-t",
        "2",
        "-v",
    ]))?;
    let qps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or("dnsperf printed no rate")?;
    let mut latencies = Vec::new();
    let mut expected = 0usize;
    for line in out.lines().filter(|l| l.starts_with("> ")) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let Some(Ok(lat)) = fields.last().map(|v| v.parse::<f64>()) {
            latencies.push(lat * 1e3);
        }
        expected += usize::from(fields.get(1) == Some(&expect));
    }
    let share = expected as f64 / latencies.len().max(1) as f64;
    let p50 = percentile(&mut latencies, 0.5);
    let p99 = percentile(&mut latencies, 0.99);
    Ok((qps, p50, p99, share))
}

/// Phantom's resolver against dnsmasq (see the module's doc).
pub fn run(cli: &Cli) -> Result<(), BoxError> {
    let n = cli.domains as usize;
    let ns = NetNs::new("phbench-dns");
    let dir = tempfile::Builder::new().prefix("phantom-bench").tempdir()?;
    let domain = |i: usize| format!("casino{i}.bet{}.example", i % 997);

    // The list, for both: a plain file for Phantom, address=/d/ lines (NXDOMAIN for the name
    // and below) for dnsmasq.
    let list = dir.path().join("list.txt");
    let dm_conf = dir.path().join("dnsmasq-block.conf");
    {
        use std::io::Write;
        let mut plain = std::io::BufWriter::new(std::fs::File::create(&list)?);
        let mut conf = std::io::BufWriter::new(std::fs::File::create(&dm_conf)?);
        for i in 0..n {
            writeln!(plain, "{}", domain(i))?;
            writeln!(conf, "address=/{}/", domain(i))?;
        }
    }
    // The upstream both forward to: answers every name under example.org, cacheable.
    let _upstream = dnsmasq_with(
        &ns,
        &["127.0.0.2"],
        &[],
        "probe.example.org",
        &DnsmasqOptions {
            local_ttl: Some(3600),
            args: vec!["--address=/example.org/192.0.2.10".into()],
            ..DnsmasqOptions::default()
        },
    );
    let loading = Instant::now();
    // It answers once the list is read (the probe is forwarded to the upstream).
    let dm = dnsmasq_with(
        &ns,
        &["127.0.0.3"],
        &[],
        "probe.example.org",
        &DnsmasqOptions {
            local_ttl: None,
            args: vec![
                "--server=127.0.0.2".into(),
                "--cache-size=10000".into(),
                format!("--conf-file={}", dm_conf.display()),
            ],
            ready_timeout: Duration::from_secs(300),
        },
    );

    let mut config = DaemonConfig::new("lo", Path::new("/nonexistent"));
    config.datapath_enabled = false;
    config.metrics_listen = "off".into();
    config.log_level = "warn".into();
    config.dns_section =
        "listen = \"127.0.0.4:53\"\nprimary = \"127.0.0.2\"\nsecondary = \"127.0.0.2\"\n".into();
    config.blocklist_extra = "sync_interval_seconds = 0\n".into();
    let phantom = Daemon::start(&ns, &config);
    let started = Instant::now();
    api(
        &phantom,
        &["blocklist", "import", &format!("path={}", list.display())],
    );
    let import_s = started.elapsed().as_secs_f64();
    // Both must block the list's last name before anything is measured.
    let probe = dir.path().join("probe.txt");
    std::fs::write(&probe, format!("{} A\n", domain(n - 1)))?;
    while dnsperf(&ns, "127.0.0.3", &probe, 1, "NXDOMAIN").map_or(true, |r| r.3 < 1.0) {
        if loading.elapsed() > Duration::from_secs(300) {
            return Err("dnsmasq did not load the list".into());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    while dnsperf(&ns, "127.0.0.4", &probe, 1, "NXDOMAIN").map_or(true, |r| r.3 < 1.0) {
        if loading.elapsed() > Duration::from_secs(300) {
            return Err("phantom did not answer".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The floor: this binary answering every datagram with itself, no DNS work (udp_floor).
    let floor = Process::spawn(
        "udp floor",
        ns.command(std::env::current_exe()?)
            .env(udp_floor::ENV, "127.0.0.5:53"),
    );
    while dnsperf(&ns, "127.0.0.5", &probe, 1, "NOERROR").map_or(true, |r| r.3 < 1.0) {
        if loading.elapsed() > Duration::from_secs(300) {
            return Err("the floor server did not answer".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let phantom_pid = phantom.pid().ok_or("phantomd is not running")?;
    // Both idle first: the reply to the import can come before the work it started ends.
    settle(phantom_pid);
    settle(dm.id());
    let (rss_phantom, rss_dnsmasq) = (rss_of(phantom_pid), rss_of(dm.id()));

    // Query files: blocked names (and subdomains) spread over the list; 5,000 cacheable names.
    let blocked = dir.path().join("blocked.txt");
    let cached = dir.path().join("cached.txt");
    {
        use std::io::Write;
        let mut b = std::io::BufWriter::new(std::fs::File::create(&blocked)?);
        let mut c = std::io::BufWriter::new(std::fs::File::create(&cached)?);
        for i in 0..100_000usize {
            let d = domain((i * 7919) % n);
            if i % 2 == 0 {
                writeln!(b, "{d} A")?;
            } else {
                writeln!(b, "www.{d} AAAA")?;
            }
            writeln!(c, "host{}.example.org A", i % 5_000)?;
        }
    }
    let seconds = 10;
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    for (path, label, expect) in [
        (&blocked, "blocked", "NXDOMAIN"),
        (&cached, "cached", "NOERROR"),
    ] {
        // Warm both caches with one pass over the names.
        let _ = dnsperf(&ns, "127.0.0.3", path, 2, expect);
        let _ = dnsperf(&ns, "127.0.0.4", path, 2, expect);
        let (dq, d50, d99, dshare, d) =
            dnsperf_cpu(&ns, "127.0.0.3", dm.id(), path, seconds, expect)?;
        let (pq, p50, p99, pshare, p) =
            dnsperf_cpu(&ns, "127.0.0.4", phantom_pid, path, seconds, expect)?;
        let (fq, f50, f99, fshare, f) =
            dnsperf_cpu(&ns, "127.0.0.5", floor.id(), path, seconds, "NOERROR")?;
        ratios.push(pq / dq);
        rows.push(format!(
            "| {label} | dnsmasq | {dq:.0} | {d50:.3} | {d99:.3} | {:.1} % | {:.2} | {:.2} / {:.2} | {:.0} | {:.0} | |",
            dshare * 100.0,
            d.cpu_us,
            d.user_us,
            d.system_us,
            d.switches_per_k,
            1e6 / d.cpu_us.max(1e-9)
        ));
        rows.push(format!(
            "| {label} | **phantom** | {pq:.0} | {p50:.3} | {p99:.3} | {:.1} % | {:.2} | {:.2} / {:.2} | {:.0} | {:.0} | **{:.2}x** queries/s, **{:.2}x** per CPU-second (goal >= 2x) |",
            pshare * 100.0,
            p.cpu_us,
            p.user_us,
            p.system_us,
            p.switches_per_k,
            1e6 / p.cpu_us.max(1e-9),
            pq / dq,
            d.cpu_us / p.cpu_us.max(1e-9)
        ));
        rows.push(format!(
            "| {label} | floor: datagrams echoed, no DNS work | {fq:.0} | {f50:.3} | {f99:.3} | {:.1} % | {:.2} | {:.2} / {:.2} | {:.0} | {:.0} | the most any socket server reaches: **{:.2}x** dnsmasq per CPU-second; phantom is at {:.0} % of the floor's queries per CPU-second |",
            fshare * 100.0,
            f.cpu_us,
            f.user_us,
            f.system_us,
            f.switches_per_k,
            1e6 / f.cpu_us.max(1e-9),
            d.cpu_us / f.cpu_us.max(1e-9),
            100.0 * f.cpu_us / p.cpu_us.max(1e-9)
        ));
    }
    rows.push(format!(
        "| memory with {n} domains | dnsmasq {rss_dnsmasq:.0} MiB | phantom {rss_phantom:.0} MiB (goal <= 150 MB = 143 MiB) | | | | | | | | |"
    ));
    rows.push(format!(
        "| import {n} domains into phantom (socket call, one version) | {import_s:.1} s | | | | | | | | | |"
    ));
    table(
        "Resolver: Phantom against dnsmasq with the same 1,000,000-domain list",
        &format!(
            "both forward to the same upstream dnsmasq on loopback inside a private namespace; dnsperf (4 clients, 200 outstanding, {seconds} s per run, after a warm-up pass) on 100,000 blocked names (half of them subdomains, A and AAAA) and on 5,000 cacheable names; latencies from dnsperf's per-query report; server CPU (user + system, all threads) and context switches from /proc over each run; phantom is the real daemon with its default settings (lookalike detection on); the floor is a server that sends each query back flagged as an answer through the same recvmmsg/sendmmsg batches of 64 as phantom's UDP worker, with no DNS work: what the kernel charges per datagram in and out"
        ),
        "| path | server | queries/s | p50 ms | p99 ms | expected answers | server CPU µs/query | user / system µs/query | context switches per 1,000 queries | queries per CPU-second | phantom / dnsmasq |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        &rows,
    );
    Ok(())
}

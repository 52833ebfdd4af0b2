//! What every subject shares: the table with the machine line, percentiles, and memory and CPU
//! readings from /proc.

/// The machine line of every table: CPU model, CPU count, kernel.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cpus} CPUs, Linux {kernel}")
}

/// Prints one Markdown table under `## title`, with the machine and method lines.
pub fn table(title: &str, method: &str, header: &str, rows: &[String]) {
    println!("## {title}\n");
    println!("Machine: {}", machine());
    println!("Method: {method}\n");
    println!("{header}");
    for r in rows {
        println!("{r}");
    }
    println!();
}

/// The `p` quantile (0 to 1) of `samples`, sorted in place, by nearest rank; 0 when empty.
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples.get(i).copied().unwrap_or(0.0)
}

/// Resident memory of this process, MiB.
pub fn rss_mib() -> f64 {
    rss_of(std::process::id())
}

/// Resident memory of process `pid`, MiB (0 when unreadable).
pub fn rss_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Waits until `pid` is idle (no CPU time used across half a second, at most 10 s): memory read
/// right after a reply would catch the work the reply started (a checksum, freed buffers not yet
/// handed back) and vary from run to run.
pub fn settle(pid: u32) {
    let started = std::time::Instant::now();
    let mut last = cpu_seconds(pid);
    while started.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let now = cpu_seconds(pid);
        if now - last < 0.005 {
            return;
        }
        last = now;
    }
}

/// CPU seconds a process has used (user + system), from /proc.
pub fn cpu_seconds(pid: u32) -> f64 {
    cpu_seconds_of(&format!("/proc/{pid}/stat"))
}

/// CPU seconds from a `stat` file of /proc (a process, or `/proc/thread-self/stat`).
pub fn cpu_seconds_of(stat_path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(stat_path) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11usize, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

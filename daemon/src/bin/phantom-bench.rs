//! `phantom-bench`: measures Phantom's eBPF programs and prints Markdown tables. Every figure
//! in one table comes from the same run, so each program is compared with its baseline on the
//! same machine at the same moment.
//!
//! - `xdp`: BPF_PROG_TEST_RUN per-packet cost of `xdp_guard` next to an empty XDP program, with
//!   a loaded source map and deny list.
//! - `dns`: BPF_PROG_TEST_RUN per-answer cost of `tc_dns_filter` with a million blocked
//!   domains, and the time the daemon's handle takes to sync that set into the kernel.
//! - `flood`: a flood from one source over veth, dropped by `xdp_guard`'s deny list against an
//!   nftables drop rule for the same source on the same setup.
//!
//! - `sentry`: the sentry proxy against its upstream (wrk), challenge issue and proof
//!   verification per core, and the reference solver per difficulty.
//!
//! Needs root. Uses private pin directories and namespaces, removed afterwards.

use std::{
    ffi::CString,
    net::Ipv4Addr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{SchedClassifier, TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use clap::{Parser, ValueEnum};
use phantom_common::{
    dns::IfaceInfo,
    names,
    xdp::{DenyReason, GuardCounters, POLICY_DENY, Policy, SourceKey, SourceStats, Verdict},
};
use phantom_daemon::datapath::{DomainFilter, Owner, ebpf_object};

#[path = "bench/sentry.rs"]
mod sentry_bench;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BenchFn = fn(&Cli) -> Result<(), BoxError>;

/// The traffic generator object (`bench_xdp_tx`), built beside the daemon's.
static GEN_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/phantom-bench-gen"));

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Suite {
    All,
    Xdp,
    Dns,
    Flood,
    Core,
    Blocklist,
    Resolver,
    Sentry,
}

#[derive(Parser)]
#[command(
    name = "phantom-bench",
    about = "Benchmarks of Phantom's eBPF programs"
)]
struct Cli {
    /// Which tables to print.
    #[arg(value_enum, default_value = "all")]
    suite: Suite,
    /// Program runs per measurement (BPF_PROG_TEST_RUN repeat).
    #[arg(long, default_value_t = 2_000_000)]
    repeat: u32,
    /// Measurements per row; the median is reported.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Sources pre-loaded into the per-source map.
    #[arg(long, default_value_t = 100_000)]
    sources: u32,
    /// Sources pre-loaded into the deny list.
    #[arg(long, default_value_t = 10_000)]
    denied: u32,
    /// Domains pre-loaded into the DNS filter's set.
    #[arg(long, default_value_t = 1_000_000)]
    domains: u32,
    /// Clients for the core benchmark.
    #[arg(long, default_value_t = 10_000)]
    clients: u32,
    /// Flood measurements per row; the median is reported.
    #[arg(long, default_value_t = 5)]
    flood_rounds: usize,
    /// Frames per flood measurement.
    #[arg(long, default_value_t = 20_000_000)]
    flood_frames: u32,
    /// Seconds per wrk run in the sentry benchmark.
    #[arg(long, default_value_t = 6)]
    sentry_seconds: u32,
    /// Interleaved rounds per sentry proxy scenario; the median is reported.
    #[arg(long, default_value_t = 3)]
    sentry_rounds: usize,
}

/// A pin directory on bpffs for one benchmark, removed on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> Result<Self, BoxError> {
        let path = PathBuf::from(format!(
            "/sys/fs/bpf/phantom-bench-{tag}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_object(pins: &Path, cli: &Cli) -> Result<Ebpf, BoxError> {
    Ok(EbpfLoader::new()
        .default_map_pin_directory(pins)
        .map_max_entries(names::SOURCES_MAP, cli.sources.max(1).saturating_mul(2))
        .map_max_entries(names::DOMAINS_MAP, cli.domains.max(1).saturating_mul(2))
        .load(ebpf_object())?)
}

fn mac(a: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, a]
}

/// A 64-byte Ethernet/IPv4/UDP frame.
fn ipv4_frame(dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&mac(2));
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&50u16.to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&src);
    f[30..34].copy_from_slice(&dst);
    let csum = ipv4_checksum(&f[14..34]);
    f[24..26].copy_from_slice(&csum.to_be_bytes());
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&9u16.to_be_bytes());
    f[38..40].copy_from_slice(&30u16.to_be_bytes());
    f
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A 78-byte Ethernet/IPv6/UDP frame.
fn ipv6_frame(src: [u8; 16]) -> Vec<u8> {
    let mut f = vec![0u8; 78];
    f[0..6].copy_from_slice(&mac(1));
    f[6..12].copy_from_slice(&mac(2));
    f[12..14].copy_from_slice(&0x86DDu16.to_be_bytes());
    f[14] = 0x60;
    f[18..20].copy_from_slice(&24u16.to_be_bytes());
    f[20] = 17;
    f[21] = 64;
    f[22..38].copy_from_slice(&src);
    f[38..54].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f
}

/// An Ethernet/IPv4/UDP DNS answer for `name` (one A record), from port 53.
fn dns_answer(name: &str) -> Vec<u8> {
    let mut dns = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
    for label in name.split('.') {
        dns.push(label.len() as u8);
        dns.extend_from_slice(label.as_bytes());
    }
    dns.extend_from_slice(&[0, 0, 1, 0, 1]);
    dns.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 203, 0, 113, 7]);
    let udp_len = 8 + dns.len();
    let mut f = vec![0u8; 14 + 20];
    f[0..6].copy_from_slice(&mac(1));
    f[6..12].copy_from_slice(&mac(2));
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&[203, 0, 113, 53]);
    f[30..34].copy_from_slice(&[198, 51, 100, 2]);
    let csum = ipv4_checksum(&f[14..34]);
    f[24..26].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&53u16.to_be_bytes());
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&dns);
    f
}

fn median_ns<
    P: TestRun<Opts<'static> = TestRunOptions<'static>, Result = aya::programs::TestRunResult>,
>(
    prog: &P,
    frame: &'static [u8],
    repeat: u32,
    rounds: usize,
) -> Result<f64, BoxError> {
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let result = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        })?;
        // The kernel reports the mean duration of one run over `repeat` runs.
        samples.push(result.duration.as_nanos() as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

fn deny_entry() -> Policy {
    Policy {
        flags: POLICY_DENY,
        deny_reason: DenyReason::Manual as u32,
        ..Default::default()
    }
}

fn leak(v: Vec<u8>) -> &'static [u8] {
    Box::leak(v.into_boxed_slice())
}

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

fn table(title: &str, method: &str, header: &str, rows: &[String]) {
    println!("## {title}\n");
    println!("Machine: {}", machine());
    println!("Method: {method}\n");
    println!("{header}");
    for r in rows {
        println!("{r}");
    }
    println!();
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, BoxError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| format!("no program {name}"))?
        .try_into()?)
}

fn bench_xdp(cli: &Cli) -> Result<(), BoxError> {
    let pins = PinDir::new("xdp")?;
    let mut ebpf = load_object(&pins.0, cli)?;
    for name in [names::XDP_GUARD, names::XDP_BASELINE] {
        program::<Xdp>(&mut ebpf, name)?.load()?;
    }
    let passing = leak(ipv4_frame(mac(1), [198, 51, 100, 7], [192, 0, 2, 1]));
    let passing6 = leak(ipv6_frame([
        0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7,
    ]));
    // The first entry the deny list gets below.
    let denied = leak(ipv4_frame(mac(1), [10, 0, 0, 5], [192, 0, 2, 1]));
    let mut rows = Vec::new();
    let mut measure = |ebpf: &mut Ebpf,
                       label: String,
                       name: &str,
                       frame: &'static [u8]|
     -> Result<f64, BoxError> {
        let ns = median_ns(program::<Xdp>(ebpf, name)?, frame, cli.repeat, cli.rounds)?;
        rows.push((label, ns));
        Ok(ns)
    };
    measure(
        &mut ebpf,
        "xdp_baseline (XDP_PASS only), IPv4 64 B".into(),
        names::XDP_BASELINE,
        passing,
    )?;
    measure(
        &mut ebpf,
        "xdp_guard, IPv4 64 B, empty maps".into(),
        names::XDP_GUARD,
        passing,
    )?;

    // Load the maps: tracked sources and the deny list, as on a busy host under attack.
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?.get() as usize;
    {
        let mut sources: PerCpuHashMap<_, SourceKey, SourceStats> =
            PerCpuHashMap::try_from(ebpf.map_mut(names::SOURCES_MAP).ok_or("no source map")?)?;
        for i in 0..cli.sources {
            let b = i.to_be_bytes();
            let values = PerCpuValues::try_from(vec![
                SourceStats {
                    packets: 1,
                    bytes: 64,
                    ..Default::default()
                };
                cpus
            ])?;
            sources.insert(&SourceKey::from_ipv4([10, b[1], b[2], b[3]]), values, 0)?;
        }
    }
    {
        let mut policy: PerCpuHashMap<_, SourceKey, Policy> =
            PerCpuHashMap::try_from(ebpf.map_mut(names::POLICY_MAP).ok_or("no policy map")?)?;
        for i in 0..cli.denied {
            let b = i.to_be_bytes();
            let values = PerCpuValues::try_from(vec![deny_entry(); cpus])?;
            policy.insert(
                &SourceKey::from_ipv4([10, b[1], b[2], b[3].wrapping_add(5)]),
                values,
                0,
            )?;
        }
    }
    let (s, d) = (cli.sources, cli.denied);
    measure(
        &mut ebpf,
        format!("xdp_baseline, IPv4 64 B ({s} sources, {d} denied loaded)"),
        names::XDP_BASELINE,
        passing,
    )?;
    measure(
        &mut ebpf,
        format!("xdp_guard pass, IPv4 64 B, {s} tracked, {d} denied"),
        names::XDP_GUARD,
        passing,
    )?;
    measure(
        &mut ebpf,
        format!("xdp_guard pass, IPv6 78 B, {s} tracked, {d} denied"),
        names::XDP_GUARD,
        passing6,
    )?;
    measure(
        &mut ebpf,
        format!("xdp_guard drop (denied source), IPv4 64 B, {s} tracked, {d} denied"),
        names::XDP_GUARD,
        denied,
    )?;

    let baseline = rows[0].1;
    let rows: Vec<String> = rows
        .iter()
        .map(|(label, ns)| format!("| {label} | {ns:.0} | {:+.0} ns |", ns - baseline))
        .collect();
    table(
        "XDP per-packet cost (BPF_PROG_TEST_RUN)",
        &format!(
            "{} runs per measurement, median of {} measurements; same run for every row",
            cli.repeat, cli.rounds
        ),
        "| program and input | ns/packet | vs baseline |\n| --- | ---: | ---: |",
        &rows,
    );
    Ok(())
}

fn bench_dns(cli: &Cli) -> Result<(), BoxError> {
    let pins = PinDir::new("dns")?;
    let state = tempdir()?;
    let mut ebpf = load_object(&pins.0, cli)?;
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
        &state.0,
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
    let delta_report = domains.update(Owner::Blocklist, &added, &removed)?;
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
            "| {label} | {:.0} |",
            median_ns(prog, frame, cli.repeat / 4, cli.rounds)?
        ));
    }
    table(
        "DNS answer filter per-answer cost (BPF_PROG_TEST_RUN)",
        &format!(
            "{} runs per measurement, median of {}; the rewrite rows run the rewrite on every repeat",
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

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> Result<TempDir, BoxError> {
    let path = std::env::temp_dir().join(format!("phantom-bench-{}", std::process::id()));
    std::fs::create_dir_all(&path)?;
    Ok(TempDir(path))
}

/// A network namespace for the flood, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Result<Self, BoxError> {
        let name = format!("phbench-{tag}-{}", std::process::id());
        sh(Command::new("ip").args(["netns", "add", &name]))?;
        Ok(Self(name))
    }

    fn ip(&self, args: &[&str]) -> Result<String, BoxError> {
        sh(Command::new("ip").arg("-n").arg(&self.0).args(args))
    }

    fn nft(&self, script: &str) -> Result<String, BoxError> {
        sh(Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
            .args(script.split_whitespace()))
    }

    fn run<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> Result<R, BoxError> {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::scope(|s| {
            s.spawn(move || -> Result<R, BoxError> {
                let file = std::fs::File::open(&path)?;
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
                Ok(f())
            })
            .join()
            .map_err(|_| "namespace thread panicked")?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(cmd: &mut Command) -> Result<String, BoxError> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a flood measurement `rounds` times; returns the median (rate, frames dropped).
fn median_rate(
    rounds: usize,
    mut one: impl FnMut() -> Result<(u64, Duration), BoxError>,
) -> Result<(f64, u64), BoxError> {
    let mut runs = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        let (dropped, took) = one()?;
        runs.push((dropped as f64 / took.as_secs_f64(), dropped));
    }
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(runs[runs.len() / 2])
}

/// Floods `frames` copies of `frame` out of the sender's veth with the live-frames generator;
/// returns the wall time.
fn flood_once(
    sender: &Netns,
    gen_ifindex: u32,
    frame: &'static [u8],
    frames: u32,
) -> Result<Duration, BoxError> {
    sender.run(move || -> Result<Duration, BoxError> {
        let mut generator = EbpfLoader::new().load(GEN_OBJECT)?;
        let prog: &mut Xdp = generator
            .program_mut("bench_xdp_tx")
            .ok_or("no generator")?
            .try_into()?;
        prog.load()?;
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&gen_ifindex.to_ne_bytes());
        let started = Instant::now();
        prog.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat: frames,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..TestRunOptions::default()
        })?;
        Ok(started.elapsed())
    })?
}

fn bench_flood(cli: &Cli) -> Result<(), BoxError> {
    let sender = Netns::new("snd")?;
    let receiver = Netns::new("rcv")?;
    sender.ip(&[
        "link",
        "add",
        "snd0",
        "type",
        "veth",
        "peer",
        "name",
        "rcv0",
        "netns",
        &receiver.0,
    ])?;
    sender.ip(&["link", "set", "snd0", "up"])?;
    receiver.ip(&["link", "set", "rcv0", "up"])?;
    sender.ip(&["addr", "add", "198.51.100.7/24", "dev", "snd0"])?;
    receiver.ip(&["addr", "add", "198.51.100.1/24", "dev", "rcv0"])?;
    let rcv_mac = receiver.ip(&["-j", "link", "show", "dev", "rcv0"])?;
    let rcv_mac: serde_json::Value = serde_json::from_str(&rcv_mac)?;
    let rcv_mac: Vec<u8> = rcv_mac[0]["address"]
        .as_str()
        .ok_or("no MAC")?
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()?;
    let rcv_mac: [u8; 6] = rcv_mac.try_into().map_err(|_| "bad MAC")?;
    let gen_ifindex = sender.run(|| nix::net::if_::if_nametoindex("snd0"))??;
    let src = Ipv4Addr::new(198, 51, 100, 7);
    let frame = leak(ipv4_frame(rcv_mac, src.octets(), [198, 51, 100, 1]));
    // The generator may also "send" the first frames before the peer is ready; warm up once.
    let pins = PinDir::new("flood")?;

    // 1. XDP: xdp_guard with the source on its deny list.
    let (xdp_pps, xdp_frames) = {
        let mut ebpf = load_object(&pins.0, cli)?;
        let ebpf = receiver.run(move || -> Result<Ebpf, BoxError> {
            let prog: &mut Xdp = program(&mut ebpf, names::XDP_GUARD)?;
            prog.load()?;
            prog.attach(CString::new("rcv0")?.as_c_str(), XdpMode::Driver)?;
            Ok(ebpf)
        })??;
        let mut ebpf = ebpf;
        let mut policy: PerCpuHashMap<_, SourceKey, Policy> =
            PerCpuHashMap::try_from(ebpf.map_mut(names::POLICY_MAP).ok_or("no policy map")?)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?.get() as usize;
        policy.insert(
            &SourceKey::from_ipv4(src.octets()),
            PerCpuValues::try_from(vec![deny_entry(); cpus])?,
            0,
        )?;
        let read_drops = |ebpf: &Ebpf| -> Result<u64, BoxError> {
            let counters: PerCpuArray<_, GuardCounters> =
                PerCpuArray::try_from(ebpf.map(names::COUNTERS_MAP).ok_or("no counters map")?)?;
            Ok(counters
                .get(&0, 0)?
                .iter()
                .map(|c| c.verdicts[Verdict::DropManual as usize].packets)
                .sum())
        };
        flood_once(&sender, gen_ifindex, frame, 100_000)?;
        let result = median_rate(cli.flood_rounds, || {
            let before = read_drops(&ebpf)?;
            let took = flood_once(&sender, gen_ifindex, frame, cli.flood_frames)?;
            Ok((read_drops(&ebpf)? - before, took))
        })?;
        drop(ebpf);
        result
    };
    let _ = std::fs::remove_dir_all(&pins.0);
    std::fs::create_dir_all(&pins.0)?;

    // 2. nftables: the same source dropped by a rule at the earliest nftables hook (netdev
    //    ingress). veth needs an XDP program on the receiver to take XDP frames at all, so the
    //    pass-only baseline program sits there; its few nanoseconds are part of this path.
    let nft_case = |family: &str, chain: &str| -> Result<(f64, u64), BoxError> {
        let mut ebpf = load_object(&pins.0, cli)?;
        let ebpf = receiver.run(move || -> Result<Ebpf, BoxError> {
            let prog: &mut Xdp = program(&mut ebpf, names::XDP_BASELINE)?;
            prog.load()?;
            prog.attach(CString::new("rcv0")?.as_c_str(), XdpMode::Driver)?;
            Ok(ebpf)
        })??;
        receiver.nft(&format!("add table {family} phbench"))?;
        receiver.nft(&format!("add chain {family} phbench {chain}"))?;
        receiver.nft(&format!(
            "add rule {family} phbench dropper ip saddr 198.51.100.7 counter drop"
        ))?;
        let read_drops = || -> Result<u64, BoxError> {
            let out = sh(Command::new("ip").args([
                "netns",
                "exec",
                &receiver.0,
                "nft",
                "-j",
                "list",
                "table",
                family,
                "phbench",
            ]))?;
            let v: serde_json::Value = serde_json::from_str(&out)?;
            v["nftables"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|e| {
                    e["rule"]["expr"]
                        .as_array()?
                        .iter()
                        .find_map(|x| x["counter"]["packets"].as_u64())
                })
                .ok_or_else(|| "no nft counter".into())
        };
        flood_once(&sender, gen_ifindex, frame, 100_000)?;
        let result = median_rate(cli.flood_rounds, || {
            let before = read_drops()?;
            let took = flood_once(&sender, gen_ifindex, frame, cli.flood_frames)?;
            Ok((read_drops()? - before, took))
        })?;
        receiver.nft(&format!("delete table {family} phbench"))?;
        drop(ebpf);
        let _ = std::fs::remove_dir_all(&pins.0);
        std::fs::create_dir_all(&pins.0)?;
        Ok(result)
    };
    let (nft_pps, nft_frames) = nft_case(
        "netdev",
        "dropper { type filter hook ingress device rcv0 priority -500 ; }",
    )?;
    // 2b. The rule most firewalls carry: the inet input hook.
    let (inet_pps, inet_frames) =
        nft_case("inet", "dropper { type filter hook input priority 0 ; }")?;

    // 3. The floor: a receiver that drops everything with an empty XDP program. Whatever the
    //    generator and veth themselves cost per frame is in this figure too.
    let (floor_pps, floor_frames) = {
        let generator = receiver.run(move || -> Result<Ebpf, BoxError> {
            let mut generator = EbpfLoader::new().load(GEN_OBJECT)?;
            let prog: &mut Xdp = generator
                .program_mut("bench_xdp_drop")
                .ok_or("no drop program")?
                .try_into()?;
            prog.load()?;
            prog.attach(CString::new("rcv0")?.as_c_str(), XdpMode::Driver)?;
            Ok(generator)
        })??;
        let tx_dropped = || -> Result<u64, BoxError> {
            let out = sender.ip(&["-s", "-j", "link", "show", "dev", "snd0"])?;
            let v: serde_json::Value = serde_json::from_str(&out)?;
            Ok(v[0]["stats64"]["tx"]["dropped"].as_u64().unwrap_or(0))
        };
        flood_once(&sender, gen_ifindex, frame, 100_000)?;
        let result = median_rate(cli.flood_rounds, || {
            let lost_before = tx_dropped()?;
            let took = flood_once(&sender, gen_ifindex, frame, cli.flood_frames)?;
            Ok((
                u64::from(cli.flood_frames) - (tx_dropped()? - lost_before),
                took,
            ))
        })?;
        drop(generator);
        result
    };
    // Per-frame cost above the floor: what each drop path adds on the receiving CPU.
    let above = |pps: f64| (1e9 / pps - 1e9 / floor_pps).max(0.0);

    table(
        "Flood from one source over veth: XDP deny vs nftables drop",
        &format!(
            "median of {} runs of {} 64-byte frames from one source, generated in-kernel (BPF_PROG_TEST_RUN live frames, XDP_TX) in a sender namespace; sender and receiver share the machine's CPUs; rate = frames the receiver dropped / wall time",
            cli.flood_rounds, cli.flood_frames
        ),
        "| dropped by | frames dropped | drops per second | vs nftables | ns per frame above the floor |\n| --- | ---: | ---: | ---: | ---: |",
        &[
            format!(
                "| xdp_guard deny list (native XDP) | {xdp_frames} | {:.2} M/s | {:.2}x | {:.1} |",
                xdp_pps / 1e6,
                xdp_pps / nft_pps,
                above(xdp_pps)
            ),
            format!(
                "| nftables netdev ingress `ip saddr ... drop` | {nft_frames} | {:.2} M/s | 1.00x | {:.1} |",
                nft_pps / 1e6,
                above(nft_pps)
            ),
            format!(
                "| nftables inet input hook `ip saddr ... drop` | {inet_frames} | {:.2} M/s | {:.2}x | {:.1} |",
                inet_pps / 1e6,
                inet_pps / nft_pps,
                above(inet_pps)
            ),
            format!(
                "| floor: empty XDP_DROP program | {floor_frames} | {:.2} M/s | {:.2}x | 0 |",
                floor_pps / 1e6,
                floor_pps / nft_pps
            ),
        ],
    );
    Ok(())
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples.get(i).copied().unwrap_or(0.0)
}

/// The WireGuard server with many clients, in-process, in a namespace of its own: the work the
/// `core` actions do, without the socket round trip.
fn bench_core(cli: &Cli) -> Result<(), BoxError> {
    use phantom_daemon::{config::WireguardConfig, core::Server};
    let ns = Netns::new("core")?;
    let state = tempdir()?;
    let n = cli.clients;
    let config = WireguardConfig {
        interface: format!("phbw{}", std::process::id() % 100_000),
        subnet: "198.18.0.0/18".into(),
        endpoint: "192.0.2.1".into(),
        ..WireguardConfig::default()
    };
    let state_dir = state.0.clone();
    let rows = ns.run(move || -> Result<Vec<String>, BoxError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let server = Server::start(&config, &state_dir).await?;
            let mut add = Vec::with_capacity(n as usize);
            for i in 0..n {
                let started = Instant::now();
                server
                    .add_client(&format!("client{i:05}"))
                    .await
                    .map_err(|e| format!("add_client: {e:?}"))?;
                add.push(started.elapsed().as_secs_f64() * 1e3);
            }
            let mut list = Vec::new();
            for page in 0..50usize {
                let started = Instant::now();
                let (clients, _) = server.store.page(page * 10 * 19 % (n as usize), 10, None)?;
                let live = server.live();
                std::hint::black_box((clients, live));
                list.push(started.elapsed().as_secs_f64() * 1e3);
            }
            let started = Instant::now();
            server
                .change_subnet(phantom_daemon::wg::Subnet::parse("198.18.64.0/18")?)
                .await?;
            let change = started.elapsed().as_secs_f64();
            server.shutdown();
            drop(server);
            // Start-up on a store of n clients: interface, n peers, address, NAT.
            let started = Instant::now();
            let server = Server::start(&config, &state_dir).await?;
            let startup = started.elapsed().as_secs_f64();
            let peers = server.device_state()?.peers.len();
            server.shutdown();
            Ok::<_, BoxError>(vec![
                format!("| add_client (store + live peer), {n} clients, p50 | {:.2} ms | <= 5 ms |", percentile(&mut add.clone(), 0.5)),
                format!("| add_client, p99 | {:.2} ms | |", percentile(&mut add, 0.99)),
                format!("| list_clients page of 10 (store + live peer state), p50 | {:.2} ms | <= 10 ms |", percentile(&mut list.clone(), 0.5)),
                format!("| list_clients page, p99 | {:.2} ms | |", percentile(&mut list, 0.99)),
                format!("| change_subnet, {n} clients | {:.2} s | <= 2 s |", change),
                format!("| start-up reconciliation, {n} clients ({peers} peers restored) | {:.2} s | <= 2 s |", startup),
            ])
        })
    })??;
    table(
        "WireGuard server with many clients (embedded userspace device)",
        "in-process calls of the core module in a namespace of its own; latencies over every add and 50 page reads",
        "| operation | measured | target |\n| --- | ---: | ---: |",
        &rows,
    );
    Ok(())
}

fn rss_mib() -> f64 {
    rss_of(std::process::id())
}

/// The blocklist engine with a large list: matcher throughput, memory, delta computation.
fn bench_blocklist(cli: &Cli) -> Result<(), BoxError> {
    use phantom_daemon::blocklist::{
        Blocklist,
        model::{Entry, Pattern, PatternType},
    };
    let state = tempdir()?;
    let n = cli.domains as usize;
    let before = rss_mib();
    // Exact/subdomain rules alone first: no patterns, no lookalike brands.
    let list = Blocklist::open(&state.0, 0.5, &[], None)?;
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

/// A child process killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// CPU seconds a process has used (user + system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    cpu_seconds_of(&format!("/proc/{pid}/stat"))
}

/// CPU seconds from a `stat` file of /proc (a process, or `/proc/thread-self/stat`).
fn cpu_seconds_of(stat_path: &str) -> f64 {
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

/// One dnsperf run against the server process `pid`: (queries per second, p50 ms, p99 ms,
/// share of the expected rcode, server CPU microseconds per query).
fn dnsperf_cpu(
    ns: &Netns,
    server: &str,
    pid: u32,
    queries: &Path,
    seconds: u32,
    expect: &str,
) -> Result<(f64, f64, f64, f64, f64), BoxError> {
    let cpu = cpu_seconds(pid);
    let (qps, p50, p99, share) = dnsperf(ns, server, queries, seconds, expect)?;
    let used = cpu_seconds(pid) - cpu;
    let per_query = used * 1e6 / (qps * f64::from(seconds)).max(1.0);
    Ok((qps, p50, p99, share, per_query))
}

/// One dnsperf run: (queries per second, p50 ms, p99 ms, share of the expected rcode).
fn dnsperf(
    ns: &Netns,
    server: &str,
    queries: &Path,
    seconds: u32,
    expect: &str,
) -> Result<(f64, f64, f64, f64), BoxError> {
    let out = sh(Command::new("ip")
        .args(["netns", "exec", &ns.0, "dnsperf"])
        .args([
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

/// Phantom's resolver (the real daemon) against dnsmasq, both holding the same 1,000,000
/// blocked domains and forwarding to the same upstream, in a private namespace on loopback:
/// dnsperf on the blocked path and on the cached path.
fn bench_resolver(cli: &Cli) -> Result<(), BoxError> {
    let n = cli.domains as usize;
    let ns = Netns::new("dns")?;
    ns.ip(&["link", "set", "lo", "up"])?;
    let dir = tempdir()?;
    let bin = std::env::current_exe()?
        .parent()
        .ok_or("no binary directory")?
        .to_path_buf();
    let domain = |i: usize| format!("casino{i}.bet{}.example", i % 997);

    // The list, for both: a plain file for Phantom, address=/d/ lines (NXDOMAIN for the name
    // and below) for dnsmasq.
    let list = dir.0.join("list.txt");
    let dm_conf = dir.0.join("dnsmasq-block.conf");
    {
        use std::io::Write;
        let mut plain = std::io::BufWriter::new(std::fs::File::create(&list)?);
        let mut conf = std::io::BufWriter::new(std::fs::File::create(&dm_conf)?);
        for i in 0..n {
            writeln!(plain, "{}", domain(i))?;
            writeln!(conf, "address=/{}/", domain(i))?;
        }
    }
    let dnsmasq = |listen: &str, extra: &[String]| -> Result<Child, BoxError> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.0, "dnsmasq"])
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--pid-file=",
                "--user=root",
                "--log-facility=/dev/null",
            ])
            .arg(format!("--listen-address={listen}"))
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        Ok(Child(cmd.spawn()?))
    };
    // The upstream both forward to: answers every name under example.org, cacheable.
    let _upstream = dnsmasq(
        "127.0.0.2",
        &[
            "--address=/example.org/192.0.2.10".into(),
            "--local-ttl=3600".into(),
        ],
    )?;
    let loading = Instant::now();
    let dm = dnsmasq(
        "127.0.0.3",
        &[
            "--server=127.0.0.2".into(),
            "--cache-size=10000".into(),
            format!("--conf-file={}", dm_conf.display()),
        ],
    )?;

    let config = dir.0.join("phantom.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {state:?}\n[log]\nlevel = \"warn\"\n[admin]\nsocket = {sock:?}\n\
             [metrics]\nlisten = \"off\"\n[datapath]\nenabled = false\n[wireguard]\nenabled = false\n\
             [dns]\nlisten = \"127.0.0.4:53\"\nprimary = \"127.0.0.2\"\nsecondary = \"127.0.0.2\"\n\
             [blocklist]\napi_listen = \"off\"\nsync_interval_seconds = 0\n",
            state = dir.0.join("state").display().to_string(),
            sock = dir.0.join("phantom.sock").display().to_string(),
        ),
    )?;
    let phantom = Child(
        Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(bin.join("phantomd"))
            .arg("--config")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let api = |args: &[&str]| -> Result<String, BoxError> {
        sh(Command::new(bin.join("phantom-api"))
            .arg("--socket")
            .arg(dir.0.join("phantom.sock"))
            .args(args))
    };
    let started = Instant::now();
    while api(&["core", "status"]).is_err() && api(&["dns", "get_dns_servers"]).is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            return Err("phantomd did not start".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = Instant::now();
    api(&["blocklist", "import", &format!("path={}", list.display())])?;
    let import_s = started.elapsed().as_secs_f64();
    // dnsmasq reads its list at start; wait until it answers.
    let probe = dir.0.join("probe.txt");
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
    let (rss_phantom, rss_dnsmasq) = (rss_of(phantom.0.id()), rss_of(dm.0.id()));

    // Query files: blocked names (and subdomains) spread over the list; 5,000 cacheable names.
    let blocked = dir.0.join("blocked.txt");
    let cached = dir.0.join("cached.txt");
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
        let (dq, d50, d99, dshare, dcpu) =
            dnsperf_cpu(&ns, "127.0.0.3", dm.0.id(), path, seconds, expect)?;
        let (pq, p50, p99, pshare, pcpu) =
            dnsperf_cpu(&ns, "127.0.0.4", phantom.0.id(), path, seconds, expect)?;
        ratios.push(pq / dq);
        rows.push(format!(
            "| {label} | dnsmasq | {dq:.0} | {d50:.3} | {d99:.3} | {:.1} % | {dcpu:.2} | {:.0} | |",
            dshare * 100.0,
            1e6 / dcpu.max(1e-9)
        ));
        rows.push(format!(
            "| {label} | **phantom** | {pq:.0} | {p50:.3} | {p99:.3} | {:.1} % | {pcpu:.2} | {:.0} | **{:.2}x** queries/s, **{:.2}x** per CPU-second (goal >= 2x) |",
            pshare * 100.0,
            1e6 / pcpu.max(1e-9),
            pq / dq,
            dcpu / pcpu.max(1e-9)
        ));
    }
    rows.push(format!(
        "| memory with {n} domains | dnsmasq {rss_dnsmasq:.0} MiB | phantom {rss_phantom:.0} MiB (goal <= 150 MB = 143 MiB) | | | | | | |"
    ));
    rows.push(format!(
        "| import {n} domains into phantom (socket call, one version) | {import_s:.1} s | | | | | | | |"
    ));
    table(
        "Resolver: Phantom against dnsmasq with the same 1,000,000-domain list",
        &format!(
            "both forward to the same upstream dnsmasq on loopback inside a private namespace; dnsperf (4 clients, 200 outstanding, {seconds} s per run, after a warm-up pass) on 100,000 blocked names (half of them subdomains, A and AAAA) and on 5,000 cacheable names; latencies from dnsperf's per-query report; phantom is the real daemon with its default settings (lookalike detection on)"
        ),
        "| path | server | queries/s | p50 ms | p99 ms | expected answers | server CPU µs/query | queries per CPU-second | phantom / dnsmasq |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        &rows,
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let suites: &[(Suite, BenchFn)] = &[
        (Suite::Xdp, bench_xdp),
        (Suite::Dns, bench_dns),
        (Suite::Flood, bench_flood),
        (Suite::Core, bench_core),
        (Suite::Blocklist, bench_blocklist),
        (Suite::Resolver, bench_resolver),
        (Suite::Sentry, sentry_bench::bench_sentry),
    ];
    for (suite, run) in suites {
        if cli.suite != Suite::All && cli.suite != *suite {
            continue;
        }
        if let Err(e) = run(&cli) {
            eprintln!("phantom-bench: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

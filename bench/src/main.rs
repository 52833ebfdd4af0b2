//! `phantom-bench`: measures Phantom and prints Markdown tables. Every figure in one table
//! comes from the same run, so each program is compared with its baseline on the same machine
//! at the same moment. One module per subject:
//!
//! - `xdp`: BPF_PROG_TEST_RUN per-packet cost of `xdp_guard` next to an empty XDP program, with
//!   a loaded source map and deny list.
//! - `dns`: BPF_PROG_TEST_RUN per-answer cost of `tc_dns_filter` with a million blocked
//!   domains, and the time the daemon's handle takes to sync that set into the kernel.
//! - `sni`: BPF_PROG_TEST_RUN per-ClientHello cost of the SNI filter in `tc_encrypted_dns`
//!   with a million blocked domains, and what it adds to packets that are not a ClientHello.
//! - `flood`: a flood from one source over veth, dropped by `xdp_guard`'s deny list against an
//!   nftables drop rule for the same source on the same setup.
//! - `core`: the WireGuard server's operations with many clients, in-process.
//! - `blocklist`: the matching engine's throughput, memory and deltas with a large list, and
//!   the public API of the real daemon over HTTP (deltas, full-list throughput).
//! - `import`: a large list imported through the admin socket into the real daemon (with and
//!   without the kernel's domain set), and the daemon's memory with it.
//! - `resolver`: the real daemon's DNS resolver against dnsmasq (dnsperf), beside the floor
//!   any socket server has on the machine (`udp_floor`).
//! - `sentry`: the sentry proxy against its upstream (wrk), challenge issue and proof
//!   verification per core, and the reference solver per difficulty.
//! - `admin`: one action over the admin socket and over the HTTPS admin API, interleaved.
//! - `dashboard`: the daemon's CPU idle and with the dashboard open in headless Chromium.
//! - `sentry-page`: the challenge page in headless Chromium: its workers' hashes per second
//!   (pure-JS and WebCrypto, one and all workers) beside the Rust solver, the time from the 429
//!   to the upstream's content per difficulty, and the page's weight.
//! - `restart`: the time from a daemon restart to traffic for many connected WireGuard clients
//!   (boringtun state machines pinging through the real daemon), with and without the
//!   remembered endpoints.
//!
//! - `policy`: BPF_PROG_TEST_RUN per-packet cost of `tc_client_policy` with 10,000 clients
//!   holding 16 rules each, beside a TC program that returns at once, and with limits
//!   (`tc_client_limit` too).
//! - `policy-tunnel`: an unlimited client's iperf3 throughput through the real daemon's tunnel
//!   with the VPN-interface programs attached and without them, interleaved.
//!
//! `bpf` holds what the kernel-side subjects share (the object, test runs, crafted frames),
//! `report` the table printing and the percentile, memory and CPU readings. Namespaces, pin
//! directories, dnsmasq, redis-server and the daemon itself come from the end-to-end test
//! harness (`phantom-tests`), which finds `phantomd` and `phantom-api` through
//! `PHANTOM_BIN_DIR` or next to this binary.
//!
//! Needs root. Uses private pin directories and namespaces, removed afterwards.

use std::process::ExitCode;

use clap::{Parser, ValueEnum};

mod admin;
mod blocklist;
mod bpf;
mod core;
mod dashboard;
mod dns;
mod flood;
mod import;
mod policy;
mod policy_tunnel;
mod report;
mod resolver;
mod restart;
mod sentry;
mod sentry_page;
mod sni;
mod udp_floor;
mod xdp;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BenchFn = fn(&Cli) -> Result<(), BoxError>;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Suite {
    All,
    Xdp,
    Dns,
    Sni,
    Flood,
    Core,
    Blocklist,
    Import,
    Resolver,
    Sentry,
    Admin,
    Dashboard,
    SentryPage,
    Policy,
    PolicyTunnel,
    Restart,
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
    /// Load the kernel programs with their verdict samples on (`datapath.kernel_samples`),
    /// to price them; off by default, as the daemon runs them.
    #[arg(long)]
    kernel_samples: bool,
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
    /// Only the sentry's proxy tables (no crypto, solver or redemption rows).
    #[arg(long)]
    sentry_proxy_only: bool,
    /// Seconds per full-list throughput run of the blocklist API.
    #[arg(long, default_value_t = 10)]
    api_seconds: u32,
    /// Concurrent clients of the blocklist API's full-list throughput runs.
    #[arg(long, default_value_t = 4)]
    api_clients: usize,
    /// Delta requests measured against the blocklist API.
    #[arg(long, default_value_t = 300)]
    api_deltas: usize,
    /// Calls per transport and round of the admin benchmark.
    #[arg(long, default_value_t = 1000)]
    admin_calls: usize,
    /// Interleaved rounds of the admin benchmark.
    #[arg(long, default_value_t = 5)]
    admin_rounds: usize,
    /// Seconds of each stretch (idle, dashboard open) of the dashboard benchmark.
    #[arg(long, default_value_t = 60)]
    dashboard_seconds: u64,
    /// WireGuard clients of the dashboard benchmark's daemon (rows of its client table).
    #[arg(long, default_value_t = 100)]
    dashboard_clients: usize,
    /// Seconds each hash-rate measurement of the challenge page runs.
    #[arg(long, default_value_t = 5)]
    page_seconds: u64,
    /// Visits per difficulty of the challenge page's time to content.
    #[arg(long, default_value_t = 7)]
    page_runs: usize,
    /// Connected WireGuard clients of the restart benchmark.
    #[arg(long, default_value_t = 1000)]
    restart_clients: usize,
    /// How often each client of the restart benchmark pings the server (milliseconds).
    #[arg(long, default_value_t = 100)]
    restart_ping_ms: u64,
    /// Print the daemon's start and stop lines of the restart benchmark, and the info lines of
    /// the import benchmark's daemon with the datapath (to stderr).
    #[arg(long)]
    restart_log: bool,
}

fn main() -> ExitCode {
    // The resolver table's floor server is this binary, started by the bench itself.
    if let Ok(addr) = std::env::var(udp_floor::ENV) {
        udp_floor::serve(&addr);
    }
    let cli = Cli::parse();
    if cli.kernel_samples {
        println!(
            "Kernel programs loaded with their verdict samples on (--kernel-samples; the daemon's default is off).\n"
        );
    }
    let suites: &[(Suite, BenchFn)] = &[
        (Suite::Xdp, xdp::run),
        (Suite::Dns, dns::run),
        (Suite::Sni, sni::run),
        (Suite::Flood, flood::run),
        (Suite::Core, self::core::run),
        (Suite::Blocklist, blocklist::run),
        (Suite::Import, import::run),
        (Suite::Resolver, resolver::run),
        (Suite::Sentry, sentry::run),
        (Suite::Admin, admin::run),
        (Suite::Dashboard, dashboard::run),
        (Suite::SentryPage, sentry_page::run),
        (Suite::Policy, policy::run),
        (Suite::PolicyTunnel, policy_tunnel::run),
        (Suite::Restart, restart::run),
    ];
    for (suite, run) in suites {
        if cli.suite != Suite::All && cli.suite != *suite {
            continue;
        }
        if let Err(e) = run(&cli) {
            // The causes too: aya's "`bpf_map_update_elem` failed" says which call, its source
            // says why (the errno).
            let mut message = e.to_string();
            let mut cause = e.source();
            while let Some(c) = cause {
                message.push_str(&format!(": {c}"));
                cause = c.source();
            }
            eprintln!("phantom-bench: {message}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

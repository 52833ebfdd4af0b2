//! `phantom-bench`: measures Phantom's eBPF programs with BPF_PROG_TEST_RUN and prints a
//! Markdown table. Every figure in one table comes from the same run, so the guard is always
//! compared with the baseline program on the same machine at the same moment.
//!
//! Needs root (loading programs). Uses a private pin directory, removed afterwards.

use std::{path::PathBuf, process::ExitCode};

use aya::{
    EbpfLoader,
    maps::{PerCpuHashMap, PerCpuValues},
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
};
use clap::Parser;
use phantom_common::{
    names,
    xdp::{SourceKey, SourceStats},
};
use phantom_daemon::datapath::ebpf_object;

#[derive(Parser)]
#[command(
    name = "phantom-bench",
    about = "Benchmarks of Phantom's eBPF programs"
)]
struct Cli {
    /// Program runs per measurement (BPF_PROG_TEST_RUN repeat).
    #[arg(long, default_value_t = 2_000_000)]
    repeat: u32,
    /// Measurements per row; the median is reported.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Sources pre-loaded into the per-source map for the "loaded map" rows.
    #[arg(long, default_value_t = 100_000)]
    sources: u32,
}

/// A 64-byte Ethernet/IPv4/UDP frame from `src`.
fn ipv4_frame(src: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&50u16.to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&src);
    f[30..34].copy_from_slice(&[192, 0, 2, 1]);
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&9u16.to_be_bytes());
    f[38..40].copy_from_slice(&30u16.to_be_bytes());
    f
}

/// A 78-byte Ethernet/IPv6/UDP frame from `src`.
fn ipv6_frame(src: [u8; 16]) -> Vec<u8> {
    let mut f = vec![0u8; 78];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&0x86DDu16.to_be_bytes());
    f[14] = 0x60;
    f[18..20].copy_from_slice(&24u16.to_be_bytes());
    f[20] = 17;
    f[21] = 64;
    f[22..38].copy_from_slice(&src);
    f[38..54].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f
}

fn median_ns(prog: &Xdp, frame: &[u8], repeat: u32, rounds: usize) -> Result<f64, ProgramError> {
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

fn run(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/phantom-bench-{}", std::process::id()));
    std::fs::create_dir_all(&pin_dir)?;
    let result = (|| -> Result<(), Box<dyn std::error::Error>> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .map_max_entries(names::SOURCES_MAP, cli.sources.max(1).saturating_mul(2))
            .load(ebpf_object())?;
        for name in [names::XDP_GUARD, names::XDP_BASELINE] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| format!("no program {name}"))?
                .try_into()?;
            prog.load()?;
        }
        let v4 = ipv4_frame([198, 51, 100, 7]);
        let v6 = ipv6_frame([0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
        let mut rows: Vec<(String, f64)> = Vec::new();
        let measure = |ebpf: &aya::Ebpf,
                       name: &str,
                       frame: &[u8]|
         -> Result<f64, Box<dyn std::error::Error>> {
            let prog: &Xdp = ebpf
                .program(name)
                .ok_or_else(|| format!("no program {name}"))?
                .try_into()?;
            Ok(median_ns(prog, frame, cli.repeat, cli.rounds)?)
        };
        rows.push((
            "xdp_baseline (XDP_PASS only), IPv4 64 B".into(),
            measure(&ebpf, names::XDP_BASELINE, &v4)?,
        ));
        rows.push((
            "xdp_guard, IPv4 64 B, 1 tracked source".into(),
            measure(&ebpf, names::XDP_GUARD, &v4)?,
        ));
        rows.push((
            "xdp_guard, IPv6 78 B, 2 tracked sources".into(),
            measure(&ebpf, names::XDP_GUARD, &v6)?,
        ));

        // Load the map so lookups walk a realistically full hash table.
        {
            let map = ebpf.map_mut(names::SOURCES_MAP).ok_or("no source map")?;
            let mut sources: PerCpuHashMap<_, SourceKey, SourceStats> =
                PerCpuHashMap::try_from(map)?;
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?.get() as usize;
            for i in 0..cli.sources {
                let b = i.to_be_bytes();
                let key = SourceKey::from_ipv4([10, b[1], b[2], b[3]]);
                let values = PerCpuValues::try_from(vec![
                    SourceStats {
                        packets: 1,
                        bytes: 64,
                        ..Default::default()
                    };
                    cpus
                ])?;
                sources.insert(&key, values, 0)?;
            }
        }
        let n = cli.sources;
        rows.push((
            format!("xdp_baseline, IPv4 64 B ({n} sources loaded)"),
            measure(&ebpf, names::XDP_BASELINE, &v4)?,
        ));
        rows.push((
            format!("xdp_guard, IPv4 64 B, {n} tracked sources"),
            measure(&ebpf, names::XDP_GUARD, &v4)?,
        ));
        rows.push((
            format!("xdp_guard, IPv6 78 B, {n} tracked sources"),
            measure(&ebpf, names::XDP_GUARD, &v6)?,
        ));

        println!("## XDP per-packet cost (BPF_PROG_TEST_RUN)\n");
        println!("Machine: {}", machine());
        println!(
            "Method: {} runs per measurement, median of {} measurements; same run for every row.\n",
            cli.repeat, cli.rounds
        );
        println!("| program and input | ns/packet | vs baseline |");
        println!("| --- | ---: | ---: |");
        let baseline = rows[0].1;
        for (name, ns) in &rows {
            println!("| {name} | {ns:.1} | {:+.1} ns |", ns - baseline);
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&pin_dir);
    result
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("phantom-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

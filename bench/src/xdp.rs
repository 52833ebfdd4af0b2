//! `xdp`: the per-packet cost of `xdp_guard` next to an empty XDP program
//! (BPF_PROG_TEST_RUN), with empty maps, then with a loaded source map and deny list.

use aya::{
    Ebpf,
    maps::{Array, PerCpuHashMap, PerCpuValues},
    programs::{TestRun, TestRunOptions, Xdp},
};
use phantom_common::{
    names,
    xdp::{GuardConfig, Policy, SourceKey, SourceStats, ipv6_mask},
};
use phantom_daemon::datapath::map_memory::retrying_out_of_memory;

use crate::{
    BoxError, Cli,
    bpf::{
        PER_RUN_TIME, deny_entry, ipv4_frame, ipv6_frame, leak, load_object, mac, median_ns,
        pin_dir, program,
    },
    report::table,
};

pub fn run(cli: &Cli) -> Result<(), BoxError> {
    let pins = pin_dir("xdp")?;
    let mut ebpf = load_object(pins.path(), cli)?;
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

    // The rows above time a source's repeat packets, which pass from the guard's per-CPU pass
    // cache. The first packet of a source, the first after a policy change and one a second
    // per busy source take the full path (policy lookup, per-source map update, cache fill):
    // timed here one run at a time with the policy generation bumped before each, against the
    // baseline timed the same way (a single run's figure carries the timer's own cost).
    let mut single_rows = Vec::new();
    {
        let singles = (cli.repeat / 100).max(100) as usize;
        let baseline_single = single_runs_ns(
            program::<Xdp>(&mut ebpf, names::XDP_BASELINE)?,
            passing,
            singles,
            || Ok(()),
        )?;
        single_rows.push((
            format!("xdp_baseline, one run at a time (median of {singles})"),
            baseline_single,
        ));
        let mut generation: Array<_, u64> = Array::try_from(
            ebpf.take_map(names::POLICY_GEN_MAP)
                .ok_or("no policy generation map")?,
        )?;
        let mut bump = || -> Result<(), BoxError> {
            let g = generation.get(&0, 0)?;
            generation.set(0, &g.wrapping_add(1), 0)?;
            Ok(())
        };
        let full = single_runs_ns(
            program::<Xdp>(&mut ebpf, names::XDP_GUARD)?,
            passing,
            singles,
            &mut bump,
        )?;
        single_rows.push((
            format!(
                "xdp_guard pass, IPv4 64 B, full path (policy generation bumped before each run), one run at a time, {s} tracked, {d} denied"
            ),
            full,
        ));
    }

    // IPv6 prefixes in the deny list ([sources] ipv6_prefix = 64): an IPv6 source whose own
    // address has no entry now pays the second lookup, by its /64.
    const PREFIXES: u16 = 1_000;
    {
        let mut nets: PerCpuHashMap<_, SourceKey, Policy> = PerCpuHashMap::try_from(
            ebpf.map_mut(names::POLICY_NET_MAP)
                .ok_or("no prefix policy map")?,
        )?;
        for i in 0..PREFIXES {
            let b = i.to_be_bytes();
            let net = [
                0x20, 0x01, 0x0d, 0xb8, 0xff, 0, b[0], b[1], 0, 0, 0, 0, 0, 0, 0, 0,
            ];
            // Written back to back, an insert can find the kernel's allocator with no element
            // ready (ENOMEM, in 4 runs of 20 before this retry): the daemon's own retry.
            retrying_out_of_memory(|| {
                let values = PerCpuValues::try_from(vec![deny_entry(); cpus])?;
                nets.insert(&SourceKey::from_ipv6(net), values, 0)
            })?;
        }
        let mut config: Array<_, GuardConfig> = Array::try_from(
            ebpf.map_mut(names::GUARD_CONFIG_MAP)
                .ok_or("no guard settings map")?,
        )?;
        config.set(
            0,
            &GuardConfig {
                ipv6_mask: ipv6_mask(64),
                prefix_len: 64,
                prefix_lookup: 1,
            },
            0,
        )?;
    }
    let in_denied_prefix = leak(ipv6_frame([
        0x20, 0x01, 0x0d, 0xb8, 0xff, 0, 0, 7, 0xaa, 0xbb, 0, 0, 0, 0, 0, 9,
    ]));
    measure(
        &mut ebpf,
        format!(
            "xdp_guard pass, IPv6 78 B, {s} tracked, {d} denied + {PREFIXES} denied /64 prefixes (second lookup)"
        ),
        names::XDP_GUARD,
        passing6,
    )?;
    measure(
        &mut ebpf,
        format!(
            "xdp_guard pass, IPv4 64 B, {s} tracked, {d} denied + {PREFIXES} denied /64 prefixes"
        ),
        names::XDP_GUARD,
        passing,
    )?;
    measure(
        &mut ebpf,
        format!(
            "xdp_guard drop (source in a denied /64), IPv6 78 B, {s} tracked, {d} denied + {PREFIXES} prefixes"
        ),
        names::XDP_GUARD,
        in_denied_prefix,
    )?;

    let baseline = rows[0].1;
    let single_baseline = single_rows.first().map_or(0.0, |r| r.1);
    let rows: Vec<String> = rows
        .iter()
        .map(|(label, ns)| {
            format!(
                "| {label} | {ns:.1} | {:+.1} ns | {:.2}x |",
                ns - baseline,
                ns / baseline
            )
        })
        .chain(single_rows.iter().map(|(label, ns)| {
            format!(
                "| {label} | {ns:.0} | {:+.0} ns (vs the baseline one run at a time) | {:.2}x |",
                ns - single_baseline,
                ns / single_baseline
            )
        }))
        .collect();
    table(
        "XDP per-packet cost (BPF_PROG_TEST_RUN)",
        &format!(
            "{} runs per measurement, median of {} measurements; same run for every row; {PER_RUN_TIME}; the rows timed one run at a time take the kernel's figure for one run (whole ns)",
            cli.repeat, cli.rounds
        ),
        "| program and input | ns/packet | vs baseline | x baseline |\n| --- | ---: | ---: | ---: |",
        &rows,
    );
    Ok(())
}

/// The median of `n` single test runs of `prog` on `frame` (ns), `before` called before each.
fn single_runs_ns(
    prog: &Xdp,
    frame: &'static [u8],
    n: usize,
    mut before: impl FnMut() -> Result<(), BoxError>,
) -> Result<f64, BoxError> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        before()?;
        let result = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat: 1,
            ..TestRunOptions::default()
        })?;
        samples.push(result.duration.as_nanos() as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

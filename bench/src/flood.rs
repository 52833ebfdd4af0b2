//! `flood`: a flood from one source over veth, generated in-kernel in a sender namespace and
//! dropped in the receiver's by `xdp_guard`'s deny list, by nftables drop rules for the same
//! source (netdev ingress, inet input), and by an empty XDP_DROP program (the floor).

use std::{
    ffi::CString,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use phantom_common::{
    names,
    xdp::{GuardCounters, Policy, SourceKey, Verdict},
};
use phantom_tests::{NetNs, run as must_run, veth};

use crate::{
    BoxError, Cli,
    bpf::{GEN_OBJECT, deny_entry, ipv4_frame, leak, load_object, pin_dir, program},
    report::table,
};

/// `nft <script>` inside `ns`.
fn nft(ns: &NetNs, script: &str) {
    must_run(ns.command("nft").args(script.split_whitespace()));
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
    sender: &NetNs,
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
    })
}

pub fn run(cli: &Cli) -> Result<(), BoxError> {
    let sender = NetNs::new("phbench-snd");
    let receiver = NetNs::new("phbench-rcv");
    veth(&sender, "snd0", &receiver, "rcv0");
    sender.ip(&["addr", "add", "198.51.100.7/24", "dev", "snd0"]);
    receiver.ip(&["addr", "add", "198.51.100.1/24", "dev", "rcv0"]);
    let rcv_mac = receiver.mac_bytes("rcv0");
    let gen_ifindex = sender.run(|| nix::net::if_::if_nametoindex("snd0"))?;
    let src = Ipv4Addr::new(198, 51, 100, 7);
    let frame = leak(ipv4_frame(rcv_mac, src.octets(), [198, 51, 100, 1]));
    // The generator may also "send" the first frames before the peer is ready; warm up once.
    let pins = pin_dir("flood")?;

    // 1. XDP: xdp_guard with the source on its deny list.
    let (xdp_pps, xdp_frames) = {
        let mut ebpf = load_object(pins.path(), cli)?;
        let ebpf = receiver.run(move || -> Result<Ebpf, BoxError> {
            let prog: &mut Xdp = program(&mut ebpf, names::XDP_GUARD)?;
            prog.load()?;
            prog.attach(CString::new("rcv0")?.as_c_str(), XdpMode::Driver)?;
            Ok(ebpf)
        })?;
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
    let _ = std::fs::remove_dir_all(pins.path());
    std::fs::create_dir_all(pins.path())?;

    // 2. nftables: the same source dropped by a rule at the earliest nftables hook (netdev
    //    ingress). veth needs an XDP program on the receiver to take XDP frames at all, so the
    //    pass-only baseline program sits there; its few nanoseconds are part of this path.
    let nft_case = |family: &str, chain: &str| -> Result<(f64, u64), BoxError> {
        let mut ebpf = load_object(pins.path(), cli)?;
        let ebpf = receiver.run(move || -> Result<Ebpf, BoxError> {
            let prog: &mut Xdp = program(&mut ebpf, names::XDP_BASELINE)?;
            prog.load()?;
            prog.attach(CString::new("rcv0")?.as_c_str(), XdpMode::Driver)?;
            Ok(ebpf)
        })?;
        nft(&receiver, &format!("add table {family} phbench"));
        nft(&receiver, &format!("add chain {family} phbench {chain}"));
        nft(
            &receiver,
            &format!("add rule {family} phbench dropper ip saddr 198.51.100.7 counter drop"),
        );
        let read_drops = || -> Result<u64, BoxError> {
            let out = must_run(
                receiver
                    .command("nft")
                    .args(["-j", "list", "table", family, "phbench"]),
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
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
        nft(&receiver, &format!("delete table {family} phbench"));
        drop(ebpf);
        let _ = std::fs::remove_dir_all(pins.path());
        std::fs::create_dir_all(pins.path())?;
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
        })?;
        let tx_dropped = || -> Result<u64, BoxError> {
            let out = sender.ip(&["-s", "-j", "link", "show", "dev", "snd0"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
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

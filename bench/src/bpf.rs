//! What the kernel-side subjects (xdp, dns, flood) share: the eBPF objects, pin directories,
//! BPF_PROG_TEST_RUN medians and crafted frames.

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun, TestRunOptions},
};
use phantom_common::{
    names,
    xdp::{DenyReason, POLICY_DENY, Policy},
};
use phantom_daemon::datapath::{ebpf_object, kernel_log};
use phantom_tests::BpffsDir;

use crate::{BoxError, Cli};

/// The traffic generator object (`bench_xdp_tx`, `bench_xdp_drop`), built by phantom-daemon's
/// build script beside the daemon's own (bench/build.rs names the file).
pub static GEN_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("PHANTOM_BENCH_GEN"));

/// A pin directory on bpffs for one benchmark (`phantom-bench-<tag>-...`), created now and
/// removed on drop.
pub fn pin_dir(tag: &str) -> Result<BpffsDir, BoxError> {
    let pins = BpffsDir::with_prefix(&format!("phantom-bench-{tag}-"));
    std::fs::create_dir_all(pins.path())?;
    Ok(pins)
}

/// The daemon's eBPF object, its maps pinned in `pins` and sized for the sources and domains
/// the command line asks for, its log switches set as the daemon sets them (samples off
/// unless `--kernel-samples`).
pub fn load_object(pins: &Path, cli: &Cli) -> Result<Ebpf, BoxError> {
    let mut loader = EbpfLoader::new();
    loader
        .default_map_pin_directory(pins)
        .map_max_entries(names::SOURCES_MAP, cli.sources.max(1).saturating_mul(2))
        .map_max_entries(names::DOMAINS_MAP, cli.domains.max(1).saturating_mul(2));
    kernel_log::configure(&mut loader, cli.kernel_samples);
    Ok(loader.load(ebpf_object())?)
}

/// A locally administered MAC address ending in `a`.
pub fn mac(a: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, a]
}

/// A 64-byte Ethernet/IPv4/UDP frame.
pub fn ipv4_frame(dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
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
pub fn ipv6_frame(src: [u8; 16]) -> Vec<u8> {
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
pub fn dns_answer(name: &str) -> Vec<u8> {
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

/// The median over `rounds` test runs of `prog` on `frame` of the time one run takes (`repeat`
/// runs each), in ns, to a tenth: this thread's CPU time across the test-run call divided by
/// `repeat` ([`PER_RUN_TIME`]).
pub fn median_ns<
    P: TestRun<Opts<'static> = TestRunOptions<'static>, Result = aya::programs::TestRunResult>,
>(
    prog: &P,
    frame: &'static [u8],
    repeat: u32,
    rounds: usize,
) -> Result<f64, BoxError> {
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let before = thread_cpu_ns()?;
        prog.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        })?;
        samples.push((thread_cpu_ns()? - before) as f64 / f64::from(repeat.max(1)));
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// How `median_ns` times a run, for the tables' method lines.
pub const PER_RUN_TIME: &str = "ns per run: the bench thread's CPU time across the test-run \
    call divided by the runs (the kernel's own figure is the same loop's time truncated to \
    whole ns, which moved a 2x ratio between programs of 5 and 10 ns by up to a fifth; the \
    call's own setup adds under 0.01 ns a run)";

/// This thread's CPU time (CLOCK_THREAD_CPUTIME_ID), in ns: the test run's loop runs on it,
/// and time other tasks take the CPU for is not counted, as the kernel's timer does not.
fn thread_cpu_ns() -> Result<u64, BoxError> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// A permanent manual deny, as `datapath deny` writes it.
pub fn deny_entry() -> Policy {
    Policy {
        flags: POLICY_DENY,
        deny_reason: DenyReason::Manual as u32,
        ..Default::default()
    }
}

/// A frame for the whole run (test runs borrow their input for `'static`).
pub fn leak(v: Vec<u8>) -> &'static [u8] {
    Box::leak(v.into_boxed_slice())
}

/// Program `name` of `ebpf` as type `T`.
pub fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, BoxError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| format!("no program {name}"))?
        .try_into()?)
}

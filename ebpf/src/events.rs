//! Rare events and verdict samples, reported through aya-log (the `AYA_LOGS` ring buffer) to
//! the daemon, which forwards them into its own log (docs/datapath.md, "Kernel events").
//!
//! Nothing here runs on a packet's usual path:
//! - the rare events (a map refusing an insert, a full map losing an active entry, input
//!   skipped as malformed) are logged only on the branches that handle them, and each kind at
//!   most once a second per CPU ([`gate`]), so a flood of bad packets costs one clock read and
//!   one array access per packet on that branch, not a ring-buffer record;
//! - the verdict samples are compiled in behind [`samples_on`], a read-only global the daemon
//!   sets at load time (`datapath.kernel_samples`): the verifier knows its value, and when it
//!   is 0 it removes the sampling code from the program before it runs.

use aya_ebpf::{
    Global, helpers::generated::bpf_ktime_get_coarse_ns, macros::map, maps::PerCpuArray,
};

/// 1: log samples of each program's verdicts (at most one per verdict, CPU and second).
/// Overridden by the daemon before load; `.rodata`, so frozen and known to the verifier.
#[unsafe(no_mangle)]
static PH_KERNEL_SAMPLES: Global<u8> = Global::new(0);

/// Whether verdict samples are on. A constant to the verifier (see the module's note).
#[inline(always)]
pub fn samples_on() -> bool {
    PH_KERNEL_SAMPLES.load() != 0
}

/// The gate of each event kind: rare events first, then 16 verdict slots per program.
pub const SOURCES_REFUSED: u32 = 0;
pub const SOURCES_EVICTED: u32 = 1;
pub const GUARD_MALFORMED: u32 = 2;
pub const DNS_UNPARSABLE: u32 = 3;
pub const DNS_REWRITE_FAILED: u32 = 4;
pub const SAMPLE_GUARD: u32 = 16;
pub const SAMPLE_DNS: u32 = 32;
pub const SAMPLE_ENC_DNS: u32 = 48;
pub const SAMPLE_SNI: u32 = 64;
pub const SAMPLE_POLICY: u32 = 80;
pub const SAMPLE_LIMIT: u32 = 96;
pub const SAMPLE_MULTIHOP: u32 = 112;
const GATES: u32 = 128;

/// When each event kind was last logged on this CPU (coarse monotonic ns). Not pinned: a
/// restart may log each kind once more.
#[map(name = "PH_LOG_GATE")]
static GATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(GATES, 0);

const NS_PER_SEC: u64 = 1_000_000_000;

/// True at most once a second per CPU for `kind`: the caller logs then.
#[inline(always)]
pub fn gate(kind: u32) -> bool {
    let Some(last) = GATE.get_ptr_mut(kind) else {
        return false;
    };
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: this CPU's slot; only this CPU writes it, and preemption is off in XDP and TC.
    let last = unsafe { &mut *last };
    if *last != 0 && now.wrapping_sub(*last) < NS_PER_SEC {
        return false;
    }
    *last = now;
    true
}

/// The slot of `verdict` among a program's 16 sample gates.
#[inline(always)]
pub fn sample_gate(base: u32, verdict: u32) -> bool {
    gate(base + (verdict & 15))
}

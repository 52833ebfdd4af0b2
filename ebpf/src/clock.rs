//! CLOCK_MONOTONIC_COARSE read from its helper at most once per tick and CPU. The coarse
//! clock only moves at a tick, and the jiffies counter (inlined by the verifier) says when one
//! has passed, so a packet in the same tick as the last read pays no helper call. Each caller
//! keeps the last read in a per-CPU value of its own.

use aya_ebpf::helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns};

/// The coarse clock in ns, from `now_ns` when `jiffies` (the tick it was read in) is still
/// the current one, else read again and both updated. Tick resolution: what the callers time
/// (windows, expiry, token buckets 2 s deep or more) needs no better than milliseconds.
#[inline(always)]
pub fn coarse_now(jiffies: &mut u64, now_ns: &mut u64) -> u64 {
    // SAFETY: neither helper has preconditions.
    let current = unsafe { bpf_jiffies64() };
    if current != *jiffies {
        *jiffies = current;
        *now_ns = unsafe { bpf_ktime_get_coarse_ns() };
    }
    *now_ns
}

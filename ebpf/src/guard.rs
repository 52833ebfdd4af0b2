//! `xdp_guard`: the first program on the uplink. It attributes every frame to its source
//! address and counts it; it never drops yet.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_ktime_get_coarse_ns,
    macros::{map, xdp},
    maps::{LruPerCpuHashMap, PerCpuArray},
    programs::XdpContext,
};
use phantom_common::xdp::{DEFAULT_MAX_SOURCES, SourceKey, SourceStats, TrafficCounter, Verdict};

// Both maps are pinned by name under the daemon's bpffs directory, so counts survive a daemon
// restart and a second daemon start reuses them instead of creating twins.
#[map(name = "PH_SOURCES")]
static SOURCES: LruPerCpuHashMap<SourceKey, SourceStats> =
    LruPerCpuHashMap::pinned(DEFAULT_MAX_SOURCES, 0);

#[map(name = "PH_VERDICTS")]
static VERDICTS: PerCpuArray<TrafficCounter> = PerCpuArray::pinned(Verdict::SLOTS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const VLAN_HLEN: usize = 4;
const IPV4_HLEN_MIN: usize = 20;
const IPV6_HLEN: usize = 40;

#[xdp]
pub fn xdp_guard(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let verdict = classify(&ctx, len);
    count_verdict(verdict, len);
    xdp_action::XDP_PASS
}

/// The benchmark's baseline: the cheapest possible XDP program.
#[xdp]
pub fn xdp_baseline(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn classify(ctx: &XdpContext, len: u64) -> Verdict {
    let Some(mut ethertype) = read_be16(ctx, 12) else {
        return Verdict::PassMalformed;
    };
    let mut l3 = ETH_HLEN;
    // Up to two VLAN tags (802.1ad outer + 802.1Q inner); unrolled, the verifier needs bounds.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(inner) = read_be16(ctx, l3 + 2) else {
            return Verdict::PassMalformed;
        };
        ethertype = inner;
        l3 += VLAN_HLEN;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            let Some(inner) = read_be16(ctx, l3 + 2) else {
                return Verdict::PassMalformed;
            };
            ethertype = inner;
            l3 += VLAN_HLEN;
        }
    }
    match ethertype {
        ETH_P_IP => {
            if !has_bytes(ctx, l3, IPV4_HLEN_MIN) {
                return Verdict::PassMalformed;
            }
            let Some(src) = read_array::<4>(ctx, l3 + 12) else {
                return Verdict::PassMalformed;
            };
            if count_source(&SourceKey::from_ipv4(src), len) {
                Verdict::PassIpv4
            } else {
                Verdict::PassUntracked
            }
        }
        ETH_P_IPV6 => {
            if !has_bytes(ctx, l3, IPV6_HLEN) {
                return Verdict::PassMalformed;
            }
            let Some(src) = read_array::<16>(ctx, l3 + 8) else {
                return Verdict::PassMalformed;
            };
            if count_source(&SourceKey::from_ipv6(src), len) {
                Verdict::PassIpv6
            } else {
                Verdict::PassUntracked
            }
        }
        _ => Verdict::PassNonIp,
    }
}

#[inline(always)]
fn count_source(key: &SourceKey, len: u64) -> bool {
    // The coarse clock (tick resolution) is several times cheaper than bpf_ktime_get_ns and
    // last-seen needs no better than milliseconds.
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(stats) = SOURCES.get_ptr_mut(key) {
        // SAFETY: per-CPU value: only this CPU writes it, and preemption is off in XDP.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += len;
            (*stats).last_seen_ns = now;
        }
        return true;
    }
    let fresh = SourceStats {
        packets: 1,
        bytes: len,
        last_seen_ns: now,
    };
    SOURCES.insert(key, &fresh, 0).is_ok()
}

#[inline(always)]
fn count_verdict(verdict: Verdict, len: u64) {
    if let Some(counter) = VERDICTS.get_ptr_mut(verdict as u32) {
        // SAFETY: per-CPU slot, written only by this CPU.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += len;
        }
    }
}

#[inline(always)]
fn has_bytes(ctx: &XdpContext, offset: usize, len: usize) -> bool {
    ctx.data() + offset + len <= ctx.data_end()
}

#[inline(always)]
fn read_be16(ctx: &XdpContext, offset: usize) -> Option<u16> {
    let bytes = read_array::<2>(ctx, offset)?;
    Some(u16::from_be_bytes(bytes))
}

#[inline(always)]
fn read_array<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    let start = ctx.data() + offset;
    if start + N > ctx.data_end() {
        return None;
    }
    // SAFETY: the range [start, start + N) was checked against data_end just above.
    Some(unsafe { core::ptr::read_unaligned(start as *const [u8; N]) })
}

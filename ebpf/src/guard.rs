//! `xdp_guard`: the first program on the uplink. It attributes every frame to its source
//! address, keeps per-source and global counters, and drops sources on the deny list unless
//! they are on the allow list.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_ktime_get_coarse_ns,
    macros::{map, xdp},
    maps::{Array, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap},
    programs::XdpContext,
};
use phantom_common::net::{
    ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPV4_HLEN_MIN,
    IPV6_HLEN, VLAN_HLEN,
};
use phantom_common::xdp::{
    DEFAULT_MAX_POLICIES, DEFAULT_MAX_SOURCES, POLICY_ALLOW, POLICY_DENY, PORT_WORDS, Policy,
    SECOND_SLOTS, SecondSlot, SourceKey, SourceStats, TrafficCounter, Verdict, WINDOW_NS,
};

// All maps are pinned by name under the daemon's bpffs directory, so counts and policies
// survive a daemon restart and a second start reuses them instead of creating twins.
#[map(name = "PH_SOURCES")]
static SOURCES: LruPerCpuHashMap<SourceKey, SourceStats> =
    LruPerCpuHashMap::pinned(DEFAULT_MAX_SOURCES, 0);

#[map(name = "PH_VERDICTS")]
static VERDICTS: PerCpuArray<TrafficCounter> = PerCpuArray::pinned(Verdict::SLOTS, 0);

#[map(name = "PH_POLICY")]
static POLICY: PerCpuHashMap<SourceKey, Policy> = PerCpuHashMap::pinned(DEFAULT_MAX_POLICIES, 0);

#[map(name = "PH_SECONDS")]
static SECONDS: PerCpuArray<SecondSlot> = PerCpuArray::pinned(SECOND_SLOTS, 0);

#[map(name = "PH_PORTS")]
static PORTS: Array<u32> = Array::pinned(PORT_WORDS, 0);

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
const NS_PER_SEC: u64 = 1_000_000_000;

#[xdp]
pub fn xdp_guard(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    // The coarse clock (tick resolution) is several times cheaper than bpf_ktime_get_ns and
    // last-seen, windows and expiry need no better than milliseconds.
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    count_second(now, len);
    let verdict = match parse(&ctx) {
        Parsed::Source { key, new_tcp, ipv6 } => judge(&key, now, len, new_tcp, ipv6),
        Parsed::NonIp => Verdict::PassNonIp,
        Parsed::Malformed => Verdict::PassMalformed,
    };
    count_verdict(verdict, len);
    if verdict.is_drop() {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// The benchmark's baseline: the cheapest possible XDP program.
#[xdp]
pub fn xdp_baseline(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

enum Parsed {
    Source {
        key: SourceKey,
        /// TCP SYN without ACK to a protected port.
        new_tcp: bool,
        ipv6: bool,
    },
    NonIp,
    Malformed,
}

#[inline(always)]
fn parse(ctx: &XdpContext) -> Parsed {
    let Some(mut ethertype) = read_be16(ctx, 12) else {
        return Parsed::Malformed;
    };
    let mut l3 = ETH_HLEN;
    // Up to two VLAN tags (802.1ad outer + 802.1Q inner); unrolled, the verifier needs bounds.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(inner) = read_be16(ctx, l3 + 2) else {
            return Parsed::Malformed;
        };
        ethertype = inner;
        l3 += VLAN_HLEN;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            let Some(inner) = read_be16(ctx, l3 + 2) else {
                return Parsed::Malformed;
            };
            ethertype = inner;
            l3 += VLAN_HLEN;
        }
    }
    match ethertype {
        ETH_P_IP => {
            let Some(head) = read_array::<IPV4_HLEN_MIN>(ctx, l3) else {
                return Parsed::Malformed;
            };
            let ihl = ((head[0] & 0x0f) as usize) * 4;
            // Only the first fragment carries the TCP header.
            let first_fragment = (head[6] & 0x1f) == 0 && head[7] == 0;
            let new_tcp = head[9] == IPPROTO_TCP
                && first_fragment
                && ihl >= IPV4_HLEN_MIN
                && is_new_protected_tcp(ctx, l3 + ihl);
            Parsed::Source {
                key: SourceKey::from_ipv4([head[12], head[13], head[14], head[15]]),
                new_tcp,
                ipv6: false,
            }
        }
        ETH_P_IPV6 => {
            let Some(head) = read_array::<IPV6_HLEN>(ctx, l3) else {
                return Parsed::Malformed;
            };
            let mut src = [0u8; 16];
            src.copy_from_slice(&head[8..24]);
            // Extension headers before TCP are rare on SYNs; only a direct TCP header counts.
            let new_tcp = head[6] == IPPROTO_TCP && is_new_protected_tcp(ctx, l3 + IPV6_HLEN);
            Parsed::Source {
                key: SourceKey::from_ipv6(src),
                new_tcp,
                ipv6: true,
            }
        }
        _ => Parsed::NonIp,
    }
}

/// A SYN without ACK whose destination port is in the protected-ports bitmap.
#[inline(always)]
fn is_new_protected_tcp(ctx: &XdpContext, l4: usize) -> bool {
    let Some(tcp) = read_array::<14>(ctx, l4) else {
        return false;
    };
    let flags = tcp[13];
    if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        return false;
    }
    let port = u16::from_be_bytes([tcp[2], tcp[3]]) as u32;
    match PORTS.get(port >> 5) {
        Some(word) => (*word >> (port & 31)) & 1 == 1,
        None => false,
    }
}

/// Applies the policy, then counts the packet against its source.
#[inline(always)]
fn judge(key: &SourceKey, now: u64, len: u64, new_tcp: bool, ipv6: bool) -> Verdict {
    let mut verdict = if ipv6 {
        Verdict::PassIpv6
    } else {
        Verdict::PassIpv4
    };
    if let Some(policy) = POLICY.get_ptr_mut(key) {
        // SAFETY: this CPU's copy of the value; only this CPU writes it.
        let p = unsafe { &mut *policy };
        let live = |until: u64| until == 0 || now < until;
        if p.flags & POLICY_ALLOW != 0 && live(p.allow_until_ns) {
            verdict = Verdict::PassAllowed;
        } else if p.flags & POLICY_DENY != 0 && live(p.deny_until_ns) {
            // The flood path: count against the entry and stop here.
            p.dropped_packets += 1;
            p.dropped_bytes += len;
            return Verdict::for_deny(p.deny_reason);
        }
    }
    let epoch = now / WINDOW_NS;
    if let Some(stats) = SOURCES.get_ptr_mut(key) {
        // SAFETY: per-CPU value: only this CPU writes it, and preemption is off in XDP.
        unsafe {
            let s = &mut *stats;
            s.packets += 1;
            s.bytes += len;
            s.new_tcp += new_tcp as u64;
            s.last_seen_ns = now;
            if s.window_epoch == epoch {
                s.window_packets += 1;
            } else {
                s.window_epoch = epoch;
                s.window_packets = 1;
            }
        }
        return verdict;
    }
    let fresh = SourceStats {
        packets: 1,
        bytes: len,
        new_tcp: new_tcp as u64,
        last_seen_ns: now,
        window_epoch: epoch,
        window_packets: 1,
    };
    if SOURCES.insert(key, &fresh, 0).is_err() {
        return Verdict::PassUntracked;
    }
    verdict
}

#[inline(always)]
fn count_second(now: u64, len: u64) {
    let second = now / NS_PER_SEC;
    if let Some(slot) = SECONDS.get_ptr_mut((second % SECOND_SLOTS as u64) as u32) {
        // SAFETY: per-CPU slot, written only by this CPU.
        unsafe {
            let s = &mut *slot;
            if s.second == second {
                s.packets += 1;
                s.bytes += len;
            } else {
                s.second = second;
                s.packets = 1;
                s.bytes = len;
            }
        }
    }
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

//! `xdp_guard`: the first program on the uplink. It attributes every frame to its source
//! address, keeps per-source and global counters, and drops sources on the deny list unless
//! they are on the allow list.

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap},
    programs::XdpContext,
};
use aya_log_ebpf::{info, warn};
use phantom_common::net::{
    ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPV4_HLEN_MIN,
    IPV6_HLEN, VLAN_HLEN,
};
use phantom_common::xdp::{
    BPF_F_NO_PREALLOC, DEFAULT_MAX_POLICIES, DEFAULT_MAX_SOURCES, DENY_CACHE_SLOTS, DenyCacheSlot,
    GuardClock, GuardConfig, GuardCounters, PASS_CACHE_SLOTS, PASS_FLUSH_NS, POLICY_ALLOW,
    POLICY_DENY, PORT_WORDS, PassCacheSlot, Policy, SECOND_SLOTS, SourceKey, SourceStats, Verdict,
    WINDOW_NS, deny_cache_slot,
};

use crate::{clock::coarse_now, events};

// All maps are pinned by name under the daemon's bpffs directory, so counts and policies
// survive a daemon restart and a second start reuses them instead of creating twins.
#[map(name = "PH_SOURCES")]
static SOURCES: LruPerCpuHashMap<SourceKey, SourceStats> =
    LruPerCpuHashMap::pinned(DEFAULT_MAX_SOURCES, 0);

#[map(name = "PH_COUNTERS")]
static COUNTERS: PerCpuArray<GuardCounters> = PerCpuArray::pinned(1, 0);

#[map(name = "PH_POLICY")]
static POLICY: PerCpuHashMap<SourceKey, Policy> = PerCpuHashMap::pinned(DEFAULT_MAX_POLICIES, 0);

/// Allow and deny entries for IPv6 prefixes, keyed by the masked address (see `GuardConfig`).
/// Allocated as written: most hosts hold few or none.
#[map(name = "PH_POLICY_NET")]
static POLICY_NET: PerCpuHashMap<SourceKey, Policy> =
    PerCpuHashMap::pinned(DEFAULT_MAX_POLICIES, BPF_F_NO_PREALLOC);

#[map(name = "PH_GUARD_CFG")]
static GUARD_CFG: Array<GuardConfig> = Array::pinned(1, 0);

/// Live denies copied out of `PH_POLICY` and `PH_POLICY_NET`: under a flood from denied sources
/// the drop path is one array access instead of a hash lookup (see `DenyCacheSlot`).
#[map(name = "PH_DENY_CACHE")]
static DENY_CACHE: PerCpuArray<DenyCacheSlot> = PerCpuArray::pinned(DENY_CACHE_SLOTS, 0);

/// Sources that passed, with their counts not yet in `PH_SOURCES`: most packets of a busy
/// source pass after one array access (see `PassCacheSlot`).
#[map(name = "PH_PASS_CACHE")]
static PASS_CACHE: PerCpuArray<PassCacheSlot> = PerCpuArray::pinned(PASS_CACHE_SLOTS, 0);

#[map(name = "PH_POLICY_GEN")]
static POLICY_GEN: Array<u64> = Array::pinned(1, 0);

#[map(name = "PH_PORTS")]
static PORTS: Array<u32> = Array::pinned(PORT_WORDS, 0);

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
const NS_PER_SEC: u64 = 1_000_000_000;

#[xdp]
pub fn xdp_guard(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let Some(counters) = COUNTERS.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's value; only this CPU writes it, and XDP runs with preemption off.
    let counters = unsafe { &mut *counters };
    let now = coarse_now(&mut counters.clock.jiffies, &mut counters.clock.now_ns);
    let second = current_second(&mut counters.clock, now);
    count_second(counters, second, len);
    let verdict = match parse(&ctx) {
        Parsed::Source(source) => judge(&ctx, &source, now, &mut counters.clock, len),
        Parsed::NonIp => Verdict::PassNonIp,
        Parsed::Malformed => {
            if events::gate(events::GUARD_MALFORMED) {
                info!(
                    &ctx,
                    "xdp_guard: malformed frame skipped ({} bytes, cut short inside its IP header); passed to the stack",
                    len
                );
            }
            Verdict::PassMalformed
        }
    };
    let counter = &mut counters.verdicts[verdict as usize % Verdict::SLOTS as usize];
    counter.packets += 1;
    counter.bytes += len;
    if events::samples_on() && events::sample_gate(events::SAMPLE_GUARD, verdict as u32) {
        info!(
            &ctx,
            "xdp_guard sample: {} {} ({} bytes)",
            verdict.action(),
            verdict.reason(),
            len
        );
    }
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

/// An IP packet's source address, and where its IP header starts.
struct Source {
    /// `SourceKey::words` of the source address.
    words: [u64; 2],
    ipv6: bool,
    /// Offset of the IP header. The rest of it is examined only when the packet passes: a
    /// denied flood never pays for it.
    l3: usize,
}

enum Parsed {
    Source(Source),
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
            // Only the source is read here; the rest when the packet passes (`is_new_tcp`).
            if ctx.data() + l3 + IPV4_HLEN_MIN > ctx.data_end() {
                return Parsed::Malformed;
            }
            let Some([s0, s1]) = read_halves::<2>(ctx, l3 + 12) else {
                return Parsed::Malformed;
            };
            // ::ffff:a.b.c.d, as SourceKey::from_ipv4 lays it out.
            let [a, b] = s0.to_ne_bytes();
            let [c, d] = s1.to_ne_bytes();
            Parsed::Source(Source {
                words: [0, u64::from_ne_bytes([0, 0, 0xff, 0xff, a, b, c, d])],
                ipv6: false,
                l3,
            })
        }
        ETH_P_IPV6 => {
            if ctx.data() + l3 + IPV6_HLEN > ctx.data_end() {
                return Parsed::Malformed;
            }
            let Some(h) = read_halves::<8>(ctx, l3 + 8) else {
                return Parsed::Malformed;
            };
            let word = |q: [u16; 4]| {
                let ([a, b], [c, d]) = (q[0].to_ne_bytes(), q[1].to_ne_bytes());
                let ([e, f], [g, i]) = (q[2].to_ne_bytes(), q[3].to_ne_bytes());
                u64::from_ne_bytes([a, b, c, d, e, f, g, i])
            };
            Parsed::Source(Source {
                words: [
                    word([h[0], h[1], h[2], h[3]]),
                    word([h[4], h[5], h[6], h[7]]),
                ],
                ipv6: true,
                l3,
            })
        }
        _ => Parsed::NonIp,
    }
}

/// A TCP SYN without ACK to a protected port: a new connection attempt.
#[inline(always)]
fn is_new_tcp(ctx: &XdpContext, source: &Source) -> bool {
    let l3 = source.l3;
    if source.ipv6 {
        // Extension headers before TCP are rare on SYNs; only a direct TCP header counts.
        return matches!(read_array::<1>(ctx, l3 + 6), Some([IPPROTO_TCP]))
            && is_new_protected_tcp(ctx, l3 + IPV6_HLEN);
    }
    let Some(head) = read_array::<10>(ctx, l3) else {
        return false;
    };
    let ihl = ((head[0] & 0x0f) as usize) * 4;
    // Only the first fragment carries the TCP header.
    let first_fragment = (head[6] & 0x1f) == 0 && head[7] == 0;
    head[9] == IPPROTO_TCP
        && first_fragment
        && ihl >= IPV4_HLEN_MIN
        && is_new_protected_tcp(ctx, l3 + ihl)
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
///
/// The most specific entry decides: the source address's own entry in `PH_POLICY` when it has
/// a live flag, else (IPv6 only) its prefix's entry in `PH_POLICY_NET`. Within an entry, allow
/// wins over deny. A source that passed recently on this CPU is answered from its pass-cache
/// slot instead, and counted there.
#[inline(always)]
fn judge(ctx: &XdpContext, source: &Source, now: u64, clock: &mut GuardClock, len: u64) -> Verdict {
    // The generation is read before the policy map: a slot filled from a read that raced a
    // daemon write carries the generation that write's bump retires.
    let generation = POLICY_GEN.get(0).copied().unwrap_or(0);
    let words = source.words;
    let index = deny_cache_slot(words);
    let slot = DENY_CACHE.get_ptr_mut(index);
    if let Some(slot) = slot
        && let Some(v) = cached_drop(slot, words, 0, generation, now, len)
    {
        // The flood path.
        return v;
    }
    let pass = PASS_CACHE.get_ptr_mut(index);
    if let Some(pass) = pass {
        // SAFETY: this CPU's slot; only this CPU writes it, and XDP runs with preemption off.
        let p = unsafe { &mut *pass };
        if p.filled != 0 && p.generation == generation && p.addr == words && now < p.until_ns {
            // The pass path of a busy source.
            p.packets += 1;
            p.bytes += len;
            p.new_tcp += is_new_tcp(ctx, source) as u64;
            p.last_seen_ns = now;
            return pass_verdict(p.verdict);
        }
    }
    let key = SourceKey::from_words(words);
    let mut verdict = if source.ipv6 {
        Verdict::PassIpv6
    } else {
        Verdict::PassIpv4
    };
    // Until when the verdict stands by the policy (an allow entry's expiry).
    let mut until = u64::MAX;
    let live = |until: u64| until == 0 || now < until;
    if let Some(policy) = POLICY.get_ptr_mut(&key) {
        // SAFETY: this CPU's copy of the value; only this CPU writes it.
        let p = unsafe { &mut *policy };
        if p.flags & POLICY_ALLOW != 0 && live(p.allow_until_ns) {
            verdict = Verdict::PassAllowed;
            if p.allow_until_ns != 0 {
                until = p.allow_until_ns;
            }
        } else if p.flags & POLICY_DENY != 0 && live(p.deny_until_ns) {
            p.dropped_packets += 1;
            p.dropped_bytes += len;
            let verdict = Verdict::for_deny(p.deny_reason);
            if let Some(slot) = slot {
                // SAFETY: as above.
                refill(unsafe { &mut *slot }, words, 0, generation, p, verdict);
            }
            return verdict;
        }
    }
    if source.ipv6
        && verdict != Verdict::PassAllowed
        && let Some((v, allow_until)) = judge_prefix(words, generation, now, len)
    {
        if v.is_drop() {
            return v;
        }
        verdict = v;
        if allow_until != 0 {
            until = allow_until;
        }
    }
    let new_tcp = is_new_tcp(ctx, source);
    let epoch = current_epoch(clock, now);
    // SAFETY: as above.
    let mut pass = pass.map(|p| unsafe { &mut *p });
    if let Some(p) = pass.as_deref_mut()
        && p.filled != 0
        && p.addr != words
    {
        flush(ctx, p);
    }
    // What the slot still counts for this very source joins the entry with this packet.
    let pending = pass.as_deref().filter(|p| p.filled != 0 && p.addr == words);
    if let Some(stats) = SOURCES.get_ptr_mut(&key) {
        // SAFETY: per-CPU value: only this CPU writes it, and preemption is off in XDP.
        let s = unsafe { &mut *stats };
        if let Some(p) = pending {
            s.add_pending(p);
        }
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
    } else {
        let mut fresh = SourceStats {
            packets: 1,
            bytes: len,
            new_tcp: new_tcp as u64,
            last_seen_ns: now,
            window_epoch: epoch,
            window_packets: 1,
        };
        if let Some(p) = pending {
            // Counts the slot still held for an entry the LRU dropped meanwhile: the map is
            // full (the daemon never deletes a source).
            fresh.add_pending(p);
            evicted(ctx);
        }
        if let Err(e) = SOURCES.insert(&key, &fresh, 0) {
            refused(ctx, e);
            return Verdict::PassUntracked;
        }
    }
    if let Some(p) = pass {
        // The next packets of this source pass from the slot until the policy changes, an
        // allow lapses, the window ends or it is time to write the shared entry again.
        let mut slot_until = now + PASS_FLUSH_NS;
        if clock.epoch_end_ns < slot_until {
            slot_until = clock.epoch_end_ns;
        }
        if until < slot_until {
            slot_until = until;
        }
        *p = PassCacheSlot {
            addr: words,
            generation,
            until_ns: slot_until,
            verdict: verdict as u32,
            filled: 1,
            window_epoch: epoch,
            packets: 0,
            bytes: 0,
            new_tcp: 0,
            last_seen_ns: 0,
        };
    }
    verdict
}

/// The verdict a pass-cache slot stores.
#[inline(always)]
fn pass_verdict(v: u32) -> Verdict {
    if v == Verdict::PassAllowed as u32 {
        Verdict::PassAllowed
    } else if v == Verdict::PassIpv6 as u32 {
        Verdict::PassIpv6
    } else {
        Verdict::PassIpv4
    }
}

/// A full `PH_SOURCES` lost the entry of a source that is still sending (see `judge`). No
/// address is logged (the no-logging policy, docs/dns.md "Privacy").
#[inline(always)]
fn evicted(ctx: &XdpContext) {
    if events::gate(events::SOURCES_EVICTED) {
        warn!(
            ctx,
            "PH_SOURCES is full: it evicted the entry of a source still sending (the least recently seen go; datapath.max_sources sets the size)"
        );
    }
}

/// `PH_SOURCES` refused a new entry: the packet passes uncounted (`untracked`).
#[inline(always)]
fn refused(ctx: &XdpContext, error: i32) {
    if events::gate(events::SOURCES_REFUSED) {
        warn!(
            ctx,
            "PH_SOURCES refused a new source's entry (error {}): its packets pass uncounted", error
        );
    }
}

/// Adds what a pass-cache slot holds for its source to that source's entry, before the slot
/// takes another source.
#[inline(always)]
fn flush(ctx: &XdpContext, p: &mut PassCacheSlot) {
    if p.packets == 0 {
        return;
    }
    let key = SourceKey::from_words(p.addr);
    if let Some(stats) = SOURCES.get_ptr_mut(&key) {
        // SAFETY: per-CPU value: only this CPU writes it, and preemption is off in XDP.
        unsafe { (*stats).add_pending(p) };
    } else {
        // The entry was evicted since the slot was filled: the map is full.
        evicted(ctx);
        let mut fresh = SourceStats::default();
        fresh.add_pending(p);
        // A full map drops the counts, as it drops an untracked packet's.
        if let Err(e) = SOURCES.insert(&key, &fresh, 0) {
            refused(ctx, e);
        }
    }
    p.filled = 0;
    p.packets = 0;
}

/// A drop served from a cache slot holding a live deny for `addr` (of kind `net`).
#[inline(always)]
fn cached_drop(
    slot: *mut DenyCacheSlot,
    addr: [u64; 2],
    net: u32,
    generation: u64,
    now: u64,
    len: u64,
) -> Option<Verdict> {
    // SAFETY: this CPU's slot; only this CPU writes it, and XDP runs with preemption off.
    let s = unsafe { &mut *slot };
    if s.verdict != 0
        && s.net == net
        && s.generation == generation
        && s.addr == addr
        && (s.until_ns == 0 || now < s.until_ns)
    {
        s.dropped_packets += 1;
        s.dropped_bytes += len;
        return Some(if s.verdict == Verdict::DropPenalty as u32 {
            Verdict::DropPenalty
        } else {
            Verdict::DropManual
        });
    }
    None
}

/// The verdict of the IPv6 source's prefix entry, if it has a live one: a drop, or
/// `PassAllowed` with the allow's expiry (0: none). Nothing is looked up while
/// `PH_POLICY_NET` is empty.
#[inline(always)]
fn judge_prefix(words: [u64; 2], generation: u64, now: u64, len: u64) -> Option<(Verdict, u64)> {
    let cfg = GUARD_CFG.get(0)?;
    if cfg.prefix_lookup == 0 {
        return None;
    }
    let net = [words[0] & cfg.ipv6_mask[0], words[1] & cfg.ipv6_mask[1]];
    let slot = DENY_CACHE.get_ptr_mut(deny_cache_slot(net));
    if let Some(slot) = slot
        && let Some(v) = cached_drop(slot, net, 1, generation, now, len)
    {
        return Some((v, 0));
    }
    let policy = POLICY_NET.get_ptr_mut(&SourceKey::from_words(net))?;
    // SAFETY: this CPU's copy of the value; only this CPU writes it.
    let p = unsafe { &mut *policy };
    let live = |until: u64| until == 0 || now < until;
    if p.flags & POLICY_ALLOW != 0 && live(p.allow_until_ns) {
        return Some((Verdict::PassAllowed, p.allow_until_ns));
    }
    if p.flags & POLICY_DENY != 0 && live(p.deny_until_ns) {
        p.dropped_packets += 1;
        p.dropped_bytes += len;
        let verdict = Verdict::for_deny(p.deny_reason);
        if let Some(slot) = slot {
            // SAFETY: as above.
            refill(unsafe { &mut *slot }, net, 1, generation, p, verdict);
        }
        return Some((verdict, 0));
    }
    None
}

/// Puts a live deny into its cache slot. Drops the slot still counts for another (or an older)
/// entry are first folded into that entry, if it is still the same entry.
#[inline(always)]
fn refill(
    s: &mut DenyCacheSlot,
    words: [u64; 2],
    net: u32,
    generation: u64,
    p: &mut Policy,
    verdict: Verdict,
) {
    if s.verdict != 0 && s.dropped_packets != 0 {
        if s.addr == words && s.net == net && s.serial == p.serial {
            // Same entry, only a newer generation: the value in hand is it.
            p.dropped_packets += s.dropped_packets;
            p.dropped_bytes += s.dropped_bytes;
        } else {
            let key = SourceKey::from_words(s.addr);
            let old = if s.net == 0 {
                POLICY.get_ptr_mut(&key)
            } else {
                POLICY_NET.get_ptr_mut(&key)
            };
            if let Some(old) = old {
                // SAFETY: this CPU's copy of another entry.
                let old = unsafe { &mut *old };
                if old.serial == s.serial {
                    old.dropped_packets += s.dropped_packets;
                    old.dropped_bytes += s.dropped_bytes;
                }
            }
        }
    }
    *s = DenyCacheSlot {
        addr: words,
        generation,
        serial: p.serial,
        until_ns: p.deny_until_ns,
        verdict: verdict as u32,
        net,
        dropped_packets: 0,
        dropped_bytes: 0,
    };
}

#[inline(always)]
fn current_second(clock: &mut GuardClock, now: u64) -> u64 {
    period(&mut clock.second, &mut clock.second_end_ns, now, NS_PER_SEC)
}

/// `now / WINDOW_NS`, the per-source window's number.
#[inline(always)]
fn current_epoch(clock: &mut GuardClock, now: u64) -> u64 {
    period(&mut clock.epoch, &mut clock.epoch_end_ns, now, WINDOW_NS)
}

/// `now / length`, divided afresh only once `now` passes the end of the period last computed
/// (`now` never runs backwards on one CPU, see `clock::coarse_now`).
#[inline(always)]
fn period(number: &mut u64, end_ns: &mut u64, now: u64, length: u64) -> u64 {
    if now >= *end_ns {
        *number = now / length;
        *end_ns = (*number + 1) * length;
    }
    *number
}

#[inline(always)]
fn count_second(counters: &mut GuardCounters, second: u64, len: u64) {
    let s = &mut counters.seconds[(second % SECOND_SLOTS as u64) as usize];
    if s.second == second {
        s.packets += 1;
        s.bytes += len;
    } else {
        s.second = second;
        s.packets = 1;
        s.bytes = len;
    }
}

#[inline(always)]
fn read_be16(ctx: &XdpContext, offset: usize) -> Option<u16> {
    let [half] = read_halves::<1>(ctx, offset)?;
    Some(u16::from_be(half))
}

/// Reads `N` 16-bit words in memory order, with 16-bit loads: LLVM's BPF backend turns every
/// load it cannot prove aligned into single bytes (16 loads and 30 shifts for an IPv6 address).
/// Packet data starts at an even address in every XDP mode (the headroom is a multiple of 64,
/// plus NET_IP_ALIGN, which is 0 or 2), and the offsets read here are even, so the loads are
/// aligned. The verifier forbids testing a packet pointer's low bits, so this rests on that
/// kernel layout rather than on a run-time check.
#[inline(always)]
fn read_halves<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u16; N]> {
    let start = ctx.data() + offset;
    if start + 2 * N > ctx.data_end() {
        return None;
    }
    // SAFETY: in bounds (checked above); 2-byte aligned by the packet layout described above.
    Some(unsafe { core::ptr::read(start as *const [u16; N]) })
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

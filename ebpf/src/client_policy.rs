//! `tc_client_policy`: TC ingress on the VPN interface (packets from VPN clients). Client to
//! client traffic is dropped while isolation is on, and each client's ordered allow/deny rules
//! decide the rest (`phantom_common::policy::decide`, the same function `core test_policy`
//! answers with). Passed packets go on to the next program (`TCX_NEXT`).
//!
//! Rate limits and quotas: a client with an entry in `PH_CLIENT_LIMIT` has what it sends
//! metered here (after its rules) and what it receives metered by `tc_client_limit` on the
//! VPN interface's egress, each direction a token bucket (`phantom_common::policy::gcra`)
//! that drops what exceeds the rate plus the burst; the bytes passed are counted for the
//! quota, and a used-up quota drops everything (block) or holds the client to its floor rate
//! (throttle). docs/policy.md says why a bucket and not EDT pacing.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    sync::atomic::{Ordering, compiler_fence},
};

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::generated::bpf_ktime_get_coarse_ns,
    macros::{classifier, map},
    maps::{Array, PerCpuArray},
    programs::TcContext,
};
use aya_log_ebpf::info;
use phantom_common::{
    net::{ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP},
    policy::{
        ACL_ENTRIES, CLIENT_SLOTS, ClientAcl, ClientDrops, ClientLimit, LimitDir, PolicyConfig,
        PolicyVerdict, QUOTA_BLOCK, QUOTA_THROTTLE, SLOT_HAS_LIMIT, SLOT_HAS_RULES, acl_entry,
        at_limit, client_slot, decide, effective_rate, gcra,
    },
    xdp::TrafficCounter,
};

use crate::{clock, dns_filter::load, events};

/// By client slot, two entries each (`acl_entry`): the rules of the client there (when `addr`
/// is its address), in the entry the slot's flags point at. An array, not a hash by address:
/// the verifier inlines its lookup, which is 8 ns a packet less. An array's value is copied
/// over in place while packets read it, so the daemon never writes the entry in use: it
/// writes the other one, then flips the slot's side bit and adds one to its count, and a
/// packet that finds the flags changed after reading the rules decides again (`rules_verdict`).
#[map(name = "PH_CLIENT_ACL")]
static ACLS: Array<ClientAcl> = Array::pinned(ACL_ENTRIES, 0);

#[map(name = "PH_CP_CONFIG")]
static CONFIG: Array<PolicyConfig> = Array::pinned(1, 0);

#[map(name = "PH_CP_STATS")]
static STATS: PerCpuArray<TrafficCounter> = PerCpuArray::pinned(PolicyVerdict::SLOTS, 0);

/// By client slot: the limits, quota and counters of the client there (when `addr` is its
/// address). An array, not a hash by address: its lookup is inlined by the verifier, and the
/// hash lookup it replaced was a third of a metered packet's cost (docs/benchmarks.md). A
/// packet that reads an entry while the daemon copies new settings over it meets a mix of
/// old and new rates once, which is harmless.
#[map(name = "PH_CLIENT_LIMIT")]
static LIMITS: Array<ClientLimit> = Array::pinned(CLIENT_SLOTS, 0);

/// By the last two bytes of a client's address: whether a client there has rules or a limit,
/// and which of its two rule entries is in use (`SLOT_ACL_SIDE`, with a count of the flips).
/// Most clients have neither, and this one lookup (inlined by the verifier: no hashing, no
/// call) lets their packets skip the rest. The daemon sets the limit bit before it writes
/// the entry and clears it after the entry is gone, so a clear bit always means "no entry".
#[map(name = "PH_CLIENT_FLAGS")]
static FLAGS: Array<u32> = Array::pinned(CLIENT_SLOTS, 0);

/// By the same slot: the client's packets dropped by its rules and by isolation (only the
/// drop path writes here).
#[map(name = "PH_CLIENT_DROPS")]
static DROPS: Array<ClientDrops> = Array::pinned(CLIENT_SLOTS, 0);

/// Per CPU: the jiffies count and `CLOCK_MONOTONIC_COARSE` at the last read, for
/// `clock::coarse_now`. Not pinned: a cache.
#[map(name = "PH_CP_CLOCK")]
static CLOCK: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// The coarse clock, read from the helper once per tick and CPU (`clock::coarse_now`): a
/// call less per metered packet.
#[inline(always)]
fn coarse_now() -> u64 {
    let Some(clock) = CLOCK.get_ptr_mut(0) else {
        // SAFETY: the helper has no preconditions.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's value; only this CPU writes it, and TC runs with preemption off.
    let [jiffies, now_ns] = unsafe { &mut *clock };
    clock::coarse_now(jiffies, now_ns)
}

/// The limit entry of the client at `addr`, if it has one.
#[inline(always)]
fn limit_of(addr: [u8; 4]) -> Option<*mut ClientLimit> {
    let limit = LIMITS.get_ptr_mut(client_slot(addr))?;
    // SAFETY: a value pointer of an array, alive while the program runs.
    (unsafe { (*limit).addr } == addr).then_some(limit)
}

/// The flags of `addr`'s slot; a missing value (never, for an array) means "look".
#[inline(always)]
fn flags(addr: [u8; 4]) -> u32 {
    match FLAGS.get_ptr(client_slot(addr)) {
        // SAFETY: a value pointer of an array, alive while the program runs. Volatile: the
        // second read in `rules_verdict` must load again, not reuse the first.
        Some(p) => unsafe { core::ptr::read_volatile(p) },
        None => SLOT_HAS_RULES | SLOT_HAS_LIMIT,
    }
}

/// The verdict of `src`'s rules (and isolation) on a packet, read from the entry its slot's
/// `flags` point at. The flags are read again afterwards: if they changed, the daemon may
/// have started writing the entry that was read, and the packet is decided once more on the
/// new flags; a second change in that time (two rule updates within one packet) drops it.
#[inline(always)]
fn rules_verdict(
    cfg: &PolicyConfig,
    src: [u8; 4],
    mut flags: u32,
    dst: [u8; 4],
    proto: u8,
    dport: u16,
) -> PolicyVerdict {
    let slot = client_slot(src);
    let mut tries = 0;
    while tries < 2 {
        let acl = if flags & SLOT_HAS_RULES != 0 {
            // SAFETY: a value pointer of an array, read while the program runs.
            ACLS.get_ptr(acl_entry(slot, flags))
                .map(|p| unsafe { &*p })
                .filter(|acl| acl.addr == src)
        } else {
            None
        };
        let verdict = decide(cfg, acl, dst, proto, dport).0;
        if acl.is_none() {
            return verdict;
        }
        // The rules are read before the flags again, by the compiler too (the CPU does not
        // reorder loads on x86-64, and on other CPUs a daemon's next write of this entry is
        // two syscalls away: docs/policy.md).
        compiler_fence(Ordering::SeqCst);
        let again = self::flags(src);
        if again == flags {
            return verdict;
        }
        flags = again;
        tries += 1;
    }
    PolicyVerdict::Denied
}

#[inline(always)]
fn count(verdict: PolicyVerdict, len: u64) {
    if let Some(counter) = STATS.get_ptr_mut(verdict as u32) {
        // SAFETY: per-CPU slot, written only by this CPU.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += len;
        }
    }
}

#[inline(always)]
fn add(field: *mut u64, n: u64) {
    // SAFETY: a field of a map value, shared by every CPU: added atomically (BPF_ATOMIC add;
    // the bpf target's core has no fetch_add on AtomicU64).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, n) };
}

/// Meters one packet of `len` bytes in one direction of a client's entry: `None` passes.
#[inline(always)]
fn meter(limit: *mut ClientLimit, up: bool, len: u64) -> Option<PolicyVerdict> {
    // SAFETY: a value pointer from a successful lookup, alive while the program runs; the
    // plain fields are read and written without locks (a lost update of `tat` or `last_ns`
    // between two CPUs lets one packet through early: the bucket's usual imprecision).
    unsafe {
        let over = (*limit).over_quota();
        let action = (*limit).quota_action;
        let dir: *mut LimitDir = if up {
            &raw mut (*limit).up
        } else {
            &raw mut (*limit).down
        };
        if over && action == QUOTA_BLOCK {
            add(&raw mut (*limit).quota_dropped, 1);
            return Some(PolicyVerdict::OverQuota);
        }
        let q = effective_rate(&*dir, over && action == QUOTA_THROTTLE);
        if q != 0 {
            // The coarse clock (a tick, 1-10 ms) is 15 ns cheaper per packet than the exact
            // one, and a tick is small against the bucket's depth (2 s at the rate, or more).
            let now = coarse_now();
            let tat = (*dir).tat;
            let burst = (*dir).burst_bytes;
            let last = (*dir).last_ns;
            (*dir).last_ns = now;
            if last != 0 && now > last && at_limit(tat, now, q, burst) {
                let gap = now - last;
                add(
                    &raw mut (*dir).throttled_ns,
                    if gap > 1_000_000_000 {
                        1_000_000_000
                    } else {
                        gap
                    },
                );
            }
            match gcra(tat, now, len, q, burst) {
                Some(next) => (*dir).tat = next,
                None => {
                    add(&raw mut (*dir).rate_dropped, 1);
                    return Some(PolicyVerdict::RateLimited);
                }
            }
        }
        add(&raw mut (*dir).bytes, len);
    }
    None
}

#[classifier]
pub fn tc_client_policy(ctx: TcContext) -> i32 {
    let (mut verdict, src, flags, len, limits) = inspect(&ctx);
    if !verdict.drops()
        && flags & SLOT_HAS_LIMIT != 0
        && limits
        && let Some(src) = src
        && let Some(limit) = limit_of(src)
        && let Some(dropped) = meter(limit, true, len)
    {
        verdict = dropped;
    }
    if let Some(src) = src
        && matches!(verdict, PolicyVerdict::Denied | PolicyVerdict::Isolated)
    {
        count_client_drop(src, verdict);
    }
    count(verdict, ctx.len() as u64);
    if events::samples_on() && events::sample_gate(events::SAMPLE_POLICY, verdict as u32) {
        info!(
            &ctx,
            "tc_client_policy sample: {} ({} bytes)",
            verdict.name(),
            ctx.len()
        );
    }
    if verdict.drops() {
        TC_ACT_SHOT as i32
    } else {
        TC_ACT_UNSPEC
    }
}

/// TC egress on the VPN interface: what a client receives, metered against its download limit
/// and quota. Only drops are counted in `PH_CP_STATS` (the rest is counted on ingress).
#[classifier]
pub fn tc_client_limit(ctx: TcContext) -> i32 {
    let Some(cfg) = CONFIG.get(0) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: the context pointer of a TC program is its __sk_buff.
    let skb = unsafe { &*(ctx.as_ptr() as *const __sk_buff) };
    if cfg.limits == 0 || u16::from_be(skb.protocol as u16) != ETH_P_IP || cfg.l2_len > 64 {
        return TC_ACT_UNSPEC;
    }
    let l3 = cfg.l2_len as usize;
    let Some(ip) = read::<20>(&ctx, l3) else {
        return TC_ACT_UNSPEC;
    };
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    if flags(dst) & SLOT_HAS_LIMIT == 0 {
        return TC_ACT_UNSPEC;
    }
    let Some(limit) = limit_of(dst) else {
        return TC_ACT_UNSPEC;
    };
    let len = (skb.len as u64).saturating_sub(l3 as u64);
    match meter(limit, false, len) {
        None => TC_ACT_UNSPEC,
        Some(verdict) => {
            count(verdict, ctx.len() as u64);
            if events::samples_on() && events::sample_gate(events::SAMPLE_LIMIT, verdict as u32) {
                info!(
                    &ctx,
                    "tc_client_limit sample: {} ({} bytes)",
                    verdict.name(),
                    ctx.len()
                );
            }
            TC_ACT_SHOT as i32
        }
    }
}

/// Counts a packet of a client of the subnet dropped by its rules or by isolation, in its slot.
#[inline(always)]
fn count_client_drop(src: [u8; 4], verdict: PolicyVerdict) {
    let Some(cfg) = CONFIG.get(0) else {
        return;
    };
    let mask = u32::from_ne_bytes(cfg.v4_mask);
    if mask == 0 || u32::from_ne_bytes(src) & mask != u32::from_ne_bytes(cfg.v4_net) {
        return;
    }
    if let Some(drops) = DROPS.get_ptr_mut(client_slot(src)) {
        // SAFETY: a value pointer from a successful lookup; fields shared by every CPU.
        let field = unsafe {
            if verdict == PolicyVerdict::Denied {
                &raw mut (*drops).denied
            } else {
                &raw mut (*drops).isolated
            }
        };
        add(field, 1);
    }
}

/// `N` bytes at `offset` of the packet: straight from its linear part when they are there
/// (the common case: headers), else through the helper.
#[inline(always)]
fn read<const N: usize>(ctx: &TcContext, offset: usize) -> Option<[u8; N]> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if offset <= 128 && start + offset + N <= end {
        // SAFETY: bounds checked against data_end just above.
        return Some(unsafe { *((start + offset) as *const [u8; N]) });
    }
    load::<N>(ctx, offset)
}

/// The rules' verdict, the client's address, its slot's flags and the IP packet's length (when
/// IPv4), and whether any client has a limit or quota.
#[inline(always)]
fn inspect(ctx: &TcContext) -> (PolicyVerdict, Option<[u8; 4]>, u32, u64, bool) {
    let Some(cfg) = CONFIG.get(0) else {
        return (PolicyVerdict::NotInspected, None, 0, 0, false);
    };
    let limits = cfg.limits != 0;
    // SAFETY: the context pointer of a TC program is its __sk_buff.
    let skb = unsafe { &*(ctx.as_ptr() as *const __sk_buff) };
    if u16::from_be(skb.protocol as u16) != ETH_P_IP || cfg.l2_len > 64 {
        return (PolicyVerdict::NotInspected, None, 0, 0, false);
    }
    let l3 = cfg.l2_len as usize;
    let Some(ip) = read::<20>(ctx, l3) else {
        return (PolicyVerdict::NotInspected, None, 0, 0, false);
    };
    let src = [ip[12], ip[13], ip[14], ip[15]];
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    let proto = ip[9];
    // The whole packet, every segment of a GSO one.
    let len = (skb.len as u64).saturating_sub(l3 as u64);
    let flags = flags(src);
    if flags & SLOT_HAS_RULES == 0 && cfg.isolate == 0 {
        return (PolicyVerdict::NoMatch, Some(src), flags, len, limits);
    }
    let mut dport = 0u16;
    if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        // Later fragments carry no port: judged as portless (only full-range rules match).
        let first_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff == 0;
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        if first_fragment && ihl >= 20 {
            if let Some(ports) = read::<4>(ctx, (l3 + ihl) & 0xff) {
                dport = u16::from_be_bytes([ports[2], ports[3]]);
            }
        }
    }
    (
        rules_verdict(cfg, src, flags, dst, proto, dport),
        Some(src),
        flags,
        len,
        limits,
    )
}

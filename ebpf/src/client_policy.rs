//! `tc_client_policy`: TC ingress on the VPN interface (packets from VPN clients). Client to
//! client traffic is dropped while isolation is on, and each client's ordered allow/deny rules
//! decide the rest (`phantom_common::policy::decide`, the same function `core test_policy`
//! answers with). Passed packets go on to the next program (`TCX_NEXT`).

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::TcContext,
};
use phantom_common::{
    net::{ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP},
    policy::{ClientAcl, MAX_ACL_CLIENTS, PolicyConfig, PolicyVerdict, decide},
    xdp::TrafficCounter,
};

use crate::dns_filter::load;

const BPF_F_NO_PREALLOC: u32 = 1;

/// Client address (network byte order) -> its rules.
#[map(name = "PH_CLIENT_ACL")]
static ACLS: HashMap<[u8; 4], ClientAcl> = HashMap::pinned(MAX_ACL_CLIENTS, BPF_F_NO_PREALLOC);

#[map(name = "PH_CP_CONFIG")]
static CONFIG: Array<PolicyConfig> = Array::pinned(1, 0);

#[map(name = "PH_CP_STATS")]
static STATS: PerCpuArray<TrafficCounter> = PerCpuArray::pinned(PolicyVerdict::SLOTS, 0);

#[classifier]
pub fn tc_client_policy(ctx: TcContext) -> i32 {
    let verdict = inspect(&ctx);
    if let Some(counter) = STATS.get_ptr_mut(verdict as u32) {
        // SAFETY: per-CPU slot, written only by this CPU.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += ctx.len() as u64;
        }
    }
    if verdict.drops() {
        TC_ACT_SHOT as i32
    } else {
        TC_ACT_UNSPEC
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

#[inline(always)]
fn inspect(ctx: &TcContext) -> PolicyVerdict {
    let Some(cfg) = CONFIG.get(0) else {
        return PolicyVerdict::NotInspected;
    };
    // SAFETY: the context pointer of a TC program is its __sk_buff.
    let skb = unsafe { &*(ctx.as_ptr() as *const __sk_buff) };
    if u16::from_be(skb.protocol as u16) != ETH_P_IP || cfg.l2_len > 64 {
        return PolicyVerdict::NotInspected;
    }
    let l3 = cfg.l2_len as usize;
    let Some(ip) = read::<20>(ctx, l3) else {
        return PolicyVerdict::NotInspected;
    };
    let src = [ip[12], ip[13], ip[14], ip[15]];
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    let proto = ip[9];
    let acl = ACLS.get_ptr(&src);
    if acl.is_none() && cfg.isolate == 0 {
        return PolicyVerdict::NoMatch;
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
    // SAFETY: a value pointer from a successful lookup, read while the program runs.
    let acl = acl.map(|p| unsafe { &*p });
    decide(cfg, acl, dst, proto, dport).0
}

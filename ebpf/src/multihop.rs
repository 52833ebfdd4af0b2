//! `tc_multihop_mark`: TC ingress on the VPN interface. While multihop is on, packets from the
//! client subnet to anything that is neither another client nor the server itself get the
//! configured skb mark, which an `ip rule fwmark` sends to the exit's routing table. The mark
//! is set on ingress because the kernel clears it when a packet changes namespace and egress
//! runs after routing.

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, TC_ACT_UNSPEC},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::TcContext,
};
use aya_log_ebpf::info;
use phantom_common::{
    dns::{IfaceInfo, MarkVerdict, MultihopConfig},
    net::{ETH_P_IP, ETH_P_IPV6},
    xdp::{SourceKey, TrafficCounter},
};

use crate::{
    dns_filter::{IFACES, load},
    events,
};

#[map(name = "PH_MULTIHOP")]
static MULTIHOP: Array<MultihopConfig> = Array::pinned(1, 0);

/// The server's own addresses: traffic to them stays local.
#[map(name = "PH_MH_LOCAL")]
static LOCAL: HashMap<SourceKey, u8> = HashMap::pinned(256, 0);

#[map(name = "PH_MH_STATS")]
static STATS: PerCpuArray<TrafficCounter> = PerCpuArray::pinned(MarkVerdict::SLOTS, 0);

#[classifier]
pub fn tc_multihop_mark(ctx: TcContext) -> i32 {
    let verdict = decide(&ctx);
    if let Some(counter) = STATS.get_ptr_mut(verdict as u32) {
        // SAFETY: per-CPU slot, written only by this CPU.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += ctx.len() as u64;
        }
    }
    if events::samples_on() && events::sample_gate(events::SAMPLE_MULTIHOP, verdict as u32) {
        info!(
            &ctx,
            "tc_multihop_mark sample: {} ({} bytes)",
            verdict.name(),
            ctx.len()
        );
    }
    // TCX_NEXT: the mark is set; the other programs on the hook still see the packet (and
    // the last one's "next" lets it pass).
    TC_ACT_UNSPEC
}

#[inline(always)]
fn in_v4(addr: [u8; 4], net: [u8; 4], mask: [u8; 4]) -> bool {
    u32::from_ne_bytes(mask) != 0
        && u32::from_ne_bytes(addr) & u32::from_ne_bytes(mask) == u32::from_ne_bytes(net)
}

#[inline(always)]
fn in_v6(addr: &[u8; 16], net: &[u8; 16], prefix_len: u32) -> bool {
    if prefix_len == 0 || prefix_len > 128 {
        return false;
    }
    let a = u128::from_be_bytes(*addr);
    let n = u128::from_be_bytes(*net);
    let mask = u128::MAX << (128 - prefix_len);
    a & mask == n & mask
}

#[inline(always)]
fn decide(ctx: &TcContext) -> MarkVerdict {
    let Some(cfg) = MULTIHOP.get(0) else {
        return MarkVerdict::Disabled;
    };
    if cfg.enabled == 0 {
        return MarkVerdict::Disabled;
    }
    // SAFETY: the context pointer of a TC program is its __sk_buff.
    let skb = unsafe { &*(ctx.as_ptr() as *const __sk_buff) };
    // Map keys must live on the stack, not in the context.
    let ifindex = skb.ifindex;
    let l3 = match IFACES.get_ptr(&ifindex) {
        // SAFETY: a value pointer from a successful lookup.
        Some(info) => match unsafe { *info } {
            IfaceInfo { l2_len } if l2_len <= 64 => l2_len as usize,
            _ => return MarkVerdict::NotClient,
        },
        None => return MarkVerdict::NotClient,
    };
    let (client, dst_key, same_subnet) = match u16::from_be(skb.protocol as u16) {
        ETH_P_IP => {
            let Some(ip) = load::<20>(ctx, l3) else {
                return MarkVerdict::NotClient;
            };
            let src = [ip[12], ip[13], ip[14], ip[15]];
            let dst = [ip[16], ip[17], ip[18], ip[19]];
            (
                in_v4(src, cfg.v4_net, cfg.v4_mask),
                SourceKey::from_ipv4(dst),
                in_v4(dst, cfg.v4_net, cfg.v4_mask),
            )
        }
        ETH_P_IPV6 => {
            let Some(ip) = load::<40>(ctx, l3) else {
                return MarkVerdict::NotClient;
            };
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&ip[8..24]);
            dst.copy_from_slice(&ip[24..40]);
            (
                in_v6(&src, &cfg.v6_net, cfg.v6_prefix_len),
                SourceKey::from_ipv6(dst),
                in_v6(&dst, &cfg.v6_net, cfg.v6_prefix_len),
            )
        }
        _ => return MarkVerdict::NotClient,
    };
    if !client {
        return MarkVerdict::NotClient;
    }
    if same_subnet {
        return MarkVerdict::ClientToClient;
    }
    if LOCAL.get_ptr(&dst_key).is_some() {
        return MarkVerdict::Local;
    }
    ctx.set_mark(cfg.mark);
    MarkVerdict::Marked
}

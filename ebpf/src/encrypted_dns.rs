//! `tc_encrypted_dns`: TC ingress on the VPN interface (packets from VPN clients). Encrypted DNS
//! to anyone but Phantom's resolver is dropped, so browsers and phones fall back to the
//! resolver, where the blocklist applies: TCP/853 (DoT) and UDP/853 (DoQ) to any address but
//! the resolver's, and TCP/443 and UDP/443 to the prefixes of known DoH resolvers (an LPM trie
//! per family). Everything else goes on to the next program (`TCX_NEXT`), so the order of the
//! programs on the hook does not matter.

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::{classifier, map},
    maps::{
        Array, HashMap, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::TcContext,
};
use phantom_common::{
    dns::{
        EncryptedDnsConfig, EncryptedDnsVerdict, IfaceInfo, MAX_DOH_PREFIXES, MAX_RESOLVER_ADDRS,
    },
    net::{ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP},
    xdp::{SourceKey, TrafficCounter},
};

use crate::dns_filter::{IFACES, load};

const BPF_F_NO_PREALLOC: u32 = 1;
const DOT_PORT: u16 = 853;
const HTTPS_PORT: u16 = 443;

#[map(name = "PH_ENC_DNS")]
static CONFIG: Array<EncryptedDnsConfig> = Array::pinned(1, 0);

/// Phantom's own resolver addresses: port 853 to them passes.
#[map(name = "PH_ENC_DNS_RESOLVERS")]
static RESOLVERS: HashMap<SourceKey, u8> = HashMap::pinned(MAX_RESOLVER_ADDRS, 0);

/// Known DoH resolvers, IPv4 prefixes.
#[map(name = "PH_DOH_V4")]
static DOH_V4: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(MAX_DOH_PREFIXES, BPF_F_NO_PREALLOC);

/// Known DoH resolvers, IPv6 prefixes.
#[map(name = "PH_DOH_V6")]
static DOH_V6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(MAX_DOH_PREFIXES, BPF_F_NO_PREALLOC);

#[map(name = "PH_ENC_DNS_STATS")]
static STATS: PerCpuArray<TrafficCounter> = PerCpuArray::pinned(EncryptedDnsVerdict::SLOTS, 0);

#[classifier]
pub fn tc_encrypted_dns(ctx: TcContext) -> i32 {
    let verdict = decide(&ctx);
    if let Some(counter) = STATS.get_ptr_mut(verdict as u32) {
        // SAFETY: per-CPU slot, written only by this CPU.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += ctx.len() as u64;
        }
    }
    match verdict {
        EncryptedDnsVerdict::Passed | EncryptedDnsVerdict::ToResolver => TC_ACT_UNSPEC,
        _ => TC_ACT_SHOT as i32,
    }
}

/// Where the destination is, for the two lookups.
enum Dst {
    V4([u8; 4]),
    V6([u8; 16]),
}

#[inline(always)]
fn decide(ctx: &TcContext) -> EncryptedDnsVerdict {
    let Some(cfg) = CONFIG.get(0) else {
        return EncryptedDnsVerdict::Passed;
    };
    if cfg.drop_dot_doq == 0 && cfg.drop_doh == 0 {
        return EncryptedDnsVerdict::Passed;
    }
    // SAFETY: the context pointer of a TC program is its __sk_buff.
    let skb = unsafe { &*(ctx.as_ptr() as *const __sk_buff) };
    let ifindex = skb.ifindex;
    let l3 = match IFACES.get_ptr(&ifindex) {
        // SAFETY: a value pointer from a successful lookup.
        Some(info) => match unsafe { *info } {
            IfaceInfo { l2_len } if l2_len <= 64 => l2_len as usize,
            _ => return EncryptedDnsVerdict::Passed,
        },
        None => return EncryptedDnsVerdict::Passed,
    };
    let (proto, l4, dst) = match u16::from_be(skb.protocol as u16) {
        ETH_P_IP => {
            let Some(ip) = load::<20>(ctx, l3) else {
                return EncryptedDnsVerdict::Passed;
            };
            // Later fragments carry no port.
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
                return EncryptedDnsVerdict::Passed;
            }
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            if ihl < 20 {
                return EncryptedDnsVerdict::Passed;
            }
            (ip[9], l3 + ihl, Dst::V4([ip[16], ip[17], ip[18], ip[19]]))
        }
        ETH_P_IPV6 => {
            let Some(ip) = load::<40>(ctx, l3) else {
                return EncryptedDnsVerdict::Passed;
            };
            let mut dst = [0u8; 16];
            dst.copy_from_slice(&ip[24..40]);
            // Extension headers are not walked: TCP or UDP right after the fixed header.
            (ip[6], l3 + 40, Dst::V6(dst))
        }
        _ => return EncryptedDnsVerdict::Passed,
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return EncryptedDnsVerdict::Passed;
    }
    let Some(ports) = load::<4>(ctx, l4 & 0xfff) else {
        return EncryptedDnsVerdict::Passed;
    };
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    let tcp = proto == IPPROTO_TCP;
    if dport == DOT_PORT && cfg.drop_dot_doq != 0 {
        let key = match dst {
            Dst::V4(a) => SourceKey::from_ipv4(a),
            Dst::V6(a) => SourceKey::from_ipv6(a),
        };
        if RESOLVERS.get_ptr(&key).is_some() {
            return EncryptedDnsVerdict::ToResolver;
        }
        return if tcp {
            EncryptedDnsVerdict::DotDropped
        } else {
            EncryptedDnsVerdict::DoqDropped
        };
    }
    if dport == HTTPS_PORT && cfg.drop_doh != 0 {
        let listed = match dst {
            Dst::V4(a) => DOH_V4.get(&Key::new(32, a)).is_some(),
            Dst::V6(a) => DOH_V6.get(&Key::new(128, a)).is_some(),
        };
        if listed {
            return if tcp {
                EncryptedDnsVerdict::DohTcpDropped
            } else {
                EncryptedDnsVerdict::DohUdpDropped
            };
        }
    }
    EncryptedDnsVerdict::Passed
}

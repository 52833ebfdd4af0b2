//! `tc_encrypted_dns`: TC ingress on the VPN interface (packets from VPN clients). Encrypted DNS
//! to anyone but Phantom's resolver is dropped, so browsers and phones fall back to the
//! resolver, where the blocklist applies: TCP/853 (DoT) and UDP/853 (DoQ) to any address but
//! the resolver's, and TCP/443 and UDP/443 to the prefixes of known DoH resolvers (an LPM trie
//! per family). TCP/443 segments that start a TLS ClientHello go to the SNI filter
//! (`crate::sni`), and in strict mode UDP/443 (QUIC) is dropped. Everything else goes on to the
//! next program (`TCX_NEXT`), so the order of the programs on the hook does not matter.

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
use aya_log_ebpf::info;
use phantom_common::{
    dns::{
        EncryptedDnsConfig, EncryptedDnsVerdict, IfaceInfo, MAX_DOH_PREFIXES, MAX_RESOLVER_ADDRS,
        SniConfig, SniVerdict,
    },
    net::{ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP},
    xdp::{SourceKey, TrafficCounter},
};

use crate::{dns_filter::IFACES, events, sni};

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

/// The SNI filter's switches (index 0).
#[map(name = "PH_SNI")]
static SNI_CONFIG: Array<SniConfig> = Array::pinned(1, 0);

/// ClientHellos and QUIC datagrams per SNI verdict.
#[map(name = "PH_SNI_STATS")]
static SNI_STATS: PerCpuArray<TrafficCounter> = PerCpuArray::pinned(SniVerdict::SLOTS, 0);

/// Which filter decided, and what.
enum Outcome {
    Dns(EncryptedDnsVerdict),
    Sni(SniVerdict),
}

#[inline(always)]
fn count(stats: &PerCpuArray<TrafficCounter>, slot: u32, len: u64) {
    if let Some(counter) = stats.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, written only by this CPU.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += len;
        }
    }
}

#[classifier]
pub fn tc_encrypted_dns(ctx: TcContext) -> i32 {
    let len = ctx.len() as u64;
    match decide(&ctx) {
        Outcome::Dns(verdict) => {
            count(&STATS, verdict as u32, len);
            if events::samples_on() && events::sample_gate(events::SAMPLE_ENC_DNS, verdict as u32) {
                info!(
                    &ctx,
                    "tc_encrypted_dns sample: {} ({} bytes)",
                    verdict.name(),
                    len
                );
            }
            match verdict {
                EncryptedDnsVerdict::Passed | EncryptedDnsVerdict::ToResolver => TC_ACT_UNSPEC,
                _ => TC_ACT_SHOT as i32,
            }
        }
        Outcome::Sni(verdict) => {
            count(&SNI_STATS, verdict as u32, len);
            if events::samples_on() && events::sample_gate(events::SAMPLE_SNI, verdict as u32) {
                info!(
                    &ctx,
                    "tc_encrypted_dns SNI sample: {} ({} bytes)",
                    verdict.name(),
                    len
                );
            }
            match verdict {
                SniVerdict::Dropped | SniVerdict::EchDropped | SniVerdict::QuicDropped => {
                    TC_ACT_SHOT as i32
                }
                _ => TC_ACT_UNSPEC,
            }
        }
    }
}

/// Where the destination is, for the two lookups.
enum Dst {
    V4([u8; 4]),
    V6([u8; 16]),
}

#[inline(always)]
fn decide(ctx: &TcContext) -> Outcome {
    let cfg = CONFIG.get(0).copied().unwrap_or_default();
    let sni = SNI_CONFIG.get(0).copied().unwrap_or_default();
    let pass = Outcome::Dns(EncryptedDnsVerdict::Passed);
    if cfg.drop_dot_doq == 0 && cfg.drop_doh == 0 && sni.drop_blocked == 0 && sni.strict == 0 {
        return pass;
    }
    // SAFETY: the context pointer of a TC program is its __sk_buff.
    let skb = unsafe { &*(ctx.as_ptr() as *const __sk_buff) };
    let ifindex = skb.ifindex;
    let l3 = match IFACES.get_ptr(&ifindex) {
        // SAFETY: a value pointer from a successful lookup.
        Some(info) => match unsafe { *info } {
            IfaceInfo { l2_len } if l2_len <= 64 => l2_len as usize,
            _ => return pass,
        },
        None => return pass,
    };
    // `end`: where the IP packet ends (an Ethernet frame may be padded past it).
    let (proto, l4, dst, end) = match u16::from_be(skb.protocol as u16) {
        ETH_P_IP => {
            let Some(ip) = sni::peek::<20>(ctx, l3) else {
                return pass;
            };
            // Later fragments carry no port.
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
                return pass;
            }
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            if ihl < 20 {
                return pass;
            }
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            (
                ip[9],
                l3 + ihl,
                Dst::V4([ip[16], ip[17], ip[18], ip[19]]),
                l3 + total,
            )
        }
        ETH_P_IPV6 => {
            let Some(ip) = sni::peek::<8>(ctx, l3) else {
                return pass;
            };
            let Some(dst) = sni::peek::<16>(ctx, l3 + 24) else {
                return pass;
            };
            let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            // Extension headers are not walked: TCP or UDP right after the fixed header.
            (ip[6], l3 + 40, Dst::V6(dst), l3 + 40 + payload)
        }
        _ => return pass,
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return pass;
    }
    let Some(ports) = sni::peek::<4>(ctx, l4) else {
        return pass;
    };
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    let tcp = proto == IPPROTO_TCP;
    if dport == DOT_PORT && cfg.drop_dot_doq != 0 {
        let key = match dst {
            Dst::V4(a) => SourceKey::from_ipv4(a),
            Dst::V6(a) => SourceKey::from_ipv6(a),
        };
        if RESOLVERS.get_ptr(&key).is_some() {
            return Outcome::Dns(EncryptedDnsVerdict::ToResolver);
        }
        return Outcome::Dns(if tcp {
            EncryptedDnsVerdict::DotDropped
        } else {
            EncryptedDnsVerdict::DoqDropped
        });
    }
    if dport != HTTPS_PORT {
        return pass;
    }
    let ipv6 = matches!(dst, Dst::V6(_));
    if cfg.drop_doh != 0 {
        let listed = match dst {
            Dst::V4(a) => DOH_V4.get(&Key::new(32, a)).is_some(),
            Dst::V6(a) => DOH_V6.get(&Key::new(128, a)).is_some(),
        };
        if listed {
            return Outcome::Dns(if tcp {
                EncryptedDnsVerdict::DohTcpDropped
            } else {
                EncryptedDnsVerdict::DohUdpDropped
            });
        }
    }
    if !tcp {
        return if sni.strict != 0 {
            Outcome::Sni(SniVerdict::QuicDropped)
        } else {
            pass
        };
    }
    if sni.drop_blocked == 0 && sni.strict == 0 {
        return pass;
    }
    // A ClientHello: TCP payload that starts a TLS handshake record with one.
    let Some(offset) = sni::peek::<2>(ctx, l4 + 12) else {
        return pass;
    };
    let payload = l4 + ((offset[0] >> 4) as usize) * 4;
    if end <= payload + 6 {
        return pass;
    }
    let Some(head) = sni::peek::<6>(ctx, payload) else {
        return pass;
    };
    if !sni::is_client_hello(&head) {
        return pass;
    }
    Outcome::Sni(sni::client_hello(
        ctx,
        payload,
        end - payload,
        l3,
        ipv6,
        &sni,
    ))
}

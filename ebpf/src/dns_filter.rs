//! `tc_dns_filter`: TC egress on the VPN interface. DNS answers going to VPN clients whose
//! question is blocked are rewritten in place to NXDOMAIN, so clients that bypass Phantom's
//! resolver are filtered too. Anything it cannot parse passes untouched.

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, TC_ACT_UNSPEC},
    cty::c_void,
    helpers::generated::{bpf_csum_diff, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::TcContext,
};
use aya_log_ebpf::{info, warn};
use phantom_common::{
    dns::{
        ClientAddr, DEFAULT_MAX_DOMAINS, DOMAIN_SUBDOMAINS, DnsPolicy, DnsVerdict, DomainKey,
        IfaceInfo, MAX_EXEMPT_CLIENTS,
    },
    dns_filter::{
        DNS_HLEN, NAME_AREA, SCRATCH_LEN, header_verdict, is_blocked, normalise_name,
        nxdomain_header, rewritten_len,
    },
    net::{ETH_P_IP, ETH_P_IPV6, IPPROTO_UDP, UDP_HLEN},
    xdp::TrafficCounter,
};

use crate::events;

const BPF_F_NO_PREALLOC: u32 = 1;

/// Blocked domains: `DomainKey::hash(name)` -> `DOMAIN_EXACT` | `DOMAIN_SUBDOMAINS`.
#[map(name = "PH_DOMAINS")]
pub(crate) static DOMAINS: HashMap<u64, u8> =
    HashMap::pinned(DEFAULT_MAX_DOMAINS, BPF_F_NO_PREALLOC);

/// The installation's key of the domain hash (index 0), written by the daemon before it fills
/// `PH_DOMAINS`.
#[map(name = "PH_DNS_KEY")]
pub(crate) static DNS_KEY: Array<DomainKey> = Array::pinned(1, 0);

#[map(name = "PH_DNS_VERDICTS")]
static DNS_VERDICTS: PerCpuArray<TrafficCounter> = PerCpuArray::pinned(DnsVerdict::SLOTS, 0);

/// Dry run and the own resolver's mark (index 0), written by the daemon.
#[map(name = "PH_DNS_POLICY")]
pub(crate) static POLICY: Array<DnsPolicy> = Array::pinned(1, 0);

/// Clients with blocking switched off: answers going to them pass.
#[map(name = "PH_DNS_EXEMPT")]
pub(crate) static EXEMPT: HashMap<ClientAddr, u8> =
    HashMap::pinned(MAX_EXEMPT_CLIENTS, BPF_F_NO_PREALLOC);

/// ifindex -> link-layer header length, written by the daemon before it attaches.
#[map(name = "PH_IFACES")]
pub(crate) static IFACES: HashMap<u32, IfaceInfo> = HashMap::pinned(256, 0);

/// Where the pseudo-header is built for the checksum.
const PSEUDO_AT: usize = 320;
/// Where `launder` parks a value.
const SEED_AT: usize = 480;
/// Where `filter` parks the packet's layout across the walks over the name.
const L3_AT: usize = 400;
const L4_AT: usize = 408;
const IPV6_AT: usize = 416;
/// Where `filter` parks how much of the name was copied.
const COPIED_AT: usize = 424;

#[repr(C)]
pub struct Scratch {
    buf: [u8; SCRATCH_LEN],
}

#[map(name = "PH_DNS_SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

const DNS_PORT: u16 = 53;

#[classifier]
pub fn tc_dns_filter(ctx: TcContext) -> i32 {
    let len = ctx.len() as u64;
    if let Some(verdict) = filter(&ctx) {
        if let Some(counter) = DNS_VERDICTS.get_ptr_mut(verdict as u32) {
            // SAFETY: per-CPU slot, written only by this CPU.
            unsafe {
                (*counter).packets += 1;
                (*counter).bytes += len;
            }
        }
        // The rare events, logged once for all the branches that give them: a log record on
        // each of the walk's exits would be verified once per exit state (the start of the
        // daemon slowed by seconds).
        if verdict == DnsVerdict::Unparsable && events::gate(events::DNS_UNPARSABLE) {
            info!(
                &ctx,
                "tc_dns_filter: malformed DNS answer skipped ({} bytes); passed unchanged", len
            );
        } else if verdict == DnsVerdict::RewriteFailed && events::gate(events::DNS_REWRITE_FAILED) {
            warn!(
                &ctx,
                "tc_dns_filter: could not rewrite an answer to a blocked question ({} bytes); passed unchanged",
                len
            );
        }
        if events::samples_on() && events::sample_gate(events::SAMPLE_DNS, verdict as u32) {
            info!(
                &ctx,
                "tc_dns_filter sample: {} ({} bytes)",
                verdict.name(),
                len
            );
        }
    }
    // TCX_NEXT: the other programs on the hook (the download limit) still see the packet.
    TC_ACT_UNSPEC
}

/// Where the headers are, once the packet is known to be UDP from port 53.
struct Layout {
    l3: usize,
    l4: usize,
    ipv6: bool,
}

/// Exactly `N` bytes at `offset`, or `None` past the end of the packet.
#[inline(always)]
pub(crate) fn load<const N: usize>(ctx: &TcContext, offset: usize) -> Option<[u8; N]> {
    // Not zeroed first: the helper fills all N bytes or fails (and zeroes them), and the
    // verifier accepts uninitialised stack for it. A zeroed array cost a byte-wise `memset`
    // subprogram call (four instructions per byte) on every packet.
    let mut out = core::mem::MaybeUninit::<[u8; N]>::uninit();
    // SAFETY: `out` is N writable bytes; the helper checks the packet bounds.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr(),
            offset as u32,
            out.as_mut_ptr() as *mut c_void,
            N as u32,
        )
    };
    // SAFETY: on success the helper wrote all N bytes.
    (ret == 0).then(|| unsafe { out.assume_init() })
}

/// Copies up to `max` (at most the buffer) bytes at `offset` into `buf`; returns how many.
#[inline(always)]
fn load_prefix(
    ctx: &TcContext,
    offset: usize,
    buf: &mut [u8; SCRATCH_LEN],
    max: usize,
) -> Option<usize> {
    let avail = (ctx.len() as usize).checked_sub(offset)?;
    let mut n = if avail > max { max } else { avail };
    if n > NAME_AREA + 64 {
        n = NAME_AREA + 64;
    }
    if n == 0 {
        return None;
    }
    // Spelled so that the verifier, too, sees 1 <= len <= SCRATCH_LEN (it is n itself). The
    // volatile read keeps LLVM from folding the mask away using the range it already knows.
    // SAFETY: reading a local.
    let n = unsafe { core::ptr::read_volatile(&n) } as u32;
    let len = ((n.wrapping_sub(1)) & (SCRATCH_LEN as u32 - 1)) + 1;
    // SAFETY: 1 <= len <= SCRATCH_LEN; the helper checks the packet bounds.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr(),
            offset as u32,
            buf.as_mut_ptr() as *mut c_void,
            len,
        )
    };
    (ret == 0).then_some(n as usize)
}

/// `None` when the packet is not a UDP datagram from port 53 (not counted at all).
#[inline(always)]
fn filter(ctx: &TcContext) -> Option<DnsVerdict> {
    let layout = locate(ctx)?;
    // SAFETY: the context pointer of a TC program is its __sk_buff.
    let mark = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).mark };
    if let Some(policy) = POLICY.get(0)
        && policy.resolver_mark != 0
        && mark == policy.resolver_mark
    {
        return Some(DnsVerdict::OwnResolver);
    }
    let dns = layout.l4 + UDP_HLEN;
    let Some(header) = load::<DNS_HLEN>(ctx, dns) else {
        return Some(DnsVerdict::Unparsable);
    };
    // QR must be set (a response), the opcode QUERY, and exactly one question. The steps
    // from here on are phantom_common::dns_filter's, in the order of its `decide` (the
    // userspace model the fuzz crate checks).
    if let Some(verdict) = header_verdict(&header) {
        return Some(verdict);
    }
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the per-CPU scratch value lives as long as this program run, on this CPU only.
    let buf = unsafe { &mut (*scratch).buf };
    let qname = dns + DNS_HLEN;
    let Some(copied) = load_prefix(ctx, qname, buf, NAME_AREA) else {
        return Some(DnsVerdict::Unparsable);
    };
    // The two walks over the name (`normalise_name`, `is_blocked`: 256 steps each) are
    // verified once for every distinct state that reaches them, and the paths here differ in
    // what the verifier knows (IPv4 or IPv6, the length copied, each a constant on some
    // paths): over forty walks of each, 985,000 of the kernel's limit of 1,000,000 verified
    // instructions and over a second of every start. Parked in the scratch map, which the
    // verifier does not track, and read back after the walks, they reach them as one state.
    let copied = launder_at(buf, COPIED_AT, copied as u64) as usize;
    launder_at(buf, L3_AT, layout.l3 as u64);
    launder_at(buf, L4_AT, layout.l4 as u64);
    launder_at(buf, IPV6_AT, layout.ipv6 as u64);
    let Some(name_end) = normalise_name(buf, copied) else {
        return Some(DnsVerdict::Unparsable);
    };
    // One verifier path from here on, whatever the name's length (see `launder_at`).
    let name_end = launder(buf, name_end as u64) as usize;
    if name_end == 0 || name_end >= NAME_AREA {
        return Some(DnsVerdict::Unparsable);
    }
    let layout = Layout {
        l3: unpark(buf, L3_AT) as usize,
        l4: unpark(buf, L4_AT) as usize,
        ipv6: unpark(buf, IPV6_AT) != 0,
    };
    let dns = layout.l4 + UDP_HLEN;
    // QTYPE and QCLASS must follow the name.
    let dns_len = rewritten_len(name_end);
    if (ctx.len() as usize) < dns + dns_len {
        return Some(DnsVerdict::Unparsable);
    }
    let Some(key) = DNS_KEY.get_ptr(0) else {
        return Some(DnsVerdict::Passed);
    };
    let blocks_subdomains = |hash: u64| match DOMAINS.get_ptr(&hash) {
        Some(flags) => {
            // SAFETY: a value pointer from a successful lookup.
            let flags = unsafe { *flags };
            flags & DOMAIN_SUBDOMAINS != 0
        }
        None => false,
    };
    let has = |hash: u64| DOMAINS.get_ptr(&hash).is_some();
    // SAFETY: a value pointer from a successful lookup.
    if !unsafe { is_blocked(buf, name_end, key, blocks_subdomains, has) } {
        return Some(DnsVerdict::Passed);
    }
    // Read again rather than kept from the start: kept, it would be part of the walks' state.
    let policy = POLICY.get(0).copied().unwrap_or_default();
    if policy.exempt_clients != 0 && is_exempt(ctx, &layout) {
        return Some(DnsVerdict::Exempt);
    }
    if policy.dry_run != 0 {
        return Some(DnsVerdict::DryRun);
    }
    match rewrite(ctx, &layout, header, dns_len, buf) {
        Some(()) => Some(DnsVerdict::Rewritten),
        None => Some(DnsVerdict::RewriteFailed),
    }
}

/// True when the answer goes to a client with blocking switched off.
#[inline(always)]
fn is_exempt(ctx: &TcContext, layout: &Layout) -> bool {
    let mut key: ClientAddr = [0; 16];
    if layout.ipv6 {
        match load::<16>(ctx, layout.l3 + 24) {
            Some(a) => key = a,
            None => return false,
        }
    } else {
        match load::<4>(ctx, layout.l3 + 16) {
            Some(a) => {
                key[10] = 0xff;
                key[11] = 0xff;
                key[12..].copy_from_slice(&a);
            }
            None => return false,
        }
    }
    // SAFETY: a lookup by a stack key; the value is not read.
    unsafe { EXEMPT.get(&key) }.is_some()
}

#[inline(always)]
fn locate(ctx: &TcContext) -> Option<Layout> {
    // SAFETY: the context pointer of a TC program is its __sk_buff.
    let skb = unsafe { &*(ctx.as_ptr() as *const __sk_buff) };
    // Map keys must live on the stack, not in the context.
    let ifindex = skb.ifindex;
    let l2 = IFACES.get_ptr(&ifindex)?;
    // SAFETY: a value pointer from a successful lookup.
    let l3 = unsafe { (*l2).l2_len } as usize;
    if l3 > 64 {
        return None;
    }
    let protocol = u16::from_be(skb.protocol as u16);
    match protocol {
        ETH_P_IP => {
            let ip = load::<20>(ctx, l3)?;
            if ip[0] >> 4 != 4 || ip[9] != IPPROTO_UDP {
                return None;
            }
            // Fragments other than a whole datagram are left alone.
            if (ip[6] & 0x3f) != 0 || ip[7] != 0 {
                return None;
            }
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            if ihl < 20 {
                return None;
            }
            let l4 = l3 + ihl;
            let udp = load::<4>(ctx, l4)?;
            (u16::from_be_bytes([udp[0], udp[1]]) == DNS_PORT).then_some(Layout {
                l3,
                l4,
                ipv6: false,
            })
        }
        ETH_P_IPV6 => {
            let ip = load::<8>(ctx, l3)?;
            if ip[0] >> 4 != 6 || ip[6] != IPPROTO_UDP {
                return None;
            }
            let l4 = l3 + 40;
            let udp = load::<4>(ctx, l4)?;
            (u16::from_be_bytes([udp[0], udp[1]]) == DNS_PORT).then_some(Layout {
                l3,
                l4,
                ipv6: true,
            })
        }
        _ => None,
    }
}

/// Returns `v` after a round trip through the scratch map, which the verifier does not track.
#[inline(always)]
fn launder(buf: &mut [u8; SCRATCH_LEN], v: u64) -> u64 {
    launder_at(buf, SEED_AT, v)
}

/// Writes `v` at `at` in the scratch map and returns it read back: the verifier knows nothing
/// of the value read, so every path that gets here continues in the same state.
#[inline(always)]
fn launder_at(buf: &mut [u8; SCRATCH_LEN], at: usize, v: u64) -> u64 {
    let slot = buf[at..at + 8].as_mut_ptr() as *mut u64;
    // SAFETY: 8 bytes inside the scratch buffer; unaligned access is done bytewise by LLVM.
    unsafe {
        core::ptr::write_unaligned(slot, v);
    }
    unpark(buf, at)
}

/// The value `launder_at` parked at `at`.
#[inline(always)]
fn unpark(buf: &mut [u8; SCRATCH_LEN], at: usize) -> u64 {
    let slot = buf[at..at + 8].as_ptr() as *const [u8; 8];
    // SAFETY: 8 bytes inside the scratch buffer.
    u64::from_ne_bytes(unsafe { core::ptr::read_volatile(slot) })
}

/// Rewrites the answer in place: NXDOMAIN, no records, trimmed after the question, with
/// lengths and checksums fixed.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    layout: &Layout,
    header: [u8; DNS_HLEN],
    dns_len: usize,
    buf: &mut [u8; SCRATCH_LEN],
) -> Option<()> {
    let dns = layout.l4 + UDP_HLEN;
    // Keep QR, opcode and RD; clear AA and TC. Keep RA; clear Z/AD/CD; RCODE 3 (NXDOMAIN).
    let new_header = nxdomain_header(&header);
    ctx.store(dns, &new_header, 0).ok()?;

    let udp_len = (UDP_HLEN + dns_len) as u16;
    let total = dns + dns_len;
    let old_ip = load::<4>(ctx, layout.l3)?;
    ctx.change_tail(total as u32, 0).ok()?;
    if layout.ipv6 {
        ctx.store(layout.l3 + 4, &udp_len.to_be_bytes(), 0).ok()?;
    } else {
        let new_total = (total - layout.l3) as u16;
        let old_total = u16::from_be_bytes([old_ip[2], old_ip[3]]);
        ctx.store(layout.l3 + 2, &new_total.to_be_bytes(), 0).ok()?;
        ctx.l3_csum_replace(
            layout.l3 + 10,
            old_total.to_be() as u64,
            new_total.to_be() as u64,
            2,
        )
        .ok()?;
    }
    let old_udp = load::<UDP_HLEN>(ctx, layout.l4)?;
    let mut udp = old_udp;
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    ctx.store(layout.l4, &udp, 0).ok()?;
    // The checksum goes through the kernel's helpers rather than a plain store: a forwarded
    // answer may still be CHECKSUM_PARTIAL (veth keeps offloads), and then the field holds the
    // pseudo-header sum the device completes. The pseudo-header update (the UDP length) is
    // right in both states; the data update below only applies to fully checksummed packets.
    let mangled_zero = if layout.ipv6 { 0 } else { BPF_F_MARK_MANGLED_0 };
    let old_len = u16::from_ne_bytes([old_udp[4], old_udp[5]]);
    let new_len = u16::from_ne_bytes(udp_len.to_be_bytes());
    ctx.l4_csum_replace(
        layout.l4 + 6,
        old_len as u64,
        new_len as u64,
        BPF_F_PSEUDO_HDR | mangled_zero | 2,
    )
    .ok()?;
    let field = load::<2>(ctx, layout.l4 + 6)?;
    if !layout.ipv6 && field == [0, 0] {
        // IPv4 without a UDP checksum stays without one.
        return Some(());
    }
    let want = u16::from_ne_bytes(udp_checksum(ctx, layout, udp_len as usize, buf)?);
    let have = u16::from_ne_bytes(field);
    // Moves the field from `have` to `want` (a no-op on CHECKSUM_PARTIAL packets).
    let diff = (!want) as u64 + have as u64;
    ctx.l4_csum_replace(layout.l4 + 6, 0, diff, mangled_zero)
        .ok()
}

/// `bpf_l4_csum_replace` flags (uapi/linux/bpf.h).
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

fn udp_checksum(
    ctx: &TcContext,
    layout: &Layout,
    udp_len: usize,
    buf: &mut [u8; SCRATCH_LEN],
) -> Option<[u8; 2]> {
    // The segment: at most 8 + 12 + 255 + 4 bytes, zero-padded to a multiple of 4.
    if udp_len > PSEUDO_AT - 4 {
        return None;
    }
    let padded = (udp_len + 3) & !3;
    // Up to three pad bytes; masked indices keep every write inside the buffer.
    buf[udp_len & (SCRATCH_LEN - 1)] = 0;
    buf[(udp_len + 1) & (SCRATCH_LEN - 1)] = 0;
    buf[(udp_len + 2) & (SCRATCH_LEN - 1)] = 0;
    let copied = load_prefix(ctx, layout.l4, buf, udp_len)?;
    if copied != udp_len {
        return None;
    }
    let pseudo = &mut buf[PSEUDO_AT..PSEUDO_AT + 40];
    let pseudo_len = if layout.ipv6 {
        let addrs = load::<32>(ctx, layout.l3 + 8)?;
        pseudo[..32].copy_from_slice(&addrs);
        pseudo[32..36].copy_from_slice(&(udp_len as u32).to_be_bytes());
        pseudo[36..40].copy_from_slice(&[0, 0, 0, IPPROTO_UDP]);
        40
    } else {
        let addrs = load::<8>(ctx, layout.l3 + 12)?;
        pseudo[..8].copy_from_slice(&addrs);
        pseudo[8..12].copy_from_slice(&[0, IPPROTO_UDP, (udp_len >> 8) as u8, udp_len as u8]);
        12
    };
    // The checksum field itself counts as zero.
    buf[6] = 0;
    buf[7] = 0;
    // SAFETY: both ranges lie inside the scratch buffer; sizes are multiples of 4.
    let sum = unsafe {
        let seg = bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            buf.as_mut_ptr() as *mut u32,
            (padded & 0x1fc) as u32,
            0,
        );
        if seg < 0 {
            return None;
        }
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            buf.as_mut_ptr().add(PSEUDO_AT) as *mut u32,
            pseudo_len,
            seg as u32,
        )
    };
    if sum < 0 {
        return None;
    }
    let mut folded = sum as u64;
    folded = (folded & 0xffff) + (folded >> 16);
    folded = (folded & 0xffff) + (folded >> 16);
    folded = (folded & 0xffff) + (folded >> 16);
    let mut csum = !(folded as u16);
    if csum == 0 {
        csum = 0xffff;
    }
    Some(csum.to_ne_bytes())
}

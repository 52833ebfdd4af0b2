//! The SNI filter, run by `tc_encrypted_dns` on VPN clients' TCP/443 segments whose payload
//! starts a TLS handshake record holding a ClientHello. The server name is read from the
//! `server_name` extension, lowercased, and looked up in `PH_DOMAINS` exactly as `tc_dns_filter`
//! looks up a question (the name, or a parent with `DOMAIN_SUBDOMAINS`), with the same
//! installation key, so one rule blocks both the answer and the connection. In strict mode a
//! ClientHello carrying `encrypted_client_hello` whose outer name is a known ECH front
//! (`PH_ECH_FRONTS`) is dropped too: the real name is encrypted and only the front is visible.
//!
//! Packets that are not a ClientHello cost the caller two small loads at most; everything
//! here runs only for ClientHellos. The record is copied once into per-CPU scratch and walked
//! there with masked indices (no helper call per extension).

use aya_ebpf::{
    EbpfContext,
    cty::c_void,
    helpers::generated::bpf_skb_load_bytes,
    macros::map,
    maps::{HashMap, PerCpuArray},
    programs::TcContext,
};
use phantom_common::dns::{
    ClientAddr, DOMAIN_SUBDOMAINS, DomainKey, KEY_POSITIONS, MAX_ECH_FRONTS, MAX_NAME_LEN,
    SniConfig, SniVerdict, TLS_EXT_ECH,
};

use crate::dns_filter::{DNS_KEY, DOMAINS, EXEMPT, POLICY, load};

const BPF_F_NO_PREALLOC: u32 = 1;

/// Known ECH front names (the outer SNI of ECH ClientHellos), keyed like `PH_DOMAINS`.
#[map(name = "PH_ECH_FRONTS")]
static ECH_FRONTS: HashMap<u64, u8> = HashMap::pinned(MAX_ECH_FRONTS, BPF_F_NO_PREALLOC);

/// How much of a ClientHello is read: a whole one in any packet WireGuard hands over (its MTU
/// is 1420; GRO may join segments up to this).
const HELLO_AREA: usize = 4096;
/// Extensions walked at most (browsers send 15 to 20).
const MAX_EXTENSIONS: usize = 64;
/// Offset of the session id's length in the record: record header (5), handshake header (4),
/// client version (2), random (32).
const SESSION_ID_AT: usize = 43;
/// TLS: a handshake record, and the ClientHello handshake type.
const RECORD_HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
/// TLS extension number of `server_name`, and its `host_name` name type.
const EXT_SERVER_NAME: usize = 0;
const HOST_NAME: usize = 0;

#[repr(C)]
pub struct SniScratch {
    /// The start of the TLS record.
    hello: [u8; HELLO_AREA],
    /// Values parked between the extension walk and the name (see [`park`]).
    parked: [u64; 2],
}

/// Returns `v` after a round trip through scratch memory, which the verifier does not track:
/// whichever of the extension walk's exits led here (one per extension count and found/not
/// found), the name is read and looked up on one verifier path instead of one per exit.
#[inline(always)]
fn read(slot: &u64) -> u64 {
    // SAFETY: a u64 inside the scratch value.
    unsafe { core::ptr::read_volatile(slot) }
}

#[inline(always)]
fn park(slot: &mut u64, v: u64) -> u64 {
    // SAFETY: a u64 inside the scratch value.
    unsafe {
        core::ptr::write_volatile(slot, v);
        core::ptr::read_volatile(slot)
    }
}

#[map(name = "PH_SNI_SCRATCH")]
static SCRATCH: PerCpuArray<SniScratch> = PerCpuArray::with_max_entries(1, 0);

/// Whether the first bytes of a TCP payload are a TLS handshake record holding a ClientHello
/// (`head` = record header and handshake type).
#[inline(always)]
pub(crate) fn is_client_hello(head: &[u8; 6]) -> bool {
    head[0] == RECORD_HANDSHAKE && head[1] == 3 && head[5] == CLIENT_HELLO
}

/// Exactly `N` bytes at `offset`: read straight from the packet when they lie in its linear
/// part (no helper call: this is on the path of every TCP/443 segment), else through the
/// helper.
#[inline(always)]
pub(crate) fn peek<const N: usize>(ctx: &TcContext, offset: usize) -> Option<[u8; N]> {
    let offset = offset & 0xfff;
    let start = ctx.data();
    if start + offset + N <= ctx.data_end() {
        // SAFETY: inside [data, data_end), checked just above (and by the verifier).
        return Some(unsafe { core::ptr::read_unaligned((start + offset) as *const [u8; N]) });
    }
    load::<N>(ctx, offset)
}

#[inline(always)]
fn byte(h: &[u8; HELLO_AREA], i: usize) -> usize {
    h[i & (HELLO_AREA - 1)] as usize
}

#[inline(always)]
fn be16(h: &[u8; HELLO_AREA], i: usize) -> usize {
    (byte(h, i) << 8) | byte(h, i + 1)
}

/// The verdict on a ClientHello at `payload` (`len` bytes up to the end of the IP packet at
/// `l3`).
#[inline(always)]
pub(crate) fn client_hello(
    ctx: &TcContext,
    payload: usize,
    len: usize,
    l3: usize,
    ipv6: bool,
    cfg: &SniConfig,
) -> SniVerdict {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return SniVerdict::Unparsed;
    };
    // SAFETY: the per-CPU scratch value lives as long as this program run, on this CPU only.
    let scratch = unsafe { &mut *scratch };
    let Some(copied) = copy_hello(ctx, payload, len, &mut scratch.hello) else {
        return SniVerdict::Unparsed;
    };
    let h = &scratch.hello;
    let strict = cfg.strict != 0;

    // ClientHello: session id, cipher suites, compression methods, then the extensions.
    let mut p = SESSION_ID_AT;
    if p + 1 > copied {
        return SniVerdict::Unparsed;
    }
    let sid = byte(h, p);
    if sid > 32 {
        return SniVerdict::Unparsed;
    }
    p += 1 + sid;
    if p + 2 > copied {
        return SniVerdict::Unparsed;
    }
    p += 2 + be16(h, p);
    if p + 1 > copied {
        return SniVerdict::Unparsed;
    }
    p += 1 + byte(h, p);
    if p + 2 > copied {
        return SniVerdict::Unparsed;
    }
    let end = p + 2 + be16(h, p);
    p += 2;
    let limit = if end < copied { end } else { copied };

    // Where the name extension starts and whether ECH is there are written to scratch
    // memory, not kept in registers: the verifier then sees one state per extension count
    // instead of one per (count, where the name was found).
    let found = &mut scratch.parked;
    park(&mut found[0], 0);
    park(&mut found[1], 0);
    let mut k = 0;
    while k < MAX_EXTENSIONS {
        if p + 4 > limit {
            break;
        }
        let ext = be16(h, p);
        let ext_len = be16(h, p + 2);
        p += 4;
        if ext == EXT_SERVER_NAME {
            park(&mut found[0], p as u64);
            // Strict mode reads on: ECH may come after the name.
            if !strict {
                break;
            }
        } else if ext == TLS_EXT_ECH as usize {
            park(&mut found[1], 1);
        }
        p += ext_len;
        k += 1;
    }
    let sni_at = read(&found[0]) as usize;
    let ech = read(&found[1]) != 0;
    if sni_at == 0 {
        return if p < end || k == MAX_EXTENSIONS {
            SniVerdict::Unparsed
        } else {
            SniVerdict::NoName
        };
    }
    let h = &scratch.hello;
    // server_name: list length (2), name type (1), name length (2), the name.
    if sni_at + 5 > copied || byte(h, sni_at + 2) != HOST_NAME {
        return SniVerdict::Unparsed;
    }
    let mut name_len = be16(h, sni_at + 3);
    let name_at = sni_at + 5;
    if name_len == 0 || name_at + name_len > copied {
        return SniVerdict::Unparsed;
    }
    // A trailing dot (not allowed by RFC 6066, but harmless) names the same domain.
    if byte(h, name_at + name_len - 1) == b'.' as usize {
        name_len -= 1;
    }
    if name_len == 0 || name_len > MAX_NAME_LEN {
        return SniVerdict::Unparsed;
    }
    // One verifier path from here on, whatever the name's length and wherever it was.
    park(&mut scratch.parked[0], (name_at + name_len - 1) as u64);
    park(&mut scratch.parked[1], name_len as u64);
    let h = &scratch.hello;
    let name = &scratch.parked;
    let Some(key) = DNS_KEY.get_ptr(0) else {
        return SniVerdict::Passed;
    };
    // The whole name's key, once a walk has computed it.
    let mut whole = None;
    if cfg.drop_blocked != 0 {
        let (blocked, hash) = in_set(h, name, key, &DOMAINS, true);
        whole = Some(hash);
        if !blocked {
            return ech_verdict(h, name, key, strict && ech, whole);
        }
        let policy = POLICY.get(0).copied().unwrap_or_default();
        // SAFETY: a lookup by a stack key; the value is not read.
        if policy.exempt_clients != 0 && unsafe { EXEMPT.get(&source(ctx, l3, ipv6)) }.is_some() {
            return SniVerdict::Exempt;
        }
        if policy.dry_run != 0 {
            return SniVerdict::DryRun;
        }
        return SniVerdict::Dropped;
    }
    ech_verdict(h, name, key, strict && ech, whole)
}

/// `EchDropped` when `check` is set and the name is an ECH front, else `Passed`. Front names
/// are exact (the daemon writes them with `DOMAIN_EXACT` alone): no parent of the name can
/// match, so only the whole name's key is looked up, the one the domain walk left if it ran.
#[inline(always)]
fn ech_verdict(
    h: &[u8; HELLO_AREA],
    name: &[u64; 2],
    key: *const DomainKey,
    check: bool,
    whole: Option<u64>,
) -> SniVerdict {
    if !check {
        return SniVerdict::Passed;
    }
    let front = match whole {
        Some(hash) => ECH_FRONTS.get_ptr(&hash).is_some(),
        None => in_set(h, name, key, &ECH_FRONTS, false).0,
    };
    if front {
        SniVerdict::EchDropped
    } else {
        SniVerdict::Passed
    }
}

/// Whether the name ending at `h[name[0]]`, `name[1]` bytes long, is in `set`, keyed as
/// `PH_DOMAINS` is: the name itself, or (with `parents`) a parent whose entry has
/// `DOMAIN_SUBDOMAINS`. The
/// name is walked backwards in place, each byte lowercased as it is read, with exactly the
/// steps of `DomainKey::hash` and of `tc_dns_filter`'s walk: at every dot the running hash is
/// that suffix's key. (The DNS filter copies its name first because the wire format must
/// become text; a server name is text already, so there is nothing to copy.)
#[inline(always)]
fn in_set(
    h: &[u8; HELLO_AREA],
    name: &[u64; 2],
    key: *const DomainKey,
    set: &HashMap<u64, u8>,
    parents: bool,
) -> (bool, u64) {
    // Read from scratch memory at each call: after a first walk the verifier would know the
    // length exactly (where that walk stopped), and a second walk would be verified once per
    // length.
    let last = read(&name[0]) as usize;
    let len = read(&name[1]) as usize;
    let mut hash: u64 = 0;
    let mut steps = 0;
    while steps < MAX_NAME_LEN {
        if steps >= len {
            break;
        }
        let b = h[last.wrapping_sub(steps) & (HELLO_AREA - 1)];
        // ASCII capitals to lowercase, without a branch.
        let b = b | (u8::from(b.wrapping_sub(b'A') < 26) << 5);
        if parents && b == b'.' {
            if let Some(flags) = set.get_ptr(&hash) {
                // SAFETY: a value pointer from a successful lookup.
                if unsafe { *flags } & DOMAIN_SUBDOMAINS != 0 {
                    return (true, hash);
                }
            }
        }
        // SAFETY: a value pointer from a successful lookup; the index is masked into the array.
        let mul = unsafe { (*key).mul[steps & (KEY_POSITIONS - 1)] };
        hash = hash.wrapping_add(mul.wrapping_mul(u64::from(b) + 1));
        steps += 1;
    }
    (set.get_ptr(&hash).is_some(), hash)
}

/// Copies up to `HELLO_AREA` bytes of the record at `offset` into `buf`; returns how many.
#[inline(always)]
fn copy_hello(
    ctx: &TcContext,
    offset: usize,
    len: usize,
    buf: &mut [u8; HELLO_AREA],
) -> Option<usize> {
    let n = if len > HELLO_AREA { HELLO_AREA } else { len };
    if n == 0 {
        return None;
    }
    // Spelled so that the verifier, too, sees 1 <= len <= HELLO_AREA (see the DNS filter's
    // `load_prefix`).
    // SAFETY: reading a local.
    let n = unsafe { core::ptr::read_volatile(&n) } as u32;
    let n = ((n.wrapping_sub(1)) & (HELLO_AREA as u32 - 1)) + 1;
    // SAFETY: 1 <= n <= HELLO_AREA; the helper checks the packet bounds.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr(),
            offset as u32,
            buf.as_mut_ptr() as *mut c_void,
            n,
        )
    };
    (ret == 0).then_some(n as usize)
}

/// The client's address as `PH_DNS_EXEMPT` keys it (IPv4 as `::ffff:a.b.c.d`).
#[inline(always)]
fn source(ctx: &TcContext, l3: usize, ipv6: bool) -> ClientAddr {
    let mut key: ClientAddr = [0; 16];
    if ipv6 {
        if let Some(a) = peek::<16>(ctx, l3 + 8) {
            key = a;
        }
    } else if let Some(a) = peek::<4>(ctx, l3 + 12) {
        key[10] = 0xff;
        key[11] = 0xff;
        key[12..].copy_from_slice(&a);
    }
    key
}

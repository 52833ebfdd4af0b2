//! The DNS answer filter's parse-and-decide steps, shared by `tc_dns_filter` (eBPF) and the
//! userspace model [`decide`] that the fuzz crate checks against hickory-proto.
//!
//! The steps are written for the eBPF verifier (a scratch buffer of fixed size, masked
//! indices, volatile reads where LLVM must not see a value's range); compiled for userspace
//! they do the same thing byte for byte. The kernel program reads the packet with
//! `bpf_skb_load_bytes` and runs exactly these steps in [`decide`]'s order; `decide` reads the
//! DNS payload from a slice instead.

use crate::dns::{DOMAIN_SUBDOMAINS, DnsVerdict, DomainKey, KEY_POSITIONS, MAX_NAME_LEN};

/// The per-CPU scratch buffer's size.
pub const SCRATCH_LEN: usize = 512;
/// Where the name is copied (one wire-format name is at most 255 bytes).
pub const NAME_AREA: usize = 256;
/// Where the label counter of [`normalise_name`] lives.
pub const REMAINING_AT: usize = 496;
/// The DNS header's length.
pub const DNS_HLEN: usize = 12;

/// The header's verdict: `Some(NotResponse)` unless QR is set and the opcode is QUERY,
/// `Some(QuestionCount)` unless QDCOUNT is 1, `None` to go on to the question.
#[inline(always)]
pub fn header_verdict(header: &[u8; DNS_HLEN]) -> Option<DnsVerdict> {
    if header[2] & 0x80 == 0 || (header[2] >> 3) & 0x0f != 0 {
        return Some(DnsVerdict::NotResponse);
    }
    if header[4] != 0 || header[5] != 1 {
        return Some(DnsVerdict::QuestionCount);
    }
    None
}

/// Turns the wire-format name at the start of `buf` into text in place: the length bytes
/// after the first become dots and letters are lowercased, so the text is
/// `buf[1..name_end]`. Returns the index of the terminating zero, or `None` for anything
/// unusual (compression pointers, labels over 63, names over 253, running off the copy).
/// `copied`: how many bytes of `buf` hold the packet.
#[inline(always)]
pub fn normalise_name(buf: &mut [u8; SCRATCH_LEN], copied: usize) -> Option<usize> {
    // `remaining` (bytes left in the current label) lives in scratch memory, read and written
    // every iteration, so the verifier sees one state per position instead of one per
    // (position, label length) pair.
    let remaining_at = buf[REMAINING_AT..REMAINING_AT + 1].as_mut_ptr();
    // SAFETY: one byte inside the scratch buffer.
    unsafe { core::ptr::write_volatile(remaining_at, 0) };
    let mut i: usize = 0;
    while i < NAME_AREA {
        if i >= copied {
            return None;
        }
        let idx = i & (NAME_AREA - 1);
        let b = buf[idx];
        // SAFETY: as above.
        let mut remaining = unsafe { core::ptr::read_volatile(remaining_at) };
        if remaining == 0 {
            if b == 0 {
                // The root name alone (i == 0) asks about nothing we block.
                return if i == 0 || i - 1 > MAX_NAME_LEN {
                    None
                } else {
                    Some(i)
                };
            }
            if b > 63 {
                return None;
            }
            remaining = b;
            if i != 0 {
                buf[idx] = b'.';
            }
        } else {
            buf[idx] = if b.is_ascii_uppercase() { b + 32 } else { b };
            remaining -= 1;
        }
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(remaining_at, remaining) };
        i += 1;
    }
    None
}

/// Walks the text `buf[1..name_end]` backwards: at each dot the running hash is that
/// suffix's key (a parent domain: blocked only with `DOMAIN_SUBDOMAINS`); at the start it is
/// the whole name's (blocked with any flag). The text is lowercase already
/// ([`normalise_name`]), so each step is `DomainKey::step` without its case fold.
///
/// The blocked-domain map (`PH_DOMAINS`, hash to flags) is asked through two closures, each
/// answering a plain `bool` (an `Option<u8>` from a map lookup leaves an undefined register
/// on its `None` path, which the verifier refuses to read): `blocks_subdomains(hash)`, an
/// entry with `DOMAIN_SUBDOMAINS`; `has(hash)`, an entry at all. `buf` is taken `&mut` and
/// `key` as a raw pointer (the map value's) as the program had them: with a shared reference
/// LLVM reshapes the loop until the verifier can no longer follow it.
///
/// # Safety
///
/// `key` points to a live `DomainKey`.
#[inline(always)]
pub unsafe fn is_blocked(
    buf: &mut [u8; SCRATCH_LEN],
    name_end: usize,
    key: *const DomainKey,
    blocks_subdomains: impl Fn(u64) -> bool,
    has: impl Fn(u64) -> bool,
) -> bool {
    // The name's length comes through map memory (the kernel program launders it) and the
    // hash from the key's map value, so the verifier sees unknown values: with known constants
    // every iteration's state would differ (one per name length and hash value) and the loop
    // could not be verified within the instruction limit.
    let mut hash: u64 = 0;
    let mut k = name_end;
    let mut steps = 0;
    while steps < NAME_AREA {
        if k <= 1 {
            break;
        }
        k -= 1;
        // The mask stays a mask for the verifier only if LLVM cannot see k's range (it would
        // drop it, and the verifier then tracks k - 1 as possibly negative).
        // SAFETY: reading a local.
        let idx = unsafe { core::ptr::read_volatile(&k) } & (NAME_AREA - 1);
        let b = buf[idx];
        if b == b'.' && blocks_subdomains(hash) {
            return true;
        }
        // Read the same way as k: seen through, the mask goes and LLVM walks a pointer along
        // the key instead, whose offset differs at every iteration, so the verifier can no
        // longer merge them.
        // SAFETY: reading a local.
        let position = unsafe { core::ptr::read_volatile(&steps) } & (KEY_POSITIONS - 1);
        // SAFETY: the caller's promise; the index is masked into the array.
        let mul = unsafe { (*key).mul[position] };
        hash = hash.wrapping_add(mul.wrapping_mul(b as u64 + 1));
        steps += 1;
    }
    has(hash)
}

/// The rewritten header: QR, opcode and RD kept, AA and TC cleared; RA kept, Z/AD/CD
/// cleared, RCODE 3 (NXDOMAIN); no answer, authority or additional records.
#[inline(always)]
pub fn nxdomain_header(header: &[u8; DNS_HLEN]) -> [u8; DNS_HLEN] {
    let mut new_header = *header;
    new_header[2] = header[2] & 0xF9;
    new_header[3] = (header[3] & 0x80) | 0x03;
    for b in &mut new_header[6..12] {
        *b = 0;
    }
    new_header
}

/// The DNS payload's length after a rewrite: the header, the name (`name_end` is the index of
/// its terminating zero), QTYPE and QCLASS.
#[inline(always)]
pub const fn rewritten_len(name_end: usize) -> usize {
    DNS_HLEN + name_end + 1 + 4
}

/// What the filter decides about one DNS payload (the bytes after the UDP header) from a
/// client-bound answer, with the blocked-domain map `lookup`, when no client is exempt and dry
/// run is off: the verdict (`Rewritten`, `Passed`, `Unparsable`, `NotResponse` or
/// `QuestionCount`) and, for `Rewritten`, the payload's new length (its first
/// [`rewritten_len`] bytes, the header replaced by [`nxdomain_header`]).
///
/// The same steps in the same order as `tc_dns_filter`, which loads at most [`NAME_AREA`]
/// bytes of the question into its scratch buffer.
pub fn decide(
    payload: &[u8],
    key: &DomainKey,
    lookup: impl Fn(u64) -> Option<u8>,
    buf: &mut [u8; SCRATCH_LEN],
) -> (DnsVerdict, Option<usize>) {
    let Some(header) = payload.get(..DNS_HLEN) else {
        return (DnsVerdict::Unparsable, None);
    };
    let mut h = [0u8; DNS_HLEN];
    h.copy_from_slice(header);
    if let Some(verdict) = header_verdict(&h) {
        return (verdict, None);
    }
    let question = &payload[DNS_HLEN..];
    let copied = question.len().min(NAME_AREA);
    if copied == 0 {
        return (DnsVerdict::Unparsable, None);
    }
    buf[..copied].copy_from_slice(&question[..copied]);
    let Some(name_end) = normalise_name(buf, copied) else {
        return (DnsVerdict::Unparsable, None);
    };
    if name_end == 0 || name_end >= NAME_AREA {
        return (DnsVerdict::Unparsable, None);
    }
    let dns_len = rewritten_len(name_end);
    if payload.len() < dns_len {
        return (DnsVerdict::Unparsable, None);
    }
    let blocks_subdomains = |hash| lookup(hash).is_some_and(|f| f & DOMAIN_SUBDOMAINS != 0);
    // SAFETY: `key` is a reference.
    let blocked = unsafe {
        is_blocked(buf, name_end, key, blocks_subdomains, |hash| {
            lookup(hash).is_some()
        })
    };
    if !blocked {
        return (DnsVerdict::Passed, None);
    }
    (DnsVerdict::Rewritten, Some(dns_len))
}

//! The DNS answer filter's shared definitions: the domain hash and the map layouts.
//!
//! Domains are hashed from their last byte to their first. Walking a name backwards, the hash
//! after each label is the hash of that suffix (`com`, `example.com`, `www.example.com`), so
//! the kernel gets every suffix's key in one pass over the name.

/// FNV-1a 64 offset basis.
pub const HASH_SEED: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Longest domain name in text form (RFC 1035: 255 octets on the wire).
pub const MAX_NAME_LEN: usize = 253;

/// Entry flag: the domain itself is blocked.
pub const DOMAIN_EXACT: u8 = 1;
/// Entry flag: every subdomain is blocked as well.
pub const DOMAIN_SUBDOMAINS: u8 = 2;

/// Default capacity of the blocked-domain map.
pub const DEFAULT_MAX_DOMAINS: u32 = 2_000_000;

/// One step of the hash: ASCII letters are folded to lowercase first.
#[inline(always)]
pub const fn hash_step(hash: u64, byte: u8) -> u64 {
    let b = if byte.is_ascii_uppercase() {
        byte + 32
    } else {
        byte
    };
    (hash ^ b as u64).wrapping_mul(FNV_PRIME)
}

/// The map key of a domain in text form without the trailing dot (`www.example.com`).
pub const fn domain_hash(name: &[u8]) -> u64 {
    let mut hash = HASH_SEED;
    let mut i = name.len();
    while i > 0 {
        i -= 1;
        hash = hash_step(hash, name[i]);
    }
    hash
}

/// Link-layer header length of an interface a TC program is attached to (0 for WireGuard and
/// other L3 devices, 14 for Ethernet), keyed by ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceInfo {
    pub l2_len: u32,
}

/// What the DNS filter did with a UDP packet from port 53. The discriminant is the slot.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsVerdict {
    /// The question is blocked: rewritten to NXDOMAIN.
    Rewritten = 0,
    /// A response whose question is not blocked.
    Passed = 1,
    /// Not a parsable response (truncated, compression in the question, bad labels, too long).
    Unparsable = 2,
    /// Not a standard query response (QR clear, or another opcode).
    NotResponse = 3,
    /// Not exactly one question.
    QuestionCount = 4,
    /// Blocked, but the kernel refused to resize the packet; passed unchanged.
    RewriteFailed = 5,
    /// Blocked, but the filter is in dry-run mode: counted, passed unchanged.
    DryRun = 6,
    /// Blocked, but the client it goes to has blocking switched off.
    Exempt = 7,
    /// An answer from Phantom's own resolver, which applied the policy already.
    OwnResolver = 8,
}

impl DnsVerdict {
    pub const ALL: [DnsVerdict; 9] = [
        DnsVerdict::Rewritten,
        DnsVerdict::Passed,
        DnsVerdict::Unparsable,
        DnsVerdict::NotResponse,
        DnsVerdict::QuestionCount,
        DnsVerdict::RewriteFailed,
        DnsVerdict::DryRun,
        DnsVerdict::Exempt,
        DnsVerdict::OwnResolver,
    ];
    pub const SLOTS: u32 = 16;

    pub const fn name(self) -> &'static str {
        match self {
            DnsVerdict::Rewritten => "nxdomain",
            DnsVerdict::Passed => "passed",
            DnsVerdict::Unparsable => "unparsable",
            DnsVerdict::NotResponse => "not_response",
            DnsVerdict::QuestionCount => "question_count",
            DnsVerdict::RewriteFailed => "rewrite_failed",
            DnsVerdict::DryRun => "dry_run",
            DnsVerdict::Exempt => "exempt_client",
            DnsVerdict::OwnResolver => "own_resolver",
        }
    }
}

/// The DNS filter's policy (one entry, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsPolicy {
    /// 1 = count what would be rewritten and rewrite nothing.
    pub dry_run: u32,
    /// Answers whose skb mark is this come from Phantom's own resolver, which has applied
    /// the policy (per-client exemptions, dry run, the full engine) already; 0 = none.
    pub resolver_mark: u32,
}

/// Key of the exempt-client map: the client's address, IPv4 as `::ffff:a.b.c.d`.
pub type ClientAddr = [u8; 16];

/// Most clients with blocking switched off that the kernel tracks.
pub const MAX_EXEMPT_CLIENTS: u32 = 65_536;

/// Multihop mark settings (one entry, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MultihopConfig {
    /// 1 = mark, 0 = leave everything unmarked.
    pub enabled: u32,
    /// The skb mark `ip rule fwmark` matches.
    pub mark: u32,
    /// Client IPv4 subnet, network byte order, and its mask (mask 0 = no IPv4 subnet).
    pub v4_net: [u8; 4],
    pub v4_mask: [u8; 4],
    /// Client IPv6 subnet and its prefix length (0 = no IPv6 subnet).
    pub v6_net: [u8; 16],
    pub v6_prefix_len: u32,
    pub _pad: u32,
}

/// What the multihop mark did. The discriminant is the slot.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkVerdict {
    Marked = 0,
    /// Client to client (destination inside the client subnet).
    ClientToClient = 1,
    /// Destination is one of the server's own addresses.
    Local = 2,
    /// Source outside the client subnet, or not IP.
    NotClient = 3,
    /// Multihop off.
    Disabled = 4,
}

impl MarkVerdict {
    pub const ALL: [MarkVerdict; 5] = [
        MarkVerdict::Marked,
        MarkVerdict::ClientToClient,
        MarkVerdict::Local,
        MarkVerdict::NotClient,
        MarkVerdict::Disabled,
    ];
    pub const SLOTS: u32 = 8;

    pub const fn name(self) -> &'static str {
        match self {
            MarkVerdict::Marked => "marked",
            MarkVerdict::ClientToClient => "client_to_client",
            MarkVerdict::Local => "local",
            MarkVerdict::NotClient => "not_client",
            MarkVerdict::Disabled => "disabled",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers only, no padding (sizes checked in the tests).
    unsafe impl aya::Pod for super::IfaceInfo {}
    unsafe impl aya::Pod for super::MultihopConfig {}
    unsafe impl aya::Pod for super::DnsPolicy {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test vectors, computed independently (FNV-1a 64 over the lowercased bytes in reverse
    /// order); the kernel and the daemon must agree on these exact values.
    #[test]
    fn hash_vectors() {
        assert_eq!(domain_hash(b""), HASH_SEED);
        assert_eq!(domain_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(domain_hash(b"com"), 0x0808_5e19_1767_1762);
        assert_eq!(domain_hash(b"example.com"), 0x6632_cafb_6bf2_7d1e);
        assert_eq!(domain_hash(b"www.example.com"), 0xfbc1_da71_ef4a_7f73);
    }

    #[test]
    fn case_is_folded() {
        assert_eq!(
            domain_hash(b"WWW.Example.COM"),
            domain_hash(b"www.example.com")
        );
    }

    /// The backwards walk visits every suffix: the running hash at a label boundary equals
    /// the hash of that suffix on its own.
    #[test]
    fn suffix_hashes_are_intermediate_values() {
        let name = b"a.b.example.com";
        let mut h = HASH_SEED;
        let mut seen = 0;
        for i in (0..name.len()).rev() {
            if name[i] == b'.' {
                assert_eq!(h, domain_hash(&name[i + 1..]));
                seen += 1;
            }
            h = hash_step(h, name[i]);
        }
        assert_eq!(h, domain_hash(name));
        assert_eq!(seen, 3);
    }

    #[test]
    fn layouts() {
        assert_eq!(core::mem::size_of::<IfaceInfo>(), 4);
        assert_eq!(core::mem::size_of::<MultihopConfig>(), 40);
        assert_eq!(core::mem::size_of::<DnsPolicy>(), 8);
    }
}

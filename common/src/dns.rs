//! The DNS answer filter's shared definitions: the domain hash and the map layouts.
//!
//! Domains are hashed from their last byte to their first. Walking a name backwards, the hash
//! after each label is the hash of that suffix (`com`, `example.com`, `www.example.com`), so
//! the kernel gets every suffix's key in one pass over the name.
//!
//! The hash is keyed per installation: a multilinear hash modulo 2^64 with one secret random
//! multiplier per position, counted from the end of the name,
//!
//! `hash(name) = sum over j of key[j] * (byte j from the end, lowercased, + 1)  (mod 2^64)`.
//!
//! For two different names of at most 256 bytes the chance that their hashes are equal is at
//! most 2^-56 over the key (a byte difference is at most 256 = 2^8; the multiplier of a
//! position where they differ is uniform), whatever the names: a list entry can be made to
//! collide with `com` only by someone who knows the key. Adding 1 to every byte keeps names of
//! different lengths apart (a missing byte counts 0, a present one never does). Per byte it
//! costs a load, a multiply and an add, no more than FNV-1a did. The key lives in the daemon's
//! state directory and reaches the kernel through `PH_DNS_KEY`.

/// Positions of a name the key covers (a name in text form is at most 253 bytes; a longer
/// input wraps around).
pub const KEY_POSITIONS: usize = 256;

/// The installation's key of the domain hash: one multiplier per position from the end of the
/// name. Value of `PH_DNS_KEY` (one entry, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainKey {
    pub mul: [u64; KEY_POSITIONS],
}

impl DomainKey {
    /// The all-zero key: every name hashes to 0. What an unwritten `PH_DNS_KEY` holds.
    pub const ZERO: DomainKey = DomainKey {
        mul: [0; KEY_POSITIONS],
    };

    /// One step of the hash: `byte` at `position` from the end of the name, ASCII letters
    /// folded to lowercase first.
    #[inline(always)]
    pub fn step(&self, hash: u64, position: usize, byte: u8) -> u64 {
        let b = if byte.is_ascii_uppercase() {
            byte + 32
        } else {
            byte
        };
        hash.wrapping_add(self.mul[position & (KEY_POSITIONS - 1)].wrapping_mul(b as u64 + 1))
    }

    /// The map key of a domain in text form without the trailing dot (`www.example.com`).
    pub fn hash(&self, name: &[u8]) -> u64 {
        let mut hash = 0;
        let mut position = 0;
        let mut i = name.len();
        while i > 0 {
            i -= 1;
            hash = self.step(hash, position, name[i]);
            position += 1;
        }
        hash
    }
}

/// Longest domain name in text form (RFC 1035: 255 octets on the wire).
pub const MAX_NAME_LEN: usize = 253;

/// Entry flag: the domain itself is blocked.
pub const DOMAIN_EXACT: u8 = 1;
/// Entry flag: every subdomain is blocked as well.
pub const DOMAIN_SUBDOMAINS: u8 = 2;

/// Default capacity of the blocked-domain map.
pub const DEFAULT_MAX_DOMAINS: u32 = 2_000_000;

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
    /// Entries in `PH_DNS_EXEMPT`, written after the map: while 0 the filters skip the
    /// lookup (a hash of 16 bytes on every blocked name).
    pub exempt_clients: u32,
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

/// `tc_encrypted_dns`'s switches (index 0 of `PH_ENC_DNS`), written by the daemon from `[dns]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncryptedDnsConfig {
    /// 1 = drop VPN clients' TCP/853 (DoT) and UDP/853 (DoQ) to anyone but the resolver.
    pub drop_dot_doq: u32,
    /// 1 = drop VPN clients' TCP/443 and UDP/443 to the known DoH resolvers' prefixes.
    pub drop_doh: u32,
}

/// Most prefixes of known DoH resolvers, per address family.
pub const MAX_DOH_PREFIXES: u32 = 16_384;
/// Most addresses of Phantom's own resolver (the one DoT/DoQ may still reach).
pub const MAX_RESOLVER_ADDRS: u32 = 64;

/// What `tc_encrypted_dns` did with a VPN client's packet. The discriminant is the slot.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncryptedDnsVerdict {
    /// Not encrypted DNS by port and address (or not parsable): left alone.
    Passed = 0,
    /// TCP/853 to another resolver: dropped.
    DotDropped = 1,
    /// UDP/853 to another resolver: dropped.
    DoqDropped = 2,
    /// TCP/443 to a known DoH resolver: dropped.
    DohTcpDropped = 3,
    /// UDP/443 (HTTP/3) to a known DoH resolver: dropped.
    DohUdpDropped = 4,
    /// Port 853 to Phantom's own resolver: passed.
    ToResolver = 5,
}

impl EncryptedDnsVerdict {
    pub const ALL: [EncryptedDnsVerdict; 6] = [
        EncryptedDnsVerdict::Passed,
        EncryptedDnsVerdict::DotDropped,
        EncryptedDnsVerdict::DoqDropped,
        EncryptedDnsVerdict::DohTcpDropped,
        EncryptedDnsVerdict::DohUdpDropped,
        EncryptedDnsVerdict::ToResolver,
    ];
    pub const SLOTS: u32 = 8;

    pub const fn name(self) -> &'static str {
        match self {
            EncryptedDnsVerdict::Passed => "passed",
            EncryptedDnsVerdict::DotDropped => "dot_dropped",
            EncryptedDnsVerdict::DoqDropped => "doq_dropped",
            EncryptedDnsVerdict::DohTcpDropped => "doh_tcp_dropped",
            EncryptedDnsVerdict::DohUdpDropped => "doh_udp_dropped",
            EncryptedDnsVerdict::ToResolver => "to_resolver",
        }
    }
}

/// The SNI filter's switches (index 0 of `PH_SNI`), written by the daemon from `[dns]`. The
/// filter runs inside `tc_encrypted_dns`, on VPN clients' TCP/443 and UDP/443.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SniConfig {
    /// 1 = drop TLS ClientHellos whose server name is in `PH_DOMAINS` (as the DNS filter
    /// matches it: the name, or a parent with `DOMAIN_SUBDOMAINS`).
    pub drop_blocked: u32,
    /// 1 = strict: drop UDP/443 (QUIC, whose name the kernel does not read) and ClientHellos
    /// with `encrypted_client_hello` whose outer name is in `PH_ECH_FRONTS`.
    pub strict: u32,
}

/// Most ECH front names (`PH_ECH_FRONTS`, keyed like `PH_DOMAINS`).
pub const MAX_ECH_FRONTS: u32 = 1024;

/// TLS extension number of `encrypted_client_hello` (RFC 9849 / draft-ietf-tls-esni).
pub const TLS_EXT_ECH: u16 = 0xfe0d;

/// What the SNI filter did with a VPN client's ClientHello or QUIC datagram. Packets that are
/// neither are not counted here. The discriminant is the slot.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SniVerdict {
    /// A ClientHello whose server name is not blocked: passed.
    Passed = 0,
    /// A ClientHello whose server name is blocked: dropped.
    Dropped = 1,
    /// Strict: a ClientHello with ECH to a known ECH front name: dropped.
    EchDropped = 2,
    /// Strict: UDP/443 (QUIC): dropped.
    QuicDropped = 3,
    /// A ClientHello without a server name: passed.
    NoName = 4,
    /// A ClientHello the filter could not read to its end within the packet (split over
    /// segments, or malformed): passed.
    Unparsed = 5,
    /// Blocked, but the filter is in dry-run mode (`PH_DNS_POLICY`): counted, passed.
    DryRun = 6,
    /// Blocked, but the client has blocking switched off (`PH_DNS_EXEMPT`): passed.
    Exempt = 7,
}

impl SniVerdict {
    pub const ALL: [SniVerdict; 8] = [
        SniVerdict::Passed,
        SniVerdict::Dropped,
        SniVerdict::EchDropped,
        SniVerdict::QuicDropped,
        SniVerdict::NoName,
        SniVerdict::Unparsed,
        SniVerdict::DryRun,
        SniVerdict::Exempt,
    ];
    pub const SLOTS: u32 = 8;

    pub const fn name(self) -> &'static str {
        match self {
            SniVerdict::Passed => "passed",
            SniVerdict::Dropped => "blocked_dropped",
            SniVerdict::EchDropped => "ech_dropped",
            SniVerdict::QuicDropped => "quic_dropped",
            SniVerdict::NoName => "no_name",
            SniVerdict::Unparsed => "unparsed",
            SniVerdict::DryRun => "dry_run",
            SniVerdict::Exempt => "exempt_client",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::EncryptedDnsConfig {}
    unsafe impl aya::Pod for super::SniConfig {}
    // SAFETY: #[repr(C)], integers only, no padding (sizes checked in the tests).
    unsafe impl aya::Pod for super::IfaceInfo {}
    unsafe impl aya::Pod for super::MultihopConfig {}
    unsafe impl aya::Pod for super::DnsPolicy {}
    unsafe impl aya::Pod for super::DomainKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key with distinct, known multipliers.
    fn key() -> DomainKey {
        let mut k = DomainKey::ZERO;
        for (i, m) in k.mul.iter_mut().enumerate() {
            *m = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        k
    }

    /// The definition, spelled out: the kernel and the daemon must agree on these values.
    #[test]
    fn hash_vectors() {
        let k = key();
        assert_eq!(k.hash(b""), 0);
        assert_eq!(k.hash(b"a"), k.mul[0].wrapping_mul(u64::from(b'a') + 1));
        let com = k.mul[0]
            .wrapping_mul(u64::from(b'm') + 1)
            .wrapping_add(k.mul[1].wrapping_mul(u64::from(b'o') + 1))
            .wrapping_add(k.mul[2].wrapping_mul(u64::from(b'c') + 1));
        assert_eq!(k.hash(b"com"), com);
        assert_ne!(k.hash(b"com"), k.hash(b"moc"));
        assert_eq!(DomainKey::ZERO.hash(b"www.example.com"), 0);
    }

    #[test]
    fn case_is_folded() {
        let k = key();
        assert_eq!(k.hash(b"WWW.Example.COM"), k.hash(b"www.example.com"));
    }

    /// The backwards walk visits every suffix: the running hash at a label boundary equals
    /// the hash of that suffix on its own.
    #[test]
    fn suffix_hashes_are_intermediate_values() {
        let k = key();
        let name = b"a.b.example.com";
        let mut h = 0;
        let mut seen = 0;
        for (position, i) in (0..name.len()).rev().enumerate() {
            if name[i] == b'.' {
                assert_eq!(h, k.hash(&name[i + 1..]));
                seen += 1;
            }
            h = k.step(h, position, name[i]);
        }
        assert_eq!(h, k.hash(name));
        assert_eq!(seen, 3);
    }

    /// A zero byte still counts: names of different lengths do not collide by padding.
    #[test]
    fn lengths_are_kept_apart() {
        let k = key();
        assert_ne!(k.hash(b"com"), k.hash(b"\0com"));
    }

    #[test]
    fn layouts() {
        assert_eq!(core::mem::size_of::<IfaceInfo>(), 4);
        assert_eq!(core::mem::size_of::<MultihopConfig>(), 40);
        assert_eq!(core::mem::size_of::<EncryptedDnsConfig>(), 8);
        assert_eq!(core::mem::size_of::<SniConfig>(), 8);
        assert_eq!(core::mem::size_of::<DnsPolicy>(), 12);
        assert_eq!(core::mem::size_of::<DomainKey>(), 8 * KEY_POSITIONS);
    }
}

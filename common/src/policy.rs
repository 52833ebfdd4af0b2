//! Per-client traffic policy on WireGuard ingress (`tc_client_policy`): ordered allow/deny
//! rules per client and a switch that isolates clients from each other. [`decide`] is the one
//! decision: the kernel program runs it on every packet and the daemon's `core test_policy`
//! runs the same function, so the answer and what packets do cannot drift apart.

/// Rules one client may have.
pub const MAX_ACL_RULES: usize = 16;

pub const PROTO_ANY: u8 = 0;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const ACTION_DENY: u8 = 0;
pub const ACTION_ALLOW: u8 = 1;

/// One rule: destination network, protocol, destination port range, action. A rule with a
/// port range narrower than everything matches TCP and UDP only (ICMP has no port).
/// Aligned to 4 so that the kernel program loads `net` and `mask` in one instruction each,
/// not two halves (`AclRule` is 16 bytes either way).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclRule {
    /// Network byte order.
    pub net: [u8; 4],
    pub mask: [u8; 4],
    pub port_lo: u16,
    pub port_hi: u16,
    /// `PROTO_*`.
    pub proto: u8,
    /// `ACTION_*`.
    pub action: u8,
    pub _pad: [u8; 2],
}

/// A client's rules, in order: the first that matches decides; none matching allows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientAcl {
    pub count: u32,
    /// The client's address (network byte order): in `PH_CLIENT_ACL` an entry holds for this
    /// address only.
    pub addr: [u8; 4],
    pub rules: [AclRule; MAX_ACL_RULES],
}

/// The switches (index 0 of `PH_CP_CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    /// 1 = client-to-client traffic dropped.
    pub isolate: u32,
    /// The client subnet (network byte order) and its mask; mask 0 = none.
    pub v4_net: [u8; 4],
    pub v4_mask: [u8; 4],
    /// The server's own address in the subnet: always reachable.
    pub server: [u8; 4],
    /// The VPN interface's link-layer header length (0 for WireGuard): one lookup fewer per
    /// packet than the shared per-interface map.
    pub l2_len: u32,
    /// 1 while some client has a rate limit or a quota (`PH_CLIENT_LIMIT` not empty): without
    /// any, neither direction looks a client up.
    pub limits: u32,
}

/// What the policy did. The discriminant is the counter slot.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyVerdict {
    /// A rule allowed it.
    Allowed = 0,
    /// A rule denied it: dropped.
    Denied = 1,
    /// No rule matched (or the client has none): allowed.
    NoMatch = 2,
    /// Client to client while isolation is on: dropped.
    Isolated = 3,
    /// Not IPv4 from a client, or not parsable: passed untouched.
    NotInspected = 4,
    /// Over the client's rate limit (either direction): dropped.
    RateLimited = 5,
    /// The client's quota is used up and it is blocked (either direction): dropped.
    OverQuota = 6,
}

impl PolicyVerdict {
    pub const ALL: [PolicyVerdict; 7] = [
        PolicyVerdict::Allowed,
        PolicyVerdict::Denied,
        PolicyVerdict::NoMatch,
        PolicyVerdict::Isolated,
        PolicyVerdict::NotInspected,
        PolicyVerdict::RateLimited,
        PolicyVerdict::OverQuota,
    ];
    pub const SLOTS: u32 = 8;

    pub const fn name(self) -> &'static str {
        match self {
            PolicyVerdict::Allowed => "allowed",
            PolicyVerdict::Denied => "denied",
            PolicyVerdict::NoMatch => "no_match",
            PolicyVerdict::Isolated => "isolated",
            PolicyVerdict::NotInspected => "not_inspected",
            PolicyVerdict::RateLimited => "rate_limited",
            PolicyVerdict::OverQuota => "over_quota",
        }
    }

    /// Whether the packet is dropped.
    pub const fn drops(self) -> bool {
        matches!(
            self,
            PolicyVerdict::Denied
                | PolicyVerdict::Isolated
                | PolicyVerdict::RateLimited
                | PolicyVerdict::OverQuota
        )
    }
}

#[inline(always)]
fn in_net(addr: [u8; 4], net: [u8; 4], mask: [u8; 4]) -> bool {
    u32::from_ne_bytes(addr) & u32::from_ne_bytes(mask) == u32::from_ne_bytes(net)
}

/// Isolation first (client to another client, not the server), then the client's rules in
/// order. Returns the verdict and the index of the deciding rule (`u32::MAX`: none).
/// `dport` is ignored for ICMP.
#[inline(always)]
pub fn decide(
    cfg: &PolicyConfig,
    acl: Option<&ClientAcl>,
    dst: [u8; 4],
    proto: u8,
    dport: u16,
) -> (PolicyVerdict, u32) {
    if cfg.isolate != 0
        && u32::from_ne_bytes(cfg.v4_mask) != 0
        && in_net(dst, cfg.v4_net, cfg.v4_mask)
        && dst != cfg.server
    {
        return (PolicyVerdict::Isolated, u32::MAX);
    }
    let Some(acl) = acl else {
        return (PolicyVerdict::NoMatch, u32::MAX);
    };
    let has_port = proto == PROTO_TCP || proto == PROTO_UDP;
    let mut i = 0;
    while i < MAX_ACL_RULES {
        if i as u32 >= acl.count {
            break;
        }
        let r = &acl.rules[i];
        // The network first (what most rules that do not match fail on), then the protocol,
        // then the packet's port against the range before the "any port" test: same answer,
        // fewer instructions for a rule that does not match (docs/benchmarks.md, "Rules by
        // client slot").
        if in_net(dst, r.net, r.mask)
            && (r.proto == PROTO_ANY || r.proto == proto)
            && ((has_port && dport >= r.port_lo && dport <= r.port_hi)
                || (r.port_lo == 0 && r.port_hi == u16::MAX))
        {
            return if r.action == ACTION_ALLOW {
                (PolicyVerdict::Allowed, i as u32)
            } else {
                (PolicyVerdict::Denied, i as u32)
            };
        }
        i += 1;
    }
    (PolicyVerdict::NoMatch, u32::MAX)
}

/// Slots of `PH_CLIENT_FLAGS`, `PH_CLIENT_DROPS`, `PH_CLIENT_LIMIT` and `PH_CLIENT_ACL` (two
/// entries each there): one per value of an address's last two bytes. The client subnet is a /16 or smaller (the
/// configuration and `change_subnet` refuse larger ones), so every address of it has a slot of
/// its own.
pub const CLIENT_SLOTS: u32 = 65_536;
/// `PH_CLIENT_FLAGS`: the client whose address ends in this slot has rules in `PH_CLIENT_ACL`.
pub const SLOT_HAS_RULES: u32 = 1;
/// `PH_CLIENT_FLAGS`: some client whose address ends in this slot has an entry in
/// `PH_CLIENT_LIMIT`.
pub const SLOT_HAS_LIMIT: u32 = 2;

/// `PH_CLIENT_FLAGS`: which of the slot's two entries in `PH_CLIENT_ACL` holds its rules
/// ([`acl_entry`]). The daemon writes new rules into the other one, then flips this bit.
pub const SLOT_ACL_SIDE: u32 = 4;
/// `PH_CLIENT_FLAGS`: a count the daemon adds one to whenever it flips [`SLOT_ACL_SIDE`] or
/// sets or clears [`SLOT_HAS_RULES`] (bits 8-23). A packet reads the flags again after its
/// rules: the same word means no entry it read was written meanwhile (docs/policy.md).
pub const SLOT_ACL_GEN_SHIFT: u32 = 8;
pub const SLOT_ACL_GEN_MASK: u32 = 0xffff << SLOT_ACL_GEN_SHIFT;
/// Entries of `PH_CLIENT_ACL`: two per slot.
pub const ACL_ENTRIES: u32 = 2 * CLIENT_SLOTS;

/// The entry of `PH_CLIENT_ACL` that holds the rules of `slot` while its flags are `flags`.
#[inline(always)]
pub const fn acl_entry(slot: u32, flags: u32) -> u32 {
    slot * 2 + ((flags & SLOT_ACL_SIDE) != 0) as u32
}

/// The slot of a client address (network byte order).
#[inline(always)]
pub const fn client_slot(addr: [u8; 4]) -> u32 {
    ((addr[2] as u32) << 8) | addr[3] as u32
}

/// Packets of one client dropped by its rules and by isolation (`PH_CLIENT_DROPS`, by slot;
/// the kernel adds, the daemon zeroes a slot when a client takes its address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientDrops {
    pub denied: u64,
    pub isolated: u64,
}

/// `ClientLimit::quota_action`: what happens once the quota is used up.
pub const QUOTA_NONE: u32 = 0;
/// Every packet of the client dropped until the period ends.
pub const QUOTA_BLOCK: u32 = 1;
/// The client held to the floor rate until the period ends.
pub const QUOTA_THROTTLE: u32 = 2;

/// Fixed-point shift of the nanoseconds-per-byte rates (no division per packet).
pub const RATE_SHIFT: u32 = 16;

/// Nanoseconds per byte at `kbps` kilobits per second, `<< RATE_SHIFT` (0 for 0: unlimited).
pub const fn ns_per_byte_q16(kbps: u64) -> u64 {
    // 8 bits per byte, 10^9 ns per s, 10^3 bits per kbit.
    match (8_000_000u64 << RATE_SHIFT).checked_div(kbps) {
        Some(q) => q,
        None => 0,
    }
}

/// One direction of a client's limit. The daemon writes the settings (the first three
/// fields); the kernel writes the rest.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitDir {
    /// Nanoseconds per byte at the limit, `<< RATE_SHIFT`; 0: unlimited.
    pub ns_per_byte_q16: u64,
    /// The same at the floor rate, used once a throttling quota is used up; 0: unlimited.
    pub floor_ns_per_byte_q16: u64,
    /// Bytes the client may send at once above the rate (the bucket's depth).
    pub burst_bytes: u64,
    /// Kernel: the theoretical arrival time of the next byte (GCRA), in `bpf_ktime_get_ns`.
    pub tat: u64,
    /// Kernel: bytes passed (IP packet lengths).
    pub bytes: u64,
    /// Kernel: packets dropped by the rate limit.
    pub rate_dropped: u64,
    /// Kernel: nanoseconds spent at the limit (the bucket more than half used).
    pub throttled_ns: u64,
    /// Kernel: when the last packet was seen.
    pub last_ns: u64,
}

/// A client's limits and quota (`PH_CLIENT_LIMIT`, in its client's slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientLimit {
    /// Client to the Internet (WireGuard ingress).
    pub up: LimitDir,
    /// Internet to the client (WireGuard egress).
    pub down: LimitDir,
    /// Bytes (both directions) allowed in the period; 0: no quota.
    pub quota_bytes: u64,
    /// `up.bytes + down.bytes` when the period started, less usage carried over: the daemon
    /// moves it at each start.
    pub quota_base: u64,
    /// `QUOTA_*`.
    pub quota_action: u32,
    /// The client's address (network byte order): the entry holds for it only, so an entry
    /// left in a slot by a client of an earlier subnet never meters another. All zeros: the
    /// slot is empty.
    pub addr: [u8; 4],
    /// Kernel: packets dropped because the quota is used up (blocking quota).
    pub quota_dropped: u64,
}

impl ClientLimit {
    /// Bytes counted against the quota in this period. Wrapping: a base "below zero" carries
    /// usage the kernel's counters never saw (kept on disk across a reboot).
    #[inline(always)]
    pub fn quota_used(&self) -> u64 {
        self.up
            .bytes
            .wrapping_add(self.down.bytes)
            .wrapping_sub(self.quota_base)
    }

    #[inline(always)]
    pub fn over_quota(&self) -> bool {
        self.quota_bytes != 0 && self.quota_used() >= self.quota_bytes
    }
}

/// The rate one packet meets: the floor once a throttling quota is used up (when that is
/// lower), else the limit. 0: unlimited.
#[inline(always)]
pub fn effective_rate(dir: &LimitDir, throttled_by_quota: bool) -> u64 {
    if throttled_by_quota
        && dir.floor_ns_per_byte_q16 != 0
        && (dir.ns_per_byte_q16 == 0 || dir.floor_ns_per_byte_q16 > dir.ns_per_byte_q16)
    {
        dir.floor_ns_per_byte_q16
    } else {
        dir.ns_per_byte_q16
    }
}

/// The token bucket as a generic cell rate algorithm: `tat` is when the bucket would be
/// full again. A packet of `len` bytes at `now` passes when the bucket holds it (`tat` no
/// further ahead of `now` than the burst), and then moves `tat` by its length at the rate.
/// Returns the new `tat`, or `None` (drop, `tat` unchanged). The products cannot overflow for
/// the rates and bursts the daemon accepts (64 kbit/s .. 100 Gbit/s, at most 64 MiB: below
/// 2^63); plain multiplications, since a checked one needs a 128-bit helper BPF lacks.
#[inline(always)]
pub fn gcra(tat: u64, now: u64, len: u64, q16: u64, burst_bytes: u64) -> Option<u64> {
    let tat = if tat > now { tat } else { now };
    let tolerance = burst_bytes.wrapping_mul(q16) >> RATE_SHIFT;
    if tat - now > tolerance {
        None
    } else {
        Some(tat + (len.wrapping_mul(q16) >> RATE_SHIFT))
    }
}

/// Whether the bucket is more than half used at `now` (the time counts as throttled).
#[inline(always)]
pub fn at_limit(tat: u64, now: u64, q16: u64, burst_bytes: u64) -> bool {
    tat > now && (tat - now) > (burst_bytes.wrapping_mul(q16) >> (RATE_SHIFT + 1))
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers and byte arrays only, no implicit padding (sizes checked in
    // the tests).
    unsafe impl aya::Pod for super::AclRule {}
    unsafe impl aya::Pod for super::ClientAcl {}
    unsafe impl aya::Pod for super::PolicyConfig {}
    unsafe impl aya::Pod for super::ClientLimit {}
    unsafe impl aya::Pod for super::ClientDrops {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(net: [u8; 4], bits: u32, proto: u8, ports: (u16, u16), action: u8) -> AclRule {
        let mask = if bits == 0 {
            0
        } else {
            u32::MAX << (32 - bits)
        };
        AclRule {
            net,
            mask: mask.to_be_bytes(),
            port_lo: ports.0,
            port_hi: ports.1,
            proto,
            action,
            _pad: [0; 2],
        }
    }

    #[test]
    fn layouts() {
        assert_eq!(core::mem::size_of::<AclRule>(), 16);
        assert_eq!(core::mem::size_of::<ClientAcl>(), 8 + 16 * MAX_ACL_RULES);
        assert_eq!(core::mem::size_of::<PolicyConfig>(), 24);
        assert_eq!(core::mem::size_of::<LimitDir>(), 64);
        assert_eq!(core::mem::size_of::<ClientLimit>(), 2 * 64 + 32);
        assert_eq!(core::mem::size_of::<ClientDrops>(), 16);
        assert_eq!(client_slot([10, 8, 1, 2]), 0x0102);
        assert_eq!(acl_entry(0x0102, SLOT_HAS_RULES), 0x0204);
        assert_eq!(acl_entry(0x0102, SLOT_HAS_RULES | SLOT_ACL_SIDE), 0x0205);
        assert_eq!(
            acl_entry(CLIENT_SLOTS - 1, SLOT_ACL_SIDE | SLOT_ACL_GEN_MASK),
            ACL_ENTRIES - 1
        );
    }

    #[test]
    fn the_bucket_passes_the_rate_plus_the_burst() {
        // 10 Mbit/s = 800 ns per byte; a 15,000-byte burst.
        let q = ns_per_byte_q16(10_000);
        assert_eq!(q >> RATE_SHIFT, 800);
        let (burst, len) = (15_000u64, 1_500u64);
        // One second of back-to-back 1,500-byte packets, offered at 100 Mbit/s.
        let (mut tat, mut passed) = (0u64, 0u64);
        let mut now = 1_000_000_000u64;
        let end = now + 1_000_000_000;
        while now < end {
            if let Some(t) = gcra(tat, now, len, q, burst) {
                tat = t;
                passed += len;
            }
            now += 120_000;
        }
        // 1,250,000 bytes a second, plus the burst and one packet.
        assert!(
            passed >= 1_250_000 && passed <= 1_250_000 + burst + 2 * len,
            "{passed}"
        );
        assert!(at_limit(tat, now, q, burst));
        // Idle for a while: the bucket is full again.
        assert!(!at_limit(tat, now + 1_000_000_000, q, burst));
        assert_eq!(gcra(5, 10, 100, 0, 0), Some(10), "rate 0 never drops");
    }

    #[test]
    fn a_used_up_quota_blocks_or_holds_to_the_floor() {
        let mut l = ClientLimit {
            quota_bytes: 1_000,
            quota_base: 500,
            ..ClientLimit::default()
        };
        l.up.bytes = 900;
        l.down.bytes = 500;
        assert_eq!(l.quota_used(), 900);
        assert!(!l.over_quota());
        l.down.bytes = 600;
        assert!(l.over_quota());
        // Usage carried over from before the counters: a base below zero.
        let mut carried = ClientLimit {
            quota_bytes: 1_000,
            quota_base: 0u64.wrapping_sub(700),
            ..ClientLimit::default()
        };
        carried.up.bytes = 200;
        assert_eq!(carried.quota_used(), 900);
        l.up.ns_per_byte_q16 = ns_per_byte_q16(50_000);
        l.up.floor_ns_per_byte_q16 = ns_per_byte_q16(1_000);
        assert_eq!(effective_rate(&l.up, false), ns_per_byte_q16(50_000));
        assert_eq!(effective_rate(&l.up, true), ns_per_byte_q16(1_000));
        // A floor above the limit never raises it.
        l.up.floor_ns_per_byte_q16 = ns_per_byte_q16(100_000);
        assert_eq!(effective_rate(&l.up, true), ns_per_byte_q16(50_000));
        l.quota_bytes = 0;
        assert!(!l.over_quota());
    }

    #[test]
    fn first_match_wins_ports_bind_tcp_and_udp_and_isolation_comes_first() {
        let mut acl = ClientAcl::default();
        acl.rules[0] = rule([203, 0, 113, 0], 24, PROTO_TCP, (22, 22), ACTION_DENY);
        acl.rules[1] = rule([203, 0, 113, 0], 24, PROTO_ANY, (0, u16::MAX), ACTION_ALLOW);
        acl.rules[2] = rule([0, 0, 0, 0], 0, PROTO_ICMP, (0, u16::MAX), ACTION_DENY);
        acl.count = 3;
        let cfg = PolicyConfig {
            isolate: 1,
            v4_net: [198, 51, 100, 0],
            v4_mask: [255, 255, 255, 0],
            server: [198, 51, 100, 1],
            l2_len: 0,
            limits: 0,
        };
        let d = |dst, proto, port| decide(&cfg, Some(&acl), dst, proto, port);
        assert_eq!(
            d([203, 0, 113, 5], PROTO_TCP, 22),
            (PolicyVerdict::Denied, 0)
        );
        assert_eq!(
            d([203, 0, 113, 5], PROTO_TCP, 80),
            (PolicyVerdict::Allowed, 1)
        );
        assert_eq!(
            d([203, 0, 113, 5], PROTO_ICMP, 0),
            (PolicyVerdict::Allowed, 1)
        );
        assert_eq!(d([192, 0, 2, 9], PROTO_ICMP, 0), (PolicyVerdict::Denied, 2));
        assert_eq!(d([192, 0, 2, 9], PROTO_UDP, 53).0, PolicyVerdict::NoMatch);
        assert_eq!(
            d([198, 51, 100, 3], PROTO_TCP, 80).0,
            PolicyVerdict::Isolated
        );
        assert_eq!(
            d([198, 51, 100, 1], PROTO_UDP, 53).0,
            PolicyVerdict::NoMatch
        );
        // A port rule never matches ICMP.
        let mut icmp = ClientAcl::default();
        icmp.rules[0] = rule([0, 0, 0, 0], 0, PROTO_ANY, (1, 1000), ACTION_DENY);
        icmp.count = 1;
        assert_eq!(
            decide(&cfg, Some(&icmp), [192, 0, 2, 9], PROTO_ICMP, 0).0,
            PolicyVerdict::NoMatch
        );
        assert_eq!(
            decide(&cfg, Some(&icmp), [192, 0, 2, 9], PROTO_UDP, 999).0,
            PolicyVerdict::Denied
        );
        assert_eq!(
            decide(&cfg, None, [192, 0, 2, 9], PROTO_UDP, 999).0,
            PolicyVerdict::NoMatch
        );
    }
    /// `decide` tests a rule's fields in the order that is fastest in the kernel; the answer
    /// must be the rule's plain reading, checked here over every combination of the cases.
    #[test]
    fn the_order_of_the_tests_never_changes_the_answer() {
        let plain = |r: &AclRule, dst: [u8; 4], proto: u8, dport: u16| {
            let has_port = proto == PROTO_TCP || proto == PROTO_UDP;
            let proto_ok = r.proto == PROTO_ANY || r.proto == proto;
            let all_ports = r.port_lo == 0 && r.port_hi == u16::MAX;
            let port_ok = all_ports || (has_port && dport >= r.port_lo && dport <= r.port_hi);
            proto_ok && port_ok && in_net(dst, r.net, r.mask)
        };
        let cfg = PolicyConfig::default();
        let protos = [PROTO_ANY, PROTO_ICMP, PROTO_TCP, PROTO_UDP, 47];
        let ranges = [(0, u16::MAX), (1, 1000), (22, 22), (0, 0), (1000, u16::MAX)];
        let nets = [
            ([0, 0, 0, 0], 0),
            ([203, 0, 113, 0], 24),
            ([192, 0, 2, 7], 32),
        ];
        let dsts = [[203, 0, 113, 5], [192, 0, 2, 7], [198, 51, 100, 1]];
        let ports = [0, 1, 22, 999, 1000, 1001, u16::MAX];
        for &(net, bits) in &nets {
            for &rp in &protos {
                for &range in &ranges {
                    let r = rule(net, bits, rp, range, ACTION_DENY);
                    let acl = ClientAcl {
                        count: 1,
                        rules: [r; MAX_ACL_RULES],
                        ..ClientAcl::default()
                    };
                    for &dst in &dsts {
                        for &proto in &protos[1..] {
                            for &dport in &ports {
                                let want = if plain(&r, dst, proto, dport) {
                                    (PolicyVerdict::Denied, 0)
                                } else {
                                    (PolicyVerdict::NoMatch, u32::MAX)
                                };
                                assert_eq!(
                                    decide(&cfg, Some(&acl), dst, proto, dport),
                                    want,
                                    "{r:?} {dst:?} {proto} {dport}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

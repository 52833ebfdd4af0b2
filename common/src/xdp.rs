//! The XDP guard's map layout.

/// Default capacity of the per-source map; the daemon may override it at load time.
pub const DEFAULT_MAX_SOURCES: u32 = 65_536;
/// Default capacity of the allow/deny policy map.
pub const DEFAULT_MAX_POLICIES: u32 = 131_072;
/// Length of the per-source rate window.
pub const WINDOW_NS: u64 = 5_000_000_000;
/// Slots of the global per-second series (a ring indexed by second).
pub const SECOND_SLOTS: u32 = 64;
/// Words of the protected-ports bitmap (one bit per TCP port).
pub const PORT_WORDS: u32 = 65_536 / 32;

/// Key of the per-source and policy maps: the source address as 16 bytes. IPv4 sources are
/// stored as IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) so one map serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub addr: [u8; 16],
}

impl SourceKey {
    pub const fn from_ipv4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        Self { addr }
    }

    pub const fn from_ipv6(octets: [u8; 16]) -> Self {
        Self { addr: octets }
    }
}

/// Value of the per-source map, one copy per CPU. Times are `bpf_ktime_get_coarse_ns()`
/// (CLOCK_MONOTONIC_COARSE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceStats {
    pub packets: u64,
    pub bytes: u64,
    /// TCP SYNs (without ACK) to a protected port: new connection attempts.
    pub new_tcp: u64,
    pub last_seen_ns: u64,
    /// `now / WINDOW_NS` of the window `window_packets` counts in.
    pub window_epoch: u64,
    pub window_packets: u64,
}

/// Value of the policy map (per-CPU: every CPU holds the same settings and its own drop
/// count): an allow entry, a deny entry, or both (allow wins).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// 0 = no expiry; otherwise the entry stops applying at this coarse-monotonic time.
    pub allow_until_ns: u64,
    pub deny_until_ns: u64,
    /// `POLICY_ALLOW` | `POLICY_DENY`.
    pub flags: u32,
    /// A `DenyReason` discriminant.
    pub deny_reason: u32,
    /// Packets this CPU dropped because of this entry. Denied packets are not counted in the
    /// per-source map: the drop path stops at the policy lookup, to stay cheap under a flood.
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

pub const POLICY_ALLOW: u32 = 1;
pub const POLICY_DENY: u32 = 2;

/// Why a source is denied; each reason has its own drop counter.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// An operator's `datapath deny`.
    Manual = 1,
    /// The sentry's penalty box escalated to a kernel drop.
    Penalty = 2,
}

impl DenyReason {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(DenyReason::Manual),
            2 => Some(DenyReason::Penalty),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            DenyReason::Manual => "manual",
            DenyReason::Penalty => "penalty",
        }
    }
}

/// One second of the global packet series, one copy per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SecondSlot {
    /// Coarse-monotonic second this slot counts; a slot whose second is stale is reset.
    pub second: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// Value of the verdict map, one copy per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounter {
    pub packets: u64,
    pub bytes: u64,
}

/// What the guard did with a packet and why. The discriminant is the slot in the verdict map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Passed: IPv4, source counted.
    PassIpv4 = 0,
    /// Passed: IPv6, source counted.
    PassIpv6 = 1,
    /// Passed: not IP (ARP, LLDP, ...); nothing to attribute.
    PassNonIp = 2,
    /// Passed: an IP ethertype whose header is cut short; the stack will discard it.
    PassMalformed = 3,
    /// Passed: the per-source map refused the update (should not happen with an LRU map).
    PassUntracked = 4,
    /// Passed: the source is on the allow list (even if also denied).
    PassAllowed = 5,
    /// Dropped: denied by an operator.
    DropManual = 6,
    /// Dropped: in the sentry's penalty box.
    DropPenalty = 7,
}

impl Verdict {
    /// Every verdict, in slot order.
    pub const ALL: [Verdict; 8] = [
        Verdict::PassIpv4,
        Verdict::PassIpv6,
        Verdict::PassNonIp,
        Verdict::PassMalformed,
        Verdict::PassUntracked,
        Verdict::PassAllowed,
        Verdict::DropManual,
        Verdict::DropPenalty,
    ];

    /// The verdict map's size: room for reasons later programs add.
    pub const SLOTS: u32 = 32;

    pub const fn for_deny(reason: u32) -> Verdict {
        match DenyReason::from_u32(reason) {
            Some(DenyReason::Penalty) => Verdict::DropPenalty,
            _ => Verdict::DropManual,
        }
    }

    pub const fn is_drop(self) -> bool {
        matches!(self, Verdict::DropManual | Verdict::DropPenalty)
    }

    /// `pass` or `drop`.
    pub const fn action(self) -> &'static str {
        if self.is_drop() { "drop" } else { "pass" }
    }

    /// Why, as a metric label.
    pub const fn reason(self) -> &'static str {
        match self {
            Verdict::PassIpv4 => "ipv4",
            Verdict::PassIpv6 => "ipv6",
            Verdict::PassNonIp => "non_ip",
            Verdict::PassMalformed => "malformed",
            Verdict::PassUntracked => "untracked",
            Verdict::PassAllowed => "allowed",
            Verdict::DropManual => "denied_manual",
            Verdict::DropPenalty => "denied_penalty",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are #[repr(C)], contain only integers and have no padding (checked below).
    unsafe impl aya::Pod for super::SourceKey {}
    unsafe impl aya::Pod for super::SourceStats {}
    unsafe impl aya::Pod for super::TrafficCounter {}
    unsafe impl aya::Pod for super::Policy {}
    unsafe impl aya::Pod for super::SecondSlot {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_is_mapped() {
        let key = SourceKey::from_ipv4([192, 0, 2, 7]);
        assert_eq!(
            key.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 7]
        );
    }

    #[test]
    fn verdict_slots_are_dense_and_fit() {
        for (i, v) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*v as u32, i as u32);
        }
        assert!((Verdict::ALL.len() as u32) <= Verdict::SLOTS);
    }

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(core::mem::size_of::<SourceKey>(), 16);
        assert_eq!(core::mem::size_of::<SourceStats>(), 6 * 8);
        assert_eq!(core::mem::size_of::<TrafficCounter>(), 16);
        assert_eq!(core::mem::size_of::<Policy>(), 40);
        assert_eq!(core::mem::size_of::<SecondSlot>(), 24);
    }

    #[test]
    fn deny_reasons_map_to_drop_verdicts() {
        assert_eq!(
            Verdict::for_deny(DenyReason::Manual as u32),
            Verdict::DropManual
        );
        assert_eq!(
            Verdict::for_deny(DenyReason::Penalty as u32),
            Verdict::DropPenalty
        );
        assert!(Verdict::DropPenalty.is_drop() && !Verdict::PassAllowed.is_drop());
    }
}

//! The XDP guard's map layout.

/// Default capacity of the per-source map; the daemon may override it at load time.
pub const DEFAULT_MAX_SOURCES: u32 = 65_536;

/// Key of the per-source map: the source address as 16 bytes. IPv4 sources are stored as
/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) so one map serves both families.
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

/// Value of the per-source map, one copy per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceStats {
    pub packets: u64,
    pub bytes: u64,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE) of the last packet seen on this CPU.
    pub last_seen_ns: u64,
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
}

impl Verdict {
    /// Every verdict, in slot order.
    pub const ALL: [Verdict; 5] = [
        Verdict::PassIpv4,
        Verdict::PassIpv6,
        Verdict::PassNonIp,
        Verdict::PassMalformed,
        Verdict::PassUntracked,
    ];

    /// The verdict map's size: room for the drop reasons later programs add.
    pub const SLOTS: u32 = 32;

    /// `pass` or `drop`.
    pub const fn action(self) -> &'static str {
        match self {
            Verdict::PassIpv4
            | Verdict::PassIpv6
            | Verdict::PassNonIp
            | Verdict::PassMalformed
            | Verdict::PassUntracked => "pass",
        }
    }

    /// Why, as a metric label.
    pub const fn reason(self) -> &'static str {
        match self {
            Verdict::PassIpv4 => "ipv4",
            Verdict::PassIpv6 => "ipv6",
            Verdict::PassNonIp => "non_ip",
            Verdict::PassMalformed => "malformed",
            Verdict::PassUntracked => "untracked",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are #[repr(C)], contain only integers and have no padding.
    unsafe impl aya::Pod for super::SourceKey {}
    unsafe impl aya::Pod for super::SourceStats {}
    unsafe impl aya::Pod for super::TrafficCounter {}
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
        assert_eq!(core::mem::size_of::<SourceStats>(), 24);
        assert_eq!(core::mem::size_of::<TrafficCounter>(), 16);
    }
}

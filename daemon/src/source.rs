//! Who a connection, request or packet is counted against. An IPv4 address is one source; an
//! IPv6 host picks any address in its subscriber's prefix (a /64 by default), so everywhere a
//! source is counted, limited or blocked, an IPv6 address stands for its prefix. IPv4-mapped
//! IPv6 addresses count as the IPv4 address.

use std::net::{IpAddr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// The IPv6 prefix length one source holds (`[sources] ipv6_prefix`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SourcePrefix(u8);

impl Default for SourcePrefix {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl SourcePrefix {
    /// One subscriber's prefix as ISPs hand them out (RFC 6177).
    pub const DEFAULT: Self = Self(64);
    /// Shorter prefixes would lump unrelated subscribers together.
    pub const MIN: u8 = 32;

    /// `None` outside `MIN..=128`.
    pub const fn new(len: u8) -> Option<Self> {
        if len >= Self::MIN && len <= 128 {
            Some(Self(len))
        } else {
            None
        }
    }

    pub const fn bits(self) -> u8 {
        self.0
    }

    /// The source `ip` is counted as: the IPv4 address, or the IPv6 address with its host bits
    /// cleared.
    pub fn of(self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let mask = u128::MAX.checked_shl(128 - u32::from(self.0)).unwrap_or(0);
                    IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & mask))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_sources_are_their_prefix() {
        let p = SourcePrefix::DEFAULT;
        assert_eq!(p.of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(p.of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(p.of(ip("192.0.2.7")), ip("192.0.2.7"));
        let p48 = SourcePrefix::new(48).unwrap();
        assert_eq!(p48.of(ip("2001:db8:1:2::1")), ip("2001:db8:1::"));
        let p128 = SourcePrefix::new(128).unwrap();
        assert_eq!(p128.of(ip("2001:db8::1")), ip("2001:db8::1"));
        assert!(SourcePrefix::new(31).is_none());
        assert!(SourcePrefix::new(129).is_none());
    }
}

//! Who a connection, request or packet is counted against. An IPv4 address is one source; an
//! IPv6 host picks any address in its subscriber's prefix (a /64 by default), so everywhere a
//! source is counted, limited or blocked, an IPv6 address stands for its prefix. IPv4-mapped
//! IPv6 addresses count as the IPv4 address.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

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

    /// The source `ip` is counted as, with its prefix length: an IPv4 address, or the IPv6
    /// prefix of this length that holds it.
    pub fn source(self, ip: IpAddr) -> Source {
        match self.of(ip) {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => Source::V6(v6, self.0),
        }
    }
}

/// One source as counted, limited or blocked: an IPv4 address, or an IPv6 prefix (a /128 is
/// one address). Written `192.0.2.7`, `2001:db8::7` (a /128) or `2001:db8:1:2::/64`; the
/// host bits of a prefix are always clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    V4(Ipv4Addr),
    /// The prefix's first address and its length (1..=128).
    V6(Ipv6Addr, u8),
}

/// Why a string is not a source.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or an IPv6 prefix (address/length)")]
pub struct BadSource(pub String);

impl Source {
    /// One address: IPv4 (also IPv4-mapped IPv6) or an IPv6 /128.
    pub fn addr(ip: IpAddr) -> Self {
        SourcePrefix(128).source(ip)
    }

    /// An IPv6 prefix; host bits past `len` are cleared. `None` outside 1..=128.
    pub fn v6_prefix(addr: Ipv6Addr, len: u8) -> Option<Self> {
        if !(1..=128).contains(&len) {
            return None;
        }
        let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
        Some(Source::V6(Ipv6Addr::from_bits(addr.to_bits() & mask), len))
    }

    /// The first address of the source.
    pub fn ip(self) -> IpAddr {
        match self {
            Source::V4(v4) => IpAddr::V4(v4),
            Source::V6(v6, _) => IpAddr::V6(v6),
        }
    }

    /// Prefix length: 32 for IPv4, the prefix's for IPv6.
    pub fn prefix_len(self) -> u8 {
        match self {
            Source::V4(_) => 32,
            Source::V6(_, len) => len,
        }
    }

    /// Whether this is more than one address (an IPv6 prefix shorter than /128).
    pub fn is_prefix(self) -> bool {
        matches!(self, Source::V6(_, len) if len < 128)
    }

    /// Whether `ip` belongs to this source.
    pub fn contains(self, ip: IpAddr) -> bool {
        match (self, Self::addr(ip)) {
            (Source::V4(a), Source::V4(b)) => a == b,
            (Source::V6(net, len), Source::V6(b, _)) => {
                Self::v6_prefix(b, len).is_some_and(|s| s == Source::V6(net, len))
            }
            _ => false,
        }
    }
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        Self::addr(ip)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::V4(v4) => write!(f, "{v4}"),
            Source::V6(v6, 128) => write!(f, "{v6}"),
            Source::V6(v6, len) => write!(f, "{v6}/{len}"),
        }
    }
}

impl FromStr for Source {
    type Err = BadSource;

    /// `a.b.c.d`, `a.b.c.d/32`, an IPv6 address, or `ipv6/len` (host bits must be clear, so
    /// a typo does not silently widen into another prefix).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadSource(s.to_string());
        let t = s.trim();
        match t.split_once('/') {
            None => t.parse::<IpAddr>().map(Self::addr).map_err(|_| bad()),
            Some((addr, len)) => {
                let len: u8 = len.parse().map_err(|_| bad())?;
                match addr.parse::<IpAddr>().map_err(|_| bad())? {
                    IpAddr::V4(v4) if len == 32 => Ok(Source::V4(v4)),
                    IpAddr::V4(_) => Err(bad()),
                    IpAddr::V6(v6) => {
                        if v6.to_ipv4_mapped().is_some() {
                            return Err(bad());
                        }
                        let source = Self::v6_prefix(v6, len).ok_or_else(bad)?;
                        if source.ip() != IpAddr::V6(v6) {
                            return Err(bad());
                        }
                        Ok(source)
                    }
                }
            }
        }
    }
}

impl Serialize for Source {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
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

    #[test]
    fn sources_print_parse_and_contain() {
        let p = SourcePrefix::DEFAULT;
        let net = p.source(ip("2001:db8:1:2:aaaa::1"));
        assert_eq!(net.to_string(), "2001:db8:1:2::/64");
        assert!(net.is_prefix());
        assert!(net.contains(ip("2001:db8:1:2::ffff")));
        assert!(!net.contains(ip("2001:db8:1:3::1")));
        assert!(!net.contains(ip("192.0.2.1")));
        assert_eq!("2001:db8:1:2::/64".parse::<Source>().unwrap(), net);
        assert_eq!(p.source(ip("::ffff:192.0.2.7")).to_string(), "192.0.2.7");
        assert_eq!(
            "192.0.2.7/32".parse::<Source>().unwrap().to_string(),
            "192.0.2.7"
        );
        assert_eq!(
            "2001:db8::7".parse::<Source>().unwrap().to_string(),
            "2001:db8::7"
        );
        assert_eq!(
            "2001:db8::7/128".parse::<Source>().unwrap(),
            Source::addr(ip("2001:db8::7"))
        );
        for bad in [
            "2001:db8:1:2::1/64",
            "2001:db8::/129",
            "2001:db8::/0",
            "192.0.2.0/24",
            "nonsense",
            "::ffff:192.0.2.7/120",
        ] {
            assert!(bad.parse::<Source>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&net).unwrap();
        assert_eq!(json, "\"2001:db8:1:2::/64\"");
        assert_eq!(serde_json::from_str::<Source>(&json).unwrap(), net);
    }
}

//! The client subnet: an IPv4 network whose first host is the server.

use std::net::Ipv4Addr;

use crate::error::InvalidValue;

/// An IPv4 subnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    pub fn parse(text: &str) -> Result<Self, InvalidValue> {
        let (addr, prefix) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| InvalidValue(format!("{text:?} is not address/prefix")))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| InvalidValue(format!("{addr:?} is not an IPv4 address")))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| InvalidValue(format!("prefix {prefix:?} is not 0..=32")))?;
        let mask = Self::mask_of(prefix);
        Ok(Self {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    pub fn mask_of(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        }
    }

    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(Self::mask_of(self.prefix))
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !Self::mask_of(self.prefix))
    }

    /// The server's address: the first host.
    pub fn server_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Addresses clients can get: every host but the server's.
    pub fn client_hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let last = u32::from(self.broadcast()).saturating_sub(1);
        (first..=last).map(Ipv4Addr::from)
    }

    pub fn capacity(&self) -> usize {
        (1usize << (32 - self.prefix as usize)).saturating_sub(3)
    }

    /// RFC 1918 private space or the CGNAT range (RFC 6598).
    pub fn is_private(&self) -> bool {
        let inside = |net: [u8; 4], prefix: u8| {
            self.prefix >= prefix
                && Subnet {
                    network: Ipv4Addr::from(net),
                    prefix,
                }
                .contains(self.network)
        };
        inside([10, 0, 0, 0], 8)
            || inside([172, 16, 0, 0], 12)
            || inside([192, 168, 0, 0], 16)
            || inside([100, 64, 0, 0], 10)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_of(self.prefix) == u32::from(self.network)
    }

    /// The host offset of `ip` inside this subnet.
    pub fn offset(&self, ip: Ipv4Addr) -> u32 {
        u32::from(ip) - u32::from(self.network)
    }

    pub fn at(&self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + offset)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_arithmetic() -> Result<(), InvalidValue> {
        let s = Subnet::parse("10.8.0.77/24")?;
        assert_eq!(s.to_string(), "10.8.0.0/24");
        assert_eq!(s.server_ip(), Ipv4Addr::new(10, 8, 0, 1));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 8, 0, 255));
        assert_eq!(s.capacity(), 253);
        let hosts: Vec<Ipv4Addr> = s.client_hosts().collect();
        assert_eq!(hosts.first(), Some(&Ipv4Addr::new(10, 8, 0, 2)));
        assert_eq!(hosts.last(), Some(&Ipv4Addr::new(10, 8, 0, 254)));
        assert_eq!(hosts.len(), 253);
        assert!(Subnet::parse("300.300.300.0/24").is_err());
        assert!(Subnet::parse("10.0.0.0/33").is_err());
        Ok(())
    }
}

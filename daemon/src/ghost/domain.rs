//! The ghost domain: syntax, resolution (sslip.io / nip.io names decode offline, as those
//! services answer with the address written in the name), and this server's own addresses.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

/// Suffixes whose names carry their address.
const WILDCARD_DNS: [&str; 2] = ["sslip.io", "nip.io"];
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The address written in an sslip.io / nip.io name, if it is one: `192-0-2-1.sslip.io`,
/// `vpn-192-0-2-1.sslip.io`, `192.0.2.1.nip.io`, `app.192.0.2.1.nip.io`, `2001-db8--1.sslip.io`.
pub fn wildcard_address(domain: &str) -> Option<IpAddr> {
    let head = WILDCARD_DNS
        .iter()
        .find_map(|suffix| domain.strip_suffix(suffix)?.strip_suffix('.'))?;
    let labels: Vec<&str> = head.split('.').collect();
    if labels.len() >= 4
        && let Ok(ip) = labels[labels.len() - 4..].join(".").parse::<Ipv4Addr>()
    {
        return Some(IpAddr::V4(ip));
    }
    let last = labels.last()?;
    let dashes: Vec<&str> = last.split('-').collect();
    if dashes.len() >= 4
        && let Ok(ip) = dashes[dashes.len() - 4..].join(".").parse::<Ipv4Addr>()
    {
        return Some(IpAddr::V4(ip));
    }
    last.replace('-', ":")
        .parse::<Ipv6Addr>()
        .ok()
        .map(IpAddr::V6)
}

/// Why a domain's addresses are not known.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("this sslip.io/nip.io name carries no address")]
    NoWildcardAddress,
    #[error("no DNS answer within 5 s")]
    Timeout,
    #[error("does not resolve: {0}")]
    Lookup(#[source] std::io::Error),
    #[error("resolves to no address")]
    NoAddress,
}

/// The addresses `domain` resolves to.
pub async fn resolve(domain: &str) -> Result<Vec<IpAddr>, ResolveError> {
    if WILDCARD_DNS
        .iter()
        .any(|s| domain == *s || domain.ends_with(&format!(".{s}")))
    {
        return wildcard_address(domain)
            .map(|ip| vec![ip])
            .ok_or(ResolveError::NoWildcardAddress);
    }
    let lookup = tokio::net::lookup_host((domain, 443));
    let addrs = tokio::time::timeout(RESOLVE_TIMEOUT, lookup)
        .await
        .map_err(|_| ResolveError::Timeout)?
        .map_err(ResolveError::Lookup)?;
    let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
    ips.sort_unstable();
    ips.dedup();
    if ips.is_empty() {
        return Err(ResolveError::NoAddress);
    }
    Ok(ips)
}

/// This host's addresses a client could reach: every interface but loopback and the VPN
/// interface, link-local excluded.
pub fn own_addresses(vpn_interface: &str) -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = addrs
        .filter(|a| a.interface_name != vpn_interface)
        .filter_map(|a| {
            let s = a.address?;
            if let Some(v4) = s.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
            IpAddr::V6(v6) => {
                !v6.is_loopback() && !v6.is_unicast_link_local() && !v6.is_unspecified()
            }
        })
        .collect();
    ips.sort_unstable();
    ips.dedup();
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_names_decode_offline() {
        let v4 = |s: &str| Some(IpAddr::V4(s.parse().unwrap_or(Ipv4Addr::UNSPECIFIED)));
        assert_eq!(wildcard_address("192-0-2-1.sslip.io"), v4("192.0.2.1"));
        assert_eq!(wildcard_address("vpn-192-0-2-1.sslip.io"), v4("192.0.2.1"));
        assert_eq!(wildcard_address("192.0.2.1.nip.io"), v4("192.0.2.1"));
        assert_eq!(
            wildcard_address("app.198.51.100.7.nip.io"),
            v4("198.51.100.7")
        );
        assert_eq!(
            wildcard_address("2001-db8--1.sslip.io"),
            Some(IpAddr::V6(
                "2001:db8::1".parse().unwrap_or(Ipv6Addr::UNSPECIFIED)
            ))
        );
        assert_eq!(wildcard_address("nothing.sslip.io"), None);
        assert_eq!(wildcard_address("192-0-2-1.example.com"), None);
    }
}

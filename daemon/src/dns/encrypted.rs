//! Encrypted DNS that would route VPN clients around the resolver, closed in the kernel
//! (`tc_encrypted_dns` on the WireGuard interface): DoT and DoQ to anyone but this resolver,
//! and DoH to the known DoH resolvers' addresses (a list shipped as data, plus the operator's).
//! Browsers and phones that cannot reach their encrypted resolver fall back to the system's,
//! which is this one. See docs/dns.md, "Encrypted DNS to other resolvers".

use std::{net::IpAddr, path::Path};

use ipnet::IpNet;

use crate::{
    config::{DnsConfig, parse_net},
    datapath::encrypted_dns::EncryptedDnsSettings,
    error::Error,
};

/// The shipped list of DoH resolvers' addresses.
const SHIPPED: &str = include_str!("../../data/doh-resolvers.txt");

/// Parses a list (one address or prefix per line, `#` comments); errors name `what` and the
/// line.
fn parse_list(what: &str, text: &str) -> Result<Vec<IpNet>, Error> {
    text.lines()
        .enumerate()
        .map(|(i, line)| (i, line.split('#').next().unwrap_or_default().trim()))
        .filter(|(_, line)| !line.is_empty())
        .map(|(i, line)| {
            parse_net(line).ok_or_else(|| {
                Error::config(format!(
                    "{what}, line {}: {line:?} is not an address or CIDR prefix",
                    i + 1
                ))
            })
        })
        .collect()
}

/// Every DoH resolver the kernel is to know: the shipped list, `doh_resolvers` and the file.
pub fn doh_resolvers(config: &DnsConfig) -> Result<Vec<IpNet>, Error> {
    let mut all = parse_list("the shipped DoH resolver list", SHIPPED)?;
    for r in &config.doh_resolvers {
        all.push(parse_net(r).ok_or_else(|| {
            Error::config(format!(
                "dns.doh_resolvers: {r:?} is not an address or CIDR prefix"
            ))
        })?);
    }
    if !config.doh_resolvers_file.is_empty() {
        let path = Path::new(&config.doh_resolvers_file);
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        all.extend(parse_list(
            &format!("dns.doh_resolvers_file {}", path.display()),
            &text,
        )?);
    }
    Ok(all)
}

/// The kernel's settings for `resolvers` (the addresses the resolver listens on).
pub fn settings(
    config: &DnsConfig,
    doh: &[IpNet],
    resolvers: impl IntoIterator<Item = IpAddr>,
) -> EncryptedDnsSettings {
    EncryptedDnsSettings {
        drop_dot_doq: config.drop_dot_doq,
        drop_doh: config.drop_doh,
        resolvers: resolvers.into_iter().collect(),
        doh: if config.drop_doh {
            doh.to_vec()
        } else {
            Vec::new()
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_shipped_list_parses_and_holds_the_big_resolvers() {
        let all = doh_resolvers(&DnsConfig::default()).unwrap();
        for ip in ["8.8.8.8", "1.1.1.1", "9.9.9.9", "2606:4700:4700::1111"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(all.iter().any(|n| n.contains(&ip)), "{ip}");
        }
        assert!(all.len() > 50);
    }

    #[test]
    fn a_bad_line_names_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("doh.txt");
        std::fs::write(&file, "# mine\n192.0.2.0/24\nnot-an-address\n").unwrap();
        let config = DnsConfig {
            doh_resolvers_file: file.display().to_string(),
            ..DnsConfig::default()
        };
        let e = doh_resolvers(&config).unwrap_err().to_string();
        assert!(
            e.contains("doh.txt, line 3") && e.contains("not-an-address"),
            "{e}"
        );
        let off = settings(
            &DnsConfig {
                drop_doh: false,
                ..DnsConfig::default()
            },
            &[parse_net("192.0.2.0/24").unwrap()],
            [],
        );
        assert!(off.doh.is_empty());
    }
}

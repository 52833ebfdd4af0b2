//! The SNI filter in the kernel (`tc_encrypted_dns` on the WireGuard interface, see
//! docs/dns.md, "Server names in TLS"): VPN clients' TLS ClientHellos whose server name is
//! blocked are dropped, matched against the kernel's blocked-domain set with the same key as
//! the DNS filter; in strict mode UDP/443 (QUIC) and ClientHellos with ECH to a known ECH
//! front name are dropped too. This module tells the kernel the switches and the front names.

use crate::{config::DnsConfig, datapath::sni::SniSettings, domain_hash::DomainHasher};

/// The shipped list of ECH front names.
const SHIPPED: &str = include_str!("../../data/ech-fronts.txt");

/// Every ECH front name: the shipped list and `[dns] ech_fronts`, lowercase, without a
/// trailing dot (as the kernel hashes the name it reads).
pub fn ech_fronts(config: &DnsConfig) -> Vec<String> {
    let shipped = SHIPPED
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty());
    let mut all: Vec<String> = shipped
        .chain(config.ech_fronts.iter().map(|s| s.trim()))
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
        .collect();
    all.sort();
    all.dedup();
    all
}

/// The kernel's settings from `[dns]`, the front names keyed by `hasher`.
pub fn settings(config: &DnsConfig, hasher: &DomainHasher) -> SniSettings {
    SniSettings {
        drop_blocked: config.sni_filter,
        strict: config.sni_strict,
        ech_fronts: if config.sni_strict {
            ech_fronts(config).iter().map(|n| hasher.hash(n)).collect()
        } else {
            Vec::new()
        },
    }
}

/// What `dns status` shows under `resolver.sni`: switches, the number of front names and the
/// packets per verdict (no address, no name).
pub fn status(status: &crate::datapath::sni::SniStatus) -> serde_json::Value {
    serde_json::json!({
        "filter": status.drop_blocked,
        "strict": status.strict,
        "ech_fronts": status.ech_fronts,
        "packets": status.counters.iter()
            .map(|c| (c.verdict.to_string(), serde_json::json!(c.packets)))
            .collect::<serde_json::Map<_, _>>(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_shipped_fronts_and_the_operators_are_one_lowercase_list() {
        let config = DnsConfig {
            ech_fronts: vec!["Front.Example.".into(), "cloudflare-ech.com".into()],
            ..DnsConfig::default()
        };
        let all = ech_fronts(&config);
        assert!(all.contains(&"cloudflare-ech.com".to_string()));
        assert!(all.contains(&"front.example".to_string()));
        assert_eq!(all.iter().filter(|n| *n == "cloudflare-ech.com").count(), 1);
    }
}

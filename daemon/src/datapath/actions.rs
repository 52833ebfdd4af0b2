//! The `datapath` socket module: what the kernel side is doing, and the operator's levers on
//! it (allow/deny lists, kernel DNS rules, the multihop mark).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::Duration,
};

use phantom_common::xdp::DenyReason;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Datapath, DomainSetError, List, MarkSettings, Owner, busiest};
use crate::{
    admin::{ApiError, NoParams, ParamKind, ParamSpec, Registry, run_blocking},
    config::DatapathConfig,
    domain_name,
    error::Error,
    protocol::codes,
    source::Source,
};

/// Another name holds the domain's key in the kernel set (`dns_block`).
pub const DOMAIN_KEY_CLASH: &str = "DOMAIN_KEY_CLASH";

/// What the `datapath` actions work with.
pub struct Handles {
    /// `None` with `[datapath] enabled = false`: the actions say so.
    pub datapath: Option<Arc<Datapath>>,
    pub config: DatapathConfig,
    /// `[wireguard] subnet`: the multihop mark's default client range.
    pub client_subnet: String,
}

/// Runs a blocking map operation off the async runtime.
async fn with_datapath<T, F>(h: &Handles, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&Datapath) -> Result<T, Error> + Send + 'static,
{
    let Some(dp) = h.datapath.clone() else {
        return Err(ApiError::unavailable(
            "the datapath is disabled ([datapath] enabled = false)",
        ));
    };
    run_blocking(move || f(&dp).map_err(ApiError::from)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopSourcesParams {
    count: i64,
    window: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IpTtlParams {
    ip: Source,
    ttl_seconds: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IpParams {
    ip: Source,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainParams {
    domain: String,
    subdomains: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainOnlyParams {
    domain: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MarkParams {
    enabled: Option<bool>,
    subnet: Option<String>,
    subnet6: Option<String>,
    mark: Option<i64>,
}

const IP: ParamSpec = ParamSpec::required(
    "ip",
    ParamKind::Source,
    "IPv4 or IPv6 source address, or an IPv6 prefix of the [sources] ipv6_prefix length (2001:db8:1:2::/64)",
);
const TTL: ParamSpec = ParamSpec::optional(
    "ttl_seconds",
    ParamKind::Integer {
        min: 1,
        max: 31_536_000,
    },
    None,
    "lift the entry by itself after this many seconds (default: permanent)",
);
const DOMAIN: ParamSpec = ParamSpec::required(
    "domain",
    ParamKind::String { max_len: 260 },
    "domain name (punycode for internationalised names)",
);

/// A prefix of another length than the guard matches is bad input, not a failure.
async fn prefix_usable(h: &Handles, source: Source) -> Result<(), ApiError> {
    with_datapath(h, move |dp| Ok(dp.policy.check(source)))
        .await?
        .map_err(|e| ApiError::new(codes::INVALID_PARAMETER, e.to_string()))
}

fn ttl(secs: Option<i64>) -> Option<Duration> {
    secs.and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
}

/// A domain for a kernel rule: normalised, and at least two labels so that no rule can cover
/// a whole top-level domain.
fn kernel_domain(raw: &str) -> Result<String, ApiError> {
    // Punycode only: the rule listed is exactly the name typed.
    let name = domain_name::normalise_ascii(raw)
        .map_err(|e| ApiError::new(codes::INVALID_PARAMETER, e.to_string()))?;
    if !name.contains('.') {
        return Err(ApiError::new(
            codes::INVALID_PARAMETER,
            format!(
                "domain {name:?}: a rule needs at least two labels (it would cover a whole top-level domain)"
            ),
        ));
    }
    Ok(name)
}

fn parse_subnet<T: std::str::FromStr>(raw: &str, max: u8) -> Result<(T, u8), ApiError> {
    let bad = || {
        ApiError::new(
            codes::INVALID_PARAMETER,
            format!("{raw:?} is not address/prefix"),
        )
    };
    let (addr, prefix) = raw.split_once('/').ok_or_else(bad)?;
    let addr = addr.parse::<T>().map_err(|_| bad())?;
    let prefix = prefix.parse::<u8>().map_err(|_| bad())?;
    if prefix == 0 || prefix > max {
        return Err(bad());
    }
    Ok((addr, prefix))
}

/// Every address of this host (namespace), which the multihop mark must leave alone.
pub(crate) fn local_addresses() -> Vec<IpAddr> {
    nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| a.address)
                .filter_map(|s| {
                    if let Some(v4) = s.as_sockaddr_in() {
                        Some(IpAddr::V4(v4.ip()))
                    } else {
                        s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn register(registry: &mut Registry, handles: Arc<Handles>) {
    registry.module(
        "datapath",
        "the eBPF data plane: programs, counters, allow/deny lists, kernel DNS rules",
    );

    let c = Arc::clone(&handles);
    registry.action(
        "datapath",
        "status",
        "attached programs (interface, mode, since) and map sizes",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let bpffs = c.config.bpffs.clone();
                if c.datapath.is_none() {
                    return Ok(
                        json!({"enabled": false, "programs": [], "maps": [], "bpffs": bpffs}),
                    );
                }
                let (programs, maps, vpn) = with_datapath(&c, |dp| {
                    Ok((dp.attachments(), dp.maps()?, dp.vpn_interface().to_string()))
                })
                .await?;
                let vpn_attached = programs.iter().any(|a| a.kind == "tc");
                Ok(json!({
                    "enabled": true,
                    "programs": programs,
                    "maps": maps,
                    "bpffs": bpffs,
                    "vpn_interface": {"name": vpn, "programs_attached": vpn_attached},
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "datapath",
        "top_sources",
        "the busiest source addresses seen by the XDP guard, by packets",
        vec![
            ParamSpec::optional(
                "count",
                ParamKind::Integer {
                    min: 1,
                    max: 10_000,
                },
                Some("10"),
                "how many sources to return",
            ),
            ParamSpec::optional(
                "window",
                ParamKind::Integer {
                    min: 1,
                    max: 86_400,
                },
                None,
                "only sources seen within the last N seconds (counts stay cumulative)",
            ),
        ],
        move |p: TopSourcesParams| {
            let c = Arc::clone(&c);
            async move {
                let count = usize::try_from(p.count).unwrap_or(10);
                let window = p.window.and_then(|w| u64::try_from(w).ok());
                let (tracked, top) = with_datapath(&c, move |dp| {
                    let all = dp.guard.sources()?;
                    Ok((all.len(), busiest(all, count, window)))
                })
                .await?;
                Ok(json!({
                    "count": top.len(),
                    "window_seconds": window,
                    "tracked_sources": tracked,
                    "sources": top,
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "datapath",
        "counters",
        "packets by verdict and reason, DNS filter verdicts, and the last seconds' packet rate",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let (counters, dns, seconds) = with_datapath(&c, |dp| {
                    Ok((
                        dp.guard.verdicts()?,
                        dp.dns_verdicts()?,
                        dp.guard.per_second(10)?,
                    ))
                })
                .await?;
                let sum = |verdict: &str| -> u64 {
                    counters
                        .iter()
                        .filter(|v| v.verdict == verdict)
                        .map(|v| v.packets)
                        .sum()
                };
                let totals = json!({
                    "packets": counters.iter().map(|v| v.packets).sum::<u64>(),
                    "bytes": counters.iter().map(|v| v.bytes).sum::<u64>(),
                    "passed": sum("pass"),
                    "dropped": sum("drop"),
                });
                Ok::<Value, ApiError>(json!({
                    "counters": counters,
                    "totals": totals,
                    "dns_filter": dns,
                    "packets_per_second": seconds,
                }))
            }
        },
    );

    for (action, list, summary) in [
        (
            "deny",
            List::Deny,
            "drop every packet from a source in XDP (allow wins over deny)",
        ),
        (
            "allow",
            List::Allow,
            "never drop a source, whatever denies it",
        ),
    ] {
        let c = Arc::clone(&handles);
        registry.action(
            "datapath",
            action,
            summary,
            vec![IP, TTL],
            move |p: IpTtlParams| {
                let c = Arc::clone(&c);
                async move {
                    let ip = p.ip;
                    let ttl = ttl(p.ttl_seconds);
                    prefix_usable(&c, ip).await?;
                    let entry = with_datapath(&c, move |dp| {
                        dp.policy.set(ip, list, ttl, DenyReason::Manual)
                    })
                    .await?;
                    let key = if list == List::Deny {
                        "denied"
                    } else {
                        "allowed"
                    };
                    Ok::<_, ApiError>(json!({
                        key: true,
                        "address": entry.address,
                        "expires_in_seconds": entry.expires_in_seconds,
                        "expires_at": entry.expires_at,
                    }))
                }
            },
        );
    }

    for (action, list, key, summary) in [
        ("unblock", List::Deny, "unblocked", "lift a deny entry"),
        (
            "disallow",
            List::Allow,
            "disallowed",
            "remove an allow entry",
        ),
    ] {
        let c = Arc::clone(&handles);
        registry.action("datapath", action, summary, vec![IP], move |p: IpParams| {
            let c = Arc::clone(&c);
            async move {
                let ip = p.ip;
                prefix_usable(&c, ip).await?;
                let was = with_datapath(&c, move |dp| dp.policy.remove(ip, list)).await?;
                Ok::<_, ApiError>(json!({ key: was, "address": ip }))
            }
        });
    }

    for (action, list, summary) in [
        (
            "list_denied",
            List::Deny,
            "live deny entries with reason and expiry",
        ),
        (
            "list_allowed",
            List::Allow,
            "live allow entries with expiry",
        ),
    ] {
        let c = Arc::clone(&handles);
        registry.action("datapath", action, summary, vec![], move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let entries = with_datapath(&c, move |dp| dp.policy.list(list)).await?;
                Ok::<_, ApiError>(json!({"count": entries.len(), "entries": entries}))
            }
        });
    }

    let c = Arc::clone(&handles);
    registry.action(
        "datapath",
        "dns_block",
        "kernel rule: answers for this domain (and by default its subdomains) become NXDOMAIN",
        vec![
            DOMAIN,
            ParamSpec::optional(
                "subdomains",
                ParamKind::Boolean,
                Some("true"),
                "also block every subdomain",
            ),
        ],
        move |p: DomainParams| {
            let c = Arc::clone(&c);
            async move {
                let name = kernel_domain(&p.domain)?;
                let subdomains = p.subdomains.unwrap_or(true);
                let n = name.clone();
                let Some(dp) = c.datapath.clone() else {
                    return Err(ApiError::unavailable(
                        "the datapath is disabled ([datapath] enabled = false)",
                    ));
                };
                let report = run_blocking(move || {
                    dp.domains
                        .add(Owner::Operator, &n, subdomains)
                        .map_err(|e| match e {
                            DomainSetError::Clash(clash) => {
                                ApiError::new(DOMAIN_KEY_CLASH, clash.to_string())
                            }
                            DomainSetError::Daemon(e) => e.into(),
                        })
                })
                .await?;
                Ok::<_, ApiError>(json!({
                    "domain": name,
                    "subdomains": subdomains,
                    "kernel_entries": report.total,
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "datapath",
        "dns_unblock",
        "remove a kernel DNS rule",
        vec![DOMAIN],
        move |p: DomainOnlyParams| {
            let c = Arc::clone(&c);
            async move {
                let name = kernel_domain(&p.domain)?;
                let n = name.clone();
                let report =
                    with_datapath(&c, move |dp| dp.domains.remove(Owner::Operator, &n)).await?;
                Ok(json!({
                    "domain": name,
                    "removed": report.is_some(),
                    "kernel_entries": report.map(|r| r.total),
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "datapath",
        "dns_rules",
        "the operator's kernel DNS rules and the size of the kernel domain set",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let (rules, total) = with_datapath(&c, |dp| {
                    Ok((dp.domains.operator_rules()?, dp.domains.kernel_len()?))
                })
                .await?;
                let rules: Vec<Value> = rules
                    .into_iter()
                    .map(|(domain, subdomains)| json!({"domain": domain, "subdomains": subdomains}))
                    .collect();
                Ok::<_, ApiError>(
                    json!({"count": rules.len(), "rules": rules, "kernel_entries": total}),
                )
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "datapath",
        "multihop_mark",
        "show, or switch, the in-kernel mark on client traffic bound for the multihop exit",
        vec![
            ParamSpec::optional(
                "enabled",
                ParamKind::Boolean,
                None,
                "switch marking on or off (omit to only show)",
            ),
            ParamSpec::optional(
                "subnet",
                ParamKind::String { max_len: 64 },
                None,
                "client IPv4 subnet (default: [wireguard] subnet)",
            ),
            ParamSpec::optional(
                "subnet6",
                ParamKind::String { max_len: 64 },
                None,
                "client IPv6 subnet",
            ),
            ParamSpec::optional(
                "mark",
                ParamKind::Integer {
                    min: 1,
                    max: u32::MAX as i64,
                },
                None,
                "skb mark (default: [datapath] multihop_mark)",
            ),
        ],
        move |p: MarkParams| {
            let c = Arc::clone(&c);
            async move {
                if let Some(enabled) = p.enabled {
                    let subnet = p.subnet.clone().unwrap_or(c.client_subnet.clone());
                    let v4 = parse_subnet::<Ipv4Addr>(&subnet, 32)?;
                    let v6 = p
                        .subnet6
                        .as_deref()
                        .map(|s| parse_subnet::<Ipv6Addr>(s, 128))
                        .transpose()?;
                    let mark = p.mark.map_or(c.config.multihop_mark, |m| m as u32);
                    let settings = MarkSettings {
                        enabled,
                        mark,
                        v4: Some(v4),
                        v6,
                        local: local_addresses(),
                    };
                    with_datapath(&c, move |dp| dp.multihop.set(&settings)).await?;
                } else if p.subnet.is_some() || p.subnet6.is_some() || p.mark.is_some() {
                    return Err(ApiError::new(
                        codes::MISSING_PARAMETER,
                        "give enabled=true|false with subnet, subnet6 or mark",
                    ));
                }
                let status = with_datapath(&c, |dp| dp.multihop.status()).await?;
                serde_json::to_value(status).map_err(|e| ApiError::internal(e.to_string()))
            }
        },
    );

    // The actions that change no state (a `read` token of the HTTPS API may call them).
    registry.reads(
        "datapath",
        &[
            "status",
            "top_sources",
            "counters",
            "list_denied",
            "list_allowed",
            "dns_rules",
        ],
    );
}

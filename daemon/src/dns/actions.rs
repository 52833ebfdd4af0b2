//! The `dns` socket module: the upstream servers (get, change, live tests), the resolver's
//! status, dry run, per-client blocking and cache.

use std::{net::IpAddr, sync::Arc, sync::atomic::Ordering};

use serde::Deserialize;
use serde_json::json;

use super::{
    Resolver,
    upstreams::{Upstreams, probe_all},
};
use crate::{
    admin::{ApiError, NoParams, ParamKind, ParamSpec, Registry, run_blocking},
    core::ClientChanges,
    datapath::Datapath,
    protocol::codes,
};

const INVALID_DNS_SERVER: &str = "INVALID_DNS_SERVER";

/// What the `dns` actions work with.
pub struct Handles {
    pub upstreams: Arc<Upstreams>,
    /// `None` while the resolver is off.
    pub resolver: Option<Arc<Resolver>>,
    /// Whether a blocklist exists (the kernel filter applies it even without the resolver).
    pub blocklist_on: bool,
    pub datapath: Option<Arc<Datapath>>,
    /// The clients, for per-client policy by name.
    pub clients: ClientChanges,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeParams {
    primary: Option<String>,
    secondary: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestParams {
    servers: Option<String>,
    domain: String,
}

fn server_ip(which: &str, raw: &str) -> Result<IpAddr, ApiError> {
    raw.trim().parse().map_err(|_| {
        ApiError::new(
            INVALID_DNS_SERVER,
            format!("{which} {raw:?} is not an IP address"),
        )
    })
}

pub fn register(registry: &mut Registry, handles: Arc<Handles>) {
    registry.module(
        "dns",
        "the upstream DNS servers, Phantom's resolver for VPN clients, live tests",
    );
    register_resolver(registry, Arc::clone(&handles));

    let c = Arc::clone(&handles);
    registry.action(
        "dns",
        "get_dns_servers",
        "the primary and secondary servers",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let s = c.upstreams.servers();
                Ok::<_, ApiError>(json!({"primary": s.primary, "secondary": s.secondary}))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "dns",
        "change_dns_servers",
        "change the primary and/or secondary server (previous values kept)",
        vec![
            ParamSpec::optional("primary", ParamKind::String { max_len: 64 }, None, "IPv4 or IPv6 address"),
            ParamSpec::optional("secondary", ParamKind::String { max_len: 64 }, None, "IPv4 or IPv6 address"),
        ],
        move |p: ChangeParams| {
            let c = Arc::clone(&c);
            async move {
                if p.primary.is_none() && p.secondary.is_none() {
                    return Err(ApiError::new(codes::MISSING_PARAMETER, "give primary, secondary or both"));
                }
                let primary = p.primary.as_deref().map(|v| server_ip("primary", v)).transpose()?;
                let secondary = p.secondary.as_deref().map(|v| server_ip("secondary", v)).transpose()?;
                let d = Arc::clone(&c.upstreams);
                let s = tokio::task::spawn_blocking(move || d.change(primary, secondary))
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))??;
                Ok(json!({
                    "success": true,
                    "dns_servers": s,
                    "client_configs_updated": {
                        "success": true,
                        "message": "exported client configurations carry the new servers; clients pick them up when they re-import",
                    },
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "dns",
        "test_dns_servers",
        "query each server and time the answer",
        vec![
            ParamSpec::optional("servers", ParamKind::String { max_len: 2048 }, None, "JSON array of addresses (default: the configured two)"),
            ParamSpec::optional("domain", ParamKind::String { max_len: 253 }, Some("google.com"), "name to ask for"),
        ],
        move |p: TestParams| {
            let c = Arc::clone(&c);
            async move {
                let servers: Vec<IpAddr> = match p.servers.as_deref() {
                    None => {
                        let s = c.upstreams.servers();
                        vec![s.primary, s.secondary]
                    }
                    Some(raw) => {
                        let list: Vec<String> = serde_json::from_str(raw).map_err(|_| {
                            ApiError::new(codes::INVALID_PARAMETER, "servers must be a JSON array of addresses, e.g. [\"8.8.8.8\",\"1.1.1.1\"]")
                        })?;
                        if list.is_empty() || list.len() > 8 {
                            return Err(ApiError::new(codes::INVALID_PARAMETER, "servers must hold 1 to 8 addresses"));
                        }
                        list.iter().map(|s| server_ip("server", s)).collect::<Result<_, _>>()?
                    }
                };
                let domain = crate::domain_name::normalise(&p.domain)
                    .map_err(|_| ApiError::new(codes::INVALID_PARAMETER, format!("domain {:?} is not a valid name", p.domain)))?;
                let results = probe_all(servers, domain).await;
                Ok::<_, ApiError>(json!({
                    "all_passed": results.iter().all(|r| r.success),
                    "servers_tested": results.len(),
                    "results": results,
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action("dns", "status", "mode, servers and health from live tests", vec![], move |_: NoParams| {
        let c = Arc::clone(&c);
        async move {
            let s = c.upstreams.servers();
            let resolver_on = c.resolver.as_ref().is_some_and(|r| r.filtering() && !r.listening().is_empty());
            let filtering = resolver_on
                || (c.blocklist_on
                    && c.datapath.as_ref().is_some_and(|d| d.attachments().iter().any(|a| a.program == "tc_dns_filter")));
            let domains = ["google.com", "cloudflare.com"];
            let mut test_results = Vec::new();
            let mut healthy = true;
            for server in [s.primary, s.secondary] {
                let mut tests = Vec::new();
                for d in domains {
                    let p = probe_all(vec![server], d.to_string()).await.pop();
                    let ok = p.as_ref().is_some_and(|p| p.success);
                    healthy &= ok;
                    tests.push(json!({
                        "domain": d,
                        "success": ok,
                        "response": p.as_ref().and_then(|p| p.response.clone()),
                        "response_time_ms": p.as_ref().and_then(|p| p.response_time_ms),
                        "error": p.and_then(|p| p.error),
                    }));
                }
                test_results.push(json!({"server": server, "tests": tests}));
            }
            Ok::<_, ApiError>(json!({
                "mode": if filtering { "filtering" } else { "standard" },
                "configuration": {"primary": s.primary, "secondary": s.secondary},
                "health": {"status": if healthy { "healthy" } else { "degraded" }, "test_results": test_results},
                "resolver": c.resolver.as_ref().map(|r| resolver_status(r)),
            }))
        }
    });

    // `status` asks the upstreams live; a dashboard polling every few seconds wants only the
    // resolver's own counters.
    let c = Arc::clone(&handles);
    registry.action(
        "dns",
        "stats",
        "the resolver's counters (queries, blocked, cache), without testing the upstreams",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move { resolver(&c).map(|r| resolver_status(&r)) }
        },
    );

    // The actions that change no state (a `read` token of the HTTPS API may call them).
    registry.reads(
        "dns",
        &[
            "get_dns_servers",
            "test_dns_servers",
            "status",
            "stats",
            "client_policies",
        ],
    );
}

/// The resolver's settings and totals (no names, no addresses of clients other than the
/// policy's own list).
fn resolver_status(r: &Resolver) -> serde_json::Value {
    let policy = r.policy();
    let st = &r.stats;
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    json!({
        "listening": r.listening(),
        "filtering": r.filtering(),
        "block_response": r.config().block_response,
        "dry_run": policy.dry_run,
        "clients_blocking_off": policy.blocking_off,
        "queries": {"udp": n(&st.queries_udp), "tcp": n(&st.queries_tcp)},
        "blocked": n(&st.blocked),
        "dry_run_matches": n(&st.dry_run_matches),
        "exempt_matches": n(&st.exempt_matches),
        "forwarded": n(&st.forwarded),
        "forwards_in_flight": n(&st.forwards_in_flight),
        "upstream_failures": n(&st.upstream_failures),
        "malformed": n(&st.malformed),
        "truncated": n(&st.truncated),
        "cache": {
            "entries": r.cache.len(),
            "capacity": r.config().cache_entries,
            "hits": n(&r.cache.hits),
            "misses": n(&r.cache.misses),
        },
        "bypass": r.bypass_stats.by_reason().into_iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<serde_json::Map<_, _>>(),
        "encrypted_dns": r.encrypted_dns_status(),
        "stopped": stopped_by_layer(r),
        "sni": r.sni_status(),
    })
}

/// `Resolver::stopped` as `{layer: {reason: count}}`.
fn stopped_by_layer(r: &Resolver) -> serde_json::Map<String, serde_json::Value> {
    let mut layers = serde_json::Map::new();
    for (layer, reason, n) in r.stopped() {
        if let Some(m) = layers
            .entry(layer.to_string())
            .or_insert_with(|| json!({}))
            .as_object_mut()
        {
            m.insert(reason.to_string(), json!(n));
        }
    }
    layers
}

fn resolver(h: &Handles) -> Result<Arc<Resolver>, ApiError> {
    h.resolver.clone().ok_or_else(|| {
        ApiError::unavailable(
            "the resolver is off ([dns] listen = \"off\", or no WireGuard server)",
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DryRunParams {
    enabled: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientPolicyParams {
    client_name: String,
    blocking: bool,
}

/// The resolver's actions: dry run, per-client blocking, cache.
fn register_resolver(registry: &mut Registry, handles: Arc<Handles>) {
    let c = Arc::clone(&handles);
    registry.action(
        "dns",
        "sync_doh",
        "sync the DoH resolver lists of [[dns.doh_sources]] now (each download checked like the blocklist's sources; a rejected one changes nothing) and write them into the kernel",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let r = resolver(&c)?;
                if r.config().doh_sources.is_empty() {
                    return Err(ApiError::new(
                        "NO_SOURCES",
                        "no [[dns.doh_sources]] in the configuration",
                    ));
                }
                r.sync_doh().await;
                Ok(json!({"success": true, "sources": r.doh_sources_status()}))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "dns",
        "set_dry_run",
        "dry run on: blocked names are counted and answered normally (resolver and kernel)",
        vec![ParamSpec::required(
            "enabled",
            ParamKind::Boolean,
            "true or false",
        )],
        move |p: DryRunParams| {
            let c = Arc::clone(&c);
            async move {
                let r = resolver(&c)?;
                let policy =
                    run_blocking(move || r.set_dry_run(p.enabled).map_err(ApiError::from)).await?;
                Ok(json!({"success": true, "dry_run": policy.dry_run}))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "dns",
        "set_client_policy",
        "switch blocking on or off for one VPN client (resolver and kernel)",
        vec![
            ParamSpec::required(
                "client_name",
                ParamKind::String { max_len: 64 },
                "a client of the core module",
            ),
            ParamSpec::required(
                "blocking",
                ParamKind::Boolean,
                "true = filtered (the default), false = unfiltered",
            ),
        ],
        move |p: ClientPolicyParams| {
            let c = Arc::clone(&c);
            async move {
                let r = resolver(&c)?;
                let clients = c.clients.borrow().clone();
                if clients.subnet.is_none() {
                    return Err(ApiError::unavailable("the WireGuard server is disabled"));
                }
                run_blocking(move || {
                    let known = clients.clients.contains_key(&p.client_name);
                    // Switching blocking back on for a removed client is allowed: it tidies up.
                    if !known && !p.blocking {
                        return Err(ApiError::new(
                            "CLIENT_NOT_FOUND",
                            format!("no client named {:?}", p.client_name),
                        ));
                    }
                    let policy = r
                        .set_client_blocking(&p.client_name, p.blocking)
                        .map_err(ApiError::from)?;
                    Ok(json!({
                        "success": true,
                        "client_name": p.client_name,
                        "blocking": !policy.blocking_off.contains(&p.client_name),
                    }))
                })
                .await
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "dns",
        "client_policies",
        "the clients with blocking switched off",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let r = resolver(&c)?;
                run_blocking(move || {
                    let clients: Vec<_> = r
                        .exempt_clients()
                        .into_iter()
                        .map(|(name, ip)| json!({"client_name": name, "ip": ip, "blocking": false}))
                        .collect();
                    Ok(json!({"default_blocking": true, "total": clients.len(), "clients": clients}))
                })
                .await
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "dns",
        "flush_cache",
        "empty the resolver's answer cache",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let r = resolver(&c)?;
                Ok::<_, ApiError>(json!({"success": true, "removed": r.cache.clear()}))
            }
        },
    );
}

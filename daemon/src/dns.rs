//! The `dns` socket module (seed 000): the upstream DNS servers written into client configs
//! (and, once Phantom's resolver lands, its upstreams), with live tests built with
//! hickory-proto.
//!
//! The servers in force live in `state_dir/dns.json` (written by `change_dns_servers`, with the
//! previous values); until the first change they are `[dns] primary/secondary`.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, Query, ResponseCode},
    rr::{Name, RecordType},
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::atomic::Ordering;

use crate::{
    admin::{ApiError, NoParams, ParamKind, ParamSpec, Registry, run_blocking},
    config::DnsConfig,
    context::Context,
    error::Error,
    protocol::codes,
    resolver::Resolver,
    store,
};

const INVALID_DNS_SERVER: &str = "INVALID_DNS_SERVER";
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Servers {
    pub primary: IpAddr,
    pub secondary: IpAddr,
    pub previous_primary: Option<IpAddr>,
    pub previous_secondary: Option<IpAddr>,
}

pub struct Dns {
    servers: Mutex<Servers>,
    path: PathBuf,
}

impl Dns {
    pub fn open(config: &DnsConfig, state_dir: &Path) -> Result<Self, Error> {
        let path = state_dir.join("dns.json");
        let servers = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?,
            Err(_) => Servers {
                primary: config
                    .primary
                    .parse()
                    .map_err(|_| Error::config("dns.primary"))?,
                secondary: config
                    .secondary
                    .parse()
                    .map_err(|_| Error::config("dns.secondary"))?,
                previous_primary: None,
                previous_secondary: None,
            },
        };
        Ok(Self {
            servers: Mutex::new(servers),
            path,
        })
    }

    pub fn servers(&self) -> Servers {
        match self.servers.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces either or both servers, keeping the previous values; durable before it returns.
    pub fn change(
        &self,
        primary: Option<IpAddr>,
        secondary: Option<IpAddr>,
    ) -> Result<Servers, Error> {
        let mut servers = self
            .servers
            .lock()
            .map_err(|_| Error::Other("dns lock poisoned".into()))?;
        let next = Servers {
            primary: primary.unwrap_or(servers.primary),
            secondary: secondary.unwrap_or(servers.secondary),
            previous_primary: Some(servers.primary),
            previous_secondary: Some(servers.secondary),
        };
        store::write_json(&self.path, &next)?;
        *servers = next.clone();
        Ok(next)
    }
}

/// One query's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Probe {
    pub server: String,
    pub success: bool,
    pub status: String,
    pub response_time_ms: Option<f64>,
    pub test_domain: String,
    pub answers: usize,
    pub error: Option<String>,
}

/// Sends one A query for `domain` to `server`:53 and waits for the matching answer.
pub fn probe(server: IpAddr, domain: &str) -> Probe {
    let mut out = Probe {
        server: server.to_string(),
        success: false,
        status: "error".into(),
        response_time_ms: None,
        test_domain: domain.to_string(),
        answers: 0,
        error: None,
    };
    let result = (|| -> Result<(Message, Duration), String> {
        let name = Name::from_ascii(domain).map_err(|e| format!("bad test domain: {e}"))?;
        let mut query = Message::query();
        let id: u16 = rand_id();
        query.metadata.id = id;
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(name, RecordType::A));
        let bytes = query.to_vec().map_err(|e| e.to_string())?;
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .map_err(|e: std::net::AddrParseError| e.to_string())?;
        let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
        sock.connect(SocketAddr::new(server, 53))
            .map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(QUERY_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        sock.send(&bytes).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4096];
        loop {
            let n = sock.recv(&mut buf).map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    "timeout".to_string()
                }
                _ => e.to_string(),
            })?;
            let Ok(reply) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if reply.metadata.id == id {
                return Ok((reply, started.elapsed()));
            }
            if started.elapsed() > QUERY_TIMEOUT {
                return Err("timeout".into());
            }
        }
    })();
    match result {
        Ok((reply, took)) => {
            let code = reply.metadata.response_code;
            out.response_time_ms = Some((took.as_secs_f64() * 1e5).round() / 100.0);
            out.answers = reply.answers.len();
            out.success = matches!(code, ResponseCode::NoError | ResponseCode::NXDomain);
            out.status = if out.success {
                "ok".into()
            } else {
                format!("{code}").to_lowercase()
            };
            if !out.success {
                out.error = Some(format!("server answered {code}"));
            }
        }
        Err(e) => {
            out.status = if e == "timeout" {
                "timeout".into()
            } else {
                "error".into()
            };
            out.error = Some(e);
        }
    }
    out
}

fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    u16::from_ne_bytes(b)
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

fn dns(ctx: &Context) -> Result<Arc<Dns>, ApiError> {
    ctx.dns
        .clone()
        .ok_or_else(|| ApiError::unavailable("the dns module did not start"))
}

fn server_ip(which: &str, raw: &str) -> Result<IpAddr, ApiError> {
    raw.trim().parse().map_err(|_| {
        ApiError::new(
            INVALID_DNS_SERVER,
            format!("{which} {raw:?} is not an IP address"),
        )
    })
}

async fn probe_all(servers: Vec<IpAddr>, domain: String) -> Vec<Probe> {
    let tasks: Vec<_> = servers
        .into_iter()
        .map(|s| {
            let d = domain.clone();
            tokio::task::spawn_blocking(move || probe(s, &d))
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        if let Ok(p) = t.await {
            out.push(p);
        }
    }
    out
}

pub fn register(registry: &mut Registry, ctx: Arc<Context>) {
    registry.module(
        "dns",
        "the upstream DNS servers, Phantom's resolver for VPN clients, live tests",
    );
    register_resolver(registry, Arc::clone(&ctx));

    let c = Arc::clone(&ctx);
    registry.action(
        "dns",
        "get_dns_servers",
        "the primary and secondary servers",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let s = dns(&c)?.servers();
                Ok::<_, ApiError>(json!({"primary": s.primary, "secondary": s.secondary}))
            }
        },
    );

    let c = Arc::clone(&ctx);
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
                let d = dns(&c)?;
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

    let c = Arc::clone(&ctx);
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
                        let s = dns(&c)?.servers();
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
                let domain = crate::blocklist::model::normalise(&p.domain)
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

    let c = Arc::clone(&ctx);
    registry.action("dns", "status", "mode, servers and health from live tests", vec![], move |_: NoParams| {
        let c = Arc::clone(&c);
        async move {
            let s = dns(&c)?.servers();
            let resolver_on = c.resolver.as_ref().is_some_and(|r| r.filtering() && !r.listening().is_empty());
            let filtering = resolver_on
                || (c.blocklist.is_some()
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
                        "response": p.as_ref().map(|p| p.status.clone()),
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
        "upstream_failures": n(&st.upstream_failures),
        "malformed": n(&st.malformed),
        "truncated": n(&st.truncated),
        "cache": {
            "entries": r.cache.len(),
            "capacity": r.config().cache_entries,
            "hits": n(&r.cache.hits),
            "misses": n(&r.cache.misses),
        },
    })
}

fn resolver(ctx: &Context) -> Result<Arc<Resolver>, ApiError> {
    ctx.resolver.clone().ok_or_else(|| {
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
fn register_resolver(registry: &mut Registry, ctx: Arc<Context>) {
    let c = Arc::clone(&ctx);
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

    let c = Arc::clone(&ctx);
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
                let server = c
                    .wireguard
                    .clone()
                    .ok_or_else(|| ApiError::unavailable("the WireGuard server is disabled"))?;
                run_blocking(move || {
                    let known = server
                        .store
                        .get(&p.client_name)
                        .map_err(ApiError::from)?
                        .is_some();
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

    let c = Arc::clone(&ctx);
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

    let c = Arc::clone(&ctx);
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

/// The servers for client configurations: Phantom's resolver while it serves the tunnel
/// (so every client is filtered), the upstreams otherwise.
pub fn client_dns(ctx: &Context) -> Vec<String> {
    if let Some(r) = &ctx.resolver
        && r.config().listen.trim() == "auto"
        && let Some(server) = &ctx.wireguard
    {
        return vec![server.subnet().server_ip().to_string()];
    }
    match &ctx.dns {
        Some(d) => {
            let s = d.servers();
            vec![s.primary.to_string(), s.secondary.to_string()]
        }
        None => {
            let config = ctx.config();
            vec![config.dns.primary, config.dns.secondary]
        }
    }
}

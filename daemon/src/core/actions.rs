//! The `core` socket module: the WireGuard server and the client lifecycle, with the action
//! names, parameters and reply fields of the original phantom-api.

use std::{path::PathBuf, sync::Arc, time::Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{
    AddError, ChangeError, ClientDns, CoreError, Live, Server, TWEAK_RESTART_AFTER_ADD,
    store::Client, unix_now, valid_client_name,
};
use crate::{
    admin::{ApiError, NoParams, PageParams, ParamKind, ParamSpec, Registry, run_blocking},
    config::WireguardConfig,
    datapath::Datapath,
    logging::RecentLogs,
    protocol::{self, codes},
    wg::{Subnet, net},
};

/// Something a domain above core does that depends on the client subnet staying put (ghost
/// mode, multihop); while it holds, `change_subnet` is refused with its message.
pub struct SubnetHold {
    /// The key in `get_subnet_info`'s `blockers`.
    pub name: &'static str,
    /// Why the change is refused, and what to do.
    pub refusal: &'static str,
    pub held: Box<dyn Fn() -> bool + Send + Sync>,
}

/// A tunnel in front of WireGuard (ghost mode's local wstunnel client): the Endpoint and
/// AllowedIPs client configurations carry instead of the server's own, and the command that
/// starts the tunnel's client.
#[derive(Clone, Debug, PartialEq)]
pub struct TunnelRoute {
    pub endpoint: String,
    pub allowed_ips: String,
    pub connection_command: String,
}

impl TunnelRoute {
    /// What a user does with an exported configuration, in order.
    pub fn steps(&self) -> [String; 2] {
        [
            format!("run: {}", self.connection_command),
            format!(
                "then bring WireGuard up with the config (Endpoint {} is the local wstunnel client)",
                self.endpoint
            ),
        ]
    }
}

/// Where client configurations point instead of the server's own endpoint, while it holds.
pub type ExportRoute = Box<dyn Fn() -> Option<TunnelRoute> + Send + Sync>;

/// The daemon itself, for `server_status`.
pub struct DaemonInfo {
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
    pub started_at: time::OffsetDateTime,
    pub started: Instant,
    /// `RLIMIT_NOFILE` in force (raised at start as far as the hard limit allows).
    pub open_files_limit: u64,
    /// Descriptors the enabled listeners' connection caps may need, with a reserve.
    pub open_files_needed: u64,
}

/// What the `core` actions work with.
pub struct Handles {
    /// `None` with `[wireguard] enabled = false`: the client actions say so.
    pub server: Option<Arc<Server>>,
    pub wireguard: WireguardConfig,
    pub datapath: Option<Arc<Datapath>>,
    pub logs: RecentLogs,
    pub daemon: DaemonInfo,
    pub client_dns: watch::Receiver<ClientDns>,
    pub subnet_holds: Vec<SubnetHold>,
    pub export_route: Option<ExportRoute>,
}

impl Handles {
    /// The `DNS =` servers of client configurations right now.
    pub fn client_dns(&self) -> Vec<String> {
        self.client_dns
            .borrow()
            .render(self.server.as_ref().map(|s| s.subnet()))
    }

    fn route(&self) -> Option<TunnelRoute> {
        self.export_route.as_ref().and_then(|route| route())
    }
}

const CLIENT_EXISTS: &str = "CLIENT_EXISTS";
const CLIENT_NOT_FOUND: &str = "CLIENT_NOT_FOUND";
const INVALID_CLIENT_NAME: &str = "INVALID_CLIENT_NAME";
const SUBNET_FULL: &str = "SUBNET_FULL";
const WIREGUARD_DISABLED: &str = "WIREGUARD_DISABLED";
const INVALID_SUBNET: &str = "INVALID_SUBNET";
const SUBNET_CHANGE_REFUSED: &str = "SUBNET_CHANGE_REFUSED";
const CONFIRMATION_REQUIRED: &str = "CONFIRMATION_REQUIRED";
const SUBNET_CHANGE_FAILED: &str = "SUBNET_CHANGE_FAILED";
const INVALID_EXPIRY: &str = "INVALID_EXPIRY";
const CLIENT_EXPIRED: &str = "CLIENT_EXPIRED";

/// The latest expiry accepted: the end of year 9999 (RFC 3339's four-digit years).
const MAX_EXPIRY: i64 = 253_402_300_799;

/// Reads an `expires_at` parameter: Unix seconds, an RFC 3339 time, or `never` (`None`). A
/// time not after `now` is refused: an expiry is set ahead of time (`disable_client` cuts a
/// client at once).
fn parse_expiry(raw: &str, now: i64) -> Result<Option<i64>, ApiError> {
    let text = raw.trim();
    if text.eq_ignore_ascii_case("never") {
        return Ok(None);
    }
    let shown = || text.chars().take(64).collect::<String>();
    let at = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<i64>().ok().filter(|at| *at <= MAX_EXPIRY)
    } else {
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .ok()
            .map(time::OffsetDateTime::unix_timestamp)
    }
    .ok_or_else(|| {
        ApiError::new(
            INVALID_EXPIRY,
            format!(
                "expires_at {:?}: expected Unix seconds (1767225599), an RFC 3339 time (2025-12-31T23:59:59Z) or never",
                shown()
            ),
        )
    })?;
    if at <= now {
        return Err(ApiError::new(
            INVALID_EXPIRY,
            format!(
                "expires_at {:?} ({at}) is not in the future (now {now}); use disable_client to cut a client at once",
                shown()
            ),
        ));
    }
    Ok(Some(at))
}

/// The `expires_at` parameter of `add_client` and `set_client_expiry`.
const EXPIRES_AT_HELP: &str =
    "Unix seconds, an RFC 3339 time (2026-12-31T23:59:59Z) or never; must be in the future";

/// `CLIENT_EXPIRED` for a client whose expiry has come.
fn expired(name: &str, expires_at: i64) -> ApiError {
    ApiError::new(
        CLIENT_EXPIRED,
        format!(
            "client {name:?} expired at {expires_at} ({}); extend it first: core set_client_expiry client_name={name} expires_at=<a future time>|never",
            rfc3339_of(expires_at)
        ),
    )
}

/// Unix seconds as RFC 3339 (UTC), for messages.
fn rfc3339_of(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(protocol::rfc3339)
        .unwrap_or_else(|_| unix.to_string())
}

/// The outcome of checking a subnet change, in the reply shape of `validate_subnet_change`.
struct SubnetCheck {
    new: Subnet,
    errors: Vec<String>,
    warnings: Vec<String>,
    checks: Value,
    mapping: Vec<(String, std::net::Ipv4Addr, std::net::Ipv4Addr)>,
}

fn check_subnet(server: &Server, raw: &str) -> Result<SubnetCheck, ApiError> {
    let new = Subnet::parse(raw)
        .map_err(|e| ApiError::new(INVALID_SUBNET, format!("new_subnet {raw:?}: {e}")))?;
    let current = server.subnet();
    let clients = server.store.all()?;
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let size_ok = (16..=29).contains(&new.prefix);
    if !size_ok {
        errors.push(format!(
            "/{} is outside /16../29: too small for a server and clients, or too large to manage",
            new.prefix
        ));
    }
    if new == current {
        errors.push(format!("{new} is the current subnet"));
    }
    let private = new.is_private();
    if !private {
        warnings.push(format!(
            "{new} is not RFC 1918 or CGNAT space: clients will not reach real hosts in that range"
        ));
    }
    let conflicts = net::overlapping_routes(&new, &server.config.interface);
    for (dest, iface) in &conflicts {
        errors.push(format!("{new} overlaps the route {dest} on {iface}"));
    }
    let mapping: Vec<_> = clients
        .iter()
        .map(|c| (c.name.clone(), c.ip, new.at(current.offset(c.ip))))
        .collect();
    let unfit: Vec<&String> = mapping
        .iter()
        .filter(|(_, _, ip)| !new.client_hosts().any(|h| h == *ip))
        .map(|(n, _, _)| n)
        .collect();
    let capacity_ok = size_ok && unfit.is_empty() && clients.len() <= new.capacity();
    if size_ok && !unfit.is_empty() {
        errors.push(format!(
            "{} client(s) sit at host offsets {new} does not have (first: {})",
            unfit.len(),
            unfit[0]
        ));
    }
    let checks = json!({
        "subnet_size": {"passed": size_ok, "prefixlen": new.prefix, "usable_ips": new.capacity()},
        "private_subnet": {"passed": private},
        "network_conflicts": {"passed": conflicts.is_empty(), "conflicts": conflicts.iter().map(|(d, i)| json!({"route": d, "interface": i})).collect::<Vec<_>>()},
        "capacity": {"passed": capacity_ok, "clients": clients.len(), "usable_ips": new.capacity()},
    });
    Ok(SubnetCheck {
        new,
        errors,
        warnings,
        checks,
        mapping,
    })
}

fn mapping_json(mapping: &[(String, std::net::Ipv4Addr, std::net::Ipv4Addr)]) -> Vec<Value> {
    mapping
        .iter()
        .map(|(name, old, new)| json!({"client_name": name, "old_ip": old, "new_ip": new}))
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameParams {
    client_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddParams {
    client_name: String,
    expires_at: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpiryParams {
    client_name: String,
    expires_at: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportParams {
    client_name: String,
    qr: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CountParams {
    count: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsParams {
    lines: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubnetParams {
    new_subnet: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeSubnetParams {
    new_subnet: String,
    confirm: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TweakParams {
    setting_name: String,
    value: String,
}

const CLIENT_NAME: ParamSpec = ParamSpec::required(
    "client_name",
    ParamKind::String { max_len: 256 },
    "1-64 letters, digits, '-' or '_'",
);

fn server(h: &Handles) -> Result<Arc<Server>, ApiError> {
    h.server.clone().ok_or_else(|| {
        ApiError::new(
            WIREGUARD_DISABLED,
            "the WireGuard server is disabled ([wireguard] enabled = false)",
        )
    })
}

/// A failure of the server or its store: `INTERNAL_ERROR`, like every daemon error.
impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        ApiError::of_host(&e)
    }
}

/// Runs blocking store/device work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CoreError> + Send + 'static,
) -> Result<T, ApiError> {
    run_blocking(move || f().map_err(ApiError::from)).await
}

/// Refuses a malformed client name with `INVALID_CLIENT_NAME` (shared with ghost's export).
pub fn checked_name(name: &str) -> Result<(), ApiError> {
    if valid_client_name(name) {
        Ok(())
    } else {
        Err(ApiError::new(
            INVALID_CLIENT_NAME,
            format!(
                "client name {:?} must be 1 to 64 characters of letters, digits, '-' and '_'",
                name.chars().take(80).collect::<String>()
            ),
        ))
    }
}

/// A client's wg-quick configuration, pointing at `route` (Endpoint, AllowedIPs) when given
/// and at the server's own endpoint otherwise; `CLIENT_NOT_FOUND` when there is no such client.
pub async fn export_config(
    server: Arc<Server>,
    dns: Vec<String>,
    name: &str,
    route: Option<&TunnelRoute>,
) -> Result<(Client, String), ApiError> {
    let route = route.map(|r| (r.endpoint.clone(), r.allowed_ips.clone()));
    let wanted = name.to_string();
    blocking(move || {
        let client = server.store.get(&wanted)?;
        Ok(client.map(|cl| {
            let config = match &route {
                Some((endpoint, allowed)) => server.client_config_via(&cl, &dns, endpoint, allowed),
                None => server.client_config(&cl, &dns),
            };
            (cl, config)
        }))
    })
    .await?
    .ok_or_else(|| not_found(name))
}

/// `CLIENT_NOT_FOUND` for `name`.
pub fn not_found(name: &str) -> ApiError {
    ApiError::new(CLIENT_NOT_FOUND, format!("no client named {name:?}"))
}

/// How long ago a handshake was, as `wg show` says it: `Now`, `1 minute, 5 seconds ago`.
pub fn handshake_ago(seconds: u64) -> String {
    if seconds == 0 {
        return "Now".into();
    }
    let units = [
        (365 * 24 * 3600, "year"),
        (24 * 3600, "day"),
        (3600, "hour"),
        (60, "minute"),
        (1, "second"),
    ];
    let mut left = seconds;
    let mut parts = Vec::new();
    for (size, name) in units {
        let n = left / size;
        left %= size;
        if n > 0 {
            parts.push(format!("{n} {name}{}", if n == 1 { "" } else { "s" }));
        }
    }
    format!("{} ago", parts.join(", "))
}

/// A byte count as `wg show` says it: `512 B`, `1.50 KiB`, `3.20 GiB`.
pub fn transfer_text(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

/// The contract's `connection` of a connected client (`null` otherwise): the handshake and
/// the traffic totals in `wg show`'s words.
fn connection(live: Option<&Live>, rx: u64, tx: u64) -> Value {
    match live {
        Some(l) if l.connected() => json!({
            "latest_handshake": l.handshake_age_seconds.map(handshake_ago),
            "transfer_rx": transfer_text(rx),
            "transfer_tx": transfer_text(tx),
            "endpoint": l.endpoint,
        }),
        _ => Value::Null,
    }
}

fn client_json(c: &Client, live: Option<&Live>, now: i64) -> Value {
    let (rx, tx) = live.map_or((0, 0), |l| (l.rx_bytes, l.tx_bytes));
    let (rx, tx) = (c.rx_total + rx, c.tx_total + tx);
    json!({
        "name": c.name,
        "ip": c.ip,
        "public_key": c.public_key,
        "created": c.created,
        "enabled": c.enabled,
        "expires_at": c.expires_at,
        "expired": c.expired_at(now),
        "connected": live.is_some_and(Live::connected),
        "connection": connection(live, rx, tx),
        "latest_handshake_seconds_ago": live.and_then(|l| l.handshake_age_seconds),
        "rx_bytes": rx,
        "tx_bytes": tx,
    })
}

fn tweak(server: &Server) -> Result<bool, CoreError> {
    Ok(server.store.setting(TWEAK_RESTART_AFTER_ADD)?.as_deref() == Some("true"))
}

pub fn register(registry: &mut Registry, handles: Arc<Handles>) {
    registry.module("core", "the VPN server: service status, logs, clients");

    let c = Arc::clone(&handles);
    registry.action(
        "core",
        "add_client",
        "create a client: next free address, fresh keys, live peer; expires_at to make it expire",
        vec![
            CLIENT_NAME,
            ParamSpec::optional(
                "expires_at",
                ParamKind::String { max_len: 64 },
                None,
                EXPIRES_AT_HELP,
            ),
        ],
        move |p: AddParams| {
            let c = Arc::clone(&c);
            async move {
                checked_name(&p.client_name)?;
                let expires_at = match p.expires_at.as_deref() {
                    Some(raw) => parse_expiry(raw, unix_now())?,
                    None => None,
                };
                let server = server(&c)?;
                let client = match server.add_client(&p.client_name, expires_at).await {
                    Ok(client) => client,
                    Err(AddError::Exists) => {
                        return Err(ApiError::new(
                            CLIENT_EXISTS,
                            format!("a client named {:?} already exists", p.client_name),
                        ));
                    }
                    Err(AddError::Full) => {
                        return Err(ApiError::new(
                            SUBNET_FULL,
                            format!("no free address left in {}", server.subnet()),
                        ));
                    }
                    Err(AddError::Internal(e)) => return Err(e.into()),
                };
                let restart = {
                    let s = Arc::clone(&server);
                    blocking(move || tweak(&s)).await?
                };
                if restart {
                    server.bring_up().await.map_err(ApiError::from)?;
                }
                Ok::<_, ApiError>(json!({
                    "client": {
                        "name": client.name,
                        "ip": client.ip,
                        "public_key": client.public_key,
                        "created": client.created,
                        "enabled": client.enabled,
                        "expires_at": client.expires_at,
                    },
                    "message": format!("client {} added with address {}", client.name, client.ip),
                    "service_restarted": restart,
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "core",
        "remove_client",
        "delete a client and its peer; its address becomes free",
        vec![CLIENT_NAME],
        move |p: NameParams| {
            let c = Arc::clone(&c);
            async move {
                checked_name(&p.client_name)?;
                let server = server(&c)?;
                let name = p.client_name.clone();
                let removed = blocking(move || server.remove_client(&name)).await?;
                let client = removed.ok_or_else(|| not_found(&p.client_name))?;
                Ok::<_, ApiError>(json!({
                    "removed": true,
                    "client_name": client.name,
                    "client_ip": client.ip,
                }))
            }
        },
    );

    for (action, enabled, summary) in [
        (
            "enable_client",
            true,
            "put a disabled client's peer back on the interface",
        ),
        (
            "disable_client",
            false,
            "take a client's peer off the interface, keeping the client",
        ),
    ] {
        let c = Arc::clone(&handles);
        registry.action(
            "core",
            action,
            summary,
            vec![CLIENT_NAME],
            move |p: NameParams| {
                let c = Arc::clone(&c);
                async move {
                    checked_name(&p.client_name)?;
                    let server = server(&c)?;
                    let name = p.client_name.clone();
                    let client = run_blocking(move || {
                        server.set_enabled(&name, enabled).map_err(|e| match e {
                            ChangeError::NotFound => not_found(&name),
                            ChangeError::Expired { expires_at } => expired(&name, expires_at),
                            ChangeError::Internal(e) => e.into(),
                        })
                    })
                    .await?;
                    Ok::<_, ApiError>(json!({
                        "client_name": client.name,
                        "client_ip": client.ip,
                        "enabled": client.enabled,
                        "expires_at": client.expires_at,
                    }))
                }
            },
        );
    }

    let c = Arc::clone(&handles);
    registry.action(
        "core",
        "set_client_expiry",
        "set when a client expires (or never); at its expiry its peer is removed and it stays disabled until extended",
        vec![
            CLIENT_NAME,
            ParamSpec::required("expires_at", ParamKind::String { max_len: 64 }, EXPIRES_AT_HELP),
        ],
        move |p: ExpiryParams| {
            let c = Arc::clone(&c);
            async move {
                checked_name(&p.client_name)?;
                let expires_at = parse_expiry(&p.expires_at, unix_now())?;
                let server = server(&c)?;
                let name = p.client_name.clone();
                let (before, client) = run_blocking(move || {
                    let before = server.store.get(&name).map_err(ApiError::from)?;
                    let after = server.set_expiry(&name, expires_at).map_err(|e| match e {
                        ChangeError::NotFound => not_found(&name),
                        ChangeError::Expired { expires_at } => ApiError::new(
                            INVALID_EXPIRY,
                            format!("expires_at {expires_at} is not in the future"),
                        ),
                        ChangeError::Internal(e) => e.into(),
                    })?;
                    Ok((before, after))
                })
                .await?;
                let reenabled = client.enabled && before.is_some_and(|b| !b.enabled);
                let message = match client.expires_at {
                    Some(at) => format!("client {} expires at {}", client.name, rfc3339_of(at)),
                    None => format!("client {} never expires", client.name),
                };
                Ok::<_, ApiError>(json!({
                    "client_name": client.name,
                    "client_ip": client.ip,
                    "expires_at": client.expires_at,
                    "expired": false,
                    "enabled": client.enabled,
                    "reenabled": reenabled,
                    "message": if reenabled { format!("{message}; enabled again") } else { message },
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "core",
        "get_client",
        "one client, with live connection state, traffic and expiry",
        vec![CLIENT_NAME],
        move |p: NameParams| {
            let c = Arc::clone(&c);
            async move {
                checked_name(&p.client_name)?;
                let server = server(&c)?;
                let name = p.client_name.clone();
                let (client, live) =
                    blocking(move || Ok((server.store.get(&name)?, server.live()))).await?;
                let client = client.ok_or_else(|| not_found(&p.client_name))?;
                Ok::<_, ApiError>(json!({
                    "client": client_json(&client, live.get(&client.public_key), unix_now()),
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "core",
        "list_clients",
        "clients page by page, with live connection state and traffic",
        vec![
            ParamSpec::optional("page", ParamKind::Integer { min: 1, max: 1_000_000 }, Some("1"), "page number"),
            ParamSpec::optional("per_page", ParamKind::Integer { min: 1, max: 1000 }, Some("10"), "clients per page"),
            ParamSpec::optional("search", ParamKind::String { max_len: 64 }, None, "part of a name or address"),
        ],
        move |p: PageParams| {
            let c = Arc::clone(&c);
            async move {
                let server = server(&c)?;
                let page = usize::try_from(p.page).unwrap_or(1);
                let per_page = usize::try_from(p.per_page).unwrap_or(10);
                let search = p.search.filter(|s| !s.is_empty());
                let (clients, total, live) = blocking(move || {
                    let offset = (page - 1).saturating_mul(per_page);
                    let (clients, total) = server.store.page(offset, per_page, search.as_deref())?;
                    Ok((clients, total, server.live()))
                })
                .await?;
                let total_pages = total.div_ceil(per_page).max(1);
                let showing_from = if clients.is_empty() { 0 } else { (page - 1) * per_page + 1 };
                Ok::<_, ApiError>(json!({
                    "total": total,
                    "clients": clients.iter().map(|cl| client_json(cl, live.get(&cl.public_key), unix_now())).collect::<Vec<_>>(),
                    "pagination": {
                        "page": page,
                        "per_page": per_page,
                        "total_pages": total_pages,
                        "has_next": page < total_pages,
                        "has_prev": page > 1,
                        "showing_from": showing_from,
                        "showing_to": if clients.is_empty() { 0 } else { showing_from + clients.len() - 1 },
                    },
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "core",
        "export_client",
        "a client's wg-quick configuration (with its private key); qr=png adds a PNG QR code",
        vec![
            CLIENT_NAME,
            ParamSpec::optional(
                "qr",
                ParamKind::String { max_len: 8 },
                None,
                "png: add qr_png (base64)",
            ),
        ],
        move |p: ExportParams| {
            let c = Arc::clone(&c);
            async move {
                checked_name(&p.client_name)?;
                let want_png = match p.qr.as_deref() {
                    None => false,
                    Some("png") => true,
                    Some(other) => {
                        return Err(ApiError::new(
                            codes::INVALID_PARAMETER,
                            format!("qr={other:?}: the only format is png"),
                        ));
                    }
                };
                let server = server(&c)?;
                // With ghost mode on, the config goes through the local wstunnel client.
                let route = c.route();
                let (client, config) =
                    export_config(server, c.client_dns(), &p.client_name, route.as_ref()).await?;
                let mut reply = json!({
                    "client": {
                        "name": client.name,
                        "ip": client.ip,
                        "created": client.created,
                        "enabled": client.enabled,
                        "expires_at": client.expires_at,
                        "private_key": client.private_key,
                        "public_key": client.public_key,
                        "preshared_key": client.preshared_key,
                    },
                    "config": config,
                    "ghost_mode": route.is_some(),
                });
                // The config alone does not connect: say how to start the tunnel's client.
                if let Some(route) = &route {
                    reply["connection_command"] = json!(route.connection_command);
                    reply["steps"] = json!(route.steps());
                }
                if want_png {
                    use base64::Engine;
                    let png = crate::qr::png(&config, 8)
                        .map_err(|e| ApiError::internal(e.to_string()))?;
                    reply["qr_png"] = json!(base64::engine::general_purpose::STANDARD.encode(png));
                }
                Ok::<_, ApiError>(reply)
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "core",
        "latest_clients",
        "the newest clients, newest first",
        vec![ParamSpec::optional("count", ParamKind::Integer { min: 1, max: 1000 }, Some("5"), "how many")],
        move |p: CountParams| {
            let c = Arc::clone(&c);
            async move {
                let server = server(&c)?;
                let n = usize::try_from(p.count).unwrap_or(5);
                let (clients, live) = blocking(move || Ok((server.store.latest(n)?, server.live()))).await?;
                Ok::<_, ApiError>(json!({
                    "latest_clients": clients.iter().map(|cl| client_json(cl, live.get(&cl.public_key), unix_now())).collect::<Vec<_>>(),
                    "count": clients.len(),
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "core",
        "server_status",
        "service, interface with live peers, configuration, client counts, data plane",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move { server_status(&c).await }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "core",
        "restart_service",
        "rebuild the WireGuard interface from the client store",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let server = server(&c)?;
                server.bring_up().await.map_err(ApiError::from)?;
                if let Some(dp) = c.datapath.clone() {
                    let _ = tokio::task::spawn_blocking(move || dp.reconcile_vpn()).await;
                }
                let state = {
                    let s = Arc::clone(&server);
                    blocking(move || s.device_state()).await?
                };
                Ok::<_, ApiError>(json!({
                    "restarted": true,
                    "service_active": true,
                    "interface_up": true,
                    "peers": state.peers.len(),
                    "message": format!("{} rebuilt from the client store", server.config.interface),
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "core",
        "get_tweak_settings",
        "behaviour switches and what they do",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let server = server(&c)?;
                let restart = blocking(move || tweak(&server)).await?;
                Ok::<_, ApiError>(json!({
                    TWEAK_RESTART_AFTER_ADD: restart,
                    format!("{TWEAK_RESTART_AFTER_ADD}_description"):
                        "Rebuild the WireGuard interface after every add_client. Off by default: peers are added live without dropping anyone's session.",
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "core",
        "update_tweak_setting",
        "change a behaviour switch",
        vec![
            ParamSpec::required(
                "setting_name",
                ParamKind::String { max_len: 128 },
                "a name from get_tweak_settings",
            ),
            ParamSpec::required("value", ParamKind::String { max_len: 16 }, "true or false"),
        ],
        move |p: TweakParams| {
            let c = Arc::clone(&c);
            async move {
                if p.setting_name != TWEAK_RESTART_AFTER_ADD {
                    return Err(ApiError::new(
                        codes::INVALID_PARAMETER,
                        format!(
                            "unknown setting {:?}; settings: {TWEAK_RESTART_AFTER_ADD}",
                            p.setting_name
                        ),
                    ));
                }
                let value = match p.value.to_ascii_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(ApiError::new(
                            codes::INVALID_PARAMETER,
                            format!("value {:?} must be true or false", p.value),
                        ));
                    }
                };
                let server = server(&c)?;
                blocking(move || {
                    server.store.set_setting(
                        TWEAK_RESTART_AFTER_ADD,
                        if value { "true" } else { "false" },
                    )
                })
                .await?;
                Ok::<_, ApiError>(json!({
                    "setting_name": TWEAK_RESTART_AFTER_ADD,
                    "value": value,
                    "message": format!("{TWEAK_RESTART_AFTER_ADD} is now {value}"),
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "core",
        "get_firewall_status",
        "our nftables table (NAT, forwarding), the WireGuard port and the eBPF attachments",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let config = &c.wireguard;
                let (ruleset, listening, uplink) = {
                    let wg = c.server.clone();
                    blocking(move || {
                        let listening = wg.as_ref().and_then(|s| s.device_state().ok()).map(|d| d.listen_port);
                        // Client traffic to the Internet leaves (masqueraded) by the default route.
                        let uplink = crate::datapath::default_route_interface().ok();
                        Ok((net::nat_ruleset()?, listening, uplink))
                    })
                    .await?
                };
                let rules: Vec<Value> = ruleset["nftables"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.get("rule").cloned())
                    .collect();
                let nat_enabled = rules.iter().any(|r| r.to_string().contains("masquerade"));
                let programs = c.datapath.as_ref().map(|d| d.attachments()).unwrap_or_default();
                Ok::<_, ApiError>(json!({
                    "status": if nat_enabled { "active" } else { "inactive" },
                    "ufw": {"status": "not managed by phantom"},
                    "iptables": {"status": "not managed by phantom (nftables is)"},
                    "nftables": {"table": format!("inet {}", net::NFT_TABLE), "rules": rules},
                    "nat": {
                        "enabled": nat_enabled,
                        "masquerade": if nat_enabled { "enabled" } else { "disabled" },
                        "interface": uplink,
                        "source": config.subnet,
                        "rules": rules.iter().filter(|r| r.to_string().contains("masquerade")).cloned().collect::<Vec<_>>(),
                    },
                    "ports": {
                        "wireguard_port": config.listen_port,
                        "listening": listening == Some(config.listen_port),
                    },
                    "ebpf": programs,
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "core",
        "get_subnet_info",
        "the client subnet: size, usage, addresses, and whether it can change now",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let server = server(&c)?;
                let s = Arc::clone(&server);
                let (clients, live) = blocking(move || Ok((s.store.all()?, s.live()))).await?;
                let subnet = server.subnet();
                let active = live.values().filter(|l| l.connected()).count();
                let usable = subnet.capacity();
                let first = subnet.client_hosts().next();
                let last = subnet.client_hosts().last();
                let mut warnings = Vec::new();
                if usable > 0 && clients.len() * 10 >= usable * 9 {
                    warnings.push(format!("{} of {usable} client addresses in use", clients.len()));
                }
                if active > 0 {
                    warnings.push(format!("{active} client(s) connected: a subnet change makes them reconnect with re-exported configs"));
                }
                let held: Vec<(&str, bool)> = c.subnet_holds.iter().map(|h| (h.name, (h.held)())).collect();
                let mut blockers: serde_json::Map<String, Value> =
                    held.iter().map(|(name, on)| (name.to_string(), json!(on))).collect();
                blockers.insert("active_connections".into(), json!(active));
                Ok::<_, ApiError>(json!({
                    "current_subnet": subnet.to_string(),
                    "subnet_size": 1u64 << (32 - u32::from(subnet.prefix)),
                    "usable_ips": usable,
                    "network_address": subnet.network,
                    "broadcast_address": subnet.broadcast(),
                    "netmask": subnet.mask(),
                    "prefixlen": subnet.prefix,
                    "clients": {
                        "total": clients.len(),
                        "active": active,
                        "ip_usage_percentage": if usable == 0 { 0.0 } else { (clients.len() as f64 * 10000.0 / usable as f64).round() / 100.0 },
                    },
                    "server_ip": subnet.server_ip(),
                    "first_client_ip": first,
                    "last_client_ip": last,
                    "can_change": !held.iter().any(|(_, on)| *on),
                    "blockers": blockers,
                    "main_interface": {"interface": server.config.interface, "address": format!("{}/{}", subnet.server_ip(), subnet.prefix)},
                    "warnings": warnings,
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "core",
        "validate_subnet_change",
        "check a new client subnet and preview where every client would move",
        vec![ParamSpec::required(
            "new_subnet",
            ParamKind::String { max_len: 64 },
            "e.g. 10.9.0.0/24",
        )],
        move |p: SubnetParams| {
            let c = Arc::clone(&c);
            async move {
                let server = server(&c)?;
                let check = run_blocking(move || check_subnet(&server, &p.new_subnet)).await?;
                let current = c.server.as_ref().map(|s| s.subnet().to_string());
                Ok::<_, ApiError>(json!({
                    "valid": check.errors.is_empty(),
                    "new_subnet": check.new.to_string(),
                    "current_subnet": current,
                    "checks": check.checks,
                    "warnings": check.warnings,
                    "errors": check.errors,
                    "ip_mapping_preview": {
                        "total_mappings": check.mapping.len(),
                        "mappings": mapping_json(&check.mapping),
                    },
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "core",
        "change_subnet",
        "move every client to the same host offset in a new subnet (needs confirm=true); rolls back on failure",
        vec![
            ParamSpec::required("new_subnet", ParamKind::String { max_len: 64 }, "e.g. 10.9.0.0/24"),
            ParamSpec::optional("confirm", ParamKind::Boolean, Some("false"), "must be true"),
        ],
        move |p: ChangeSubnetParams| {
            let c = Arc::clone(&c);
            async move {
                let server = server(&c)?;
                if let Some(hold) = c.subnet_holds.iter().find(|h| (h.held)()) {
                    return Err(ApiError::new(SUBNET_CHANGE_REFUSED, hold.refusal));
                }
                let s = Arc::clone(&server);
                let raw = p.new_subnet.clone();
                let check = run_blocking(move || check_subnet(&s, &raw)).await?;
                if !check.errors.is_empty() {
                    return Err(ApiError::new(SUBNET_CHANGE_REFUSED, check.errors.join("; ")));
                }
                if p.confirm != Some(true) {
                    return Err(ApiError::new(
                        CONFIRMATION_REQUIRED,
                        format!("changing to {} re-addresses {} client(s); repeat with confirm=true", check.new, check.mapping.len()),
                    ));
                }
                let old = server.subnet();
                let backup_id = format!("subnet-{}", time::OffsetDateTime::now_utc().unix_timestamp_nanos());
                let backup = json!({"old_subnet": old.to_string(), "new_subnet": check.new.to_string(), "ip_mapping": mapping_json(&check.mapping)});
                let backup_path = c.daemon.state_dir.join("backups").join(format!("{backup_id}.json"));
                blocking(move || {
                    if let Some(dir) = backup_path.parent() {
                        std::fs::create_dir_all(dir).map_err(|e| crate::error::Error::io(dir, e))?;
                    }
                    Ok(crate::store::write_json(&backup_path, &backup)?)
                })
                .await?;
                let mapping = server
                    .change_subnet(check.new)
                    .await
                    .map_err(|e| ApiError::new(SUBNET_CHANGE_FAILED, format!("{e}; the previous subnet {old} is back in force")))?;
                Ok::<_, ApiError>(json!({
                    "success": true,
                    "old_subnet": old.to_string(),
                    "new_subnet": check.new.to_string(),
                    "clients_updated": mapping.len(),
                    "backup_id": backup_id,
                    "ip_mapping": mapping_json(&mapping),
                    "message": format!("moved {} client(s) from {old} to {}; re-export their configurations", mapping.len(), check.new),
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "core",
        "service_logs",
        "the daemon's most recent log lines, oldest first",
        vec![ParamSpec::optional(
            "lines",
            ParamKind::Integer {
                min: 1,
                max: 100_000,
            },
            Some("50"),
            "how many lines",
        )],
        move |p: LogsParams| {
            let c = Arc::clone(&c);
            async move {
                let lines = usize::try_from(p.lines).unwrap_or(50);
                let logs = c.logs.tail(lines);
                Ok::<_, ApiError>(json!({
                    "logs": logs,
                    "lines": logs.len(),
                    "service_name": "phantomd",
                }))
            }
        },
    );

    // The actions that change no state and return no secret (a `read` token of the HTTPS API
    // may call them). `export_client` returns the client's private key: write scope, audited.
    registry.reads(
        "core",
        &[
            "list_clients",
            "get_client",
            "latest_clients",
            "server_status",
            "service_logs",
            "get_tweak_settings",
            "get_firewall_status",
            "get_subnet_info",
            "validate_subnet_change",
        ],
    );
}

async fn server_status(c: &Handles) -> Result<Value, ApiError> {
    let config = &c.wireguard;
    let programs = c
        .datapath
        .as_ref()
        .map(|dp| dp.attachments())
        .unwrap_or_default();
    let mut status = json!({
        "service": {
            "running": true,
            "service_name": "phantomd",
            "started_at": protocol::rfc3339(c.daemon.started_at),
            "pid": std::process::id().to_string(),
        },
        "daemon": {
            "version": protocol::VERSION,
            "uptime_seconds": c.daemon.started.elapsed().as_secs(),
            "config_file": c.daemon.config_path,
            "state_dir": c.daemon.state_dir,
            "open_files_limit": c.daemon.open_files_limit,
            "open_files_needed": c.daemon.open_files_needed,
        },
        "configuration": {
            "interface": config.interface,
            "config_file": c.daemon.config_path,
            "port": config.listen_port,
            "network": config.subnet,
            "dns": c.client_dns(),
            "config_exists": c.daemon.config_path.exists(),
        },
        "datapath": {
            "enabled": c.datapath.is_some(),
            "programs": programs,
        },
        "system": {
            "hostname": nix::sys::utsname::uname().ok().map(|u| u.nodename().to_string_lossy().into_owned()),
            "kernel": nix::sys::utsname::uname().ok().map(|u| u.release().to_string_lossy().into_owned()),
        },
    });
    let Some(server) = c.server.clone() else {
        status["interface"] = json!({
            "active": false,
            "interface": config.interface,
            "public_key": null,
            "port": null,
            "peers": [],
            "rx_bytes": 0,
            "tx_bytes": 0,
        });
        status["clients"] = json!({
            "total_configured": 0,
            "enabled_clients": 0,
            "disabled_clients": 0,
            "active_connections": 0,
        });
        return Ok(status);
    };
    let (clients, state) = {
        let s = Arc::clone(&server);
        blocking(move || Ok((s.store.all()?, s.device_state().ok()))).await?
    };
    let by_key: std::collections::HashMap<&str, &Client> = clients
        .iter()
        .map(|cl| (cl.public_key.as_str(), cl))
        .collect();
    let live = {
        let s = Arc::clone(&server);
        blocking(move || Ok(s.live())).await?
    };
    let peers: Vec<Value> = state
        .as_ref()
        .map(|s| {
            s.peers
                .iter()
                .map(|p| {
                    let client = by_key.get(p.public_key.as_str());
                    let l = live.get(&p.public_key);
                    json!({
                        "name": client.map(|cl| cl.name.clone()),
                        "public_key": p.public_key,
                        "allowed_ips": p.allowed_ips.join(", "),
                        "endpoint": p.endpoint,
                        "latest_handshake": p.handshake_age_seconds.map(handshake_ago),
                        "latest_handshake_seconds_ago": p.handshake_age_seconds,
                        "connected": l.is_some_and(Live::connected),
                        "rx_bytes": client.map_or(0, |cl| cl.rx_total) + l.map_or(0, |l| l.rx_bytes),
                        "tx_bytes": client.map_or(0, |cl| cl.tx_total) + l.map_or(0, |l| l.tx_bytes),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let rx: u64 = peers.iter().filter_map(|p| p["rx_bytes"].as_u64()).sum();
    let tx: u64 = peers.iter().filter_map(|p| p["tx_bytes"].as_u64()).sum();
    let enabled = clients.iter().filter(|cl| cl.enabled).count();
    let active = live.values().filter(|l| l.connected()).count();
    status["interface"] = json!({
        "active": state.is_some(),
        "interface": config.interface,
        "backend": server.backend(),
        "public_key": server.public_key,
        "port": state.as_ref().map(|s| s.listen_port),
        "address": format!("{}/{}", server.subnet().server_ip(), server.subnet().prefix),
        "peers": peers,
        "rx_bytes": rx,
        "tx_bytes": tx,
    });
    status["clients"] = json!({
        "total_configured": clients.len(),
        "enabled_clients": enabled,
        "disabled_clients": clients.len() - enabled,
        "active_connections": active,
    });
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_age_reads_as_wg_show_says_it() {
        assert_eq!(handshake_ago(0), "Now");
        assert_eq!(handshake_ago(1), "1 second ago");
        assert_eq!(handshake_ago(65), "1 minute, 5 seconds ago");
        assert_eq!(handshake_ago(3600), "1 hour ago");
        assert_eq!(
            handshake_ago(2 * 86_400 + 2 * 3600 + 120),
            "2 days, 2 hours, 2 minutes ago"
        );
        assert_eq!(handshake_ago(365 * 86_400 + 1), "1 year, 1 second ago");
    }

    #[test]
    fn transfer_reads_as_wg_show_says_it() {
        assert_eq!(transfer_text(0), "0 B");
        assert_eq!(transfer_text(1023), "1023 B");
        assert_eq!(transfer_text(1536), "1.50 KiB");
        assert_eq!(transfer_text(5 * 1024 * 1024), "5.00 MiB");
        assert_eq!(transfer_text(1_288_490_189), "1.20 GiB");
        assert_eq!(transfer_text(3 << 50), "3072.00 TiB");
    }

    #[test]
    fn expiry_reads_unix_seconds_rfc3339_and_never() {
        let now = 1_700_000_000;
        assert_eq!(parse_expiry("1700000060", now), Ok(Some(1_700_000_060)));
        assert_eq!(
            parse_expiry("2023-11-14T22:14:20Z", now),
            Ok(Some(1_700_000_060))
        );
        assert_eq!(
            parse_expiry("2023-11-15T00:14:20+02:00", now),
            Ok(Some(1_700_000_060))
        );
        assert_eq!(parse_expiry("never", now), Ok(None));
        assert_eq!(parse_expiry("NEVER", now), Ok(None));
        for bad in [
            "",
            "tomorrow",
            "-5",
            "17e8",
            "2023-11-14 22:14:20",
            "99999999999999999999",
            "253402300800",
        ] {
            let err = parse_expiry(bad, now).err();
            assert_eq!(err.map(|e| e.code), Some(INVALID_EXPIRY), "{bad:?}");
        }
        for past in ["1700000000", "1", "2023-11-14T22:13:20Z"] {
            let err = parse_expiry(past, now).err();
            assert!(
                err.as_ref()
                    .is_some_and(|e| e.code == INVALID_EXPIRY && e.message.contains("future")),
                "{past:?}: {err:?}"
            );
        }
    }
}

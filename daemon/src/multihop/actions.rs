//! The `multihop` socket module (PHANTOM_API.md, `multihop` table).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

use super::{HANDSHAKE_FRESH_SECONDS, Multihop, MultihopError, echo};
use crate::{
    admin::{ApiError, NoParams, ParamKind, ParamSpec, Registry},
    protocol::codes,
};

impl From<MultihopError> for ApiError {
    fn from(e: MultihopError) -> Self {
        let code = match &e {
            MultihopError::RelativePath(_) | MultihopError::InvalidConfig { .. } => {
                "INVALID_VPN_CONFIG"
            }
            MultihopError::ConfigNotFound(_) => "CONFIG_NOT_FOUND",
            MultihopError::InvalidName { .. } => "INVALID_EXIT_NAME",
            MultihopError::ExitExists(_) => "EXIT_EXISTS",
            MultihopError::ExitNotFound(_) => "EXIT_NOT_FOUND",
            MultihopError::AlreadyEnabled(_) => "MULTIHOP_ALREADY_ENABLED",
            MultihopError::NotEnabled => "MULTIHOP_NOT_ENABLED",
            MultihopError::Unavailable(_) => codes::UNAVAILABLE,
            MultihopError::SetupFailed(_) => "MULTIHOP_SETUP_FAILED",
            MultihopError::ExitUnreachable(..) => "EXIT_UNREACHABLE",
            MultihopError::StoredExit { .. }
            | MultihopError::ImportTask(_)
            | MultihopError::Daemon(_) => codes::INTERNAL_ERROR,
        };
        ApiError::new(code, e.to_string())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportParams {
    config_path: String,
    custom_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExitParams {
    exit_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinesParams {
    lines: i64,
}

const EXIT_NAME: ParamSpec = ParamSpec::required(
    "exit_name",
    ParamKind::String { max_len: 256 },
    "an imported exit (list_exits)",
);

fn list_exits(m: &Multihop) -> Result<Value, ApiError> {
    let exits = m.exits()?;
    let active = m.active_exit();
    let rows: Vec<Value> = exits
        .iter()
        .map(|e| {
            json!({
                "name": e.name,
                "endpoint": e.config.endpoint.to_string(),
                "active": active.as_deref() == Some(e.name.as_str()),
                "provider": e.provider,
                "imported_at": e.imported_at,
                "multihop_enhanced": !e.optimizations.is_empty(),
                "optimizations": e.optimizations,
                "address": e.config.ipv4().map(|(a, p)| format!("{a}/{p}")),
                "mtu": e.config.mtu,
                "persistent_keepalive": e.config.persistent_keepalive,
            })
        })
        .collect();
    Ok(json!({
        "exits": rows,
        "multihop_enabled": active.is_some(),
        "active_exit": active,
        "total": exits.len(),
    }))
}

fn status(m: &Multihop) -> Result<Value, ApiError> {
    let active = m.active_exit();
    let monitor = m.monitor_state();
    Ok(json!({
        "enabled": active.is_some(),
        "active_exit": active,
        "available_configs": m.exits()?.len(),
        "vpn_interface": m.interface_state(),
        "monitor_status": {
            "service": "phantomd multihop monitor",
            "running": monitor.running,
            "since": monitor.since,
            "interval_seconds": monitor.interval_seconds,
            "last_check": monitor.last_check,
            "exit_reachable": monitor.exit_reachable,
            "consecutive_failures": monitor.consecutive_failures,
            "last_error": monitor.last_error,
            "checks": {"up": monitor.checks_up, "down": monitor.checks_down},
            "events": {"exit_down": monitor.went_down, "exit_restored": monitor.restored, "reestablished": monitor.reestablished},
        },
        "traffic_routing": if active.is_some() { m.traffic_routing() } else { "Direct (main table)".into() },
        "traffic_flow": m.traffic_flow(active.as_deref()),
    }))
}

async fn test_vpn(m: &Multihop) -> Result<Value, ApiError> {
    let Some(exit) = m.active_exit() else {
        return Err(MultihopError::NotEnabled.into());
    };
    let stored = m.exit(&exit)?;
    let timeout = std::time::Duration::from_secs(m.probe_timeout_seconds());
    // The fetch itself sends traffic through the exit, so a handshake follows if it can.
    let external = echo::external_ip(m.echo_url(), m.mark(), timeout).await;
    let age = m.handshake_age();
    let handshake_ok = age.is_some_and(|a| a <= HANDSHAKE_FRESH_SECONDS);
    let url = m.echo_url();
    let external_json = match &external {
        Ok(ip) => json!({
            "passed": true,
            "vpn_ip": ip,
            "host": url.host,
            "echo_url": format!("http://{}:{}{}", url.host, url.port, url.path),
        }),
        Err(e) => json!({
            "passed": false,
            "vpn_ip": Value::Null,
            "host": url.host,
            "echo_url": format!("http://{}:{}{}", url.host, url.port, url.path),
            "error": e.to_string(),
        }),
    };
    let all = handshake_ok && external.is_ok();
    let message = match (&external, handshake_ok) {
        (Ok(ip), true) => format!("All tests passed: traffic leaves through {exit} as {ip}"),
        (Err(e), true) => format!("Handshake fine, but the echo service was not reached: {e}"),
        (_, false) => format!("No recent handshake with the exit {exit}"),
    };
    m.log.record(
        "test",
        &format!(
            "exit {exit}: handshake {}, external address {}",
            if handshake_ok { "ok" } else { "missing" },
            match &external {
                Ok(ip) => ip.to_string(),
                Err(e) => format!("not fetched ({e})"),
            }
        ),
    );
    Ok(json!({
        "exit_name": exit,
        "endpoint": stored.config.endpoint.to_string(),
        "tests": {
            "handshake": {
                "passed": handshake_ok,
                "has_recent_handshake": handshake_ok,
                "latest_handshake_seconds_ago": age,
            },
            "external_ip": external_json,
        },
        "all_tests_passed": all,
        "message": message,
    }))
}

fn unavailable() -> ApiError {
    ApiError::unavailable("the multihop module did not start")
}

/// What the `multihop` actions work with.
pub struct Handles {
    /// `None` when multihop could not start: the actions say so.
    pub multihop: Option<Arc<Multihop>>,
}

pub fn register(registry: &mut Registry, handles: Arc<Handles>) {
    registry.module(
        "multihop",
        "route VPN clients out through an imported WireGuard exit",
    );
    let get = move || handles.multihop.clone().ok_or_else(unavailable);

    let g = get.clone();
    registry.action(
        "multihop",
        "import_vpn_config",
        "import a provider's wg-quick file as an exit (validated, stored 0600)",
        vec![
            ParamSpec::required(
                "config_path",
                ParamKind::String { max_len: 4096 },
                "absolute path of the wg-quick file",
            ),
            ParamSpec::optional(
                "custom_name",
                ParamKind::String { max_len: 256 },
                None,
                "exit name (default: the file name without .conf)",
            ),
        ],
        move |p: ImportParams| {
            let g = g.clone();
            async move {
                let m = g()?;
                let exit = m.import(&p.config_path, p.custom_name.as_deref()).await?;
                Ok::<_, ApiError>(json!({
                    "success": true,
                    "exit_name": exit.name,
                    "message": format!("VPN config '{}' imported successfully", exit.name),
                    "optimizations": exit.optimizations,
                    "endpoint": exit.config.endpoint.to_string(),
                    "provider": exit.provider,
                }))
            }
        },
    );

    let g = get.clone();
    registry.action(
        "multihop",
        "remove_vpn_config",
        "remove an imported exit (multihop is turned off first when it is the active one)",
        vec![EXIT_NAME],
        move |p: ExitParams| {
            let g = g.clone();
            async move {
                let m = g()?;
                let was_active = m.remove(&p.exit_name).await?;
                Ok::<_, ApiError>(json!({
                    "removed": p.exit_name,
                    "was_active": was_active,
                    "message": format!("VPN config '{}' removed successfully{}", p.exit_name,
                        if was_active { "; multihop was turned off" } else { "" }),
                }))
            }
        },
    );

    let g = get.clone();
    registry.action(
        "multihop",
        "list_exits",
        "the imported exits and which one is active",
        vec![],
        move |_: NoParams| {
            let g = g.clone();
            async move { list_exits(&*g()?) }
        },
    );

    let g = get.clone();
    registry.action(
        "multihop",
        "enable_multihop",
        "route clients' internet traffic through an exit (verified by a handshake first)",
        vec![EXIT_NAME],
        move |p: ExitParams| {
            let g = g.clone();
            async move {
                let m = g()?;
                let outcome = m.enable(&p.exit_name).await?;
                let monitor = m.monitor_state();
                Ok::<_, ApiError>(json!({
                    "exit_name": p.exit_name,
                    "multihop_enabled": true,
                    "handshake_established": outcome.handshake_established,
                    "connection_verified": outcome.connection_verified,
                    "verification_error": outcome.probe_error,
                    // The exit is fine (handshake), only the probe beyond it failed.
                    "warning": (!outcome.connection_verified).then(|| format!(
                        "the WireGuard handshake with the exit is established, but the echo probe through it failed: {}",
                        outcome.probe_error.clone().unwrap_or_default()
                    )),
                    "monitor_started": monitor.running,
                    "traffic_flow": m.traffic_flow(Some(&p.exit_name)),
                    "peer_access": "Clients can access each other and the server directly",
                    "message": if outcome.connection_verified {
                        "Multihop enabled successfully".to_string()
                    } else {
                        "Multihop enabled; the exit answers, but the echo service was not reached through it (see verification_error)".to_string()
                    },
                }))
            }
        },
    );

    let g = get.clone();
    registry.action(
        "multihop",
        "disable_multihop",
        "route clients' traffic directly again and remove the exit interface",
        vec![],
        move |_: NoParams| {
            let g = g.clone();
            async move {
                let m = g()?;
                let (previous, cleaned) = m.disable().await?;
                Ok::<_, ApiError>(json!({
                    "multihop_enabled": false,
                    "previous_exit": previous,
                    "interface_cleaned": cleaned,
                    "message": if cleaned { "Multihop disabled successfully" } else { "Multihop disabled; some entries could not be removed (see get_session_log)" },
                }))
            }
        },
    );

    let g = get.clone();
    registry.action(
        "multihop",
        "status",
        "multihop state, the exit interface and the monitor",
        vec![],
        move |_: NoParams| {
            let g = g.clone();
            async move { status(&*g()?) }
        },
    );

    let g = get.clone();
    registry.action(
        "multihop",
        "test_vpn",
        "check the active exit: handshake, and the external address seen through it",
        vec![],
        move |_: NoParams| {
            let g = g.clone();
            async move { test_vpn(&*g()?).await }
        },
    );

    let g = get.clone();
    registry.action(
        "multihop",
        "reset_state",
        "remove every trace of multihop (interface, routes, rules, NAT, mark); imported exits stay",
        vec![],
        move |_: NoParams| {
            let g = g.clone();
            async move {
                let m = g()?;
                let (cleaned, errors) = m.reset().await?;
                Ok::<_, ApiError>(json!({
                    "reset_complete": true,
                    "cleanup_successful": errors.is_empty(),
                    "cleaned_up": cleaned,
                    "errors": errors,
                    "message": if errors.is_empty() { "Multihop state reset successfully".to_string() } else { format!("Multihop state reset with errors: {}", errors.join("; ")) },
                }))
            }
        },
    );

    let g = get;
    registry.action(
        "multihop",
        "get_session_log",
        "the multihop session log (imports, switches, monitor events), oldest first",
        vec![ParamSpec::optional(
            "lines",
            ParamKind::Integer {
                min: 1,
                max: 10_000,
            },
            Some("50"),
            "how many lines",
        )],
        move |p: LinesParams| {
            let g = g.clone();
            async move {
                let m = g()?;
                let n = usize::try_from(p.lines).unwrap_or(50);
                let log = m.log.tail(n);
                Ok::<_, ApiError>(json!({
                    "logs": log,
                    "lines": log.len(),
                    "log_file": m.log.path(),
                }))
            }
        },
    );

    // The actions that change no state (a `read` token of the HTTPS API may call them).
    registry.reads(
        "multihop",
        &["list_exits", "status", "test_vpn", "get_session_log"],
    );
}

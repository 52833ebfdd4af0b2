//! The `ghost` socket module: enable, disable, status, and client export through the tunnel.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;

use super::{GHOST_INACTIVE, Ghost};
use crate::{
    admin::{ApiError, NoParams, ParamKind, ParamSpec, Registry},
    core::{ClientDns, actions as core_actions},
};

const WIREGUARD_DISABLED: &str = "WIREGUARD_DISABLED";

/// What the `ghost` actions work with.
pub struct Handles {
    /// `None` without a WireGuard server: ghost mode has nothing to carry.
    pub ghost: Option<Arc<Ghost>>,
    pub client_dns: watch::Receiver<ClientDns>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnableParams {
    domain: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportParams {
    client_name: String,
}

fn ghost(h: &Handles) -> Result<Arc<Ghost>, ApiError> {
    h.ghost.clone().ok_or_else(|| {
        ApiError::new(
            WIREGUARD_DISABLED,
            "ghost mode carries the WireGuard server, which is disabled ([wireguard] enabled = false)",
        )
    })
}

pub fn register(registry: &mut Registry, handles: Arc<Handles>) {
    registry.module(
        "ghost",
        "WireGuard over WebSocket/TLS for the stock wstunnel client",
    );

    let c = Arc::clone(&handles);
    registry.action(
        "ghost",
        "enable",
        "serve WireGuard over wss on [ghost] port for a domain that resolves to this server",
        vec![ParamSpec::required(
            "domain",
            ParamKind::String { max_len: 253 },
            "e.g. vpn.example.com, or 203-0-113-1.sslip.io",
        )],
        move |p: EnableParams| {
            let c = Arc::clone(&c);
            async move { ghost(&c)?.enable(&p.domain).await }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "ghost",
        "disable",
        "close the wss relay and its tunnels; clients go back to direct WireGuard",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move { ghost(&c)?.disable().await }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "ghost",
        "status",
        "whether ghost mode is on, and how to connect",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                match c.ghost.clone() {
                    Some(g) => Ok::<_, ApiError>(g.status().await),
                    None => Ok(json!({
                        "status": "inactive",
                        "enabled": false,
                        "message": "the WireGuard server is disabled",
                    })),
                }
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "ghost",
        "export",
        "a client's stock wstunnel command and its WireGuard config through the tunnel",
        vec![ParamSpec::required(
            "client_name",
            ParamKind::String { max_len: 256 },
            "1-64 letters, digits, '-' or '_'",
        )],
        move |p: ExportParams| {
            let c = Arc::clone(&c);
            async move {
                let g = ghost(&c)?;
                core_actions::checked_name(&p.client_name)?;
                let route = g
                    .client_route()
                    .ok_or_else(|| ApiError::new(GHOST_INACTIVE, "ghost mode is not active"))?;
                let server = Arc::clone(&g.wireguard);
                let dns = c.client_dns.borrow().render(Some(server.subnet()));
                let (client, config) =
                    core_actions::export_config(server, dns, &p.client_name, Some(&route)).await?;
                Ok(json!({
                    "client_name": client.name,
                    "client_ip": client.ip,
                    "connection_command": route.connection_command,
                    "config": config,
                    "steps": route.steps(),
                }))
            }
        },
    );

    // The actions that change no state (a `read` token of the HTTPS API may call them).
    // `export` returns a client's private key and the secret path: write scope, audited.
    registry.reads("ghost", &["status"]);
}

//! The `core` socket module. So far: the daemon's own status and logs; the WireGuard server
//! and client lifecycle build on this.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;

use crate::{
    admin::{ApiError, NoParams, ParamKind, ParamSpec, Registry},
    context::Context,
    protocol,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsParams {
    lines: i64,
}

pub fn register(registry: &mut Registry, ctx: Arc<Context>) {
    registry.module("core", "the VPN server: service status, logs, clients");

    let c = Arc::clone(&ctx);
    registry.action(
        "core",
        "server_status",
        "the daemon's service state, configuration and data-plane programs",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let config = c.config();
                let programs = c
                    .datapath
                    .as_ref()
                    .map(|dp| dp.attachments())
                    .unwrap_or_default();
                Ok::<_, ApiError>(json!({
                    "service": {
                        "running": true,
                        "service_name": "phantomd",
                        "started_at": protocol::rfc3339(c.started_at),
                        "pid": std::process::id().to_string(),
                    },
                    "daemon": {
                        "version": protocol::VERSION,
                        "uptime_seconds": c.started.elapsed().as_secs(),
                        "config_file": c.config_path,
                        "state_dir": config.state_dir,
                    },
                    "configuration": {
                        "interface": config.wireguard.interface,
                        "config_file": c.config_path,
                        "port": config.wireguard.listen_port,
                        "network": config.wireguard.subnet,
                        "dns": [config.dns.primary, config.dns.secondary],
                        "config_exists": c.config_path.exists(),
                    },
                    "datapath": {
                        "enabled": c.datapath.is_some(),
                        "programs": programs,
                    },
                }))
            }
        },
    );

    let c = Arc::clone(&ctx);
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
}

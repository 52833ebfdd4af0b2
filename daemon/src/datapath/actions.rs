//! The `datapath` socket module: what the kernel side is doing, seen from `phantom-api`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

use super::Datapath;
use crate::{
    admin::{ApiError, NoParams, ParamKind, ParamSpec, Registry},
    context::Context,
    error::Error,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopSourcesParams {
    count: i64,
    window: Option<i64>,
}

/// Runs a blocking map read off the async runtime.
async fn with_datapath<T, F>(ctx: &Context, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&Datapath) -> Result<T, Error> + Send + 'static,
{
    let Some(dp) = ctx.datapath.clone() else {
        return Err(ApiError::unavailable(
            "the datapath is disabled ([datapath] enabled = false)",
        ));
    };
    tokio::task::spawn_blocking(move || f(&dp))
        .await
        .map_err(|e| ApiError::internal(format!("datapath task failed: {e}")))?
        .map_err(ApiError::from)
}

pub fn register(registry: &mut Registry, ctx: Arc<Context>) {
    registry.module(
        "datapath",
        "the eBPF data plane: programs, maps and counters",
    );

    let c = Arc::clone(&ctx);
    registry.action(
        "datapath",
        "status",
        "attached programs (interface, mode, since) and map sizes",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let bpffs = c.datapath_config().bpffs;
                if c.datapath.is_none() {
                    return Ok(
                        json!({"enabled": false, "programs": [], "maps": [], "bpffs": bpffs}),
                    );
                }
                let (programs, maps) =
                    with_datapath(&c, |dp| Ok((dp.attachments(), dp.maps()?))).await?;
                Ok(json!({"enabled": true, "programs": programs, "maps": maps, "bpffs": bpffs}))
            }
        },
    );

    let c = Arc::clone(&ctx);
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
                    let all = dp.sources()?;
                    Ok((all.len(), super::busiest(all, count, window)))
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

    let c = Arc::clone(&ctx);
    registry.action(
        "datapath",
        "counters",
        "packets and bytes by verdict and reason since the maps were created",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let counters = with_datapath(&c, |dp| dp.verdicts()).await?;
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
                Ok::<Value, ApiError>(json!({"counters": counters, "totals": totals}))
            }
        },
    );
}

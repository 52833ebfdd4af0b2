//! Socket module `sentry`: status, config, mode, whitelist and penalties.

use std::{net::IpAddr, sync::Arc, time::Instant};

use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Mode, PASS_NAMES, Sentry, SentryError, Tunables,
    challenge::{Authenticated, Rejection},
    penalty,
    store::unix_now,
};
use crate::{
    admin::registry::{ApiError, NoParams, ParamKind, ParamSpec, Registry},
    protocol::codes,
};

/// What the `sentry` actions work with.
pub struct Handles {
    /// `None` with `[sentry] enabled = false`.
    pub sentry: Option<Arc<Sentry>>,
}

fn sentry(h: &Handles) -> Result<Arc<Sentry>, ApiError> {
    h.sentry
        .clone()
        .ok_or_else(|| ApiError::unavailable("the sentry is disabled ([sentry] enabled = false)"))
}

fn store_err(e: SentryError) -> ApiError {
    match e {
        SentryError::Config(m) => ApiError::new(codes::INVALID_PARAMETER, m),
        SentryError::Degraded => {
            ApiError::unavailable("the sentry store is unavailable (degraded); nothing was changed")
        }
        other => ApiError::unavailable(format!("{other}; nothing was changed")),
    }
}

/// The status object (also the base of metrics and the later dashboard).
pub fn status(s: &Sentry) -> Value {
    let snap = s.detector.snapshot();
    let state = s.mode_state();
    let t = s.tunables();
    let now = Instant::now();
    let top = s.detector.top(20, now);
    let sources: Vec<crate::source::Source> = top.iter().map(|(source, _)| *source).collect();
    let kernel = s.kernel_counts(&sources);
    let load = std::sync::atomic::Ordering::Relaxed;
    let c = &s.counters;
    let failed: serde_json::Map<String, Value> = Rejection::ALL
        .iter()
        .map(|r| {
            (
                r.code().to_string(),
                json!(c.failed[super::rejection_index(*r)].load(load)),
            )
        })
        .collect();
    let authenticated: serde_json::Map<String, Value> = Authenticated::ALL
        .iter()
        .map(|a| {
            (
                a.name().to_string(),
                json!(c.authenticated[super::authenticated_index(*a)].load(load)),
            )
        })
        .collect();
    let passed: serde_json::Map<String, Value> = PASS_NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), json!(c.passed[i].load(load))))
        .collect();
    json!({
        "current_mode": state.current_mode.name(),
        "last_incident_time": state.last_incident_time,
        "global_rate": s.detector.current_rate(),
        "stats": {
            "mean": snap.mean,
            "std_dev": snap.std_dev,
            "dynamic_threshold": snap.threshold,
            "sensitivity_factor": t.sensitivity_factor,
            "samples": snap.samples,
            "computed_at": snap.computed_at,
        },
        "cpu_percent": s.detector.cpu_percent(),
        "activation_cpu_threshold": t.activation_cpu_threshold,
        "store": {"backend": s.store.backend(), "healthy": s.healthy(),
                  "status": if s.healthy() { "ok" } else { "degraded" }},
        "requests": {"passed": passed,
                     "challenged": c.challenged.load(load),
                     "blocked": c.blocked.load(load),
                     "unavailable": c.unavailable.load(load),
                     "upstream_errors": c.upstream_errors.load(load)},
        "challenges": {"issued": c.challenged.load(load), "solved": c.solved.load(load),
                       "failed": failed, "authenticated_by": authenticated,
                       "forged_cookies": c.forged_cookies.load(load),
                       "delays_redeemed": c.delays_redeemed.load(load)},
        "snapshots": {"held": s.snapshots.len(), "fetches": s.snapshots.fetches()},
        "tickets_issued": c.tickets.load(load),
        "tickets_cached": s.tickets_cached(),
        "tickets_revoked": c.tickets_revoked.load(load),
        "ticket_ceiling": t.effective_ticket_ceiling(),
        "ipv6_prefix": s.source_prefix().bits(),
        "penalties_raised": c.penalties.load(load),
        "hard_blocks": c.hard_blocks.load(load),
        "kernel_blocks_live": s.penalties.blocked_count(now),
        "whitelist_size": s.whitelist_local().len(),
        "good_bots": s.good_bots.passes().into_iter()
            .map(|(name, n)| (name.to_string(), json!({"passed": n})))
            .collect::<serde_json::Map<String, Value>>(),
        "key_id": s.signer.kid(),
        "tls": match s.listener_tls.get() {
            Some(tls) => json!({"mode": s.static_config.tls.as_str(),
                                "domain": s.static_config.tls_domain,
                                "certificate_expires_at": tls.expires_at(),
                                "awaiting_acme": tls.stand_in()}),
            None => json!({"mode": "off"}),
        },
        "top_talkers": top.iter().map(|(ip, n)| {
            let k = kernel.get(ip);
            json!({"address": ip, "requests_5s": n,
                   "kernel_packets_5s": k.map(|k| k.0), "kernel_new_connections": k.map(|k| k.1)})
        }).collect::<Vec<_>>(),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetConfigParams {
    activation_cpu_threshold: Option<String>,
    activation_rate_threshold: Option<i64>,
    sensitivity_factor: Option<String>,
    ip_static_threshold: Option<i64>,
    ticket_ceiling: Option<i64>,
    hard_block_after: Option<i64>,
    base_difficulty: Option<i64>,
    max_difficulty: Option<i64>,
    challenge_ttl_seconds: Option<i64>,
    ticket_ttl_seconds: Option<i64>,
    penalty_ttl_seconds: Option<i64>,
    calm_seconds: Option<i64>,
    stats_interval_seconds: Option<i64>,
}

fn float(name: &str, v: &str) -> Result<f64, ApiError> {
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .ok_or_else(|| {
            ApiError::new(
                codes::INVALID_PARAMETER,
                format!("{name} = {v:?} is not a number"),
            )
        })
}

fn apply(mut t: Tunables, p: SetConfigParams) -> Result<(Tunables, Vec<&'static str>), ApiError> {
    let mut changed = Vec::new();
    if let Some(v) = p.activation_cpu_threshold {
        t.activation_cpu_threshold = float("activation_cpu_threshold", &v)?;
        changed.push("activation_cpu_threshold");
    }
    if let Some(v) = p.sensitivity_factor {
        t.sensitivity_factor = float("sensitivity_factor", &v)?;
        changed.push("sensitivity_factor");
    }
    let int = |v: i64| u64::try_from(v).unwrap_or(u64::MAX);
    macro_rules! set_int {
        ($field:ident) => {
            if let Some(v) = p.$field {
                t.$field = int(v).try_into().unwrap_or(u32::MAX as _);
                changed.push(stringify!($field));
            }
        };
    }
    set_int!(activation_rate_threshold);
    set_int!(ip_static_threshold);
    set_int!(ticket_ceiling);
    set_int!(hard_block_after);
    set_int!(base_difficulty);
    set_int!(max_difficulty);
    set_int!(challenge_ttl_seconds);
    set_int!(ticket_ttl_seconds);
    set_int!(penalty_ttl_seconds);
    set_int!(calm_seconds);
    set_int!(stats_interval_seconds);
    if changed.is_empty() {
        return Err(ApiError::new(
            codes::MISSING_PARAMETER,
            "give at least one setting to change (see `phantom-api sentry --help`)",
        ));
    }
    t.validate().map_err(|e| {
        ApiError::new(
            codes::INVALID_PARAMETER,
            e.to_string().replace("sentry configuration: ", ""),
        )
    })?;
    Ok((t, changed))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeParams {
    mode: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IpParams {
    ip: IpAddr,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CountParams {
    count: i64,
}

pub fn register(registry: &mut Registry, handles: Arc<Handles>) {
    registry.module(
        "sentry",
        "adaptive L7 defence: proof-of-work challenges, trust tickets, penalty box",
    );

    let c = Arc::clone(&handles);
    registry.action(
        "sentry",
        "status",
        "mode, rates, learned threshold, store health, counters, top talkers",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let s = sentry(&c)?;
                tokio::task::spawn_blocking(move || status(&s))
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "sentry",
        "get_config",
        "the live tunables and the proxy's fixed settings",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let s = sentry(&c)?;
                let cfg = &s.static_config;
                Ok::<_, ApiError>(json!({
                    "tunables": s.tunables(),
                    "listen": cfg.listen,
                    "upstream": cfg.upstream,
                    "store_backend": s.store.backend(),
                    "redis_fail_mode": cfg.redis_fail_mode,
                    "trusted_proxies": cfg.trusted_proxies,
                    "max_body_bytes": cfg.max_body_bytes,
                    "upstream_timeout_seconds": cfg.upstream_timeout_seconds,
                    "ipv6_prefix": s.source_prefix().bits(),
                }))
            }
        },
    );

    let int = |name: &'static str, min: i64, max: i64, help: &'static str| {
        ParamSpec::optional(name, ParamKind::Integer { min, max }, None, help)
    };
    let c = Arc::clone(&handles);
    registry.action(
        "sentry",
        "set_config",
        "change tunables (validated as a whole; the store shares them with the fleet)",
        vec![
            ParamSpec::optional(
                "activation_cpu_threshold",
                ParamKind::String { max_len: 32 },
                None,
                "CPU % (0-100) at which the defence arms",
            ),
            int(
                "activation_rate_threshold",
                0,
                100_000_000,
                "global requests/s at which the defence arms too (0 = off)",
            ),
            ParamSpec::optional(
                "sensitivity_factor",
                ParamKind::String { max_len: 32 },
                None,
                "threshold = mean + std_dev * this (0-100)",
            ),
            int(
                "ip_static_threshold",
                1,
                10_000_000,
                "requests per IP in 5 s above which it is challenged during an anomaly",
            ),
            int(
                "ticket_ceiling",
                0,
                40_000_000,
                "requests per source in 5 s above which a ticket holder loses its ticket while armed (0 = 4 x ip_static_threshold)",
            ),
            int(
                "hard_block_after",
                1,
                1_000,
                "violations before the kernel drops the IP",
            ),
            int("base_difficulty", 1, 40, "bits of the first challenge"),
            int("max_difficulty", 1, 40, "highest bits"),
            int(
                "challenge_ttl_seconds",
                10,
                3_600,
                "how long a challenge may be answered",
            ),
            int("ticket_ttl_seconds", 10, 86_400, "trust ticket lifetime"),
            int(
                "penalty_ttl_seconds",
                1,
                86_400,
                "penalty lifetime per violation",
            ),
            int(
                "calm_seconds",
                1,
                86_400,
                "DEFCON_1 ends after this long without an anomaly",
            ),
            int(
                "stats_interval_seconds",
                1,
                60,
                "how often mean and std_dev are recomputed",
            ),
        ],
        move |p: SetConfigParams| {
            let c = Arc::clone(&c);
            async move {
                let s = sentry(&c)?;
                let (t, changed) = apply(s.tunables(), p)?;
                s.set_tunables(t.clone()).await.map_err(store_err)?;
                Ok::<_, ApiError>(json!({"updated": changed, "tunables": t}))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "sentry",
        "set_mode",
        "set the defence mode by hand",
        vec![ParamSpec::required("mode", ParamKind::String { max_len: 16 }, "NORMAL, DEFCON_1 or DOOMSDAY")],
        move |p: ModeParams| {
            let c = Arc::clone(&c);
            async move {
                let s = sentry(&c)?;
                let mode = Mode::parse(&p.mode).ok_or_else(|| {
                    ApiError::new(codes::INVALID_PARAMETER, format!("mode {:?} must be NORMAL, DEFCON_1 or DOOMSDAY", p.mode))
                })?;
                let st = s.set_mode(mode).await.map_err(store_err)?;
                Ok::<_, ApiError>(json!({"current_mode": st.current_mode.name(), "last_incident_time": st.last_incident_time}))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "sentry",
        "whitelist_list",
        "addresses that are never challenged",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let s = sentry(&c)?;
                let list = s.whitelist().await.map_err(store_err)?;
                Ok::<_, ApiError>(json!({"count": list.len(), "whitelist": list}))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "sentry",
        "whitelist_add",
        "never challenge this address (mirrored into the XDP allow list)",
        vec![ParamSpec::required(
            "ip",
            ParamKind::IpAddr,
            "IPv4 or IPv6 address",
        )],
        move |p: IpParams| {
            let c = Arc::clone(&c);
            async move {
                let s = sentry(&c)?;
                let added = s.whitelist_add(p.ip).await.map_err(store_err)?;
                Ok::<_, ApiError>(json!({"ip": super::canonical(p.ip), "added": added}))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "sentry",
        "whitelist_remove",
        "remove an address from the whitelist",
        vec![ParamSpec::required(
            "ip",
            ParamKind::IpAddr,
            "IPv4 or IPv6 address",
        )],
        move |p: IpParams| {
            let c = Arc::clone(&c);
            async move {
                let s = sentry(&c)?;
                let removed = s.whitelist_remove(p.ip).await.map_err(store_err)?;
                if !removed {
                    return Err(ApiError::new(
                        "NOT_FOUND",
                        format!("{} is not whitelisted", p.ip),
                    ));
                }
                Ok::<_, ApiError>(json!({"ip": super::canonical(p.ip), "removed": true}))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "sentry",
        "penalties",
        "the penalty box: violation counts, next difficulty, time left, hard blocks",
        vec![ParamSpec::optional("count", ParamKind::Integer { min: 1, max: 10_000 }, Some("100"), "entries to list")],
        move |p: CountParams| {
            let c = Arc::clone(&c);
            async move {
                let s = sentry(&c)?;
                let t = s.tunables();
                let list = s.penalty_list(p.count.max(1) as usize).await.map_err(store_err)?;
                let now = unix_now();
                let rows: Vec<Value> = list.iter().map(|e| json!({
                    "address": e.address,
                    "count": e.count,
                    "expires_in_seconds": e.expires_in_seconds,
                    "expires_at": now + e.expires_in_seconds,
                    "difficulty": penalty::difficulty(&t, e.count + 1),
                    "hard_blocked": penalty::hard_blocked(&t, e.count),
                })).collect();
                Ok::<_, ApiError>(json!({"count": rows.len(), "hard_block_after": t.hard_block_after, "penalties": rows}))
            }
        },
    );

    // The actions that change no state (a `read` token of the HTTPS API may call them).
    registry.reads(
        "sentry",
        &["status", "get_config", "whitelist_list", "penalties"],
    );
}

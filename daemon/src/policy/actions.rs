//! The client policy's socket actions, in the `core` module (they are about core's clients):
//! `set_client_acl`, `get_client_acl`, `set_client_isolation`, `test_policy`, `policy_status`,
//! `set_client_policy`, `get_client_policy` (rate limits and quotas).

use std::{net::IpAddr, sync::Arc};

use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ClientPolicy, LimitView, PolicyError, Protocol,
    limits::{LimitSettings, Period, QuotaAction},
    parse_rules,
};
use crate::admin::{ApiError, NoParams, ParamKind, ParamSpec, Registry, run_blocking};

pub struct Handles {
    /// `None` without a WireGuard server.
    pub policy: Option<Arc<ClientPolicy>>,
}

impl From<PolicyError> for ApiError {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::NoClient(_) => ApiError::new("CLIENT_NOT_FOUND", e.to_string()),
            PolicyError::Rule { .. } | PolicyError::TooManyRules => {
                ApiError::new("INVALID_RULE", e.to_string())
            }
            PolicyError::Limit(_) => ApiError::new("INVALID_LIMIT", e.to_string()),
            PolicyError::Store(e) => ApiError::from(e),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetAclParams {
    client_name: String,
    rules: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetLimitParams {
    client_name: String,
    download_kbps: Option<i64>,
    upload_kbps: Option<i64>,
    burst_kb: Option<i64>,
    quota_mb: Option<i64>,
    quota_period: Option<String>,
    quota_action: Option<String>,
    quota_floor_kbps: Option<i64>,
    use_defaults: Option<bool>,
}

impl SetLimitParams {
    fn settings(&self) -> Result<LimitSettings, ApiError> {
        let bad = |m: String| ApiError::new("INVALID_LIMIT", m);
        let quota_period = match &self.quota_period {
            None => None,
            Some(p) => Some(Period::parse(p).ok_or_else(|| {
                bad(format!(
                    "quota_period {p:?} is not monthly, weekly or daily"
                ))
            })?),
        };
        let quota_action = match &self.quota_action {
            None => None,
            Some(a) => Some(
                QuotaAction::parse(a)
                    .ok_or_else(|| bad(format!("quota_action {a:?} is not block or throttle")))?,
            ),
        };
        let n = |v: Option<i64>| v.map(|v| v.max(0) as u64);
        Ok(LimitSettings {
            download_kbps: n(self.download_kbps),
            upload_kbps: n(self.upload_kbps),
            burst_kb: n(self.burst_kb),
            quota_mb: n(self.quota_mb),
            quota_period,
            quota_action,
            quota_floor_kbps: n(self.quota_floor_kbps),
        })
    }
}

fn limit_json(name: &str, view: &LimitView) -> Value {
    json!({
        "client_name": name,
        "download_kbps": view.effective.download_kbps,
        "upload_kbps": view.effective.upload_kbps,
        "burst_kb": view.effective.burst_kb,
        "quota_mb": view.effective.quota_mb,
        "quota_period": view.effective.quota_period.name(),
        "quota_action": view.effective.quota_action.name(),
        "quota_floor_kbps": view.effective.quota_floor_kbps,
        "own": view.own,
        "usage": view.usage,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameParams {
    client_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IsolationParams {
    enabled: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestParams {
    client_name: String,
    destination: IpAddr,
    protocol: String,
    port: Option<i64>,
}

fn client_name() -> ParamSpec {
    ParamSpec::required(
        "client_name",
        ParamKind::String { max_len: 64 },
        "a client of the core module",
    )
}

fn rules_of(policy: &ClientPolicy, name: &str) -> Value {
    json!(
        policy
            .state()
            .rules
            .get(name)
            .map(|r| r.iter().map(ToString::to_string).collect::<Vec<_>>())
            .unwrap_or_default()
    )
}

pub fn register(registry: &mut Registry, handles: Arc<Handles>) {
    let get = move || {
        handles
            .policy
            .clone()
            .ok_or_else(|| ApiError::unavailable("the WireGuard server is disabled"))
    };

    let g = get.clone();
    registry.action(
        "core",
        "set_client_acl",
        "replace a client's ordered allow/deny rules, enforced in the kernel on WireGuard ingress (first match wins; none matching allows; [] removes them)",
        vec![
            client_name(),
            ParamSpec::required(
                "rules",
                ParamKind::String { max_len: 8192 },
                "JSON array of rules \"<allow|deny> <any|tcp|udp|icmp> <IPv4 address or CIDR> [port or lo-hi]\", at most 16",
            ),
        ],
        move |p: SetAclParams| {
            let g = g.clone();
            async move {
                let policy = g()?;
                let texts: Vec<String> = serde_json::from_str(&p.rules).map_err(|e| {
                    ApiError::new(
                        "INVALID_RULE",
                        format!("rules must be a JSON array of strings: {e}"),
                    )
                })?;
                let rules = parse_rules(&texts)?;
                let name = p.client_name.clone();
                let policy2 = Arc::clone(&policy);
                run_blocking(move || {
                    policy2
                        .set_rules(&name, rules)
                        .map(|_| ())
                        .map_err(ApiError::from)
                })
                .await?;
                Ok(json!({
                    "success": true,
                    "client_name": p.client_name,
                    "rules": rules_of(&policy, &p.client_name),
                }))
            }
        },
    );

    let g = get.clone();
    registry.action(
        "core",
        "get_client_acl",
        "a client's rules, in order, and whether clients are isolated",
        vec![client_name()],
        move |p: NameParams| {
            let g = g.clone();
            async move {
                let policy = g()?;
                if !policy.clients.borrow().clients.contains_key(&p.client_name) {
                    return Err(PolicyError::NoClient(p.client_name).into());
                }
                Ok(json!({
                    "client_name": p.client_name,
                    "rules": rules_of(&policy, &p.client_name),
                    "isolation": policy.state().isolate,
                }))
            }
        },
    );

    let g = get.clone();
    registry.action(
        "core",
        "set_client_isolation",
        "drop traffic between VPN clients (the server's own address stays reachable), in the kernel",
        vec![ParamSpec::required(
            "enabled",
            ParamKind::Boolean,
            "true or false",
        )],
        move |p: IsolationParams| {
            let g = g.clone();
            async move {
                let policy = g()?;
                let state =
                    run_blocking(move || policy.set_isolation(p.enabled).map_err(ApiError::from))
                        .await?;
                Ok(json!({"success": true, "isolation": state.isolate}))
            }
        },
    );

    let g = get.clone();
    registry.action(
        "core",
        "test_policy",
        "whether a packet from a client would pass, and by which rule (the kernel's own decision)",
        vec![
            client_name(),
            ParamSpec::required("destination", ParamKind::IpAddr, "the packet's destination"),
            ParamSpec::required(
                "protocol",
                ParamKind::String { max_len: 8 },
                "tcp, udp or icmp",
            ),
            ParamSpec::optional(
                "port",
                ParamKind::Integer { min: 0, max: 65535 },
                None,
                "destination port (tcp, udp)",
            ),
        ],
        move |p: TestParams| {
            let g = g.clone();
            async move {
                let policy = g()?;
                let IpAddr::V4(dst) = p.destination else {
                    return Err(ApiError::new(
                        "INVALID_RULE",
                        "the client policy applies to IPv4 destinations",
                    ));
                };
                let protocol = match Protocol::parse(&p.protocol) {
                    Some(Protocol::Any) | None => {
                        return Err(ApiError::new(
                            "INVALID_RULE",
                            format!("protocol {:?} is not tcp, udp or icmp", p.protocol),
                        ));
                    }
                    Some(proto) => proto,
                };
                let port = p.port.unwrap_or(0) as u16;
                let tested = policy.test(&p.client_name, dst, protocol, port)?;
                Ok(json!({
                    "client_name": p.client_name,
                    "destination": dst,
                    "protocol": p.protocol.to_ascii_lowercase(),
                    "port": port,
                    "verdict": tested.verdict.name(),
                    "passes": !tested.verdict.drops(),
                    "rule_index": tested.rule.as_ref().map(|r| r.0),
                    "rule": tested.rule.map(|r| r.1),
                }))
            }
        },
    );

    let g = get.clone();
    let kbps = |name: &'static str, what: &'static str| {
        ParamSpec::optional(
            name,
            ParamKind::Integer {
                min: 0,
                max: crate::config::MAX_KBPS as i64,
            },
            None,
            what,
        )
    };
    registry.action(
        "core",
        "set_client_policy",
        "set a client's rate limits and quota, enforced in the kernel at once (no reconnect); settings not given stay as they are, use_defaults=true first returns every one to the server's [limits]",
        vec![
            client_name(),
            kbps("download_kbps", "what the client may receive, kbit/s (0 = unlimited; 64 at least otherwise)"),
            kbps("upload_kbps", "what the client may send, kbit/s (0 = unlimited; 64 at least otherwise)"),
            ParamSpec::optional(
                "burst_kb",
                ParamKind::Integer {
                    min: 0,
                    max: crate::config::MAX_BURST_KB as i64,
                },
                None,
                "KiB the client may move at once above its rate, each way (0 = 2 s at the rate, at least 1 MiB)",
            ),
            ParamSpec::optional(
                "quota_mb",
                ParamKind::Integer {
                    min: 0,
                    max: 1 << 40,
                },
                None,
                "MiB per period, both directions (0 = no quota)",
            ),
            ParamSpec::optional(
                "quota_period",
                ParamKind::String { max_len: 16 },
                None,
                "monthly, weekly or daily (UTC)",
            ),
            ParamSpec::optional(
                "quota_action",
                ParamKind::String { max_len: 16 },
                None,
                "block or throttle, once the quota is used up",
            ),
            kbps("quota_floor_kbps", "the rate a throttled client keeps, each way, kbit/s"),
            ParamSpec::optional(
                "use_defaults",
                ParamKind::Boolean,
                None,
                "true: drop the client's own settings first (the server's [limits] apply)",
            ),
        ],
        move |p: SetLimitParams| {
            let g = g.clone();
            async move {
                let policy = g()?;
                let own = p.settings()?;
                let reset = p.use_defaults.unwrap_or(false);
                let name = p.client_name.clone();
                let view = run_blocking(move || {
                    policy
                        .set_limits(&name, &own, reset)
                        .map_err(ApiError::from)
                })
                .await?;
                let mut reply = limit_json(&p.client_name, &view);
                reply["success"] = json!(true);
                Ok(reply)
            }
        },
    );

    let g = get.clone();
    registry.action(
        "core",
        "get_client_policy",
        "a client's rate limits and quota in force (its own and the server's), and what the kernel counted: bytes, drops, time at the limit, the quota used, packets dropped by its rules and by isolation",
        vec![client_name()],
        move |p: NameParams| {
            let g = g.clone();
            async move {
                let policy = g()?;
                let view = policy.limit_view(&p.client_name)?;
                let mut reply = limit_json(&p.client_name, &view);
                reply["policy_drops"] = json!(policy.drops_of(&p.client_name)?);
                Ok(reply)
            }
        },
    );

    let g = get;
    registry.action(
        "core",
        "policy_status",
        "client isolation, the clients with rules, and packets per verdict in the kernel",
        vec![],
        move |_: NoParams| {
            let g = g.clone();
            async move {
                let policy = g()?;
                let state = policy.state();
                Ok(json!({
                    "isolation": state.isolate,
                    "clients_with_rules": state.rules.len(),
                    "rules": state.rules.values().map(Vec::len).sum::<usize>(),
                    "clients_with_own_limits": state.limits.len(),
                    "limited_clients": policy.kernel_limits().len(),
                    "over_quota_clients": policy.kernel_limits().iter().filter(|(_, l)| l.over_quota()).count(),
                    "limit_defaults": policy.defaults(),
                    "packets": policy.counts().map(|c| c.into_iter()
                        .map(|(v, n)| (v.to_string(), json!(n)))
                        .collect::<serde_json::Map<_, _>>()),
                }))
            }
        },
    );

    registry.reads(
        "core",
        &[
            "get_client_acl",
            "test_policy",
            "policy_status",
            "get_client_policy",
        ],
    );
}

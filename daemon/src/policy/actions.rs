//! The client policy's socket actions, in the `core` module (they are about core's clients):
//! `set_client_acl`, `get_client_acl`, `set_client_isolation`, `test_policy`, `policy_status`.

use std::{net::IpAddr, sync::Arc};

use serde::Deserialize;
use serde_json::{Value, json};

use super::{ClientPolicy, PolicyError, Protocol, parse_rules};
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
                    "packets": policy.counts().map(|c| c.into_iter()
                        .map(|(v, n)| (v.to_string(), json!(n)))
                        .collect::<serde_json::Map<_, _>>()),
                }))
            }
        },
    );

    registry.reads("core", &["get_client_acl", "test_policy", "policy_status"]);
}

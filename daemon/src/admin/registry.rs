//! The action registry: every module plugs its socket actions in here with a typed parameter
//! struct and a declared parameter list. The declaration drives validation (strings from the
//! command line are coerced to the declared type), the help text, and `api describe`.

use std::{collections::BTreeMap, future::Future, net::IpAddr, pin::Pin, sync::Arc};

use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Map, Value, json};

use crate::protocol::{self, Request, Response, codes};

/// A failed action: a stable code for scripts and a sentence for people.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(codes::INTERNAL_ERROR, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(codes::UNAVAILABLE, message)
    }

    /// A failure of the host: `DISK_FULL` when a full disk caused it (anywhere in its chain of
    /// sources), else `INTERNAL_ERROR`; the sentence is the error's.
    pub fn of_host(e: &(dyn std::error::Error + 'static)) -> Self {
        if caused_by_full_disk(e) {
            Self::new(
                DISK_FULL,
                format!("{e} (the disk of the state directory is full: free space and try again)"),
            )
        } else {
            Self::internal(e.to_string())
        }
    }
}

/// The code of a change refused because the state directory's disk is full (`ENOSPC`,
/// `EDQUOT`, SQLite's `SQLITE_FULL`).
pub const DISK_FULL: &str = "DISK_FULL";

fn caused_by_full_disk(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        {
            return true;
        }
        if let Some(db) = e.downcast_ref::<rusqlite::Error>()
            && db.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// The code of an entry a full kernel map refused.
pub const MAP_FULL: &str = "MAP_FULL";

impl From<crate::error::Error> for ApiError {
    fn from(e: crate::error::Error) -> Self {
        match e {
            crate::error::Error::MapFull { .. } => ApiError::new(MAP_FULL, e.to_string()),
            e => ApiError::of_host(&e),
        }
    }
}

pub type ActionResult = Result<Value, ApiError>;
type BoxFuture = Pin<Box<dyn Future<Output = ActionResult> + Send>>;
type Handler = Arc<dyn Fn(Value) -> BoxFuture + Send + Sync>;

/// The declared type of a parameter. Values may arrive as JSON of that type or as the string
/// the CLI passes (`count=5`, `confirm=true`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamKind {
    String {
        max_len: usize,
    },
    Integer {
        min: i64,
        max: i64,
    },
    Boolean,
    IpAddr,
    /// An address or an IPv6 prefix (`2001:db8:1:2::/64`), as `crate::source::Source` reads
    /// it; passed on in its canonical spelling.
    Source,
}

impl ParamKind {
    fn describe(&self) -> String {
        match self {
            ParamKind::String { max_len } => format!("string (at most {max_len} bytes)"),
            ParamKind::Integer { min, max } => format!("integer {min}..={max}"),
            ParamKind::Boolean => "true|false".into(),
            ParamKind::IpAddr => "IPv4 or IPv6 address".into(),
            ParamKind::Source => "IPv4 or IPv6 address, or IPv6 prefix (address/length)".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: &'static str,
    pub kind: ParamKind,
    pub required: bool,
    /// Applied when the parameter is absent (as a CLI string, coerced like any input).
    pub default: Option<&'static str>,
    pub help: &'static str,
}

impl ParamSpec {
    pub const fn required(name: &'static str, kind: ParamKind, help: &'static str) -> Self {
        Self {
            name,
            kind,
            required: true,
            default: None,
            help,
        }
    }

    pub const fn optional(
        name: &'static str,
        kind: ParamKind,
        default: Option<&'static str>,
        help: &'static str,
    ) -> Self {
        Self {
            name,
            kind,
            required: false,
            default,
            help,
        }
    }
}

struct Action {
    summary: &'static str,
    params: Vec<ParamSpec>,
    /// Changes no state (a `read` token may call it; not audited). Set by
    /// [`Registry::reads`]; an action is a write unless its module lists it.
    read_only: bool,
    handler: Handler,
}

/// One registered action, as the HTTPS API's scopes and its OpenAPI document see it.
pub struct ActionInfo<'a> {
    pub module: &'static str,
    pub module_summary: &'static str,
    pub action: &'static str,
    pub summary: &'static str,
    pub params: &'a [ParamSpec],
    pub read_only: bool,
}

struct Module {
    summary: &'static str,
    actions: BTreeMap<&'static str, Action>,
}

/// The outcome of one request, for metrics: which registered action ran (or none) and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// `None` when the request did not name a registered module/action.
    pub target: Option<(&'static str, &'static str)>,
    pub success: bool,
}

#[derive(Default)]
pub struct Registry {
    modules: BTreeMap<&'static str, Module>,
    unknown_reads: Vec<(&'static str, &'static str)>,
}

/// `page`, `per_page`, `search`: the paging parameters list actions share.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    pub page: i64,
    pub per_page: i64,
    pub search: Option<String>,
}

/// Runs blocking work (SQLite, device control, map syscalls) off the async workers.
pub async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("task failed: {e}")))?
}

/// Parameters of an action that takes none; unknown parameters are still refused.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn module(&mut self, name: &'static str, summary: &'static str) -> &mut Self {
        self.modules.entry(name).or_insert_with(|| Module {
            summary,
            actions: BTreeMap::new(),
        });
        self
    }

    /// Registers `module action`. `P` is built from the validated, coerced parameters.
    pub fn action<P, R, F, Fut>(
        &mut self,
        module: &'static str,
        action: &'static str,
        summary: &'static str,
        params: Vec<ParamSpec>,
        handler: F,
    ) -> &mut Self
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize,
        F: Fn(P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, ApiError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: Handler = Arc::new(move |value: Value| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                let params: P = serde_json::from_value(value).map_err(|e| {
                    ApiError::new(codes::INVALID_PARAMETER, format!("invalid parameters: {e}"))
                })?;
                let out = handler(params).await?;
                serde_json::to_value(out)
                    .map_err(|e| ApiError::internal(format!("cannot encode the reply: {e}")))
            }) as BoxFuture
        });
        let entry = self.modules.entry(module).or_insert_with(|| Module {
            summary: "",
            actions: BTreeMap::new(),
        });
        entry.actions.insert(
            action,
            Action {
                summary,
                params,
                read_only: false,
                handler: erased,
            },
        );
        self
    }

    /// Marks `module`'s actions named in `actions` as read-only: they change no state. Every
    /// module lists its own after registering them; a name that is not registered is kept in
    /// [`Registry::unknown_reads`] (a unit test of the daemon's registry checks it is empty).
    pub fn reads(&mut self, module: &'static str, actions: &[&'static str]) -> &mut Self {
        for name in actions {
            match self
                .modules
                .get_mut(module)
                .and_then(|m| m.actions.get_mut(name))
            {
                Some(a) => a.read_only = true,
                None => self.unknown_reads.push((module, name)),
            }
        }
        self
    }

    /// Names given to [`Registry::reads`] that no action has.
    pub fn unknown_reads(&self) -> &[(&'static str, &'static str)] {
        &self.unknown_reads
    }

    /// Whether `module action` changes no state; `None` when it is not registered. The
    /// describe action is a read.
    pub fn is_read_only(&self, module: &str, action: &str) -> Option<bool> {
        if module == protocol::DESCRIBE_MODULE && action == protocol::DESCRIBE_ACTION {
            return Some(true);
        }
        self.modules
            .get(module)
            .and_then(|m| m.actions.get(action))
            .map(|a| a.read_only)
    }

    /// Every registered action, by module then action name.
    pub fn catalogue(&self) -> Vec<ActionInfo<'_>> {
        self.modules
            .iter()
            .flat_map(|(m, module)| {
                module.actions.iter().map(move |(a, action)| ActionInfo {
                    module: m,
                    module_summary: module.summary,
                    action: a,
                    summary: action.summary,
                    params: &action.params,
                    read_only: action.read_only,
                })
            })
            .collect()
    }

    /// The registered module names.
    pub fn module_names(&self) -> Vec<&'static str> {
        self.modules.keys().copied().collect()
    }

    /// Validates and runs one request. Never panics on any input.
    pub async fn dispatch(&self, req: Request) -> (Response, Outcome) {
        let Request {
            module,
            action,
            params,
        } = req;
        if module == protocol::DESCRIBE_MODULE && action == protocol::DESCRIBE_ACTION {
            let outcome = Outcome {
                target: Some((protocol::DESCRIBE_MODULE, protocol::DESCRIBE_ACTION)),
                success: true,
            };
            return (Response::ok(&module, &action, self.describe()), outcome);
        }
        let fail = |code, msg: String, target| {
            (
                Response::fail(&module, &action, code, msg),
                Outcome {
                    target,
                    success: false,
                },
            )
        };
        let Some((module_name, m)) = self.modules.get_key_value(module.as_str()) else {
            let known: Vec<&str> = self.modules.keys().copied().collect();
            return fail(
                codes::UNKNOWN_MODULE,
                format!(
                    "unknown module {:?}; modules: {}",
                    truncate(&module, 64),
                    known.join(", ")
                ),
                None,
            );
        };
        let Some((action_name, a)) = m.actions.get_key_value(action.as_str()) else {
            let known: Vec<&str> = m.actions.keys().copied().collect();
            return fail(
                codes::UNKNOWN_ACTION,
                format!(
                    "module {module_name} has no action {:?}; actions: {}",
                    truncate(&action, 64),
                    known.join(", ")
                ),
                None,
            );
        };
        let target = Some((*module_name, *action_name));
        let value = match validate(&a.params, params) {
            Ok(value) => value,
            Err(e) => return fail(e.code, e.message, target),
        };
        match (a.handler)(value).await {
            Ok(data) => (
                Response::ok(&module, &action, data),
                Outcome {
                    target,
                    success: true,
                },
            ),
            Err(e) => fail(e.code, e.message, target),
        }
    }

    /// Every module, action and parameter: what `phantom-api --help` prints.
    pub fn describe(&self) -> Value {
        let modules: Map<String, Value> = self
            .modules
            .iter()
            .map(|(name, m)| {
                let actions: Map<String, Value> = m
                    .actions
                    .iter()
                    .map(|(aname, a)| {
                        let params: Vec<Value> = a
                            .params
                            .iter()
                            .map(|p| {
                                json!({
                                    "name": p.name,
                                    "type": p.kind.describe(),
                                    "required": p.required,
                                    "default": p.default,
                                    "help": p.help,
                                })
                            })
                            .collect();
                        (
                            aname.to_string(),
                            json!({
                                "summary": a.summary,
                                "params": params,
                                "read_only": a.read_only,
                            }),
                        )
                    })
                    .collect();
                (
                    name.to_string(),
                    json!({"summary": m.summary, "actions": actions}),
                )
            })
            .collect();
        json!({ "version": protocol::VERSION, "modules": modules })
    }

    /// `(module, action)` pairs, for pre-registering metric series.
    pub fn actions(&self) -> Vec<(&'static str, &'static str)> {
        self.modules
            .iter()
            .flat_map(|(m, module)| module.actions.keys().map(move |a| (*m, *a)))
            .collect()
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Checks names, presence and types; returns an object holding exactly the declared
/// parameters, coerced, with defaults filled in.
fn validate(specs: &[ParamSpec], mut params: Map<String, Value>) -> Result<Value, ApiError> {
    if let Some(unknown) = params.keys().find(|k| !specs.iter().any(|s| s.name == *k)) {
        let accepted: Vec<&str> = specs.iter().map(|s| s.name).collect();
        return Err(ApiError::new(
            codes::UNKNOWN_PARAMETER,
            format!(
                "unknown parameter {:?}; accepted: {}",
                truncate(unknown, 64),
                if accepted.is_empty() {
                    "none".to_string()
                } else {
                    accepted.join(", ")
                }
            ),
        ));
    }
    let mut out = Map::new();
    for spec in specs {
        let raw = match params.remove(spec.name) {
            Some(Value::Null) | None => match spec.default {
                Some(d) => Value::String(d.to_string()),
                None if spec.required => {
                    return Err(ApiError::new(
                        codes::MISSING_PARAMETER,
                        format!("missing required parameter {} ({})", spec.name, spec.help),
                    ));
                }
                None => continue,
            },
            Some(v) => v,
        };
        out.insert(spec.name.to_string(), coerce(spec, raw)?);
    }
    Ok(Value::Object(out))
}

fn coerce(spec: &ParamSpec, raw: Value) -> Result<Value, ApiError> {
    let bad = |why: &str| {
        ApiError::new(
            codes::INVALID_PARAMETER,
            format!(
                "parameter {}: {why} (expected {})",
                spec.name,
                spec.kind.describe()
            ),
        )
    };
    match spec.kind {
        ParamKind::String { max_len } => {
            let s = match raw {
                Value::String(s) => s,
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => return Err(bad("not a string")),
            };
            if s.len() > max_len {
                return Err(bad("too long"));
            }
            if s.chars().any(char::is_control) {
                return Err(bad("contains control characters"));
            }
            Ok(Value::String(s))
        }
        ParamKind::Integer { min, max } => {
            let n = match &raw {
                Value::Number(n) => n.as_i64().ok_or_else(|| bad("not a whole number"))?,
                Value::String(s) => s
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| bad("not a whole number"))?,
                _ => return Err(bad("not a number")),
            };
            if n < min || n > max {
                return Err(bad("out of range"));
            }
            Ok(Value::from(n))
        }
        ParamKind::Boolean => match &raw {
            Value::Bool(b) => Ok(Value::Bool(*b)),
            Value::String(s) => match s.to_ascii_lowercase().as_str() {
                "true" | "yes" | "1" | "on" => Ok(Value::Bool(true)),
                "false" | "no" | "0" | "off" => Ok(Value::Bool(false)),
                _ => Err(bad("not a boolean")),
            },
            _ => Err(bad("not a boolean")),
        },
        ParamKind::IpAddr => match &raw {
            Value::String(s) => s
                .trim()
                .parse::<IpAddr>()
                .map(|ip| Value::String(ip.to_string()))
                .map_err(|_| bad("not an IP address")),
            _ => Err(bad("not an IP address")),
        },
        ParamKind::Source => match &raw {
            Value::String(s) => s
                .parse::<crate::source::Source>()
                .map(|src| Value::String(src.to_string()))
                .map_err(|_| bad("not an IP address or an IPv6 prefix with its host bits clear")),
            _ => Err(bad("not an IP address or an IPv6 prefix")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_anywhere_in_the_chain_is_disk_full() {
        let path = std::path::Path::new("/state/x.json");
        let full = crate::error::Error::io(path, std::io::Error::from_raw_os_error(libc::ENOSPC));
        let e = ApiError::from(full);
        assert_eq!(e.code, DISK_FULL);
        assert!(e.message.starts_with("/state/x.json: "), "{}", e.message);
        let db = crate::error::Error::Sqlite {
            path: path.into(),
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                None,
            ),
        };
        assert_eq!(ApiError::from(db).code, DISK_FULL);
        let denied = crate::error::Error::io(path, std::io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(ApiError::from(denied).code, codes::INTERNAL_ERROR);
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct EchoParams {
        count: i64,
        flag: Option<bool>,
    }

    fn registry() -> Registry {
        let mut r = Registry::new();
        r.module("demo", "a demo").action(
            "demo",
            "echo",
            "echo back",
            vec![
                ParamSpec::optional(
                    "count",
                    ParamKind::Integer { min: 1, max: 10 },
                    Some("3"),
                    "how many",
                ),
                ParamSpec::optional("flag", ParamKind::Boolean, None, "a flag"),
            ],
            |p: EchoParams| async move { Ok(json!({"count": p.count, "flag": p.flag})) },
        );
        r
    }

    fn req(module: &str, action: &str, params: Value) -> Request {
        let params = match params {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        Request {
            module: module.into(),
            action: action.into(),
            params,
        }
    }

    #[tokio::test]
    async fn coerces_cli_strings_and_applies_defaults() {
        let r = registry();
        let (resp, outcome) = r
            .dispatch(req("demo", "echo", json!({"count": "5", "flag": "true"})))
            .await;
        assert!(resp.success, "{resp:?}");
        assert_eq!(resp.data, Some(json!({"count": 5, "flag": true})));
        assert_eq!(outcome.target, Some(("demo", "echo")));
        let (resp, _) = r.dispatch(req("demo", "echo", json!({}))).await;
        assert_eq!(resp.data, Some(json!({"count": 3, "flag": null})));
    }

    #[tokio::test]
    async fn rejects_bad_requests_with_codes() {
        let r = registry();
        let cases = [
            (req("nope", "echo", json!({})), codes::UNKNOWN_MODULE),
            (req("demo", "nope", json!({})), codes::UNKNOWN_ACTION),
            (
                req("demo", "echo", json!({"count": "eleven"})),
                codes::INVALID_PARAMETER,
            ),
            (
                req("demo", "echo", json!({"count": 11})),
                codes::INVALID_PARAMETER,
            ),
            (
                req("demo", "echo", json!({"count": [1]})),
                codes::INVALID_PARAMETER,
            ),
            (
                req("demo", "echo", json!({"bogus": 1})),
                codes::UNKNOWN_PARAMETER,
            ),
        ];
        for (request, code) in cases {
            let (resp, outcome) = r.dispatch(request.clone()).await;
            assert!(!resp.success);
            assert_eq!(resp.code.as_deref(), Some(code), "{request:?}");
            assert!(!outcome.success);
        }
    }

    #[tokio::test]
    async fn describe_lists_everything() {
        let d = registry().describe();
        assert_eq!(
            d["modules"]["demo"]["actions"]["echo"]["params"][0]["name"],
            "count"
        );
    }
}

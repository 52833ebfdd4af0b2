//! The HTTPS admin API (`[admin] http_listen`): every action of the socket's registry as
//! `POST /api/v1/<module>/<action>` with a JSON object of the same parameters, answered with
//! the same envelope (the registry's own dispatch), plus the seed's sentry routes as aliases
//! and `GET /api/v1/openapi.json`, and the dashboard at `/` with its snapshot route
//! (`dashboard.rs`). On the HTTP layer (`Limits::admin_api`) over TLS.
//!
//! Each request, in order: the source must be in `[admin] http_allow` (403), within the
//! per-source rate (429); a bearer token of this daemon, valid and not revoked (401), within
//! the per-token rate (429); a registered action outside the `admin` module (404, 403); in
//! the token's scope (403); a body that is a JSON object (400); then the registry validates
//! the parameters (400 naming the field) and runs the action. Writes are audited.
//! docs/admin-api.md.

pub mod dashboard;
mod limiter;
pub mod openapi;
pub mod status;
pub mod tls;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use axum::{
    Router,
    body::Body,
    extract::{ConnectInfo, Path, RawQuery, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response as HttpResponse},
    routing::{get, post},
};
use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tracing::info;

use self::{limiter::Limiter, status::codes};
use super::{
    Registry,
    audit::{AuditLog, Entry},
    tokens::{Grant, Tokens},
};
use crate::{
    error::Error,
    http,
    protocol::{self, Request, Response},
    source::SourcePrefix,
};

/// What the listener needs besides the registry and its TLS configuration.
pub struct Settings {
    pub tokens: Arc<Tokens>,
    pub audit: Arc<AuditLog>,
    pub allow: Vec<ipnet::IpNet>,
    pub rate_per_token: u32,
    pub rate_per_source: u32,
    pub source_prefix: SourcePrefix,
}

struct Web {
    registry: Arc<Registry>,
    tokens: Arc<Tokens>,
    audit: Arc<AuditLog>,
    allow: Vec<ipnet::IpNet>,
    source_prefix: SourcePrefix,
    per_source: Limiter<IpAddr>,
    per_token: Limiter<String>,
    /// Made once at start; the registry does not change while the daemon runs.
    openapi: Bytes,
    dashboard: dashboard::Dashboard,
}

/// Binds `addr` and serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    registry: Arc<Registry>,
    settings: Settings,
    limits: http::Limits,
    shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let listener = http::bind("admin API", addr).await?;
    let openapi = Bytes::from(openapi::document(&registry).to_string());
    let web = Arc::new(Web {
        registry,
        tokens: settings.tokens,
        audit: settings.audit,
        allow: settings.allow,
        source_prefix: settings.source_prefix,
        per_source: Limiter::new(settings.rate_per_source),
        per_token: Limiter::new(settings.rate_per_token),
        openapi,
        dashboard: dashboard::Dashboard::new(),
    });
    info!(%addr, "admin API listening (HTTPS)");
    let server = http::Server::new("admin API", limits);
    Ok(tokio::spawn(async move {
        server
            .serve_tls(listener, shutdown, tls, http::router(app(web)))
            .await;
    }))
}

fn app(web: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(dashboard_asset))
        .route("/index.html", get(dashboard_asset))
        .route("/dashboard/{file}", get(dashboard_asset))
        .route("/api/v1/dashboard", get(dashboard_snapshot))
        .route("/api/v1/openapi.json", get(openapi_doc))
        .route("/api/v1/{module}/{action}", post(action))
        .route("/sentry/config", post(alias_to("set_config")))
        .route("/sentry/status", get(alias_to("status")))
        .route("/sentry/mode", post(alias_to("set_mode")))
        .route(
            "/sentry/whitelist",
            get(alias_whitelist)
                .post(alias_whitelist)
                .delete(alias_whitelist),
        )
        .fallback(not_found)
        .with_state(web)
}

/// A refusal made before the action runs (boxed: a response is large).
type Refusal = Box<HttpResponse>;

/// An envelope with the status its code maps to.
fn reply(resp: &Response) -> HttpResponse {
    let status = match &resp.code {
        None => StatusCode::OK,
        Some(code) => status::for_code(code),
    };
    let body = serde_json::to_vec(resp).unwrap_or_default();
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body),
    )
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn refuse(module: &str, action: &str, code: &str, message: impl Into<String>) -> HttpResponse {
    reply(&Response::fail(module, action, code, message))
}

fn rate_limited(module: &str, action: &str, what: &str, retry: u64) -> HttpResponse {
    let mut r = refuse(
        module,
        action,
        codes::RATE_LIMITED,
        format!("too many requests from this {what}; retry in {retry} s"),
    );
    if let Ok(v) = HeaderValue::from_str(&retry.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

async fn not_found(method: Method) -> HttpResponse {
    refuse(
        "",
        "",
        codes::NOT_FOUND,
        format!(
            "no such route for {method}; actions are POST /api/v1/<module>/<action>, the document GET /api/v1/openapi.json"
        ),
    )
}

impl Web {
    /// The source checks: allowlist, then per-source rate.
    fn admit_source(&self, peer: SocketAddr, module: &str, action: &str) -> Result<(), Refusal> {
        let ip = match peer.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if !self.allow.iter().any(|n| n.contains(&ip)) {
            return Err(Box::new(refuse(
                module,
                action,
                codes::SOURCE_NOT_ALLOWED,
                "this source address is not in the admin API's allowlist ([admin] http_allow)",
            )));
        }
        self.per_source
            .hit(&self.source_prefix.of(ip))
            .map_err(|retry| Box::new(rate_limited(module, action, "source", retry)))
    }

    /// The token checks: present and valid, then per-token rate.
    fn authenticate(
        &self,
        headers: &HeaderMap,
        module: &str,
        action: &str,
    ) -> Result<Grant, Refusal> {
        let unauthorized = |why: &str| {
            let mut r = refuse(module, action, codes::UNAUTHORIZED, why);
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"phantom\""),
            );
            Box::new(r)
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized(
                "no bearer token (Authorization: Bearer <token from phantom-api admin token_create>)",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .unwrap_or("");
        if token.is_empty() {
            return Err(unauthorized(
                "the Authorization header is not \"Bearer <token>\"",
            ));
        }
        let grant = self
            .tokens
            .verify(token)
            .map_err(|r| unauthorized(r.sentence()))?;
        self.per_token
            .hit(&grant.name)
            .map_err(|retry| Box::new(rate_limited(module, action, "token", retry)))?;
        Ok(grant)
    }

    /// Everything after the route: checks, parameters, dispatch, audit.
    async fn call(
        &self,
        peer: SocketAddr,
        headers: &HeaderMap,
        module: &str,
        action: &str,
        params: Params,
    ) -> HttpResponse {
        if let Err(r) = self.admit_source(peer, module, action) {
            return *r;
        }
        let grant = match self.authenticate(headers, module, action) {
            Ok(g) => g,
            Err(r) => return *r,
        };
        if module == super::actions::MODULE {
            return refuse(
                module,
                action,
                codes::SOCKET_ONLY,
                "the admin module (tokens, audit) is served over the socket only",
            );
        }
        let Some(read_only) = self.registry.is_read_only(module, action) else {
            // Unknown module or action: the registry's own reply.
            let (resp, _) = self
                .registry
                .dispatch(Request {
                    module: module.to_string(),
                    action: action.to_string(),
                    params: Map::new(),
                })
                .await;
            return reply(&resp);
        };
        if !grant.scope.allows(module, read_only) {
            return refuse(
                module,
                action,
                codes::INSUFFICIENT_SCOPE,
                format!(
                    "token {:?} (scope {}) may not call {module} {action}, which {}",
                    grant.name,
                    grant.scope.as_string(),
                    match grant.scope {
                        super::tokens::Scope::Modules(_) => "is outside its modules",
                        _ => "changes state",
                    }
                ),
            );
        }
        // The body is read only now: nobody without a valid token makes the daemon read one.
        let params = match params.read(module, action).await {
            Ok(p) => p,
            Err(r) => return *r,
        };
        let audited = (!read_only).then(|| params.clone());
        let (resp, outcome) = self
            .registry
            .dispatch(Request {
                module: module.to_string(),
                action: action.to_string(),
                params,
            })
            .await;
        if let (Some(params), Some((m, a))) = (audited, outcome.target) {
            let audit = Arc::clone(&self.audit);
            let code = resp.code.clone();
            let token = grant.name.clone();
            let _ = tokio::task::spawn_blocking(move || {
                audit.record(&Entry {
                    transport: "https",
                    token: &token,
                    module: m,
                    action: a,
                    params: &params,
                    code: code.as_deref(),
                })
            })
            .await;
        }
        reply(&resp)
    }
}

/// Where a request's parameters are, read once the request has passed its checks.
enum Params {
    /// A JSON object body (empty: none).
    Body(Body),
    /// The query string (the GET aliases).
    Query(Option<String>),
    /// The body, or the query string when the body is empty (`DELETE /sentry/whitelist?ip=`).
    BodyOrQuery(Body, Option<String>),
}

impl Params {
    async fn read(self, module: &str, action: &str) -> Result<Map<String, Value>, Refusal> {
        match self {
            Params::Body(body) => body_params(body, module, action).await,
            Params::Query(query) => Ok(query_params(query.as_deref())),
            Params::BodyOrQuery(body, query) => match body_params(body, module, action).await {
                Ok(m) if m.is_empty() => Ok(query_params(query.as_deref())),
                other => other,
            },
        }
    }
}

/// The body as the action's parameters: empty is `{}`; otherwise a JSON object.
async fn body_params(
    body: Body,
    module: &str,
    action: &str,
) -> Result<Map<String, Value>, Refusal> {
    let bytes = axum::body::to_bytes(body, protocol::MAX_FRAME_BYTES)
        .await
        .map_err(|_| {
            Box::new(refuse(
                module,
                action,
                codes::BODY_TOO_LARGE,
                format!(
                    "the request body is over {} bytes or was cut off",
                    protocol::MAX_FRAME_BYTES
                ),
            ))
        })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Box::new(refuse(
            module,
            action,
            protocol::codes::INVALID_REQUEST,
            "the body must be a JSON object of the action's parameters",
        ))),
        Err(e) => Err(Box::new(refuse(
            module,
            action,
            protocol::codes::INVALID_JSON,
            format!("malformed JSON body: {e}"),
        ))),
    }
}

/// `?a=1&b=x` as string parameters (coerced by the registry like the CLI's `key=value`).
fn query_params(query: Option<&str>) -> Map<String, Value> {
    let mut out = Map::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            let s = s.replace('+', " ");
            percent_decode(&s)
        };
        out.insert(decode(k), Value::String(decode(v)));
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn action(
    State(web): State<Arc<Web>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((module, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> HttpResponse {
    web.call(peer, &headers, &module, &action, Params::Body(body))
        .await
}

async fn openapi_doc(
    State(web): State<Arc<Web>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> HttpResponse {
    if let Err(r) = web.admit_source(peer, "", "") {
        return *r;
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        web.openapi.clone(),
    )
        .into_response()
}

/// The dashboard's page, script and style sheet: no token needed (they hold no data), but the
/// allowlist and the per-source rate apply.
async fn dashboard_asset(
    State(web): State<Arc<Web>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> HttpResponse {
    if let Err(r) = web.admit_source(peer, "", "") {
        return *r;
    }
    match dashboard::asset(uri.path(), headers.get(header::IF_NONE_MATCH)) {
        Some(r) => r,
        None => not_found(Method::GET).await,
    }
}

/// What the dashboard's panels show, as the token may see it.
async fn dashboard_snapshot(
    State(web): State<Arc<Web>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> HttpResponse {
    if let Err(r) = web.admit_source(peer, "dashboard", "snapshot") {
        return *r;
    }
    match web.authenticate(&headers, "dashboard", "snapshot") {
        Ok(grant) => web.dashboard.reply(&web.registry, &grant).await,
        Err(r) => *r,
    }
}

async fn alias(
    web: &Web,
    peer: SocketAddr,
    headers: &HeaderMap,
    action: &str,
    method: &Method,
    query: Option<String>,
    body: Body,
) -> HttpResponse {
    let params = if *method == Method::GET {
        Params::Query(query)
    } else {
        Params::BodyOrQuery(body, query)
    };
    web.call(peer, headers, "sentry", action, params).await
}

/// What an alias handler returns.
type AliasReply = std::pin::Pin<Box<dyn std::future::Future<Output = HttpResponse> + Send>>;

/// The handler of a seed route that is one sentry action whatever the method.
fn alias_to(
    action: &'static str,
) -> impl Fn(State<Arc<Web>>, ConnectInfo<SocketAddr>, Method, RawQuery, HeaderMap, Body) -> AliasReply
+ Clone
+ Send
+ Sync
+ 'static {
    move |State(web), ConnectInfo(peer), method, RawQuery(query), headers, body| {
        Box::pin(async move { alias(&web, peer, &headers, action, &method, query, body).await })
    }
}

async fn alias_whitelist(
    State(web): State<Arc<Web>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> HttpResponse {
    let action = match method {
        Method::POST => "whitelist_add",
        Method::DELETE => "whitelist_remove",
        _ => "whitelist_list",
    };
    alias(&web, peer, &headers, action, &method, query, body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode() {
        let m = query_params(Some("ip=10.0.0.1&note=a+b%21&flag"));
        assert_eq!(m["ip"], "10.0.0.1");
        assert_eq!(m["note"], "a b!");
        assert_eq!(m["flag"], "");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}

//! The public, read-only blocklist API of seed 001 (`[blocklist] api_listen`): the list with
//! delta sync, the patterns, domain verification, health. No request is logged and no client
//! address is kept: the rate limiter keys on a salted hash of the address that it forgets
//! within a minute.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{ConnectInfo, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::info;

use super::{Blocklist, BlocklistError, model::normalise};
use crate::{error::Error, http};

/// Requests per client per minute; health checks are not counted.
const PER_CLIENT_PER_MINUTE: u32 = 120;

/// Token buckets keyed by a salted hash of the client address.
struct RateLimiter {
    salt: [u8; 16],
    buckets: Mutex<HashMap<u64, (Instant, u32)>>,
}

impl RateLimiter {
    fn new() -> Self {
        let mut salt = [0u8; 16];
        let _ = getrandom_salt(&mut salt);
        Self {
            salt,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn allow(&self, addr: &SocketAddr) -> bool {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(addr.ip().to_string().as_bytes());
        let digest = h.finalize();
        let mut key = [0u8; 8];
        key.copy_from_slice(&digest[..8]);
        let key = u64::from_ne_bytes(key);
        let Ok(mut buckets) = self.buckets.lock() else {
            return true;
        };
        let now = Instant::now();
        if buckets.len() > 100_000 {
            buckets.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(60));
        }
        let (start, count) = buckets.entry(key).or_insert((now, 0));
        if now.duration_since(*start) >= Duration::from_secs(60) {
            *start = now;
            *count = 0;
        }
        *count += 1;
        *count <= PER_CLIENT_PER_MINUTE
    }
}

/// A per-process random salt (the kernel's getrandom through /dev/urandom).
fn getrandom_salt(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

#[derive(Clone)]
struct ApiState {
    list: Arc<Blocklist>,
    limiter: Arc<RateLimiter>,
}

#[derive(Deserialize)]
struct ListQuery {
    version: Option<String>,
    format: Option<String>,
    platform: Option<String>,
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"success": false, "error": message}))).into_response()
}

fn too_many() -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, "60")],
        Json(json!({"success": false, "error": "too many requests", "retryAfter": 60})),
    )
        .into_response()
}

fn etag(version: u64) -> String {
    format!("\"v{version}\"")
}

async fn blocklist(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Response {
    if !state.limiter.allow(&peer) {
        return too_many();
    }
    let since = match q.version.as_deref().map(str::parse::<u64>) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "version must be a whole number"),
    };
    let full = match q.format.as_deref() {
        None | Some("compressed") => false,
        Some("full") => true,
        Some(_) => return error(StatusCode::BAD_REQUEST, "format must be compressed or full"),
    };
    if !matches!(
        q.platform.as_deref(),
        None | Some("android" | "ios" | "web" | "other")
    ) {
        return error(
            StatusCode::BAD_REQUEST,
            "platform must be android, ios, web or other",
        );
    }
    let list = Arc::clone(&state.list);
    let result = tokio::task::spawn_blocking(move || -> Result<_, BlocklistError> {
        let version = list.version();
        let delta = match (since, full) {
            (Some(v), false) => list.delta(v)?,
            _ => None,
        };
        Ok((
            version,
            list.checksum(),
            list.patterns(),
            delta,
            if full || since.is_none() {
                Some(list.entries())
            } else {
                None
            },
            list,
        ))
    })
    .await;
    let Ok(Ok((version, checksum, patterns, delta, entries, list))) = result else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
    };
    let tag = etag(version);
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"))
        || (since == Some(version) && !full);
    if not_modified {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response();
    }
    let body = match delta {
        Some((entries, removed)) => json!({
            "success": true, "version": version, "lastUpdated": version, "delta": true,
            "entries": entries, "patterns": patterns, "removed": removed, "checksum": checksum,
        }),
        None => {
            let entries = match entries {
                Some(e) => e,
                None => match tokio::task::spawn_blocking(move || list.entries()).await {
                    Ok(e) => e,
                    Err(_) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
                },
            };
            json!({
                "success": true, "version": version, "lastUpdated": version, "delta": false,
                "entries": entries, "patterns": patterns, "removed": [], "checksum": checksum,
            })
        }
    };
    (
        [
            (header::ETAG, tag),
            (header::CACHE_CONTROL, "no-cache".to_string()),
        ],
        Json(body),
    )
        .into_response()
}

#[derive(Deserialize)]
struct VersionQuery {
    version: Option<String>,
}

async fn patterns(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<VersionQuery>,
    headers: HeaderMap,
) -> Response {
    if !state.limiter.allow(&peer) {
        return too_many();
    }
    let version = state.list.version();
    let tag = etag(version);
    let current = q.version.as_deref().and_then(|v| v.parse::<u64>().ok()) == Some(version)
        || headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() == tag);
    if current {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response();
    }
    let patterns = state.list.patterns();
    let mut h = Sha256::new();
    for p in &patterns {
        if let Ok(line) = serde_json::to_vec(p) {
            h.update(&line);
            h.update(b"\n");
        }
    }
    let checksum: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    (
        [(header::ETAG, tag)],
        Json(json!({"success": true, "version": version, "patterns": patterns, "checksum": format!("sha256:{checksum}")})),
    )
        .into_response()
}

async fn verify(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: axum::body::Bytes,
) -> Response {
    if !state.limiter.allow(&peer) {
        return too_many();
    }
    #[derive(Deserialize)]
    struct VerifyBody {
        domain: String,
    }
    let Ok(req) = serde_json::from_slice::<VerifyBody>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "body must be JSON {\"domain\": \"...\"}",
        );
    };
    let Ok(name) = normalise(&req.domain) else {
        return error(StatusCode::BAD_REQUEST, "not a valid domain name");
    };
    let v = state.list.verify(&name);
    Json(json!({
        "success": true, "domain": v.domain, "blocked": v.blocked,
        "matchedPatterns": v.matched, "confidence": v.confidence,
    }))
    .into_response()
}

async fn health(State(state): State<ApiState>) -> Response {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Json(json!({
        "status": "ok", "timestamp": now, "version": crate::protocol::VERSION,
        "blocklistCount": state.list.len(),
    }))
    .into_response()
}

/// Serves the API until `shutdown` turns true, with the HTTP layer's blocklist limits
/// (request bodies up to 4 KiB).
pub async fn serve(
    addr: SocketAddr,
    list: Arc<Blocklist>,
    limits: http::Limits,
    shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen {
            what: "the blocklist API",
            addr,
            source,
        })?;
    let state = ApiState {
        list,
        limiter: Arc::new(RateLimiter::new()),
    };
    let app = Router::new()
        .route("/api/v1/blocklist", get(blocklist))
        .route("/api/v1/patterns", get(patterns))
        .route("/api/v1/verify-domain", post(verify))
        .route("/health", get(health))
        .layer(tower_http::compression::CompressionLayer::new().gzip(true))
        .with_state(state);
    info!(%addr, "blocklist API listening");
    let server = http::Server::new("blocklist API", limits);
    Ok(tokio::spawn(async move {
        server.serve(listener, shutdown, http::router(app)).await;
    }))
}

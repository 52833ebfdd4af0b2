//! The dashboard at `/`: a page, a script and a style sheet embedded in the binary (no build
//! step, no third-party request), and `GET /api/v1/dashboard`, the one snapshot its panels
//! poll. The page signs in with an admin token and calls the ordinary action routes for what
//! it changes, so the audit log, scopes and rate limits apply as for any other client.
//!
//! A snapshot is a handful of read actions through the registry. It is made at most once per
//! [`SNAPSHOT_MAX_AGE`] whoever asks, and shared: ten open dashboards cost the daemon what
//! one does. Each viewer gets the panels its token's scope may read. docs/dashboard.md.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::Body,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response as HttpResponse},
};
use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::Mutex;

use super::super::{
    Registry,
    tokens::{Grant, Scope},
};
use crate::protocol::Request;

/// How old a shared snapshot may be before the next viewer's poll makes a new one.
pub const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(1);
/// How often the page polls (it reads this from the snapshot).
pub const REFRESH_MS: u64 = 2000;
/// Rows of the client table; the count says how many there are in all.
pub const CLIENT_ROWS: u64 = 100;

/// One panel: the module whose read scope it needs and the read actions it shows.
struct PanelSpec {
    name: &'static str,
    module: &'static str,
    parts: &'static [(&'static str, &'static str, &'static str)],
}

/// (part, action, parameters as JSON): every action here is a registered read.
const PANELS: &[PanelSpec] = &[
    PanelSpec {
        name: "sentry",
        module: "sentry",
        parts: &[("status", "status", "{}")],
    },
    PanelSpec {
        name: "wireguard",
        module: "core",
        parts: &[
            ("server", "server_status", "{}"),
            ("clients", "list_clients", "{\"per_page\":100}"),
        ],
    },
    PanelSpec {
        name: "datapath",
        module: "datapath",
        parts: &[
            ("counters", "counters", "{}"),
            ("top_sources", "top_sources", "{\"count\":10}"),
        ],
    },
    PanelSpec {
        name: "dns",
        module: "dns",
        parts: &[("stats", "stats", "{}")],
    },
    PanelSpec {
        name: "blocklist",
        module: "blocklist",
        parts: &[("status", "status", "{}")],
    },
];

/// A made snapshot: each panel's JSON, serialised once.
struct Snapshot {
    made: Instant,
    generated_at: u64,
    panels: Vec<(&'static PanelSpec, Bytes)>,
}

/// The shared snapshot; the lock also makes concurrent polls wait for one build instead of
/// each building its own.
pub struct Dashboard {
    latest: Mutex<Option<Arc<Snapshot>>>,
}

impl Dashboard {
    pub fn new() -> Self {
        Self {
            latest: Mutex::new(None),
        }
    }

    async fn snapshot(&self, registry: &Registry) -> Arc<Snapshot> {
        let mut latest = self.latest.lock().await;
        if let Some(s) = latest.as_ref()
            && s.made.elapsed() < SNAPSHOT_MAX_AGE
        {
            return Arc::clone(s);
        }
        let mut panels = Vec::with_capacity(PANELS.len());
        for spec in PANELS {
            let mut body = Map::new();
            for (part, action, params) in spec.parts {
                let params = match serde_json::from_str::<Value>(params) {
                    Ok(Value::Object(m)) => m,
                    _ => Map::new(),
                };
                let (resp, _) = registry
                    .dispatch(Request {
                        module: spec.module.to_string(),
                        action: (*action).to_string(),
                        params,
                    })
                    .await;
                let value = match (resp.success, resp.data) {
                    (true, Some(data)) => data,
                    _ => json!({
                        "error": resp.error.unwrap_or_default(),
                        "code": resp.code.unwrap_or_default(),
                    }),
                };
                body.insert((*part).to_string(), value);
            }
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            panels.push((spec, Bytes::from(bytes)));
        }
        let snapshot = Arc::new(Snapshot {
            made: Instant::now(),
            generated_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            panels,
        });
        *latest = Some(Arc::clone(&snapshot));
        snapshot
    }

    /// The snapshot as `grant` may see it: panels outside its scope are named in `hidden`.
    pub async fn reply(&self, registry: &Registry, grant: &Grant) -> HttpResponse {
        let snapshot = self.snapshot(registry).await;
        let mut out = Vec::with_capacity(
            256 + snapshot
                .panels
                .iter()
                .map(|(_, b)| b.len() + 16)
                .sum::<usize>(),
        );
        let head = json!({
            "generated_at": snapshot.generated_at,
            "refresh_ms": REFRESH_MS,
            "token": {
                "name": grant.name,
                "scope": grant.scope.as_string(),
                "expires_at": grant.expires,
                // A module token writes to its modules, whose panels are the only ones shown.
                "can_write": !matches!(grant.scope, Scope::Read),
            },
        });
        let head = serde_json::to_vec(&head).unwrap_or_default();
        // `{...head fields..., "panels": {...}, "hidden": [...]}`, spliced from bytes made once.
        out.extend_from_slice(&head[..head.len().saturating_sub(1)]);
        out.extend_from_slice(b",\"panels\":{");
        let mut hidden = Vec::new();
        let mut first = true;
        for (spec, body) in &snapshot.panels {
            if !grant.scope.allows(spec.module, true) {
                hidden.push(spec.name);
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(format!("\"{}\":", spec.name).as_bytes());
            out.extend_from_slice(body);
        }
        out.extend_from_slice(b"},\"hidden\":");
        out.extend_from_slice(&serde_json::to_vec(&hidden).unwrap_or_default());
        out.push(b'}');
        let mut r = (
            [(header::CONTENT_TYPE, "application/json")],
            Body::from(out),
        )
            .into_response();
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}

impl Default for Dashboard {
    fn default() -> Self {
        Self::new()
    }
}

/// The embedded assets. Paths carry no version: the daemon serves what it was built with,
/// and `no-cache` makes the browser revalidate with the ETag (a digest of all three, so a
/// page and a script of different builds never meet).
const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

static ETAG: std::sync::LazyLock<HeaderValue> = std::sync::LazyLock::new(|| {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [INDEX_HTML, APP_JS, APP_CSS] {
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    HeaderValue::from_str(&format!("\"{hex}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
});

/// Scripts and styles only from this origin, no inline code, no framing: a token in the
/// page's session storage is worth protecting.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The asset at `path`, if it is one.
pub fn asset(path: &str, if_none_match: Option<&HeaderValue>) -> Option<HttpResponse> {
    let (body, kind) = match path {
        "/" | "/index.html" => (INDEX_HTML, "text/html; charset=utf-8"),
        "/dashboard/app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "/dashboard/app.css" => (APP_CSS, "text/css; charset=utf-8"),
        _ => return None,
    };
    let etag = &*ETAG;
    let mut r = if if_none_match.is_some_and(|v| v == etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, kind)], body).into_response()
    };
    let h = r.headers_mut();
    h.insert(header::ETAG, etag.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    Some(r)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::admin::registry::NoParams;

    fn grant(scope: Scope) -> Grant {
        Grant {
            name: "viewer".into(),
            scope,
            expires: 0,
        }
    }

    async fn body(r: HttpResponse) -> Value {
        let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// Fifty viewers polling at once cost one snapshot; each sees only its scope's panels.
    #[tokio::test]
    async fn concurrent_viewers_share_one_snapshot_and_see_their_scope() {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut registry = Registry::new();
        let counted = Arc::clone(&calls);
        registry.module("sentry", "test").action(
            "sentry",
            "status",
            "counts its calls",
            vec![],
            move |_: NoParams| {
                let counted = Arc::clone(&counted);
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(json!({"global_rate": 7}))
                }
            },
        );
        let registry = Arc::new(registry);
        let dashboard = Arc::new(Dashboard::new());
        let mut polls = Vec::new();
        for _ in 0..50 {
            let (d, r) = (Arc::clone(&dashboard), Arc::clone(&registry));
            polls.push(tokio::spawn(async move {
                body(d.reply(&r, &grant(Scope::Read)).await).await
            }));
        }
        for p in polls {
            let v = p.await.unwrap();
            assert_eq!(v["panels"]["sentry"]["status"]["global_rate"], 7);
            // A module this daemon lacks is a panel with the registry's refusal.
            assert_eq!(v["panels"]["dns"]["stats"]["code"], "UNKNOWN_MODULE");
            assert_eq!(v["hidden"], json!([]));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let only_core = grant(Scope::Modules(vec!["core".into()]));
        let v = body(dashboard.reply(&registry, &only_core).await).await;
        assert!(v["panels"].get("sentry").is_none(), "{v}");
        assert!(v["panels"].get("wireguard").is_some(), "{v}");
        assert_eq!(
            v["hidden"],
            json!(["sentry", "datapath", "dns", "blocklist"])
        );
        assert_eq!(v["token"]["can_write"], true);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "still within the snapshot's age"
        );
    }

    #[test]
    fn every_panel_parameter_list_is_a_json_object() {
        for spec in PANELS {
            for (_, _, params) in spec.parts {
                assert!(serde_json::from_str::<Value>(params).unwrap().is_object());
            }
        }
    }

    #[test]
    fn assets_are_served_with_a_strict_policy() {
        let r = asset("/", None).unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            r.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .contains("script-src 'self'")
        );
        let etag = r.headers()[header::ETAG].clone();
        assert_eq!(
            asset("/dashboard/app.js", Some(&etag)).unwrap().status(),
            StatusCode::NOT_MODIFIED
        );
        assert!(asset("/etc/passwd", None).is_none());
        // No inline script or style: the policy forbids them.
        assert!(!INDEX_HTML.contains("<script>") && !INDEX_HTML.contains("style="));
    }
}

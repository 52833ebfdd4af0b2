//! The reverse proxy on `[sentry] listen`: streams requests and responses between clients
//! and `[sentry] upstream`, asks the sentry about each request first, and serves the
//! challenge endpoints (`/.sentry/jwks.json`, `/.sentry/proof`, the challenge page's files under
//! `/.sentry/static/`, and for browsers without JavaScript `/.sentry/pass` and
//! `/.sentry/challenge`, see `nojs`).

use std::{convert::Infallible, net::IpAddr, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    header::{self, HeaderMap, HeaderName, HeaderValue},
    service::service_fn,
};
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::sentry::Upstream as UpstreamUrl;

use super::{
    Decision, Mode, NoJsOffer, ProofError, Sentry, SentryError, TICKET_COOKIE, Target,
    challenge::{JWKS_PATH, PASS_PATH, PROOF_PATH, Package, Proof, Rejection, SOLVER_PATH},
    nojs, page,
    snapshot::{self, Fetched, Snapshot},
    upstream::Upstream,
};
use crate::http::{self, RequestBody};

pub use super::upstream::{BoxError, ProxyBody};

/// Largest proof body accepted.
pub const MAX_PROOF_BYTES: usize = 16 * 1024;
/// How long a proof body may take to arrive (16 KiB at most: a slow client is still fast
/// enough; a client that stalls holds a connection for nothing).
pub const PROOF_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a proxy thread closes the upstream connections unused past their idle timeout.
const REAP_EVERY: Duration = Duration::from_secs(5);

/// The client address: the TCP peer, or — when the peer is a trusted proxy — the last
/// `X-Forwarded-For` entry (the one that proxy added; earlier entries are client-supplied).
pub fn client_addr(trusted: &[IpAddr], peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
    let peer = super::canonical(peer);
    if !trusted.contains(&peer) {
        return peer;
    }
    forwarded_for
        .and_then(|v| v.rsplit(',').next())
        .and_then(|last| last.trim().parse::<IpAddr>().ok())
        .map_or(peer, super::canonical)
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json_reply(status: StatusCode, v: &serde_json::Value) -> Response<ProxyBody> {
    full(status, "application/json", v.to_string())
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"))
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })
}

/// A refused proof's answer.
fn proof_error(e: ProofError) -> Response<ProxyBody> {
    match e {
        ProofError::Rejected(r) => json_reply(
            StatusCode::from_u16(r.status()).unwrap_or(StatusCode::BAD_REQUEST),
            &json!({"success": false, "reason": r.code(), "error": r.message()}),
        ),
        ProofError::Store(e) => json_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"success": false, "reason": "UNAVAILABLE", "error": e.to_string()}),
        ),
    }
}

/// The 429 answer: the package as JSON, or the challenge page that embeds the same object
/// (in the client's language, under the page's CSP) with `nojs`'s offer for a browser
/// without JavaScript (asked for only when the page is sent).
fn challenge_reply(
    package: &Package,
    json: bool,
    accept_language: Option<&str>,
    nojs: impl FnOnce(page::Language) -> page::NoScript,
) -> Response<ProxyBody> {
    let body = serde_json::to_string(package).unwrap_or_default();
    let mut r = if json {
        full(StatusCode::TOO_MANY_REQUESTS, "application/json", body)
    } else {
        let lang = page::Language::from_accept_language(accept_language);
        html_reply(
            StatusCode::TOO_MANY_REQUESTS,
            page::page(&body, lang, &nojs(lang)),
            lang,
        )
    };
    r.headers_mut().insert(
        header::VARY,
        HeaderValue::from_static("Accept, Accept-Language"),
    );
    r.headers_mut().insert(
        HeaderName::from_static("x-sentry-challenge"),
        HeaderValue::from_static("1"),
    );
    r
}

/// The DOOMSDAY loader (a 429, like the challenge page): the package, the key set and the
/// path's sealed snapshot in one document with its script and style inline, under the
/// loader's own policy; without JavaScript, the command-line solver.
fn loader_reply(
    package: &Package,
    jwks: &serde_json::Value,
    snapshot: Option<&Snapshot>,
    lang: page::Language,
    nojs: &page::NoScript,
) -> Response<ProxyBody> {
    let body = page::loader(
        &serde_json::to_string(package).unwrap_or_default(),
        &jwks.to_string(),
        &snapshot::loader_json(snapshot),
        lang,
        nojs,
    );
    let mut r = html_reply(StatusCode::TOO_MANY_REQUESTS, body, lang);
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(page::loader_csp()) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::VARY,
        HeaderValue::from_static("Accept, Accept-Language"),
    );
    h.insert(
        HeaderName::from_static("x-sentry-challenge"),
        HeaderValue::from_static("1"),
    );
    h.insert(
        HeaderName::from_static("x-sentry-loader"),
        HeaderValue::from_static("1"),
    );
    r
}

/// Whether a request is a navigation that takes HTML (a snapshot is made only for those: a
/// browser's own requests for icons and the like never cause an upstream fetch).
fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

/// A page of the sentry's own (the challenge page, the pages without JavaScript): under the
/// page's CSP, in `lang`, never cached.
fn html_reply(status: StatusCode, body: String, lang: page::Language) -> Response<ProxyBody> {
    let mut r = full(status, "text/html; charset=utf-8", body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(page::CSP),
    );
    h.insert(
        header::CONTENT_LANGUAGE,
        HeaderValue::from_static(lang.tag()),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// The pass endpoint's answer as HTTP.
fn pass_reply(reply: nojs::Reply, lang: page::Language) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = html_reply(status, reply.body, lang);
    let h = r.headers_mut();
    if let Some(v) = reply.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        h.insert(header::LOCATION, v);
    }
    if let Some(v) = reply
        .set_cookie
        .and_then(|c| HeaderValue::from_str(&c).ok())
    {
        h.insert(header::SET_COOKIE, v);
    }
    if let Some(s) = reply.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

/// A file of the challenge page (`/.sentry/static/<version>/<name>`): cached for a year when
/// the path names this build's version, revalidated by ETag otherwise.
fn static_reply(path: &str, if_none_match: Option<&HeaderValue>) -> Response<ProxyBody> {
    let Some(asset) = page::asset(path) else {
        return full(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n",
        );
    };
    let etag = HeaderValue::from_str(&format!("\"{}\"", page::version()))
        .unwrap_or(HeaderValue::from_static("\"0\""));
    let mut r = if if_none_match.is_some_and(|v| v == etag) {
        let mut r = full(StatusCode::NOT_MODIFIED, asset.content_type, Bytes::new());
        r.headers_mut().remove(header::CONTENT_TYPE);
        r
    } else {
        full(StatusCode::OK, asset.content_type, asset.body)
    };
    let h = r.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if asset.current {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        }),
    );
    h.insert(header::ETAG, etag);
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The worker runs under its own script's policy.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(page::CSP),
    );
    r
}

/// Names made once, not parsed from text on every request.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP.iter() {
        headers.remove(h);
    }
}

/// What every request of one connection shares, worked out once when it is accepted: the TCP
/// peer, whether it is a trusted proxy, and the `X-Forwarded-For` value a request that brings
/// none gets (the peer's address as text).
pub struct Peer {
    addr: SocketAddr,
    via_trusted: bool,
    forwarded_for: Option<HeaderValue>,
}

impl Peer {
    pub fn new(addr: SocketAddr, trusted: &[IpAddr]) -> Self {
        let ip = super::canonical(addr.ip());
        Self {
            addr,
            via_trusted: trusted.contains(&ip),
            forwarded_for: HeaderValue::from_str(&ip.to_string()).ok(),
        }
    }
}

pub struct Proxy {
    sentry: Arc<Sentry>,
    /// This thread's connections to the upstream.
    upstream: Upstream,
    /// `[sentry] upstream_timeout_seconds`: for the answer's head, and between its pieces.
    upstream_timeout: Duration,
    /// The listener speaks TLS: the ticket cookie is `Secure`, the upstream is told `https`.
    tls: bool,
}

impl Proxy {
    pub fn new(sentry: Arc<Sentry>) -> Result<Self, SentryError> {
        let upstream = UpstreamUrl::parse(&sentry.static_config.upstream)
            .map_err(|e| SentryError::Config(e.0))?;
        let upstream = Upstream::new(upstream.authority);
        let upstream_timeout = Duration::from_secs(sentry.static_config.upstream_timeout_seconds);
        let tls = sentry.listener_tls.get().is_some();
        Ok(Self {
            sentry,
            upstream,
            upstream_timeout,
            tls,
        })
    }

    /// One request, start to end. The HTTP layer has already refused a declared body over
    /// `max_body_bytes` (413) and cuts a streamed one off there.
    pub async fn handle(&self, req: Request<RequestBody>, peer: &Peer) -> Response<ProxyBody> {
        let xff = req
            .headers()
            .get(&X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok());
        let client = self.sentry.client_addr(peer.addr, xff);
        let path = req.uri().path();
        if path == JWKS_PATH && req.method() == Method::GET {
            return json_reply(StatusCode::OK, &self.sentry.signer.jwks());
        }
        if path == PROOF_PATH {
            return self.proof(req, client).await;
        }
        if path == PASS_PATH {
            return self.pass(req, client).await;
        }
        if path == SOLVER_PATH && matches!(*req.method(), Method::GET | Method::HEAD) {
            return self.solver_package(client).await;
        }
        if path.starts_with(page::STATIC_PREFIX)
            && matches!(*req.method(), Method::GET | Method::HEAD)
        {
            return static_reply(path, req.headers().get(header::IF_NONE_MATCH));
        }
        let cookie = cookie(req.headers(), TICKET_COOKIE);
        let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let user_agent = req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok());
        // DOOMSDAY: a browser gets the loader, whose package carries the page's snapshot key
        // (the snapshot is looked up, and fetched at most once per refresh period, first).
        let loader =
            self.sentry.mode_state().current_mode == Mode::Doomsday && !wants_json(req.headers());
        let (snapshot, content) = if loader {
            let snapshot = if req.method() == Method::GET
                && wants_html(req.headers())
                && !self.sentry.known_to_pass(client)
                && super::same_origin_target(path_and_query) == path_and_query
            {
                let host = req.headers().get(header::HOST).cloned();
                self.sentry
                    .snapshots
                    .get(path_and_query, || self.fetch_snapshot(path_and_query, host))
                    .await
            } else {
                None
            };
            let content = snapshot::loader_content(path_and_query, snapshot.as_deref());
            (snapshot, Some(content))
        } else {
            (None, None)
        };
        let target = Target {
            path: path_and_query,
            doomsday: content.as_deref(),
        };
        match self
            .sentry
            .decide_target(client, cookie.as_deref(), target, user_agent)
            .await
        {
            Decision::Pass(_) => self.forward(req, client, peer).await,
            Decision::Challenge(package) if loader => {
                let headers = req.headers();
                let lang = page::Language::from_accept_language(
                    headers
                        .get(header::ACCEPT_LANGUAGE)
                        .and_then(|v| v.to_str().ok()),
                );
                let origin = nojs::origin(
                    self.scheme(),
                    headers.get(header::HOST).and_then(|v| v.to_str().ok()),
                    &self.sentry.static_config.listen,
                );
                let nojs = nojs::noscript(&NoJsOffer::Command, lang, &origin, path_and_query);
                loader_reply(
                    &package,
                    &self.sentry.signer.jwks(),
                    snapshot.as_deref(),
                    lang,
                    &nojs,
                )
            }
            Decision::Challenge(package) => {
                let headers = req.headers();
                challenge_reply(
                    &package,
                    wants_json(headers),
                    headers
                        .get(header::ACCEPT_LANGUAGE)
                        .and_then(|v| v.to_str().ok()),
                    |lang| {
                        let origin = nojs::origin(
                            self.scheme(),
                            headers.get(header::HOST).and_then(|v| v.to_str().ok()),
                            &self.sentry.static_config.listen,
                        );
                        let offer = self.sentry.nojs_offer(client, path_and_query);
                        nojs::noscript(&offer, lang, &origin, path_and_query)
                    },
                )
            }
            Decision::Blocked => full(
                StatusCode::FORBIDDEN,
                "text/plain; charset=utf-8",
                "blocked: too many unanswered challenges\n",
            ),
            Decision::Unavailable => full(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                "temporarily unavailable\n",
            ),
        }
    }

    async fn proof(&self, req: Request<RequestBody>, client: IpAddr) -> Response<ProxyBody> {
        let reject = |r: Rejection, detail: &str| {
            json_reply(
                StatusCode::from_u16(r.status()).unwrap_or(StatusCode::BAD_REQUEST),
                &json!({"success": false, "reason": r.code(), "error": detail}),
            )
        };
        if req.method() != Method::POST {
            let mut r = reject(Rejection::Malformed, "the proof endpoint takes POST");
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            return r;
        }
        // A source that is blocked or failed too many proofs is answered before its body is
        // read or anything is verified.
        if let Err(e) = self.sentry.proof_gate(client).await {
            return proof_error(e);
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_PROOF_BYTES as u64) {
            self.sentry.proof_failed(client, Rejection::Malformed).await;
            let mut r = reject(Rejection::Malformed, "proof body over 16 KiB");
            *r.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
            return r;
        }
        let read = tokio::time::timeout(
            PROOF_BODY_TIMEOUT,
            Limited::new(req.into_body(), MAX_PROOF_BYTES).collect(),
        )
        .await;
        let body = match read {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(_)) => {
                self.sentry.proof_failed(client, Rejection::Malformed).await;
                let mut r = reject(Rejection::Malformed, "proof body over 16 KiB or cut short");
                *r.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
                return r;
            }
            Err(_) => {
                self.sentry.proof_failed(client, Rejection::Malformed).await;
                let mut r = reject(
                    Rejection::Malformed,
                    "the proof body did not arrive within 10 s",
                );
                *r.status_mut() = StatusCode::REQUEST_TIMEOUT;
                return r;
            }
        };
        let proof: Proof = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => {
                self.sentry.proof_failed(client, Rejection::Malformed).await;
                return reject(
                    Rejection::Malformed,
                    &format!("{}: {e}", Rejection::Malformed.message()),
                );
            }
        };
        match self.sentry.redeem(client, &proof).await {
            Ok(grant) => {
                let mut r = json_reply(
                    StatusCode::OK,
                    &json!({"success": true, "ticket_expires_at": grant.expires_at}),
                );
                if let Ok(v) = HeaderValue::from_str(&grant.set_cookie(self.tls)) {
                    r.headers_mut().insert(header::SET_COOKIE, v);
                }
                r
            }
            Err(e) => proof_error(e),
        }
    }

    /// `/.sentry/pass` (a browser without JavaScript): a delay token in the query (the page's
    /// refresh) or a form (POST, at most 16 KiB, within 10 s), redeemed for the ticket cookie
    /// and a 303 to the challenged URL; refusals are pages that say why.
    async fn pass(&self, req: Request<RequestBody>, client: IpAddr) -> Response<ProxyBody> {
        let lang = page::Language::from_accept_language(
            req.headers()
                .get(header::ACCEPT_LANGUAGE)
                .and_then(|v| v.to_str().ok()),
        );
        if let Err(e) = self.sentry.proof_gate(client).await {
            return pass_reply(nojs::refusal_page(lang, e), lang);
        }
        let fields = match *req.method() {
            Method::GET => nojs::form(req.uri().query().unwrap_or("").as_bytes()),
            Method::POST => {
                let declared = req
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                if declared.is_some_and(|n| n > MAX_PROOF_BYTES as u64) {
                    self.sentry.proof_failed(client, Rejection::Malformed).await;
                    return pass_reply(nojs::body_refused(lang, 413), lang);
                }
                let read = tokio::time::timeout(
                    PROOF_BODY_TIMEOUT,
                    Limited::new(req.into_body(), MAX_PROOF_BYTES).collect(),
                )
                .await;
                match read {
                    Ok(Ok(b)) => nojs::form(&b.to_bytes()),
                    Ok(Err(_)) => {
                        self.sentry.proof_failed(client, Rejection::Malformed).await;
                        return pass_reply(nojs::body_refused(lang, 413), lang);
                    }
                    Err(_) => {
                        self.sentry.proof_failed(client, Rejection::Malformed).await;
                        return pass_reply(nojs::body_refused(lang, 408), lang);
                    }
                }
            }
            _ => {
                let mut r = pass_reply(nojs::body_refused(lang, 405), lang);
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
                return r;
            }
        };
        pass_reply(
            nojs::pass(&self.sentry, client, &fields, lang, self.tls).await,
            lang,
        )
    }

    /// `/.sentry/challenge`: a package for the command-line solver, always JSON.
    async fn solver_package(&self, client: IpAddr) -> Response<ProxyBody> {
        match self.sentry.solver_challenge(client).await {
            Decision::Challenge(package) => {
                let mut r = json_reply(StatusCode::OK, &json!(*package));
                r.headers_mut().insert(
                    HeaderName::from_static("x-sentry-challenge"),
                    HeaderValue::from_static("1"),
                );
                r
            }
            Decision::Blocked => full(
                StatusCode::FORBIDDEN,
                "text/plain; charset=utf-8",
                "blocked: too many unanswered challenges\n",
            ),
            Decision::Pass(_) | Decision::Unavailable => full(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                "temporarily unavailable\n",
            ),
        }
    }

    /// A snapshot of `path_and_query` for the DOOMSDAY loader: one GET to the upstream by the
    /// sentry itself (`X-Sentry-Snapshot: 1`, the client's `Host`, no cookie, no client
    /// address), kept when it answers 200 with `text/html` or `text/plain` of at most
    /// `snapshot_max_bytes`.
    async fn fetch_snapshot(&self, path_and_query: &str, host: Option<HeaderValue>) -> Fetched {
        // Origin form; the upstream connection knows where it goes.
        let Ok(uri) = hyper::Uri::try_from(path_and_query) else {
            return Fetched::NotAPage;
        };
        let mut req = Request::new(
            Full::new(Bytes::new())
                .map_err(|never: Infallible| match never {})
                .boxed(),
        );
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/html, text/plain;q=0.9"),
        );
        h.insert(
            HeaderName::from_static("x-sentry-snapshot"),
            HeaderValue::from_static("1"),
        );
        // The page is for visitors on this listener's scheme (absolute links the site makes).
        h.insert("x-forwarded-proto", HeaderValue::from_static(self.scheme()));
        if let Some(host) = host {
            h.insert(header::HOST, host);
        }
        let answer =
            match tokio::time::timeout(self.upstream_timeout, self.upstream.send(req)).await {
                Ok(Ok(a)) => a,
                _ => return Fetched::Failed,
            };
        let kind = answer
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_ascii_lowercase());
        let html = match kind.as_deref() {
            Some(k) if k.starts_with("text/html") => true,
            Some(k) if k.starts_with("text/plain") => false,
            _ => return Fetched::NotAPage,
        };
        if answer.status() != StatusCode::OK {
            return Fetched::NotAPage;
        }
        let limit = self.sentry.snapshots.max_bytes;
        match tokio::time::timeout(
            self.upstream_timeout,
            Limited::new(answer.into_body(), limit).collect(),
        )
        .await
        {
            Ok(Ok(body)) => Fetched::Page {
                html,
                body: body.to_bytes().to_vec(),
            },
            // Over the limit, or cut short.
            Ok(Err(_)) => Fetched::NotAPage,
            Err(_) => Fetched::Failed,
        }
    }

    /// The scheme clients reach this listener with (the command the page shows names it).
    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    async fn forward(
        &self,
        req: Request<RequestBody>,
        client: IpAddr,
        peer: &Peer,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
        // Origin form (`/path?query`), whatever form the client used.
        parts.uri = hyper::Uri::from(path_and_query);
        parts.version = hyper::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        // Our hop: append the address we saw (a trusted proxy's own entries stay before it).
        let xff = match parts
            .headers
            .get(&X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => HeaderValue::from_str(&format!("{prev}, {client}")).ok(),
            // Without the header the client is the peer: its address, as text since the
            // connection was accepted.
            None => peer.forwarded_for.clone(),
        };
        if let Some(v) = xff {
            parts.headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        // What the client spoke to us; a trusted proxy in front has said it already.
        if !peer.via_trusted || !parts.headers.contains_key(&X_FORWARDED_PROTO) {
            parts.headers.insert(
                X_FORWARDED_PROTO.clone(),
                HeaderValue::from_static(if self.tls { "https" } else { "http" }),
            );
        }
        let body: ProxyBody = body.boxed();
        let upstream_req = Request::from_parts(parts, body);
        match tokio::time::timeout(self.upstream_timeout, self.upstream.send(upstream_req)).await {
            Ok(Ok(resp)) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                // An upstream that stops sending mid-answer is cut off after the same wait.
                let body = super::upstream::StallTimeoutBody::new(self.upstream_timeout, body);
                Response::from_parts(parts, body.boxed())
            }
            Err(_) => {
                self.sentry
                    .counters
                    .upstream_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                full(
                    StatusCode::GATEWAY_TIMEOUT,
                    "text/plain; charset=utf-8",
                    "upstream timed out\n",
                )
            }
            Ok(Err(e)) => {
                self.sentry
                    .counters
                    .upstream_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                debug!(error = %e, "upstream request failed");
                full(
                    StatusCode::BAD_GATEWAY,
                    "text/plain; charset=utf-8",
                    "upstream unavailable\n",
                )
            }
        }
    }
}

/// Serves the proxy on `addr` until `shutdown` turns true, on one thread per CPU. Each thread
/// is a single-threaded runtime with its own listening socket (SO_REUSEPORT: the kernel
/// spreads new connections over them) and its own upstream connection pool, so a request, the
/// sentry's decision and the upstream exchange all run on one thread: no hand-off between
/// threads on the hot path (one pool shared by the threads of a multi-threaded runtime cost
/// 22% of the requests per second against a static upstream; docs/benchmarks.md). Every
/// thread serves through the HTTP layer with the sentry's limits and one shared gate, so the
/// connection caps hold for the port as a whole (`trusted_proxies` are spared the per-source
/// cap). The handle ends when every thread has stopped.
pub async fn serve(
    addr: SocketAddr,
    sentry: Arc<Sentry>,
    shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, SentryError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SO_REUSEPORT would let another process of the same user join a port already in use
    // without a word; a plain bind first keeps "address in use" an error, as it is for every
    // other listener.
    drop(
        std::net::TcpListener::bind(addr)
            .map_err(|e| SentryError::Io(format!("cannot listen on {addr}: {e}")))?,
    );
    // Bind every socket before starting anything (port 0: the others follow the first).
    let first = reuseport_listener(addr)?;
    let addr = first
        .local_addr()
        .map_err(|e| SentryError::Io(format!("cannot listen on {addr}: {e}")))?;
    let mut listeners = vec![first];
    for _ in 1..threads {
        listeners.push(reuseport_listener(addr)?);
    }
    let proxies = (0..threads)
        .map(|_| Proxy::new(Arc::clone(&sentry)))
        .collect::<Result<Vec<_>, _>>()?;
    let server = http::Server::with_exempt(
        "sentry",
        http::Limits::sentry_proxy(sentry.static_config.max_body_bytes)
            .with_source_prefix(sentry.source_prefix()),
        sentry.trusted_proxies.clone(),
    );
    let tls = sentry
        .listener_tls
        .get()
        .map(|t| Arc::clone(&t.server_config));
    if let Some(p) = proxies.first() {
        info!(
            %addr,
            upstream = %p.upstream.authority(),
            threads,
            tls = sentry.static_config.tls.as_str(),
            "sentry proxy listening"
        );
    }
    let mut stopped = Vec::with_capacity(threads);
    for (i, (listener, proxy)) in listeners.into_iter().zip(proxies).enumerate() {
        let (shutdown, server, tls) = (shutdown.clone(), server.clone(), tls.clone());
        let share = sentry.shared_port.get().cloned();
        let (done, stopped_rx) = tokio::sync::oneshot::channel::<()>();
        stopped.push(stopped_rx);
        std::thread::Builder::new()
            .name(format!("sentry-proxy-{i}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(error = %e, "sentry proxy thread cannot start a runtime");
                        return;
                    }
                };
                runtime.block_on(accept_loop(
                    listener,
                    Arc::new(proxy),
                    server,
                    tls,
                    share,
                    shutdown,
                ));
                let _ = done.send(());
            })
            .map_err(|e| SentryError::Io(format!("cannot start a sentry proxy thread: {e}")))?;
    }
    // A task, not a blocking join: the caller's runtime may be dropped without waiting on it.
    Ok(tokio::spawn(async move {
        for rx in stopped {
            let _ = rx.await;
        }
    }))
}

fn reuseport_listener(addr: SocketAddr) -> Result<std::net::TcpListener, SentryError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let fail = |e: std::io::Error| SentryError::Io(format!("cannot listen on {addr}: {e}"));
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    socket.set_reuse_port(true).map_err(fail)?;
    socket.set_nonblocking(true).map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    socket.listen(1024).map_err(fail)?;
    Ok(socket.into())
}

/// One thread's share of the port: the HTTP layer on this thread's socket, every request to
/// this thread's proxy.
async fn accept_loop(
    listener: std::net::TcpListener,
    proxy: Arc<Proxy>,
    server: http::Server,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    share: Option<Arc<http::SharedPort>>,
    shutdown: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "sentry proxy cannot use its socket");
            return;
        }
    };
    // This thread's own store connection (Redis): a request's ticket lookup then stays on the
    // thread that serves it. Without one, the shared connection serves (slower, same answers).
    let _lane = proxy.sentry.store.attach_thread().unwrap_or_else(|e| {
        warn!(error = %e, "sentry proxy thread runs without a store connection of its own");
        None
    });
    // Unused upstream connections are closed after their idle timeout even when no request
    // comes to take one.
    let reaper = {
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REAP_EVERY).await;
                proxy.upstream.reap();
            }
        })
    };
    let service = move |addr| {
        let proxy = Arc::clone(&proxy);
        let peer = Arc::new(Peer::new(addr, &proxy.sentry.trusted_proxies));
        service_fn(move |req| {
            let (proxy, peer) = (Arc::clone(&proxy), Arc::clone(&peer));
            async move { Ok::<_, Infallible>(proxy.handle(req, &peer).await) }
        })
    };
    match (tls, share) {
        (Some(config), Some(share)) => {
            server
                .serve_tls_shared(listener, shutdown, config, share, service)
                .await
        }
        (Some(config), None) => server.serve_tls(listener, shutdown, config, service).await,
        (None, _) => server.serve(listener, shutdown, service).await,
    }
    reaper.abort();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn forwarded_for_only_from_a_trusted_hop() {
        let trusted: Vec<IpAddr> = vec!["192.0.2.10".parse().unwrap()];
        let peer: IpAddr = "192.0.2.10".parse().unwrap();
        let other: IpAddr = "192.0.2.11".parse().unwrap();
        let xff = Some("203.0.113.66, 198.51.100.5");
        assert_eq!(
            client_addr(&trusted, peer, xff),
            "198.51.100.5".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_addr(&trusted, other, xff), other);
        assert_eq!(client_addr(&trusted, peer, Some("garbage")), peer);
        assert_eq!(client_addr(&trusted, peer, None), peer);
    }

    #[test]
    fn page_files_are_cached_for_good_and_revalidated_by_etag() {
        let v = page::version();
        let r = static_reply(&format!("/.sentry/static/{v}/challenge.js"), None);
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers();
        assert_eq!(
            h[header::CACHE_CONTROL],
            "public, max-age=31536000, immutable"
        );
        assert_eq!(h[header::CONTENT_TYPE], "text/javascript; charset=utf-8");
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        let etag = h[header::ETAG].clone();
        let again = static_reply(&format!("/.sentry/static/{v}/challenge.js"), Some(&etag));
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        // Another build's page gets this build's file, revalidated each time.
        let other = static_reply("/.sentry/static/0123456789abcdef/worker.js", None);
        assert_eq!(other.status(), StatusCode::OK);
        assert_eq!(other.headers()[header::CACHE_CONTROL], "no-cache");
        let missing = static_reply(&format!("/.sentry/static/{v}/nope.js"), None);
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_html_challenge_carries_its_csp_and_language() {
        let signer = crate::sentry::challenge::Signer::generate().unwrap();
        let pkg = signer
            .issue("198.51.100.7".parse().unwrap(), 4, 60, b"x", 1_000)
            .unwrap();
        let r = challenge_reply(&pkg, false, Some("tr,en;q=0.5"), |_| {
            page::NoScript::default()
        });
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        let h = r.headers();
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], page::CSP);
        assert!(!page::CSP.contains("blob:") && !page::CSP.contains("unsafe"));
        assert_eq!(h[header::CONTENT_LANGUAGE], "tr");
        assert_eq!(h["x-sentry-challenge"], "1");
        let json = challenge_reply(&pkg, true, None, |_| unreachable!("JSON has no page"));
        assert_eq!(json.headers()[header::CONTENT_TYPE], "application/json");
        assert!(
            json.headers()
                .get(header::CONTENT_SECURITY_POLICY)
                .is_none()
        );
    }
}

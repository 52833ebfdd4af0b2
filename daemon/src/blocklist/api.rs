//! The public, read-only blocklist API of seed 001 (`[blocklist] api_listen`): the list with
//! delta sync, the patterns, domain verification, health. No request is logged and no client
//! address is kept: the rate limiter keys on a salted hash of the client's source (its IPv4
//! address or its IPv6 prefix, `[sources] ipv6_prefix`) that it forgets within a minute.
//!
//! The full list is the expensive answer, so it is made once per list version and encoding:
//! the first request for it writes the JSON straight from the list's table (gzip-compressed
//! when the client accepts gzip, as it is) into shared 1 MiB chunks, every later request for
//! that version sends the same chunks, and a new version drops them. At most
//! [`FULL_LIST_SLOTS`] full lists are on their way to clients at once; a request that finds
//! no slot within [`FULL_LIST_WAIT`] gets `503` with `Retry-After`. Deltas are computed per
//! request and serialised straight from the changed entries.
//!
//! `/api/v1/blocklist.minisig` is the minisign signature, by this host's publisher key
//! ([`super::publisher`]), of the current version's full list as JSON (the identity bytes; a
//! gzip transfer decompresses to them). It is made once per version from the shared gzip body
//! (decompressed as it is signed, so no identity copy is kept for it), so
//! another host can sync this list over plain `http://` with `minisign_key` pinned.

use std::{
    collections::HashMap,
    convert::Infallible,
    io::Write,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Body as AxumBody,
    extract::{ConnectInfo, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::Bytes;
use flate2::{Compression, write::GzEncoder};
use hyper::body::{Body, Frame, SizeHint};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{debug, info, warn};

use super::{
    Blocklist, BlocklistError, CanonicalEntry, DeltaSince,
    model::{Pattern, normalise},
};
use crate::{error::Error, http, source::SourcePrefix};

/// Requests per client per minute; health checks are not counted.
const PER_CLIENT_PER_MINUTE: u32 = 120;

/// Full lists on their way to clients at once. The body is shared, so a transfer costs no
/// heap of its own; what this bounds is the kernel's send buffers (up to a few MB per
/// connection) and the copying.
pub const FULL_LIST_SLOTS: usize = 64;
/// Full lists on their way to one source at once (an IPv4 address or an IPv6 prefix): a few
/// slow readers must not hold every slot for the response timeout.
pub const FULL_LIST_SLOTS_PER_SOURCE: usize = 4;
/// How long a full-list request waits for a slot before it is answered `503`.
pub const FULL_LIST_WAIT: Duration = Duration::from_secs(10);
/// The `Retry-After` of that `503`, in seconds.
const FULL_LIST_RETRY_AFTER: u64 = 30;
/// The `Retry-After` (and the body's `retryAfter`) of a `500`, in seconds: the seed's.
const INTERNAL_RETRY_AFTER: u64 = 60;
/// The size of the shared chunks a full list is kept and sent in.
const CHUNK: usize = 1 << 20;

/// Token buckets keyed by a salted hash of the client's source.
struct RateLimiter {
    salt: [u8; 16],
    prefix: SourcePrefix,
    buckets: Mutex<HashMap<u64, (Instant, u32)>>,
}

impl RateLimiter {
    fn new(prefix: SourcePrefix) -> Self {
        let mut salt = [0u8; 16];
        let _ = getrandom_salt(&mut salt);
        Self {
            salt,
            prefix,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The key of `ip`'s source: an IPv4 address, or the IPv6 prefix it belongs to.
    fn key(&self, ip: IpAddr) -> u64 {
        let mut h = Sha256::new();
        h.update(self.salt);
        match self.prefix.of(ip) {
            IpAddr::V4(v4) => h.update(v4.octets()),
            IpAddr::V6(v6) => h.update(v6.octets()),
        }
        let digest = h.finalize();
        let mut key = [0u8; 8];
        key.copy_from_slice(&digest[..8]);
        u64::from_ne_bytes(key)
    }

    fn allow(&self, addr: &SocketAddr) -> bool {
        let key = self.key(addr.ip());
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

/// How a full list is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
}

impl Encoding {
    fn index(self) -> usize {
        match self {
            Encoding::Identity => 0,
            Encoding::Gzip => 1,
        }
    }

    /// Gzip when `Accept-Encoding` accepts it (`gzip`, `x-gzip` or `*` with a non-zero
    /// quality, gzip not refused by name), identity otherwise.
    fn accepted(headers: &HeaderMap) -> Self {
        let mut named = None;
        let mut any = false;
        for value in headers.get_all(header::ACCEPT_ENCODING) {
            let Ok(value) = value.to_str() else {
                continue;
            };
            for item in value.split(',') {
                let mut parts = item.split(';');
                let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
                let quality = parts
                    .filter_map(|p| p.trim().strip_prefix("q="))
                    .filter_map(|q| q.trim().parse::<f32>().ok())
                    .next()
                    .unwrap_or(1.0);
                match coding.as_str() {
                    "gzip" | "x-gzip" => named = Some(named.unwrap_or(false) || quality > 0.0),
                    "*" => any = quality > 0.0,
                    _ => {}
                }
            }
        }
        if named.unwrap_or(any) {
            Encoding::Gzip
        } else {
            Encoding::Identity
        }
    }
}

/// One version of the full list in one encoding: the bytes, in shared chunks.
struct Built {
    version: u64,
    chunks: Arc<[Bytes]>,
    len: u64,
}

/// The full list's bodies (one per encoding, each made on first demand) and the slots for
/// sending them.
struct FullLists {
    bodies: [tokio::sync::Mutex<Option<Arc<Built>>>; 2],
    /// The publisher's signature of one version's full list (its JSON bytes).
    signature: tokio::sync::Mutex<Option<(u64, Arc<str>)>>,
    slots: Arc<Semaphore>,
    /// Transfers in progress per source key (the rate limiter's salted key).
    per_source: Arc<Mutex<HashMap<u64, usize>>>,
    wait: Duration,
}

/// One source's share of the transfers, given back when the transfer ends.
struct SourceSlot {
    taken: Arc<Mutex<HashMap<u64, usize>>>,
    key: u64,
}

impl SourceSlot {
    /// A slot for `key`, unless it already has [`FULL_LIST_SLOTS_PER_SOURCE`].
    fn take(taken: &Arc<Mutex<HashMap<u64, usize>>>, key: u64) -> Option<Self> {
        let mut map = taken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(key).or_insert(0);
        if *n >= FULL_LIST_SLOTS_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(Self {
            taken: Arc::clone(taken),
            key,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = self
            .taken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl FullLists {
    fn new(slots: usize, wait: Duration) -> Self {
        Self {
            bodies: [tokio::sync::Mutex::new(None), tokio::sync::Mutex::new(None)],
            signature: tokio::sync::Mutex::new(None),
            slots: Arc::new(Semaphore::new(slots)),
            per_source: Arc::new(Mutex::new(HashMap::new())),
            wait,
        }
    }

    /// The body of the current version in `encoding`, made now if it is not there yet. One
    /// request makes it; concurrent ones for the same encoding wait for it.
    async fn body(&self, list: &Arc<Blocklist>, encoding: Encoding) -> Result<Arc<Built>, ()> {
        let mut slot = self.bodies[encoding.index()].lock().await;
        if let Some(built) = &*slot
            && built.version == list.version()
        {
            return Ok(Arc::clone(built));
        }
        // The old version goes before the new one is made, so two never sit side by side.
        if slot.take().is_some() {
            super::release_free_memory();
        }
        let list = Arc::clone(list);
        let made = tokio::task::spawn_blocking(move || {
            let built = build(&list, encoding);
            // What writing it took (the encoder's state, buffers) goes back to the system.
            super::release_free_memory();
            built
        });
        let built = match made.await {
            Ok(Ok(built)) => Arc::new(built),
            Ok(Err(e)) => {
                warn!(error = %e, "cannot write the full blocklist");
                return Err(());
            }
            Err(_) => return Err(()),
        };
        debug!(
            version = built.version,
            bytes = built.len,
            ?encoding,
            "full blocklist body made"
        );
        *slot = Some(Arc::clone(&built));
        Ok(built)
    }

    /// The publisher's signature of the current version's full list, with that version. The
    /// first request of a version signs the shared body's JSON (the gzip body, made now if
    /// need be, read through a decoder); concurrent ones wait for it.
    async fn signature(&self, list: &Arc<Blocklist>) -> Result<(u64, Arc<str>), ()> {
        let mut slot = self.signature.lock().await;
        if let Some((version, text)) = &*slot
            && *version == list.version()
        {
            return Ok((*version, Arc::clone(text)));
        }
        // The gzip body, decompressed as it is read: the signed bytes are the identity
        // body's without keeping a 280 MB copy of a million-name list for it.
        let built = self.body(list, Encoding::Gzip).await?;
        let signer = Arc::clone(list);
        let version = built.version;
        let signed = tokio::task::spawn_blocking(move || {
            let identity = flate2::read::GzDecoder::new(ChunkReader::new(&built.chunks));
            signer.publisher.sign(identity, built.version)
        })
        .await;
        let text: Arc<str> = match signed {
            Ok(Ok(text)) => text.into(),
            Ok(Err(e)) => {
                warn!(error = %e, "cannot sign the full blocklist");
                return Err(());
            }
            Err(_) => return Err(()),
        };
        *slot = Some((version, Arc::clone(&text)));
        Ok((version, text))
    }

    /// Drops the bodies of versions before `version` (they are freed once the transfers still
    /// sending them end).
    async fn drop_older(&self, version: u64) {
        {
            let mut signature = self.signature.lock().await;
            if signature.as_ref().is_some_and(|(v, _)| *v < version) {
                *signature = None;
            }
        }
        let mut dropped = false;
        for body in &self.bodies {
            let mut slot = body.lock().await;
            if slot.as_ref().is_some_and(|b| b.version < version) {
                *slot = None;
                dropped = true;
            }
        }
        if dropped {
            let _ = tokio::task::spawn_blocking(super::release_free_memory).await;
        }
    }
}

/// A `Write` into chunks of [`CHUNK`] bytes, each allocated once at its full size (no
/// doubling and copying as a growing vector would).
#[derive(Default)]
struct ChunkWriter {
    done: Vec<Bytes>,
    current: Vec<u8>,
    len: u64,
}

impl Write for ChunkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            if self.current.capacity() == 0 {
                self.current.reserve_exact(CHUNK);
            }
            let room = CHUNK - self.current.len();
            let n = room.min(rest.len());
            self.current.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if self.current.len() == CHUNK {
                self.done
                    .push(Bytes::from(std::mem::take(&mut self.current)));
            }
        }
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChunkWriter {
    fn finish(mut self) -> (Arc<[Bytes]>, u64) {
        if !self.current.is_empty() {
            self.current.shrink_to_fit();
            self.done.push(Bytes::from(self.current));
        }
        (self.done.into(), self.len)
    }
}

/// Reads a body's shared chunks in order, for signing.
struct ChunkReader<'a> {
    chunks: &'a [Bytes],
    next: usize,
    offset: usize,
}

impl<'a> ChunkReader<'a> {
    fn new(chunks: &'a [Bytes]) -> Self {
        Self {
            chunks,
            next: 0,
            offset: 0,
        }
    }
}

impl std::io::Read for ChunkReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while let Some(chunk) = self.chunks.get(self.next) {
            let rest = &chunk[self.offset..];
            if rest.is_empty() {
                self.next += 1;
                self.offset = 0;
                continue;
            }
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            self.offset += n;
            return Ok(n);
        }
        Ok(0)
    }
}

/// The full list's reply. Keys in sorted order: the bytes are those of the `serde_json`
/// map this reply was first built as.
#[derive(Serialize)]
struct FullReply<'a, E: Serialize> {
    checksum: &'a str,
    delta: bool,
    entries: E,
    #[serde(rename = "lastUpdated")]
    last_updated: u64,
    patterns: &'a [Pattern],
    removed: &'a [String],
    success: bool,
    version: u64,
}

/// Entries as canonical JSON (sorted keys), from a delta's owned entries.
struct CanonicalEntries<'a>(&'a [super::model::Entry]);

impl Serialize for CanonicalEntries<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(CanonicalEntry::from))
    }
}

/// Writes the current version of the full list in `encoding`.
fn build(list: &Blocklist, encoding: Encoding) -> std::io::Result<Built> {
    let full = list.full_list();
    let reply = FullReply {
        checksum: full.checksum(),
        delta: false,
        entries: full.entries(),
        last_updated: last_updated(full.version()),
        patterns: full.patterns(),
        removed: &[],
        success: true,
        version: full.version(),
    };
    let out = match encoding {
        Encoding::Identity => {
            let mut out = ChunkWriter::default();
            serde_json::to_writer(&mut out, &reply)?;
            out
        }
        Encoding::Gzip => {
            let mut gz = GzEncoder::new(ChunkWriter::default(), Compression::default());
            {
                // serde_json writes in small pieces; the encoder takes them in larger ones.
                let mut buffered = std::io::BufWriter::with_capacity(64 * 1024, &mut gz);
                serde_json::to_writer(&mut buffered, &reply)?;
                buffered.flush()?;
            }
            gz.finish()?
        }
    };
    let version = full.version();
    drop(full);
    let (chunks, len) = out.finish();
    Ok(Built {
        version,
        chunks,
        len,
    })
}

/// A full list on its way to one client: the shared chunks, and the slot the transfer holds
/// until it ends (or the connection does).
struct FullListBody {
    chunks: Arc<[Bytes]>,
    next: usize,
    remaining: u64,
    _slot: OwnedSemaphorePermit,
    _source_slot: SourceSlot,
}

impl Body for FullListBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let Some(chunk) = this.chunks.get(this.next) else {
            return Poll::Ready(None);
        };
        this.next += 1;
        this.remaining = this.remaining.saturating_sub(chunk.len() as u64);
        Poll::Ready(Some(Ok(Frame::data(chunk.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.chunks.len()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[derive(Clone)]
struct ApiState {
    list: Arc<Blocklist>,
    limiter: Arc<RateLimiter>,
    full: Arc<FullLists>,
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

/// A `500`: the seed's body, `{success: false, error, retryAfter}`, and `Retry-After`.
fn internal_error() -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [(header::RETRY_AFTER, INTERNAL_RETRY_AFTER.to_string())],
        Json(json!({
            "success": false, "error": "internal error", "retryAfter": INTERNAL_RETRY_AFTER,
        })),
    )
        .into_response()
}

/// `lastUpdated`: the Unix second of the version's change, as `addedAt` counts. A version is
/// the change's time in milliseconds, or one more than the version before when the clock has
/// not moved past it (so a version stays unique and ordered).
fn last_updated(version: u64) -> u64 {
    version / 1000
}

fn too_many() -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, "60")],
        Json(json!({"success": false, "error": "too many requests", "retryAfter": 60})),
    )
        .into_response()
}

fn busy() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, FULL_LIST_RETRY_AFTER.to_string())],
        Json(json!({
            "success": false, "error": "too many full lists in progress, try again later",
            "retryAfter": FULL_LIST_RETRY_AFTER,
        })),
    )
        .into_response()
}

fn etag(version: u64) -> String {
    format!("\"v{version}\"")
}

/// A JSON body already serialised.
fn json_bytes(body: Vec<u8>, etag: String) -> Response {
    (
        [
            (header::ETAG, etag),
            (header::CACHE_CONTROL, "no-cache".to_string()),
            (header::CONTENT_TYPE, "application/json".to_string()),
        ],
        body,
    )
        .into_response()
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
    let version = state.list.version();
    let tag = etag(version);
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"))
        || (since == Some(version) && !full);
    if not_modified {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response();
    }
    if let (Some(since), false) = (since, full) {
        if crate::faults::fail_point("blocklist_api.delta").is_err() {
            return internal_error();
        }
        let list = Arc::clone(&state.list);
        match tokio::task::spawn_blocking(move || delta_reply(&list, since)).await {
            Ok(Ok(Some((version, body)))) => return json_bytes(body, etag(version)),
            // Too old or from elsewhere: the full list.
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "cannot compute a blocklist delta");
                return internal_error();
            }
            Err(_) => return internal_error(),
        }
    }
    full_list(&state, Encoding::accepted(&headers), peer.ip()).await
}

/// The delta since `since` as its JSON reply, with the version it leads to; `None` when the
/// full list must be sent instead.
fn delta_reply(list: &Blocklist, since: u64) -> Result<Option<(u64, Vec<u8>)>, BlocklistError> {
    let Some(DeltaSince {
        version,
        checksum,
        patterns,
        entries,
        removed,
    }) = list.delta_since(since)?
    else {
        return Ok(None);
    };
    let reply = FullReply {
        checksum: &checksum,
        delta: true,
        entries: CanonicalEntries(&entries),
        last_updated: last_updated(version),
        patterns: &patterns,
        removed: &removed,
        success: true,
        version,
    };
    let body = serde_json::to_vec(&reply).map_err(BlocklistError::StoreJson)?;
    Ok(Some((version, body)))
}

/// The full list from its shared body, once a transfer slot is free; a source that already
/// has [`FULL_LIST_SLOTS_PER_SOURCE`] transfers going gets `503` at once.
async fn full_list(state: &ApiState, encoding: Encoding, peer: IpAddr) -> Response {
    let Some(source_slot) = SourceSlot::take(&state.full.per_source, state.limiter.key(peer))
    else {
        return busy();
    };
    let Ok(built) = state.full.body(&state.list, encoding).await else {
        return internal_error();
    };
    let slot = match tokio::time::timeout(
        state.full.wait,
        Arc::clone(&state.full.slots).acquire_owned(),
    )
    .await
    {
        Ok(Ok(slot)) => slot,
        _ => return busy(),
    };
    let body = FullListBody {
        chunks: Arc::clone(&built.chunks),
        next: 0,
        remaining: built.len,
        _slot: slot,
        _source_slot: source_slot,
    };
    let mut response = Response::new(AxumBody::new(body));
    let headers = response.headers_mut();
    if let Ok(tag) = HeaderValue::from_str(&etag(built.version)) {
        headers.insert(header::ETAG, tag);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(built.len));
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if encoding == Encoding::Gzip {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response
}

/// The publisher's minisign signature of the current full list (text, as a `.minisig` file).
async fn signature(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if !state.limiter.allow(&peer) {
        return too_many();
    }
    let Ok((version, text)) = state.full.signature(&state.list).await else {
        return internal_error();
    };
    (
        [
            (header::ETAG, etag(version)),
            (header::CACHE_CONTROL, "no-cache".to_string()),
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
        ],
        text.to_string(),
    )
        .into_response()
}

#[derive(Deserialize)]
struct VersionQuery {
    version: Option<String>,
}

/// The patterns' reply (sorted keys, as the map it was first built as).
#[derive(Serialize)]
struct PatternsReply<'a> {
    checksum: &'a str,
    patterns: &'a [Pattern],
    success: bool,
    version: u64,
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
    let list = Arc::clone(&state.list);
    let Ok(patterns) = tokio::task::spawn_blocking(move || list.patterns()).await else {
        return internal_error();
    };
    let mut h = Sha256::new();
    for p in &patterns {
        if let Ok(line) = serde_json::to_vec(p) {
            h.update(&line);
            h.update(b"\n");
        }
    }
    let checksum: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let checksum = format!("sha256:{checksum}");
    let reply = PatternsReply {
        checksum: &checksum,
        patterns: &patterns,
        success: true,
        version,
    };
    match serde_json::to_vec(&reply) {
        Ok(body) => json_bytes(body, tag),
        Err(_) => internal_error(),
    }
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
    let list = Arc::clone(&state.list);
    let Ok(v) = tokio::task::spawn_blocking(move || list.verify(&name)).await else {
        return internal_error();
    };
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
    // The count takes the list's lock: off the runtime's threads (see `Blocklist::version`).
    let list = Arc::clone(&state.list);
    let Ok(count) = tokio::task::spawn_blocking(move || list.len()).await else {
        return internal_error();
    };
    Json(json!({
        "status": "ok", "timestamp": now, "version": crate::protocol::VERSION,
        "blocklistCount": count,
    }))
    .into_response()
}

/// The API's routes on `list` as `serve` builds them (the default source prefix), to call
/// without a listener; a request needs `ConnectInfo<SocketAddr>` among its extensions. Public
/// (hidden) for the fuzz crate only.
#[doc(hidden)]
pub fn router(list: Arc<Blocklist>) -> Router {
    let full = Arc::new(FullLists::new(FULL_LIST_SLOTS, FULL_LIST_WAIT));
    app(list, SourcePrefix::DEFAULT, full)
}

/// The API's routes on `list`; the rate limiter counts sources with `prefix`.
fn app(list: Arc<Blocklist>, prefix: SourcePrefix, full: Arc<FullLists>) -> Router {
    let state = ApiState {
        list,
        limiter: Arc::new(RateLimiter::new(prefix)),
        full,
    };
    Router::new()
        .route("/api/v1/blocklist", get(blocklist))
        .route("/api/v1/blocklist.minisig", get(signature))
        .route("/api/v1/patterns", get(patterns))
        .route("/api/v1/verify-domain", post(verify))
        .route("/health", get(health))
        // Per-request replies (deltas, patterns) are compressed here; a full list comes with
        // its encoding set and passes through.
        .layer(tower_http::compression::CompressionLayer::new().gzip(true))
        .with_state(state)
}

/// Drops the full list's bodies whenever the list moves to a new version, until `shutdown`.
fn drop_bodies_on_change(
    list: &Blocklist,
    full: Arc<FullLists>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let mut versions = list.watch_version();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = versions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let version = *versions.borrow_and_update();
                    full.drop_older(version).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    })
}

/// Serves the API until `shutdown` turns true, with the HTTP layer's blocklist limits
/// (request bodies up to 4 KiB); the rate limiter counts sources as `limits.source_prefix`
/// says.
pub async fn serve(
    addr: SocketAddr,
    list: Arc<Blocklist>,
    limits: http::Limits,
    shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let listener = http::bind("the blocklist API", addr).await?;
    let full = Arc::new(FullLists::new(FULL_LIST_SLOTS, FULL_LIST_WAIT));
    let dropper = drop_bodies_on_change(&list, Arc::clone(&full), shutdown.clone());
    let app = app(list, limits.source_prefix, full);
    info!(%addr, "blocklist API listening");
    let server = http::Server::new("blocklist API", limits);
    Ok(tokio::spawn(async move {
        server.serve(listener, shutdown, http::router(app)).await;
        dropper.abort();
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::Read;

    use http_body_util::BodyExt;

    use super::*;
    use crate::blocklist::model::{Entry, PatternType};

    fn open() -> (tempfile::TempDir, Arc<Blocklist>) {
        let dir = tempfile::tempdir().unwrap();
        let list = Arc::new(Blocklist::open(dir.path(), 0.5, &[], None).unwrap());
        (dir, list)
    }

    /// Entries with exact and subdomain patterns, exact only, subdomain only, and reasons that
    /// need escaping; one contains and one regex pattern.
    fn fill(list: &Blocklist) {
        let mut sub_only = Entry::new("sub-only.example", true, 0.9, "r", 3);
        sub_only
            .patterns
            .retain(|p| p.kind == PatternType::Subdomain);
        list.upsert(vec![
            Entry::new("both.example", true, 1.0, "known \"casino\" \u{e7}", 1),
            Entry::new("exact.example", false, 0.75, "line\nbreak", 2),
            sub_only,
        ])
        .unwrap();
        list.add_pattern(Pattern {
            pattern: "bet".into(),
            kind: PatternType::Contains,
            weight: 0.7,
        })
        .unwrap();
        list.add_pattern(Pattern {
            pattern: r"^jg\d+\.com$".into(),
            kind: PatternType::Regex,
            weight: 0.8,
        })
        .unwrap();
    }

    /// The reply as it was built before: a `serde_json::Value` tree.
    fn value_reply(list: &Blocklist, delta: Option<(Vec<Entry>, Vec<String>)>) -> Vec<u8> {
        let (is_delta, entries, removed) = match delta {
            Some((e, r)) => (true, e, r),
            None => (false, list.entries(), Vec::new()),
        };
        let version = list.version();
        serde_json::to_vec(&json!({
            "success": true, "version": version, "lastUpdated": version / 1000, "delta": is_delta,
            "entries": entries, "patterns": list.patterns(), "removed": removed,
            "checksum": list.checksum(),
        }))
        .unwrap()
    }

    fn bytes_of(built: &Built) -> Vec<u8> {
        built
            .chunks
            .iter()
            .flat_map(|c| c.iter().copied())
            .collect()
    }

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn replies_are_the_bytes_the_value_tree_made() {
        let (_dir, list) = open();
        fill(&list);
        let identity = build(&list, Encoding::Identity).unwrap();
        assert_eq!(bytes_of(&identity), value_reply(&list, None));
        assert_eq!(identity.len as usize, bytes_of(&identity).len());
        let gzip = build(&list, Encoding::Gzip).unwrap();
        assert_eq!(gunzip(&bytes_of(&gzip)), value_reply(&list, None));

        let before = list.version();
        list.upsert(vec![Entry::new("new.example", true, 1.0, "later", 9)])
            .unwrap();
        list.remove("exact.example").unwrap();
        let (version, body) = delta_reply(&list, before).unwrap().unwrap();
        assert_eq!(version, list.version());
        let delta = list.delta(before).unwrap().unwrap();
        assert_eq!(body, value_reply(&list, Some(delta)));
        // The checksum written from the table is the one of the seed's canonical entries.
        assert_eq!(
            list.checksum(),
            super::super::list_checksum(list.entries().into_iter(), &list.patterns())
        );
    }

    #[test]
    fn a_body_spanning_many_chunks_is_cut_and_joined_exactly() {
        let (_dir, list) = open();
        list.upsert(
            (0..30_000)
                .map(|i| Entry::new(&format!("casino{i}.example"), i % 3 != 0, 1.0, "bulk", 5))
                .collect(),
        )
        .unwrap();
        let identity = build(&list, Encoding::Identity).unwrap();
        assert!(identity.chunks.len() > 2, "{}", identity.chunks.len());
        assert!(
            identity.chunks[..identity.chunks.len() - 1]
                .iter()
                .all(|c| c.len() == CHUNK)
        );
        assert_eq!(bytes_of(&identity), value_reply(&list, None));
    }

    #[test]
    fn accept_encoding_picks_gzip_only_when_it_is_accepted() {
        let pick = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            }
            Encoding::accepted(&headers)
        };
        assert_eq!(pick(&[]), Encoding::Identity);
        assert_eq!(pick(&["identity"]), Encoding::Identity);
        assert_eq!(pick(&["gzip, deflate"]), Encoding::Gzip);
        assert_eq!(pick(&["deflate", "GZIP;q=0.5"]), Encoding::Gzip);
        assert_eq!(pick(&["x-gzip"]), Encoding::Gzip);
        assert_eq!(pick(&["gzip;q=0"]), Encoding::Identity);
        assert_eq!(pick(&["gzip;q=0, *"]), Encoding::Identity);
        assert_eq!(pick(&["*"]), Encoding::Gzip);
        assert_eq!(pick(&["*;q=0"]), Encoding::Identity);
        assert_eq!(pick(&["br"]), Encoding::Identity);
    }

    fn state(list: &Arc<Blocklist>, slots: usize, wait: Duration) -> ApiState {
        ApiState {
            list: Arc::clone(list),
            limiter: Arc::new(RateLimiter::new(SourcePrefix::DEFAULT)),
            full: Arc::new(FullLists::new(slots, wait)),
        }
    }

    async fn body_of(response: Response) -> Vec<u8> {
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    #[tokio::test]
    async fn one_body_per_version_shared_and_dropped_when_the_version_moves() {
        let (_dir, list) = open();
        fill(&list);
        let s = state(&list, 8, Duration::from_secs(5));
        let a = s.full.body(&list, Encoding::Gzip).await.unwrap();
        let b = s.full.body(&list, Encoding::Gzip).await.unwrap();
        assert!(Arc::ptr_eq(&a.chunks, &b.chunks), "made once, shared");
        let reply = full_list(&s, Encoding::Gzip, ip(1)).await;
        assert_eq!(reply.headers()[header::CONTENT_ENCODING], "gzip");
        assert_eq!(
            reply.headers()[header::CONTENT_LENGTH],
            a.len.to_string().as_str()
        );
        assert_eq!(gunzip(&body_of(reply).await), value_reply(&list, None));
        let reply = full_list(&s, Encoding::Identity, ip(1)).await;
        assert!(reply.headers().get(header::CONTENT_ENCODING).is_none());
        assert_eq!(body_of(reply).await, value_reply(&list, None));

        // A change drops both bodies; the next request makes the new version's.
        list.upsert(vec![Entry::new("another.example", true, 1.0, "r", 7)])
            .unwrap();
        s.full.drop_older(list.version()).await;
        for slot in &s.full.bodies {
            assert!(slot.lock().await.is_none());
        }
        let c = s.full.body(&list, Encoding::Gzip).await.unwrap();
        assert_eq!(c.version, list.version());
        assert_eq!(gunzip(&bytes_of(&c)), value_reply(&list, None));
    }

    #[tokio::test]
    async fn the_signature_covers_the_identity_body_of_its_version_and_moves_with_it() {
        let (_dir, list) = open();
        fill(&list);
        let s = state(&list, 8, Duration::from_secs(5));
        let key = minisign::PublicKey::from_base64(&list.publisher.public_key()).unwrap();
        let verify = |text: &str, body: Vec<u8>| {
            let signature = minisign::SignatureBox::from_string(text).unwrap();
            minisign::verify(
                &key,
                &signature,
                std::io::Cursor::new(body),
                true,
                false,
                false,
            )
        };
        let (version, text) = s.full.signature(&list).await.unwrap();
        assert_eq!(version, list.version());
        verify(&text, value_reply(&list, None)).unwrap();
        let (_, again) = s.full.signature(&list).await.unwrap();
        assert!(Arc::ptr_eq(&text, &again), "signed once per version");

        list.upsert(vec![Entry::new("another.example", true, 1.0, "r", 7)])
            .unwrap();
        assert!(
            verify(&text, value_reply(&list, None)).is_err(),
            "the old signature does not cover the new version"
        );
        s.full.drop_older(list.version()).await;
        assert!(s.full.signature.lock().await.is_none());
        let (version, text) = s.full.signature(&list).await.unwrap();
        assert_eq!(version, list.version());
        verify(&text, value_reply(&list, None)).unwrap();
    }

    #[test]
    fn the_chunk_reader_reads_every_byte_across_chunk_ends() {
        let chunks: Vec<Bytes> = vec![
            Bytes::from_static(b"abc"),
            Bytes::new(),
            Bytes::from_static(b"defgh"),
        ];
        let mut out = Vec::new();
        let mut small = [0u8; 2];
        let mut reader = ChunkReader::new(&chunks);
        loop {
            let n = reader.read(&mut small).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&small[..n]);
        }
        assert_eq!(out, b"abcdefgh");
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    #[tokio::test]
    async fn one_source_holds_at_most_its_share_of_the_transfers() {
        let (_dir, list) = open();
        fill(&list);
        let s = state(&list, 64, Duration::from_millis(200));
        let mut held = Vec::new();
        for _ in 0..FULL_LIST_SLOTS_PER_SOURCE {
            let reply = full_list(&s, Encoding::Gzip, ip(1)).await;
            assert_eq!(reply.status(), StatusCode::OK);
            held.push(reply);
        }
        let over = full_list(&s, Encoding::Gzip, ip(1)).await;
        assert_eq!(over.status(), StatusCode::SERVICE_UNAVAILABLE);
        let other = full_list(&s, Encoding::Gzip, ip(2)).await;
        assert_eq!(other.status(), StatusCode::OK, "another source is served");
        held.pop();
        let again = full_list(&s, Encoding::Gzip, ip(1)).await;
        assert_eq!(
            again.status(),
            StatusCode::OK,
            "a finished transfer frees its share"
        );
        drop((held, other, again));
        assert!(s.full.per_source.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_full_list_waits_for_a_slot_then_gets_503_with_retry_after() {
        let (_dir, list) = open();
        fill(&list);
        let s = state(&list, 1, Duration::from_millis(200));
        let first = full_list(&s, Encoding::Identity, ip(1)).await;
        assert_eq!(first.status(), StatusCode::OK);
        // The first transfer holds the only slot until its body is gone.
        let second = full_list(&s, Encoding::Gzip, ip(1)).await;
        assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            second.headers()[header::RETRY_AFTER],
            FULL_LIST_RETRY_AFTER.to_string().as_str()
        );
        drop(first);
        let third = full_list(&s, Encoding::Gzip, ip(1)).await;
        assert_eq!(third.status(), StatusCode::OK);
    }

    #[test]
    fn the_rate_limiter_counts_an_ipv6_prefix_as_one_client() {
        let limiter = RateLimiter::new(SourcePrefix::DEFAULT);
        let addr = |s: &str| SocketAddr::new(s.parse().unwrap(), 1);
        for i in 0..PER_CLIENT_PER_MINUTE {
            assert!(limiter.allow(&addr(&format!("2001:db8:1:2::{:x}", i + 1))));
        }
        assert!(!limiter.allow(&addr("2001:db8:1:2:ffff::1")), "same /64");
        assert!(limiter.allow(&addr("2001:db8:1:3::1")), "another /64");
        let narrow = RateLimiter::new(SourcePrefix::new(128).unwrap());
        for _ in 0..PER_CLIENT_PER_MINUTE {
            assert!(narrow.allow(&addr("2001:db8::1")));
        }
        assert!(narrow.allow(&addr("2001:db8::2")), "/128: each address");
    }
}

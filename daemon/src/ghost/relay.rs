//! The WebSocket-over-TLS relay the stock wstunnel client connects to: TLS, the HTTP/1.1
//! upgrade on `/<secret>/events` with the tunnel claims in `Sec-WebSocket-Protocol`, then one
//! UDP datagram per binary frame between the client and the local WireGuard port.
//!
//! Rejections must be cheap: the stock client retries a refused upgrade in a tight loop, so a
//! source whose upgrades keep failing is cut off right after `accept`, before any TLS work.
//! Every accepted connection takes a token from its source's bucket at once and gets it back
//! only when its upgrade succeeds, so a source opening connections it never upgrades runs dry
//! as fast as one whose upgrades fail.
//!
//! Accept, the handshake caps and the timeouts are the HTTP layer's (`Limits::ghost_relay`):
//! a connection holds its gate pass from accept to the end of the upgrade (TLS within
//! `TLS_HANDSHAKE_TIMEOUT`, the whole upgrade within the header-read timeout); an open tunnel
//! counts against the secret's quota (`[ghost] tunnels_per_secret`) instead. A source is an
//! IPv4 address or an IPv6 prefix (`[sources] ipv6_prefix`), for the gate and the limiter
//! alike. Peer addresses appear in debug lines only.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, rustls::ServerConfig};
use tokio_tungstenite::tungstenite::{
    self, Message,
    handshake::server::{ErrorResponse, Request, Response},
    http::{HeaderValue, StatusCode},
    protocol::WebSocketConfig,
};
use tracing::{debug, info, warn};

use crate::{http, source::SourcePrefix};

/// The largest frame accepted: a UDP datagram cannot be larger.
pub const MAX_FRAME_BYTES: usize = 65_535;
/// The most open tunnels `[ghost] tunnels_per_secret` may allow.
pub const MAX_TUNNELS: usize = 4096;
/// From accept to the end of the TLS handshake: one or two round trips and a signature, so a
/// few seconds cover a slow mobile link; a connection that sends no ClientHello gives its
/// handshake slot back this soon instead of at the end of the whole upgrade's time.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A source may fail this many upgrades in a burst...
const REJECT_BURST: f64 = 20.0;
/// ...and one more per this many per second afterwards.
const REJECT_REFILL_PER_SECOND: f64 = 2.0;
/// Sources tracked by the rejection limiter before fully refilled entries are dropped.
const LIMITER_MAX_SOURCES: usize = 65_536;

/// Why an upgrade was refused (the `reason` label of the rejection counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Too many failed upgrades from this source: closed before TLS.
    RateLimited,
    /// Too many handshakes in progress (in total or from this source).
    Busy,
    /// The secret's tunnel quota is taken: answered 503.
    Quota,
    /// Not TLS, or a TLS failure (plain HTTP lands here).
    Tls,
    /// TLS or upgrade did not finish in time.
    Timeout,
    /// Not a WebSocket upgrade request.
    NotWebsocket,
    /// The path does not start with the secret prefix or does not end in `events`.
    WrongPrefix,
    /// No or undecodable tunnel claims.
    BadClaims,
    /// The claims ask for something other than UDP to the local WireGuard port.
    ForbiddenRemote,
}

impl Rejection {
    pub const ALL: [Rejection; 9] = [
        Rejection::RateLimited,
        Rejection::Busy,
        Rejection::Quota,
        Rejection::Tls,
        Rejection::Timeout,
        Rejection::NotWebsocket,
        Rejection::WrongPrefix,
        Rejection::BadClaims,
        Rejection::ForbiddenRemote,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::RateLimited => "rate_limited",
            Rejection::Busy => "busy",
            Rejection::Quota => "quota",
            Rejection::Tls => "tls",
            Rejection::Timeout => "timeout",
            Rejection::NotWebsocket => "not_websocket",
            Rejection::WrongPrefix => "wrong_prefix",
            Rejection::BadClaims => "bad_claims",
            Rejection::ForbiddenRemote => "forbidden_remote",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Why an open tunnel was closed by the server side on a client fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameFault {
    /// A frame larger than a UDP datagram.
    Oversized,
    /// A text frame (the tunnel carries binary datagrams only).
    Text,
    /// Anything else the WebSocket layer refused.
    Protocol,
}

impl FrameFault {
    pub const ALL: [FrameFault; 3] = [
        FrameFault::Oversized,
        FrameFault::Text,
        FrameFault::Protocol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FrameFault::Oversized => "oversized",
            FrameFault::Text => "text",
            FrameFault::Protocol => "protocol",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Counters read by the metrics collector; they outlive any one relay.
#[derive(Debug, Default)]
pub struct Stats {
    pub tunnels_open: AtomicI64,
    pub tunnels_total: AtomicU64,
    /// Client to WireGuard.
    pub bytes_in: AtomicU64,
    /// WireGuard to client.
    pub bytes_out: AtomicU64,
    pub datagrams_in: AtomicU64,
    pub datagrams_out: AtomicU64,
    rejected: [AtomicU64; Rejection::ALL.len()],
    faults: [AtomicU64; FrameFault::ALL.len()],
}

impl Stats {
    fn reject(&self, reason: Rejection) {
        self.rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected(&self, reason: Rejection) -> u64 {
        self.rejected[reason.index()].load(Ordering::Relaxed)
    }

    fn fault(&self, fault: FrameFault) {
        self.faults[fault.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn faults(&self, fault: FrameFault) -> u64 {
        self.faults[fault.index()].load(Ordering::Relaxed)
    }
}

/// What a relay serves.
#[derive(Clone)]
pub struct RelaySettings {
    pub listen: SocketAddr,
    /// The path prefix the stock client is given (`--http-upgrade-path-prefix`).
    pub secret: String,
    /// The local WireGuard UDP port: the only remote a tunnel may ask for.
    pub wireguard_port: u16,
    /// Open tunnels the secret may hold at once (`[ghost] tunnels_per_secret`).
    pub tunnels_per_secret: usize,
    /// What one source is (`[sources] ipv6_prefix`).
    pub source_prefix: SourcePrefix,
}

/// The TLS configuration in force; replaced in place when a certificate is renewed.
pub type TlsConfig = Arc<RwLock<Arc<ServerConfig>>>;

/// A running relay; `stop` ends the listener (or leaves the shared port) and every tunnel.
pub struct Relay {
    shutdown: watch::Sender<bool>,
    /// The relay's own listener; `None` when it joined the sentry's port.
    task: Option<JoinHandle<()>>,
    shared: Option<Arc<http::SharedPort>>,
    pub local_addr: SocketAddr,
}

impl Relay {
    /// Binds the listener (so a taken port fails here, synchronously for the caller) and
    /// starts serving.
    pub async fn start(
        settings: RelaySettings,
        tls: TlsConfig,
        stats: Arc<Stats>,
    ) -> std::io::Result<Self> {
        let listener = bind(settings.listen)?;
        let local_addr = listener.local_addr()?;
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, settings, tls, stats, rx));
        info!(listen = %local_addr, "ghost relay listening");
        Ok(Self {
            shutdown,
            task: Some(task),
            shared: None,
            local_addr,
        })
    }

    /// Joins the sentry's TLS port instead of listening: connections whose first request
    /// starts `GET /<secret>/` are the relay's, every other one stays the sentry's (a probe of
    /// the port sees the site); clients asking for `name` get `key`. Upgrades and tunnels then
    /// run as on the relay's own port, on the sentry's threads; the rejection limiter does not
    /// apply, since a request without the secret never reaches the relay.
    pub fn join(
        settings: RelaySettings,
        share: Arc<http::SharedPort>,
        name: &str,
        key: Arc<tokio_rustls::rustls::sign::CertifiedKey>,
        stats: Arc<Stats>,
    ) -> Result<Self, http::share::ShareError> {
        let (shutdown, rx) = watch::channel(false);
        let limits = http::Limits::ghost_relay().with_source_prefix(settings.source_prefix);
        let quota = Arc::new(Semaphore::new(
            settings.tunnels_per_secret.clamp(1, MAX_TUNNELS),
        ));
        let prefix = format!("GET /{}/", settings.secret).into_bytes();
        let local_addr = settings.listen;
        let settings = Arc::new(settings);
        let tunnel_stats = Arc::clone(&stats);
        let take = move |stream: http::share::BoxStream, peer: SocketAddr| {
            let (settings, stats, quota, shutdown) = (
                Arc::clone(&settings),
                Arc::clone(&tunnel_stats),
                Arc::clone(&quota),
                rx.clone(),
            );
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
                match upgrade_stream(stream, &settings, &quota, deadline).await {
                    Ok((ws, _place)) => {
                        run_tunnel(ws, &settings, &stats, shutdown, limits.idle_timeout).await;
                    }
                    Err(reason) => {
                        debug!(peer = %peer, reason = reason.as_str(), "ghost upgrade refused");
                        stats.reject(reason);
                    }
                }
            });
        };
        share.join(
            name,
            key,
            http::Joiner {
                prefix,
                take: Box::new(take),
            },
        )?;
        info!(listen = %local_addr, "ghost relay sharing the sentry's TLS port");
        Ok(Self {
            shutdown,
            task: None,
            shared: Some(share),
            local_addr,
        })
    }

    /// A renewed certificate, when the relay shares the sentry's port.
    pub fn renewed(&self, name: &str, key: Arc<tokio_rustls::rustls::sign::CertifiedKey>) {
        if let Some(share) = &self.shared {
            share.set_certificate(name, key);
        }
    }

    /// Closes the listener (or leaves the shared port) and every tunnel, and waits for the
    /// listener to be gone.
    pub async fn stop(self) {
        if let Some(share) = &self.shared {
            share.leave();
        }
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task {
            let _ = task.await;
        }
    }
}

/// An open tunnel, counted while it lasts.
async fn run_tunnel<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    ws: Ws<S>,
    settings: &RelaySettings,
    stats: &Stats,
    shutdown: watch::Receiver<bool>,
    idle: Duration,
) {
    stats.tunnels_open.fetch_add(1, Ordering::Relaxed);
    stats.tunnels_total.fetch_add(1, Ordering::Relaxed);
    // No address at info: the log is an operator's, the peer is a user.
    info!("ghost tunnel open");
    let end = relay(ws, settings.wireguard_port, stats, shutdown, idle).await;
    stats.tunnels_open.fetch_sub(1, Ordering::Relaxed);
    info!(end, "ghost tunnel closed");
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn serve(
    listener: TcpListener,
    settings: RelaySettings,
    tls: TlsConfig,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = http::Limits::ghost_relay().with_source_prefix(settings.source_prefix);
    let limiter = Arc::new(Limiter::new(settings.source_prefix));
    // TLS and upgrades in progress, in total and per source.
    let handshakes = Arc::new(http::Gate::new(&limits));
    let quota = Arc::new(Semaphore::new(
        settings.tunnels_per_secret.clamp(1, MAX_TUNNELS),
    ));
    let settings = Arc::new(settings);
    loop {
        let Some((tcp, peer)) =
            http::next_connection(&listener, &mut shutdown, "ghost relay").await
        else {
            break;
        };
        // Charged now, refunded when the upgrade succeeds.
        if !limiter.charge(peer.ip()) {
            stats.reject(Rejection::RateLimited);
            continue;
        }
        let Ok(handshake) = handshakes.admit(peer.ip()) else {
            stats.reject(Rejection::Busy);
            continue;
        };
        let acceptor = match tls.read() {
            Ok(c) => TlsAcceptor::from(Arc::clone(&c)),
            Err(poisoned) => TlsAcceptor::from(Arc::clone(&poisoned.into_inner())),
        };
        let (settings, stats, limiter, quota, shutdown) = (
            Arc::clone(&settings),
            Arc::clone(&stats),
            Arc::clone(&limiter),
            Arc::clone(&quota),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let upgraded = upgrade(tcp, acceptor, &settings, &quota, limits.header_read_timeout);
            let (ws, _tunnel) = match upgraded.await {
                Ok(open) => open,
                Err(reason) => {
                    drop(handshake);
                    debug!(peer = %peer, reason = reason.as_str(), "ghost upgrade refused");
                    stats.reject(reason);
                    return;
                }
            };
            drop(handshake);
            limiter.refund(peer.ip());
            run_tunnel(ws, &settings, &stats, shutdown, limits.idle_timeout).await;
        });
    }
    info!("ghost relay stopped");
}

/// A tunnel's WebSocket. Public (hidden) for the fuzz crate only.
#[doc(hidden)]
pub type Ws<S> = tokio_tungstenite::WebSocketStream<S>;

/// TLS within `TLS_HANDSHAKE_TIMEOUT`, then the WebSocket upgrade with the path and claims
/// checked and a place in the secret's `quota` taken, all within `timeout` of accept.
async fn upgrade(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    settings: &RelaySettings,
    quota: &Arc<Semaphore>,
    timeout: Duration,
) -> Result<
    (
        Ws<tokio_rustls::server::TlsStream<TcpStream>>,
        OwnedSemaphorePermit,
    ),
    Rejection,
> {
    let start = tokio::time::Instant::now();
    let deadline = start + timeout;
    let tls = tokio::time::timeout_at(
        (start + TLS_HANDSHAKE_TIMEOUT).min(deadline),
        acceptor.accept(tcp),
    )
    .await
    .map_err(|_| Rejection::Timeout)?
    .map_err(|_| Rejection::Tls)?;
    upgrade_stream(tls, settings, quota, deadline).await
}

/// The WebSocket upgrade on a decrypted stream, by `deadline`. Public (hidden) for the fuzz
/// crate only.
#[doc(hidden)]
pub async fn upgrade_stream<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    tls: S,
    settings: &RelaySettings,
    quota: &Arc<Semaphore>,
    deadline: tokio::time::Instant,
) -> Result<(Ws<S>, OwnedSemaphorePermit), Rejection> {
    let mut refused: Option<Rejection> = None;
    let mut place: Option<OwnedSemaphorePermit> = None;
    let config = WebSocketConfig::default()
        // The stock client does not mask its frames.
        .accept_unmasked_frames(true)
        .max_frame_size(Some(MAX_FRAME_BYTES))
        .max_message_size(Some(MAX_FRAME_BYTES));
    // The error type is tungstenite's (an HTTP response); it is built once per refusal.
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, mut response: Response| {
        let checked =
            check_upgrade(request, &settings.secret, settings.wireguard_port).and_then(|()| {
                // Only a request that knows the secret takes a place in its quota.
                Arc::clone(quota)
                    .try_acquire_owned()
                    .map_err(|_| Rejection::Quota)
            });
        match checked {
            Ok(permit) => {
                place = Some(permit);
                response
                    .headers_mut()
                    .insert("sec-websocket-protocol", HeaderValue::from_static("v1"));
                Ok(response)
            }
            Err(reason) => {
                refused = Some(reason);
                let mut error = ErrorResponse::new(None);
                *error.status_mut() = if reason == Rejection::Quota {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::BAD_REQUEST
                };
                Err(error)
            }
        }
    };
    let accepted = tokio::time::timeout_at(
        deadline,
        tokio_tungstenite::accept_hdr_async_with_config(tls, check, Some(config)),
    )
    .await;
    match (accepted, place) {
        (Err(_), _) => Err(Rejection::Timeout),
        (Ok(Ok(ws)), Some(place)) => Ok((ws, place)),
        // The callback accepts only with a place; no place means it never ran.
        (Ok(Ok(_)), None) => Err(Rejection::NotWebsocket),
        (Ok(Err(_)), _) => Err(refused.unwrap_or(Rejection::NotWebsocket)),
    }
}

/// The claims the stock client puts in its JWT.
#[derive(Debug, Deserialize)]
struct Claims {
    /// The tunnel kind and its options, e.g. `{"Udp":{"timeout":null}}`.
    p: serde_json::Value,
    /// Remote host.
    r: String,
    /// Remote port.
    rp: u16,
}

/// Checks the upgrade request: secret path prefix, then the tunnel claims.
pub fn check_upgrade(
    request: &Request,
    secret: &str,
    wireguard_port: u16,
) -> Result<(), Rejection> {
    let path = request.uri().path();
    let first = path
        .strip_prefix('/')
        .and_then(|p| p.split('/').next())
        .unwrap_or_default();
    if !constant_time_eq(first.as_bytes(), secret.as_bytes()) || !path.ends_with("events") {
        return Err(Rejection::WrongPrefix);
    }
    let jwt = request
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("authorization.bearer."))
        .ok_or(Rejection::BadClaims)?;
    let claims = decode_claims(jwt).ok_or(Rejection::BadClaims)?;
    let is_udp = claims.p.as_object().is_some_and(|o| o.contains_key("Udp"));
    let remote_is_local = matches!(
        claims.r.trim_start_matches('[').trim_end_matches(']'),
        "127.0.0.1" | "localhost" | "::1"
    );
    if is_udp && remote_is_local && claims.rp == wireguard_port {
        Ok(())
    } else {
        Err(Rejection::ForbiddenRemote)
    }
}

/// Decodes the JWT payload. The stock client signs with a random key, so the signature
/// carries no meaning and is not checked; the secret path is the credential.
fn decode_claims(jwt: &str) -> Option<Claims> {
    let mut parts = jwt.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > 4096 {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a frame read from a tunnel means: `None` to carry on (a datagram, a ping, a pong),
/// else why the tunnel ends. Public (hidden) for the fuzz crate only.
#[doc(hidden)]
pub fn frame_ends_tunnel(
    frame: Option<Result<Message, tungstenite::Error>>,
    stats: &Stats,
) -> Option<&'static str> {
    match frame {
        None => Some("client gone"),
        Some(Ok(Message::Binary(datagram))) => {
            stats
                .bytes_in
                .fetch_add(datagram.len() as u64, Ordering::Relaxed);
            stats.datagrams_in.fetch_add(1, Ordering::Relaxed);
            None
        }
        // Pongs are queued by the WebSocket layer and flushed on the next poll.
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => None,
        Some(Ok(Message::Close(_))) => Some("client closed"),
        Some(Ok(Message::Text(_))) => {
            stats.fault(FrameFault::Text);
            Some("text frame")
        }
        Some(Err(e)) => {
            let fault = match e {
                tungstenite::Error::Capacity(_) => Some(FrameFault::Oversized),
                tungstenite::Error::Protocol(_) => Some(FrameFault::Protocol),
                _ => None,
            };
            if let Some(fault) = fault {
                stats.fault(fault);
                debug!(error = %e, "ghost tunnel closed on a bad frame");
                return Some(fault.as_str());
            }
            Some("connection error")
        }
    }
}

/// Relays until either side ends, or no frame came for `idle`; returns why it ended.
async fn relay<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    ws: Ws<S>,
    wireguard_port: u16,
    stats: &Stats,
    mut shutdown: watch::Receiver<bool>,
    idle: Duration,
) -> &'static str {
    let udp = match UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "ghost tunnel cannot open its UDP socket");
            return "udp socket";
        }
    };
    if let Err(e) = udp
        .connect(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            wireguard_port,
        ))
        .await
    {
        warn!(error = %e, "ghost tunnel cannot reach the WireGuard port");
        return "udp connect";
    }
    let (mut sink, mut stream) = ws.split();
    let mut buf = vec![0u8; MAX_FRAME_BYTES];
    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                let _ = sink.send(Message::Close(None)).await;
                return "relay stopped";
            }
            frame = tokio::time::timeout(idle, stream.next()) => {
                let Ok(frame) = frame else {
                    return "idle";
                };
                let datagram = match &frame {
                    Some(Ok(Message::Binary(datagram))) => Some(datagram.clone()),
                    _ => None,
                };
                if let Some(why) = frame_ends_tunnel(frame, stats) {
                    if why == "text frame" {
                        let _ = sink.send(Message::Close(None)).await;
                    }
                    return why;
                }
                if let Some(datagram) = datagram {
                    // WireGuard not listening for a moment (restart) is not the tunnel's end.
                    let _ = udp.send(&datagram).await;
                }
            }
            received = udp.recv(&mut buf) => match received {
                Ok(n) => {
                    stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                    stats.datagrams_out.fetch_add(1, Ordering::Relaxed);
                    // One datagram, one binary frame with FIN set: tungstenite never fragments.
                    if sink.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        return "client gone";
                    }
                }
                // ICMP port unreachable from a restarting WireGuard: keep the tunnel.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

/// A token bucket per source: every accepted connection takes a token, a successful upgrade
/// gives it back, so what drains a bucket is connections that do not become tunnels (failed,
/// timed out, refused as busy).
struct Limiter {
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
    source_prefix: SourcePrefix,
}

impl Limiter {
    fn new(source_prefix: SourcePrefix) -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
            source_prefix,
        }
    }

    fn level(tokens: f64, since: Instant, now: Instant) -> f64 {
        (tokens + now.duration_since(since).as_secs_f64() * REJECT_REFILL_PER_SECOND)
            .min(REJECT_BURST)
    }

    /// Takes a token from the source's bucket; false (nothing taken) when it is empty.
    fn charge(&self, ip: IpAddr) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            return true;
        };
        let now = Instant::now();
        if buckets.len() >= LIMITER_MAX_SOURCES {
            buckets.retain(|_, (t, s)| Self::level(*t, *s, now) < REJECT_BURST);
        }
        let entry = buckets
            .entry(self.source_prefix.of(ip))
            .or_insert((REJECT_BURST, now));
        let level = Self::level(entry.0, entry.1, now);
        if level < 1.0 {
            return false;
        }
        *entry = (level - 1.0, now);
        true
    }

    /// Gives back the token of a connection that became a tunnel.
    fn refund(&self, ip: IpAddr) {
        let Ok(mut buckets) = self.buckets.lock() else {
            return;
        };
        let now = Instant::now();
        if let Some(entry) = buckets.get_mut(&self.source_prefix.of(ip)) {
            let level = Self::level(entry.0, entry.1, now);
            *entry = ((level + 1.0).min(REJECT_BURST), now);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn jwt(claims: &str) -> String {
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.{}",
            enc(r#"{"typ":"JWT","alg":"HS256"}"#),
            enc(claims),
            enc("sig")
        )
    }

    fn request(path: &str, protocol: Option<&str>) -> Request {
        let mut b = Request::builder().uri(path);
        if let Some(p) = protocol {
            b = b.header("sec-websocket-protocol", p);
        }
        b.body(()).unwrap()
    }

    const GOOD: &str = r#"{"id":"0190d6c4-8b5e-7d8a-9a3b-1b2c3d4e5f60","p":{"Udp":{"timeout":null}},"r":"127.0.0.1","rp":51820}"#;

    #[test]
    fn the_stock_clients_upgrade_passes() {
        let proto = format!("v1, authorization.bearer.{}", jwt(GOOD));
        assert_eq!(
            check_upgrade(&request("/s3cret/events", Some(&proto)), "s3cret", 51820),
            Ok(())
        );
    }

    #[test]
    fn wrong_prefix_claims_and_remotes_are_refused() {
        let proto = format!("v1, authorization.bearer.{}", jwt(GOOD));
        for path in [
            "/other/events",
            "/s3cre/events",
            "/s3cret/x",
            "/",
            "/s3cretX/events",
        ] {
            assert_eq!(
                check_upgrade(&request(path, Some(&proto)), "s3cret", 51820),
                Err(Rejection::WrongPrefix),
                "{path}"
            );
        }
        for proto in [None, Some("v1"), Some("v1, authorization.bearer.not-a-jwt")] {
            assert_eq!(
                check_upgrade(&request("/s3cret/events", proto), "s3cret", 51820),
                Err(Rejection::BadClaims)
            );
        }
        for claims in [
            r#"{"p":{"Udp":{"timeout":null}},"r":"10.0.0.1","rp":51820}"#,
            r#"{"p":{"Udp":{"timeout":null}},"r":"127.0.0.1","rp":22}"#,
            r#"{"p":{"Tcp":{"proxy_protocol":false}},"r":"127.0.0.1","rp":51820}"#,
        ] {
            let proto = format!("v1, authorization.bearer.{}", jwt(claims));
            assert_eq!(
                check_upgrade(&request("/s3cret/events", Some(&proto)), "s3cret", 51820),
                Err(Rejection::ForbiddenRemote),
                "{claims}"
            );
        }
        let v6 = format!(
            "v1, authorization.bearer.{}",
            jwt(r#"{"p":{"Udp":{"timeout":null}},"r":"[::1]","rp":51820}"#)
        );
        assert_eq!(
            check_upgrade(&request("/s3cret/events", Some(&v6)), "s3cret", 51820),
            Ok(())
        );
    }

    #[test]
    fn the_limiter_cuts_a_source_off_after_its_burst_and_spares_others() {
        let l = Limiter::new(SourcePrefix::DEFAULT);
        let bad: IpAddr = "192.0.2.3".parse().unwrap();
        let good: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..REJECT_BURST as usize {
            assert!(l.charge(bad));
        }
        assert!(!l.charge(bad));
        assert!(l.charge(good));
        // Upgrades that succeed give their token back: a working client never runs dry.
        for _ in 0..100 {
            assert!(l.charge(good));
            l.refund(good);
        }
    }

    #[test]
    fn the_limiter_counts_an_ipv6_prefix_as_one_source() {
        let l = Limiter::new(SourcePrefix::DEFAULT);
        for i in 0..REJECT_BURST as u16 {
            let ip = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, i + 1));
            assert!(l.charge(ip));
        }
        // Another address of the same /64 finds the bucket empty; another /64 does not.
        assert!(!l.charge("2001:db8:0:1::ffff".parse().unwrap()));
        assert!(l.charge("2001:db8:0:2::1".parse().unwrap()));
    }
}

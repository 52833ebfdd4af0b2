//! Serving HTTP/1.1 on an accepted connection: hyper with the listener's timeouts, the body
//! limit in front of the service, and graceful shutdown.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{Either, Full, Limited};
use hyper::{
    Request, Response, StatusCode,
    body::{Body, Frame, Incoming, SizeHint},
    header::{self, HeaderValue},
    server::conn::http1,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::watch, task::JoinSet, time::Instant};
use tracing::{debug, info};

use super::{Gate, Limits, SharedPort, accept::next_admitted};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body a service gets: the connection's body, cut off with an error past
/// `max_body_bytes` (a declared length over it never reaches the service: 413).
pub type RequestBody = Limited<Incoming>;

/// What a TLS listener's handshake step ended with (`Err`: the header-read timeout passed;
/// `Ok(None)`: the handshake failed, or the connection went elsewhere or ended), logged at
/// debug as the listener `what`.
fn handshake_done<IO>(
    what: &str,
    result: Result<Option<IO>, tokio::time::error::Elapsed>,
) -> Option<IO> {
    match result {
        Ok(Some(io)) => Some(io),
        Ok(None) => {
            debug!("{what} TLS handshake failed or the connection went to another service");
            None
        }
        Err(_) => {
            debug!("{what} TLS handshake not done within the header-read timeout");
            None
        }
    }
}

/// One listener's HTTP front: its limits and its connection gate. Cheap to clone; clones share
/// the gate, so a listener served by several threads has one set of caps.
#[derive(Clone, Debug)]
pub struct Server {
    what: &'static str,
    limits: Limits,
    gate: Arc<Gate>,
}

impl Server {
    /// `what` names the listener in logs.
    pub fn new(what: &'static str, limits: Limits) -> Self {
        Self::with_gate(what, limits, Arc::new(Gate::new(&limits)))
    }

    /// A server whose per-source cap spares `exempt` (trusted reverse proxies).
    pub fn with_exempt(what: &'static str, limits: Limits, exempt: Vec<IpAddr>) -> Self {
        Self::with_gate(what, limits, Arc::new(Gate::with_exempt(&limits, exempt)))
    }

    fn with_gate(what: &'static str, limits: Limits, gate: Arc<Gate>) -> Self {
        Self { what, limits, gate }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The connection caps and their counters.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// Serves `listener` until `shutdown` changes: each admitted connection gets the service
    /// `make_service(peer)` returns. Then stops accepting (the listener is closed), lets
    /// requests in flight finish within `shutdown_grace`, cuts what is left, and returns.
    ///
    /// Connections run on the calling runtime, so a current-thread runtime keeps each of its
    /// connections on its own thread.
    pub async fn serve<F, S, B>(
        &self,
        listener: TcpListener,
        shutdown: watch::Receiver<bool>,
        make_service: F,
    ) where
        F: Fn(SocketAddr) -> S,
        S: hyper::service::Service<Request<RequestBody>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        self.serve_io(listener, shutdown, make_service, |tcp, _| {
            std::future::ready(Some(tcp))
        })
        .await
    }

    /// [`Server::serve`] over TLS: each admitted connection's handshake must end within the
    /// header-read timeout (a failed or slow one is closed without an answer); the request
    /// heads then get the header-read timeout of their own.
    pub async fn serve_tls<F, S, B>(
        &self,
        listener: TcpListener,
        shutdown: watch::Receiver<bool>,
        tls: Arc<tokio_rustls::rustls::ServerConfig>,
        make_service: F,
    ) where
        F: Fn(SocketAddr) -> S,
        S: hyper::service::Service<Request<RequestBody>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let deadline = self.limits.header_read_timeout;
        let what = self.what;
        self.serve_io(listener, shutdown, make_service, move |tcp, _| {
            let acceptor = acceptor.clone();
            async move {
                let accepted = tokio::time::timeout(deadline, acceptor.accept(tcp)).await;
                handshake_done(what, accepted.map(|r| r.ok()))
            }
        })
        .await
    }

    /// [`Server::serve_tls`] on a port another service may join ([`SharedPort`]): after the
    /// handshake, a connection whose first bytes are the joiner's prefix goes to the joiner;
    /// the handshake and that first look together end within the header-read timeout.
    pub async fn serve_tls_shared<F, S, B>(
        &self,
        listener: TcpListener,
        shutdown: watch::Receiver<bool>,
        tls: Arc<tokio_rustls::rustls::ServerConfig>,
        share: Arc<SharedPort>,
        make_service: F,
    ) where
        F: Fn(SocketAddr) -> S,
        S: hyper::service::Service<Request<RequestBody>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let deadline = self.limits.header_read_timeout;
        let what = self.what;
        self.serve_io(listener, shutdown, make_service, move |tcp, peer| {
            let (acceptor, share) = (acceptor.clone(), Arc::clone(&share));
            async move {
                let looked = tokio::time::timeout(deadline, async {
                    let tls = acceptor.accept(tcp).await.ok()?;
                    share.divert(tls, peer).await
                })
                .await;
                handshake_done(what, looked)
            }
        })
        .await
    }

    /// Serves connections made by `handshake` from each admitted TCP stream (the stream
    /// itself, or TLS over it); the handshake runs in the connection's task, holding its
    /// place in the gate.
    async fn serve_io<F, S, B, H, HF, IO>(
        &self,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
        make_service: F,
        handshake: H,
    ) where
        F: Fn(SocketAddr) -> S,
        S: hyper::service::Service<Request<RequestBody>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
        H: Fn(tokio::net::TcpStream, SocketAddr) -> HF,
        HF: Future<Output = Option<IO>> + Send + 'static,
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .keep_alive(true)
            .header_read_timeout(self.limits.header_read_timeout);
        let graceful = GracefulShutdown::new();
        let mut connections = JoinSet::new();
        while let Some((stream, peer, pass)) =
            next_admitted(&listener, &self.gate, &mut shutdown, self.what).await
        {
            // Reap what has ended since the last accept.
            while connections.try_join_next().is_some() {}
            let _ = stream.set_nodelay(true);
            let state = Arc::new(ConnState::new());
            let service = Guarded {
                inner: make_service(peer),
                max_body: self.limits.max_body_bytes,
                state: Arc::clone(&state),
            };
            let io = handshake(stream, peer);
            let watcher = graceful.watcher();
            let http = http.clone();
            let (idle_timeout, response_timeout, what) = (
                self.limits.idle_timeout,
                self.limits.response_timeout,
                self.what,
            );
            connections.spawn(async move {
                let _pass = pass;
                let Some(io) = io.await else {
                    return;
                };
                let connection = watcher.watch(http.serve_connection(TokioIo::new(io), service));
                tokio::select! {
                    ended = connection => if let Err(e) = ended {
                        debug!(error = %e, "{what} connection ended with an error");
                    },
                    expired = expired(state, idle_timeout, response_timeout) => {
                        if expired == Expired::Response {
                            debug!("{what} response not sent within its timeout: connection cut");
                        }
                    }
                }
            });
        }
        drop(listener);
        if tokio::time::timeout(self.limits.shutdown_grace, graceful.shutdown())
            .await
            .is_err()
        {
            while connections.try_join_next().is_some() {}
            info!(
                cut = connections.len(),
                grace = ?self.limits.shutdown_grace,
                "{}: connections still busy at the end of the shutdown grace period are cut",
                self.what
            );
        }
        connections.shutdown().await;
    }
}

/// Requests in flight on one connection, since when the current one has been, and since when
/// it has had none. Plain atomics: a request costs two increments and two clock reads, and no
/// wake-up of the connection's timer (on the proxy's hot path a wake-up per request cost a
/// tenth of its throughput).
struct ConnState {
    in_flight: AtomicU32,
    /// When the last request ended, in milliseconds after `epoch`; 0 until a first response
    /// has been sent (a new connection is bounded by the header-read timeout alone).
    idle_since_ms: AtomicU64,
    /// When the request in flight started, in milliseconds after `epoch`.
    busy_since_ms: AtomicU64,
    epoch: Instant,
}

impl ConnState {
    fn new() -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            busy_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Milliseconds since `epoch`, at least 1 (0 means "not yet").
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// Why a connection's timer ended it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expired {
    /// No request in flight for the idle timeout since its last response.
    Idle,
    /// A response not sent in full within the response timeout.
    Response,
}

/// Returns once the connection has had no request in flight for `idle` since its last
/// response, or has had one request in flight for longer than `response` (when set). It looks
/// at the state when its timer fires, so no request wakes it: at the idle deadline when the
/// connection is idle, at the response deadline when it is busy, and otherwise an idle
/// timeout later. With a response timeout it never sleeps longer than that timeout, so a
/// response is cut at most one response timeout late (two in all).
async fn expired(
    state: Arc<ConnState>,
    idle: std::time::Duration,
    response: Option<std::time::Duration>,
) -> Expired {
    let at = |ms: u64| state.epoch + std::time::Duration::from_millis(ms);
    let nap = response.map_or(idle, |r| r.min(idle));
    loop {
        // `in_flight` first: a request stamps its start before it counts (Release/Acquire).
        let busy = state.in_flight.load(Ordering::Acquire) > 0;
        let now = Instant::now();
        if busy {
            match response {
                Some(limit) => {
                    let deadline = at(state.busy_since_ms.load(Ordering::Acquire)) + limit;
                    if now >= deadline {
                        return Expired::Response;
                    }
                    // Then look again: the request may have ended, or another begun.
                    tokio::time::sleep_until(deadline).await;
                }
                None => tokio::time::sleep(idle).await,
            }
            continue;
        }
        let since = state.idle_since_ms.load(Ordering::Acquire);
        if since == 0 {
            tokio::time::sleep(nap).await;
            continue;
        }
        let deadline = at(since) + idle;
        if now >= deadline {
            return Expired::Idle;
        }
        tokio::time::sleep_until(deadline.min(now + nap)).await;
    }
}

/// A request in flight; it ends when its response body has been sent (or dropped).
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn start(state: &Arc<ConnState>) -> Self {
        state.busy_since_ms.store(state.now_ms(), Ordering::Release);
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(state))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Stamp the time before the count drops, so the timer never sees an idle connection
        // with an older stamp.
        self.0
            .idle_since_ms
            .store(self.0.now_ms(), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The 413 every listener answers for a declared body over its limit. The connection closes
/// after it: the body is not read.
pub fn too_large(limit: u64) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!(
        "request body over {limit} bytes\n"
    ))));
    *r.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// The listener's service behind the body limit; it also counts requests in flight for the
/// idle timeout.
struct Guarded<S> {
    inner: S,
    max_body: u64,
    state: Arc<ConnState>,
}

pin_project_lite::pin_project! {
    /// A request's answer with its time in flight attached. A named type, not a boxed async
    /// block: hyper keeps a connection's service future in one slot allocated when the
    /// connection starts, so a request costs no allocation here (a boxed block was the
    /// largest allocation of every proxied request, twice the size of the service's own
    /// future; docs/benchmarks.md, fourteenth stop).
    #[project = GuardedProj]
    enum GuardedFuture<F> {
        Pending {
            #[pin]
            future: F,
            request: Option<InFlight>,
        },
        TooLarge {
            reply: Option<Response<Full<Bytes>>>,
            request: Option<InFlight>,
        },
    }
}

impl<F, B, E> Future for GuardedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            GuardedProj::Pending { future, request } => {
                let response = match std::task::ready!(future.poll(cx)) {
                    Ok(r) => r,
                    Err(e) => return Poll::Ready(Err(e.into())),
                };
                Poll::Ready(match request.take() {
                    Some(request) => Ok(response.map(|b| ResponseBody {
                        inner: Either::Left(b),
                        _request: request,
                    })),
                    None => Err(POLLED_AGAIN.into()),
                })
            }
            GuardedProj::TooLarge { reply, request } => {
                Poll::Ready(match (reply.take(), request.take()) {
                    (Some(reply), Some(request)) => Ok(reply.map(|b| ResponseBody {
                        inner: Either::Right(b),
                        _request: request,
                    })),
                    _ => Err(POLLED_AGAIN.into()),
                })
            }
        }
    }
}

const POLLED_AGAIN: &str = "a request's answer was asked for after it was given";

impl<S, B> hyper::service::Service<Request<Incoming>> for Guarded<S>
where
    S: hyper::service::Service<Request<RequestBody>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<B>>;
    type Error = BoxError;
    type Future = GuardedFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let request = Some(InFlight::start(&self.state));
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body) {
            return GuardedFuture::TooLarge {
                reply: Some(too_large(self.max_body)),
                request,
            };
        }
        let limit = usize::try_from(self.max_body).unwrap_or(usize::MAX);
        GuardedFuture::Pending {
            future: self.inner.call(req.map(|b| Limited::new(b, limit))),
            request,
        }
    }
}

/// A response body that ends its request's time in flight when it is dropped.
pub struct ResponseBody<B> {
    inner: Either<B, Full<Bytes>>,
    _request: InFlight,
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An axum router as a listener's service: `server.serve(listener, shutdown, router(app))`.
/// Handlers read the peer with `ConnectInfo<SocketAddr>`.
pub fn router(
    router: axum::Router,
) -> impl Fn(SocketAddr) -> WithPeer<TowerToHyperService<axum::Router>> + Send + Sync + 'static {
    move |peer| WithPeer {
        inner: TowerToHyperService::new(router.clone()),
        peer,
    }
}

/// A service whose requests carry their connection's peer as `ConnectInfo` (what axum's
/// extractor reads). Only routers pay for the extension; the sentry proxy gets the peer
/// directly.
pub struct WithPeer<S> {
    inner: S,
    peer: SocketAddr,
}

impl<S, B> hyper::service::Service<Request<B>> for WithPeer<S>
where
    S: hyper::service::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut req: Request<B>) -> Self::Future {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        self.inner.call(req)
    }
}

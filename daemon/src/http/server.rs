//! Serving HTTP/1.1 on an accepted connection: hyper with the listener's timeouts, the body
//! limit in front of the service, and graceful shutdown.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
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

use super::{Gate, Limits, accept::next_admitted};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body a service gets: the connection's body, cut off with an error past
/// `max_body_bytes` (a declared length over it never reaches the service: 413).
pub type RequestBody = Limited<Incoming>;

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
        mut shutdown: watch::Receiver<bool>,
        make_service: F,
    ) where
        F: Fn(SocketAddr) -> S,
        S: hyper::service::Service<Request<RequestBody>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
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
            let (state, idle) = watch::channel(ConnState::default());
            let service = Guarded {
                inner: make_service(peer),
                peer,
                max_body: self.limits.max_body_bytes,
                state: Arc::new(state),
            };
            let connection = graceful
                .watcher()
                .watch(http.serve_connection(TokioIo::new(stream), service));
            let (idle_timeout, what) = (self.limits.idle_timeout, self.what);
            connections.spawn(async move {
                let _pass = pass;
                tokio::select! {
                    ended = connection => if let Err(e) = ended {
                        debug!(error = %e, "{what} connection ended with an error");
                    },
                    () = idle_expired(idle, idle_timeout) => {}
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

/// Requests in flight on one connection, and since when it has had none.
#[derive(Clone, Copy, Debug, Default)]
struct ConnState {
    in_flight: u32,
    /// `None` until a first response has been sent: a new connection is bounded by the
    /// header-read timeout alone.
    idle_since: Option<Instant>,
}

/// Returns once the connection has had no request in flight for `timeout` since its last
/// response. Only the start of idleness is signalled; a request starting is seen when the
/// timer fires.
async fn idle_expired(mut state: watch::Receiver<ConnState>, timeout: std::time::Duration) {
    loop {
        let seen = *state.borrow_and_update();
        let changed = match (seen.in_flight, seen.idle_since) {
            (0, Some(since)) => tokio::select! {
                () = tokio::time::sleep_until(since + timeout) => {
                    let now = *state.borrow();
                    if now.in_flight == 0 && now.idle_since == Some(since) {
                        return;
                    }
                    Ok(())
                }
                changed = state.changed() => changed,
            },
            _ => state.changed().await,
        };
        if changed.is_err() {
            // The connection is gone; the caller stops polling us with it.
            std::future::pending::<()>().await;
        }
    }
}

/// A request in flight; it ends when its response body has been sent (or dropped).
struct InFlight(Arc<watch::Sender<ConnState>>);

impl InFlight {
    fn start(state: &Arc<watch::Sender<ConnState>>) -> Self {
        // Not signalled: the idle timer checks the state when it fires (a wake-up per
        // request saved on the proxy's hot path).
        state.send_if_modified(|s| {
            s.in_flight += 1;
            s.idle_since = None;
            false
        });
        Self(Arc::clone(state))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_if_modified(|s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 {
                s.idle_since = Some(Instant::now());
            }
            s.in_flight == 0
        });
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
/// idle timeout and hands every request its peer (`axum::extract::ConnectInfo` for routers).
struct Guarded<S> {
    inner: S,
    peer: SocketAddr,
    max_body: u64,
    state: Arc<watch::Sender<ConnState>>,
}

type GuardedFuture<B> =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody<B>>, BoxError>> + Send>>;

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
    type Future = GuardedFuture<B>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let request = InFlight::start(&self.state);
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body) {
            let reply = too_large(self.max_body).map(|b| ResponseBody {
                inner: Either::Right(b),
                _request: request,
            });
            return Box::pin(std::future::ready(Ok(reply)));
        }
        let limit = usize::try_from(self.max_body).unwrap_or(usize::MAX);
        let mut req = req.map(|b| Limited::new(b, limit));
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        let pending = self.inner.call(req);
        Box::pin(async move {
            let response = pending.await.map_err(Into::into)?;
            Ok(response.map(|b| ResponseBody {
                inner: Either::Left(b),
                _request: request,
            }))
        })
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
) -> impl Fn(SocketAddr) -> TowerToHyperService<axum::Router> + Send + Sync + 'static {
    move |_peer| TowerToHyperService::new(router.clone())
}

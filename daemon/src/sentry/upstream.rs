//! One proxy thread's keep-alive connections to `[sentry] upstream`: HTTP/1.1 over hyper's
//! connection API, at most [`MAX_IDLE`] kept, each dropped after [`IDLE_TIMEOUT`] unused.
//!
//! Each proxy thread has its own set (docs/sentry.md "The proxy"), so a request takes a
//! connection without a lock anyone else waits on, hashes no pool key and spawns no task to
//! return the connection: a connection goes back on the list as soon as the answer's head has
//! arrived, and is taken again only once hyper reports it ready for the next request (its
//! previous answer read to the end). What hyper-util's general client did per request for
//! the same (a shared pool keyed by scheme and host, a connect future built each time, a task
//! per answer still streaming) cost the proxy more than the decision itself.

use std::{
    collections::VecDeque,
    sync::Mutex,
    time::{Duration, Instant},
};

use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::http1::{self, SendRequest},
    header::{self, HeaderValue},
    http::uri::Authority,
};
use hyper_util::rt::TokioIo;
use tracing::debug;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of what the proxy sends and answers.
pub type ProxyBody = http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>;

/// How long a new connection to the upstream may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// An unused connection is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections kept per proxy thread; past it, a connection is closed when its exchange ends.
pub const MAX_IDLE: usize = 256;

struct Kept {
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

pub struct Upstream {
    authority: Authority,
    /// `host:port` to connect to.
    target: String,
    /// Oldest first; the newest is tried first (its socket is the warmest).
    kept: Mutex<VecDeque<Kept>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Upstream {
    pub fn new(authority: Authority) -> Self {
        let target = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        Self {
            authority,
            target,
            kept: Mutex::new(VecDeque::new()),
        }
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Connections held now (busy or idle).
    pub fn kept(&self) -> usize {
        lock(&self.kept).len()
    }

    /// Sends `req`, whose URI is the target in origin form (`/path?query`); a request without
    /// `Host` gets the upstream's. On a kept connection when one is ready, else on a new one;
    /// a request a kept connection could not take (closed just before: the upstream's own
    /// idle timeout) is sent again on a new connection, as it was never sent.
    pub async fn send(&self, mut req: Request<ProxyBody>) -> Result<Response<Incoming>, BoxError> {
        if !req.headers().contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(self.authority.as_str())
        {
            req.headers_mut().insert(header::HOST, host);
        }
        if let Some(mut sender) = self.take() {
            match sender.try_send_request(req).await {
                Ok(answer) => {
                    self.put_back(sender);
                    return Ok(answer);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        let mut sender = self.connect().await?;
        let answer = sender.send_request(req).await?;
        self.put_back(sender);
        Ok(answer)
    }

    /// The newest kept connection that is ready for a request; closed and expired ones are
    /// dropped on the way.
    fn take(&self) -> Option<SendRequest<ProxyBody>> {
        let now = Instant::now();
        let mut kept = lock(&self.kept);
        while kept
            .front()
            .is_some_and(|k| now.duration_since(k.since) >= IDLE_TIMEOUT)
        {
            kept.pop_front();
        }
        let mut i = kept.len();
        while i > 0 {
            i -= 1;
            let (ready, closed) = match kept.get(i) {
                Some(k) => (k.sender.is_ready(), k.sender.is_closed()),
                None => break,
            };
            if ready {
                return kept.remove(i).map(|k| k.sender);
            }
            if closed {
                kept.remove(i);
            }
        }
        None
    }

    /// Keeps `sender` for a next request (it is taken only once ready: its answer read).
    fn put_back(&self, sender: SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        let mut kept = lock(&self.kept);
        if kept.len() < MAX_IDLE {
            kept.push_back(Kept {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Drops the connections closed by the upstream or unused for [`IDLE_TIMEOUT`] (a
    /// connection still streaming an answer finishes it first).
    pub fn reap(&self) {
        let now = Instant::now();
        lock(&self.kept)
            .retain(|k| !k.sender.is_closed() && now.duration_since(k.since) < IDLE_TIMEOUT);
    }

    async fn connect(&self) -> Result<SendRequest<ProxyBody>, BoxError> {
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(self.target.as_str()),
        )
        .await
        .map_err(|_| format!("connecting to {} timed out", self.target))??;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

pin_project_lite::pin_project! {
    /// The upstream's answer body, cut off with an error once the upstream has sent nothing
    /// for `timeout` while the answer is unfinished. The timer is armed only while the body
    /// has nothing to give: most answers arrive whole with their head, and their frames cost
    /// no timer. (tower-http's `TimeoutBody` armed and cleared one before every frame, two or
    /// three timers a request on the proxy's path; docs/benchmarks.md, fourteenth stop.)
    pub struct StallTimeoutBody<B> {
        timeout: Duration,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
        #[pin]
        body: B,
    }
}

impl<B> StallTimeoutBody<B> {
    pub fn new(timeout: Duration, body: B) -> Self {
        Self {
            timeout,
            sleep: None,
            body,
        }
    }
}

impl<B> hyper::body::Body for StallTimeoutBody<B>
where
    B: hyper::body::Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, BoxError>>> {
        use std::task::Poll;
        let mut this = self.project();
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            if this.sleep.is_some() {
                this.sleep.set(None);
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        // Nothing to give: the wait counts from the first poll that found nothing.
        if this.sleep.is_none() {
            this.sleep.set(Some(tokio::time::sleep(*this.timeout)));
        }
        if let Some(sleep) = this.sleep.as_pin_mut()
            && sleep.poll(cx).is_ready()
        {
            return Poll::Ready(Some(Err(format!(
                "the upstream sent nothing for {} s in the middle of its answer",
                this.timeout.as_secs_f64()
            )
            .into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::{
        convert::Infallible,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
    };

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::{server::conn::http1 as server, service::service_fn};

    use super::*;

    /// A hyper site on loopback that counts its connections, answers each request with the
    /// `Host` it got and, with `close`, closes every connection after one answer.
    async fn site(close: bool) -> (Authority, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let service = service_fn(|req: Request<Incoming>| async move {
                        let host = req
                            .headers()
                            .get(header::HOST)
                            .map(|h| h.as_bytes().to_vec())
                            .unwrap_or_default();
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(host))))
                    });
                    let _ = server::Builder::new()
                        .keep_alive(!close)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr.to_string().parse().unwrap(), accepted)
    }

    fn get(host: Option<&str>) -> Request<ProxyBody> {
        let mut req = Request::new(
            Full::new(Bytes::new())
                .map_err(|never: Infallible| match never {})
                .boxed(),
        );
        *req.uri_mut() = "/x".parse().unwrap();
        if let Some(h) = host {
            req.headers_mut()
                .insert(header::HOST, HeaderValue::from_str(h).unwrap());
        }
        req
    }

    async fn body(r: Response<Incoming>) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sequential_requests_share_one_connection_and_keep_the_clients_host() {
        let (authority, accepted) = site(false).await;
        let up = Upstream::new(authority.clone());
        for _ in 0..5 {
            let r = up.send(get(Some("www.example"))).await.unwrap();
            assert_eq!(body(r).await, "www.example");
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
        assert_eq!(up.kept(), 1);
        // Without a Host of its own, the request names the upstream.
        let r = up.send(get(None)).await.unwrap();
        assert_eq!(body(r).await, authority.as_str());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_upstream_closed_is_replaced() {
        let (authority, accepted) = site(true).await;
        let up = Upstream::new(authority);
        for _ in 0..3 {
            let r = up.send(get(Some("a"))).await.unwrap();
            assert_eq!(body(r).await, "a");
            // Let the connection's end be seen, as a later request would.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 3);
        up.reap();
        assert_eq!(up.kept(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_requests_get_connections_of_their_own() {
        let (authority, accepted) = site(false).await;
        let up = Arc::new(Upstream::new(authority));
        let answers = futures_util::future::join_all((0..4).map(|_| {
            let up = Arc::clone(&up);
            async move { body(up.send(get(Some("c"))).await.unwrap()).await }
        }))
        .await;
        assert!(answers.iter().all(|a| a == "c"));
        assert_eq!(accepted.load(Ordering::Relaxed), 4);
        // Then one at a time: the kept ones serve, no new connection.
        for _ in 0..4 {
            body(up.send(get(Some("c"))).await.unwrap()).await;
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 4);
    }

    /// An answer that arrives whole is passed through; one whose upstream stops half way is
    /// cut off with an error after the wait, not held open.
    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_that_stalls_half_way_is_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = [0u8; 1024];
                    let n = stream.read(&mut head).await.unwrap_or(0);
                    let stall = head[..n].starts_with(b"GET /stall");
                    let answer: &[u8] = if stall {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nwhole"
                    };
                    let _ = stream.write_all(answer).await;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                });
            }
        });
        let up = Upstream::new(addr.to_string().parse().unwrap());
        let wait = Duration::from_millis(200);
        let r = up.send(get(Some("a"))).await.unwrap();
        let whole = StallTimeoutBody::new(wait, r.into_body()).collect().await;
        assert_eq!(whole.unwrap().to_bytes().as_ref(), b"whole");

        // A connection of its own: the site answers one request per connection.
        let up = Upstream::new(addr.to_string().parse().unwrap());
        let mut req = get(Some("a"));
        *req.uri_mut() = "/stall".parse().unwrap();
        let r = up.send(req).await.unwrap();
        let started = Instant::now();
        let cut = StallTimeoutBody::new(wait, r.into_body()).collect().await;
        assert!(cut.is_err(), "a stalled answer ended without an error");
        let took = started.elapsed();
        assert!(took >= wait && took < Duration::from_secs(4), "{took:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_upstream_that_is_not_there_is_an_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let up = Upstream::new(format!("127.0.0.1:{port}").parse().unwrap());
        assert!(up.send(get(Some("a"))).await.is_err());
        assert_eq!(up.kept(), 0);
    }
}

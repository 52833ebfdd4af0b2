//! The layer under abuse, on real loopback sockets, with short limits. Each test ends by
//! checking the listener still serves a plain request. Timeouts in here bound the tests; none
//! asserts how fast anything is.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use axum::{
    Router,
    extract::{ConnectInfo, State},
    routing::{get, post},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{Notify, mpsc, watch},
    task::JoinHandle,
};

use super::*;

/// Long enough never to decide a test by itself.
const BOUND: Duration = Duration::from_secs(20);

fn limits() -> Limits {
    Limits {
        listener: "test",
        response_timeout: None,
        header_read_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        max_connections: 64,
        max_connections_per_source: 64,
        max_body_bytes: 1024,
        shutdown_grace: Duration::from_secs(30),
        source_prefix: crate::source::SourcePrefix::DEFAULT,
    }
}

#[derive(Clone)]
struct Slow {
    entered: mpsc::UnboundedSender<()>,
    release: Arc<Notify>,
}

struct TestServer {
    addr: SocketAddr,
    server: Server,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    entered: mpsc::UnboundedReceiver<()>,
    release: Arc<Notify>,
}

/// `GET /` → "ok"; `POST /echo` → the body's length; `GET /peer` → the client's address;
/// `GET /slow` → "done" once the test releases it.
async fn start(limits: Limits) -> TestServer {
    let (entered_tx, entered) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/echo",
            post(|body: axum::body::Bytes| async move { format!("got {} bytes", body.len()) }),
        )
        .route(
            "/big",
            get(|| async {
                // 64 MiB: far more than the socket buffers hold.
                let chunk = bytes::Bytes::from(vec![b'x'; 1 << 20]);
                axum::body::Body::from_stream(futures_util::stream::iter(
                    (0..64).map(move |_| Ok::<_, std::convert::Infallible>(chunk.clone())),
                ))
            }),
        )
        .route(
            "/peer",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.ip().to_string() }),
        )
        .route(
            "/slow",
            get(|State(slow): State<Slow>| async move {
                let _ = slow.entered.send(());
                slow.release.notified().await;
                "done"
            }),
        )
        .with_state(Slow {
            entered: entered_tx,
            release: Arc::clone(&release),
        });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new("test", limits);
    let (stop, rx) = watch::channel(false);
    let serving = server.clone();
    let task = tokio::spawn(async move { serving.serve(listener, rx, router(app)).await });
    TestServer {
        addr,
        server,
        stop,
        task,
        entered,
        release,
    }
}

async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// Reads one response (with a Content-Length body) from `stream`.
async fn read_reply(stream: &mut TcpStream) -> Reply {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(BOUND, stream.read(&mut buf))
            .await
            .expect("a reply in time")
            .expect("read");
        assert!(n > 0, "closed before a full head: {raw:?}");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("content-length");
    while raw.len() < head_end + length {
        let n = tokio::time::timeout(BOUND, stream.read(&mut buf))
            .await
            .expect("a body in time")
            .expect("read");
        assert!(n > 0, "closed inside the body");
        raw.extend_from_slice(&buf[..n]);
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Reply {
        status,
        head,
        body: String::from_utf8_lossy(&raw[head_end..head_end + length]).to_string(),
    }
}

async fn request(stream: &mut TcpStream, raw: &str) -> Reply {
    stream.write_all(raw.as_bytes()).await.unwrap();
    read_reply(stream).await
}

const GET: &str = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";

/// True when the server closes `stream` without sending a byte.
async fn closed_without_reply(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(BOUND, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// A fresh connection from `source` gets its plain request answered.
async fn serves(addr: SocketAddr, source: &str) {
    let mut c = connect_from(source, addr).await;
    let r = request(&mut c, GET).await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"), "{r:?}");
}

/// Polls `cond` until it holds (bounded).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + BOUND;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn headers_sent_a_byte_a_second_are_cut_off_at_the_header_read_timeout() {
    let t = start(Limits {
        header_read_timeout: Duration::from_secs(2),
        ..limits()
    })
    .await;
    let stream = connect_from("127.0.0.1", t.addr).await;
    let (mut rd, mut wr) = stream.into_split();
    let head = b"GET / HTTP/1.1\r\nHost: slowloris.example\r\n\r\n";
    let mut sent = 0;
    let mut buf = [0u8; 256];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let ended = loop {
        tokio::select! {
            r = rd.read(&mut buf) => break r,
            _ = tick.tick() => if sent < head.len() {
                if wr.write_all(&head[sent..=sent]).await.is_err() {
                    break Ok(0);
                }
                sent += 1;
            },
        }
    };
    assert!(
        matches!(ended, Ok(0) | Err(_)),
        "closed without an answer: {ended:?}"
    );
    assert!(sent < head.len(), "cut off before the head was complete");
    serves(t.addr, "127.0.0.1").await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let mut t = start(Limits {
        idle_timeout: Duration::from_secs(1),
        ..limits()
    })
    .await;
    let mut c = connect_from("127.0.0.1", t.addr).await;
    // Keep-alive works: two requests on one connection.
    assert_eq!(request(&mut c, GET).await.status, 200);
    assert_eq!(request(&mut c, GET).await.status, 200);
    // A request in flight longer than the idle timeout is not idle.
    c.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    t.entered.recv().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    t.release.notify_one();
    let r = read_reply(&mut c).await;
    assert_eq!((r.status, r.body.as_str()), (200, "done"));
    // Then nothing: closed by the idle timeout (the header-read clock would take 30 s, more
    // than BOUND).
    assert!(closed_without_reply(&mut c).await);
    // A new connection that sends nothing is bounded by the header-read timeout only.
    let mut fresh = connect_from("127.0.0.1", t.addr).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(request(&mut fresh, GET).await.status, 200);
    serves(t.addr, "127.0.0.1").await;
}

#[tokio::test]
async fn a_response_the_client_stops_reading_is_cut_at_the_response_timeout() {
    let t = start(Limits {
        response_timeout: Some(Duration::from_secs(1)),
        ..limits()
    })
    .await;
    // Requests that end within the timeout leave the connection alone, however long it lives.
    let mut c = connect_from("127.0.0.1", t.addr).await;
    assert_eq!(request(&mut c, GET).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(request(&mut c, GET).await.status, 200);
    // A large body the client never reads: the connection is cut and its slot freed.
    let mut stalled = connect_from("127.0.0.2", t.addr).await;
    // The request comes after the connection's timer has gone to sleep.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stalled
        .write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let (gate, source) = (Arc::clone(t.server.gate()), IpAddr::from([127, 0, 0, 2]));
    eventually("the source's connection is in", || {
        gate.open_from(source) == 1
    })
    .await;
    eventually("the stalled transfer is cut", || {
        gate.open_from(source) == 0
    })
    .await;
    assert_eq!(request(&mut c, GET).await.status, 200);
    serves(t.addr, "127.0.0.2").await;
}

#[tokio::test]
async fn the_global_cap_refuses_one_more_and_admits_again_when_one_closes() {
    let t = start(Limits {
        max_connections: 2,
        ..limits()
    })
    .await;
    let mut held1 = connect_from("127.0.0.1", t.addr).await;
    let mut held2 = connect_from("127.0.0.2", t.addr).await;
    assert_eq!(request(&mut held1, GET).await.status, 200);
    assert_eq!(request(&mut held2, GET).await.status, 200);
    for source in ["127.0.0.1", "127.0.0.3"] {
        let mut over = connect_from(source, t.addr).await;
        let _ = over.write_all(GET.as_bytes()).await;
        assert!(closed_without_reply(&mut over).await, "{source}");
    }
    let counts = t.server.gate().counts();
    assert_eq!((counts.open, counts.refused_full), (2, 2), "{counts:?}");
    drop(held1);
    let gate = Arc::clone(t.server.gate());
    eventually("a slot freed", || gate.counts().open == 1).await;
    serves(t.addr, "127.0.0.3").await;
    // The held connection was never disturbed.
    assert_eq!(request(&mut held2, GET).await.status, 200);
}

#[tokio::test]
async fn the_per_source_cap_refuses_that_source_and_lets_others_in() {
    let t = start(Limits {
        max_connections_per_source: 2,
        ..limits()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = connect_from("127.0.0.2", t.addr).await;
        assert_eq!(request(&mut c, GET).await.status, 200);
        held.push(c);
    }
    let mut over = connect_from("127.0.0.2", t.addr).await;
    let _ = over.write_all(GET.as_bytes()).await;
    assert!(closed_without_reply(&mut over).await);
    assert_eq!(t.server.gate().counts().refused_source, 1);
    // Another source gets in, and handlers see its address.
    let mut other = connect_from("127.0.0.3", t.addr).await;
    let r = request(&mut other, "GET /peer HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!((r.status, r.body.as_str()), (200, "127.0.0.3"));
    // One of the source's connections closes: it gets in again.
    drop(held.pop());
    let (gate, source) = (Arc::clone(t.server.gate()), IpAddr::from([127, 0, 0, 2]));
    eventually("the source's slot freed", || gate.open_from(source) == 1).await;
    serves(t.addr, "127.0.0.2").await;
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_and_the_listener_keeps_serving() {
    let t = start(Limits {
        max_body_bytes: 16,
        ..limits()
    })
    .await;
    // Declared: answered before a byte of the body is read, then closed.
    let mut c = connect_from("127.0.0.1", t.addr).await;
    let r = request(
        &mut c,
        "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.body, "request body over 16 bytes\n");
    assert!(
        r.head.to_ascii_lowercase().contains("connection: close"),
        "{}",
        r.head
    );
    assert!(closed_without_reply(&mut c).await);
    // Streamed (chunked): cut off where it passes the limit; the router answers 413.
    let mut c = connect_from("127.0.0.1", t.addr).await;
    let r = request(
        &mut c,
        "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\
         a\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 413, "{r:?}");
    // Within the limit: answered, and the connection stays usable.
    let mut c = connect_from("127.0.0.1", t.addr).await;
    let r = request(
        &mut c,
        "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 16\r\n\r\n0123456789abcdef",
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, "got 16 bytes"));
    assert_eq!(request(&mut c, GET).await.status, 200);
    serves(t.addr, "127.0.0.1").await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_requests_in_flight_and_refuses_new_connections() {
    let mut t = start(limits()).await;
    let mut idle = connect_from("127.0.0.1", t.addr).await;
    assert_eq!(request(&mut idle, GET).await.status, 200);
    let mut busy = connect_from("127.0.0.1", t.addr).await;
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    t.entered.recv().await.unwrap();

    t.stop.send(true).unwrap();
    // The idle connection is closed at once; the listener goes away.
    assert!(closed_without_reply(&mut idle).await);
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        match TcpStream::connect(t.addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            Err(e) => panic!("{e}"),
            // Accepted by the kernel just before the listener closed: never served.
            Ok(mut late) => {
                let _ = late.write_all(GET.as_bytes()).await;
                assert!(closed_without_reply(&mut late).await);
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The request in flight finishes, then its connection closes and serving ends.
    t.release.notify_one();
    let r = read_reply(&mut busy).await;
    assert_eq!((r.status, r.body.as_str()), (200, "done"));
    assert!(closed_without_reply(&mut busy).await);
    tokio::time::timeout(BOUND, t.task)
        .await
        .expect("serving ends")
        .unwrap();
}

#[tokio::test]
async fn a_request_still_in_flight_after_the_grace_period_is_cut() {
    let mut t = start(Limits {
        shutdown_grace: Duration::from_secs(1),
        ..limits()
    })
    .await;
    let mut busy = connect_from("127.0.0.1", t.addr).await;
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    t.entered.recv().await.unwrap();
    t.stop.send(true).unwrap();
    tokio::time::timeout(BOUND, t.task)
        .await
        .expect("serving ends after the grace period")
        .unwrap();
    assert!(closed_without_reply(&mut busy).await);
    assert_eq!(t.server.gate().counts().open, 0);
}

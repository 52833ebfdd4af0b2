//! The resolver's listeners: UDP (one socket per worker with SO_REUSEPORT, so the kernel
//! spreads queries) and TCP, on the configured addresses or, with "auto", port 53 on the
//! WireGuard server address. A supervisor re-binds when that address changes
//! (`change_subnet`) and retries while it is not there yet.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{Semaphore, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use super::{Local, Resolver, wire};

/// Forwarded queries in flight at once; past this, SERVFAIL at once rather than queueing.
const MAX_IN_FLIGHT: usize = 4096;
const MAX_TCP_CONNECTIONS: usize = 512;
const TCP_IDLE: Duration = Duration::from_secs(10);
const SUPERVISE_EVERY: Duration = Duration::from_secs(2);

impl Resolver {
    /// Where the resolver should listen now.
    pub fn wanted_addrs(&self) -> Vec<SocketAddr> {
        match self.config().listen_addrs() {
            Ok(Some(list)) => list,
            Ok(None) => self
                .wireguard
                .as_ref()
                .map(|s| vec![SocketAddr::from((s.subnet().server_ip(), 53))])
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }
}

fn udp_socket(addr: SocketAddr, mark: u32) -> std::io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.set_mark(mark)?;
    if addr.is_ipv4() {
        s.set_freebind_v4(true)?;
    } else {
        s.set_only_v6(true)?;
        s.set_freebind_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.set_recv_buffer_size(4 << 20)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

fn tcp_listener(addr: SocketAddr, mark: u32) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_mark(mark)?;
    if addr.is_ipv4() {
        s.set_freebind_v4(true)?;
    } else {
        s.set_only_v6(true)?;
        s.set_freebind_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Fits an answer to what a UDP client takes: too long means header and question with TC.
fn fit_udp(resolver: &Resolver, answer: Vec<u8>, q: &wire::Question) -> Vec<u8> {
    if answer.len() > q.udp_size {
        resolver.stats.truncated.fetch_add(1, Ordering::Relaxed);
        wire::truncated(&answer, q.end)
    } else {
        answer
    }
}

async fn serve_udp(resolver: Arc<Resolver>, sock: Arc<UdpSocket>, in_flight: Arc<Semaphore>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors surface here on some kernels; the socket stays usable.
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    continue;
                }
                warn!(error = %e, "resolver UDP receive failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        resolver.stats.queries_udp.fetch_add(1, Ordering::Relaxed);
        let query = &buf[..n];
        match resolver.answer_locally(query, peer.ip()) {
            Local::Ignore => {}
            Local::Reply(answer, question) => {
                let answer = match question {
                    Some(q) => fit_udp(&resolver, answer, &q),
                    None => answer,
                };
                let _ = sock.send_to(&answer, peer).await;
            }
            Local::Forward(q) => {
                let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
                    let _ = sock
                        .send_to(&wire::rcode_reply(query, &q, wire::RCODE_SERVFAIL), peer)
                        .await;
                    continue;
                };
                let (resolver, sock, query) =
                    (Arc::clone(&resolver), Arc::clone(&sock), query.to_vec());
                tokio::spawn(async move {
                    let answer = resolver.forward(&query, &q).await;
                    let answer = fit_udp(&resolver, answer, &q);
                    let _ = sock.send_to(&answer, peer).await;
                    drop(permit);
                });
            }
        }
    }
}

async fn serve_tcp_connection(resolver: Arc<Resolver>, mut stream: TcpStream, peer: SocketAddr) {
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(len)) => len as usize,
            _ => return,
        };
        let mut query = vec![0u8; len];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        resolver.stats.queries_tcp.fetch_add(1, Ordering::Relaxed);
        let answer = match resolver.answer_locally(&query, peer.ip()) {
            Local::Ignore => return,
            Local::Reply(a, _) => a,
            Local::Forward(q) => resolver.forward(&query, &q).await,
        };
        let Ok(n) = u16::try_from(answer.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&n.to_be_bytes());
        framed.extend_from_slice(&answer);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

async fn serve_tcp(resolver: Arc<Resolver>, listener: TcpListener) {
    let connections = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Past the limit, new connections are closed at once.
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            continue;
        };
        let resolver = Arc::clone(&resolver);
        tokio::spawn(async move {
            serve_tcp_connection(resolver, stream, peer).await;
            drop(permit);
        });
    }
}

struct Bound {
    addrs: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Bound {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn bind_all(resolver: &Arc<Resolver>, addrs: &[SocketAddr]) -> std::io::Result<Bound> {
    let mark = resolver.config().answer_mark;
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut bound = Bound {
        addrs: addrs.to_vec(),
        tasks: Vec::new(),
    };
    for &addr in addrs {
        for _ in 0..workers {
            let sock = Arc::new(udp_socket(addr, mark)?);
            bound.tasks.push(tokio::spawn(serve_udp(
                Arc::clone(resolver),
                sock,
                Arc::clone(&in_flight),
            )));
        }
        let listener = tcp_listener(addr, mark)?;
        bound
            .tasks
            .push(tokio::spawn(serve_tcp(Arc::clone(resolver), listener)));
    }
    Ok(bound)
}

/// Runs the listeners until shutdown, re-binding when the wanted addresses change.
pub async fn run(resolver: Arc<Resolver>, mut shutdown: watch::Receiver<bool>) {
    let mut bound: Option<Bound> = None;
    let mut last_error: Option<String> = None;
    let mut tick = tokio::time::interval(SUPERVISE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => break,
        }
        let wanted = resolver.wanted_addrs();
        if bound.as_ref().is_some_and(|b| b.addrs == wanted) {
            continue;
        }
        bound = None;
        if wanted.is_empty() {
            set_listening(&resolver, Vec::new());
            continue;
        }
        match bind_all(&resolver, &wanted) {
            Ok(b) => {
                info!(listen = ?wanted, "DNS resolver listening (UDP and TCP)");
                set_listening(&resolver, wanted);
                last_error = None;
                bound = Some(b);
            }
            Err(e) => {
                set_listening(&resolver, Vec::new());
                let msg = format!("{e}");
                if last_error.as_deref() != Some(msg.as_str()) {
                    warn!(listen = ?wanted, error = %e, "DNS resolver cannot listen yet; retrying");
                    last_error = Some(msg);
                }
            }
        }
    }
    drop(bound);
}

fn set_listening(resolver: &Resolver, addrs: Vec<SocketAddr>) {
    match resolver.listening.lock() {
        Ok(mut l) => *l = addrs,
        Err(p) => *p.into_inner() = addrs,
    }
}

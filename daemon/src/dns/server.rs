//! The resolver's listeners: UDP (one socket per worker with SO_REUSEPORT, so the kernel
//! spreads queries) and TCP, on the configured addresses or, with "auto", port 53 on the
//! WireGuard server address. A supervisor re-binds when that address changes
//! (`change_subnet`) and retries while it is not there yet.

use std::{
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use super::{Local, Resolver, wire};

/// Forwarded queries in flight at once; past this, SERVFAIL at once rather than queueing.
const MAX_IN_FLIGHT: usize = 4096;
/// TCP connections at once, per listening address.
pub const MAX_TCP_CONNECTIONS: usize = 512;
const TCP_IDLE: Duration = Duration::from_secs(10);
const SUPERVISE_EVERY: Duration = Duration::from_secs(2);

impl Resolver {
    /// Where the resolver should listen now.
    pub fn wanted_addrs(&self) -> Vec<SocketAddr> {
        match self.config().listen_addrs() {
            Ok(Some(list)) => list,
            Ok(None) => self
                .server_address()
                .map(|ip| vec![SocketAddr::from((ip, 53))])
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }
}

/// A socket for `addr` with the answer mark, bindable before the address exists (the
/// WireGuard interface may come up after us).
fn marked_socket(
    addr: SocketAddr,
    ty: Type,
    proto: Protocol,
    mark: u32,
) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    s.set_mark(mark)?;
    if addr.is_ipv4() {
        s.set_freebind_v4(true)?;
    } else {
        s.set_only_v6(true)?;
        s.set_freebind_v6(true)?;
    }
    Ok(s)
}

fn udp_socket(addr: SocketAddr, mark: u32) -> std::io::Result<std::net::UdpSocket> {
    let s = marked_socket(addr, Type::DGRAM, Protocol::UDP, mark)?;
    s.set_reuse_port(true)?;
    // Blocking with a timeout: the worker threads look at their stop flag between reads.
    s.set_read_timeout(Some(WORKER_WAKE))?;
    // Forwarded answers are sent from async tasks on this blocking socket: a full send
    // buffer may hold a runtime worker this long at most (the answer is then dropped, as a
    // congested network would).
    s.set_write_timeout(Some(SEND_TIMEOUT))?;
    s.set_recv_buffer_size(4 << 20)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn tcp_listener(addr: SocketAddr, mark: u32) -> std::io::Result<TcpListener> {
    let s = marked_socket(addr, Type::STREAM, Protocol::TCP, mark)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Fits an answer to what a UDP client takes: too long means header and question with TC.
fn fit_udp(resolver: &Resolver, answer: &mut Vec<u8>, q: &wire::Question) {
    if answer.len() > q.udp_size {
        resolver.stats.truncated.fetch_add(1, Ordering::Relaxed);
        wire::truncate_in_place(answer, q.end);
    }
}

/// Datagrams read, and answers sent, per system call.
const BATCH: usize = 64;
/// The largest query read (EDNS clients rarely send more than a few hundred bytes).
const MAX_QUERY: usize = 4096;
/// The longest a send may wait for buffer space.
const SEND_TIMEOUT: Duration = Duration::from_millis(50);
/// How often an idle worker checks whether it should stop.
const WORKER_WAKE: Duration = Duration::from_millis(200);

/// The peer address of a received datagram, as the kernel gave it (it is where the answer
/// goes) and as a `SocketAddr` (for the policy and for forwarded answers).
fn peer(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in for AF_INET.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::from((
                std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 for AF_INET6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::from((
                std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
            )))
        }
        _ => None,
    }
}

/// What a worker keeps of an answer buffer between batches: most answers are a few hundred
/// bytes, and a rare large one (a cached answer fetched over TCP, up to 64 KiB, sent
/// truncated) must not pin its size in every buffer.
const ANSWER_KEPT: usize = 4096;
/// An answer buffer's first size.
const ANSWER_START: usize = 512;

/// One UDP worker thread (`[dns] udp_workers` of them per address): `recvmmsg` a batch, answer
/// what can be answered locally (blocked names, cache hits), `sendmmsg` the answers; misses go
/// to the async runtime. Batching keeps the system calls per query well under one when the
/// resolver is busy. Everything a batch needs is allocated once, when the worker starts: the
/// query and answer buffers, the peer addresses and both system calls' headers; the clock is
/// read once per batch.
fn udp_worker(
    resolver: Arc<Resolver>,
    sock: Arc<std::net::UdpSocket>,
    runtime: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
    in_flight: Arc<Semaphore>,
) {
    let fd = sock.as_raw_fd();
    let mut bufs = vec![0u8; BATCH * MAX_QUERY];
    // SAFETY: all-zero is a valid sockaddr_storage, iovec and mmsghdr (null pointers, zero
    // lengths); every pointer is set below before use.
    let mut addrs: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut iovs: Vec<libc::iovec> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut out = SendBatch::new();
    // One answer buffer per datagram of a batch, reused batch after batch.
    let mut answers: Vec<Vec<u8>> = (0..BATCH)
        .map(|_| Vec::with_capacity(ANSWER_START))
        .collect();
    // The datagrams of this batch answered here (their answers are in `answers`).
    let mut answered: Vec<usize> = Vec::with_capacity(BATCH);
    while !stop.load(Ordering::Relaxed) {
        for i in 0..BATCH {
            iovs[i].iov_base = bufs[i * MAX_QUERY..].as_mut_ptr().cast();
            iovs[i].iov_len = MAX_QUERY;
            hdrs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_len = 0;
        }
        // SAFETY: `hdrs` holds BATCH initialised headers whose buffers (`bufs`, `iovs`,
        // `addrs`, allocated once above and never resized) outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::Interrupted
                | std::io::ErrorKind::ConnectionRefused => {}
                _ => {
                    warn!(error = %e, "resolver UDP receive failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            continue;
        }
        let n = n as usize;
        let now = Instant::now();
        resolver
            .stats
            .queries_udp
            .fetch_add(n as u64, Ordering::Relaxed);
        for i in 0..n {
            let len = (hdrs[i].msg_len as usize).min(MAX_QUERY);
            let query = &bufs[i * MAX_QUERY..i * MAX_QUERY + len];
            let Some(from) = peer(&addrs[i]) else {
                continue;
            };
            let answer = &mut answers[i];
            match resolver.answer_locally(query, from.ip(), now, answer) {
                Local::Ignore => {}
                Local::Reply(question) => {
                    if let Some(q) = question {
                        fit_udp(&resolver, answer, &q);
                    }
                    answered.push(i);
                }
                Local::Forward(q, vetted) => {
                    let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
                        wire::write_rcode_reply(answer, query, &q, wire::RCODE_SERVFAIL);
                        answered.push(i);
                        continue;
                    };
                    let (resolver, sock, query) =
                        (Arc::clone(&resolver), Arc::clone(&sock), query.to_vec());
                    runtime.spawn(async move {
                        let mut answer = resolver.forward(&query, &q, vetted).await;
                        fit_udp(&resolver, &mut answer, &q);
                        // A UDP send does not block for long; a full buffer drops it, as
                        // the network would.
                        let _ = sock.send_to(&answer, from);
                        drop(permit);
                    });
                }
            }
        }
        out.send(fd, &answered, &mut answers, &mut addrs, &hdrs);
        for &i in &answered {
            if answers[i].capacity() > ANSWER_KEPT {
                answers[i] = Vec::with_capacity(ANSWER_START);
            }
        }
        answered.clear();
    }
}

/// The `sendmmsg` headers of a worker, allocated once.
struct SendBatch {
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl SendBatch {
    fn new() -> Self {
        Self {
            // SAFETY: as in `udp_worker`, all-zero values are valid and overwritten before
            // each use.
            iovs: vec![unsafe { std::mem::zeroed() }; BATCH],
            hdrs: vec![unsafe { std::mem::zeroed() }; BATCH],
        }
    }

    /// Sends the answers of the datagrams `answered` (indices into the batch) each to the
    /// address its query came from, in as few `sendmmsg` calls as the kernel allows.
    fn send(
        &mut self,
        fd: std::os::fd::RawFd,
        answered: &[usize],
        answers: &mut [Vec<u8>],
        addrs: &mut [libc::sockaddr_storage],
        received: &[libc::mmsghdr],
    ) {
        let count = answered.len();
        if count == 0 {
            return;
        }
        for (j, &i) in answered.iter().enumerate() {
            let answer = &mut answers[i];
            self.iovs[j].iov_base = answer.as_mut_ptr().cast();
            self.iovs[j].iov_len = answer.len();
            let hdr = &mut self.hdrs[j];
            hdr.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_hdr.msg_namelen = received[i].msg_hdr.msg_namelen;
            hdr.msg_hdr.msg_iov = &mut self.iovs[j];
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_len = 0;
        }
        let mut sent = 0;
        while sent < count {
            // SAFETY: the first `count` headers point at answers and addresses that live
            // until we return (nothing resizes them meanwhile).
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs[sent..count].as_mut_ptr(),
                    (count - sent) as u32,
                    0,
                )
            };
            if n <= 0 {
                // Skip the datagram the kernel refused (an unreachable peer) and go on.
                sent += 1;
            } else {
                sent += n as usize;
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
        let mut answer = Vec::new();
        let answer = match resolver.answer_locally(&query, peer.ip(), Instant::now(), &mut answer) {
            Local::Ignore => return,
            Local::Reply(_) => answer,
            Local::Forward(q, vetted) => resolver.forward(&query, &q, vetted).await,
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
    /// Tells the UDP worker threads to finish (they notice within `WORKER_WAKE`).
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Bound {
    /// Stops the workers and waits for them: at shutdown nothing may still hold the
    /// resolver (and through it the datapath, which detaches only when unreferenced).
    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn bind_all(resolver: &Arc<Resolver>, addrs: &[SocketAddr]) -> std::io::Result<Bound> {
    let mark = resolver.config().answer_mark;
    let workers = match resolver.config().udp_workers {
        // Half the CPUs: the rest stay for WireGuard's crypto and the clients' traffic, and
        // fewer, busier workers batch more per system call and sleep less often.
        0 => std::thread::available_parallelism().map_or(1, |n| n.get() / 2),
        n => n,
    }
    .clamp(1, 16);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut bound = Bound {
        addrs: addrs.to_vec(),
        tasks: Vec::new(),
        stop: Arc::new(AtomicBool::new(false)),
        threads: Vec::new(),
    };
    let runtime = tokio::runtime::Handle::current();
    for &addr in addrs {
        for n in 0..workers {
            let sock = Arc::new(udp_socket(addr, mark)?);
            let (resolver, runtime, stop, in_flight) = (
                Arc::clone(resolver),
                runtime.clone(),
                Arc::clone(&bound.stop),
                Arc::clone(&in_flight),
            );
            bound.threads.push(
                std::thread::Builder::new()
                    .name(format!("dns-udp-{n}"))
                    .spawn(move || udp_worker(resolver, sock, runtime, stop, in_flight))?,
            );
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
    if let Some(b) = bound {
        let _ = tokio::task::spawn_blocking(move || b.finish()).await;
    }
}

fn set_listening(resolver: &Resolver, addrs: Vec<SocketAddr>) {
    match resolver.listening.lock() {
        Ok(mut l) => *l = addrs,
        Err(p) => *p.into_inner() = addrs,
    }
    // DoT/DoQ to these addresses stay allowed.
    resolver.push_encrypted_dns();
}

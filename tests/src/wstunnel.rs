//! A client that behaves on the wire like the stock `wstunnel client` (v10) in
//! `-L 'udp://127.0.0.1:51820:127.0.0.1:51820?timeout_sec=0' wss://<host>:<port>` mode, as
//! described in shared/WSTUNNEL.md: the upgrade request and headers, the JWT claims, unmasked
//! binary frames (one datagram per frame), pings every `ping_every` with three unanswered
//! pings ending the tunnel, one WebSocket per local UDP source, no certificate verification.
//!
//! Also the raw pieces the refusal tests need: a single upgrade attempt with chosen path and
//! claims, and an upgraded connection to send arbitrary frames on.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use base64::Engine;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpSocket, TcpStream, UdpSocket},
    sync::mpsc,
};
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{
        self, ClientConfig, DigitallySignedStruct, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        pki_types::{CertificateDer, ServerName, UnixTime},
    },
};

use crate::NetNs;

pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct WstunnelOptions {
    /// The server's address (what `wss://<domain>:<port>` resolves to).
    pub server: SocketAddr,
    /// The URL host: SNI and the Host header.
    pub host: String,
    /// `--http-upgrade-path-prefix`.
    pub prefix: String,
    /// Local UDP listener (`-L udp://<this>:...`).
    pub local: SocketAddr,
    /// Remote in the claims (`-L udp://...:<host>:<port>`).
    pub remote_host: String,
    pub remote_port: u16,
    /// The stock client pings every 30 s.
    pub ping_every: Duration,
    /// Source address for the TCP connection (None = any).
    pub bind: Option<std::net::IpAddr>,
}

impl WstunnelOptions {
    pub fn new(server: SocketAddr, host: &str, prefix: &str) -> Self {
        Self {
            server,
            host: host.into(),
            prefix: prefix.into(),
            local: "127.0.0.1:51820"
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 51820))),
            remote_host: "127.0.0.1".into(),
            remote_port: 51820,
            ping_every: Duration::from_secs(30),
            bind: None,
        }
    }
}

/// What the client saw, for assertions.
#[derive(Debug, Default)]
pub struct WstunnelStats {
    pub tunnels_opened: AtomicU64,
    pub upgrades_refused: AtomicU64,
    pub frames_sent: AtomicU64,
    pub frames_received: AtomicU64,
    pub pings_sent: AtomicU64,
    pub pongs_received: AtomicU64,
    /// Frames from the server with the FIN bit clear or the mask bit set (must stay 0).
    pub bad_server_frames: AtomicU64,
}

/// The running client: a thread inside the namespace; stopped on drop.
pub struct WstunnelClient {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub stats: Arc<WstunnelStats>,
}

impl WstunnelClient {
    /// Binds the local UDP port inside `ns` (before returning) and starts relaying.
    pub fn start(ns: &NetNs, options: WstunnelOptions) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(WstunnelStats::default());
        let path = ns.path();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (stop, stats) = (Arc::clone(&stop), Arc::clone(&stats));
            std::thread::spawn(move || {
                let file = std::fs::File::open(&path).expect("open netns");
                nix::sched::setns(
                    std::os::fd::AsFd::as_fd(&file),
                    nix::sched::CloneFlags::CLONE_NEWNET,
                )
                .expect("setns");
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(run_client(options, stop, stats, ready_tx));
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("wstunnel test client did not bind its UDP port");
        Self {
            stop,
            thread: Some(thread),
            stats,
        }
    }
}

impl Drop for WstunnelClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn run_client(
    options: WstunnelOptions,
    stop: Arc<AtomicBool>,
    stats: Arc<WstunnelStats>,
    ready: std::sync::mpsc::Sender<()>,
) {
    let udp = Arc::new(
        UdpSocket::bind(options.local)
            .await
            .expect("bind local UDP"),
    );
    let _ = ready.send(());
    let mut tunnels: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut buf = vec![0u8; 65_535];
    while !stop.load(Ordering::Relaxed) {
        let received =
            tokio::time::timeout(Duration::from_millis(100), udp.recv_from(&mut buf)).await;
        let Ok(Ok((n, source))) = received else {
            continue;
        };
        tunnels.retain(|_, tx| !tx.is_closed());
        let tx = tunnels.entry(source).or_insert_with(|| {
            // One WebSocket per local UDP source, as the stock client does.
            let (tx, rx) = mpsc::channel(1024);
            tokio::spawn(tunnel(
                options.clone(),
                Arc::clone(&udp),
                source,
                rx,
                Arc::clone(&stats),
                Arc::clone(&stop),
            ));
            tx
        });
        // A full queue while connecting drops the datagram, as UDP may.
        let _ = tx.try_send(buf[..n].to_vec());
    }
}

async fn tunnel(
    options: WstunnelOptions,
    udp: Arc<UdpSocket>,
    source: SocketAddr,
    mut rx: mpsc::Receiver<Vec<u8>>,
    stats: Arc<WstunnelStats>,
    stop: Arc<AtomicBool>,
) {
    let path = format!("/{}/events", options.prefix);
    let jwt = stock_jwt(&options.remote_host, options.remote_port);
    let stream = match connect_upgraded(&options, &path, Some(&jwt)).await {
        Ok(s) => s,
        Err(_) => {
            stats.upgrades_refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    stats.tunnels_opened.fetch_add(1, Ordering::Relaxed);
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (pong_tx, mut pong_rx) = mpsc::channel::<Vec<u8>>(16);
    let read_stats = Arc::clone(&stats);
    let mut read_task = tokio::spawn(async move {
        loop {
            let Ok(frame) = read_frame(&mut reader).await else {
                return;
            };
            if !frame.fin || frame.masked {
                read_stats.bad_server_frames.fetch_add(1, Ordering::Relaxed);
            }
            match frame.opcode {
                OP_BINARY => {
                    read_stats.frames_received.fetch_add(1, Ordering::Relaxed);
                    let _ = udp.send_to(&frame.payload, source).await;
                }
                OP_PING => {
                    let _ = pong_tx.send(frame.payload).await;
                }
                OP_PONG => {
                    read_stats.pongs_received.fetch_add(1, Ordering::Relaxed);
                }
                OP_CLOSE => return,
                _ => {}
            }
        }
    });
    let mut ping = tokio::time::interval(options.ping_every);
    ping.tick().await;
    let mut unanswered = 0u32;
    let mut pongs_seen = 0u64;
    let mut alive = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = &mut read_task => break,
            datagram = rx.recv() => {
                let Some(d) = datagram else { break };
                if write_frame(&mut writer, OP_BINARY, &d, None).await.is_err() {
                    break;
                }
                stats.frames_sent.fetch_add(1, Ordering::Relaxed);
            }
            Some(payload) = pong_rx.recv() => {
                if write_frame(&mut writer, OP_PONG, &payload, None).await.is_err() {
                    break;
                }
            }
            _ = ping.tick() => {
                let seen = stats.pongs_received.load(Ordering::Relaxed);
                if seen > pongs_seen {
                    pongs_seen = seen;
                    unanswered = 0;
                }
                if unanswered >= 3 {
                    break;
                }
                if write_frame(&mut writer, OP_PING, b"", None).await.is_err() {
                    break;
                }
                unanswered += 1;
                stats.pings_sent.fetch_add(1, Ordering::Relaxed);
            }
            _ = alive.tick() => {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
    }
    read_task.abort();
}

/// The JWT the stock client sends: HS256 header, claims `id` (UUIDv7), `p`, `r`, `rp`, and a
/// signature made with a random key (the server cannot verify it, and does not).
pub fn stock_jwt(remote_host: &str, remote_port: u16) -> String {
    jwt_with_claims(&format!(
        r#"{{"id":"{}","p":{{"Udp":{{"timeout":null}}}},"r":"{}","rp":{}}}"#,
        uuid_v7(),
        remote_host,
        remote_port
    ))
}

pub fn jwt_with_claims(claims: &str) -> String {
    let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let mut signature = [0u8; 32];
    random_fill(&mut signature);
    format!(
        "{}.{}.{}",
        enc(br#"{"typ":"JWT","alg":"HS256"}"#),
        enc(claims.as_bytes()),
        enc(&signature)
    )
}

fn random_fill(buf: &mut [u8]) {
    let _ = rustls::crypto::ring::default_provider()
        .secure_random
        .fill(buf);
}

fn uuid_v7() -> String {
    let mut b = [0u8; 16];
    random_fill(&mut b);
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    b[6] = 0x70 | (b[6] & 0x0f);
    b[8] = 0x80 | (b[8] & 0x3f);
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Accepts any certificate: the stock client does not verify unless told to.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_connector() -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    // wss:// is HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

async fn tcp_connect(options: &WstunnelOptions) -> std::io::Result<TcpStream> {
    let socket = if options.server.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = options.bind {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream =
        tokio::time::timeout(Duration::from_secs(5), socket.connect(options.server)).await??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// TCP, then TLS with SNI = host (none for an address literal).
pub async fn connect_tls(options: &WstunnelOptions) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = tcp_connect(options).await?;
    let name = ServerName::try_from(options.host.clone())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    tokio::time::timeout(Duration::from_secs(5), tls_connector().connect(name, tcp)).await?
}

/// The HTTP status of an upgrade attempt and the response head.
#[derive(Debug)]
pub struct UpgradeReply {
    pub status: u16,
    pub head: String,
}

/// Sends the stock client's upgrade request for `path` with `jwt` (None = no bearer) and
/// reads the response head. `Ok` carries the stream when the server switched protocols.
pub async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    host_header: &str,
    path: &str,
    jwt: Option<&str>,
) -> std::io::Result<UpgradeReply> {
    let mut key = [0u8; 16];
    random_fill(&mut key);
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let protocol = match jwt {
        Some(jwt) => format!("sec-websocket-protocol: v1, authorization.bearer.{jwt}\r\n"),
        None => "sec-websocket-protocol: v1\r\n".into(),
    };
    // Header names and order as the stock client sends them; no User-Agent.
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: {host_header}\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n{protocol}\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err(std::io::Error::other("response head too long"));
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(UpgradeReply { status, head })
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// Host header as the stock client writes it: the port only when it is not 443 or 80.
fn host_header(options: &WstunnelOptions) -> String {
    match options.server.port() {
        443 | 80 => options.host.clone(),
        p => format!("{}:{p}", options.host),
    }
}

/// TLS and an upgrade the stock client would accept (101 + Upgrade + Connection checks).
pub async fn connect_upgraded(
    options: &WstunnelOptions,
    path: &str,
    jwt: Option<&str>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut tls = connect_tls(options).await?;
    let reply = upgrade(&mut tls, &host_header(options), path, jwt).await?;
    let upgrade_ok =
        header(&reply.head, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let connection_ok =
        header(&reply.head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("upgrade"));
    if reply.status != 101 || !upgrade_ok || !connection_ok {
        return Err(std::io::Error::other(format!(
            "upgrade refused: {}",
            reply.head
        )));
    }
    Ok(tls)
}

/// One WebSocket frame as read.
#[derive(Debug)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Frame> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h).await?;
    let fin = h[0] & 0x80 != 0;
    let opcode = h[0] & 0x0f;
    let masked = h[1] & 0x80 != 0;
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).await?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b).await?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    if len > 1 << 20 {
        return Err(std::io::Error::other("frame too long"));
    }
    let mut mask = [0u8; 4];
    if masked {
        r.read_exact(&mut mask).await?;
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok(Frame {
        fin,
        opcode,
        masked,
        payload,
    })
}

/// Writes one frame with FIN set; `mask` None = unmasked, as the stock client sends.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    w.write_all(&out).await?;
    w.flush().await
}

/// Runs `f` on a fresh single-threaded runtime inside `ns`.
pub fn block_on_in<F, Fut, T>(ns: &NetNs, f: F) -> T
where
    F: FnOnce() -> Fut + Send,
    Fut: std::future::Future<Output = T>,
    T: Send,
{
    ns.run(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f())
    })
}

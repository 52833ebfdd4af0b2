//! `restart`: the time from a daemon restart to traffic for many connected WireGuard clients.
//!
//! The real daemon (release) runs in a namespace with `--restart-clients` clients; in the peer
//! namespace this process plays every client with boringtun's WireGuard state machine (`Tunn`),
//! one UDP socket each, each pinging the server's tunnel address every `--restart-ping-ms`.
//! Once every client has a reply, the daemon is restarted as `systemctl restart` does (SIGTERM,
//! wait for the exit, start again) and each client's first reply from the new daemon is timed
//! from the SIGTERM. The same restart is then measured with the remembered endpoints erased
//! from the store (the behaviour before the daemon remembered them): there the clients come
//! back on their own timers.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use boringtun::{
    noise::{Tunn, TunnResult},
    x25519,
};
use phantom_tests::{BpffsDir, Daemon, DaemonConfig, GuardedLink, WireguardSettings};
use serde_json::json;

use crate::{
    BoxError, Cli,
    report::{percentile, table},
};

const SUBNET: &str = "198.18.0.0/20";
const SERVER_TUNNEL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// How long the clients may take to connect at first, and to come back after a restart.
const CONNECT_WITHIN: Duration = Duration::from_secs(120);

/// One client as exported by the daemon.
struct ClientKeys {
    private: [u8; 32],
    server_public: [u8; 32],
    preshared: [u8; 32],
    ip: Ipv4Addr,
}

/// What the client tasks report, in milliseconds since `epoch` (0: not yet).
struct Shared {
    epoch: Instant,
    /// Replies from this moment on count as "back".
    mark: AtomicU64,
    first_reply_after_mark: Vec<AtomicU64>,
    sent: Vec<AtomicU64>,
    received: Vec<AtomicU64>,
    stop: AtomicBool,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Starts a new measurement: replies from now on count.
    fn set_mark(&self) -> u64 {
        for f in &self.first_reply_after_mark {
            f.store(0, Ordering::SeqCst);
        }
        let now = self.now_ms();
        self.mark.store(now, Ordering::SeqCst);
        now
    }

    fn all_back(&self) -> bool {
        self.first_reply_after_mark
            .iter()
            .all(|f| f.load(Ordering::Relaxed) != 0)
    }

    fn totals(&self) -> Vec<(u64, u64)> {
        self.sent
            .iter()
            .zip(&self.received)
            .map(|(s, r)| (s.load(Ordering::Relaxed), r.load(Ordering::Relaxed)))
            .collect()
    }
}

fn key(b64: &str) -> Result<[u8; 32], BoxError> {
    let bytes = STANDARD.decode(b64.trim())?;
    bytes
        .try_into()
        .map_err(|_| BoxError::from("a key is not 32 bytes"))
}

fn field<'a>(config: &'a str, name: &str) -> Result<&'a str, BoxError> {
    config
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.trim_start().strip_prefix('='))
        })
        .map(str::trim)
        .ok_or_else(|| format!("no {name} in the exported config").into())
}

fn parse_export(config: &str) -> Result<ClientKeys, BoxError> {
    let address = field(config, "Address")?;
    Ok(ClientKeys {
        private: key(field(config, "PrivateKey")?)?,
        server_public: key(field(config, "PublicKey")?)?,
        preshared: key(field(config, "PresharedKey")?)?,
        ip: address.split('/').next().unwrap_or_default().parse()?,
    })
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 ICMP echo request from `src` to `dst`.
fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![0u8; 20 + 8 + 16];
    let total = p.len() as u16;
    p[0] = 0x45;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[4..6].copy_from_slice(&seq.to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let ip_sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    p[20] = 8;
    p[24..26].copy_from_slice(&id.to_be_bytes());
    p[26..28].copy_from_slice(&seq.to_be_bytes());
    let icmp_sum = checksum(&p[20..]);
    p[22..24].copy_from_slice(&icmp_sum.to_be_bytes());
    p
}

fn is_echo_reply(p: &[u8]) -> bool {
    p.len() >= 28 && p[0] >> 4 == 4 && p[9] == 1 && p[usize::from(p[0] & 0x0f) * 4] == 0
}

/// One client: answers the server's handshakes, pings every `interval`, ticks its timers.
async fn client(
    i: usize,
    keys: ClientKeys,
    server: SocketAddr,
    interval: Duration,
    shared: Arc<Shared>,
) -> Result<(), BoxError> {
    let socket = tokio::net::UdpSocket::bind((GuardedLink::PEER_V4, 0)).await?;
    socket.connect(server).await?;
    let mut tunn = Tunn::new(
        x25519::StaticSecret::from(keys.private),
        x25519::PublicKey::from(keys.server_public),
        Some(keys.preshared),
        Some(25),
        i as u32,
        None,
    );
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let mut ping = tokio::time::interval(interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut timers = tokio::time::interval(Duration::from_millis(250));
    let mut seq: u16 = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        tokio::select! {
            got = socket.recv(&mut buf) => {
                let Ok(len) = got else { continue };
                let mut first = true;
                loop {
                    let result = if first {
                        tunn.decapsulate(None, &buf[..len], &mut out)
                    } else {
                        tunn.decapsulate(None, &[], &mut out)
                    };
                    first = false;
                    match result {
                        TunnResult::WriteToNetwork(p) => {
                            let _ = socket.send(p).await;
                        }
                        TunnResult::WriteToTunnelV4(p, _) => {
                            if is_echo_reply(p) {
                                shared.received[i].fetch_add(1, Ordering::Relaxed);
                                let now = shared.now_ms();
                                if now >= shared.mark.load(Ordering::Relaxed) {
                                    let _ = shared.first_reply_after_mark[i].compare_exchange(
                                        0, now, Ordering::Relaxed, Ordering::Relaxed);
                                }
                            }
                            break;
                        }
                        _ => break,
                    }
                }
            }
            _ = ping.tick() => {
                let packet = echo_request(keys.ip, SERVER_TUNNEL_IP, i as u16, seq);
                seq = seq.wrapping_add(1);
                shared.sent[i].fetch_add(1, Ordering::Relaxed);
                if let TunnResult::WriteToNetwork(p) = tunn.encapsulate(&packet, &mut out) {
                    let _ = socket.send(p).await;
                }
            }
            _ = timers.tick() => {
                if let TunnResult::WriteToNetwork(p) = tunn.update_timers(&mut out) {
                    let _ = socket.send(p).await;
                }
            }
        }
    }
    Ok(())
}

/// One restart measured: figures in seconds from the SIGTERM.
struct Round {
    stop: f64,
    start: f64,
    back: Vec<f64>,
    not_back: usize,
    lost: Vec<f64>,
}

/// Restarts the daemon (SIGTERM, wait, start; `between` runs while it is down) and waits for
/// every client's first reply from the new one.
fn restart_round(
    daemon: &mut Daemon,
    shared: &Shared,
    between: impl FnOnce(&Daemon) -> Result<(), BoxError>,
) -> Result<Round, BoxError> {
    std::thread::sleep(Duration::from_secs(2));
    let before = shared.totals();
    let sigterm = Instant::now();
    let status = daemon.stop();
    if !status.success() {
        return Err(format!("phantomd exited with {status}").into());
    }
    let stop = sigterm.elapsed().as_secs_f64();
    between(daemon)?;
    // Replies from the old daemon do not count.
    let mark = shared.set_mark();
    let mark_at = sigterm.elapsed().as_secs_f64();
    let started = Instant::now();
    daemon.restart();
    let start = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + CONNECT_WITHIN;
    while !shared.all_back() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Replies still in flight at the end are not counted as lost.
    std::thread::sleep(Duration::from_secs(1));
    let after = shared.totals();
    let mut back = Vec::new();
    let mut not_back = 0;
    for f in &shared.first_reply_after_mark {
        match f.load(Ordering::SeqCst) {
            0 => not_back += 1,
            at => back.push(mark_at + (at.saturating_sub(mark)) as f64 / 1e3),
        }
    }
    let lost = before
        .iter()
        .zip(&after)
        .map(|((s0, r0), (s1, r1))| (s1 - s0).saturating_sub(r1 - r0) as f64)
        .collect();
    Ok(Round {
        stop,
        start,
        back,
        not_back,
        lost,
    })
}

fn rows(label: &str, n: usize, r: &mut Round) -> Vec<String> {
    let at = |back: &mut Vec<f64>, p: f64| -> String {
        if back.is_empty() {
            "—".into()
        } else {
            format!("{:.2} s", percentile(back, p))
        }
    };
    let all = if r.not_back == 0 {
        at(&mut r.back, 1.0)
    } else {
        format!(
            "{} of {n} not back within {}s",
            r.not_back,
            CONNECT_WITHIN.as_secs()
        )
    };
    vec![format!(
        "| {label} | {:.2} s | {:.2} s | {} | {} | {} | {} | {:.0} / {:.0} |",
        r.stop,
        r.start,
        at(&mut r.back, 0.0),
        at(&mut r.back, 0.5),
        at(&mut r.back, 0.99),
        all,
        percentile(&mut r.lost, 0.5),
        percentile(&mut r.lost, 1.0),
    )]
}

pub fn run(cli: &Cli) -> Result<(), BoxError> {
    let n = cli.restart_clients;
    let interval = Duration::from_millis(cli.restart_ping_ms);
    // A socket per client here, and one per peer in the daemon.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path());
    config.wireguard = Some(WireguardSettings::new(SUBNET, GuardedLink::SERVER_V4));
    config.log_level = "info".into();
    let mut daemon = Daemon::start(&link.server, &config);
    let mut api = daemon.client();
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("c{i:05}");
        api.ok("core", "add_client", json!({"client_name": name}));
        let export = api.ok("core", "export_client", json!({"client_name": name}));
        let text = export["config"].as_str().ok_or("no config exported")?;
        clients.push(parse_export(text)?);
    }
    drop(api);
    let server: SocketAddr = (GuardedLink::SERVER_V4.parse::<Ipv4Addr>()?, 51820).into();
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        mark: AtomicU64::new(0),
        first_reply_after_mark: (0..n).map(|_| AtomicU64::new(0)).collect(),
        sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
        received: (0..n).map(|_| AtomicU64::new(0)).collect(),
        stop: AtomicBool::new(false),
    });
    let state_db = daemon.dir().join("state/clients.db");
    let result = std::thread::scope(|scope| -> Result<Vec<String>, BoxError> {
        let peer = &link.peer;
        let tasks_shared = Arc::clone(&shared);
        let players = scope.spawn(move || {
            peer.run(move || -> Result<(), String> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(async move {
                    let mut tasks = Vec::new();
                    for (i, keys) in clients.into_iter().enumerate() {
                        tasks.push(tokio::spawn(client(
                            i,
                            keys,
                            server,
                            interval,
                            Arc::clone(&tasks_shared),
                        )));
                    }
                    for t in tasks {
                        match t.await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => return Err(e.to_string()),
                            Err(e) => return Err(e.to_string()),
                        }
                    }
                    Ok(())
                })
            })
        });
        let measured = (|| -> Result<Vec<String>, BoxError> {
            // Every client connected and answered before the first restart.
            shared.set_mark();
            let deadline = Instant::now() + CONNECT_WITHIN;
            while !shared.all_back() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if !shared.all_back() {
                return Err("not every client connected before the restart".into());
            }
            // The endpoints are stored within seconds of the handshakes (every 5 s).
            std::thread::sleep(Duration::from_secs(6));
            let mut out = rows(
                "endpoints remembered: the daemon starts the handshakes",
                n,
                &mut restart_round(&mut daemon, &shared, |_| Ok(()))?,
            );
            out.extend(rows(
                "endpoints erased while stopped: clients come back on their own timers (before)",
                n,
                &mut restart_round(&mut daemon, &shared, |_| {
                    let db = rusqlite::Connection::open(&state_db)?;
                    db.execute("UPDATE clients SET endpoint = NULL", [])?;
                    Ok(())
                })?,
            ));
            Ok(out)
        })();
        shared.stop.store(true, Ordering::SeqCst);
        match players.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err("the client thread panicked".into()),
        }
        measured
    });
    if cli.restart_log {
        // Where the stop and the start spend their time, from the daemon's own lines.
        const STEPS: [&str; 11] = [
            "SIGTERM",
            "programs loaded",
            "program",
            "detached",
            "stopped",
            "starting",
            "attached",
            "server up",
            "ready",
            "andshake",
            "blocklist loaded",
        ];
        for l in daemon
            .log()
            .lines()
            .filter(|l| STEPS.iter().any(|w| l.contains(w)))
        {
            eprintln!("{l}");
        }
    }
    let rows = result?;
    table(
        &format!("Restart to traffic with {n} connected clients (embedded userspace device)"),
        &format!(
            "the real daemon (release) in a namespace; {n} WireGuard clients (boringtun's Tunn, a UDP socket each) in the peer namespace, each pinging the server's tunnel address every {} ms; `systemctl restart` as SIGTERM, wait for the exit, start; times from the SIGTERM to each client's first reply from the new daemon; lost = pings without a reply from 2 s before the SIGTERM until every client is back",
            cli.restart_ping_ms
        ),
        "| restart | stop (SIGTERM to exit) | start (exec to socket ready) | first client back | 50% back | 99% back | all back | lost per client, p50 / max |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        &rows,
    );
    Ok(())
}

//! The upstream DNS servers (seed 000): where the resolver forwards and, while the resolver
//! does not serve the tunnel, what client configurations carry; and live tests of servers
//! built with hickory-proto.
//!
//! The servers in force live in `state_dir/dns.json` (written by `change_dns_servers`, with the
//! previous values); until the first change they are `[dns] primary/secondary`.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::DnsError;
use crate::{config::DnsConfig, core::ClientDns, error::Error, store};

const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// A probe's `status`, as the original's test results say it.
const STATUS_OK: &str = "OK";
const STATUS_FAIL: &str = "FAIL";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Servers {
    pub primary: IpAddr,
    pub secondary: IpAddr,
    pub previous_primary: Option<IpAddr>,
    pub previous_secondary: Option<IpAddr>,
}

/// The upstream servers: where the resolver forwards, and what client configurations get
/// while the resolver does not serve the tunnel.
pub struct Upstreams {
    servers: Mutex<Servers>,
    path: PathBuf,
    /// Whether client configurations name the resolver on the tunnel instead.
    tunnel: AtomicBool,
    client_dns: watch::Sender<ClientDns>,
}

impl Upstreams {
    pub fn open(config: &DnsConfig, state_dir: &Path) -> Result<Self, DnsError> {
        let path = state_dir.join("dns.json");
        // No file (or a damaged one, set aside): the configured servers.
        let stored: Option<Servers> = crate::store::read_json_or_set_aside(&path, "dns")?;
        let servers = match stored {
            Some(servers) => servers,
            None => Servers {
                primary: config
                    .primary
                    .parse()
                    .map_err(|_| Error::config("dns.primary"))?,
                secondary: config
                    .secondary
                    .parse()
                    .map_err(|_| Error::config("dns.secondary"))?,
                previous_primary: None,
                previous_secondary: None,
            },
        };
        let client_dns =
            watch::Sender::new(ClientDns::Servers(vec![servers.primary, servers.secondary]));
        Ok(Self {
            servers: Mutex::new(servers),
            path,
            tunnel: AtomicBool::new(false),
            client_dns,
        })
    }

    /// The servers client configurations carry, as core renders them: a subscription.
    pub fn client_dns(&self) -> watch::Receiver<ClientDns> {
        self.client_dns.subscribe()
    }

    /// From now on client configurations name the resolver on the tunnel (`[dns] listen =
    /// "auto"` with a WireGuard server), so every client is filtered.
    pub fn serve_tunnel(&self) {
        self.tunnel.store(true, Ordering::Relaxed);
        self.client_dns.send_replace(ClientDns::ServerAddress);
    }

    pub fn servers(&self) -> Servers {
        match self.servers.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces either or both servers, keeping the previous values; durable before it returns.
    pub fn change(
        &self,
        primary: Option<IpAddr>,
        secondary: Option<IpAddr>,
    ) -> Result<Servers, Error> {
        let mut servers = self
            .servers
            .lock()
            .map_err(|_| Error::LockPoisoned("dns"))?;
        let next = Servers {
            primary: primary.unwrap_or(servers.primary),
            secondary: secondary.unwrap_or(servers.secondary),
            previous_primary: Some(servers.primary),
            previous_secondary: Some(servers.secondary),
        };
        store::write_json(&self.path, &next)?;
        *servers = next.clone();
        if !self.tunnel.load(Ordering::Relaxed) {
            self.client_dns
                .send_replace(ClientDns::Servers(vec![next.primary, next.secondary]));
        }
        Ok(next)
    }
}

/// One query's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Probe {
    pub server: String,
    pub success: bool,
    /// `OK` when the server answered NOERROR or NXDOMAIN, else `FAIL` (`error` says why).
    pub status: String,
    /// The first address the answer resolved the name to (`null`: none, e.g. NXDOMAIN).
    pub response: Option<String>,
    pub response_time_ms: Option<f64>,
    pub test_domain: String,
    pub answers: usize,
    pub error: Option<String>,
}

/// Sends one A query for `domain` to `server`:53 and waits for the matching answer.
pub fn probe(server: IpAddr, domain: &str) -> Probe {
    let mut out = Probe {
        server: server.to_string(),
        success: false,
        status: STATUS_FAIL.into(),
        response: None,
        response_time_ms: None,
        test_domain: domain.to_string(),
        answers: 0,
        error: None,
    };
    let result = (|| -> Result<(Message, Duration), String> {
        let name = Name::from_ascii(domain).map_err(|e| format!("bad test domain: {e}"))?;
        let mut query = Message::query();
        let id: u16 = rand_id();
        query.metadata.id = id;
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(name, RecordType::A));
        let bytes = query.to_vec().map_err(|e| e.to_string())?;
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .map_err(|e: std::net::AddrParseError| e.to_string())?;
        let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
        sock.connect(SocketAddr::new(server, 53))
            .map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(QUERY_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        sock.send(&bytes).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4096];
        loop {
            let n = sock.recv(&mut buf).map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    "timeout".to_string()
                }
                _ => e.to_string(),
            })?;
            let Ok(reply) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if reply.metadata.id == id {
                return Ok((reply, started.elapsed()));
            }
            if started.elapsed() > QUERY_TIMEOUT {
                return Err("timeout".into());
            }
        }
    })();
    match result {
        Ok((reply, took)) => {
            let code = reply.metadata.response_code;
            out.response_time_ms = Some((took.as_secs_f64() * 1e5).round() / 100.0);
            out.answers = reply.answers.len();
            out.response = reply.answers.iter().find_map(|r| match &r.data {
                RData::A(a) => Some(a.0.to_string()),
                _ => None,
            });
            out.success = matches!(code, ResponseCode::NoError | ResponseCode::NXDomain);
            if out.success {
                out.status = STATUS_OK.into();
            } else {
                out.error = Some(format!("server answered {code}"));
            }
        }
        Err(e) => out.error = Some(e),
    }
    out
}

fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    u16::from_ne_bytes(b)
}

/// Probes each server at once (blocking pool), answers in order.
pub async fn probe_all(servers: Vec<IpAddr>, domain: String) -> Vec<Probe> {
    let tasks: Vec<_> = servers
        .into_iter()
        .map(|s| {
            let d = domain.clone();
            tokio::task::spawn_blocking(move || probe(s, &d))
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        if let Ok(p) = t.await {
            out.push(p);
        }
    }
    out
}

//! The `ghost` module: WireGuard carried over WebSocket over TLS (port 443 by default), for
//! networks that only let HTTPS out. The relay inside the daemon speaks what the stock
//! `wstunnel` client expects, so users keep running that client unchanged. See docs/ghost.md.

pub mod actions;
pub mod domain;
pub mod metrics;
pub mod relay;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock, atomic::Ordering},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{error, info, warn};

use self::relay::{Relay, RelaySettings, Stats, TlsConfig};
use crate::http::certs as tls;
use crate::{
    admin::ApiError,
    config::{GhostConfig, GhostTls},
    core::{Server, actions::TunnelRoute},
    protocol,
    source::SourcePrefix,
    wg::Subnet,
};

const GHOST_ACTIVE: &str = "GHOST_ACTIVE";
pub(crate) const GHOST_INACTIVE: &str = "GHOST_INACTIVE";
const INVALID_DOMAIN: &str = "INVALID_DOMAIN";
const DOMAIN_NOT_THIS_SERVER: &str = "DOMAIN_NOT_THIS_SERVER";
const TLS_FAILED: &str = "TLS_FAILED";
const PORT_UNAVAILABLE: &str = "PORT_UNAVAILABLE";

/// The local side the stock client listens on; the exported WireGuard config points here.
pub const CLIENT_LOCAL_ENDPOINT: &str = "127.0.0.1:51820";
/// Renewal age when a certificate's expiry cannot be read (Let's Encrypt issues for 90 days).
const ACME_RENEW_AFTER: Duration = Duration::from_secs(60 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum GhostError {
    /// No certificate, or no TLS configuration from it.
    #[error(transparent)]
    Cert(#[from] crate::http::CertError),
    #[error(transparent)]
    Daemon(#[from] crate::error::Error),
}

/// What `ghost-state.json` holds (0600: it carries the secret).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct GhostState {
    pub enabled: bool,
    pub server_ip: String,
    pub domain: String,
    pub secret: String,
    pub protocol: String,
    pub port: u16,
    pub activated_at: String,
    pub connection_command: String,
    /// `files`, `self_signed` or `acme`: where the certificate in use came from.
    pub tls_source: String,
    /// Unix seconds when the certificate under `ghost/tls/` was issued or made.
    pub certificate_issued_at: i64,
    /// Unix seconds when the certificate in use expires (0: unknown).
    pub certificate_expires_at: i64,
}

/// The ghost module: its persisted state, the relay while active, and its counters.
pub struct Ghost {
    config: GhostConfig,
    /// What one source is for the relay's caps and limiter (`[sources] ipv6_prefix`).
    source_prefix: SourcePrefix,
    state_path: PathBuf,
    tls_dir: tls::TlsDir,
    pub(crate) wireguard: Arc<Server>,
    state: Mutex<GhostState>,
    /// Serialises enable/disable/renewal: one change at a time.
    op: tokio::sync::Mutex<Option<Active>>,
    /// The relay's failure to come back after a restart, shown by `status`.
    restore_error: Mutex<Option<String>>,
    /// Whether the relay runs; read by `status` without waiting for an enable in progress
    /// (an ACME issuance can take minutes).
    relay_running: std::sync::atomic::AtomicBool,
    pub stats: Arc<Stats>,
    /// The sentry's TLS port, when it listens on one: a relay configured for the same port
    /// joins it instead of binding its own (docs/ghost.md, "Sharing the sentry's port").
    shared_port: std::sync::OnceLock<Arc<crate::http::SharedPort>>,
}

struct Active {
    relay: Relay,
    tls: TlsConfig,
    renew_stop: Option<watch::Sender<bool>>,
}

fn lock<T: Clone>(m: &Mutex<T>) -> T {
    match m.lock() {
        Ok(g) => g.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

fn set<T>(m: &Mutex<T>, value: T) {
    match m.lock() {
        Ok(mut g) => *g = value,
        Err(poisoned) => *poisoned.into_inner() = value,
    }
}

/// An alphanumeric secret of 32 characters (~190 bits): safe in a URL path and a shell word.
fn new_secret() -> Result<String, ApiError> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let random = tokio_rustls::rustls::crypto::ring::default_provider().secure_random;
    let mut out = String::with_capacity(32);
    let mut buf = [0u8; 64];
    while out.len() < 32 {
        random
            .fill(&mut buf)
            .map_err(|_| ApiError::internal("no randomness for the secret"))?;
        // 248 = 4 * 62: rejection sampling keeps every character equally likely.
        for b in buf.iter().filter(|b| **b < 248) {
            if out.len() < 32 {
                out.push(char::from(ALPHABET[usize::from(*b % 62)]));
            }
        }
    }
    Ok(out)
}

/// The stock client's command line: local 127.0.0.1:51820, remote the server's own WireGuard
/// port on its loopback (the only remote the relay accepts).
fn connection_command(secret: &str, domain: &str, port: u16, wireguard_port: u16) -> String {
    format!(
        "wstunnel client --http-upgrade-path-prefix \"{secret}\" -L 'udp://{CLIENT_LOCAL_ENDPOINT}:127.0.0.1:{wireguard_port}?timeout_sec=0' wss://{domain}:{port}"
    )
}

impl Ghost {
    /// Loads the persisted state; `restore` brings an active relay back.
    pub fn open(
        config: &GhostConfig,
        source_prefix: SourcePrefix,
        state_dir: &Path,
        wireguard: Arc<Server>,
    ) -> Result<Self, crate::error::Error> {
        let dir = state_dir.join("ghost");
        std::fs::create_dir_all(&dir).map_err(|e| crate::error::Error::io(&dir, e))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| crate::error::Error::io(&dir, e))?;
        }
        let state_path = dir.join("ghost-state.json");
        let state: GhostState = crate::store::read_json_or_set_aside(&state_path, "ghost")?;
        Ok(Self {
            config: config.clone(),
            source_prefix,
            state_path,
            tls_dir: tls::TlsDir {
                dir: dir.join("tls"),
            },
            wireguard,
            state: Mutex::new(state),
            op: tokio::sync::Mutex::new(None),
            restore_error: Mutex::new(None),
            relay_running: std::sync::atomic::AtomicBool::new(false),
            stats: Arc::default(),
            shared_port: std::sync::OnceLock::new(),
        })
    }

    pub fn state(&self) -> GhostState {
        lock(&self.state)
    }

    /// The sentry listens over TLS on `port`: a relay for the same port joins it. Called
    /// before [`Ghost::restore`].
    pub fn share_port(&self, port: Arc<crate::http::SharedPort>) {
        let _ = self.shared_port.set(port);
    }

    pub fn is_active(&self) -> bool {
        self.state().enabled
    }

    fn persist(&self, state: &GhostState) -> Result<(), crate::error::Error> {
        crate::store::write_json(&self.state_path, state)?;
        set(&self.state, state.clone());
        Ok(())
    }

    fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.config.listen, self.config.port)
    }

    /// At start-up: an acknowledged enable is served again after a restart or `kill -9`.
    pub async fn restore(self: &Arc<Self>) {
        let state = self.state();
        if !state.enabled {
            return;
        }
        let mut op = self.op.lock().await;
        let pem = match state.tls_source.as_str() {
            "files" => tls::read_files(Path::new(&self.config.cert), Path::new(&self.config.key)),
            _ => self.tls_dir.load(),
        };
        let started = match pem.and_then(|p| {
            tls::server_config(&p)?;
            Ok(p)
        }) {
            Ok(pem) => {
                let mut current = state.clone();
                current.certificate_expires_at = tls::not_after(&pem).unwrap_or(0);
                if current != state
                    && let Err(e) = self.persist(&current)
                {
                    warn!(error = %e, "cannot record the certificate's expiry");
                }
                self.start_relay(&current, &pem).await
            }
            Err(e) => Err(ApiError::new(TLS_FAILED, e.to_string())),
        };
        match started {
            Ok(active) => {
                info!(domain = %state.domain, "ghost mode restored");
                *op = Some(active);
                self.relay_running.store(true, Ordering::Relaxed);
                set(&self.restore_error, None);
            }
            Err(e) => {
                error!(error = %e.message, "ghost mode is enabled but its relay cannot start");
                set(&self.restore_error, Some(e.message));
            }
        }
    }

    async fn start_relay(
        self: &Arc<Self>,
        state: &GhostState,
        pem: &tls::CertPem,
    ) -> Result<Active, ApiError> {
        let tls_failed = |e: crate::http::CertError| ApiError::new(TLS_FAILED, e.to_string());
        let tls: TlsConfig = Arc::new(RwLock::new(tls::server_config(pem).map_err(tls_failed)?));
        let settings = RelaySettings {
            listen: self.listen_addr(),
            secret: state.secret.clone(),
            wireguard_port: self.wireguard.config.listen_port,
            tunnels_per_secret: self.config.tunnels_per_secret,
            source_prefix: self.source_prefix,
        };
        let unavailable = |e: &dyn std::fmt::Display| {
            ApiError::new(
                PORT_UNAVAILABLE,
                format!("cannot listen on {}: {e}", self.listen_addr()),
            )
        };
        let relay = match self.shared_port.get() {
            Some(port) if port.covers(self.listen_addr()) => {
                let key = crate::http::certified_key(&pem.cert, &pem.key)
                    .map_err(|e| tls_failed(e.into()))?;
                Relay::join(
                    settings,
                    Arc::clone(port),
                    &state.domain,
                    key,
                    Arc::clone(&self.stats),
                )
                .map_err(|e| unavailable(&e))?
            }
            _ => Relay::start(settings, Arc::clone(&tls), Arc::clone(&self.stats))
                .await
                .map_err(|e| unavailable(&e))?,
        };
        let renew_stop = (state.tls_source == "acme").then(|| {
            let (tx, rx) = watch::channel(false);
            tokio::spawn(Arc::clone(self).renew_loop(Arc::clone(&tls), rx));
            tx
        });
        Ok(Active {
            relay,
            tls,
            renew_stop,
        })
    }

    /// Certificate for `domain` per `[ghost] tls`, and where it came from.
    async fn certificate(&self, domain: &str) -> Result<(tls::CertPem, &'static str), ApiError> {
        let tls_err = |e: GhostError| ApiError::new(TLS_FAILED, e.to_string());
        let cert_err = |e: crate::http::CertError| tls_err(e.into());
        match self.config.tls {
            GhostTls::Files => Ok((
                tls::read_files(Path::new(&self.config.cert), Path::new(&self.config.key))
                    .map_err(cert_err)?,
                "files",
            )),
            GhostTls::SelfSigned => {
                let pem = tls::self_signed(domain).map_err(cert_err)?;
                self.tls_dir.save(&pem).map_err(cert_err)?;
                Ok((pem, "self_signed"))
            }
            GhostTls::Acme => {
                let pem = self.acme(domain).await.map_err(tls_err)?;
                Ok((pem, "acme"))
            }
        }
    }

    async fn acme(&self, domain: &str) -> Result<tls::CertPem, GhostError> {
        let pem = tls::acme_issue(
            &tls::AcmeRequest {
                domain,
                directory: &self.config.acme_directory,
                email: &self.config.acme_email,
                http_listen: SocketAddr::new(self.config.listen, self.config.acme_http_port),
                ca_root: (!self.config.acme_ca_root.is_empty())
                    .then(|| Path::new(&self.config.acme_ca_root)),
            },
            &self.tls_dir,
        )
        .await?;
        // Refuse what rustls would refuse before it replaces anything on disk.
        tls::server_config(&pem)?;
        self.tls_dir.save(&pem)?;
        Ok(pem)
    }

    /// Whether an ACME certificate is due: `acme_renew_before_days` before it expires.
    fn renewal_due(&self, state: &GhostState, now: i64) -> bool {
        let due_at = if state.certificate_expires_at > 0 {
            state.certificate_expires_at - i64::from(self.config.acme_renew_before_days) * 86_400
        } else {
            state.certificate_issued_at + ACME_RENEW_AFTER.as_secs() as i64
        };
        now >= due_at
    }

    /// Renews an ACME certificate before it expires and swaps it into the running relay.
    async fn renew_loop(self: Arc<Self>, tls: TlsConfig, mut stop: watch::Receiver<bool>) {
        let every = Duration::from_secs(self.config.acme_check_seconds);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let state = self.state();
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if !state.enabled || !self.renewal_due(&state, now) {
                continue;
            }
            let renewed = self.acme(&state.domain).await.and_then(|p| {
                Ok((
                    tls::server_config(&p)?,
                    tls::not_after(&p),
                    crate::http::certified_key(&p.cert, &p.key).map_err(tls::CertError::from)?,
                ))
            });
            match renewed {
                Ok((config, expires, key)) => {
                    match tls.write() {
                        Ok(mut c) => *c = config,
                        Err(poisoned) => *poisoned.into_inner() = config,
                    }
                    // A relay on the sentry's port serves its certificate from there.
                    if let Some(port) = self.shared_port.get() {
                        port.set_certificate(&state.domain, key);
                    }
                    let mut current = self.state();
                    current.certificate_issued_at = now;
                    current.certificate_expires_at = expires.unwrap_or(0);
                    if let Err(e) = self.persist(&current) {
                        warn!(error = %e, "cannot record the renewed certificate");
                    }
                    info!(domain = %state.domain, "ghost certificate renewed");
                }
                // Retried at the next check; the old certificate is still valid for weeks.
                Err(e) => warn!(error = %e, "ghost certificate renewal failed"),
            }
        }
    }

    /// `enable`: validate the domain, get the certificate, listen, persist.
    pub async fn enable(self: &Arc<Self>, raw_domain: &str) -> Result<Value, ApiError> {
        let mut op = self.op.lock().await;
        let current = self.state();
        if current.enabled {
            return Err(ApiError::new(
                GHOST_ACTIVE,
                format!(
                    "ghost mode is already active for {}; disable it first",
                    current.domain
                ),
            ));
        }
        let domain = crate::domain_name::host_name(raw_domain)
            .map_err(|e| ApiError::new(INVALID_DOMAIN, e.to_string()))?;
        let resolved = domain::resolve(&domain)
            .await
            .map_err(|e| ApiError::new(DOMAIN_NOT_THIS_SERVER, format!("{domain}: {e}")))?;
        let own = domain::own_addresses(&self.wireguard.config.interface);
        let server_ip = resolved
            .iter()
            .find(|ip| own.contains(ip))
            .copied()
            .ok_or_else(|| {
                ApiError::new(
                    DOMAIN_NOT_THIS_SERVER,
                    format!(
                        "{domain} resolves to {} but this server's addresses are {}",
                        join(&resolved),
                        join(&own)
                    ),
                )
            })?;
        let (pem, source) = self.certificate(&domain).await?;
        let secret = new_secret()?;
        let port = self.config.port;
        let now = time::OffsetDateTime::now_utc();
        let state = GhostState {
            enabled: true,
            server_ip: server_ip.to_string(),
            domain: domain.clone(),
            connection_command: connection_command(
                &secret,
                &domain,
                port,
                self.wireguard.config.listen_port,
            ),
            secret,
            protocol: "wss".into(),
            port,
            activated_at: protocol::rfc3339(now),
            tls_source: source.into(),
            certificate_issued_at: now.unix_timestamp(),
            certificate_expires_at: tls::not_after(&pem).unwrap_or(0),
        };
        let active = self.start_relay(&state, &pem).await?;
        if let Err(e) = self.persist(&state) {
            active.stop().await;
            return Err(e.into());
        }
        *op = Some(active);
        self.relay_running.store(true, Ordering::Relaxed);
        set(&self.restore_error, None);
        // The domain and source are logged; the secret never is.
        info!(domain = %domain, port, tls = source, "ghost mode enabled");
        Ok(enable_fields(&state))
    }

    /// `disable`: relay and tunnels gone, state back to inactive.
    pub async fn disable(&self) -> Result<Value, ApiError> {
        let mut op = self.op.lock().await;
        let current = self.state();
        if !current.enabled {
            return Err(ApiError::new(GHOST_INACTIVE, "ghost mode is not active"));
        }
        if let Some(active) = op.take() {
            self.relay_running.store(false, Ordering::Relaxed);
            active.stop().await;
        }
        let inactive = GhostState {
            enabled: false,
            // Kept so a later enable of the same domain can reuse an ACME certificate.
            domain: current.domain.clone(),
            tls_source: current.tls_source.clone(),
            certificate_issued_at: current.certificate_issued_at,
            certificate_expires_at: current.certificate_expires_at,
            ..GhostState::default()
        };
        self.persist(&inactive)?;
        set(&self.restore_error, None);
        info!(domain = %current.domain, "ghost mode disabled");
        Ok(json!({
            "status": "inactive",
            "message": format!("Ghost mode disabled: the relay on port {} is closed and clients are back to direct WireGuard", current.port),
            "restored": true,
        }))
    }

    pub async fn status(&self) -> Value {
        let state = self.state();
        let running = self.relay_running.load(Ordering::Relaxed);
        if !state.enabled {
            return json!({
                "status": "inactive",
                "enabled": false,
                "message": "Ghost mode is not active",
            });
        }
        let mut v = enable_fields(&state);
        v["enabled"] = json!(true);
        v["services"] = json!({
            "wstunnel": if running { "running" } else { "stopped" },
            "relay": {
                "running": running,
                "listen": self.listen_addr().to_string(),
                "shares_sentry_port": self.shared_port.get()
                    .is_some_and(|p| p.covers(self.listen_addr())),
                "tunnels_open": self.stats.tunnels_open.load(Ordering::Relaxed),
                "error": lock(&self.restore_error),
            },
            "tls": {
                "source": state.tls_source,
                "loaded_at": unix_rfc3339(state.certificate_issued_at),
                "expires_at": unix_rfc3339(state.certificate_expires_at),
            },
        });
        v["client_export_info"] = json!(
            "Export clients with: phantom-api ghost export client_name=<name> (or core export_client)"
        );
        v
    }

    /// With ghost on: the Endpoint and AllowedIPs a client config must carry, and the stock
    /// wstunnel client's command that makes that Endpoint.
    pub fn client_route(&self) -> Option<TunnelRoute> {
        let state = self.state();
        if !state.enabled {
            return None;
        }
        let server_ip: IpAddr = state.server_ip.parse().ok()?;
        Some(TunnelRoute {
            endpoint: CLIENT_LOCAL_ENDPOINT.to_string(),
            allowed_ips: allowed_ips_excluding(server_ip),
            connection_command: state.connection_command,
        })
    }

    /// Daemon shutdown: close the relay and its tunnels.
    pub async fn shutdown(&self) {
        // An enable still issuing a certificate is abandoned with the runtime, not waited for.
        if let Ok(mut op) = tokio::time::timeout(Duration::from_secs(5), self.op.lock()).await
            && let Some(active) = op.take()
        {
            self.relay_running.store(false, Ordering::Relaxed);
            active.stop().await;
        }
    }
}

impl Active {
    async fn stop(self) {
        if let Some(stop) = self.renew_stop {
            let _ = stop.send(true);
        }
        drop(self.tls);
        self.relay.stop().await;
    }
}

fn unix_rfc3339(seconds: i64) -> Option<String> {
    (seconds > 0)
        .then(|| time::OffsetDateTime::from_unix_timestamp(seconds).ok())
        .flatten()
        .map(protocol::rfc3339)
}

fn join(ips: &[IpAddr]) -> String {
    if ips.is_empty() {
        return "nothing".into();
    }
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn enable_fields(state: &GhostState) -> Value {
    json!({
        "status": "active",
        "server_ip": state.server_ip,
        "domain": state.domain,
        "secret": state.secret,
        "protocol": state.protocol,
        "port": state.port,
        "activated_at": state.activated_at,
        "connection_command": state.connection_command,
    })
}

/// `0.0.0.0/0, ::/0` without the server's own address (the TLS connection to it must not
/// enter the tunnel it carries) and without loopback (where the stock client listens).
pub fn allowed_ips_excluding(server: IpAddr) -> String {
    let mut v4: Vec<(u32, u8)> = vec![(0, 0)];
    let mut v6: Vec<String> = vec!["::/0".into()];
    let mut cut = |ip: u32, prefix: u8| {
        v4 = v4
            .iter()
            .flat_map(|&(net, len)| subtract(net, len, ip, prefix))
            .collect();
    };
    cut(
        u32::from(std::net::Ipv4Addr::LOCALHOST) & Subnet::mask_of(8),
        8,
    );
    match server {
        IpAddr::V4(ip) => cut(u32::from(ip), 32),
        IpAddr::V6(ip) => v6 = subtract_v6(u128::from(ip)),
    }
    v4.sort_unstable();
    v4.iter()
        .map(|(net, len)| format!("{}/{len}", std::net::Ipv4Addr::from(*net)))
        .chain(v6)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `net/len` minus `ip/prefix`, as the fewest prefixes.
fn subtract(net: u32, len: u8, ip: u32, prefix: u8) -> Vec<(u32, u8)> {
    let within = |a: u32, l: u8, b: u32| l == 0 || (a ^ b) >> (32 - u32::from(l)) == 0;
    if prefix < len {
        // The cut covers this block whole, or misses it.
        return if within(ip, prefix, net) {
            Vec::new()
        } else {
            vec![(net, len)]
        };
    }
    if !within(net, len, ip) {
        return vec![(net, len)];
    }
    let mut out = Vec::new();
    for l in len + 1..=prefix {
        // The sibling of the half that holds `ip`, at each level down.
        let bit = 1u32 << (32 - u32::from(l));
        let half = ip & Subnet::mask_of(l);
        out.push((half ^ bit, l));
    }
    out
}

fn subtract_v6(ip: u128) -> Vec<String> {
    (1..=128u32)
        .map(|l| {
            let bit = 1u128 << (128 - l);
            let mask = if l == 0 { 0 } else { u128::MAX << (128 - l) };
            let net = (ip & mask) ^ bit;
            format!("{}/{l}", std::net::Ipv6Addr::from(net))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn covers(list: &str, ip: std::net::Ipv4Addr) -> bool {
        list.split(", ").filter(|p| !p.contains(':')).any(|p| {
            let s = Subnet::parse(p).unwrap();
            s.prefix == 0 || s.contains(ip)
        })
    }

    #[test]
    fn allowed_ips_cover_everything_but_the_server_and_loopback() {
        let list = allowed_ips_excluding("192.0.2.1".parse().unwrap());
        assert!(!covers(&list, "192.0.2.1".parse().unwrap()), "{list}");
        assert!(!covers(&list, "127.0.0.1".parse().unwrap()));
        assert!(!covers(&list, "127.255.0.9".parse().unwrap()));
        for ip in [
            "192.0.2.0",
            "192.0.2.2",
            "8.8.8.8",
            "10.8.0.1",
            "255.255.255.255",
            "0.0.0.0",
            "128.0.0.1",
        ] {
            assert!(covers(&list, ip.parse().unwrap()), "{ip} in {list}");
        }
        assert!(list.ends_with("::/0"));
        let n = list.split(", ").count();
        assert!(n < 64, "{n} prefixes");
    }

    #[test]
    fn secrets_are_32_alphanumerics_and_differ() {
        let a = new_secret().unwrap();
        let b = new_secret().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }
}

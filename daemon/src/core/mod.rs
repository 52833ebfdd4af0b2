//! The VPN server (`core`): the client store, the WireGuard interface, and the operations the
//! `core` actions perform on them. Other domains learn about clients from [`ClientTable`]
//! snapshots, published after every change ([`Server::clients`]); they never read the store.

pub mod actions;
pub mod metrics;
pub mod store;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};
use wireguard_control::Key;

use self::store::{Client, ClientStore, Conflict};
use crate::{
    config::WireguardConfig,
    error::Error,
    faults::{InjectedFault, fail_point},
    store::write_atomic,
    tasks::{self, Shutdown},
    wg::{
        Subnet, WgError,
        device::{PeerSpec, WireGuardDevice},
        net,
        uapi::DeviceState,
    },
};

/// A handshake younger than this means connected (WireGuard rekeys every 2 minutes).
pub const CONNECTED_WITHIN_SECONDS: u64 = 180;

/// How often the peers' endpoints are read from the device and the changed ones stored (also
/// at every traffic persist and at shutdown), so that even after `kill -9` a restarted daemon
/// knows where its clients were seconds before.
const ENDPOINTS_EVERY: Duration = Duration::from_secs(5);

/// When the handshakes started at start-up are tried again for the peers that have not
/// answered (each wait counted from the previous retry). The first comes once a client refused
/// for load has its cookie (a round trip after its answer); later ones catch answers lost or
/// late. Clients that are simply away are left to come back on their own.
const HANDSHAKE_RETRIES: [Duration; 5] = [
    Duration::from_millis(300),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(3),
];

/// How long the last start-up handshake retry is given before the peers still silent are
/// renewed without one (an answer takes a round trip, or two with a cookie).
const HANDSHAKE_LAST_WAIT: Duration = Duration::from_secs(3);

/// How old the live peer state shown by list/status may be.
const LIVE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// Tweak: rebuild the interface after every new client (the original tool's behaviour).
pub const TWEAK_RESTART_AFTER_ADD: &str = "restart_service_after_client_creation";

/// What can go wrong with the VPN server and its client store.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The WireGuard interface is not up (it failed to come back after a rebuild).
    #[error("the WireGuard interface is down")]
    InterfaceDown,
    /// `wireguard/server.key` holds something that is not a key.
    #[error("{path}: not a WireGuard private key")]
    InvalidServerKey {
        path: PathBuf,
        #[source]
        source: wireguard_control::InvalidKey,
    },
    /// A subnet change would put a client outside the new subnet's usable hosts.
    #[error("{name} would get {ip}, outside the usable hosts of {subnet}")]
    OutsideSubnet {
        name: String,
        ip: Ipv4Addr,
        subnet: Subnet,
    },
    /// A fresh client's address or key is taken already (a concurrent change).
    #[error("address or key collision; try again")]
    Collision,
    /// The old device's teardown task did not finish.
    #[error("WireGuard shutdown: {0}")]
    Shutdown(#[source] tokio::task::JoinError),
    /// The client store's SQLite database.
    #[error("client store: {0}")]
    ClientStore(#[source] rusqlite::Error),
    /// The client store opened but does not pass `PRAGMA quick_check`.
    #[error("client store {path}: integrity check: {result}")]
    IntegrityCheck { path: PathBuf, result: String },
    /// The client store is damaged: nothing is reset, the operator restores a backup.
    #[error(
        "{detail}: the client store {path} is damaged and was left as it is (nothing reset); {}",
        match backup {
            Some((b, made)) => format!("the newest good backup is {} (made {}): stop phantomd, keep the damaged file for inspection, copy the backup over {} (removing {}-wal and {}-shm) and start again; clients added after the backup was made must be added again", b.display(), backup_time(*made), path.display(), path.display(), path.display()),
            None => format!("there is no good backup in {}: restore {} from your own backups, or move it away to start with no clients", backups_dir.display(), path.display()),
        }
    )]
    Damaged {
        path: PathBuf,
        detail: String,
        /// The newest good backup and when it was made (Unix seconds).
        backup: Option<(PathBuf, u64)>,
        backups_dir: PathBuf,
    },
    #[error(transparent)]
    Wg(#[from] WgError),
    #[error(transparent)]
    Fault(#[from] InjectedFault),
    #[error(transparent)]
    Daemon(#[from] Error),
}

/// When a backup was made, as RFC 3339 (its Unix seconds when out of range).
fn backup_time(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .map_or_else(|| unix.to_string(), crate::protocol::rfc3339)
}

/// Why `add_client` did not add the client.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("a client of that name exists")]
    Exists,
    #[error("the subnet has no free address")]
    Full,
    #[error(transparent)]
    Internal(#[from] CoreError),
}

/// Why `enable_client` or `set_client_expiry` did not change the client.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("no such client")]
    NotFound,
    /// The client's expiry has come: it stays disabled until the expiry is moved.
    #[error("the client expired at {expires_at} (Unix seconds)")]
    Expired { expires_at: i64 },
    #[error(transparent)]
    Internal(#[from] CoreError),
}

/// One client as the other domains see it: no keys beyond the public one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientEntry {
    pub name: String,
    pub ip: Ipv4Addr,
    pub public_key: String,
    /// False while disabled, by the operator or at its expiry.
    pub enabled: bool,
    /// When the client expires (Unix seconds); `None`: never.
    pub expires_at: Option<i64>,
}

impl From<&Client> for ClientEntry {
    fn from(c: &Client) -> Self {
        Self {
            name: c.name.clone(),
            ip: c.ip,
            public_key: c.public_key.clone(),
            enabled: c.enabled,
            expires_at: c.expires_at,
        }
    }
}

/// The current time in Unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The longest the expiry task sleeps while a client has an expiry, so a jump of the wall
/// clock is noticed well within a minute.
const EXPIRY_RECHECK: Duration = Duration::from_secs(30);

/// Every client by name and the subnet in force: an immutable snapshot, replaced after every
/// change (start, add, remove, enable, disable, expiry set or come, subnet change).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTable {
    /// `None` without a WireGuard server.
    pub subnet: Option<Subnet>,
    pub clients: BTreeMap<String, ClientEntry>,
}

/// A subscription to the client table: `borrow()` is the latest snapshot, `changed()` wakes
/// on the next change.
pub type ClientChanges = watch::Receiver<Arc<ClientTable>>;

/// A client-table channel for a host without a WireGuard server: empty, and never changing.
pub fn no_clients() -> ClientChanges {
    watch::channel(Arc::new(ClientTable::default())).1
}

/// The DNS servers written into client configurations. The `dns` domain decides (its resolver
/// on the tunnel, or the upstreams) and publishes the choice; core only renders it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientDns {
    /// The server's own tunnel address (Phantom's resolver listens there).
    ServerAddress,
    /// These servers.
    Servers(Vec<IpAddr>),
}

impl ClientDns {
    /// The `DNS =` line's addresses, with the server address for `subnet`.
    pub fn render(&self, subnet: Option<Subnet>) -> Vec<String> {
        match self {
            ClientDns::ServerAddress => subnet
                .map(|s| vec![s.server_ip().to_string()])
                .unwrap_or_default(),
            ClientDns::Servers(servers) => servers.iter().map(IpAddr::to_string).collect(),
        }
    }
}

/// Live figures of one client's peer.
#[derive(Clone, Debug, Default)]
pub struct Live {
    pub handshake_age_seconds: Option<u64>,
    pub endpoint: Option<String>,
    /// Totals including what was persisted before this interface came up.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl Live {
    pub fn connected(&self) -> bool {
        self.handshake_age_seconds
            .is_some_and(|a| a < CONNECTED_WITHIN_SECONDS)
    }
}

pub struct Server {
    pub store: ClientStore,
    device: Mutex<Option<WireGuardDevice>>,
    pub config: WireguardConfig,
    /// The client subnet in force: `[wireguard] subnet` until `change_subnet` moves it (the
    /// store remembers the move, so it survives restarts).
    subnet: Mutex<Subnet>,
    pub private_key: String,
    pub public_key: String,
    /// Serialises allocation + insert so no IP is handed out twice.
    alloc: tokio::sync::Mutex<()>,
    /// Per public key, the device counters already added to the store.
    persisted: Mutex<HashMap<String, (u64, u64)>>,
    /// Per public key, the endpoint the store holds.
    endpoints: Mutex<HashMap<String, SocketAddr>>,
    live_cache: Mutex<Option<(std::time::Instant, HashMap<String, Live>)>>,
    pub started_at: time::OffsetDateTime,
    /// The client table other domains subscribe to.
    table: watch::Sender<Arc<ClientTable>>,
    /// Serialises the changes of a client's state (enable, disable, expiry, removal) across
    /// the store and the device, so an expiry and an extension at the same moment cannot leave
    /// the store and the peers apart.
    changes: Mutex<()>,
    /// Clients disabled at their expiry since the daemon started.
    pub expired_total: AtomicU64,
}

/// Loads the server key from the state directory, creating it (0600) on first start: the
/// key as written there (base64), and parsed.
fn server_key(state_dir: &Path) -> Result<(String, Key), CoreError> {
    let dir = state_dir.join("wireguard");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let path = dir.join("server.key");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let text = text.trim().to_string();
            let key = Key::from_base64(&text)
                .map_err(|source| CoreError::InvalidServerKey { path, source })?;
            Ok((text, key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Key::generate_private();
            let text = key.to_base64();
            write_atomic(&path, format!("{text}\n").as_bytes())?;
            info!("generated the WireGuard server key");
            Ok((text, key))
        }
        Err(e) => Err(Error::io(&path, e).into()),
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, CoreError> {
    m.lock().map_err(|_| Error::LockPoisoned("core").into())
}

impl Server {
    /// Opens the store, brings the interface up with every enabled client, NAT on.
    pub async fn start(config: &WireguardConfig, state_dir: &Path) -> Result<Self, CoreError> {
        let store = ClientStore::open(&state_dir.join("clients.db"))?;
        // A good copy at every start: what a damaged store is restored from.
        match store.backup(&state_dir.join("backups")) {
            Ok(path) => info!(backup = %path.display(), "client store backed up"),
            Err(e) => warn!(error = %e, "cannot back up the client store"),
        }
        let subnet_text = store
            .setting(SUBNET_SETTING)?
            .unwrap_or_else(|| config.subnet.clone());
        let subnet = Subnet::parse(&subnet_text).map_err(Error::from)?;
        let (private_key, key) = server_key(state_dir)?;
        let public_key = key.get_public().to_base64();
        let server = Self {
            store,
            device: Mutex::new(None),
            config: config.clone(),
            subnet: Mutex::new(subnet),
            private_key,
            public_key,
            alloc: tokio::sync::Mutex::new(()),
            persisted: Mutex::new(HashMap::new()),
            endpoints: Mutex::new(HashMap::new()),
            live_cache: Mutex::new(None),
            started_at: time::OffsetDateTime::now_utc(),
            table: watch::Sender::new(Arc::new(ClientTable::default())),
            changes: Mutex::new(()),
            expired_total: AtomicU64::new(0),
        };
        // Clients whose expiry came while the daemon was down never get their peer back.
        server.expire_due(unix_now())?;
        server.publish_all()?;
        server.bring_up().await?;
        Ok(server)
    }

    /// Subscribes to the client table.
    pub fn clients(&self) -> ClientChanges {
        self.table.subscribe()
    }

    /// Republishes the whole table from the store (start, subnet change).
    fn publish_all(&self) -> Result<(), CoreError> {
        let clients = self
            .store
            .all()?
            .iter()
            .map(|c| (c.name.clone(), ClientEntry::from(c)))
            .collect();
        let table = ClientTable {
            subnet: Some(self.subnet()),
            clients,
        };
        self.table.send_replace(Arc::new(table));
        Ok(())
    }

    /// Publishes one client's change (`None`: removed). Subscribers do not keep snapshots, so
    /// the table is usually changed in place rather than copied.
    fn publish(&self, name: &str, entry: Option<ClientEntry>) {
        self.table.send_modify(|table| {
            let table = Arc::make_mut(table);
            match entry {
                Some(e) => table.clients.insert(name.to_string(), e),
                None => table.clients.remove(name),
            };
        });
    }

    /// Starts core's background work: client traffic added to the stored totals every 30 s,
    /// so totals survive restarts, the endpoints that changed stored every few seconds, so a
    /// restart can start the handshakes itself, the retries of those handshakes, and the
    /// expiry of clients at their time.
    pub fn start_tasks(self: &Arc<Self>, shutdown: &Shutdown) -> Vec<JoinHandle<()>> {
        let server = Arc::clone(self);
        vec![
            tasks::every(
                "persisting client traffic",
                Duration::from_secs(30),
                shutdown.clone(),
                move || {
                    if let Err(e) = server.persist_traffic() {
                        warn!(error = %e, "cannot persist client traffic");
                    }
                },
            ),
            {
                let server = Arc::clone(self);
                tasks::every(
                    "remembering client endpoints",
                    ENDPOINTS_EVERY,
                    shutdown.clone(),
                    move || {
                        if let Err(e) = server.persist_endpoints() {
                            warn!(error = %e, "cannot store client endpoints");
                        }
                    },
                )
            },
            tokio::spawn(Arc::clone(self).expire_at_their_time(shutdown.clone())),
            tokio::spawn(Arc::clone(self).finish_handshakes(shutdown.clone())),
        ]
    }

    /// After a start, retries the handshakes that were started and not answered, at
    /// `HANDSHAKE_RETRIES` (the device's own retry would come only after 5 s).
    async fn finish_handshakes(self: Arc<Self>, mut shutdown: Shutdown) {
        for after in HANDSHAKE_RETRIES {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(after) => {}
            }
            let server = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || server.retry_handshakes()).await {
                Ok(Ok(0)) => return,
                Ok(Ok(n)) => info!(
                    peers = n,
                    "handshakes started again with clients that had not answered"
                ),
                Ok(Err(e)) => warn!(error = %e, "cannot retry the handshakes"),
                Err(e) => warn!(error = %e, "retrying the handshakes failed"),
            }
        }
        // The clients still silent are away: stop initiating towards them (see
        // `quiet_silent_peers`) once the last retry has had its time.
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(HANDSHAKE_LAST_WAIT) => {}
        }
        match tokio::task::spawn_blocking(move || self.quiet_silent_peers()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(
                peers = n,
                "clients that did not answer the start-up handshakes are left to come back by themselves"
            ),
            Ok(Err(e)) => warn!(error = %e, "cannot end the start-up handshakes"),
            Err(e) => warn!(error = %e, "ending the start-up handshakes failed"),
        }
    }

    /// Sleeps until the earliest expiry of an enabled client in the client table (woken early
    /// by every change of the table, at most `EXPIRY_RECHECK` while an expiry is pending, not
    /// at all while none is), then expires whoever is due.
    async fn expire_at_their_time(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut table = self.clients();
        let mut last_sweep: Option<tokio::time::Instant> = None;
        loop {
            let next = table
                .borrow_and_update()
                .clients
                .values()
                .filter(|c| c.enabled)
                .filter_map(|c| c.expires_at)
                .min();
            let wait = next.map(|at| {
                let due = UNIX_EPOCH + Duration::from_secs(u64::try_from(at).unwrap_or(0));
                let wait = due
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
                    .min(EXPIRY_RECHECK);
                // Never two sweeps within a second: an entry the store does not agree is due
                // must not spin the task.
                let earliest = last_sweep.map_or(Duration::ZERO, |t| {
                    Duration::from_secs(1).saturating_sub(t.elapsed())
                });
                wait.max(earliest)
            });
            tokio::select! {
                _ = shutdown.changed() => return,
                changed = table.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
                _ = async {
                    match wait {
                        Some(wait) => tokio::time::sleep(wait).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            last_sweep = Some(tokio::time::Instant::now());
            let server = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || server.expire_due(unix_now())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!(error = %e, "cannot expire clients"),
                Err(e) => warn!(error = %e, "expiring clients failed"),
            }
        }
    }

    /// Disables every enabled client whose expiry has come at `now` (durably, marked as
    /// disabled by expiry), takes its peer off the interface and publishes the change.
    /// Returns the clients expired.
    pub fn expire_due(&self, now: i64) -> Result<Vec<Client>, CoreError> {
        let _changes = lock(&self.changes)?;
        let expired = self.store.expire_due(now)?;
        if expired.is_empty() {
            return Ok(expired);
        }
        // The traffic up to the cut is kept, as when the operator disables a client.
        if let Err(e) = self.persist_traffic()
            && !matches!(e, CoreError::InterfaceDown)
        {
            warn!(error = %e, "cannot persist client traffic");
        }
        for client in &expired {
            self.publish(&client.name, Some(ClientEntry::from(client)));
            match self.with_device(|d| d.remove_peer(&client.public_key)) {
                // At start the interface is not up yet and the peer is never added.
                Ok(()) | Err(CoreError::InterfaceDown) => {}
                Err(e) => {
                    warn!(client = %client.name, error = %e, "cannot remove an expired client's peer")
                }
            }
            lock(&self.persisted)?.remove(&client.public_key);
            self.expired_total.fetch_add(1, Ordering::Relaxed);
            info!(
                client = %client.name,
                ip = %client.ip,
                expires_at = client.expires_at.unwrap_or_default(),
                "client expired: peer removed, client disabled until its expiry is extended"
            );
        }
        self.invalidate_live();
        Ok(expired)
    }

    /// Creates (or recreates) the interface from the store: every enabled client a peer.
    pub async fn bring_up(&self) -> Result<(), CoreError> {
        let old = lock(&self.device)?.take();
        if let Some(old) = old {
            self.persist_traffic_of(&old);
            // Tearing the userspace device down takes a couple of seconds: not on a runtime
            // worker.
            tokio::task::spawn_blocking(move || old.shutdown())
                .await
                .map_err(CoreError::Shutdown)?;
        }
        let device = WireGuardDevice::create(&self.config.interface, self.config.backend).await?;
        let peers = self.peers()?;
        device.configure(&self.private_key, self.config.listen_port, &peers)?;
        let subnet = self.subnet();
        net::configure_interface(&self.config.interface, &subnet, self.config.mtu).await?;
        net::enable_forwarding()?;
        net::install_nat(&self.config.interface, &subnet)?;
        lock(&self.persisted)?.clear();
        // Clients connected before a restart get their handshake now, not on their own retry
        // timer (~15 s with traffic, longer without); paced, so on a thread of its own while
        // the start goes on.
        let handshakes = peers.iter().filter(|p| p.endpoint.is_some()).count();
        if handshakes > 0 {
            let (iface, peers) = (self.config.interface.clone(), peers.clone());
            tokio::task::spawn_blocking(move || {
                if let Err(e) = crate::wg::device::start_handshakes(&iface, &peers) {
                    warn!(error = %e, "cannot start handshakes with the known endpoints; clients reconnect on their own timers");
                }
            });
        }
        info!(
            interface = %self.config.interface,
            backend = device.backend(),
            peers = peers.len(),
            handshakes,
            subnet = %subnet,
            "WireGuard server up"
        );
        *lock(&self.device)? = Some(device);
        self.invalidate_live();
        Ok(())
    }

    /// Every enabled client's peer, with the endpoint it was last seen at.
    fn peers(&self) -> Result<Vec<PeerSpec>, CoreError> {
        let now = unix_now();
        let endpoints = self.store.endpoints()?;
        let peers: Vec<PeerSpec> = self
            .store
            .all()?
            .into_iter()
            // A client due to expire is left out even before the expiry task has run.
            .filter(|c| c.enabled && !c.expired_at(now))
            .map(|c| {
                let endpoint = endpoints.get(&c.public_key).copied();
                peer_of(&c, endpoint)
            })
            .collect();
        *lock(&self.endpoints)? = endpoints;
        Ok(peers)
    }

    /// The endpoint a client was last seen at, as stored.
    fn endpoint_of(&self, c: &Client) -> Option<SocketAddr> {
        lock(&self.endpoints)
            .ok()
            .and_then(|e| e.get(&c.public_key).copied())
    }

    /// Stores the endpoints in `state` that differ from those stored (a client that roamed, or
    /// connected for the first time): only those rows are written.
    fn remember_endpoints(&self, state: &DeviceState) -> Result<(), CoreError> {
        let mut known = lock(&self.endpoints)?;
        let changed: Vec<(String, SocketAddr)> = state
            .peers
            .iter()
            .filter_map(|p| {
                let endpoint: SocketAddr = p.endpoint.as_deref()?.parse().ok()?;
                (known.get(&p.public_key) != Some(&endpoint))
                    .then(|| (p.public_key.clone(), endpoint))
            })
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        self.store.set_endpoints(&changed)?;
        known.extend(changed);
        Ok(())
    }

    /// Starts again the handshakes of the peers that have a remembered endpoint and still no
    /// handshake: each peer is renewed (so its unanswered initiation is not waited on for the
    /// device's 5 s retry) and gets a new datagram. Needed when many clients come back at
    /// once: a device answers at most about 100 handshake messages a second without a cookie
    /// (boringtun's limit; the kernel's is a queue length), and a client told to use a cookie
    /// answers the next initiation with it, which passes at any load. Returns how many peers
    /// were started again.
    pub fn retry_handshakes(&self) -> Result<usize, CoreError> {
        self.renew_silent(true)
    }

    /// Renews the peers still silent at their remembered endpoint, without a datagram: the
    /// device then holds no initiation of its own and no packet queued for them. A client that
    /// comes back later from another endpoint (a new instance, another network) finds a plain
    /// responder: a queued packet would make boringtun start its own handshake right after
    /// answering the client's, and those crossing handshakes can leave the two sides on
    /// different sessions until the client's 15 s re-handshake.
    pub fn quiet_silent_peers(&self) -> Result<usize, CoreError> {
        self.renew_silent(false)
    }

    fn renew_silent(&self, start_again: bool) -> Result<usize, CoreError> {
        let state = self.device_state()?;
        let waiting: std::collections::HashSet<String> = state
            .peers
            .into_iter()
            .filter(|p| p.endpoint.is_some() && p.handshake_age_seconds.is_none())
            .map(|p| p.public_key)
            .collect();
        if waiting.is_empty() {
            return Ok(0);
        }
        let peers: Vec<PeerSpec> = {
            // Under the lock of client changes: a client removed or disabled meanwhile is not
            // brought back.
            let _changes = lock(&self.changes)?;
            let candidates: Vec<PeerSpec> = self
                .peers()?
                .into_iter()
                .filter(|p| p.endpoint.is_some() && waiting.contains(&p.public_key))
                .collect();
            // The device checks again right before renewing: a client that reached it by
            // itself meanwhile (its own handshake, or a new endpoint) keeps its fresh session.
            let renewed = self.with_device(|d| d.renew_silent_peers(&candidates))?;
            let mut persisted = lock(&self.persisted)?;
            for p in &renewed {
                persisted.remove(&p.public_key);
            }
            renewed
        };
        self.invalidate_live();
        if !start_again {
            return Ok(peers.len());
        }
        Ok(crate::wg::device::start_handshakes(
            &self.config.interface,
            &peers,
        )?)
    }

    /// Reads the device and stores the endpoints that changed.
    pub fn persist_endpoints(&self) -> Result<(), CoreError> {
        let state = self.device_state()?;
        self.remember_endpoints(&state)
    }

    fn with_device<T>(
        &self,
        f: impl FnOnce(&WireGuardDevice) -> Result<T, WgError>,
    ) -> Result<T, CoreError> {
        let guard = lock(&self.device)?;
        let device = guard.as_ref().ok_or(CoreError::InterfaceDown)?;
        Ok(f(device)?)
    }

    pub fn subnet(&self) -> Subnet {
        match self.subnet.lock() {
            Ok(s) => *s,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    /// Moves every client to the same host offset in `new`, then the interface address, the
    /// peers and NAT. Any failure after the store changed puts everything back as it was.
    pub async fn change_subnet(
        &self,
        new: Subnet,
    ) -> Result<Vec<(String, Ipv4Addr, Ipv4Addr)>, CoreError> {
        let _alloc = self.alloc.lock().await;
        let old = self.subnet();
        let clients = self.store.all()?;
        let mapping: Vec<(String, Ipv4Addr, Ipv4Addr)> = clients
            .iter()
            .map(|c| (c.name.clone(), c.ip, new.at(old.offset(c.ip))))
            .collect();
        if let Some((name, _, ip)) = mapping
            .iter()
            .find(|(_, _, ip)| !new.client_hosts().any(|h| h == *ip))
        {
            return Err(CoreError::OutsideSubnet {
                name: name.clone(),
                ip: *ip,
                subnet: new,
            });
        }
        let forward: Vec<(String, Ipv4Addr)> =
            mapping.iter().map(|(n, _, ip)| (n.clone(), *ip)).collect();
        self.store.move_clients(&forward, &new.to_string())?;
        *lock(&self.subnet)? = new;
        if let Err(e) = self.apply_subnet(&new).await {
            warn!(error = %e, "subnet change failed; rolling back");
            let back: Vec<(String, Ipv4Addr)> =
                mapping.iter().map(|(n, ip, _)| (n.clone(), *ip)).collect();
            self.store.move_clients(&back, &old.to_string())?;
            *lock(&self.subnet)? = old;
            self.apply_subnet(&old).await?;
            self.publish_all()?;
            return Err(e);
        }
        self.publish_all()?;
        info!(from = %old, to = %new, clients = mapping.len(), "subnet changed");
        Ok(mapping)
    }

    /// Puts the interface, peers and NAT in line with `subnet` and the store.
    async fn apply_subnet(&self, subnet: &Subnet) -> Result<(), CoreError> {
        fail_point("change_subnet.before_interface")?;
        net::configure_interface(&self.config.interface, subnet, self.config.mtu).await?;
        let peers = self.peers()?;
        self.with_device(|d| d.set_allowed_ips(&peers))?;
        fail_point("change_subnet.before_nat")?;
        Ok(net::install_nat(&self.config.interface, subnet)?)
    }

    pub fn backend(&self) -> Option<&'static str> {
        lock(&self.device).ok()?.as_ref().map(|d| d.backend())
    }

    pub fn device_state(&self) -> Result<DeviceState, CoreError> {
        self.with_device(|d| d.state())
    }

    /// Adds a client: next free address, fresh keys, stored (durably) before the peer goes
    /// live; `expires_at` (Unix seconds) when it should expire.
    pub async fn add_client(
        &self,
        name: &str,
        expires_at: Option<i64>,
    ) -> Result<Client, AddError> {
        let _alloc = self.alloc.lock().await;
        // No await from here on: an expiry sweep cannot run between the insert and the peer.
        let _changes = lock(&self.changes)?;
        if self.store.get(name)?.is_some() {
            return Err(AddError::Exists);
        }
        let used = self.store.used_ips()?;
        let ip = self
            .subnet()
            .client_hosts()
            .find(|ip| !used.contains(ip))
            .ok_or(AddError::Full)?;
        let private = Key::generate_private();
        let client = Client {
            name: name.to_string(),
            ip,
            public_key: private.get_public().to_base64(),
            private_key: private.to_base64(),
            preshared_key: Key::generate_preshared().to_base64(),
            created: crate::protocol::timestamp_now(),
            enabled: true,
            rx_total: 0,
            tx_total: 0,
            expires_at,
            expiry_disabled: false,
        };
        match self.store.insert(&client)? {
            Ok(()) => {}
            Err(Conflict::Name) => return Err(AddError::Exists),
            Err(Conflict::Ip | Conflict::Key) => {
                return Err(CoreError::Collision.into());
            }
        }
        self.invalidate_live();
        self.publish(&client.name, Some(ClientEntry::from(&client)));
        if let Err(e) = self.with_device(|d| d.add_peer(&peer_of(&client, None))) {
            // The client is stored; the next start or restart_service will add the peer.
            warn!(error = %e, "client stored but the peer could not be added live");
        }
        Ok(client)
    }

    pub fn remove_client(&self, name: &str) -> Result<Option<Client>, CoreError> {
        let _changes = lock(&self.changes)?;
        let Some(client) = self.store.remove(name)? else {
            return Ok(None);
        };
        self.publish(&client.name, None);
        self.with_device(|d| d.remove_peer(&client.public_key))?;
        lock(&self.persisted)?.remove(&client.public_key);
        self.invalidate_live();
        Ok(Some(client))
    }

    /// Enables or disables a client: the peer leaves or rejoins the interface, the client stays.
    /// A client whose expiry has come is not enabled (`ChangeError::Expired`).
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<Client, ChangeError> {
        let _changes = lock(&self.changes)?;
        let before = self.store.get(name)?.ok_or(ChangeError::NotFound)?;
        if enabled
            && let Some(expires_at) = before.expires_at.filter(|_| before.expired_at(unix_now()))
        {
            return Err(ChangeError::Expired { expires_at });
        }
        if before.enabled == enabled {
            if !enabled && before.expiry_disabled {
                // The operator's disable outlasts an extension of the expiry.
                self.store.set_enabled(name, false)?;
            }
            return Ok(before);
        }
        let client = self
            .store
            .set_enabled(name, enabled)?
            .ok_or(ChangeError::NotFound)?;
        self.publish(&client.name, Some(ClientEntry::from(&client)));
        if enabled {
            self.with_device(|d| d.add_peer(&peer_of(&client, self.endpoint_of(&client))))?;
        } else {
            self.persist_traffic()?;
            self.with_device(|d| d.remove_peer(&client.public_key))?;
            lock(&self.persisted)?.remove(&client.public_key);
        }
        self.invalidate_live();
        Ok(client)
    }

    /// Moves a client's expiry (`None`: never). A client disabled at its expiry is enabled
    /// again (its peer back on the interface) when the new expiry is in the future; one the
    /// operator disabled stays disabled. A time already come is refused
    /// (`ChangeError::Expired`): `disable_client` cuts a client at once.
    pub fn set_expiry(&self, name: &str, expires_at: Option<i64>) -> Result<Client, ChangeError> {
        let _changes = lock(&self.changes)?;
        let now = unix_now();
        if let Some(at) = expires_at.filter(|at| *at <= now) {
            return Err(ChangeError::Expired { expires_at: at });
        }
        let before = self.store.get(name)?.ok_or(ChangeError::NotFound)?;
        let client = self
            .store
            .set_expiry(name, expires_at, now)?
            .ok_or(ChangeError::NotFound)?;
        self.publish(&client.name, Some(ClientEntry::from(&client)));
        if client.enabled && !before.enabled {
            self.with_device(|d| d.add_peer(&peer_of(&client, self.endpoint_of(&client))))?;
            self.invalidate_live();
            info!(client = %client.name, ip = %client.ip, expires_at = ?client.expires_at, "expiry extended: client enabled again");
        }
        Ok(client)
    }

    /// Live handshake age, endpoint and traffic per public key, at most `LIVE_MAX_AGE` old:
    /// reading every peer from the device costs milliseconds per thousand peers, and a page of
    /// `list_clients` should not pay that on every call.
    pub fn live(&self) -> HashMap<String, Live> {
        if let Ok(cache) = self.live_cache.lock()
            && let Some((at, live)) = cache.as_ref()
            && at.elapsed() < LIVE_MAX_AGE
        {
            return live.clone();
        }
        let live = self.read_live();
        if let Ok(mut cache) = self.live_cache.lock() {
            *cache = Some((std::time::Instant::now(), live.clone()));
        }
        live
    }

    /// Forgets the cached live state (after a peer change).
    fn invalidate_live(&self) {
        if let Ok(mut cache) = self.live_cache.lock() {
            *cache = None;
        }
    }

    fn read_live(&self) -> HashMap<String, Live> {
        let Ok(state) = self.device_state() else {
            return HashMap::new();
        };
        let persisted = lock(&self.persisted).map(|p| p.clone()).unwrap_or_default();
        state
            .peers
            .into_iter()
            .map(|p| {
                let (rx0, tx0) = persisted.get(&p.public_key).copied().unwrap_or((0, 0));
                let live = Live {
                    handshake_age_seconds: p.handshake_age_seconds,
                    endpoint: p.endpoint,
                    // Unpersisted part of the device counters.
                    rx_bytes: p.rx_bytes.saturating_sub(rx0),
                    tx_bytes: p.tx_bytes.saturating_sub(tx0),
                };
                (p.public_key, live)
            })
            .collect()
    }

    /// Adds the traffic the device counted since the last call to the stored totals.
    pub fn persist_traffic(&self) -> Result<(), CoreError> {
        let state = self.device_state()?;
        self.persist(&state)
    }

    fn persist_traffic_of(&self, device: &WireGuardDevice) {
        if let Ok(state) = device.state()
            && let Err(e) = self.persist(&state)
        {
            warn!(error = %e, "cannot persist client traffic");
        }
    }

    fn persist(&self, state: &DeviceState) -> Result<(), CoreError> {
        // The endpoints ride along; failing to store them does not hold back the traffic.
        if let Err(e) = self.remember_endpoints(state) {
            warn!(error = %e, "cannot store client endpoints");
        }
        let by_key: HashMap<String, String> = self
            .store
            .all()?
            .into_iter()
            .map(|c| (c.public_key, c.name))
            .collect();
        let mut persisted = lock(&self.persisted)?;
        let mut deltas = Vec::new();
        for p in &state.peers {
            let Some(name) = by_key.get(&p.public_key) else {
                continue;
            };
            let (rx0, tx0) = persisted.get(&p.public_key).copied().unwrap_or((0, 0));
            let (drx, dtx) = (
                p.rx_bytes.saturating_sub(rx0),
                p.tx_bytes.saturating_sub(tx0),
            );
            if drx > 0 || dtx > 0 {
                deltas.push((name.clone(), drx, dtx));
            }
            persisted.insert(p.public_key.clone(), (p.rx_bytes, p.tx_bytes));
        }
        if !deltas.is_empty() {
            self.store.add_traffic(&deltas)?;
        }
        Ok(())
    }

    /// The public endpoint written into client configs: `[wireguard] endpoint`, or when
    /// "auto" the first global IPv4 address of this host outside the tunnel.
    pub fn endpoint(&self) -> String {
        let host = if self.config.endpoint != "auto" {
            self.config.endpoint.clone()
        } else {
            nix::ifaddrs::getifaddrs()
                .ok()
                .and_then(|addrs| {
                    addrs
                        .filter(|a| {
                            a.interface_name != self.config.interface && a.interface_name != "lo"
                        })
                        .filter_map(|a| {
                            a.address.and_then(|s| s.as_sockaddr_in().map(|v4| v4.ip()))
                        })
                        .find(|ip| !ip.is_loopback() && !ip.is_link_local())
                        .map(|ip| ip.to_string())
                })
                .unwrap_or_else(|| "127.0.0.1".into())
        };
        let port = self.config.listen_port;
        if host.parse::<std::net::SocketAddr>().is_ok() {
            return host;
        }
        match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
            _ if host
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.contains(':') && p.parse::<u16>().is_ok()) =>
            {
                host
            }
            _ => format!("{host}:{port}"),
        }
    }

    /// The client's wg-quick configuration.
    pub fn client_config(&self, client: &Client, dns: &[String]) -> String {
        self.client_config_via(client, dns, &self.endpoint(), "0.0.0.0/0, ::/0")
    }

    /// The configuration with another Endpoint and AllowedIPs (ghost mode: the local
    /// wstunnel client, and everything but the server's own address).
    pub fn client_config_via(
        &self,
        client: &Client,
        dns: &[String],
        endpoint: &str,
        allowed_ips: &str,
    ) -> String {
        format!(
            "[Interface]\n\
             PrivateKey = {}\n\
             Address = {}/32\n\
             DNS = {}\n\
             MTU = {}\n\
             \n\
             [Peer]\n\
             PublicKey = {}\n\
             PresharedKey = {}\n\
             Endpoint = {}\n\
             AllowedIPs = {}\n\
             PersistentKeepalive = 25\n",
            client.private_key,
            client.ip,
            dns.join(", "),
            self.config.mtu,
            self.public_key,
            client.preshared_key,
            endpoint,
            allowed_ips,
        )
    }

    /// Shutdown: traffic and endpoints persisted, NAT removed, interface gone; with
    /// `[wireguard] keep_interface` a kernel interface and the NAT table stay for the next
    /// start (the clients' sessions survive the restart).
    pub fn shutdown(&self) {
        let mut keep = false;
        if let Ok(mut guard) = lock(&self.device)
            && let Some(device) = guard.take()
        {
            self.persist_traffic_of(&device);
            keep = self.config.keep_interface && device.backend() == "kernel";
            if keep {
                device.leave();
            } else {
                device.shutdown();
            }
        }
        if keep {
            return;
        }
        if let Err(e) = net::remove_nat() {
            warn!(error = %e, "cannot remove the NAT table");
        }
    }
}

fn peer_of(c: &Client, endpoint: Option<SocketAddr>) -> PeerSpec {
    PeerSpec {
        public_key: c.public_key.clone(),
        preshared_key: c.preshared_key.clone(),
        ip: c.ip,
        endpoint,
    }
}

/// Where the store keeps the subnet in force after a `change_subnet`.
const SUBNET_SETTING: &str = "wireguard.subnet";

/// 1 to 64 characters of letters, digits, `-` and `_`.
pub fn valid_client_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

//! Multihop (seed 000, SPEC section 8): VPN clients' internet traffic leaves through an
//! imported WireGuard exit instead of the server's own address.
//!
//! The path: `tc_multihop_mark` marks client packets bound for anything but another client
//! or the server itself; an `ip rule fwmark` sends marked packets to the exit table, whose
//! default route is the exit interface (an embedded boringtun device, as core's); our
//! nftables table masquerades them out of it. Behind the exit route sits an `unreachable`
//! default, so while multihop is on, client traffic never falls back to the server's own
//! address. A monitor task checks the exit and re-establishes it when it fails.
//!
//! Durable state (state directory, `multihop/`): the imported exits (0600 JSON each), the
//! enabled flag with the active exit, and the session log. Start-up restores an enabled
//! multihop, removing anything of ours left over first, so every entry exists exactly once.

pub mod actions;
pub mod echo;
pub mod metrics;
pub mod routing;
pub mod session_log;
pub mod wgconf;

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::{
    config::{Config, MultihopConfig, WireguardBackend},
    core::Server,
    datapath::{Datapath, MarkSettings},
    error::Error,
    faults::{InjectedFault, fail_point},
    wg::{
        Subnet, WgError,
        device::{UplinkPeer, WireGuardDevice},
        net::{self, NatExtension},
    },
};
use echo::{EchoUrl, ProbeError};
use routing::{Plan, RoutingError};
use session_log::SessionLog;
use wgconf::{ExitConfig, ParseError};

/// Our part of the nftables table.
const NAT_OWNER: &str = "multihop";
/// A handshake older than this cannot carry data any more (WireGuard's REJECT_AFTER_TIME).
const HANDSHAKE_FRESH_SECONDS: u64 = 180;

#[derive(Debug, thiserror::Error)]
pub enum MultihopError {
    /// `import`'s `config_path` is relative.
    #[error(
        "config_path {0:?} must be an absolute path (the daemon's working directory is not yours)"
    )]
    RelativePath(String),
    /// The file to import is not an exit configuration we take.
    #[error("{path} is not a valid WireGuard config: {source}")]
    InvalidConfig {
        path: String,
        #[source]
        source: ParseError,
    },
    #[error("{0}: no such file")]
    ConfigNotFound(String),
    /// An exit name that could not be a file name; `from_file`: taken from the file's name.
    #[error(
        "exit name {name:?} must be 1 to 64 letters, digits, '-', '_' or '.'{}",
        if *.from_file { " (taken from the file name; give custom_name)" } else { "" }
    )]
    InvalidName { name: String, from_file: bool },
    #[error("an exit named {0:?} exists already; remove it first or choose another custom_name")]
    ExitExists(String),
    #[error("no exit named {0:?} (list_exits shows the imported ones)")]
    ExitNotFound(String),
    #[error("multihop is already on through {0:?}; disable it first")]
    AlreadyEnabled(String),
    #[error("multihop is off")]
    NotEnabled,
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    #[error("enabling failed: {0}; everything it had set up was removed")]
    SetupFailed(#[source] PathError),
    #[error(
        "the exit {0:?} did not complete a WireGuard handshake within {1} s; everything enabling had set up was removed"
    )]
    ExitUnreachable(String, u64),
    /// A stored exit's file does not parse.
    #[error("{path}: {source}")]
    StoredExit {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The import's worker thread did not finish.
    #[error("{0}")]
    ImportTask(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Daemon(#[from] Error),
}

/// A part of the daemon multihop needs is switched off.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error(
        "the WireGuard server is disabled ([wireguard] enabled = false): there are no clients to route"
    )]
    NoServer,
    #[error(
        "the datapath is disabled ([datapath] enabled = false): multihop needs the in-kernel mark"
    )]
    NoDatapath,
}

/// What went wrong with the exit's path: bringing it up, checking it, taking it down.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("the exit config has no IPv4 address")]
    NoIpv4Address,
    #[error("cannot resolve the exit endpoint {host}: {source}")]
    EndpointUnresolved {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the exit endpoint {host} has no address")]
    EndpointWithoutAddress { host: String },
    /// Creating or configuring the exit's WireGuard interface.
    #[error("exit interface: {0}")]
    ExitInterface(#[source] WgError),
    #[error("exit interface vanished")]
    ExitInterfaceVanished,
    /// The exit interface is gone (the monitor's check).
    #[error("{0} is gone")]
    InterfaceGone(String),
    /// A link of the exit interface's name is still there after a reset.
    #[error("{0} is still there")]
    InterfaceRemains(String),
    /// Our rules in the nftables table.
    #[error("NAT: {0}")]
    Nat(#[source] WgError),
    /// The in-kernel mark of client traffic.
    #[error("datapath mark: {0}")]
    Mark(#[source] Error),
    /// The probe through the exit failed; `handshake_age`: seconds since the exit's last
    /// handshake, if it had one.
    #[error("{source}; {}", handshake_note(*.handshake_age))]
    Unreachable {
        #[source]
        source: ProbeError,
        handshake_age: Option<u64>,
    },
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    #[error(transparent)]
    Fault(#[from] InjectedFault),
    #[error(transparent)]
    Daemon(#[from] Error),
}

fn handshake_note(age: Option<u64>) -> String {
    match age {
        Some(age) => format!("last handshake {age} s ago"),
        None => "no handshake with the exit".into(),
    }
}

/// The enabled flag and active exit, as persisted.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct PersistedState {
    enabled: bool,
    active_exit: Option<String>,
    vpn_interface_name: String,
    updated_at: Option<String>,
}

/// One imported exit, as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredExit {
    pub name: String,
    pub imported_at: String,
    pub provider: String,
    pub source_file: String,
    pub optimizations: Vec<String>,
    pub config: ExitConfig,
}

/// What is up right now.
#[derive(Default)]
struct Live {
    device: Option<WireGuardDevice>,
    exit: Option<StoredExit>,
    endpoint: Option<SocketAddr>,
    nat: bool,
}

/// The monitor's findings, for `status` and metrics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MonitorState {
    pub running: bool,
    pub since: Option<String>,
    pub interval_seconds: u64,
    pub last_check: Option<String>,
    /// `None` before the first check of this exit.
    pub exit_reachable: Option<bool>,
    pub consecutive_failures: u64,
    pub last_error: Option<String>,
    pub checks_up: u64,
    pub checks_down: u64,
    pub went_down: u64,
    pub restored: u64,
    pub reestablished: u64,
}

pub struct Multihop {
    config: MultihopConfig,
    mark: u32,
    backend: WireguardBackend,
    echo: EchoUrl,
    exits_dir: PathBuf,
    state_path: PathBuf,
    state: Mutex<PersistedState>,
    live: Mutex<Live>,
    monitor: Mutex<MonitorState>,
    /// One state-changing operation at a time (admin actions and the monitor's repairs).
    ops: tokio::sync::Mutex<()>,
    pub log: SessionLog,
    wireguard: Option<Arc<Server>>,
    datapath: Option<Arc<Datapath>>,
    egress_mark: EgressMark,
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Exit names: what a file name could be, without surprises.
pub fn valid_exit_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The mark the daemon's own client-serving sockets (the resolver's upstream queries) carry
/// while multihop is on, so that traffic leaves through the exit like the clients' own. One
/// handle, shared by multihop (which sets it) and the resolver (which reads it per query).
#[derive(Clone, Debug, Default)]
pub struct EgressMark(Arc<AtomicU32>);

impl EgressMark {
    /// `Some(mark)` while multihop is on.
    pub fn get(&self) -> Option<u32> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            mark => Some(mark),
        }
    }

    fn set(&self, mark: Option<u32>) {
        self.0.store(mark.unwrap_or(0), Ordering::Relaxed);
    }
}

/// What enabling found out about the exit.
pub struct EnableOutcome {
    pub handshake_established: bool,
    pub connection_verified: bool,
    pub probe_error: Option<String>,
}

impl Multihop {
    /// Opens the store and, when multihop was on, restores it.
    pub async fn start(
        config: &Config,
        wireguard: Option<Arc<Server>>,
        datapath: Option<Arc<Datapath>>,
        egress_mark: EgressMark,
    ) -> Result<Arc<Self>, Error> {
        let dir = config.state_dir.join("multihop");
        let exits_dir = dir.join("exits");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&exits_dir)
            .map_err(|e| Error::io(&exits_dir, e))?;
        let state_path = dir.join("state.json");
        let mut state: PersistedState =
            crate::store::read_json_or_set_aside(&state_path, "multihop")?;
        state.vpn_interface_name = config.multihop.interface.clone();
        let echo = EchoUrl::parse(&config.multihop.echo_url).map_err(Error::from)?;
        let this = Arc::new(Self {
            config: config.multihop.clone(),
            mark: config.datapath.multihop_mark,
            backend: config.wireguard.backend,
            echo,
            exits_dir,
            state_path,
            state: Mutex::new(state.clone()),
            live: Mutex::new(Live::default()),
            monitor: Mutex::new(MonitorState {
                interval_seconds: config.multihop.monitor_interval_seconds,
                ..Default::default()
            }),
            ops: tokio::sync::Mutex::new(()),
            log: SessionLog::new(&dir.join("session.log")),
            wireguard,
            datapath,
            egress_mark,
        });
        if state.enabled {
            this.restore(state.active_exit.as_deref().unwrap_or_default())
                .await;
        } else {
            this.clear_leftovers().await;
        }
        Ok(this)
    }

    pub fn is_enabled(&self) -> bool {
        lock(&self.state).enabled
    }

    pub fn active_exit(&self) -> Option<String> {
        let s = lock(&self.state);
        if s.enabled {
            s.active_exit.clone()
        } else {
            None
        }
    }

    pub fn interface(&self) -> &str {
        &self.config.interface
    }

    pub fn monitor_state(&self) -> MonitorState {
        lock(&self.monitor).clone()
    }

    fn persist(&self, enabled: bool, exit: Option<&str>) -> Result<(), Error> {
        let mut state = lock(&self.state);
        let next = PersistedState {
            enabled,
            active_exit: exit.map(str::to_string),
            vpn_interface_name: self.config.interface.clone(),
            updated_at: Some(now()),
        };
        crate::store::write_json(&self.state_path, &next)?;
        *state = next;
        Ok(())
    }

    // ---- the exits store ----

    fn exit_path(&self, name: &str) -> PathBuf {
        self.exits_dir.join(format!("{name}.json"))
    }

    pub fn exits(&self) -> Result<Vec<StoredExit>, MultihopError> {
        let mut out = Vec::new();
        let entries =
            std::fs::read_dir(&self.exits_dir).map_err(|e| Error::io(&self.exits_dir, e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<StoredExit>(&t).map_err(|e| e.to_string()))
            {
                Ok(exit) => out.push(exit),
                Err(e) => warn!(path = %path.display(), error = %e, "skipping an unreadable exit"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn exit(&self, name: &str) -> Result<StoredExit, MultihopError> {
        if !valid_exit_name(name) {
            return Err(MultihopError::ExitNotFound(name.chars().take(80).collect()));
        }
        let path = self.exit_path(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(MultihopError::ExitNotFound(name.into()));
            }
            Err(e) => return Err(Error::io(&path, e).into()),
        };
        serde_json::from_str(&text).map_err(|source| MultihopError::StoredExit { path, source })
    }

    /// Reads, validates and stores a wg-quick file.
    pub async fn import(
        &self,
        config_path: &str,
        custom_name: Option<&str>,
    ) -> Result<StoredExit, MultihopError> {
        let path = Path::new(config_path);
        if !path.is_absolute() {
            return Err(MultihopError::RelativePath(config_path.to_string()));
        }
        if !path.exists() {
            return Err(MultihopError::ConfigNotFound(config_path.to_string()));
        }
        let file_path = path.to_path_buf();
        let parsed = tokio::task::spawn_blocking(move || wgconf::read(&file_path))
            .await
            .map_err(MultihopError::ImportTask)?
            .map_err(|source| MultihopError::InvalidConfig {
                path: config_path.to_string(),
                source,
            })?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let name = custom_name.map(str::to_string).unwrap_or(stem.clone());
        if !valid_exit_name(&name) {
            return Err(MultihopError::InvalidName {
                name: name.chars().take(80).collect(),
                from_file: custom_name.is_none(),
            });
        }
        let _ops = self.ops.lock().await;
        if self.exit_path(&name).exists() {
            return Err(MultihopError::ExitExists(name));
        }
        let exit = StoredExit {
            provider: wgconf::provider(&parsed.config.endpoint.host, &stem),
            name: name.clone(),
            imported_at: now(),
            source_file: config_path.to_string(),
            optimizations: parsed.optimizations,
            config: parsed.config,
        };
        crate::store::write_json(&self.exit_path(&name), &exit)?;
        self.log.record(
            "import",
            &format!(
                "exit {name} imported from {config_path} (endpoint {}, provider {})",
                exit.config.endpoint, exit.provider
            ),
        );
        Ok(exit)
    }

    /// Removes a stored exit; an active one is disabled first. Returns whether it was active.
    pub async fn remove(&self, name: &str) -> Result<bool, MultihopError> {
        self.exit(name)?;
        let was_active = self.active_exit().as_deref() == Some(name);
        if was_active {
            self.disable().await?;
        }
        let _ops = self.ops.lock().await;
        let path = self.exit_path(name);
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        self.log.record("remove", &format!("exit {name} removed"));
        Ok(was_active)
    }

    // ---- the path ----

    fn server(&self) -> Result<&Arc<Server>, Unavailable> {
        self.wireguard.as_ref().ok_or(Unavailable::NoServer)
    }

    fn datapath(&self) -> Result<&Arc<Datapath>, Unavailable> {
        self.datapath.as_ref().ok_or(Unavailable::NoDatapath)
    }

    fn plan(&self, exit: &StoredExit) -> Result<Plan, PathError> {
        let address = exit.config.ipv4().ok_or(PathError::NoIpv4Address)?;
        Ok(Plan {
            interface: self.config.interface.clone(),
            address,
            mtu: exit.config.mtu,
            table: self.config.table,
            mark: self.mark,
            priority: self.config.rule_priority,
        })
    }

    fn nat_rules(&self, subnet: &Subnet) -> NatExtension {
        let iface = &self.config.interface;
        NatExtension {
            postrouting: vec![format!(
                "oifname \"{iface}\" ip saddr {subnet} masquerade comment \"phantom: multihop exit\""
            )],
            forward: vec![
                format!(
                    "oifname \"{iface}\" tcp flags syn tcp option maxseg size set rt mtu comment \"phantom: multihop MSS\""
                ),
                format!(
                    "iifname \"{iface}\" ip daddr {subnet} ct state established,related accept comment \"phantom: multihop answers\""
                ),
                format!(
                    "iifname \"{iface}\" drop comment \"phantom: nothing unsolicited from the exit\""
                ),
            ],
        }
    }

    async fn resolve_endpoint(exit: &StoredExit) -> Result<SocketAddr, PathError> {
        let ep = &exit.config.endpoint;
        if let Ok(ip) = ep.host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, ep.port));
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((ep.host.as_str(), ep.port))
            .await
            .map_err(|source| PathError::EndpointUnresolved {
                host: ep.host.clone(),
                source,
            })?
            .collect();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| PathError::EndpointWithoutAddress {
                host: ep.host.clone(),
            })
    }

    /// Brings the path up, or repairs it: every step is idempotent. Order: rule and the
    /// fail-closed route first (marked traffic never leaks), then the device (a fresh peer
    /// session), the interface, the exit route, NAT.
    async fn setup_path(&self, exit: &StoredExit) -> Result<(), PathError> {
        let server = self.server()?;
        let plan = self.plan(exit)?;
        routing::apply_rule_and_kill_switch(&plan).await?;
        let endpoint = Self::resolve_endpoint(exit).await?;
        let link_present = nix::net::if_::if_nametoindex(plan.interface.as_str()).is_ok();
        let have_device = lock(&self.live).device.is_some();
        if !have_device || !link_present {
            let old = lock(&self.live).device.take();
            if let Some(old) = old {
                let _ = tokio::task::spawn_blocking(move || old.shutdown()).await;
            }
            let device = WireGuardDevice::create(&plan.interface, self.backend)
                .await
                .map_err(PathError::ExitInterface)?;
            lock(&self.live).device = Some(device);
        }
        let peer = UplinkPeer {
            public_key: exit.config.public_key.clone(),
            preshared_key: exit.config.preshared_key.clone(),
            endpoint,
            allowed_ips: exit.config.allowed_ips.clone(),
            persistent_keepalive: Some(exit.config.persistent_keepalive),
        };
        {
            let live = lock(&self.live);
            let device = live
                .device
                .as_ref()
                .ok_or(PathError::ExitInterfaceVanished)?;
            device
                .configure_uplink(
                    &exit.config.private_key,
                    exit.config.listen_port.unwrap_or(0),
                    &peer,
                )
                .map_err(PathError::ExitInterface)?;
        }
        lock(&self.live).endpoint = Some(endpoint);
        routing::configure_interface(&plan).await?;
        routing::apply_exit_route(&plan).await?;
        if !lock(&self.live).nat {
            net::set_nat_extension(NAT_OWNER, Some(self.nat_rules(&server.subnet())))
                .map_err(PathError::Nat)?;
            lock(&self.live).nat = true;
        }
        lock(&self.live).exit = Some(exit.clone());
        Ok(())
    }

    fn set_mark(&self, enabled: bool) -> Result<(), PathError> {
        let dp = self.datapath()?;
        let subnet = self.server()?.subnet();
        dp.multihop
            .set(&MarkSettings {
                enabled,
                mark: self.mark,
                v4: Some((subnet.network, subnet.prefix)),
                v6: None,
                local: crate::datapath::actions::local_addresses(),
            })
            .map_err(PathError::Mark)?;
        self.egress_mark.set(enabled.then_some(self.mark));
        Ok(())
    }

    /// Removes everything of the path: mark, NAT, rules, routes, interface. Best effort;
    /// returns what went and the errors met. `stray_link`: also delete a link of our
    /// interface's name that this daemon did not create (reset_state only: a failed enable
    /// must not delete someone else's interface that was in the way).
    async fn tear_down(&self, stray_link: bool) -> (Vec<String>, Vec<PathError>) {
        let mut cleaned = Vec::new();
        let mut errors = Vec::new();
        self.egress_mark.set(None);
        if self.datapath.is_some() && self.wireguard.is_some() {
            match self.set_mark(false) {
                Ok(()) => cleaned.push("datapath mark".to_string()),
                Err(e) => errors.push(e),
            }
        }
        let had_nat = std::mem::take(&mut lock(&self.live).nat);
        match net::set_nat_extension(NAT_OWNER, None) {
            Ok(()) if had_nat => cleaned.push("NAT rules".into()),
            Ok(()) => {}
            Err(e) => errors.push(PathError::Nat(e)),
        }
        match routing::clear(self.config.table).await {
            Ok((rules, routes)) => {
                if rules > 0 {
                    cleaned.push(format!("{rules} routing rule(s)"));
                }
                if routes > 0 {
                    cleaned.push(format!("{routes} route(s) in table {}", self.config.table));
                }
            }
            Err(e) => errors.push(e.into()),
        }
        let device = {
            let mut live = lock(&self.live);
            live.exit = None;
            live.endpoint = None;
            live.device.take()
        };
        if let Some(device) = device {
            let _ = tokio::task::spawn_blocking(move || device.shutdown()).await;
            cleaned.push(format!("{} interface", self.config.interface));
        } else if stray_link {
            // A link of ours a crash left behind (a kernel device outlives the daemon).
            match routing::delete_link(&self.config.interface).await {
                Ok(true) => cleaned.push(format!("{} interface", self.config.interface)),
                Ok(false) => {}
                Err(e) => errors.push(e.into()),
            }
        }
        if stray_link && nix::net::if_::if_nametoindex(self.config.interface.as_str()).is_ok() {
            errors.push(PathError::InterfaceRemains(self.config.interface.clone()));
        }
        (cleaned, errors)
    }

    /// The exit's handshake age, if it has had one.
    pub fn handshake_age(&self) -> Option<u64> {
        let live = lock(&self.live);
        let state = live.device.as_ref()?.state().ok()?;
        state.peers.first()?.handshake_age_seconds
    }

    fn probe_timeout(&self) -> Duration {
        Duration::from_secs(self.config.probe_timeout_seconds)
    }

    /// Whether the exit has a fresh handshake, starting one if needed: until `deadline`, one
    /// datagram a second goes through the exit to each of `nudge_targets` (WireGuard starts a
    /// handshake for the first packet it has to send without a session), and the device is
    /// asked for its handshake every 100 ms. Needs no name resolved and no echo service.
    async fn handshake_through_exit(
        &self,
        exit: &ExitConfig,
        deadline: tokio::time::Instant,
    ) -> bool {
        let targets = nudge_targets(
            exit,
            &self.echo,
            &crate::datapath::actions::local_addresses(),
        );
        let mut next_nudge = tokio::time::Instant::now();
        loop {
            if self
                .handshake_age()
                .is_some_and(|a| a <= HANDSHAKE_FRESH_SECONDS)
            {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            if now >= next_nudge {
                for to in &targets {
                    if let Err(e) =
                        echo::nudge(SocketAddr::new(IpAddr::V4(*to), 9), self.mark).await
                    {
                        debug!(error = %e, "multihop: datagram through the exit not sent");
                    }
                }
                next_nudge = now + Duration::from_secs(1);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts the exit's handshake itself and waits for it, then probes the echo service
    /// through the exit on its own. Returns (handshake, connection, the probe's error): a
    /// failed probe (a name that does not resolve, an echo service down) with a handshake is
    /// reported as such, not as an exit that did not answer.
    async fn verify(&self, exit: &ExitConfig) -> (bool, bool, Option<String>) {
        let timeout = self.probe_timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        if !self.handshake_through_exit(exit, deadline).await {
            return (false, false, None);
        }
        // The lookup of the echo host is the system resolver's: bounded here.
        let probe =
            match tokio::time::timeout(timeout * 2, echo::probe(&self.echo, self.mark, timeout))
                .await
            {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!(
                    "the echo probe did not finish within {} s",
                    timeout.as_secs() * 2
                )),
            };
        (true, probe.is_ok(), probe.err())
    }

    pub async fn enable(&self, exit_name: &str) -> Result<EnableOutcome, MultihopError> {
        let _ops = self.ops.lock().await;
        if let Some(active) = self.active_exit() {
            return Err(MultihopError::AlreadyEnabled(active));
        }
        let exit = self.exit(exit_name)?;
        self.server()?;
        self.datapath()?;
        // Anything of ours left from before (a crash during an earlier attempt) goes first.
        if let Err(e) = routing::clear(self.config.table).await {
            return Err(MultihopError::SetupFailed(e.into()));
        }
        let result = async {
            self.setup_path(&exit).await.map_err(Some)?;
            let (handshake, connected, probe_error) = self.verify(&exit.config).await;
            if !handshake {
                return Err(None);
            }
            fail_point("multihop.enable.before_mark").map_err(|e| Some(e.into()))?;
            // Recorded before clients move: a crash from here on is restored at start.
            self.persist(true, Some(&exit.name))
                .map_err(|e| Some(e.into()))?;
            self.set_mark(true).map_err(Some)?;
            Ok(EnableOutcome {
                handshake_established: handshake,
                connection_verified: connected,
                probe_error,
            })
        }
        .await;
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(cause) => {
                let (_, errors) = self.tear_down(false).await;
                for e in &errors {
                    error!(error = %e, "multihop: rollback incomplete");
                }
                if self.is_enabled()
                    && let Err(e) = self.persist(false, None)
                {
                    error!(error = %e, "multihop: cannot record the rollback");
                }
                let err = match cause {
                    Some(e) => MultihopError::SetupFailed(e),
                    None => MultihopError::ExitUnreachable(
                        exit.name.clone(),
                        self.config.probe_timeout_seconds,
                    ),
                };
                self.log
                    .record("enable_failed", &format!("exit {}: {err}", exit.name));
                return Err(err);
            }
        };
        self.reset_monitor(Some(outcome.connection_verified));
        self.log.record(
            "enable",
            &format!(
                "multihop on through {} ({}); handshake {}, connection {}",
                exit.name,
                exit.config.endpoint,
                outcome.handshake_established,
                if outcome.connection_verified {
                    "verified".to_string()
                } else {
                    format!(
                        "not verified: {}",
                        outcome.probe_error.clone().unwrap_or_default()
                    )
                }
            ),
        );
        info!(exit = %exit.name, "multihop on");
        Ok(outcome)
    }

    fn reset_monitor(&self, reachable: Option<bool>) {
        let mut m = lock(&self.monitor);
        m.exit_reachable = reachable;
        m.consecutive_failures = 0;
        m.last_error = None;
    }

    /// Turns multihop off. Returns (previous exit, interface cleaned).
    pub async fn disable(&self) -> Result<(String, bool), MultihopError> {
        let _ops = self.ops.lock().await;
        let Some(previous) = self.active_exit() else {
            return Err(MultihopError::NotEnabled);
        };
        let (_, errors) = self.tear_down(false).await;
        self.persist(false, None)?;
        self.reset_monitor(None);
        let cleaned = errors.is_empty();
        self.log.record(
            "disable",
            &if cleaned {
                format!("multihop off (was through {previous})")
            } else {
                format!(
                    "multihop off (was through {previous}); left over: {}",
                    joined(&errors)
                )
            },
        );
        info!(exit = %previous, "multihop off");
        Ok((previous, cleaned))
    }

    /// Removes every trace, whatever the recorded state says. Returns (cleaned up, errors).
    pub async fn reset(&self) -> Result<(Vec<String>, Vec<String>), MultihopError> {
        let _ops = self.ops.lock().await;
        let (mut cleaned, errors) = self.tear_down(true).await;
        let errors: Vec<String> = errors.iter().map(PathError::to_string).collect();
        let was = self.active_exit();
        self.persist(false, None)?;
        self.reset_monitor(None);
        if let Some(exit) = was {
            cleaned.push(format!("active exit {exit}"));
        }
        self.log.record(
            "reset",
            &format!(
                "state reset; removed: {}{}",
                if cleaned.is_empty() {
                    "nothing".into()
                } else {
                    cleaned.join(", ")
                },
                if errors.is_empty() {
                    String::new()
                } else {
                    format!("; errors: {}", errors.join("; "))
                }
            ),
        );
        Ok((cleaned, errors))
    }

    /// Start-up with multihop off: a crash in the middle of enabling can have left our rule
    /// and routes (and the mark) behind; they go, so clients are not blackholed.
    async fn clear_leftovers(&self) {
        match routing::clear(self.config.table).await {
            Ok((0, 0)) => {}
            Ok((rules, routes)) => {
                if self.datapath.is_some()
                    && self.wireguard.is_some()
                    && let Err(e) = self.set_mark(false)
                {
                    warn!(error = %e, "multihop: cannot switch a leftover mark off");
                }
                self.log.record(
                    "leftovers_removed",
                    &format!("multihop is off; removed {rules} rule(s) and {routes} route(s) left from before"),
                );
            }
            Err(e) => warn!(error = %e, "multihop: cannot check for leftovers"),
        }
    }

    /// Start-up with multihop on: remove leftovers, then the whole path, marking last. A
    /// failure leaves the fail-closed parts and the monitor to finish the job.
    async fn restore(&self, exit_name: &str) {
        let _ops = self.ops.lock().await;
        let exit = match self.exit(exit_name) {
            Ok(e) => e,
            Err(e) => {
                error!(error = %e, "multihop was on, but its exit is gone; turning it off");
                let _ = self.tear_down(true).await;
                let _ = self.persist(false, None);
                self.log.record(
                    "restore_failed",
                    &format!("exit {exit_name}: {e}; multihop turned off"),
                );
                return;
            }
        };
        if let Err(e) = routing::clear(self.config.table).await {
            warn!(error = %e, "multihop: cannot clear leftovers");
        }
        let _ = routing::delete_link(&self.config.interface).await;
        let setup = self.setup_path(&exit).await;
        lock(&self.live).exit = Some(exit.clone());
        let mark = self.set_mark(true);
        match setup.and(mark) {
            Ok(()) => {
                info!(exit = %exit.name, "multihop restored");
                self.log.record(
                    "restore",
                    &format!("multihop restored through {}", exit.name),
                );
            }
            Err(e) => {
                warn!(error = %e, "multihop restore incomplete; the monitor keeps trying");
                self.log.record(
                    "restore_incomplete",
                    &format!("exit {}: {e}; the monitor keeps trying", exit.name),
                );
            }
        }
    }

    // ---- the monitor ----

    /// Checks the exit every `monitor_interval_seconds` until shutdown.
    pub async fn monitor(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        {
            let mut m = lock(&self.monitor);
            m.running = true;
            m.since = Some(now());
        }
        let mut every =
            tokio::time::interval(Duration::from_secs(self.config.monitor_interval_seconds));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = every.tick() => self.check().await,
            }
        }
        lock(&self.monitor).running = false;
    }

    /// One check: a connection through the exit. On failure: recorded (status, metrics,
    /// session log), then the exit is re-established and checked again.
    async fn check(&self) {
        let Ok(_ops) = self.ops.try_lock() else {
            // An admin operation is changing the path right now.
            return;
        };
        let Some(exit) = self.active_exit() else {
            return;
        };
        let first = self.probe_once().await;
        self.record_check(&exit, &first);
        if first.is_ok() {
            return;
        }
        let Ok(stored) = self.exit(&exit) else {
            return;
        };
        lock(&self.monitor).reestablished += 1;
        match self
            .setup_path(&stored)
            .await
            .and_then(|()| self.set_mark(true))
        {
            Ok(()) => self.log.record(
                "reestablish",
                &format!("exit {exit}: interface, peer session, routes and rules renewed"),
            ),
            Err(e) => {
                self.log
                    .record("reestablish_failed", &format!("exit {exit}: {e}"));
                return;
            }
        }
        let second = self.probe_once().await;
        if second.is_ok() {
            self.record_check(&exit, &second);
        }
    }

    async fn probe_once(&self) -> Result<(), PathError> {
        if lock(&self.live).device.is_none()
            || nix::net::if_::if_nametoindex(self.config.interface.as_str()).is_err()
        {
            return Err(PathError::InterfaceGone(self.config.interface.clone()));
        }
        let timeout = self.probe_timeout();
        let probed = tokio::time::timeout(timeout * 2, echo::probe(&self.echo, self.mark, timeout))
            .await
            .unwrap_or(Err(ProbeError::AnswerTimeout));
        match probed {
            Ok(()) => Ok(()),
            // The echo host's name does not resolve here: that says nothing about the exit,
            // so its handshake decides (started by a datagram through it if need be).
            Err(source @ (ProbeError::Resolve { .. } | ProbeError::NoIpv4Address { .. })) => {
                let exit = lock(&self.live).exit.clone();
                let deadline = tokio::time::Instant::now() + timeout;
                match exit {
                    Some(exit) if self.handshake_through_exit(&exit.config, deadline).await => {
                        Ok(())
                    }
                    _ => Err(PathError::Unreachable {
                        source,
                        handshake_age: self.handshake_age(),
                    }),
                }
            }
            Err(source) => Err(PathError::Unreachable {
                source,
                handshake_age: self.handshake_age(),
            }),
        }
    }

    fn record_check(&self, exit: &str, result: &Result<(), PathError>) {
        let was = {
            let mut m = lock(&self.monitor);
            let was = m.exit_reachable;
            m.last_check = Some(now());
            match result {
                Ok(()) => {
                    m.exit_reachable = Some(true);
                    m.consecutive_failures = 0;
                    m.last_error = None;
                    m.checks_up += 1;
                    if was == Some(false) {
                        m.restored += 1;
                    }
                }
                Err(e) => {
                    m.exit_reachable = Some(false);
                    m.consecutive_failures += 1;
                    m.last_error = Some(e.to_string());
                    m.checks_down += 1;
                    if was != Some(false) {
                        m.went_down += 1;
                    }
                }
            }
            was
        };
        match (was, result) {
            (Some(false), Ok(())) => {
                info!(exit, "multihop exit restored");
                self.log
                    .record("exit_up", &format!("exit {exit} reachable again"));
            }
            (None, Ok(())) => {
                self.log
                    .record("exit_up", &format!("exit {exit} reachable"));
            }
            (Some(false), Err(_)) => {}
            (_, Err(e)) => {
                warn!(exit, error = %e, "multihop exit down");
                self.log.record("exit_down", &format!("exit {exit}: {e}"));
            }
            (Some(true), Ok(())) => {}
        }
    }

    // ---- reads ----

    /// The live exit interface: (present, rx, tx, peers, endpoint, handshake age).
    pub fn interface_state(&self) -> serde_json::Value {
        let present = nix::net::if_::if_nametoindex(self.config.interface.as_str()).is_ok();
        let live = lock(&self.live);
        let state = live.device.as_ref().and_then(|d| d.state().ok());
        let peer = state.as_ref().and_then(|s| s.peers.first());
        let reachable = lock(&self.monitor).exit_reachable;
        let status = match (live.device.is_some() && present, reachable) {
            (false, _) => "down",
            (true, Some(false)) => "down",
            (true, Some(true)) => "up",
            (true, None) => "unknown",
        };
        serde_json::json!({
            "name": self.config.interface,
            "status": status,
            "present": present,
            "backend": live.device.as_ref().map(|d| d.backend()),
            "address": live.exit.as_ref().and_then(|e| e.config.ipv4()).map(|(a, p)| format!("{a}/{p}")),
            "mtu": live.exit.as_ref().map(|e| e.config.mtu),
            "peers": state.as_ref().map_or(0, |s| s.peers.len()),
            "endpoint": live.endpoint.map(|e| e.to_string()),
            "latest_handshake_seconds_ago": peer.and_then(|p| p.handshake_age_seconds),
            "rx_bytes": peer.map_or(0, |p| p.rx_bytes),
            "tx_bytes": peer.map_or(0, |p| p.tx_bytes),
        })
    }

    pub fn traffic_flow(&self, exit: Option<&str>) -> String {
        let subnet = self
            .wireguard
            .as_ref()
            .map(|s| s.subnet().to_string())
            .unwrap_or_else(|| "clients".into());
        let main = self
            .wireguard
            .as_ref()
            .map(|s| s.config.interface.clone())
            .unwrap_or_default();
        match exit {
            Some(exit) => format!("{subnet} -> {main} -> {} -> {exit}", self.config.interface),
            None => format!("{subnet} -> {main} -> internet (direct)"),
        }
    }

    pub fn traffic_routing(&self) -> String {
        format!(
            "Policy-based (Table {}, fwmark {:#x}, rule priority {})",
            self.config.table, self.mark, self.config.rule_priority
        )
    }

    pub fn echo_url(&self) -> &EchoUrl {
        &self.echo
    }

    pub fn mark(&self) -> u32 {
        self.mark
    }

    pub fn probe_timeout_seconds(&self) -> u64 {
        self.config.probe_timeout_seconds
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        lock(&self.live).endpoint
    }

    /// Daemon shutdown: the exit interface goes; the rule and the fail-closed route stay, so
    /// clients' traffic does not leak out of the server's own address while the daemon is
    /// down. The next start restores the rest.
    pub fn shutdown(&self) {
        let device = lock(&self.live).device.take();
        if let Some(device) = device {
            device.shutdown();
        }
    }
}

/// The errors of a teardown, for the session log.
/// Where the datagrams that start an exit's handshake go (the discard port of each): the
/// exit's own DNS servers (inside the provider, reached through the tunnel) and the echo host
/// when it is an address; failing those, the first host of the exit's tunnel subnet, else
/// TEST-NET-1 (never a real host). Only addresses the exit's AllowedIPs carry (an imported
/// exit carries 0.0.0.0/0, so all of them) and none of this host's own (`local`: those never
/// leave through the exit); at most three.
fn nudge_targets(exit: &ExitConfig, echo: &EchoUrl, local: &[IpAddr]) -> Vec<std::net::Ipv4Addr> {
    use std::net::Ipv4Addr;
    let usable = |ip: &Ipv4Addr| {
        let carried = exit.allowed_ips.iter().any(|(net, prefix)| match net {
            IpAddr::V4(net) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(*prefix)).unwrap_or(0);
                u32::from(*net) & mask == u32::from(*ip) & mask
            }
            IpAddr::V6(_) => false,
        });
        carried && !ip.is_loopback() && !ip.is_unspecified() && !local.contains(&IpAddr::V4(*ip))
    };
    let mut targets: Vec<Ipv4Addr> = exit
        .dns
        .iter()
        .filter_map(|d| d.parse::<Ipv4Addr>().ok())
        .chain(echo.host.parse::<Ipv4Addr>().ok())
        .filter(usable)
        .collect();
    targets.dedup();
    targets.truncate(3);
    if targets.is_empty() {
        let gateway = exit.ipv4().and_then(|(ip, prefix)| {
            (prefix < 31).then(|| {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                Ipv4Addr::from((u32::from(ip) & mask) + 1)
            })
        });
        targets.extend(
            gateway
                .into_iter()
                .chain([Ipv4Addr::new(192, 0, 2, 1)])
                .filter(usable)
                .take(1),
        );
    }
    targets
}

fn joined(errors: &[PathError]) -> String {
    errors
        .iter()
        .map(PathError::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Spawns the monitor.
impl Multihop {
    /// Starts multihop's background work: the monitor of the exit.
    pub fn start_tasks(
        self: &Arc<Self>,
        shutdown: &crate::tasks::Shutdown,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        vec![tokio::spawn(Arc::clone(self).monitor(shutdown.clone()))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_as_before() {
        let name = MultihopError::InvalidName {
            name: "a b".into(),
            from_file: true,
        };
        assert_eq!(
            name.to_string(),
            "exit name \"a b\" must be 1 to 64 letters, digits, '-', '_' or '.' (taken from the file name; give custom_name)"
        );
        let down = PathError::Unreachable {
            source: ProbeError::AnswerTimeout,
            handshake_age: Some(7),
        };
        assert_eq!(
            down.to_string(),
            "the echo service did not answer in time; last handshake 7 s ago"
        );
        let failed =
            MultihopError::SetupFailed(PathError::Routing(RoutingError::NoSuchInterface {
                name: "wg_vpn".into(),
                source: nix::errno::Errno::ENODEV,
            }));
        assert_eq!(
            failed.to_string(),
            "enabling failed: interface wg_vpn: ENODEV: No such device; everything it had set up was removed"
        );
    }

    fn exit(text: &str) -> ExitConfig {
        match wgconf::parse(text) {
            Ok(parsed) => parsed.config,
            Err(e) => panic!("{e}"),
        }
    }

    const KEY: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PEER: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    /// The datagrams that start a handshake go inside the provider: its DNS servers, the echo
    /// address, the tunnel's gateway, and only where the exit carries them.
    #[test]
    fn nudges_go_where_the_exit_carries_them() {
        let echo = |url: &str| match EchoUrl::parse(url) {
            Ok(u) => u,
            Err(e) => panic!("{e}"),
        };
        let full = |extra: &str| {
            format!(
                "[Interface]\nPrivateKey = {KEY}\nAddress = 10.64.0.7/24\n{extra}\n[Peer]\nPublicKey = {PEER}\nAllowedIPs = 0.0.0.0/0\nEndpoint = 198.18.0.2:51820\n"
            )
        };
        let ips = |v: &[&str]| -> Vec<std::net::Ipv4Addr> {
            v.iter().filter_map(|s| s.parse().ok()).collect()
        };
        let with_dns = exit(&full("DNS = 10.64.0.1"));
        assert_eq!(
            nudge_targets(&with_dns, &echo("http://echo.invalid/ip"), &[]),
            ips(&["10.64.0.1"])
        );
        assert_eq!(
            nudge_targets(&with_dns, &echo("http://203.0.113.10:8080/ip"), &[]),
            ips(&["10.64.0.1", "203.0.113.10"])
        );
        // This host's own addresses never leave through the exit.
        let local: Vec<IpAddr> = vec!["10.64.0.1".parse().unwrap_or(IpAddr::from([0; 4]))];
        assert_eq!(
            nudge_targets(&with_dns, &echo("http://echo.invalid/ip"), &local),
            ips(&["192.0.2.1"])
        );
        // No DNS, a name for the echo host: the tunnel subnet's first host.
        let plain = exit(&full(""));
        assert_eq!(
            nudge_targets(&plain, &echo("http://echo.invalid/ip"), &[]),
            ips(&["10.64.0.1"])
        );
        // A /32 tunnel address and nothing else: TEST-NET-1.
        let host = exit(&full("").replace("10.64.0.7/24", "10.64.0.7/32"));
        assert_eq!(
            nudge_targets(&host, &echo("http://echo.invalid/ip"), &[]),
            ips(&["192.0.2.1"])
        );
    }
}

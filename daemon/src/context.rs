//! What the modules share: the live configuration, start time, logs and the datapath.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Instant,
};

use crate::{
    config::{Config, DatapathConfig},
    datapath::Datapath,
    logging::RecentLogs,
};

pub struct Context {
    config: RwLock<Config>,
    pub config_path: PathBuf,
    pub started_at: time::OffsetDateTime,
    pub started: Instant,
    pub logs: RecentLogs,
    pub datapath: Option<Arc<Datapath>>,
    /// The WireGuard server; `None` with `[wireguard] enabled = false`.
    pub wireguard: Option<Arc<crate::core::Server>>,
    /// The blocklist; `None` with `[blocklist] enabled = false`.
    pub blocklist: Option<Arc<crate::blocklist::Blocklist>>,
    /// The DNS servers given to clients.
    pub dns: Option<Arc<crate::dns::Dns>>,
    /// Phantom's resolver for VPN clients; `None` with `[dns] listen = "off"`.
    pub resolver: Option<Arc<crate::resolver::Resolver>>,
    /// Ghost mode (WireGuard over wss); `None` without the WireGuard server. Set with
    /// `with_ghost`.
    pub ghost: Option<Arc<crate::ghost::Ghost>>,
    /// Multihop; set once at start-up (core reads it: a subnet change waits for it to be off).
    pub multihop: std::sync::OnceLock<Arc<crate::multihop::Multihop>>,
    /// The L7 defence; `None` with `[sentry] enabled = false`.
    pub sentry: Option<Arc<crate::sentry::Sentry>>,
}

impl Context {
    pub fn new(
        config: Config,
        config_path: PathBuf,
        logs: RecentLogs,
        datapath: Option<Arc<Datapath>>,
        wireguard: Option<Arc<crate::core::Server>>,
        blocklist: Option<Arc<crate::blocklist::Blocklist>>,
        dns: Option<Arc<crate::dns::Dns>>,
    ) -> Self {
        Self {
            config: RwLock::new(config),
            config_path,
            started_at: time::OffsetDateTime::now_utc(),
            started: Instant::now(),
            logs,
            datapath,
            wireguard,
            blocklist,
            dns,
            resolver: None,
            ghost: None,
            multihop: std::sync::OnceLock::new(),
            sentry: None,
        }
    }

    /// Adds the resolver (it needs the other modules, so it comes last).
    pub fn with_resolver(mut self, resolver: Option<Arc<crate::resolver::Resolver>>) -> Self {
        self.resolver = resolver;
        self
    }

    pub fn with_ghost(mut self, ghost: Option<Arc<crate::ghost::Ghost>>) -> Self {
        self.ghost = ghost;
        self
    }

    pub fn with_sentry(mut self, sentry: Option<Arc<crate::sentry::Sentry>>) -> Self {
        self.sentry = sentry;
        self
    }

    /// A snapshot of the live configuration.
    pub fn config(&self) -> Config {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn datapath_config(&self) -> DatapathConfig {
        self.config().datapath
    }

    /// True while client traffic goes out through a multihop exit.
    pub fn multihop_enabled(&self) -> bool {
        self.multihop.get().is_some_and(|m| m.is_enabled())
    }

    pub fn replace_config(&self, config: Config) {
        match self.config.write() {
            Ok(mut c) => *c = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }
}

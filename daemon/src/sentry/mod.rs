//! Sentry: adaptive L7 defence in front of a site (SPEC 7, seed 002). A reverse proxy counts
//! requests, learns the normal global rate, and under an anomaly answers the IPs over the
//! static per-IP threshold with a signed proof-of-work challenge instead of the content.
//! Solving it earns a trust ticket; ignoring it fills the penalty box, raises the difficulty
//! and ends in kernel drops. See docs/sentry.md.

pub mod actions;
pub mod allow;
pub mod challenge;
pub mod detector;
pub mod metrics;
pub mod nojs;
pub mod page;
pub mod penalty;
pub mod proxy;
pub mod snapshot;
pub mod solver;
pub mod store;
pub mod tls;
pub mod upstream;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

pub use crate::config::Tunables;
use crate::{
    config::SentryConfig,
    datapath::Datapath,
    source::{Source, SourcePrefix},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use challenge::{Authenticated, CookieCheck, Package, Proof, Rejection, Signer};
use detector::Detector;
use penalty::PenaltyBox;
use store::{ModeState, Store, unix_now};

#[derive(Debug, thiserror::Error)]
pub enum SentryError {
    #[error("sentry configuration: {0}")]
    Config(String),
    /// The Redis backend refused or did not answer.
    #[error("sentry store: redis: {0}")]
    Redis(#[source] redis::RedisError),
    /// The embedded backend's file does not read.
    #[error("sentry store: {path}: {source}")]
    StoreFile {
        path: std::path::PathBuf,
        #[source]
        source: Box<crate::error::Error>,
    },
    #[error("sentry store: cannot serialise the store: {0}")]
    StoreEncode(#[source] serde_json::Error),
    #[error("sentry store: cannot write the store: {0}")]
    StoreWrite(#[source] Box<crate::error::Error>),
    #[error("sentry store is unavailable (degraded)")]
    Degraded,
    #[error("sentry crypto: {0}")]
    Crypto(String),
    #[error("sentry: {0}")]
    Io(String),
    /// `[sentry] tls`: no certificate, or none rustls accepts.
    #[error("sentry {0}")]
    Tls(String),
}

impl From<crate::error::InvalidValue> for SentryError {
    fn from(e: crate::error::InvalidValue) -> Self {
        SentryError::Config(e.0)
    }
}

/// Defence level.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub enum Mode {
    #[serde(rename = "NORMAL")]
    Normal,
    #[serde(rename = "DEFCON_1")]
    Defcon1,
    #[serde(rename = "DOOMSDAY")]
    Doomsday,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Normal, Mode::Defcon1, Mode::Doomsday];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Normal => "NORMAL",
            Mode::Defcon1 => "DEFCON_1",
            Mode::Doomsday => "DOOMSDAY",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s.trim()))
    }
}

/// IPv4-mapped IPv6 addresses count as the IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Why a request passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    Whitelisted,
    Ticket,
    /// Counted, and the defence did not call for a challenge.
    Normal,
    /// The store is down and the sentry fails open.
    FailOpen,
    /// Would have been challenged; a good bot (user agent and address both match).
    GoodBot,
    /// Would have been challenged; an open path, under the ticket ceiling.
    OpenPath,
}

/// What the proxy does with one request.
#[derive(Debug)]
pub enum Decision {
    Pass(Pass),
    Challenge(Box<Package>),
    /// Past `hard_block_after`: refused here until the kernel drops it.
    Blocked,
    /// The store is down and the sentry fails closed.
    Unavailable,
}

/// A successful proof.
#[derive(Clone, Debug, Serialize)]
pub struct TicketGrant {
    pub expires_at: u64,
    pub cookie: String,
}

impl TicketGrant {
    /// The `Set-Cookie` value that hands the ticket to the client.
    /// The `Set-Cookie` value; `secure` on a TLS listener.
    pub fn set_cookie(&self, secure: bool) -> String {
        let ttl = self.expires_at.saturating_sub(unix_now());
        format!(
            "{TICKET_COOKIE}={}; Max-Age={ttl}; Path=/; HttpOnly; SameSite=Lax{}",
            self.cookie,
            if secure { "; Secure" } else { "" }
        )
    }
}

/// What the challenge page offers a browser without JavaScript (`[sentry.nojs]`,
/// docs/sentry.md "Without JavaScript").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoJsOffer {
    /// A signed delay token, redeemable after `seconds` (low penalty levels).
    Delay { token: String, seconds: u64 },
    /// The command-line solver and a form for its answer (higher levels, DOOMSDAY).
    Command,
}

/// The longest request target a delay token carries; a longer one sends the browser to `/`.
const MAX_DELAY_TARGET: usize = 2048;

/// Consecutive failed store calls after which the store is marked degraded and the proxy
/// stops asking it (the fail mode applies), once they span [`DEGRADE_AFTER`]. A single slow
/// or lost answer (a Redis pause, a timeout) is not an outage: the request it hit is decided
/// on what this host knows.
pub const DEGRADE_AFTER_FAILURES: u64 = 3;
/// How long failures must go on with no success in between before the store is degraded:
/// many requests in flight all time out together in one stall, and that is one stall, not
/// an outage.
pub const DEGRADE_AFTER: Duration = Duration::from_secs(1);

/// Counters for metrics and status.
#[derive(Default)]
pub struct Counters {
    pub passed: [AtomicU64; 6],
    pub challenged: AtomicU64,
    pub blocked: AtomicU64,
    pub unavailable: AtomicU64,
    pub solved: AtomicU64,
    pub failed: [AtomicU64; Rejection::ALL.len()],
    /// Delay tokens redeemed (the page without JavaScript).
    pub delays_redeemed: AtomicU64,
    /// Ticket cookies whose signature did not verify.
    pub forged_cookies: AtomicU64,
    /// Tickets taken away from holders past the ticket ceiling.
    pub tickets_revoked: AtomicU64,
    /// Proofs whose package was authenticated, by `Authenticated`.
    pub authenticated: [AtomicU64; 3],
    pub tickets: AtomicU64,
    pub penalties: AtomicU64,
    pub hard_blocks: AtomicU64,
    pub store_errors: AtomicU64,
    pub upstream_errors: AtomicU64,
}

pub fn pass_index(p: Pass) -> usize {
    match p {
        Pass::Whitelisted => 0,
        Pass::Ticket => 1,
        Pass::Normal => 2,
        Pass::FailOpen => 3,
        Pass::GoodBot => 4,
        Pass::OpenPath => 5,
    }
}

pub fn rejection_index(r: Rejection) -> usize {
    Rejection::ALL.iter().position(|x| *x == r).unwrap_or(0)
}

pub fn authenticated_index(a: Authenticated) -> usize {
    Authenticated::ALL.iter().position(|x| *x == a).unwrap_or(0)
}

pub const PASS_NAMES: [&str; 6] = [
    "whitelisted",
    "ticket",
    "normal",
    "fail_open",
    "good_bot",
    "open_path",
];

/// The name of the signed ticket cookie.
pub const TICKET_COOKIE: &str = "sentry_ticket";

/// How often penalties other hosts escalated are put into this host's kernel.
pub const FLEET_SYNC_INTERVAL: Duration = Duration::from_secs(5);

/// Where the page may send the browser after solving: the request's own target when it is an
/// absolute path on this origin, else `/`. `//evil.example/x` is a path to the HTTP stack
/// but another origin to a browser, and browsers read `\` as `/` and drop tabs and newlines,
/// so those never pass either.
pub fn same_origin_target(raw: &str) -> &str {
    let bytes = raw.as_bytes();
    let absolute_path = bytes.first() == Some(&b'/')
        && !matches!(bytes.get(1), Some(b'/') | Some(b'\\'))
        && !bytes
            .iter()
            .any(|b| *b == b'\\' || b.is_ascii_control() || *b == b' ');
    if absolute_path { raw } else { "/" }
}

/// The continuation document a challenge carries: after solving, the page shows it and
/// reloads the original URL (only ever on this origin), which now passes on the ticket.
pub(crate) fn continuation(path: &str) -> Vec<u8> {
    let escaped: String = same_origin_target(path)
        .chars()
        .flat_map(|c| match c {
            '<' => "&lt;".chars().collect::<Vec<_>>(),
            '>' => "&gt;".chars().collect(),
            '"' => "&quot;".chars().collect(),
            '&' => "&amp;".chars().collect(),
            '\'' => "&#39;".chars().collect(),
            c => vec![c],
        })
        .collect();
    format!(
        "<!doctype html><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"0;url={escaped}\">\
         <title>Verified</title><p>Verified. Continue to <a href=\"{escaped}\">{escaped}</a>.</p>"
    )
    .into_bytes()
}

/// What a challenge carries: the continuation to the request's target, or — in DOOMSDAY,
/// when the proxy made one — the loader's content (`proxy`'s `loader_content`).
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub path: &'a str,
    pub doomsday: Option<&'a [u8]>,
}

impl<'a> Target<'a> {
    pub fn path(path: &'a str) -> Self {
        Self {
            path,
            doomsday: None,
        }
    }

    /// The loader's content only for a DOOMSDAY challenge.
    fn only_if(self, doomsday: bool) -> Self {
        Self {
            doomsday: self.doomsday.filter(|_| doomsday),
            ..self
        }
    }

    fn content(&self) -> Vec<u8> {
        match self.doomsday {
            Some(c) => c.to_vec(),
            None => continuation(self.path),
        }
    }
}

/// What this host knows of a source's ticket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    /// A ticket until this Unix second (from a proof, the store or a cookie).
    Valid(u64),
    /// Taken away: tickets expiring at or before this Unix second (the revoked one and the
    /// cookies that carry it) are not honoured any more; a new proof earns a new one.
    Revoked(u64),
    /// The store held no ticket for the source when this host last asked, an answer taken
    /// as good until this instant ([`NOT_IN_STORE_FOR`]).
    NotInStore(Instant),
}

impl Held {
    /// Whether the entry still says anything (else it can be dropped).
    fn live(&self, now: u64, instant: Instant) -> bool {
        match self {
            Held::Valid(exp) | Held::Revoked(exp) => *exp > now,
            Held::NotInStore(until) => *until > instant,
        }
    }
}

/// How long "the store holds no ticket for this source" stands before the store is asked
/// again. A source past the ticket ceiling asks on every request while the defence is armed;
/// with this, a busy source costs one round trip a second, not one a request. The price: a
/// ticket another host issues meanwhile, to a client that does not bring its cookie, is seen
/// here (and revoked, if the source is past the ceiling) up to this much later.
const NOT_IN_STORE_FOR: Duration = Duration::from_secs(1);

/// The most sources whose ticket state a host keeps; past it the lapsed entries are swept,
/// and a "not in the store" answer that still finds no room is not kept.
const MAX_TICKETS_HELD: usize = 200_000;

pub struct Sentry {
    pub store: Store,
    pub signer: Signer,
    pub detector: Detector,
    pub penalties: PenaltyBox,
    pub counters: Counters,
    tunables: RwLock<Tunables>,
    state: RwLock<ModeState>,
    /// The whitelisted sources: each listed address's source (its IPv6 prefix).
    whitelist: RwLock<HashSet<Source>>,
    /// `[sentry] good_bots`: asked only for a request that would be challenged.
    pub good_bots: allow::GoodBots,
    /// `[sentry] open_paths`: asked only for a request that would be challenged.
    open_paths: allow::OpenPaths,
    /// The DOOMSDAY loader's snapshots of the site (`[sentry.doomsday]`).
    pub snapshots: snapshot::Snapshots,
    /// source -> what this host knows of its ticket.
    tickets: Mutex<HashMap<Source, Held>>,
    /// The Unix second `tickets` was last swept because it was full: at most one sweep a
    /// second, so a flood of sources that keeps it full never makes each request scan it.
    tickets_swept_at: AtomicU64,
    datapath: Option<Arc<Datapath>>,
    /// What one source is (`[sources] ipv6_prefix`).
    prefix: SourcePrefix,
    fail_closed: bool,
    healthy: AtomicBool,
    /// Store calls that failed in a row; `DEGRADE_AFTER_FAILURES` of them degrade the store.
    store_failures: AtomicU64,
    /// When the current run of failures began (ms since the Unix epoch; 0: none).
    failing_since_ms: AtomicU64,
    /// Last Unix second an incident was written to the store (one write per second).
    incident_written: AtomicU64,
    pub static_config: SentryConfig,
    pub trusted_proxies: Vec<IpAddr>,
    /// Where TLS material is kept (`None` for a sentry assembled from parts).
    state_dir: Option<std::path::PathBuf>,
    /// The listener's TLS once it listens with `[sentry] tls` on.
    pub listener_tls: std::sync::OnceLock<Arc<tls::ListenerTls>>,
    /// The listener's port as ghost may join it (with TLS on).
    pub shared_port: std::sync::OnceLock<Arc<crate::http::SharedPort>>,
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    match l.read() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

fn write<T>(l: &RwLock<T>, v: T) {
    match l.write() {
        Ok(mut g) => *g = v,
        Err(p) => *p.into_inner() = v,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Sentry {
    /// Opens the store and the key, and loads config, state and whitelist from the store
    /// (seeding them from the file's values on first use). `prefix` is what one IPv6 source
    /// is (`[sources] ipv6_prefix`).
    pub async fn open(
        config: &SentryConfig,
        prefix: SourcePrefix,
        state_dir: &std::path::Path,
        datapath: Option<Arc<Datapath>>,
    ) -> Result<Arc<Self>, SentryError> {
        let store = if config.redis_url.is_empty() {
            let dir = state_dir.to_path_buf();
            let opened =
                tokio::task::spawn_blocking(move || store::embedded::EmbeddedStore::open(&dir))
                    .await
                    .map_err(|e| SentryError::Io(format!("opening the sentry store: {e}")))??;
            Store::Embedded(Box::new(opened))
        } else {
            Store::Redis(store::redis::RedisStore::connect(&config.redis_url)?)
        };
        let signer = Signer::load_or_create(&state_dir.join("sentry-ecdsa-p256.key"))?;
        Self::assemble(
            config,
            store,
            signer,
            datapath,
            prefix,
            Some(state_dir.to_path_buf()),
        )
        .await
    }

    /// Assembles a sentry from parts (tests and benches use an in-memory store and key).
    pub async fn with_parts(
        config: &SentryConfig,
        store: Store,
        signer: Signer,
        datapath: Option<Arc<Datapath>>,
        prefix: SourcePrefix,
    ) -> Result<Arc<Self>, SentryError> {
        Self::assemble(config, store, signer, datapath, prefix, None).await
    }

    async fn assemble(
        config: &SentryConfig,
        store: Store,
        signer: Signer,
        datapath: Option<Arc<Datapath>>,
        prefix: SourcePrefix,
        state_dir: Option<std::path::PathBuf>,
    ) -> Result<Arc<Self>, SentryError> {
        let sentry = Arc::new(Self {
            store,
            signer,
            detector: Detector::new(),
            penalties: PenaltyBox::default(),
            counters: Counters::default(),
            tunables: RwLock::new(config.tunables.clone()),
            state: RwLock::new(ModeState::default()),
            whitelist: RwLock::new(HashSet::new()),
            good_bots: allow::GoodBots::new(&config.good_bots)?,
            open_paths: allow::OpenPaths::new(&config.open_paths),
            snapshots: snapshot::Snapshots::new(&config.doomsday),
            tickets: Mutex::new(HashMap::new()),
            tickets_swept_at: AtomicU64::new(0),
            datapath,
            prefix,
            fail_closed: config.redis_fail_mode == "closed",
            healthy: AtomicBool::new(true),
            store_failures: AtomicU64::new(0),
            failing_since_ms: AtomicU64::new(0),
            incident_written: AtomicU64::new(0),
            static_config: config.clone(),
            trusted_proxies: config
                .trusted_proxies
                .iter()
                .filter_map(|p| p.parse().ok())
                .map(canonical)
                .collect(),
            state_dir,
            listener_tls: std::sync::OnceLock::new(),
            shared_port: std::sync::OnceLock::new(),
        });
        if let Err(e) = sentry.sync_from_store(true).await {
            warn!(error = %e, "sentry store not reachable at start; running on the file's values until it is");
            sentry.healthy.store(false, Ordering::Relaxed);
        }
        Ok(sentry)
    }

    pub fn tunables(&self) -> Tunables {
        read(&self.tunables)
    }

    pub fn mode_state(&self) -> ModeState {
        read(&self.state)
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The whitelisted sources (each listed address stands for its source).
    pub fn whitelist_local(&self) -> Vec<Source> {
        let mut v: Vec<Source> = read(&self.whitelist).into_iter().collect();
        v.sort();
        v
    }

    /// What one source is (`[sources] ipv6_prefix`).
    pub fn source_prefix(&self) -> SourcePrefix {
        self.prefix
    }

    /// The source a client address is counted, limited and blocked as.
    pub fn source_of(&self, ip: IpAddr) -> Source {
        self.prefix.source(canonical(ip))
    }

    pub fn tickets_cached(&self) -> usize {
        let (now, instant) = (unix_now(), Instant::now());
        let mut t = lock(&self.tickets);
        t.retain(|_, held| held.live(now, instant));
        t.values().filter(|h| matches!(h, Held::Valid(_))).count()
    }

    /// Runs a store call unless the store is marked degraded. A failure counts toward
    /// `DEGRADE_AFTER_FAILURES` in a row over `DEGRADE_AFTER`; a success resets both.
    async fn store_call<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, SentryError>>,
    ) -> Result<T, SentryError> {
        if !self.healthy() {
            return Err(SentryError::Degraded);
        }
        match f.await {
            Ok(v) => {
                self.store_failures.store(0, Ordering::Relaxed);
                self.failing_since_ms.store(0, Ordering::Relaxed);
                Ok(v)
            }
            Err(e) => {
                self.store_failed(&e);
                Err(e)
            }
        }
    }

    fn store_failed(&self, e: &SentryError) {
        self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
        let in_a_row = self.store_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis().max(1) as u64);
        let since = match self.failing_since_ms.compare_exchange(
            0,
            now_ms,
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => now_ms,
            Err(earlier) => earlier,
        };
        let lasted = Duration::from_millis(now_ms.saturating_sub(since));
        if in_a_row >= DEGRADE_AFTER_FAILURES
            && lasted >= DEGRADE_AFTER
            && self.healthy.swap(false, Ordering::Relaxed)
        {
            warn!(error = %e, backend = self.store.backend(), failures = in_a_row, "sentry store failed: degraded until it answers again");
        }
    }

    /// Reloads config, state, whitelist and fleet keys from the store. `first`: seeds the
    /// store with the file's values and restores the traffic history.
    async fn sync_from_store(&self, first: bool) -> Result<(), SentryError> {
        match self.store.get_config().await? {
            Some(t) => {
                if t != self.tunables() {
                    self.detector.set_sensitivity(t.sensitivity_factor);
                    write(&self.tunables, t);
                }
            }
            None => self.store.set_config(&self.tunables()).await?,
        }
        match self.store.get_state().await? {
            Some(s) => write(&self.state, s),
            None if first => self.store.set_state(&self.mode_state()).await?,
            None => {}
        }
        let list = self.store.whitelist().await?;
        self.apply_whitelist(&list).await;
        if first {
            let jwk = self.signer.own_jwk().to_string();
            self.store.publish_key(self.signer.kid(), &jwk).await?;
            let (series, _) = self.store.traffic().await?;
            self.detector.restore(&series);
        }
        let keys = self.store.keys().await?;
        self.signer.learn_keys(
            keys.values()
                .filter_map(|j| serde_json::from_str::<serde_json::Value>(j).ok()),
        );
        Ok(())
    }

    /// The listed addresses as the sources they stand for, mirrored into the XDP allow map.
    async fn apply_whitelist(&self, members: &[IpAddr]) {
        let list: HashSet<Source> = members.iter().map(|ip| self.source_of(*ip)).collect();
        let old = read(&self.whitelist);
        if list != old {
            self.mirror_whitelist(&old, &list).await;
            write(&self.whitelist, list);
        }
    }

    /// Keeps the XDP allow map in step with the whitelist (SPEC 7): one allow entry per
    /// whitelisted source (for IPv6, its prefix).
    async fn mirror_whitelist(&self, old: &HashSet<Source>, new: &HashSet<Source>) {
        let Some(dp) = self.datapath.clone() else {
            return;
        };
        let added: Vec<Source> = new.difference(old).copied().collect();
        let removed: Vec<Source> = old.difference(new).copied().collect();
        let _ = tokio::task::spawn_blocking(move || {
            use crate::datapath::policy::List;
            for source in added {
                if let Err(e) = dp.policy.set(
                    source,
                    List::Allow,
                    None,
                    phantom_common::xdp::DenyReason::Manual,
                ) {
                    warn!(error = %e, "cannot mirror a whitelist entry into the XDP allow map");
                }
            }
            for source in removed {
                let _ = dp.policy.remove(source, List::Allow);
            }
        })
        .await;
    }

    fn fail(&self) -> Decision {
        if self.fail_closed {
            self.counters.unavailable.fetch_add(1, Ordering::Relaxed);
            Decision::Unavailable
        } else {
            self.pass(Pass::FailOpen)
        }
    }

    fn pass(&self, p: Pass) -> Decision {
        self.counters.passed[pass_index(p)].fetch_add(1, Ordering::Relaxed);
        Decision::Pass(p)
    }

    /// Remembers a ticket this host learned of (store, cookie), unless it is one that was
    /// taken away. Returns whether it is honoured.
    fn cache_ticket(&self, source: Source, exp: u64) -> bool {
        let mut t = lock(&self.tickets);
        if let Some(Held::Revoked(upto)) = t.get(&source)
            && exp <= *upto
        {
            return false;
        }
        if t.len() > MAX_TICKETS_HELD {
            self.sweep_full(&mut t);
        }
        t.insert(source, Held::Valid(exp));
        true
    }

    /// Drops the lapsed entries of a full `tickets`, unless that was done this second.
    fn sweep_full(&self, t: &mut HashMap<Source, Held>) {
        let now = unix_now();
        if self.tickets_swept_at.swap(now, Ordering::Relaxed) != now {
            let instant = Instant::now();
            t.retain(|_, held| held.live(now, instant));
        }
    }

    /// Remembers that the store, asked at `asked`, held no ticket for the source — unless
    /// this host knows more meanwhile (a ticket redeemed while the lookup was in flight, a
    /// revocation).
    fn note_not_in_store(&self, source: Source, asked: Instant) {
        let mut t = lock(&self.tickets);
        let (now, instant) = (unix_now(), Instant::now());
        if t.get(&source)
            .is_some_and(|held| !matches!(held, Held::NotInStore(_)) && held.live(now, instant))
        {
            return;
        }
        if t.len() > MAX_TICKETS_HELD {
            self.sweep_full(&mut t);
            if t.len() > MAX_TICKETS_HELD {
                return;
            }
        }
        t.insert(source, Held::NotInStore(asked + NOT_IN_STORE_FOR));
    }

    /// A new ticket from a proof: honoured whatever was taken away before.
    fn grant_ticket(&self, source: Source, exp: u64) {
        lock(&self.tickets).insert(source, Held::Valid(exp));
    }

    /// Takes the source's ticket away, here and in the store.
    async fn revoke_ticket(&self, source: Source, now: u64) {
        let upto = {
            let mut t = lock(&self.tickets);
            let upto = match t.get(&source) {
                Some(Held::Valid(exp) | Held::Revoked(exp)) => *exp,
                Some(Held::NotInStore(_)) | None => now,
            }
            // Any cookie of the ticket: at most one ticket lifetime from now.
            .max(now + self.tunables().ticket_ttl_seconds);
            t.insert(source, Held::Revoked(upto));
            upto
        };
        self.counters
            .tickets_revoked
            .fetch_add(1, Ordering::Relaxed);
        let _ = self.store_call(self.store.clear_ticket(source)).await;
        info!(
            revoked_until = upto,
            "ticket holder past the ticket ceiling: ticket revoked"
        );
    }

    /// Whether the defence is armed: DOOMSDAY, or the activation gate is open.
    fn gate_open(&self, t: &Tunables, rate: u64) -> bool {
        self.detector.cpu_percent() >= t.activation_cpu_threshold
            || (t.activation_rate_threshold > 0 && rate >= t.activation_rate_threshold)
    }

    /// Whether this host knows the source holds a ticket: from its memory, else from a valid
    /// cookie. A forged cookie counts against the source.
    async fn local_ticket(
        &self,
        source: Source,
        cookie: Option<&str>,
        now: u64,
        t: &Tunables,
    ) -> bool {
        let revoked = match lock(&self.tickets).get(&source) {
            Some(Held::Valid(exp)) if *exp > now => return true,
            Some(Held::Revoked(upto)) => *upto > now,
            _ => false,
        };
        // A revoked ticket's cookies are worth nothing (a new proof brings a new ticket), and
        // a source that keeps failing gets no more signature checks in this window.
        // (The failure count is looked up only for a request that brings a cookie.)
        let verify = |_: &&str| {
            !revoked
                && self.detector.failures(source, Instant::now())
                    < challenge::FAILED_PROOFS_PER_WINDOW
        };
        if let Some(c) = cookie.filter(verify) {
            match self.signer.check_cookie(c, source, now) {
                CookieCheck::Valid(exp) => return self.cache_ticket(source, exp),
                CookieCheck::Stale => {}
                CookieCheck::Forged => {
                    self.counters.forged_cookies.fetch_add(1, Ordering::Relaxed);
                    self.failure(source, t).await;
                }
            }
        }
        false
    }

    /// Whether the store holds a ticket for the source (another host may have issued it).
    /// `Err` = the store is down (the fail mode's decision); a single failed call is taken
    /// as "no ticket".
    async fn store_ticket(&self, source: Source) -> Result<bool, Decision> {
        // The answer of a moment ago stands, unless the store is down: then the fail mode
        // decides, as for any request that needs the store.
        let asked = Instant::now();
        if self.healthy()
            && matches!(lock(&self.tickets).get(&source), Some(Held::NotInStore(until)) if *until > asked)
        {
            return Ok(false);
        }
        match self.store_call(self.store.ticket(source)).await {
            Ok(Some(exp)) => Ok(self.cache_ticket(source, exp)),
            Ok(None) => {
                self.note_not_in_store(source, asked);
                Ok(false)
            }
            Err(_) if self.healthy() => Ok(false),
            Err(_) => Err(self.fail()),
        }
    }

    /// A ticket holder's request: passed, unless the defence is armed and the source is past
    /// the ticket ceiling — then the ticket is gone and the source is a violator again.
    async fn ticket_pass(
        &self,
        source: Source,
        t: &Tunables,
        armed: bool,
        count: u64,
        now: u64,
        target: Target<'_>,
    ) -> Decision {
        if !armed || count <= t.effective_ticket_ceiling() {
            return self.pass(Pass::Ticket);
        }
        self.revoke_ticket(source, now).await;
        let doomsday = self.mode_state().current_mode == Mode::Doomsday;
        self.challenge(source, t, true, doomsday, now, target).await
    }

    /// The per-request flow of SPEC 7, for the source the client address stands for, of a
    /// request without a `User-Agent` header.
    pub async fn decide(&self, peer: IpAddr, cookie: Option<&str>, path: &str) -> Decision {
        self.decide_request(peer, cookie, path, None).await
    }

    /// The per-request flow of SPEC 7 (docs/sentry.md "Per request"): `peer` is the client
    /// address, `path` the request target, `user_agent` its `User-Agent` header.
    pub async fn decide_request(
        &self,
        peer: IpAddr,
        cookie: Option<&str>,
        path: &str,
        user_agent: Option<&str>,
    ) -> Decision {
        self.decide_target(peer, cookie, Target::path(path), user_agent)
            .await
    }

    /// [`Sentry::decide_request`] with what a DOOMSDAY challenge carries instead of the
    /// continuation (`target.doomsday`, the loader's content; other challenges ignore it).
    pub async fn decide_target(
        &self,
        peer: IpAddr,
        cookie: Option<&str>,
        target: Target<'_>,
        user_agent: Option<&str>,
    ) -> Decision {
        let path = target.path;
        let source = self.source_of(peer);
        let now = unix_now();
        self.detector.count_global();
        let whitelisted = match self.whitelist.read() {
            Ok(w) => w.contains(&source),
            Err(p) => p.into_inner().contains(&source),
        };
        if whitelisted {
            return self.pass(Pass::Whitelisted);
        }
        let instant = Instant::now();
        if self.penalties.is_blocked(source, instant) {
            // Past hard_block_after (the kernel drops it too, when there is a datapath):
            // refused before any other work.
            self.counters.blocked.fetch_add(1, Ordering::Relaxed);
            return Decision::Blocked;
        }
        let t = self.tunables();
        let mode = self.mode_state().current_mode;
        let rate = self.detector.current_rate();
        let armed = mode == Mode::Doomsday || mode == Mode::Defcon1 || self.gate_open(&t, rate);
        // Everyone but the whitelist is counted, ticket holders included.
        let count = self.detector.count_ip(source, instant);
        if self.local_ticket(source, cookie, now, &t).await {
            return self
                .ticket_pass(source, &t, armed, count, now, target)
                .await;
        }
        if !armed {
            return self.pass(Pass::Normal);
        }
        let anomaly = self
            .detector
            .snapshot()
            .threshold
            .is_some_and(|th| rate as f64 >= th);
        if anomaly {
            self.note_incident(now).await;
        }
        let mode = self.mode_state().current_mode;
        let over = count > t.ip_static_threshold;
        // A request that would now be challenged (unless a ticket turns up in the store):
        // good bots and open paths pass here, and only here, so an ordinary request never
        // pays for the match, and the store round trip is saved for them.
        let challenge_due = match mode {
            Mode::Doomsday => true,
            Mode::Defcon1 => over,
            Mode::Normal => false,
        };
        if challenge_due {
            if self.good_bots.pass(user_agent, peer).is_some() {
                return self.pass(Pass::GoodBot);
            }
            if count <= t.effective_ticket_ceiling() && self.open_paths.matches(path) {
                return self.pass(Pass::OpenPath);
            }
        }
        // Only while armed, and only when the answer changes the decision, does the store get
        // asked for a ticket (another host may have issued it): one round trip, none on the
        // embedded backend. Without a ticket a request not due for a challenge passes; with
        // one it passes too unless it is past the ticket ceiling (then the ticket is revoked).
        // So an armed host under load spends no round trip on the requests it passes anyway.
        if !challenge_due && count <= t.effective_ticket_ceiling() {
            return self.pass(Pass::Normal);
        }
        // A request that will be challenged unless it holds a ticket has its package made
        // first, and the fleet's record of that package rides in the same round trip.
        if let Some(difficulty) = self.speculative_challenge(source, &t, mode, over) {
            return self
                .challenge_unless_ticket(
                    source,
                    &t,
                    difficulty,
                    count,
                    now,
                    target.only_if(mode == Mode::Doomsday),
                )
                .await;
        }
        match self.store_ticket(source).await {
            Ok(true) => {
                return self
                    .ticket_pass(source, &t, armed, count, now, target)
                    .await;
            }
            Ok(false) => {}
            Err(decision) => return decision,
        }
        match mode {
            // Everyone solves the hardest puzzle; only sources over the static threshold also
            // collect penalties (a visitor busy solving is not a violator).
            Mode::Doomsday => self.challenge(source, &t, over, true, now, target).await,
            Mode::Defcon1 if over => self.challenge(source, &t, true, false, now, target).await,
            Mode::Defcon1 | Mode::Normal => self.pass(Pass::Normal),
        }
    }

    /// The difficulty of the challenge this request gets if it holds no ticket, when that is
    /// known without the store: on a backend that records issued packages, in DOOMSDAY or over
    /// the static threshold in DEFCON_1, with no penalty raise due this second and no hard
    /// block. `None`: the ordinary path (ticket lookup first).
    fn speculative_challenge(
        &self,
        source: Source,
        t: &Tunables,
        mode: Mode,
        over: bool,
    ) -> Option<u32> {
        if !self.store.records_issued() {
            return None;
        }
        match mode {
            Mode::Doomsday if !over => Some(t.max_difficulty),
            Mode::Doomsday | Mode::Defcon1 if over => {
                let count = self.penalties.recent(source, Instant::now())?;
                if penalty::hard_blocked(t, count) {
                    return None;
                }
                Some(if mode == Mode::Doomsday {
                    t.max_difficulty
                } else {
                    penalty::difficulty(t, count)
                })
            }
            _ => None,
        }
    }

    /// The package first, then one round trip for the ticket lookup and the package's fleet
    /// record together; a ticket found wins (the package is dropped, its record lapses).
    async fn challenge_unless_ticket(
        &self,
        source: Source,
        t: &Tunables,
        difficulty: u32,
        count: u64,
        now: u64,
        target: Target<'_>,
    ) -> Decision {
        let package = match self.signer.issue(
            source,
            difficulty,
            t.challenge_ttl_seconds,
            &target.content(),
            now,
        ) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot issue a challenge");
                return self.fail();
            }
        };
        let digest = B64.encode(challenge::package_digest(
            &package.payload,
            &package.signature,
        ));
        match self
            .store_call(
                self.store
                    .ticket_and_record(source, &digest, t.challenge_ttl_seconds),
            )
            .await
        {
            Ok(Some(exp)) if self.cache_ticket(source, exp) => {
                return self.ticket_pass(source, t, true, count, now, target).await;
            }
            Ok(_) => {}
            // A single failure: no ticket known, the challenge stands.
            Err(_) if self.healthy() => {}
            Err(_) => return self.fail(),
        }
        self.counters.challenged.fetch_add(1, Ordering::Relaxed);
        Decision::Challenge(Box::new(package))
    }

    /// Raises the source's penalty (one host at most once per `RAISE_INTERVAL`) and, past
    /// `hard_block_after`, puts it into the kernel deny map. Returns the count; `Err` = the
    /// store is down (the fail mode's decision). A single failed store call is taken as
    /// one more violation on this host's own count.
    async fn raise(&self, source: Source, t: &Tunables) -> Result<u64, Decision> {
        let instant = Instant::now();
        let count = match self.penalties.recent(source, instant) {
            Some(c) => c,
            None => match self
                .store_call(self.store.penalty_incr(source, t.penalty_ttl_seconds))
                .await
            {
                Ok(c) => {
                    self.counters.penalties.fetch_add(1, Ordering::Relaxed);
                    self.penalties.note_raise(source, c, instant);
                    c
                }
                Err(_) if self.healthy() => {
                    let c = self.penalties.last(source) + 1;
                    self.penalties.note_raise(source, c, instant);
                    c
                }
                Err(_) => return Err(self.fail()),
            },
        };
        if penalty::hard_blocked(t, count) && !self.penalties.is_blocked(source, instant) {
            self.hard_block(source, penalty::block_ttl(t, count)).await;
        }
        Ok(count)
    }

    /// A failed proof or a forged cookie: counted against the source, and a violation. A
    /// source past `FLOOD_FAILURES_PER_WINDOW` in one window goes to the kernel now, for as
    /// long as a penalty just past `hard_block_after` would keep it there.
    async fn failure(&self, source: Source, t: &Tunables) {
        let instant = Instant::now();
        let failures = self.detector.count_failure(source, instant);
        let _ = self.raise(source, t).await;
        if failures >= challenge::FLOOD_FAILURES_PER_WINDOW
            && !self.penalties.is_blocked(source, instant)
        {
            let count = t.hard_block_after.saturating_add(1);
            self.hard_block(source, penalty::block_ttl(t, count)).await;
        }
    }

    async fn challenge(
        &self,
        source: Source,
        t: &Tunables,
        violation: bool,
        doomsday: bool,
        now: u64,
        target: Target<'_>,
    ) -> Decision {
        let target = target.only_if(doomsday);
        if !violation {
            return self.issue(source, t, t.max_difficulty, now, target).await;
        }
        let count = match self.raise(source, t).await {
            Ok(c) => c,
            Err(decision) => return decision,
        };
        if penalty::hard_blocked(t, count) {
            self.counters.blocked.fetch_add(1, Ordering::Relaxed);
            return Decision::Blocked;
        }
        let difficulty = if doomsday {
            t.max_difficulty
        } else {
            penalty::difficulty(t, count)
        };
        self.issue(source, t, difficulty, now, target).await
    }

    async fn issue(
        &self,
        source: Source,
        t: &Tunables,
        difficulty: u32,
        now: u64,
        target: Target<'_>,
    ) -> Decision {
        match self.signer.issue(
            source,
            difficulty,
            t.challenge_ttl_seconds,
            &target.content(),
            now,
        ) {
            Ok(p) => {
                if self.store.records_issued() {
                    // Lets any host of the fleet authenticate the proof with one lookup
                    // instead of an ECDSA verification. Best effort: without the record the
                    // proof takes the signature check.
                    let digest = B64.encode(challenge::package_digest(&p.payload, &p.signature));
                    let _ = self
                        .store_call(self.store.record_issued(&digest, t.challenge_ttl_seconds))
                        .await;
                }
                self.counters.challenged.fetch_add(1, Ordering::Relaxed);
                Decision::Challenge(Box::new(p))
            }
            Err(e) => {
                warn!(error = %e, "cannot issue a challenge");
                self.fail()
            }
        }
    }

    async fn hard_block(&self, source: Source, ttl: Duration) {
        self.counters.hard_blocks.fetch_add(1, Ordering::Relaxed);
        // One map update: a few syscalls, short enough to run inline.
        let in_kernel = self.penalties.block(self.datapath.as_ref(), source, ttl);
        info!(
            seconds = ttl.as_secs(),
            in_kernel, "penalty past hard_block_after: source blocked"
        );
    }

    /// Records an anomaly: DEFCON_1 from NORMAL, and `last_incident_time` (written to the
    /// store at most once a second).
    async fn note_incident(&self, now: u64) {
        let mut s = self.mode_state();
        let entering = s.current_mode == Mode::Normal;
        if entering {
            s.current_mode = Mode::Defcon1;
        }
        s.last_incident_time = now;
        write(&self.state, s);
        if entering {
            info!("anomaly: entering DEFCON_1");
        }
        if entering || self.incident_written.swap(now, Ordering::Relaxed) != now {
            let _ = self.store_call(self.store.set_state(&s)).await;
        }
    }

    /// Refuses, before any work, proofs from a source that is blocked or failed too many in
    /// the last 5 s (the proxy asks before it even reads the body).
    pub async fn proof_gate(&self, peer: IpAddr) -> Result<(), ProofError> {
        let source = self.source_of(peer);
        let instant = Instant::now();
        if self.penalties.is_blocked(source, instant) {
            return Err(self.reject(Rejection::Blocked));
        }
        if self.detector.failures(source, instant) >= challenge::FAILED_PROOFS_PER_WINDOW {
            let t = self.tunables();
            self.failure(source, &t).await;
            return Err(self.reject(Rejection::RateLimited));
        }
        Ok(())
    }

    /// A proof that failed: counted, and held against the source when the failure is one an
    /// honest client does not make.
    pub async fn proof_failed(&self, peer: IpAddr, r: Rejection) -> ProofError {
        if r.penalised() {
            let t = self.tunables();
            self.failure(self.source_of(peer), &t).await;
        }
        self.reject(r)
    }

    /// The proof endpoint's work after parsing.
    pub async fn redeem(&self, peer: IpAddr, proof: &Proof) -> Result<TicketGrant, ProofError> {
        let source = self.source_of(peer);
        self.proof_gate(peer).await?;
        let now = unix_now();
        // One digest serves this host's memory, the fleet's record and the verification.
        let digest = challenge::package_digest(&proof.payload, &proof.signature);
        let vouched = if self.signer.issued_here(&digest) {
            Some(Authenticated::IssuedHere)
        } else if self.store.records_issued()
            && matches!(
                self.store_call(self.store.issued_recorded(&B64.encode(digest)))
                    .await,
                Ok(true)
            )
        {
            Some(Authenticated::FleetRecord)
        } else {
            None
        };
        let verified = match self.signer.verify_vouched(proof, source, now, vouched) {
            Ok((v, by)) => {
                self.counters.authenticated[authenticated_index(by)]
                    .fetch_add(1, Ordering::Relaxed);
                v
            }
            Err(r) => return Err(self.proof_failed(peer, r).await),
        };
        let ttl = verified.expires_at.saturating_sub(now);
        match self
            .store_call(self.store.use_nonce(&verified.session_nonce, ttl))
            .await
        {
            Ok(true) => {}
            Ok(false) => return Err(self.proof_failed(peer, Rejection::Replayed).await),
            Err(e) => return Err(ProofError::Store(e)),
        }
        let grant = self.new_ticket(source).await?;
        self.counters.solved.fetch_add(1, Ordering::Relaxed);
        Ok(grant)
    }

    /// A ticket for a source that earned it: in the store, in this host's memory, and as the
    /// signed cookie.
    async fn new_ticket(&self, source: Source) -> Result<TicketGrant, ProofError> {
        let t = self.tunables();
        let expires_at = match self
            .store_call(self.store.set_ticket(source, t.ticket_ttl_seconds))
            .await
        {
            Ok(exp) => exp,
            Err(e) => return Err(ProofError::Store(e)),
        };
        self.grant_ticket(source, expires_at);
        self.counters.tickets.fetch_add(1, Ordering::Relaxed);
        let cookie = self
            .signer
            .ticket_cookie(source, expires_at)
            .map_err(ProofError::Store)?;
        Ok(TicketGrant { expires_at, cookie })
    }

    /// Whether this host already knows `peer` passes without a challenge: its source is
    /// whitelisted or holds a ticket this host has in memory (no store call, no cookie
    /// check). The proxy asks before it makes the DOOMSDAY loader's snapshot, so a ticket
    /// holder's navigation causes no upstream fetch of its own.
    pub fn known_to_pass(&self, peer: IpAddr) -> bool {
        let source = self.source_of(peer);
        let whitelisted = match self.whitelist.read() {
            Ok(w) => w.contains(&source),
            Err(p) => p.into_inner().contains(&source),
        };
        let now = unix_now();
        whitelisted
            || matches!(lock(&self.tickets).get(&source), Some(Held::Valid(exp)) if *exp > now)
    }

    /// What the challenge page just issued to `peer` offers without JavaScript: the delay
    /// while the source's penalty level (its violations, as this host last raised them) is
    /// at most `[sentry.nojs] delay_max_penalty`, else — and always in DOOMSDAY — the
    /// command-line solver. `target` is the challenged request target.
    pub fn nojs_offer(&self, peer: IpAddr, target: &str) -> NoJsOffer {
        let source = self.source_of(peer);
        let cfg = &self.static_config.nojs;
        let level = self.penalties.last(source);
        if self.mode_state().current_mode == Mode::Doomsday
            || cfg.delay_max_penalty == 0
            || level > cfg.delay_max_penalty
        {
            return NoJsOffer::Command;
        }
        let now = unix_now();
        let t = self.tunables();
        let target = Some(same_origin_target(target))
            .filter(|t| t.len() <= MAX_DELAY_TARGET)
            .unwrap_or("/");
        let expires_at = now + t.challenge_ttl_seconds.max(cfg.delay_seconds + 30);
        match self
            .signer
            .delay_token(source, now + cfg.delay_seconds, expires_at, target)
        {
            Ok(token) => NoJsOffer::Delay {
                token,
                seconds: cfg.delay_seconds,
            },
            Err(e) => {
                warn!(error = %e, "cannot sign a delay token; offering the command");
                NoJsOffer::Command
            }
        }
    }

    /// The pass endpoint's work for a delay token: checked (not before its time, signature,
    /// expiry, subject), used once, and a ticket. Returns the ticket and where the browser
    /// goes next (a path of this origin).
    pub async fn redeem_delay(
        &self,
        peer: IpAddr,
        token: &str,
    ) -> Result<(TicketGrant, String), ProofError> {
        let source = self.source_of(peer);
        self.proof_gate(peer).await?;
        let now = unix_now();
        let checked = match self.signer.check_delay_token(token, source, now) {
            Ok(d) => d,
            Err(r) => return Err(self.proof_failed(peer, r).await),
        };
        let ttl = checked.expires_at.saturating_sub(now);
        match self
            .store_call(
                self.store
                    .use_nonce(&format!("delay:{}", checked.nonce), ttl),
            )
            .await
        {
            Ok(true) => {}
            Ok(false) => return Err(self.proof_failed(peer, Rejection::Replayed).await),
            Err(e) => return Err(ProofError::Store(e)),
        }
        let grant = self.new_ticket(source).await?;
        self.counters
            .delays_redeemed
            .fetch_add(1, Ordering::Relaxed);
        Ok((grant, same_origin_target(&checked.target).to_string()))
    }

    /// A package for the command-line solver (`GET /.sentry/challenge`, always JSON): at the
    /// difficulty a challenge to this source has now (`max_difficulty` in DOOMSDAY, else by
    /// its penalty level, at least the first one's). Counted in the source's 5-second
    /// window; past the ticket ceiling it is a violation like any challenged request.
    pub async fn solver_challenge(&self, peer: IpAddr) -> Decision {
        let source = self.source_of(peer);
        let instant = Instant::now();
        if self.penalties.is_blocked(source, instant) {
            self.counters.blocked.fetch_add(1, Ordering::Relaxed);
            return Decision::Blocked;
        }
        let t = self.tunables();
        let now = unix_now();
        let doomsday = self.mode_state().current_mode == Mode::Doomsday;
        let count = self.detector.count_ip(source, instant);
        if count > t.effective_ticket_ceiling() {
            return self
                .challenge(source, &t, true, doomsday, now, Target::path("/"))
                .await;
        }
        let difficulty = if doomsday {
            t.max_difficulty
        } else {
            penalty::difficulty(&t, self.penalties.last(source).max(1))
        };
        self.issue(source, &t, difficulty, now, Target::path("/"))
            .await
    }

    pub fn reject(&self, r: Rejection) -> ProofError {
        self.counters.failed[rejection_index(r)].fetch_add(1, Ordering::Relaxed);
        ProofError::Rejected(r)
    }

    // ----- admin -----

    pub async fn set_tunables(&self, t: Tunables) -> Result<(), SentryError> {
        t.validate()?;
        self.store_call(self.store.set_config(&t)).await?;
        self.detector.set_sensitivity(t.sensitivity_factor);
        write(&self.tunables, t);
        Ok(())
    }

    pub async fn set_mode(&self, mode: Mode) -> Result<ModeState, SentryError> {
        let mut s = self.mode_state();
        s.current_mode = mode;
        if mode == Mode::Defcon1 {
            s.last_incident_time = unix_now();
        }
        self.store_call(self.store.set_state(&s)).await?;
        write(&self.state, s);
        info!(mode = mode.name(), "sentry mode set by an admin");
        Ok(s)
    }

    /// Whitelists an address; its whole source (for IPv6, its prefix) is never challenged.
    pub async fn whitelist_add(&self, ip: IpAddr) -> Result<bool, SentryError> {
        let ip = canonical(ip);
        let added = self.store_call(self.store.whitelist_add(ip)).await?;
        let members = self.store_call(self.store.whitelist()).await?;
        self.apply_whitelist(&members).await;
        Ok(added)
    }

    /// Takes an address off the list; its source stays whitelisted while another listed
    /// address stands for it.
    pub async fn whitelist_remove(&self, ip: IpAddr) -> Result<bool, SentryError> {
        let ip = canonical(ip);
        let removed = self.store_call(self.store.whitelist_remove(ip)).await?;
        let members = self.store_call(self.store.whitelist()).await?;
        self.apply_whitelist(&members).await;
        Ok(removed)
    }

    pub async fn whitelist(&self) -> Result<Vec<IpAddr>, SentryError> {
        self.store_call(self.store.whitelist()).await
    }

    pub async fn penalty_list(
        &self,
        limit: usize,
    ) -> Result<Vec<store::PenaltyEntry>, SentryError> {
        self.store_call(self.store.penalties(limit)).await
    }

    // ----- background -----

    /// Once a second: close the rate second, keep the mode, refresh from the store (or
    /// reconnect), publish counts; every `stats_interval_seconds`: recompute the statistics.
    /// Starts the sentry's work: the defence's clock (rates, the learned threshold, mode,
    /// store upkeep) and, unless `[sentry] listen = "off"`, the proxy. A port in use is an
    /// error.
    pub async fn start_tasks(
        self: &Arc<Self>,
        shutdown: &crate::tasks::Shutdown,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, SentryError> {
        let mut tasks = vec![
            tokio::spawn(Arc::clone(self).run(shutdown.clone())),
            tokio::spawn(Arc::clone(self).run_fleet_sync(shutdown.clone())),
        ];
        let listen = crate::config::parse_listen("sentry.listen", &self.static_config.listen)
            .map_err(|e| SentryError::Config(e.to_string()))?;
        if let Some(addr) = listen {
            if let Some(tls) = tls::prepare(&self.static_config, addr, self.state_dir.as_deref())? {
                let _ = self.listener_tls.set(Arc::clone(&tls));
                let port = crate::http::SharedPort::new(addr);
                port.open(Arc::clone(&tls.slot));
                let _ = self.shared_port.set(port);
                if let (crate::config::sentry::SentryTls::Acme, Some(dir)) =
                    (self.static_config.tls, &self.state_dir)
                {
                    tasks.push(tokio::spawn(tls::renew_loop(
                        self.static_config.clone(),
                        dir.clone(),
                        tls,
                        shutdown.clone(),
                    )));
                }
            }
            tasks.push(proxy::serve(addr, Arc::clone(self), shutdown.clone()).await?);
        }
        Ok(tasks)
    }

    /// Daemon shutdown: whatever the embedded store's journal still has queued, synced.
    pub fn shutdown(&self) {
        if let Err(e) = self.store.flush() {
            warn!(error = %e, "cannot persist the sentry store");
        }
    }

    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut since_stats = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    let s = Arc::clone(&self);
                    let _ = tokio::task::spawn_blocking(move || s.store.flush()).await;
                    return;
                }
                _ = every.tick() => {}
            }
            self.detector.tick();
            let now = unix_now();
            let t = self.tunables();
            since_stats += 1;
            if since_stats >= t.stats_interval_seconds {
                since_stats = 0;
                let (_, stats) = self.detector.recompute(t.sensitivity_factor, now);
                let series = self.detector.series();
                let _ = self
                    .store_call(self.store.put_traffic(&series, stats))
                    .await;
            }
            self.keep_store(now).await;
            let s = self.mode_state();
            if s.current_mode == Mode::Defcon1
                && now.saturating_sub(s.last_incident_time) >= t.calm_seconds
            {
                let calm = ModeState {
                    current_mode: Mode::Normal,
                    ..s
                };
                if self.store_call(self.store.set_state(&calm)).await.is_ok() || !self.healthy() {
                    write(&self.state, calm);
                    info!("calm for {}s: leaving DEFCON_1", t.calm_seconds);
                }
            }
            let top = self.detector.top(256, Instant::now());
            let _ = self.store_call(self.store.publish_counts(&top)).await;
            self.store.maintain();
        }
    }

    /// Every 5 s, on its own task (a slow store never holds up the per-second tick): the
    /// penalties other hosts escalated, into this host's kernel.
    pub async fn run_fleet_sync(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if self.datapath.is_none() {
            return;
        }
        let mut every = tokio::time::interval(FLEET_SYNC_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = every.tick() => self.sync_fleet_blocks().await,
            }
        }
    }

    /// Health check and refresh; a degraded store is retried here every second.
    async fn keep_store(&self, _now: u64) {
        if !self.healthy() {
            if self.store.ping().await.is_ok() {
                match self.sync_from_store(false).await {
                    Ok(()) => {
                        self.store_failures.store(0, Ordering::Relaxed);
                        self.failing_since_ms.store(0, Ordering::Relaxed);
                        self.healthy.store(true, Ordering::Relaxed);
                        info!(
                            backend = self.store.backend(),
                            "sentry store answers again: recovered"
                        );
                    }
                    Err(e) => warn!(error = %e, "sentry store answers but cannot be read yet"),
                }
            }
            return;
        }
        match self.sync_from_store(false).await {
            Ok(()) => self.store_failures.store(0, Ordering::Relaxed),
            Err(e) => self.store_failed(&e),
        }
    }

    /// Puts penalties other hosts escalated past `hard_block_after` into this host's kernel
    /// (the store's listing reads the entries in pipelined round trips).
    async fn sync_fleet_blocks(&self) {
        if self.datapath.is_none() {
            return;
        }
        let t = self.tunables();
        let Ok(list) = self.store_call(self.store.penalties(10_000)).await else {
            return;
        };
        let now = Instant::now();
        for e in list {
            if penalty::hard_blocked(&t, e.count) && !self.penalties.is_blocked(e.address, now) {
                self.hard_block(e.address, Duration::from_secs(e.expires_in_seconds.max(1)))
                    .await;
            }
        }
    }

    /// Kernel per-source counters for `sources` (packets in the XDP guard's 5 s window, new
    /// TCP connections; an IPv6 prefix sums its addresses), joined into status; empty
    /// without the datapath.
    pub fn kernel_counts(&self, sources: &[Source]) -> HashMap<Source, (u64, u64)> {
        let Some(dp) = &self.datapath else {
            return HashMap::new();
        };
        let wanted: HashSet<Source> = sources.iter().copied().collect();
        let mut out: HashMap<Source, (u64, u64)> = HashMap::new();
        if let Ok(counted) = dp.guard.sources() {
            for s in counted {
                let source = self.source_of(s.address);
                if wanted.contains(&source) {
                    let e = out.entry(source).or_default();
                    e.0 += s.window_packets;
                    e.1 += s.new_tcp;
                }
            }
        }
        out
    }

    pub fn client_addr(&self, peer: SocketAddr, forwarded_for: Option<&str>) -> IpAddr {
        proxy::client_addr(&self.trusted_proxies, peer.ip(), forwarded_for)
    }
}

/// Why a proof did not yield a ticket.
#[derive(Debug)]
pub enum ProofError {
    Rejected(Rejection),
    Store(SentryError),
}

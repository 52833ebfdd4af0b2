//! The embedded backend: the key schema in memory, made durable by an append-only journal and
//! compacted into a snapshot now and then, all in the state directory.
//!
//! - **Journal** (`sentry-store.journal.<n>`): every change is one JSON line, appended by one
//!   writer thread that takes whatever has queued up, writes it in one go and syncs it once
//!   (group commit). Callers whose change is acknowledged to someone (a redeemed nonce, admin
//!   changes: config, state, whitelist, keys) wait until their line is synced: a proof is
//!   answered only once its nonce would survive `kill -9` or a power cut. Tickets, penalties
//!   and the traffic series are queued without waiting and are on disk within milliseconds.
//!   No request thread writes or syncs a file, and no lock is held while the disk works.
//! - **Snapshot** (`sentry-store.json`, written with `write_atomic`): the whole state, naming
//!   the first journal still needed. The writer switches to a fresh journal, and a helper
//!   thread writes the snapshot and then deletes the older journals. Due after
//!   `COMPACT_RECORDS` lines or `COMPACT_AFTER` with any, and at start.
//!
//! Loading reads the snapshot and replays the journals it names, in order; a line cut short
//! by a crash ends that file's replay. Every line sets a key to a value (or removes it), so a
//! snapshot taken while lines are still arriving, replayed with them, comes out the same.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{ModeState, PenaltyEntry, TRAFFIC_WINDOW, TrafficStats, unix_now};
use crate::{
    sentry::{SentryError, Tunables},
    source::Source,
};

/// Journal lines after which a snapshot is due.
pub const COMPACT_RECORDS: u64 = 100_000;
/// A snapshot is due this long after the last one if any line was written since.
pub const COMPACT_AFTER: Duration = Duration::from_secs(60);
/// Expired entries are swept from memory this often.
const EXPIRE_EVERY: Duration = Duration::from_secs(10);
const SNAPSHOT: &str = "sentry-store.json";
const JOURNAL_PREFIX: &str = "sentry-store.journal.";

/// The snapshot's content. Expiries are Unix seconds.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct Data {
    config: Option<Tunables>,
    state: Option<ModeState>,
    whitelist: BTreeSet<IpAddr>,
    trust_ticket: HashMap<Source, u64>,
    /// source -> (count, expires_at)
    penalty_box: HashMap<Source, (u64, u64)>,
    used_nonces: HashMap<String, u64>,
    /// Oldest first.
    global_traffic_per_sec: Vec<u64>,
    traffic_stats: Option<TrafficStats>,
    keys: BTreeMap<String, String>,
    /// The first journal the snapshot does not contain.
    journal: u64,
    #[serde(skip)]
    req_count: HashMap<Source, (u64, u64)>,
}

/// One journal line: a key set to a value, or removed.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Record {
    Config {
        tunables: Tunables,
    },
    State {
        state: ModeState,
    },
    WhitelistAdd {
        ip: IpAddr,
    },
    WhitelistRemove {
        ip: IpAddr,
    },
    Ticket {
        source: Source,
        expires_at: u64,
    },
    TicketClear {
        source: Source,
    },
    Penalty {
        source: Source,
        count: u64,
        expires_at: u64,
    },
    PenaltyClear {
        source: Source,
    },
    Nonce {
        nonce: String,
        expires_at: u64,
    },
    Traffic {
        series: Vec<u64>,
        stats: TrafficStats,
    },
    Key {
        kid: String,
        jwk: String,
    },
}

impl Record {
    fn apply(self, d: &mut Data) {
        match self {
            Record::Config { tunables } => d.config = Some(tunables),
            Record::State { state } => d.state = Some(state),
            Record::WhitelistAdd { ip } => {
                d.whitelist.insert(ip);
            }
            Record::WhitelistRemove { ip } => {
                d.whitelist.remove(&ip);
            }
            Record::Ticket { source, expires_at } => {
                d.trust_ticket.insert(source, expires_at);
            }
            Record::TicketClear { source } => {
                d.trust_ticket.remove(&source);
            }
            Record::Penalty {
                source,
                count,
                expires_at,
            } => {
                d.penalty_box.insert(source, (count, expires_at));
            }
            Record::PenaltyClear { source } => {
                d.penalty_box.remove(&source);
            }
            Record::Nonce { nonce, expires_at } => {
                d.used_nonces.insert(nonce, expires_at);
            }
            Record::Traffic { series, stats } => {
                d.global_traffic_per_sec = series;
                d.traffic_stats = Some(stats);
            }
            Record::Key { kid, jwk } => {
                d.keys.insert(kid, jwk);
            }
        }
    }
}

type Waiter = tokio::sync::oneshot::Sender<Result<(), String>>;

enum Msg {
    /// A line for the journal; `done` hears when it is synced (or failed).
    Line(Vec<u8>, Option<Waiter>),
    /// Answered once everything queued before it is synced.
    Sync(mpsc::Sender<Result<(), String>>),
    /// Switch to a fresh journal and write a snapshot that starts there.
    Compact,
}

struct Shared {
    data: Mutex<Data>,
    dir: PathBuf,
    /// Lines queued for the journal, ever.
    logged: AtomicU64,
    /// Lines a snapshot on disk contains: raised only once that snapshot is written, so
    /// `logged - covered` (the "dirty" count) never drops for a snapshot that failed.
    covered: AtomicU64,
    compacting: AtomicBool,
    last_snapshot: Mutex<Instant>,
    last_expire: Mutex<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn io_error(path: &Path, e: std::io::Error) -> String {
    format!("{}: {e}", path.display())
}

fn journal_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{JOURNAL_PREFIX}{seq}"))
}

/// The journal files in `dir`, by number.
fn journals(dir: &Path) -> Result<BTreeMap<u64, PathBuf>, SentryError> {
    let mut out = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| SentryError::Io(io_error(dir, e)))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_prefix(JOURNAL_PREFIX))
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.insert(seq, entry.path());
        }
    }
    Ok(out)
}

/// Applies a journal's lines to `data`; returns how many applied. A line that does not read
/// (cut short by a crash) ends the file.
fn replay(path: &Path, data: &mut Data) -> Result<u64, SentryError> {
    let bytes = std::fs::read(path).map_err(|e| SentryError::Io(io_error(path, e)))?;
    let mut applied = 0;
    for line in bytes.split(|b| *b == b'\n') {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Record>(line) {
            Ok(r) => {
                r.apply(data);
                applied += 1;
            }
            Err(e) => {
                warn!(file = %path.display(), error = %e, "sentry store journal ends in a partial line (a crash while writing); the rest is ignored");
                break;
            }
        }
    }
    Ok(applied)
}

fn create_journal(dir: &Path, seq: u64) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = journal_path(dir, seq);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io_error(&path, e))?;
    // The new name must be on disk before anything written into it counts as durable.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, e))?;
    Ok(file)
}

/// Writes a snapshot of `shared` that starts at journal `seq`, then deletes older journals.
fn write_snapshot(shared: &Shared, seq: u64) -> Result<(), SentryError> {
    // A copy taken under the lock and encoded outside it: the proxy's store calls wait only
    // for the copy.
    let data = {
        let mut data = lock(&shared.data);
        expire(&mut data, unix_now());
        data.journal = seq;
        data.clone()
    };
    let bytes = serde_json::to_vec(&data).map_err(SentryError::StoreEncode)?;
    drop(data);
    crate::store::write_atomic(&shared.dir.join(SNAPSHOT), &bytes)
        .map_err(|e| SentryError::StoreWrite(Box::new(e)))?;
    for (old, path) in journals(&shared.dir)?.range(..seq) {
        if let Err(e) = std::fs::remove_file(path) {
            warn!(journal = old, error = %e, "cannot remove a compacted sentry store journal");
        }
    }
    Ok(())
}

fn expire(data: &mut Data, now: u64) {
    data.trust_ticket.retain(|_, exp| *exp > now);
    data.penalty_box.retain(|_, (_, exp)| *exp > now);
    data.used_nonces.retain(|_, exp| *exp > now);
    data.req_count.retain(|_, (_, exp)| *exp > now);
}

/// The writer thread: group commit of journal lines, journal switches for snapshots.
fn writer(shared: Arc<Shared>, rx: mpsc::Receiver<Msg>, mut seq: u64, mut file: std::fs::File) {
    // Lines taken from the queue, ever: a snapshot started now contains all of them.
    let mut processed = 0u64;
    let mut broken: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 65_536 {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut buf = Vec::new();
        let mut waiters: Vec<Waiter> = Vec::new();
        let mut syncs = Vec::new();
        let mut lines = 0u64;
        let mut compact = false;
        for m in batch {
            match m {
                Msg::Line(line, done) => {
                    buf.extend_from_slice(&line);
                    lines += 1;
                    waiters.extend(done);
                }
                Msg::Sync(done) => syncs.push(done),
                Msg::Compact => compact = true,
            }
        }
        if broken.is_some() {
            // The last write failed and no new journal could be started then: try again
            // before writing anything (never after a possibly partial line).
            match create_journal(&shared.dir, seq + 1) {
                Ok(f) => {
                    seq += 1;
                    file = f;
                    broken = None;
                }
                Err(e) => broken = Some(e),
            }
        }
        let result = if let Some(e) = &broken {
            Err(e.clone())
        } else if buf.is_empty() {
            Ok(())
        } else {
            file.write_all(&buf)
                .and_then(|()| file.sync_data())
                .map_err(|e| io_error(&journal_path(&shared.dir, seq), e))
        };
        processed += lines;
        match &result {
            Ok(()) => {}
            Err(_) if broken.is_some() => {}
            Err(e) => {
                warn!(error = %e, "cannot write the sentry store journal; continuing in a new one");
                // A failed write may leave a partial line, which ends the file's replay: the
                // next lines go to a new journal.
                match create_journal(&shared.dir, seq + 1) {
                    Ok(f) => {
                        seq += 1;
                        file = f;
                    }
                    Err(e) => broken = Some(e),
                }
            }
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
        for s in syncs {
            let _ = s.send(result.clone());
        }
        if compact {
            match create_journal(&shared.dir, seq + 1) {
                Ok(f) => {
                    seq += 1;
                    file = f;
                    let (snap, upto) = (Arc::clone(&shared), processed);
                    let snapshot_seq = seq;
                    let spawned = std::thread::Builder::new()
                        .name("sentry-snapshot".into())
                        .spawn(move || {
                            match write_snapshot(&snap, snapshot_seq) {
                                Ok(()) => {
                                    // Only now are those lines redundant.
                                    snap.covered.fetch_max(upto, Ordering::Relaxed);
                                    *lock(&snap.last_snapshot) = Instant::now();
                                }
                                Err(e) => {
                                    warn!(error = %e, "cannot write the sentry store snapshot; the journals are kept")
                                }
                            }
                            snap.compacting.store(false, Ordering::Relaxed);
                        });
                    if spawned.is_err() {
                        shared.compacting.store(false, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot start a new sentry store journal; snapshot postponed");
                    shared.compacting.store(false, Ordering::Relaxed);
                }
            }
        }
    }
}

pub struct EmbeddedStore {
    shared: Arc<Shared>,
    /// `None`: in memory only (benches, unit tests).
    tx: Option<Mutex<mpsc::Sender<Msg>>>,
}

impl EmbeddedStore {
    /// Opens (or starts) the store in `state_dir`: snapshot plus journals, then a fresh
    /// snapshot so the next start reads one file.
    pub fn open(state_dir: &Path) -> Result<Self, SentryError> {
        let path = state_dir.join(SNAPSHOT);
        // A snapshot that does not parse is set aside (the error names it) and the store
        // starts from the journals alone: the sentry, and the VPN beside it, still start.
        let mut data: Data =
            crate::store::read_json_or_set_aside(&path, "sentry").map_err(|source| {
                SentryError::StoreFile {
                    path: path.clone(),
                    source: Box::new(source),
                }
            })?;
        let found = journals(state_dir)?;
        let mut replayed = 0;
        for (_, p) in found.range(data.journal..) {
            replayed += replay(p, &mut data)?;
        }
        if replayed > 0 {
            info!(lines = replayed, "sentry store: journal replayed");
        }
        let next = found
            .keys()
            .next_back()
            .map_or(data.journal, |last| last + 1)
            .max(data.journal);
        let shared = Arc::new(Shared {
            data: Mutex::new(data),
            dir: state_dir.to_path_buf(),
            logged: AtomicU64::new(0),
            covered: AtomicU64::new(0),
            compacting: AtomicBool::new(false),
            last_snapshot: Mutex::new(Instant::now()),
            last_expire: Mutex::new(Instant::now()),
        });
        let file = create_journal(state_dir, next).map_err(SentryError::Io)?;
        // Only a shortcut for the next start: on a full disk the journals stay (they are
        // deleted only after a snapshot is on disk) and the sentry, and the VPN, still start.
        if let Err(e) = write_snapshot(&shared, next) {
            warn!(error = %e, "cannot write the sentry store snapshot at start; the journals are kept");
        }
        let (tx, rx) = mpsc::channel();
        let writer_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("sentry-journal".into())
            .spawn(move || writer(writer_shared, rx, next, file))
            .map_err(|e| SentryError::Io(format!("cannot start the journal writer: {e}")))?;
        Ok(Self {
            shared,
            tx: Some(Mutex::new(tx)),
        })
    }

    /// A store that lives in memory only (benches, unit tests).
    pub fn in_memory() -> Self {
        Self {
            shared: Arc::new(Shared {
                data: Mutex::new(Data::default()),
                dir: PathBuf::new(),
                logged: AtomicU64::new(0),
                covered: AtomicU64::new(0),
                compacting: AtomicBool::new(false),
                last_snapshot: Mutex::new(Instant::now()),
                last_expire: Mutex::new(Instant::now()),
            }),
            tx: None,
        }
    }

    fn data(&self) -> std::sync::MutexGuard<'_, Data> {
        lock(&self.shared.data)
    }

    /// Queues `record` (call with the data lock held, so lines reach the journal in the order
    /// of the changes). With `wait`, returns what tells when it is durable.
    fn log(
        &self,
        record: &Record,
        wait: bool,
    ) -> Result<Option<tokio::sync::oneshot::Receiver<Result<(), String>>>, SentryError> {
        let Some(tx) = &self.tx else {
            return Ok(None);
        };
        let mut line = serde_json::to_vec(record).map_err(SentryError::StoreEncode)?;
        line.push(b'\n');
        let (done, rx) = if wait {
            let (d, r) = tokio::sync::oneshot::channel();
            (Some(d), Some(r))
        } else {
            (None, None)
        };
        lock(tx)
            .send(Msg::Line(line, done))
            .map_err(|_| SentryError::Io("the sentry store's journal writer has stopped".into()))?;
        self.shared.logged.fetch_add(1, Ordering::Relaxed);
        Ok(rx)
    }

    async fn durable(
        rx: Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
    ) -> Result<(), SentryError> {
        match rx {
            None => Ok(()),
            Some(rx) => match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(SentryError::Io(format!("sentry store journal: {e}"))),
                Err(_) => Err(SentryError::Io(
                    "the sentry store's journal writer has stopped".into(),
                )),
            },
        }
    }

    /// Applies a change in memory, journals it and, for acknowledged changes, waits until it
    /// is durable.
    async fn change(&self, record: Record, wait: bool) -> Result<(), SentryError> {
        let rx = {
            let mut data = self.data();
            let rx = self.log(&record, wait)?;
            record.apply(&mut data);
            rx
        };
        Self::durable(rx).await
    }

    /// Every second: sweeps expired entries now and then, and starts a snapshot when one is
    /// due. Never waits on the disk.
    pub fn maintain(&self) {
        let now = Instant::now();
        {
            let mut last = lock(&self.shared.last_expire);
            if now.duration_since(*last) >= EXPIRE_EVERY {
                *last = now;
                expire(&mut self.data(), unix_now());
            }
        }
        let Some(tx) = &self.tx else {
            return;
        };
        let pending = self.pending();
        let due = pending >= COMPACT_RECORDS
            || (pending > 0
                && now.duration_since(*lock(&self.shared.last_snapshot)) >= COMPACT_AFTER);
        if due && !self.shared.compacting.swap(true, Ordering::Relaxed) {
            // Retried no sooner than COMPACT_AFTER if it fails.
            *lock(&self.shared.last_snapshot) = now;
            if lock(tx).send(Msg::Compact).is_err() {
                self.shared.compacting.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Blocks until every change made so far is durable (shutdown, tests).
    pub fn flush(&self) -> Result<(), SentryError> {
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        let (done, rx) = mpsc::channel();
        lock(tx)
            .send(Msg::Sync(done))
            .map_err(|_| SentryError::Io("the sentry store's journal writer has stopped".into()))?;
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SentryError::Io(format!("sentry store journal: {e}"))),
            Err(_) => Err(SentryError::Io(
                "the sentry store's journal did not sync within 10 s".into(),
            )),
        }
    }

    /// Journal lines not yet in a snapshot.
    pub fn pending(&self) -> u64 {
        let covered = self.shared.covered.load(Ordering::Relaxed);
        self.shared
            .logged
            .load(Ordering::Relaxed)
            .saturating_sub(covered)
    }

    pub async fn ping(&self) -> Result<(), SentryError> {
        Ok(())
    }

    pub async fn get_config(&self) -> Result<Option<Tunables>, SentryError> {
        Ok(self.data().config.clone())
    }

    pub async fn set_config(&self, t: &Tunables) -> Result<(), SentryError> {
        self.change(
            Record::Config {
                tunables: t.clone(),
            },
            true,
        )
        .await
    }

    pub async fn get_state(&self) -> Result<Option<ModeState>, SentryError> {
        Ok(self.data().state)
    }

    pub async fn set_state(&self, state: &ModeState) -> Result<(), SentryError> {
        self.change(Record::State { state: *state }, true).await
    }

    pub async fn whitelist(&self) -> Result<Vec<IpAddr>, SentryError> {
        Ok(self.data().whitelist.iter().copied().collect())
    }

    pub async fn whitelist_contains(&self, ip: IpAddr) -> Result<bool, SentryError> {
        Ok(self.data().whitelist.contains(&ip))
    }

    pub async fn whitelist_add(&self, ip: IpAddr) -> Result<bool, SentryError> {
        let rx = {
            let mut data = self.data();
            if data.whitelist.contains(&ip) {
                return Ok(false);
            }
            let record = Record::WhitelistAdd { ip };
            let rx = self.log(&record, true)?;
            record.apply(&mut data);
            rx
        };
        Self::durable(rx).await.map(|()| true)
    }

    pub async fn whitelist_remove(&self, ip: IpAddr) -> Result<bool, SentryError> {
        let rx = {
            let mut data = self.data();
            if !data.whitelist.contains(&ip) {
                return Ok(false);
            }
            let record = Record::WhitelistRemove { ip };
            let rx = self.log(&record, true)?;
            record.apply(&mut data);
            rx
        };
        Self::durable(rx).await.map(|()| true)
    }

    pub async fn ticket(&self, source: Source) -> Result<Option<u64>, SentryError> {
        let now = unix_now();
        Ok(self
            .data()
            .trust_ticket
            .get(&source)
            .copied()
            .filter(|exp| *exp > now))
    }

    /// Journaled without waiting: the signed cookie the client gets carries the ticket too.
    pub async fn set_ticket(&self, source: Source, ttl: u64) -> Result<u64, SentryError> {
        let expires_at = unix_now() + ttl;
        self.change(Record::Ticket { source, expires_at }, false)
            .await?;
        Ok(expires_at)
    }

    pub async fn clear_ticket(&self, source: Source) -> Result<(), SentryError> {
        let rx = {
            let mut data = self.data();
            if data.trust_ticket.remove(&source).is_none() {
                return Ok(());
            }
            self.log(&Record::TicketClear { source }, false)?
        };
        Self::durable(rx).await
    }

    pub async fn penalty_incr(&self, source: Source, ttl_unit: u64) -> Result<u64, SentryError> {
        let now = unix_now();
        let mut data = self.data();
        let (mut count, exp) = data.penalty_box.get(&source).copied().unwrap_or((0, 0));
        if exp <= now {
            count = 0;
        }
        count += 1;
        let record = Record::Penalty {
            source,
            count,
            expires_at: now + ttl_unit.saturating_mul(count),
        };
        self.log(&record, false)?;
        record.apply(&mut data);
        Ok(count)
    }

    pub async fn penalty(&self, source: Source) -> Result<Option<PenaltyEntry>, SentryError> {
        let now = unix_now();
        Ok(self
            .data()
            .penalty_box
            .get(&source)
            .filter(|(_, exp)| *exp > now)
            .map(|(count, exp)| PenaltyEntry {
                address: source,
                count: *count,
                expires_in_seconds: exp - now,
            }))
    }

    pub async fn penalties(&self, limit: usize) -> Result<Vec<PenaltyEntry>, SentryError> {
        let now = unix_now();
        let data = self.data();
        let mut out: Vec<PenaltyEntry> = data
            .penalty_box
            .iter()
            .filter(|(_, (_, exp))| *exp > now)
            .map(|(source, (count, exp))| PenaltyEntry {
                address: *source,
                count: *count,
                expires_in_seconds: exp - now,
            })
            .collect();
        out.sort_by_key(|e| std::cmp::Reverse(e.count));
        out.truncate(limit);
        Ok(out)
    }

    pub async fn clear_penalty(&self, source: Source) -> Result<bool, SentryError> {
        let rx = {
            let mut data = self.data();
            if data.penalty_box.remove(&source).is_none() {
                return Ok(false);
            }
            self.log(&Record::PenaltyClear { source }, true)?
        };
        Self::durable(rx).await.map(|()| true)
    }

    /// Set-if-absent, answered only once the nonce is durable: a proof redeemed here is
    /// refused as a replay after any crash. If the journal cannot take it, the nonce is
    /// released again and the caller gets the error (503: the client may retry).
    pub async fn use_nonce(&self, nonce: &str, ttl: u64) -> Result<bool, SentryError> {
        let now = unix_now();
        let expires_at = now + ttl;
        let rx = {
            let mut data = self.data();
            if data.used_nonces.get(nonce).is_some_and(|exp| *exp > now) {
                return Ok(false);
            }
            let record = Record::Nonce {
                nonce: nonce.to_string(),
                expires_at,
            };
            let rx = self.log(&record, true)?;
            record.apply(&mut data);
            rx
        };
        match Self::durable(rx).await {
            Ok(()) => Ok(true),
            Err(e) => {
                let mut data = self.data();
                if data.used_nonces.get(nonce) == Some(&expires_at) {
                    data.used_nonces.remove(nonce);
                }
                Err(e)
            }
        }
    }

    pub async fn publish_counts(&self, counts: &[(Source, u64)]) -> Result<(), SentryError> {
        let exp = unix_now() + 5;
        let mut data = self.data();
        for (source, n) in counts {
            data.req_count.insert(*source, (*n, exp));
        }
        Ok(())
    }

    pub async fn req_count(&self, source: Source) -> Result<u64, SentryError> {
        let now = unix_now();
        Ok(self
            .data()
            .req_count
            .get(&source)
            .filter(|(_, exp)| *exp > now)
            .map_or(0, |(n, _)| *n))
    }

    pub async fn put_traffic(
        &self,
        series: &[u64],
        stats: TrafficStats,
    ) -> Result<(), SentryError> {
        let skip = series.len().saturating_sub(TRAFFIC_WINDOW);
        self.change(
            Record::Traffic {
                series: series[skip..].to_vec(),
                stats,
            },
            false,
        )
        .await
    }

    pub async fn traffic(&self) -> Result<(Vec<u64>, Option<TrafficStats>), SentryError> {
        let data = self.data();
        Ok((data.global_traffic_per_sec.clone(), data.traffic_stats))
    }

    pub async fn publish_key(&self, kid: &str, jwk: &str) -> Result<(), SentryError> {
        let rx = {
            let mut data = self.data();
            if data.keys.get(kid).map(String::as_str) == Some(jwk) {
                return Ok(());
            }
            let record = Record::Key {
                kid: kid.to_string(),
                jwk: jwk.to_string(),
            };
            let rx = self.log(&record, true)?;
            record.apply(&mut data);
            rx
        };
        Self::durable(rx).await
    }

    pub async fn keys(&self) -> Result<BTreeMap<String, String>, SentryError> {
        Ok(self.data().keys.clone())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn journal_replays_after_a_crash_and_a_torn_line_ends_only_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let src: Source = "2001:db8:1:2::/64".parse().unwrap();
        rt().block_on(async {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            assert!(s.use_nonce("n1", 60).await.unwrap());
            s.set_ticket(src, 600).await.unwrap();
            assert_eq!(s.penalty_incr(src, 10).await.unwrap(), 1);
            s.flush().unwrap();
            // Dropped without a snapshot: as after kill -9.
        });
        // A crash in the middle of a line, then a later journal.
        let last = *journals(dir.path()).unwrap().keys().next_back().unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(journal_path(dir.path(), last))
            .unwrap()
            .write_all(b"{\"op\":\"nonce\",\"nonce\":\"cut")
            .unwrap();
        std::fs::write(
            journal_path(dir.path(), last + 1),
            format!(
                "{}\n",
                serde_json::to_string(&Record::Nonce {
                    nonce: "n2".into(),
                    expires_at: unix_now() + 60
                })
                .unwrap()
            ),
        )
        .unwrap();
        rt().block_on(async {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            assert!(!s.use_nonce("n1", 60).await.unwrap(), "n1 stays used");
            assert!(
                !s.use_nonce("n2", 60).await.unwrap(),
                "the later journal counts"
            );
            assert!(s.ticket(src).await.unwrap().is_some());
            assert_eq!(s.penalty(src).await.unwrap().unwrap().count, 1);
            // The start wrote a snapshot and dropped the replayed journals.
            assert_eq!(journals(dir.path()).unwrap().len(), 1);
        });
    }

    #[test]
    fn a_snapshot_lowers_the_dirty_count_only_once_written() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            for i in 0..10 {
                assert!(s.use_nonce(&format!("n{i}"), 60).await.unwrap());
            }
            assert_eq!(s.pending(), 10);
            // A snapshot that cannot be written (its temp file's place is a directory) keeps
            // the count and the journal.
            std::fs::create_dir(dir.path().join("sentry-store.tmp")).unwrap();
            *lock(&s.shared.last_snapshot) = Instant::now() - COMPACT_AFTER;
            s.maintain();
            let deadline = Instant::now() + Duration::from_secs(5);
            while s.shared.compacting.load(Ordering::Relaxed) {
                assert!(Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(
                s.pending(),
                10,
                "a failed snapshot leaves the changes dirty"
            );
            std::fs::remove_dir(dir.path().join("sentry-store.tmp")).unwrap();
            *lock(&s.shared.last_snapshot) = Instant::now() - COMPACT_AFTER;
            s.maintain();
            let deadline = Instant::now() + Duration::from_secs(5);
            while s.pending() != 0 {
                assert!(Instant::now() < deadline, "snapshot never written");
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(s.use_nonce("after", 60).await.unwrap());
            s.flush().unwrap();
        });
        rt().block_on(async {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            for n in ["n0", "n9", "after"] {
                assert!(!s.use_nonce(n, 60).await.unwrap(), "{n}");
            }
        });
    }
}

//! The gambling-domain blocklist (seed 001): entries with weighted patterns, a monotonic
//! version with a change journal, a checksum of the canonical list, the matching engine, and
//! the kernel's share of it (exact and subdomain rules at or above the threshold go into the
//! DNS filter's domain set).

pub mod actions;
pub mod api;
pub mod batch;
pub mod import;
pub mod lookalike;
pub mod matcher;
pub mod metrics;
pub mod model;
pub mod publisher;
pub mod rule_table;
pub mod store;
pub mod sync;
pub mod table;

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Serialize, Serializer, ser::SerializeSeq, ser::SerializeStruct};
use sha2::{Digest, Sha256};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use self::{
    batch::Batch,
    lookalike::Lookalikes,
    matcher::{Matcher, RuleKey, Verdict, to_weight},
    model::{Entry, Pattern, PatternType},
    store::{BlocklistStore, Change},
    table::{DomainTable, Listed},
};
use crate::{
    config::BlocklistConfig,
    datapath::{Datapath, DomainSetUndo, KeyClash, NameKey, Owner},
    domain_hash::DomainHasher,
    error::Error,
    tasks::Shutdown,
};

/// What can go wrong with the list and its store.
#[derive(Debug, thiserror::Error)]
pub enum BlocklistError {
    /// The SQLite store refused a read or a write.
    #[error("blocklist store: {0}")]
    Store(#[source] rusqlite::Error),
    /// An entry's patterns in the store do not parse, or cannot be written.
    #[error("blocklist store: {0}")]
    StoreJson(#[source] serde_json::Error),
    /// An entry's column in the store is not in any form the store writes.
    #[error("blocklist store: {0}")]
    StoreColumn(String),
    #[error(transparent)]
    Daemon(#[from] Error),
}

impl BlocklistError {
    /// Whether the store's file itself is damaged (not a database, a corrupt page, an entry
    /// that does not parse), as opposed to a failure of the moment.
    pub fn is_corrupt_store(&self) -> bool {
        let damaged = |e: &rusqlite::Error| {
            matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
            )
        };
        match self {
            BlocklistError::Store(e) | BlocklistError::Daemon(Error::Sqlite { source: e, .. }) => {
                damaged(e)
            }
            BlocklistError::StoreJson(_) | BlocklistError::StoreColumn(_) => true,
            BlocklistError::Daemon(_) => false,
        }
    }
}

struct State {
    entries: DomainTable,
    /// Distinct reasons, shared by index: most entries of a list share a handful.
    reasons: Vec<Arc<str>>,
    reason_index: HashMap<Arc<str>, u32>,
    patterns: Vec<Pattern>,
    version: u64,
}

impl State {
    /// The list's index of `reason`, added when new.
    fn reason_index(&mut self, reason: &Arc<str>) -> u32 {
        if let Some(&i) = self.reason_index.get(reason) {
            return i;
        }
        let i = self.reasons.len() as u32;
        self.reasons.push(Arc::clone(reason));
        self.reason_index.insert(Arc::clone(reason), i);
        i
    }

    /// Adds or updates a batch's entries in the table and in `matcher` (a name `place_new`
    /// gave its rule already is not hashed again). `apply` refuses a new name whose key another
    /// holds before it gets here; at load (a stored list under a new seed) such a name stays
    /// listed but unmatched, with a warning.
    fn insert(&mut self, batch: &Batch, matcher: &mut Matcher) {
        // The batch's few reasons as the list's indices, each looked up once, when an entry
        // first has it.
        let mut reasons: Vec<Option<u32>> = vec![None; batch.reasons().len()];
        let rows: Vec<(&str, Listed)> = batch
            .iter()
            .map(|e| {
                let (exact, sub) = e.weights();
                let local = e.reason_id();
                let reason = match reasons.get(local).copied().flatten() {
                    Some(i) => i,
                    None => {
                        let i = batch
                            .reasons()
                            .get(local)
                            .map_or(0, |r| self.reason_index(r));
                        if let Some(slot) = reasons.get_mut(local) {
                            *slot = Some(i);
                        }
                        i
                    }
                };
                let listed = Listed {
                    added_at: e.added_at(),
                    reason,
                    exact: to_weight(exact),
                    sub: to_weight(sub),
                };
                (e.domain(), listed)
            })
            .collect();
        let unplaced = || batch.iter().filter(|e| !e.placed());
        // A large batch (the load at start, an import of listed names) at once, a small one
        // name by name: the same outcome.
        let matched: Vec<bool> = if batch.len() >= LARGE_BATCH {
            matcher.upsert_many(unplaced().map(|e| (e.domain(), e.weights().0, e.weights().1)))
        } else {
            unplaced()
                .map(|e| matcher.upsert(e.domain(), e.weights().0, e.weights().1))
                .collect()
        };
        for (e, _) in unplaced().zip(matched).filter(|(_, matched)| !matched) {
            warn!(
                domain = %e.domain(),
                "listed domain shares its key with another under this installation's domain hash; not matched"
            );
        }
        self.entries.upsert(rows);
    }

    /// The seed's `Entry` for a listed domain.
    fn entry(&self, domain: &str, listed: &Listed) -> Entry {
        let (exact, sub) = listed.weights();
        let mut patterns = Vec::with_capacity(2);
        if listed.exact > 0 {
            patterns.push(Pattern {
                pattern: domain.to_string(),
                kind: PatternType::Exact,
                weight: exact,
            });
        }
        if listed.sub > 0 {
            patterns.push(Pattern {
                pattern: format!("*.{domain}"),
                kind: PatternType::Subdomain,
                weight: sub,
            });
        }
        Entry {
            domain: domain.to_string(),
            patterns,
            added_at: listed.added_at,
            reason: self
                .reasons
                .get(listed.reason as usize)
                .map(|r| r.to_string())
                .unwrap_or_default(),
        }
    }
}

pub struct Blocklist {
    store: BlocklistStore,
    state: RwLock<State>,
    /// The engine, apart from the list: the resolver only ever takes this lock, so a long
    /// read of the list (a checksum, a full download) never stalls DNS. Writers take the
    /// list's lock first, then this one.
    matcher: RwLock<Matcher>,
    /// The checksum of one version, computed when first asked for: recomputing it over a
    /// million entries on every change would make each change cost a second.
    checksum: Mutex<Option<(u64, String)>>,
    threshold: f64,
    datapath: Option<Arc<Datapath>>,
    /// Sources synced by `blocklist sync` and the schedule.
    pub syncer: sync::Syncer,
    /// This host's key for signing its full list for other hosts.
    pub publisher: publisher::Publisher,
    /// Bumped on every change the engine sees (entries, patterns, brands): the resolver's
    /// cache remembers which generation vetted a name.
    generation: AtomicU64,
    /// The brands as configured (`apply_live` rebuilds lookalike detection when they change).
    configured_brands: Mutex<Vec<String>>,
    /// The version, published after every change (the API drops its cached bodies of older
    /// versions when it moves).
    versions: watch::Sender<u64>,
}

/// An `addedAt` at or above this is in milliseconds: in seconds it is the year 5138.
const ADDED_AT_MILLISECONDS_FROM: u64 = 100_000_000_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An entry's canonical JSON: its fields in sorted key order, as `serde_json` writes a map
/// (a pattern's fields are declared in that order already). No spaces; clients can rebuild it.
/// The API writes entries this way too (the key order of its replies has always been sorted).
#[derive(serde::Serialize)]
pub struct CanonicalEntry<'a> {
    #[serde(rename = "addedAt")]
    added_at: u64,
    domain: &'a str,
    patterns: &'a [Pattern],
    reason: &'a str,
}

impl<'a> From<&'a Entry> for CanonicalEntry<'a> {
    fn from(entry: &'a Entry) -> Self {
        Self {
            added_at: entry.added_at,
            domain: &entry.domain,
            patterns: &entry.patterns,
            reason: &entry.reason,
        }
    }
}

/// A listed domain as canonical JSON, written straight from the table: the same bytes as the
/// [`CanonicalEntry`] of [`State::entry`], without building the `Entry` (its strings and its
/// pattern vector) first.
struct ListedJson<'a> {
    domain: &'a str,
    listed: Listed,
    reason: &'a str,
}

impl Serialize for ListedJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut entry = serializer.serialize_struct("Entry", 4)?;
        entry.serialize_field("addedAt", &self.listed.added_at)?;
        entry.serialize_field("domain", self.domain)?;
        entry.serialize_field(
            "patterns",
            &ListedPatterns {
                domain: self.domain,
                listed: &self.listed,
            },
        )?;
        entry.serialize_field("reason", self.reason)?;
        entry.end()
    }
}

/// The exact and subdomain patterns of a listed domain, as [`State::entry`] builds them.
struct ListedPatterns<'a> {
    domain: &'a str,
    listed: &'a Listed,
}

impl Serialize for ListedPatterns<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (exact, sub) = self.listed.weights();
        let count = usize::from(self.listed.exact > 0) + usize::from(self.listed.sub > 0);
        let mut seq = serializer.serialize_seq(Some(count))?;
        if self.listed.exact > 0 {
            seq.serialize_element(&PatternJson {
                pattern: RuleText {
                    domain: self.domain,
                    wildcard: false,
                },
                kind: PatternType::Exact,
                weight: exact,
            })?;
        }
        if self.listed.sub > 0 {
            seq.serialize_element(&PatternJson {
                pattern: RuleText {
                    domain: self.domain,
                    wildcard: true,
                },
                kind: PatternType::Subdomain,
                weight: sub,
            })?;
        }
        seq.end()
    }
}

/// A [`Pattern`] with its text borrowed (fields in `Pattern`'s order, which is sorted).
#[derive(Serialize)]
struct PatternJson<'a> {
    pattern: RuleText<'a>,
    #[serde(rename = "type")]
    kind: PatternType,
    weight: f64,
}

/// `domain` or `*.domain`, written without allocating.
struct RuleText<'a> {
    domain: &'a str,
    wildcard: bool,
}

impl Serialize for RuleText<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.wildcard {
            serializer.collect_str(&format_args!("*.{}", self.domain))
        } else {
            serializer.serialize_str(self.domain)
        }
    }
}

impl State {
    fn listed_json<'a>(&'a self, domain: &'a str, listed: Listed) -> ListedJson<'a> {
        ListedJson {
            domain,
            listed,
            reason: self
                .reasons
                .get(listed.reason as usize)
                .map_or("", |r| r.as_ref()),
        }
    }
}

/// SHA-256 over the canonical list: one canonical JSON line per entry (`entries` must come in
/// domain order), then one per pattern, by type and text. The list's own checksum and the
/// check of a synced seed list are this one function.
pub(crate) fn list_checksum(entries: impl Iterator<Item = Entry>, patterns: &[Pattern]) -> String {
    checksum_of_lines(
        entries.map(|entry| {
            let line = CanonicalEntry::from(&entry);
            serde_json::to_vec(&line)
        }),
        patterns,
    )
}

/// [`list_checksum`] over entries already written as canonical JSON lines (without the
/// newline).
fn checksum_of_lines(
    lines: impl Iterator<Item = serde_json::Result<Vec<u8>>>,
    patterns: &[Pattern],
) -> String {
    let mut h = Sha256::new();
    for line in lines.flatten() {
        h.update(&line);
        h.update(b"\n");
    }
    let mut sorted: Vec<&Pattern> = patterns.iter().collect();
    sorted.sort_by(|a, b| (a.kind, &a.pattern).cmp(&(b.kind, &b.pattern)));
    for p in sorted {
        if let Ok(line) = serde_json::to_vec(p) {
            h.update(&line);
            h.update(b"\n");
        }
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Past this many changes in one batch, the transient memory of the batch is handed back.
const LARGE_BATCH: usize = 10_000;

/// Names the holder of each refused name's key that `place_new` left unnamed (a rare path: a
/// scan of the list).
fn name_the_others(
    hasher: &DomainHasher,
    state: &State,
    upserts: &Batch,
    refused: &mut [KeyClash],
) {
    for clash in refused.iter_mut().filter(|c| c.other.is_empty()) {
        let hash = hasher.hash(&clash.name);
        clash.other = state
            .entries
            .iter()
            .map(|(d, _)| d)
            .chain(upserts.iter().map(|e| e.domain()))
            .find(|d| *d != clash.name && hasher.hash(d) == hash)
            .map_or_else(|| "a listed domain".to_string(), str::to_string);
    }
}

/// Returns freed heap to the system. A million-entry import or load briefly holds the parsed
/// entries next to the compact list (and the API a full list's bodies until the next version);
/// without this the process would keep that peak resident.
fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Entries added or modified, and domains removed, since a version.
pub type Delta = (Vec<Entry>, Vec<String>);

/// The changes since a version with the list's state they lead to, read at one moment (what a
/// delta reply carries).
pub struct DeltaSince {
    pub version: u64,
    pub checksum: String,
    pub patterns: Vec<Pattern>,
    /// Added or modified, by domain.
    pub entries: Vec<Entry>,
    /// Removed, sorted.
    pub removed: Vec<String>,
}

/// The whole list held still (a read lock) while it is written out: version, checksum,
/// patterns and every entry, consistent with each other. Writers wait until it is dropped;
/// the resolver does not (it reads the engine, not the list).
pub struct FullList<'a> {
    state: std::sync::RwLockReadGuard<'a, State>,
    checksum: String,
}

impl FullList<'_> {
    pub fn version(&self) -> u64 {
        self.state.version
    }

    pub fn checksum(&self) -> &str {
        &self.checksum
    }

    pub fn patterns(&self) -> &[Pattern] {
        &self.state.patterns
    }

    pub fn len(&self) -> usize {
        self.state.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.state.entries.is_empty()
    }

    /// Every entry in domain order, serialised as a sequence of canonical entries straight
    /// from the table (nothing is built per entry).
    pub fn entries(&self) -> FullListEntries<'_> {
        FullListEntries(&self.state)
    }
}

/// See [`FullList::entries`].
pub struct FullListEntries<'a>(&'a State);

impl Serialize for FullListEntries<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let state = self.0;
        serializer.collect_seq(
            state
                .entries
                .iter()
                .map(|(domain, listed)| state.listed_json(domain, listed)),
        )
    }
}

/// What a change did.
#[derive(Debug, Default)]
pub struct Applied {
    pub version: u64,
    pub changed: usize,
    /// New names left out: another name holds their key (in the list, or in the kernel set).
    pub refused: Vec<KeyClash>,
}

impl Blocklist {
    /// Opens the list in `state_dir`; `brands` feed lookalike detection (none = off).
    pub fn open(
        state_dir: &Path,
        threshold: f64,
        brands: &[String],
        datapath: Option<Arc<Datapath>>,
    ) -> Result<Self, BlocklistError> {
        let path = state_dir.join("blocklist.db");
        let open = || BlocklistStore::open(&path).and_then(|s| s.load().map(|l| (s, l)));
        let (store, loaded) = match open() {
            // A damaged database is set aside (with its WAL) rather than keeping the daemon,
            // and the VPN with it, from starting; the list starts empty and says so.
            Err(e) if e.is_corrupt_store() => {
                let moved = crate::store::set_aside(&path)?;
                for suffix in ["-wal", "-shm"] {
                    let mut side = path.clone().into_os_string();
                    side.push(suffix);
                    let side = std::path::PathBuf::from(side);
                    if side.exists() {
                        crate::store::set_aside(&side)?;
                    }
                }
                tracing::error!(
                    module = "blocklist",
                    file = %path.display(),
                    moved_to = %moved.display(),
                    error = %e,
                    "the blocklist database is damaged: moved aside, the list starts empty"
                );
                open()?
            }
            other => other?,
        };
        // The kernel set's hash when there is a datapath (one key for both), else the same
        // seed from the state directory.
        let hasher = match &datapath {
            Some(dp) => dp.domains.hasher(),
            None => Arc::new(DomainHasher::load_or_create(state_dir)?.0),
        };
        let mut matcher = Matcher::new(
            std::iter::empty(),
            &loaded.patterns,
            Lookalikes::new(brands.iter().map(String::as_str)),
            hasher,
        );
        let mut state = State {
            entries: DomainTable::default(),
            reasons: Vec::new(),
            reason_index: HashMap::new(),
            patterns: loaded.patterns,
            version: loaded.version,
        };
        state.insert(&loaded.entries, &mut matcher);
        state.entries.shrink_to_fit();
        drop(loaded.entries);
        release_free_memory();
        let list = Self {
            store,
            state: RwLock::new(state),
            matcher: RwLock::new(matcher),
            checksum: Mutex::new(None),
            threshold,
            datapath,
            syncer: sync::Syncer::open(state_dir)?,
            publisher: publisher::Publisher::load_or_create(state_dir)?,
            generation: AtomicU64::new(1),
            configured_brands: Mutex::new(brands.to_vec()),
            versions: watch::Sender::new(loaded.version),
        };
        list.sync_kernel_full();
        info!(
            entries = list.len(),
            version = loaded.version,
            "blocklist loaded"
        );
        let repaired = list.added_at_to_seconds()?;
        if repaired > 0 {
            info!(
                entries = repaired,
                version = list.version(),
                "blocklist: addedAt of synced entries set from milliseconds to seconds"
            );
        }
        Ok(list)
    }

    /// Entries whose `addedAt` a sync stored in milliseconds (before it counted seconds, as
    /// every other entry does) set back to seconds, in one new version, so that a client
    /// following deltas gets them too. Returns how many.
    fn added_at_to_seconds(&self) -> Result<usize, BlocklistError> {
        let fixed: Vec<Entry> = {
            let state = self.read();
            state
                .entries
                .iter()
                .filter(|(_, l)| l.added_at >= ADDED_AT_MILLISECONDS_FROM)
                .map(|(d, l)| {
                    let mut e = state.entry(d, &l);
                    e.added_at /= 1000;
                    e
                })
                .collect()
        };
        if fixed.is_empty() {
            return Ok(0);
        }
        Ok(self.apply(fixed, Vec::new())?.changed)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        match self.state.read() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        match self.state.write() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    fn engine(&self) -> std::sync::RwLockReadGuard<'_, Matcher> {
        match self.matcher.read() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        }
    }

    fn engine_mut(&self) -> std::sync::RwLockWriteGuard<'_, Matcher> {
        match self.matcher.write() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        }
    }

    /// The engine's generation (see the field).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The committed version, without the list's lock (published under it by every
    /// change): the API's handlers ask on the runtime's threads, where waiting behind a writer
    /// that waits behind a long read (a full list being written out) would stall them.
    pub fn version(&self) -> u64 {
        *self.versions.borrow()
    }

    /// The checksum of the current version (computed once per version).
    pub fn checksum(&self) -> String {
        let state = self.read();
        self.checksum_of(&state)
    }

    /// The checksum of `state`, from the cache when it is of this version.
    fn checksum_of(&self, state: &State) -> String {
        let mut cached = match self.checksum.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if let Some((v, sum)) = &*cached
            && *v == state.version
        {
            return sum.clone();
        }
        let sum = checksum_of_lines(
            state
                .entries
                .iter()
                .map(|(d, l)| serde_json::to_vec(&state.listed_json(d, l))),
            &state.patterns,
        );
        *cached = Some((state.version, sum.clone()));
        sum
    }

    /// The whole list, held still while the caller writes it out (see [`FullList`]).
    pub fn full_list(&self) -> FullList<'_> {
        let state = self.read();
        let checksum = self.checksum_of(&state);
        FullList { state, checksum }
    }

    /// The version now and every later one, as each change commits.
    pub fn watch_version(&self) -> watch::Receiver<u64> {
        self.versions.subscribe()
    }

    /// Records a committed version (under the list's write lock).
    fn set_version(&self, state: &mut State, version: u64) {
        state.version = version;
        self.bump();
        self.versions.send_replace(version);
    }

    pub fn patterns(&self) -> Vec<Pattern> {
        self.read().patterns.clone()
    }

    /// Applies what `[blocklist]` may change while running (SIGHUP): the sources and their
    /// schedule, and the lookalike brands (the engine is rebuilt only when they differ).
    pub fn apply_live(&self, config: &BlocklistConfig) {
        self.syncer.set_schedule(sync::Schedule {
            sources: config.sources.clone(),
            interval_seconds: config.sync_interval_seconds,
        });
        let brands = config.lookalike_brands();
        let mut configured = match self.configured_brands.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        if *configured != brands {
            self.set_lookalike_brands(&brands);
            *configured = brands;
        }
    }

    /// Starts the blocklist's background work: the configured sources synced at start and every
    /// `sync_interval_seconds` (read again each round: SIGHUP may change them).
    pub fn start_tasks(self: &Arc<Self>, shutdown: &Shutdown) -> Vec<JoinHandle<()>> {
        let list = Arc::clone(self);
        let mut shutdown = shutdown.clone();
        vec![tokio::spawn(async move {
            loop {
                let schedule = list.syncer.schedule();
                if schedule.interval_seconds != 0 && !schedule.sources.is_empty() {
                    let list = Arc::clone(&list);
                    let sources = schedule.sources.clone();
                    let _ =
                        tokio::task::spawn_blocking(move || list.syncer.sync_all(&list, &sources))
                            .await;
                }
                // With 0 (on demand only) look again in a minute.
                let wait = match schedule.interval_seconds {
                    0 => Duration::from_secs(60),
                    s => Duration::from_secs(s),
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return,
                }
            }
        })]
    }

    /// Replaces the brands of lookalike detection (a reload).
    pub fn set_lookalike_brands(&self, brands: &[String]) {
        self.engine_mut()
            .set_lookalikes(Lookalikes::new(brands.iter().map(String::as_str)));
        self.bump();
    }

    /// The brands lookalike detection compares against.
    pub fn brands(&self) -> Vec<String> {
        self.engine()
            .lookalikes()
            .brands()
            .map(str::to_string)
            .collect()
    }

    pub fn get(&self, domain: &str) -> Option<Entry> {
        let state = self.read();
        state.entries.get(domain).map(|l| state.entry(domain, &l))
    }

    /// One page of entries by domain, with the total matching `search`.
    pub fn page(&self, offset: usize, limit: usize, search: Option<&str>) -> (Vec<Entry>, usize) {
        let state = self.read();
        let matching = || {
            state
                .entries
                .iter()
                .filter(|(d, _)| search.is_none_or(|s| d.contains(s)))
        };
        let total = match search {
            None => state.entries.len(),
            Some(_) => matching().count(),
        };
        let page = matching()
            .skip(offset)
            .take(limit)
            .map(|(d, l)| state.entry(d, &l))
            .collect();
        (page, total)
    }

    pub fn verify(&self, name: &str) -> Verdict {
        self.engine().check(name, self.threshold)
    }

    /// The resolver's question: blocked or not, with no report built.
    pub fn is_blocked(&self, name: &str) -> bool {
        self.engine().is_blocked(name, self.threshold)
    }

    /// Adds or replaces entries (one new version for the batch).
    pub fn upsert(&self, entries: Vec<Entry>) -> Result<Applied, BlocklistError> {
        self.apply(entries, Vec::new())
    }

    /// [`Blocklist::upsert`] of a compact batch (an import's).
    pub fn upsert_batch(&self, entries: Batch) -> Result<Applied, BlocklistError> {
        self.apply_batch(entries, Vec::new())
    }

    /// Adds or replaces `upserts` and removes `removals` (listed ones) in one version. A new
    /// name whose key another name holds (listed, earlier in the batch, or in the kernel set)
    /// is left out and returned in `refused`.
    pub fn apply(
        &self,
        upserts: Vec<Entry>,
        removals: Vec<String>,
    ) -> Result<Applied, BlocklistError> {
        self.apply_batch(upserts.into_iter().collect(), removals)
    }

    /// [`Blocklist::apply`] of a compact batch.
    pub fn apply_batch(
        &self,
        mut upserts: Batch,
        removals: Vec<String>,
    ) -> Result<Applied, BlocklistError> {
        let mut state = self.write();
        let listed = {
            let names: Vec<&str> = removals.iter().map(String::as_str).collect();
            state.entries.contains_many(&names)
        };
        let removals: Vec<String> = removals
            .into_iter()
            .zip(listed)
            .filter_map(|(d, listed)| listed.then_some(d))
            .collect();
        let (refused, mut keys) = self.place_new(&state, &mut upserts);
        for clash in &refused {
            warn!(domain = %clash.name, other = %clash.other, "blocklist entry refused: its key is taken");
        }
        if upserts.is_empty() && removals.is_empty() {
            return Ok(Applied {
                version: state.version,
                changed: 0,
                refused,
            });
        }
        let version = now_ms().max(state.version + 1);
        // In domain order from here: the store's index and the table's merge take the names
        // in sequence (the sort is stable: the last of a name's duplicates still wins).
        if upserts.len() >= LARGE_BATCH {
            match keys.as_mut() {
                Some(keys) => upserts.sort_by_domain_with(keys),
                None => upserts.sort_by_domain(),
            }
        }
        let large = upserts.len() + removals.len() > LARGE_BATCH;
        // A large batch's kernel rules are written on a thread of their own while the store
        // commits (the commit is SQLite's, on one CPU): if the commit fails, the kernel set is
        // put back as it was. A crash in between is mended at the next start, when the kernel
        // set is rebuilt from the store.
        let (committed, kernel) = match &self.datapath {
            Some(dp) if large => std::thread::scope(|scope| {
                let kernel =
                    scope.spawn(|| self.sync_kernel(dp, &upserts, keys.as_deref(), &removals));
                let committed = crate::faults::fail_point("blocklist.large_commit")
                    .map_err(|f| BlocklistError::Daemon(f.into()))
                    .and_then(|()| self.store.commit_batch(version, &upserts, &removals));
                let kernel = kernel.join().unwrap_or_else(|_| {
                    warn!("the kernel domain set's update failed");
                    None
                });
                (committed, kernel)
            }),
            _ => (self.store.commit_batch(version, &upserts, &removals), None),
        };
        if let Err(e) = committed {
            self.unplace(&state, &upserts);
            if let (Some(dp), Some(undo)) = (&self.datapath, kernel)
                && let Err(e) = dp.domains.undo(undo)
            {
                warn!(error = %e, "cannot put the kernel domain set back after a failed commit");
            }
            return Err(e);
        }
        {
            let mut matcher = self.engine_mut();
            state.insert(&upserts, &mut matcher);
            for d in &removals {
                matcher.remove(d);
            }
        }
        state.entries.remove(&removals);
        self.set_version(&mut state, version);
        drop(state);
        if let Some(dp) = &self.datapath
            && !large
        {
            self.sync_kernel(dp, &upserts, None, &removals);
        }
        let changed = upserts.len() + removals.len();
        drop(upserts);
        if large {
            release_free_memory();
        }
        Ok(Applied {
            version,
            changed,
            refused,
        })
    }

    /// Gives every new name of `upserts` its place in the matcher now (an update of a listed
    /// name keeps its own) and takes out of `upserts`, in place, the new names whose key
    /// another name holds: a listed one, one earlier in the batch (the matcher itself is the
    /// check, so a million-name import needs no second table), or, for an entry that would be
    /// a kernel rule, an operator's kernel rule. Returns those clashes and, for a large batch
    /// with the datapath on, each kept entry's key (in the entries' order), computed once here
    /// for the operators' check, the matcher and the kernel set alike. If the commit then
    /// fails, `unplace` takes the new names out again.
    fn place_new(
        &self,
        state: &State,
        upserts: &mut Batch,
    ) -> (Vec<KeyClash>, Option<Vec<RuleKey>>) {
        // Into an empty list every name is new (the first import): nothing to look up.
        let listed = if state.entries.is_empty() {
            vec![false; upserts.len()]
        } else {
            let names: Vec<&str> = upserts.iter().map(|e| e.domain()).collect();
            state.entries.contains_many(&names)
        };
        let mut matcher = self.engine_mut();
        let hasher = Arc::clone(matcher.hasher());
        let mut refused = Vec::new();
        if upserts.len() < LARGE_BATCH {
            self.place_one_by_one(&mut matcher, upserts, listed, &mut refused);
            drop(matcher);
            name_the_others(&hasher, state, upserts, &mut refused);
            return (refused, None);
        }
        // A large batch: first out, the new names an operator's kernel rule for another name
        // refuses (that depends on the kernel set alone, not on the batch's other names; a
        // listed name's kernel rule is in the matcher too, which refuses and names it below);
        // then the rest placed at once, with the same outcome and message per name as one
        // after the other.
        let mut listed = listed;
        let mut keys = None;
        if let Some(dp) = &self.datapath {
            match dp.domains.clash_check() {
                Ok(kernel) => {
                    let mut kept = Vec::with_capacity(listed.len());
                    let mut kept_keys = Vec::with_capacity(listed.len());
                    let mut was_listed = listed.into_iter();
                    upserts.retain(|domain, (exact, sub), _| {
                        let is_listed = was_listed.next().unwrap_or(false);
                        let key = matcher.key(domain);
                        let clash = (!is_listed && self.kernel_flags(exact, sub).is_some())
                            .then(|| kernel.operator_clash(domain, key.hash(), key.tag()))
                            .flatten();
                        match clash {
                            Some(clash) => {
                                refused.push(clash);
                                false
                            }
                            None => {
                                kept.push(is_listed);
                                kept_keys.push(key);
                                true
                            }
                        }
                    });
                    listed = kept;
                    keys = Some(kept_keys);
                }
                Err(e) => {
                    // The set's lock is poisoned: no kernel rule can be written either; the
                    // names go to the resolver's matcher alone, as when the sync fails.
                    warn!(error = %e, "cannot check a batch against the kernel domain set");
                }
            }
        }
        let mut placed_new = match &keys {
            Some(keys) => matcher.upsert_many_keyed(
                upserts
                    .iter()
                    .zip(keys)
                    .zip(&listed)
                    .filter(|(_, listed)| !**listed)
                    .map(|((e, key), _)| (*key, e.weights().0, e.weights().1)),
            ),
            None => matcher.upsert_many(
                upserts
                    .iter()
                    .zip(&listed)
                    .filter(|(_, listed)| !**listed)
                    .map(|(e, _)| (e.domain(), e.weights().0, e.weights().1)),
            ),
        }
        .into_iter();
        let mut listed = listed.into_iter();
        let mut kept = Vec::with_capacity(upserts.len());
        upserts.retain(|domain, _, placed| {
            let keep = if listed.next().unwrap_or(false) {
                true
            } else {
                *placed = placed_new.next().unwrap_or(false);
                if !*placed {
                    refused.push(KeyClash {
                        name: domain.to_string(),
                        other: String::new(),
                    });
                }
                *placed
            };
            kept.push(keep);
            keep
        });
        drop(matcher);
        // The keys follow their entries.
        if let Some(keys) = keys.as_mut() {
            let mut kept = kept.into_iter();
            keys.retain(|_| kept.next().unwrap_or(false));
        }
        name_the_others(&hasher, state, upserts, &mut refused);
        (refused, keys)
    }

    /// [`Blocklist::place_new`] name after name: each new name checked against the matcher and,
    /// when it would be a kernel rule, the kernel set, then placed.
    fn place_one_by_one(
        &self,
        matcher: &mut Matcher,
        upserts: &mut Batch,
        listed: Vec<bool>,
        refused: &mut Vec<KeyClash>,
    ) {
        matcher.reserve(listed.iter().filter(|l| !**l).count());
        let mut listed = listed.into_iter();
        // The kernel set is held still for the whole batch: one lock, not one per name.
        let kernel = self.datapath.as_ref().map(|dp| dp.domains.clash_check());
        upserts.retain(|domain, (exact, sub), placed| {
            // `retain` visits the entries in order, once each.
            if listed.next().unwrap_or(false) {
                return true;
            }
            // The name's key and tag, computed once for the check and the insert.
            let key = matcher.key(domain);
            if matcher.clashes_key(key) {
                refused.push(KeyClash {
                    name: domain.to_string(),
                    other: String::new(),
                });
                return false;
            }
            // The matcher's key is the kernel set's: both use the installation's hash.
            if self.kernel_flags(exact, sub).is_some()
                && let Some(Ok(kernel)) = &kernel
                && let Some(clash) = kernel.clash(domain, key.hash(), key.tag())
            {
                refused.push(clash);
                return false;
            }
            *placed = matcher.upsert_key(key, exact, sub);
            *placed
        });
    }

    /// Takes the names `place_new` put in the matcher out again (the commit failed).
    fn unplace(&self, state: &State, upserts: &Batch) {
        let mut matcher = self.engine_mut();
        for e in upserts.iter() {
            if !state.entries.contains(e.domain()) {
                matcher.remove(e.domain());
            }
        }
    }

    /// Removes a domain; `Ok(None)` when it is not listed.
    pub fn remove(&self, domain: &str) -> Result<Option<Applied>, BlocklistError> {
        if !self.read().entries.contains(domain) {
            return Ok(None);
        }
        let applied = self.apply(Vec::new(), vec![domain.to_string()])?;
        Ok((applied.changed > 0).then_some(applied))
    }

    /// Domains whose reason is `reason` (a sync source's entries).
    pub fn domains_with_reason(&self, reason: &str) -> Vec<String> {
        let state = self.read();
        let Some(&index) = state.reason_index.get(reason) else {
            return Vec::new();
        };
        state
            .entries
            .iter()
            .filter(|(_, l)| l.reason == index)
            .map(|(d, _)| d.to_string())
            .collect()
    }

    /// Adds or reweights a `contains` or `regex` pattern.
    pub fn add_pattern(&self, pattern: Pattern) -> Result<Applied, BlocklistError> {
        let mut state = self.write();
        let version = now_ms().max(state.version + 1);
        self.store
            .commit(version, &[Change::AddPattern(&pattern)])?;
        state
            .patterns
            .retain(|p| !(p.pattern == pattern.pattern && p.kind == pattern.kind));
        state.patterns.push(pattern);
        let patterns = state.patterns.clone();
        self.engine_mut().set_patterns(&patterns);
        self.set_version(&mut state, version);
        Ok(Applied {
            version,
            changed: 1,
            refused: Vec::new(),
        })
    }

    pub fn remove_pattern(
        &self,
        pattern: &str,
        kind: PatternType,
    ) -> Result<Option<Applied>, BlocklistError> {
        let mut state = self.write();
        if !state
            .patterns
            .iter()
            .any(|p| p.pattern == pattern && p.kind == kind)
        {
            return Ok(None);
        }
        let version = now_ms().max(state.version + 1);
        self.store
            .commit(version, &[Change::RemovePattern(pattern, kind)])?;
        state
            .patterns
            .retain(|p| !(p.pattern == pattern && p.kind == kind));
        let patterns = state.patterns.clone();
        self.engine_mut().set_patterns(&patterns);
        self.set_version(&mut state, version);
        Ok(Some(Applied {
            version,
            changed: 1,
            refused: Vec::new(),
        }))
    }

    /// The kernel's rule for an entry: exact/subdomain rules at or above the threshold.
    fn kernel_flags(&self, exact: f64, sub: f64) -> Option<bool> {
        if sub >= self.threshold {
            Some(true)
        } else if exact >= self.threshold {
            Some(false)
        } else {
            None
        }
    }

    /// Brings the kernel set in line with a committed (or committing) batch: its entries at
    /// or above the threshold in, the rest and `removals` out. Returns how to put the set back.
    /// `keys`, when given, holds each entry's key in the entries' order (`place_new` computed
    /// them with the same hasher), so no entry is hashed again here.
    fn sync_kernel(
        &self,
        dp: &Datapath,
        upserts: &Batch,
        keys: Option<&[RuleKey]>,
        removals: &[String],
    ) -> Option<DomainSetUndo> {
        let hasher = dp.domains.hasher();
        let key_of = |name| NameKey::new(&hasher, name);
        let mut rules: Vec<(NameKey<'_>, bool)> = Vec::with_capacity(upserts.len());
        let mut gone: Vec<NameKey<'_>> = Vec::new();
        let mut keys = keys.filter(|k| k.len() == upserts.len()).map(|k| k.iter());
        for e in upserts.iter() {
            let key = match keys.as_mut().and_then(Iterator::next) {
                Some(key) => NameKey {
                    name: e.domain(),
                    hash: key.hash(),
                    tag: key.tag(),
                },
                None => key_of(e.domain()),
            };
            let (exact, sub) = e.weights();
            match self.kernel_flags(exact, sub) {
                Some(subdomains) => rules.push((key, subdomains)),
                None => gone.push(key),
            }
        }
        gone.extend(removals.iter().map(|d| key_of(d)));
        match dp.domains.update_keyed(
            Owner::Blocklist,
            rules.iter().copied(),
            gone.iter().copied(),
        ) {
            Ok((report, undo)) => {
                for clash in report.refused {
                    warn!(domain = %clash.name, other = %clash.other, "not in the kernel set: its key is taken");
                }
                Some(undo)
            }
            Err(e) => {
                warn!(error = %e, "cannot update the kernel domain set");
                None
            }
        }
    }

    fn sync_kernel_full(&self) {
        if let Some(dp) = &self.datapath {
            // The names are borrowed from the list (read-locked for the call): a copy of each
            // would be a million small allocations at a start, freed right after.
            let state = self.read();
            let rules: Vec<(&str, bool)> = state
                .entries
                .iter()
                .filter_map(|(d, l)| {
                    let (exact, sub) = l.weights();
                    self.kernel_flags(exact, sub).map(|s| (d, s))
                })
                .collect();
            let result = dp.domains.replace(Owner::Blocklist, &rules);
            drop(rules);
            drop(state);
            // The kernel set's transient memory (the keys touched, the old rules) goes back.
            release_free_memory();
            match result {
                Ok(r) => {
                    for clash in &r.refused {
                        warn!(domain = %clash.name, other = %clash.other, "not in the kernel set: its key is taken");
                    }
                    info!(
                        written = r.written,
                        deleted = r.deleted,
                        total = r.total,
                        refused = r.refused.len(),
                        "kernel domain set synced"
                    )
                }
                Err(e) => warn!(error = %e, "cannot sync the kernel domain set"),
            }
        }
    }

    /// Everything: entries by domain.
    pub fn entries(&self) -> Vec<Entry> {
        let state = self.read();
        state
            .entries
            .iter()
            .map(|(d, l)| state.entry(d, &l))
            .collect()
    }

    /// The changes after `since`: (entries added or modified, domains removed). `None` when
    /// `since` cannot be answered with a delta (newer than the list, or older than the
    /// journal).
    pub fn delta(&self, since: u64) -> Result<Option<Delta>, BlocklistError> {
        let state = self.read();
        self.delta_of(&state, since)
    }

    /// [`Blocklist::delta`] with the version, checksum and patterns it leads to, all read
    /// under one lock.
    pub fn delta_since(&self, since: u64) -> Result<Option<DeltaSince>, BlocklistError> {
        let state = self.read();
        let Some((entries, removed)) = self.delta_of(&state, since)? else {
            return Ok(None);
        };
        Ok(Some(DeltaSince {
            version: state.version,
            checksum: self.checksum_of(&state),
            patterns: state.patterns.clone(),
            entries,
            removed,
        }))
    }

    fn delta_of(&self, state: &State, since: u64) -> Result<Option<Delta>, BlocklistError> {
        if since > state.version {
            return Ok(None);
        }
        let Some(domains) = self.store.changed_since(since)? else {
            return Ok(None);
        };
        let mut upserts = Vec::new();
        let mut removed = Vec::new();
        for d in domains {
            match state.entries.get(&d) {
                Some(l) => upserts.push(state.entry(&d, &l)),
                None => removed.push(d),
            }
        }
        upserts.sort_by(|a, b| a.domain.cmp(&b.domain));
        removed.sort();
        Ok(Some((upserts, removed)))
    }

    /// Kernel rules that come from the blocklist.
    pub fn kernel_rules(&self) -> usize {
        self.read()
            .entries
            .iter()
            .filter(|(_, l)| {
                let (exact, sub) = l.weights();
                self.kernel_flags(exact, sub).is_some()
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The compact batch of an import lists, stores and sums exactly what the same list's
    /// `Entry`s do (the checksum from the entries themselves), before and after a restart.
    #[test]
    fn an_import_batch_lists_what_its_entries_list() {
        // Past LARGE_BATCH (sorted, merged), with names twice and lines that do not parse.
        let text: String = (0..LARGE_BATCH + 2_000)
            .map(|i| i % LARGE_BATCH)
            .map(|i| format!("Casino{i}.bet{}.example\n", i % 7))
            .chain(["not a name\n".to_string(), "co.uk\n".to_string()])
            .collect();
        let now = 1_700_000_000;
        let parsed = import::parse(&text, import::Format::Plain, "imported", now);
        assert_eq!(parsed.skipped.len(), 2);
        let mut expected = std::collections::BTreeMap::new();
        for e in &parsed.entries {
            expected.insert(e.domain.clone(), e.clone());
        }
        let expected: Vec<Entry> = expected.into_values().collect();
        let sum = list_checksum(expected.iter().cloned(), &[]);

        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let by_entries = Blocklist::open(dirs[0].path(), 0.5, &[], None).unwrap();
        by_entries.upsert(parsed.entries).unwrap();
        let by_batch = Blocklist::open(dirs[1].path(), 0.5, &[], None).unwrap();
        let batch = import::parse_batch(&text, import::Format::Plain, "imported", now);
        assert_eq!(batch.entries.len(), LARGE_BATCH + 2_000);
        let applied = by_batch.upsert_batch(batch.entries).unwrap();
        assert!(applied.refused.is_empty());
        assert_eq!(by_batch.entries(), expected);
        assert_eq!(by_batch.checksum(), sum);
        assert_eq!(by_entries.checksum(), sum);
        assert!(by_batch.is_blocked("www.casino7.bet0.example"));
        let version = by_batch.version();
        drop(by_batch);
        let reopened = Blocklist::open(dirs[1].path(), 0.5, &[], None).unwrap();
        assert_eq!(reopened.version(), version);
        assert_eq!(reopened.checksum(), sum);
        assert_eq!(reopened.entries(), expected);
        assert!(reopened.is_blocked("casino9999.bet3.example"));
        // The same list again: every name listed, nothing new.
        let again = import::parse_batch(&text, import::Format::Plain, "imported", now);
        reopened.upsert_batch(again.entries).unwrap();
        assert_eq!(reopened.checksum(), sum);
        assert_eq!(reopened.len(), LARGE_BATCH);
    }

    #[test]
    fn added_at_stored_in_milliseconds_is_set_to_seconds_in_a_new_version() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = {
            let list = Blocklist::open(dir.path(), 0.5, &[], None).unwrap();
            let ms = Entry::new("synced-bet.example", true, 1.0, "sync", 1_700_000_000_123);
            let secs = Entry::new("added-bet.example", true, 1.0, "operator", 1_700_000_000);
            list.apply(vec![ms, secs], Vec::new()).unwrap();
            // Added again: the store keeps the new addedAt, as the list in memory does.
            let again = Entry::new("added-bet.example", true, 1.0, "operator", 1_700_000_100);
            list.apply(vec![again], Vec::new()).unwrap().version
        };
        let list = Blocklist::open(dir.path(), 0.5, &[], None).unwrap();
        assert_eq!(
            list.get("synced-bet.example").unwrap().added_at,
            1_700_000_000
        );
        assert_eq!(
            list.get("added-bet.example").unwrap().added_at,
            1_700_000_100
        );
        assert!(list.version() > v1);
        // A client at the old version gets the repaired entry as a change, and only it.
        let (entries, removed) = list.delta(v1).unwrap().unwrap();
        assert_eq!(
            entries
                .iter()
                .map(|e| e.domain.as_str())
                .collect::<Vec<_>>(),
            vec!["synced-bet.example"]
        );
        assert!(removed.is_empty());
        // Once repaired, a later open changes nothing.
        let v2 = list.version();
        drop(list);
        assert_eq!(
            Blocklist::open(dir.path(), 0.5, &[], None)
                .unwrap()
                .version(),
            v2
        );
    }
}

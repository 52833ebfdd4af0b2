//! The blocklist on disk: SQLite in the state directory. Every change commits the entries, the
//! new version and its journal rows in one transaction.
//!
//! The journal keeps, for each version and kind of change (`upsert`, `remove`, `pattern`), the
//! names it touched, one per line, up to 64 KiB a row: a million-name import is a few hundred
//! rows, not a million rows and a million index entries (docs/blocklist.md, "On disk"). Names
//! never hold a line break (they are normalised hostnames); pattern changes, which no delta
//! reads, are journalled as `pattern:<text>` lines.

use std::{
    collections::HashSet,
    fmt::Write as _,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    BlocklistError,
    batch::{self, Batch, BatchEntry, Patterns},
    model::{Entry, Pattern, PatternType},
};
use crate::error::Error;

/// One change in the journal.
pub enum Change<'a> {
    Upsert(&'a Entry),
    Remove(&'a str),
    AddPattern(&'a Pattern),
    RemovePattern(&'a str, PatternType),
}

/// Changes from which a commit gets the larger page cache.
const LARGE_COMMIT: usize = 10_000;
/// Page cache sizes in KiB (negative: SQLite's unit for a size in KiB): a large commit's, and
/// SQLite's default.
const LARGE_COMMIT_CACHE_KIB: i64 = -65_536;
const DEFAULT_CACHE_KIB: i64 = -2_000;
/// SQLite's default: a commit that leaves the WAL at this many pages or more checkpoints it.
const WAL_AUTOCHECKPOINT: i64 = 1_000;

pub struct BlocklistStore {
    conn: Mutex<Connection>,
    path: std::path::PathBuf,
    /// A checkpoint of a large commit is copying the WAL into the database file.
    checkpointing: Arc<AtomicBool>,
}

pub struct Loaded {
    /// In the table's order.
    pub entries: Batch,
    pub patterns: Vec<Pattern>,
    pub version: u64,
}

impl BlocklistStore {
    pub fn open(path: &Path) -> Result<Self, BlocklistError> {
        let conn = crate::store::open_sqlite(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS entries (domain TEXT PRIMARY KEY, patterns TEXT NOT NULL, added_at INTEGER NOT NULL, reason TEXT NOT NULL) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS patterns (pattern TEXT NOT NULL, kind TEXT NOT NULL, weight REAL NOT NULL, PRIMARY KEY (pattern, kind));
             CREATE TABLE IF NOT EXISTS journal_batch (version INTEGER NOT NULL, op TEXT NOT NULL, names TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS journal_batch_version ON journal_batch (version);
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        )
        .map_err(BlocklistError::Store)?;
        migrate_journal(&conn)?;
        migrate_entries_by_domain(&conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
            checkpointing: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Copies the WAL into the database file on a thread of its own, with a connection of its
    /// own: a large commit is durable once its WAL frames are synced, and the copy (about a
    /// fifth of a million-name import) need not hold up the reply. A passive checkpoint waits
    /// for no one; what it cannot copy now, the next checkpoint does. One at a time.
    fn checkpoint_in_background(&self) {
        if self.checkpointing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (path, running) = (self.path.clone(), Arc::clone(&self.checkpointing));
        let spawned = std::thread::Builder::new()
            .name("blocklist-checkpoint".into())
            .spawn(move || {
                let done = crate::store::open_sqlite(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|conn| {
                        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                            .map_err(|e| e.to_string())
                    });
                if let Err(e) = done {
                    // The WAL stays until the next checkpoint (SQLite's own, at 1,000 pages).
                    tracing::warn!(error = %e, "blocklist store: background checkpoint failed");
                }
                running.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.checkpointing.store(false, Ordering::Release);
        }
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, BlocklistError> {
        self.conn
            .lock()
            .map_err(|_| Error::LockPoisoned("blocklist store").into())
    }

    pub fn load(&self) -> Result<Loaded, BlocklistError> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare("SELECT domain, patterns, added_at, reason FROM entries")
            .map_err(BlocklistError::Store)?;
        let mut rows = stmt.query([]).map_err(BlocklistError::Store)?;
        // Read in place into the compact batch: no `Entry`, no pattern strings per row.
        let mut entries = Batch::default();
        while let Some(r) = rows.next().map_err(BlocklistError::Store)? {
            let (domain, column, reason) = (text(r, 0)?, text(r, 1)?, text(r, 3)?);
            let added_at: i64 = r.get(2).map_err(BlocklistError::Store)?;
            let stamp = entries.stamp(added_at as u64, reason);
            match read_weights(domain, column)? {
                Some((exact, sub)) => entries.push_weights(domain, exact, sub, stamp),
                None => entries.push_patterns(
                    domain,
                    serde_json::from_str(column).map_err(BlocklistError::StoreJson)?,
                    stamp,
                ),
            }
        }
        drop(rows);
        let mut stmt = conn
            .prepare("SELECT pattern, kind, weight FROM patterns ORDER BY kind, pattern")
            .map_err(BlocklistError::Store)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, f64>(2)?,
                ))
            })
            .map_err(BlocklistError::Store)?;
        let mut patterns = Vec::new();
        for row in rows {
            let (pattern, kind, weight) = row.map_err(BlocklistError::Store)?;
            if let Some(kind) = PatternType::parse(&kind) {
                patterns.push(Pattern {
                    pattern,
                    kind,
                    weight,
                });
            }
        }
        let version: i64 = conn
            .query_row(
                "SELECT COALESCE((SELECT value FROM meta WHERE key = 'version'), 0)",
                [],
                |r| r.get(0),
            )
            .map_err(BlocklistError::Store)?;
        Ok(Loaded {
            entries,
            patterns,
            version: version as u64,
        })
    }

    /// Domains changed after `version` (upserts and removes), or `None` when `version` is
    /// older than the journal (the caller then sends the full list).
    pub fn changed_since(&self, version: u64) -> Result<Option<Vec<String>>, BlocklistError> {
        let conn = self.conn()?;
        let oldest: Option<i64> = conn
            .query_row("SELECT MIN(version) FROM journal_batch", [], |r| r.get(0))
            .map_err(BlocklistError::Store)?;
        // The journal starts with the first change; a client that knows a version from
        // before it (or from another server) cannot be given a delta.
        if oldest.is_none_or(|o| (version as i64) < o - 1) {
            return Ok(None);
        }
        let mut stmt = conn
            .prepare_cached(
                "SELECT names FROM journal_batch WHERE version > ?1 AND op != 'pattern'",
            )
            .map_err(BlocklistError::Store)?;
        let mut rows = stmt
            .query([version as i64])
            .map_err(BlocklistError::Store)?;
        // Each name once, however many versions touched it (the caller sorts).
        let mut domains: HashSet<String> = HashSet::new();
        while let Some(row) = rows.next().map_err(BlocklistError::Store)? {
            let names = row.get_ref(0).map_err(BlocklistError::Store)?;
            let names = names
                .as_str()
                .map_err(|e| BlocklistError::Store(e.into()))?;
            for name in names.split('\n').filter(|n| !n.is_empty()) {
                if !domains.contains(name) {
                    domains.insert(name.to_owned());
                }
            }
        }
        Ok(Some(domains.into_iter().collect()))
    }

    /// Applies `changes` as version `version`, atomically. A large batch gets a larger page
    /// cache for its transaction (SQLite's 2 MiB would spill pages to the WAL before the
    /// commit, some of them more than once), handed back when it is done.
    pub fn commit(&self, version: u64, changes: &[Change<'_>]) -> Result<(), BlocklistError> {
        self.commit_with(version, &Batch::default(), changes)
    }

    /// Writes `upserts` (in their order) and removes `removals`, as version `version`,
    /// atomically: what [`BlocklistStore::commit`] of their changes in that order writes, the
    /// same rows and journal rows, without an `Entry` per name.
    pub fn commit_batch(
        &self,
        version: u64,
        upserts: &Batch,
        removals: &[String],
    ) -> Result<(), BlocklistError> {
        let removals: Vec<Change<'_>> = removals.iter().map(|d| Change::Remove(d)).collect();
        self.commit_with(version, upserts, &removals)
    }

    /// `upserts`, then `changes`.
    fn commit_with(
        &self,
        version: u64,
        upserts: &Batch,
        changes: &[Change<'_>],
    ) -> Result<(), BlocklistError> {
        let mut conn = self.conn()?;
        let large = upserts.len() + changes.len() >= LARGE_COMMIT;
        if large {
            // No automatic checkpoint at the commit's end: it runs after, in the background.
            conn.pragma_update(None, "cache_size", LARGE_COMMIT_CACHE_KIB)
                .and_then(|()| conn.pragma_update(None, "wal_autocheckpoint", 0))
                .map_err(BlocklistError::Store)?;
        }
        let wal = large.then(|| WalWriteback::start(&self.path));
        let committed = Self::commit_on(&mut conn, version, upserts, changes);
        drop(wal);
        if large {
            // The defaults again, and the pages back to the allocator.
            let reset = conn
                .pragma_update(None, "cache_size", DEFAULT_CACHE_KIB)
                .and_then(|()| conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT))
                .and_then(|()| conn.execute_batch("PRAGMA shrink_memory"));
            if let Err(e) = reset {
                tracing::warn!(error = %e, "blocklist store: cannot set the page cache and checkpoint back");
            }
            drop(conn);
            if committed.is_ok() {
                self.checkpoint_in_background();
            }
        }
        committed
    }

    fn commit_on(
        conn: &mut Connection,
        version: u64,
        upserts: &Batch,
        changes: &[Change<'_>],
    ) -> Result<(), BlocklistError> {
        let tx = conn.transaction().map_err(BlocklistError::Store)?;
        {
            let mut journal = JournalRows::new(
                version,
                tx.prepare_cached(
                    "INSERT INTO journal_batch (version, op, names) VALUES (?1, ?2, ?3)",
                )
                .map_err(BlocklistError::Store)?,
            );
            let mut one = tx
                .prepare_cached(&upsert_sql(1))
                .map_err(BlocklistError::Store)?;
            let mut columns = Columns::default();
            // Full runs of rows go in one statement each: SQLite's cost per statement run (its
            // cursors, its reset) is then paid once per run, not once per row.
            let mut many = None;
            let mut run = Vec::with_capacity(ROWS_PER_INSERT);
            let mut entries = upserts.iter();
            loop {
                run.clear();
                run.extend(entries.by_ref().take(ROWS_PER_INSERT));
                if run.is_empty() {
                    break;
                }
                if run.len() == ROWS_PER_INSERT {
                    let stmt = match &mut many {
                        Some(stmt) => stmt,
                        None => many.insert(
                            tx.prepare_cached(&upsert_sql(ROWS_PER_INSERT))
                                .map_err(BlocklistError::Store)?,
                        ),
                    };
                    for (i, e) in run.iter().enumerate() {
                        columns.bind(stmt, 4 * i, e)?;
                    }
                    stmt.raw_execute().map_err(BlocklistError::Store)?;
                } else {
                    for e in &run {
                        columns.bind(&mut one, 0, e)?;
                        one.raw_execute().map_err(BlocklistError::Store)?;
                    }
                }
                for e in &run {
                    journal.push(Op::Upsert, e.domain())?;
                }
            }
            for change in changes {
                match change {
                    Change::Upsert(e) => {
                        let patterns = patterns_column(e)?;
                        bind_row(&mut one, 0, (&e.domain, &patterns, e.added_at, &e.reason))?;
                        one.raw_execute().map_err(BlocklistError::Store)?;
                        journal.push(Op::Upsert, &e.domain)?;
                    }
                    Change::Remove(d) => {
                        tx.execute("DELETE FROM entries WHERE domain = ?1", [d])
                            .map_err(BlocklistError::Store)?;
                        journal.push(Op::Remove, d)?;
                    }
                    Change::AddPattern(p) => {
                        tx.execute(
                            "INSERT INTO patterns (pattern, kind, weight) VALUES (?1, ?2, ?3)
                             ON CONFLICT(pattern, kind) DO UPDATE SET weight = excluded.weight",
                            params![p.pattern, p.kind.as_str(), p.weight],
                        )
                        .map_err(BlocklistError::Store)?;
                        journal.push(Op::Pattern, &format!("pattern:{}", p.pattern))?;
                    }
                    Change::RemovePattern(p, kind) => {
                        tx.execute(
                            "DELETE FROM patterns WHERE pattern = ?1 AND kind = ?2",
                            params![p, kind.as_str()],
                        )
                        .map_err(BlocklistError::Store)?;
                        journal.push(Op::Pattern, &format!("pattern:{p}"))?;
                    }
                }
            }
            journal.finish()?;
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('version', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [version as i64],
        )
        .map_err(BlocklistError::Store)?;
        tx.commit().map_err(BlocklistError::Store)
    }
}

/// A text column of a row, borrowed.
fn text<'r>(r: &'r rusqlite::Row<'_>, i: usize) -> Result<&'r str, BlocklistError> {
    r.get_ref(i)
        .and_then(|v| v.as_str().map_err(Into::into))
        .map_err(BlocklistError::Store)
}

/// Rows a multi-row upsert of the entries table writes at once.
const ROWS_PER_INSERT: usize = 64;

/// The entries table's upsert of `rows` rows (as any number of single-row ones in order: a name
/// twice in one statement is inserted, then updated).
fn upsert_sql(rows: usize) -> String {
    let values = vec!["(?, ?, ?, ?)"; rows].join(", ");
    format!(
        "INSERT INTO entries (domain, patterns, added_at, reason) VALUES {values}
         ON CONFLICT(domain) DO UPDATE SET patterns = excluded.patterns, added_at = excluded.added_at, reason = excluded.reason"
    )
}

/// The short form of the `patterns` column last written: an import's entries all have the same
/// (`w:1,1`), formatted once.
#[derive(Default)]
struct Columns {
    /// The weights' bits `column` was written for.
    weights: Option<(u64, Option<u64>)>,
    column: String,
}

impl Columns {
    /// Binds an entry of a batch to the four parameters after `offset` of `stmt`.
    fn bind(
        &mut self,
        stmt: &mut rusqlite::Statement<'_>,
        offset: usize,
        e: &BatchEntry<'_>,
    ) -> Result<(), BlocklistError> {
        match e.patterns() {
            Patterns::Weights(exact, sub) => {
                let bits = (exact.to_bits(), sub.map(f64::to_bits));
                if self.weights != Some(bits) {
                    self.column.clear();
                    weights_column(&mut self.column, exact, sub);
                    self.weights = Some(bits);
                }
                bind_row(
                    stmt,
                    offset,
                    (e.domain(), &self.column, e.added_at(), e.reason()),
                )
            }
            Patterns::Other(p) => {
                let column = serde_json::to_string(p).map_err(BlocklistError::StoreJson)?;
                bind_row(
                    stmt,
                    offset,
                    (e.domain(), &column, e.added_at(), e.reason()),
                )
            }
        }
    }
}

/// Binds `(domain, patterns column, added_at, reason)` to the four parameters after
/// `offset` (SQLite copies the text).
fn bind_row(
    stmt: &mut rusqlite::Statement<'_>,
    offset: usize,
    (domain, column, added_at, reason): (&str, &str, u64, &str),
) -> Result<(), BlocklistError> {
    stmt.raw_bind_parameter(offset + 1, domain)
        .and_then(|()| stmt.raw_bind_parameter(offset + 2, column))
        .and_then(|()| stmt.raw_bind_parameter(offset + 3, added_at as i64))
        .and_then(|()| stmt.raw_bind_parameter(offset + 4, reason))
        .map_err(BlocklistError::Store)
}

/// Writes the short form of the `patterns` column: `w:<exact>` or `w:<exact>,<subdomain>`.
fn weights_column(out: &mut String, exact: f64, sub: Option<f64>) {
    // Writing to a String cannot fail.
    let _ = write!(out, "{WEIGHTS_PREFIX}{exact}");
    if let Some(sub) = sub {
        let _ = write!(out, ",{sub}");
    }
}

/// Prefix of the short form of the `patterns` column.
const WEIGHTS_PREFIX: &str = "w:";

/// The `patterns` column of an entry. An entry of the usual shape (its own name exact and, when
/// it has one, `*.name` as subdomain; every import gives that shape) is stored by its weights
/// alone, `w:<exact>` or `w:<exact>,<subdomain>`: serialising its patterns as JSON was a
/// seventh of a million-name import. Any other shape keeps its JSON, which `load` still reads.
fn patterns_column(e: &Entry) -> Result<String, BlocklistError> {
    let Some((exact, sub)) = batch::usual_weights(&e.domain, &e.patterns) else {
        return serde_json::to_string(&e.patterns).map_err(BlocklistError::StoreJson);
    };
    let mut column = String::new();
    weights_column(&mut column, exact, sub);
    Ok(column)
}

/// The weights of a `patterns` column of the short form (exact, and the subdomain one when
/// there is one); `None` when it is JSON.
fn read_weights(domain: &str, column: &str) -> Result<Option<(f64, Option<f64>)>, BlocklistError> {
    let Some(weights) = column.strip_prefix(WEIGHTS_PREFIX) else {
        return Ok(None);
    };
    let weight = |w: &str| {
        w.parse::<f64>().map_err(|_| {
            BlocklistError::StoreColumn(format!(
                "entry {domain}: patterns column {column:?} is not w:<weight>[,<weight>]"
            ))
        })
    };
    Ok(Some(match weights.split_once(',') {
        Some((x, s)) => (weight(x)?, Some(weight(s)?)),
        None => (weight(weights)?, None),
    }))
}

/// The patterns an entry's `patterns` column stands for (either form of [`patterns_column`]).
#[cfg(test)]
fn read_patterns_column(domain: &str, column: &str) -> Result<Vec<Pattern>, BlocklistError> {
    let Some((exact, subdomain)) = read_weights(domain, column)? else {
        return serde_json::from_str(column).map_err(BlocklistError::StoreJson);
    };
    let mut patterns = vec![Pattern {
        pattern: domain.to_string(),
        kind: PatternType::Exact,
        weight: exact,
    }];
    if let Some(weight) = subdomain {
        patterns.push(Pattern {
            pattern: format!("*.{domain}"),
            kind: PatternType::Subdomain,
            weight,
        });
    }
    Ok(patterns)
}

/// The kinds of change the journal tells apart.
#[derive(Clone, Copy)]
enum Op {
    Upsert,
    Remove,
    Pattern,
}

impl Op {
    const ALL: [Op; 3] = [Op::Upsert, Op::Remove, Op::Pattern];

    fn as_str(self) -> &'static str {
        match self {
            Op::Upsert => "upsert",
            Op::Remove => "remove",
            Op::Pattern => "pattern",
        }
    }
}

/// Bytes of names a journal row holds before the next row starts: a million-name import is a
/// few hundred rows, and what it buffers stays small (a single row of a million names would be
/// a 25 MiB string the allocator keeps after the import).
const JOURNAL_ROW_BYTES: usize = 64 * 1024;

/// A version's journal rows being written: the names of each kind of change, one per line.
struct JournalRows<'conn> {
    version: i64,
    insert: rusqlite::CachedStatement<'conn>,
    lines: [String; 3],
}

impl<'conn> JournalRows<'conn> {
    fn new(version: u64, insert: rusqlite::CachedStatement<'conn>) -> Self {
        Self {
            version: version as i64,
            insert,
            lines: Default::default(),
        }
    }

    fn push(&mut self, op: Op, name: &str) -> Result<(), BlocklistError> {
        let lines = &mut self.lines[op as usize];
        if !lines.is_empty() {
            lines.push('\n');
        }
        lines.push_str(name);
        if lines.len() >= JOURNAL_ROW_BYTES {
            self.write(op)?;
        }
        Ok(())
    }

    fn write(&mut self, op: Op) -> Result<(), BlocklistError> {
        let lines = &mut self.lines[op as usize];
        if !lines.is_empty() {
            self.insert
                .execute(params![self.version, op.as_str(), lines.as_str()])
                .map_err(BlocklistError::Store)?;
            lines.clear();
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), BlocklistError> {
        Op::ALL.into_iter().try_for_each(|op| self.write(op))
    }
}

/// The statement that made table `name`, as SQLite keeps it; `None` when the store has no such
/// table (what the migrations below look at).
fn table_sql(conn: &Connection, name: &str) -> Result<Option<String>, BlocklistError> {
    conn.query_row(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [name],
        |r| r.get(0),
    )
    .optional()
    .map_err(BlocklistError::Store)
}

/// Moves a store's journal from its first shape (a row per name) to a row per version and kind
/// of change, in one transaction, once: the same deltas are answered from either.
fn migrate_journal(conn: &Connection) -> Result<(), BlocklistError> {
    if table_sql(conn, "journal")?.is_none() {
        return Ok(());
    }
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         INSERT INTO journal_batch (version, op, names)
             SELECT version, op, group_concat(domain, char(10)) FROM journal GROUP BY version, op;
         DROP TABLE journal;
         COMMIT;",
    )
    .map_err(BlocklistError::Store)
}

/// While a large commit writes its WAL, a thread asks the kernel every 50 ms to start
/// writing the WAL's dirty pages to disk (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, as
/// PostgreSQL's `*_flush_after` settings do). The commit's final fsync, which makes it durable,
/// then finds most pages on their way or written, instead of writing the whole WAL while the
/// caller waits. It changes nothing about durability: the fsync still decides.
struct WalWriteback {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WalWriteback {
    fn start(db: &Path) -> Self {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        let wal = std::path::PathBuf::from(wal);
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("blocklist-wal-writeback".into())
            .spawn(move || {
                use std::os::fd::AsRawFd;
                // The WAL exists once the commit has written its first frames.
                let mut file = None;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(std::time::Duration::from_millis(50))
                {
                    if file.is_none() {
                        file = std::fs::File::open(&wal).ok();
                    }
                    if let Some(f) = &file {
                        // SAFETY: a valid descriptor the thread owns; the call only starts the
                        // kernel's writeback of the file's dirty pages, whatever their range.
                        unsafe {
                            libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
                        }
                    }
                }
            })
            .ok();
        Self {
            stop: Some(stop),
            thread,
        }
    }
}

impl Drop for WalWriteback {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Rebuilds a store's `entries` table of before 2026-12-02 (a rowid table with a separate index
/// on `domain`) as a table keyed by the domain alone: one B-tree instead of two, so a
/// million-name import writes about 40% fewer pages. Once, in one transaction: a `kill -9`
/// during it leaves the old table, and the next start does it again.
fn migrate_entries_by_domain(conn: &Connection) -> Result<(), BlocklistError> {
    // The schema has made the table before this runs.
    let sql = table_sql(conn, "entries")?
        .ok_or(BlocklistError::Store(rusqlite::Error::QueryReturnedNoRows))?;
    if sql.contains("WITHOUT ROWID") {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let tx = conn
        .unchecked_transaction()
        .map_err(BlocklistError::Store)?;
    tx.execute_batch(
        "CREATE TABLE entries_by_domain (domain TEXT PRIMARY KEY, patterns TEXT NOT NULL, added_at INTEGER NOT NULL, reason TEXT NOT NULL) WITHOUT ROWID;
         INSERT INTO entries_by_domain SELECT domain, patterns, added_at, reason FROM entries ORDER BY domain;
         DROP TABLE entries;
         ALTER TABLE entries_by_domain RENAME TO entries;",
    )
    .map_err(BlocklistError::Store)?;
    tx.commit().map_err(BlocklistError::Store)?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        "blocklist store: the entries table is now keyed by the domain alone (once per store)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store made before the entries table was keyed by the domain alone opens with its
    /// entries, in the new shape, and keeps working.
    #[test]
    fn a_store_with_the_rowid_entries_table_is_rebuilt_keyed_by_domain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE entries (domain TEXT PRIMARY KEY, patterns TEXT NOT NULL, added_at INTEGER NOT NULL, reason TEXT NOT NULL);
                 INSERT INTO entries VALUES ('b-casino.example', 'w:1,1', 7, 'feed');
                 INSERT INTO entries VALUES ('a-casino.example', 'w:0.5', 8, 'operator');",
            )
            .unwrap();
        }
        let store = BlocklistStore::open(&path).unwrap();
        let sql = table_sql(&store.conn().unwrap(), "entries")
            .unwrap()
            .unwrap();
        assert!(sql.contains("WITHOUT ROWID"), "{sql}");
        let loaded = store.load().unwrap();
        let names: Vec<(String, (f64, f64), u64)> = loaded
            .entries
            .iter()
            .map(|e| (e.domain().to_string(), e.weights(), e.added_at()))
            .collect();
        assert_eq!(
            names,
            [
                ("a-casino.example".to_string(), (0.5, 0.0), 8),
                ("b-casino.example".to_string(), (1.0, 1.0), 7),
            ]
        );
        store
            .commit(2, &[Change::Upsert(&entry("c-casino.example"))])
            .unwrap();
        drop(store);
        let store = BlocklistStore::open(&path).unwrap();
        assert_eq!(store.load().unwrap().entries.len(), 3);
    }

    fn entry(domain: &str) -> Entry {
        Entry {
            domain: domain.into(),
            patterns: Vec::new(),
            added_at: 1,
            reason: "test".into(),
        }
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[test]
    fn deltas_name_each_changed_domain_once_from_one_row_per_kind() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlocklistStore::open(&dir.path().join("b.db")).unwrap();
        let (a, b, c) = (entry("a.example"), entry("b.example"), entry("c.example"));
        store
            .commit(10, &[Change::Upsert(&a), Change::Upsert(&b)])
            .unwrap();
        store
            .commit(11, &[Change::Upsert(&c), Change::Remove("a.example")])
            .unwrap();
        store.commit(12, &[Change::Upsert(&c)]).unwrap();
        let rows: i64 = store
            .conn()
            .unwrap()
            .query_row("SELECT COUNT(*) FROM journal_batch", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 4, "one row per version and kind of change");
        assert_eq!(
            sorted(store.changed_since(10).unwrap().unwrap()),
            ["a.example", "c.example"]
        );
        assert_eq!(store.changed_since(11).unwrap().unwrap(), ["c.example"]);
        assert!(store.changed_since(12).unwrap().unwrap().is_empty());
        // Older than the journal: the full list instead.
        assert!(store.changed_since(5).unwrap().is_none());
        let loaded = store.load().unwrap();
        assert_eq!(loaded.version, 12);
        assert_eq!(loaded.entries.len(), 2);
    }

    #[test]
    fn a_journal_of_a_row_per_name_is_moved_once_and_answers_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE journal (version INTEGER NOT NULL, domain TEXT NOT NULL, op TEXT NOT NULL);
                 INSERT INTO journal VALUES (10, 'a.example', 'upsert'), (10, 'b.example', 'upsert'),
                     (11, 'a.example', 'remove'), (11, 'pattern:casino', 'pattern'),
                     (12, 'c.example', 'upsert');",
            )
            .unwrap();
        }
        let store = BlocklistStore::open(&path).unwrap();
        assert_eq!(
            sorted(store.changed_since(10).unwrap().unwrap()),
            ["a.example", "c.example"]
        );
        assert_eq!(
            sorted(store.changed_since(9).unwrap().unwrap()),
            ["a.example", "b.example", "c.example"]
        );
        drop(store);
        // A second open finds nothing to move.
        let store = BlocklistStore::open(&path).unwrap();
        let old: i64 = store
            .conn()
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'journal'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old, 0);
        assert_eq!(store.changed_since(11).unwrap().unwrap(), ["c.example"]);
    }

    #[test]
    fn a_large_batch_is_journalled_in_bounded_rows_that_still_name_every_domain() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlocklistStore::open(&dir.path().join("b.db")).unwrap();
        let entries: Vec<Entry> = (0..10_000)
            .map(|i| entry(&format!("casino{i:05}.example")))
            .collect();
        let changes: Vec<Change<'_>> = entries.iter().map(Change::Upsert).collect();
        store.commit(7, &changes).unwrap();
        let conn = store.conn().unwrap();
        let (rows, longest): (i64, i64) = conn
            .query_row(
                "SELECT COUNT(*), MAX(LENGTH(names)) FROM journal_batch",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        drop(conn);
        assert!(rows > 1, "{rows} rows");
        assert!(longest < (JOURNAL_ROW_BYTES + 64) as i64, "{longest} bytes");
        let changed = sorted(store.changed_since(6).unwrap().unwrap());
        let expected: Vec<String> = entries.iter().map(|e| e.domain.clone()).collect();
        assert_eq!(changed, expected);
    }

    #[test]
    fn the_patterns_column_keeps_every_shape_and_reads_both_forms() {
        let usual = Entry::new("casino.example", false, 1.0, "r", 1);
        let with_sub = Entry::new("casino.example", true, 0.75, "r", 1);
        let mut other = Entry::new("casino.example", true, 0.5, "r", 1);
        other.patterns[1].weight = 0.25;
        other.patterns.push(Pattern {
            pattern: "casino".into(),
            kind: PatternType::Contains,
            weight: 0.3,
        });
        assert_eq!(patterns_column(&usual).unwrap(), "w:1");
        assert_eq!(patterns_column(&with_sub).unwrap(), "w:0.75,0.75");
        assert!(patterns_column(&other).unwrap().starts_with('['));
        for e in [&usual, &with_sub, &other] {
            let column = patterns_column(e).unwrap();
            assert_eq!(
                read_patterns_column(&e.domain, &column).unwrap(),
                e.patterns,
                "{column}"
            );
        }
        // The JSON a store of before this form wrote.
        let json = serde_json::to_string(&with_sub.patterns).unwrap();
        assert_eq!(
            read_patterns_column("casino.example", &json).unwrap(),
            with_sub.patterns
        );
        let bad = read_patterns_column("casino.example", "w:heavy").unwrap_err();
        assert!(bad.is_corrupt_store(), "{bad}");
        assert!(bad.to_string().contains("casino.example"), "{bad}");
    }
}

#[cfg(test)]
mod batch_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Every row of the store's tables: entries by domain (the table's key), the journal in
    /// the order written.
    fn dump(store: &BlocklistStore) -> Vec<String> {
        let conn = store.conn().unwrap();
        let mut out = Vec::new();
        for sql in [
            "SELECT domain, patterns, added_at, reason FROM entries ORDER BY domain",
            "SELECT rowid, version, op, names FROM journal_batch ORDER BY rowid",
            "SELECT key, value FROM meta ORDER BY key",
        ] {
            let mut stmt = conn.prepare(sql).unwrap();
            let n = stmt.column_count();
            let rows = stmt
                .query_map([], |r| {
                    (0..n)
                        .map(|i| {
                            r.get::<_, rusqlite::types::Value>(i)
                                .map(|v| format!("{v:?}"))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .unwrap();
            for row in rows {
                out.push(row.unwrap().join("|"));
            }
        }
        out
    }

    /// Entries of every shape, with names twice (inside one multi-row run and across runs),
    /// several reasons and times, more than three runs of rows and a tail.
    fn entries(salt: usize) -> Vec<Entry> {
        (0..3 * ROWS_PER_INSERT + 11)
            .map(|i| {
                let name = format!("casino{}.example", (i * 7 + salt) % 150);
                let mut e = Entry::new(&name, i % 3 != 0, [1.0, 0.75, 0.5][i % 3], "", 0);
                e.reason = format!("reason {}", i % 4);
                e.added_at = 1_700_000_000 + (i % 5) as u64;
                if i % 17 == 0 {
                    e.patterns[0].weight = 0.25;
                    e.patterns.push(Pattern {
                        pattern: "casino".into(),
                        kind: PatternType::Contains,
                        weight: 0.3,
                    });
                }
                if i % 23 == 0 {
                    e.patterns.remove(0);
                }
                e
            })
            .collect()
    }

    #[test]
    fn a_batch_writes_the_rows_and_journal_its_entries_write() {
        let dir = tempfile::tempdir().unwrap();
        let by_entry = BlocklistStore::open(&dir.path().join("a.db")).unwrap();
        let by_batch = BlocklistStore::open(&dir.path().join("b.db")).unwrap();
        let mut expected = std::collections::BTreeMap::new();
        for (version, salt) in [(10, 0), (11, 5)] {
            let entries = entries(salt);
            let removals: Vec<String> = (0..20).map(|i| format!("casino{i}.example")).collect();
            for e in &entries {
                expected.insert(e.domain.clone(), e.clone());
            }
            for d in &removals {
                expected.remove(d);
            }
            let changes: Vec<Change<'_>> = entries
                .iter()
                .map(Change::Upsert)
                .chain(removals.iter().map(|d| Change::Remove(d)))
                .collect();
            by_entry.commit(version, &changes).unwrap();
            let batch: Batch = entries.iter().cloned().collect();
            by_batch.commit_batch(version, &batch, &removals).unwrap();
        }
        let (a, b) = (dump(&by_entry), dump(&by_batch));
        assert!(a.len() > 100, "{}", a.len());
        assert_eq!(a, b);
        assert!(a.iter().any(|r| r.contains("w:0.75,0.75")), "{a:?}");
        assert!(a.iter().any(|r| r.contains("contains")), "{a:?}");
        // Loaded back into a batch: the last of each name's entries, as given.
        let loaded = by_batch.load().unwrap();
        let mut back = loaded.entries.entries();
        back.sort_by(|a, b| a.domain.cmp(&b.domain));
        assert_eq!(back, expected.into_values().collect::<Vec<_>>());
        assert_eq!(loaded.version, 11);
    }
}

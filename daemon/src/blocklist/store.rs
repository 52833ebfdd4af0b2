//! The blocklist on disk: SQLite in the state directory. Every change commits the entries, the
//! new version and its journal rows in one transaction.
//!
//! The journal keeps, for each version and kind of change (`upsert`, `remove`, `pattern`), the
//! names it touched, one per line, up to 64 KiB a row: a million-name import is a few hundred
//! rows, not a million rows and a million index entries (docs/blocklist.md, "On disk"). Names
//! never hold a line break (they are normalised hostnames); pattern changes, which no delta
//! reads, are journalled as `pattern:<text>` lines.

use std::{collections::HashSet, path::Path, sync::Mutex};

use rusqlite::{Connection, params};

use super::{
    BlocklistError,
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

pub struct BlocklistStore {
    conn: Mutex<Connection>,
}

pub struct Loaded {
    pub entries: Vec<Entry>,
    pub patterns: Vec<Pattern>,
    pub version: u64,
}

impl BlocklistStore {
    pub fn open(path: &Path) -> Result<Self, BlocklistError> {
        let conn = crate::store::open_sqlite(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS entries (domain TEXT PRIMARY KEY, patterns TEXT NOT NULL, added_at INTEGER NOT NULL, reason TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS patterns (pattern TEXT NOT NULL, kind TEXT NOT NULL, weight REAL NOT NULL, PRIMARY KEY (pattern, kind));
             CREATE TABLE IF NOT EXISTS journal_batch (version INTEGER NOT NULL, op TEXT NOT NULL, names TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS journal_batch_version ON journal_batch (version);
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        )
        .map_err(BlocklistError::Store)?;
        migrate_journal(&conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
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
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(BlocklistError::Store)?;
        let mut entries = Vec::new();
        for row in rows {
            let (domain, patterns, added_at, reason) = row.map_err(BlocklistError::Store)?;
            let patterns = read_patterns_column(&domain, &patterns)?;
            entries.push(Entry {
                domain,
                patterns,
                added_at: added_at as u64,
                reason,
            });
        }
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
        let mut conn = self.conn()?;
        let large = changes.len() >= LARGE_COMMIT;
        if large {
            conn.pragma_update(None, "cache_size", LARGE_COMMIT_CACHE_KIB)
                .map_err(BlocklistError::Store)?;
        }
        let committed = Self::commit_on(&mut conn, version, changes);
        if large {
            // The default again, and the pages back to the allocator.
            let reset = conn
                .pragma_update(None, "cache_size", DEFAULT_CACHE_KIB)
                .and_then(|()| conn.execute_batch("PRAGMA shrink_memory"));
            if let Err(e) = reset {
                tracing::warn!(error = %e, "blocklist store: cannot shrink the page cache again");
            }
        }
        committed
    }

    fn commit_on(
        conn: &mut Connection,
        version: u64,
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
            let mut upsert = tx
                .prepare_cached(
                    "INSERT INTO entries (domain, patterns, added_at, reason) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(domain) DO UPDATE SET patterns = excluded.patterns, added_at = excluded.added_at, reason = excluded.reason",
                )
                .map_err(BlocklistError::Store)?;
            for change in changes {
                match change {
                    Change::Upsert(e) => {
                        let patterns = patterns_column(e)?;
                        upsert
                            .execute(params![e.domain, patterns, e.added_at as i64, e.reason])
                            .map_err(BlocklistError::Store)?;
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

/// Prefix of the short form of the `patterns` column.
const WEIGHTS_PREFIX: &str = "w:";

/// The `patterns` column of an entry. An entry of the usual shape (its own name exact and, when
/// it has one, `*.name` as subdomain; every import gives that shape) is stored by its weights
/// alone, `w:<exact>` or `w:<exact>,<subdomain>`: serialising its patterns as JSON was a
/// seventh of a million-name import. Any other shape keeps its JSON, which `load` still reads.
fn patterns_column(e: &Entry) -> Result<String, BlocklistError> {
    let exact = |p: &Pattern| p.kind == PatternType::Exact && p.pattern == e.domain;
    let subdomain = |p: &Pattern| {
        p.kind == PatternType::Subdomain && p.pattern.strip_prefix("*.") == Some(&e.domain)
    };
    match e.patterns.as_slice() {
        [x] if exact(x) => Ok(format!("{WEIGHTS_PREFIX}{}", x.weight)),
        [x, s] if exact(x) && subdomain(s) => {
            Ok(format!("{WEIGHTS_PREFIX}{},{}", x.weight, s.weight))
        }
        _ => serde_json::to_string(&e.patterns).map_err(BlocklistError::StoreJson),
    }
}

/// The patterns an entry's `patterns` column stands for (either form of [`patterns_column`]).
fn read_patterns_column(domain: &str, column: &str) -> Result<Vec<Pattern>, BlocklistError> {
    let Some(weights) = column.strip_prefix(WEIGHTS_PREFIX) else {
        return serde_json::from_str(column).map_err(BlocklistError::StoreJson);
    };
    let weight = |w: &str| {
        w.parse::<f64>().map_err(|_| {
            BlocklistError::StoreColumn(format!(
                "entry {domain}: patterns column {column:?} is not w:<weight>[,<weight>]"
            ))
        })
    };
    let (exact, subdomain) = match weights.split_once(',') {
        Some((x, s)) => (weight(x)?, Some(weight(s)?)),
        None => (weight(weights)?, None),
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

/// Moves a store's journal from its first shape (a row per name) to a row per version and kind
/// of change, in one transaction, once: the same deltas are answered from either.
fn migrate_journal(conn: &Connection) -> Result<(), BlocklistError> {
    let old: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'journal')",
            [],
            |r| r.get(0),
        )
        .map_err(BlocklistError::Store)?;
    if !old {
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

#[cfg(test)]
mod tests {
    use super::*;

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

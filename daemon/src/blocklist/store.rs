//! The blocklist on disk: SQLite in the state directory. Every change commits the entries, the
//! new version and its journal rows in one transaction.

use std::{path::Path, sync::Mutex};

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
             CREATE TABLE IF NOT EXISTS journal (version INTEGER NOT NULL, domain TEXT NOT NULL, op TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS journal_version ON journal (version);
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        )
        .map_err(BlocklistError::Store)?;
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
            entries.push(Entry {
                domain,
                patterns: serde_json::from_str(&patterns).map_err(BlocklistError::StoreJson)?,
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
            .query_row("SELECT MIN(version) FROM journal", [], |r| r.get(0))
            .map_err(BlocklistError::Store)?;
        // The journal starts with the first change; a client that knows a version from
        // before it (or from another server) cannot be given a delta.
        if oldest.is_none_or(|o| (version as i64) < o - 1) {
            return Ok(None);
        }
        let mut stmt = conn
            .prepare_cached(
                "SELECT DISTINCT domain FROM journal WHERE version > ?1 AND op != 'pattern'",
            )
            .map_err(BlocklistError::Store)?;
        let rows = stmt
            .query_map([version as i64], |r| r.get::<_, String>(0))
            .map_err(BlocklistError::Store)?;
        Ok(Some(
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(BlocklistError::Store)?,
        ))
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
            let mut upsert = tx
                .prepare_cached(
                    "INSERT INTO entries (domain, patterns, added_at, reason) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(domain) DO UPDATE SET patterns = excluded.patterns, added_at = excluded.added_at, reason = excluded.reason",
                )
                .map_err(BlocklistError::Store)?;
            let mut journal = tx
                .prepare_cached("INSERT INTO journal (version, domain, op) VALUES (?1, ?2, ?3)")
                .map_err(BlocklistError::Store)?;
            for change in changes {
                match change {
                    Change::Upsert(e) => {
                        let patterns = serde_json::to_string(&e.patterns)
                            .map_err(BlocklistError::StoreJson)?;
                        upsert
                            .execute(params![e.domain, patterns, e.added_at as i64, e.reason])
                            .map_err(BlocklistError::Store)?;
                        journal
                            .execute(params![version as i64, e.domain, "upsert"])
                            .map_err(BlocklistError::Store)?;
                    }
                    Change::Remove(d) => {
                        tx.execute("DELETE FROM entries WHERE domain = ?1", [d])
                            .map_err(BlocklistError::Store)?;
                        journal
                            .execute(params![version as i64, d, "remove"])
                            .map_err(BlocklistError::Store)?;
                    }
                    Change::AddPattern(p) => {
                        tx.execute(
                            "INSERT INTO patterns (pattern, kind, weight) VALUES (?1, ?2, ?3)
                             ON CONFLICT(pattern, kind) DO UPDATE SET weight = excluded.weight",
                            params![p.pattern, p.kind.as_str(), p.weight],
                        )
                        .map_err(BlocklistError::Store)?;
                        journal
                            .execute(params![
                                version as i64,
                                format!("pattern:{}", p.pattern),
                                "pattern"
                            ])
                            .map_err(BlocklistError::Store)?;
                    }
                    Change::RemovePattern(p, kind) => {
                        tx.execute(
                            "DELETE FROM patterns WHERE pattern = ?1 AND kind = ?2",
                            params![p, kind.as_str()],
                        )
                        .map_err(BlocklistError::Store)?;
                        journal
                            .execute(params![version as i64, format!("pattern:{p}"), "pattern"])
                            .map_err(BlocklistError::Store)?;
                    }
                }
            }
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

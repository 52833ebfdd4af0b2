//! The client store: SQLite (WAL, synchronous=FULL) in the state directory. A client whose
//! `add_client` was acknowledged is on disk; `kill -9` cannot lose it.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::CoreError;
use crate::error::Error;

/// One VPN client as stored. Keys are base64 (wg format).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Client {
    pub name: String,
    pub ip: Ipv4Addr,
    #[serde(skip)]
    pub private_key: String,
    pub public_key: String,
    #[serde(skip)]
    pub preshared_key: String,
    /// RFC 3339.
    pub created: String,
    pub enabled: bool,
    /// Traffic totals across interface restarts (bytes).
    pub rx_total: u64,
    pub tx_total: u64,
    /// When the client expires (Unix seconds); `None`: never.
    pub expires_at: Option<i64>,
    /// The daemon disabled the client at its expiry (not the operator): extending the expiry
    /// into the future enables it again.
    pub expiry_disabled: bool,
}

impl Client {
    /// Whether `expires_at` has come (at Unix second `now`).
    pub fn expired_at(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// Why an insert was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Conflict {
    Name,
    Ip,
    Key,
}

pub struct ClientStore {
    conn: Mutex<Connection>,
}

const COLUMNS: &str = "name, ip, private_key, public_key, preshared_key, created, enabled, \
     rx_total, tx_total, expires_at, expiry_disabled";

/// The schema changes after the first version, in order; `PRAGMA user_version` counts those
/// applied. Each runs in one transaction with its version bump, so a crash leaves the store
/// before or after a step, never in between. An older daemon still reads a newer store (it
/// names its columns).
const MIGRATIONS: &[&str] = &[
    // 1: client expiry.
    "ALTER TABLE clients ADD COLUMN expires_at INTEGER;
     ALTER TABLE clients ADD COLUMN expiry_disabled INTEGER NOT NULL DEFAULT 0;
     CREATE INDEX IF NOT EXISTS clients_expiry ON clients (expires_at) WHERE expires_at IS NOT NULL;",
    // 2: each peer's last endpoint, so a restarted daemon can start the handshakes itself.
    "ALTER TABLE clients ADD COLUMN endpoint TEXT;",
];

/// Brings the store's schema to the newest version.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

fn row_to_client(row: &rusqlite::Row<'_>) -> rusqlite::Result<Client> {
    let ip: String = row.get(1)?;
    Ok(Client {
        name: row.get(0)?,
        ip: ip.parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
        private_key: row.get(2)?,
        public_key: row.get(3)?,
        preshared_key: row.get(4)?,
        created: row.get(5)?,
        enabled: row.get(6)?,
        rx_total: row.get::<_, i64>(7)? as u64,
        tx_total: row.get::<_, i64>(8)? as u64,
        expires_at: row.get(9)?,
        expiry_disabled: row.get(10)?,
    })
}

/// Backups of the client store kept in `state_dir/backups` (the newest; older ones go).
pub const BACKUPS_KEPT: usize = 5;

/// Whether an error opening the store means the file itself is damaged (not a database, a
/// corrupt page, a failed integrity check), as opposed to a full disk or a permission.
fn is_damage(e: &CoreError) -> bool {
    let sqlite = match e {
        CoreError::IntegrityCheck { .. } => return true,
        CoreError::ClientStore(e) | CoreError::Daemon(Error::Sqlite { source: e, .. }) => e,
        _ => return false,
    };
    matches!(
        sqlite.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

/// The store's backups in `dir` (`clients-<unix seconds>.db`), newest first.
fn backups(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let stamp = name.strip_prefix("clients-")?.strip_suffix(".db")?;
                    Some((stamp.parse().ok()?, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort_by(|a, b| b.cmp(a));
    found
}

/// The newest backup in `dir` that opens read-only and passes `PRAGMA quick_check`, with
/// when it was made (Unix seconds).
pub fn newest_good_backup(dir: &Path) -> Option<(PathBuf, u64)> {
    backups(dir)
        .into_iter()
        .map(|(t, p)| (p, t))
        .find(|(p, _)| {
            Connection::open_with_flags(p, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .and_then(|c| {
                    let ok: String = c.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
                    let clients: i64 =
                        c.query_row("SELECT count(*) FROM clients", [], |r| r.get(0))?;
                    Ok(ok == "ok" && clients >= 0)
                })
                .unwrap_or(false)
        })
}

impl ClientStore {
    /// Opens the store. A damaged file is never replaced by an empty store: the error names
    /// the file and the newest good backup in `backups/` beside it, and the daemon stops
    /// there. A zero-length file while a good backup exists counts as damaged too (SQLite
    /// would read it as a fresh, empty store).
    pub fn open(path: &Path) -> Result<Self, CoreError> {
        let dir = path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("backups");
        let emptied = std::fs::metadata(path).is_ok_and(|m| m.len() == 0);
        let opened = if emptied && newest_good_backup(&dir).is_some() {
            Err(CoreError::IntegrityCheck {
                path: path.to_path_buf(),
                result: "the file is empty".into(),
            })
        } else {
            Self::open_checked(path)
        };
        match opened {
            Err(e) if is_damage(&e) => Err(CoreError::Damaged {
                path: path.to_path_buf(),
                // One line: SQLite's integrity report spans several.
                detail: e.to_string().replace('\n', " "),
                backup: newest_good_backup(&dir),
                backups_dir: dir,
            }),
            other => other,
        }
    }

    /// Writes a consistent copy of the store to `dir/clients-<unix seconds>.db` (`VACUUM
    /// INTO` a temporary name, synced, renamed) and keeps the newest [`BACKUPS_KEPT`].
    pub fn backup(&self, dir: &Path) -> Result<PathBuf, CoreError> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let path = dir.join(format!("clients-{stamp}.db"));
        let tmp = dir.join(format!("clients-{stamp}.db.tmp"));
        let _ = std::fs::remove_file(&tmp);
        self.conn()?
            .execute("VACUUM INTO ?1", params![tmp.to_string_lossy()])
            .map_err(CoreError::ClientStore)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::io(&tmp, e))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        for (_, old) in backups(dir).into_iter().skip(BACKUPS_KEPT) {
            let _ = std::fs::remove_file(old);
        }
        Ok(path)
    }

    fn open_checked(path: &Path) -> Result<Self, CoreError> {
        let mut conn = crate::store::open_sqlite(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS clients (
                 name TEXT PRIMARY KEY,
                 ip TEXT NOT NULL UNIQUE,
                 private_key TEXT NOT NULL,
                 public_key TEXT NOT NULL UNIQUE,
                 preshared_key TEXT NOT NULL,
                 created TEXT NOT NULL,
                 enabled INTEGER NOT NULL DEFAULT 1,
                 rx_total INTEGER NOT NULL DEFAULT 0,
                 tx_total INTEGER NOT NULL DEFAULT 0,
                 seq INTEGER NOT NULL DEFAULT 0
             );
             CREATE INDEX IF NOT EXISTS clients_seq ON clients (seq);
             CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )
        .map_err(CoreError::ClientStore)?;
        migrate(&mut conn).map_err(CoreError::ClientStore)?;
        // The integrity check doubles as "the store opens cleanly" after a crash.
        let ok: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(CoreError::ClientStore)?;
        if ok != "ok" {
            return Err(CoreError::IntegrityCheck {
                path: path.to_path_buf(),
                result: ok,
            });
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, CoreError> {
        self.conn
            .lock()
            .map_err(|_| Error::LockPoisoned("client store").into())
    }

    /// Inserts a client; a duplicate name, IP or key is a conflict, not an error.
    pub fn insert(&self, c: &Client) -> Result<Result<(), Conflict>, CoreError> {
        let conn = self.conn()?;
        let taken = |sql: &str, v: &str| -> Result<bool, CoreError> {
            conn.query_row(sql, [v], |_| Ok(()))
                .optional()
                .map(|r| r.is_some())
                .map_err(CoreError::ClientStore)
        };
        if taken("SELECT 1 FROM clients WHERE name = ?1", &c.name)? {
            return Ok(Err(Conflict::Name));
        }
        if taken("SELECT 1 FROM clients WHERE ip = ?1", &c.ip.to_string())? {
            return Ok(Err(Conflict::Ip));
        }
        if taken("SELECT 1 FROM clients WHERE public_key = ?1", &c.public_key)? {
            return Ok(Err(Conflict::Key));
        }
        conn.execute(
            "INSERT INTO clients (name, ip, private_key, public_key, preshared_key, created, enabled, rx_total, tx_total, expires_at, expiry_disabled, seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, (SELECT COALESCE(MAX(seq), 0) + 1 FROM clients))",
            params![
                c.name,
                c.ip.to_string(),
                c.private_key,
                c.public_key,
                c.preshared_key,
                c.created,
                c.enabled,
                c.rx_total as i64,
                c.tx_total as i64,
                c.expires_at,
                c.expiry_disabled
            ],
        )
        .map_err(CoreError::ClientStore)?;
        Ok(Ok(()))
    }

    pub fn get(&self, name: &str) -> Result<Option<Client>, CoreError> {
        self.conn()?
            .query_row(
                &format!("SELECT {COLUMNS} FROM clients WHERE name = ?1"),
                [name],
                row_to_client,
            )
            .optional()
            .map_err(CoreError::ClientStore)
    }

    pub fn remove(&self, name: &str) -> Result<Option<Client>, CoreError> {
        let client = self.get(name)?;
        if client.is_some() {
            self.conn()?
                .execute("DELETE FROM clients WHERE name = ?1", [name])
                .map_err(CoreError::ClientStore)?;
        }
        Ok(client)
    }

    /// Enables or disables a client by the operator's word: either way the client is no longer
    /// one the daemon disabled at its expiry.
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<Option<Client>, CoreError> {
        let n = self
            .conn()?
            .execute(
                "UPDATE clients SET enabled = ?2, expiry_disabled = 0 WHERE name = ?1",
                params![name, enabled],
            )
            .map_err(CoreError::ClientStore)?;
        if n == 0 {
            return Ok(None);
        }
        self.get(name)
    }

    /// Sets a client's expiry (`None`: never). A client the daemon disabled at its expiry is
    /// enabled again when the new expiry is not due at `now`.
    pub fn set_expiry(
        &self,
        name: &str,
        expires_at: Option<i64>,
        now: i64,
    ) -> Result<Option<Client>, CoreError> {
        let due = expires_at.is_some_and(|at| at <= now);
        let n = self
            .conn()?
            .execute(
                "UPDATE clients SET expires_at = ?2,
                     enabled = CASE WHEN expiry_disabled = 1 AND NOT ?3 THEN 1 ELSE enabled END,
                     expiry_disabled = CASE WHEN ?3 THEN expiry_disabled ELSE 0 END
                 WHERE name = ?1",
                params![name, expires_at, due],
            )
            .map_err(CoreError::ClientStore)?;
        if n == 0 {
            return Ok(None);
        }
        self.get(name)
    }

    /// Disables every enabled client whose expiry is due at `now`, marking it disabled by
    /// expiry, in one transaction; returns them as they are now.
    pub fn expire_due(&self, now: i64) -> Result<Vec<Client>, CoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction().map_err(CoreError::ClientStore)?;
        let due = {
            let mut stmt = tx
                .prepare(&format!(
                    "SELECT {COLUMNS} FROM clients
                     WHERE enabled = 1 AND expires_at IS NOT NULL AND expires_at <= ?1 ORDER BY seq"
                ))
                .map_err(CoreError::ClientStore)?;
            let rows = stmt
                .query_map([now], row_to_client)
                .map_err(CoreError::ClientStore)?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(CoreError::ClientStore)?
        };
        tx.execute(
            "UPDATE clients SET enabled = 0, expiry_disabled = 1
             WHERE enabled = 1 AND expires_at IS NOT NULL AND expires_at <= ?1",
            [now],
        )
        .map_err(CoreError::ClientStore)?;
        tx.commit().map_err(CoreError::ClientStore)?;
        Ok(due
            .into_iter()
            .map(|c| Client {
                enabled: false,
                expiry_disabled: true,
                ..c
            })
            .collect())
    }

    /// Every address in use.
    pub fn used_ips(&self) -> Result<std::collections::HashSet<Ipv4Addr>, CoreError> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare("SELECT ip FROM clients")
            .map_err(CoreError::ClientStore)?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(CoreError::ClientStore)?;
        let mut out = std::collections::HashSet::new();
        for ip in rows {
            if let Ok(ip) = ip.map_err(CoreError::ClientStore)?.parse() {
                out.insert(ip);
            }
        }
        Ok(out)
    }

    /// Every client, oldest first.
    pub fn all(&self) -> Result<Vec<Client>, CoreError> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare(&format!("SELECT {COLUMNS} FROM clients ORDER BY seq"))
            .map_err(CoreError::ClientStore)?;
        let rows = stmt
            .query_map([], row_to_client)
            .map_err(CoreError::ClientStore)?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(CoreError::ClientStore)
    }

    /// The newest `n` clients, newest first.
    pub fn latest(&self, n: usize) -> Result<Vec<Client>, CoreError> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM clients ORDER BY seq DESC LIMIT ?1"
            ))
            .map_err(CoreError::ClientStore)?;
        let rows = stmt
            .query_map([n as i64], row_to_client)
            .map_err(CoreError::ClientStore)?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(CoreError::ClientStore)
    }

    /// One page of clients (oldest first) whose name or IP contains `search`, and the total
    /// matching.
    pub fn page(
        &self,
        offset: usize,
        limit: usize,
        search: Option<&str>,
    ) -> Result<(Vec<Client>, usize), CoreError> {
        let conn = self.conn()?;
        let pattern = search.map(|s| {
            format!(
                "%{}%",
                s.replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_")
            )
        });
        let filter = "WHERE (?1 IS NULL OR name LIKE ?1 ESCAPE '\\' OR ip LIKE ?1 ESCAPE '\\')";
        let total: i64 = conn
            .query_row(
                &format!("SELECT COUNT(*) FROM clients {filter}"),
                [&pattern],
                |r| r.get(0),
            )
            .map_err(CoreError::ClientStore)?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM clients {filter} ORDER BY seq LIMIT ?2 OFFSET ?3"
            ))
            .map_err(CoreError::ClientStore)?;
        let rows = stmt
            .query_map(params![pattern, limit as i64, offset as i64], row_to_client)
            .map_err(CoreError::ClientStore)?;
        Ok((
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(CoreError::ClientStore)?,
            total as usize,
        ))
    }

    /// Gives clients new addresses and records the subnet, in one transaction. Addresses go
    /// through a placeholder first so that swaps never trip the UNIQUE constraint.
    pub fn move_clients(
        &self,
        moves: &[(String, Ipv4Addr)],
        subnet: &str,
    ) -> Result<(), CoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction().map_err(CoreError::ClientStore)?;
        tx.execute("UPDATE clients SET ip = 'moving:' || name", [])
            .map_err(CoreError::ClientStore)?;
        {
            let mut update = tx
                .prepare_cached("UPDATE clients SET ip = ?2 WHERE name = ?1")
                .map_err(CoreError::ClientStore)?;
            for (name, ip) in moves {
                update
                    .execute(params![name, ip.to_string()])
                    .map_err(CoreError::ClientStore)?;
            }
        }
        tx.execute(
            "INSERT INTO settings (key, value) VALUES ('wireguard.subnet', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [subnet],
        )
        .map_err(CoreError::ClientStore)?;
        tx.commit().map_err(CoreError::ClientStore)
    }

    /// The last endpoint seen of each client that had one, by public key.
    pub fn endpoints(
        &self,
    ) -> Result<std::collections::HashMap<String, std::net::SocketAddr>, CoreError> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare("SELECT public_key, endpoint FROM clients WHERE endpoint IS NOT NULL")
            .map_err(CoreError::ClientStore)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(CoreError::ClientStore)?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            let (key, endpoint) = row.map_err(CoreError::ClientStore)?;
            // A value this daemon did not write is ignored, not trusted.
            if let Ok(addr) = endpoint.parse() {
                out.insert(key, addr);
            }
        }
        Ok(out)
    }

    /// Records clients' endpoints (by public key), in one transaction.
    pub fn set_endpoints(
        &self,
        endpoints: &[(String, std::net::SocketAddr)],
    ) -> Result<(), CoreError> {
        if endpoints.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn()?;
        let tx = conn.transaction().map_err(CoreError::ClientStore)?;
        {
            let mut update = tx
                .prepare_cached("UPDATE clients SET endpoint = ?2 WHERE public_key = ?1")
                .map_err(CoreError::ClientStore)?;
            for (key, endpoint) in endpoints {
                update
                    .execute(params![key, endpoint.to_string()])
                    .map_err(CoreError::ClientStore)?;
            }
        }
        tx.commit().map_err(CoreError::ClientStore)
    }

    /// Adds traffic seen since the last call to the persisted totals.
    pub fn add_traffic(&self, deltas: &[(String, u64, u64)]) -> Result<(), CoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction().map_err(CoreError::ClientStore)?;
        for (name, rx, tx_bytes) in deltas {
            tx.execute(
                "UPDATE clients SET rx_total = rx_total + ?2, tx_total = tx_total + ?3 WHERE name = ?1",
                params![name, *rx as i64, *tx_bytes as i64],
            )
            .map_err(CoreError::ClientStore)?;
        }
        tx.commit().map_err(CoreError::ClientStore)
    }

    pub fn setting(&self, key: &str) -> Result<Option<String>, CoreError> {
        self.conn()?
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(CoreError::ClientStore)
    }

    pub fn set_setting(&self, key: &str, value: &str) -> Result<(), CoreError> {
        self.conn()?
            .execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [key, value],
            )
            .map(|_| ())
            .map_err(CoreError::ClientStore)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str, ip: [u8; 4], key: &str) -> Client {
        Client {
            name: name.into(),
            ip: Ipv4Addr::from(ip),
            private_key: "priv".into(),
            public_key: key.into(),
            preshared_key: "psk".into(),
            created: "2026-11-23T00:00:00Z".into(),
            enabled: true,
            rx_total: 0,
            tx_total: 0,
            expires_at: None,
            expiry_disabled: false,
        }
    }

    #[test]
    fn backups_rotate_and_a_damaged_store_names_the_newest_good_one()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("clients.db");
        let backups_dir = dir.path().join("backups");
        // An empty file with no backup is a fresh store (a new installation).
        std::fs::write(&path, b"")?;
        let store = ClientStore::open(&path)?;
        store.insert(&client("alice", [10, 8, 0, 2], "ka"))?.ok();
        let first = store.backup(&backups_dir)?;
        // Older backups go past BACKUPS_KEPT; a damaged one is never named.
        for stamp in 1..=BACKUPS_KEPT as u64 + 2 {
            std::fs::copy(&first, backups_dir.join(format!("clients-{stamp}.db")))?;
        }
        std::fs::write(
            backups_dir.join("clients-99999999999.db"),
            b"not a database",
        )?;
        store.backup(&backups_dir)?;
        assert_eq!(backups(&backups_dir).len(), BACKUPS_KEPT);
        let newest = newest_good_backup(&backups_dir).map(|(p, _)| p);
        assert!(
            newest
                .as_ref()
                .is_some_and(|p| p != &backups_dir.join("clients-99999999999.db"))
        );
        drop(store);
        for damage in [
            &b"garbage, not SQLite at all, long enough for a header.."[..],
            b"",
        ] {
            std::fs::write(&path, damage)?;
            let _ = std::fs::remove_file(dir.path().join("clients.db-wal"));
            match ClientStore::open(&path) {
                Err(CoreError::Damaged { backup, .. }) => {
                    assert_eq!(backup.map(|(p, _)| p), newest)
                }
                other => panic!("{:?}", other.err()),
            }
            assert_eq!(std::fs::read(&path)?, damage, "left as it was");
        }
        Ok(())
    }

    #[test]
    fn insert_conflicts_page_and_reopen() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("clients.db");
        {
            let store = ClientStore::open(&path)?;
            assert_eq!(store.insert(&client("alice", [10, 8, 0, 2], "ka"))?, Ok(()));
            assert_eq!(
                store.insert(&client("alice", [10, 8, 0, 3], "kb"))?,
                Err(Conflict::Name)
            );
            assert_eq!(
                store.insert(&client("bob", [10, 8, 0, 2], "kb"))?,
                Err(Conflict::Ip)
            );
            assert_eq!(
                store.insert(&client("bob", [10, 8, 0, 3], "ka"))?,
                Err(Conflict::Key)
            );
            assert_eq!(store.insert(&client("bob_1", [10, 8, 0, 3], "kb"))?, Ok(()));
            assert_eq!(store.insert(&client("carol", [10, 8, 0, 4], "kc"))?, Ok(()));
            let (page, total) = store.page(0, 2, None)?;
            assert_eq!((page.len(), total), (2, 3));
            assert_eq!(page[0].name, "alice");
            let (found, total) = store.page(0, 10, Some("b_"))?;
            assert_eq!(
                (found.len(), total),
                (1, 1),
                "underscore is literal in search"
            );
            assert_eq!(store.latest(1)?[0].name, "carol");
            store.add_traffic(&[("alice".into(), 10, 20)])?;
            assert!(
                store
                    .set_enabled("bob_1", false)?
                    .is_some_and(|c| !c.enabled)
            );
        }
        let store = ClientStore::open(&path)?;
        let alice = store.get("alice")?.ok_or("lost")?;
        assert_eq!((alice.rx_total, alice.tx_total), (10, 20));
        assert_eq!(
            store.remove("carol")?.map(|c| c.ip),
            Some(Ipv4Addr::new(10, 8, 0, 4))
        );
        assert_eq!(store.all()?.len(), 2);
        Ok(())
    }
}

#[cfg(test)]
mod expiry_tests {
    use super::*;

    fn client(name: &str, ip: [u8; 4], expires_at: Option<i64>) -> Client {
        Client {
            name: name.into(),
            ip: Ipv4Addr::from(ip),
            private_key: "priv".into(),
            public_key: format!("key-{name}"),
            preshared_key: "psk".into(),
            created: "2026-11-23T00:00:00Z".into(),
            enabled: true,
            rx_total: 0,
            tx_total: 0,
            expires_at,
            expiry_disabled: false,
        }
    }

    /// A store written before expiry existed opens, keeps its clients, and gains the columns.
    #[test]
    fn a_store_of_the_first_schema_is_migrated() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("clients.db");
        {
            let conn = Connection::open(&path)?;
            conn.execute_batch(
                "CREATE TABLE clients (
                     name TEXT PRIMARY KEY, ip TEXT NOT NULL UNIQUE, private_key TEXT NOT NULL,
                     public_key TEXT NOT NULL UNIQUE, preshared_key TEXT NOT NULL,
                     created TEXT NOT NULL, enabled INTEGER NOT NULL DEFAULT 1,
                     rx_total INTEGER NOT NULL DEFAULT 0, tx_total INTEGER NOT NULL DEFAULT 0,
                     seq INTEGER NOT NULL DEFAULT 0);
                 INSERT INTO clients VALUES ('old', '10.8.0.2', 'p', 'k', 's', 'c', 0, 5, 6, 1);",
            )?;
        }
        for _ in 0..2 {
            // Twice: the second open finds the store at the newest version already.
            let store = ClientStore::open(&path)?;
            let old = store.get("old")?.ok_or("lost")?;
            assert_eq!(
                (
                    old.enabled,
                    old.rx_total,
                    old.expires_at,
                    old.expiry_disabled
                ),
                (false, 5, None, false)
            );
        }
        let store = ClientStore::open(&path)?;
        assert_eq!(
            store.insert(&client("new", [10, 8, 0, 3], Some(100)))?,
            Ok(())
        );
        assert_eq!(store.get("new")?.and_then(|c| c.expires_at), Some(100));
        Ok(())
    }

    #[test]
    fn expiry_disables_and_extending_enables_again() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = ClientStore::open(&dir.path().join("clients.db"))?;
        store.insert(&client("due", [10, 8, 0, 2], Some(100)))?.ok();
        store
            .insert(&client("later", [10, 8, 0, 3], Some(200)))?
            .ok();
        store.insert(&client("never", [10, 8, 0, 4], None))?.ok();
        store.insert(&client("off", [10, 8, 0, 5], Some(50)))?.ok();
        store.set_enabled("off", false)?;
        let expired = store.expire_due(100)?;
        assert_eq!(
            expired.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["due"],
            "only enabled clients whose time has come"
        );
        assert!(expired[0].expiry_disabled && !expired[0].enabled);
        assert!(store.expire_due(100)?.is_empty(), "once");
        // A new time still due changes nothing else; one in the future enables it again.
        let still = store.set_expiry("due", Some(90), 100)?.ok_or("lost")?;
        assert!(!still.enabled && still.expiry_disabled);
        let back = store.set_expiry("due", Some(300), 100)?.ok_or("lost")?;
        assert!(back.enabled && !back.expiry_disabled);
        // The operator's disable is not undone by an extension.
        let off = store.set_expiry("off", None, 100)?.ok_or("lost")?;
        assert!(!off.enabled && off.expires_at.is_none());
        assert!(store.set_expiry("nobody", None, 100)?.is_none());
        Ok(())
    }

    #[test]
    fn endpoints_are_kept_per_key_and_go_with_their_client()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("clients.db");
        let store = ClientStore::open(&path)?;
        let a = client("a", [10, 8, 0, 2], None);
        let b = client("b", [10, 8, 0, 3], None);
        store.insert(&a)?.ok();
        store.insert(&b)?.ok();
        assert!(store.endpoints()?.is_empty(), "none before a handshake");
        let at: std::net::SocketAddr = "192.0.2.7:40000".parse()?;
        let v6: std::net::SocketAddr = "[2001:db8::7]:51000".parse()?;
        store.set_endpoints(&[(a.public_key.clone(), at), ("unknown key".into(), at)])?;
        store.set_endpoints(&[(b.public_key.clone(), v6)])?;
        drop(store);
        // Durable: a new open (the next start) reads them back.
        let store = ClientStore::open(&path)?;
        let endpoints = store.endpoints()?;
        assert_eq!(endpoints.len(), 2);
        assert_eq!(endpoints.get(&a.public_key), Some(&at));
        assert_eq!(endpoints.get(&b.public_key), Some(&v6));
        store.remove("a")?;
        assert_eq!(store.endpoints()?.len(), 1);
        Ok(())
    }
}

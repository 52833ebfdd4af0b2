//! Small durable files in the state directory: written whole, atomically, and synced, so an
//! acknowledged change survives `kill -9` and a crash never leaves half a file.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use tracing::error;

use crate::error::Error;

/// Writes `bytes` to `path` via a temporary file, fsync and rename (0600).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = file.write_all(bytes).and_then(|()| file.sync_all()) {
        // A half-written temporary file would hold on to what little space a full disk has.
        drop(file);
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Opens an SQLite database for state that must survive `kill -9` and power loss: WAL
/// journal, every commit synced.
pub fn open_sqlite(path: &Path) -> Result<rusqlite::Connection, Error> {
    let db = |source| Error::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let conn = rusqlite::Connection::open(path).map_err(db)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(db)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(db)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(db)?;
    Ok(conn)
}

/// Reads a JSON file written by `write_atomic`; a missing file is `T::default()`.
pub fn read_json<T: serde::de::DeserializeOwned + Default>(path: &Path) -> Result<T, Error> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Like [`read_json`], for the state of a module the daemon can run without (ghost,
/// multihop, the blocklist's sync record, DNS settings): a file that does not parse is moved
/// aside ([`set_aside`]) with an error naming both paths, and the module starts from
/// `T::default()`, so one damaged file never keeps the VPN down.
pub fn read_json_or_set_aside<T: serde::de::DeserializeOwned + Default>(
    path: &Path,
    module: &str,
) -> Result<T, Error> {
    match read_json(path) {
        Err(Error::Json { source, .. }) => {
            let moved = set_aside(path)?;
            error!(
                module,
                file = %path.display(),
                moved_to = %moved.display(),
                error = %source,
                "state file does not parse: moved aside, the module starts from empty"
            );
            Ok(T::default())
        }
        other => other,
    }
}

/// Renames a damaged state file to `<name>.corrupt-<unix seconds>` next to it (kept for the
/// operator, never deleted) and returns the new path.
pub fn set_aside(path: &Path) -> Result<PathBuf, Error> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".corrupt-{stamp}"));
    let moved = path.with_file_name(name);
    std::fs::rename(path, &moved).map_err(|e| Error::io(path, e))?;
    Ok(moved)
}

/// Writes `value` as pretty JSON with `write_atomic`.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), Error> {
    let text = serde_json::to_vec_pretty(value).map_err(|source| Error::Encode {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, &text)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_damaged_optional_state_file_is_set_aside_and_read_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("module.json");
        std::fs::write(&path, b"{\"half\": ").unwrap();
        let value: std::collections::BTreeMap<String, u32> =
            read_json_or_set_aside(&path, "test").unwrap();
        assert!(value.is_empty());
        assert!(!path.exists());
        let moved: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(moved.len(), 1);
        assert!(moved[0].starts_with("module.json.corrupt-"), "{moved:?}");
        // A good file reads as written; a missing one as empty.
        write_json(
            &path,
            &std::collections::BTreeMap::from([("a".to_string(), 1u32)]),
        )
        .unwrap();
        let value: std::collections::BTreeMap<String, u32> =
            read_json_or_set_aside(&path, "test").unwrap();
        assert_eq!(value.get("a"), Some(&1));
        std::fs::remove_file(&path).unwrap();
        let value: Option<u32> = read_json_or_set_aside(&path, "test").unwrap();
        assert_eq!(value, None);
    }
}

//! The multihop session log: one line per event (imports, enable/disable, monitor findings,
//! re-establishment), in a file in the state directory so it outlives restarts. Bounded: past
//! `MAX_BYTES` the older half is dropped.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Mutex,
};

use tracing::warn;

const MAX_BYTES: u64 = 1024 * 1024;

pub struct SessionLog {
    path: PathBuf,
    lock: Mutex<()>,
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl SessionLog {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            lock: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `<time> <event> <message>`. A log that cannot be written is reported in the
    /// daemon's own log; it never fails the operation it records.
    pub fn record(&self, event: &str, message: &str) {
        let _guard = self.lock.lock();
        let line = format!("{} {event} {}\n", now(), message.replace('\n', " "));
        let result = (|| -> std::io::Result<()> {
            use std::os::unix::fs::OpenOptionsExt;
            if std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0) > MAX_BYTES {
                let text = std::fs::read_to_string(&self.path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let keep = lines[lines.len() / 2..].join("\n");
                crate::store::write_atomic(&self.path, format!("{keep}\n").as_bytes())
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            }
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)?;
            file.write_all(line.as_bytes())
        })();
        if let Err(e) = result {
            warn!(error = %e, path = %self.path.display(), "cannot write the multihop session log");
        }
    }

    /// The last `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let _guard = self.lock.lock();
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }
}

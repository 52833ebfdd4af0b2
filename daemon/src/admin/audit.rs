//! The audit log: one JSON line per state-changing action, from the HTTPS API (by token name)
//! and the socket (`"socket"`), in `<state_dir>/admin/audit.jsonl`. Past `max_bytes` the file
//! becomes `audit.jsonl.1` (the previous one dropped), so the log takes at most twice that.
//! A line holds the time, transport, token, module, action, the parameters with secrets
//! removed, and the outcome (`ok` or the error code); never a reply, a source address or a
//! VPN client's address.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde_json::{Map, Value, json};
use tracing::warn;

use crate::error::Error;

/// Parameter names whose values never reach the log.
const SECRET_WORDS: &[&str] = &["key", "secret", "token", "password", "psk"];
/// A string parameter is cut to this many characters in the log.
const MAX_VALUE_CHARS: usize = 256;

pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    file: Mutex<Option<(File, u64)>>,
}

/// One audited call.
pub struct Entry<'a> {
    pub transport: &'static str,
    pub token: &'a str,
    pub module: &'a str,
    pub action: &'a str,
    pub params: &'a Map<String, Value>,
    /// `None` on success, else the error code.
    pub code: Option<&'a str>,
}

fn redact(params: &Map<String, Value>) -> Map<String, Value> {
    params
        .iter()
        .map(|(k, v)| {
            let lower = k.to_ascii_lowercase();
            let v = if SECRET_WORDS.iter().any(|w| lower.contains(w)) {
                Value::String("[redacted]".into())
            } else {
                match v {
                    Value::String(s) if s.chars().count() > MAX_VALUE_CHARS => {
                        Value::String(s.chars().take(MAX_VALUE_CHARS).collect::<String>() + "…")
                    }
                    Value::String(_) | Value::Number(_) | Value::Bool(_) | Value::Null => v.clone(),
                    // Arrays and objects: their size only.
                    Value::Array(a) => Value::String(format!("[{} items]", a.len())),
                    Value::Object(o) => Value::String(format!("{{{} keys}}", o.len())),
                }
            };
            (truncate(k, 64).to_string(), v)
        })
        .collect()
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl AuditLog {
    /// The log in `dir` (`<state_dir>/admin`).
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(Self {
            path: dir.join("audit.jsonl"),
            max_bytes,
            file: Mutex::new(None),
        })
    }

    fn rotated(&self) -> PathBuf {
        self.path.with_extension("jsonl.1")
    }

    fn open_file(&self) -> std::io::Result<(File, u64)> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        let len = f.metadata()?.len();
        Ok((f, len))
    }

    /// Appends one line (blocking: call it off the runtime's workers). Written and synced
    /// before the reply goes out; a failure is logged, not fatal to the action.
    pub fn record(&self, e: &Entry<'_>) {
        let line = json!({
            "time": crate::protocol::timestamp_now(),
            "transport": e.transport,
            "token": e.token,
            "module": truncate(e.module, 64),
            "action": truncate(e.action, 64),
            "params": redact(e.params),
            "outcome": e.code.unwrap_or("ok"),
        });
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let result = (|| -> std::io::Result<()> {
            if guard.is_none() {
                *guard = Some(self.open_file()?);
            }
            if let Some((_, len)) = guard.as_ref()
                && *len + bytes.len() as u64 > self.max_bytes
                && *len > 0
            {
                *guard = None;
                std::fs::rename(&self.path, self.rotated())?;
                *guard = Some(self.open_file()?);
            }
            if let Some((f, len)) = guard.as_mut() {
                f.write_all(&bytes)?;
                f.sync_data()?;
                *len += bytes.len() as u64;
            }
            Ok(())
        })();
        if let Err(err) = result {
            *guard = None;
            warn!(error = %err, file = %self.path.display(), "cannot write the audit log");
        }
    }

    /// The newest `limit` entries, newest first (blocking).
    pub fn recent(&self, limit: usize) -> Result<Vec<Value>, Error> {
        let mut out = Vec::new();
        for path in [self.path.clone(), self.rotated()] {
            if out.len() >= limit {
                break;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&path, e)),
            };
            for line in text.lines().rev() {
                if out.len() >= limit {
                    break;
                }
                // A line cut by a crash mid-write is skipped.
                if let Ok(v) = serde_json::from_str::<Value>(line) {
                    out.push(v);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_redacts_rotates_and_reads_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 4096).unwrap();
        let mut params = Map::new();
        params.insert("client_name".into(), json!("alice"));
        params.insert("private_key".into(), json!("c2VjcmV0"));
        for i in 0..100 {
            params.insert("n".into(), json!(i));
            log.record(&Entry {
                transport: "https",
                token: "ci",
                module: "core",
                action: "add_client",
                params: &params,
                code: if i % 2 == 0 {
                    None
                } else {
                    Some("CLIENT_EXISTS")
                },
            });
        }
        let recent = log.recent(10).unwrap();
        assert_eq!(recent.len(), 10);
        assert_eq!(recent[0]["params"]["n"], 99);
        assert_eq!(recent[0]["outcome"], "CLIENT_EXISTS");
        assert_eq!(recent[1]["outcome"], "ok");
        assert_eq!(recent[0]["params"]["private_key"], "[redacted]");
        let all = log.recent(1000).unwrap();
        assert!(all.len() < 100, "rotated: the oldest are gone");
        assert!(
            std::fs::metadata(dir.path().join("audit.jsonl"))
                .unwrap()
                .len()
                <= 4096
        );
        assert!(
            std::fs::metadata(dir.path().join("audit.jsonl.1"))
                .unwrap()
                .len()
                <= 4096
        );
        // Newest first across the rotation.
        let ns: Vec<i64> = all
            .iter()
            .map(|v| v["params"]["n"].as_i64().unwrap())
            .collect();
        assert!(ns.windows(2).all(|w| w[0] > w[1]));
    }
}

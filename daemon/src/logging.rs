//! Structured logs: human-readable lines on stderr, and the most recent ones kept in memory so
//! `core service_logs` can return them without a journal.

use std::{
    collections::VecDeque,
    io::{IsTerminal, Write},
    sync::{Arc, Mutex},
};

use tracing_subscriber::{
    EnvFilter, Registry, fmt::MakeWriter, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

use crate::error::Error;

/// Why the log subscriber could not be installed or changed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot change log level: {0}")]
    Reload(#[source] reload::Error),
    /// A global subscriber is installed already.
    #[error("cannot install the log subscriber: {0}")]
    Install(#[source] tracing_subscriber::util::TryInitError),
    /// A level directive that does not parse (a configuration error).
    #[error(transparent)]
    Daemon(#[from] Error),
}

/// The last `capacity` formatted log lines.
#[derive(Clone)]
pub struct RecentLogs {
    inner: Arc<Mutex<Recent>>,
}

struct Recent {
    lines: VecDeque<String>,
    capacity: usize,
    partial: Vec<u8>,
}

impl RecentLogs {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Recent {
                lines: VecDeque::with_capacity(capacity.min(4096)),
                capacity,
                partial: Vec::new(),
            })),
        }
    }

    /// The newest `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let Ok(recent) = self.inner.lock() else {
            return Vec::new();
        };
        let skip = recent.lines.len().saturating_sub(n);
        recent.lines.iter().skip(skip).cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|r| r.lines.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn set_capacity(&self, capacity: usize) {
        if let Ok(mut recent) = self.inner.lock() {
            recent.capacity = capacity;
            while recent.lines.len() > capacity {
                recent.lines.pop_front();
            }
        }
    }
}

/// One `Write` per event, handed out by `MakeWriter`; complete lines go into the ring.
pub struct RecentWriter {
    inner: Arc<Mutex<Recent>>,
}

impl Write for RecentWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Ok(mut recent) = self.inner.lock() else {
            return Ok(buf.len());
        };
        recent.partial.extend_from_slice(buf);
        while let Some(pos) = recent.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = recent.partial.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if recent.lines.len() >= recent.capacity {
                recent.lines.pop_front();
            }
            recent.lines.push_back(text);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for RecentLogs {
    type Writer = RecentWriter;

    fn make_writer(&'a self) -> Self::Writer {
        RecentWriter {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// Changes the log filter of the running daemon (SIGHUP).
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    pub recent: RecentLogs,
}

/// The no-logging policy (seed 001): the embedded WireGuard library logs peers' endpoint
/// addresses at info level, so it is held to warnings unless the directive names it.
fn with_privacy(directive: &str) -> String {
    if directive.contains("boringtun") {
        directive.to_string()
    } else {
        format!("{directive},boringtun=warn")
    }
}

impl LogControl {
    pub fn set_level(&self, directive: &str) -> Result<(), LogError> {
        let filter = EnvFilter::try_new(with_privacy(directive))
            .map_err(|e| Error::config(format!("log.level = {directive:?}: {e}")))?;
        self.handle.reload(filter).map_err(LogError::Reload)
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, wins over the configured level.
/// Lines go to stderr as text, or as JSON objects when `json`; text written to the journal
/// (systemd's `JOURNAL_STREAM` names stderr) carries no time stamp of its own and no colour,
/// since the journal stamps every line. The in-memory ring (`core service_logs`) always keeps
/// stamped text.
pub fn init(level: &str, keep_lines: usize, json: bool) -> Result<LogControl, LogError> {
    let directive = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    let filter = EnvFilter::try_new(with_privacy(&directive))
        .map_err(|e| Error::config(format!("log level {directive:?}: {e}")))?;
    let (filter, handle) = reload::Layer::new(filter);
    let recent = RecentLogs::new(keep_lines);
    let journal = is_journal_stream(
        std::env::var("JOURNAL_STREAM").ok().as_deref(),
        stderr_dev_ino(),
    );
    let ansi =
        !journal && std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::registry()
        .with(filter)
        .with(json.then(|| {
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
        }))
        .with((!json && journal).then(|| {
            tracing_subscriber::fmt::layer()
                .without_time()
                .with_ansi(false)
                .with_writer(std::io::stderr)
        }))
        .with((!json && !journal).then(|| {
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(std::io::stderr)
        }))
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(recent.clone()),
        )
        .try_init()
        .map_err(LogError::Install)?;
    Ok(LogControl { handle, recent })
}

/// The device and inode of stderr, as systemd writes them into `JOURNAL_STREAM`.
fn stderr_dev_ino() -> Option<(u64, u64)> {
    let st = nix::sys::stat::fstat(std::io::stderr()).ok()?;
    Some((st.st_dev as u64, st.st_ino as u64))
}

/// Whether `journal_stream` (`JOURNAL_STREAM`, "<device>:<inode>") names `stderr`: systemd's
/// documented test that stderr is still the journal and not a file the variable was inherited
/// past.
fn is_journal_stream(journal_stream: Option<&str>, stderr: Option<(u64, u64)>) -> bool {
    let (Some(var), Some((dev, ino))) = (journal_stream, stderr) else {
        return false;
    };
    let Some((d, i)) = var.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_lines() -> std::io::Result<()> {
        let logs = RecentLogs::new(3);
        let mut w = logs.make_writer();
        for i in 0..5 {
            writeln!(w, "line {i}")?;
        }
        // A line split over two writes is still one line.
        w.write_all(b"par")?;
        w.write_all(b"tial\n")?;
        assert_eq!(logs.tail(10), vec!["line 3", "line 4", "partial"]);
        assert_eq!(logs.tail(1), vec!["partial"]);
        Ok(())
    }

    #[test]
    fn journal_stream_must_name_stderr_itself() {
        assert!(is_journal_stream(Some("8:1234"), Some((8, 1234))));
        // Inherited by a process whose stderr is now a file or a terminal.
        assert!(!is_journal_stream(Some("8:1234"), Some((8, 999))));
        assert!(!is_journal_stream(Some("8:1234"), None));
        assert!(!is_journal_stream(None, Some((8, 1234))));
        for bad in ["", "8", "8:", ":1234", "x:y"] {
            assert!(!is_journal_stream(Some(bad), Some((8, 1234))), "{bad:?}");
        }
    }
}

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
pub fn init(level: &str, keep_lines: usize) -> Result<LogControl, LogError> {
    let directive = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    let filter = EnvFilter::try_new(with_privacy(&directive))
        .map_err(|e| Error::config(format!("log level {directive:?}: {e}")))?;
    let (filter, handle) = reload::Layer::new(filter);
    let recent = RecentLogs::new(keep_lines);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(
                    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
                )
                .with_writer(std::io::stderr),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(recent.clone()),
        )
        .try_init()
        .map_err(LogError::Install)?;
    Ok(LogControl { handle, recent })
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
}

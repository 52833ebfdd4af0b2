//! The daemon crate's shared error type: configuration, files and sockets, the eBPF loader,
//! the state files every domain keeps. It sits below every domain (the layers of
//! `tests/layers.rs`), so it cannot name their errors: each domain has its own enum
//! (`wg::WgError`, `core::CoreError`, `multihop::MultihopError`, ...) that wraps this one, and
//! the daemon's start-up error (`daemon::DaemonError`) gathers them all.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Socket(#[from] std::io::Error),
    /// An SQLite database of the state directory would not open or configure.
    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// A JSON state file that does not parse.
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A value that cannot be written as JSON.
    #[error("cannot encode {path}: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A thread panicked while holding this lock.
    #[error("{0} lock poisoned")]
    LockPoisoned(&'static str),
    /// The admin socket answers: another daemon owns it.
    #[error("{path} is in use by another running daemon")]
    SocketInUse { path: PathBuf },
    #[error("eBPF: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("eBPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("eBPF pin: {0}")]
    Pin(#[from] aya::pin::PinError),
    #[error("eBPF link: {0}")]
    Link(#[from] aya::programs::links::LinkError),
    #[error(transparent)]
    Fault(#[from] crate::faults::InjectedFault),
    #[error("datapath: {0}")]
    Datapath(String),
    /// A kernel hash map is full: the insert was refused, the entries in it stay.
    #[error(
        "the kernel map {map} is full: the new entry is refused and the existing ones stay (raise [datapath] {setting}, or remove entries)"
    )]
    MapFull {
        map: &'static str,
        setting: &'static str,
    },
    /// A TCP listener (metrics, the blocklist API) cannot bind; `what` names it.
    #[error("cannot listen for {what} on {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A configuration value or a parameter that does not parse or is out of range; the message
/// names the key and what it must be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

impl From<InvalidValue> for Error {
    fn from(e: InvalidValue) -> Self {
        Error::Config(e.0)
    }
}

impl Error {
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

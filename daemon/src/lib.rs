//! Phantom's userspace daemon: one module per domain, each owning its state and exposing typed
//! actions on the admin socket. See docs/architecture.md.

pub mod admin;
pub mod blocklist;
pub mod config;
pub mod core;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod domain_hash;
pub mod domain_name;
pub mod error;
pub mod faults;
pub mod ghost;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod multihop;
pub mod notify;
pub mod open_files;
pub mod policy;
pub mod qr;
pub mod sentry;
pub mod source;
pub mod store;
pub mod tasks;
pub mod wg;

/// The admin socket's wire format, shared with `phantom-api` (crate `phantom-protocol`).
pub use phantom_protocol as protocol;

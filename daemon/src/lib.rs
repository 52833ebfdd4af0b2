//! Phantom's userspace daemon: one module per domain, each owning its state and exposing typed
//! actions on the admin socket. See docs/architecture.md.

pub mod admin;
pub mod blocklist;
pub mod config;
pub mod context;
pub mod core;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod error;
pub mod ghost;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod multihop;
pub mod protocol;
pub mod qr;
pub mod resolver;
pub mod sentry;
pub mod store;

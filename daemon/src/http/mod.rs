//! The HTTP layer every public listener uses: one accept loop, one connection gate, one set of
//! limits (header-read and idle timeouts, connection caps in total and per source, body limit,
//! graceful shutdown), tested once here. See docs/architecture.md, "The HTTP layer".
//!
//! - [`Limits`]: the values, with every listener's preset in `limits.rs`.
//! - [`Gate`]: the connection caps, checked at accept; a connection holds a [`Pass`].
//! - [`next_connection`] / [`next_admitted`]: accept until shutdown, with a back-off after a
//!   failed accept.
//! - [`Server::serve`]: hyper HTTP/1.1 on a listener with all of the above, for any hyper
//!   service (or an axum router through [`router`]); [`Server::serve_tls`] the same over
//!   rustls, the handshake within the header-read timeout.
//! - [`certs`]: certificates for the TLS listeners: files, self-signed, ACME (HTTP-01).
//! - [`SharedPort`]: one TLS port for two services (the sentry's, joined by ghost), told
//!   apart by the first request's prefix; [`Server::serve_tls_shared`] serves the owner's side.
//! - [`listeners`]: every listener's connection counters (open, admitted, refused by reason),
//!   by the name in its `Limits`, for the metrics.

mod accept;
pub mod certs;
mod gate;
mod limits;
mod server;
pub mod share;
mod stats;
#[cfg(test)]
mod tests;
mod tls;

pub use accept::{bind, next_admitted, next_connection};
pub use certs::CertError;
pub use gate::{Gate, GateCounts, Pass, Refusal};
pub use limits::Limits;
pub use server::{BoxError, RequestBody, ResponseBody, Server, router, too_large};
pub use share::{Joiner, SharedPort};
pub use stats::{ListenerCounts, listeners};
pub use tls::{CertSlot, TlsConfigError, certified_key, server_config as tls_server_config};

//! Every limit of every public listener, in one place. A listener takes one preset; tests build
//! their own `Limits` with short values.

use std::time::Duration;

use crate::source::SourcePrefix;

/// What one listener allows a client. docs/architecture.md ("The HTTP layer") has the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The listener's name in the metrics (`listener` label of `phantom_http_*`); every gate
    /// made with these limits counts under it.
    pub listener: &'static str,
    /// From the moment a connection is accepted, or its previous response was sent, until the
    /// next request head is complete. Over it the connection is closed without an answer (a
    /// client trickling its headers holds a connection for at most this long). The ghost
    /// relay applies it to TLS plus the WebSocket upgrade.
    pub header_read_timeout: Duration,
    /// From a request's head to the last byte of its response: past it the connection is cut
    /// (a client that stops reading a large body cannot keep its connection, or a transfer
    /// slot, forever). `None`: no bound (the listener bounds its own work).
    pub response_timeout: Option<Duration>,
    /// A keep-alive connection with no request in flight is closed after this long. hyper's
    /// header-read clock also runs while a connection waits for its next request, so a value
    /// over `header_read_timeout` acts as `header_read_timeout`. The ghost relay applies it to
    /// an open tunnel that carries no frame.
    pub idle_timeout: Duration,
    /// Connections open at once on the listener (every thread of it); one more is closed at
    /// accept, before any byte is read.
    pub max_connections: usize,
    /// Connections open at once from one source: an IPv4 address, or an IPv6 /64 (one
    /// subscriber's prefix; a host can pick any address in it). One more is closed at accept.
    pub max_connections_per_source: usize,
    /// Request bodies larger than this get 413 (declared length) or end in an error where the
    /// handler reads past it (streamed).
    pub max_body_bytes: u64,
    /// After shutdown: how long requests in flight may take to finish before their
    /// connections are cut. Idle connections close at once; no new one is accepted.
    pub shutdown_grace: Duration,
    /// What one source is for the per-source cap (`[sources] ipv6_prefix`: an IPv6 address
    /// counts as its prefix). Presets take the default; the daemon sets the configured one
    /// with [`Limits::with_source_prefix`].
    pub source_prefix: SourcePrefix,
}

impl Limits {
    /// These limits with `[sources] ipv6_prefix`.
    pub const fn with_source_prefix(self, source_prefix: SourcePrefix) -> Self {
        Self {
            source_prefix,
            ..self
        }
    }
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

impl Limits {
    /// `/metrics` (`[metrics] listen`, loopback by default): a scraper or two and an
    /// operator's curl.
    pub const fn metrics() -> Self {
        Self {
            listener: "metrics",
            // An encode takes milliseconds and a scrape is small: 30 s is a stalled reader.
            response_timeout: Some(secs(30)),
            // A scraper sends its whole request at once; 10 s is a loaded network's worst.
            header_read_timeout: secs(10),
            // Scrapes come every 15-60 s; reconnecting for each costs nothing worth a slot.
            idle_timeout: secs(10),
            // Scrapers (an HA pair or two), dashboards and operators fit many times over.
            max_connections: 64,
            // Prometheus opens one connection per target; 16 leaves room for a few behind one
            // address and keeps one runaway script from taking the other 48.
            max_connections_per_source: 16,
            // Scrapes are GETs without a body.
            max_body_bytes: 1024,
            // An encode takes milliseconds; a scrape in flight ends well within 5 s.
            shutdown_grace: secs(5),
            source_prefix: SourcePrefix::DEFAULT,
        }
    }

    /// The public blocklist API (`[blocklist] api_listen`): apps and other Phantoms fetching
    /// the list, open to the internet.
    pub const fn blocklist_api() -> Self {
        Self {
            listener: "blocklist_api",
            // A full list (gzip) of a million domains is ~20 MB: minutes on a slow mobile link,
            // not more; a client that stops reading gives its transfer slot back.
            response_timeout: Some(secs(300)),
            // Clients send one small GET or POST at once; a slow link still takes well under
            // 10 s, a slow-headers attacker gets no longer.
            header_read_timeout: secs(10),
            // Clients sync every few minutes at most; a kept-alive connection only helps the
            // follow-up request of one sync (patterns after the list).
            idle_timeout: secs(10),
            // Phones and other Phantoms syncing; a full list is made once per version and
            // shared, its transfers bounded apart (blocklist/api.rs).
            max_connections: 1024,
            // Carrier-grade NAT puts many phones behind one address, each syncing with one
            // connection; the per-client rate limit (120 a minute) does the rest.
            max_connections_per_source: 32,
            // The largest request is `{"domain": "..."}` (seed 001: 4 KiB).
            max_body_bytes: 4096,
            // A full list to a slow client may take a few seconds.
            shutdown_grace: secs(10),
            source_prefix: SourcePrefix::DEFAULT,
        }
    }

    /// The sentry's reverse proxy (`[sentry] listen`), in front of a busy site;
    /// `max_body_bytes` is `[sentry] max_body_bytes`.
    pub const fn sentry_proxy(max_body_bytes: u64) -> Self {
        Self {
            listener: "sentry_proxy",
            // The site's own downloads and long polls may take as long as they take; the proxy
            // bounds the upstream exchange itself.
            response_timeout: None,
            // What the proxy had before this layer (and hyper's default).
            header_read_timeout: secs(30),
            // A page's sub-resources and a reader's next click come within seconds; an idle
            // connection holds a slot a flood would like to fill.
            idle_timeout: secs(15),
            // Well above a busy site's concurrent visitors at a few connections each (nginx's
            // default is 512 per worker); RLIMIT_NOFILE must allow it (each also holds an
            // upstream connection at times).
            max_connections: 16_384,
            // A browser opens about 6 per site; 256 lets an office or a carrier-grade NAT in
            // while one address cannot hold more than 1/64 of the slots. `trusted_proxies`
            // are exempt (every client comes through them).
            max_connections_per_source: 256,
            max_body_bytes,
            // Uploads and downloads in flight get 10 s to finish; shutdown must not hang on
            // a slow client.
            shutdown_grace: secs(10),
            source_prefix: SourcePrefix::DEFAULT,
        }
    }

    /// The admin HTTPS API (`[admin] http_listen`): scripts and a browser, behind the API's
    /// own allowlist, tokens and rate limits (admin/web).
    pub const fn admin_api() -> Self {
        Self {
            listener: "admin_api",
            // Dashboard pages and scripts' replies are small.
            response_timeout: Some(secs(60)),
            // Admin clients are few and near; 10 s is generous.
            header_read_timeout: secs(10),
            // A dashboard polls every few seconds and reuses its connections.
            idle_timeout: secs(10),
            // A handful of operators and scripts.
            max_connections: 256,
            // One browser (about 6) plus scripts from the same workstation.
            max_connections_per_source: 32,
            // Configuration and list edits; imports of large files go through files, not
            // request bodies.
            max_body_bytes: 1024 * 1024,
            shutdown_grace: secs(10),
            source_prefix: SourcePrefix::DEFAULT,
        }
    }

    /// The ghost relay (`[ghost] listen:port`) before the WebSocket upgrade: TLS and the
    /// upgrade request from wstunnel clients. The caps count handshakes; an open tunnel
    /// leaves the gate (the relay caps tunnels itself).
    pub const fn ghost_relay() -> Self {
        Self {
            listener: "ghost_relay",
            // No HTTP response: the relay answers the upgrade and then carries frames.
            response_timeout: None,
            // TLS plus the upgrade: what the relay had before this layer.
            header_read_timeout: secs(10),
            // An open tunnel without any frame: the stock client pings every 30 s, so this
            // is three missed pings (what the relay had before this layer).
            idle_timeout: secs(95),
            // Handshakes in progress at once (TLS costs CPU); what the relay had before.
            max_connections: 256,
            // A wstunnel client opens one connection per WireGuard peer and retries in a
            // loop; a household behind one address needs a few at once, a flood gets no
            // more than 1/16 of the handshake slots.
            max_connections_per_source: 16,
            // The upgrade request has no body.
            max_body_bytes: 0,
            // At stop every tunnel gets a close frame at once; there is nothing to drain.
            shutdown_grace: Duration::ZERO,
            source_prefix: SourcePrefix::DEFAULT,
        }
    }
}

//! The sentry's state store: the seed's key schema (`sentry:` prefix) behind one interface
//! with two backends of the same semantics.
//!
//! - `embedded` (default): in memory, made durable by a journal and snapshots in the state
//!   directory — config, state, whitelist, tickets, penalties and used nonces survive a
//!   restart (and `kill -9`).
//! - `redis` (`redis_url`): a fleet of hosts shares tickets, penalties, whitelist, mode,
//!   config and the public keys that verify each other's challenges.
//!
//! Keys: `sentry:config` (hash), `sentry:state` (hash: current_mode, last_incident_time),
//! `sentry:whitelist:set` (set), `sentry:req_count:<source>` (5 s),
//! `sentry:penalty_box:<source>` (TTL penalty_ttl × count), `sentry:trust_ticket:<source>`
//! (ticket TTL), where `<source>` is an IPv4 address or an IPv6 prefix
//! (`2001:db8:1:2::/64`, `[sources] ipv6_prefix`),
//! `sentry:global_traffic_per_sec` (list, newest first, 300 entries), `sentry:traffic_stats`
//! (hash: mean, std_dev), `sentry:used_nonces:<session_nonce>` (until the challenge expires,
//! at least 60 s), `sentry:keys` (hash: kid -> JWK) for the fleet's verification keys, and
//! `sentry:issued:<package digest>` (until the challenge expires; Redis only) for the
//! packages the fleet issued, which authenticate a proof without an ECDSA verification.

pub mod embedded;
pub mod redis;

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use super::{Mode, SentryError, Tunables};
use crate::source::Source;

pub const PREFIX: &str = "sentry:";
/// A used nonce is remembered at least this long.
pub const MIN_NONCE_TTL: u64 = 60;
/// Samples kept in `global_traffic_per_sec`.
pub const TRAFFIC_WINDOW: usize = 300;

/// `sentry:state`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModeState {
    pub current_mode: Mode,
    /// Unix seconds of the last anomaly (0 = never).
    pub last_incident_time: u64,
}

impl Default for ModeState {
    fn default() -> Self {
        Self {
            current_mode: Mode::Normal,
            last_incident_time: 0,
        }
    }
}

/// One `penalty_box` entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PenaltyEntry {
    /// The source: an IPv4 address or an IPv6 prefix.
    pub address: Source,
    pub count: u64,
    pub expires_in_seconds: u64,
}

/// `sentry:traffic_stats`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrafficStats {
    pub mean: f64,
    pub std_dev: f64,
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The one interface both backends implement (enum dispatch keeps the hot path free of
/// boxed futures).
pub enum Store {
    Embedded(Box<embedded::EmbeddedStore>),
    Redis(redis::RedisStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Embedded($s) => $e.await,
            Store::Redis($s) => $e.await,
        }
    };
}

impl Store {
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Embedded(_) => "embedded",
            Store::Redis(_) => "redis",
        }
    }

    /// Whether the backend answers.
    pub async fn ping(&self) -> Result<(), SentryError> {
        dispatch!(self, s => s.ping())
    }

    pub async fn get_config(&self) -> Result<Option<Tunables>, SentryError> {
        dispatch!(self, s => s.get_config())
    }

    pub async fn set_config(&self, t: &Tunables) -> Result<(), SentryError> {
        dispatch!(self, s => s.set_config(t))
    }

    pub async fn get_state(&self) -> Result<Option<ModeState>, SentryError> {
        dispatch!(self, s => s.get_state())
    }

    pub async fn set_state(&self, state: &ModeState) -> Result<(), SentryError> {
        dispatch!(self, s => s.set_state(state))
    }

    pub async fn whitelist(&self) -> Result<Vec<IpAddr>, SentryError> {
        dispatch!(self, s => s.whitelist())
    }

    pub async fn whitelist_contains(&self, ip: IpAddr) -> Result<bool, SentryError> {
        dispatch!(self, s => s.whitelist_contains(ip))
    }

    /// Returns whether it was new.
    pub async fn whitelist_add(&self, ip: IpAddr) -> Result<bool, SentryError> {
        dispatch!(self, s => s.whitelist_add(ip))
    }

    /// Returns whether it was there.
    pub async fn whitelist_remove(&self, ip: IpAddr) -> Result<bool, SentryError> {
        dispatch!(self, s => s.whitelist_remove(ip))
    }

    /// The Unix expiry of the source's trust ticket, if it has one.
    pub async fn ticket(&self, source: Source) -> Result<Option<u64>, SentryError> {
        dispatch!(self, s => s.ticket(source))
    }

    pub async fn set_ticket(&self, source: Source, ttl: u64) -> Result<u64, SentryError> {
        dispatch!(self, s => s.set_ticket(source, ttl))
    }

    /// Takes a ticket away (its holder flooded past the ticket ceiling).
    pub async fn clear_ticket(&self, source: Source) -> Result<(), SentryError> {
        dispatch!(self, s => s.clear_ticket(source))
    }

    /// Raises the source's violation count; the entry then lives `ttl_unit × count` seconds.
    /// Returns the new count.
    pub async fn penalty_incr(&self, source: Source, ttl_unit: u64) -> Result<u64, SentryError> {
        dispatch!(self, s => s.penalty_incr(source, ttl_unit))
    }

    pub async fn penalty(&self, source: Source) -> Result<Option<PenaltyEntry>, SentryError> {
        dispatch!(self, s => s.penalty(source))
    }

    /// Live penalties, at most `limit`, highest count first.
    pub async fn penalties(&self, limit: usize) -> Result<Vec<PenaltyEntry>, SentryError> {
        let mut all = dispatch!(self, s => s.penalties(limit))?;
        all.sort_by(|a, b| b.count.cmp(&a.count).then(a.address.cmp(&b.address)));
        all.truncate(limit);
        Ok(all)
    }

    pub async fn clear_penalty(&self, source: Source) -> Result<bool, SentryError> {
        dispatch!(self, s => s.clear_penalty(source))
    }

    /// Marks a session nonce used, atomically: true if it was fresh, false if already used.
    pub async fn use_nonce(&self, nonce: &str, ttl: u64) -> Result<bool, SentryError> {
        let ttl = ttl.max(MIN_NONCE_TTL);
        dispatch!(self, s => s.use_nonce(nonce, ttl))
    }

    /// Publishes the per-source 5 s counts of this host (`req_count:<source>`).
    pub async fn publish_counts(&self, counts: &[(Source, u64)]) -> Result<(), SentryError> {
        if counts.is_empty() {
            return Ok(());
        }
        dispatch!(self, s => s.publish_counts(counts))
    }

    pub async fn req_count(&self, source: Source) -> Result<u64, SentryError> {
        dispatch!(self, s => s.req_count(source))
    }

    /// Replaces `global_traffic_per_sec` (given oldest first) and `traffic_stats`.
    pub async fn put_traffic(
        &self,
        series: &[u64],
        stats: TrafficStats,
    ) -> Result<(), SentryError> {
        dispatch!(self, s => s.put_traffic(series, stats))
    }

    /// The stored series, oldest first, and the stats.
    pub async fn traffic(&self) -> Result<(Vec<u64>, Option<TrafficStats>), SentryError> {
        dispatch!(self, s => s.traffic())
    }

    pub async fn publish_key(&self, kid: &str, jwk: &str) -> Result<(), SentryError> {
        dispatch!(self, s => s.publish_key(kid, jwk))
    }

    pub async fn keys(&self) -> Result<BTreeMap<String, String>, SentryError> {
        dispatch!(self, s => s.keys())
    }

    /// Whether the backend keeps records of the packages a fleet issued. The embedded store
    /// serves one host, whose signer remembers its own packages; nothing to share.
    pub fn records_issued(&self) -> bool {
        matches!(self, Store::Redis(_))
    }

    /// Records a package digest (b64url) as issued, for `ttl` seconds (the challenge's life).
    pub async fn record_issued(&self, digest: &str, ttl: u64) -> Result<(), SentryError> {
        match self {
            Store::Embedded(_) => Ok(()),
            Store::Redis(s) => s.record_issued(digest, ttl.max(1)).await,
        }
    }

    /// The source's ticket and, in the same round trip, the record of a package just issued
    /// to it (on Redis: one pipeline; the embedded store keeps no records).
    pub async fn ticket_and_record(
        &self,
        source: Source,
        digest: &str,
        ttl: u64,
    ) -> Result<Option<u64>, SentryError> {
        match self {
            Store::Embedded(s) => s.ticket(source).await,
            Store::Redis(s) => s.ticket_and_record(source, digest, ttl.max(1)).await,
        }
    }

    /// Whether a host of the fleet recorded this package digest as issued.
    pub async fn issued_recorded(&self, digest: &str) -> Result<bool, SentryError> {
        match self {
            Store::Embedded(_) => Ok(false),
            Store::Redis(s) => s.issued_recorded(digest).await,
        }
    }

    /// Every second: the embedded backend's upkeep (expiry, a snapshot when one is due); never
    /// waits on the disk. Nothing on Redis.
    pub fn maintain(&self) {
        if let Store::Embedded(s) = self {
            s.maintain();
        }
    }

    /// Blocks until every change the embedded backend took is durable (shutdown, tests);
    /// nothing on Redis, which answers only once it holds a change.
    pub fn flush(&self) -> Result<(), SentryError> {
        match self {
            Store::Embedded(s) => s.flush(),
            Store::Redis(_) => Ok(()),
        }
    }

    /// Round trips to the backend so far (Redis; 0 for the embedded store).
    /// Gives the calling thread a store connection of its own while the lane is held (Redis;
    /// the embedded store is in process and needs none). See
    /// [`redis::RedisStore::attach_thread`].
    pub fn attach_thread(&self) -> Result<Option<redis::Lane>, SentryError> {
        match self {
            Store::Embedded(_) => Ok(None),
            Store::Redis(s) => s.attach_thread().map(Some),
        }
    }

    pub fn round_trips(&self) -> u64 {
        match self {
            Store::Embedded(_) => 0,
            Store::Redis(s) => s.round_trips(),
        }
    }
}

/// Tunables as the flat string fields of the `sentry:config` hash.
pub fn tunables_to_fields(t: &Tunables) -> Vec<(String, String)> {
    match serde_json::to_value(t) {
        Ok(serde_json::Value::Object(map)) => {
            map.into_iter().map(|(k, v)| (k, v.to_string())).collect()
        }
        _ => Vec::new(),
    }
}

/// Back from the hash; fields missing (an older host wrote it) keep their defaults.
pub fn tunables_from_fields(
    fields: impl IntoIterator<Item = (String, String)>,
) -> Option<Tunables> {
    let mut map = match serde_json::to_value(Tunables::default()) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => return None,
    };
    let mut any = false;
    for (k, v) in fields {
        if map.contains_key(&k)
            && let Ok(v) = serde_json::from_str(&v)
        {
            map.insert(k, v);
            any = true;
        }
    }
    if !any {
        return None;
    }
    let t: Tunables = serde_json::from_value(serde_json::Value::Object(map)).ok()?;
    t.validate().ok()?;
    Some(t)
}

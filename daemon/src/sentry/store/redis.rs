//! The Redis backend: the same key schema in a Redis shared by a fleet of hosts. The
//! connection manager reconnects by itself; every command has a short timeout so a dead
//! Redis costs the proxy a bounded wait, and the sentry stops asking it while it is marked
//! degraded (see `Sentry::store_call`).

use std::{
    cell::RefCell,
    collections::BTreeMap,
    marker::PhantomData,
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use redis::{
    Client, Value as RedisValue,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

use super::{
    ModeState, PREFIX, PenaltyEntry, TRAFFIC_WINDOW, TrafficStats, tunables_from_fields,
    tunables_to_fields, unix_now,
};
use crate::{
    sentry::{Mode, SentryError, Tunables},
    source::Source,
};

/// Keys read per pipelined round trip when listing penalties.
const PIPELINE_CHUNK: usize = 1_000;

/// Tells stores apart in a thread's lanes (tests and benches run several in one process).
static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's own connections, by store: a thread that serves on a runtime of its own
    /// (a proxy thread) talks to Redis without leaving the thread. Through the shared
    /// connection, whose task lives on the daemon's main runtime, every call was two
    /// hand-offs between threads (there and back), each a wake-up that waits for a CPU on a
    /// busy host.
    static LANES: RefCell<Vec<(u64, ConnectionManager)>> = const { RefCell::new(Vec::new()) };
}

/// A thread's own connection to the store's Redis, in use by that thread's calls while this
/// is held (see [`RedisStore::attach_thread`]). Not `Send`: it belongs to the thread.
pub struct Lane {
    store: u64,
    _thread: PhantomData<*const ()>,
}

impl Drop for Lane {
    fn drop(&mut self) {
        // At thread exit the lanes may already be gone; nothing is left to remove then.
        let _ = LANES.try_with(|l| l.borrow_mut().retain(|(id, _)| *id != self.store));
    }
}

pub struct RedisStore {
    conn: ConnectionManager,
    /// For the per-thread lanes: the same server and settings as `conn` (boxed: the store
    /// enum stays small).
    lane_source: Box<(Client, ConnectionManagerConfig)>,
    id: u64,
    penalty_script: redis::Script,
    /// Commands and pipelines sent (each one round trip), for the benchmarks.
    round_trips: AtomicU64,
}

fn key(suffix: &str) -> String {
    format!("{PREFIX}{suffix}")
}

/// `sentry:<kind>:<source>`: an IPv4 address or an IPv6 prefix (`2001:db8:1:2::/64`).
fn source_key(kind: &str, source: Source) -> String {
    format!("{PREFIX}{kind}:{source}")
}

impl RedisStore {
    /// Connects lazily: the daemon starts even while Redis is down, and the manager keeps
    /// trying.
    pub fn connect(url: &str) -> Result<Self, SentryError> {
        let client = Client::open(url)
            .map_err(|e| SentryError::Config(format!("redis_url {url:?}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(SentryError::Redis)?;
        Ok(Self {
            conn,
            lane_source: Box::new((client, config)),
            id: NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed),
            round_trips: AtomicU64::new(0),
            penalty_script: redis::Script::new(
                "local c = redis.call('INCR', KEYS[1]) \
                 redis.call('EXPIRE', KEYS[1], c * tonumber(ARGV[1])) \
                 return c",
            ),
        })
    }

    /// Gives the calling thread a connection of its own (made on first use, on the runtime
    /// the thread is in, which must outlive the lane), used by this thread's calls until the
    /// lane is dropped. For a thread that runs a current-thread runtime for as long as it
    /// serves: its calls then never wait on another thread. Same timeouts and reconnection as
    /// the shared connection.
    pub fn attach_thread(&self) -> Result<Lane, SentryError> {
        let conn = ConnectionManager::new_lazy_with_config(
            self.lane_source.0.clone(),
            self.lane_source.1.clone(),
        )
        .map_err(SentryError::Redis)?;
        LANES.with(|l| {
            let mut l = l.borrow_mut();
            l.retain(|(id, _)| *id != self.id);
            l.push((self.id, conn));
        });
        Ok(Lane {
            store: self.id,
            _thread: PhantomData,
        })
    }

    /// The calling thread's lane, else the shared connection.
    fn conn(&self) -> ConnectionManager {
        LANES
            .try_with(|l| {
                l.borrow()
                    .iter()
                    .find(|(id, _)| *id == self.id)
                    .map(|(_, c)| c.clone())
            })
            .ok()
            .flatten()
            .unwrap_or_else(|| self.conn.clone())
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, SentryError> {
        let mut conn = self.conn();
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        cmd.query_async(&mut conn).await.map_err(SentryError::Redis)
    }

    async fn pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, SentryError> {
        let mut conn = self.conn();
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        pipe.query_async(&mut conn)
            .await
            .map_err(SentryError::Redis)
    }

    /// Commands and pipelines sent so far (each one round trip).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    pub async fn ping(&self) -> Result<(), SentryError> {
        let _: String = self.query(&redis::cmd("PING")).await?;
        Ok(())
    }

    pub async fn get_config(&self) -> Result<Option<Tunables>, SentryError> {
        let fields: BTreeMap<String, String> =
            self.query(redis::cmd("HGETALL").arg(key("config"))).await?;
        Ok(tunables_from_fields(fields))
    }

    pub async fn set_config(&self, t: &Tunables) -> Result<(), SentryError> {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(key("config"));
        for (k, v) in tunables_to_fields(t) {
            cmd.arg(k).arg(v);
        }
        let _: i64 = self.query(&cmd).await?;
        Ok(())
    }

    pub async fn get_state(&self) -> Result<Option<ModeState>, SentryError> {
        let fields: BTreeMap<String, String> =
            self.query(redis::cmd("HGETALL").arg(key("state"))).await?;
        let Some(mode) = fields.get("current_mode").and_then(|m| Mode::parse(m)) else {
            return Ok(None);
        };
        Ok(Some(ModeState {
            current_mode: mode,
            last_incident_time: fields
                .get("last_incident_time")
                .and_then(|t| t.parse().ok())
                .unwrap_or(0),
        }))
    }

    pub async fn set_state(&self, state: &ModeState) -> Result<(), SentryError> {
        let _: i64 = self
            .query(
                redis::cmd("HSET")
                    .arg(key("state"))
                    .arg("current_mode")
                    .arg(state.current_mode.name())
                    .arg("last_incident_time")
                    .arg(state.last_incident_time),
            )
            .await?;
        Ok(())
    }

    pub async fn whitelist(&self) -> Result<Vec<IpAddr>, SentryError> {
        let members: Vec<String> = self
            .query(redis::cmd("SMEMBERS").arg(key("whitelist:set")))
            .await?;
        let mut out: Vec<IpAddr> = members.iter().filter_map(|m| m.parse().ok()).collect();
        out.sort();
        Ok(out)
    }

    pub async fn whitelist_contains(&self, ip: IpAddr) -> Result<bool, SentryError> {
        self.query(
            redis::cmd("SISMEMBER")
                .arg(key("whitelist:set"))
                .arg(ip.to_string()),
        )
        .await
    }

    pub async fn whitelist_add(&self, ip: IpAddr) -> Result<bool, SentryError> {
        let n: i64 = self
            .query(
                redis::cmd("SADD")
                    .arg(key("whitelist:set"))
                    .arg(ip.to_string()),
            )
            .await?;
        Ok(n == 1)
    }

    pub async fn whitelist_remove(&self, ip: IpAddr) -> Result<bool, SentryError> {
        let n: i64 = self
            .query(
                redis::cmd("SREM")
                    .arg(key("whitelist:set"))
                    .arg(ip.to_string()),
            )
            .await?;
        Ok(n == 1)
    }

    pub async fn ticket(&self, source: Source) -> Result<Option<u64>, SentryError> {
        let ttl: i64 = self
            .query(redis::cmd("TTL").arg(source_key("trust_ticket", source)))
            .await?;
        Ok((ttl > 0).then(|| unix_now() + ttl as u64))
    }

    pub async fn set_ticket(&self, source: Source, ttl: u64) -> Result<u64, SentryError> {
        let _: String = self
            .query(
                redis::cmd("SET")
                    .arg(source_key("trust_ticket", source))
                    .arg(1)
                    .arg("EX")
                    .arg(ttl.max(1)),
            )
            .await?;
        Ok(unix_now() + ttl)
    }

    pub async fn clear_ticket(&self, source: Source) -> Result<(), SentryError> {
        let _: i64 = self
            .query(redis::cmd("DEL").arg(source_key("trust_ticket", source)))
            .await?;
        Ok(())
    }

    pub async fn penalty_incr(&self, source: Source, ttl_unit: u64) -> Result<u64, SentryError> {
        let mut conn = self.conn();
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let n: i64 = self
            .penalty_script
            .key(source_key("penalty_box", source))
            .arg(ttl_unit.max(1))
            .invoke_async(&mut conn)
            .await
            .map_err(SentryError::Redis)?;
        Ok(n.max(0) as u64)
    }

    /// The penalty entries of `keys` (with their sources), in pipelined round trips of
    /// `PIPELINE_CHUNK` keys.
    async fn entries(&self, keys: &[(String, Source)]) -> Result<Vec<PenaltyEntry>, SentryError> {
        let mut out = Vec::new();
        for chunk in keys.chunks(PIPELINE_CHUNK) {
            let mut pipe = redis::pipe();
            for (k, _) in chunk {
                pipe.cmd("GET").arg(k).cmd("TTL").arg(k);
            }
            let values: Vec<RedisValue> = self.pipeline(&pipe).await?;
            for ((_, source), pair) in chunk.iter().zip(values.chunks(2)) {
                let (Some(count), Some(ttl)) = (pair.first(), pair.get(1)) else {
                    continue;
                };
                let count: Option<u64> = redis::from_redis_value_ref(count).ok().flatten();
                let ttl: i64 = redis::from_redis_value_ref(ttl).unwrap_or(-2);
                if let Some(count) = count
                    && ttl > 0
                {
                    out.push(PenaltyEntry {
                        address: *source,
                        count,
                        expires_in_seconds: ttl as u64,
                    });
                }
            }
        }
        Ok(out)
    }

    pub async fn penalty(&self, source: Source) -> Result<Option<PenaltyEntry>, SentryError> {
        let k = source_key("penalty_box", source);
        Ok(self.entries(&[(k, source)]).await?.into_iter().next())
    }

    pub async fn penalties(&self, limit: usize) -> Result<Vec<PenaltyEntry>, SentryError> {
        let pattern = key("penalty_box:*");
        let mut cursor: u64 = 0;
        let mut keys = Vec::new();
        // Bounded walk: a huge penalty box is listed partially rather than stalling.
        for _ in 0..1_000 {
            let (next, batch): (u64, Vec<String>) = self
                .query(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1_000),
                )
                .await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 || keys.len() >= limit.max(1) * 4 {
                break;
            }
        }
        let keys: Vec<(String, Source)> = keys
            .into_iter()
            .filter_map(|k| {
                let source = k
                    .strip_prefix(&pattern[..pattern.len() - 1])
                    .and_then(|s| s.parse::<Source>().ok())?;
                Some((k, source))
            })
            .collect();
        self.entries(&keys).await
    }

    pub async fn clear_penalty(&self, source: Source) -> Result<bool, SentryError> {
        let n: i64 = self
            .query(redis::cmd("DEL").arg(source_key("penalty_box", source)))
            .await?;
        Ok(n == 1)
    }

    pub async fn use_nonce(&self, nonce: &str, ttl: u64) -> Result<bool, SentryError> {
        let reply: RedisValue = self
            .query(
                redis::cmd("SET")
                    .arg(key(&format!("used_nonces:{nonce}")))
                    .arg(1)
                    .arg("NX")
                    .arg("EX")
                    .arg(ttl),
            )
            .await?;
        Ok(!matches!(reply, RedisValue::Nil))
    }

    pub async fn publish_counts(&self, counts: &[(Source, u64)]) -> Result<(), SentryError> {
        let mut pipe = redis::pipe();
        for (source, n) in counts {
            pipe.cmd("SET")
                .arg(source_key("req_count", *source))
                .arg(*n)
                .arg("EX")
                .arg(5)
                .ignore();
        }
        self.pipeline::<()>(&pipe).await
    }

    pub async fn req_count(&self, source: Source) -> Result<u64, SentryError> {
        let n: Option<u64> = self
            .query(redis::cmd("GET").arg(source_key("req_count", source)))
            .await?;
        Ok(n.unwrap_or(0))
    }

    pub async fn put_traffic(
        &self,
        series: &[u64],
        stats: TrafficStats,
    ) -> Result<(), SentryError> {
        let list = key("global_traffic_per_sec");
        let skip = series.len().saturating_sub(TRAFFIC_WINDOW);
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("DEL").arg(&list).ignore();
        if series.len() > skip {
            // LPUSH of the oldest-first series leaves the newest at the head, as in the seed.
            pipe.cmd("LPUSH").arg(&list).arg(&series[skip..]).ignore();
        }
        pipe.cmd("HSET")
            .arg(key("traffic_stats"))
            .arg("mean")
            .arg(stats.mean)
            .arg("std_dev")
            .arg(stats.std_dev)
            .ignore()
            .cmd("EXPIRE")
            .arg(key("traffic_stats"))
            .arg(60)
            .ignore();
        self.pipeline::<()>(&pipe).await
    }

    pub async fn traffic(&self) -> Result<(Vec<u64>, Option<TrafficStats>), SentryError> {
        let mut newest_first: Vec<u64> = self
            .query(
                redis::cmd("LRANGE")
                    .arg(key("global_traffic_per_sec"))
                    .arg(0)
                    .arg(TRAFFIC_WINDOW as i64 - 1),
            )
            .await?;
        newest_first.reverse();
        let fields: BTreeMap<String, String> = self
            .query(redis::cmd("HGETALL").arg(key("traffic_stats")))
            .await?;
        let stats = match (
            fields.get("mean").and_then(|v| v.parse().ok()),
            fields.get("std_dev").and_then(|v| v.parse().ok()),
        ) {
            (Some(mean), Some(std_dev)) => Some(TrafficStats { mean, std_dev }),
            _ => None,
        };
        Ok((newest_first, stats))
    }

    pub async fn publish_key(&self, kid: &str, jwk: &str) -> Result<(), SentryError> {
        let _: i64 = self
            .query(redis::cmd("HSET").arg(key("keys")).arg(kid).arg(jwk))
            .await?;
        Ok(())
    }

    pub async fn keys(&self) -> Result<BTreeMap<String, String>, SentryError> {
        self.query(redis::cmd("HGETALL").arg(key("keys"))).await
    }

    pub async fn record_issued(&self, digest: &str, ttl: u64) -> Result<(), SentryError> {
        let _: RedisValue = self
            .query(
                redis::cmd("SET")
                    .arg(key(&format!("issued:{digest}")))
                    .arg(1)
                    .arg("EX")
                    .arg(ttl),
            )
            .await?;
        Ok(())
    }

    /// TTL of the ticket and SET of the issued record, pipelined: one round trip.
    pub async fn ticket_and_record(
        &self,
        source: Source,
        digest: &str,
        ttl: u64,
    ) -> Result<Option<u64>, SentryError> {
        let mut pipe = redis::pipe();
        pipe.cmd("TTL")
            .arg(source_key("trust_ticket", source))
            .cmd("SET")
            .arg(key(&format!("issued:{digest}")))
            .arg(1)
            .arg("EX")
            .arg(ttl)
            .ignore();
        let (ttl,): (i64,) = self.pipeline(&pipe).await?;
        Ok((ttl > 0).then(|| unix_now() + ttl as u64))
    }

    pub async fn issued_recorded(&self, digest: &str) -> Result<bool, SentryError> {
        let n: i64 = self
            .query(redis::cmd("EXISTS").arg(key(&format!("issued:{digest}"))))
            .await?;
        Ok(n == 1)
    }
}

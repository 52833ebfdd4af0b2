//! The embedded backend: the key schema in memory, persisted as one JSON file in the state
//! directory. Admin-acknowledged changes (config, state, whitelist, tickets, used nonces) are
//! written before the call returns; penalties, counts and the traffic series are batched
//! into the next `flush` (the daemon flushes every second).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use super::{ModeState, PenaltyEntry, TRAFFIC_WINDOW, TrafficStats, unix_now};
use crate::sentry::{SentryError, Tunables};

/// The file's content. Expiries are Unix seconds.
#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct Data {
    config: Option<Tunables>,
    state: Option<ModeState>,
    whitelist: BTreeSet<IpAddr>,
    trust_ticket: HashMap<IpAddr, u64>,
    /// ip -> (count, expires_at)
    penalty_box: HashMap<IpAddr, (u64, u64)>,
    used_nonces: HashMap<String, u64>,
    /// Oldest first.
    global_traffic_per_sec: Vec<u64>,
    traffic_stats: Option<TrafficStats>,
    keys: BTreeMap<String, String>,
    #[serde(skip)]
    req_count: HashMap<IpAddr, (u64, u64)>,
}

struct Inner {
    data: Data,
    dirty: bool,
}

pub struct EmbeddedStore {
    path: Option<PathBuf>,
    inner: Mutex<Inner>,
}

impl EmbeddedStore {
    /// Opens (or starts) the store file in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, SentryError> {
        let path = state_dir.join("sentry-store.json");
        let data: Data =
            crate::store::read_json(&path).map_err(|source| SentryError::StoreFile {
                path: path.clone(),
                source: Box::new(source),
            })?;
        let store = Self {
            path: Some(path),
            inner: Mutex::new(Inner { data, dirty: false }),
        };
        store.expire_and_flush()?;
        Ok(store)
    }

    /// A store that lives in memory only (benches, unit tests).
    pub fn in_memory() -> Self {
        Self {
            path: None,
            inner: Mutex::new(Inner {
                data: Data::default(),
                dirty: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn save(&self, inner: &mut Inner) -> Result<(), SentryError> {
        inner.dirty = false;
        let Some(path) = &self.path else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(&inner.data).map_err(SentryError::StoreEncode)?;
        crate::store::write_atomic(path, &bytes).map_err(|e| SentryError::StoreWrite(Box::new(e)))
    }

    fn expire(data: &mut Data, now: u64) -> bool {
        let before = data.trust_ticket.len() + data.penalty_box.len() + data.used_nonces.len();
        data.trust_ticket.retain(|_, exp| *exp > now);
        data.penalty_box.retain(|_, (_, exp)| *exp > now);
        data.used_nonces.retain(|_, exp| *exp > now);
        data.req_count.retain(|_, (_, exp)| *exp > now);
        before != data.trust_ticket.len() + data.penalty_box.len() + data.used_nonces.len()
    }

    fn expire_and_flush(&self) -> Result<(), SentryError> {
        let mut inner = self.lock();
        let changed = Self::expire(&mut inner.data, unix_now());
        if changed || inner.dirty {
            self.save(&mut inner)?;
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<(), SentryError> {
        self.expire_and_flush()
    }

    pub fn ping(&self) -> Result<(), SentryError> {
        Ok(())
    }

    pub fn get_config(&self) -> Result<Option<Tunables>, SentryError> {
        Ok(self.lock().data.config.clone())
    }

    pub fn set_config(&self, t: &Tunables) -> Result<(), SentryError> {
        let mut inner = self.lock();
        inner.data.config = Some(t.clone());
        self.save(&mut inner)
    }

    pub fn get_state(&self) -> Result<Option<ModeState>, SentryError> {
        Ok(self.lock().data.state)
    }

    pub fn set_state(&self, state: &ModeState) -> Result<(), SentryError> {
        let mut inner = self.lock();
        inner.data.state = Some(*state);
        self.save(&mut inner)
    }

    pub fn whitelist(&self) -> Result<Vec<IpAddr>, SentryError> {
        Ok(self.lock().data.whitelist.iter().copied().collect())
    }

    pub fn whitelist_contains(&self, ip: IpAddr) -> Result<bool, SentryError> {
        Ok(self.lock().data.whitelist.contains(&ip))
    }

    pub fn whitelist_add(&self, ip: IpAddr) -> Result<bool, SentryError> {
        let mut inner = self.lock();
        let new = inner.data.whitelist.insert(ip);
        if new {
            self.save(&mut inner)?;
        }
        Ok(new)
    }

    pub fn whitelist_remove(&self, ip: IpAddr) -> Result<bool, SentryError> {
        let mut inner = self.lock();
        let was = inner.data.whitelist.remove(&ip);
        if was {
            self.save(&mut inner)?;
        }
        Ok(was)
    }

    pub fn ticket(&self, ip: IpAddr) -> Result<Option<u64>, SentryError> {
        let now = unix_now();
        Ok(self
            .lock()
            .data
            .trust_ticket
            .get(&ip)
            .copied()
            .filter(|exp| *exp > now))
    }

    pub fn set_ticket(&self, ip: IpAddr, ttl: u64) -> Result<u64, SentryError> {
        let exp = unix_now() + ttl;
        let mut inner = self.lock();
        inner.data.trust_ticket.insert(ip, exp);
        self.save(&mut inner)?;
        Ok(exp)
    }

    pub fn penalty_incr(&self, ip: IpAddr, ttl_unit: u64) -> Result<u64, SentryError> {
        let now = unix_now();
        let mut inner = self.lock();
        let entry = inner.data.penalty_box.entry(ip).or_insert((0, 0));
        if entry.1 <= now {
            *entry = (0, 0);
        }
        entry.0 += 1;
        entry.1 = now + ttl_unit.saturating_mul(entry.0);
        let count = entry.0;
        inner.dirty = true;
        Ok(count)
    }

    pub fn penalty(&self, ip: IpAddr) -> Result<Option<PenaltyEntry>, SentryError> {
        let now = unix_now();
        Ok(self
            .lock()
            .data
            .penalty_box
            .get(&ip)
            .filter(|(_, exp)| *exp > now)
            .map(|(count, exp)| PenaltyEntry {
                address: ip,
                count: *count,
                expires_in_seconds: exp - now,
            }))
    }

    pub fn penalties(&self, limit: usize) -> Result<Vec<PenaltyEntry>, SentryError> {
        let now = unix_now();
        let inner = self.lock();
        let mut out: Vec<PenaltyEntry> = inner
            .data
            .penalty_box
            .iter()
            .filter(|(_, (_, exp))| *exp > now)
            .map(|(ip, (count, exp))| PenaltyEntry {
                address: *ip,
                count: *count,
                expires_in_seconds: exp - now,
            })
            .collect();
        out.sort_by_key(|e| std::cmp::Reverse(e.count));
        out.truncate(limit);
        Ok(out)
    }

    pub fn clear_penalty(&self, ip: IpAddr) -> Result<bool, SentryError> {
        let mut inner = self.lock();
        let was = inner.data.penalty_box.remove(&ip).is_some();
        if was {
            self.save(&mut inner)?;
        }
        Ok(was)
    }

    pub fn use_nonce(&self, nonce: &str, ttl: u64) -> Result<bool, SentryError> {
        let now = unix_now();
        let mut inner = self.lock();
        if inner
            .data
            .used_nonces
            .get(nonce)
            .is_some_and(|exp| *exp > now)
        {
            return Ok(false);
        }
        inner.data.used_nonces.insert(nonce.to_string(), now + ttl);
        // Acknowledged to the client with a ticket: must survive kill -9, or a restart
        // would reopen the replay window.
        self.save(&mut inner)?;
        Ok(true)
    }

    pub fn publish_counts(&self, counts: &[(IpAddr, u64)]) -> Result<(), SentryError> {
        let exp = unix_now() + 5;
        let mut inner = self.lock();
        for (ip, n) in counts {
            inner.data.req_count.insert(*ip, (*n, exp));
        }
        Ok(())
    }

    pub fn req_count(&self, ip: IpAddr) -> Result<u64, SentryError> {
        let now = unix_now();
        Ok(self
            .lock()
            .data
            .req_count
            .get(&ip)
            .filter(|(_, exp)| *exp > now)
            .map_or(0, |(n, _)| *n))
    }

    pub fn put_traffic(&self, series: &[u64], stats: TrafficStats) -> Result<(), SentryError> {
        let mut inner = self.lock();
        let skip = series.len().saturating_sub(TRAFFIC_WINDOW);
        inner.data.global_traffic_per_sec = series[skip..].to_vec();
        inner.data.traffic_stats = Some(stats);
        inner.dirty = true;
        Ok(())
    }

    pub fn traffic(&self) -> Result<(Vec<u64>, Option<TrafficStats>), SentryError> {
        let inner = self.lock();
        Ok((
            inner.data.global_traffic_per_sec.clone(),
            inner.data.traffic_stats,
        ))
    }

    pub fn publish_key(&self, kid: &str, jwk: &str) -> Result<(), SentryError> {
        let mut inner = self.lock();
        if inner.data.keys.get(kid).map(String::as_str) != Some(jwk) {
            inner.data.keys.insert(kid.to_string(), jwk.to_string());
            self.save(&mut inner)?;
        }
        Ok(())
    }

    pub fn keys(&self) -> Result<BTreeMap<String, String>, SentryError> {
        Ok(self.lock().data.keys.clone())
    }
}

//! The allow and deny lists of the XDP guard.
//!
//! One kernel map holds both: a source with an allow entry always passes, a source with a live
//! deny entry is dropped. Expiry is enforced by the kernel itself (coarse monotonic time), so a
//! TTL lifts a block on time even if the daemon is down; a sweeper only tidies the map.
//! Operator entries (allow, manual deny) are persisted in the state directory with wall-clock
//! expiry and restored at start, also after a reboot empties bpffs.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use phantom_common::xdp::{
    DenyCacheSlot, DenyReason, POLICY_ALLOW, POLICY_DENY, Policy, SourceKey, deny_cache_slot,
};
use serde::{Deserialize, Serialize};

use super::guard::{ip_to_key, key_to_ip, monotonic_ns};
use crate::{error::Error, store};

/// One live entry as reported to admins.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PolicyView {
    pub address: IpAddr,
    /// `manual` or `penalty` for denies; absent for allows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// Seconds until the entry lapses; `null` = permanent.
    pub expires_in_seconds: Option<u64>,
    /// RFC 3339; `null` = permanent.
    pub expires_at: Option<String>,
    /// Deny entries: packets and bytes dropped because of this entry while it existed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_packets: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_bytes: Option<u64>,
}

type PolicyMap = PerCpuHashMap<MapData, SourceKey, Policy>;

/// The kernel side of the lists: the policy map, the guard's per-CPU deny cache in front of it
/// and the generation that retires cached denies (see `DenyCacheSlot`).
pub struct PolicyMaps {
    policy: PolicyMap,
    cache: PerCpuArray<MapData, DenyCacheSlot>,
    generation: Array<MapData, u64>,
    last_serial: u64,
}

impl PolicyMaps {
    pub fn new(
        policy: PolicyMap,
        cache: PerCpuArray<MapData, DenyCacheSlot>,
        generation: Array<MapData, u64>,
    ) -> Self {
        Self {
            policy,
            cache,
            generation,
            last_serial: 0,
        }
    }

    /// One entry as the CPUs hold it: settings (identical on every CPU) and its drop counts,
    /// including those still held in the deny cache.
    fn read(&self, key: &SourceKey) -> Option<Policy> {
        let values = self.policy.get(key, 0).ok()?;
        Some(self.counted(key, merge(&values)))
    }

    /// Adds what the deny cache counted for this entry and has not folded in yet.
    fn counted(&self, key: &SourceKey, mut p: Policy) -> Policy {
        if p.flags & POLICY_DENY == 0 {
            return p;
        }
        let words = key.words();
        if let Ok(slots) = self.cache.get(&deny_cache_slot(words), 0) {
            for slot in slots.iter() {
                if slot.verdict != 0 && slot.addr == words && slot.serial == p.serial {
                    p.dropped_packets += slot.dropped_packets;
                    p.dropped_bytes += slot.dropped_bytes;
                }
            }
        }
        p
    }

    /// Writes an entry's settings to every CPU, keeping each CPU's counters and the entry's
    /// serial, or deletes the entry when neither list holds the source any more. A write to an
    /// entry that held a deny retires every cached deny, so the change applies to the next
    /// packet; a new deny needs no such step (only denies are cached).
    fn write(&mut self, key: &SourceKey, p: Policy) -> Result<(), Error> {
        let current = self.policy.get(key, 0).ok().map(|v| v.to_vec());
        let had_deny = current
            .as_ref()
            .and_then(|c| c.first())
            .is_some_and(|c| c.flags & POLICY_DENY != 0);
        self.write_values(key, p, current)?;
        if had_deny {
            self.bump_generation()?;
        }
        Ok(())
    }

    fn write_values(
        &mut self,
        key: &SourceKey,
        p: Policy,
        current: Option<Vec<Policy>>,
    ) -> Result<(), Error> {
        if p.flags & (POLICY_ALLOW | POLICY_DENY) == 0 {
            return match self.policy.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(e.into()),
            };
        }
        let serial = match current.as_ref().and_then(|c| c.first()) {
            Some(c) => c.serial,
            None => self.next_serial(),
        };
        let cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| Error::Datapath(format!("{what}: {e}")))?
            .get() as usize;
        let current = current.unwrap_or_else(|| vec![Policy::default(); cpus]);
        let values: Vec<Policy> = current
            .iter()
            .map(|c| Policy {
                dropped_packets: c.dropped_packets,
                dropped_bytes: c.dropped_bytes,
                serial,
                ..p
            })
            .collect();
        let values = PerCpuValues::try_from(values)
            .map_err(|e| Error::Datapath(format!("per-CPU policy value: {e}")))?;
        self.policy
            .insert(key, values, 0)
            .map_err(|e| Error::Datapath(format!("cannot update the policy map (full?): {e}")))
    }

    /// A serial no entry had before: the monotonic clock, which outlives daemon restarts (and
    /// a reboot empties the map anyway).
    fn next_serial(&mut self) -> u64 {
        self.last_serial = monotonic_ns().max(self.last_serial + 1);
        self.last_serial
    }

    fn bump_generation(&mut self) -> Result<(), Error> {
        let current = self.generation.get(&0, 0).unwrap_or(0);
        self.generation
            .set(0, &current.wrapping_add(1), 0)
            .map_err(|e| Error::Datapath(format!("cannot bump the policy generation: {e}")))
    }
}

fn merge(values: &PerCpuValues<Policy>) -> Policy {
    let mut merged = values.first().copied().unwrap_or_default();
    merged.dropped_packets = values.iter().map(|v| v.dropped_packets).sum();
    merged.dropped_bytes = values.iter().map(|v| v.dropped_bytes).sum();
    merged
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum List {
    Allow,
    Deny,
}

/// What is persisted: operator entries with wall-clock expiry (Unix seconds).
#[derive(Default, Serialize, Deserialize)]
struct Persisted {
    allow: BTreeMap<IpAddr, Option<u64>>,
    deny: BTreeMap<IpAddr, Option<u64>>,
}

pub struct PolicyTable {
    map: Mutex<PolicyMaps>,
    path: PathBuf,
    /// Serialises read-modify-write of the file and the map.
    persisted: Mutex<Persisted>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, Error> {
    m.lock()
        .map_err(|_| Error::Datapath("policy lock poisoned".into()))
}

impl PolicyTable {
    /// Restores operator entries from the state directory into the (possibly pinned) map.
    pub fn open(map: PolicyMaps, state_dir: &Path) -> Result<Self, Error> {
        let path = state_dir.join("datapath-policy.json");
        let mut persisted: Persisted = store::read_json(&path)?;
        let now = unix_now();
        persisted
            .allow
            .retain(|_, until| until.is_none_or(|u| u > now));
        persisted
            .deny
            .retain(|_, until| until.is_none_or(|u| u > now));
        let table = Self {
            map: Mutex::new(map),
            path,
            persisted: Mutex::new(Persisted::default()),
        };
        {
            let mut map = lock(&table.map)?;
            // Operator entries come from the file alone; penalty denies stay as they are.
            let keys: Vec<SourceKey> = map.policy.keys().filter_map(Result::ok).collect();
            for key in keys {
                let Some(mut p) = map.read(&key) else {
                    continue;
                };
                p.flags &= !POLICY_ALLOW;
                if p.deny_reason == DenyReason::Manual as u32 {
                    p.flags &= !POLICY_DENY;
                }
                map.write(&key, p)?;
            }
            let mono = monotonic_ns();
            let to_mono = |until: Option<u64>| {
                until.map_or(0, |u| {
                    mono + u.saturating_sub(now).saturating_mul(1_000_000_000)
                })
            };
            for (ip, until) in &persisted.allow {
                let key = ip_to_key(*ip);
                let mut p = map.read(&key).unwrap_or_default();
                p.flags |= POLICY_ALLOW;
                p.allow_until_ns = to_mono(*until);
                map.write(&key, p)?;
            }
            for (ip, until) in &persisted.deny {
                let key = ip_to_key(*ip);
                let mut p = map.read(&key).unwrap_or_default();
                p.flags |= POLICY_DENY;
                p.deny_until_ns = to_mono(*until);
                p.deny_reason = DenyReason::Manual as u32;
                map.write(&key, p)?;
            }
            // Whatever the guard cached before this start is retired.
            map.bump_generation()?;
        }
        *lock(&table.persisted)? = persisted;
        Ok(table)
    }

    /// Adds or refreshes an entry. `ttl` None = permanent. Penalty denies are not persisted
    /// here (the sentry's store owns them).
    pub fn set(
        &self,
        ip: IpAddr,
        list: List,
        ttl: Option<Duration>,
        reason: DenyReason,
    ) -> Result<PolicyView, Error> {
        let mut persisted = lock(&self.persisted)?;
        let until_unix = ttl.map(|t| unix_now() + t.as_secs().max(1));
        let operator = list == List::Allow || reason == DenyReason::Manual;
        if operator {
            match list {
                List::Allow => persisted.allow.insert(ip, until_unix),
                List::Deny => persisted.deny.insert(ip, until_unix),
            };
            store::write_json(&self.path, &*persisted)?;
        }
        let key = ip_to_key(ip);
        let until_ns = ttl.map_or(0, |t| monotonic_ns() + t.as_secs().max(1) * 1_000_000_000);
        let mut map = lock(&self.map)?;
        let mut p = map.read(&key).unwrap_or_default();
        match list {
            List::Allow => {
                p.flags |= POLICY_ALLOW;
                p.allow_until_ns = until_ns;
            }
            List::Deny => {
                p.flags |= POLICY_DENY;
                p.deny_until_ns = until_ns;
                p.deny_reason = reason as u32;
            }
        }
        map.write(&key, p)?;
        Ok(view(&key, &p, list, monotonic_ns()).unwrap_or(PolicyView {
            address: ip,
            reason: None,
            expires_in_seconds: None,
            expires_at: None,
            dropped_packets: None,
            dropped_bytes: None,
        }))
    }

    /// Removes `ip` from one list; returns whether it was there (and live).
    pub fn remove(&self, ip: IpAddr, list: List) -> Result<bool, Error> {
        let mut persisted = lock(&self.persisted)?;
        let was_persisted = match list {
            List::Allow => persisted.allow.remove(&ip).is_some(),
            List::Deny => persisted.deny.remove(&ip).is_some(),
        };
        if was_persisted {
            store::write_json(&self.path, &*persisted)?;
        }
        let key = ip_to_key(ip);
        let mut map = lock(&self.map)?;
        let Some(mut p) = map.read(&key) else {
            return Ok(false);
        };
        let live = view(&key, &p, list, monotonic_ns()).is_some();
        match list {
            List::Allow => p.flags &= !POLICY_ALLOW,
            List::Deny => p.flags &= !POLICY_DENY,
        }
        map.write(&key, p)?;
        Ok(live)
    }

    /// Live entries of one list.
    pub fn list(&self, list: List) -> Result<Vec<PolicyView>, Error> {
        let now = monotonic_ns();
        let map = lock(&self.map)?;
        let mut out: Vec<PolicyView> = map
            .policy
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, values)| {
                let p = merge(&values);
                // Flags first: the cache is read only for entries that will be shown.
                view(&key, &p, list, now)?;
                let p = if list == List::Deny {
                    map.counted(&key, p)
                } else {
                    p
                };
                view(&key, &p, list, now)
            })
            .collect();
        out.sort_by_key(|a| a.address);
        Ok(out)
    }

    /// Number of live entries per list (allow, deny), in one pass over the map.
    pub fn counts(&self) -> Result<(usize, usize), Error> {
        let now = monotonic_ns();
        let map = lock(&self.map)?;
        let mut counts = (0, 0);
        for (key, values) in map.policy.iter().filter_map(Result::ok) {
            let p = merge(&values);
            counts.0 += usize::from(view(&key, &p, List::Allow, now).is_some());
            counts.1 += usize::from(view(&key, &p, List::Deny, now).is_some());
        }
        Ok(counts)
    }

    /// Drops lapsed entries from the map and the file; returns how many flags were cleared.
    pub fn sweep(&self) -> Result<usize, Error> {
        let mut persisted = lock(&self.persisted)?;
        let unix = unix_now();
        let before = persisted.allow.len() + persisted.deny.len();
        persisted.allow.retain(|_, u| u.is_none_or(|u| u > unix));
        persisted.deny.retain(|_, u| u.is_none_or(|u| u > unix));
        if persisted.allow.len() + persisted.deny.len() != before {
            store::write_json(&self.path, &*persisted)?;
        }
        let now = monotonic_ns();
        let mut map = lock(&self.map)?;
        let entries: Vec<(SourceKey, Policy)> = map
            .policy
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, merge(&v)))
            .collect();
        let mut cleared = 0;
        for (key, mut p) in entries {
            let lapsed = |until: u64| until != 0 && until <= now;
            let old = p.flags;
            if p.flags & POLICY_ALLOW != 0 && lapsed(p.allow_until_ns) {
                p.flags &= !POLICY_ALLOW;
            }
            if p.flags & POLICY_DENY != 0 && lapsed(p.deny_until_ns) {
                p.flags &= !POLICY_DENY;
            }
            if p.flags != old {
                cleared += (old ^ p.flags).count_ones() as usize;
                map.write(&key, p)?;
            }
        }
        Ok(cleared)
    }
}

fn view(key: &SourceKey, p: &Policy, list: List, now: u64) -> Option<PolicyView> {
    let (flag, until) = match list {
        List::Allow => (POLICY_ALLOW, p.allow_until_ns),
        List::Deny => (POLICY_DENY, p.deny_until_ns),
    };
    if p.flags & flag == 0 || (until != 0 && until <= now) {
        return None;
    }
    let remaining = (until != 0).then(|| until.saturating_sub(now).div_ceil(1_000_000_000));
    Some(PolicyView {
        address: key_to_ip(key),
        reason: match list {
            List::Allow => None,
            List::Deny => Some(
                DenyReason::from_u32(p.deny_reason)
                    .unwrap_or(DenyReason::Manual)
                    .name(),
            ),
        },
        expires_in_seconds: remaining,
        expires_at: remaining.and_then(|r| {
            time::OffsetDateTime::from_unix_timestamp((unix_now() + r) as i64)
                .ok()
                .map(crate::protocol::rfc3339)
        }),
        dropped_packets: (list == List::Deny).then_some(p.dropped_packets),
        dropped_bytes: (list == List::Deny).then_some(p.dropped_bytes),
    })
}

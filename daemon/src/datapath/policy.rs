//! The allow and deny lists of the XDP guard.
//!
//! One kernel map holds both: a source with an allow entry always passes, a source with a live
//! deny entry is dropped. Expiry is enforced by the kernel itself (coarse monotonic time), so a
//! TTL lifts a block on time even if the daemon is down; a sweeper only tidies the map.
//! Operator entries (allow, manual deny) are persisted in the state directory with wall-clock
//! expiry and restored at start, also after a reboot empties bpffs.
//!
//! An entry is for one address (IPv4, or IPv6 /128) or for an IPv6 prefix of the length
//! `[sources] ipv6_prefix` sets: the guard looks an IPv6 source up by its own address first
//! and, when that has no live entry, by its prefix (a second map, `PH_POLICY_NET`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use phantom_common::xdp::{
    DenyCacheSlot, DenyReason, GuardConfig, POLICY_ALLOW, POLICY_DENY, Policy, SourceKey,
    deny_cache_slot, ipv6_mask,
};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::guard::{ip_to_key, key_to_ip, monotonic_ns};
use super::map_memory::retrying_out_of_memory;
use crate::{
    error::Error,
    source::{Source, SourcePrefix},
    store,
};

/// How full a kernel map is and what it turned away.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct MapFill {
    /// Keys in the map (what counts against its capacity).
    pub held: usize,
    /// New entries refused because the map was full.
    pub refused: u64,
    /// Entries removed to make room for new ones.
    pub evicted: u64,
}

/// One live entry as reported to admins.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PolicyView {
    /// The address, or the IPv6 prefix (`2001:db8:1:2::/64`).
    pub address: Source,
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

/// Where an entry lives: `PH_POLICY` by address, or `PH_POLICY_NET` by masked IPv6 prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Addr(SourceKey),
    Net(SourceKey),
}

impl Key {
    fn source_key(&self) -> &SourceKey {
        match self {
            Key::Addr(k) | Key::Net(k) => k,
        }
    }

    /// The deny cache's tag for slots of this kind (`DenyCacheSlot::net`).
    fn net_tag(&self) -> u32 {
        u32::from(matches!(self, Key::Net(_)))
    }
}

/// The kernel side of the lists: the two policy maps, the guard's per-CPU deny cache in front
/// of them, the generation that retires cached denies and passes (see `DenyCacheSlot` and
/// `PassCacheSlot`), and the guard's
/// settings (the IPv6 prefix and whether the prefix map holds anything).
pub struct PolicyMaps {
    policy: PolicyMap,
    nets: PolicyMap,
    cache: PerCpuArray<MapData, DenyCacheSlot>,
    generation: Array<MapData, u64>,
    config: Array<MapData, GuardConfig>,
    prefix: SourcePrefix,
    /// Entries in `nets`, so the guard's second lookup is switched on only while it is useful.
    net_entries: usize,
    last_serial: u64,
    /// Per map (`PH_POLICY`, `PH_POLICY_NET`): new entries refused because the map was full.
    refused: [u64; 2],
    /// Per map: entries removed to make room (lapsed ones, and penalty denies for an
    /// operator's entry).
    evicted: [u64; 2],
}

impl PolicyMaps {
    pub fn new(
        policy: PolicyMap,
        nets: PolicyMap,
        cache: PerCpuArray<MapData, DenyCacheSlot>,
        generation: Array<MapData, u64>,
        config: Array<MapData, GuardConfig>,
        prefix: SourcePrefix,
    ) -> Self {
        Self {
            policy,
            nets,
            cache,
            generation,
            config,
            prefix,
            net_entries: 0,
            last_serial: 0,
            refused: [0; 2],
            evicted: [0; 2],
        }
    }

    /// The map key of `source`. An IPv6 prefix must have the configured length: the guard
    /// masks every IPv6 source to that one length.
    pub fn key(&self, source: Source) -> Result<Key, Error> {
        match source {
            Source::V4(v4) => Ok(Key::Addr(SourceKey::from_ipv4(v4.octets()))),
            Source::V6(v6, 128) => Ok(Key::Addr(ip_to_key(std::net::IpAddr::V6(v6)))),
            Source::V6(v6, len) if len == self.prefix.bits() => {
                Ok(Key::Net(SourceKey::from_ipv6(v6.octets())))
            }
            Source::V6(_, len) => Err(Error::Datapath(format!(
                "{source}: the XDP guard matches IPv6 addresses (/128) and /{} prefixes \
                 ([sources] ipv6_prefix), not /{len}",
                self.prefix.bits()
            ))),
        }
    }

    fn source_of(&self, key: &Key) -> Source {
        match key {
            Key::Addr(k) => Source::addr(key_to_ip(k)),
            Key::Net(k) => Source::V6(std::net::Ipv6Addr::from(k.addr), self.prefix.bits()),
        }
    }

    fn map(&self, key: &Key) -> &PolicyMap {
        match key {
            Key::Addr(_) => &self.policy,
            Key::Net(_) => &self.nets,
        }
    }

    /// Every key of both maps.
    fn keys(&self) -> Vec<Key> {
        let addrs = self.policy.keys().filter_map(Result::ok).map(Key::Addr);
        let nets = self.nets.keys().filter_map(Result::ok).map(Key::Net);
        addrs.chain(nets).collect()
    }

    /// Every entry of both maps, settings and counts merged over CPUs (without the cache's).
    fn entries(&self) -> Vec<(Key, Policy)> {
        let addrs = self
            .policy
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Key::Addr(k), merge(&v)));
        let nets = self
            .nets
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Key::Net(k), merge(&v)));
        addrs.chain(nets).collect()
    }

    /// Writes the guard's settings: the prefix mask and whether the prefix map is in use.
    fn write_config(&mut self) -> Result<(), Error> {
        let len = u32::from(self.prefix.bits());
        let config = GuardConfig {
            ipv6_mask: ipv6_mask(len),
            prefix_len: len,
            prefix_lookup: u32::from(self.net_entries > 0),
        };
        self.config
            .set(0, &config, 0)
            .map_err(|e| Error::Datapath(format!("cannot write the guard's settings: {e}")))
    }

    /// At start: prefix entries of another length (`[sources] ipv6_prefix` changed) no
    /// longer mean what they say and are dropped; the rest are counted.
    fn adopt_nets(&mut self) -> Result<(), Error> {
        let written = self.config.get(&0, 0).unwrap_or_default();
        let keys: Vec<SourceKey> = self.nets.keys().filter_map(Result::ok).collect();
        if written.prefix_len != u32::from(self.prefix.bits()) && !keys.is_empty() {
            warn!(
                entries = keys.len(),
                was = written.prefix_len,
                now = self.prefix.bits(),
                "the IPv6 prefix length changed: the kernel's prefix entries are dropped \
                 (operator entries of the new length are restored from the state file)"
            );
            for k in &keys {
                let _ = self.nets.remove(k);
            }
            self.net_entries = 0;
            // The per-CPU deny cache may still hold verdicts of the dropped entries.
            self.bump_generation()?;
        } else {
            self.net_entries = keys.len();
        }
        self.write_config()
    }

    /// One entry as the CPUs hold it: settings (identical on every CPU) and its drop counts,
    /// including those still held in the deny cache.
    fn read(&self, key: &Key) -> Option<Policy> {
        let values = self.map(key).get(key.source_key(), 0).ok()?;
        Some(self.counted(key, merge(&values)))
    }

    /// Adds what the deny cache counted for this entry and has not folded in yet.
    fn counted(&self, key: &Key, mut p: Policy) -> Policy {
        if p.flags & POLICY_DENY == 0 {
            return p;
        }
        let words = key.source_key().words();
        if let Ok(slots) = self.cache.get(&deny_cache_slot(words), 0) {
            for slot in slots.iter() {
                if slot.verdict != 0
                    && slot.addr == words
                    && slot.net == key.net_tag()
                    && slot.serial == p.serial
                {
                    p.dropped_packets += slot.dropped_packets;
                    p.dropped_bytes += slot.dropped_bytes;
                }
            }
        }
        p
    }

    /// Writes an entry's settings to every CPU, keeping each CPU's counters and the entry's
    /// serial, or deletes the entry when neither list holds the source any more. Every write
    /// retires what the guard cached (denies in the deny cache, passes in the pass cache), so
    /// the change applies to the next packet: a new deny to a source whose passes are cached,
    /// a lifted one to a source whose drops are.
    fn write(&mut self, key: &Key, p: Policy) -> Result<(), Error> {
        let current = self
            .map(key)
            .get(key.source_key(), 0)
            .ok()
            .map(|v| v.to_vec());
        self.write_values(key, p, current)?;
        self.bump_generation()
    }

    fn write_values(
        &mut self,
        key: &Key,
        p: Policy,
        current: Option<Vec<Policy>>,
    ) -> Result<(), Error> {
        let net = matches!(key, Key::Net(_));
        let k = key.source_key();
        if p.flags & (POLICY_ALLOW | POLICY_DENY) == 0 {
            let removed = match key {
                Key::Addr(_) => self.policy.remove(k),
                Key::Net(_) => self.nets.remove(k),
            };
            return match removed {
                Ok(()) => {
                    if net {
                        self.net_entries = self.net_entries.saturating_sub(1);
                        if self.net_entries == 0 {
                            self.write_config()?;
                        }
                    }
                    Ok(())
                }
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
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
        let new = current.is_none();
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
        let mut inserted = self.insert(key, &values);
        if inserted.as_ref().is_err_and(is_full) && new && self.make_room(key, &p)? {
            inserted = self.insert(key, &values);
        }
        match inserted {
            Ok(()) => {}
            Err(e) if is_full(&e) => {
                self.refused[key.net_tag() as usize] += 1;
                return Err(Error::MapFull {
                    map: map_name(key),
                    setting: "max_policies",
                });
            }
            Err(e) => {
                return Err(Error::Datapath(format!(
                    "cannot update the policy map: {e}"
                )));
            }
        }
        if net && new {
            // Switched on after the entry exists, so the guard never looks into an empty map
            // on its account; off again when the last one goes.
            self.net_entries += 1;
            if self.net_entries == 1 {
                self.write_config()?;
            }
        }
        Ok(())
    }

    fn insert(&mut self, key: &Key, values: &[Policy]) -> Result<(), aya::maps::MapError> {
        retrying_out_of_memory(|| {
            let values = PerCpuValues::try_from(values.to_vec())?;
            match key {
                Key::Addr(k) => self.policy.insert(k, values, 0),
                Key::Net(k) => self.nets.insert(k, values, 0),
            }
        })
    }

    /// The map of `key` is full and `p` is to go in: removes one entry to make room, if one
    /// may go: an entry whose every flag has lapsed (waiting for the sweeper), else, for an
    /// operator's entry (an allow or a manual deny), the penalty deny that lapses first.
    /// Operator entries are never removed for anything. Returns whether room was made.
    fn make_room(&mut self, key: &Key, p: &Policy) -> Result<bool, Error> {
        let now = monotonic_ns();
        let operator = p.flags & POLICY_ALLOW != 0 || p.deny_reason == DenyReason::Manual as u32;
        let live =
            |flag: u32, until: u64, q: &Policy| q.flags & flag != 0 && (until == 0 || until > now);
        let candidates: Vec<(Key, Policy)> = self
            .entries()
            .into_iter()
            .filter(|(k, _)| k.net_tag() == key.net_tag())
            .collect();
        let lapsed = candidates.iter().find(|(_, q)| {
            !live(POLICY_ALLOW, q.allow_until_ns, q) && !live(POLICY_DENY, q.deny_until_ns, q)
        });
        let victim = lapsed.or_else(|| {
            if !operator {
                return None;
            }
            candidates
                .iter()
                .filter(|(_, q)| {
                    q.flags & POLICY_ALLOW == 0 && q.deny_reason != DenyReason::Manual as u32
                })
                .min_by_key(|(_, q)| {
                    if q.deny_until_ns == 0 {
                        u64::MAX
                    } else {
                        q.deny_until_ns
                    }
                })
        });
        let Some((victim, q)) = victim.cloned() else {
            return Ok(false);
        };
        let removed = match victim {
            Key::Addr(k) => self.policy.remove(&k),
            Key::Net(k) => self.nets.remove(&k),
        };
        match removed {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e.into()),
        }
        if matches!(victim, Key::Net(_)) {
            self.net_entries = self.net_entries.saturating_sub(1);
        }
        self.evicted[key.net_tag() as usize] += 1;
        warn!(
            map = map_name(key),
            evicted = %self.source_of(&victim),
            penalty_deny = q.flags & POLICY_DENY != 0 && live(POLICY_DENY, q.deny_until_ns, &q),
            "kernel policy map full: an entry made room for a new one"
        );
        // A deny the guard may have cached must not outlive its entry.
        self.bump_generation()?;
        Ok(true)
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

/// What is persisted: operator entries with wall-clock expiry (Unix seconds), by address or
/// prefix as written (`192.0.2.7`, `2001:db8:1:2::/64`).
#[derive(Default, Serialize, Deserialize)]
struct Persisted {
    allow: BTreeMap<Source, Option<u64>>,
    deny: BTreeMap<Source, Option<u64>>,
}

pub struct PolicyTable {
    map: Mutex<PolicyMaps>,
    path: PathBuf,
    /// Serialises read-modify-write of the file and the map.
    persisted: Mutex<Persisted>,
}

/// Whether the kernel refused an insert because the map is full (`E2BIG`).
fn is_full(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG))
}

fn map_name(key: &Key) -> &'static str {
    match key {
        Key::Addr(_) => phantom_common::names::POLICY_MAP,
        Key::Net(_) => phantom_common::names::POLICY_NET_MAP,
    }
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

/// Writes a restored operator entry. A map full even after evicting what may go (a capacity
/// lowered below the operator's own entries) leaves the entry out of the kernel with an error
/// naming it, and keeps it in the file for a start with room: never lost, never silent.
fn restore(map: &mut PolicyMaps, key: &Key, p: Policy, source: &Source) -> Result<(), Error> {
    match map.write(key, p) {
        Err(Error::MapFull { map: name, .. }) => {
            tracing::error!(
                entry = %source,
                map = name,
                "operator policy entry not in the kernel: the map is full of operator entries (raise [datapath] max_policies); kept in the state file"
            );
            Ok(())
        }
        other => other,
    }
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
            map.adopt_nets()?;
            // Operator entries come from the file alone; penalty denies stay as they are.
            for key in map.keys() {
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
            let usable = |map: &PolicyMaps, source: &Source| match map.key(*source) {
                Ok(key) => Some(key),
                Err(e) => {
                    warn!(error = %e, "operator policy entry not applied");
                    None
                }
            };
            for (source, until) in &persisted.allow {
                let Some(key) = usable(&map, source) else {
                    continue;
                };
                let mut p = map.read(&key).unwrap_or_default();
                p.flags |= POLICY_ALLOW;
                p.allow_until_ns = to_mono(*until);
                restore(&mut map, &key, p, source)?;
            }
            for (source, until) in &persisted.deny {
                let Some(key) = usable(&map, source) else {
                    continue;
                };
                let mut p = map.read(&key).unwrap_or_default();
                p.flags |= POLICY_DENY;
                p.deny_until_ns = to_mono(*until);
                p.deny_reason = DenyReason::Manual as u32;
                restore(&mut map, &key, p, source)?;
            }
            // Whatever the guard cached before this start is retired.
            map.bump_generation()?;
        }
        *lock(&table.persisted)? = persisted;
        Ok(table)
    }

    /// Whether the guard can hold an entry for `source` (an address, or an IPv6 prefix of the
    /// configured length); the error says why not.
    pub fn check(&self, source: Source) -> Result<(), Error> {
        lock(&self.map)?.key(source).map(|_| ())
    }

    /// Adds or refreshes an entry for an address or an IPv6 prefix. `ttl` None = permanent.
    /// Penalty denies are not persisted here (the sentry's store owns them).
    pub fn set(
        &self,
        source: Source,
        list: List,
        ttl: Option<Duration>,
        reason: DenyReason,
    ) -> Result<PolicyView, Error> {
        let mut persisted = lock(&self.persisted)?;
        let mut map = lock(&self.map)?;
        let key = map.key(source)?;
        let until_unix = ttl.map(|t| unix_now() + t.as_secs().max(1));
        let operator = list == List::Allow || reason == DenyReason::Manual;
        let until_ns = ttl.map_or(0, |t| monotonic_ns() + t.as_secs().max(1) * 1_000_000_000);
        let before = map.read(&key);
        let mut p = before.unwrap_or_default();
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
        // The kernel first: a full map refuses the entry before anything is promised, so the
        // file never holds an entry the operator was told failed.
        map.write(&key, p)?;
        if operator {
            let previous = match list {
                List::Allow => persisted.allow.insert(source, until_unix),
                List::Deny => persisted.deny.insert(source, until_unix),
            };
            if let Err(e) = store::write_json(&self.path, &*persisted) {
                // Not durable, so not done: the kernel goes back to what it had.
                let side = match list {
                    List::Allow => &mut persisted.allow,
                    List::Deny => &mut persisted.deny,
                };
                match previous {
                    Some(until) => side.insert(source, until),
                    None => side.remove(&source),
                };
                let _ = map.write(&key, before.unwrap_or_default());
                return Err(e);
            }
        }
        Ok(
            view(&map, &key, &p, list, monotonic_ns()).unwrap_or(PolicyView {
                address: source,
                reason: None,
                expires_in_seconds: None,
                expires_at: None,
                dropped_packets: None,
                dropped_bytes: None,
            }),
        )
    }

    /// Removes an address or prefix from one list; returns whether it was there (and live).
    pub fn remove(&self, source: Source, list: List) -> Result<bool, Error> {
        let mut persisted = lock(&self.persisted)?;
        let key = lock(&self.map)?.key(source)?;
        let was_persisted = match list {
            List::Allow => persisted.allow.remove(&source).is_some(),
            List::Deny => persisted.deny.remove(&source).is_some(),
        };
        if was_persisted {
            store::write_json(&self.path, &*persisted)?;
        }
        let mut map = lock(&self.map)?;
        let Some(mut p) = map.read(&key) else {
            return Ok(false);
        };
        let live = view(&map, &key, &p, list, monotonic_ns()).is_some();
        match list {
            List::Allow => p.flags &= !POLICY_ALLOW,
            List::Deny => p.flags &= !POLICY_DENY,
        }
        map.write(&key, p)?;
        Ok(live)
    }

    /// Live entries of one list, addresses and prefixes.
    pub fn list(&self, list: List) -> Result<Vec<PolicyView>, Error> {
        let now = monotonic_ns();
        let map = lock(&self.map)?;
        let mut out: Vec<PolicyView> = map
            .entries()
            .into_iter()
            .filter_map(|(key, p)| {
                // Flags first: the cache is read only for entries that will be shown.
                view(&map, &key, &p, list, now)?;
                let p = if list == List::Deny {
                    map.counted(&key, p)
                } else {
                    p
                };
                view(&map, &key, &p, list, now)
            })
            .collect();
        out.sort_by_key(|a| a.address);
        Ok(out)
    }

    /// Number of live entries per list (allow, deny), in one pass over the maps.
    pub fn counts(&self) -> Result<(usize, usize), Error> {
        let [a, n] = self.counts_by_map()?;
        Ok((a.0 + n.0, a.1 + n.1))
    }

    /// Live (allow, deny) entries of `PH_POLICY` and of `PH_POLICY_NET`.
    pub fn counts_by_map(&self) -> Result<[(usize, usize); 2], Error> {
        let now = monotonic_ns();
        let map = lock(&self.map)?;
        let mut counts = [(0, 0); 2];
        for (key, p) in map.entries() {
            let c = &mut counts[key.net_tag() as usize];
            c.0 += usize::from(view(&map, &key, &p, List::Allow, now).is_some());
            c.1 += usize::from(view(&map, &key, &p, List::Deny, now).is_some());
        }
        Ok(counts)
    }

    /// Per map (`PH_POLICY`, `PH_POLICY_NET`): every key the kernel holds (live or lapsed,
    /// what counts against the capacity), entries refused because the map was full, and
    /// entries evicted to make room.
    pub fn fill(&self) -> Result<[MapFill; 2], Error> {
        let map = lock(&self.map)?;
        let held = [map.policy.keys().count(), map.nets.keys().count()];
        Ok([0, 1].map(|i| MapFill {
            held: held[i],
            refused: map.refused[i],
            evicted: map.evicted[i],
        }))
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
        let entries = map.entries();
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

fn view(map: &PolicyMaps, key: &Key, p: &Policy, list: List, now: u64) -> Option<PolicyView> {
    let (flag, until) = match list {
        List::Allow => (POLICY_ALLOW, p.allow_until_ns),
        List::Deny => (POLICY_DENY, p.deny_until_ns),
    };
    if p.flags & flag == 0 || (until != 0 && until <= now) {
        return None;
    }
    let remaining = (until != 0).then(|| until.saturating_sub(now).div_ceil(1_000_000_000));
    Some(PolicyView {
        address: map.source_of(key),
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

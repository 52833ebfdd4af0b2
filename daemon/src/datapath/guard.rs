//! Readers and settings of the XDP guard's maps: per-source counters, verdicts, the global
//! per-second series and the protected ports.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::Mutex,
};

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap};
use phantom_common::xdp::{
    GuardCounters, PASS_CACHE_SLOTS, PORT_WORDS, PassCacheSlot, SECOND_SLOTS, SourceKey,
    SourceStats, Verdict, WINDOW_NS,
};
use serde::Serialize;

use crate::error::Error;

/// One source address and its counts, summed over CPUs.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SourceCount {
    pub address: IpAddr,
    pub packets: u64,
    pub bytes: u64,
    /// TCP SYNs to protected ports (new connection attempts).
    pub new_tcp: u64,
    /// Packets in the current 5-second window.
    pub window_packets: u64,
    /// Seconds since the last packet from this source.
    pub last_seen_seconds_ago: f64,
}

/// Packets and bytes for one verdict/reason slot.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct VerdictCount {
    pub verdict: &'static str,
    pub reason: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// Packets in one second (coarse monotonic seconds).
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct SecondCount {
    pub second: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// Pass-cache slots holding counts, by `SourceKey::words`: (CPU, slot) pairs.
type Pending = HashMap<[u64; 2], Vec<(usize, PassCacheSlot)>>;

pub struct GuardMaps {
    sources: Mutex<PerCpuHashMap<MapData, SourceKey, SourceStats>>,
    /// The guard's pass cache: counts of busy sources not yet in `sources`.
    pass_cache: Mutex<PerCpuArray<MapData, PassCacheSlot>>,
    counters: Mutex<PerCpuArray<MapData, GuardCounters>>,
    ports: Mutex<Array<MapData, u32>>,
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, Error> {
    m.lock()
        .map_err(|_| Error::Datapath("datapath map lock poisoned".into()))
}

pub fn key_to_ip(key: &SourceKey) -> IpAddr {
    let v6 = Ipv6Addr::from(key.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

pub fn ip_to_key(ip: IpAddr) -> SourceKey {
    match ip {
        IpAddr::V4(v4) => SourceKey::from_ipv4(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SourceKey::from_ipv4(v4.octets()),
            None => SourceKey::from_ipv6(v6.octets()),
        },
    }
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds, the clock `bpf_ktime_get_coarse_ns` reads.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1_000_000_000) + t.tv_nsec() as u64)
        .unwrap_or(0)
}

impl GuardMaps {
    pub fn new(
        sources: PerCpuHashMap<MapData, SourceKey, SourceStats>,
        pass_cache: PerCpuArray<MapData, PassCacheSlot>,
        counters: PerCpuArray<MapData, GuardCounters>,
        ports: Array<MapData, u32>,
    ) -> Self {
        Self {
            sources: Mutex::new(sources),
            pass_cache: Mutex::new(pass_cache),
            counters: Mutex::new(counters),
            ports: Mutex::new(ports),
        }
    }

    /// Counters by verdict and reason, summed over CPUs.
    pub fn verdicts(&self) -> Result<Vec<VerdictCount>, Error> {
        let per_cpu = lock(&self.counters)?.get(&0, 0)?;
        Ok(Verdict::ALL
            .iter()
            .map(|v| {
                let (packets, bytes) = per_cpu.iter().fold((0u64, 0u64), |(p, b), c| {
                    let c = &c.verdicts[*v as usize];
                    (p + c.packets, b + c.bytes)
                });
                VerdictCount {
                    verdict: v.action(),
                    reason: v.reason(),
                    packets,
                    bytes,
                }
            })
            .collect())
    }

    /// The pass cache's slots that hold counts, by source.
    fn pending(&self) -> Result<Pending, Error> {
        let cache = lock(&self.pass_cache)?;
        let mut out = Pending::new();
        for index in 0..PASS_CACHE_SLOTS {
            let slots = cache.get(&index, 0)?;
            for (cpu, slot) in slots.iter().enumerate() {
                if slot.filled != 0 && slot.packets != 0 {
                    out.entry(slot.addr).or_default().push((cpu, *slot));
                }
            }
        }
        Ok(out)
    }

    /// Every tracked source, summed over CPUs, with the counts the guard's pass cache still
    /// holds for it. Entries evicted by the LRU are gone.
    pub fn sources(&self) -> Result<Vec<SourceCount>, Error> {
        let now = monotonic_ns();
        let epoch = now / WINDOW_NS;
        let mut entries = Vec::new();
        for item in lock(&self.sources)?.iter() {
            match item {
                Ok(kv) => entries.push(kv),
                // An entry evicted between get_next_key and lookup: skip it.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        // The cache after the map: a slot the guard empties into its entry between the two
        // reads is missed once, never counted twice.
        let pending = self.pending()?;
        let mut out = Vec::with_capacity(entries.len());
        for (key, per_cpu) in entries {
            let mut c = SourceCount {
                address: key_to_ip(&key),
                packets: 0,
                bytes: 0,
                new_tcp: 0,
                window_packets: 0,
                last_seen_seconds_ago: 0.0,
            };
            let mut last_seen = 0u64;
            let slots = pending.get(&key.words());
            for (cpu, s) in per_cpu.iter().enumerate() {
                let mut s = *s;
                for (_, slot) in slots.into_iter().flatten().filter(|(c, _)| *c == cpu) {
                    s.add_pending(slot);
                }
                c.packets += s.packets;
                c.bytes += s.bytes;
                c.new_tcp += s.new_tcp;
                if s.window_epoch == epoch {
                    c.window_packets += s.window_packets;
                }
                last_seen = last_seen.max(s.last_seen_ns);
            }
            c.last_seen_seconds_ago = now.saturating_sub(last_seen) as f64 / 1e9;
            out.push(c);
        }
        Ok(out)
    }

    /// Global packets per second for the last `n` complete seconds, oldest first.
    pub fn per_second(&self, n: u64) -> Result<Vec<SecondCount>, Error> {
        let current = monotonic_ns() / 1_000_000_000;
        let n = n.min(SECOND_SLOTS as u64 - 1);
        let per_cpu = lock(&self.counters)?.get(&0, 0)?;
        let mut out = Vec::with_capacity(n as usize);
        for second in current.saturating_sub(n)..current {
            let slot = (second % SECOND_SLOTS as u64) as usize;
            let mut c = SecondCount {
                second,
                packets: 0,
                bytes: 0,
            };
            for s in per_cpu
                .iter()
                .map(|cpu| &cpu.seconds[slot])
                .filter(|s| s.second == second)
            {
                c.packets += s.packets;
                c.bytes += s.bytes;
            }
            out.push(c);
        }
        Ok(out)
    }

    /// Sets the TCP ports whose SYNs count as new connections.
    pub fn set_protected_ports(&self, ports: &[u16]) -> Result<(), Error> {
        let mut words = vec![0u32; PORT_WORDS as usize];
        for p in ports {
            words[(*p as usize) >> 5] |= 1 << (*p & 31);
        }
        let mut map = lock(&self.ports)?;
        for (i, w) in words.iter().enumerate() {
            map.set(i as u32, w, 0)?;
        }
        Ok(())
    }
}

/// The `count` busiest of `sources` by packets (then bytes); with `window_seconds`, only
/// those seen within it.
pub fn busiest(
    mut sources: Vec<SourceCount>,
    count: usize,
    window_seconds: Option<u64>,
) -> Vec<SourceCount> {
    if let Some(window) = window_seconds {
        sources.retain(|s| s.last_seen_seconds_ago <= window as f64);
    }
    sources.sort_by(|a, b| b.packets.cmp(&a.packets).then(b.bytes.cmp(&a.bytes)));
    sources.truncate(count);
    sources
}

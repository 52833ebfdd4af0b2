//! The multihop mark switch of `tc_multihop_mark`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Mutex,
};

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use phantom_common::{
    dns::{MarkVerdict, MultihopConfig},
    xdp::{SourceKey, TrafficCounter},
};
use serde::Serialize;

use super::guard::{ip_to_key, key_to_ip};
use crate::error::Error;

/// What the kernel is told.
#[derive(Clone, Debug, PartialEq)]
pub struct MarkSettings {
    pub enabled: bool,
    pub mark: u32,
    pub v4: Option<(Ipv4Addr, u8)>,
    pub v6: Option<(Ipv6Addr, u8)>,
    /// The server's own addresses: traffic to them is never marked.
    pub local: Vec<IpAddr>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MarkStatus {
    pub enabled: bool,
    pub mark: u32,
    pub client_subnets: Vec<String>,
    pub local_addresses: Vec<IpAddr>,
    pub counters: Vec<MarkCount>,
}

pub type MarkCount = super::counters::VerdictCount;

pub struct MultihopMark {
    config: Mutex<Array<MapData, MultihopConfig>>,
    local: Mutex<HashMap<MapData, SourceKey, u8>>,
    stats: Mutex<PerCpuArray<MapData, TrafficCounter>>,
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, Error> {
    m.lock()
        .map_err(|_| Error::Datapath("multihop lock poisoned".into()))
}

fn v4_mask(prefix: u8) -> [u8; 4] {
    let m = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix.min(32))
    };
    m.to_be_bytes()
}

impl MultihopMark {
    pub fn new(
        config: Array<MapData, MultihopConfig>,
        local: HashMap<MapData, SourceKey, u8>,
        stats: PerCpuArray<MapData, TrafficCounter>,
    ) -> Self {
        Self {
            config: Mutex::new(config),
            local: Mutex::new(local),
            stats: Mutex::new(stats),
        }
    }

    /// Applies `s`. Local addresses are written before the switch flips, so the first marked
    /// packet already sees them.
    pub fn set(&self, s: &MarkSettings) -> Result<(), Error> {
        {
            let mut local = lock(&self.local)?;
            let old: Vec<SourceKey> = local.keys().filter_map(Result::ok).collect();
            for key in old {
                let _ = local.remove(&key);
            }
            for ip in &s.local {
                local.insert(&ip_to_key(*ip), &1, 0)?;
            }
        }
        let mut cfg = MultihopConfig {
            enabled: s.enabled as u32,
            mark: s.mark,
            ..Default::default()
        };
        if let Some((net, prefix)) = s.v4 {
            let mask = v4_mask(prefix);
            let o = net.octets();
            cfg.v4_net = [
                o[0] & mask[0],
                o[1] & mask[1],
                o[2] & mask[2],
                o[3] & mask[3],
            ];
            cfg.v4_mask = mask;
        }
        if let Some((net, prefix)) = s.v6 {
            cfg.v6_net = net.octets();
            cfg.v6_prefix_len = u32::from(prefix);
        }
        lock(&self.config)?.set(0, &cfg, 0)?;
        Ok(())
    }

    pub fn status(&self) -> Result<MarkStatus, Error> {
        let cfg = lock(&self.config)?.get(&0, 0)?;
        let mut subnets = Vec::new();
        if u32::from_be_bytes(cfg.v4_mask) != 0 {
            subnets.push(format!(
                "{}/{}",
                Ipv4Addr::from(cfg.v4_net),
                u32::from_be_bytes(cfg.v4_mask).count_ones()
            ));
        }
        if cfg.v6_prefix_len != 0 {
            subnets.push(format!(
                "{}/{}",
                Ipv6Addr::from(cfg.v6_net),
                cfg.v6_prefix_len
            ));
        }
        let local: Vec<IpAddr> = lock(&self.local)?
            .keys()
            .filter_map(Result::ok)
            .map(|k| key_to_ip(&k))
            .collect();
        let counters = super::counters::verdict_counts(
            &*lock(&self.stats)?,
            MarkVerdict::ALL.iter().map(|v| (*v as u32, v.name())),
        )?;
        Ok(MarkStatus {
            enabled: cfg.enabled != 0,
            mark: cfg.mark,
            client_subnets: subnets,
            local_addresses: local,
            counters,
        })
    }
}

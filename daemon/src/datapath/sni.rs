//! The maps of the SNI filter inside `tc_encrypted_dns`: its switches (`PH_SNI`), the known
//! ECH front names (`PH_ECH_FRONTS`, keyed by the installation's domain hash like
//! `PH_DOMAINS`) and its counters per verdict. The blocked names themselves are `PH_DOMAINS`,
//! shared with the DNS filter.

use std::{collections::BTreeSet, sync::Mutex};

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use phantom_common::{
    dns::{DOMAIN_EXACT, MAX_ECH_FRONTS, SniConfig, SniVerdict},
    xdp::TrafficCounter,
};
use serde::Serialize;

use super::map_memory::retrying_out_of_memory;
use crate::error::Error;

/// What the kernel is told.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SniSettings {
    pub drop_blocked: bool,
    pub strict: bool,
    /// The ECH front names' keys under the installation's domain hash.
    pub ech_fronts: Vec<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SniStatus {
    pub drop_blocked: bool,
    pub strict: bool,
    pub ech_fronts: usize,
    /// Packets per verdict; addresses and names are never kept.
    pub counters: Vec<SniCount>,
}

pub type SniCount = super::counters::VerdictCount;

pub struct SniFilter {
    config: Mutex<Array<MapData, SniConfig>>,
    fronts: Mutex<HashMap<MapData, u64, u8>>,
    stats: Mutex<PerCpuArray<MapData, TrafficCounter>>,
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, Error> {
    m.lock()
        .map_err(|_| Error::Datapath("SNI filter lock poisoned".into()))
}

impl SniFilter {
    pub fn new(
        config: Array<MapData, SniConfig>,
        fronts: HashMap<MapData, u64, u8>,
        stats: PerCpuArray<MapData, TrafficCounter>,
    ) -> Self {
        Self {
            config: Mutex::new(config),
            fronts: Mutex::new(fronts),
            stats: Mutex::new(stats),
        }
    }

    /// Applies `s`: the front names first (only what changed), the switches last. Too many
    /// front names is an error and changes nothing.
    pub fn set(&self, s: &SniSettings) -> Result<(), Error> {
        let want: BTreeSet<u64> = s.ech_fronts.iter().copied().collect();
        if want.len() > MAX_ECH_FRONTS as usize {
            return Err(Error::Datapath(format!(
                "{} ECH front names; the kernel holds {MAX_ECH_FRONTS}",
                want.len()
            )));
        }
        {
            let mut map = lock(&self.fronts)?;
            let have: Vec<u64> = map.keys().filter_map(Result::ok).collect();
            for key in have.iter().filter(|k| !want.contains(k)) {
                let _ = map.remove(key);
            }
            for key in &want {
                retrying_out_of_memory(|| map.insert(key, &DOMAIN_EXACT, 0))?;
            }
        }
        let cfg = SniConfig {
            drop_blocked: u32::from(s.drop_blocked),
            strict: u32::from(s.strict),
        };
        lock(&self.config)?.set(0, &cfg, 0)?;
        Ok(())
    }

    pub fn status(&self) -> Result<SniStatus, Error> {
        let cfg = lock(&self.config)?.get(&0, 0)?;
        let ech_fronts = lock(&self.fronts)?.keys().filter_map(Result::ok).count();
        let counters = super::counters::verdict_counts(
            &*lock(&self.stats)?,
            SniVerdict::ALL.iter().map(|v| (*v as u32, v.name())),
        )?;
        Ok(SniStatus {
            drop_blocked: cfg.drop_blocked != 0,
            strict: cfg.strict != 0,
            ech_fronts,
            counters,
        })
    }
}

//! The maps of `tc_encrypted_dns`: its switches, the resolver's own addresses (port 853 to
//! them passes) and the known DoH resolvers' prefixes, one LPM trie per family.

use std::{collections::BTreeSet, net::IpAddr, sync::Mutex};

use aya::maps::{
    Array, HashMap, MapData, PerCpuArray,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::IpNet;
use phantom_common::{
    dns::{EncryptedDnsConfig, EncryptedDnsVerdict, MAX_DOH_PREFIXES, MAX_RESOLVER_ADDRS},
    xdp::{SourceKey, TrafficCounter},
};
use serde::Serialize;

use super::guard::{ip_to_key, key_to_ip};
use super::map_memory::retrying_out_of_memory;
use crate::error::Error;

/// What the kernel is told.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncryptedDnsSettings {
    pub drop_dot_doq: bool,
    pub drop_doh: bool,
    /// Phantom's resolver: DoT/DoQ to these addresses pass.
    pub resolvers: Vec<IpAddr>,
    /// Known DoH resolvers.
    pub doh: Vec<IpNet>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EncryptedDnsStatus {
    pub drop_dot_doq: bool,
    pub drop_doh: bool,
    pub resolver_addresses: Vec<IpAddr>,
    pub doh_prefixes_v4: usize,
    pub doh_prefixes_v6: usize,
    /// Packets and bytes per verdict; addresses are never kept.
    pub counters: Vec<EncryptedDnsCount>,
}

pub type EncryptedDnsCount = super::counters::VerdictCount;

pub struct EncryptedDnsFilter {
    config: Mutex<Array<MapData, EncryptedDnsConfig>>,
    resolvers: Mutex<HashMap<MapData, SourceKey, u8>>,
    v4: Mutex<LpmTrie<MapData, [u8; 4], u8>>,
    v6: Mutex<LpmTrie<MapData, [u8; 16], u8>>,
    stats: Mutex<PerCpuArray<MapData, TrafficCounter>>,
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, Error> {
    m.lock()
        .map_err(|_| Error::Datapath("encrypted DNS filter lock poisoned".into()))
}

impl EncryptedDnsFilter {
    pub fn new(
        config: Array<MapData, EncryptedDnsConfig>,
        resolvers: HashMap<MapData, SourceKey, u8>,
        v4: LpmTrie<MapData, [u8; 4], u8>,
        v6: LpmTrie<MapData, [u8; 16], u8>,
        stats: PerCpuArray<MapData, TrafficCounter>,
    ) -> Self {
        Self {
            config: Mutex::new(config),
            resolvers: Mutex::new(resolvers),
            v4: Mutex::new(v4),
            v6: Mutex::new(v6),
            stats: Mutex::new(stats),
        }
    }

    /// Applies `s`: the resolver's addresses and the prefixes first (only what changed), the
    /// switches last, so the first dropped packet already sees the whole list. Too many
    /// entries is an error and changes nothing.
    pub fn set(&self, s: &EncryptedDnsSettings) -> Result<(), Error> {
        let (v4, v6): (BTreeSet<_>, BTreeSet<_>) = {
            let nets: BTreeSet<IpNet> = s.doh.iter().map(IpNet::trunc).collect();
            let v4 = nets
                .iter()
                .filter_map(|n| match n {
                    IpNet::V4(n) => Some((n.prefix_len(), n.network().octets())),
                    IpNet::V6(_) => None,
                })
                .collect();
            let v6 = nets
                .iter()
                .filter_map(|n| match n {
                    IpNet::V6(n) => Some((n.prefix_len(), n.network().octets())),
                    IpNet::V4(_) => None,
                })
                .collect();
            (v4, v6)
        };
        if v4.len() > MAX_DOH_PREFIXES as usize || v6.len() > MAX_DOH_PREFIXES as usize {
            return Err(Error::Datapath(format!(
                "the DoH resolver list has {} IPv4 and {} IPv6 prefixes; the kernel holds {MAX_DOH_PREFIXES} of each",
                v4.len(),
                v6.len()
            )));
        }
        if s.resolvers.len() > MAX_RESOLVER_ADDRS as usize {
            return Err(Error::Datapath(format!(
                "{} resolver addresses; the kernel holds {MAX_RESOLVER_ADDRS}",
                s.resolvers.len()
            )));
        }
        {
            let mut map = lock(&self.resolvers)?;
            let want: BTreeSet<IpAddr> = s.resolvers.iter().copied().collect();
            let have: Vec<SourceKey> = map.keys().filter_map(Result::ok).collect();
            for key in have.iter().filter(|k| !want.contains(&key_to_ip(k))) {
                let _ = map.remove(key);
            }
            for ip in &want {
                map.insert(&ip_to_key(*ip), &1, 0)?;
            }
        }
        sync_trie(&mut *lock(&self.v4)?, &v4)?;
        sync_trie(&mut *lock(&self.v6)?, &v6)?;
        let cfg = EncryptedDnsConfig {
            drop_dot_doq: u32::from(s.drop_dot_doq),
            drop_doh: u32::from(s.drop_doh),
        };
        lock(&self.config)?.set(0, &cfg, 0)?;
        Ok(())
    }

    pub fn status(&self) -> Result<EncryptedDnsStatus, Error> {
        let cfg = lock(&self.config)?.get(&0, 0)?;
        let resolver_addresses = lock(&self.resolvers)?
            .keys()
            .filter_map(Result::ok)
            .map(|k| key_to_ip(&k))
            .collect();
        let doh_prefixes_v4 = lock(&self.v4)?.keys().filter_map(Result::ok).count();
        let doh_prefixes_v6 = lock(&self.v6)?.keys().filter_map(Result::ok).count();
        let counters = super::counters::verdict_counts(
            &*lock(&self.stats)?,
            EncryptedDnsVerdict::ALL
                .iter()
                .map(|v| (*v as u32, v.name())),
        )?;
        Ok(EncryptedDnsStatus {
            drop_dot_doq: cfg.drop_dot_doq != 0,
            drop_doh: cfg.drop_doh != 0,
            resolver_addresses,
            doh_prefixes_v4,
            doh_prefixes_v6,
            counters,
        })
    }
}

/// Makes `trie` hold exactly `want` (prefix length, network), touching only the difference.
fn sync_trie<const N: usize>(
    trie: &mut LpmTrie<MapData, [u8; N], u8>,
    want: &BTreeSet<(u8, [u8; N])>,
) -> Result<(), Error>
where
    [u8; N]: aya::Pod,
{
    let have: Vec<Key<[u8; N]>> = trie.keys().filter_map(Result::ok).collect();
    for key in have {
        if !want.contains(&(key.prefix_len() as u8, key.data())) {
            let _ = trie.remove(&key);
        }
    }
    for (len, net) in want {
        retrying_out_of_memory(|| trie.insert(&Key::new(u32::from(*len), *net), &1, 0))?;
    }
    Ok(())
}

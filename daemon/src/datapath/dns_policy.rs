//! The DNS filter's policy maps: dry run, the own resolver's mark, and the clients with
//! blocking switched off. The resolver decides these for the answers it gives; these maps make
//! the kernel layer agree for the answers of every other resolver.

use std::{collections::BTreeSet, net::IpAddr, sync::Mutex};

use aya::maps::{Array, HashMap, MapData};
use phantom_common::dns::{ClientAddr, DnsPolicy};

use super::map_memory::retrying_out_of_memory;
use crate::error::Error;

pub struct DnsPolicyMaps {
    policy: Mutex<Array<MapData, DnsPolicy>>,
    exempt: Mutex<(HashMap<MapData, ClientAddr, u8>, BTreeSet<ClientAddr>)>,
}

fn key(ip: IpAddr) -> ClientAddr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

impl DnsPolicyMaps {
    pub fn new(
        policy: Array<MapData, DnsPolicy>,
        exempt: HashMap<MapData, ClientAddr, u8>,
    ) -> Self {
        // The map is pinned: what a previous run left is the starting point of the diff.
        let have = exempt.keys().filter_map(Result::ok).collect();
        Self {
            policy: Mutex::new(policy),
            exempt: Mutex::new((exempt, have)),
        }
    }

    pub fn set_policy(&self, dry_run: bool, resolver_mark: u32) -> Result<(), Error> {
        // Lock order: the exempt set, then the policy (as `set_exempt`).
        let exempt = self
            .exempt
            .lock()
            .map_err(|_| Error::Datapath("dns exempt lock poisoned".into()))?;
        let mut map = self
            .policy
            .lock()
            .map_err(|_| Error::Datapath("dns policy lock poisoned".into()))?;
        map.set(
            0,
            &DnsPolicy {
                dry_run: u32::from(dry_run),
                resolver_mark,
                exempt_clients: u32::try_from(exempt.1.len()).unwrap_or(u32::MAX),
            },
            0,
        )?;
        Ok(())
    }

    pub fn policy(&self) -> Result<DnsPolicy, Error> {
        let map = self
            .policy
            .lock()
            .map_err(|_| Error::Datapath("dns policy lock poisoned".into()))?;
        Ok(map.get(&0, 0)?)
    }

    /// Makes the exempt set exactly `clients`, writing only the difference.
    pub fn set_exempt(&self, clients: &BTreeSet<IpAddr>) -> Result<(), Error> {
        let want: BTreeSet<ClientAddr> = clients.iter().copied().map(key).collect();
        let mut guard = self
            .exempt
            .lock()
            .map_err(|_| Error::Datapath("dns exempt lock poisoned".into()))?;
        let (map, have) = &mut *guard;
        for gone in have.difference(&want).copied().collect::<Vec<_>>() {
            match map.remove(&gone) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
            have.remove(&gone);
        }
        for new in want.difference(&have.clone()) {
            retrying_out_of_memory(|| map.insert(new, &1, 0)).map_err(|e| {
                Error::Datapath(format!("cannot write the exempt-client map (full?): {e}"))
            })?;
            have.insert(*new);
        }
        // The count after the map: the filters look clients up while it is not 0.
        let mut policy = self
            .policy
            .lock()
            .map_err(|_| Error::Datapath("dns policy lock poisoned".into()))?;
        let current = policy.get(&0, 0).unwrap_or_default();
        let count = u32::try_from(have.len()).unwrap_or(u32::MAX);
        if current.exempt_clients != count {
            policy.set(
                0,
                &DnsPolicy {
                    exempt_clients: count,
                    ..current
                },
                0,
            )?;
        }
        Ok(())
    }

    pub fn exempt_len(&self) -> usize {
        self.exempt.lock().map(|g| g.1.len()).unwrap_or(0)
    }
}

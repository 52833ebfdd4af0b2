//! The maps of `tc_client_policy`: each client's rules by address, the isolation switch with
//! the client subnet, and the counters per verdict.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Mutex};

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use phantom_common::{
    policy::{ClientAcl, MAX_ACL_CLIENTS, PolicyConfig, PolicyVerdict},
    xdp::TrafficCounter,
};

use crate::error::Error;

pub type PolicyCount = super::counters::VerdictCount;

pub struct ClientPolicyMaps {
    acls: Mutex<HashMap<MapData, [u8; 4], ClientAcl>>,
    config: Mutex<Array<MapData, PolicyConfig>>,
    stats: Mutex<PerCpuArray<MapData, TrafficCounter>>,
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, Error> {
    m.lock()
        .map_err(|_| Error::Datapath("client policy lock poisoned".into()))
}

impl ClientPolicyMaps {
    pub fn new(
        acls: HashMap<MapData, [u8; 4], ClientAcl>,
        config: Array<MapData, PolicyConfig>,
        stats: PerCpuArray<MapData, TrafficCounter>,
    ) -> Self {
        Self {
            acls: Mutex::new(acls),
            config: Mutex::new(config),
            stats: Mutex::new(stats),
        }
    }

    /// Makes the kernel hold exactly `acls` (client address -> rules), touching only what
    /// changed. More clients with rules than the map holds is an error and changes nothing.
    pub fn set_acls(&self, acls: &BTreeMap<Ipv4Addr, ClientAcl>) -> Result<(), Error> {
        if acls.len() > MAX_ACL_CLIENTS as usize {
            return Err(Error::Datapath(format!(
                "{} clients have rules; the kernel holds {MAX_ACL_CLIENTS}",
                acls.len()
            )));
        }
        let mut map = lock(&self.acls)?;
        let have: Vec<[u8; 4]> = map.keys().filter_map(Result::ok).collect();
        for key in have {
            if !acls.contains_key(&Ipv4Addr::from(key)) {
                let _ = map.remove(&key);
            }
        }
        for (ip, acl) in acls {
            let key = ip.octets();
            if map.get(&key, 0).ok().as_ref() != Some(acl) {
                map.insert(&key, acl, 0)?;
            }
        }
        Ok(())
    }

    pub fn set_config(&self, cfg: &PolicyConfig) -> Result<(), Error> {
        lock(&self.config)?.set(0, cfg, 0)?;
        Ok(())
    }

    pub fn counts(&self) -> Result<Vec<PolicyCount>, Error> {
        super::counters::verdict_counts(
            &*lock(&self.stats)?,
            PolicyVerdict::ALL.iter().map(|v| (*v as u32, v.name())),
        )
    }
}

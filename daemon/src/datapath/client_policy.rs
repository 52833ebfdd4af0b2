//! The maps of `tc_client_policy`: each client's rules, the isolation switch with the client
//! subnet, the counters per verdict, and each limited client's buckets, quota and counters,
//! the last and the first by client slot; the per-slot flags that let most packets skip the
//! lookups and say which of a slot's two rule entries is in use, and each client's drops by
//! its rules and by isolation.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Mutex};

use aya::maps::{Array, MapData, PerCpuArray};
use phantom_common::{
    policy::{
        CLIENT_SLOTS, ClientAcl, ClientDrops, ClientLimit, PolicyConfig, PolicyVerdict,
        SLOT_ACL_GEN_MASK, SLOT_ACL_GEN_SHIFT, SLOT_ACL_SIDE, SLOT_HAS_LIMIT, SLOT_HAS_RULES,
        acl_entry, client_slot,
    },
    xdp::TrafficCounter,
};

use crate::error::Error;

pub type PolicyCount = super::counters::VerdictCount;

pub struct ClientPolicyMaps {
    acls: Mutex<Array<MapData, ClientAcl>>,
    config: Mutex<Array<MapData, PolicyConfig>>,
    stats: Mutex<PerCpuArray<MapData, TrafficCounter>>,
    limits: Mutex<Array<MapData, ClientLimit>>,
    flags: Mutex<SlotFlags>,
    drops: Mutex<Array<MapData, ClientDrops>>,
}

/// `PH_CLIENT_FLAGS` with the daemon's copy of it (read once at start, so a restart adopts
/// what the pinned map holds and never clears a bit an entry still needs).
struct SlotFlags {
    map: Array<MapData, u32>,
    have: Vec<u32>,
}

impl SlotFlags {
    fn new(map: Array<MapData, u32>) -> Self {
        let have = (0..CLIENT_SLOTS)
            .map(|i| map.get(&i, 0).unwrap_or(SLOT_HAS_RULES | SLOT_HAS_LIMIT))
            .collect();
        Self { map, have }
    }

    /// Sets `bit` on the slots of `addrs` that lack it: before their entries go in.
    fn raise<'a>(
        &mut self,
        bit: u32,
        addrs: impl Iterator<Item = &'a Ipv4Addr>,
    ) -> Result<(), Error> {
        for ip in addrs {
            let slot = client_slot(ip.octets());
            let have = self.have[slot as usize];
            if have & bit == 0 {
                self.map.set(slot, &(have | bit), 0)?;
                self.have[slot as usize] = have | bit;
            }
        }
        Ok(())
    }

    /// The slots whose `bit` is set: every slot with an entry, and perhaps a few more.
    fn slots_with(&self, bit: u32) -> impl Iterator<Item = u32> + '_ {
        (0..CLIENT_SLOTS).filter(move |slot| self.have[*slot as usize] & bit != 0)
    }

    /// Points `slot` at its other rule entry (`rules`: with rules) or at none, counting the
    /// change; `tc_client_policy` rereads the flags after the rules, and a changed count tells
    /// it that the entry it read may be being written.
    fn switch_rules(&mut self, slot: u32, rules: bool) -> Result<(), Error> {
        let have = self.have[slot as usize];
        let generation = ((have >> SLOT_ACL_GEN_SHIFT).wrapping_add(1) << SLOT_ACL_GEN_SHIFT)
            & SLOT_ACL_GEN_MASK;
        let next = if rules {
            ((have & !SLOT_ACL_GEN_MASK) ^ SLOT_ACL_SIDE) | SLOT_HAS_RULES | generation
        } else {
            (have & !(SLOT_ACL_GEN_MASK | SLOT_HAS_RULES)) | generation
        };
        self.map.set(slot, &next, 0)?;
        self.have[slot as usize] = next;
        Ok(())
    }

    /// The entry of `PH_CLIENT_ACL` that `slot`'s next rules go into: the one not in use.
    fn spare_rules_entry(&self, slot: u32) -> u32 {
        acl_entry(slot, self.have[slot as usize] ^ SLOT_ACL_SIDE)
    }

    /// The entry of `PH_CLIENT_ACL` holding `slot`'s rules, if it has rules.
    fn rules_entry(&self, slot: u32) -> Option<u32> {
        let have = self.have[slot as usize];
        (have & SLOT_HAS_RULES != 0).then(|| acl_entry(slot, have))
    }

    /// Clears `bit` on every slot none of `addrs` is in: after the other entries are gone.
    fn lower<'a>(
        &mut self,
        bit: u32,
        addrs: impl Iterator<Item = &'a Ipv4Addr>,
    ) -> Result<(), Error> {
        let keep: std::collections::HashSet<u32> =
            addrs.map(|ip| client_slot(ip.octets())).collect();
        for slot in 0..CLIENT_SLOTS {
            let have = self.have[slot as usize];
            if have & bit != 0 && !keep.contains(&slot) {
                self.map.set(slot, &(have & !bit), 0)?;
                self.have[slot as usize] = have & !bit;
            }
        }
        Ok(())
    }
}

/// Copies the daemon's settings of `want` over `have`, keeping what the kernel counts (the
/// buckets, the byte and drop counters) and where the quota period started.
fn merged(have: Option<ClientLimit>, want: &ClientLimit) -> ClientLimit {
    let Some(mut l) = have else {
        return *want;
    };
    for (dir, w) in [(&mut l.up, &want.up), (&mut l.down, &want.down)] {
        dir.ns_per_byte_q16 = w.ns_per_byte_q16;
        dir.floor_ns_per_byte_q16 = w.floor_ns_per_byte_q16;
        dir.burst_bytes = w.burst_bytes;
    }
    l.quota_bytes = want.quota_bytes;
    l.quota_action = want.quota_action;
    l
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, Error> {
    m.lock()
        .map_err(|_| Error::Datapath("client policy lock poisoned".into()))
}

impl ClientPolicyMaps {
    pub fn new(
        acls: Array<MapData, ClientAcl>,
        config: Array<MapData, PolicyConfig>,
        stats: PerCpuArray<MapData, TrafficCounter>,
        limits: Array<MapData, ClientLimit>,
        flags: Array<MapData, u32>,
        drops: Array<MapData, ClientDrops>,
    ) -> Self {
        Self {
            acls: Mutex::new(acls),
            config: Mutex::new(config),
            stats: Mutex::new(stats),
            limits: Mutex::new(limits),
            flags: Mutex::new(SlotFlags::new(flags)),
            drops: Mutex::new(drops),
        }
    }

    /// The packets of the client at `ip` dropped by its rules and by isolation since its slot
    /// was last zeroed.
    pub fn drops(&self, ip: Ipv4Addr) -> Result<ClientDrops, Error> {
        Ok(lock(&self.drops)?.get(&client_slot(ip.octets()), 0)?)
    }

    /// Zeroes the drop counts of `ip`'s slot: a client took that address.
    pub fn zero_drops(&self, ip: Ipv4Addr) -> Result<(), Error> {
        lock(&self.drops)?.set(client_slot(ip.octets()), &ClientDrops::default(), 0)?;
        Ok(())
    }

    /// Makes the kernel hold a limit entry for exactly the clients of `limits` (client
    /// address -> settings), each in its slot, changing only the settings of entries already
    /// there for the same address: their counters and quota period go on. Two clients in one
    /// slot (a subnet over /16, which the configuration refuses) is an error and changes
    /// nothing.
    pub fn set_limits(&self, limits: &BTreeMap<Ipv4Addr, ClientLimit>) -> Result<(), Error> {
        let mut wanted = std::collections::HashMap::with_capacity(limits.len());
        for ip in limits.keys() {
            if let Some(other) = wanted.insert(client_slot(ip.octets()), *ip) {
                return Err(Error::Datapath(format!(
                    "clients {other} and {ip} share a kernel slot: the client subnet must be a \
                     /16 or smaller"
                )));
            }
        }
        let mut flags = lock(&self.flags)?;
        flags.raise(SLOT_HAS_LIMIT, limits.keys())?;
        let mut map = lock(&self.limits)?;
        let empty = ClientLimit::default();
        for slot in flags.slots_with(SLOT_HAS_LIMIT) {
            if !wanted.contains_key(&slot) && map.get(&slot, 0)? != empty {
                map.set(slot, &empty, 0)?;
            }
        }
        for (ip, want) in limits {
            let slot = client_slot(ip.octets());
            let have = Some(map.get(&slot, 0)?).filter(|l| l.addr == ip.octets());
            let next = ClientLimit {
                addr: ip.octets(),
                ..merged(have, want)
            };
            if have != Some(next) {
                map.set(slot, &next, 0)?;
            }
        }
        flags.lower(SLOT_HAS_LIMIT, limits.keys())
    }

    /// Every limit entry with its counters.
    pub fn limits(&self) -> Result<Vec<(Ipv4Addr, ClientLimit)>, Error> {
        let flags = lock(&self.flags)?;
        let map = lock(&self.limits)?;
        Ok(flags
            .slots_with(SLOT_HAS_LIMIT)
            .filter_map(|slot| map.get(&slot, 0).ok())
            .filter(|l| l.addr != [0; 4])
            .map(|l| (Ipv4Addr::from(l.addr), l))
            .collect())
    }

    /// Starts a new quota period for `ip`: what it moved so far no longer counts. `used`
    /// (bytes already used in the period, e.g. kept across a reboot) counts again.
    pub fn start_quota_period(&self, ip: Ipv4Addr, used: u64) -> Result<(), Error> {
        let mut map = lock(&self.limits)?;
        let slot = client_slot(ip.octets());
        let mut l = map.get(&slot, 0)?;
        if l.addr == ip.octets() {
            l.quota_base = l.up.bytes.wrapping_add(l.down.bytes).wrapping_sub(used);
            map.set(slot, &l, 0)?;
        }
        Ok(())
    }

    /// Makes the kernel hold exactly `acls` (client address -> rules), touching only what
    /// changed. A client's new rules go into its slot's spare entry, and only then does its
    /// slot point at them: a packet reads either the old rules or the new, never a mix. Two
    /// clients in one slot is an error and changes nothing.
    pub fn set_acls(&self, acls: &BTreeMap<Ipv4Addr, ClientAcl>) -> Result<(), Error> {
        let mut wanted = std::collections::HashMap::with_capacity(acls.len());
        for (ip, acl) in acls {
            let next = ClientAcl {
                addr: ip.octets(),
                ..*acl
            };
            if let Some(other) = wanted.insert(client_slot(ip.octets()), next) {
                return Err(Error::Datapath(format!(
                    "clients {} and {ip} share a kernel slot: the client subnet must be a /16 \
                     or smaller",
                    Ipv4Addr::from(other.addr)
                )));
            }
        }
        let mut flags = lock(&self.flags)?;
        let mut map = lock(&self.acls)?;
        let gone: Vec<u32> = flags
            .slots_with(SLOT_HAS_RULES)
            .filter(|slot| !wanted.contains_key(slot))
            .collect();
        for slot in gone {
            flags.switch_rules(slot, false)?;
        }
        for (slot, next) in wanted {
            if let Some(entry) = flags.rules_entry(slot)
                && map.get(&entry, 0)? == next
            {
                continue;
            }
            map.set(flags.spare_rules_entry(slot), &next, 0)?;
            flags.switch_rules(slot, true)?;
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

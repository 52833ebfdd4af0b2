//! The kernel's blocked-domain set for `tc_dns_filter`.
//!
//! Several owners feed it (operator rules from the socket now; the blocklist's exact and
//! subdomain rules later); the kernel map holds their union, keyed by `domain_hash`. A mirror of
//! the kernel map in userspace makes every sync a diff: only changed keys are written.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::maps::{HashMap, MapData};
use phantom_common::dns::{DOMAIN_EXACT, DOMAIN_SUBDOMAINS, domain_hash};
use serde::Serialize;

use crate::{error::Error, store};

/// Who put a rule into the kernel set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Owner {
    /// `datapath dns_block`, persisted in the state directory.
    Operator,
    /// The blocklist's exact/subdomain rules.
    Blocklist,
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct SyncReport {
    /// Keys written to the kernel (new or changed flags).
    pub written: usize,
    /// Keys deleted from the kernel.
    pub deleted: usize,
    /// Keys in the kernel set after the sync.
    pub total: usize,
}

struct State {
    map: HashMap<MapData, u64, u8>,
    /// What the kernel map holds.
    kernel: StdHashMap<u64, u8>,
    /// Each owner's rules: hash -> flags.
    owners: BTreeMap<Owner, StdHashMap<u64, u8>>,
    /// Operator rules by name (for listing and persistence): name -> covers subdomains.
    operator_names: BTreeMap<String, bool>,
}

pub struct DomainFilter {
    state: Mutex<State>,
    path: PathBuf,
}

fn flags_for(subdomains: bool) -> u8 {
    if subdomains {
        DOMAIN_EXACT | DOMAIN_SUBDOMAINS
    } else {
        DOMAIN_EXACT
    }
}

impl State {
    fn union(&self, hash: u64) -> u8 {
        self.owners
            .values()
            .filter_map(|rules| rules.get(&hash))
            .fold(0, |acc, f| acc | f)
    }

    /// Brings the kernel in line with the union for `hashes`.
    fn apply(
        &mut self,
        hashes: impl IntoIterator<Item = u64>,
        report: &mut SyncReport,
    ) -> Result<(), Error> {
        for hash in hashes {
            let want = self.union(hash);
            let have = self.kernel.get(&hash).copied().unwrap_or(0);
            if want == have {
                continue;
            }
            if want == 0 {
                match self.map.remove(&hash) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(e.into()),
                }
                self.kernel.remove(&hash);
                report.deleted += 1;
            } else {
                self.map.insert(&hash, &want, 0).map_err(|e| {
                    Error::Datapath(format!("cannot write the domain map (full?): {e}"))
                })?;
                self.kernel.insert(hash, want);
                report.written += 1;
            }
        }
        report.total = self.kernel.len();
        Ok(())
    }
}

impl DomainFilter {
    /// Reads what the (pinned) kernel map holds, restores the operator rules, and removes keys
    /// no owner claims.
    pub fn open(map: HashMap<MapData, u64, u8>, state_dir: &Path) -> Result<Self, Error> {
        let path = state_dir.join("datapath-domains.json");
        let operator_names: BTreeMap<String, bool> = store::read_json(&path)?;
        let kernel: StdHashMap<u64, u8> = map.iter().filter_map(Result::ok).collect();
        let mut state = State {
            map,
            kernel,
            owners: BTreeMap::new(),
            operator_names: BTreeMap::new(),
        };
        let rules: StdHashMap<u64, u8> = operator_names
            .iter()
            .map(|(n, sub)| (domain_hash(n.as_bytes()), flags_for(*sub)))
            .collect();
        state.owners.insert(Owner::Operator, rules);
        state.operator_names = operator_names;
        let mut report = SyncReport::default();
        let keys: Vec<u64> = state
            .kernel
            .keys()
            .chain(state.owners.values().flat_map(|r| r.keys()))
            .copied()
            .collect();
        state.apply(keys, &mut report)?;
        Ok(Self {
            state: Mutex::new(state),
            path,
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, Error> {
        self.state
            .lock()
            .map_err(|_| Error::Datapath("domain filter lock poisoned".into()))
    }

    /// Replaces all of `owner`'s rules with `rules` (normalised names, covers-subdomains).
    pub fn replace(&self, owner: Owner, rules: &[(String, bool)]) -> Result<SyncReport, Error> {
        let mut state = self.lock()?;
        let new: StdHashMap<u64, u8> = rules
            .iter()
            .map(|(n, sub)| (domain_hash(n.as_bytes()), flags_for(*sub)))
            .collect();
        let old = state.owners.insert(owner, new).unwrap_or_default();
        let touched: Vec<u64> = old
            .keys()
            .copied()
            .chain(rules.iter().map(|(n, _)| domain_hash(n.as_bytes())))
            .collect();
        let mut report = SyncReport::default();
        state.apply(touched, &mut report)?;
        Ok(report)
    }

    /// Applies a change set to `owner`'s rules (the blocklist's journal deltas): cost follows
    /// the size of the change, not of the set. Not for `Owner::Operator`, whose rules are
    /// persisted one by one through `add`/`remove`.
    pub fn update(
        &self,
        owner: Owner,
        added: &[(String, bool)],
        removed: &[String],
    ) -> Result<SyncReport, Error> {
        if owner == Owner::Operator {
            return Err(Error::Datapath(
                "operator rules change through add/remove".into(),
            ));
        }
        let mut state = self.lock()?;
        let rules = state.owners.entry(owner).or_default();
        let mut touched = Vec::with_capacity(added.len() + removed.len());
        for name in removed {
            let hash = domain_hash(name.as_bytes());
            rules.remove(&hash);
            touched.push(hash);
        }
        for (name, subdomains) in added {
            let hash = domain_hash(name.as_bytes());
            rules.insert(hash, flags_for(*subdomains));
            touched.push(hash);
        }
        let mut report = SyncReport::default();
        state.apply(touched, &mut report)?;
        Ok(report)
    }

    /// Adds or updates one of `owner`'s rules.
    pub fn add(&self, owner: Owner, name: &str, subdomains: bool) -> Result<SyncReport, Error> {
        let mut state = self.lock()?;
        if owner == Owner::Operator {
            let mut names = state.operator_names.clone();
            names.insert(name.to_string(), subdomains);
            store::write_json(&self.path, &names)?;
            state.operator_names = names;
        }
        let hash = domain_hash(name.as_bytes());
        state
            .owners
            .entry(owner)
            .or_default()
            .insert(hash, flags_for(subdomains));
        let mut report = SyncReport::default();
        state.apply([hash], &mut report)?;
        Ok(report)
    }

    /// Removes one of `owner`'s rules; `Ok(None)` when it had no such rule.
    pub fn remove(&self, owner: Owner, name: &str) -> Result<Option<SyncReport>, Error> {
        let mut state = self.lock()?;
        let hash = domain_hash(name.as_bytes());
        let had = state
            .owners
            .get_mut(&owner)
            .and_then(|r| r.remove(&hash))
            .is_some();
        if !had {
            return Ok(None);
        }
        if owner == Owner::Operator {
            let mut names = state.operator_names.clone();
            names.remove(name);
            store::write_json(&self.path, &names)?;
            state.operator_names = names;
        }
        let mut report = SyncReport::default();
        state.apply([hash], &mut report)?;
        Ok(Some(report))
    }

    /// The operator's rules: name -> covers subdomains.
    pub fn operator_rules(&self) -> Result<BTreeMap<String, bool>, Error> {
        Ok(self.lock()?.operator_names.clone())
    }

    /// Keys in the kernel set.
    pub fn kernel_len(&self) -> Result<usize, Error> {
        Ok(self.lock()?.kernel.len())
    }
}

//! The gambling-domain blocklist (seed 001): entries with weighted patterns, a monotonic
//! version with a change journal, a checksum of the canonical list, the matching engine, and
//! the kernel's share of it (exact and subdomain rules at or above the threshold go into the
//! DNS filter's domain set).

pub mod actions;
pub mod api;
pub mod import;
pub mod matcher;
pub mod model;
pub mod store;

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use sha2::{Digest, Sha256};
use tracing::{info, warn};

use self::{
    matcher::{Matcher, Verdict},
    model::{Entry, Pattern, PatternType},
    store::{BlocklistStore, Change},
};
use crate::{
    datapath::{Datapath, Owner},
    error::Error,
};

struct State {
    entries: BTreeMap<String, Entry>,
    patterns: Vec<Pattern>,
    version: u64,
    matcher: Matcher,
    checksum: String,
}

pub struct Blocklist {
    store: BlocklistStore,
    state: RwLock<State>,
    threshold: f64,
    datapath: Option<Arc<Datapath>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Canonical JSON: keys sorted (serde_json's map), no spaces. Clients can rebuild it.
fn canonical(v: &impl serde::Serialize) -> Option<Vec<u8>> {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| serde_json::to_vec(&v).ok())
}

/// SHA-256 over the canonical list: one canonical JSON line per entry, by domain, then one per
/// pattern, by type and text.
fn checksum(entries: &BTreeMap<String, Entry>, patterns: &[Pattern]) -> String {
    let mut h = Sha256::new();
    for e in entries.values() {
        if let Some(line) = canonical(e) {
            h.update(&line);
            h.update(b"\n");
        }
    }
    let mut sorted: Vec<&Pattern> = patterns.iter().collect();
    sorted.sort_by(|a, b| (a.kind, &a.pattern).cmp(&(b.kind, &b.pattern)));
    for p in sorted {
        if let Some(line) = canonical(p) {
            h.update(&line);
            h.update(b"\n");
        }
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Entries added or modified, and domains removed, since a version.
pub type Delta = (Vec<Entry>, Vec<String>);

/// What a change did.
#[derive(Debug, Default)]
pub struct Applied {
    pub version: u64,
    pub changed: usize,
}

impl Blocklist {
    pub fn open(
        state_dir: &Path,
        threshold: f64,
        datapath: Option<Arc<Datapath>>,
    ) -> Result<Self, Error> {
        let store = BlocklistStore::open(&state_dir.join("blocklist.db"))?;
        let loaded = store.load()?;
        let entries: BTreeMap<String, Entry> = loaded
            .entries
            .into_iter()
            .map(|e| (e.domain.clone(), e))
            .collect();
        let matcher = Matcher::new(entries.values(), &loaded.patterns);
        let checksum = checksum(&entries, &loaded.patterns);
        let list = Self {
            store,
            state: RwLock::new(State {
                entries,
                patterns: loaded.patterns,
                version: loaded.version,
                matcher,
                checksum,
            }),
            threshold,
            datapath,
        };
        list.sync_kernel_full();
        info!(
            entries = list.len(),
            version = loaded.version,
            "blocklist loaded"
        );
        Ok(list)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        match self.state.read() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        match self.state.write() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn version(&self) -> u64 {
        self.read().version
    }

    pub fn checksum(&self) -> String {
        self.read().checksum.clone()
    }

    pub fn patterns(&self) -> Vec<Pattern> {
        self.read().patterns.clone()
    }

    pub fn get(&self, domain: &str) -> Option<Entry> {
        self.read().entries.get(domain).cloned()
    }

    /// One page of entries by domain, with the total matching `search`.
    pub fn page(&self, offset: usize, limit: usize, search: Option<&str>) -> (Vec<Entry>, usize) {
        let state = self.read();
        let matching: Vec<&Entry> = state
            .entries
            .values()
            .filter(|e| search.is_none_or(|s| e.domain.contains(s)))
            .collect();
        let total = matching.len();
        (
            matching
                .into_iter()
                .skip(offset)
                .take(limit)
                .cloned()
                .collect(),
            total,
        )
    }

    pub fn verify(&self, name: &str) -> Verdict {
        self.read().matcher.check(name, self.threshold)
    }

    /// Adds or replaces entries (one new version for the batch).
    pub fn upsert(&self, entries: Vec<Entry>) -> Result<Applied, Error> {
        if entries.is_empty() {
            return Ok(Applied {
                version: self.version(),
                changed: 0,
            });
        }
        let mut state = self.write();
        let version = now_ms().max(state.version + 1);
        let changes: Vec<Change<'_>> = entries.iter().map(Change::Upsert).collect();
        self.store.commit(version, &changes)?;
        for e in &entries {
            state.matcher.upsert(e);
            state.entries.insert(e.domain.clone(), e.clone());
        }
        state.version = version;
        state.checksum = checksum(&state.entries, &state.patterns);
        drop(state);
        let rules: Vec<(String, bool)> =
            entries.iter().filter_map(|e| self.kernel_rule(e)).collect();
        let gone: Vec<String> = entries
            .iter()
            .filter(|e| self.kernel_rule(e).is_none())
            .map(|e| e.domain.clone())
            .collect();
        self.sync_kernel(&rules, &gone);
        Ok(Applied {
            version,
            changed: entries.len(),
        })
    }

    /// Removes a domain; `Ok(None)` when it is not listed.
    pub fn remove(&self, domain: &str) -> Result<Option<Applied>, Error> {
        let mut state = self.write();
        if !state.entries.contains_key(domain) {
            return Ok(None);
        }
        let version = now_ms().max(state.version + 1);
        self.store.commit(version, &[Change::Remove(domain)])?;
        state.entries.remove(domain);
        state.matcher.remove(domain);
        state.version = version;
        state.checksum = checksum(&state.entries, &state.patterns);
        drop(state);
        self.sync_kernel(&[], &[domain.to_string()]);
        Ok(Some(Applied {
            version,
            changed: 1,
        }))
    }

    /// Adds or reweights a `contains` or `regex` pattern.
    pub fn add_pattern(&self, pattern: Pattern) -> Result<Applied, Error> {
        let mut state = self.write();
        let version = now_ms().max(state.version + 1);
        self.store
            .commit(version, &[Change::AddPattern(&pattern)])?;
        state
            .patterns
            .retain(|p| !(p.pattern == pattern.pattern && p.kind == pattern.kind));
        state.patterns.push(pattern);
        let patterns = state.patterns.clone();
        state.matcher.set_patterns(&patterns);
        state.version = version;
        state.checksum = checksum(&state.entries, &state.patterns);
        Ok(Applied {
            version,
            changed: 1,
        })
    }

    pub fn remove_pattern(
        &self,
        pattern: &str,
        kind: PatternType,
    ) -> Result<Option<Applied>, Error> {
        let mut state = self.write();
        if !state
            .patterns
            .iter()
            .any(|p| p.pattern == pattern && p.kind == kind)
        {
            return Ok(None);
        }
        let version = now_ms().max(state.version + 1);
        self.store
            .commit(version, &[Change::RemovePattern(pattern, kind)])?;
        state
            .patterns
            .retain(|p| !(p.pattern == pattern && p.kind == kind));
        let patterns = state.patterns.clone();
        state.matcher.set_patterns(&patterns);
        state.version = version;
        state.checksum = checksum(&state.entries, &state.patterns);
        Ok(Some(Applied {
            version,
            changed: 1,
        }))
    }

    /// The kernel's rule for an entry: exact/subdomain rules at or above the threshold.
    fn kernel_rule(&self, e: &Entry) -> Option<(String, bool)> {
        let (exact, sub) = e.weights();
        if sub >= self.threshold {
            Some((e.domain.clone(), true))
        } else if exact >= self.threshold {
            Some((e.domain.clone(), false))
        } else {
            None
        }
    }

    fn sync_kernel(&self, added: &[(String, bool)], removed: &[String]) {
        if let Some(dp) = &self.datapath
            && let Err(e) = dp.domains.update(Owner::Blocklist, added, removed)
        {
            warn!(error = %e, "cannot update the kernel domain set");
        }
    }

    fn sync_kernel_full(&self) {
        if let Some(dp) = &self.datapath {
            let rules: Vec<(String, bool)> = self
                .read()
                .entries
                .values()
                .filter_map(|e| self.kernel_rule(e))
                .collect();
            match dp.domains.replace(Owner::Blocklist, &rules) {
                Ok(r) => info!(
                    written = r.written,
                    deleted = r.deleted,
                    total = r.total,
                    "kernel domain set synced"
                ),
                Err(e) => warn!(error = %e, "cannot sync the kernel domain set"),
            }
        }
    }

    /// Everything: entries by domain.
    pub fn entries(&self) -> Vec<Entry> {
        self.read().entries.values().cloned().collect()
    }

    /// The changes after `since`: (entries added or modified, domains removed). `None` when
    /// `since` cannot be answered with a delta (newer than the list, or older than the
    /// journal).
    pub fn delta(&self, since: u64) -> Result<Option<Delta>, Error> {
        let state = self.read();
        if since > state.version {
            return Ok(None);
        }
        let Some(domains) = self.store.changed_since(since)? else {
            return Ok(None);
        };
        let mut upserts = Vec::new();
        let mut removed = Vec::new();
        for d in domains {
            match state.entries.get(&d) {
                Some(e) => upserts.push(e.clone()),
                None => removed.push(d),
            }
        }
        upserts.sort_by(|a, b| a.domain.cmp(&b.domain));
        removed.sort();
        Ok(Some((upserts, removed)))
    }

    /// Kernel rules that come from the blocklist.
    pub fn kernel_rules(&self) -> usize {
        self.read()
            .entries
            .values()
            .filter(|e| self.kernel_rule(e).is_some())
            .count()
    }
}

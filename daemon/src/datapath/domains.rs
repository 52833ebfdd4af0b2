//! The kernel's blocked-domain set for `tc_dns_filter`.
//!
//! Several owners feed it (operator rules from the socket; the blocklist's exact and subdomain
//! rules); the kernel map holds their union, keyed by the installation's domain hash
//! (`crate::domain_hash`), whose key the kernel reads from `PH_DNS_KEY`. A mirror of the kernel
//! map in userspace makes every sync a diff: only changed keys are written.
//!
//! Two different names never share a key in the set: the second of such a pair is refused
//! (`add` answers [`KeyClash`], bulk changes skip it and list it in [`SyncReport::refused`]).
//! Each rule keeps a tag of its name (`DomainHasher::tag`) to tell a different name from the
//! same one again without holding a million names twice.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, hash_map::Entry},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::maps::{Array, HashMap, IterableMap, MapData};
use phantom_common::dns::{DOMAIN_EXACT, DOMAIN_SUBDOMAINS, DomainKey};
use serde::Serialize;
use tracing::{info, warn};

use super::map_memory::retrying_out_of_memory;
pub use crate::domain_hash::KeyClash;
use crate::{
    domain_hash::{DomainHasher, SeedOrigin},
    error::Error,
    store,
};

/// Who put a rule into the kernel set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Owner {
    /// `datapath dns_block`, persisted in the state directory.
    Operator,
    /// The blocklist's exact/subdomain rules.
    Blocklist,
}

impl Owner {
    fn describe(self) -> &'static str {
        match self {
            Owner::Operator => "an operator's kernel rule",
            Owner::Blocklist => "a blocklist entry",
        }
    }
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct SyncReport {
    /// Keys written to the kernel (new or changed flags).
    pub written: usize,
    /// Keys deleted from the kernel.
    pub deleted: usize,
    /// Keys in the kernel set after the sync.
    pub total: usize,
    /// Names left out: another name holds their key.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<KeyClash>,
    /// Keys the full kernel map refused in this sync.
    #[serde(skip_serializing_if = "is_zero")]
    pub refused_full: usize,
    /// Blocklist keys taken out of the full map to make room for an operator's rule.
    #[serde(skip_serializing_if = "is_zero")]
    pub evicted: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// How full the kernel domain set is and what it turned away.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct DomainFill {
    /// Keys in the kernel map.
    pub held: usize,
    /// Rules owed to the kernel that are not in it because the map is full (the resolver
    /// still blocks their names; clients asking other resolvers are not rewritten for them).
    pub left_out: usize,
    /// Inserts the full map refused, since start.
    pub refused: u64,
    /// Blocklist keys taken out for operator rules, since start.
    pub evicted: u64,
}

/// Why `add` changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum DomainSetError {
    #[error(transparent)]
    Clash(#[from] KeyClash),
    #[error(transparent)]
    Daemon(#[from] Error),
}

/// Maps keyed by a name's domain hash. The keys are already the output of a keyed hash, so a
/// cheap hasher spreads them as well as SipHash does; a million-name import looks each one up
/// several times.
type KeyMap<V> = StdHashMap<u64, V, foldhash::fast::RandomState>;
type KeySet = std::collections::HashSet<u64, foldhash::fast::RandomState>;

/// One owner's rule for a key: its flags and its name's tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rule {
    flags: u8,
    tag: u32,
}

struct State {
    map: HashMap<MapData, u64, u8>,
    /// What the kernel map holds.
    kernel: KeyMap<u8>,
    /// Each owner's rules by key.
    owners: BTreeMap<Owner, KeyMap<Rule>>,
    /// Operator rules by name (for listing and persistence): name -> covers subdomains.
    operator_names: BTreeMap<String, bool>,
    /// Keys some owner wants in the kernel that the full map refused; tried again whenever
    /// keys are deleted.
    left_out: KeySet,
    refused_full: u64,
    evicted: u64,
}

pub struct DomainFilter {
    state: Mutex<State>,
    path: PathBuf,
    hasher: Arc<DomainHasher>,
}

fn flags_for(subdomains: bool) -> u8 {
    if subdomains {
        DOMAIN_EXACT | DOMAIN_SUBDOMAINS
    } else {
        DOMAIN_EXACT
    }
}

impl State {
    /// The union of every owner's flags for `hash`.
    fn union(&self, hash: u64) -> u8 {
        self.union_except(None, hash)
    }

    /// The union of the flags for `hash` of every owner but `except`.
    fn union_except(&self, except: Option<Owner>, hash: u64) -> u8 {
        self.owners
            .iter()
            .filter(|(o, _)| Some(**o) != except)
            .filter_map(|(_, rules)| rules.get(&hash))
            .fold(0, |acc, r| acc | r.flags)
    }

    /// The owner and rule holding `hash` for a name other than the one tagged `tag`.
    fn holder(&self, hash: u64, tag: u32) -> Option<Owner> {
        self.owners
            .iter()
            .find(|(_, rules)| rules.get(&hash).is_some_and(|r| r.tag != tag))
            .map(|(owner, _)| *owner)
    }

    /// Brings the kernel in line with the union for `hashes`. When the map is full, a key is
    /// left out (`left_out`, counted) and the rest go on: an operator's rule takes the place
    /// of a blocklist-only key (which is left out instead), a blocklist rule waits for room.
    /// Keys deleted make room for left-out ones at once. Deletions go first; a large set of
    /// writes goes to the kernel in batches (`BPF_MAP_UPDATE_BATCH`), and what a batch does not
    /// take (a full map, a kernel without batches) one key at a time as before.
    fn apply(
        &mut self,
        hashes: impl IntoIterator<Item = u64>,
        report: &mut SyncReport,
    ) -> Result<(), Error> {
        self.apply_known(hashes.into_iter().map(|hash| (hash, None)), 0, report)
    }

    /// [`State::apply`], for keys that may come with their owner's flags already known:
    /// `(hash, Some((owner, flags)))` says `owner`'s rule for `hash` has `flags` (so the union
    /// needs only the other owners' rules; a large import's keys are in no other owner's
    /// table, and its own is the largest to look in again). `new_keys` is how many keys are
    /// likely new to the mirror, the room reserved for them up front: not the count of `keys`,
    /// which also holds keys being removed or already in the kernel (a start passes every key
    /// twice), and reserving for those would double the mirror's memory.
    fn apply_known(
        &mut self,
        keys: impl Iterator<Item = (u64, Option<(Owner, u8)>)>,
        new_keys: usize,
        report: &mut SyncReport,
    ) -> Result<(), Error> {
        // Each write with what the mirror held before it. The mirror takes the write at once,
        // so a key touched twice is written once (the second time it is as wanted already);
        // what the kernel does not take is put back before it goes one key at a time.
        let mut writes: Vec<(u64, u8, Option<u8>)> = Vec::new();
        let mut deletions = Vec::new();
        if new_keys >= BATCH_FROM {
            self.kernel.reserve(new_keys);
        }
        for (hash, known) in keys {
            let want = match known {
                Some((owner, flags)) => flags | self.union_except(Some(owner), hash),
                None => self.union(hash),
            };
            if want == 0 {
                deletions.push(hash);
                continue;
            }
            match self.kernel.entry(hash) {
                Entry::Occupied(e) if *e.get() == want => {}
                Entry::Occupied(mut e) => writes.push((hash, want, Some(e.insert(want)))),
                Entry::Vacant(e) => {
                    e.insert(want);
                    writes.push((hash, want, None));
                }
            }
        }
        let deletions = if deletions.len() >= BATCH_FROM {
            self.delete_batches(deletions, report)
        } else {
            deletions
        };
        let mut deleted = Ok(());
        for hash in deletions {
            deleted = self.apply_one(hash, report).map(drop);
            if deleted.is_err() {
                break;
            }
        }
        let done = if deleted.is_ok() && writes.len() >= BATCH_FROM {
            self.write_batches(&writes, report)
        } else {
            0
        };
        let rest = &writes[done..];
        // Newest first: a key written twice ends with what the mirror held before the first.
        for &(hash, _, before) in rest.iter().rev() {
            match before {
                Some(flags) => self.kernel.insert(hash, flags),
                None => self.kernel.remove(&hash),
            };
        }
        deleted?;
        for &(hash, _, _) in rest {
            self.apply_one(hash, report)?;
        }
        if report.deleted > 0 && !self.left_out.is_empty() {
            let waiting: Vec<u64> = self.left_out.iter().copied().collect();
            for hash in waiting {
                if !self.apply_one(hash, report)? {
                    break;
                }
            }
        }
        report.total = self.kernel.len();
        Ok(())
    }

    /// Deletes the keys of `deletions` that the kernel holds in batches
    /// (`BPF_MAP_DELETE_BATCH`, Linux 5.6), a key named twice once; returns the keys left for
    /// one at a time: what a batch did not take (a kernel without batch deletes, or a key the
    /// mirror had and the kernel had not), with their place in the mirror as before.
    fn delete_batches(&mut self, deletions: Vec<u64>, report: &mut SyncReport) -> Vec<u64> {
        let mut held = Vec::with_capacity(deletions.len());
        for hash in deletions {
            // Not in the kernel: nothing to delete there, only a wait for room to end.
            self.left_out.remove(&hash);
            if let Some(flags) = self.kernel.remove(&hash) {
                held.push((hash, flags));
            }
        }
        let mut keys = Vec::with_capacity(BATCH_KEYS.min(held.len()));
        let mut rest = Vec::new();
        for chunk in held.chunks(BATCH_KEYS) {
            let done = if rest.is_empty() {
                keys.clear();
                keys.extend(chunk.iter().map(|(hash, _)| *hash));
                delete_batch(self.map.map(), &keys)
            } else {
                0
            };
            report.deleted += done;
            for &(hash, flags) in &chunk[done..] {
                self.kernel.insert(hash, flags);
                rest.push(hash);
            }
        }
        rest
    }

    /// Writes `writes` (keys with their union's flags, each in the mirror already and not yet
    /// in the kernel as wanted; a key twice only where a later write overwrites an earlier
    /// one) in batches, in order, until the first batch the kernel does not take whole;
    /// returns how many of `writes` are written.
    fn write_batches(
        &mut self,
        writes: &[(u64, u8, Option<u8>)],
        report: &mut SyncReport,
    ) -> usize {
        let mut done = 0;
        let mut keys = Vec::with_capacity(BATCH_KEYS.min(writes.len()));
        let mut values = Vec::with_capacity(keys.capacity());
        for chunk in writes.chunks(BATCH_KEYS) {
            keys.clear();
            values.clear();
            keys.extend(chunk.iter().map(|(hash, _, _)| *hash));
            values.extend(chunk.iter().map(|(_, flags, _)| *flags));
            let written = update_batch(self.map.map(), &keys, &values);
            if !self.left_out.is_empty() {
                for (hash, _, _) in chunk.iter().take(written) {
                    self.left_out.remove(hash);
                }
            }
            report.written += written;
            done += written;
            if written < chunk.len() {
                break;
            }
        }
        done
    }

    /// One key; false when the full map refused it.
    fn apply_one(&mut self, hash: u64, report: &mut SyncReport) -> Result<bool, Error> {
        let want = self.union(hash);
        let have = self.kernel.get(&hash).copied().unwrap_or(0);
        if want == 0 {
            self.left_out.remove(&hash);
        }
        if want == have {
            return Ok(true);
        }
        if want == 0 {
            match self.map.remove(&hash) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
            self.kernel.remove(&hash);
            report.deleted += 1;
            return Ok(true);
        }
        let mut inserted = retrying_out_of_memory(|| self.map.insert(&hash, &want, 0));
        if inserted.as_ref().is_err_and(is_full) && self.make_room(hash)? {
            report.evicted += 1;
            inserted = retrying_out_of_memory(|| self.map.insert(&hash, &want, 0));
        }
        match inserted {
            Ok(()) => {
                self.left_out.remove(&hash);
                self.kernel.insert(hash, want);
                report.written += 1;
                Ok(true)
            }
            Err(e) if is_full(&e) => {
                self.left_out.insert(hash);
                self.refused_full += 1;
                report.refused_full += 1;
                Ok(false)
            }
            Err(e) => Err(Error::Datapath(format!("cannot write the domain map: {e}"))),
        }
    }

    /// The map is full and `hash` is to go in: when an operator's rule wants it, one key only
    /// the blocklist wants leaves the kernel (and waits in `left_out`). Operator keys never
    /// leave for anything.
    fn make_room(&mut self, hash: u64) -> Result<bool, Error> {
        let operator_wants = self
            .owners
            .get(&Owner::Operator)
            .is_some_and(|r| r.contains_key(&hash));
        if !operator_wants {
            return Ok(false);
        }
        let operator = self.owners.get(&Owner::Operator);
        let Some(victim) = self
            .kernel
            .keys()
            .copied()
            .find(|k| !operator.is_some_and(|r| r.contains_key(k)))
        else {
            return Ok(false);
        };
        match self.map.remove(&victim) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e.into()),
        }
        self.kernel.remove(&victim);
        self.left_out.insert(victim);
        self.evicted += 1;
        Ok(true)
    }
}

/// Writes at or above this many keys go to the kernel in batches.
const BATCH_FROM: usize = 64;
/// Keys per batch call.
const BATCH_KEYS: usize = 16_384;

/// `bpf(2)`'s commands for a batch of map updates, look-ups and deletes (Linux 5.6).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The batch part of `union bpf_attr` (`struct { in_batch, out_batch, keys, values, count,
/// map_fd, elem_flags, flags }`).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// One batch command of the `bpf` system call on `attr`; the errno when it fails.
///
/// # Safety
/// Every pointer in `attr` must be valid for what `command` reads or writes through it, for
/// `attr.count` elements of the map's key and value sizes, for the whole call.
unsafe fn batch_call(command: libc::c_long, attr: &mut BatchAttr) -> Result<(), Option<i32>> {
    // SAFETY: the caller vouches for the pointers in `attr`; `attr` itself is a valid
    // `bpf_attr` prefix of the size passed.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error())
    }
}

/// Writes `keys` with `values` (one byte each, the domain map's value) into `map` in one
/// `BPF_MAP_UPDATE_BATCH` call; returns how many the kernel wrote, in order (all of them, or
/// those before the first it refused: a full map; none on a kernel without batch updates).
fn update_batch(map: &MapData, keys: &[u64], values: &[u8]) -> usize {
    use std::os::fd::{AsFd, AsRawFd};
    let count = keys.len().min(values.len());
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` points the kernel at `count` keys of the map's key size (8 bytes, u64)
    // and `count` values of its value size (1 byte), both alive for the call; the kernel reads
    // them and writes back only `attr.count`, inside `attr`, which outlives the call.
    let result = unsafe { batch_call(BPF_MAP_UPDATE_BATCH, &mut attr) };
    if result.is_ok() {
        count
    } else {
        // On an error the kernel reports how many it wrote before it; a kernel that does not
        // know the command leaves `count` as it was (then nothing was written).
        let written = attr.count as usize;
        if written < count { written } else { 0 }
    }
}

/// Deletes `keys` from `map` in one `BPF_MAP_DELETE_BATCH` call; returns how many the kernel
/// deleted, in order (all of them, or those before the first it could not: a key not there;
/// none on a kernel without batch deletes).
fn delete_batch(map: &MapData, keys: &[u64]) -> usize {
    use std::os::fd::{AsFd, AsRawFd};
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` points the kernel at `count` keys of the map's key size (8 bytes, u64),
    // alive for the call; the kernel reads them and writes back only `attr.count`.
    let result = unsafe { batch_call(BPF_MAP_DELETE_BATCH, &mut attr) };
    if result.is_ok() {
        keys.len()
    } else {
        let deleted = attr.count as usize;
        if deleted < keys.len() { deleted } else { 0 }
    }
}

/// Every (key, flags) of the domain map, `BATCH_KEYS` a system call (`BPF_MAP_LOOKUP_BATCH`,
/// Linux 5.6): a start reads back a set of a million keys in about 60 calls instead of two
/// million. `None` when the kernel cannot (no batch lookups, or a bucket larger than a batch):
/// the caller then walks the map key by key.
fn lookup_all(map: &MapData) -> Option<Vec<(u64, u8)>> {
    use std::os::fd::{AsFd, AsRawFd};
    let mut keys = vec![0u64; BATCH_KEYS];
    let mut values = vec![0u8; BATCH_KEYS];
    let mut found = Vec::new();
    // The hash map's position between calls is a bucket number (u32); none on the first.
    let mut position: Option<u32> = None;
    let mut next: u32 = 0;
    loop {
        let mut attr = BatchAttr {
            in_batch: position.as_ref().map_or(0, |p| p as *const u32 as u64),
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH_KEYS as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `keys` and `values` have room for `count` keys of the map's key size (8
        // bytes) and values of its value size (1 byte); `position` and `next` are the u32
        // the hash map's batch position is; all outlive the call, and the kernel writes only
        // into them and `attr`.
        let result = unsafe { batch_call(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let got = (attr.count as usize).min(BATCH_KEYS);
        let end = match result {
            Ok(()) => false,
            // The end of the map, with its last keys.
            Err(Some(libc::ENOENT)) => true,
            Err(_) => return None,
        };
        found.extend(
            keys[..got]
                .iter()
                .copied()
                .zip(values[..got].iter().copied()),
        );
        if end {
            return Some(found);
        }
        position = Some(next);
    }
}

/// Whether the kernel refused an insert because the map is full (`E2BIG`).
fn is_full(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG))
}

/// Empties the kernel map (its keys were made with another key of the hash): `BATCH_KEYS`
/// keys a system call where the kernel has batch look-ups and deletes, a million keys in
/// about 120 calls; key by key where it has not, or for what a batch left.
fn clear(map: &mut HashMap<MapData, u64, u8>) -> Result<usize, Error> {
    let keys: Vec<u64> = match lookup_all(map.map()) {
        Some(entries) => entries.into_iter().map(|(k, _)| k).collect(),
        None => map.keys().filter_map(Result::ok).collect(),
    };
    for chunk in keys.chunks(BATCH_KEYS) {
        let deleted = delete_batch(map.map(), chunk);
        for k in &chunk[deleted..] {
            match map.remove(k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(keys.len())
}

/// A name with its key in the set and its tag ([`DomainHasher::hash`], [`DomainHasher::tag`]),
/// computed once by a caller that needs them too.
#[derive(Clone, Copy, Debug)]
pub struct NameKey<'a> {
    pub name: &'a str,
    pub hash: u64,
    pub tag: u32,
}

impl<'a> NameKey<'a> {
    /// `name` with its key and tag under `hasher`.
    pub fn new(hasher: &DomainHasher, name: &'a str) -> Self {
        Self {
            name,
            hash: hasher.hash(name),
            tag: hasher.tag(name),
        }
    }
}

/// What [`DomainFilter::undo`] needs to take back one update: each key it changed with the
/// owner's rule before.
#[must_use]
pub struct DomainSetUndo {
    owner: Owner,
    previous: Vec<(u64, Option<Rule>)>,
}

/// The kernel set held still (its lock taken) while a batch asks about its names.
pub struct ClashCheck<'a> {
    filter: &'a DomainFilter,
    state: std::sync::MutexGuard<'a, State>,
}

impl ClashCheck<'_> {
    /// The clash `name` would meet, by its key and tag under the installation's domain hash
    /// ([`DomainFilter::hasher`]): another name of any owner holding its key.
    pub fn clash(&self, name: &str, hash: u64, tag: u32) -> Option<KeyClash> {
        self.filter.clash_in(&self.state, name, hash, tag)
    }

    /// [`ClashCheck::clash`] with an operator's rule only (another owner's clash, such as a
    /// listed blocklist name's, is the caller's own to find).
    pub fn operator_clash(&self, name: &str, hash: u64, tag: u32) -> Option<KeyClash> {
        self.state
            .owners
            .get(&Owner::Operator)?
            .get(&hash)
            .filter(|r| r.tag != tag)?;
        self.filter.clash_in(&self.state, name, hash, tag)
    }
}

impl DomainFilter {
    /// Loads (or makes) the installation's hash key and hands it to the kernel, reads what the
    /// (pinned) kernel map holds, restores the operator rules, and removes keys no owner
    /// claims. When the kernel had another key (a new installation, a lost seed) the map is
    /// emptied first: every rule is written again under this key by its owner.
    pub fn open(
        mut map: HashMap<MapData, u64, u8>,
        mut key_map: Array<MapData, DomainKey>,
        state_dir: &Path,
    ) -> Result<Self, Error> {
        let (hasher, origin) = DomainHasher::load_or_create(state_dir)?;
        let hasher = Arc::new(hasher);
        let in_kernel = key_map.get(&0, 0)?;
        if in_kernel != *hasher.key() {
            // Stale keys out first, then the key: the kernel never matches an old key's
            // entries with the new key.
            let cleared = clear(&mut map)?;
            key_map.set(0, hasher.key(), 0)?;
            if cleared > 0 || origin != SeedOrigin::Created {
                info!(
                    cleared,
                    "the kernel domain set had another hash key; emptied, to be rebuilt under this one"
                );
            }
        }
        let path = state_dir.join("datapath-domains.json");
        let operator_names: BTreeMap<String, bool> = store::read_json(&path)?;
        let kernel: KeyMap<u8> = match lookup_all(map.map()) {
            Some(entries) => entries.into_iter().collect(),
            None => map.iter().filter_map(Result::ok).collect(),
        };
        let mut state = State {
            map,
            kernel,
            owners: BTreeMap::new(),
            operator_names: BTreeMap::new(),
            left_out: Default::default(),
            refused_full: 0,
            evicted: 0,
        };
        let mut rules: KeyMap<Rule> = KeyMap::default();
        let mut first: StdHashMap<u64, &str> = StdHashMap::new();
        for (name, sub) in &operator_names {
            let hash = hasher.hash(name);
            if let Some(other) = first.get(&hash) {
                // Only possible when the seed changed under stored rules.
                warn!(
                    domain = %name, other = %other,
                    "operator kernel rule shares its key with another under this installation's hash; not in force"
                );
                continue;
            }
            first.insert(hash, name);
            rules.insert(
                hash,
                Rule {
                    flags: flags_for(*sub),
                    tag: hasher.tag(name),
                },
            );
        }
        state.owners.insert(Owner::Operator, rules);
        state.operator_names = operator_names;
        // Only the operator's keys now. The kernel's other keys stay as the last run left
        // them until the blocklist, which owns nearly all of them, has claimed its own
        // (`release_unclaimed`): removing them here would empty the set of a million names
        // one key at a time before WireGuard is up, and write it again right after.
        let mut report = SyncReport::default();
        let keys: Vec<u64> = state
            .owners
            .values()
            .flat_map(|r| r.keys())
            .copied()
            .collect();
        state.apply(keys, &mut report)?;
        Ok(Self {
            state: Mutex::new(state),
            path,
            hasher,
        })
    }

    /// Removes the keys the kernel kept from the last run that no owner has claimed since the
    /// start. Called once every owner has synced (after the blocklist's start, or at once
    /// without a blocklist); until then those keys go on blocking as before the restart.
    pub fn release_unclaimed(&self) -> Result<SyncReport, Error> {
        let mut state = self.lock()?;
        let unclaimed: Vec<u64> = state
            .kernel
            .keys()
            .copied()
            .filter(|hash| state.union(*hash) == 0)
            .collect();
        let mut report = SyncReport::default();
        state.apply(unclaimed, &mut report)?;
        Ok(report)
    }

    /// The installation's domain hash (the blocklist's matcher keys its rules by it too).
    pub fn hasher(&self) -> Arc<DomainHasher> {
        Arc::clone(&self.hasher)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, Error> {
        self.state
            .lock()
            .map_err(|_| Error::Datapath("domain filter lock poisoned".into()))
    }

    /// The clash `name` would meet: another name holding its key, in any owner's rules.
    fn clash_in(&self, state: &State, name: &str, hash: u64, tag: u32) -> Option<KeyClash> {
        let owner = state.holder(hash, tag)?;
        let other = match owner {
            Owner::Operator => state
                .operator_names
                .keys()
                .find(|n| self.hasher.hash(n) == hash)
                .cloned(),
            Owner::Blocklist => None,
        };
        Some(KeyClash {
            name: name.to_string(),
            other: other.unwrap_or_else(|| owner.describe().to_string()),
        })
    }

    /// Whether `name` would be refused: another name of any owner holds its key.
    pub fn clash(&self, name: &str) -> Result<Option<KeyClash>, Error> {
        Ok(self
            .clash_check()?
            .clash(name, self.hasher.hash(name), self.hasher.tag(name)))
    }

    /// The set held still for many [`ClashCheck::clash`] questions: a large batch asks once
    /// per name, and takes the lock once.
    pub fn clash_check(&self) -> Result<ClashCheck<'_>, Error> {
        Ok(ClashCheck {
            filter: self,
            state: self.lock()?,
        })
    }

    /// Replaces all of `owner`'s rules with `rules` (normalised names, covers-subdomains).
    /// A name whose key another name holds (of any owner, or earlier in `rules`) is left out
    /// and listed in the report.
    pub fn replace<N: AsRef<str>>(
        &self,
        owner: Owner,
        rules: &[(N, bool)],
    ) -> Result<SyncReport, Error> {
        let mut state = self.lock()?;
        let old = state.owners.remove(&owner).unwrap_or_default();
        let mut new: KeyMap<Rule> =
            KeyMap::with_capacity_and_hasher(rules.len(), Default::default());
        let mut report = SyncReport::default();
        for (name, sub) in rules {
            let name = name.as_ref();
            let hash = self.hasher.hash(name);
            let tag = self.hasher.tag(name);
            if let Some(clash) = self.clash_in(&state, name, hash, tag) {
                report.refused.push(clash);
                continue;
            }
            match new.get(&hash) {
                Some(r) if r.tag != tag => {
                    let other = rules
                        .iter()
                        .map(|(n, _)| n.as_ref())
                        .find(|n| *n != name && self.hasher.hash(n) == hash)
                        .map_or_else(|| owner.describe().to_string(), str::to_string);
                    report.refused.push(KeyClash {
                        name: name.to_string(),
                        other,
                    });
                }
                _ => {
                    new.insert(
                        hash,
                        Rule {
                            flags: flags_for(*sub),
                            tag,
                        },
                    );
                }
            }
        }
        let touched: Vec<u64> = old.keys().chain(new.keys()).copied().collect();
        state.owners.insert(owner, new);
        state.apply(touched, &mut report)?;
        Ok(report)
    }

    /// Applies a change set to `owner`'s rules (the blocklist's journal deltas): cost follows
    /// the size of the change, not of the set. Not for `Owner::Operator`, whose rules are
    /// persisted one by one through `add`/`remove`. Added names whose key another name holds
    /// are left out and listed in the report; a removed name whose key another name holds
    /// removes nothing.
    pub fn update<'a>(
        &self,
        owner: Owner,
        added: impl IntoIterator<Item = (&'a str, bool)>,
        removed: impl IntoIterator<Item = &'a str>,
    ) -> Result<SyncReport, Error> {
        self.update_undoable(owner, added, removed)
            .map(|(report, _)| report)
    }

    /// [`DomainFilter::update`], with what [`DomainFilter::undo`] needs to put the owner's
    /// rules (and the kernel) back as they were.
    pub fn update_undoable<'a>(
        &self,
        owner: Owner,
        added: impl IntoIterator<Item = (&'a str, bool)>,
        removed: impl IntoIterator<Item = &'a str>,
    ) -> Result<(SyncReport, DomainSetUndo), Error> {
        let key = |name: &'a str| NameKey::new(&self.hasher, name);
        self.update_keyed(
            owner,
            added.into_iter().map(|(name, sub)| (key(name), sub)),
            removed.into_iter().map(key),
        )
    }

    /// [`DomainFilter::update_undoable`] for names whose key and tag the caller has computed
    /// already, with this set's hasher (the blocklist's matcher shares it): the blocklist
    /// writes a large batch here while its store commits, and a failed commit takes it back.
    pub fn update_keyed<'a>(
        &self,
        owner: Owner,
        added: impl IntoIterator<Item = (NameKey<'a>, bool)>,
        removed: impl IntoIterator<Item = NameKey<'a>>,
    ) -> Result<(SyncReport, DomainSetUndo), Error> {
        if owner == Owner::Operator {
            return Err(Error::Datapath(
                "operator rules change through add/remove".into(),
            ));
        }
        let (added, removed) = (added.into_iter(), removed.into_iter());
        let mut state = self.lock()?;
        let mut report = SyncReport::default();
        // Each touched key with the owner's rule before this change, in the order of change.
        let mut previous = Vec::with_capacity(added.size_hint().0 + removed.size_hint().0);
        // Beside each of `previous`: the owner's new flags for a key it had no rule for (the
        // union then needs only the other owners' rules), `None` where the union is looked up.
        let mut known = Vec::with_capacity(previous.capacity());
        let mut rules = state.owners.remove(&owner).unwrap_or_default();
        for NameKey { hash, tag, .. } in removed {
            if rules.get(&hash).is_some_and(|r| r.tag == tag) {
                previous.push((hash, rules.remove(&hash)));
                known.push(None);
            }
        }
        rules.reserve(added.size_hint().0);
        for (NameKey { name, hash, tag }, subdomains) in added {
            // The owner's own rules are out of `state` while they change: a clash with one of
            // them (another name of this owner on the key) is checked here.
            let own_clash = rules.get(&hash).is_some_and(|r| r.tag != tag);
            if let Some(clash) = self.clash_in(&state, name, hash, tag).or_else(|| {
                own_clash.then(|| KeyClash {
                    name: name.to_string(),
                    other: owner.describe().to_string(),
                })
            }) {
                report.refused.push(clash);
                continue;
            }
            let rule = Rule {
                flags: flags_for(subdomains),
                tag,
            };
            let before = rules.insert(hash, rule);
            // A key added twice: its last rule is not known here, so the union is looked up
            // (the earlier occurrence's write is then overwritten in order).
            known.push(before.is_none().then_some((owner, rule.flags)));
            previous.push((hash, before));
        }
        state.owners.insert(owner, rules);
        // The owner's new keys: in no other owner's table for a large import.
        let new_keys = known.iter().filter(|k| k.is_some()).count();
        state.apply_known(
            previous
                .iter()
                .zip(known)
                .map(|((hash, _), known)| (*hash, known)),
            new_keys,
            &mut report,
        )?;
        Ok((report, DomainSetUndo { owner, previous }))
    }

    /// Puts an owner's rules back as they were before the [`DomainFilter::update_undoable`]
    /// that returned `undo`, and the kernel with them.
    pub fn undo(&self, undo: DomainSetUndo) -> Result<SyncReport, Error> {
        let mut state = self.lock()?;
        let rules = state.owners.entry(undo.owner).or_default();
        // Newest first: a key changed twice ends with the rule it had before the first change.
        for (hash, before) in undo.previous.iter().rev() {
            match before {
                Some(rule) => rules.insert(*hash, *rule),
                None => rules.remove(hash),
            };
        }
        let mut report = SyncReport::default();
        state.apply(undo.previous.iter().map(|(hash, _)| *hash), &mut report)?;
        Ok(report)
    }

    /// Adds or updates one of `owner`'s rules; refused when another name holds its key.
    pub fn add(
        &self,
        owner: Owner,
        name: &str,
        subdomains: bool,
    ) -> Result<SyncReport, DomainSetError> {
        let mut state = self.lock()?;
        let hash = self.hasher.hash(name);
        let tag = self.hasher.tag(name);
        if let Some(clash) = self.clash_in(&state, name, hash, tag) {
            return Err(clash.into());
        }
        let previous = state.owners.entry(owner).or_default().insert(
            hash,
            Rule {
                flags: flags_for(subdomains),
                tag,
            },
        );
        let mut report = SyncReport::default();
        state.apply([hash], &mut report)?;
        let refused = state.left_out.contains(&hash);
        let persisted = if owner == Owner::Operator && !refused {
            let mut names = state.operator_names.clone();
            names.insert(name.to_string(), subdomains);
            store::write_json(&self.path, &names).map(|()| names)
        } else {
            Ok(state.operator_names.clone())
        };
        if owner == Owner::Operator && (refused || persisted.is_err()) {
            // Refused or not durable: the rule goes again, and the kernel with it.
            let rules = state.owners.entry(owner).or_default();
            match previous {
                Some(rule) => rules.insert(hash, rule),
                None => rules.remove(&hash),
            };
            let mut undo = SyncReport::default();
            state.apply([hash], &mut undo)?;
            persisted?;
            return Err(Error::MapFull {
                map: phantom_common::names::DOMAINS_MAP,
                setting: "max_domains",
            }
            .into());
        }
        state.operator_names = persisted?;
        Ok(report)
    }

    /// Removes one of `owner`'s rules; `Ok(None)` when it had no such rule.
    pub fn remove(&self, owner: Owner, name: &str) -> Result<Option<SyncReport>, Error> {
        let mut state = self.lock()?;
        let hash = self.hasher.hash(name);
        let tag = self.hasher.tag(name);
        let had = match state.owners.get_mut(&owner) {
            Some(rules) if rules.get(&hash).is_some_and(|r| r.tag == tag) => {
                rules.remove(&hash);
                true
            }
            _ => false,
        };
        if owner == Owner::Operator && state.operator_names.contains_key(name) {
            // Also a stored rule that was not in force (it clashed after a seed change).
            let mut names = state.operator_names.clone();
            names.remove(name);
            store::write_json(&self.path, &names)?;
            state.operator_names = names;
        } else if !had {
            return Ok(None);
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

    /// How full the kernel set is, and what it refused and evicted.
    pub fn fill(&self) -> Result<DomainFill, Error> {
        let state = self.lock()?;
        Ok(DomainFill {
            held: state.kernel.len(),
            left_out: state.left_out.len(),
            refused: state.refused_full,
            evicted: state.evicted,
        })
    }
}

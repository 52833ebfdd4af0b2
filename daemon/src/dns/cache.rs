//! The answer cache: upstream answers as wire bytes, served until their TTL runs out, with
//! the TTLs counted down on the way out.
//!
//! Sharded so the resolver's workers rarely meet on a lock, and a look-up only read-locks its
//! shard (workers reading one shard never wait for each other); each shard is bounded, and a
//! full shard first drops what has expired, then an arbitrary eighth of itself (hash order),
//! which keeps inserts O(1) amortised without LRU bookkeeping on every hit.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hasher},
    sync::{
        RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::wire::{self, Question};
use crate::blocklist::matcher::Prehashed;

const SHARDS: usize = 16;

struct Cached {
    name: Box<str>,
    qtype: u16,
    qclass: u16,
    flags: QueryFlags,
    wire: Box<[u8]>,
    ttl_offsets: Box<[u32]>,
    stored: Instant,
    ttl: u32,
    /// The blocklist generation that found this name unblocked (`NOT_VETTED`: none did).
    vetted: u64,
}

const NOT_VETTED: u64 = u64::MAX;

impl Cached {
    /// Whether this is the answer to `q` (not another question under the same key).
    fn answers(&self, q: &Question) -> bool {
        *self.name == *q.name
            && self.qtype == q.qtype
            && self.qclass == q.qclass
            && self.flags == QueryFlags::of(q)
    }

    /// Whole seconds since it was stored.
    fn age(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.stored).as_secs() as u32
    }

    fn expired(&self, now: Instant) -> bool {
        self.age(now) >= self.ttl
    }
}

/// What a look-up found.
enum Lookup {
    /// The answer, copied out; whether the current blocklist generation vetted it.
    Hit(bool),
    /// An expired answer, or another question's under the same key.
    Stale,
    Absent,
}

/// What in a query besides its question shapes the answer: EDNS at all (an OPT record in the
/// answer), DO (DNSSEC records wanted) and CD (validation off). An answer is served only to
/// a query with the same three.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct QueryFlags {
    edns: bool,
    dnssec_ok: bool,
    checking_disabled: bool,
}

impl QueryFlags {
    fn of(q: &Question) -> Self {
        Self {
            edns: q.has_edns,
            dnssec_ok: q.dnssec_ok,
            checking_disabled: q.checking_disabled,
        }
    }
}

/// The shard maps' keys are already hashes.
type Shard = HashMap<u64, Cached, Prehashed>;

pub struct Cache {
    shards: Vec<RwLock<Shard>>,
    per_shard: usize,
    max_ttl: u32,
    hasher: foldhash::fast::RandomState,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl Cache {
    pub fn new(entries: usize, max_ttl: u32) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
            per_shard: entries.div_ceil(SHARDS),
            max_ttl,
            hasher: foldhash::fast::RandomState::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.per_shard > 0
    }

    fn key(&self, q: &Question) -> u64 {
        // One pass over the name, then the rest of the key in one word.
        let flags = QueryFlags::of(q);
        let mut h = self.hasher.build_hasher();
        h.write(q.name.as_bytes());
        h.write_u64(
            (u64::from(q.qtype) << 32)
                | (u64::from(q.qclass) << 16)
                | (u64::from(flags.edns) << 2)
                | (u64::from(flags.dnssec_ok) << 1)
                | u64::from(flags.checking_disabled),
        );
        h.finish()
    }

    fn shard_of(&self, key: u64) -> &RwLock<Shard> {
        // The top bits pick the shard; the map uses the rest.
        &self.shards[(key >> 60) as usize % SHARDS]
    }

    fn read_shard(&self, key: u64) -> RwLockReadGuard<'_, Shard> {
        match self.shard_of(key).read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn write_shard(&self, key: u64) -> RwLockWriteGuard<'_, Shard> {
        match self.shard_of(key).write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The cached answer to `q`, with the client's ID and question bytes (its letter case) and
    /// the TTLs reduced by the time spent in the cache; and whether blocklist generation
    /// `generation` vetted the name.
    pub fn get(&self, query: &[u8], q: &Question, generation: u64) -> Option<(Vec<u8>, bool)> {
        let mut out = Vec::new();
        let vetted = self.get_into(query, q, generation, Instant::now(), &mut out)?;
        Some((out, vetted))
    }

    /// [`Cache::get`] into `out` (its old content replaced, its allocation reused), at time
    /// `now` (the resolver's workers read the clock once per batch of queries): the hot path
    /// of a busy resolver. The name is hashed once, the shard is only read-locked (workers
    /// answering from one shard do not wait for each other), and the answer is copied once,
    /// into `out`. `None` on a miss (`out` then holds nothing useful).
    pub fn get_into(
        &self,
        query: &[u8],
        q: &Question,
        generation: u64,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Option<bool> {
        if !self.enabled() {
            return None;
        }
        let key = self.key(q);
        let found = match self.read_shard(key).get(&key) {
            Some(c) if c.answers(q) && !c.expired(now) => {
                let age = c.age(now);
                out.clear();
                out.extend_from_slice(&c.wire);
                for &at in c.ttl_offsets.iter() {
                    let at = at as usize;
                    if let Some(field) = out.get_mut(at..at + 4) {
                        let ttl = u32::from_be_bytes([field[0], field[1], field[2], field[3]]);
                        field.copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
                    }
                }
                Lookup::Hit(c.vetted == generation)
            }
            Some(_) => Lookup::Stale,
            None => Lookup::Absent,
        };
        match found {
            Lookup::Hit(vetted) => {
                wire::set_id(out, q.id);
                // The question as the client wrote it (0x20 letter-case randomisation).
                if out.len() >= q.end && query.len() >= q.end {
                    out[wire::HEADER_LEN..q.end].copy_from_slice(&query[wire::HEADER_LEN..q.end]);
                }
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(vetted)
            }
            Lookup::Stale => {
                // Expired, or another question under the same key: dropped, unless a fresh
                // answer took its place since the read.
                let mut shard = self.write_shard(key);
                if shard
                    .get(&key)
                    .is_some_and(|c| !c.answers(q) || c.expired(now))
                {
                    shard.remove(&key);
                }
                drop(shard);
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            Lookup::Absent => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Keeps an upstream answer for its TTL (capped by the configured maximum). Answers that
    /// are truncated, failed, or carry no TTL to go by are not kept.
    pub fn put(&self, q: &Question, answer: &[u8], vetted: Option<u64>) {
        if !self.enabled() {
            return;
        }
        let Some(shape) = wire::answer_shape(answer) else {
            return;
        };
        let Some(ttl) = shape.ttl.map(|t| t.min(self.max_ttl)) else {
            return;
        };
        if shape.truncated || ttl == 0 || !(shape.rcode == 0 || shape.rcode == wire::RCODE_NXDOMAIN)
        {
            return;
        }
        let key = self.key(q);
        let now = Instant::now();
        let mut shard = self.write_shard(key);
        if shard.len() >= self.per_shard && !shard.contains_key(&key) {
            shard.retain(|_, c| {
                now.saturating_duration_since(c.stored) < Duration::from_secs(u64::from(c.ttl))
            });
            if shard.len() >= self.per_shard {
                let drop_n = (self.per_shard / 8).max(1);
                let victims: Vec<u64> = shard.keys().take(drop_n).copied().collect();
                for k in victims {
                    shard.remove(&k);
                }
            }
        }
        shard.insert(
            key,
            Cached {
                name: q.name.as_str().into(),
                qtype: q.qtype,
                qclass: q.qclass,
                flags: QueryFlags::of(q),
                wire: answer.into(),
                ttl_offsets: shape.ttl_offsets.into(),
                stored: now,
                ttl,
                vetted: vetted.unwrap_or(NOT_VETTED),
            },
        );
    }

    /// Records that blocklist generation `generation` found `q`'s name unblocked.
    pub fn vet(&self, q: &Question, generation: u64) {
        let key = self.key(q);
        if let Some(c) = self.write_shard(key).get_mut(&key)
            && *c.name == *q.name
        {
            c.vetted = generation;
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().map(|g| g.len()).unwrap_or(0))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.write()
                    .map(|mut g| {
                        let n = g.len();
                        g.clear();
                        n
                    })
                    .unwrap_or(0)
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use hickory_proto::{
        op::{Edns, Message, MessageType, Query},
        rr::{Name, RData, Record, RecordType, rdata::A},
    };

    use super::*;

    /// A query for `a.example` A with EDNS, `dnssec_ok` and `checking_disabled` as given.
    fn query(dnssec_ok: bool, checking_disabled: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 7;
        m.metadata.recursion_desired = true;
        m.metadata.checking_disabled = checking_disabled;
        m.add_query(Query::query(
            Name::from_ascii("a.example.").unwrap(),
            RecordType::A,
        ));
        let mut e = Edns::new();
        e.set_max_payload(1232);
        e.set_dnssec_ok(dnssec_ok);
        m.set_edns(e);
        m.to_vec().unwrap()
    }

    fn answer(query: &[u8], last_octet: u8) -> Vec<u8> {
        let mut m = Message::from_vec(query).unwrap();
        m.metadata.message_type = MessageType::Response;
        m.add_answer(Record::from_rdata(
            Name::from_ascii("a.example.").unwrap(),
            300,
            RData::A(A::new(192, 0, 2, last_octet)),
        ));
        m.to_vec().unwrap()
    }

    /// Answers for DO, plain and CD queries of one name are kept apart: each is served only
    /// to a query with the same flags.
    #[test]
    fn do_and_cd_are_part_of_the_key() {
        let cache = Cache::new(64, 3600);
        let kinds = [(false, false), (true, false), (false, true), (true, true)];
        for (i, (dnssec_ok, cd)) in kinds.iter().enumerate() {
            let b = query(*dnssec_ok, *cd);
            let q = wire::parse_query(&b).unwrap();
            assert!(cache.get(&b, &q, 0).is_none(), "{i}: nothing cached yet");
            cache.put(&q, &answer(&b, i as u8), None);
        }
        assert_eq!(cache.len(), 4);
        for (i, (dnssec_ok, cd)) in kinds.iter().enumerate() {
            let b = query(*dnssec_ok, *cd);
            let q = wire::parse_query(&b).unwrap();
            let (got, _) = cache.get(&b, &q, 0).unwrap();
            let m = Message::from_vec(&got).unwrap();
            assert_eq!(
                m.answers[0].data,
                RData::A(A::new(192, 0, 2, i as u8)),
                "query {i} gets its own answer"
            );
        }
    }
}

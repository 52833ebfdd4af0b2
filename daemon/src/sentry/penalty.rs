//! The penalty box: each challenge raises an IP's violation count (the entry lives
//! `penalty_ttl_seconds × count`), the difficulty grows with the count, and past
//! `hard_block_after` the IP is dropped in XDP until its penalty expires.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use phantom_common::xdp::DenyReason;
use tracing::warn;

use super::Tunables;
use crate::{
    datapath::{Datapath, policy::List},
    source::Source,
};

/// A host raises one IP's count at most this often, so one page load with many
/// sub-requests past the threshold is one violation, while an IP that keeps hammering
/// after its challenge escalates every second.
pub const RAISE_INTERVAL: Duration = Duration::from_secs(1);

/// The difficulty for an IP at violation `count` (1 = first challenge).
pub fn difficulty(t: &Tunables, count: u64) -> u32 {
    let extra = count.saturating_sub(1).min(u64::from(u32::MAX)) as u32;
    t.base_difficulty
        .saturating_add(extra)
        .min(t.max_difficulty)
}

/// Whether `count` is past the hard-block line.
pub fn hard_blocked(t: &Tunables, count: u64) -> bool {
    count > t.hard_block_after
}

/// How long the kernel drop lasts: the penalty's own lifetime.
pub fn block_ttl(t: &Tunables, count: u64) -> Duration {
    Duration::from_secs(t.penalty_ttl_seconds.saturating_mul(count).max(1))
}

/// Sources whose last raise this host remembers, at most.
const MAX_TRACKED: usize = 100_000;
/// How long a raise's count is remembered (the fallback while the store fails).
const KEEP_COUNTS: Duration = Duration::from_secs(60);

/// This host's view of recent raises and of the blocks it put in the kernel.
#[derive(Default)]
pub struct PenaltyBox {
    /// source -> (when last raised, count then)
    raised: Mutex<HashMap<Source, (Instant, u64)>>,
    /// source -> when the kernel block lapses
    blocked: Mutex<HashMap<Source, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl PenaltyBox {
    /// The count from a raise within `RAISE_INTERVAL`, if any (then no new raise is due).
    pub fn recent(&self, ip: Source, now: Instant) -> Option<u64> {
        lock(&self.raised)
            .get(&ip)
            .filter(|(at, _)| now.duration_since(*at) < RAISE_INTERVAL)
            .map(|(_, c)| *c)
    }

    /// The count this host last saw for `ip`, however long ago (0 if none).
    pub fn last(&self, ip: Source) -> u64 {
        lock(&self.raised).get(&ip).map_or(0, |(_, c)| *c)
    }

    pub fn note_raise(&self, ip: Source, count: u64, now: Instant) {
        let mut raised = lock(&self.raised);
        if raised.len() >= MAX_TRACKED {
            // Every sweep leaves the table at most half full, so a flood of new sources
            // costs one sweep per MAX_TRACKED / 2 raises, not one per raise. Counts are kept
            // a minute (the fallback while the store fails); a flood wider than that keeps
            // only what decides this second's raises, and a wider one still starts afresh
            // (at worst one more raise for a source in this second).
            raised.retain(|_, (at, _)| now.duration_since(*at) < KEEP_COUNTS);
            if raised.len() >= MAX_TRACKED / 2 {
                raised.retain(|_, (at, _)| now.duration_since(*at) < RAISE_INTERVAL);
            }
            if raised.len() >= MAX_TRACKED / 2 {
                raised.clear();
            }
        }
        raised.insert(ip, (now, count));
    }

    /// Whether this host already holds a live kernel block for `ip`.
    pub fn is_blocked(&self, ip: Source, now: Instant) -> bool {
        lock(&self.blocked)
            .get(&ip)
            .is_some_and(|until| *until > now)
    }

    pub fn blocked_count(&self, now: Instant) -> usize {
        let mut b = lock(&self.blocked);
        b.retain(|_, until| *until > now);
        b.len()
    }

    /// Puts `ip` (an address or an IPv6 prefix: one deny entry either way) into the kernel
    /// deny map for `ttl` (a few map syscalls). Returns whether the kernel now drops it.
    pub fn block(&self, datapath: Option<&Arc<Datapath>>, ip: Source, ttl: Duration) -> bool {
        lock(&self.blocked).insert(ip, Instant::now() + ttl);
        let Some(dp) = datapath else {
            return false;
        };
        match dp
            .policy
            .set(ip, List::Deny, Some(ttl), DenyReason::Penalty)
        {
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, "cannot put a penalty block into the kernel deny map");
                false
            }
        }
    }

    pub fn forget(&self, ip: Source) {
        lock(&self.raised).remove(&ip);
        lock(&self.blocked).remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn difficulty_rises_and_caps() {
        let t = Tunables {
            base_difficulty: 16,
            max_difficulty: 18,
            hard_block_after: 3,
            ..Tunables::default()
        };
        assert_eq!(
            [1, 2, 3, 4, 10].map(|c| difficulty(&t, c)),
            [16, 17, 18, 18, 18]
        );
        assert!(!hard_blocked(&t, 3));
        assert!(hard_blocked(&t, 4));
    }

    #[test]
    fn a_flood_of_new_sources_keeps_the_table_bounded_and_sweeps_rarely() {
        let pb = PenaltyBox::default();
        let now = Instant::now();
        let source = |i: u32| Source::from(std::net::IpAddr::from(i.to_be_bytes()));
        // Two and a half tables' worth of sources, all within one second.
        for i in 0..(MAX_TRACKED as u32 * 5 / 2) {
            pb.note_raise(source(i), 1, now);
            assert!(lock(&pb.raised).len() <= MAX_TRACKED);
        }
        // The last source raised is remembered for this second.
        let last = source(MAX_TRACKED as u32 * 5 / 2 - 1);
        assert_eq!(pb.recent(last, now), Some(1));
    }
}

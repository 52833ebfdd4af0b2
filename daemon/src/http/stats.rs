//! The connection counters of every listener in the process, by listener name
//! ([`Limits::listener`](super::Limits)), for the metrics collector. Every gate made with a
//! listener's limits adds to that listener's entry, so the figures outlive a gate (the ghost
//! relay makes a new one each time it is enabled) and sum the gates of one listener.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

/// One listener's counters.
#[derive(Debug, Default)]
pub struct ListenerStats {
    open: AtomicU64,
    admitted: AtomicU64,
    refused_full: AtomicU64,
    refused_source: AtomicU64,
    max_connections: AtomicU64,
}

/// A snapshot of one listener's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerCounts {
    /// Connections holding a pass now.
    pub open: u64,
    /// Connections admitted since start.
    pub admitted: u64,
    /// Refused at accept because the listener was full.
    pub refused_full: u64,
    /// Refused at accept because their source was at its cap.
    pub refused_source: u64,
    /// The listener's cap (of its latest gate).
    pub max_connections: u64,
}

impl ListenerStats {
    pub(super) fn admitted(&self) {
        self.admitted.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn closed(&self) {
        // Never below zero, whatever the order of updates.
        let _ = self
            .open
            .try_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    pub(super) fn refused_full(&self) {
        self.refused_full.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn refused_source(&self) {
        self.refused_source.fetch_add(1, Ordering::Relaxed);
    }

    fn counts(&self) -> ListenerCounts {
        ListenerCounts {
            open: self.open.load(Ordering::Relaxed),
            admitted: self.admitted.load(Ordering::Relaxed),
            refused_full: self.refused_full.load(Ordering::Relaxed),
            refused_source: self.refused_source.load(Ordering::Relaxed),
            max_connections: self.max_connections.load(Ordering::Relaxed),
        }
    }
}

static LISTENERS: Mutex<BTreeMap<&'static str, Arc<ListenerStats>>> = Mutex::new(BTreeMap::new());

/// The counters of `listener`, made on first use; `max_connections` is its cap now.
pub(super) fn register(listener: &'static str, max_connections: usize) -> Arc<ListenerStats> {
    let mut all = match LISTENERS.lock() {
        Ok(l) => l,
        Err(poisoned) => poisoned.into_inner(),
    };
    let stats = Arc::clone(all.entry(listener).or_default());
    stats
        .max_connections
        .store(max_connections as u64, Ordering::Relaxed);
    stats
}

/// Every listener that has had a gate, by name, with its counters now.
pub fn listeners() -> Vec<(&'static str, ListenerCounts)> {
    let all = match LISTENERS.lock() {
        Ok(l) => l,
        Err(poisoned) => poisoned.into_inner(),
    };
    all.iter().map(|(name, s)| (*name, s.counts())).collect()
}

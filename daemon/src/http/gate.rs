//! Admission: a listener's connection caps, in total and per source, checked right after
//! `accept`. A connection holds its [`Pass`] for as long as it counts; dropping the pass frees
//! its slots.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{Limits, stats::ListenerStats};
use crate::source::SourcePrefix;

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The listener holds `max_connections`.
    Full,
    /// The source holds `max_connections_per_source`.
    SourceFull,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Full => "full",
            Refusal::SourceFull => "source_full",
        }
    }
}

/// A snapshot of a gate's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateCounts {
    /// Connections holding a pass now.
    pub open: u64,
    /// Passes handed out since the gate was made.
    pub admitted: u64,
    /// Refused because the listener was full.
    pub refused_full: u64,
    /// Refused because their source was at its cap.
    pub refused_source: u64,
}

/// The connection caps of one listener, shared by every thread that accepts on it.
#[derive(Debug)]
pub struct Gate {
    slots: Arc<Semaphore>,
    max_per_source: usize,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    /// Sources the per-source cap does not apply to (a trusted reverse proxy carries every
    /// client).
    exempt: Vec<IpAddr>,
    source_prefix: SourcePrefix,
    max_total: usize,
    admitted: AtomicU64,
    refused_full: AtomicU64,
    refused_source: AtomicU64,
    /// The listener's counters for the metrics (shared by every gate of that listener).
    stats: Arc<ListenerStats>,
}

impl Gate {
    pub fn new(limits: &Limits) -> Self {
        Self::with_exempt(limits, Vec::new())
    }

    /// A gate whose per-source cap does not apply to `exempt` (matched by address).
    pub fn with_exempt(limits: &Limits, exempt: Vec<IpAddr>) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            max_per_source: limits.max_connections_per_source,
            per_source: Mutex::new(HashMap::new()),
            exempt: exempt
                .into_iter()
                .map(|ip| limits.source_prefix.of(ip))
                .collect(),
            source_prefix: limits.source_prefix,
            max_total: limits.max_connections,
            admitted: AtomicU64::new(0),
            refused_full: AtomicU64::new(0),
            refused_source: AtomicU64::new(0),
            stats: super::stats::register(limits.listener, limits.max_connections),
        }
    }

    /// A pass for a connection from `peer`, or why not. Refusals are counted.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Pass, Refusal> {
        let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() else {
            self.refused_full.fetch_add(1, Ordering::Relaxed);
            self.stats.refused_full();
            return Err(Refusal::Full);
        };
        let key = self.source_prefix.of(peer);
        let source = if self.exempt.contains(&key) {
            None
        } else {
            let mut counts = match self.per_source.lock() {
                Ok(c) => c,
                Err(poisoned) => poisoned.into_inner(),
            };
            let n = counts.entry(key).or_insert(0);
            if *n >= self.max_per_source {
                if *n == 0 {
                    counts.remove(&key);
                }
                drop(counts);
                self.refused_source.fetch_add(1, Ordering::Relaxed);
                self.stats.refused_source();
                return Err(Refusal::SourceFull);
            }
            *n += 1;
            Some(key)
        };
        self.admitted.fetch_add(1, Ordering::Relaxed);
        self.stats.admitted();
        Ok(Pass {
            gate: Arc::clone(self),
            source,
            _permit: permit,
        })
    }

    pub fn counts(&self) -> GateCounts {
        let open = self
            .max_total
            .saturating_sub(self.slots.available_permits());
        GateCounts {
            open: open as u64,
            admitted: self.admitted.load(Ordering::Relaxed),
            refused_full: self.refused_full.load(Ordering::Relaxed),
            refused_source: self.refused_source.load(Ordering::Relaxed),
        }
    }

    /// Connections open now from `peer`'s source.
    pub fn open_from(&self, peer: IpAddr) -> usize {
        let counts = match self.per_source.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        counts
            .get(&self.source_prefix.of(peer))
            .copied()
            .unwrap_or(0)
    }
}

/// One admitted connection's place in the gate; dropping it frees the place.
#[derive(Debug)]
pub struct Pass {
    gate: Arc<Gate>,
    source: Option<IpAddr>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.gate.stats.closed();
        let Some(key) = self.source else {
            return;
        };
        let mut counts = match self.gate.per_source.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(n) = counts.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_source: usize) -> Limits {
        Limits {
            listener: "gate_test",
            max_connections: total,
            max_connections_per_source: per_source,
            ..Limits::metrics()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_per_source_cap_counts_an_ipv6_prefix_as_one_source() {
        let gate = Arc::new(Gate::new(&limits(10, 1)));
        let _a = gate.admit(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            gate.admit(ip("2001:db8:1:2:aaaa::9")).unwrap_err(),
            Refusal::SourceFull
        );
        let _b = gate.admit(ip("2001:db8:1:3::1")).unwrap();
        let narrow = Limits {
            source_prefix: SourcePrefix::new(128).unwrap(),
            ..limits(10, 1)
        };
        let gate = Arc::new(Gate::new(&narrow));
        let _c = gate.admit(ip("2001:db8:1:2::1")).unwrap();
        let _d = gate.admit(ip("2001:db8:1:2::2")).unwrap();
    }

    #[test]
    fn caps_refuse_and_dropping_a_pass_frees_its_places() {
        let gate = Arc::new(Gate::new(&limits(3, 2)));
        let a1 = gate.admit(ip("2001:db8::1")).unwrap();
        let _a2 = gate.admit(ip("2001:db8::2")).unwrap();
        assert_eq!(
            gate.admit(ip("2001:db8::3")).unwrap_err(),
            Refusal::SourceFull
        );
        let b = gate.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(gate.admit(ip("192.0.2.2")).unwrap_err(), Refusal::Full);
        drop(b);
        assert_eq!(gate.open_from(ip("192.0.2.1")), 0);
        drop(a1);
        assert_eq!(gate.open_from(ip("2001:db8::9")), 1);
        let _a3 = gate.admit(ip("2001:db8::3")).unwrap();
        let c = gate.counts();
        assert_eq!(
            c,
            GateCounts {
                open: 2,
                admitted: 4,
                refused_full: 1,
                refused_source: 1
            }
        );
        assert!(
            gate.per_source.lock().unwrap().len() == 1,
            "no empty entries"
        );
    }

    #[test]
    fn every_gate_of_a_listener_adds_to_its_counters() {
        let named = |total| Limits {
            listener: "gate_unit_test",
            ..limits(total, 1)
        };
        let counts = || {
            super::super::stats::listeners()
                .into_iter()
                .find(|(name, _)| *name == "gate_unit_test")
                .map(|(_, c)| c)
                .unwrap()
        };
        let a = Arc::new(Gate::new(&named(1)));
        let b = Arc::new(Gate::new(&named(5)));
        let pa = a.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(a.admit(ip("192.0.2.2")).unwrap_err(), Refusal::Full);
        let _pb = b.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(b.admit(ip("192.0.2.1")).unwrap_err(), Refusal::SourceFull);
        let c = counts();
        assert_eq!(
            (
                c.open,
                c.admitted,
                c.refused_full,
                c.refused_source,
                c.max_connections
            ),
            (2, 2, 1, 1, 5)
        );
        drop(pa);
        assert_eq!(counts().open, 1);
    }

    #[test]
    fn exempt_sources_skip_the_per_source_cap_only() {
        let gate = Arc::new(Gate::with_exempt(&limits(3, 1), vec![ip("10.0.0.1")]));
        let _p = (0..3)
            .map(|_| gate.admit(ip("10.0.0.1")).unwrap())
            .collect::<Vec<_>>();
        assert_eq!(gate.admit(ip("10.0.0.1")).unwrap_err(), Refusal::Full);
    }
}

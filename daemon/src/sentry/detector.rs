//! Rates and the learned threshold: per-source 5-second counts of requests and of failed
//! proofs or forged cookies (in process, on the hot path),
//! the global requests-per-second series of the last 300 s, its mean and standard deviation,
//! the dynamic threshold `mean + std_dev * sensitivity_factor`, and the host's CPU load from
//! /proc/stat for the activation gate.

use std::{
    collections::{HashMap, VecDeque},
    hash::BuildHasher,
    sync::{
        Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use super::store::{TRAFFIC_WINDOW, TrafficStats};
use crate::source::Source;

/// The per-IP counting window (the seed's `req_count:<ip>` TTL).
pub const IP_WINDOW: Duration = Duration::from_secs(5);
/// Seconds of history needed before the threshold is trusted; before that only a manual
/// mode or the static per-IP threshold under DEFCON_1 challenge anyone.
pub const MIN_SAMPLES: usize = 10;
const SHARDS: usize = 32;
/// Per-IP windows kept at most; past it, lapsed windows are swept and the oldest dropped.
const MAX_TRACKED_PER_SHARD: usize = 32_768;

#[derive(Clone, Copy)]
struct IpWindow {
    start: Instant,
    count: u64,
}

/// The statistics as last computed.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Snapshot {
    pub mean: f64,
    pub std_dev: f64,
    /// `None` until `MIN_SAMPLES` seconds have been seen.
    pub threshold: Option<f64>,
    pub samples: usize,
    /// Unix seconds of the last computation.
    pub computed_at: u64,
}

/// 5-second counts per source, sharded so the proxy threads rarely meet on a lock.
pub struct Windows {
    shards: Vec<Mutex<HashMap<Source, IpWindow>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for Windows {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }
}

impl Windows {
    fn shard(&self, source: &Source) -> &Mutex<HashMap<Source, IpWindow>> {
        &self.shards[(self.hasher.hash_one(source) as usize) % SHARDS]
    }

    /// One more for `source`; returns its count in the current 5 s window.
    pub fn count(&self, source: Source, now: Instant) -> u64 {
        let mut shard = lock(self.shard(&source));
        if shard.len() >= MAX_TRACKED_PER_SHARD && !shard.contains_key(&source) {
            shard.retain(|_, w| now.duration_since(w.start) < IP_WINDOW);
            if shard.len() >= MAX_TRACKED_PER_SHARD {
                // Under a spoofed-source flood: forget an arbitrary window rather than grow.
                if let Some(k) = shard.keys().next().copied() {
                    shard.remove(&k);
                }
            }
        }
        let w = shard.entry(source).or_insert(IpWindow {
            start: now,
            count: 0,
        });
        if now.duration_since(w.start) >= IP_WINDOW {
            *w = IpWindow {
                start: now,
                count: 0,
            };
        }
        w.count += 1;
        w.count
    }

    /// `source`'s count in its current window, without counting.
    pub fn get(&self, source: Source, now: Instant) -> u64 {
        lock(self.shard(&source))
            .get(&source)
            .filter(|w| now.duration_since(w.start) < IP_WINDOW)
            .map_or(0, |w| w.count)
    }

    /// Live counts, highest first.
    pub fn top(&self, n: usize, now: Instant) -> Vec<(Source, u64)> {
        let mut all: Vec<(Source, u64)> = Vec::new();
        for shard in &self.shards {
            let mut shard = lock(shard);
            shard.retain(|_, w| now.duration_since(w.start) < IP_WINDOW);
            all.extend(shard.iter().map(|(s, w)| (*s, w.count)));
        }
        all.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

pub struct Detector {
    /// Requests per source.
    requests: Windows,
    /// Failed proofs and forged ticket cookies per source.
    failures: Windows,
    /// Requests in the current (partial) second.
    current: AtomicU64,
    /// Requests in the last complete second.
    last_second: AtomicU64,
    /// Complete seconds, oldest first, at most 300.
    series: Mutex<VecDeque<u64>>,
    snapshot: RwLock<Snapshot>,
    /// CPU busy percentage × 100.
    cpu: AtomicU64,
    cpu_prev: Mutex<Option<(u64, u64)>>,
}

impl Default for Detector {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Population mean and standard deviation.
pub fn mean_std(series: &[u64]) -> (f64, f64) {
    if series.is_empty() {
        return (0.0, 0.0);
    }
    let n = series.len() as f64;
    let mean = series.iter().map(|v| *v as f64).sum::<f64>() / n;
    let var = series
        .iter()
        .map(|v| (*v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, var.sqrt())
}

/// The spread the threshold uses: the measured standard deviation, but at least √mean — the
/// Poisson noise of a steady request rate — so a very regular history does not make the
/// threshold fire on ordinary jitter.
pub fn effective_std_dev(mean: f64, std_dev: f64) -> f64 {
    std_dev.max(mean.sqrt())
}

/// Busy and total jiffies from the first line of /proc/stat.
fn read_proc_stat() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

impl Detector {
    pub fn new() -> Self {
        Self {
            requests: Windows::default(),
            failures: Windows::default(),
            current: AtomicU64::new(0),
            last_second: AtomicU64::new(0),
            series: Mutex::new(VecDeque::with_capacity(TRAFFIC_WINDOW)),
            snapshot: RwLock::new(Snapshot::default()),
            cpu: AtomicU64::new(0),
            cpu_prev: Mutex::new(None),
        }
    }

    /// One request toward the global rate.
    pub fn count_global(&self) {
        self.current.fetch_add(1, Ordering::Relaxed);
    }

    /// One request from `source`; returns its count in the current 5 s window.
    pub fn count_ip(&self, source: Source, now: Instant) -> u64 {
        self.requests.count(source, now)
    }

    /// `source`'s request count in its current window, without counting.
    pub fn ip_count(&self, source: Source, now: Instant) -> u64 {
        self.requests.get(source, now)
    }

    /// One failed proof or forged cookie from `source`; returns its failures in 5 s.
    pub fn count_failure(&self, source: Source, now: Instant) -> u64 {
        self.failures.count(source, now)
    }

    /// `source`'s failures in its current window.
    pub fn failures(&self, source: Source, now: Instant) -> u64 {
        self.failures.get(source, now)
    }

    /// Live per-source request counts, busiest first.
    pub fn top(&self, n: usize, now: Instant) -> Vec<(Source, u64)> {
        self.requests.top(n, now)
    }

    /// The current global rate: the larger of the last complete second and the running one,
    /// so a burst is seen within its first second.
    pub fn current_rate(&self) -> u64 {
        self.last_second
            .load(Ordering::Relaxed)
            .max(self.current.load(Ordering::Relaxed))
    }

    /// Closes the current second (call once a second); also samples the CPU.
    pub fn tick(&self) {
        let n = self.current.swap(0, Ordering::Relaxed);
        self.last_second.store(n, Ordering::Relaxed);
        let mut series = lock(&self.series);
        series.push_back(n);
        while series.len() > TRAFFIC_WINDOW {
            series.pop_front();
        }
        drop(series);
        if let Some((busy, total)) = read_proc_stat() {
            let mut prev = lock(&self.cpu_prev);
            if let Some((pb, pt)) = *prev
                && total > pt
            {
                let pct = (busy.saturating_sub(pb)) as f64 * 100.0 / (total - pt) as f64;
                self.cpu
                    .store((pct * 100.0).round() as u64, Ordering::Relaxed);
            }
            *prev = Some((busy, total));
        }
    }

    /// CPU busy percentage over the last second.
    pub fn cpu_percent(&self) -> f64 {
        self.cpu.load(Ordering::Relaxed) as f64 / 100.0
    }

    pub fn series(&self) -> Vec<u64> {
        lock(&self.series).iter().copied().collect()
    }

    /// Seeds the series from the store after a restart (oldest first).
    pub fn restore(&self, series: &[u64]) {
        let mut s = lock(&self.series);
        if s.is_empty() {
            let skip = series.len().saturating_sub(TRAFFIC_WINDOW);
            s.extend(&series[skip..]);
        }
    }

    /// Recomputes mean, standard deviation and the threshold.
    pub fn recompute(&self, sensitivity: f64, now_unix: u64) -> (Snapshot, TrafficStats) {
        let series = self.series();
        let (mean, std_dev) = mean_std(&series);
        let snap = Snapshot {
            mean,
            std_dev,
            threshold: (series.len() >= MIN_SAMPLES)
                .then_some(mean + effective_std_dev(mean, std_dev) * sensitivity),
            samples: series.len(),
            computed_at: now_unix,
        };
        match self.snapshot.write() {
            Ok(mut s) => *s = snap,
            Err(p) => *p.into_inner() = snap,
        }
        (snap, TrafficStats { mean, std_dev })
    }

    /// Re-applies a changed sensitivity to the current mean/std_dev.
    pub fn set_sensitivity(&self, sensitivity: f64) {
        let mut s = match self.snapshot.write() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if s.threshold.is_some() {
            s.threshold = Some(s.mean + effective_std_dev(s.mean, s.std_dev) * sensitivity);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        match self.snapshot.read() {
            Ok(s) => *s,
            Err(p) => *p.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn windows_rates_and_threshold() {
        let d = Detector::new();
        let ip: Source = "203.0.113.9".parse().unwrap();
        let t0 = Instant::now();
        for i in 1..=20 {
            assert_eq!(d.count_ip(ip, t0), i);
        }
        assert_eq!(d.count_ip(ip, t0 + IP_WINDOW), 1, "a new window after 5 s");
        for v in [10u64, 12, 8, 10, 10, 12, 8, 10, 10, 10] {
            for _ in 0..v {
                d.count_global();
            }
            d.tick();
        }
        let (snap, stats) = d.recompute(2.0, 1);
        assert_eq!(snap.samples, 10);
        assert!((stats.mean - 10.0).abs() < 1e-9);
        let expected_std = (16.0f64 / 10.0).sqrt();
        assert!((stats.std_dev - expected_std).abs() < 1e-9);
        // √10 > the measured spread: the Poisson floor applies.
        assert!((snap.threshold.unwrap() - (10.0 + 2.0 * 10f64.sqrt())).abs() < 1e-9);
        assert_eq!(d.current_rate(), 10);
    }

    #[test]
    fn no_threshold_before_enough_history() {
        let d = Detector::new();
        d.tick();
        assert_eq!(d.recompute(3.0, 1).0.threshold, None);
    }
}

//! Per-client series of the limits and quotas, from the kernel's counters at scrape time:
//! bytes metered, drops by reason, time at the limit. Only the `[metrics] client_series`
//! busiest limited clients get series of their own (the cardinality guard of
//! docs/operations.md); the rest are summed in gauges. The same for every client's packets
//! dropped by its rules and by isolation: the clients with the most drops get series.

use std::{net::Ipv4Addr, sync::Arc, sync::atomic::Ordering};

use phantom_common::policy::ClientLimit;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::counter::ConstCounter,
};

use super::{ClientPolicy, PolicyDrops};
use crate::metrics::{counter_family, gauge};

pub struct LimitsCollector {
    pub policy: Arc<ClientPolicy>,
    /// `[metrics] client_series`.
    pub max_clients: usize,
}

impl std::fmt::Debug for LimitsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LimitsCollector")
    }
}

/// Limited clients by name, with their kernel entries.
type Rows = Vec<(String, ClientLimit)>;

/// The limited clients by name, the `max` busiest (bytes both ways; ties by name) first,
/// and the rest.
fn split(mut rows: Rows, max: usize) -> (Rows, Rows) {
    if rows.len() > max {
        let weight = |l: &ClientLimit| l.up.bytes.saturating_add(l.down.bytes);
        rows.sort_by(|a, b| weight(&b.1).cmp(&weight(&a.1)).then_with(|| a.0.cmp(&b.0)));
    }
    let rest = rows.split_off(max.min(rows.len()));
    (rows, rest)
}

impl Collector for LimitsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let table = self.policy.clients.borrow().clone();
        let names: std::collections::BTreeMap<Ipv4Addr, &str> = table
            .clients
            .values()
            .map(|c| (c.ip, c.name.as_str()))
            .collect();
        let rows: Vec<(String, ClientLimit)> = self
            .policy
            .kernel_limits()
            .into_iter()
            .filter_map(|(ip, l)| Some((names.get(&ip)?.to_string(), l)))
            .collect();
        let over = rows.iter().filter(|(_, l)| l.over_quota()).count();
        let (listed, unlisted) = split(rows, self.max_clients);
        let dirs = |l: &ClientLimit| [("download", l.down), ("upload", l.up)];
        let per_dir = |f: fn(&phantom_common::policy::LimitDir) -> u64| {
            listed
                .iter()
                .flat_map(move |(name, l)| {
                    dirs(l).into_iter().map(move |(d, dir)| {
                        (
                            vec![("client", name.clone()), ("direction", d.to_string())],
                            f(&dir),
                        )
                    })
                })
                .collect::<Vec<_>>()
        };
        counter_family(
            &mut encoder,
            "phantom_client_limit_bytes",
            "Bytes a limited client sent (upload) and received (download), as the kernel metered them",
            per_dir(|d| d.bytes).into_iter(),
        )?;
        let mut drops = per_dir(|d| d.rate_dropped)
            .into_iter()
            .map(|(mut labels, n)| {
                labels.push(("reason", "rate_limit".to_string()));
                (labels, n)
            })
            .collect::<Vec<_>>();
        drops.extend(listed.iter().map(|(name, l)| {
            (
                vec![
                    ("client", name.clone()),
                    ("direction", "both".to_string()),
                    ("reason", "quota".to_string()),
                ],
                l.quota_dropped,
            )
        }));
        counter_family(
            &mut encoder,
            "phantom_client_limit_dropped_packets",
            "Packets of a limited client dropped, by reason (rate_limit: over its rate; quota: its quota used up and blocking)",
            drops.into_iter(),
        )?;
        let throttled = listed.iter().flat_map(|(name, l)| {
            dirs(l).into_iter().map(move |(d, dir)| {
                (
                    vec![("client", name.clone()), ("direction", d.to_string())],
                    dir.throttled_ns as f64 / 1e9,
                )
            })
        });
        let mut metric = encoder.encode_descriptor(
            "phantom_client_limit_throttled_seconds",
            "Time a limited client spent at its limit (its bucket more than half used)",
            None,
            ConstCounter::new(0f64).metric_type(),
        )?;
        for (labels, secs) in throttled {
            ConstCounter::new(secs).encode(metric.encode_family(&labels)?)?;
        }
        gauge(
            &mut encoder,
            "phantom_client_limit_over_quota_clients",
            "Limited clients whose quota is used up in this period",
            over as i64,
        )?;
        let reached = ConstCounter::new(self.policy.quota_reached_total.load(Ordering::Relaxed));
        reached.encode(encoder.encode_descriptor(
            "phantom_client_quota_reached",
            "Times a client used up its quota since the daemon started",
            None,
            reached.metric_type(),
        )?)?;
        gauge(
            &mut encoder,
            "phantom_client_limit_unlisted_clients",
            "Limited clients without series of their own (over [metrics] client_series)",
            unlisted.len() as i64,
        )?;
        let sum = |f: fn(&ClientLimit) -> u64| {
            let s = unlisted
                .iter()
                .map(|(_, l)| f(l))
                .fold(0u64, u64::saturating_add);
            i64::try_from(s).unwrap_or(i64::MAX)
        };
        gauge(
            &mut encoder,
            "phantom_client_limit_unlisted_bytes",
            "Bytes both ways of the limited clients without series of their own, summed",
            sum(|l| l.up.bytes.saturating_add(l.down.bytes)),
        )?;
        gauge(
            &mut encoder,
            "phantom_client_limit_unlisted_dropped_packets",
            "Packets dropped (rate and quota) of the limited clients without series of their own, summed",
            sum(|l| {
                l.up.rate_dropped
                    .saturating_add(l.down.rate_dropped)
                    .saturating_add(l.quota_dropped)
            }),
        )?;
        let (listed, unlisted) = split_drops(self.policy.client_drops(), self.max_clients);
        counter_family(
            &mut encoder,
            "phantom_client_policy_dropped_packets",
            "Packets a client sent that its rules (denied) or client isolation (isolated) dropped, since it took its address or the daemon started",
            listed.iter().flat_map(|(name, d)| {
                [("denied", d.denied), ("isolated", d.isolated)]
                    .into_iter()
                    .map(move |(reason, n)| {
                        (
                            vec![("client", name.clone()), ("reason", reason.to_string())],
                            n,
                        )
                    })
            }),
        )?;
        let rest = unlisted
            .iter()
            .map(|(_, d)| d.denied.saturating_add(d.isolated))
            .fold(0u64, u64::saturating_add);
        gauge(
            &mut encoder,
            "phantom_client_policy_unlisted_dropped_packets",
            "Packets dropped by rules and isolation of the clients without series of their own, summed",
            i64::try_from(rest).unwrap_or(i64::MAX),
        )
    }
}

/// Clients by name, with their drops by rules and isolation.
type DropRows = Vec<(String, PolicyDrops)>;

/// The clients with drops, the `max` with the most (ties by name) first, and the rest.
fn split_drops(rows: DropRows, max: usize) -> (DropRows, DropRows) {
    let total = |d: &PolicyDrops| d.denied.saturating_add(d.isolated);
    let mut rows: Vec<_> = rows.into_iter().filter(|(_, d)| total(d) > 0).collect();
    rows.sort_by(|a, b| total(&b.1).cmp(&total(&a.1)).then_with(|| a.0.cmp(&b.0)));
    let rest = rows.split_off(max.min(rows.len()));
    (rows, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busiest_limited_clients_get_series() {
        let row = |name: &str, bytes: u64| {
            let mut l = ClientLimit::default();
            l.down.bytes = bytes;
            (name.to_string(), l)
        };
        let (listed, rest) = split(vec![row("a", 1), row("b", 9), row("c", 9)], 2);
        let names: Vec<&str> = listed.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
        assert_eq!(rest.len(), 1);
    }

    #[test]
    fn clients_without_drops_get_no_series() {
        let row = |name: &str, denied: u64| {
            (
                name.to_string(),
                PolicyDrops {
                    denied,
                    isolated: 0,
                },
            )
        };
        let (listed, rest) = split_drops(vec![row("a", 0), row("b", 3), row("c", 7)], 1);
        let names: Vec<&str> = listed.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(names, ["c"]);
        assert_eq!(rest.len(), 1, "a has no drops and is not counted at all");
    }
}

//! The datapath's collector: programs, verdict counters, busiest sources, policy entries and
//! the VPN-interface programs' counters, read from the kernel maps at scrape time.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::gauge::ConstGauge,
};
use tracing::warn;

use phantom_common::names;

use super::{Datapath, SourceCount, VerdictCount, busiest};
use crate::metrics::{counter_family, gauge, gauge_family};

#[derive(Debug)]
pub struct DatapathCollector {
    pub datapath: Arc<Datapath>,
    /// `[metrics] top_sources`, changed live by SIGHUP.
    pub top_sources: Arc<AtomicUsize>,
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let dp = &self.datapath;
        let attachments = dp.attachments();
        {
            let probe = ConstGauge::new(1i64);
            let mut metric = encoder.encode_descriptor(
                "phantom_datapath_program_attached",
                "eBPF programs attached by this daemon (1 per program, interface and mode)",
                None,
                probe.metric_type(),
            )?;
            for a in &attachments {
                let labels = [
                    ("program", a.program.as_str()),
                    ("kind", a.kind.as_str()),
                    ("interface", a.interface.as_str()),
                    ("mode", a.mode.as_str()),
                ];
                ConstGauge::new(1i64).encode(metric.encode_family(&labels)?)?;
            }
        }
        match dp.guard.verdicts() {
            Ok(verdicts) => {
                let labels = |v: &VerdictCount| {
                    vec![
                        ("verdict", v.verdict.to_string()),
                        ("reason", v.reason.to_string()),
                    ]
                };
                counter_family(
                    &mut encoder,
                    "phantom_datapath_packets",
                    "Packets seen by the XDP guard, by verdict and reason",
                    verdicts.iter().map(|v| (labels(v), v.packets)),
                )?;
                counter_family(
                    &mut encoder,
                    "phantom_datapath_bytes",
                    "Bytes seen by the XDP guard, by verdict and reason",
                    verdicts.iter().map(|v| (labels(v), v.bytes)),
                )?;
            }
            Err(e) => warn!(error = %e, "cannot read the verdict map for metrics"),
        }
        let top = self.top_sources.load(Ordering::Relaxed);
        let mut map_entries = Vec::new();
        match dp.guard.sources() {
            Ok(sources) => {
                map_entries.push((names::SOURCES_MAP, sources.len()));
                let gauge = ConstGauge::new(sources.len() as i64);
                let metric = encoder.encode_descriptor(
                    "phantom_datapath_tracked_sources",
                    "Source addresses currently held in the XDP guard's LRU map",
                    None,
                    gauge.metric_type(),
                )?;
                gauge.encode(metric)?;
                let sources = busiest(sources, top, None);
                let labels = |s: &SourceCount| vec![("source", s.address.to_string())];
                counter_family(
                    &mut encoder,
                    "phantom_datapath_source_packets",
                    "Packets from the busiest sources (metrics.top_sources of them)",
                    sources.iter().map(|s| (labels(s), s.packets)),
                )?;
                counter_family(
                    &mut encoder,
                    "phantom_datapath_source_bytes",
                    "Bytes from the busiest sources (metrics.top_sources of them)",
                    sources.iter().map(|s| (labels(s), s.bytes)),
                )?;
            }
            Err(e) => warn!(error = %e, "cannot read the source map for metrics"),
        }
        match dp.policy.counts() {
            Ok((allowed, denied)) => gauge_family(
                &mut encoder,
                "phantom_datapath_policy_entries",
                "Live entries of the XDP allow and deny lists",
                [
                    (vec![("list", "allow".to_string())], allowed as i64),
                    (vec![("list", "deny".to_string())], denied as i64),
                ]
                .into_iter(),
            )?,
            Err(e) => warn!(error = %e, "cannot read the policy map for metrics"),
        }
        if let Ok(seconds) = dp.guard.per_second(1) {
            let pps = seconds.last().map_or(0, |s| s.packets);
            gauge(
                &mut encoder,
                "phantom_datapath_packets_per_second",
                "Packets the XDP guard saw in the last complete second",
                pps as i64,
            )?;
        }
        match dp.dns_verdicts() {
            Ok(verdicts) => counter_family(
                &mut encoder,
                "phantom_dns_filter_packets",
                "DNS answers seen by the in-kernel filter on the VPN interface, by verdict",
                verdicts
                    .iter()
                    .map(|v| (vec![("verdict", v.verdict.to_string())], v.packets)),
            )?,
            Err(e) => warn!(error = %e, "cannot read the DNS filter counters for metrics"),
        }
        if let Ok(n) = dp.domains.kernel_len() {
            gauge(
                &mut encoder,
                "phantom_dns_filter_domains",
                "Domains in the kernel's blocked set",
                n as i64,
            )?;
        }
        // How full each kernel map is (an LRU map evicts the oldest source when full; the
        // others refuse new entries).
        if let Ok([addrs, nets]) = dp.policy.counts_by_map() {
            map_entries.push((names::POLICY_MAP, addrs.0 + addrs.1));
            map_entries.push((names::POLICY_NET_MAP, nets.0 + nets.1));
        }
        if let Ok(n) = dp.domains.kernel_len() {
            map_entries.push((names::DOMAINS_MAP, n));
        }
        let label = |map: &str| vec![("map", map.to_string())];
        gauge_family(
            &mut encoder,
            "phantom_datapath_map_entries",
            "Entries in each of the datapath's kernel maps",
            map_entries
                .iter()
                .map(|(m, n)| (label(m), i64::try_from(*n).unwrap_or(i64::MAX))),
        )?;
        gauge_family(
            &mut encoder,
            "phantom_datapath_map_capacity",
            "The most entries each of the datapath's kernel maps holds",
            dp.map_capacities()
                .into_iter()
                .map(|(m, n)| (label(m), i64::from(n))),
        )?;
        // Held keys against capacity, and what a full map turned away (read from the
        // counts above and the maps' own tallies: no second pass over the source map).
        let capacity = dp.map_capacities();
        let cap = |map: &str| {
            capacity
                .iter()
                .find(|(m, _)| *m == map)
                .map_or(u32::MAX, |(_, n)| *n) as usize
        };
        let sources_held = map_entries
            .iter()
            .find(|(m, _)| *m == names::SOURCES_MAP)
            .map(|(_, n)| *n);
        let mut fills: Vec<(&str, super::policy::MapFill)> = Vec::new();
        if let Ok([addrs, nets]) = dp.policy.fill() {
            fills.push((names::POLICY_MAP, addrs));
            fills.push((names::POLICY_NET_MAP, nets));
        }
        if let Ok(d) = dp.domains.fill() {
            fills.push((
                names::DOMAINS_MAP,
                super::policy::MapFill {
                    held: d.held,
                    refused: d.refused,
                    evicted: d.evicted,
                },
            ));
        }
        gauge_family(
            &mut encoder,
            "phantom_datapath_map_full",
            "1 while a kernel map holds as many keys as it can (docs/datapath.md, \"When a map is full\")",
            sources_held
                .map(|n| (names::SOURCES_MAP, n))
                .into_iter()
                .chain(fills.iter().map(|(m, f)| (*m, f.held)))
                .map(|(m, held)| (label(m), i64::from(held >= cap(m)))),
        )?;
        counter_family(
            &mut encoder,
            "phantom_datapath_kernel_log_records",
            "Records the eBPF programs logged (rare events; verdict samples with datapath.kernel_samples), by level (docs/datapath.md, \"Kernel events\")",
            dp.kernel_log_counts
                .snapshot()
                .into_iter()
                .map(|(level, n)| (vec![("level", level.to_string())], n)),
        )?;
        counter_family(
            &mut encoder,
            "phantom_datapath_map_refused",
            "New entries a full kernel map refused",
            fills.iter().map(|(m, f)| (label(m), f.refused)),
        )?;
        counter_family(
            &mut encoder,
            "phantom_datapath_map_evicted",
            "Entries removed from a full kernel map to make room for an operator's",
            fills.iter().map(|(m, f)| (label(m), f.evicted)),
        )?;
        if let Ok(fill) = dp.domains.fill() {
            gauge(
                &mut encoder,
                "phantom_dns_filter_rules_left_out",
                "Rules owed to the kernel DNS filter that its full domain set could not take",
                fill.left_out as i64,
            )?;
        }
        match dp.multihop.status() {
            Ok(status) => {
                gauge(
                    &mut encoder,
                    "phantom_multihop_mark_enabled",
                    "1 while the in-kernel multihop mark is on",
                    i64::from(status.enabled),
                )?;
                counter_family(
                    &mut encoder,
                    "phantom_multihop_mark_packets",
                    "Packets seen by the multihop mark program, by verdict",
                    status
                        .counters
                        .iter()
                        .map(|c| (vec![("verdict", c.verdict.to_string())], c.packets)),
                )?;
            }
            Err(e) => warn!(error = %e, "cannot read the multihop counters for metrics"),
        }
        match dp.encrypted_dns.status() {
            Ok(status) => counter_family(
                &mut encoder,
                "phantom_datapath_encrypted_dns_packets",
                "VPN clients' packets seen by the encrypted-DNS filter, by verdict (dot_dropped, doq_dropped, doh_tcp_dropped, doh_udp_dropped, to_resolver, passed)",
                status
                    .counters
                    .iter()
                    .map(|c| (vec![("verdict", c.verdict.to_string())], c.packets)),
            )?,
            Err(e) => warn!(error = %e, "cannot read the encrypted-DNS counters for metrics"),
        }
        match dp.client_policy.counts() {
            Ok(counts) => counter_family(
                &mut encoder,
                "phantom_client_policy_packets",
                "VPN clients' packets seen by the client policy (rules, isolation, limits, quotas), by verdict (allowed, denied, no_match, isolated, not_inspected, rate_limited, over_quota)",
                counts
                    .iter()
                    .map(|c| (vec![("verdict", c.verdict.to_string())], c.packets)),
            )?,
            Err(e) => warn!(error = %e, "cannot read the client policy counters for metrics"),
        }
        match dp.sni.status() {
            Ok(status) => counter_family(
                &mut encoder,
                "phantom_datapath_sni_packets",
                "VPN clients' TLS ClientHellos (TCP/443) and QUIC datagrams seen by the SNI filter, by verdict (blocked_dropped, ech_dropped, quic_dropped, passed, no_name, unparsed, dry_run, exempt_client)",
                status
                    .counters
                    .iter()
                    .map(|c| (vec![("verdict", c.verdict.to_string())], c.packets)),
            )?,
            Err(e) => warn!(error = %e, "cannot read the SNI filter's counters for metrics"),
        }
        Ok(())
    }
}

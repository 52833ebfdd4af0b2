//! Prometheus metrics on `[metrics] listen`. Kernel counters are read from the maps at scrape
//! time by a collector, so the exposition is never staler than the scrape.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::{Router, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge},
    registry::Registry,
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{admin::registry::Outcome, datapath::Datapath, error::Error, http, protocol};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdminLabels {
    module: String,
    action: String,
    outcome: String,
}

pub struct Metrics {
    registry: Registry,
    admin_requests: Family<AdminLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new(
        datapath: Option<Arc<Datapath>>,
        wireguard: Option<Arc<crate::core::Server>>,
        top_sources: Arc<AtomicUsize>,
    ) -> Self {
        let mut registry = Registry::default();
        let admin_requests = Family::<AdminLabels, Counter>::default();
        registry.register(
            "phantom_admin_requests",
            "Admin socket requests by module, action and outcome (unknown targets are module=\"unknown\")",
            admin_requests.clone(),
        );
        registry.register_collector(Box::new(BuildInfo));
        registry.register_collector(Box::new(DatapathCollector {
            datapath,
            top_sources,
        }));
        if let Some(server) = wireguard {
            registry.register_collector(Box::new(WireguardCollector { server }));
        }
        Self {
            registry,
            admin_requests,
        }
    }

    /// Adds a module's collector (modules that start after the metrics registry exists).
    pub fn add_collector(&mut self, collector: Box<dyn Collector>) {
        self.registry.register_collector(collector);
    }

    /// Counts one admin request. Labels only ever carry registered names, so a client
    /// cannot create series at will.
    pub fn admin_request(&self, outcome: Outcome) {
        let (module, action) = outcome.target.unwrap_or(("unknown", "unknown"));
        self.admin_requests
            .get_or_create(&AdminLabels {
                module: module.into(),
                action: action.into(),
                outcome: if outcome.success { "success" } else { "error" }.into(),
            })
            .inc();
    }

    /// Pre-creates the success series of every action so dashboards see zeros, not gaps.
    pub fn register_actions(&self, actions: &[(&'static str, &'static str)]) {
        for (module, action) in actions {
            let _ = self.admin_requests.get_or_create(&AdminLabels {
                module: (*module).into(),
                action: (*action).into(),
                outcome: "success".into(),
            });
        }
    }

    pub fn encode(&self) -> Result<String, Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)
            .map_err(|_| Error::Other("cannot encode metrics".into()))?;
        Ok(out)
    }
}

#[derive(Debug)]
struct BuildInfo;

impl Collector for BuildInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new(1i64);
        let mut metric = encoder.encode_descriptor(
            "phantom_build_info",
            "Build of the running daemon (value is always 1)",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric.encode_family(&[("version", protocol::VERSION)])?)
    }
}

#[derive(Debug)]
struct DatapathCollector {
    datapath: Option<Arc<Datapath>>,
    top_sources: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("attachments", &self.attachments())
            .finish()
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(dp) = &self.datapath else {
            return Ok(());
        };
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
                let labels = |v: &crate::datapath::VerdictCount| {
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
        match dp.guard.sources() {
            Ok(sources) => {
                let gauge = ConstGauge::new(sources.len() as i64);
                let metric = encoder.encode_descriptor(
                    "phantom_datapath_tracked_sources",
                    "Source addresses currently held in the XDP guard's LRU map",
                    None,
                    gauge.metric_type(),
                )?;
                gauge.encode(metric)?;
                let sources = crate::datapath::busiest(sources, top, None);
                let labels =
                    |s: &crate::datapath::SourceCount| vec![("source", s.address.to_string())];
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
        Ok(())
    }
}

/// The WireGuard server: interface, clients, and per-client handshake age and traffic.
/// The resolver's totals.
pub struct ResolverCollector {
    pub resolver: Arc<crate::resolver::Resolver>,
}

impl std::fmt::Debug for ResolverCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResolverCollector")
    }
}

impl Collector for ResolverCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = &self.resolver;
        let st = &r.stats;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        counter_family(
            &mut encoder,
            "phantom_dns_queries",
            "Queries to Phantom's resolver, by transport",
            [
                (vec![("transport", "udp".to_string())], n(&st.queries_udp)),
                (vec![("transport", "tcp".to_string())], n(&st.queries_tcp)),
            ]
            .into_iter(),
        )?;
        counter_family(
            &mut encoder,
            "phantom_dns_answers",
            "Resolver outcomes: blocked, matched but passed (dry_run, exempt client), from the cache, forwarded, failed",
            [
                ("blocked", n(&st.blocked)),
                ("dry_run", n(&st.dry_run_matches)),
                ("exempt_client", n(&st.exempt_matches)),
                ("cache_hit", n(&r.cache.hits)),
                ("forwarded", n(&st.forwarded)),
                ("upstream_failure", n(&st.upstream_failures)),
                ("malformed", n(&st.malformed)),
                ("truncated", n(&st.truncated)),
            ]
            .into_iter()
            .map(|(o, v)| (vec![("outcome", o.to_string())], v)),
        )?;
        gauge(
            &mut encoder,
            "phantom_dns_cache_entries",
            "Answers in the resolver's cache",
            r.cache.len() as i64,
        )?;
        gauge(
            &mut encoder,
            "phantom_dns_dry_run",
            "1 while dry run is on",
            i64::from(r.policy().dry_run),
        )?;
        gauge(
            &mut encoder,
            "phantom_dns_listening",
            "Addresses the resolver listens on (UDP and TCP each)",
            r.listening().len() as i64,
        )
    }
}

/// The blocklist's size and version.
pub struct BlocklistCollector {
    pub list: Arc<crate::blocklist::Blocklist>,
}

impl std::fmt::Debug for BlocklistCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlocklistCollector")
    }
}

impl Collector for BlocklistCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(
            &mut encoder,
            "phantom_blocklist_entries",
            "Domains on the blocklist",
            self.list.len() as i64,
        )?;
        gauge(
            &mut encoder,
            "phantom_blocklist_version",
            "The blocklist's version (milliseconds since the epoch of its last change)",
            self.list.version() as i64,
        )
    }
}

struct WireguardCollector {
    server: Arc<crate::core::Server>,
}

impl std::fmt::Debug for WireguardCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WireguardCollector")
    }
}

impl Collector for WireguardCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let up = self.server.device_state().is_ok();
        gauge(
            &mut encoder,
            "phantom_wireguard_up",
            "1 while the WireGuard interface answers",
            i64::from(up),
        )?;
        let clients = match self.server.store.all() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot read the client store for metrics");
                return Ok(());
            }
        };
        let live = self.server.live();
        let enabled = clients.iter().filter(|c| c.enabled).count() as i64;
        let connected = clients
            .iter()
            .filter(|c| live.get(&c.public_key).is_some_and(|l| l.connected()))
            .count() as i64;
        gauge_family(
            &mut encoder,
            "phantom_wireguard_clients",
            "Clients by state (connected = handshake within 180 s)",
            [
                (vec![("state", "enabled".to_string())], enabled),
                (
                    vec![("state", "disabled".to_string())],
                    clients.len() as i64 - enabled,
                ),
                (vec![("state", "connected".to_string())], connected),
            ]
            .into_iter(),
        )?;
        let label = |name: &str| vec![("client", name.to_string())];
        gauge_family(
            &mut encoder,
            "phantom_wireguard_latest_handshake_seconds",
            "Seconds since each connected-at-least-once client's latest handshake",
            clients.iter().filter_map(|c| {
                let age = live.get(&c.public_key)?.handshake_age_seconds?;
                Some((label(&c.name), age as i64))
            }),
        )?;
        let traffic = |c: &crate::core::store::Client, rx: bool| {
            let l = live.get(&c.public_key);
            if rx {
                c.rx_total + l.map_or(0, |l| l.rx_bytes)
            } else {
                c.tx_total + l.map_or(0, |l| l.tx_bytes)
            }
        };
        counter_family(
            &mut encoder,
            "phantom_wireguard_received_bytes",
            "Bytes received from each client, across restarts",
            clients.iter().map(|c| (label(&c.name), traffic(c, true))),
        )?;
        counter_family(
            &mut encoder,
            "phantom_wireguard_sent_bytes",
            "Bytes sent to each client, across restarts",
            clients.iter().map(|c| (label(&c.name), traffic(c, false))),
        )
    }
}

/// Encodes one gauge without labels.
pub(crate) fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(metric)
}

/// Encodes one gauge family from (labels, value) rows.
pub(crate) fn gauge_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (Vec<(&'static str, String)>, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric =
        encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    for (labels, value) in rows {
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes one counter family from (labels, value) rows.
pub(crate) fn counter_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (Vec<(&'static str, String)>, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric =
        encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (labels, value) in rows {
        ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Serves `GET /metrics` until `shutdown` turns true, with the HTTP layer's metrics limits.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Other(format!("cannot listen for metrics on {addr}: {e}")))?;
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let metrics = Arc::clone(&metrics);
            async move {
                // Map reads are syscalls; keep them off the async workers.
                match tokio::task::spawn_blocking(move || metrics.encode()).await {
                    Ok(Ok(body)) => (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                        .into_response(),
                    _ => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        "metrics unavailable\n",
                    )
                        .into_response(),
                }
            }
        }),
    );
    info!(%addr, "metrics listening");
    let server = http::Server::new("metrics", http::Limits::metrics());
    Ok(tokio::spawn(async move {
        server.serve(listener, shutdown, http::router(app)).await;
    }))
}

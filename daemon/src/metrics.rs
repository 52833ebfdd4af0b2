//! Prometheus metrics on `[metrics] listen`: the registry every domain plugs its metrics and
//! collectors into (each domain's `metrics.rs`), the encoding helpers they share and the
//! listener. Collectors read state at scrape time (kernel maps included), so the exposition
//! is never staler than the scrape.

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, text::encode},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::{Metric, Registry},
};
use tokio::sync::watch;
use tracing::info;

use crate::{error::Error, http, protocol};

/// The Prometheus registry every domain registers its metrics and collectors in.
pub struct Metrics {
    registry: Registry,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(BuildInfo));
        Self { registry }
    }

    /// Registers a metric (a counter family a domain updates itself).
    pub fn register(&mut self, name: &str, help: &str, metric: impl Metric) {
        self.registry.register(name, help, metric);
    }

    /// Adds a domain's collector, which reads its state at scrape time.
    pub fn add_collector(&mut self, collector: Box<dyn Collector>) {
        self.registry.register_collector(collector);
    }

    pub fn encode(&self) -> Result<String, EncodeError> {
        let mut out = String::new();
        encode(&mut out, &self.registry).map_err(EncodeError)?;
        Ok(out)
    }
}

/// A collector failed while writing the exposition.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode metrics")]
pub struct EncodeError(#[source] std::fmt::Error);

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

/// The HTTP layer's connection counters of every listener (`http::listeners`): connections
/// open, admitted, refused at accept by reason, and each listener's cap.
#[derive(Debug, Default)]
pub struct HttpCollector;

impl Collector for HttpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let listeners = http::listeners();
        let label = |name: &str| vec![("listener", name.to_string())];
        gauge_family(
            &mut encoder,
            "phantom_http_connections",
            "Connections open now per listener (the ghost relay's: handshakes in progress)",
            listeners
                .iter()
                .map(|(name, c)| (label(name), i64::try_from(c.open).unwrap_or(i64::MAX))),
        )?;
        gauge_family(
            &mut encoder,
            "phantom_http_max_connections",
            "Connections a listener holds at most (its cap)",
            listeners.iter().map(|(name, c)| {
                (
                    label(name),
                    i64::try_from(c.max_connections).unwrap_or(i64::MAX),
                )
            }),
        )?;
        counter_family(
            &mut encoder,
            "phantom_http_admitted",
            "Connections admitted at accept since start, per listener",
            listeners.iter().map(|(name, c)| (label(name), c.admitted)),
        )?;
        counter_family(
            &mut encoder,
            "phantom_http_refused",
            "Connections closed at accept since start, per listener and reason (full: the listener's cap; source_full: the source's)",
            listeners.iter().flat_map(|(name, c)| {
                [
                    (http::Refusal::Full, c.refused_full),
                    (http::Refusal::SourceFull, c.refused_source),
                ]
                .map(|(reason, n)| {
                    (
                        vec![
                            ("listener", name.to_string()),
                            ("reason", reason.as_str().to_string()),
                        ],
                        n,
                    )
                })
            }),
        )
    }
}

/// Encodes one gauge without labels.
pub fn gauge(
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
pub fn gauge_family(
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
pub fn counter_family(
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
    limits: http::Limits,
    shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let listener = http::bind("metrics", addr).await?;
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
    let server = http::Server::new("metrics", limits);
    Ok(tokio::spawn(async move {
        server.serve(listener, shutdown, http::router(app)).await;
    }))
}

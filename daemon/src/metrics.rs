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
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen {
            what: "metrics",
            addr,
            source,
        })?;
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

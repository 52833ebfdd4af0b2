//! The WireGuard server's collector: interface, clients by state, and per-client handshake age
//! and traffic.

use std::sync::{Arc, atomic::Ordering};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::counter::ConstCounter,
};
use tracing::warn;

use super::{Server, store::Client};
use crate::metrics::{counter_family, gauge, gauge_family};

/// The WireGuard server: interface, clients, and per-client handshake age and traffic.
pub struct WireguardCollector {
    pub server: Arc<Server>,
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
        let now = super::unix_now();
        let enabled = clients.iter().filter(|c| c.enabled).count() as i64;
        let expired = clients.iter().filter(|c| c.expired_at(now)).count() as i64;
        let connected = clients
            .iter()
            .filter(|c| live.get(&c.public_key).is_some_and(|l| l.connected()))
            .count() as i64;
        gauge_family(
            &mut encoder,
            "phantom_wireguard_clients",
            "Clients by state (connected = handshake within 180 s; expired = expiry come, so disabled)",
            [
                (vec![("state", "enabled".to_string())], enabled),
                (
                    vec![("state", "disabled".to_string())],
                    clients.len() as i64 - enabled,
                ),
                (vec![("state", "connected".to_string())], connected),
                (vec![("state", "expired".to_string())], expired),
            ]
            .into_iter(),
        )?;
        let expired_total = ConstCounter::new(self.server.expired_total.load(Ordering::Relaxed));
        expired_total.encode(encoder.encode_descriptor(
            "phantom_wireguard_clients_expired",
            "Clients disabled at their expiry (peer removed) since the daemon started",
            None,
            expired_total.metric_type(),
        )?)?;
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
        let traffic = |c: &Client, rx: bool| {
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

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
    /// `[metrics] client_series`: at most this many clients get series of their own (the
    /// busiest by traffic); the rest are summed, so a host with 50,000 clients does not
    /// hand Prometheus 150,000 series.
    pub max_clients: usize,
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
        let traffic = |c: &Client, rx: bool| {
            let l = live.get(&c.public_key);
            if rx {
                c.rx_total + l.map_or(0, |l| l.rx_bytes)
            } else {
                c.tx_total + l.map_or(0, |l| l.tx_bytes)
            }
        };
        let (listed, unlisted) = split_busiest(&clients, self.max_clients, |c| {
            traffic(c, true).saturating_add(traffic(c, false))
        });
        gauge_family(
            &mut encoder,
            "phantom_wireguard_latest_handshake_seconds",
            "Seconds since each connected-at-least-once client's latest handshake",
            listed.iter().filter_map(|c| {
                let age = live.get(&c.public_key)?.handshake_age_seconds?;
                Some((label(&c.name), age as i64))
            }),
        )?;
        counter_family(
            &mut encoder,
            "phantom_wireguard_received_bytes",
            "Bytes received from each client, across restarts",
            listed.iter().map(|c| (label(&c.name), traffic(c, true))),
        )?;
        counter_family(
            &mut encoder,
            "phantom_wireguard_sent_bytes",
            "Bytes sent to each client, across restarts",
            listed.iter().map(|c| (label(&c.name), traffic(c, false))),
        )?;
        // Gauges, not counters: the set of unlisted clients changes as the busiest do.
        gauge(
            &mut encoder,
            "phantom_wireguard_unlisted_clients",
            "Clients without series of their own (over [metrics] client_series)",
            unlisted.len() as i64,
        )?;
        let sum = |rx: bool| {
            unlisted
                .iter()
                .map(|c| traffic(c, rx))
                .fold(0u64, u64::saturating_add)
        };
        gauge(
            &mut encoder,
            "phantom_wireguard_unlisted_received_bytes",
            "Bytes received from the clients without series of their own, summed",
            i64::try_from(sum(true)).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut encoder,
            "phantom_wireguard_unlisted_sent_bytes",
            "Bytes sent to the clients without series of their own, summed",
            i64::try_from(sum(false)).unwrap_or(i64::MAX),
        )
    }
}

/// The `max` busiest clients by `weight` (ties by name, so the choice is stable) and the rest.
fn split_busiest(
    clients: &[Client],
    max: usize,
    weight: impl Fn(&Client) -> u64,
) -> (Vec<&Client>, Vec<&Client>) {
    let mut all: Vec<&Client> = clients.iter().collect();
    if all.len() > max {
        all.sort_by(|a, b| weight(b).cmp(&weight(a)).then_with(|| a.name.cmp(&b.name)));
    }
    let rest = all.split_off(max.min(all.len()));
    (all, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str, rx: u64) -> Client {
        Client {
            name: name.into(),
            ip: std::net::Ipv4Addr::new(10, 0, 0, 2),
            public_key: format!("{name}-key"),
            private_key: String::new(),
            preshared_key: String::new(),
            created: String::new(),
            enabled: true,
            rx_total: rx,
            tx_total: 0,
            expires_at: None,
            expiry_disabled: false,
        }
    }

    #[test]
    fn the_busiest_clients_get_series_and_the_rest_are_summed() {
        let clients = vec![
            client("a", 10),
            client("b", 300),
            client("c", 20),
            client("d", 300),
        ];
        let (listed, rest) = split_busiest(&clients, 2, |c| c.rx_total);
        let names: Vec<&str> = listed.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["b", "d"], "busiest first, ties by name");
        assert_eq!(rest.len(), 2);
        let (listed, rest) = split_busiest(&clients, 10, |c| c.rx_total);
        assert_eq!((listed.len(), rest.len()), (4, 0));
        let (listed, rest) = split_busiest(&clients, 0, |c| c.rx_total);
        assert_eq!((listed.len(), rest.len()), (0, 4));
    }
}

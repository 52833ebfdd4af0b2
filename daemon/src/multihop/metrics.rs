//! Multihop metrics, read at scrape time from the module's live state.

use std::sync::Arc;

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::Multihop;
use crate::metrics::{counter_family, gauge};

pub struct MultihopCollector {
    multihop: Arc<Multihop>,
}

impl MultihopCollector {
    pub fn new(multihop: Arc<Multihop>) -> Self {
        Self { multihop }
    }
}

impl std::fmt::Debug for MultihopCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MultihopCollector")
    }
}

impl Collector for MultihopCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.multihop;
        let enabled = m.is_enabled();
        let monitor = m.monitor_state();
        gauge(
            &mut encoder,
            "phantom_multihop_enabled",
            "1 while client traffic is routed through a multihop exit",
            i64::from(enabled),
        )?;
        gauge(
            &mut encoder,
            "phantom_multihop_exit_up",
            "1 while the last monitor check got through the exit (0 when down or multihop is off)",
            i64::from(enabled && monitor.exit_reachable == Some(true)),
        )?;
        gauge(
            &mut encoder,
            "phantom_multihop_monitor_running",
            "1 while the multihop monitor task runs",
            i64::from(monitor.running),
        )?;
        if enabled && let Some(age) = m.handshake_age() {
            gauge(
                &mut encoder,
                "phantom_multihop_exit_handshake_age_seconds",
                "Seconds since the exit's last WireGuard handshake",
                age as i64,
            )?;
        }
        counter_family(
            &mut encoder,
            "phantom_multihop_monitor_checks",
            "Monitor checks of the exit, by result",
            [("up", monitor.checks_up), ("down", monitor.checks_down)]
                .into_iter()
                .map(|(r, n)| (vec![("result", r.to_string())], n)),
        )?;
        counter_family(
            &mut encoder,
            "phantom_multihop_events",
            "Exit events seen by the monitor",
            [
                ("exit_down", monitor.went_down),
                ("exit_restored", monitor.restored),
                ("reestablished", monitor.reestablished),
            ]
            .into_iter()
            .map(|(e, n)| (vec![("event", e.to_string())], n)),
        )?;
        Ok(())
    }
}

//! Ghost mode's collector: whether it is on, tunnels, bytes, refused upgrades and frames.

use std::sync::{Arc, atomic::Ordering};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::counter::ConstCounter,
};

use super::{
    Ghost,
    relay::{FrameFault, Rejection},
};
use crate::metrics::{counter_family, gauge};

/// Ghost counters at scrape time.
pub struct GhostCollector {
    pub ghost: Arc<Ghost>,
}

impl std::fmt::Debug for GhostCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GhostCollector")
    }
}

impl Collector for GhostCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.ghost.stats;
        gauge(
            &mut encoder,
            "phantom_ghost_active",
            "1 while ghost mode is enabled",
            i64::from(self.ghost.is_active()),
        )?;
        gauge(
            &mut encoder,
            "phantom_ghost_tunnels_open",
            "WebSocket tunnels open now",
            s.tunnels_open.load(Ordering::Relaxed),
        )?;
        counter_family(
            &mut encoder,
            "phantom_ghost_tunnels",
            "WebSocket tunnels opened since start",
            std::iter::once((Vec::new(), s.tunnels_total.load(Ordering::Relaxed))),
        )?;
        {
            let c = ConstCounter::new(0u64);
            let mut metric = encoder.encode_descriptor(
                "phantom_ghost_bytes",
                "Datagram bytes relayed: in = client to WireGuard, out = WireGuard to client",
                None,
                c.metric_type(),
            )?;
            for (dir, v) in [("in", &s.bytes_in), ("out", &s.bytes_out)] {
                ConstCounter::new(v.load(Ordering::Relaxed))
                    .encode(metric.encode_family(&[("direction", dir)])?)?;
            }
        }
        {
            let c = ConstCounter::new(0u64);
            let mut metric = encoder.encode_descriptor(
                "phantom_ghost_rejected_upgrades",
                "Connections refused before a tunnel opened, by reason",
                None,
                c.metric_type(),
            )?;
            for r in Rejection::ALL {
                ConstCounter::new(s.rejected(r))
                    .encode(metric.encode_family(&[("reason", r.as_str())])?)?;
            }
        }
        {
            let c = ConstCounter::new(0u64);
            let mut metric = encoder.encode_descriptor(
                "phantom_ghost_refused_frames",
                "Tunnels closed on a client frame fault, by fault",
                None,
                c.metric_type(),
            )?;
            for f in FrameFault::ALL {
                ConstCounter::new(s.faults(f))
                    .encode(metric.encode_family(&[("fault", f.as_str())])?)?;
            }
        }
        Ok(())
    }
}

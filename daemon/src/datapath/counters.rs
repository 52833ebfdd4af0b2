//! The per-CPU verdict counters every program keeps (`TrafficCounter` per verdict slot),
//! summed over the CPUs.

use aya::maps::{MapData, PerCpuArray};
use phantom_common::xdp::TrafficCounter;
use serde::Serialize;

use crate::error::Error;

/// One verdict's packets and bytes over every CPU.
#[derive(Clone, Debug, Serialize)]
pub struct VerdictCount {
    pub verdict: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// The totals of `verdicts` (slot, name) in `map`.
pub fn verdict_counts(
    map: &PerCpuArray<MapData, TrafficCounter>,
    verdicts: impl IntoIterator<Item = (u32, &'static str)>,
) -> Result<Vec<VerdictCount>, Error> {
    verdicts
        .into_iter()
        .map(|(slot, verdict)| {
            let per_cpu = map.get(&slot, 0)?;
            let (packets, bytes) = per_cpu
                .iter()
                .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
            Ok(VerdictCount {
                verdict,
                packets,
                bytes,
            })
        })
        .collect()
}

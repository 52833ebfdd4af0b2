//! Types shared by Phantom's eBPF programs and the userspace daemon.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel writes these structs into maps and the
//! daemon reads them back byte for byte, so a field added here changes both sides at once.
#![no_std]

pub mod xdp;

/// Map and program names, shared so the daemon never spells them differently from the object.
pub mod names {
    /// Per-source packet/byte counters (LRU, per-CPU).
    pub const SOURCES_MAP: &str = "PH_SOURCES";
    /// Packet/byte counters by verdict and reason (per-CPU array).
    pub const VERDICTS_MAP: &str = "PH_VERDICTS";
    /// The guard attached to the uplink.
    pub const XDP_GUARD: &str = "xdp_guard";
    /// An XDP program that only returns `XDP_PASS`: the baseline of the benchmark.
    pub const XDP_BASELINE: &str = "xdp_baseline";
}

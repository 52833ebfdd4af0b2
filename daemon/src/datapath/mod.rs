//! The kernel side: loads the eBPF object, attaches the programs, and owns the maps.
//!
//! Maps and the XDP link are pinned under `[datapath] bpffs`, so:
//! - a daemon restart reuses the maps (counts survive) and adopts the pinned link, replacing
//!   the program atomically (`bpf_link_update`), never attaching a second time;
//! - a crash (`kill -9`) leaves the guard attached and counting until the next start adopts it;
//! - a clean shutdown unpins the link, which detaches the guard; the maps stay pinned.

pub mod actions;
mod bpffs;
mod uplink;

use std::{
    ffi::CString,
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, PerCpuHashMap},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use phantom_common::{
    names,
    xdp::{SourceKey, SourceStats, TrafficCounter, Verdict},
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    config::{DatapathConfig, XdpModeSetting},
    error::Error,
};

/// The compiled eBPF object, built by build.rs with the pinned nightly.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/phantom"));

/// Returns the embedded object (for benchmarks and tools that load it themselves).
pub fn ebpf_object() -> &'static [u8] {
    EBPF_OBJECT
}

const GUARD_LINK_PIN: &str = "xdp_guard_link";
const ATTACHMENT_RECORD: &str = "datapath-attachment.json";

/// What is attached where; persisted beside the pinned link because the kernel does not report
/// an XDP link's mode.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Attachment {
    pub program: String,
    pub kind: String,
    pub interface: String,
    pub ifindex: u32,
    /// `native` or `generic`.
    pub mode: String,
    /// RFC 3339, when the link was first created (kept when a restart adopts it).
    pub attached_since: String,
}

/// One source address and its counts, summed over CPUs.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SourceCount {
    pub address: IpAddr,
    pub packets: u64,
    pub bytes: u64,
    /// Seconds since the last packet from this source.
    pub last_seen_seconds_ago: f64,
}

/// Packets and bytes for one verdict/reason slot.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct VerdictCount {
    pub verdict: &'static str,
    pub reason: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MapSummary {
    pub name: &'static str,
    pub kind: &'static str,
    pub max_entries: u32,
    pub entries: usize,
    pub pinned_at: PathBuf,
}

pub struct Datapath {
    /// Keeps the programs (and through them the attached link) alive.
    ebpf: Mutex<Ebpf>,
    sources: Mutex<PerCpuHashMap<MapData, SourceKey, SourceStats>>,
    verdicts: Mutex<PerCpuArray<MapData, TrafficCounter>>,
    attachment: Attachment,
    pin_dir: PathBuf,
    record_path: PathBuf,
    max_sources: u32,
}

impl Datapath {
    /// Loads the object, reusing pinned maps, and attaches (or adopts) the XDP guard.
    pub fn start(config: &DatapathConfig, state_dir: &Path) -> Result<Self, Error> {
        let pin_dir = config.bpffs.clone();
        bpffs::ensure(&pin_dir)?;
        let uplink = match config.uplink.as_str() {
            "auto" => uplink::default_route_interface()?,
            name => name.to_string(),
        };
        let ifindex = uplink::ifindex(&uplink)?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .map_max_entries(names::SOURCES_MAP, config.max_sources)
            .load(EBPF_OBJECT)?;

        let record_path = state_dir.join(ATTACHMENT_RECORD);
        let attachment = attach_guard(
            &mut ebpf,
            config.xdp_mode,
            &uplink,
            ifindex,
            &pin_dir,
            &record_path,
        )?;

        let sources = PerCpuHashMap::try_from(take_map(&mut ebpf, names::SOURCES_MAP)?)?;
        let verdicts = PerCpuArray::try_from(take_map(&mut ebpf, names::VERDICTS_MAP)?)?;
        Ok(Self {
            ebpf: Mutex::new(ebpf),
            sources: Mutex::new(sources),
            verdicts: Mutex::new(verdicts),
            attachment,
            pin_dir,
            record_path,
            max_sources: config.max_sources,
        })
    }

    pub fn attachments(&self) -> Vec<Attachment> {
        vec![self.attachment.clone()]
    }

    /// Clean shutdown: unpin the link so that dropping our handle detaches the guard.
    /// Maps stay pinned so counts survive into the next start.
    pub fn shutdown(self) {
        let link_pin = self.pin_dir.join(GUARD_LINK_PIN);
        if let Err(e) = std::fs::remove_file(&link_pin)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %link_pin.display(), error = %e, "cannot unpin the XDP link");
        }
        if let Err(e) = std::fs::remove_file(&self.record_path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %self.record_path.display(), error = %e, "cannot remove the attachment record");
        }
        info!(interface = %self.attachment.interface, "XDP guard detached");
        drop(self.ebpf);
    }

    /// Counters by verdict and reason, summed over CPUs.
    pub fn verdicts(&self) -> Result<Vec<VerdictCount>, Error> {
        let map = self
            .verdicts
            .lock()
            .map_err(|_| Error::Datapath("verdict map lock poisoned".into()))?;
        Verdict::ALL
            .iter()
            .map(|v| {
                let per_cpu = map.get(&(*v as u32), 0)?;
                let (packets, bytes) = per_cpu
                    .iter()
                    .fold((0u64, 0u64), |(p, b), c| (p + c.packets, b + c.bytes));
                Ok(VerdictCount {
                    verdict: v.action(),
                    reason: v.reason(),
                    packets,
                    bytes,
                })
            })
            .collect()
    }

    /// Every tracked source, summed over CPUs. Entries evicted by the LRU are gone.
    pub fn sources(&self) -> Result<Vec<SourceCount>, Error> {
        let now_ns = monotonic_ns();
        let map = self
            .sources
            .lock()
            .map_err(|_| Error::Datapath("source map lock poisoned".into()))?;
        let mut out = Vec::new();
        for item in map.iter() {
            let (key, per_cpu) = match item {
                Ok(kv) => kv,
                // An entry evicted between get_next_key and lookup: skip it.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut total = SourceStats::default();
            for c in per_cpu.iter() {
                total.packets += c.packets;
                total.bytes += c.bytes;
                total.last_seen_ns = total.last_seen_ns.max(c.last_seen_ns);
            }
            out.push(SourceCount {
                address: key_to_ip(&key),
                packets: total.packets,
                bytes: total.bytes,
                last_seen_seconds_ago: now_ns.saturating_sub(total.last_seen_ns) as f64 / 1e9,
            });
        }
        Ok(out)
    }
}

/// The `count` busiest of `sources` by packets (then bytes); with `window_seconds`, only
/// those seen within it.
pub fn busiest(
    mut sources: Vec<SourceCount>,
    count: usize,
    window_seconds: Option<u64>,
) -> Vec<SourceCount> {
    if let Some(window) = window_seconds {
        sources.retain(|s| s.last_seen_seconds_ago <= window as f64);
    }
    sources.sort_by(|a, b| b.packets.cmp(&a.packets).then(b.bytes.cmp(&a.bytes)));
    sources.truncate(count);
    sources
}

impl Datapath {
    pub fn maps(&self) -> Result<Vec<MapSummary>, Error> {
        let sources = self.sources()?.len();
        Ok(vec![
            MapSummary {
                name: names::SOURCES_MAP,
                kind: "lru_percpu_hash",
                max_entries: self.max_sources,
                entries: sources,
                pinned_at: self.pin_dir.join(names::SOURCES_MAP),
            },
            MapSummary {
                name: names::VERDICTS_MAP,
                kind: "percpu_array",
                max_entries: Verdict::SLOTS,
                entries: Verdict::ALL.len(),
                pinned_at: self.pin_dir.join(names::VERDICTS_MAP),
            },
        ])
    }
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name)
        .ok_or_else(|| Error::Datapath(format!("the eBPF object has no map {name}")))
}

fn key_to_ip(key: &SourceKey) -> IpAddr {
    let v6 = Ipv6Addr::from(key.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds, the clock `bpf_ktime_get_coarse_ns` reads.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1_000_000_000) + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Driver => "native",
        XdpMode::Skb => "generic",
        XdpMode::Hardware => "offload",
        XdpMode::Default => "default",
    }
}

fn read_record(path: &Path) -> Option<Attachment> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_record(path: &Path, record: &Attachment) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(record)
        .map_err(|e| Error::Datapath(format!("cannot encode the attachment record: {e}")))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn attach_guard(
    ebpf: &mut Ebpf,
    setting: XdpModeSetting,
    uplink: &str,
    ifindex: u32,
    pin_dir: &Path,
    record_path: &Path,
) -> Result<Attachment, Error> {
    let program: &mut Xdp = ebpf
        .program_mut(names::XDP_GUARD)
        .ok_or_else(|| {
            Error::Datapath(format!(
                "the eBPF object has no program {}",
                names::XDP_GUARD
            ))
        })?
        .try_into()?;
    program.load()?;

    let link_pin = pin_dir.join(GUARD_LINK_PIN);
    if link_pin.exists() {
        let record = read_record(record_path);
        let reusable = record.as_ref().is_some_and(|r| {
            r.interface == uplink
                && r.ifindex == ifindex
                && match setting {
                    XdpModeSetting::Auto => true,
                    XdpModeSetting::Native => r.mode == "native",
                    XdpModeSetting::Generic => r.mode == "generic",
                }
        });
        let pinned = PinnedLink::from_pin(&link_pin)?;
        match (reusable, record) {
            (true, Some(record)) => {
                // Atomically swap our freshly loaded program into the existing link.
                let link = XdpLink::try_from(FdLink::from(pinned))?;
                program.attach_to_link(link)?;
                info!(interface = uplink, mode = %record.mode, "adopted the pinned XDP guard link");
                return Ok(record);
            }
            _ => {
                // A link for another interface or mode, or one without a record: detach it.
                warn!(path = %link_pin.display(), "replacing a pinned XDP link that does not match the configuration");
                drop(pinned.unpin().map_err(|e| Error::io(&link_pin, e))?);
            }
        }
    }

    let modes: &[XdpMode] = match setting {
        XdpModeSetting::Auto => &[XdpMode::Driver, XdpMode::Skb],
        XdpModeSetting::Native => &[XdpMode::Driver],
        XdpModeSetting::Generic => &[XdpMode::Skb],
    };
    let name = CString::new(uplink).map_err(|_| Error::config("uplink name contains NUL"))?;
    let mut last_error = None;
    let mut attached = None;
    for mode in modes {
        match program.attach(&name, *mode) {
            Ok(id) => {
                attached = Some((id, *mode));
                break;
            }
            Err(e) => {
                info!(interface = uplink, mode = mode_name(*mode), error = %e, "XDP attach mode refused");
                last_error = Some(e);
            }
        }
    }
    let Some((id, mode)) = attached else {
        return Err(match last_error {
            Some(e) => Error::Datapath(format!(
                "cannot attach {} to {uplink}: {e} (is another XDP program attached?)",
                names::XDP_GUARD
            )),
            None => Error::Datapath("no XDP mode to try".into()),
        });
    };
    let link = program.take_link(id)?;
    match FdLink::try_from(link) {
        Ok(fd_link) => {
            let pinned = fd_link.pin(&link_pin)?;
            let link = XdpLink::try_from(FdLink::from(pinned))?;
            program.attach_to_link(link)?;
        }
        Err(e) => {
            // Kernels without XDP links attach through netlink, which cannot be pinned; the
            // program then stays attached after a crash and the next start reports EBUSY.
            return Err(Error::Datapath(format!(
                "XDP link cannot be pinned on this kernel: {e}"
            )));
        }
    }
    let record = Attachment {
        program: names::XDP_GUARD.into(),
        kind: "xdp".into(),
        interface: uplink.into(),
        ifindex,
        mode: mode_name(mode).into(),
        attached_since: crate::protocol::timestamp_now(),
    };
    write_record(record_path, &record)?;
    info!(interface = uplink, mode = %record.mode, "XDP guard attached");
    Ok(record)
}

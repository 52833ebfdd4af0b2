//! The kernel side: loads the eBPF object, attaches the programs, and owns the maps.
//!
//! Maps and links are pinned under `[datapath] bpffs`, so:
//! - a daemon restart reuses the maps (counts and policies survive) and adopts the pinned
//!   links, replacing the programs atomically (`bpf_link_update`), never attaching twice;
//! - a crash (`kill -9`) leaves the programs attached and working until the next start adopts
//!   them;
//! - a clean shutdown unpins the links, which detaches the programs; the maps stay pinned.
//!
//! Other modules use the typed handles: [`PolicyTable`] (allow/deny with expiry),
//! [`DomainFilter`] (the DNS filter's domain set), [`MultihopMark`], and the guard's counters.

pub mod actions;
mod bpffs;
pub mod client_policy;
pub mod counters;
pub mod dns_policy;
pub mod domains;
pub mod encrypted_dns;
pub mod guard;
pub mod kernel_log;
mod links;
pub mod map_memory;
pub mod metrics;
pub mod multihop;
pub mod policy;
mod program_pins;
pub mod sni;
mod uplink;

pub use uplink::default_route_interface;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::Program,
};
use phantom_common::{
    dns::{DnsVerdict, IfaceInfo},
    names,
    xdp::TrafficCounter,
};
use serde::Serialize;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use self::links::{Hook, LinkStore};
pub use self::{
    dns_policy::DnsPolicyMaps,
    domains::{DomainFilter, DomainSetError, DomainSetUndo, KeyClash, NameKey, Owner},
    guard::{GuardMaps, SourceCount, VerdictCount, busiest},
    links::Attachment,
    multihop::{MarkSettings, MultihopMark},
    policy::{List, PolicyMaps, PolicyTable, PolicyView},
};
use crate::{
    config::DatapathConfig,
    error::Error,
    source::SourcePrefix,
    tasks::{self, Shutdown},
};

/// The compiled eBPF object, built by build.rs with the pinned nightly.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/phantom"));

/// Returns the embedded object (for benchmarks and tools that load it themselves).
pub fn ebpf_object() -> &'static [u8] {
    EBPF_OBJECT
}

#[derive(Clone, Debug, Serialize)]
pub struct MapSummary {
    pub name: &'static str,
    pub kind: &'static str,
    pub max_entries: u32,
    /// Live entries (the policy maps count allow and deny entries still in force).
    pub entries: usize,
    pub pinned_at: PathBuf,
    /// Every key the map holds, what counts against `max_entries`.
    pub held: usize,
    /// `held` has reached `max_entries`.
    pub full: bool,
    /// What the map does when full (docs/datapath.md, "When a map is full").
    pub when_full: &'static str,
    /// New entries the full map refused, since start.
    pub refused: u64,
    /// Entries removed to make room, since start (the LRU's own evictions are not counted).
    pub evicted: u64,
}

/// What each map does when it is full.
pub const WHEN_FULL_SOURCES: &str =
    "evicts the least recently seen source (its counts start again if it returns)";
pub const WHEN_FULL_POLICY: &str = "refuses the new entry; an operator's allow or deny first evicts a lapsed entry or the penalty deny that lapses first, never another operator entry";
pub const WHEN_FULL_DOMAINS: &str = "leaves the new blocklist rule out of the kernel (the resolver still blocks it); an operator's rule evicts a blocklist rule, never another operator rule";

pub type DnsCount = counters::VerdictCount;

/// The TC programs that belong on the VPN interface.
const VPN_PROGRAMS: [(&str, Hook); 5] = [
    (names::TC_DNS_FILTER, Hook::TcEgress),
    (names::TC_MULTIHOP_MARK, Hook::TcIngress),
    (names::TC_ENCRYPTED_DNS, Hook::TcIngress),
    (names::TC_CLIENT_POLICY, Hook::TcIngress),
    (names::TC_CLIENT_LIMIT, Hook::TcEgress),
];

pub struct Datapath {
    ebpf: Mutex<Ebpf>,
    links: LinkStore,
    attachments: Mutex<BTreeMap<String, Attachment>>,
    pub guard: GuardMaps,
    pub policy: PolicyTable,
    pub domains: DomainFilter,
    pub dns_policy: DnsPolicyMaps,
    pub multihop: MultihopMark,
    pub encrypted_dns: encrypted_dns::EncryptedDnsFilter,
    pub client_policy: client_policy::ClientPolicyMaps,
    pub sni: sni::SniFilter,
    dns_verdicts: Mutex<PerCpuArray<MapData, TrafficCounter>>,
    /// The programs' log, until `start_tasks` starts forwarding it.
    kernel_log: Mutex<Option<kernel_log::KernelLogger>>,
    /// Records forwarded from the programs' log, by level (for /metrics).
    pub kernel_log_counts: Arc<kernel_log::RecordCounts>,
    ifaces: Mutex<HashMap<MapData, u32, IfaceInfo>>,
    vpn_interface: String,
    dns_filter: bool,
    pin_dir: PathBuf,
    config: DatapathConfig,
    ticks: std::sync::atomic::AtomicU64,
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name)
        .ok_or_else(|| Error::Datapath(format!("the eBPF object has no map {name}")))
}

/// Loads the object, adopting the maps pinned by an earlier start. A pinned map whose shape no
/// longer matches (an upgrade changed its layout, or the configuration its capacity) is
/// replaced, with a warning: its contents are lost, and what the daemon owns is written again
/// at start (operator policies from the state file, domain rules from the blocklist store).
fn load_object(config: &DatapathConfig, pin_dir: &Path) -> Result<Ebpf, Error> {
    let mut replaced = std::collections::BTreeSet::new();
    loop {
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(pin_dir)
            .map_max_entries(names::SOURCES_MAP, config.max_sources)
            .map_max_entries(names::POLICY_MAP, config.max_policies)
            .map_max_entries(names::POLICY_NET_MAP, config.max_policies)
            .map_max_entries(names::DOMAINS_MAP, config.max_domains);
        kernel_log::configure(&mut loader, config.kernel_samples);
        // Pinned like the object's own maps, so a program kept from an earlier start
        // (program_pins) logs into the ring buffer this start reads.
        loader.map_pin_path(kernel_log::RING_MAP, pin_dir.join(kernel_log::RING_MAP));
        let loaded = loader.load(EBPF_OBJECT);
        match loaded {
            Err(aya::EbpfError::MapError(aya::maps::MapError::IncompatiblePinnedMap {
                name,
                property,
                expected,
                actual,
            })) if replaced.insert(name.clone()) => {
                warn!(
                    map = %name, %property, expected, actual,
                    "pinned map has another shape; replacing it (its contents are lost)"
                );
                let pin = pin_dir.join(&name);
                std::fs::remove_file(&pin).map_err(|e| Error::io(&pin, e))?;
            }
            other => return Ok(other?),
        }
    }
}

/// The programs the daemon attaches, each verified by the kernel at load.
const PROGRAMS: [&str; 6] = [
    names::XDP_GUARD,
    names::TC_DNS_FILTER,
    names::TC_MULTIHOP_MARK,
    names::TC_ENCRYPTED_DNS,
    names::TC_CLIENT_POLICY,
    names::TC_CLIENT_LIMIT,
];

/// Loads every program, each on its own thread, or adopts the one an earlier start verified
/// (program_pins). The kernel's verifier is most of a start (`tc_dns_filter` alone takes over
/// a second) and verifies privileged loads concurrently, so a first start waits for the
/// slowest program instead of for the sum of them, and a restart for none: on a restart that
/// is the time the VPN clients go without a tunnel.
fn load_programs(ebpf: &mut Ebpf, pin_dir: &Path, samples: bool) -> Result<(), Error> {
    let started = std::time::Instant::now();
    let pins = program_pins::ProgramPins::new(
        pin_dir,
        EBPF_OBJECT,
        &kernel_log::constants(samples),
        ebpf.maps()
            .map(|(name, _)| name)
            .filter(|name| !name.starts_with('.'))
            .map(|name| (name, pin_dir.join(name))),
    )?;
    let programs: Vec<(&str, &mut Program)> = ebpf
        .programs_mut()
        .filter(|(name, _)| PROGRAMS.contains(name))
        .collect();
    if let Some(missing) = PROGRAMS
        .iter()
        .find(|want| !programs.iter().any(|(name, _)| name == *want))
    {
        return Err(Error::Datapath(format!("no {missing} in the object")));
    }
    let pins = &pins;
    let outcome: Result<Vec<&str>, Error> = std::thread::scope(|scope| {
        let loads: Vec<_> = programs
            .into_iter()
            .map(|(name, program)| {
                let load = std::thread::Builder::new()
                    .name(format!("load {name}"))
                    .spawn_scoped(scope, move || pins.load(name, program));
                (name, load)
            })
            .collect();
        // Every thread is joined before the first error is returned: none outlives the scope.
        let mut first_error = None;
        let mut verified = Vec::new();
        for (name, load) in loads {
            let result = match load {
                Ok(thread) => thread
                    .join()
                    .unwrap_or_else(|_| Err(Error::Datapath(format!("loading {name} panicked")))),
                Err(e) => Err(Error::Datapath(format!(
                    "cannot start a thread to load {name}: {e}"
                ))),
            };
            match result {
                Ok(program_pins::Loaded::Verified) => verified.push(name),
                Ok(program_pins::Loaded::Adopted) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(verified), Err)
    });
    let verified = outcome?;
    info!(
        verified = verified.join(" "),
        adopted = PROGRAMS.len() - verified.len(),
        ms = started.elapsed().as_millis() as u64,
        "programs loaded"
    );
    Ok(())
}

/// Link-layer header length of `interface` in this namespace: 14 for Ethernet (and loopback),
/// 0 for L3 devices such as WireGuard and other tunnels.
fn l2_len(interface: &str) -> Result<u32, Error> {
    const ARPHRD_ETHER: u16 = 1;
    const ARPHRD_LOOPBACK: u16 = 772;
    const ARPHRD_NONE: u16 = 0xFFFE;
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| Error::Datapath(format!("cannot list interfaces: {e}")))?;
    for a in addrs {
        if a.interface_name != interface {
            continue;
        }
        if let Some(link) = a.address.as_ref().and_then(|s| s.as_link_addr()) {
            return match link.hatype() {
                ARPHRD_ETHER | ARPHRD_LOOPBACK => Ok(14),
                ARPHRD_NONE => Ok(0),
                other => Err(Error::Datapath(format!(
                    "{interface}: link type {other} is not supported by the TC programs"
                ))),
            };
        }
    }
    // Interfaces without a link address (some tunnels) carry bare IP.
    Ok(0)
}

impl Datapath {
    /// Loads the object (reusing pinned maps), attaches or adopts the XDP guard, restores the
    /// persisted policies and domain rules, and attaches the VPN-interface programs when that
    /// interface exists. `source_prefix` (`[sources] ipv6_prefix`) is the IPv6 prefix the
    /// guard's prefix entries cover.
    pub fn start(
        config: &DatapathConfig,
        vpn_interface: &str,
        state_dir: &Path,
        source_prefix: SourcePrefix,
    ) -> Result<Self, Error> {
        let pin_dir = config.bpffs.clone();
        bpffs::ensure(&pin_dir)?;
        let uplink = match config.uplink.as_str() {
            "auto" => uplink::default_route_interface()?,
            name => name.to_string(),
        };
        let ifindex = uplink::ifindex(&uplink)?;

        let mut ebpf = load_object(config, &pin_dir)?;
        load_programs(&mut ebpf, &pin_dir, config.kernel_samples)?;
        let kernel_log_counts = Arc::new(kernel_log::RecordCounts::default());
        let kernel_log = kernel_log::open(&mut ebpf, Arc::clone(&kernel_log_counts))?;

        let links = LinkStore::new(&pin_dir, state_dir);
        let guard_attachment = links.attach(
            &mut ebpf,
            names::XDP_GUARD,
            Hook::Xdp(config.xdp_mode),
            &uplink,
            ifindex,
        )?;

        let guard = GuardMaps::new(
            take_map(&mut ebpf, names::SOURCES_MAP)?.try_into()?,
            take_map(&mut ebpf, names::PASS_CACHE_MAP)?.try_into()?,
            take_map(&mut ebpf, names::COUNTERS_MAP)?.try_into()?,
            take_map(&mut ebpf, names::PORTS_MAP)?.try_into()?,
        );
        guard.set_protected_ports(&config.protected_ports)?;
        let policy = PolicyTable::open(
            PolicyMaps::new(
                take_map(&mut ebpf, names::POLICY_MAP)?.try_into()?,
                take_map(&mut ebpf, names::POLICY_NET_MAP)?.try_into()?,
                take_map(&mut ebpf, names::DENY_CACHE_MAP)?.try_into()?,
                take_map(&mut ebpf, names::POLICY_GEN_MAP)?.try_into()?,
                take_map(&mut ebpf, names::GUARD_CONFIG_MAP)?.try_into()?,
                source_prefix,
            ),
            state_dir,
        )?;
        let domains = DomainFilter::open(
            take_map(&mut ebpf, names::DOMAINS_MAP)?.try_into()?,
            take_map(&mut ebpf, names::DNS_KEY_MAP)?.try_into()?,
            state_dir,
        )?;
        let multihop = MultihopMark::new(
            take_map(&mut ebpf, names::MULTIHOP_MAP)?.try_into()?,
            take_map(&mut ebpf, "PH_MH_LOCAL")?.try_into()?,
            take_map(&mut ebpf, names::MULTIHOP_STATS_MAP)?.try_into()?,
        );
        let encrypted_dns = encrypted_dns::EncryptedDnsFilter::new(
            take_map(&mut ebpf, names::ENC_DNS_MAP)?.try_into()?,
            take_map(&mut ebpf, names::ENC_DNS_RESOLVERS_MAP)?.try_into()?,
            take_map(&mut ebpf, names::DOH_V4_MAP)?.try_into()?,
            take_map(&mut ebpf, names::DOH_V6_MAP)?.try_into()?,
            take_map(&mut ebpf, names::ENC_DNS_STATS_MAP)?.try_into()?,
        );
        let client_policy = client_policy::ClientPolicyMaps::new(
            take_map(&mut ebpf, names::CLIENT_ACL_MAP)?.try_into()?,
            take_map(&mut ebpf, names::CLIENT_POLICY_CONFIG_MAP)?.try_into()?,
            take_map(&mut ebpf, names::CLIENT_POLICY_STATS_MAP)?.try_into()?,
            take_map(&mut ebpf, names::CLIENT_LIMIT_MAP)?.try_into()?,
            take_map(&mut ebpf, names::CLIENT_FLAGS_MAP)?.try_into()?,
            take_map(&mut ebpf, names::CLIENT_DROPS_MAP)?.try_into()?,
        );
        let sni = sni::SniFilter::new(
            take_map(&mut ebpf, names::SNI_MAP)?.try_into()?,
            take_map(&mut ebpf, names::ECH_FRONTS_MAP)?.try_into()?,
            take_map(&mut ebpf, names::SNI_STATS_MAP)?.try_into()?,
        );
        let dns_policy = DnsPolicyMaps::new(
            take_map(&mut ebpf, names::DNS_POLICY_MAP)?.try_into()?,
            take_map(&mut ebpf, names::DNS_EXEMPT_MAP)?.try_into()?,
        );
        let dns_verdicts = take_map(&mut ebpf, names::DNS_VERDICTS_MAP)?.try_into()?;
        let ifaces = take_map(&mut ebpf, names::IFACES_MAP)?.try_into()?;

        let mut attachments = BTreeMap::new();
        attachments.insert(guard_attachment.program.clone(), guard_attachment);
        let datapath = Self {
            ebpf: Mutex::new(ebpf),
            links,
            attachments: Mutex::new(attachments),
            guard,
            policy,
            domains,
            dns_policy,
            multihop,
            encrypted_dns,
            client_policy,
            sni,
            dns_verdicts: Mutex::new(dns_verdicts),
            kernel_log: Mutex::new(Some(kernel_log)),
            kernel_log_counts,
            ifaces: Mutex::new(ifaces),
            vpn_interface: vpn_interface.to_string(),
            dns_filter: config.dns_filter,
            pin_dir,
            config: config.clone(),
            ticks: std::sync::atomic::AtomicU64::new(0),
        };
        // The VPN interface may not exist yet, or refuse the programs; the guard runs either
        // way and housekeeping keeps trying.
        if let Err(e) = datapath.reconcile_vpn() {
            warn!(error = %e, interface = %datapath.vpn_interface, "VPN-interface programs not attached yet");
        }
        Ok(datapath)
    }

    fn lock<'a, T>(&self, m: &'a Mutex<T>) -> Result<std::sync::MutexGuard<'a, T>, Error> {
        m.lock()
            .map_err(|_| Error::Datapath("datapath lock poisoned".into()))
    }

    /// The VPN interface the TC programs belong on.
    pub fn vpn_interface(&self) -> &str {
        &self.vpn_interface
    }

    /// The VPN interface's link-layer header length (0 for WireGuard), when it exists.
    pub fn vpn_l2_len(&self) -> Result<u32, Error> {
        l2_len(&self.vpn_interface)
    }

    /// Attaches the TC programs to the VPN interface when it exists (again, after it was
    /// recreated), and forgets attachments whose interface is gone. Idempotent; run at start
    /// and periodically.
    pub fn reconcile_vpn(&self) -> Result<(), Error> {
        let ifindex = nix::net::if_::if_nametoindex(self.vpn_interface.as_str()).ok();
        let mut attachments = self.lock(&self.attachments)?;
        for (program, hook) in VPN_PROGRAMS {
            if program == names::TC_DNS_FILTER && !self.dns_filter {
                continue;
            }
            let current = attachments.get(program).map(|a| a.ifindex);
            match (ifindex, current) {
                (Some(now), Some(was)) if now == was => {}
                (None, None) => {}
                (None, Some(_)) => {
                    info!(program, interface = %self.vpn_interface, "VPN interface gone; link released");
                    self.links.release(program);
                    attachments.remove(program);
                }
                (Some(now), _) => {
                    let l2 = l2_len(&self.vpn_interface)?;
                    self.lock(&self.ifaces)?
                        .insert(&now, &IfaceInfo { l2_len: l2 }, 0)?;
                    let mut ebpf = self.lock(&self.ebpf)?;
                    let a =
                        self.links
                            .attach(&mut ebpf, program, hook, &self.vpn_interface, now)?;
                    attachments.insert(program.to_string(), a);
                }
            }
        }
        Ok(())
    }

    pub fn attachments(&self) -> Vec<Attachment> {
        self.lock(&self.attachments)
            .map(|a| a.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Clean shutdown: unpin the links so that dropping our handles detaches the programs.
    /// Maps stay pinned so counts and policies survive into the next start.
    pub fn shutdown(self) {
        for program in self.attachments().iter().map(|a| a.program.clone()) {
            self.links.release(&program);
        }
        info!("eBPF programs detached");
        drop(self.ebpf);
    }

    pub fn dns_verdicts(&self) -> Result<Vec<DnsCount>, Error> {
        counters::verdict_counts(
            &*self.lock(&self.dns_verdicts)?,
            DnsVerdict::ALL.iter().map(|v| (*v as u32, v.name())),
        )
    }

    /// Each map's capacity, as configured (the maps are created with it).
    pub fn map_capacities(&self) -> [(&'static str, u32); 4] {
        [
            (names::SOURCES_MAP, self.config.max_sources),
            (names::POLICY_MAP, self.config.max_policies),
            (names::POLICY_NET_MAP, self.config.max_policies),
            (names::DOMAINS_MAP, self.config.max_domains),
        ]
    }

    pub fn maps(&self) -> Result<Vec<MapSummary>, Error> {
        let [addrs, nets] = self.policy.counts_by_map()?;
        let [addr_fill, net_fill] = self.policy.fill()?;
        let domains = self.domains.fill()?;
        let sources = self.guard.sources()?.len();
        let summary =
            |name, kind, max_entries: u32, entries, when_full, fill: policy::MapFill| MapSummary {
                name,
                kind,
                max_entries,
                entries,
                pinned_at: self.pin_dir.join(name),
                held: fill.held,
                full: fill.held >= max_entries as usize,
                when_full,
                refused: fill.refused,
                evicted: fill.evicted,
            };
        Ok(vec![
            summary(
                names::SOURCES_MAP,
                "lru_percpu_hash",
                self.config.max_sources,
                sources,
                WHEN_FULL_SOURCES,
                policy::MapFill {
                    held: sources,
                    ..Default::default()
                },
            ),
            summary(
                names::POLICY_MAP,
                "hash",
                self.config.max_policies,
                addrs.0 + addrs.1,
                WHEN_FULL_POLICY,
                addr_fill,
            ),
            summary(
                names::POLICY_NET_MAP,
                "hash",
                self.config.max_policies,
                nets.0 + nets.1,
                WHEN_FULL_POLICY,
                net_fill,
            ),
            summary(
                names::DOMAINS_MAP,
                "hash",
                self.config.max_domains,
                domains.held,
                WHEN_FULL_DOMAINS,
                policy::MapFill {
                    held: domains.held,
                    refused: domains.refused,
                    evicted: domains.evicted,
                },
            ),
        ])
    }

    /// Starts the datapath's background work: housekeeping every 2 s (see [`Self::tick`]),
    /// and the programs' log forwarded into the daemon's (see [`kernel_log`]).
    pub fn start_tasks(self: &Arc<Self>, shutdown: &Shutdown) -> Vec<JoinHandle<()>> {
        let dp = Arc::clone(self);
        let mut tasks = vec![tasks::every(
            "datapath housekeeping",
            Duration::from_secs(2),
            shutdown.clone(),
            move || dp.tick(),
        )];
        match self.lock(&self.kernel_log).map(|mut l| l.take()) {
            Ok(Some(logger)) => tasks.push(kernel_log::spawn(logger, shutdown.clone())),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "kernel events are not logged"),
        }
        tasks
    }

    /// Housekeeping, run every couple of seconds: VPN programs in place; every 15th call,
    /// lapsed policies out of the map (the kernel ignores them already, so this is tidying).
    pub fn tick(&self) {
        let n = self
            .ticks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n.is_multiple_of(15)
            && let Err(e) = self.policy.sweep()
        {
            warn!(error = %e, "policy sweep failed");
        }
        if let Err(e) = self.reconcile_vpn() {
            warn!(error = %e, "cannot attach the VPN-interface programs");
        }
    }
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("attachments", &self.attachments())
            .finish()
    }
}

//! Per-client traffic policy: each client's ordered allow/deny rules (destination network,
//! protocol, port range) and a switch that isolates clients from each other, enforced in the
//! kernel on WireGuard ingress by `tc_client_policy`. The rules belong to the client's name
//! and follow it to its address (a subnet change moves them); a removed client's rules go with
//! it. `core test_policy` answers with the kernel's own decision function
//! (`phantom_common::policy::decide`). See docs/policy.md.

pub mod actions;
pub mod limits;
pub mod metrics;

use std::{
    collections::BTreeMap,
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use phantom_common::policy::{
    ACTION_ALLOW, ACTION_DENY, AclRule, ClientAcl, MAX_ACL_RULES, PROTO_ANY, PROTO_ICMP, PROTO_TCP,
    PROTO_UDP, PolicyConfig, PolicyVerdict, decide,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use self::limits::{Effective, LimitSettings, QuotaUsage};
use crate::{
    config::LimitsConfig, core::ClientChanges, datapath::Datapath, error::Error, store,
    tasks::Shutdown,
};

/// Why a policy change was refused (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("rule {index}: {reason}")]
    Rule { index: usize, reason: String },
    #[error("at most {MAX_ACL_RULES} rules per client")]
    TooManyRules,
    #[error("no client named {0:?}")]
    NoClient(String),
    #[error("{0}")]
    Limit(String),
    #[error(transparent)]
    Store(#[from] Error),
}

/// `allow` or `deny`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// `any`, `tcp`, `udp` or `icmp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    fn number(self) -> u8 {
        match self {
            Protocol::Any => PROTO_ANY,
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
            Protocol::Icmp => PROTO_ICMP,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "any" | "all" | "ip" => Some(Protocol::Any),
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "icmp" => Some(Protocol::Icmp),
            _ => None,
        }
    }
}

/// One rule, written `<allow|deny> <any|tcp|udp|icmp> <address or CIDR> [port or lo-hi]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub protocol: Protocol,
    pub destination: Ipv4Net,
    /// `None`: every port (and portless ICMP).
    pub ports: Option<(u16, u16)>,
}

impl Rule {
    pub fn parse(text: &str) -> Result<Self, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        if !(3..=4).contains(&words.len()) {
            return Err(format!(
                "{text:?} is not \"<allow|deny> <any|tcp|udp|icmp> <address or CIDR> [port or lo-hi]\""
            ));
        }
        let action = match words[0].to_ascii_lowercase().as_str() {
            "allow" | "accept" => Action::Allow,
            "deny" | "drop" => Action::Deny,
            other => return Err(format!("{other:?} is not allow or deny")),
        };
        let protocol = Protocol::parse(words[1])
            .ok_or_else(|| format!("{:?} is not any, tcp, udp or icmp", words[1]))?;
        let destination = words[2]
            .parse::<Ipv4Net>()
            .or_else(|_| words[2].parse::<Ipv4Addr>().map(Ipv4Net::from))
            .map_err(|_| format!("{:?} is not an IPv4 address or CIDR", words[2]))?
            .trunc();
        let ports = match words.get(3) {
            None => None,
            Some(p) => {
                if matches!(protocol, Protocol::Icmp) {
                    return Err("icmp has no ports".into());
                }
                let (lo, hi) = p.split_once('-').unwrap_or((p, p));
                let port = |s: &str| {
                    s.parse::<u16>()
                        .map_err(|_| format!("{p:?} is not a port or a range lo-hi"))
                };
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    return Err(format!("{p:?}: the range is reversed"));
                }
                Some((lo, hi))
            }
        };
        Ok(Self {
            action,
            protocol,
            destination,
            ports,
        })
    }

    fn kernel(&self) -> AclRule {
        let (port_lo, port_hi) = self.ports.unwrap_or((0, u16::MAX));
        AclRule {
            net: self.destination.network().octets(),
            mask: self.destination.netmask().octets(),
            port_lo,
            port_hi,
            proto: self.protocol.number(),
            action: match self.action {
                Action::Allow => ACTION_ALLOW,
                Action::Deny => ACTION_DENY,
            },
            _pad: [0; 2],
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
        };
        let protocol = match self.protocol {
            Protocol::Any => "any",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        };
        write!(f, "{action} {protocol} {}", self.destination)?;
        match self.ports {
            Some((lo, hi)) if lo == hi => write!(f, " {lo}"),
            Some((lo, hi)) => write!(f, " {lo}-{hi}"),
            None => Ok(()),
        }
    }
}

impl Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Rule::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Parses an ordered rule list; errors name the rule.
pub fn parse_rules(texts: &[String]) -> Result<Vec<Rule>, PolicyError> {
    if texts.len() > MAX_ACL_RULES {
        return Err(PolicyError::TooManyRules);
    }
    texts
        .iter()
        .enumerate()
        .map(|(index, t)| Rule::parse(t).map_err(|reason| PolicyError::Rule { index, reason }))
        .collect()
}

fn kernel_acl(rules: &[Rule]) -> ClientAcl {
    let mut acl = ClientAcl::default();
    for (slot, rule) in acl.rules.iter_mut().zip(rules) {
        *slot = rule.kernel();
    }
    acl.count = rules.len().min(MAX_ACL_RULES) as u32;
    acl
}

/// What is kept in `state_dir/client-policy.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyState {
    /// Client-to-client traffic dropped.
    pub isolate: bool,
    /// Client name -> its rules, in order.
    pub rules: BTreeMap<String, Vec<Rule>>,
    /// Client name -> its own rate limits and quota (over the `[limits]` defaults).
    pub limits: BTreeMap<String, LimitSettings>,
    /// Client name -> its quota period and usage.
    pub quota: BTreeMap<String, QuotaUsage>,
}

/// What `test_policy` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tested {
    pub verdict: PolicyVerdict,
    /// The deciding rule: its position and text.
    pub rule: Option<(usize, String)>,
}

pub struct ClientPolicy {
    path: PathBuf,
    state: Mutex<PolicyState>,
    clients: ClientChanges,
    datapath: Option<Arc<Datapath>>,
    /// `[limits]`: every client's limits unless it has its own (SIGHUP replaces them).
    defaults: Mutex<Effective>,
    /// Clients that used up their quota since the daemon started.
    pub quota_reached_total: AtomicU64,
    last_save: Mutex<Instant>,
    /// Which client the kernel's drop counts of each address belong to: a client taking an
    /// address (new, moved, or first seen since the start) has that slot zeroed.
    drop_slots: Mutex<BTreeMap<Ipv4Addr, String>>,
}

/// A client's packets dropped by its rules and by isolation, as the kernel counted them since
/// the client took its address or the daemon started.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct PolicyDrops {
    pub denied: u64,
    pub isolated: u64,
}

impl From<phantom_common::policy::ClientDrops> for PolicyDrops {
    fn from(d: phantom_common::policy::ClientDrops) -> Self {
        Self {
            denied: d.denied,
            isolated: d.isolated,
        }
    }
}

/// A client's limits and quota as `get_client_policy` shows them.
#[derive(Clone, Debug, Serialize)]
pub struct LimitView {
    /// The settings in force.
    pub effective: Effective,
    /// The client's own settings (the rest are the server's).
    pub own: LimitSettings,
    /// From the kernel: `None` without a kernel entry.
    pub usage: Option<Usage>,
}

/// What the kernel counted for one limited client.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Usage {
    pub download_bytes: u64,
    pub upload_bytes: u64,
    pub download_rate_dropped: u64,
    pub upload_rate_dropped: u64,
    pub quota_dropped: u64,
    pub download_throttled_seconds: f64,
    pub upload_throttled_seconds: f64,
    pub quota_used_bytes: u64,
    pub quota_reached: bool,
    /// Unix seconds.
    pub quota_period_start: Option<i64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl ClientPolicy {
    /// Reads the kept policy (a damaged file is set aside) and writes it into the kernel.
    pub fn open(
        state_dir: &Path,
        limits: &LimitsConfig,
        clients: ClientChanges,
        datapath: Option<Arc<Datapath>>,
    ) -> Result<Arc<Self>, Error> {
        let path = state_dir.join("client-policy.json");
        let state: PolicyState = store::read_json_or_set_aside(&path, "client policy")?;
        let policy = Arc::new(Self {
            path,
            state: Mutex::new(state),
            clients,
            datapath,
            defaults: Mutex::new(Effective::from_config(limits)),
            quota_reached_total: AtomicU64::new(0),
            last_save: Mutex::new(Instant::now()),
            drop_slots: Mutex::new(BTreeMap::new()),
        });
        policy.push();
        // Usage kept on disk counts again when the kernel lost it (a reboot emptied bpffs).
        policy.quota_tick(unix_now());
        Ok(policy)
    }

    /// The server's defaults (`[limits]`).
    pub fn defaults(&self) -> Effective {
        lock(&self.defaults).clone()
    }

    /// New server defaults (a SIGHUP with another `[limits]`, validated): every client without
    /// its own settings follows at once.
    pub fn set_defaults(&self, limits: &LimitsConfig) {
        let next = Effective::from_config(limits);
        if *lock(&self.defaults) == next {
            return;
        }
        *lock(&self.defaults) = next;
        info!("client limit defaults ([limits]) changed: applied to every client without its own");
        self.push();
        self.quota_tick(unix_now());
    }

    /// Replaces the settings `own` gives for `name` (the others stay); `reset` first drops
    /// every own setting (back to the server's). In force at once, without reconnecting.
    pub fn set_limits(
        &self,
        name: &str,
        own: &LimitSettings,
        reset: bool,
    ) -> Result<LimitView, PolicyError> {
        own.check().map_err(PolicyError::Limit)?;
        if !self.clients.borrow().clients.contains_key(name) {
            return Err(PolicyError::NoClient(name.to_string()));
        }
        self.change(|s| {
            let base = if reset {
                LimitSettings::default()
            } else {
                s.limits.get(name).cloned().unwrap_or_default()
            };
            let next = base.updated(own);
            if next.is_empty() {
                s.limits.remove(name);
            } else {
                s.limits.insert(name.to_string(), next);
            }
        })?;
        self.quota_tick(unix_now());
        self.limit_view(name)
    }

    /// `name`'s limits, quota and what the kernel counted.
    pub fn limit_view(&self, name: &str) -> Result<LimitView, PolicyError> {
        let table = self.clients.borrow().clone();
        let client = table
            .clients
            .get(name)
            .ok_or_else(|| PolicyError::NoClient(name.to_string()))?;
        let state = self.state();
        let own = state.limits.get(name).cloned().unwrap_or_default();
        let effective = own.over(&self.defaults());
        let kernel = self
            .kernel_limits()
            .into_iter()
            .find(|(ip, _)| *ip == client.ip);
        let usage = kernel.map(|(_, k)| Usage {
            download_bytes: k.down.bytes,
            upload_bytes: k.up.bytes,
            download_rate_dropped: k.down.rate_dropped,
            upload_rate_dropped: k.up.rate_dropped,
            quota_dropped: k.quota_dropped,
            download_throttled_seconds: k.down.throttled_ns as f64 / 1e9,
            upload_throttled_seconds: k.up.throttled_ns as f64 / 1e9,
            quota_used_bytes: k.quota_used(),
            quota_reached: k.over_quota(),
            quota_period_start: state.quota.get(name).map(|q| q.period_start),
        });
        Ok(LimitView {
            effective,
            own,
            usage,
        })
    }

    /// Every kernel limit entry (empty without a datapath).
    pub fn kernel_limits(&self) -> Vec<(Ipv4Addr, phantom_common::policy::ClientLimit)> {
        self.datapath
            .as_ref()
            .and_then(|dp| dp.client_policy.limits().ok())
            .unwrap_or_default()
    }

    /// Quota bookkeeping, every few seconds: a new period starts the count again; a quota
    /// used up is logged once (and counted); the usage is kept on disk at most once a minute
    /// (at once when a period starts or a cap is reached). Usage on disk above what the kernel
    /// holds (the kernel's entry is new) counts again.
    fn quota_tick(&self, now: i64) {
        let Some(dp) = &self.datapath else {
            return;
        };
        let table = self.clients.borrow().clone();
        let kernel: BTreeMap<Ipv4Addr, phantom_common::policy::ClientLimit> =
            self.kernel_limits().into_iter().collect();
        let defaults = self.defaults();
        let mut guard = lock(&self.state);
        let mut next = guard.clone();
        let mut urgent = false;
        next.quota.retain(|name, _| {
            table.clients.contains_key(name) && next_has_quota(&guard, name, &defaults)
        });
        if next.quota.len() != guard.quota.len() {
            urgent = true;
        }
        for (name, client) in &table.clients {
            let eff = guard
                .limits
                .get(name)
                .cloned()
                .unwrap_or_default()
                .over(&defaults);
            if eff.quota_mb == 0 {
                continue;
            }
            let Some(k) = kernel.get(&client.ip) else {
                continue;
            };
            let start = eff.quota_period.start(now);
            let usage = next.quota.entry(name.clone()).or_default();
            if usage.period_start != start {
                if usage.period_start != 0 {
                    info!(client = %name, period = eff.quota_period.name(), "quota period started: the count starts again");
                }
                if let Err(e) = dp.client_policy.start_quota_period(client.ip, 0) {
                    warn!(error = %e, client = %name, "cannot start the quota period in the kernel");
                    continue;
                }
                *usage = QuotaUsage {
                    period_start: start,
                    used_bytes: 0,
                    reached: false,
                };
                urgent = true;
                continue;
            }
            let mut used = k.quota_used();
            if used < usage.used_bytes {
                // The kernel's entry is younger than the period (a reboot, a new map).
                if let Err(e) = dp
                    .client_policy
                    .start_quota_period(client.ip, usage.used_bytes)
                {
                    warn!(error = %e, client = %name, "cannot restore the quota usage in the kernel");
                }
                used = usage.used_bytes;
            }
            usage.used_bytes = used;
            let reached = used >= eff.quota_bytes();
            if reached && !usage.reached {
                warn!(
                    client = %name,
                    used_bytes = used,
                    quota_bytes = eff.quota_bytes(),
                    action = eff.quota_action.name(),
                    floor_kbps = eff.quota_floor_kbps,
                    "client reached its quota"
                );
                self.quota_reached_total.fetch_add(1, Ordering::Relaxed);
                urgent = true;
            }
            usage.reached = reached;
        }
        if next == *guard {
            return;
        }
        let mut last = lock(&self.last_save);
        if urgent || last.elapsed() >= Duration::from_secs(60) {
            if let Err(e) = store::write_json(&self.path, &next) {
                warn!(error = %e, "cannot keep the quota usage");
                return;
            }
            *last = Instant::now();
        }
        *guard = next;
    }

    pub fn state(&self) -> PolicyState {
        lock(&self.state).clone()
    }

    /// Applies `f` to a copy, keeps it on disk, then puts it in force.
    fn change(&self, f: impl FnOnce(&mut PolicyState)) -> Result<PolicyState, PolicyError> {
        let mut guard = lock(&self.state);
        let mut next = guard.clone();
        f(&mut next);
        // Durable before it is in force.
        store::write_json(&self.path, &next)?;
        *guard = next.clone();
        drop(guard);
        self.push();
        Ok(next)
    }

    /// Replaces `name`'s rules (an empty list removes them).
    pub fn set_rules(&self, name: &str, rules: Vec<Rule>) -> Result<PolicyState, PolicyError> {
        if rules.len() > MAX_ACL_RULES {
            return Err(PolicyError::TooManyRules);
        }
        if !self.clients.borrow().clients.contains_key(name) {
            return Err(PolicyError::NoClient(name.to_string()));
        }
        self.change(|s| {
            if rules.is_empty() {
                s.rules.remove(name);
            } else {
                s.rules.insert(name.to_string(), rules);
            }
        })
    }

    pub fn set_isolation(&self, on: bool) -> Result<PolicyState, PolicyError> {
        self.change(|s| s.isolate = on)
    }

    /// What the kernel would do with a packet from `name` to `dst` (protocol, port), and by
    /// which rule: the kernel's own function on the same inputs.
    pub fn test(
        &self,
        name: &str,
        dst: Ipv4Addr,
        protocol: Protocol,
        port: u16,
    ) -> Result<Tested, PolicyError> {
        if !self.clients.borrow().clients.contains_key(name) {
            return Err(PolicyError::NoClient(name.to_string()));
        }
        let state = self.state();
        let rules = state.rules.get(name).cloned().unwrap_or_default();
        let acl = (!rules.is_empty()).then(|| kernel_acl(&rules));
        let (verdict, index) = decide(
            &self.kernel_config(state.isolate),
            acl.as_ref(),
            dst.octets(),
            protocol.number(),
            port,
        );
        let rule = rules
            .get(index as usize)
            .map(|r| (index as usize, r.to_string()));
        Ok(Tested { verdict, rule })
    }

    fn kernel_config(&self, isolate: bool) -> PolicyConfig {
        let mut cfg = PolicyConfig {
            isolate: u32::from(isolate),
            l2_len: self
                .datapath
                .as_ref()
                .map_or(0, |dp| dp.vpn_l2_len().unwrap_or(0)),
            ..PolicyConfig::default()
        };
        if let Some(subnet) = self.clients.borrow().subnet {
            let net = Ipv4Net::new(subnet.network, subnet.prefix).map(|n| n.trunc());
            if let Ok(net) = net {
                cfg.v4_net = net.network().octets();
                cfg.v4_mask = net.netmask().octets();
                cfg.server = subnet.server_ip().octets();
            }
        }
        cfg
    }

    /// Writes the rules and limits of every present client, at its current address, and the
    /// switches.
    pub fn push(&self) {
        let Some(dp) = &self.datapath else {
            return;
        };
        let state = self.state();
        let defaults = self.defaults();
        let table = self.clients.borrow().clone();
        let limits: BTreeMap<Ipv4Addr, phantom_common::policy::ClientLimit> = table
            .clients
            .iter()
            .filter_map(|(name, client)| {
                let eff = state
                    .limits
                    .get(name)
                    .cloned()
                    .unwrap_or_default()
                    .over(&defaults);
                eff.any().then(|| (client.ip, eff.kernel()))
            })
            .collect();
        let any_limits = !limits.is_empty();
        if let Err(e) = dp.client_policy.set_limits(&limits) {
            warn!(error = %e, "cannot write the client limits into the kernel");
        }
        let acls: BTreeMap<Ipv4Addr, ClientAcl> = state
            .rules
            .iter()
            .filter_map(|(name, rules)| {
                let client = table.clients.get(name)?;
                Some((client.ip, kernel_acl(rules)))
            })
            .collect();
        // Rules first: isolation switched on never runs ahead of a client's allow rules.
        if let Err(e) = dp.client_policy.set_acls(&acls) {
            warn!(error = %e, "cannot write the client rules into the kernel");
        }
        let cfg = PolicyConfig {
            limits: u32::from(any_limits),
            ..self.kernel_config(state.isolate)
        };
        if let Err(e) = dp.client_policy.set_config(&cfg) {
            warn!(error = %e, "cannot write the client isolation switch into the kernel");
        }
        let mut slots = lock(&self.drop_slots);
        slots.retain(|ip, name| table.clients.get(name).is_some_and(|c| c.ip == *ip));
        for (name, client) in &table.clients {
            if slots.get(&client.ip) != Some(name) {
                match dp.client_policy.zero_drops(client.ip) {
                    Ok(()) => {
                        slots.insert(client.ip, name.clone());
                    }
                    Err(e) => {
                        warn!(error = %e, client = %name, "cannot zero a client's drop counts")
                    }
                }
            }
        }
    }

    /// Every present client's drops by its rules and by isolation (empty without a datapath).
    pub fn client_drops(&self) -> Vec<(String, PolicyDrops)> {
        let Some(dp) = &self.datapath else {
            return Vec::new();
        };
        let table = self.clients.borrow().clone();
        table
            .clients
            .iter()
            .filter_map(|(name, c)| {
                let d = dp.client_policy.drops(c.ip).ok()?;
                Some((name.clone(), d.into()))
            })
            .collect()
    }

    /// `name`'s drops by its rules and by isolation (`None` without a datapath).
    pub fn drops_of(&self, name: &str) -> Result<Option<PolicyDrops>, PolicyError> {
        let table = self.clients.borrow().clone();
        let client = table
            .clients
            .get(name)
            .ok_or_else(|| PolicyError::NoClient(name.to_string()))?;
        Ok(self
            .datapath
            .as_ref()
            .and_then(|dp| dp.client_policy.drops(client.ip).ok())
            .map(PolicyDrops::from))
    }

    /// Follows the client table: rules move with their client's address, and a removed
    /// client's rules go.
    pub fn start_tasks(self: &Arc<Self>, shutdown: &Shutdown) -> Vec<JoinHandle<()>> {
        let policy = Arc::clone(self);
        let mut clients = self.clients.clone();
        let mut stop = shutdown.clone();
        let quota = Arc::clone(self);
        let quota_task = crate::tasks::every(
            "client quota periods",
            Duration::from_secs(5),
            shutdown.clone(),
            move || quota.quota_tick(unix_now()),
        );
        vec![
            quota_task,
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        changed = clients.changed() => if changed.is_err() { return },
                    }
                    let p = Arc::clone(&policy);
                    let _ = tokio::task::spawn_blocking(move || p.follow_clients()).await;
                }
            }),
        ]
    }

    fn follow_clients(&self) {
        let table = self.clients.borrow().clone();
        let gone: Vec<String> = self
            .state()
            .rules
            .keys()
            .filter(|n| !table.clients.contains_key(*n))
            .cloned()
            .collect();
        let gone_limits: Vec<String> = self
            .state()
            .limits
            .keys()
            .filter(|n| !table.clients.contains_key(*n))
            .cloned()
            .collect();
        // Without a server (no table at all) nothing is pruned.
        if table.subnet.is_some() && !(gone.is_empty() && gone_limits.is_empty()) {
            if let Err(e) = self.change(|s| {
                for n in gone.iter().chain(&gone_limits) {
                    s.rules.remove(n);
                    s.limits.remove(n);
                    s.quota.remove(n);
                }
            }) {
                warn!(error = %e, "cannot drop the rules of removed clients");
            }
        } else {
            self.push();
        }
    }

    /// Packets per verdict since the program was loaded (`None` without a datapath).
    pub fn counts(&self) -> Option<Vec<(&'static str, u64)>> {
        let dp = self.datapath.as_ref()?;
        dp.client_policy
            .counts()
            .ok()
            .map(|c| c.into_iter().map(|c| (c.verdict, c.packets)).collect())
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Whether `name` has a quota under `state`'s settings and `defaults`.
fn next_has_quota(state: &PolicyState, name: &str, defaults: &Effective) -> bool {
    state
        .limits
        .get(name)
        .cloned()
        .unwrap_or_default()
        .over(defaults)
        .quota_mb
        != 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rules_parse_print_and_refuse_clearly() {
        for text in [
            "deny tcp 203.0.113.0/24 22",
            "allow udp 198.51.100.7/32 1000-2000",
            "deny icmp 0.0.0.0/0",
            "allow any 10.0.0.0/8",
        ] {
            assert_eq!(Rule::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(
            Rule::parse("DROP TCP 203.0.113.9 443").unwrap().to_string(),
            "deny tcp 203.0.113.9/32 443"
        );
        for (bad, says) in [
            ("deny tcp", "is not"),
            ("maybe tcp 1.2.3.4", "allow or deny"),
            ("deny sctp 1.2.3.4", "any, tcp, udp or icmp"),
            ("deny tcp 1.2.3.400", "IPv4 address"),
            ("deny tcp 2001:db8::/32", "IPv4 address"),
            ("deny icmp 1.2.3.4 7", "no ports"),
            ("deny tcp 1.2.3.4 90-80", "reversed"),
            ("deny tcp 1.2.3.4 70000", "not a port"),
        ] {
            let e = Rule::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let many: Vec<String> = (0..=MAX_ACL_RULES)
            .map(|_| "allow any 0.0.0.0/0".to_string())
            .collect();
        assert!(matches!(parse_rules(&many), Err(PolicyError::TooManyRules)));
        let e = parse_rules(&["allow any 0.0.0.0/0".into(), "nope".into()]).unwrap_err();
        assert!(e.to_string().starts_with("rule 1:"), "{e}");
    }
}

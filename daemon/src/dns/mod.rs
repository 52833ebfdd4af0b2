//! DNS for VPN clients: Phantom's resolver (SPEC 6, layer 1) on UDP and TCP 53 of the WireGuard
//! server address, forwarding to the upstream servers (`upstreams.rs`) with a TTL-honouring cache,
//! answering blocked names itself with the blocklist's full engine (exact, subdomain,
//! contains, regex, lookalikes).
//!
//! Policy: a dry-run mode that counts what would be blocked and blocks nothing, and per-client
//! blocking on/off by client name. Both are mirrored into the kernel filter's maps, so a client
//! that asks another resolver sees the same policy; the resolver's own answers carry an skb
//! mark the kernel filter leaves alone.
//!
//! Privacy (seed 001): nothing here logs or stores a client address or a queried name; the
//! counters are totals.

pub mod actions;
pub mod bypass;
pub mod cache;
pub mod encrypted;
pub mod metrics;
pub mod server;
pub mod sni;
pub mod upstreams;
pub mod wire;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UdpSocket,
};
use tracing::warn;

use self::{
    bypass::{Bypass, BypassStats, Special},
    cache::Cache,
    upstreams::Upstreams,
    wire::{QueryError, Question},
};
use crate::{
    blocklist::Blocklist,
    config::{BlockResponse, DnsConfig},
    core::ClientChanges,
    datapath::Datapath,
    error::Error,
    multihop::EgressMark,
    store,
    tasks::Shutdown,
};

/// TTL of sinkhole answers.
const SINKHOLE_TTL: u32 = 60;
/// The largest UDP answer read from an upstream (the buffer of one forwarded query); a larger
/// one is asked for again over TCP.
const MAX_UPSTREAM_UDP: usize = 4096;

/// What can go wrong with the upstream servers and the resolver's state.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// `dns.json` (the upstream servers) does not parse.
    #[error("{path}: {source}")]
    UpstreamsFile {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Daemon(#[from] Error),
}

/// Totals since start.
#[derive(Default)]
pub struct Stats {
    pub queries_udp: AtomicU64,
    pub queries_tcp: AtomicU64,
    pub blocked: AtomicU64,
    /// Blocked names answered normally because of dry run.
    pub dry_run_matches: AtomicU64,
    /// Blocked names answered normally because the client has blocking off.
    pub exempt_matches: AtomicU64,
    pub forwarded: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub malformed: AtomicU64,
    pub truncated: AtomicU64,
    /// Queries waiting on an upstream right now (a gauge: each is at most the upstream
    /// timeout per upstream old, so a dead or slow upstream never builds up work).
    pub forwards_in_flight: AtomicU64,
}

/// Counts one forwarded query in `forwards_in_flight` for as long as it lives (also when the
/// future is dropped half-way).
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What survives restarts: dry run and the clients with blocking off.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Policy {
    pub dry_run: bool,
    /// Client names with blocking switched off.
    pub blocking_off: BTreeSet<String>,
}

pub struct Resolver {
    config: DnsConfig,
    pub cache: Cache,
    blocklist: Option<Arc<Blocklist>>,
    upstreams: Arc<Upstreams>,
    /// The VPN clients (names to addresses for per-client policy, the server address for
    /// "auto"), published by core.
    clients: ClientChanges,
    datapath: Option<Arc<Datapath>>,
    /// Set while multihop sends client traffic out through an exit: the upstream queries
    /// carry it so they leave the same way.
    egress_mark: EgressMark,
    policy: RwLock<Policy>,
    /// `policy.dry_run`, readable on the hot path without a lock.
    dry_run: AtomicBool,
    /// Whether any client has blocking off (most hosts: none, so the lookup is skipped).
    any_exempt: AtomicBool,
    policy_path: PathBuf,
    /// Addresses of clients with blocking off, resolved from their names.
    exempt: RwLock<Arc<HashSet<IpAddr>>>,
    pub stats: Stats,
    /// The answers to names and records that would route clients around the resolver.
    bypass: Bypass,
    pub bypass_stats: BypassStats,
    /// What the listeners are bound to right now.
    pub listening: Mutex<Vec<SocketAddr>>,
    /// The DoH resolvers' prefixes from the shipped list and the configuration; the synced
    /// ones (`doh_sync`) are added when the kernel is written (`[dns] drop_doh`).
    doh_resolvers: Vec<ipnet::IpNet>,
    /// `[[dns.doh_sources]]`: DoH resolver lists followed like the blocklist's sources.
    pub doh_sync: encrypted::DohSync,
}

/// The outcome of answering from what the resolver holds.
pub enum Local {
    /// An answer, written into the caller's buffer, with the question it answers when there
    /// was one (UDP fits it to size).
    Reply(Option<Question>),
    /// Needs the upstreams; the engine generation the name was found unblocked in, if it was.
    Forward(Question, Option<u64>),
    /// Not something to answer (a response, or less than a header).
    Ignore,
}

fn random_id() -> u16 {
    let mut b = [0u8; 2];
    // A failure leaves 0: still a valid ID, and the random source port stays.
    let _ = getrandom::fill(&mut b);
    u16::from_ne_bytes(b)
}

impl Resolver {
    pub fn open(
        config: &DnsConfig,
        state_dir: &Path,
        blocklist: Option<Arc<Blocklist>>,
        upstreams: Arc<Upstreams>,
        clients: ClientChanges,
        datapath: Option<Arc<Datapath>>,
        egress_mark: EgressMark,
    ) -> Result<Self, Error> {
        let policy_path = state_dir.join("resolver.json");
        // No file (or a damaged one, set aside): the configuration seeds the first policy.
        let stored: Option<Policy> = store::read_json_or_set_aside(&policy_path, "dns")?;
        let policy = stored.unwrap_or_else(|| Policy {
            dry_run: config.dry_run,
            blocking_off: BTreeSet::new(),
        });
        let resolver = Self {
            config: config.clone(),
            cache: Cache::new(config.cache_entries, config.max_cache_ttl_seconds),
            blocklist,
            upstreams,
            clients,
            datapath,
            egress_mark,
            dry_run: AtomicBool::new(policy.dry_run),
            any_exempt: AtomicBool::new(false),
            policy: RwLock::new(policy),
            policy_path,
            exempt: RwLock::new(Arc::new(HashSet::new())),
            stats: Stats::default(),
            bypass: Bypass::from_config(config),
            bypass_stats: BypassStats::default(),
            listening: Mutex::new(Vec::new()),
            doh_resolvers: encrypted::doh_resolvers(config)?,
            doh_sync: encrypted::DohSync::open(state_dir)?,
        };
        resolver.refresh_clients();
        resolver.push_encrypted_dns();
        resolver.push_sni();
        Ok(resolver)
    }

    pub fn config(&self) -> &DnsConfig {
        &self.config
    }

    /// The addresses the listeners hold right now.
    pub fn listening(&self) -> Vec<SocketAddr> {
        self.listening.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn policy(&self) -> Policy {
        match self.policy.read() {
            Ok(p) => p.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether answers are filtered at all (a blocklist exists).
    pub fn filtering(&self) -> bool {
        self.blocklist.is_some()
    }

    fn change_policy(&self, f: impl FnOnce(&mut Policy)) -> Result<Policy, Error> {
        let mut guard = self
            .policy
            .write()
            .map_err(|_| Error::LockPoisoned("resolver policy"))?;
        let mut next = guard.clone();
        f(&mut next);
        // Durable before it is in force.
        store::write_json(&self.policy_path, &next)?;
        self.dry_run.store(next.dry_run, Ordering::Relaxed);
        *guard = next.clone();
        drop(guard);
        self.refresh_clients();
        Ok(next)
    }

    pub fn set_dry_run(&self, on: bool) -> Result<Policy, Error> {
        self.change_policy(|p| p.dry_run = on)
    }

    pub fn set_client_blocking(&self, client: &str, blocking: bool) -> Result<Policy, Error> {
        self.change_policy(|p| {
            if blocking {
                p.blocking_off.remove(client);
            } else {
                p.blocking_off.insert(client.to_string());
            }
        })
    }

    /// Starts the resolver's work: the listeners (re-bound when the wanted addresses change)
    /// and the per-client policy following the client table.
    pub fn start_tasks(self: &Arc<Self>, shutdown: &Shutdown) -> Vec<JoinHandle<()>> {
        let listeners = tokio::spawn(server::run(Arc::clone(self), shutdown.clone()));
        let resolver = Arc::clone(self);
        let mut clients = self.clients.clone();
        let mut stop = shutdown.clone();
        let policy = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    changed = clients.changed() => if changed.is_err() { return },
                }
                let r = Arc::clone(&resolver);
                let _ = tokio::task::spawn_blocking(move || r.refresh_clients()).await;
            }
        });
        let doh = tokio::spawn(Arc::clone(self).run_doh_sync(shutdown.clone()));
        vec![listeners, policy, doh]
    }

    /// Syncs `[[dns.doh_sources]]` now and writes the result into the kernel (blocking work
    /// off the runtime's workers); the states.
    pub async fn sync_doh(self: &Arc<Self>) -> Vec<encrypted::DohSourceState> {
        let r = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let states = r.doh_sync.sync_all(&r.config.doh_sources);
            r.push_encrypted_dns();
            states
        })
        .await
        .unwrap_or_default()
    }

    /// At start and every `doh_sync_interval_seconds` (0: only on `dns sync_doh`).
    async fn run_doh_sync(self: Arc<Self>, mut shutdown: Shutdown) {
        if self.config.doh_sources.is_empty() {
            return;
        }
        loop {
            self.sync_doh().await;
            let interval = self.config.doh_sync_interval_seconds;
            if interval == 0 {
                return;
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(interval)) => {}
            }
        }
    }

    /// Resolves client names to addresses and writes the policy into the kernel filter. Run at
    /// start, on every policy change and on every change of the client table (clients come, go
    /// and move).
    pub fn refresh_clients(&self) {
        let policy = self.policy();
        let mut exempt = HashSet::new();
        if !policy.blocking_off.is_empty() {
            let table = self.clients.borrow();
            for name in &policy.blocking_off {
                if let Some(c) = table.clients.get(name) {
                    exempt.insert(IpAddr::V4(c.ip));
                }
            }
        }
        if let Some(dp) = &self.datapath {
            let set: BTreeSet<IpAddr> = exempt.iter().copied().collect();
            if let Err(e) = dp.dns_policy.set_exempt(&set) {
                warn!(error = %e, "cannot write the exempt clients into the kernel");
            }
            if let Err(e) = dp
                .dns_policy
                .set_policy(policy.dry_run, self.config.answer_mark)
            {
                warn!(error = %e, "cannot write the DNS policy into the kernel");
            }
        }
        self.any_exempt.store(!exempt.is_empty(), Ordering::Relaxed);
        match self.exempt.write() {
            Ok(mut e) => *e = Arc::new(exempt),
            Err(p) => *p.into_inner() = Arc::new(exempt),
        }
    }

    /// Writes the encrypted-DNS switches, the DoH list and the addresses the resolver listens
    /// on into the kernel. Run at start and whenever the listeners move.
    pub fn push_encrypted_dns(&self) {
        let Some(dp) = &self.datapath else {
            return;
        };
        let resolvers: BTreeSet<IpAddr> = self.listening().iter().map(|a| a.ip()).collect();
        let mut doh = self.doh_resolvers.clone();
        doh.extend(self.doh_sync.prefixes(&self.config.doh_sources));
        let settings = encrypted::settings(&self.config, &doh, resolvers);
        if let Err(e) = dp.encrypted_dns.set(&settings) {
            warn!(error = %e, "cannot write the encrypted-DNS filter into the kernel");
        }
    }

    /// Writes the SNI filter's switches and ECH front names into the kernel (`dns/sni.rs`).
    pub fn push_sni(&self) {
        let Some(dp) = &self.datapath else {
            return;
        };
        let settings = sni::settings(&self.config, &dp.domains.hasher());
        if let Err(e) = dp.sni.set(&settings) {
            warn!(error = %e, "cannot write the SNI filter into the kernel");
        }
    }

    /// What the kernel's SNI filter stopped (`null` without a datapath).
    pub fn sni_status(&self) -> serde_json::Value {
        match self.datapath.as_ref().map(|dp| dp.sni.status()) {
            Some(Ok(st)) => sni::status(&st),
            Some(Err(e)) => serde_json::json!({"error": e.to_string()}),
            None => serde_json::Value::Null,
        }
    }

    /// What the kernel's encrypted-DNS filter holds and stopped: switches, list sizes and
    /// packets per verdict (no addresses of clients; `null` without a datapath).
    pub fn encrypted_dns_status(&self) -> serde_json::Value {
        match self.datapath.as_ref().map(|dp| dp.encrypted_dns.status()) {
            Some(Ok(st)) => serde_json::json!({
                "drop_dot_doq": st.drop_dot_doq,
                "drop_doh": st.drop_doh,
                "doh_prefixes": {"ipv4": st.doh_prefixes_v4, "ipv6": st.doh_prefixes_v6},
                "packets": st.counters.iter()
                    .map(|c| (c.verdict.to_string(), serde_json::json!(c.packets)))
                    .collect::<serde_json::Map<_, _>>(),
                "doh_sources": self.doh_sources_status(),
            }),
            Some(Err(e)) => serde_json::json!({"error": e.to_string()}),
            None => serde_json::Value::Null,
        }
    }

    /// What each layer of the block stopped, by reason, as (layer, reason, count): the
    /// resolver's blocked answers and its bypass answers, the kernel's rewritten answers
    /// (clients asking another resolver over plain DNS), the kernel's encrypted-DNS drops, and
    /// the SNI filter's (blocked names, ECH to known fronts, QUIC in strict mode).
    /// Totals only: never a client or a name.
    pub fn stopped(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = vec![(
            "resolver",
            "blocked",
            self.stats.blocked.load(Ordering::Relaxed),
        )];
        out.extend(
            self.bypass_stats
                .by_reason()
                .into_iter()
                .map(|(reason, n)| ("resolver", reason, n)),
        );
        if let Some(dp) = &self.datapath {
            if let Ok(verdicts) = dp.dns_verdicts() {
                let rewritten = verdicts
                    .iter()
                    .filter(|c| c.verdict == "nxdomain")
                    .map(|c| c.packets)
                    .sum();
                out.push(("kernel_answer_rewrite", "nxdomain", rewritten));
            }
            if let Ok(st) = dp.encrypted_dns.status() {
                for c in st.counters {
                    let reason = match c.verdict {
                        "dot_dropped" => "dot",
                        "doq_dropped" => "doq",
                        "doh_tcp_dropped" => "doh_tcp",
                        "doh_udp_dropped" => "doh_udp",
                        _ => continue,
                    };
                    out.push(("kernel_encrypted_dns", reason, c.packets));
                }
            }
            if let Ok(st) = dp.sni.status() {
                for c in st.counters {
                    let reason = match c.verdict {
                        "blocked_dropped" => "blocked_name",
                        "ech_dropped" => "ech",
                        "quic_dropped" => "quic",
                        _ => continue,
                    };
                    out.push(("kernel_sni", reason, c.packets));
                }
            }
        }
        out
    }

    /// The DoH list sources' states, each with its prefix count instead of the list.
    pub fn doh_sources_status(&self) -> Vec<serde_json::Value> {
        self.doh_sync
            .states(&self.config.doh_sources)
            .into_iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name, "url": s.url, "last_attempt": s.last_attempt,
                    "last_success": s.last_success, "sha256": s.sha256,
                    "verified_by": s.verified_by, "prefixes": s.prefixes.len(),
                    "skipped": s.skipped, "error": s.error,
                })
            })
            .collect()
    }

    /// Addresses with blocking off right now, by client name.
    pub fn exempt_clients(&self) -> BTreeMap<String, Option<IpAddr>> {
        let policy = self.policy();
        let table = self.clients.borrow();
        policy
            .blocking_off
            .into_iter()
            .map(|n| {
                let ip = table.clients.get(&n).map(|c| IpAddr::V4(c.ip));
                (n, ip)
            })
            .collect()
    }

    /// The server's tunnel address while there is a WireGuard server.
    pub fn server_address(&self) -> Option<std::net::Ipv4Addr> {
        self.clients.borrow().subnet.map(|s| s.server_ip())
    }

    fn is_exempt(&self, client: IpAddr) -> bool {
        if !self.any_exempt.load(Ordering::Relaxed) {
            return false;
        }
        let set = match self.exempt.read() {
            Ok(s) => Arc::clone(&s),
            Err(p) => Arc::clone(&p.into_inner()),
        };
        !set.is_empty() && set.contains(&client)
    }

    /// Answers from the blocklist and the cache when it can, into `out` (its old content
    /// replaced; the workers reuse one buffer per datagram of a batch, so an answer costs no
    /// allocation); otherwise says what to forward. `now` is the time the query came in (the
    /// UDP workers read the clock once per batch).
    pub fn answer_locally(
        &self,
        query: &[u8],
        client: IpAddr,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Local {
        let q = match wire::parse_query(query) {
            Ok(q) => q,
            Err(QueryError::TooShort | QueryError::NotQuery) => return Local::Ignore,
            Err(QueryError::Unsupported) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                // NOTIMP for other opcodes and question counts.
                return if wire::write_header_reply(out, query, 4) {
                    Local::Reply(None)
                } else {
                    Local::Ignore
                };
            }
            Err(QueryError::Malformed) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                return if wire::write_header_reply(out, query, 1) {
                    Local::Reply(None)
                } else {
                    Local::Ignore
                };
            }
        };
        // A cached answer already vetted by this generation of the engine needs no check:
        // the common case of a busy resolver costs a parse and a cache lookup.
        let generation = self.blocklist.as_ref().map_or(0, |l| l.generation());
        let hit = self.cache.get_into(query, &q, generation, now, out);
        if hit == Some(true) {
            return Local::Reply(Some(q));
        }
        // Only a filtering resolver keeps clients on itself; an exempt client or dry run gets
        // the upstream's answer, as for blocked names.
        if self.blocklist.is_some()
            && let Some(special) = self.bypass.special(&q.name)
            && !self.dry_run.load(Ordering::Relaxed)
            && !self.is_exempt(client)
        {
            self.bypass_stats.count(special);
            let rcode = match special {
                Special::FirefoxCanary | Special::PrivateRelay => wire::RCODE_NXDOMAIN,
                Special::Ddr => wire::RCODE_NOERROR,
            };
            wire::write_rcode_reply(out, query, &q, rcode);
            return Local::Reply(None);
        }
        let blocked = match &self.blocklist {
            Some(list) => !q.name.is_empty() && list.is_blocked(&q.name),
            None => false,
        };
        if blocked {
            if self.is_exempt(client) {
                self.stats.exempt_matches.fetch_add(1, Ordering::Relaxed);
            } else if self.dry_run.load(Ordering::Relaxed) {
                self.stats.dry_run_matches.fetch_add(1, Ordering::Relaxed);
            } else {
                self.stats.blocked.fetch_add(1, Ordering::Relaxed);
                match self.config.block_response {
                    BlockResponse::Nxdomain => {
                        wire::write_rcode_reply(out, query, &q, wire::RCODE_NXDOMAIN);
                    }
                    BlockResponse::Sinkhole => {
                        wire::write_sinkhole_reply(out, query, &q, SINKHOLE_TTL);
                    }
                }
                return Local::Reply(None);
            }
        }
        // Names that matched but pass (exempt client, dry run) are never vetted: the next
        // client may be filtered.
        let vetted = (!blocked).then_some(generation);
        match hit {
            // The answer is still in `out`.
            Some(_) => {
                if let Some(g) = vetted {
                    self.cache.vet(&q, g);
                }
                Local::Reply(Some(q))
            }
            None => Local::Forward(q, vetted),
        }
    }

    /// Asks the upstreams (primary, then secondary), caches the answer and returns it with the
    /// client's ID; SERVFAIL when none answers.
    pub async fn forward(&self, query: &[u8], q: &Question, vetted: Option<u64>) -> Vec<u8> {
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight::enter(&self.stats.forwards_in_flight);
        let servers = self.upstreams.servers();
        let own = self.listening.lock().map(|l| l.clone()).unwrap_or_default();
        let timeout = Duration::from_millis(self.config.upstream_timeout_ms);
        let mut tried = BTreeSet::new();
        for server in [servers.primary, servers.secondary] {
            // Never forward to ourselves: that would be a loop.
            if !tried.insert(server) || own.iter().any(|a| a.ip() == server) {
                continue;
            }
            let upstream = SocketAddr::new(server, 53);
            match tokio::time::timeout(
                timeout,
                ask_upstream(upstream, query, q, self.egress_mark.get()),
            )
            .await
            {
                Ok(Ok(mut answer)) => {
                    // hickory reads what it can; `answer_shape` also refuses names pointing
                    // into the header, which the client's ID would change under them.
                    if hickory_proto::op::Message::from_vec(&answer).is_err()
                        || wire::answer_shape(&answer).is_none()
                    {
                        self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    // Stripped before it is cached: the cached path never sees ECH again.
                    if self.blocklist.is_some()
                        && self.bypass.strips(q.qtype)
                        && let Some(stripped) = bypass::strip_ech(&answer)
                    {
                        self.bypass_stats
                            .ech_stripped
                            .fetch_add(1, Ordering::Relaxed);
                        answer = stripped;
                    }
                    self.cache.put(q, &answer, vetted);
                    wire::set_id(&mut answer, q.id);
                    if answer.len() >= q.end && query.len() >= q.end {
                        answer[wire::HEADER_LEN..q.end]
                            .copy_from_slice(&query[wire::HEADER_LEN..q.end]);
                    }
                    return answer;
                }
                Ok(Err(_)) | Err(_) => {
                    self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        wire::rcode_reply(query, q, wire::RCODE_SERVFAIL)
    }
}

/// Does `answer` answer `q` (the same question, any letter case)? Public (hidden) for the
/// fuzz crate only.
#[doc(hidden)]
pub fn same_question(answer: &[u8], query: &[u8], q: &Question) -> bool {
    answer.len() >= q.end
        && answer[4..6] == [0, 1]
        && answer[wire::HEADER_LEN..q.end].eq_ignore_ascii_case(&query[wire::HEADER_LEN..q.end])
}

/// One exchange with an upstream: UDP from a fresh random port with a fresh random ID, and
/// over TCP when the UDP answer is truncated.
async fn ask_upstream(
    upstream: SocketAddr,
    query: &[u8],
    q: &Question,
    mark: Option<u32>,
) -> std::io::Result<Vec<u8>> {
    let id = random_id();
    let mut out = query.to_vec();
    wire::set_id(&mut out, id);
    let bind: SocketAddr = if upstream.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = UdpSocket::bind(bind).await?;
    // While multihop is on, clients' lookups leave through the exit like their traffic.
    if let Some(mark) = mark {
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::Mark, &mark)
            .map_err(std::io::Error::from)?;
    }
    sock.connect(upstream).await?;
    sock.send(&out).await?;
    // Sized to what the client takes over UDP (its EDNS size, 512 without), at most
    // MAX_UPSTREAM_UDP, plus one byte that tells a datagram that did not fit: a larger answer
    // could not go back over UDP anyway, and is asked again over TCP like a truncated one.
    let fits = q.udp_size.clamp(wire::CLASSIC_UDP_SIZE, MAX_UPSTREAM_UDP);
    let mut buf = vec![0u8; fits + 1];
    let n = loop {
        let n = sock.recv(&mut buf).await?;
        let a = &buf[..n];
        // Anything else arriving on this port is ignored (spoofing, stale answers).
        if n >= wire::HEADER_LEN
            && a[..2] == id.to_be_bytes()
            && a[2] & 0x80 != 0
            && same_question(a, &out, q)
        {
            break n;
        }
    };
    if n <= fits && buf[2] & 0x02 == 0 {
        buf.truncate(n);
        return Ok(buf);
    }
    drop(buf);
    let tcp_socket = if upstream.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(mark) = mark {
        nix::sys::socket::setsockopt(&tcp_socket, nix::sys::socket::sockopt::Mark, &mark)
            .map_err(std::io::Error::from)?;
    }
    let mut tcp = tcp_socket.connect(upstream).await?;
    let len = u16::try_from(out.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(&out);
    tcp.write_all(&framed).await?;
    let n = tcp.read_u16().await? as usize;
    let mut full = vec![0u8; n];
    tcp.read_exact(&mut full).await?;
    if full.len() < wire::HEADER_LEN
        || full[..2] != id.to_be_bytes()
        || !same_question(&full, &out, q)
    {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    Ok(full)
}

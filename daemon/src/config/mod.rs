//! `phantom.toml`: the daemon's configuration.
//!
//! The key names of SPEC section 2 are the contract. Unknown keys are refused so a typo never
//! silently falls back to a default. Sections for modules that have not landed yet are parsed
//! and validated already; docs/configuration.md says which keys are in force.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

mod brands;
mod echo_url;
mod location;
pub mod sentry;

pub use brands::DEFAULT_BRANDS;
pub use echo_url::EchoUrl;
pub use location::Location;
pub use sentry::{GoodBot, SentryConfig, Tunables};

use crate::{error::Error, source::SourcePrefix};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/phantom/phantom.toml";

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Client DB, keys, journals; created 0700.
    pub state_dir: PathBuf,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub datapath: DatapathConfig,
    pub wireguard: WireguardConfig,
    pub dns: DnsConfig,
    pub blocklist: BlocklistConfig,
    pub sentry: SentryConfig,
    pub ghost: GhostConfig,
    pub multihop: MultihopConfig,
    pub sources: SourcesConfig,
    pub limits: LimitsConfig,
}

/// `[limits]`: every client's rate limits and quota unless `core set_client_policy` gives it
/// its own (docs/policy.md). 0 = none.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// What a client may receive, kilobits per second.
    pub download_kbps: u64,
    /// What a client may send, kilobits per second.
    pub upload_kbps: u64,
    /// Bytes above the rate a client may send or receive at once, in KiB (0: 2 s at the
    /// rate, at least 1 MiB).
    pub burst_kb: u64,
    /// Bytes (both directions) per period, in MiB.
    pub quota_mb: u64,
    /// `monthly`, `weekly` or `daily` (UTC).
    pub quota_period: String,
    /// `block` or `throttle` once the quota is used up.
    pub quota_action: String,
    /// The rate a throttled client keeps, both directions, kilobits per second.
    pub quota_floor_kbps: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            download_kbps: 0,
            upload_kbps: 0,
            burst_kb: 0,
            quota_mb: 0,
            quota_period: "monthly".into(),
            quota_action: "throttle".into(),
            quota_floor_kbps: 1_000,
        }
    }
}

/// Lowest and highest rate a limit may have, kilobits per second.
pub const MIN_KBPS: u64 = 64;
pub const MAX_KBPS: u64 = 100_000_000;
/// Largest burst, KiB.
pub const MAX_BURST_KB: u64 = 65_536;

impl LimitsConfig {
    fn validate(&self) -> Result<(), Error> {
        for (key, v) in [
            ("limits.download_kbps", self.download_kbps),
            ("limits.upload_kbps", self.upload_kbps),
            ("limits.quota_floor_kbps", self.quota_floor_kbps),
        ] {
            if v != 0 && !(MIN_KBPS..=MAX_KBPS).contains(&v) {
                return Err(Error::config(format!(
                    "{key} must be 0 (none) or between {MIN_KBPS} and {MAX_KBPS}"
                )));
            }
        }
        if self.burst_kb > MAX_BURST_KB {
            return Err(Error::config(format!(
                "limits.burst_kb must be at most {MAX_BURST_KB}"
            )));
        }
        if !["monthly", "weekly", "daily"].contains(&self.quota_period.as_str()) {
            return Err(Error::config(
                "limits.quota_period must be monthly, weekly or daily",
            ));
        }
        if !["block", "throttle"].contains(&self.quota_action.as_str()) {
            return Err(Error::config(
                "limits.quota_action must be block or throttle",
            ));
        }
        if self.quota_mb > 1 << 40 {
            return Err(Error::config("limits.quota_mb is too large"));
        }
        Ok(())
    }
}

/// `[sources]`: what one source is, wherever sources are counted, limited or blocked.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SourcesConfig {
    /// An IPv6 address counts as its prefix of this length (32..=128; 128 = each address).
    pub ipv6_prefix: SourcePrefix,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/phantom"),
            log: LogConfig::default(),
            admin: AdminConfig::default(),
            metrics: MetricsConfig::default(),
            datapath: DatapathConfig::default(),
            wireguard: WireguardConfig::default(),
            dns: DnsConfig::default(),
            blocklist: BlocklistConfig::default(),
            sentry: SentryConfig::default(),
            ghost: GhostConfig::default(),
            multihop: MultihopConfig::default(),
            sources: SourcesConfig::default(),
            limits: LimitsConfig::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter directive, e.g. `info` or `info,phantom_daemon::admin=debug`.
    /// Reloaded on SIGHUP; `RUST_LOG` overrides it at start.
    pub level: String,
    /// How many recent log lines `core service_logs` can return.
    pub keep_lines: usize,
    /// How lines reach stderr: `text` (without its own time stamp when stderr is the
    /// journal, which stamps every line) or `json` (one object a line). Read at start.
    pub format: LogFormat,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            keep_lines: 5_000,
            format: LogFormat::Text,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub socket: PathBuf,
    /// Members of this group may use the socket besides root; the socket file is chowned to it
    /// when the group exists.
    pub group: String,
    /// Concurrent admin connections; more wait for a slot.
    pub max_connections: usize,
    /// An idle connection is closed after this many seconds.
    pub idle_timeout_seconds: u64,
    /// The HTTPS admin API (every socket action, `POST /api/v1/<module>/<action>`), e.g.
    /// "127.0.0.1:9443"; "off" disables. docs/admin-api.md.
    pub http_listen: String,
    /// Certificate chain and key (PEM files) of the HTTPS admin API; both empty: a
    /// self-signed certificate made at first start and kept in `<state_dir>/admin/tls/`.
    pub tls_cert: String,
    pub tls_key: String,
    /// Sources (CIDR blocks or addresses) the HTTPS admin API answers; others get 403.
    pub http_allow: Vec<String>,
    /// Requests one token may make per minute over HTTPS.
    pub http_rate_per_token: u32,
    /// Requests one source (an IPv4 address or an IPv6 prefix) may make per minute over HTTPS.
    pub http_rate_per_source: u32,
    /// The audit log (`<state_dir>/admin/audit.jsonl`) is rotated past this size; one
    /// rotated file is kept.
    pub audit_max_bytes: u64,
}

impl AdminConfig {
    /// `http_listen` as an address, `None` when off.
    pub fn http_listen_addr(&self) -> Result<Option<SocketAddr>, Error> {
        parse_listen("admin.http_listen", &self.http_listen)
    }

    /// `http_allow` as networks (a bare address is a /32 or /128).
    pub fn http_allow_nets(&self) -> Result<Vec<ipnet::IpNet>, Error> {
        self.http_allow
            .iter()
            .map(|s| {
                let s = s.trim();
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map(|n| n.trunc())
                    .map_err(|_| {
                        Error::config(format!(
                            "admin.http_allow: {s:?} is neither an address nor a CIDR block"
                        ))
                    })
            })
            .collect()
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/phantom/phantom.sock"),
            group: "phantom".into(),
            max_connections: 64,
            idle_timeout_seconds: 300,
            http_listen: "off".into(),
            tls_cert: String::new(),
            tls_key: String::new(),
            http_allow: vec!["127.0.0.0/8".into(), "::1/128".into()],
            http_rate_per_token: 600,
            http_rate_per_source: 1200,
            audit_max_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `GET /metrics`; "off" disables.
    pub listen: String,
    /// How many of the busiest sources are exported with a `source` label.
    pub top_sources: usize,
    /// How many WireGuard clients get series of their own (the busiest by traffic); the rest
    /// are summed.
    pub client_series: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9469".into(),
            top_sources: 10,
            client_series: 1_000,
        }
    }
}

impl MetricsConfig {
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, Error> {
        parse_listen("metrics.listen", &self.listen)
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Native (driver) mode, falling back to generic when the driver has no XDP support.
    Auto,
    Native,
    Generic,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatapathConfig {
    /// Load and attach the eBPF programs. Off only for hosts where eBPF is unavailable.
    pub enabled: bool,
    /// XDP guard attach point; "auto" = the interface of the default route.
    pub uplink: String,
    pub xdp_mode: XdpModeSetting,
    /// bpffs directory for pinned maps and links.
    pub bpffs: PathBuf,
    /// Capacity of the per-source LRU map. Changing it needs the pinned map removed.
    pub max_sources: u32,
    /// Capacity of the allow/deny map.
    pub max_policies: u32,
    /// Capacity of the DNS filter's blocked-domain map.
    pub max_domains: u32,
    /// TCP ports whose SYNs the guard counts per source as new connections.
    pub protected_ports: Vec<u16>,
    /// Where the TC programs go (DNS answer filter, multihop mark); "auto" = the
    /// `[wireguard] interface`. Attached as soon as the interface exists.
    pub vpn_interface: String,
    /// Rewrite blocked DNS answers to NXDOMAIN on the VPN interface.
    pub dns_filter: bool,
    /// The skb mark the multihop program sets (matched by `ip rule fwmark`).
    pub multihop_mark: u32,
    /// Log samples of the kernel programs' verdicts (at most one per verdict, CPU and second).
    /// Fixed when the programs are loaded: a restart applies a change.
    pub kernel_samples: bool,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            uplink: "auto".into(),
            xdp_mode: XdpModeSetting::Auto,
            bpffs: PathBuf::from("/sys/fs/bpf/phantom"),
            max_sources: phantom_common::xdp::DEFAULT_MAX_SOURCES,
            max_policies: phantom_common::xdp::DEFAULT_MAX_POLICIES,
            max_domains: phantom_common::dns::DEFAULT_MAX_DOMAINS,
            protected_ports: vec![80, 443],
            vpn_interface: "auto".into(),
            dns_filter: true,
            multihop_mark: 0x6d68,
            kernel_samples: false,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WireguardBackend {
    Auto,
    Kernel,
    Userspace,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WireguardConfig {
    /// Run the WireGuard server (interface, peers, NAT).
    pub enabled: bool,
    pub interface: String,
    pub listen_port: u16,
    pub subnet: String,
    pub endpoint: String,
    pub backend: WireguardBackend,
    pub mtu: u16,
    /// Kernel backend: leave the interface, its peers and sessions and the NAT table in place
    /// at a clean stop, so a restart does not interrupt the clients (the embedded device
    /// always goes with the process).
    pub keep_interface: bool,
}

impl Default for WireguardConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interface: "wg_main".into(),
            listen_port: 51820,
            subnet: "10.8.0.0/24".into(),
            endpoint: "auto".into(),
            backend: WireguardBackend::Auto,
            mtu: 1420,
            keep_interface: false,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// The upstreams of the resolver (and the servers clients get when it is off).
    pub primary: String,
    pub secondary: String,
    /// Where Phantom's resolver listens (UDP and TCP): "auto" = port 53 on the WireGuard
    /// server address, "off", or a comma-separated list of ip:port.
    pub listen: String,
    /// Blocked names get "nxdomain", or "sinkhole" (0.0.0.0 / :: for A / AAAA, no data for
    /// the rest).
    pub block_response: BlockResponse,
    /// The first start's dry-run setting (later `dns set_dry_run` decides, and persists).
    pub dry_run: bool,
    /// Answers kept in the cache (0 = no cache).
    pub cache_entries: usize,
    /// No answer is cached longer than this, whatever its TTL.
    pub max_cache_ttl_seconds: u32,
    /// How long one upstream may take before the next is asked.
    pub upstream_timeout_ms: u64,
    /// The skb mark on the resolver's own answers, so the kernel filter leaves them alone
    /// (the resolver has applied dry run and per-client policy already).
    pub answer_mark: u32,
    /// UDP worker threads per address (0 = half the CPUs, at least one).
    pub udp_workers: usize,
    /// Answer `use-application-dns.net` NXDOMAIN: Firefox keeps automatic DoH off.
    pub answer_firefox_canary: bool,
    /// Answer Apple Private Relay's `mask.icloud.com` and `mask-h2.icloud.com` NXDOMAIN.
    pub block_private_relay: bool,
    /// Answer `_dns.resolver.arpa` (DDR) with no records: no other resolver to upgrade to.
    pub answer_ddr: bool,
    /// Remove the `ech` parameter from HTTPS/SVCB answers, so the server name stays visible.
    pub strip_ech: bool,
    /// Drop VPN clients' DoT (TCP/853) and DoQ (UDP/853) to anyone but this resolver, in the
    /// kernel on the WireGuard interface.
    pub drop_dot_doq: bool,
    /// Drop VPN clients' TCP/443 and UDP/443 to known DoH resolvers (the shipped list, plus
    /// `doh_resolvers` and the lines of `doh_resolvers_file`).
    pub drop_doh: bool,
    /// More DoH resolvers: addresses or CIDR prefixes.
    pub doh_resolvers: Vec<String>,
    /// A file of more DoH resolvers, one address or prefix per line (`#` comments).
    pub doh_resolvers_file: String,
    /// Lists of DoH resolvers followed like the blocklist's sources (same locations, pins and
    /// signatures; one address or prefix per line).
    pub doh_sources: Vec<SyncSource>,
    /// How often `doh_sources` are synced (0 = only on `dns sync_doh`).
    pub doh_sync_interval_seconds: u64,
    /// Drop VPN clients' TLS ClientHellos (TCP/443) whose server name is blocked, in the
    /// kernel on the WireGuard interface (the same rules as the kernel DNS filter).
    pub sni_filter: bool,
    /// Strict: also drop VPN clients' UDP/443 (QUIC), so browsers fall back to TCP where the
    /// name is visible, and ClientHellos with ECH to a known ECH front name.
    pub sni_strict: bool,
    /// More ECH front names (the outer server name of ECH ClientHellos), beside the shipped
    /// list.
    pub ech_fronts: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BlockResponse {
    Nxdomain,
    Sinkhole,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            primary: "8.8.8.8".into(),
            secondary: "8.8.4.4".into(),
            listen: "auto".into(),
            block_response: BlockResponse::Nxdomain,
            dry_run: false,
            cache_entries: 100_000,
            max_cache_ttl_seconds: 86_400,
            upstream_timeout_ms: 2_000,
            answer_mark: 0x7068,
            udp_workers: 0,
            answer_firefox_canary: true,
            block_private_relay: true,
            answer_ddr: true,
            strip_ech: true,
            drop_dot_doq: true,
            drop_doh: true,
            doh_resolvers: Vec::new(),
            doh_resolvers_file: String::new(),
            doh_sources: Vec::new(),
            doh_sync_interval_seconds: 86_400,
            sni_filter: true,
            sni_strict: false,
            ech_fronts: Vec::new(),
        }
    }
}

impl DnsConfig {
    /// The resolver's addresses: `None` for "auto" (the WireGuard server address), empty for
    /// "off".
    pub fn listen_addrs(&self) -> Result<Option<Vec<SocketAddr>>, Error> {
        match self.listen.trim() {
            "auto" => Ok(None),
            l if l.eq_ignore_ascii_case("off") => Ok(Some(Vec::new())),
            l => l
                .split(',')
                .map(|a| {
                    a.trim().parse::<SocketAddr>().map_err(|_| {
                        Error::config(format!(
                            "dns.listen = {:?}: {a:?} is not ip:port (or use \"auto\" / \"off\")",
                            self.listen
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BlocklistConfig {
    pub enabled: bool,
    /// A domain is blocked when its strongest matching pattern weighs at least this much.
    pub threshold: f64,
    pub api_listen: String,
    /// Lookalike detection against the built-in gambling brands and `brands`.
    pub lookalike: bool,
    /// More brands to detect lookalikes of (registrable labels: "examplebet").
    pub brands: Vec<String>,
    /// Lists fetched by `blocklist sync` and on the schedule.
    pub sources: Vec<SyncSource>,
    /// How often the sources are synced (0 = only on `blocklist sync`).
    pub sync_interval_seconds: u64,
}

/// One list to sync: a file path or an http(s) URL, with its checksum.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SyncSource {
    /// Names the source; its entries carry the reason "sync:<name>".
    pub name: String,
    /// "/path/to/list", "file:///path", "http://..." or "https://...".
    pub url: String,
    /// "auto" (by content), "hosts", "adblock", "plain" or "json".
    #[serde(default = "auto_format")]
    pub format: String,
    /// The expected SHA-256 of the download (hex), pinned in the configuration.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Where to fetch the expected SHA-256 from (`sha256sum` output or bare hex).
    #[serde(default)]
    pub sha256_url: Option<String>,
    /// The list publisher's minisign public key (the base64 line of its `minisign.pub`,
    /// `RW...`): every download must carry a valid signature by it.
    #[serde(default)]
    pub minisign_key: Option<String>,
    /// Where the signature is; default: `url` with `.minisig` appended to its path (before a
    /// query: another Phantom's `/api/v1/blocklist?format=full` is signed at
    /// `/api/v1/blocklist.minisig?format=full`).
    #[serde(default)]
    pub minisign_url: Option<String>,
}

impl SyncSource {
    /// Where this source's minisign signature is fetched from.
    pub fn signature_url(&self) -> String {
        if let Some(url) = &self.minisign_url {
            return url.clone();
        }
        match self.url.split_once('?') {
            Some((path, query)) if self.url.contains("://") && !self.url.starts_with("file:") => {
                format!("{path}.minisig?{query}")
            }
            _ => format!("{}.minisig", self.url),
        }
    }
}

fn auto_format() -> String {
    "auto".into()
}

impl Default for BlocklistConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            threshold: 0.5,
            api_listen: "0.0.0.0:3000".into(),
            lookalike: true,
            brands: Vec::new(),
            sources: Vec::new(),
            sync_interval_seconds: 3_600,
        }
    }
}

impl BlocklistConfig {
    /// The brands lookalike detection uses (none when it is off).
    pub fn lookalike_brands(&self) -> Vec<String> {
        if !self.lookalike {
            return Vec::new();
        }
        DEFAULT_BRANDS
            .iter()
            .map(|b| b.to_string())
            .chain(self.brands.iter().map(|b| b.trim().to_ascii_lowercase()))
            .collect()
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GhostTls {
    Acme,
    Files,
    SelfSigned,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GhostConfig {
    /// The address the wss relay (and, while ACME issues, the HTTP-01 responder) binds.
    pub listen: IpAddr,
    pub port: u16,
    pub tls: GhostTls,
    pub cert: String,
    pub key: String,
    pub acme_directory: String,
    pub acme_email: String,
    /// Port of the HTTP-01 responder, listening only while a certificate is issued.
    pub acme_http_port: u16,
    /// A PEM root certificate to trust for the ACME directory instead of the public web
    /// roots (a private ACME CA); empty for Let's Encrypt.
    pub acme_ca_root: String,
    /// An ACME certificate is renewed this many days before it expires.
    pub acme_renew_before_days: u32,
    /// How often the certificate's expiry is looked at.
    pub acme_check_seconds: u64,
    /// Open tunnels the secret may hold at once (every client shares the one secret); an
    /// upgrade over it gets 503. At most 4096.
    pub tunnels_per_secret: usize,
}

impl Default for GhostConfig {
    fn default() -> Self {
        Self {
            listen: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            port: 443,
            tls: GhostTls::Acme,
            cert: String::new(),
            key: String::new(),
            acme_directory: "https://acme-v02.api.letsencrypt.org/directory".into(),
            acme_email: String::new(),
            acme_http_port: 80,
            acme_ca_root: String::new(),
            acme_renew_before_days: 30,
            acme_check_seconds: 6 * 3600,
            tunnels_per_secret: 1024,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MultihopConfig {
    /// The exit interface (client side of the imported WireGuard config).
    pub interface: String,
    /// Routing table holding the default route through the exit.
    pub table: u32,
    /// Priority of the `ip rule fwmark <datapath.multihop_mark> lookup <table>` rule.
    pub rule_priority: u32,
    /// How often the monitor checks the exit (handshake and a connection through it).
    pub monitor_interval_seconds: u64,
    /// How long one probe through the exit may take before it counts as failed.
    pub probe_timeout_seconds: u64,
    /// Plain-HTTP service answering with the caller's address: `test_vpn` fetches it through
    /// the exit, and the monitor's probe connects to its host and port.
    pub echo_url: String,
}

impl Default for MultihopConfig {
    fn default() -> Self {
        Self {
            interface: "wg_vpn".into(),
            table: 100,
            rule_priority: 100,
            monitor_interval_seconds: 30,
            probe_timeout_seconds: 5,
            echo_url: "http://api.ipify.org/".into(),
        }
    }
}

/// Parses a listen setting: "off" disables, otherwise `ip:port`.
pub fn parse_listen(key: &str, value: &str) -> Result<Option<SocketAddr>, Error> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    value
        .parse::<SocketAddr>()
        .map(Some)
        .map_err(|_| Error::config(format!("{key} = {value:?} is neither \"off\" nor ip:port")))
}

fn is_ifname(name: &str) -> bool {
    // IFNAMSIZ is 16 including the terminating NUL.
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'))
}

impl DatapathConfig {
    /// The interface the TC programs attach to.
    pub fn vpn_interface<'a>(&'a self, wireguard: &'a WireguardConfig) -> &'a str {
        match self.vpn_interface.as_str() {
            "auto" => &wireguard.interface,
            name => name,
        }
    }
}

/// A TOML error on one line (the toml crate's own text spans several, with a drawing of the
/// line; a log line or a journal entry would keep only the first, without the reason):
/// `invalid TOML at line L, column C: <reason>`.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let reason = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.chars().rev().take_while(|c| *c != '\n').count() + 1;
            format!("invalid TOML at line {line}, column {column}: {reason}")
        }
        None => format!("invalid TOML: {reason}"),
    }
}

impl Config {
    /// Parses and validates a configuration text.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let config: Config =
            toml::from_str(text).map_err(|e| Error::config(toml_error(text, &e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads the configuration at `path`; when it does not exist, writes the defaults there
    /// first (so an operator has a file to edit) and runs on them.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), Error> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok((Self::from_toml(&text)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let config = Config::default();
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
                }
                std::fs::write(path, config.to_toml()?).map_err(|e| Error::io(path, e))?;
                Ok((config, true))
            }
            Err(e) => Err(Error::io(path, e)),
        }
    }

    pub fn to_toml(&self) -> Result<String, Error> {
        let body = toml::to_string_pretty(self)
            .map_err(|e| Error::config(format!("cannot serialise config: {e}")))?;
        Ok(format!(
            "# Phantom configuration. Written with the defaults on first start; edit and send\n\
             # SIGHUP (or restart) to apply. Reference: docs/configuration.md\n\n{body}"
        ))
    }

    pub fn validate(&self) -> Result<(), Error> {
        if !self.state_dir.is_absolute() {
            return Err(Error::config("state_dir must be an absolute path"));
        }
        if !self.admin.socket.is_absolute() {
            return Err(Error::config("admin.socket must be an absolute path"));
        }
        if self.admin.max_connections == 0 {
            return Err(Error::config("admin.max_connections must be at least 1"));
        }
        self.admin.http_listen_addr()?;
        self.admin.http_allow_nets()?;
        if self.admin.tls_cert.is_empty() != self.admin.tls_key.is_empty() {
            return Err(Error::config(
                "admin.tls_cert and admin.tls_key go together (both empty: self-signed)",
            ));
        }
        if self.admin.http_rate_per_token == 0 || self.admin.http_rate_per_source == 0 {
            return Err(Error::config(
                "admin.http_rate_per_token and admin.http_rate_per_source must be at least 1",
            ));
        }
        if self.admin.audit_max_bytes < 4096 {
            return Err(Error::config("admin.audit_max_bytes must be at least 4096"));
        }
        if self.log.keep_lines == 0 || self.log.keep_lines > 1_000_000 {
            return Err(Error::config(
                "log.keep_lines must be between 1 and 1000000",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| Error::config(format!("log.level = {:?}: {e}", self.log.level)))?;
        self.metrics.listen_addr()?;
        if self.metrics.top_sources > 1_000 {
            return Err(Error::config("metrics.top_sources must be at most 1000"));
        }
        self.limits.validate()?;
        if self.metrics.client_series > 100_000 {
            return Err(Error::config(
                "metrics.client_series must be at most 100000",
            ));
        }
        if self.datapath.uplink != "auto" && !is_ifname(&self.datapath.uplink) {
            return Err(Error::config(format!(
                "datapath.uplink = {:?} is not an interface name",
                self.datapath.uplink
            )));
        }
        if !self.datapath.bpffs.is_absolute() {
            return Err(Error::config("datapath.bpffs must be an absolute path"));
        }
        if !(1..=16_777_216).contains(&self.datapath.max_sources) {
            return Err(Error::config(
                "datapath.max_sources must be between 1 and 16777216",
            ));
        }
        if !(1..=16_777_216).contains(&self.datapath.max_policies) {
            return Err(Error::config(
                "datapath.max_policies must be between 1 and 16777216",
            ));
        }
        if !(1..=50_000_000).contains(&self.datapath.max_domains) {
            return Err(Error::config(
                "datapath.max_domains must be between 1 and 50000000",
            ));
        }
        if self.datapath.protected_ports.contains(&0) {
            return Err(Error::config("datapath.protected_ports: 0 is not a port"));
        }
        if self.datapath.vpn_interface != "auto" && !is_ifname(&self.datapath.vpn_interface) {
            return Err(Error::config(format!(
                "datapath.vpn_interface = {:?} is not an interface name",
                self.datapath.vpn_interface
            )));
        }
        if self.datapath.multihop_mark == 0 {
            return Err(Error::config(
                "datapath.multihop_mark must not be 0 (0 means unmarked)",
            ));
        }
        if !is_ifname(&self.wireguard.interface) {
            return Err(Error::config(format!(
                "wireguard.interface = {:?} is not an interface name",
                self.wireguard.interface
            )));
        }
        if self.wireguard.listen_port == 0 {
            return Err(Error::config("wireguard.listen_port must not be 0"));
        }
        if !(1280..=9000).contains(&self.wireguard.mtu) {
            return Err(Error::config("wireguard.mtu must be between 1280 and 9000"));
        }
        validate_cidr("wireguard.subnet", &self.wireguard.subnet)?;
        // The kernel keeps each client's policy in a slot named by the address's last two
        // bytes (docs/policy.md): a larger subnet would put two clients in one slot.
        if let Some((_, prefix)) = self.wireguard.subnet.split_once('/')
            && prefix.trim().parse::<u8>().is_ok_and(|p| p < 16)
        {
            return Err(Error::config(format!(
                "wireguard.subnet = {:?} is larger than a /16, the most clients one server holds",
                self.wireguard.subnet
            )));
        }
        for (key, value) in [
            ("dns.primary", &self.dns.primary),
            ("dns.secondary", &self.dns.secondary),
        ] {
            value
                .parse::<IpAddr>()
                .map_err(|_| Error::config(format!("{key} = {value:?} is not an IP address")))?;
        }
        self.dns.listen_addrs()?;
        if self.dns.answer_mark == 0 {
            return Err(Error::config(
                "dns.answer_mark must not be 0 (0 means unmarked)",
            ));
        }
        if self.dns.answer_mark == self.datapath.multihop_mark {
            return Err(Error::config(
                "dns.answer_mark must differ from datapath.multihop_mark",
            ));
        }
        if self.dns.udp_workers > 16 {
            return Err(Error::config(
                "dns.udp_workers must be between 0 (auto) and 16",
            ));
        }
        if !(100..=30_000).contains(&self.dns.upstream_timeout_ms) {
            return Err(Error::config(
                "dns.upstream_timeout_ms must be between 100 and 30000",
            ));
        }
        for r in &self.dns.doh_resolvers {
            parse_net(r).ok_or_else(|| {
                Error::config(format!(
                    "dns.doh_resolvers: {r:?} is not an address or CIDR prefix"
                ))
            })?;
        }
        for name in &self.dns.ech_fronts {
            let n = name.trim().trim_end_matches('.');
            let label_ok = |l: &str| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            };
            if n.len() > 253 || !n.split('.').all(label_ok) {
                return Err(Error::config(format!(
                    "dns.ech_fronts: {name:?} is not a domain name (ASCII, punycode for others)"
                )));
            }
        }
        for brand in &self.blocklist.brands {
            let b = brand.trim();
            if b.is_empty()
                || b.len() > 63
                || !b.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
            {
                return Err(Error::config(format!(
                    "blocklist.brands: {brand:?} is not a domain label (letters, digits, '-')"
                )));
            }
        }
        validate_sync_sources(
            "blocklist.sources",
            &self.blocklist.sources,
            &["auto", "hosts", "adblock", "plain", "json"],
        )?;
        validate_sync_sources("dns.doh_sources", &self.dns.doh_sources, &["auto", "plain"])?;
        parse_listen("blocklist.api_listen", &self.blocklist.api_listen)?;
        if !(0.0..=1.0).contains(&self.blocklist.threshold) {
            return Err(Error::config("blocklist.threshold must be between 0 and 1"));
        }
        if !is_ifname(&self.multihop.interface)
            || self.multihop.interface == self.wireguard.interface
        {
            return Err(Error::config(format!(
                "multihop.interface = {:?} must be an interface name other than wireguard.interface",
                self.multihop.interface
            )));
        }
        // 0 is unspec, 253-255 are default/main/local.
        if self.multihop.table == 0 || (253..=255).contains(&self.multihop.table) {
            return Err(Error::config(
                "multihop.table must not be 0, 253 (default), 254 (main) or 255 (local)",
            ));
        }
        if self.multihop.rule_priority == 0 || self.multihop.rule_priority >= 32766 {
            return Err(Error::config(
                "multihop.rule_priority must be between 1 and 32765 (before the main table)",
            ));
        }
        if !(1..=3600).contains(&self.multihop.monitor_interval_seconds) {
            return Err(Error::config(
                "multihop.monitor_interval_seconds must be between 1 and 3600",
            ));
        }
        if !(1..=60).contains(&self.multihop.probe_timeout_seconds) {
            return Err(Error::config(
                "multihop.probe_timeout_seconds must be between 1 and 60",
            ));
        }
        if self.multihop.probe_timeout_seconds >= self.multihop.monitor_interval_seconds {
            return Err(Error::config(
                "multihop.probe_timeout_seconds must be shorter than multihop.monitor_interval_seconds",
            ));
        }
        EchoUrl::parse(&self.multihop.echo_url)
            .map_err(|e| Error::config(format!("multihop.echo_url: {e}")))?;
        parse_listen("sentry.listen", &self.sentry.listen)?;
        parse_listen("sentry.admin_listen", &self.sentry.admin_listen)?;
        if self.ghost.port == 0 || self.ghost.acme_http_port == 0 {
            return Err(Error::config(
                "ghost.port and ghost.acme_http_port must not be 0",
            ));
        }
        if !(1..=36_500).contains(&self.ghost.acme_renew_before_days) {
            return Err(Error::config(
                "ghost.acme_renew_before_days must be between 1 and 36500",
            ));
        }
        if !(1..=604_800).contains(&self.ghost.acme_check_seconds) {
            return Err(Error::config(
                "ghost.acme_check_seconds must be between 1 and 604800",
            ));
        }
        if !(1..=4096).contains(&self.ghost.tunnels_per_secret) {
            return Err(Error::config(
                "ghost.tunnels_per_secret must be between 1 and 4096",
            ));
        }
        if self.ghost.tls == GhostTls::Files
            && (self.ghost.cert.is_empty() || self.ghost.key.is_empty())
        {
            return Err(Error::config(
                "ghost.tls = \"files\" needs ghost.cert and ghost.key",
            ));
        }
        if !self.ghost.acme_email.is_empty()
            && (!self.ghost.acme_email.contains('@')
                || self.ghost.acme_email.contains(char::is_whitespace))
        {
            return Err(Error::config(format!(
                "ghost.acme_email = {:?} is not an e-mail address",
                self.ghost.acme_email
            )));
        }
        self.sentry.validate().map_err(|e| Error::config(e.0))?;
        if SourcePrefix::new(self.sources.ipv6_prefix.bits()).is_none() {
            return Err(Error::config(format!(
                "sources.ipv6_prefix must be between {} and 128",
                SourcePrefix::MIN
            )));
        }
        Ok(())
    }
}

/// Checks `[[<key>]]` sync sources (the blocklist's, the DoH resolver list's): names,
/// locations, formats among `formats`, and the pins an http:// source needs.
fn validate_sync_sources(key: &str, sources: &[SyncSource], formats: &[&str]) -> Result<(), Error> {
    let mut names = std::collections::BTreeSet::new();
    for source in sources {
        if source.name.is_empty()
            || !source
                .name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_'))
        {
            return Err(Error::config(format!(
                "{key}: name {:?} must be letters, digits, '-' or '_'",
                source.name
            )));
        }
        if !names.insert(source.name.as_str()) {
            return Err(Error::config(format!(
                "{key}: the name {:?} is used twice",
                source.name
            )));
        }
        Location::parse(&source.url)
            .map_err(|e| Error::config(format!("{key} {:?}: {e}", source.name)))?;
        if !formats.contains(&source.format.as_str()) {
            return Err(Error::config(format!(
                "{key} {:?}: format must be one of {}",
                source.name,
                formats.join(", ")
            )));
        }
        if let Some(sum) = &source.sha256
            && (sum.len() != 64 || !sum.bytes().all(|c| c.is_ascii_hexdigit()))
        {
            return Err(Error::config(format!(
                "{key} {:?}: sha256 must be 64 hex digits",
                source.name
            )));
        }
        // Over plain http:// anyone on the path can swap the list and any checksum file
        // beside it; only what the configuration pins (the list's sha256, or the
        // publisher's key) proves the download is the publisher's.
        if source.url.starts_with("http://")
            && source.sha256.is_none()
            && source.minisign_key.is_none()
        {
            return Err(Error::config(format!(
                "{key} {:?}: an http:// source needs sha256 (the list's checksum, \
                 pinned) or minisign_key (the publisher's key); a sha256_url or a list's own \
                 checksum over plain http proves nothing. Use https:// otherwise",
                source.name
            )));
        }
        match (&source.minisign_key, &source.minisign_url) {
            (Some(key), url) => {
                minisign::PublicKey::from_base64(key.trim()).map_err(|e| {
                    Error::config(format!(
                        "{key} {:?}: minisign_key is not a minisign public key ({e})",
                        source.name
                    ))
                })?;
                if let Some(url) = url {
                    Location::parse(url).map_err(|e| {
                        Error::config(format!("{key} {:?}: minisign_url: {e}", source.name))
                    })?;
                }
            }
            (None, Some(_)) => {
                return Err(Error::config(format!(
                    "{key} {:?}: minisign_url needs minisign_key",
                    source.name
                )));
            }
            (None, None) => {}
        }
    }
    Ok(())
}

/// An address (a /32 or /128) or a CIDR prefix.
pub fn parse_net(s: &str) -> Option<ipnet::IpNet> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
}

fn validate_cidr(key: &str, value: &str) -> Result<(), Error> {
    let bad = || Error::config(format!("{key} = {value:?} is not an address/prefix"));
    let (addr, prefix) = value.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_validate() -> Result<(), Error> {
        let text = Config::default().to_toml()?;
        assert_eq!(Config::from_toml(&text)?, Config::default());
        Ok(())
    }

    #[test]
    fn sni_keys() -> Result<(), Error> {
        let c = Config::from_toml(
            "[dns]\nsni_strict = true\nech_fronts = [\"front.example.\", \"xn--bcher-kva.example\"]\n",
        )?;
        assert!(c.dns.sni_filter && c.dns.sni_strict);
        assert_eq!(c.dns.ech_fronts.len(), 2);
        Ok(())
    }

    #[test]
    fn empty_file_means_defaults() -> Result<(), Error> {
        assert_eq!(Config::from_toml("")?, Config::default());
        Ok(())
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::from_toml("[admin]\nsockett = \"/x\"\n");
        assert!(err.is_err());
    }

    #[test]
    fn a_toml_error_is_one_line_with_its_place_and_reason() {
        let Err(e) = Config::from_toml("[log]\nlevel = \"info\"\n[admin]\n  sockett = \"/x\"\n")
        else {
            panic!("accepted an unknown key");
        };
        let text = e.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(
            text.starts_with(
                "configuration: invalid TOML at line 4, column 3: unknown field `sockett`"
            ),
            "{text}"
        );
    }

    #[test]
    fn admin_https_keys() -> Result<(), Error> {
        let c = Config::from_toml(
            "[admin]\nhttp_listen = \"127.0.0.1:9443\"\nhttp_allow = [\"192.0.2.7\", \"10.1.2.3/8\", \"::1/128\"]\n",
        )?;
        assert_eq!(
            c.admin.http_listen_addr()?,
            Some("127.0.0.1:9443".parse().unwrap())
        );
        let nets: Vec<String> = c
            .admin
            .http_allow_nets()?
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(nets, ["192.0.2.7/32", "10.0.0.0/8", "::1/128"]);
        assert_eq!(Config::from_toml("")?.admin.http_listen_addr()?, None);
        Ok(())
    }

    #[test]
    fn bad_values_are_refused() {
        for text in [
            "state_dir = \"relative\"",
            "[metrics]\nlisten = \"nowhere\"",
            "[datapath]\nxdp_mode = \"turbo\"",
            "[datapath]\nuplink = \"this-name-is-far-too-long\"",
            "[wireguard]\nsubnet = \"10.8.0.0/33\"",
            "[wireguard]\nsubnet = \"10.0.0.0/15\"",
            "[dns]\nprimary = \"dns.google\"",
            "[dns]\nech_fronts = [\"not a name\"]",
            "[dns]\nech_fronts = [\"front..example\"]",
            "[log]\nlevel = \"[[[\"",
            "[multihop]\ntable = 254",
            "[multihop]\nmonitor_interval_seconds = 0",
            "[multihop]\nmonitor_interval_seconds = 5\nprobe_timeout_seconds = 5",
            "[multihop]\necho_url = \"https://example.com/\"",
            "[multihop]\ninterface = \"wg_main\"",
            "[sources]\nipv6_prefix = 16",
            "[ghost]\ntunnels_per_secret = 0",
            "[ghost]\ntunnels_per_secret = 4097",
            "[admin]\nhttp_listen = \"localhost\"",
            "[admin]\nhttp_allow = [\"10.0.0.0/33\"]",
            "[admin]\nhttp_allow = [\"anywhere\"]",
            "[admin]\ntls_cert = \"/etc/phantom/admin.pem\"",
            "[admin]\nhttp_rate_per_token = 0",
            "[admin]\naudit_max_bytes = 100",
        ] {
            assert!(Config::from_toml(text).is_err(), "accepted: {text}");
        }
    }

    #[test]
    fn plain_http_sources_need_a_pinned_checksum_or_key() -> Result<(), Error> {
        let source = |extra: &str| {
            format!(
                "[[blocklist.sources]]\nname = \"fleet\"\nurl = \"http://192.0.2.1:3000/api/v1/blocklist?format=full\"\n{extra}"
            )
        };
        let refused = Config::from_toml(&source("")).map(|_| ()).err();
        assert!(
            refused.is_some_and(|e| e.to_string().contains("needs sha256")),
            "a bare http:// source is refused"
        );
        assert!(
            Config::from_toml(&source("sha256_url = \"http://192.0.2.1/list.sha256\"\n")).is_err(),
            "a checksum from the same plain-http origin is not enough"
        );
        Config::from_toml(&source(&format!("sha256 = \"{}\"\n", "ab".repeat(32))))?;
        let key = minisign::KeyPair::generate_unencrypted_keypair()
            .map_err(|e| Error::config(e.to_string()))?
            .pk
            .to_base64();
        let config = Config::from_toml(&source(&format!("minisign_key = \"{key}\"\n")))?;
        assert_eq!(
            config.blocklist.sources[0].signature_url(),
            "http://192.0.2.1:3000/api/v1/blocklist.minisig?format=full",
            "the signature of a URL with a query sits beside its path"
        );
        let https = "[[blocklist.sources]]\nname = \"a\"\nurl = \"https://lists.example/x.txt\"\n";
        let config = Config::from_toml(https)?;
        assert_eq!(
            config.blocklist.sources[0].signature_url(),
            "https://lists.example/x.txt.minisig"
        );
        Ok(())
    }

    #[test]
    fn first_start_writes_the_defaults() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(Error::Socket)?;
        let path = dir.path().join("etc/phantom.toml");
        let (config, created) = Config::load_or_create(&path)?;
        assert!(created);
        assert_eq!(config, Config::default());
        let (again, created) = Config::load_or_create(&path)?;
        assert!(!created);
        assert_eq!(again, config);
        Ok(())
    }

    #[test]
    fn listen_off() -> Result<(), Error> {
        assert_eq!(parse_listen("k", "off")?, None);
        assert!(parse_listen("k", "127.0.0.1:1")?.is_some());
        Ok(())
    }
}

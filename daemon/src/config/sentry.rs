//! `[sentry]`: the proxy's static settings and the defence's tunables. The tunables are one
//! type, [`Tunables`], used both here (their first values, from the file) and at run time
//! (`sentry set_config`, the fleet's `sentry:config` record), so the two cannot drift apart.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::error::InvalidValue;

/// The largest difficulty (leading zero bits) a challenge may ask for.
pub const MAX_DIFFICULTY: u32 = 40;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct SentryConfig {
    pub enabled: bool,
    pub listen: String,
    pub upstream: String,
    pub admin_listen: String,
    pub redis_url: String,
    /// What the proxy does while Redis is unreachable: `open` serves without the defence,
    /// `closed` answers 503.
    pub redis_fail_mode: String,
    /// Addresses of a proxy in front of the sentry whose `X-Forwarded-For` (its last entry
    /// only) names the client. Empty = the TCP peer is the client.
    pub trusted_proxies: Vec<String>,
    /// Largest request body forwarded upstream; larger ones get 413.
    pub max_body_bytes: u64,
    /// How long the upstream may take to start its answer, and to send each next piece of
    /// it: past that the client gets 504 (or the answer is cut off).
    pub upstream_timeout_seconds: u64,
    /// Paths a challenged source may still fetch (robots.txt, `/.well-known/`, feeds): an
    /// entry ending in `/` covers everything under it, any other entry that exact path (the
    /// query string aside). Still counted; see docs/sentry.md "Good bots and open paths".
    pub open_paths: Vec<String>,
    /// Crawlers let through without a challenge when both their user agent and their
    /// address match (`[[sentry.good_bots]]`).
    pub good_bots: Vec<GoodBot>,
    /// TLS on `listen`: `off` (plain HTTP), `files`, `self_signed` or `acme`.
    pub tls: SentryTls,
    /// `tls = "files"`: the PEM certificate chain and key.
    pub tls_cert: String,
    pub tls_key: String,
    /// The site's name (a host name, or an address for a self-signed certificate): the
    /// subject of a self-signed certificate (empty: the listen address, or `localhost`) and
    /// of the ACME order (required).
    pub tls_domain: String,
    /// `tls = "acme"`: the CA's directory, the account's contact, where the HTTP-01
    /// responder listens while the CA validates, and a private CA's root (empty: the public
    /// web roots).
    pub tls_acme_directory: String,
    pub tls_acme_email: String,
    pub tls_acme_http_port: u16,
    pub tls_acme_ca_root: String,
    /// `[sentry.nojs]`: the challenge page's path for browsers without JavaScript.
    pub nojs: NoJsConfig,
    /// `[sentry.doomsday]`: the DOOMSDAY loader's snapshots of the site.
    pub doomsday: DoomsdayConfig,
    /// The defence's tunables: the first values of the store's `sentry:config`;
    /// `sentry set_config` changes them at run time (and in the store, for the whole fleet).
    /// Written as plain keys of `[sentry]`.
    #[serde(flatten)]
    pub tunables: Tunables,
    /// Keys neither above nor a tunable: refused by validation (serde cannot deny unknown
    /// fields next to a flattened struct).
    #[serde(flatten, skip_serializing)]
    pub unknown: BTreeMap<String, toml::Value>,
}

impl Default for SentryConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: "0.0.0.0:8080".into(),
            upstream: "http://127.0.0.1:8000".into(),
            admin_listen: "127.0.0.1:9090".into(),
            redis_url: String::new(),
            redis_fail_mode: "open".into(),
            trusted_proxies: Vec::new(),
            max_body_bytes: 10 * 1024 * 1024,
            upstream_timeout_seconds: 60,
            open_paths: DEFAULT_OPEN_PATHS.iter().map(|p| p.to_string()).collect(),
            good_bots: Vec::new(),
            tls: SentryTls::Off,
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_domain: String::new(),
            tls_acme_directory: "https://acme-v02.api.letsencrypt.org/directory".into(),
            tls_acme_email: String::new(),
            tls_acme_http_port: 80,
            tls_acme_ca_root: String::new(),
            nojs: NoJsConfig::default(),
            doomsday: DoomsdayConfig::default(),
            tunables: Tunables::default(),
            unknown: BTreeMap::new(),
        }
    }
}

/// Where the sentry's certificate comes from (`[sentry] tls`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SentryTls {
    /// Plain HTTP (a TLS terminator in front, or none).
    #[default]
    Off,
    Files,
    SelfSigned,
    Acme,
}

impl SentryTls {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Files => "files",
            Self::SelfSigned => "self_signed",
            Self::Acme => "acme",
        }
    }
}

/// `[sentry.nojs]`: what the challenge page offers a browser without JavaScript
/// (docs/sentry.md "Without JavaScript"): a delay at low penalty levels, the command-line
/// solver above them.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NoJsConfig {
    /// A challenge at this penalty level or below (the source's violations; its first
    /// challenge is level 1) offers the delay; above it, and always in DOOMSDAY, the command.
    /// 0 = never the delay.
    pub delay_max_penalty: u64,
    /// How long a delay token waits before it can be redeemed.
    pub delay_seconds: u64,
}

impl Default for NoJsConfig {
    fn default() -> Self {
        Self {
            delay_max_penalty: 2,
            delay_seconds: 5,
        }
    }
}

impl NoJsConfig {
    pub fn validate(&self) -> Result<(), InvalidValue> {
        if self.delay_max_penalty > 1_000 {
            return Err(InvalidValue(
                "sentry.nojs.delay_max_penalty must be between 0 and 1000".into(),
            ));
        }
        if !(1..=60).contains(&self.delay_seconds) {
            return Err(InvalidValue(
                "sentry.nojs.delay_seconds must be between 1 and 60".into(),
            ));
        }
        Ok(())
    }
}

/// `[sentry.doomsday]`: the snapshots of the site the DOOMSDAY loader renders
/// (docs/sentry.md "DOOMSDAY: the loader"). A snapshot is fetched from the upstream by the
/// sentry, at most once per `snapshot_refresh_seconds` per path, never per request.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DoomsdayConfig {
    /// How old a snapshot may get before a request for its path refreshes it.
    pub snapshot_refresh_seconds: u64,
    /// The largest upstream answer kept as a snapshot; a larger one is not snapshotted.
    pub snapshot_max_bytes: u64,
    /// How many paths have a snapshot at once; 0 = none (the loader goes on to the URL).
    pub snapshot_max_entries: usize,
}

impl Default for DoomsdayConfig {
    fn default() -> Self {
        Self {
            snapshot_refresh_seconds: 30,
            snapshot_max_bytes: 128 * 1024,
            snapshot_max_entries: 128,
        }
    }
}

impl DoomsdayConfig {
    pub fn validate(&self) -> Result<(), InvalidValue> {
        if !(1..=3_600).contains(&self.snapshot_refresh_seconds) {
            return Err(InvalidValue(
                "sentry.doomsday.snapshot_refresh_seconds must be between 1 and 3600".into(),
            ));
        }
        if !(1024..=4 * 1024 * 1024).contains(&self.snapshot_max_bytes) {
            return Err(InvalidValue(
                "sentry.doomsday.snapshot_max_bytes must be between 1024 and 4194304".into(),
            ));
        }
        if self.snapshot_max_entries > 10_000 {
            return Err(InvalidValue(
                "sentry.doomsday.snapshot_max_entries must be between 0 and 10000".into(),
            ));
        }
        Ok(())
    }
}

/// `[sentry] open_paths` when the file does not set it.
/// Not `/favicon.ico`: a browser asks for it by itself, and a challenged browser must
/// reach nothing of the upstream before it solves.
pub const DEFAULT_OPEN_PATHS: [&str; 3] = ["/robots.txt", "/sitemap.xml", "/.well-known/"];

/// Most networks one good bot may list (inline and from its file together).
pub const MAX_BOT_RANGES: usize = 100_000;

/// One `[[sentry.good_bots]]` entry: a crawler passes only when its `User-Agent` matches
/// `user_agent` (a regular expression, unanchored: `Googlebot` matches anywhere in the
/// header) **and** its address lies in one of its networks (`ranges`, and the lines of
/// `ranges_file`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GoodBot {
    /// The bot's name in status and metrics.
    pub name: String,
    /// A regular expression (Rust `regex` syntax) matched against the `User-Agent` header.
    pub user_agent: String,
    /// Networks written inline (`66.249.64.0/27`, `2001:4860:4801:10::/64`, or a bare address).
    pub ranges: Vec<String>,
    /// An absolute path to a file of networks, one a line; `#` starts a comment. Empty = none.
    pub ranges_file: String,
}

impl GoodBot {
    /// The bot's networks: `ranges` and the lines of `ranges_file`. The message names the
    /// bot, the file and the line.
    pub fn networks(&self) -> Result<Vec<ipnet::IpNet>, InvalidValue> {
        let bot = &self.name;
        let parse = |text: &str, at: &dyn Fn() -> String| {
            text.parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| {
                    InvalidValue(format!(
                        "sentry.good_bots {bot:?}: {text:?} ({}) is not a network (address/prefix) or an address",
                        at()
                    ))
                })
        };
        let mut nets = Vec::new();
        for r in &self.ranges {
            nets.push(parse(r.trim(), &|| "in ranges".to_string())?);
        }
        if !self.ranges_file.is_empty() {
            let path = std::path::Path::new(&self.ranges_file);
            if !path.is_absolute() {
                return Err(InvalidValue(format!(
                    "sentry.good_bots {bot:?}: ranges_file {:?} must be an absolute path",
                    self.ranges_file
                )));
            }
            let text = std::fs::read_to_string(path).map_err(|e| {
                InvalidValue(format!(
                    "sentry.good_bots {bot:?}: cannot read ranges_file {:?}: {e}",
                    self.ranges_file
                ))
            })?;
            for (i, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or("").trim();
                if line.is_empty() {
                    continue;
                }
                nets.push(parse(line, &|| {
                    format!("{} line {}", self.ranges_file, i + 1)
                })?);
                if nets.len() > MAX_BOT_RANGES {
                    break;
                }
            }
        }
        if nets.len() > MAX_BOT_RANGES {
            return Err(InvalidValue(format!(
                "sentry.good_bots {bot:?}: more than {MAX_BOT_RANGES} networks"
            )));
        }
        if nets.is_empty() {
            return Err(InvalidValue(format!(
                "sentry.good_bots {bot:?}: no networks (set ranges or ranges_file): a good bot is matched by user agent and address together, never by user agent alone"
            )));
        }
        Ok(nets)
    }

    fn validate(&self) -> Result<(), InvalidValue> {
        if self.name.is_empty() || self.name.len() > 64 {
            return Err(InvalidValue(
                "sentry.good_bots: every bot needs a name of 1 to 64 characters".into(),
            ));
        }
        if self.user_agent.is_empty() {
            return Err(InvalidValue(format!(
                "sentry.good_bots {:?}: user_agent must not be empty",
                self.name
            )));
        }
        regex::Regex::new(&self.user_agent).map_err(|e| {
            InvalidValue(format!(
                "sentry.good_bots {:?}: user_agent {:?} is not a valid regular expression: {e}",
                self.name, self.user_agent
            ))
        })?;
        self.networks().map(|_| ())
    }
}

/// Checks one `open_paths` entry: an absolute path without a query, `..` or `%`.
fn validate_open_path(p: &str) -> Result<(), InvalidValue> {
    let ok = p.starts_with('/')
        && !p.contains("..")
        && !p.contains("//")
        && !p.bytes().any(|b| {
            matches!(b, b'?' | b'#' | b'%' | b'\\')
                || b.is_ascii_whitespace()
                || b.is_ascii_control()
        });
    if ok {
        Ok(())
    } else {
        Err(InvalidValue(format!(
            "sentry.open_paths: {p:?} must be an absolute path (starting with /) without a query, \"..\", \"//\", \"%\", a backslash or spaces"
        )))
    }
}

/// The run-time tunables (`sentry:config`), shared by the fleet through the store.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Tunables {
    /// CPU busy % at or above which the defence is armed.
    pub activation_cpu_threshold: f64,
    /// Global requests/s at or above which the defence is armed too (0 = CPU only).
    pub activation_rate_threshold: u64,
    pub sensitivity_factor: f64,
    /// Requests in 5 s above which an IP is challenged during an anomaly.
    pub ip_static_threshold: u64,
    /// Requests in 5 s above which a ticket holder loses its ticket and is penalised while
    /// the defence is armed; 0 = 4 × `ip_static_threshold`.
    pub ticket_ceiling: u64,
    /// Violations after which an IP is dropped in the kernel.
    pub hard_block_after: u64,
    pub base_difficulty: u32,
    pub max_difficulty: u32,
    pub challenge_ttl_seconds: u64,
    pub ticket_ttl_seconds: u64,
    /// Penalty lifetime per violation.
    pub penalty_ttl_seconds: u64,
    /// DEFCON_1 ends after this long without an anomaly.
    pub calm_seconds: u64,
    /// Mean and standard deviation are recomputed this often.
    pub stats_interval_seconds: u64,
}

impl Default for Tunables {
    fn default() -> Self {
        Self {
            activation_cpu_threshold: 75.0,
            activation_rate_threshold: 0,
            sensitivity_factor: 3.0,
            ip_static_threshold: 15,
            ticket_ceiling: 0,
            hard_block_after: 5,
            base_difficulty: 16,
            max_difficulty: 24,
            challenge_ttl_seconds: 300,
            ticket_ttl_seconds: 600,
            penalty_ttl_seconds: 900,
            calm_seconds: 120,
            stats_interval_seconds: 60,
        }
    }
}

impl Tunables {
    /// Requests in 5 s a ticket holder may send while the defence is armed.
    pub fn effective_ticket_ceiling(&self) -> u64 {
        if self.ticket_ceiling == 0 {
            self.ip_static_threshold.saturating_mul(4)
        } else {
            self.ticket_ceiling
        }
    }

    /// Every rule a value must meet; the message names the key and its range.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        let bad = |m: String| Err(InvalidValue(m));
        if !(0.0..=100.0).contains(&self.activation_cpu_threshold) {
            return bad("activation_cpu_threshold must be between 0 and 100 (percent)".into());
        }
        if self.activation_rate_threshold > 100_000_000 {
            return bad("activation_rate_threshold must be at most 100000000".into());
        }
        if !(self.sensitivity_factor.is_finite()
            && (0.0..=100.0).contains(&self.sensitivity_factor))
        {
            return bad("sensitivity_factor must be between 0 and 100".into());
        }
        if !(1..=10_000_000).contains(&self.ip_static_threshold) {
            return bad("ip_static_threshold must be between 1 and 10000000".into());
        }
        if self.ticket_ceiling != 0
            && !(self.ip_static_threshold..=40_000_000).contains(&self.ticket_ceiling)
        {
            return bad(format!(
                "ticket_ceiling must be 0 (4 × ip_static_threshold) or between ip_static_threshold ({}) and 40000000",
                self.ip_static_threshold
            ));
        }
        if !(1..=1_000).contains(&self.hard_block_after) {
            return bad("hard_block_after must be between 1 and 1000".into());
        }
        if !(1..=MAX_DIFFICULTY).contains(&self.base_difficulty) {
            return bad(format!(
                "base_difficulty must be between 1 and {MAX_DIFFICULTY} bits"
            ));
        }
        if !(self.base_difficulty..=MAX_DIFFICULTY).contains(&self.max_difficulty) {
            return bad(format!(
                "max_difficulty must be between base_difficulty ({}) and {MAX_DIFFICULTY} bits",
                self.base_difficulty,
            ));
        }
        for (name, v, lo, hi) in [
            (
                "challenge_ttl_seconds",
                self.challenge_ttl_seconds,
                10,
                3_600,
            ),
            ("ticket_ttl_seconds", self.ticket_ttl_seconds, 10, 86_400),
            ("penalty_ttl_seconds", self.penalty_ttl_seconds, 1, 86_400),
            ("calm_seconds", self.calm_seconds, 1, 86_400),
            ("stats_interval_seconds", self.stats_interval_seconds, 1, 60),
        ] {
            if !(lo..=hi).contains(&v) {
                return bad(format!("{name} must be between {lo} and {hi}"));
            }
        }
        Ok(())
    }
}

/// `[sentry] upstream`: where the proxy forwards, `http://host:port` without a path.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub authority: hyper::http::uri::Authority,
}

impl Upstream {
    pub fn parse(url: &str) -> Result<Self, InvalidValue> {
        let bad = |why: &str| InvalidValue(format!("sentry.upstream = {url:?}: {why}"));
        let uri: hyper::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("only http:// upstreams are supported"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(bad("must not carry a path"));
        }
        Ok(Self { authority })
    }
}

impl SentryConfig {
    /// Checks the `[sentry]` section; messages name the key.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        if let Some(key) = self.unknown.keys().next() {
            return Err(InvalidValue(format!("sentry: unknown key {key:?}")));
        }
        Upstream::parse(&self.upstream)?;
        if !matches!(self.redis_fail_mode.as_str(), "open" | "closed") {
            return Err(InvalidValue(format!(
                "sentry.redis_fail_mode = {:?} must be \"open\" or \"closed\"",
                self.redis_fail_mode
            )));
        }
        if !self.redis_url.is_empty()
            && !["redis://", "rediss://", "redis+unix://", "unix://"]
                .iter()
                .any(|p| self.redis_url.starts_with(p))
        {
            return Err(InvalidValue(format!(
                "sentry.redis_url = {:?} must start with redis://, rediss://, redis+unix:// or unix://",
                self.redis_url
            )));
        }
        for p in &self.trusted_proxies {
            p.parse::<IpAddr>().map_err(|_| {
                InvalidValue(format!(
                    "sentry.trusted_proxies: {p:?} is not an IP address"
                ))
            })?;
        }
        if !(1024..=1 << 32).contains(&self.max_body_bytes) {
            return Err(InvalidValue(
                "sentry.max_body_bytes must be between 1024 and 4294967296".into(),
            ));
        }
        if !(1..=3_600).contains(&self.upstream_timeout_seconds) {
            return Err(InvalidValue(
                "sentry.upstream_timeout_seconds must be between 1 and 3600".into(),
            ));
        }
        if self.open_paths.len() > 1_000 {
            return Err(InvalidValue(
                "sentry.open_paths: at most 1000 entries".into(),
            ));
        }
        for p in &self.open_paths {
            validate_open_path(p)?;
        }
        if self.good_bots.len() > 100 {
            return Err(InvalidValue("sentry.good_bots: at most 100 bots".into()));
        }
        let mut names = std::collections::HashSet::new();
        for bot in &self.good_bots {
            bot.validate()?;
            if !names.insert(bot.name.as_str()) {
                return Err(InvalidValue(format!(
                    "sentry.good_bots: the name {:?} is used twice",
                    bot.name
                )));
            }
        }
        self.validate_tls()?;
        self.nojs.validate()?;
        self.doomsday.validate()?;
        self.tunables
            .validate()
            .map_err(|e| InvalidValue(format!("sentry.{e}")))
    }

    fn validate_tls(&self) -> Result<(), InvalidValue> {
        if self.tls == SentryTls::Files && (self.tls_cert.is_empty() || self.tls_key.is_empty()) {
            return Err(InvalidValue(
                "sentry.tls = \"files\" needs sentry.tls_cert and sentry.tls_key".into(),
            ));
        }
        let name_ok = |n: &str| {
            n.parse::<IpAddr>().is_ok()
                || (n.len() <= 253
                    && n.split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && !l.starts_with('-')
                            && !l.ends_with('-')
                            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    }))
        };
        if !self.tls_domain.is_empty() && !name_ok(&self.tls_domain) {
            return Err(InvalidValue(format!(
                "sentry.tls_domain = {:?} is not a domain name",
                self.tls_domain
            )));
        }
        if self.tls == SentryTls::Acme {
            if self.tls_domain.is_empty() {
                return Err(InvalidValue(
                    "sentry.tls = \"acme\" needs sentry.tls_domain (the name to certify)".into(),
                ));
            }
            if !self.tls_acme_directory.starts_with("https://") {
                return Err(InvalidValue(format!(
                    "sentry.tls_acme_directory = {:?} must be an https:// URL",
                    self.tls_acme_directory
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn upstream_urls() {
        assert!(Upstream::parse("http://127.0.0.1:8000").is_ok());
        assert!(Upstream::parse("https://127.0.0.1:8000").is_err());
        assert!(Upstream::parse("http://127.0.0.1:8000/app").is_err());
        assert!(Upstream::parse("nonsense").is_err());
    }

    #[test]
    fn the_nojs_table() {
        let c: SentryConfig =
            toml::from_str("[nojs]\ndelay_max_penalty = 0\ndelay_seconds = 3").unwrap();
        assert_eq!(c.nojs.delay_max_penalty, 0);
        assert_eq!(c.nojs.delay_seconds, 3);
        assert!(c.validate().is_ok());
        assert_eq!(SentryConfig::default().nojs, NoJsConfig::default());
        let bad: SentryConfig = toml::from_str("[nojs]\ndelay_seconds = 0").unwrap();
        assert!(bad.validate().unwrap_err().0.contains("delay_seconds"));
        assert!(toml::from_str::<SentryConfig>("[nojs]\ndelay = 3").is_err());
    }

    #[test]
    fn the_doomsday_table() {
        let c: SentryConfig =
            toml::from_str("[doomsday]\nsnapshot_refresh_seconds = 5\nsnapshot_max_entries = 0")
                .unwrap();
        assert_eq!(c.doomsday.snapshot_refresh_seconds, 5);
        assert_eq!(c.doomsday.snapshot_max_entries, 0);
        assert_eq!(c.doomsday.snapshot_max_bytes, 128 * 1024);
        assert!(c.validate().is_ok());
        let bad: SentryConfig = toml::from_str("[doomsday]\nsnapshot_max_bytes = 10").unwrap();
        assert!(bad.validate().unwrap_err().0.contains("snapshot_max_bytes"));
        assert!(toml::from_str::<SentryConfig>("[doomsday]\nrefresh = 3").is_err());
    }

    #[test]
    fn tunables_are_plain_keys_and_unknown_keys_are_refused() {
        let c: SentryConfig = toml::from_str("ip_static_threshold = 7\nenabled = true").unwrap();
        assert!(c.enabled);
        assert_eq!(c.tunables.ip_static_threshold, 7);
        assert!(c.validate().is_ok());
        let c: SentryConfig = toml::from_str("ip_static_treshold = 7").unwrap();
        assert!(c.validate().is_err());
        // The ticket ceiling follows the static threshold unless set, and never below it.
        let c: SentryConfig = toml::from_str("ip_static_threshold = 7").unwrap();
        assert_eq!(c.tunables.effective_ticket_ceiling(), 28);
        let c: SentryConfig =
            toml::from_str("ip_static_threshold = 7\nticket_ceiling = 6").unwrap();
        assert!(c.validate().is_err());
        let c: SentryConfig =
            toml::from_str("ip_static_threshold = 7\nticket_ceiling = 50").unwrap();
        assert_eq!(c.tunables.effective_ticket_ceiling(), 50);
        let text = toml::to_string(&SentryConfig::default()).unwrap();
        assert!(text.contains("ip_static_threshold = 15"), "{text}");
        let back: SentryConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, SentryConfig::default());
    }
}

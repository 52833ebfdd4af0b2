//! A provider's wg-quick file, read and checked field by field. Only what a client-side
//! WireGuard interface needs is accepted; wg-quick's hooks (`PostUp` and friends) are refused
//! because the daemon never runs commands out of an imported file.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use serde::{Deserialize, Serialize};

/// The MTU the exit gets when the file has none or a larger one: 80 bytes of WireGuard
/// overhead under a 1500-byte uplink.
pub const OPTIMAL_MTU: u16 = 1420;
/// Keeps NAT mappings between us and the exit open and lets the monitor see a dead exit.
pub const OPTIMAL_KEEPALIVE: u16 = 25;

/// The largest file we read: provider files are a few hundred bytes.
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// Where the exit's peer is: a literal address or a host name resolved when the exit is
/// brought up (and again whenever the monitor re-establishes it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A validated exit configuration, as stored (0600) in the state directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExitConfig {
    pub private_key: String,
    /// Interface addresses with prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    pub dns: Vec<String>,
    pub mtu: u16,
    pub listen_port: Option<u16>,
    pub public_key: String,
    pub preshared_key: Option<String>,
    pub endpoint: Endpoint,
    pub allowed_ips: Vec<(IpAddr, u8)>,
    pub persistent_keepalive: u16,
}

impl ExitConfig {
    /// The exit-side address our traffic leaves from (the first IPv4 address).
    pub fn ipv4(&self) -> Option<(Ipv4Addr, u8)> {
        self.addresses.iter().find_map(|(ip, p)| match ip {
            IpAddr::V4(v4) => Some((*v4, *p)),
            IpAddr::V6(_) => None,
        })
    }
}

/// Why a file is not an exit configuration we take.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path} is {size} bytes; a WireGuard config is at most {MAX_FILE_BYTES}")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{path} is not text (not a WireGuard config)")]
    NotText { path: PathBuf },
    /// The problem on line `line` (from 1).
    #[error("line {line}: {problem}")]
    Line {
        line: usize,
        #[source]
        problem: Box<ParseError>,
    },
    #[error("unknown section (not [Interface] or [Peer])")]
    UnknownSection,
    // The line itself is never echoed: the file may be anything the daemon can read.
    #[error("is not `Key = value` (not a WireGuard config)")]
    NotKeyValue,
    #[error("settings before any [Interface] or [Peer] section (not a WireGuard config)")]
    OutsideSection,
    /// A wg-quick hook or host setting (`PostUp`, `Table`...), `key` as written, lowercased.
    #[error(
        "{key} is a wg-quick host setting the daemon does not take from an imported file; remove it"
    )]
    HostSetting { key: String },
    /// A key we do not know (its first 40 characters).
    #[error("unknown key {key:?}")]
    UnknownKey { key: String },
    #[error("{field} is not a WireGuard key (44 characters of base64 for 32 bytes)")]
    NotAKey { field: &'static str },
    #[error("{field}: {value:?} is not address/prefix")]
    NotCidr { field: &'static str, value: String },
    #[error("{field}: port {value:?} is out of range (1-65535)")]
    PortOutOfRange { field: &'static str, value: String },
    #[error("Endpoint {value:?} is not host:port, ipv4:port or [ipv6]:port")]
    NotAnEndpoint { value: String },
    #[error("DNS: {value:?} is neither an address nor a search domain")]
    NotADnsServer { value: String },
    #[error("MTU {value:?} is not 1280-9000")]
    MtuOutOfRange { value: String },
    #[error("PersistentKeepalive {value:?} is not 0-65535 or off")]
    NotAKeepalive { value: String },
    #[error(
        "a WireGuard exit config has exactly one [Interface] and one [Peer] section (found {interfaces} and {peers})"
    )]
    SectionCount { interfaces: usize, peers: usize },
    #[error("[Interface] has no PrivateKey")]
    NoPrivateKey,
    #[error("[Peer] has no PublicKey")]
    NoPublicKey,
    #[error("[Peer] has no Endpoint: an exit must say where it is")]
    NoEndpoint,
    #[error("[Interface] Address has no IPv4 address (clients' traffic is IPv4)")]
    NoIpv4Address,
    #[error(
        "[Peer] AllowedIPs does not include 0.0.0.0/0: the peer cannot be an exit to the internet"
    )]
    NotAnExit,
    #[error("PrivateKey and PublicKey are the same key")]
    SameKeys,
}

/// The outcome of parsing: the config and the changes made for multihop.
pub struct Parsed {
    pub config: ExitConfig,
    pub optimizations: Vec<String>,
}

/// Reads and validates `path`.
pub fn read(path: &Path) -> Result<Parsed, ParseError> {
    let unreadable = |source| ParseError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if !meta.is_file() {
        return Err(ParseError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(ParseError::TooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
        });
    }
    let bytes = std::fs::read(path).map_err(unreadable)?;
    let text = String::from_utf8(bytes).map_err(|_| ParseError::NotText {
        path: path.to_path_buf(),
    })?;
    parse(&text)
}

fn key(field: &'static str, value: &str) -> Result<String, ParseError> {
    match STANDARD.decode(value.trim()) {
        Ok(bytes) if bytes.len() == 32 => Ok(value.trim().to_string()),
        _ => Err(ParseError::NotAKey { field }),
    }
}

fn cidr(field: &'static str, value: &str) -> Result<(IpAddr, u8), ParseError> {
    let bad = || ParseError::NotCidr {
        field,
        value: value.to_string(),
    };
    let (addr, prefix) = match value.split_once('/') {
        Some((a, p)) => (a.trim(), Some(p.trim())),
        None => (value.trim(), None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
        None => max,
    };
    Ok((addr, prefix))
}

fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn port(field: &'static str, value: &str) -> Result<u16, ParseError> {
    value
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|p| (1..=65535).contains(p))
        .map(|p| p as u16)
        .ok_or_else(|| ParseError::PortOutOfRange {
            field,
            value: value.to_string(),
        })
}

fn is_hostname(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn endpoint(value: &str) -> Result<Endpoint, ParseError> {
    let value = value.trim();
    let bad = || ParseError::NotAnEndpoint {
        value: value.to_string(),
    };
    let (host, port_text) = if let Some(rest) = value.strip_prefix('[') {
        let (host, rest) = rest.split_once(']').ok_or_else(bad)?;
        let port_text = rest.strip_prefix(':').ok_or_else(bad)?;
        host.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
        (host.to_string(), port_text)
    } else {
        let (host, port_text) = value.rsplit_once(':').ok_or_else(bad)?;
        if host.parse::<Ipv4Addr>().is_err() && !is_hostname(host) {
            return Err(bad());
        }
        (host.to_ascii_lowercase(), port_text)
    };
    Ok(Endpoint {
        host,
        port: port("Endpoint", port_text)?,
    })
}

#[derive(PartialEq)]
enum Section {
    None,
    Interface,
    Peer,
}

/// Parses a wg-quick text. Exactly one `[Interface]` and one `[Peer]`; keys as wg-quick
/// spells them (case-insensitive); `#` comments.
pub fn parse(text: &str) -> Result<Parsed, ParseError> {
    let mut section = Section::None;
    let (mut interfaces, mut peers) = (0usize, 0usize);
    let mut private_key = None;
    let mut addresses = Vec::new();
    let mut dns = Vec::new();
    let mut mtu = None;
    let mut listen_port = None;
    let mut public_key = None;
    let mut preshared_key = None;
    let mut endpoint_value = None;
    let mut allowed_ips = Vec::new();
    let mut keepalive = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = |problem: ParseError| ParseError::Line {
            line: n + 1,
            problem: Box::new(problem),
        };
        if line.starts_with('[') {
            section = match line.to_ascii_lowercase().as_str() {
                "[interface]" => {
                    interfaces += 1;
                    Section::Interface
                }
                "[peer]" => {
                    peers += 1;
                    Section::Peer
                }
                _ => return Err(at(ParseError::UnknownSection)),
            };
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            return Err(at(ParseError::NotKeyValue));
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match (&section, name.as_str()) {
            (Section::None, _) => {
                return Err(at(ParseError::OutsideSection));
            }
            (Section::Interface, "privatekey") => private_key = Some(key("PrivateKey", value)?),
            (Section::Interface, "address") => {
                for a in list(value) {
                    addresses.push(cidr("Address", a).map_err(at)?);
                }
            }
            (Section::Interface, "dns") => {
                for d in list(value) {
                    if d.parse::<IpAddr>().is_err() && !is_hostname(d) {
                        return Err(at(ParseError::NotADnsServer {
                            value: d.to_string(),
                        }));
                    }
                    dns.push(d.to_string());
                }
            }
            (Section::Interface, "mtu") => {
                mtu = Some(
                    value
                        .parse::<u16>()
                        .ok()
                        .filter(|m| (1280..=9000).contains(m))
                        .ok_or_else(|| {
                            at(ParseError::MtuOutOfRange {
                                value: value.to_string(),
                            })
                        })?,
                )
            }
            (Section::Interface, "listenport") => {
                listen_port = Some(port("ListenPort", value).map_err(at)?)
            }
            (
                Section::Interface,
                "preup" | "postup" | "predown" | "postdown" | "table" | "saveconfig" | "fwmark",
            ) => {
                return Err(at(ParseError::HostSetting { key: name.clone() }));
            }
            (Section::Peer, "publickey") => public_key = Some(key("PublicKey", value)?),
            (Section::Peer, "presharedkey") => preshared_key = Some(key("PresharedKey", value)?),
            (Section::Peer, "endpoint") => endpoint_value = Some(endpoint(value).map_err(at)?),
            (Section::Peer, "allowedips") => {
                for a in list(value) {
                    allowed_ips.push(cidr("AllowedIPs", a).map_err(at)?);
                }
            }
            (Section::Peer, "persistentkeepalive") => {
                keepalive = Some(if value.eq_ignore_ascii_case("off") {
                    0
                } else {
                    value.parse::<u16>().map_err(|_| {
                        at(ParseError::NotAKeepalive {
                            value: value.to_string(),
                        })
                    })?
                })
            }
            (_, other) => {
                return Err(at(ParseError::UnknownKey {
                    key: other.chars().take(40).collect(),
                }));
            }
        }
    }
    if interfaces != 1 || peers != 1 {
        return Err(ParseError::SectionCount { interfaces, peers });
    }
    let private_key = private_key.ok_or(ParseError::NoPrivateKey)?;
    let public_key = public_key.ok_or(ParseError::NoPublicKey)?;
    let endpoint = endpoint_value.ok_or(ParseError::NoEndpoint)?;
    if !addresses.iter().any(|(ip, _)| ip.is_ipv4()) {
        return Err(ParseError::NoIpv4Address);
    }
    let full_v4 = allowed_ips.iter().any(|(ip, p)| ip.is_ipv4() && *p == 0)
        || (allowed_ips.contains(&(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 1))
            && allowed_ips.contains(&(IpAddr::V4(Ipv4Addr::new(128, 0, 0, 0)), 1)));
    if !full_v4 {
        return Err(ParseError::NotAnExit);
    }
    if private_key == public_key {
        return Err(ParseError::SameKeys);
    }
    let mut optimizations = Vec::new();
    let mtu = match mtu {
        Some(m) if m <= OPTIMAL_MTU => m,
        _ => {
            optimizations.push(format!("MTU optimized to {OPTIMAL_MTU}"));
            OPTIMAL_MTU
        }
    };
    let persistent_keepalive = match keepalive {
        Some(k) if k > 0 => k,
        _ => {
            optimizations.push(format!("PersistentKeepalive set to {OPTIMAL_KEEPALIVE}"));
            OPTIMAL_KEEPALIVE
        }
    };
    Ok(Parsed {
        config: ExitConfig {
            private_key,
            addresses,
            dns,
            mtu,
            listen_port,
            public_key,
            preshared_key,
            endpoint,
            allowed_ips,
            persistent_keepalive,
        },
        optimizations,
    })
}

/// A provider name guessed from the endpoint host and the file name, for `list_exits`.
pub fn provider(endpoint_host: &str, file_name: &str) -> String {
    let haystack = format!("{endpoint_host} {file_name}").to_ascii_lowercase();
    for (needle, name) in [
        ("mullvad", "Mullvad"),
        ("proton", "ProtonVPN"),
        ("ivpn", "IVPN"),
        ("airvpn", "AirVPN"),
        ("windscribe", "Windscribe"),
        ("nordvpn", "NordVPN"),
        ("surfshark", "Surfshark"),
        ("privateinternetaccess", "Private Internet Access"),
        ("azire", "AzireVPN"),
        ("ovpn", "OVPN"),
    ] {
        if haystack.contains(needle) {
            return name.into();
        }
    }
    "Custom".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn file(extra_interface: &str, extra_peer: &str) -> String {
        format!(
            "# provider file\n[Interface]\nPrivateKey = {A}\nAddress = 10.64.1.2/32, fc00:bbbb::2/128\nDNS = 10.64.0.1\n{extra_interface}\n[Peer]\nPublicKey = {B}\nAllowedIPs = 0.0.0.0/0, ::/0\n{extra_peer}\n"
        )
    }

    #[test]
    fn a_provider_file_is_read_and_optimised() -> Result<(), ParseError> {
        let parsed = parse(&file("", "Endpoint = se-sto-wg-001.example.net:51820"))?;
        let c = parsed.config;
        assert_eq!(c.endpoint.host, "se-sto-wg-001.example.net");
        assert_eq!(c.endpoint.port, 51820);
        assert_eq!(c.ipv4(), Some((Ipv4Addr::new(10, 64, 1, 2), 32)));
        assert_eq!(c.mtu, OPTIMAL_MTU);
        assert_eq!(c.persistent_keepalive, OPTIMAL_KEEPALIVE);
        assert_eq!(parsed.optimizations.len(), 2);
        let parsed = parse(&file(
            "MTU = 1380",
            "Endpoint = [2001:db8::1]:51820\nPersistentKeepalive = 15\nPresharedKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
        ))?;
        assert_eq!(parsed.config.mtu, 1380);
        assert_eq!(parsed.config.endpoint.to_string(), "[2001:db8::1]:51820");
        assert!(parsed.optimizations.is_empty());
        Ok(())
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, needle) in [
            ("hello world".to_string(), "not a WireGuard config"),
            (file("", ""), "no Endpoint"),
            (file("", "Endpoint = 192.0.2.1:70000"), "out of range"),
            (file("", "Endpoint = 192.0.2.1:0"), "out of range"),
            (file("", "Endpoint = 192.0.2.1"), "not host:port"),
            (
                file("PostUp = rm -rf /", "Endpoint = 192.0.2.1:1"),
                "postup",
            ),
            (file("MTU = 100", "Endpoint = 192.0.2.1:1"), "MTU"),
            (file("Bogus = 1", "Endpoint = 192.0.2.1:1"), "unknown key"),
            (
                file("", "Endpoint = 192.0.2.1:1").replace(B, "not-a-key"),
                "PublicKey is not a WireGuard key",
            ),
            (
                file("", "Endpoint = 192.0.2.1:1").replace("0.0.0.0/0, ", ""),
                "0.0.0.0/0",
            ),
            (
                file("", "Endpoint = 192.0.2.1:1").replace("10.64.1.2/32, ", ""),
                "no IPv4",
            ),
            (
                format!(
                    "{}\n[Peer]\nPublicKey = {B}\n",
                    file("", "Endpoint = 192.0.2.1:1")
                ),
                "exactly one",
            ),
        ] {
            match parse(&text) {
                Ok(_) => panic!("accepted: {text}"),
                Err(e) => assert!(
                    e.to_string().contains(needle),
                    "{e} should mention {needle:?}"
                ),
            }
        }
    }

    #[test]
    fn providers_are_recognised() {
        assert_eq!(provider("se-sto-wg-001.mullvad.net", "x"), "Mullvad");
        assert_eq!(provider("192.0.2.1", "proton-ch.conf"), "ProtonVPN");
        assert_eq!(provider("192.0.2.1", "exit.conf"), "Custom");
    }
}

//! Encrypted DNS that would route VPN clients around the resolver, closed in the kernel
//! (`tc_encrypted_dns` on the WireGuard interface): DoT and DoQ to anyone but this resolver,
//! and DoH to the known DoH resolvers' addresses (a list shipped as data, plus the operator's).
//! Browsers and phones that cannot reach their encrypted resolver fall back to the system's,
//! which is this one. See docs/dns.md, "Encrypted DNS to other resolvers".

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    blocklist::sync::{Verified, fetch_verified},
    config::{DnsConfig, SyncSource, parse_net},
    datapath::encrypted_dns::EncryptedDnsSettings,
    error::Error,
    store,
};

/// The shipped list of DoH resolvers' addresses.
const SHIPPED: &str = include_str!("../../data/doh-resolvers.txt");

/// Parses a list (one address or prefix per line, `#` comments); errors name `what` and the
/// line.
fn parse_list(what: &str, text: &str) -> Result<Vec<IpNet>, Error> {
    text.lines()
        .enumerate()
        .map(|(i, line)| (i, line.split('#').next().unwrap_or_default().trim()))
        .filter(|(_, line)| !line.is_empty())
        .map(|(i, line)| {
            parse_net(line).ok_or_else(|| {
                Error::config(format!(
                    "{what}, line {}: {line:?} is not an address or CIDR prefix",
                    i + 1
                ))
            })
        })
        .collect()
}

/// Every DoH resolver the kernel is to know: the shipped list, `doh_resolvers` and the file.
pub fn doh_resolvers(config: &DnsConfig) -> Result<Vec<IpNet>, Error> {
    let mut all = parse_list("the shipped DoH resolver list", SHIPPED)?;
    for r in &config.doh_resolvers {
        all.push(parse_net(r).ok_or_else(|| {
            Error::config(format!(
                "dns.doh_resolvers: {r:?} is not an address or CIDR prefix"
            ))
        })?);
    }
    if !config.doh_resolvers_file.is_empty() {
        let path = Path::new(&config.doh_resolvers_file);
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        all.extend(parse_list(
            &format!("dns.doh_resolvers_file {}", path.display()),
            &text,
        )?);
    }
    Ok(all)
}

/// The kernel's settings for `resolvers` (the addresses the resolver listens on).
pub fn settings(
    config: &DnsConfig,
    doh: &[IpNet],
    resolvers: impl IntoIterator<Item = IpAddr>,
) -> EncryptedDnsSettings {
    EncryptedDnsSettings {
        drop_dot_doq: config.drop_dot_doq,
        drop_doh: config.drop_doh,
        resolvers: resolvers.into_iter().collect(),
        doh: if config.drop_doh {
            doh.to_vec()
        } else {
            Vec::new()
        },
    }
}

/// What one DoH list source's last sync did, kept in `state_dir/doh-sync.json` with the
/// prefixes it gave, so a restart applies the last accepted list without the network.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DohSourceState {
    pub name: String,
    pub url: String,
    pub last_attempt: Option<u64>,
    pub last_success: Option<u64>,
    /// SHA-256 of the last accepted download.
    pub sha256: Option<String>,
    /// The checks that vouched for it (`pinned`, `sha256_url`, `minisign`, joined by `+`), or
    /// `none` (an https:// or file source without pins).
    pub verified_by: Option<String>,
    /// The last accepted download's prefixes.
    pub prefixes: Vec<IpNet>,
    /// Lines of the last accepted download that were not an address or prefix.
    pub skipped: usize,
    /// Why the last attempt was rejected (the accepted list stays).
    pub error: Option<String>,
}

/// `[[dns.doh_sources]]`: DoH resolver lists followed with the blocklist's download checks
/// (`blocklist::sync::fetch_verified`): a download that fails a check, or has no usable line,
/// changes nothing.
pub struct DohSync {
    path: PathBuf,
    states: Mutex<BTreeMap<String, DohSourceState>>,
    /// One sync at a time.
    running: Mutex<()>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl DohSync {
    pub fn open(state_dir: &Path) -> Result<Self, Error> {
        let path = state_dir.join("doh-sync.json");
        let states: BTreeMap<String, DohSourceState> =
            store::read_json_or_set_aside(&path, "DoH list sync")?;
        Ok(Self {
            path,
            states: Mutex::new(states),
            running: Mutex::new(()),
        })
    }

    fn all(&self) -> BTreeMap<String, DohSourceState> {
        match self.states.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The configured sources' states (a source never synced: its name and URL only).
    pub fn states(&self, sources: &[SyncSource]) -> Vec<DohSourceState> {
        let all = self.all();
        sources
            .iter()
            .map(|s| {
                all.get(&s.name).cloned().unwrap_or_else(|| DohSourceState {
                    name: s.name.clone(),
                    url: s.url.clone(),
                    ..DohSourceState::default()
                })
            })
            .collect()
    }

    /// The accepted prefixes of the configured sources (a source no longer configured no
    /// longer counts; its record stays on disk).
    pub fn prefixes(&self, sources: &[SyncSource]) -> Vec<IpNet> {
        self.states(sources)
            .into_iter()
            .flat_map(|s| s.prefixes)
            .collect()
    }

    /// Syncs each source in turn and records the results (blocking: call it off the runtime's
    /// workers).
    pub fn sync_all(&self, sources: &[SyncSource]) -> Vec<DohSourceState> {
        let _one_at_a_time = self.running.lock();
        let previous = self.all();
        let results: Vec<DohSourceState> = sources
            .iter()
            .map(|s| sync_one(s, previous.get(&s.name).cloned()))
            .collect();
        if let Ok(mut states) = self.states.lock() {
            for r in &results {
                states.insert(r.name.clone(), r.clone());
            }
            if let Err(e) = store::write_json(&self.path, &*states) {
                warn!(error = %e, "cannot record the DoH list sync results");
            }
        }
        results
    }
}

fn sync_one(source: &SyncSource, previous: Option<DohSourceState>) -> DohSourceState {
    let mut state = previous.unwrap_or_default();
    state.name = source.name.clone();
    state.url = source.url.clone();
    state.last_attempt = Some(now_secs());
    let fetched = fetch_verified(source).map_err(|e| e.to_string()).and_then(
        |Verified {
             body,
             sha256,
             verified_by,
         }| {
            let text = String::from_utf8(body)
                .map_err(|_| "the download is not UTF-8 text".to_string())?;
            let mut prefixes = Vec::new();
            let mut skipped = 0;
            for line in text.lines() {
                let line = line.split('#').next().unwrap_or_default().trim();
                if line.is_empty() {
                    continue;
                }
                match parse_net(line) {
                    Some(net) => prefixes.push(net),
                    None => skipped += 1,
                }
            }
            if prefixes.is_empty() {
                return Err(format!(
                    "no usable address or prefix in the download ({skipped} lines skipped)"
                ));
            }
            let verified_by = if verified_by.is_empty() {
                "none".to_string()
            } else {
                verified_by.join("+")
            };
            Ok((prefixes, skipped, sha256, verified_by))
        },
    );
    match fetched {
        Ok((prefixes, skipped, sha256, verified_by)) => {
            info!(source = %source.name, prefixes = prefixes.len(), skipped, "DoH resolver list synced");
            state.last_success = state.last_attempt;
            state.prefixes = prefixes;
            state.skipped = skipped;
            state.sha256 = Some(sha256);
            state.verified_by = Some(verified_by);
            state.error = None;
        }
        Err(e) => {
            warn!(source = %source.name, error = %e, "DoH resolver list rejected; the last accepted one stays");
            state.error = Some(e);
        }
    }
    state
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_shipped_list_parses_and_holds_the_big_resolvers() {
        let all = doh_resolvers(&DnsConfig::default()).unwrap();
        for ip in ["8.8.8.8", "1.1.1.1", "9.9.9.9", "2606:4700:4700::1111"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(all.iter().any(|n| n.contains(&ip)), "{ip}");
        }
        assert!(all.len() > 50);
    }

    #[test]
    fn a_bad_line_names_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("doh.txt");
        std::fs::write(&file, "# mine\n192.0.2.0/24\nnot-an-address\n").unwrap();
        let config = DnsConfig {
            doh_resolvers_file: file.display().to_string(),
            ..DnsConfig::default()
        };
        let e = doh_resolvers(&config).unwrap_err().to_string();
        assert!(
            e.contains("doh.txt, line 3") && e.contains("not-an-address"),
            "{e}"
        );
        let off = settings(
            &DnsConfig {
                drop_doh: false,
                ..DnsConfig::default()
            },
            &[parse_net("192.0.2.0/24").unwrap()],
            [],
        );
        assert!(off.doh.is_empty());
    }
}

#[cfg(test)]
mod sync_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn source(dir: &Path, sha256: Option<String>) -> SyncSource {
        SyncSource {
            name: "team".into(),
            url: dir.join("doh.txt").display().to_string(),
            format: "plain".into(),
            sha256,
            sha256_url: None,
            minisign_key: None,
            minisign_url: None,
        }
    }

    #[test]
    fn a_checked_list_is_kept_and_a_failed_one_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let list = "# ours\n192.0.2.53\n2001:db8::/48\nnonsense\n";
        std::fs::write(dir.path().join("doh.txt"), list).unwrap();
        let sha = {
            use sha2::Digest;
            sha2::Sha256::digest(list.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let sync = DohSync::open(state.path()).unwrap();
        let src = source(dir.path(), Some(sha));
        let r = sync.sync_all(std::slice::from_ref(&src));
        assert_eq!(r[0].error, None);
        assert_eq!((r[0].prefixes.len(), r[0].skipped), (2, 1));
        assert_eq!(r[0].verified_by.as_deref(), Some("pinned"));
        // Changed under its pin: rejected, the accepted list stays, also after a reopen.
        std::fs::write(dir.path().join("doh.txt"), "198.51.100.53\n").unwrap();
        let r = sync.sync_all(std::slice::from_ref(&src));
        assert!(
            r[0].error.as_deref().unwrap().contains("checksum mismatch"),
            "{r:?}"
        );
        let again = DohSync::open(state.path()).unwrap();
        assert_eq!(again.prefixes(std::slice::from_ref(&src)).len(), 2);
        // Not configured any more: not counted.
        assert!(again.prefixes(&[]).is_empty());
        // Nothing usable: rejected.
        let unpinned = source(dir.path(), None);
        std::fs::write(dir.path().join("doh.txt"), "nonsense\n").unwrap();
        let r = again.sync_all(std::slice::from_ref(&unpinned));
        assert!(
            r[0].error.as_deref().unwrap().contains("no usable"),
            "{r:?}"
        );
        assert_eq!(r[0].prefixes.len(), 2);
    }
}

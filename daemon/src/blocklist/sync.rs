//! `blocklist sync`: lists fetched from files or URLs, on a schedule and on demand.
//!
//! A source owns the entries it brought (their reason is `sync:<name>`): a sync adds what is new
//! and removes what the source dropped, in one version, and never touches entries an operator
//! added. A download is rejected whole, and nothing changes, when its checksum does not match
//! (a SHA-256 pinned in the configuration, one fetched from `sha256_url`, or the `checksum` a
//! seed-format list carries), when it is empty, or when no line of it is usable.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Read,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::{
    Blocklist, BlocklistError,
    batch::Batch,
    import::{self, Format},
    model::{Entry, Pattern},
};
use crate::{
    config::{Location, SyncSource},
    error::{Error, InvalidValue},
    store,
};

/// Downloads larger than this (decompressed) are refused: another Phantom's full list of a
/// million names is about 280 MB as JSON.
const MAX_BYTES: u64 = 512 * 1024 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a source's download was rejected (and nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The source's `url` (or `sha256_url`) is neither a file nor an http(s) URL.
    #[error(transparent)]
    Location(#[from] InvalidValue),
    /// The file cannot be opened.
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP request failed (connection, status, timeout).
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    /// Reading the download (a file or a URL) failed.
    #[error("{from}: {source}")]
    Read {
        from: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{from}: larger than {} MiB", MAX_BYTES >> 20)]
    TooLarge { from: String },
    #[error("the download is empty")]
    Empty,
    /// The download's SHA-256 is not the one pinned in the configuration.
    #[error("checksum mismatch: expected sha256 {expected}, got {computed}")]
    PinnedChecksumMismatch { expected: String, computed: String },
    /// The download's SHA-256 is not the one `sha256_url` publishes.
    #[error("checksum mismatch: {url} says {claimed:?}, the download is {computed}")]
    PublishedChecksumMismatch {
        url: String,
        claimed: String,
        computed: String,
    },
    /// The minisign signature cannot be fetched, does not parse, or does not verify with the
    /// configured key.
    #[error("signature check failed ({url}): {reason}")]
    Signature {
        url: String,
        #[source]
        reason: minisign::PError,
    },
    /// A seed-format list's own `checksum` does not match its content.
    #[error("checksum mismatch: the list claims {claimed}, its content is {computed}")]
    ChecksumMismatch { claimed: String, computed: String },
    /// A seed-format list whose `entries` do not parse.
    #[error("entries do not parse: {0}")]
    Entries(#[source] serde_json::Error),
    /// A seed-format list whose `patterns` do not parse.
    #[error("patterns do not parse: {0}")]
    Patterns(#[source] serde_json::Error),
    #[error("the download is not UTF-8 text")]
    NotText,
    #[error("unknown format {0:?}")]
    UnknownFormat(String),
    #[error("no usable entry in the download ({skipped} lines skipped)")]
    NoUsableEntry { skipped: usize },
    /// The list would not take the changes.
    #[error(transparent)]
    Apply(#[from] BlocklistError),
}

/// Checks `body` against the minisign signature at `url` with the publisher's `key`.
fn verify_signature(key: &str, url: &str, body: &[u8]) -> Result<(), SyncError> {
    let failed = |reason| SyncError::Signature {
        url: url.to_string(),
        reason,
    };
    let key = minisign::PublicKey::from_base64(key.trim()).map_err(failed)?;
    let text = fetch(&Location::parse(url)?)?;
    let text = String::from_utf8(text).map_err(|_| SyncError::NotText)?;
    let signature = minisign::SignatureBox::from_string(&text).map_err(failed)?;
    minisign::verify(
        &key,
        &signature,
        std::io::Cursor::new(body),
        true,
        false,
        false,
    )
    .map_err(failed)
}

/// Downloads the list at `location` (at most `MAX_BYTES`).
fn fetch(location: &Location) -> Result<Vec<u8>, SyncError> {
    match location {
        Location::File(p) => {
            let f = std::fs::File::open(p).map_err(|source| SyncError::Open {
                path: p.clone(),
                source,
            })?;
            read_limited(f, &p.display().to_string())
        }
        Location::Http(url) => {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(FETCH_TIMEOUT))
                .build()
                .into();
            let response = agent.get(url).call().map_err(|e| SyncError::Http {
                url: url.clone(),
                source: Box::new(e),
            })?;
            read_limited(response.into_body().into_reader(), url)
        }
    }
}

fn read_limited(r: impl Read, from: &str) -> Result<Vec<u8>, SyncError> {
    let mut body = Vec::new();
    r.take(MAX_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|source| SyncError::Read {
            from: from.to_string(),
            source,
        })?;
    if body.len() as u64 > MAX_BYTES {
        return Err(SyncError::TooLarge {
            from: from.to_string(),
        });
    }
    Ok(body)
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A download that passed every check its source configures.
pub struct Verified {
    pub body: Vec<u8>,
    /// Its SHA-256, hex.
    pub sha256: String,
    /// Every check that vouched for it (`pinned`, `sha256_url`, `minisign`), strongest last.
    pub verified_by: Vec<&'static str>,
}

/// Fetches `source` and checks it against what its configuration pins or points at (its
/// SHA-256, the published checksum, the publisher's minisign signature). Anything that fails
/// is an error and nothing is returned. Blocking: call it off the runtime's workers. Shared by
/// every list Phantom follows (the blocklist's sources, the DoH resolver list's).
pub fn fetch_verified(source: &SyncSource) -> Result<Verified, SyncError> {
    let location = Location::parse(&source.url)?;
    let body = fetch(&location)?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(SyncError::Empty);
    }
    let sha = sha256_hex(&body);
    // Every check that vouched for the download, strongest last.
    let mut verified: Vec<&'static str> = Vec::new();
    if let Some(pinned) = &source.sha256 {
        if !pinned.eq_ignore_ascii_case(&sha) {
            return Err(SyncError::PinnedChecksumMismatch {
                expected: pinned.clone(),
                computed: sha,
            });
        }
        verified.push("pinned");
    }
    if let Some(url) = &source.sha256_url {
        let text = fetch(&Location::parse(url)?)?;
        let text = String::from_utf8_lossy(&text);
        let claimed = text.split_whitespace().next().unwrap_or("");
        if !claimed.eq_ignore_ascii_case(&sha) {
            return Err(SyncError::PublishedChecksumMismatch {
                url: url.clone(),
                claimed: claimed.to_string(),
                computed: sha,
            });
        }
        verified.push("sha256_url");
    }
    if let Some(key) = &source.minisign_key {
        let url = source.signature_url();
        verify_signature(key, &url, &body)?;
        verified.push("minisign");
    }
    Ok(Verified {
        body,
        sha256: sha,
        verified_by: verified,
    })
}

/// What a source's last sync did, kept in the state directory.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SourceState {
    pub name: String,
    pub url: String,
    pub last_attempt: Option<u64>,
    pub last_success: Option<u64>,
    /// SHA-256 of the last accepted download.
    pub sha256: Option<String>,
    /// How the last accepted download was verified: every check that vouched for it joined by
    /// `+` (`pinned`, `sha256_url`, `minisign`), `embedded` (only a seed list's own checksum, which
    /// proves integrity, not origin) or `none`.
    pub verified_by: Option<String>,
    pub entries: usize,
    pub added: usize,
    pub removed: usize,
    pub skipped: usize,
    pub unchanged: bool,
    pub error: Option<String>,
}

/// What `[blocklist]` says about syncing; changed live by SIGHUP.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Schedule {
    pub sources: Vec<SyncSource>,
    /// 0 = only on `blocklist sync`.
    pub interval_seconds: u64,
}

pub struct Syncer {
    path: PathBuf,
    schedule: Mutex<Schedule>,
    states: Mutex<BTreeMap<String, SourceState>>,
    /// One sync at a time: the schedule and an admin call never interleave.
    running: Mutex<()>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The `checksum` of a seed-format list, recomputed as the publisher computes it.
fn seed_checksum(value: &serde_json::Value) -> Option<Result<(), SyncError>> {
    let claimed = value.get("checksum")?.as_str()?.to_string();
    let entries: Vec<Entry> = match value.get("entries") {
        Some(e) => match serde_json::from_value(e.clone()) {
            Ok(v) => v,
            Err(e) => return Some(Err(SyncError::Entries(e))),
        },
        None => Vec::new(),
    };
    let patterns: Vec<Pattern> = match value.get("patterns") {
        Some(p) => match serde_json::from_value(p.clone()) {
            Ok(v) => v,
            Err(e) => return Some(Err(SyncError::Patterns(e))),
        },
        None => Vec::new(),
    };
    let mut by_domain = entries;
    by_domain.sort_by(|a, b| a.domain.cmp(&b.domain));
    let computed = super::list_checksum(by_domain.into_iter(), &patterns);
    Some(if computed == claimed {
        Ok(())
    } else {
        Err(SyncError::ChecksumMismatch { claimed, computed })
    })
}

impl Syncer {
    pub fn open(state_dir: &Path) -> Result<Self, Error> {
        let path = state_dir.join("blocklist-sync.json");
        let states: BTreeMap<String, SourceState> =
            store::read_json_or_set_aside(&path, "blocklist sync")?;
        Ok(Self {
            path,
            schedule: Mutex::new(Schedule::default()),
            states: Mutex::new(states),
            running: Mutex::new(()),
        })
    }

    /// The sources and interval in force.
    pub fn schedule(&self) -> Schedule {
        match self.schedule.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set_schedule(&self, schedule: Schedule) {
        match self.schedule.lock() {
            Ok(mut s) => *s = schedule,
            Err(p) => *p.into_inner() = schedule,
        }
    }

    pub fn states(&self, sources: &[SyncSource]) -> Vec<SourceState> {
        let states = self.states.lock().map(|s| s.clone()).unwrap_or_default();
        sources
            .iter()
            .map(|s| {
                states.get(&s.name).cloned().unwrap_or_else(|| SourceState {
                    name: s.name.clone(),
                    url: s.url.clone(),
                    ..SourceState::default()
                })
            })
            .collect()
    }

    /// Syncs each source in turn (blocking: call it off the runtime's workers).
    pub fn sync_all(&self, list: &Blocklist, sources: &[SyncSource]) -> Vec<SourceState> {
        let _one_at_a_time = self.running.lock();
        let results: Vec<SourceState> = sources.iter().map(|s| self.sync_one(list, s)).collect();
        if let Ok(mut states) = self.states.lock() {
            // Records of sources no longer configured stay on disk but are never shown
            // (`states` lists configured sources only); a source added back finds its history.
            for r in &results {
                states.insert(r.name.clone(), r.clone());
            }
            if let Err(e) = store::write_json(&self.path, &*states) {
                warn!(error = %e, "cannot record the sync results");
            }
        }
        results
    }

    fn sync_one(&self, list: &Blocklist, source: &SyncSource) -> SourceState {
        let previous = self
            .states
            .lock()
            .ok()
            .and_then(|s| s.get(&source.name).cloned())
            .unwrap_or_default();
        let mut state = SourceState {
            name: source.name.clone(),
            url: source.url.clone(),
            last_attempt: Some(now_secs()),
            last_success: previous.last_success,
            sha256: previous.sha256.clone(),
            verified_by: previous.verified_by.clone(),
            entries: list.domains_with_reason(&reason(source)).len(),
            ..SourceState::default()
        };
        match self.fetch_and_apply(list, source, previous.sha256.as_deref()) {
            Ok(outcome) => {
                state.last_success = state.last_attempt;
                state.sha256 = Some(outcome.sha256);
                state.verified_by = Some(outcome.verified_by.clone());
                state.entries = outcome.entries;
                state.added = outcome.added;
                state.removed = outcome.removed;
                state.skipped = outcome.skipped;
                state.unchanged = outcome.unchanged;
                info!(
                    source = %source.name,
                    entries = outcome.entries,
                    added = outcome.added,
                    removed = outcome.removed,
                    unchanged = outcome.unchanged,
                    "blocklist source synced"
                );
            }
            Err(e) => {
                warn!(source = %source.name, error = %e, "blocklist source rejected; nothing changed");
                state.error = Some(e.to_string());
            }
        }
        state
    }

    fn fetch_and_apply(
        &self,
        list: &Blocklist,
        source: &SyncSource,
        last_sha: Option<&str>,
    ) -> Result<Outcome, SyncError> {
        let Verified {
            body,
            sha256: sha,
            verified_by: checks,
        } = fetch_verified(source)?;
        let mut verified = checks;
        let text = String::from_utf8(body).map_err(|_| SyncError::NotText)?;
        let format = match source.format.as_str() {
            "auto" => Format::detect(&text),
            f => Format::parse(f).ok_or_else(|| SyncError::UnknownFormat(f.to_string()))?,
        };
        if format == Format::Json
            && let Ok(value) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(check) = seed_checksum(&value)
        {
            check?;
            if verified.is_empty() {
                verified.push("embedded");
            }
        }
        let verified_by = if verified.is_empty() {
            "none".to_string()
        } else {
            verified.join("+")
        };
        let owned: BTreeSet<String> = list
            .domains_with_reason(&reason(source))
            .into_iter()
            .collect();
        if last_sha == Some(sha.as_str()) && !owned.is_empty() {
            return Ok(Outcome {
                sha256: sha,
                verified_by,
                entries: owned.len(),
                unchanged: true,
                ..Outcome::default()
            });
        }
        let why = reason(source);
        let parsed = import::parse_batch(&text, format, &why, now_secs());
        drop(text);
        if parsed.entries.is_empty() {
            return Err(SyncError::NoUsableEntry {
                skipped: parsed.skipped.len(),
            });
        }
        let mut upserts = Batch::default();
        let mut wanted = BTreeSet::new();
        for e in parsed.entries.iter() {
            // Operator entries win: a source never takes over a domain listed by hand.
            if let Some(existing) = list.get(e.domain())
                && existing.reason != why
            {
                continue;
            }
            if !wanted.insert(e.domain().to_string()) {
                continue;
            }
            if !owned.contains(e.domain()) {
                // The source's reason, whatever a seed list's entry says.
                let stamp = upserts.stamp(e.added_at(), &why);
                upserts.push_from(e, stamp);
            }
        }
        let removals: Vec<String> = owned.difference(&wanted).cloned().collect();
        let (added, removed) = (upserts.len(), removals.len());
        list.apply_batch(upserts, removals)?;
        Ok(Outcome {
            sha256: sha,
            verified_by,
            entries: wanted.len(),
            added,
            removed,
            skipped: parsed.skipped.len(),
            unchanged: false,
        })
    }
}

#[derive(Default)]
struct Outcome {
    sha256: String,
    verified_by: String,
    entries: usize,
    added: usize,
    removed: usize,
    skipped: usize,
    unchanged: bool,
}

pub fn reason(source: &SyncSource) -> String {
    format!("sync:{}", source.name)
}

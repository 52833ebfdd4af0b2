//! The DOOMSDAY loader's snapshots of the site (docs/sentry.md "DOOMSDAY: the loader"). In
//! DOOMSDAY a browser's navigation gets `loader.html`, which solves a `max_difficulty`
//! puzzle and renders the requested page from a snapshot the sentry keeps: fetched from the
//! upstream by the sentry itself, at most once per `snapshot_refresh_seconds` per path (the
//! first request for a path waits for it; later ones get what is there while one request
//! refreshes it), never once per request. Each snapshot is sealed once when fetched, with
//! AES-256-GCM under a random key of its own, and that sealed text is shared by every loader
//! page for the path; each client's signed package carries the key, so only a solver reads it.
//!
//! Bounded: at most `snapshot_max_entries` paths (a new path takes the place of one nobody
//! asked for in ten refresh periods, else it gets no snapshot), each at most
//! `snapshot_max_bytes`, so the upstream sees at most `snapshot_max_entries` fetches per
//! refresh period whatever the clients ask for.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aes_gcm::{
    Aes256Gcm, KeyInit,
    aead::{Aead, Payload},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use tokio::sync::watch;

use super::challenge::random_bytes;
use crate::config::sentry::DoomsdayConfig;

/// The associated data of a sealed snapshot: this prefix and the path it is of.
pub const AAD_PREFIX: &str = "phantom-snapshot:";
/// How long a request waits for a snapshot being fetched for it.
const FETCH_WAIT: Duration = Duration::from_secs(10);
/// Longest path (with its query) a snapshot is kept for.
const MAX_PATH: usize = 2048;

/// What a snapshot fetch found.
#[derive(Debug)]
pub enum Fetched {
    /// A page to keep: `html` (else plain text) and its body.
    Page { html: bool, body: Vec<u8> },
    /// The upstream answered, but not with a page to keep (not 200, another type, too large):
    /// the path's snapshot is dropped.
    NotAPage,
    /// No answer (refused, timed out): the last snapshot stays.
    Failed,
}

/// One path's page, sealed.
#[derive(Debug)]
pub struct Snapshot {
    pub key: [u8; 32],
    /// b64url of the 12-byte IV.
    pub iv: String,
    /// b64url of the AES-256-GCM output (tag appended); AAD = [`AAD_PREFIX`] ‖ path.
    pub sealed: String,
    /// `text/html` (rendered as the page) or `text/plain` (shown as text).
    pub html: bool,
}

struct Slot {
    snapshot: Option<Arc<Snapshot>>,
    attempted: Instant,
    used: Instant,
    /// While a fetch is under way: it says when it is done (or was dropped).
    fetching: Option<watch::Receiver<bool>>,
}

/// The snapshots by path and query.
pub struct Snapshots {
    slots: Mutex<HashMap<String, Slot>>,
    refresh: Duration,
    max_entries: usize,
    /// `snapshot_max_bytes`: the fetcher reads no more.
    pub max_bytes: usize,
    fetches: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

enum Step {
    Have(Option<Arc<Snapshot>>),
    Wait(watch::Receiver<bool>),
    Fetch(watch::Sender<bool>),
}

impl Snapshots {
    pub fn new(cfg: &DoomsdayConfig) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            refresh: Duration::from_secs(cfg.snapshot_refresh_seconds),
            max_entries: cfg.snapshot_max_entries,
            max_bytes: usize::try_from(cfg.snapshot_max_bytes).unwrap_or(usize::MAX),
            fetches: AtomicU64::new(0),
        }
    }

    /// Snapshots held.
    pub fn len(&self) -> usize {
        lock(&self.slots)
            .values()
            .filter(|s| s.snapshot.is_some())
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fetches from the upstream so far.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The snapshot of `path`, fetched with `fetch` when there is none yet or it is older
    /// than the refresh period (one request per path does; the others wait for it or take
    /// the older one).
    pub async fn get<F, Fut>(&self, path: &str, fetch: F) -> Option<Arc<Snapshot>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Fetched>,
    {
        if self.max_entries == 0 || path.len() > MAX_PATH {
            return None;
        }
        let now = Instant::now();
        let step = {
            let mut slots = lock(&self.slots);
            if !slots.contains_key(path) && slots.len() >= self.max_entries {
                // Room only from a path nobody asked for in ten refresh periods.
                let idle = slots
                    .iter()
                    .filter(|(_, s)| now.duration_since(s.used) > self.refresh * 10)
                    .min_by_key(|(_, s)| s.used)
                    .map(|(k, _)| k.clone());
                match idle {
                    Some(k) => {
                        slots.remove(&k);
                    }
                    None => return None,
                }
            }
            match slots.get_mut(path) {
                Some(slot) => {
                    slot.used = now;
                    if now.duration_since(slot.attempted) < self.refresh {
                        match (&slot.snapshot, &slot.fetching) {
                            (None, Some(rx)) => Step::Wait(rx.clone()),
                            (s, _) => Step::Have(s.clone()),
                        }
                    } else if let Some(s) =
                        slot.snapshot.clone().filter(|_| slot.fetching.is_some())
                    {
                        Step::Have(Some(s))
                    } else {
                        let (tx, rx) = watch::channel(false);
                        slot.attempted = now;
                        slot.fetching = Some(rx);
                        Step::Fetch(tx)
                    }
                }
                None => {
                    let (tx, rx) = watch::channel(false);
                    slots.insert(
                        path.to_string(),
                        Slot {
                            snapshot: None,
                            attempted: now,
                            used: now,
                            fetching: Some(rx),
                        },
                    );
                    Step::Fetch(tx)
                }
            }
        };
        match step {
            Step::Have(s) => s,
            Step::Wait(mut rx) => {
                let _ = tokio::time::timeout(FETCH_WAIT, rx.changed()).await;
                lock(&self.slots).get(path).and_then(|s| s.snapshot.clone())
            }
            Step::Fetch(done) => {
                self.fetches.fetch_add(1, Ordering::Relaxed);
                let fetched = tokio::time::timeout(FETCH_WAIT, fetch())
                    .await
                    .unwrap_or(Fetched::Failed);
                let sealed = match fetched {
                    Fetched::Page { html, body } => Some(seal(path, html, &body)),
                    Fetched::NotAPage => None,
                    Fetched::Failed => Some(None),
                };
                let out = {
                    let mut slots = lock(&self.slots);
                    slots.get_mut(path).and_then(|slot| {
                        slot.fetching = None;
                        match sealed {
                            // Failed: the older snapshot stays.
                            Some(None) => {}
                            Some(Some(s)) => slot.snapshot = Some(Arc::new(s)),
                            None => slot.snapshot = None,
                        }
                        slot.snapshot.clone()
                    })
                };
                let _ = done.send(true);
                out
            }
        }
    }
}

/// What a DOOMSDAY package carries for the loader: where the page is and, with a snapshot,
/// the key that opens it — `{"loader":1,"url":…,"key":…|null}`.
pub fn loader_content(path: &str, snapshot: Option<&Snapshot>) -> Vec<u8> {
    serde_json::json!({
        "loader": 1,
        "url": super::same_origin_target(path),
        "key": snapshot.map(|s| B64.encode(s.key)),
    })
    .to_string()
    .into_bytes()
}

/// The sealed snapshot as the loader page carries it: `{"iv","data","html"}`, or `null`.
pub fn loader_json(snapshot: Option<&Snapshot>) -> String {
    match snapshot {
        Some(s) => serde_json::json!({"iv": s.iv, "data": s.sealed, "html": s.html}).to_string(),
        None => "null".into(),
    }
}

/// Seals a page under a fresh key; `None` when no randomness is to be had.
fn seal(path: &str, html: bool, body: &[u8]) -> Option<Snapshot> {
    let key: [u8; 32] = random_bytes().ok()?;
    let iv: [u8; 12] = random_bytes().ok()?;
    let aad = format!("{AAD_PREFIX}{path}");
    let sealed = Aes256Gcm::new_from_slice(&key)
        .ok()?
        .encrypt(
            &iv.into(),
            Payload {
                msg: body,
                aad: aad.as_bytes(),
            },
        )
        .ok()?;
    Some(Snapshot {
        key,
        iv: B64.encode(iv),
        sealed: B64.encode(sealed),
        html,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn config(entries: usize) -> DoomsdayConfig {
        DoomsdayConfig {
            snapshot_refresh_seconds: 3_600,
            snapshot_max_bytes: 4096,
            snapshot_max_entries: entries,
        }
    }

    fn open(s: &Snapshot, path: &str) -> Vec<u8> {
        let iv: [u8; 12] = B64.decode(&s.iv).unwrap().try_into().unwrap();
        Aes256Gcm::new_from_slice(&s.key)
            .unwrap()
            .decrypt(
                &iv.into(),
                Payload {
                    msg: &B64.decode(&s.sealed).unwrap(),
                    aad: format!("{AAD_PREFIX}{path}").as_bytes(),
                },
            )
            .unwrap()
    }

    #[tokio::test]
    async fn fetched_once_per_period_shared_sealed_and_bounded() {
        let snaps = Arc::new(Snapshots::new(&config(2)));
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = |body: &'static str| {
            let calls = Arc::clone(&calls);
            move || async move {
                calls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Fetched::Page {
                    html: true,
                    body: body.as_bytes().to_vec(),
                }
            }
        };
        // Twenty requests at once for one path: one fetch, and all of them get it.
        let mut waiting = Vec::new();
        for _ in 0..20 {
            let snaps = Arc::clone(&snaps);
            let f = fetch("<p>a</p>");
            waiting.push(tokio::spawn(async move { snaps.get("/a", f).await }));
        }
        let mut keys = Vec::new();
        for w in waiting {
            let s = w.await.unwrap().unwrap();
            assert_eq!(open(&s, "/a"), b"<p>a</p>");
            keys.push(s.key);
        }
        assert!(keys.windows(2).all(|k| k[0] == k[1]));
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        // Again within the period: no fetch.
        assert!(snaps.get("/a", fetch("x")).await.is_some());
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        // Bound to the path: the sealed text does not open as another path's.
        let s = snaps.get("/a", fetch("x")).await.unwrap();
        let iv: [u8; 12] = B64.decode(&s.iv).unwrap().try_into().unwrap();
        assert!(
            Aes256Gcm::new_from_slice(&s.key)
                .unwrap()
                .decrypt(
                    &iv.into(),
                    Payload {
                        msg: &B64.decode(&s.sealed).unwrap(),
                        aad: format!("{AAD_PREFIX}/b").as_bytes(),
                    },
                )
                .is_err()
        );
        // Two paths fill it; a third gets none and costs no fetch.
        assert!(snaps.get("/b", fetch("b")).await.is_some());
        assert!(snaps.get("/c", fetch("c")).await.is_none());
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        assert_eq!(snaps.len(), 2);
        assert_eq!(snaps.fetches(), 2);
    }

    #[tokio::test]
    async fn not_a_page_drops_it_a_failure_keeps_the_last_one() {
        let snaps = Snapshots {
            refresh: Duration::ZERO,
            ..Snapshots::new(&config(4))
        };
        let page = || async {
            Fetched::Page {
                html: false,
                body: b"text".to_vec(),
            }
        };
        assert!(!snaps.get("/p", page).await.unwrap().html);
        assert!(
            snaps
                .get("/p", || async { Fetched::Failed })
                .await
                .is_some()
        );
        assert!(
            snaps
                .get("/p", || async { Fetched::NotAPage })
                .await
                .is_none()
        );
        assert!(snaps.is_empty());
        // Off: nothing fetched at all.
        let off = Snapshots::new(&config(0));
        assert!(off.get("/p", page).await.is_none());
        assert_eq!(off.fetches(), 0);
    }
}

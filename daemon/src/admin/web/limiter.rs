//! Fixed one-minute windows of requests per key (a token name, a source), bounded in memory.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::Mutex,
    time::{Duration, Instant},
};

const WINDOW: Duration = Duration::from_secs(60);
/// Keys tracked at once; past it, finished windows are dropped, and a new key over the bound
/// is refused (the allowlist keeps real sources few; tokens are at most the store's 1,024).
const MAX_KEYS: usize = 16_384;

pub struct Limiter<K> {
    per_minute: u32,
    windows: Mutex<HashMap<K, (Instant, u32)>>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one request of `key`: `Ok`, or `Err(seconds until its window ends)`.
    pub fn hit(&self, key: &K) -> Result<(), u64> {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if !windows.contains_key(key) && windows.len() >= MAX_KEYS {
            windows.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
            if windows.len() >= MAX_KEYS {
                return Err(WINDOW.as_secs());
            }
        }
        let (start, count) = windows.entry(key.clone()).or_insert((now, 0));
        if now.duration_since(*start) >= WINDOW {
            *start = now;
            *count = 0;
        }
        if *count >= self.per_minute {
            let left = WINDOW.saturating_sub(now.duration_since(*start));
            return Err(left.as_secs().max(1));
        }
        *count += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_key() {
        let l = Limiter::new(3);
        for _ in 0..3 {
            assert!(l.hit(&"a").is_ok());
        }
        let retry = l.hit(&"a").unwrap_err();
        assert!((1..=60).contains(&retry));
        assert!(l.hit(&"b").is_ok());
    }
}

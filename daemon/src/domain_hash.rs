//! The domain hash keyed per installation (`phantom_common::dns::DomainKey`): the kernel's
//! blocked-domain set and the blocklist's matcher key their rules by it.
//!
//! A secret seed of 32 random bytes is made at first start and kept in the state directory
//! (`domain-hash.key`, 0600, written atomically); the key's 256 multipliers are derived from it
//! with SHA-256. Nobody without the seed can choose a list entry whose key equals another
//! name's (`com`, say, which would block a whole TLD). Two different names with the same key
//! can still be made by someone who has the seed, so every set keyed by the hash refuses the
//! second name of such a pair ([`KeyClash`]); to tell "the same name again" from "another name
//! with the same key" without keeping every name, each rule carries a [`DomainHasher::tag`]:
//! 32 bits of a second hash, keyed at random per process.
//!
//! Nothing on disk depends on the key's value: the kernel set is rebuilt from names whenever
//! the key in the kernel is not this one (a new installation, a lost seed).

use std::{
    hash::BuildHasher,
    path::{Path, PathBuf},
};

use phantom_common::dns::{DomainKey, KEY_POSITIONS};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::{error::Error, store};

/// The seed's file in the state directory.
pub const SEED_FILE: &str = "domain-hash.key";

/// Bytes of a seed.
pub const SEED_LEN: usize = 32;

/// Two different names with the same key: a set keyed by the hash cannot hold both, so the
/// second is refused. `other` names the one already there, or says where it is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, thiserror::Error)]
#[error(
    "{name} has the same 64-bit key as {other} under this installation's domain hash; a set keyed by it cannot hold both, so {name} was refused"
)]
pub struct KeyClash {
    pub name: String,
    pub other: String,
}

/// The installation's domain hash, and the per-process tag that tells names with the same key
/// apart.
pub struct DomainHasher {
    key: Box<DomainKey>,
    tags: std::collections::hash_map::RandomState,
}

/// Where the seed came from at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeedOrigin {
    /// Read from the state directory.
    Loaded,
    /// None there: made now (a new installation).
    Created,
    /// The file did not hold a seed: moved aside and a new one made.
    Replaced,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_seed(text: &str) -> Option<[u8; SEED_LEN]> {
    let text = text.trim();
    if text.len() != SEED_LEN * 2 || !text.is_ascii() {
        return None;
    }
    let mut seed = [0u8; SEED_LEN];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(seed)
}

/// The seed's file in `state_dir`.
pub fn seed_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SEED_FILE)
}

/// The file text of a seed: 64 hex digits and a newline (what a test writes to choose it).
pub fn seed_text(seed: &[u8; SEED_LEN]) -> String {
    format!("{}\n", hex(seed))
}

impl DomainHasher {
    /// The key derived from `seed`: multiplier `i` is the first 8 bytes (little endian) of
    /// SHA-256 over a label, the seed and `i` (two bytes, little endian).
    pub fn from_seed(seed: &[u8; SEED_LEN]) -> Self {
        let mut key = Box::new(DomainKey::ZERO);
        for (i, m) in key.mul.iter_mut().enumerate() {
            let digest = Sha256::new()
                .chain_update(b"phantom domain hash v1\0")
                .chain_update(seed)
                .chain_update((i as u16).to_le_bytes())
                .finalize();
            let mut word = [0u8; 8];
            word.copy_from_slice(&digest[..8]);
            *m = u64::from_le_bytes(word);
        }
        debug_assert_eq!(key.mul.len(), KEY_POSITIONS);
        Self {
            key,
            tags: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The installation's hasher: the seed in `state_dir`, made (0600, atomically) when there
    /// is none. A file that does not hold a seed is moved aside (`.corrupt-<unix>`) with an error and
    /// replaced: the key only decides how the kernel set is laid out, which is rebuilt at start.
    pub fn load_or_create(state_dir: &Path) -> Result<(Self, SeedOrigin), Error> {
        let path = seed_path(state_dir);
        let origin = match std::fs::read_to_string(&path) {
            Ok(text) => match parse_seed(&text) {
                Some(seed) => return Ok((Self::from_seed(&seed), SeedOrigin::Loaded)),
                None => {
                    let moved = store::set_aside(&path)?;
                    tracing::error!(
                        module = "blocklist",
                        file = %path.display(),
                        moved_to = %moved.display(),
                        "the domain hash seed file does not hold a seed: moved aside, a new one is made \
                         (the kernel's domain set is rebuilt under it)"
                    );
                    SeedOrigin::Replaced
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SeedOrigin::Created,
            Err(e) => return Err(Error::io(&path, e)),
        };
        let mut seed = [0u8; SEED_LEN];
        getrandom::fill(&mut seed).map_err(|e| {
            Error::io(
                &path,
                std::io::Error::other(format!("no randomness for a seed: {e}")),
            )
        })?;
        store::write_atomic(&path, seed_text(&seed).as_bytes())?;
        info!(path = %path.display(), "domain hash seed made for this installation");
        Ok((Self::from_seed(&seed), origin))
    }

    pub fn key(&self) -> &DomainKey {
        &self.key
    }

    /// The key of a normalised name (the kernel's and the matcher's).
    pub fn hash(&self, name: &str) -> u64 {
        self.key.hash(name.as_bytes())
    }

    /// 32 bits of a second, independent hash of `name` (random per process): two names with
    /// the same key and different tags are different names.
    pub fn tag(&self, name: &str) -> u32 {
        (self.tags.hash_one(name) >> 32) as u32
    }
}

/// Letters of the label [`colliding_pair`] varies.
const PAIR_LABEL: usize = 32;

/// Two different names `<32 letters>.<suffix>` with the same key under `hasher`: what someone
/// who knows the seed can make, and what the sets keyed by the hash must refuse. The search is
/// a generalised birthday over small letter differences (the key is linear in the letters):
/// 2^18 random 0/1 vectors over the label's positions; four rounds each pair vectors whose
/// sums agree on the next 16 bits and keep their differences, so what is left sums to 0 on
/// all 64 bits with every difference within 8. About a second; deterministic. For tests (the
/// end-to-end test writes a known seed first); `None` if nothing was found.
pub fn colliding_pair(hasher: &DomainHasher, suffix: &str) -> Option<(String, String)> {
    // Position from the end of the name of the label's letter i.
    let position = |i: usize| (PAIR_LABEL - 1 - i) + 1 + suffix.len();
    let weights: Vec<u64> = (0..PAIR_LABEL)
        .map(|i| hasher.key().mul[position(i) % KEY_POSITIONS])
        .collect();
    let sum = |v: &[i8; PAIR_LABEL]| {
        v.iter().zip(&weights).fold(0u64, |acc, (d, w)| {
            acc.wrapping_add(w.wrapping_mul(i64::from(*d) as u64))
        })
    };
    // xorshift64*: reproducible, no dependency.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut level: Vec<(u64, [i8; PAIR_LABEL])> = (0..1 << 18)
        .map(|_| {
            let bits = next();
            let mut v = [0i8; PAIR_LABEL];
            for (i, d) in v.iter_mut().enumerate() {
                *d = ((bits >> i) & 1) as i8;
            }
            (sum(&v), v)
        })
        .collect();
    for round in 0..4 {
        let shift = 16 * round;
        level.sort_unstable_by_key(|(s, _)| (s >> shift) & 0xffff);
        let mut next_level = Vec::with_capacity(level.len());
        for pair in level.windows(2) {
            let ((sa, va), (sb, vb)) = (&pair[0], &pair[1]);
            if (sa >> shift) & 0xffff != (sb >> shift) & 0xffff {
                continue;
            }
            let mut d = [0i8; PAIR_LABEL];
            for (i, x) in d.iter_mut().enumerate() {
                *x = va[i] - vb[i];
            }
            if d.iter().any(|x| *x != 0) {
                next_level.push((sa.wrapping_sub(*sb), d));
            }
        }
        level = next_level;
    }
    let (_, d) = level
        .into_iter()
        .find(|(s, d)| *s == 0 && d.iter().all(|x| x.abs() <= 12))?;
    let a: String = std::iter::repeat_n('m', PAIR_LABEL).collect();
    let b: String = d
        .iter()
        .map(|x| char::from((i16::from(b'm') + i16::from(*x)) as u8))
        .collect();
    let (a, b) = (format!("{a}.{suffix}"), format!("{b}.{suffix}"));
    (hasher.hash(&a) == hasher.hash(&b)).then_some((a, b))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn seeds_round_trip_and_bad_text_is_not_a_seed() {
        let seed = [0xa5u8; SEED_LEN];
        assert_eq!(parse_seed(&seed_text(&seed)), Some(seed));
        assert_eq!(parse_seed("zz"), None);
        assert_eq!(parse_seed(&"g".repeat(64)), None);
        assert_eq!(parse_seed(&"é".repeat(32)), None);
    }

    #[test]
    fn the_seed_is_made_once_0600_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, origin) = DomainHasher::load_or_create(dir.path()).unwrap();
        assert_eq!(origin, SeedOrigin::Created);
        let path = seed_path(dir.path());
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (b, origin) = DomainHasher::load_or_create(dir.path()).unwrap();
        assert_eq!(origin, SeedOrigin::Loaded);
        assert_eq!(a.hash("casino.example"), b.hash("casino.example"));
        // Another installation, another key.
        let other = tempfile::tempdir().unwrap();
        let (c, _) = DomainHasher::load_or_create(other.path()).unwrap();
        assert_ne!(a.hash("casino.example"), c.hash("casino.example"));
        // A broken file is moved aside and replaced.
        std::fs::write(&path, "not a seed").unwrap();
        let (_, origin) = DomainHasher::load_or_create(dir.path()).unwrap();
        assert_eq!(origin, SeedOrigin::Replaced);
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("domain-hash.key.corrupt-")
            })
            .count();
        assert_eq!(aside, 1);
    }

    #[test]
    fn a_pair_made_under_one_seed_does_not_collide_under_another() {
        let known = DomainHasher::from_seed(&[1; SEED_LEN]);
        let (a, b) = colliding_pair(&known, "example").unwrap();
        assert_ne!(a, b);
        assert_eq!(known.hash(&a), known.hash(&b));
        let other = DomainHasher::from_seed(&[2; SEED_LEN]);
        assert_ne!(other.hash(&a), other.hash(&b));
    }

    #[test]
    fn a_known_seed_gives_a_known_key() {
        let h = DomainHasher::from_seed(&[7; SEED_LEN]);
        assert_eq!(h.hash("com"), h.key().hash(b"com"));
        assert_eq!(
            h.hash("com"),
            DomainHasher::from_seed(&[7; SEED_LEN]).hash("com")
        );
        assert_ne!(h.tag("a.example"), h.tag("b.example"));
    }
}

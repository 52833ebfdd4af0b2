//! The matcher's table: domain rules by the installation's 64-bit domain hash, in 16 bytes a
//! rule at a load of 0.75 to 0.9. A general hash map sizes its buckets in powers of two: a
//! million rules needed 2,097,152 buckets of 17 bytes (48% full, 34 MiB); here the slots are
//! as many as the rules need (about 20 MiB for a million).
//!
//! The keys are hashes already, so a key's home slot is its place in the key space scaled to
//! the table (`key * slots / 2^64`): homes rise with the keys, and each run of occupied slots
//! is kept in key order (linear probing, ordered). A lookup starts at the home and stops at
//! the key, at a larger key or at an empty slot: a miss costs what a hit does, a slot or two
//! of one cache line on average. The whole table is in key order, so growing it is one pass.
//! Key 0 marks an empty slot; a rule whose key is 0 is kept beside the slots.

/// A table this large is kept on transparent huge pages: a look-up lands on a random slot, and
/// with 4 KiB pages each one also misses the TLB (a page walk, two-dimensional in a virtual
/// machine). A million rules take about 20 MiB: ten 2 MiB pages instead of 5,000 small ones.
const HUGE_PAGES_FROM: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// The whole 2 MiB pages inside `v`'s allocation, when `v` is large enough to want them.
fn huge_range<T>(v: &Vec<T>) -> Option<(*mut libc::c_void, usize)> {
    let bytes = v.capacity() * std::mem::size_of::<T>();
    if bytes < HUGE_PAGES_FROM {
        return None;
    }
    let start = (v.as_ptr() as usize).next_multiple_of(HUGE_PAGE);
    let end = (v.as_ptr() as usize + bytes) / HUGE_PAGE * HUGE_PAGE;
    (end > start).then_some((start as *mut libc::c_void, end - start))
}

/// Before `v` is written: its whole 2 MiB pages are to be huge ones. Memory the allocator maps
/// afresh is then faulted in as huge pages.
fn advise_huge_pages<T>(v: &Vec<T>) {
    if let Some((start, len)) = huge_range(v) {
        // SAFETY: the range lies inside `v`'s live allocation; the advice changes how the
        // kernel backs those pages, never their contents.
        unsafe {
            libc::madvise(start, len, libc::MADV_HUGEPAGE);
        }
    }
}

/// After `v` is written: memory the allocator reused (already faulted in as small pages) is
/// copied into huge pages now, not whenever the kernel's background scan gets to it; pages
/// that are huge already are left as they are. Where the kernel cannot (older than 6.1,
/// transparent huge pages off, no free 2 MiB page) the call fails and nothing changes: the
/// table works the same, with more TLB misses. Whether the whole pages are huge now.
fn collapse_huge_pages<T>(v: &Vec<T>) -> bool {
    huge_range(v).is_some_and(|(start, len)| {
        // SAFETY: as in `advise_huge_pages`; a collapse keeps the contents.
        unsafe { libc::madvise(start, len, libc::MADV_COLLAPSE) == 0 }
    })
}

/// Empty slots past the last home, where the last runs spill over (more are added when a run
/// reaches the end).
const SPILL: usize = 64;

/// Load after a growth or a shrink, the load at which an insert grows the table, and the load
/// below which a removal shrinks it.
const TARGET_LOAD: f64 = 0.75;
const MAX_LOAD: f64 = 0.9;
const MIN_LOAD: f64 = 0.3;

#[derive(Clone, Default)]
pub struct RuleTable<V: Copy + Default> {
    /// `(key, value)` in key order, key 0 = empty; at least `homes + SPILL` long (or empty).
    slots: Vec<(u64, V)>,
    /// Slots that are some key's home.
    homes: usize,
    /// Keys in `slots`.
    len: usize,
    /// The value of key 0, which marks empty slots.
    zero: Option<V>,
}

impl<V: Copy + Default> RuleTable<V> {
    pub fn len(&self) -> usize {
        self.len + usize::from(self.zero.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the slots take (allocated).
    pub fn bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<(u64, V)>()
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        ((u128::from(key) * self.homes as u128) >> 64) as usize
    }

    /// Where `key` is, or where it would go: the first slot from its home holding a larger key
    /// or none.
    #[inline]
    fn position(&self, key: u64) -> Result<usize, usize> {
        let mut i = self.home(key);
        while let Some(&(k, _)) = self.slots.get(i) {
            if k == key {
                return Ok(i);
            }
            if k == 0 || k > key {
                return Err(i);
            }
            i += 1;
        }
        Err(i)
    }

    #[inline]
    pub fn get(&self, key: u64) -> Option<&V> {
        if key == 0 {
            return self.zero.as_ref();
        }
        self.position(key).ok().map(|i| &self.slots[i].1)
    }

    /// Inserts or replaces; the previous value.
    pub fn insert(&mut self, key: u64, value: V) -> Option<V> {
        if key == 0 {
            return self.zero.replace(value);
        }
        if (self.len + 1) as f64 > self.homes as f64 * MAX_LOAD {
            self.rebuild(self.len + 1);
        }
        match self.position(key) {
            Ok(i) => Some(std::mem::replace(&mut self.slots[i].1, value)),
            Err(i) => {
                // The rest of the run moves up one slot, into the first empty one.
                let empty = match self.slots[i..].iter().position(|s| s.0 == 0) {
                    Some(e) => i + e,
                    None => {
                        let end = self.slots.len();
                        self.slots.reserve_exact(SPILL);
                        self.slots.resize(end + SPILL, (0, V::default()));
                        end
                    }
                };
                self.slots[i..=empty].rotate_right(1);
                self.slots[i] = (key, value);
                self.len += 1;
                None
            }
        }
    }

    /// Makes room for `additional` more keys at once (a large batch), so that inserting them
    /// does not grow the table step by step.
    pub fn reserve(&mut self, additional: usize) {
        let len = self.len + additional;
        if len as f64 > self.homes as f64 * MAX_LOAD {
            self.rebuild(len);
        }
    }

    /// Inserts or replaces `items` (keys ascending, each once) in one pass over the table, into
    /// a new array sized for them: a large batch of keys costs a sort and a pass, not an insert
    /// each at a random place.
    pub fn merge(&mut self, mut items: &[(u64, V)]) {
        if let Some((&(0, v), rest)) = items.split_first() {
            self.zero = Some(v);
            items = rest;
        }
        if items.is_empty() {
            return;
        }
        let old = std::mem::take(&mut self.slots);
        self.homes = (((self.len + items.len()) as f64 / TARGET_LOAD).ceil() as usize).max(16);
        let mut slots = Vec::with_capacity(self.homes + SPILL);
        advise_huge_pages(&slots);
        let mut old = old.into_iter().filter(|s| s.0 != 0).peekable();
        let mut new = items.iter().copied().peekable();
        self.len = 0;
        loop {
            let next = match (old.peek(), new.peek()) {
                (Some(&(a, _)), Some(&(b, _))) if a < b => old.next(),
                (Some(&(a, _)), Some(&(b, _))) if a == b => {
                    old.next();
                    new.next()
                }
                (_, Some(_)) => new.next(),
                (Some(_), None) => old.next(),
                (None, None) => None,
            };
            let Some((k, v)) = next else { break };
            let at = self.home(k).max(slots.len());
            slots.resize(at, (0, V::default()));
            slots.push((k, v));
            self.len += 1;
        }
        let end = slots.len().max(self.homes) + SPILL;
        slots.resize(end, (0, V::default()));
        let _ = collapse_huge_pages(&slots);
        self.slots = slots;
    }

    /// Removes `key`; its value.
    pub fn remove(&mut self, key: u64) -> Option<V> {
        if key == 0 {
            return self.zero.take();
        }
        let i = self.position(key).ok()?;
        let value = self.slots[i].1;
        // The keys after it that sit past their home move down one (they stay in order).
        let mut end = i + 1;
        while let Some(&(k, _)) = self.slots.get(end) {
            if k == 0 || self.home(k) >= end {
                break;
            }
            end += 1;
        }
        self.slots[i..end].rotate_left(1);
        self.slots[end - 1] = (0, V::default());
        self.len -= 1;
        if self.homes > SPILL && (self.len as f64) < self.homes as f64 * MIN_LOAD {
            self.rebuild(self.len);
        }
        Some(value)
    }

    /// `(key, value)` in key order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, V)> + '_ {
        self.zero
            .map(|v| (0, v))
            .into_iter()
            .chain(self.slots.iter().copied().filter(|s| s.0 != 0))
    }

    /// A new array sized for `len` keys at the target load, filled in one pass: the slots are
    /// in key order, and so are the new homes.
    fn rebuild(&mut self, len: usize) {
        let old = std::mem::take(&mut self.slots);
        self.homes = ((len as f64 / TARGET_LOAD).ceil() as usize).max(16);
        let mut slots = Vec::with_capacity(self.homes + SPILL);
        advise_huge_pages(&slots);
        for (k, v) in old.into_iter().filter(|s| s.0 != 0) {
            let at = self.home(k).max(slots.len());
            slots.resize(at, (0, V::default()));
            slots.push((k, v));
        }
        let end = slots.len().max(self.homes) + SPILL;
        slots.resize(end, (0, V::default()));
        let _ = collapse_huge_pages(&slots);
        self.slots = slots;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Against a `BTreeMap` through inserts, updates, removals, growth and shrinking, with keys
    /// bunched at both ends of the key space (where runs spill and wrap would be) and key 0.
    #[test]
    fn behaves_as_a_map() {
        let mut table: RuleTable<u32> = RuleTable::default();
        let mut model = std::collections::BTreeMap::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..30_000u32 {
            let r = next();
            let key = match r % 10 {
                0 => r % 64,
                1 => u64::MAX - r % 64,
                _ => next() % 20_000 * 922_337_203_685_477,
            };
            if (round < 20_000 && r % 3 != 0) || (round >= 20_000 && r % 5 == 0) {
                assert_eq!(table.insert(key, round), model.insert(key, round));
            } else {
                assert_eq!(table.remove(key), model.remove(&key));
            }
            assert_eq!(table.len(), model.len());
            if round % 997 == 0 {
                assert!(table.iter().eq(model.iter().map(|(k, v)| (*k, *v))));
                for k in model.keys() {
                    assert_eq!(table.get(*k), model.get(k));
                }
            }
            assert_eq!(table.get(key), model.get(&key));
        }
        assert!(table.iter().eq(model.iter().map(|(k, v)| (*k, *v))));
        // Shrunk along: at most the slots of the lowest load, and the spill.
        assert!(
            table.bytes() <= 16 * (table.len() * 10 / 3 + 16 + 2 * SPILL),
            "{} bytes for {}",
            table.bytes(),
            table.len()
        );
    }

    /// A merge leaves what inserting the same keys one by one does.
    #[test]
    fn a_merge_is_the_inserts_in_one_pass() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut by_insert: RuleTable<u32> = RuleTable::default();
        let mut by_merge: RuleTable<u32> = RuleTable::default();
        for round in 0..4u32 {
            // Some keys already there (replaced), key 0, and both ends of the key space.
            let mut items: Vec<(u64, u32)> = (0..5_000u32)
                .map(|i| match i % 50 {
                    0 => (0, round),
                    1 => (u64::MAX - u64::from(i % 7), round),
                    _ => (next() % 400_000 * 46_116_860_184_273, round * 10_000 + i),
                })
                .collect();
            items.sort_by_key(|&(k, _)| k);
            items.dedup_by_key(|&mut (k, _)| k);
            for &(k, v) in &items {
                by_insert.insert(k, v);
            }
            by_merge.merge(&items);
            assert_eq!(by_merge.len(), by_insert.len());
            assert!(by_merge.iter().eq(by_insert.iter()));
            for &(k, v) in &items {
                assert_eq!(by_merge.get(k), Some(&v));
            }
            // It stays a table an insert and a removal work on.
            by_merge.insert(12_345, 1);
            by_insert.insert(12_345, 1);
            assert_eq!(by_merge.remove(items[3].0), by_insert.remove(items[3].0));
        }
        assert!(by_merge.iter().eq(by_insert.iter()));
    }

    #[test]
    fn a_million_keys_in_about_twenty_bytes_each() {
        let mut table: RuleTable<u64> = RuleTable::default();
        let mut x: u64 = 1;
        for i in 0..1_000_000u64 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            table.insert(x, i);
        }
        assert_eq!(table.len(), 1_000_000);
        assert!(
            table.bytes() <= 16 * 1_000_000 * 4 / 3 + 16 * 2 * SPILL,
            "{}",
            table.bytes()
        );
    }

    /// The `AnonHugePages` of the mapping holding `addr`, from /proc/self/smaps.
    fn huge_kib_at(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
            } else if inside && let Some(v) = line.strip_prefix("AnonHugePages:") {
                return v.trim().trim_end_matches(" kB").parse().unwrap();
            }
        }
        0
    }

    /// A table of a million rules sits on huge pages once built, wherever the kernel can give
    /// them (the collapse says so); a small one is left alone.
    #[test]
    fn a_large_table_is_on_huge_pages() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut keys: Vec<(u64, u32)> = (0..1_000_000u32)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x | 1, i)
            })
            .collect();
        keys.sort_unstable();
        keys.dedup_by_key(|k| k.0);
        let mut table: RuleTable<u32> = RuleTable::default();
        table.merge(&keys);
        let (start, _) = huge_range(&table.slots).unwrap();
        if collapse_huge_pages(&table.slots) {
            assert!(huge_kib_at(start as usize) >= 2048);
        } else {
            eprintln!("the kernel gives no huge pages here (MADV_COLLAPSE failed): not checked");
        }
        for (k, v) in keys.iter().step_by(997) {
            assert_eq!(table.get(*k), Some(v));
        }
        let mut small: RuleTable<u32> = RuleTable::default();
        small.merge(&keys[..1000]);
        assert!(huge_range(&small.slots).is_none());
    }
}

//! A batch of entries to add or replace, in compact form: what an import, a sync and the
//! start-up load hand to the list. A million-name import held as `Entry`s was five allocations
//! and about 500 bytes a name (the domain, two pattern strings, one of them `*.domain`, and the
//! reason); here the names live back to back in one text arena, a row is 32 bytes (where the
//! name is, its two weights, the shape of its patterns and the index of its stamp: added-at and
//! reason, which the entries of one import share), and the `*.domain` pattern is never built:
//! it is only a view of the row ([`BatchEntry::entry`]) for a reply.
//!
//! An entry whose patterns are not of the usual shape (its own name exact and, when it has one,
//! `*.name` as subdomain) keeps its patterns as given, beside the rows: the store writes such an
//! entry's patterns as JSON, as it always has.

use std::{collections::HashMap, sync::Arc};

use super::model::{Entry, Pattern, PatternType};

/// The shape of an entry's patterns (`Row::shape`): the usual two, or an index into
/// `Batch::odd` from `ODD`.
const EXACT: u32 = 0;
const EXACT_SUB: u32 = 1;
const ODD: u32 = 2;

#[derive(Clone, Copy, Debug)]
struct Row {
    exact: f64,
    sub: f64,
    at: u32,
    /// Index into `stamps`.
    stamp: u32,
    shape: u32,
    len: u8,
    /// The name was new and `place_new` gave it its rule in the matcher already.
    placed: bool,
}

/// When the entries were added and why (an index into `reasons`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    added_at: u64,
    reason: u32,
}

/// The index of a batch's stamp ([`Batch::stamp`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StampId(u32);

/// Entries to add or replace, in the order given (see the module's note).
#[derive(Default)]
pub struct Batch {
    text: String,
    rows: Vec<Row>,
    stamps: Vec<Stamp>,
    reasons: Vec<Arc<str>>,
    reason_index: HashMap<Arc<str>, u32>,
    /// The patterns of entries not of the usual shape.
    odd: Vec<Box<[Pattern]>>,
}

/// The `patterns` of one entry of a batch, as the store writes them.
pub enum Patterns<'a> {
    /// The usual shape: the exact pattern's weight and, when there is one, the `*.name` one's.
    Weights(f64, Option<f64>),
    /// Any other shape, as given.
    Other(&'a [Pattern]),
}

/// One entry of a batch, borrowed.
#[derive(Clone, Copy)]
pub struct BatchEntry<'a> {
    batch: &'a Batch,
    row: &'a Row,
}

impl<'a> BatchEntry<'a> {
    pub fn domain(&self) -> &'a str {
        self.batch.name(self.row)
    }

    /// The weight of the exact and of the subdomain pattern (0 when absent), as
    /// [`Entry::weights`].
    pub fn weights(&self) -> (f64, f64) {
        (self.row.exact, self.row.sub)
    }

    pub fn added_at(&self) -> u64 {
        self.stamp().added_at
    }

    pub fn reason(&self) -> &'a str {
        self.batch
            .reasons
            .get(self.stamp().reason as usize)
            .map_or("", |r| r.as_ref())
    }

    /// The index of the reason in [`Batch::reasons`].
    pub(crate) fn reason_id(&self) -> usize {
        self.stamp().reason as usize
    }

    fn stamp(&self) -> Stamp {
        self.batch
            .stamps
            .get(self.row.stamp as usize)
            .copied()
            .unwrap_or(Stamp {
                added_at: 0,
                reason: 0,
            })
    }

    pub fn patterns(&self) -> Patterns<'a> {
        match self.row.shape {
            EXACT => Patterns::Weights(self.row.exact, None),
            EXACT_SUB => Patterns::Weights(self.row.exact, Some(self.row.sub)),
            n => Patterns::Other(
                self.batch
                    .odd
                    .get((n - ODD) as usize)
                    .map_or(&[][..], |p| &p[..]),
            ),
        }
    }

    /// Whether `place_new` gave the name its rule in the matcher already.
    pub(crate) fn placed(&self) -> bool {
        self.row.placed
    }

    /// The entry as the seed writes it (built: for a reply or a test, not for a large batch).
    pub fn entry(&self) -> Entry {
        let domain = self.domain();
        let patterns = match self.patterns() {
            Patterns::Weights(exact, sub) => {
                let mut e = Entry::new(domain, sub.is_some(), exact, "", 0);
                if let (Some(sub), Some(p)) = (sub, e.patterns.get_mut(1)) {
                    p.weight = sub;
                }
                e.patterns
            }
            Patterns::Other(p) => p.to_vec(),
        };
        Entry {
            domain: domain.to_string(),
            patterns,
            added_at: self.added_at(),
            reason: self.reason().to_string(),
        }
    }
}

impl Batch {
    /// Room for `entries` entries and `text` bytes of names.
    pub fn with_capacity(entries: usize, text: usize) -> Self {
        Self {
            rows: Vec::with_capacity(entries),
            text: String::with_capacity(text),
            ..Self::default()
        }
    }

    /// Room for `entries` more entries and `text` more bytes of names.
    pub fn reserve(&mut self, entries: usize, text: usize) {
        self.rows.reserve(entries);
        self.text.reserve(text);
    }

    /// Moves `other`'s entries after this batch's, in their order, with their stamps and
    /// patterns (a list parsed in chunks becomes one batch).
    pub fn append(&mut self, other: Batch) {
        let at = self.text.len() as u32;
        self.text.push_str(&other.text);
        let stamps: Vec<u32> = other
            .stamps
            .iter()
            .map(|s| {
                let reason = other
                    .reasons
                    .get(s.reason as usize)
                    .map_or("", |r| r.as_ref());
                self.stamp(s.added_at, reason).0
            })
            .collect();
        let odd = self.odd.len() as u32;
        self.odd.extend(other.odd);
        self.rows.extend(other.rows.iter().map(|r| Row {
            at: r.at + at,
            stamp: stamps.get(r.stamp as usize).copied().unwrap_or(r.stamp),
            shape: if r.shape >= ODD {
                r.shape + odd
            } else {
                r.shape
            },
            ..*r
        }));
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// The bytes of the names, back to back.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The distinct reasons of the entries.
    pub fn reasons(&self) -> &[Arc<str>] {
        &self.reasons
    }

    fn name(&self, r: &Row) -> &str {
        let at = r.at as usize;
        self.text.get(at..at + r.len as usize).unwrap_or("")
    }

    /// The stamp of entries added at `added_at` for `reason`: the last one again when it is
    /// the same (an import gives all its entries one).
    pub fn stamp(&mut self, added_at: u64, reason: &str) -> StampId {
        if let Some(last) = self.stamps.len().checked_sub(1)
            && self.stamps[last].added_at == added_at
            && self
                .reasons
                .get(self.stamps[last].reason as usize)
                .map(|r| r.as_ref())
                == Some(reason)
        {
            return StampId(last as u32);
        }
        let reason = match self.reason_index.get(reason) {
            Some(&i) => i,
            None => {
                let r: Arc<str> = Arc::from(reason);
                let i = self.reasons.len() as u32;
                self.reasons.push(Arc::clone(&r));
                self.reason_index.insert(r, i);
                i
            }
        };
        self.stamps.push(Stamp { added_at, reason });
        StampId((self.stamps.len() - 1) as u32)
    }

    fn push_row(&mut self, domain: &str, exact: f64, sub: f64, shape: u32, stamp: StampId) {
        let at = self.text.len() as u32;
        self.text.push_str(domain);
        self.rows.push(Row {
            exact,
            sub,
            at,
            stamp: stamp.0,
            shape,
            // Names are at most 253 bytes (normalised before they get here).
            len: domain.len().min(255) as u8,
            placed: false,
        });
    }

    /// Adds the entry [`Entry::new`] makes (`domain` normalised already), without building it.
    pub fn push(&mut self, domain: &str, subdomains: bool, weight: f64, stamp: StampId) {
        if subdomains {
            self.push_row(domain, weight, weight, EXACT_SUB, stamp);
        } else {
            self.push_row(domain, weight, 0.0, EXACT, stamp);
        }
    }

    /// Adds an entry of the usual shape with its weights: the exact pattern's and, when it has
    /// one, the `*.name` one's.
    pub fn push_weights(&mut self, domain: &str, exact: f64, sub: Option<f64>, stamp: StampId) {
        match sub {
            Some(sub) => self.push_row(domain, exact, sub, EXACT_SUB, stamp),
            None => self.push_row(domain, exact, 0.0, EXACT, stamp),
        }
    }

    /// Adds an entry with these patterns (of any shape).
    pub fn push_patterns(&mut self, domain: &str, patterns: Vec<Pattern>, stamp: StampId) {
        match usual_weights(domain, &patterns) {
            Some((exact, sub)) => self.push_weights(domain, exact, sub, stamp),
            None => {
                let w = |k| {
                    patterns
                        .iter()
                        .filter(|p| p.kind == k)
                        .map(|p| p.weight)
                        .fold(0.0, f64::max)
                };
                let (exact, sub) = (w(PatternType::Exact), w(PatternType::Subdomain));
                let shape = ODD + self.odd.len() as u32;
                self.odd.push(patterns.into_boxed_slice());
                self.push_row(domain, exact, sub, shape, stamp);
            }
        }
    }

    /// Adds an entry of another batch, with `stamp` (of this batch) instead of its own.
    pub fn push_from(&mut self, e: BatchEntry<'_>, stamp: StampId) {
        match e.patterns() {
            Patterns::Weights(exact, sub) => self.push_weights(e.domain(), exact, sub, stamp),
            Patterns::Other(p) => self.push_patterns(e.domain(), p.to_vec(), stamp),
        }
    }

    /// Adds an `Entry`.
    pub fn push_entry(&mut self, entry: Entry) {
        let stamp = self.stamp(entry.added_at, &entry.reason);
        self.push_patterns(&entry.domain, entry.patterns, stamp);
    }

    /// The entries in their order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = BatchEntry<'_>> {
        self.rows.iter().map(|row| BatchEntry { batch: self, row })
    }

    /// Keeps the entries `keep` says yes to, visiting them in order, once each; `keep` may mark
    /// an entry placed.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&str, (f64, f64), &mut bool) -> bool) {
        let text = &self.text;
        self.rows.retain_mut(|r| {
            let at = r.at as usize;
            let name = text.get(at..at + r.len as usize).unwrap_or("");
            keep(name, (r.exact, r.sub), &mut r.placed)
        });
    }

    /// Sorts the entries by domain; stable, so the last of a name's duplicates stays last.
    pub fn sort_by_domain(&mut self) {
        let text = &self.text;
        let name = |r: &Row| {
            let at = r.at as usize;
            text.get(at..at + r.len as usize).unwrap_or("")
        };
        self.rows.sort_by(|a, b| name(a).cmp(name(b)));
    }

    /// [`Batch::sort_by_domain`], moving `side` (one item per entry, in the entries' order)
    /// along with the entries.
    pub fn sort_by_domain_with<T: Copy>(&mut self, side: &mut Vec<T>) {
        if side.len() != self.rows.len() {
            debug_assert!(
                false,
                "a side list of {} for {} entries",
                side.len(),
                self.rows.len()
            );
            self.sort_by_domain();
            side.clear();
            return;
        }
        let text = &self.text;
        let name = |r: &Row| {
            let at = r.at as usize;
            text.get(at..at + r.len as usize).unwrap_or("")
        };
        let rows = &self.rows;
        let mut order: Vec<u32> = (0..rows.len() as u32).collect();
        order.sort_by(|&a, &b| name(&rows[a as usize]).cmp(name(&rows[b as usize])));
        self.rows = order.iter().map(|&i| self.rows[i as usize]).collect();
        *side = order.iter().map(|&i| side[i as usize]).collect();
    }

    /// The entries as `Entry`s (built; for a few).
    pub fn entries(&self) -> Vec<Entry> {
        self.iter().map(|e| e.entry()).collect()
    }
}

/// The weights of patterns of the usual shape (`domain` exact and, when there is one, `*.domain`
/// as subdomain): the exact one's and the subdomain one's; `None` for any other shape.
pub fn usual_weights(domain: &str, patterns: &[Pattern]) -> Option<(f64, Option<f64>)> {
    let exact = |p: &Pattern| p.kind == PatternType::Exact && p.pattern == domain;
    let subdomain = |p: &Pattern| {
        p.kind == PatternType::Subdomain && p.pattern.strip_prefix("*.") == Some(domain)
    };
    match patterns {
        [x] if exact(x) => Some((x.weight, None)),
        [x, s] if exact(x) && subdomain(s) => Some((x.weight, Some(s.weight))),
        _ => None,
    }
}

impl FromIterator<Entry> for Batch {
    fn from_iter<I: IntoIterator<Item = Entry>>(entries: I) -> Self {
        let entries = entries.into_iter();
        let mut batch = Batch::with_capacity(entries.size_hint().0, 0);
        for e in entries {
            batch.push_entry(e);
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An entry whose patterns are not of the usual shape (reweighted, and a third one).
    fn odd_entry() -> Entry {
        let mut odd = Entry::new("odd.example", true, 0.5, "r2", 3);
        odd.patterns[1].weight = 0.25;
        odd.patterns.push(Pattern {
            pattern: "casino".into(),
            kind: PatternType::Contains,
            weight: 0.3,
        });
        odd
    }

    #[test]
    fn entries_of_every_shape_come_back_as_given() {
        let other = odd_entry();
        let mut sub_only = Entry::new("sub-only.example", true, 0.9, "r", 2);
        sub_only.patterns.remove(0);
        let mut reweighted = Entry::new("mixed.example", true, 1.0, "r", 2);
        reweighted.patterns[1].weight = 0.5;
        let given = vec![
            Entry::new("casino.example", true, 1.0, "r", 1),
            Entry::new("exact.example", false, 0.75, "r", 1),
            other,
            sub_only,
            reweighted,
        ];
        let batch: Batch = given.iter().cloned().collect();
        assert_eq!(batch.entries(), given);
        for (e, b) in given.iter().zip(batch.iter()) {
            assert_eq!(b.weights(), e.weights(), "{}", e.domain);
        }
        assert_eq!(
            batch.stamps.len(),
            3,
            "one stamp per run of one (added-at, reason)"
        );
        assert_eq!(batch.reasons.len(), 2);
        assert_eq!(std::mem::size_of::<Row>(), 32);
    }

    #[test]
    fn an_appended_batch_keeps_its_entries_stamps_and_patterns() {
        let odd = odd_entry();
        let first = vec![Entry::new("casino.example", true, 1.0, "r", 1), odd.clone()];
        let second = vec![
            odd,
            Entry::new("exact.example", false, 0.75, "r", 1),
            Entry::new("new-reason.example", true, 1.0, "r3", 4),
        ];
        let mut batch: Batch = first.iter().cloned().collect();
        batch.append(second.iter().cloned().collect());
        assert_eq!(batch.entries(), [first, second].concat());
        assert_eq!(
            batch.reasons.len(),
            3,
            "a reason both batches hold is kept once"
        );
    }

    #[test]
    fn sorting_keeps_the_last_duplicate_last() {
        let mut batch = Batch::default();
        let stamp = batch.stamp(1, "r");
        batch.push("b.example", true, 1.0, stamp);
        batch.push("a.example", true, 0.5, stamp);
        batch.push("b.example", false, 0.25, stamp);
        batch.sort_by_domain();
        let rows: Vec<(&str, (f64, f64))> =
            batch.iter().map(|e| (e.domain(), e.weights())).collect();
        assert_eq!(
            rows,
            vec![
                ("a.example", (0.5, 0.5)),
                ("b.example", (1.0, 1.0)),
                ("b.example", (0.25, 0.0))
            ]
        );
    }

    #[test]
    fn a_side_list_moves_with_its_entries() {
        let mut batch = Batch::default();
        let stamp = batch.stamp(1, "r");
        for (i, name) in ["c.example", "b.example", "a.example", "b.example"]
            .iter()
            .enumerate()
        {
            batch.push(name, true, i as f64, stamp);
        }
        let mut side = vec![0u32, 1, 2, 3];
        batch.sort_by_domain_with(&mut side);
        let rows: Vec<(&str, f64)> = batch.iter().map(|e| (e.domain(), e.weights().0)).collect();
        assert_eq!(
            rows,
            vec![
                ("a.example", 2.0),
                ("b.example", 1.0),
                ("b.example", 3.0),
                ("c.example", 0.0)
            ]
        );
        // Each item still beside the entry it was given with.
        assert_eq!(side, vec![2, 1, 3, 0]);
    }
}

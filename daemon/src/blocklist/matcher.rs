//! The matching engine: exact and subdomain rules by suffix lookup, `contains` with
//! Aho-Corasick, `regex` with a RegexSet. Confidence is the strongest matching weight.

use std::sync::Arc;

use aho_corasick::AhoCorasick;
use regex::RegexSet;
use serde::Serialize;

use crate::domain_hash::DomainHasher;

use super::{
    lookalike::Lookalikes,
    model::{Matched, Pattern, PatternType},
    rule_table::RuleTable,
};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    pub domain: String,
    pub blocked: bool,
    #[serde(rename = "matchedPatterns")]
    pub matched: Vec<Matched>,
    pub confidence: f64,
    /// The verdict in a sentence: the strongest match against the threshold, or why nothing
    /// matched.
    pub reason: String,
}

/// A `Hasher` for maps whose keys are already good 64-bit hashes (the installation's domain
/// hash, the resolver cache's keys): hashing them again would only cost time. The key is
/// rotated by half: the table picks buckets by the low bits, and the domain hash mixes its
/// high bits best (its low bits see only the low bits of each multiplier).
#[derive(Clone, Copy, Default)]
pub struct PrehashedKey(u64);

impl std::hash::Hasher for PrehashedKey {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; fold anything else in rather than panic.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v.rotate_left(32);
    }
}

pub type Prehashed = std::hash::BuildHasherDefault<PrehashedKey>;

/// A domain rule: exact weight, subdomain weight (0 = none), and the tag of its name
/// (`DomainHasher::tag`), which tells another name with the same key from this one. Weights
/// are kept in ten-thousandths (`Weight`); with the tag a rule is 8 bytes, and with its key 16,
/// what `(u64, (f64, f64))` would take without the tag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Rule {
    exact: Weight,
    sub: Weight,
    tag: u32,
}

/// Domain rules by the installation's domain hash of the name (the kernel's key). The names
/// themselves live once, in the list; a suffix of the queried name is all a match needs to
/// report. Two names never share a key here: the second is refused (`upsert`). 16 bytes a rule
/// at a load of 0.75 to 0.9 (see `RuleTable`).
type DomainRules = RuleTable<Rule>;

/// A weight in ten-thousandths: 0..=10_000. Weights have four decimal places; `n / 10_000`
/// gives back exactly the `f64` that parsing the four-decimal text gives.
pub type Weight = u16;

pub fn to_weight(w: f64) -> Weight {
    (w.clamp(0.0, 1.0) * 10_000.0).round() as Weight
}

pub fn from_weight(w: Weight) -> f64 {
    f64::from(w) / 10_000.0
}

/// A name's key in the matcher's table and its tag ([`Matcher::key`]).
#[derive(Clone, Copy, Debug)]
pub struct RuleKey {
    hash: u64,
    tag: u32,
}

impl RuleKey {
    /// The name's domain hash (the kernel set's key for it too).
    pub fn hash(self) -> u64 {
        self.hash
    }

    /// The name's tag, which tells another name on the same key.
    pub fn tag(self) -> u32 {
        self.tag
    }
}

pub struct Matcher {
    domains: DomainRules,
    hasher: Arc<DomainHasher>,
    contains: Option<(AhoCorasick, Vec<Pattern>)>,
    regex: Option<(RegexSet, Vec<Pattern>)>,
    lookalikes: Lookalikes,
}

/// Most labels a name can have (253 characters).
const MAX_LABELS: usize = 127;

/// Calls `f(suffix, hash, is_whole_name)` for the name and each parent, longest first, until
/// `f` returns false. The domain hash runs over the name backwards, so one backward pass yields
/// the hash of every suffix at its label boundary.
#[inline]
fn for_each_suffix(hasher: &DomainHasher, name: &str, mut f: impl FnMut(&str, u64, bool) -> bool) {
    let key = hasher.key();
    let bytes = name.as_bytes();
    let mut suffixes = [(0usize, 0u64); MAX_LABELS + 1];
    let mut k = 0;
    let mut hash = 0;
    for (position, i) in (0..bytes.len()).rev().enumerate() {
        if bytes[i] == b'.' && k < MAX_LABELS {
            suffixes[k] = (i + 1, hash);
            k += 1;
        }
        hash = key.step(hash, position, bytes[i]);
    }
    suffixes[k] = (0, hash);
    k += 1;
    for (j, &(start, h)) in suffixes[..k].iter().rev().enumerate() {
        if !f(&name[start..], h, j == 0) {
            return;
        }
    }
}

impl Matcher {
    /// Builds the engine from `(domain, exact weight, subdomain weight)` rules, keyed by
    /// `hasher` (of two names with one key, the first is kept). Patterns that do not compile
    /// were refused when added; should one slip through (an imported list), it is left out
    /// rather than failing the whole engine.
    pub fn new<'a>(
        rules: impl Iterator<Item = (&'a str, f64, f64)>,
        patterns: &[Pattern],
        lookalikes: Lookalikes,
        hasher: Arc<DomainHasher>,
    ) -> Self {
        let mut m = Self {
            domains: DomainRules::default(),
            hasher,
            contains: None,
            regex: None,
            lookalikes,
        };
        for (d, exact, sub) in rules {
            m.upsert(d, exact, sub);
        }
        m.set_patterns(patterns);
        m
    }

    /// The domain hash the rules are keyed by.
    pub fn hasher(&self) -> &Arc<DomainHasher> {
        &self.hasher
    }

    /// Whether another name holds `domain`'s key (its `upsert` would be refused).
    pub fn clashes(&self, domain: &str) -> bool {
        self.clashes_key(self.key(domain))
    }

    /// `domain`'s key and tag, for [`Matcher::clashes_key`] and [`Matcher::upsert_key`]: a
    /// batch checks and inserts a name with one hashing.
    pub fn key(&self, domain: &str) -> RuleKey {
        RuleKey {
            hash: self.hasher.hash(domain),
            tag: self.hasher.tag(domain),
        }
    }

    /// [`Matcher::clashes`] by the name's [`RuleKey`].
    pub fn clashes_key(&self, key: RuleKey) -> bool {
        self.domains.get(key.hash).is_some_and(|r| r.tag != key.tag)
    }

    pub fn set_patterns(&mut self, patterns: &[Pattern]) {
        let contains: Vec<Pattern> = patterns
            .iter()
            .filter(|p| p.kind == PatternType::Contains)
            .cloned()
            .collect();
        self.contains = AhoCorasick::new(contains.iter().map(|p| p.pattern.as_str()))
            .ok()
            .filter(|_| !contains.is_empty())
            .map(|ac| (ac, contains));
        let regexes: Vec<Pattern> = patterns
            .iter()
            .filter(|p| p.kind == PatternType::Regex && compile_one(&p.pattern).is_ok())
            .cloned()
            .collect();
        self.regex = regex::RegexSetBuilder::new(regexes.iter().map(|p| p.pattern.as_str()))
            .size_limit(REGEX_SIZE_LIMIT * regexes.len().max(1))
            .build()
            .ok()
            .filter(|_| !regexes.is_empty())
            .map(|set| (set, regexes));
    }

    /// Adds or reweights a domain rule; false (nothing changed) when another name holds its
    /// key.
    pub fn upsert(&mut self, domain: &str, exact: f64, sub: f64) -> bool {
        self.upsert_key(self.key(domain), exact, sub)
    }

    /// [`Matcher::upsert`] by the name's [`RuleKey`].
    pub fn upsert_key(&mut self, key: RuleKey, exact: f64, sub: f64) -> bool {
        let rule = Rule {
            exact: to_weight(exact),
            sub: to_weight(sub),
            tag: key.tag,
        };
        if self.clashes_key(key) {
            return false;
        }
        self.domains.insert(key.hash, rule);
        true
    }

    /// Gives new names their rules at once: for each of `names` (name, exact weight, subdomain
    /// weight), in order, whether it got its rule, as [`Matcher::upsert`] of one after the other
    /// says (a name whose key another holds, listed or earlier in `names`, is refused; of a name
    /// given twice the last weights stay). One sort of the keys and one pass over the table,
    /// instead of an insert at a random place per name.
    pub fn upsert_many<'a>(
        &mut self,
        names: impl Iterator<Item = (&'a str, f64, f64)>,
    ) -> Vec<bool> {
        let hasher = Arc::clone(&self.hasher);
        self.upsert_many_keyed(names.map(move |(domain, exact, sub)| {
            let key = RuleKey {
                hash: hasher.hash(domain),
                tag: hasher.tag(domain),
            };
            (key, exact, sub)
        }))
    }

    /// [`Matcher::upsert_many`] for names whose [`RuleKey`] the caller has computed already.
    pub fn upsert_many_keyed(
        &mut self,
        names: impl Iterator<Item = (RuleKey, f64, f64)>,
    ) -> Vec<bool> {
        let mut keyed: Vec<(u64, u32, Rule)> = names
            .enumerate()
            .map(|(i, (key, exact, sub))| {
                let rule = Rule {
                    exact: to_weight(exact),
                    sub: to_weight(sub),
                    tag: key.tag,
                };
                (key.hash, i as u32, rule)
            })
            .collect();
        keyed.sort_unstable_by_key(|&(hash, i, _)| (hash, i));
        let mut placed = vec![false; keyed.len()];
        let mut rules: Vec<(u64, Rule)> = Vec::with_capacity(keyed.len());
        for group in keyed.chunk_by(|a, b| a.0 == b.0) {
            let Some(&(hash, _, first)) = group.first() else {
                continue;
            };
            // The name holding the key: the listed one, or the first of the batch.
            let holder = self.domains.get(hash).map_or(first.tag, |r| r.tag);
            let mut last = None;
            for &(_, i, rule) in group.iter().filter(|g| g.2.tag == holder) {
                if let Some(p) = placed.get_mut(i as usize) {
                    *p = true;
                }
                last = Some(rule);
            }
            if let Some(rule) = last {
                rules.push((hash, rule));
            }
        }
        drop(keyed);
        self.domains.merge(&rules);
        placed
    }

    /// Makes room for `additional` more domain rules (a large batch of new names).
    pub fn reserve(&mut self, additional: usize) {
        self.domains.reserve(additional);
    }

    /// Removes a domain's rule (not another name's with the same key).
    pub fn remove(&mut self, domain: &str) {
        let hash = self.hasher.hash(domain);
        if self
            .domains
            .get(hash)
            .is_some_and(|r| r.tag == self.hasher.tag(domain))
        {
            self.domains.remove(hash);
        }
    }

    pub fn set_lookalikes(&mut self, lookalikes: Lookalikes) {
        self.lookalikes = lookalikes;
    }

    pub fn lookalikes(&self) -> &Lookalikes {
        &self.lookalikes
    }

    /// Whether a normalised name is blocked, without building a report: the resolver's path.
    pub fn is_blocked(&self, name: &str, threshold: f64) -> bool {
        let mut blocked = false;
        for_each_suffix(&self.hasher, name, |_, hash, whole| {
            if let Some(rule) = self.domains.get(hash) {
                let w = from_weight(if whole { rule.exact } else { rule.sub });
                if w > 0.0 && w >= threshold {
                    blocked = true;
                    return false;
                }
            }
            true
        });
        if blocked {
            return true;
        }
        if let Some((ac, patterns)) = &self.contains
            && ac
                .find_overlapping_iter(name)
                .any(|m| patterns[m.pattern().as_usize()].weight >= threshold)
        {
            return true;
        }
        if let Some((set, patterns)) = &self.regex
            && set
                .matches(name)
                .iter()
                .any(|i| patterns[i].weight >= threshold)
        {
            return true;
        }
        if self
            .lookalikes
            .check(name)
            .is_some_and(|m| m.weight >= threshold)
        {
            return true;
        }
        // Gambling words alone weigh less than the default threshold: the scan runs only
        // where an operator lowered it far enough for one to count.
        self.lookalikes.strongest_vocabulary_weight() >= threshold
            && self
                .lookalikes
                .vocabulary(name)
                .is_some_and(|m| m.weight >= threshold)
    }

    /// Matches a normalised name.
    pub fn check(&self, name: &str, threshold: f64) -> Verdict {
        let mut matched = Vec::new();
        // The name itself, then each parent: only subdomain rules reach down.
        for_each_suffix(&self.hasher, name, |suffix, hash, whole| {
            if let Some(rule) = self.domains.get(hash) {
                if whole && rule.exact > 0 {
                    matched.push(Matched {
                        pattern: suffix.to_string(),
                        kind: PatternType::Exact,
                        weight: from_weight(rule.exact),
                    });
                }
                if !whole && rule.sub > 0 {
                    matched.push(Matched {
                        pattern: format!("*.{suffix}"),
                        kind: PatternType::Subdomain,
                        weight: from_weight(rule.sub),
                    });
                }
            }
            true
        });
        if let Some((ac, patterns)) = &self.contains {
            let mut seen = vec![false; patterns.len()];
            for m in ac.find_overlapping_iter(name) {
                let i = m.pattern().as_usize();
                if !seen[i] {
                    seen[i] = true;
                    matched.push(Matched {
                        pattern: patterns[i].pattern.clone(),
                        kind: PatternType::Contains,
                        weight: patterns[i].weight,
                    });
                }
            }
        }
        if let Some((set, patterns)) = &self.regex {
            for i in set.matches(name).iter() {
                matched.push(Matched {
                    pattern: patterns[i].pattern.clone(),
                    kind: PatternType::Regex,
                    weight: patterns[i].weight,
                });
            }
        }
        if let Some(m) = self.lookalikes.check(name) {
            matched.push(m);
        }
        if let Some(m) = self.lookalikes.vocabulary(name) {
            matched.push(m);
        }
        let confidence = matched.iter().map(|m| m.weight).fold(0.0, f64::max);
        let blocked = !matched.is_empty() && confidence >= threshold;
        let strongest = matched.iter().max_by(|a, b| a.weight.total_cmp(&b.weight));
        // `exact bet365.com`, `lookalike:bet365 (numbered mirror)`.
        let named = |m: &Matched| {
            let kind = m.kind.as_str();
            if m.pattern.starts_with(kind) {
                m.pattern.clone()
            } else {
                format!("{kind} {}", m.pattern)
            }
        };
        let reason = match strongest {
            Some(m) if blocked => format!(
                "blocked: {} weighs {} (threshold {threshold})",
                named(m),
                m.weight
            ),
            Some(m) => format!(
                "not blocked: the strongest match, {}, weighs {}, below the threshold {threshold}",
                named(m),
                m.weight
            ),
            None if psl::domain_str(name).is_some_and(|r| self.lookalikes.is_legitimate(r)) => {
                "not blocked: no rule names it, and it is on the shipped list of popular legitimate domains, which lookalike and mirror detection never block".to_string()
            }
            None => "not blocked: no rule, pattern, lookalike or gambling word matches".to_string(),
        };
        Verdict {
            domain: name.to_string(),
            blocked,
            matched,
            confidence,
            reason,
        }
    }

    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// Bytes the domain rules' table takes.
    pub fn domain_bytes(&self) -> usize {
        self.domains.bytes()
    }
}

/// Per-regex compiled size limit: a pattern that needs more is refused.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

pub fn compile_one(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hasher() -> Arc<DomainHasher> {
        Arc::new(DomainHasher::from_seed(&[3; crate::domain_hash::SEED_LEN]))
    }

    /// Two names with one key: the second is refused and the first keeps working; the same
    /// name again is an update. The pair is made the way the end-to-end test makes one: a
    /// known key and a search for small letter differences that cancel.
    #[test]
    fn a_second_name_with_the_same_key_is_refused() {
        let h = hasher();
        let (a, b) = crate::domain_hash::colliding_pair(&h, "test").unwrap();
        assert_ne!(a, b);
        assert_eq!(h.hash(&a), h.hash(&b));
        let mut m = Matcher::new(std::iter::empty(), &[], Lookalikes::new([""; 0]), h);
        assert!(m.upsert(&a, 1.0, 1.0));
        assert!(m.clashes(&b));
        assert!(!m.upsert(&b, 1.0, 1.0));
        assert!(m.upsert(&a, 0.9, 0.0), "the same name again is an update");
        assert!(m.is_blocked(&a, 0.5));
        assert_eq!(
            m.check(&b, 0.5).matched[0].pattern,
            b,
            "b's key matches a's rule"
        );
        // Removing b removes nothing; removing a frees the key for b.
        m.remove(&b);
        assert_eq!(m.domain_count(), 1);
        m.remove(&a);
        assert!(m.upsert(&b, 1.0, 1.0));
    }

    /// Placing a batch at once says and leaves what upserting its names one after the other
    /// does: the second name of a key refused (the first in the batch or a listed one holds
    /// it), a name given twice keeps its last weights.
    #[test]
    fn a_batch_placed_at_once_is_its_upserts_in_order() {
        let h = hasher();
        let (a, b) = crate::domain_hash::colliding_pair(&h, "test").unwrap();
        let mut names: Vec<(String, f64, f64)> = (0..3_000)
            .map(|i| (format!("casino{i}.example"), 1.0, f64::from(i % 3) / 2.0))
            .collect();
        names.insert(10, (a.clone(), 1.0, 1.0));
        names.insert(20, (b.clone(), 1.0, 1.0));
        names.insert(30, (a.clone(), 0.75, 0.0));
        names.push(("casino5.example".into(), 0.25, 0.25));
        for listed in [None, Some(&b)] {
            let fresh = || {
                let mut m =
                    Matcher::new(std::iter::empty(), &[], Lookalikes::new([""; 0]), h.clone());
                if let Some(n) = listed {
                    assert!(m.upsert(n, 1.0, 1.0));
                }
                m
            };
            let (mut one_by_one, mut at_once) = (fresh(), fresh());
            let expected: Vec<bool> = names
                .iter()
                .map(|(n, x, s)| one_by_one.upsert(n, *x, *s))
                .collect();
            let placed = at_once.upsert_many(names.iter().map(|(n, x, s)| (n.as_str(), *x, *s)));
            assert_eq!(placed, expected);
            let refused = if listed.is_some() { 2 } else { 1 };
            assert_eq!(
                placed.iter().filter(|p| !**p).count(),
                refused,
                "{listed:?}"
            );
            assert_eq!(at_once.domain_count(), one_by_one.domain_count());
            for (n, _, _) in &names {
                assert_eq!(at_once.check(n, 0.5), one_by_one.check(n, 0.5), "{n}");
                let sub = format!("www.{n}");
                assert_eq!(
                    at_once.check(&sub, 0.5),
                    one_by_one.check(&sub, 0.5),
                    "{sub}"
                );
            }
        }
    }

    fn pattern(p: &str, kind: PatternType, weight: f64) -> Pattern {
        Pattern {
            pattern: p.into(),
            kind,
            weight,
        }
    }

    #[test]
    fn weights_round_trip_with_four_decimals() {
        for text in ["0", "0.05", "0.5", "0.7", "0.85", "0.9999", "1"] {
            let w: f64 = text.parse().unwrap();
            assert_eq!(from_weight(to_weight(w)), w, "{text}");
        }
    }

    #[test]
    fn matches_every_kind() {
        let entries = [
            ("casino.example", 1.0, 1.0),
            ("exact-only.example", 0.9, 0.0),
        ];
        let patterns = [
            pattern("bet", PatternType::Contains, 0.7),
            pattern(r"^jg0\d{3}\.com$", PatternType::Regex, 0.8),
        ];
        let m = Matcher::new(
            entries.iter().copied(),
            &patterns,
            Lookalikes::new(["bet365"]),
            hasher(),
        );
        for name in [
            "casino.example",
            "www.casino.example",
            "jg0042.com",
            "b3t365.com",
        ] {
            assert!(m.is_blocked(name, 0.5), "{name}");
        }
        for name in [
            "sub.exact-only.example",
            "fine.example",
            "casino.example.org",
        ] {
            assert!(!m.is_blocked(name, 0.5), "{name}");
        }
        assert!(!m.is_blocked("mybet.example", 0.75));
        let v = m.check("b3t365.com", 0.5);
        assert_eq!(v.matched[0].kind, PatternType::Lookalike);
        let v = m.check("casino.example", 0.5);
        assert!(v.blocked && v.confidence == 1.0);
        let v = m.check("www.casino.example", 0.5);
        assert_eq!(v.matched[0].pattern, "*.casino.example");
        assert!(!m.check("sub.exact-only.example", 0.5).blocked);
        assert!(m.check("exact-only.example", 0.5).blocked);
        let v = m.check("jg0042.com", 0.5);
        assert_eq!((v.blocked, v.matched[0].kind), (true, PatternType::Regex));
        let v = m.check("mybet.example", 0.75);
        assert_eq!(
            (v.blocked, v.confidence),
            (false, 0.7),
            "below the threshold"
        );
        assert!(!m.check("fine.example", 0.5).blocked);
    }
}

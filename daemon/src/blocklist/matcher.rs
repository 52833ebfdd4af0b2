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
        let tag = self.hasher.tag(domain);
        self.domains
            .get(self.hasher.hash(domain))
            .is_some_and(|r| r.tag != tag)
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
        let tag = self.hasher.tag(domain);
        let rule = Rule {
            exact: to_weight(exact),
            sub: to_weight(sub),
            tag,
        };
        let hash = self.hasher.hash(domain);
        if self.domains.get(hash).is_some_and(|r| r.tag != tag) {
            return false;
        }
        self.domains.insert(hash, rule);
        true
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

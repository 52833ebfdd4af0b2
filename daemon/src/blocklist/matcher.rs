//! The matching engine: exact and subdomain rules by suffix lookup, `contains` with
//! Aho-Corasick, `regex` with a RegexSet. Confidence is the strongest matching weight.

use std::collections::HashMap;

use aho_corasick::AhoCorasick;
use regex::RegexSet;
use serde::Serialize;

use super::model::{Entry, Pattern, PatternType};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Matched {
    pub pattern: String,
    #[serde(rename = "type")]
    pub kind: PatternType,
    pub weight: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    pub domain: String,
    pub blocked: bool,
    #[serde(rename = "matchedPatterns")]
    pub matched: Vec<Matched>,
    pub confidence: f64,
}

/// Domain rules: (exact weight, subdomain weight), 0 = none.
type DomainRules = HashMap<String, (f64, f64)>;

pub struct Matcher {
    domains: DomainRules,
    contains: Option<(AhoCorasick, Vec<Pattern>)>,
    regex: Option<(RegexSet, Vec<Pattern>)>,
}

impl Matcher {
    /// Builds the engine. Patterns that do not compile were refused when added; should one
    /// slip through (an imported list), it is left out rather than failing the whole engine.
    pub fn new<'a>(entries: impl Iterator<Item = &'a Entry>, patterns: &[Pattern]) -> Self {
        let domains = entries.map(|e| (e.domain.clone(), e.weights())).collect();
        let mut m = Self {
            domains,
            contains: None,
            regex: None,
        };
        m.set_patterns(patterns);
        m
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

    pub fn upsert(&mut self, entry: &Entry) {
        self.domains.insert(entry.domain.clone(), entry.weights());
    }

    pub fn remove(&mut self, domain: &str) {
        self.domains.remove(domain);
    }

    /// Matches a normalised name.
    pub fn check(&self, name: &str, threshold: f64) -> Verdict {
        let mut matched = Vec::new();
        // The name itself, then each parent: only subdomain rules reach down.
        let mut suffix = name;
        let mut first = true;
        loop {
            if let Some((exact, sub)) = self.domains.get(suffix) {
                if first && *exact > 0.0 {
                    matched.push(Matched {
                        pattern: suffix.to_string(),
                        kind: PatternType::Exact,
                        weight: *exact,
                    });
                }
                if !first && *sub > 0.0 {
                    matched.push(Matched {
                        pattern: format!("*.{suffix}"),
                        kind: PatternType::Subdomain,
                        weight: *sub,
                    });
                }
            }
            first = false;
            match suffix.split_once('.') {
                Some((_, rest)) => suffix = rest,
                None => break,
            }
        }
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
        let confidence = matched.iter().map(|m| m.weight).fold(0.0, f64::max);
        Verdict {
            domain: name.to_string(),
            blocked: !matched.is_empty() && confidence >= threshold,
            matched,
            confidence,
        }
    }

    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }
}

/// Per-regex compiled size limit: a pattern that needs more is refused.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

pub fn compile_one(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(p: &str, kind: PatternType, weight: f64) -> Pattern {
        Pattern {
            pattern: p.into(),
            kind,
            weight,
        }
    }

    #[test]
    fn matches_every_kind() {
        let entries = [
            Entry::new("casino.example", true, 1.0, "r", 0),
            Entry::new("exact-only.example", false, 0.9, "r", 0),
        ];
        let patterns = [
            pattern("bet", PatternType::Contains, 0.7),
            pattern(r"^jg0\d{3}\.com$", PatternType::Regex, 0.8),
        ];
        let m = Matcher::new(entries.iter(), &patterns);
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

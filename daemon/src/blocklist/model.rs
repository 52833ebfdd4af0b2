//! Entries, patterns and domain normalisation (seed 001's data model).

use serde::{Deserialize, Serialize};

use crate::domain_name;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatternType {
    Exact,
    Subdomain,
    Contains,
    Regex,
    /// A match of lookalike detection (never stored in the list).
    Lookalike,
    /// A gambling word of the shipped vocabulary (never stored in the list).
    Vocabulary,
}

impl PatternType {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "exact" => Some(Self::Exact),
            "subdomain" => Some(Self::Subdomain),
            "contains" => Some(Self::Contains),
            "regex" => Some(Self::Regex),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Subdomain => "subdomain",
            Self::Contains => "contains",
            Self::Regex => "regex",
            Self::Lookalike => "lookalike",
            Self::Vocabulary => "vocabulary",
        }
    }
}

/// `{pattern, type, weight}` as in the seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pattern {
    pub pattern: String,
    #[serde(rename = "type")]
    pub kind: PatternType,
    pub weight: f64,
}

/// `{domain, patterns[], addedAt, reason}` as in the seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub domain: String,
    pub patterns: Vec<Pattern>,
    #[serde(rename = "addedAt")]
    pub added_at: u64,
    pub reason: String,
}

impl Entry {
    /// An entry for `domain` (normalised) with its exact pattern and, when `subdomains`, the
    /// `*.domain` one.
    pub fn new(domain: &str, subdomains: bool, weight: f64, reason: &str, added_at: u64) -> Self {
        let mut patterns = vec![Pattern {
            pattern: domain.to_string(),
            kind: PatternType::Exact,
            weight,
        }];
        if subdomains {
            patterns.push(Pattern {
                pattern: format!("*.{domain}"),
                kind: PatternType::Subdomain,
                weight,
            });
        }
        Self {
            domain: domain.to_string(),
            patterns,
            added_at,
            reason: reason.to_string(),
        }
    }

    /// The weight of the exact and of the subdomain pattern (0 when absent).
    pub fn weights(&self) -> (f64, f64) {
        let w = |k| {
            self.patterns
                .iter()
                .filter(|p| p.kind == k)
                .map(|p| p.weight)
                .fold(0.0, f64::max)
        };
        (w(PatternType::Exact), w(PatternType::Subdomain))
    }
}

pub use crate::domain_name::NameError;

/// A rule's domain in normal form (`crate::domain_name`); a leading `*.` is accepted, as list
/// formats write subdomain rules that way.
pub fn normalise(raw: &str) -> Result<String, NameError> {
    domain_name::normalise(strip_wildcard(raw))
}

/// Normalises and refuses names that are (or sit above) a public suffix: a rule must name at
/// least a registrable domain, so `co.za` or `com` can never be blocked wholesale.
pub fn rule_domain(raw: &str) -> Result<String, NameError> {
    domain_name::registrable(strip_wildcard(raw))
}

fn strip_wildcard(raw: &str) -> &str {
    let trimmed = raw.trim();
    trimmed.strip_prefix("*.").unwrap_or(trimmed)
}

/// One pattern that matched a name, with its weight (a `verify` reply lists them).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Matched {
    pub pattern: String,
    #[serde(rename = "type")]
    pub kind: PatternType,
    pub weight: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The normal form and the public-suffix rule are `domain_name`'s (tested there); a rule
    /// adds only the `*.` spelling.
    #[test]
    fn wildcard_spelling_of_a_rule() {
        assert_eq!(normalise("*.casino.example"), Ok("casino.example".into()));
        assert_eq!(rule_domain(" *.Bet.co.za."), Ok("bet.co.za".into()));
        assert!(matches!(
            rule_domain("*.co.za"),
            Err(NameError::PublicSuffix(_))
        ));
    }
}

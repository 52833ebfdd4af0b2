//! Entries, patterns and domain normalisation (seed 001's data model).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatternType {
    Exact,
    Subdomain,
    Contains,
    Regex,
    /// A match of lookalike detection (never stored in the list).
    Lookalike,
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

/// Why a name was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum NameError {
    Invalid(String),
    /// The rule would cover a whole public suffix (`co.za`, `com`).
    PublicSuffix(String),
}

/// Lowercase, no trailing dot, internationalised names to punycode, labels validated.
pub fn normalise(raw: &str) -> Result<String, NameError> {
    let trimmed = raw.trim().trim_end_matches('.');
    let trimmed = trimmed.strip_prefix("*.").unwrap_or(trimmed);
    if trimmed.is_empty() {
        return Err(NameError::Invalid("empty domain".into()));
    }
    let ascii = idna::domain_to_ascii(trimmed)
        .map_err(|_| NameError::Invalid(format!("{raw:?} is not a valid domain name")))?;
    if ascii.len() > 253 {
        return Err(NameError::Invalid(format!(
            "{raw:?} is longer than 253 characters"
        )));
    }
    for label in ascii.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(NameError::Invalid(format!(
                "{raw:?} has an empty or over-long label"
            )));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(NameError::Invalid(format!(
                "{raw:?} has an invalid label {label:?}"
            )));
        }
    }
    Ok(ascii)
}

/// Normalises and refuses names that are (or sit above) a public suffix: a rule must name at
/// least a registrable domain, so `co.za` or `com` can never be blocked wholesale.
pub fn rule_domain(raw: &str) -> Result<String, NameError> {
    let name = normalise(raw)?;
    if !name.contains('.') {
        return Err(NameError::PublicSuffix(format!(
            "{name:?} is a top-level domain; a rule needs at least a registrable domain"
        )));
    }
    match psl::domain_str(&name) {
        Some(_) => Ok(name),
        None => Err(NameError::PublicSuffix(format!(
            "{name:?} is a public suffix; a rule needs at least a registrable domain under it"
        ))),
    }
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

    #[test]
    fn normalises() {
        assert_eq!(
            normalise("WWW.Example-Bet.COM."),
            Ok("www.example-bet.com".into())
        );
        assert_eq!(
            normalise("bücher.example"),
            Ok("xn--bcher-kva.example".into())
        );
        assert_eq!(normalise("*.casino.example"), Ok("casino.example".into()));
        assert!(normalise("a..b").is_err());
        assert!(normalise("-x.com").is_err());
        assert!(normalise(&format!("{}.com", "a".repeat(64))).is_err());
    }

    #[test]
    fn refuses_public_suffixes() {
        assert!(matches!(
            rule_domain("co.za"),
            Err(NameError::PublicSuffix(_))
        ));
        assert!(matches!(
            rule_domain("com"),
            Err(NameError::PublicSuffix(_))
        ));
        assert!(matches!(
            rule_domain("github.io"),
            Err(NameError::PublicSuffix(_))
        ));
        assert_eq!(rule_domain("bet.co.za"), Ok("bet.co.za".into()));
    }
}

//! Importing lists: hosts files, AdBlock `||domain^` rules, plain lists, and seed-format JSON.
//! A malformed line is reported and skipped; the rest is imported.

use serde::Serialize;

use super::model::{Entry, NameError, rule_domain};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Hosts,
    Adblock,
    Plain,
    Json,
}

impl Format {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hosts" => Some(Self::Hosts),
            "adblock" => Some(Self::Adblock),
            "plain" => Some(Self::Plain),
            "json" => Some(Self::Json),
            _ => None,
        }
    }

    /// Guesses from the content: JSON, AdBlock rules, hosts lines, or a plain list.
    pub fn detect(text: &str) -> Self {
        let trimmed = text.trim_start();
        if trimmed.starts_with('{') || trimmed.starts_with('[') {
            return Self::Json;
        }
        let lines = || {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('!'))
        };
        let is_hosts_line = |l: &str| {
            let mut fields = l.split_whitespace();
            fields
                .next()
                .is_some_and(|a| a.parse::<std::net::IpAddr>().is_ok())
                && fields.next().is_some()
        };
        if lines().any(|l| l.starts_with("||")) {
            Self::Adblock
        } else if lines().any(is_hosts_line) {
            Self::Hosts
        } else {
            Self::Plain
        }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Skipped {
    pub line: usize,
    pub reason: String,
}

pub struct Parsed {
    pub entries: Vec<Entry>,
    pub skipped: Vec<Skipped>,
}

fn name_error(e: NameError) -> String {
    match e {
        NameError::Invalid(m) | NameError::PublicSuffix(m) => m,
    }
}

impl Parsed {
    fn accept(&mut self, line: usize, raw: &str, reason: &str, now: u64) {
        match rule_domain(raw) {
            Ok(d) => self.entries.push(Entry::new(&d, true, 1.0, reason, now)),
            Err(e) => self.skip(line, name_error(e)),
        }
    }

    fn skip(&mut self, line: usize, reason: impl Into<String>) {
        self.skipped.push(Skipped {
            line,
            reason: reason.into(),
        });
    }
}

/// Parses `text`; every accepted domain becomes an entry (subdomains included) with `reason`.
pub fn parse(text: &str, format: Format, reason: &str, now: u64) -> Parsed {
    let mut out = Parsed {
        entries: Vec::new(),
        skipped: Vec::new(),
    };
    if format == Format::Json {
        let value: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                out.skip(e.line(), format!("not valid JSON: {e}"));
                return out;
            }
        };
        // Seed format: {"entries": [{"domain": ..., "reason": ...}]} or a bare array.
        let list = value
            .get("entries")
            .and_then(|e| e.as_array())
            .or_else(|| value.as_array())
            .cloned()
            .unwrap_or_default();
        for (i, item) in list.iter().enumerate() {
            match item
                .get("domain")
                .and_then(|d| d.as_str())
                .or_else(|| item.as_str())
            {
                Some(d) => {
                    let why = item
                        .get("reason")
                        .and_then(|r| r.as_str())
                        .unwrap_or(reason);
                    out.accept(i + 1, d, why, now);
                }
                None => out.skip(i + 1, "entry without a domain"),
            }
        }
        return out;
    }
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let n = i + 1;
        if line.is_empty()
            || line.starts_with('#')
            || line.starts_with('!')
            || line.starts_with('[')
        {
            continue;
        }
        let line = line.split('#').next().unwrap_or("").trim();
        match format {
            Format::Hosts => {
                let mut fields = line.split_whitespace();
                let (Some(addr), Some(name)) = (fields.next(), fields.next()) else {
                    out.skip(n, "a hosts line needs an address and a name");
                    continue;
                };
                if addr.parse::<std::net::IpAddr>().is_err() {
                    out.skip(n, format!("{addr:?} is not an address"));
                    continue;
                }
                if matches!(
                    name,
                    "localhost" | "localhost.localdomain" | "local" | "broadcasthost"
                ) {
                    continue;
                }
                out.accept(n, name, reason, now);
            }
            Format::Adblock => {
                let Some(rule) = line.strip_prefix("||") else {
                    out.skip(n, "only ||domain^ rules are understood");
                    continue;
                };
                let domain = rule.split(['^', '$', '/']).next().unwrap_or("");
                out.accept(n, domain, reason, now);
            }
            Format::Plain => out.accept(n, line, reason, now),
            Format::Json => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_with_broken_lines() {
        let hosts = "# comment\n0.0.0.0 casino.example\n127.0.0.1 localhost\nnot-an-ip bet.example\n0.0.0.0\n0.0.0.0 co.za\n0.0.0.0 Poker.Example. # trailing\n";
        assert_eq!(Format::detect(hosts), Format::Hosts);
        let p = parse(hosts, Format::Hosts, "r", 0);
        let names: Vec<&str> = p.entries.iter().map(|e| e.domain.as_str()).collect();
        assert_eq!(names, vec!["casino.example", "poker.example"]);
        assert_eq!(
            p.skipped.iter().map(|s| s.line).collect::<Vec<_>>(),
            vec![4, 5, 6]
        );

        let adblock =
            "! title\n||casino.example^\n||bet.example^$important\n/ads/\n||bad..example^\n";
        assert_eq!(Format::detect(adblock), Format::Adblock);
        let p = parse(adblock, Format::Adblock, "r", 0);
        assert_eq!(p.entries.len(), 2);
        assert_eq!(p.skipped.len(), 2);

        let plain = "casino.example\nbücher.example\nnot a domain\n";
        assert_eq!(
            Format::detect("casino.example\nbet.example\n"),
            Format::Plain
        );
        let p = parse(plain, Format::Plain, "r", 0);
        assert_eq!(p.entries[1].domain, "xn--bcher-kva.example");
        assert_eq!(p.skipped.len(), 1);

        let json = r#"{"entries": [{"domain": "casino.example", "reason": "x"}, {"nodomain": 1}, {"domain": "com"}]}"#;
        let p = parse(json, Format::detect(json), "r", 0);
        assert_eq!((p.entries.len(), p.skipped.len()), (1, 2));
    }
}

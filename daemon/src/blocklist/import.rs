//! Importing lists: hosts files, AdBlock `||domain^` rules, plain lists, and seed-format JSON.
//! A malformed line is reported and skipped; the rest is imported.

use serde::Serialize;

use super::{
    batch::{Batch, StampId},
    model::{NameError, rule_domain},
};

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
            // An address is hex digits, `.` and `:` up to the whitespace before the name: most
            // lines of other lists are told apart at their first letters.
            let address = l
                .bytes()
                .take_while(|b| b.is_ascii_hexdigit() || matches!(b, b'.' | b':'))
                .count();
            if !l
                .get(address..)
                .is_some_and(|rest| rest.starts_with(char::is_whitespace))
            {
                return false;
            }
            let mut fields = l.split_whitespace();
            fields
                .next()
                .is_some_and(|a| a.parse::<std::net::IpAddr>().is_ok())
                && fields.next().is_some()
        };
        // One pass: an AdBlock rule anywhere decides; else a hosts line anywhere.
        let mut hosts = false;
        for l in lines() {
            if l.starts_with("||") {
                return Self::Adblock;
            }
            hosts = hosts || is_hosts_line(l);
        }
        if hosts { Self::Hosts } else { Self::Plain }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Skipped {
    pub line: usize,
    pub reason: String,
}

/// What a list gave: its entries, in the file's order, as a compact batch (no `Entry` is built
/// per name), and the lines skipped.
pub struct Parsed {
    pub entries: Batch,
    pub skipped: Vec<Skipped>,
}

/// [`Parsed`] with its entries built as `Entry`s (for a small list: the tests, the fuzz target).
pub struct ParsedEntries {
    pub entries: Vec<super::model::Entry>,
    pub skipped: Vec<Skipped>,
}

fn name_error(e: NameError) -> String {
    match e {
        NameError::Invalid(m) | NameError::PublicSuffix(m) => m,
    }
}

impl Parsed {
    /// Adds `raw`'s domain with its subdomains at weight 1, as `Entry::new(domain, true, 1.0,
    /// ..)` would.
    fn accept(&mut self, line: usize, raw: &str, stamp: StampId) {
        match rule_domain(raw) {
            Ok(d) => self.entries.push(&d, true, 1.0, stamp),
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

/// [`parse_batch`], with the entries built as `Entry`s (a large list is better left a batch).
pub fn parse(text: &str, format: Format, reason: &str, now: u64) -> ParsedEntries {
    let parsed = parse_batch(text, format, reason, now);
    ParsedEntries {
        entries: parsed.entries.entries(),
        skipped: parsed.skipped,
    }
}

/// Parses `text`; every accepted domain becomes an entry (subdomains included, weight 1) added
/// at `now` with `reason` (a seed-format JSON entry may carry its own reason).
pub fn parse_batch(text: &str, format: Format, reason: &str, now: u64) -> Parsed {
    let mut out = Parsed {
        // At most an entry per line, and the names are shorter than the text (pages reserved
        // and never written cost no memory).
        entries: Batch::with_capacity(text.bytes().filter(|&b| b == b'\n').count() + 1, text.len()),
        skipped: Vec::new(),
    };
    let stamp = out.entries.stamp(now, reason);
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
                    let stamp = out.entries.stamp(now, why);
                    out.accept(i + 1, d, stamp);
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
                out.accept(n, name, stamp);
            }
            Format::Adblock => {
                let Some(rule) = line.strip_prefix("||") else {
                    out.skip(n, "only ||domain^ rules are understood");
                    continue;
                };
                let domain = rule.split(['^', '$', '/']).next().unwrap_or("");
                out.accept(n, domain, stamp);
            }
            Format::Plain => out.accept(n, line, stamp),
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

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

    /// Guesses from the content: JSON, AdBlock rules, hosts lines, or a plain list. A large
    /// list is read in chunks on several threads ([`line_chunks`]).
    pub fn detect(text: &str) -> Self {
        let trimmed = text.trim_start();
        if trimmed.starts_with('{') || trimmed.starts_with('[') {
            return Self::Json;
        }
        let chunks = line_chunks(text);
        let seen: Vec<Self> = if chunks.len() == 1 {
            vec![Self::detect_lines(text)]
        } else {
            std::thread::scope(|s| {
                let running: Vec<_> = chunks
                    .iter()
                    .map(|chunk| s.spawn(|| Self::detect_lines(chunk)))
                    .collect();
                running
                    .into_iter()
                    .map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                    .collect()
            })
        };
        // An AdBlock rule anywhere decides; else a hosts line anywhere.
        if seen.contains(&Self::Adblock) {
            Self::Adblock
        } else if seen.contains(&Self::Hosts) {
            Self::Hosts
        } else {
            Self::Plain
        }
    }

    /// [`Format::detect`] for lines of a list that is not JSON.
    fn detect_lines(text: &str) -> Self {
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

/// A list this long (bytes) is parsed in chunks, one thread each: the names' checks (the
/// public-suffix look-up, IDNA) are most of an import's single-threaded time.
const CHUNKED_FROM: usize = 4 << 20;
/// At most this many chunks, however many CPUs there are.
const MAX_CHUNKS: usize = 8;

/// `text` cut into consecutive pieces that end at line ends: one per CPU (at most
/// [`MAX_CHUNKS`]) for a list of [`CHUNKED_FROM`] bytes or more, else the whole text.
fn line_chunks(text: &str) -> Vec<&str> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let n = cpus.min(MAX_CHUNKS);
    if text.len() < CHUNKED_FROM || n < 2 {
        return vec![text];
    }
    let mut chunks = Vec::with_capacity(n);
    let mut rest = text;
    for left in (2..=n).rev() {
        let want = rest.len() / left;
        // The first line end at or after `want`: a chunk holds whole lines only.
        let Some(end) = rest.as_bytes()[want..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| want + i + 1)
        else {
            break;
        };
        let (chunk, tail) = rest.split_at(end);
        chunks.push(chunk);
        rest = tail;
    }
    if !rest.is_empty() || chunks.is_empty() {
        chunks.push(rest);
    }
    chunks
}

/// Parses `text`; every accepted domain becomes an entry (subdomains included, weight 1) added
/// at `now` with `reason` (a seed-format JSON entry may carry its own reason). A large list is
/// parsed in chunks on several threads ([`line_chunks`]), with the same entries in the same
/// order and the same line numbers as one pass.
pub fn parse_batch(text: &str, format: Format, reason: &str, now: u64) -> Parsed {
    let chunks = if format == Format::Json {
        vec![text]
    } else {
        line_chunks(text)
    };
    if chunks.len() == 1 {
        return parse_chunk(text, format, reason, now).0;
    }
    let parsed: Vec<(Parsed, usize)> = std::thread::scope(|s| {
        let running: Vec<_> = chunks
            .iter()
            .map(|chunk| s.spawn(move || parse_chunk(chunk, format, reason, now)))
            .collect();
        running
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let mut parts = parsed.into_iter();
    let Some((mut out, mut lines_before)) = parts.next() else {
        return parse_chunk(text, format, reason, now).0;
    };
    let (entries, text_len) = parts.as_slice().iter().fold((0, 0), |(e, t), (p, _)| {
        (e + p.entries.len(), t + p.entries.text_len())
    });
    out.entries.reserve(entries, text_len);
    for (part, lines) in parts {
        out.entries.append(part.entries);
        out.skipped
            .extend(part.skipped.into_iter().map(|s| Skipped {
                line: s.line + lines_before,
                reason: s.reason,
            }));
        lines_before += lines;
    }
    out
}

/// [`parse_batch`] in one pass; also returns how many lines `text` holds.
fn parse_chunk(text: &str, format: Format, reason: &str, now: u64) -> (Parsed, usize) {
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
                return (out, 0);
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
        return (out, 0);
    }
    let mut lines = 0;
    for (i, raw) in text.lines().enumerate() {
        lines = i + 1;
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
    (out, lines)
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

    /// A list large enough to be parsed in chunks gives what one pass gives: the same entries
    /// in the same order, the same skipped lines with the same numbers, the same format.
    #[test]
    fn a_list_parsed_in_chunks_equals_one_pass() {
        let mut text = String::new();
        let mut i = 0;
        while text.len() < CHUNKED_FROM + CHUNKED_FROM / 4 {
            match i % 1000 {
                0 => text.push_str("# a comment\n"),
                1 => text.push_str("not a domain\n"),
                2 => text.push('\n'),
                3 => text.push_str("co.uk\n"),
                _ => text.push_str(&format!("Casino-{i}.Example.\n")),
            }
            i += 1;
        }
        text.push_str("last-line-without-end.example");
        let chunks = line_chunks(&text);
        assert!(chunks.concat() == text);
        assert!(chunks[..chunks.len() - 1].iter().all(|c| c.ends_with('\n')));
        if std::thread::available_parallelism().map_or(1, usize::from) > 1 {
            assert!(chunks.len() > 1, "a list this long is parsed in chunks");
        }
        for format in [Format::Plain, Format::Hosts] {
            let whole = match format {
                Format::Hosts => text.replace("Casino", "0.0.0.0 casino"),
                _ => text.clone(),
            };
            let chunked = parse_batch(&whole, format, "r", 7);
            let (one_pass, lines) = parse_chunk(&whole, format, "r", 7);
            assert_eq!(lines, whole.lines().count());
            assert_eq!(chunked.entries.len(), one_pass.entries.len());
            assert!(
                chunked
                    .entries
                    .iter()
                    .zip(one_pass.entries.iter())
                    .all(|(a, b)| a.entry() == b.entry())
            );
            assert_eq!(chunked.skipped, one_pass.skipped);
            assert_eq!(Format::detect(&whole), format);
        }
        let adblock = format!("{text}\n||bet.example^\n");
        assert_eq!(Format::detect(&adblock), Format::Adblock);
    }
}

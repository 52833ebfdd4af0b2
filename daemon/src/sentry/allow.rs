//! Good bots and open paths (`[sentry] good_bots`, `open_paths`): requests the sentry lets
//! through although they would be challenged. Asked only then (docs/sentry.md "Good bots and
//! open paths"), so an ordinary request never pays for a match.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use regex::RegexSet;

use crate::{config::GoodBot, error::InvalidValue};

/// Inclusive address intervals of one family, sorted and merged: a lookup is one binary search.
#[derive(Debug, Default)]
struct Ranges<T> {
    spans: Vec<(T, T)>,
}

impl<T: Copy + Ord + std::ops::Add<Output = T> + From<u8>> Ranges<T> {
    fn build(mut spans: Vec<(T, T)>) -> Self {
        spans.sort_unstable();
        let mut merged: Vec<(T, T)> = Vec::with_capacity(spans.len());
        for (lo, hi) in spans {
            match merged.last_mut() {
                // Overlapping or adjacent (no address in between).
                Some(last) if last.1 >= lo || (last.1 < hi && last.1 + T::from(1) == lo) => {
                    if hi > last.1 {
                        last.1 = hi;
                    }
                }
                _ => merged.push((lo, hi)),
            }
        }
        Self { spans: merged }
    }

    fn contains(&self, x: T) -> bool {
        let i = self.spans.partition_point(|(lo, _)| *lo <= x);
        i > 0 && self.spans.get(i - 1).is_some_and(|(_, hi)| x <= *hi)
    }
}

/// One good bot's networks and its pass counter.
#[derive(Debug)]
struct Bot {
    name: String,
    v4: Ranges<u32>,
    v6: Ranges<u128>,
    passed: AtomicU64,
}

impl Bot {
    fn holds(&self, ip: IpAddr) -> bool {
        match crate::sentry::canonical(ip) {
            IpAddr::V4(a) => self.v4.contains(u32::from(a)),
            IpAddr::V6(a) => self.v6.contains(u128::from(a)),
        }
    }
}

/// The configured good bots: one compiled set of user-agent expressions, and each bot's
/// sorted networks.
#[derive(Debug)]
pub struct GoodBots {
    agents: RegexSet,
    bots: Vec<Bot>,
}

impl GoodBots {
    /// Compiles `[[sentry.good_bots]]` (reading each `ranges_file`).
    pub fn new(config: &[GoodBot]) -> Result<Self, InvalidValue> {
        let agents = RegexSet::new(config.iter().map(|b| b.user_agent.as_str()))
            .map_err(|e| InvalidValue(format!("sentry.good_bots: user_agent: {e}")))?;
        let mut bots = Vec::with_capacity(config.len());
        for b in config {
            let (mut v4, mut v6) = (Vec::new(), Vec::new());
            for net in b.networks()? {
                match net {
                    ipnet::IpNet::V4(n) => {
                        v4.push((u32::from(n.network()), u32::from(n.broadcast())))
                    }
                    ipnet::IpNet::V6(n) => {
                        v6.push((u128::from(n.network()), u128::from(n.broadcast())))
                    }
                }
            }
            bots.push(Bot {
                name: b.name.clone(),
                v4: Ranges::build(v4),
                v6: Ranges::build(v6),
                passed: AtomicU64::new(0),
            });
        }
        Ok(Self { agents, bots })
    }

    pub fn is_empty(&self) -> bool {
        self.bots.is_empty()
    }

    /// The bot whose user agent **and** networks both match, counting its pass. A user agent
    /// alone, or an address alone, is nothing.
    pub fn pass(&self, user_agent: Option<&str>, ip: IpAddr) -> Option<&str> {
        let ua = user_agent?;
        if self.bots.is_empty() {
            return None;
        }
        let bot = self
            .agents
            .matches(ua)
            .into_iter()
            .filter_map(|i| self.bots.get(i))
            .find(|b| b.holds(ip))?;
        bot.passed.fetch_add(1, Ordering::Relaxed);
        Some(&bot.name)
    }

    /// Each bot's name and the requests it passed, in configuration order.
    pub fn passes(&self) -> Vec<(&str, u64)> {
        self.bots
            .iter()
            .map(|b| (b.name.as_str(), b.passed.load(Ordering::Relaxed)))
            .collect()
    }
}

/// `[sentry] open_paths`: an entry ending in `/` covers every path under it; any other entry
/// exactly that path. The query string is not part of the match.
#[derive(Debug, Default)]
pub struct OpenPaths {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl OpenPaths {
    pub fn new(entries: &[String]) -> Self {
        let (prefixes, exact) = entries.iter().cloned().partition(|e| e.ends_with('/'));
        Self { exact, prefixes }
    }

    /// Whether the request target (path and query) is open. A path that a server might
    /// resolve elsewhere (`..`, `//`, a `%` escape, a backslash) is never open: otherwise
    /// `/.well-known/../search` would pass unchallenged to an upstream that normalises it.
    pub fn matches(&self, target: &str) -> bool {
        let path = target.split_once('?').map_or(target, |(p, _)| p);
        if !path.starts_with('/')
            || path.contains("..")
            || path.contains("//")
            || path.bytes().any(|b| b == b'%' || b == b'\\')
        {
            return false;
        }
        self.exact.iter().any(|e| e == path) || self.prefixes.iter().any(|p| path.starts_with(p))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn bot(name: &str, ua: &str, ranges: &[&str]) -> GoodBot {
        GoodBot {
            name: name.into(),
            user_agent: ua.into(),
            ranges: ranges.iter().map(|r| r.to_string()).collect(),
            ranges_file: String::new(),
        }
    }

    const GOOGLEBOT_UA: &str =
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";

    #[test]
    fn user_agent_and_address_must_both_match() {
        let bots = GoodBots::new(&[
            bot(
                "googlebot",
                r"Googlebot/",
                &["66.249.64.0/27", "2001:4860:4801:10::/64"],
            ),
            bot(
                "bingbot",
                r"(?i)bingbot",
                &["157.55.39.0/24", "40.77.167.5"],
            ),
        ])
        .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            bots.pass(Some(GOOGLEBOT_UA), ip("66.249.64.7")),
            Some("googlebot")
        );
        assert_eq!(
            bots.pass(Some(GOOGLEBOT_UA), ip("66.249.64.31")),
            Some("googlebot")
        );
        assert_eq!(
            bots.pass(Some(GOOGLEBOT_UA), ip("2001:4860:4801:10::99")),
            Some("googlebot")
        );
        assert_eq!(
            bots.pass(Some(GOOGLEBOT_UA), ip("::ffff:66.249.64.1")),
            Some("googlebot"),
            "an IPv4-mapped address is its IPv4 address"
        );
        // The user agent alone, from another address (just outside the /27), or from
        // another bot's range: challenged.
        assert_eq!(bots.pass(Some(GOOGLEBOT_UA), ip("66.249.64.32")), None);
        assert_eq!(bots.pass(Some(GOOGLEBOT_UA), ip("203.0.113.9")), None);
        assert_eq!(bots.pass(Some(GOOGLEBOT_UA), ip("157.55.39.1")), None);
        // The address alone: an ordinary browser from the bot's range.
        assert_eq!(
            bots.pass(Some("Mozilla/5.0 Firefox/140.0"), ip("66.249.64.7")),
            None
        );
        assert_eq!(bots.pass(None, ip("66.249.64.7")), None);
        assert_eq!(
            bots.pass(Some("x bingBOT/2.0"), ip("157.55.39.200")),
            Some("bingbot")
        );
        assert_eq!(
            bots.pass(Some("bingbot"), ip("40.77.167.5")),
            Some("bingbot")
        );
        assert_eq!(bots.pass(Some("bingbot"), ip("40.77.167.6")), None);
        assert_eq!(bots.passes(), vec![("googlebot", 4), ("bingbot", 2)]);
    }

    #[test]
    fn ranges_merge_and_search() {
        let r = Ranges::build(vec![(10u32, 20), (21, 25), (5, 12), (40, 40), (30, 35)]);
        assert_eq!(r.spans, vec![(5, 25), (30, 35), (40, 40)]);
        for (x, inside) in [
            (4, false),
            (5, true),
            (25, true),
            (26, false),
            (40, true),
            (41, false),
        ] {
            assert_eq!(r.contains(x), inside, "{x}");
        }
        let full = Ranges::build(vec![(0u32, u32::MAX), (7, 9)]);
        assert!(full.contains(0) && full.contains(u32::MAX));
        assert!(!Ranges::<u32>::build(Vec::new()).contains(0));
    }

    #[test]
    fn ranges_file_with_comments_and_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bot.txt");
        std::fs::write(
            &file,
            "# Example list\n\n192.0.2.0/28  # office\n2001:db8::/48\n198.51.100.7\n",
        )
        .unwrap();
        let mut b = bot("filebot", "FileBot", &[]);
        b.ranges_file = file.display().to_string();
        let bots = GoodBots::new(std::slice::from_ref(&b)).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(bots.pass(Some("FileBot/1"), ip("192.0.2.15")).is_some());
        assert!(bots.pass(Some("FileBot/1"), ip("192.0.2.16")).is_none());
        assert!(
            bots.pass(Some("FileBot/1"), ip("2001:db8:0:ffff::1"))
                .is_some()
        );
        assert!(bots.pass(Some("FileBot/1"), ip("198.51.100.7")).is_some());

        std::fs::write(&file, "192.0.2.0/28\n192.0.2.300/32\n").unwrap();
        let e = b.networks().unwrap_err().0;
        assert!(e.contains("192.0.2.300/32") && e.contains("line 2"), "{e}");
        b.ranges_file = dir.path().join("missing.txt").display().to_string();
        let e = b.networks().unwrap_err().0;
        assert!(e.contains("cannot read ranges_file"), "{e}");
        b.ranges_file = "relative.txt".into();
        assert!(b.networks().unwrap_err().0.contains("absolute"));
        // A user agent without any network is refused: never the user agent alone.
        let e = bot("uaonly", "Bot", &[]).networks().unwrap_err().0;
        assert!(e.contains("never by user agent alone"), "{e}");
    }

    #[test]
    fn shipped_example_lists_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/good-bots");
        for (name, ua, inside) in [
            ("googlebot", "Googlebot", "66.249.64.1"),
            ("bingbot", "bingbot", "157.55.39.1"),
        ] {
            let b = GoodBot {
                name: name.into(),
                user_agent: ua.into(),
                ranges: Vec::new(),
                ranges_file: dir.join(format!("{name}.txt")).display().to_string(),
            };
            let bots = GoodBots::new(&[b]).unwrap();
            assert_eq!(bots.pass(Some(ua), inside.parse().unwrap()), Some(name));
            assert_eq!(bots.pass(Some(ua), "192.0.2.1".parse().unwrap()), None);
        }
    }

    #[test]
    fn open_paths_exact_and_prefix() {
        let open = OpenPaths::new(&[
            "/robots.txt".into(),
            "/.well-known/".into(),
            "/feed.xml".into(),
        ]);
        for (target, want) in [
            ("/robots.txt", true),
            ("/robots.txt?x=1", true),
            ("/robots.txt.bak", false),
            ("/robots.txtx", false),
            ("/.well-known/security.txt", true),
            ("/.well-known/acme-challenge/abc", true),
            ("/.well-known", false),
            ("/.well-known/../search", false),
            ("/.well-known/%2e%2e/search", false),
            ("/.well-known//x", false),
            ("/.well-known/\\..\\x", false),
            ("/feed.xml", true),
            ("/", false),
            ("*", false),
        ] {
            assert_eq!(open.matches(target), want, "{target}");
        }
        assert!(!OpenPaths::new(&[]).matches("/robots.txt"));
    }
}

//! Lookalike detection: names that imitate a known gambling brand to dodge exact lists.
//!
//! Only the registrable label is examined (`b3t365` in `www.b3t365.co.uk`): that is where
//! mirror operators make their changes. Four kinds, strongest first:
//!
//! - the brand on another suffix (`bet365.net` for `bet365`): 0.9;
//! - a punycode name whose Unicode form reads as the brand (`xn--bt365-...`, Cyrillic `е`): 0.9;
//! - digit and homoglyph swaps (`b3t365`, `bet3б5`, `rn` for `m`) and numbered mirrors
//!   (`jojobet1045`): 0.85;
//! - one edit away (insertion, deletion, substitution or adjacent swap) from a brand of at least
//!   six characters (`bett365`, `betwya`): 0.45 — reported by `verify` but below the default
//!   threshold, because real words sit one edit from brands too (`bestway` and `betway`); an
//!   operator who wants typo domains blocked lowers the threshold.
//!
//! Every check is a hash lookup: brand skeletons and their one-deletion variants are indexed up
//! front (symmetric deletion), and the few candidates it yields are confirmed with
//! Damerau-Levenshtein. No per-brand scan happens per name.
//!
//! Mirror detection adds two kinds, from vocabulary shipped as data
//! (`daemon/data/mirror-vocabulary.txt`): a brand inside a longer label whose rest is only
//! mirror affixes and digits (`bet365giris`, `yeni-bet365`, `bet365mobil12`): 0.85; and a
//! one-edit typo of a brand that also carries a gambling word (`bet366` carries `bet`): 0.85.
//! The gambling words are weighted patterns of their own, below the default threshold. No
//! heuristic blocks a domain of the shipped list of popular legitimate domains
//! (`daemon/data/legitimate-domains.txt`); the operator's explicit rules still do.

use std::collections::{HashMap, HashSet};

use aho_corasick::{AhoCorasick, MatchKind};

use super::model::{Matched, PatternType};
pub use crate::config::DEFAULT_BRANDS;

/// Shipped data: the mirror vocabulary, and the domains the heuristics stand aside for.
const VOCABULARY: &str = include_str!("../../data/mirror-vocabulary.txt");
const LEGITIMATE: &str = include_str!("../../data/legitimate-domains.txt");

pub const WEIGHT_AFFIXED: f64 = 0.85;
pub const WEIGHT_EDIT_WITH_SIGNAL: f64 = 0.85;

pub const WEIGHT_OTHER_SUFFIX: f64 = 0.9;
pub const WEIGHT_PUNYCODE: f64 = 0.9;
pub const WEIGHT_SUBSTITUTION: f64 = 0.85;
pub const WEIGHT_EDIT: f64 = 0.45;
/// Shorter brands match only through substitutions: one edit from `bwin` is too many words.
const MIN_EDIT_LEN: usize = 6;

/// Characters that read as another: digits, Cyrillic, Greek and Turkish letters, fullwidth
/// forms are handled by NFKC in `idna` already.
fn fold(c: char) -> Option<char> {
    Some(match c {
        'a'..='z' => c,
        '0' => 'o',
        '1' | 'ı' | 'і' | 'ì' | 'í' | 'ï' | 'ι' => 'l',
        '3' | 'е' | 'ё' | 'é' | 'è' | 'ê' | 'ε' => 'e',
        '4' | 'а' | 'à' | 'á' | 'â' | 'ä' | 'α' => 'a',
        '5' | 'ş' | 'ѕ' | 'ś' => 's',
        '6' | 'б' | 'ğ' => 'g',
        '7' => 't',
        '8' | 'в' | 'β' => 'b',
        '9' => 'g',
        '2' => 'z',
        'о' | 'ο' | 'ö' | 'ó' | 'ò' | 'ô' => 'o',
        'р' | 'ρ' => 'p',
        'с' | 'ç' => 'c',
        'х' | 'χ' => 'x',
        'у' | 'ү' => 'y',
        'к' | 'κ' => 'k',
        'м' => 'm',
        'н' => 'h',
        'т' | 'τ' => 't',
        'ü' | 'ú' | 'ù' | 'û' | 'υ' => 'u',
        'ń' | 'η' => 'n',
        'ԝ' | 'ω' => 'w',
        '-' | '_' => return None,
        _ => c,
    })
}

/// The brand-comparable form of a label: homoglyphs and digits folded to letters, hyphens
/// dropped, `rn` read as `m` and `vv` as `w`.
pub fn skeleton(label: &str) -> String {
    skeleton_of_folded(&folded(label))
}

/// Homoglyphs and digits folded to letters, hyphens dropped; no `rn`/`vv` reading.
fn folded(label: &str) -> String {
    label.chars().filter_map(fold).collect()
}

fn skeleton_of_folded(folded: &str) -> String {
    folded.replace("rn", "m").replace("vv", "w")
}

#[derive(Clone, Debug)]
struct Brand {
    name: String,
    skeleton: String,
}

/// The shipped vocabulary, parsed.
struct Vocabulary {
    affixes: HashSet<String>,
    longest_affix: usize,
    /// Gambling words and their weights, found anywhere in a name.
    signals: Option<AhoCorasick>,
    signal_words: Vec<(String, f64)>,
    strongest_signal: f64,
}

impl Vocabulary {
    fn shipped() -> Self {
        let mut affixes = HashSet::new();
        let mut signal_words = Vec::new();
        for line in VOCABULARY.lines().map(str::trim) {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some("affix"), Some(word), None) => {
                    affixes.insert(word.to_string());
                }
                (Some("signal"), Some(word), Some(weight)) => {
                    if let Ok(w) = weight.parse::<f64>() {
                        signal_words.push((word.to_string(), w));
                    }
                }
                _ => {}
            }
        }
        let signals = AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .build(signal_words.iter().map(|(w, _)| w.as_str()))
            .ok();
        Self {
            longest_affix: affixes.iter().map(String::len).max().unwrap_or(0),
            affixes,
            strongest_signal: signal_words.iter().map(|(_, w)| *w).fold(0.0, f64::max),
            signals,
            signal_words,
        }
    }

    /// Whether `s` (ASCII) is only affixes and digits, in any order.
    fn only_affixes(&self, s: &str) -> bool {
        let b = s.as_bytes();
        // reach[i]: the first i bytes split into affixes and digit runs.
        let mut reach = vec![false; b.len() + 1];
        reach[0] = true;
        for i in 0..b.len() {
            if !reach[i] {
                continue;
            }
            if b[i].is_ascii_digit() {
                reach[i + 1] = true;
                continue;
            }
            for len in 2..=self.longest_affix.min(b.len() - i) {
                if s.get(i..i + len).is_some_and(|w| self.affixes.contains(w)) {
                    reach[i + len] = true;
                }
            }
        }
        reach[b.len()]
    }

    /// The strongest gambling word in `name`, if any.
    fn strongest_in(&self, name: &str) -> Option<&(String, f64)> {
        let ac = self.signals.as_ref()?;
        ac.find_overlapping_iter(name)
            .map(|m| &self.signal_words[m.pattern().as_usize()])
            // Equal weights: the longer word says more (`canlibahis` over `bahis`).
            .max_by(|a, b| a.1.total_cmp(&b.1).then(a.0.len().cmp(&b.0.len())))
    }
}

/// Turkish letters as the affixes are written (`giriş` is `giris`).
fn fold_turkish(c: char) -> char {
    match c {
        'ş' => 's',
        'ı' => 'i',
        'ğ' => 'g',
        'ü' => 'u',
        'ö' => 'o',
        'ç' => 'c',
        c => c,
    }
}

pub struct Lookalikes {
    brands: Vec<Brand>,
    /// Brand name -> index (the brand itself on another suffix).
    by_name: HashMap<String, usize>,
    /// Skeleton -> brand indexes (substitutions).
    by_skeleton: HashMap<String, Vec<usize>>,
    /// One-deletion variants of the skeletons of brands long enough for edit matching.
    by_deletion: HashMap<String, Vec<usize>>,
    /// The brand names, found inside longer labels.
    inside: Option<AhoCorasick>,
    vocabulary: Vocabulary,
    /// Registrable domains no heuristic blocks.
    legitimate: HashSet<String>,
}

fn deletions(s: &str) -> impl Iterator<Item = String> + '_ {
    s.char_indices().map(move |(i, c)| {
        let mut v = String::with_capacity(s.len());
        v.push_str(&s[..i]);
        v.push_str(&s[i + c.len_utf8()..]);
        v
    })
}

impl Lookalikes {
    pub fn new<'a>(brands: impl IntoIterator<Item = &'a str>) -> Self {
        let mut l = Self {
            brands: Vec::new(),
            by_name: HashMap::new(),
            by_skeleton: HashMap::new(),
            by_deletion: HashMap::new(),
            inside: None,
            vocabulary: Vocabulary::shipped(),
            legitimate: LEGITIMATE
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect(),
        };
        for name in brands {
            let name = name.trim().to_ascii_lowercase();
            if name.is_empty() || l.by_name.contains_key(&name) {
                continue;
            }
            let i = l.brands.len();
            let skeleton = skeleton(&name);
            l.by_name.insert(name.clone(), i);
            l.by_skeleton.entry(skeleton.clone()).or_default().push(i);
            if skeleton.chars().count() >= MIN_EDIT_LEN {
                for d in deletions(&skeleton) {
                    l.by_deletion.entry(d).or_default().push(i);
                }
            }
            l.brands.push(Brand { name, skeleton });
        }
        l.inside = AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .build(l.brands.iter().map(|b| b.name.as_str()))
            .ok();
        l
    }

    /// Whether `registrable` is on the shipped list of popular legitimate domains.
    pub fn is_legitimate(&self, registrable: &str) -> bool {
        self.legitimate.contains(registrable)
    }

    /// The strongest gambling word of the shipped vocabulary in `name`, as a match.
    pub fn vocabulary(&self, name: &str) -> Option<Matched> {
        let (word, weight) = self.vocabulary.strongest_in(name)?;
        if psl::domain_str(name).is_some_and(|r| self.is_legitimate(r)) {
            return None;
        }
        Some(Matched {
            pattern: format!("vocabulary:{word}"),
            kind: PatternType::Vocabulary,
            weight: *weight,
        })
    }

    /// The weight of the strongest word the vocabulary has (the resolver skips the scan when
    /// it cannot reach the threshold).
    pub fn strongest_vocabulary_weight(&self) -> f64 {
        self.vocabulary.strongest_signal
    }

    /// A brand inside `bare` (the label without hyphens, Turkish letters folded) with nothing
    /// but affixes and digits around it.
    fn affixed(&self, bare: &str) -> Option<usize> {
        let ac = self.inside.as_ref()?;
        ac.find_overlapping_iter(bare).find_map(|m| {
            let (before, after) = (&bare[..m.start()], &bare[m.end()..]);
            ((!before.is_empty() || !after.is_empty())
                && self.vocabulary.only_affixes(before)
                && self.vocabulary.only_affixes(after))
            .then(|| m.pattern().as_usize())
        })
    }

    pub fn len(&self) -> usize {
        self.brands.len()
    }

    pub fn is_empty(&self) -> bool {
        self.brands.is_empty()
    }

    pub fn brands(&self) -> impl Iterator<Item = &str> {
        self.brands.iter().map(|b| b.name.as_str())
    }

    fn matched(&self, i: usize, how: &str, weight: f64) -> Matched {
        Matched {
            pattern: format!("lookalike:{} ({how})", self.brands[i].name),
            kind: PatternType::Lookalike,
            weight,
        }
    }

    /// The strongest lookalike match of a normalised name, if any.
    pub fn check(&self, name: &str) -> Option<Matched> {
        if self.brands.is_empty() {
            return None;
        }
        let registrable = psl::domain_str(name)?;
        if self.is_legitimate(registrable) {
            return None;
        }
        let label = registrable.split('.').next()?;
        if let Some(&i) = self.by_name.get(label) {
            return Some(self.matched(i, "brand on another suffix", WEIGHT_OTHER_SUFFIX));
        }
        let (unicode, punycode) = match label.strip_prefix("xn--") {
            Some(_) => {
                let (u, r) = idna::domain_to_unicode(label);
                if r.is_err() {
                    return None;
                }
                (u, true)
            }
            None => (label.to_string(), false),
        };
        let plain = folded(&unicode);
        let skel = skeleton_of_folded(&plain);
        if let Some(i) = self.by_skeleton.get(&skel).and_then(|v| v.first()) {
            return Some(if punycode {
                self.matched(*i, "punycode lookalike", WEIGHT_PUNYCODE)
            } else {
                self.matched(*i, "character swap", WEIGHT_SUBSTITUTION)
            });
        }
        // Numbered mirrors: the brand with a counter on the end (`jojobet1045`).
        let stem = unicode.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
        if stem.len() < unicode.len()
            && let Some(&i) = self.by_name.get(stem).or_else(|| {
                self.by_skeleton
                    .get(&skeleton(stem))
                    .and_then(|v| v.first())
            })
        {
            return Some(self.matched(i, "numbered mirror", WEIGHT_SUBSTITUTION));
        }
        let bare: String = unicode
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .map(fold_turkish)
            .collect();
        if let Some(i) = self.affixed(&bare) {
            return Some(self.matched(i, "brand with mirror affixes", WEIGHT_AFFIXED));
        }
        // `rn` read as `m` turns a swap inside `grandpashabet` into two edits: the typo is
        // also compared letter for letter.
        let i = self
            .edit_match(&skel)
            .or_else(|| (plain != skel).then(|| self.edit_match(&plain)).flatten())?;
        Some(match self.vocabulary.strongest_in(&bare) {
            Some((word, _)) => self.matched(
                i,
                &format!("one edit away, with the gambling word \"{word}\""),
                WEIGHT_EDIT_WITH_SIGNAL,
            ),
            None => self.matched(i, "one edit away", WEIGHT_EDIT),
        })
    }

    /// A brand whose skeleton is one edit from `skel` (symmetric deletion, then confirmed).
    fn edit_match(&self, skel: &str) -> Option<usize> {
        let n = skel.chars().count();
        if n + 1 < MIN_EDIT_LEN || n > 64 {
            return None;
        }
        let confirm = |i: &usize| {
            let brand = &self.brands[*i].skeleton;
            brand.chars().count() >= MIN_EDIT_LEN && strsim::damerau_levenshtein(skel, brand) == 1
        };
        // `skel` is the brand with one character inserted, or substituted/swapped.
        for d in deletions(skel) {
            if let Some(i) = self
                .by_skeleton
                .get(&d)
                .and_then(|v| v.iter().find(|i| confirm(i)))
            {
                return Some(*i);
            }
            if let Some(i) = self
                .by_deletion
                .get(&d)
                .and_then(|v| v.iter().find(|i| confirm(i)))
            {
                return Some(*i);
            }
        }
        // `skel` is the brand with one character deleted.
        self.by_deletion
            .get(skel)
            .and_then(|v| v.iter().find(|i| confirm(i)))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(l: &Lookalikes, name: &str) -> Option<(String, f64)> {
        l.check(name).map(|m| (m.pattern, m.weight))
    }

    #[test]
    fn finds_each_kind() {
        let l = Lookalikes::new(DEFAULT_BRANDS.iter().copied());
        assert_eq!(
            kind(&l, "www.bet365.net").unwrap().1,
            WEIGHT_OTHER_SUFFIX,
            "brand on another suffix"
        );
        assert_eq!(kind(&l, "b3t365.com").unwrap().1, WEIGHT_SUBSTITUTION);
        assert_eq!(kind(&l, "jojobet1045.com").unwrap().1, WEIGHT_SUBSTITUTION);
        assert_eq!(kind(&l, "jojo-bet.com").unwrap().1, WEIGHT_SUBSTITUTION);
        // One edit alone, and one edit with a gambling word (the brand's own `bet` counts).
        assert_eq!(kind(&l, "unibez.com").unwrap().1, WEIGHT_EDIT);
        assert_eq!(kind(&l, "ladbrokez.com").unwrap().1, WEIGHT_EDIT);
        assert_eq!(kind(&l, "bettway.com").unwrap().1, WEIGHT_EDIT_WITH_SIGNAL);
        assert_eq!(kind(&l, "betwya.com").unwrap().1, WEIGHT_EDIT_WITH_SIGNAL);
        assert_eq!(kind(&l, "bet366.com").unwrap().1, WEIGHT_EDIT_WITH_SIGNAL);
        assert_eq!(
            kind(&l, "bet365x.co.uk").unwrap().1,
            WEIGHT_EDIT_WITH_SIGNAL
        );
        // Brands with mirror affixes.
        for mirror in [
            "bet365giris.com",
            "bet365-tr.com",
            "yeni-bet365.net",
            "bet365mobil12.com",
            "jojobetguncelgiris.com",
            "www.casibom-yeni-adres.org",
        ] {
            let (p, w) = kind(&l, mirror).unwrap_or_else(|| panic!("{mirror}"));
            assert_eq!(w, WEIGHT_AFFIXED, "{mirror}: {p}");
        }
        // giriş, Turkish ş: punycode in the name.
        let puny = idna::domain_to_ascii("bet365giriş.com").unwrap();
        assert_eq!(kind(&l, &puny).unwrap().1, WEIGHT_AFFIXED);
        // Cyrillic е in bеt365.
        let puny = idna::domain_to_ascii("b\u{435}t365.com").unwrap();
        assert!(puny.starts_with("xn--"));
        let (p, w) = kind(&l, &puny).unwrap();
        assert_eq!(w, WEIGHT_PUNYCODE);
        assert!(p.contains("bet365"), "{p}");
    }

    #[test]
    fn leaves_ordinary_names_alone() {
        let l = Lookalikes::new(DEFAULT_BRANDS.iter().copied());
        for name in [
            "example.com",
            "wikipedia.org",
            "mail.google.com",
            "betterhelp.com",
            "stackexchange.com",
            "bet365.example.github.io",
            "com",
            "xn--bcher-kva.example",
            "stakes.com",
            "mistake.com",
            "stakeholder.com",
            "bestway.com",
        ] {
            assert_eq!(kind(&l, name), None, "{name}");
        }
    }

    #[test]
    fn the_shipped_legitimate_domains_are_never_caught() {
        let l = Lookalikes::new(DEFAULT_BRANDS.iter().copied());
        for name in LEGITIMATE
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            // The guard compares registrable domains: an entry that is not one never matches.
            assert_eq!(
                psl::domain_str(name),
                Some(name),
                "{name} is not a registrable domain"
            );
            assert_eq!(kind(&l, name), None, "{name}");
            assert_eq!(kind(&l, &format!("www.{name}")), None, "www.{name}");
            assert!(l.vocabulary(name).is_none(), "{name}");
        }
    }

    #[test]
    fn vocabulary_words_are_weighted_below_the_default_threshold() {
        let l = Lookalikes::new(DEFAULT_BRANDS.iter().copied());
        let m = l.vocabulary("canlibahis-tahmin.example").unwrap();
        assert_eq!(m.kind, PatternType::Vocabulary);
        assert_eq!(m.pattern, "vocabulary:canlibahis");
        assert!(l.strongest_vocabulary_weight() < 0.5);
        assert!(l.vocabulary("example.com").is_none());
    }
}

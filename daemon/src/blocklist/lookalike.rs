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

use std::collections::HashMap;

use super::model::{Matched, PatternType};
pub use crate::config::DEFAULT_BRANDS;

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
    let folded: String = label.chars().filter_map(fold).collect();
    folded.replace("rn", "m").replace("vv", "w")
}

#[derive(Clone, Debug)]
struct Brand {
    name: String,
    skeleton: String,
}

pub struct Lookalikes {
    brands: Vec<Brand>,
    /// Brand name -> index (the brand itself on another suffix).
    by_name: HashMap<String, usize>,
    /// Skeleton -> brand indexes (substitutions).
    by_skeleton: HashMap<String, Vec<usize>>,
    /// One-deletion variants of the skeletons of brands long enough for edit matching.
    by_deletion: HashMap<String, Vec<usize>>,
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
        l
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
        let skel = skeleton(&unicode);
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
        self.edit_match(&skel)
            .map(|i| self.matched(i, "one edit away", WEIGHT_EDIT))
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
        assert_eq!(kind(&l, "bettway.com").unwrap().1, WEIGHT_EDIT);
        assert_eq!(kind(&l, "betwya.com").unwrap().1, WEIGHT_EDIT);
        assert_eq!(kind(&l, "bet365x.co.uk").unwrap().1, WEIGHT_EDIT);
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
        ] {
            assert_eq!(kind(&l, name), None, "{name}");
        }
    }
}

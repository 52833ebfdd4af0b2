//! The listed domains, sorted, in compact form. A list runs to millions of names, so they live
//! back to back in one text arena and each row is 24 bytes (where it is, its weights, when it was
//! added, its reason's index): about 50 bytes per domain instead of the ~130 a map of owned
//! strings costs. Lookups are binary searches (the resolver's hot path uses the matcher's hash
//! table, not this); changes arrive in batches and are merged in one pass.

use std::cmp::Ordering;

use super::matcher::{Weight, from_weight};

/// One listed domain's data besides its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listed {
    pub added_at: u64,
    /// Index into the list's reasons.
    pub reason: u32,
    pub exact: Weight,
    pub sub: Weight,
}

impl Listed {
    pub fn weights(&self) -> (f64, f64) {
        (from_weight(self.exact), from_weight(self.sub))
    }
}

#[derive(Clone, Copy, Debug)]
struct Row {
    at: u32,
    len: u8,
    listed: Listed,
}

/// Below this many new names a batch is inserted in place; above, merged.
const MERGE_AT: usize = 64;

#[derive(Default)]
pub struct DomainTable {
    text: String,
    rows: Vec<Row>,
    /// Arena bytes no row points at any more (removed names).
    garbage: usize,
}

impl DomainTable {
    fn name(&self, r: &Row) -> &str {
        let at = r.at as usize;
        self.text.get(at..at + r.len as usize).unwrap_or("")
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.rows.binary_search_by(|r| self.name(r).cmp(name))
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Listed> {
        self.find(name).ok().map(|i| &self.rows[i].listed)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    /// In domain order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Listed)> {
        self.rows.iter().map(|r| (self.name(r), &r.listed))
    }

    fn row(&mut self, name: &str, listed: Listed) -> Row {
        let at = self.text.len() as u32;
        self.text.push_str(name);
        Row {
            at,
            // Names are at most 253 bytes (normalised before they get here).
            len: name.len().min(255) as u8,
            listed,
        }
    }

    /// Adds or updates names (the last of duplicates in `items` wins).
    pub fn upsert<'a>(&mut self, items: impl IntoIterator<Item = (&'a str, Listed)>) {
        let mut new: Vec<(&str, Listed)> = Vec::new();
        for (name, listed) in items {
            match self.find(name) {
                Ok(i) => self.rows[i].listed = listed,
                Err(_) => new.push((name, listed)),
            }
        }
        if new.len() < MERGE_AT {
            for (name, listed) in new {
                match self.find(name) {
                    Ok(i) => self.rows[i].listed = listed,
                    Err(i) => {
                        let row = self.row(name, listed);
                        self.rows.insert(i, row);
                    }
                }
            }
            return;
        }
        // Sort the newcomers (stable, so the last duplicate can win), then merge.
        new.sort_by(|a, b| a.0.cmp(b.0));
        let mut deduped: Vec<(&str, Listed)> = Vec::with_capacity(new.len());
        for item in new {
            match deduped.last_mut() {
                Some(last) if last.0 == item.0 => *last = item,
                _ => deduped.push(item),
            }
        }
        let old = std::mem::take(&mut self.rows);
        let mut merged = Vec::with_capacity(old.len() + deduped.len());
        let mut incoming = deduped.into_iter().peekable();
        for r in old {
            while let Some(&(name, listed)) = incoming.peek() {
                if name.cmp(self.name(&r)) == Ordering::Less {
                    let row = self.row(name, listed);
                    merged.push(row);
                    incoming.next();
                } else {
                    break;
                }
            }
            merged.push(r);
        }
        for (name, listed) in incoming {
            let row = self.row(name, listed);
            merged.push(row);
        }
        self.rows = merged;
    }

    /// Removes names; returns how many were listed.
    pub fn remove(&mut self, names: &[String]) -> usize {
        let mut gone: Vec<usize> = names.iter().filter_map(|n| self.find(n).ok()).collect();
        gone.sort_unstable();
        gone.dedup();
        if gone.is_empty() {
            return 0;
        }
        self.garbage += gone
            .iter()
            .map(|&i| self.rows[i].len as usize)
            .sum::<usize>();
        if gone.len() < MERGE_AT {
            for &i in gone.iter().rev() {
                self.rows.remove(i);
            }
        } else {
            let mut next = gone.iter().peekable();
            let mut i = 0;
            self.rows.retain(|_| {
                let drop = next.peek().is_some_and(|&&g| g == i);
                if drop {
                    next.next();
                }
                i += 1;
                !drop
            });
        }
        if self.garbage > self.text.len() / 2 {
            self.compact();
        }
        gone.len()
    }

    /// Rewrites the arena without the removed names.
    fn compact(&mut self) {
        let mut text = String::with_capacity(self.text.len() - self.garbage);
        for r in &mut self.rows {
            let at = r.at as usize;
            let name = self.text.get(at..at + r.len as usize).unwrap_or("");
            r.at = text.len() as u32;
            text.push_str(name);
        }
        self.text = text;
        self.garbage = 0;
    }

    pub fn shrink_to_fit(&mut self) {
        self.rows.shrink_to_fit();
        self.text.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(n: u64) -> Listed {
        Listed {
            added_at: n,
            reason: 0,
            exact: 10_000,
            sub: 0,
        }
    }

    #[test]
    fn keeps_names_sorted_through_inserts_merges_and_removals() {
        let mut t = DomainTable::default();
        t.upsert([("b.example", l(1)), ("a.example", l(2))]);
        let many: Vec<String> = (0..500).map(|i| format!("m{i:03}.example")).collect();
        t.upsert(many.iter().map(|n| (n.as_str(), l(3))));
        t.upsert([("a.example", l(9)), ("zz.example", l(4))]);
        assert_eq!(t.len(), 503);
        assert_eq!(t.get("a.example").map(|x| x.added_at), Some(9));
        let names: Vec<&str> = t.iter().map(|(n, _)| n).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        let gone: Vec<String> = many[..400].to_vec();
        assert_eq!(t.remove(&gone), 400);
        assert_eq!(t.remove(&["nope.example".into()]), 0);
        assert_eq!(t.len(), 103);
        assert!(!t.contains("m000.example") && t.contains("m450.example"));
        assert!(t.contains("zz.example") && t.contains("b.example"));
        let names: Vec<&str> = t.iter().map(|(n, _)| n).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "still sorted after compaction");
    }
}

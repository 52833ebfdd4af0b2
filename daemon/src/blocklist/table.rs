//! The listed domains, sorted, in compact form. A list runs to millions of names, so they live
//! back to back in one text arena and each row is 16 bytes (where the name is, its weights, and
//! the index of its stamp: when it was added and why, which most entries of a list share):
//! about 42 bytes per domain instead of the ~130 a map of owned strings costs. Lookups are
//! binary searches (the resolver's hot path uses the matcher's table, not this); changes arrive
//! in batches and are merged in one pass.

use std::{cmp::Ordering, collections::HashMap};

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
    /// Index into `stamps`.
    stamp: u32,
    exact: Weight,
    sub: Weight,
    len: u8,
}

/// When an entry was added and why (a reason's index): an import or a sync gives every entry
/// of its batch the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Stamp {
    added_at: u64,
    reason: u32,
}

/// Below this many new names a batch is inserted in place; above, merged.
const MERGE_AT: usize = 64;

#[derive(Default)]
pub struct DomainTable {
    text: String,
    rows: Vec<Row>,
    /// Distinct stamps, shared by index (kept for the table's life, as the list's reasons).
    stamps: Vec<Stamp>,
    stamp_index: HashMap<Stamp, u32>,
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

    fn listed(&self, r: &Row) -> Listed {
        let stamp = self.stamps.get(r.stamp as usize).copied().unwrap_or(Stamp {
            added_at: 0,
            reason: 0,
        });
        Listed {
            added_at: stamp.added_at,
            reason: stamp.reason,
            exact: r.exact,
            sub: r.sub,
        }
    }

    /// Sets `r`'s data to `listed`.
    fn set(&mut self, r: usize, listed: Listed) {
        let stamp = self.stamp(listed);
        let row = &mut self.rows[r];
        row.stamp = stamp;
        row.exact = listed.exact;
        row.sub = listed.sub;
    }

    fn stamp(&mut self, listed: Listed) -> u32 {
        let stamp = Stamp {
            added_at: listed.added_at,
            reason: listed.reason,
        };
        if let Some(&i) = self.stamp_index.get(&stamp) {
            return i;
        }
        let i = self.stamps.len() as u32;
        self.stamps.push(stamp);
        self.stamp_index.insert(stamp, i);
        i
    }

    pub fn get(&self, name: &str) -> Option<Listed> {
        self.find(name).ok().map(|i| self.listed(&self.rows[i]))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    /// In domain order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Listed)> {
        self.rows.iter().map(|r| (self.name(r), self.listed(r)))
    }

    fn row(&mut self, name: &str, listed: Listed) -> Row {
        let at = self.text.len() as u32;
        self.text.push_str(name);
        Row {
            at,
            stamp: self.stamp(listed),
            exact: listed.exact,
            sub: listed.sub,
            // Names are at most 253 bytes (normalised before they get here).
            len: name.len().min(255) as u8,
        }
    }

    /// Whether each of `names` is listed: a binary search each for a few names, one pass
    /// over the names in order beside the table's for many.
    pub fn contains_many(&self, names: &[&str]) -> Vec<bool> {
        if names.len() < MERGE_AT || names.len() < self.rows.len() / 16 {
            return names.iter().map(|n| self.contains(n)).collect();
        }
        let mut order: Vec<u32> = (0..names.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| names[a as usize].cmp(names[b as usize]));
        let mut listed = vec![false; names.len()];
        let mut rows = self.rows.iter().peekable();
        for i in order {
            let name = names[i as usize];
            while rows.next_if(|r| self.name(r) < name).is_some() {}
            listed[i as usize] = rows.peek().is_some_and(|r| self.name(r) == name);
        }
        listed
    }

    /// Adds or updates names (the last of duplicates in `items` wins). A large batch is sorted
    /// (a batch in order already costs one pass) and merged with the table in one pass.
    pub fn upsert<'a>(&mut self, items: impl IntoIterator<Item = (&'a str, Listed)>) {
        let mut new: Vec<(&str, Listed)> = items.into_iter().collect();
        if new.len() < MERGE_AT {
            for (name, listed) in new {
                match self.find(name) {
                    Ok(i) => self.set(i, listed),
                    Err(i) => {
                        let row = self.row(name, listed);
                        self.rows.insert(i, row);
                    }
                }
            }
            return;
        }
        // Stable, so the last duplicate can win.
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
        for mut r in old {
            while let Some(&(name, listed)) = incoming.peek() {
                match name.cmp(self.name(&r)) {
                    Ordering::Less => {
                        let row = self.row(name, listed);
                        merged.push(row);
                        incoming.next();
                    }
                    Ordering::Equal => {
                        r.stamp = self.stamp(listed);
                        r.exact = listed.exact;
                        r.sub = listed.sub;
                        incoming.next();
                        break;
                    }
                    Ordering::Greater => break,
                }
            }
            merged.push(r);
        }
        for (name, listed) in incoming {
            let row = self.row(name, listed);
            merged.push(row);
        }
        merged.shrink_to_fit();
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
        self.stamps.shrink_to_fit();
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
        assert_eq!(std::mem::size_of::<Row>(), 16);
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

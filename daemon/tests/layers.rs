//! The daemon's modules depend one way (docs/architecture.md, "Layers"):
//!
//! - every top-level module of `daemon/src` sits in one layer of [`LAYERS`] and imports only
//!   modules of lower layers, so no domain can reach the daemon that wires it, and no two
//!   domains can import each other;
//! - inside a folder, the sibling modules never import each other in a circle (a child may use
//!   its parent's items and the parent its children's; siblings go one way).
//!
//! The check reads the sources: `use` trees and inline `crate::`/`super::`/`self::` paths,
//! outside comments, strings and `#[cfg(test)]` code. A failure names the file and the path.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Lowest first. A module may import modules of lower layers only.
const LAYERS: &[&[&str]] = &[
    // What everything may use.
    &["faults", "open_files", "protocol", "source", "tasks"],
    &["error", "notify"],
    &["config", "domain_name", "store", "logging", "qr"],
    // Shared machinery, no domain knowledge.
    &["http", "wg", "domain_hash"],
    &["metrics"],
    &["admin"],
    // The domains, each built on the ones below it.
    &["datapath"],
    &["core", "blocklist"],
    &["ghost", "multihop", "policy", "sentry"],
    &["dns"],
    // Builds the domains in order and wires their handles.
    &["daemon"],
];

type ModPath = Vec<String>;

/// One import: who, what, where.
#[derive(Debug, Clone)]
struct Import {
    from: ModPath,
    to: ModPath,
    file: PathBuf,
    line: usize,
    text: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// `core/actions.rs` -> `[core, actions]`, `core/mod.rs` -> `[core]`, `lib.rs` -> `[]`.
fn module_of(rel: &Path) -> ModPath {
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs").to_string();
        if stem != "mod" && stem != "lib" {
            parts.push(stem);
        }
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            // Binaries are clients of the library, not part of its layering.
            if path.file_name().is_some_and(|n| n == "bin") && dir == src_dir() {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code with comments and string/char literals blanked (newlines kept, so line numbers
/// stay), and everything from the first `#[cfg(test)]` on dropped.
fn code_only(text: &str) -> String {
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                if b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 2;
        } else if c == b'r' && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#')) {
            // Raw string: r"...", r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c as char);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == b'"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&b'#')) {
                    j += 1 + hashes;
                    break;
                }
                if b[j] == b'\n' {
                    out.push('\n');
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                if b.get(i) == Some(&b'\n') {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == b'\'' && (b.get(i + 2) == Some(&b'\'') || (b.get(i + 1) == Some(&b'\\'))) {
            // A char literal ('a', '\n', '\''), not a lifetime.
            i += 1;
            if b.get(i) == Some(&b'\\') {
                i += 2;
            } else {
                i += 1;
            }
            while i < b.len() && b[i] != b'\'' {
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else {
            out.push(c as char);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Expands a `use` tree (`crate::{a::{b, c}, d as e}`) into full paths.
fn expand_use(tree: &str) -> Vec<Vec<String>> {
    fn parse(s: &[char], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let mut path = prefix.to_vec();
        loop {
            while *i < s.len() && s[*i].is_whitespace() {
                *i += 1;
            }
            if *i >= s.len() {
                out.push(path);
                return;
            }
            if s[*i] == '{' {
                *i += 1;
                loop {
                    while *i < s.len() && (s[*i].is_whitespace() || s[*i] == ',') {
                        *i += 1;
                    }
                    if *i >= s.len() {
                        return;
                    }
                    if s[*i] == '}' {
                        *i += 1;
                        return;
                    }
                    parse(s, i, &path, out);
                }
            }
            let start = *i;
            while *i < s.len() && (is_ident(s[*i]) || s[*i] == '*') {
                *i += 1;
            }
            let word: String = s[start..*i].iter().collect();
            if !word.is_empty() && word != "*" {
                path.push(word);
            }
            while *i < s.len() && s[*i].is_whitespace() {
                *i += 1;
            }
            if s.get(*i) == Some(&':') && s.get(*i + 1) == Some(&':') {
                *i += 2;
                continue;
            }
            // `x as y`: the alias names nothing new.
            if s[*i..].starts_with(&['a', 's']) && s.get(*i + 2).is_some_and(|c| c.is_whitespace())
            {
                *i += 2;
                while *i < s.len() && s[*i].is_whitespace() {
                    *i += 1;
                }
                while *i < s.len() && is_ident(s[*i]) {
                    *i += 1;
                }
            }
            out.push(path);
            return;
        }
    }
    let chars: Vec<char> = tree.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    parse(&chars, &mut i, &[], &mut out);
    out
}

/// Every `crate::`, `super::` and `self::` path in the code, with its line.
fn paths_in(code: &str) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    let line_of = |pos: usize| code[..pos].matches('\n').count() + 1;
    // `use` statements, trees expanded.
    let mut rest = 0;
    while let Some(found) = code[rest..].find("use ") {
        let at = rest + found;
        rest = at + 4;
        let before = code[..at].chars().next_back();
        if before.is_some_and(is_ident) {
            continue;
        }
        let Some(end) = code[at..].find(';') else {
            break;
        };
        let tree = &code[at + 4..at + end];
        for path in expand_use(tree) {
            if matches!(
                path.first().map(String::as_str),
                Some("crate" | "super" | "self")
            ) {
                out.push((line_of(at), path));
            }
        }
        rest = at + end;
    }
    // Inline paths: `crate::a::b`, `super::x`.
    let chars: Vec<(usize, char)> = code.char_indices().collect();
    let mut k = 0;
    while k < chars.len() {
        let (pos, c) = chars[k];
        if is_ident(c) && (k == 0 || !is_ident(chars[k - 1].1) && chars[k - 1].1 != ':') {
            let mut segs = Vec::new();
            let mut j = k;
            loop {
                let s = j;
                while j < chars.len() && is_ident(chars[j].1) {
                    j += 1;
                }
                segs.push(chars[s..j].iter().map(|(_, c)| *c).collect::<String>());
                if j + 1 < chars.len() && chars[j].1 == ':' && chars[j + 1].1 == ':' {
                    j += 2;
                    if j < chars.len() && is_ident(chars[j].1) {
                        continue;
                    }
                }
                break;
            }
            if segs.len() > 1
                && matches!(segs[0].as_str(), "crate" | "super" | "self")
                && !code[..pos].trim_end().ends_with("use")
            {
                out.push((line_of(pos), segs));
            }
            k = j.max(k + 1);
        } else {
            k += 1;
        }
    }
    out
}

/// The module a path names: the longest known module its leading segments spell.
fn resolve(
    from: &ModPath,
    is_mod_file: bool,
    path: &[String],
    modules: &BTreeSet<ModPath>,
) -> ModPath {
    let mut base: ModPath = Vec::new();
    let mut rest = path;
    // `self` in a.rs or a/mod.rs is module `a`; `super` is its parent.
    let mut current = from.clone();
    let _ = is_mod_file;
    while let Some(first) = rest.first() {
        match first.as_str() {
            "crate" => {
                current = Vec::new();
                rest = &rest[1..];
            }
            "self" => rest = &rest[1..],
            "super" => {
                current.pop();
                rest = &rest[1..];
            }
            _ => break,
        }
    }
    base.extend(current);
    let mut best = base.clone();
    let mut candidate = base;
    for seg in rest {
        candidate.push(seg.clone());
        if modules.contains(&candidate) {
            best = candidate.clone();
        } else {
            break;
        }
    }
    best
}

fn imports() -> (Vec<Import>, BTreeSet<ModPath>) {
    let root = src_dir();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let modules: BTreeSet<ModPath> = files
        .iter()
        .filter_map(|f| f.strip_prefix(&root).ok())
        .map(module_of)
        .collect();
    let mut out = Vec::new();
    for file in &files {
        let Ok(rel) = file.strip_prefix(&root) else {
            continue;
        };
        let from = module_of(rel);
        let is_mod_file = rel
            .file_name()
            .is_some_and(|n| n == "mod.rs" || n == "lib.rs");
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let code = code_only(&text);
        for (line, path) in paths_in(&code) {
            let to = resolve(&from, is_mod_file, &path, &modules);
            if to != from {
                out.push(Import {
                    from: from.clone(),
                    to,
                    file: rel.to_path_buf(),
                    line,
                    text: path.join("::"),
                });
            }
        }
    }
    (out, modules)
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

#[test]
fn top_level_modules_import_only_lower_layers() {
    let (imports, modules) = imports();
    let mut problems = BTreeSet::new();
    for m in modules.iter().filter(|m| m.len() == 1) {
        if layer_of(&m[0]).is_none() {
            problems.insert(format!(
                "src/{}: a top-level module missing from LAYERS in tests/layers.rs (put it in its layer)",
                m[0]
            ));
        }
    }
    for i in &imports {
        let (Some(from), Some(to)) = (i.from.first(), i.to.first()) else {
            continue;
        };
        if from == to {
            continue;
        }
        if let (Some(lf), Some(lt)) = (layer_of(from), layer_of(to))
            && lt >= lf
        {
            problems.insert(format!(
                "src/{}:{}: {from} imports {to} ({}), which is not in a lower layer",
                i.file.display(),
                i.line,
                i.text
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "dependencies must point down the layers:\n{}",
        problems.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn sibling_modules_never_import_each_other_in_a_circle() {
    let (imports, _) = imports();
    // Per folder, the graph of its children importing each other.
    let mut graphs: BTreeMap<ModPath, BTreeMap<String, BTreeMap<String, String>>> = BTreeMap::new();
    for i in &imports {
        if i.from.is_empty() || i.to.len() < i.from.len() {
            continue;
        }
        let parent = &i.from[..i.from.len() - 1];
        if i.to.len() < parent.len() + 1 || i.to[..parent.len()] != *parent {
            continue;
        }
        let a = &i.from[parent.len()];
        let b = &i.to[parent.len()];
        if a != b {
            graphs
                .entry(parent.to_vec())
                .or_default()
                .entry(a.clone())
                .or_default()
                .entry(b.clone())
                .or_insert_with(|| format!("src/{}:{} ({})", i.file.display(), i.line, i.text));
        }
    }
    let mut problems = Vec::new();
    for (parent, graph) in &graphs {
        if let Some(cycle) = find_cycle(graph) {
            let folder = if parent.is_empty() {
                "src".to_string()
            } else {
                format!("src/{}", parent.join("/"))
            };
            let steps: Vec<String> = cycle
                .windows(2)
                .map(|w| format!("{} -> {} at {}", w[0], w[1], graph[&w[0]][&w[1]]))
                .collect();
            problems.push(format!("{folder}: {}", steps.join("; ")));
        }
    }
    assert!(
        problems.is_empty(),
        "modules that import each other in a circle:\n{}",
        problems.join("\n")
    );
}

/// A cycle as a list of nodes, first repeated at the end.
fn find_cycle(graph: &BTreeMap<String, BTreeMap<String, String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeMap<String, String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flat_map(|e| e.keys()) {
            match state.get(next.as_str()) {
                Some(1) => {
                    let start = stack.iter().position(|n| n == next).unwrap_or(0);
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, graph, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if !state.contains_key(node.as_str()) {
            let mut stack = Vec::new();
            if let Some(c) = visit(node, graph, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_checker_sees_what_it_must() {
    let paths = expand_use("crate::{a::{b, c as d}, e::*, self}");
    assert_eq!(
        paths,
        vec![
            vec!["crate", "a", "b"],
            vec!["crate", "a", "c"],
            vec!["crate", "e"],
            vec!["crate", "self"],
        ]
        .into_iter()
        .map(|p| p.into_iter().map(String::from).collect::<Vec<_>>())
        .collect::<Vec<_>>()
    );
    let code = code_only(
        "// use crate::x;\nlet s = \"crate::y::z\";\nlet t = crate::w::v(1);\n#[cfg(test)]\nuse crate::q;",
    );
    let found: Vec<String> = paths_in(&code)
        .into_iter()
        .map(|(_, p)| p.join("::"))
        .collect();
    assert_eq!(found, vec!["crate::w::v"]);
    let mut graph = BTreeMap::new();
    graph.insert(
        "a".to_string(),
        BTreeMap::from([("b".to_string(), String::new())]),
    );
    graph.insert(
        "b".to_string(),
        BTreeMap::from([("a".to_string(), String::new())]),
    );
    assert!(find_cycle(&graph).is_some());
    graph.remove("b");
    assert!(find_cycle(&graph).is_none());
}

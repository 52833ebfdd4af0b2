//! The challenge page a browser passes (the HTML 429, docs/sentry.md): a small HTML document
//! with the package in `<script type="application/json" id="sentry-challenge">` and the
//! language's texts in `#sentry-text`, and four files the sentry serves itself under
//! `/.sentry/static/<version>/`: the page script, the solver worker, the pure-JS crypto both
//! load, and a style sheet. All of it is compiled into the binary (`page/`), plain JavaScript
//! without a build step; `<version>` is a digest of the files, so they are cached for a year
//! and a new build is a new URL. Every visible text is in `page/strings.json` (English and
//! Turkish, chosen by `Accept-Language`). Without JavaScript the page's `<noscript>` parts
//! carry what [`super::nojs`] offers instead (a delay, or the command-line solver).

use std::sync::LazyLock;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Where the page's files are served: `/.sentry/static/<version>/<name>`.
pub const STATIC_PREFIX: &str = "/.sentry/static/";

const TEMPLATE: &str = include_str!("page/challenge.html");
const STRINGS: &str = include_str!("page/strings.json");
const CHALLENGE_JS: &str = include_str!("page/challenge.js");
const CRYPTO_JS: &str = include_str!("page/crypto.js");
const WORKER_JS: &str = include_str!("page/worker.js");
const STYLE_CSS: &str = include_str!("page/challenge.css");
const LOADER_TEMPLATE: &str = include_str!("page/loader.html");
const LOADER_JS: &str = include_str!("page/loader.js");

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The files under [`STATIC_PREFIX`] as written: name, source, content type.
const SOURCES: [(&str, &str, &str); 4] = [
    ("challenge.js", CHALLENGE_JS, JS),
    ("crypto.js", CRYPTO_JS, JS),
    ("worker.js", WORKER_JS, JS),
    ("challenge.css", STYLE_CSS, CSS),
];

/// The page's Content-Security-Policy: scripts, the worker, styles and requests from this
/// origin only; no inline script (the two JSON blocks are data, never executed), no eval, no
/// `blob:` worker, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; worker-src 'self'; connect-src 'self'; style-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The page's languages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Language {
    English,
    Turkish,
}

impl Language {
    pub const ALL: [Language; 2] = [Language::English, Language::Turkish];

    pub fn tag(self) -> &'static str {
        match self {
            Language::English => "en",
            Language::Turkish => "tr",
        }
    }

    /// The client's preferred language of ours by `Accept-Language` (highest q, the header's
    /// order between equals); English when it names neither.
    pub fn from_accept_language(header: Option<&str>) -> Self {
        let mut best: Option<(f32, Language)> = None;
        for item in header.unwrap_or("").split(',').take(32) {
            let mut parts = item.split(';');
            let tag = parts.next().unwrap_or("").trim();
            let primary = tag.split('-').next().unwrap_or("").to_ascii_lowercase();
            let Some(lang) = Self::ALL.into_iter().find(|l| l.tag() == primary) else {
                continue;
            };
            let q = parts
                .find_map(|p| p.trim().strip_prefix("q="))
                .map_or(Some(1.0), |v| v.trim().parse::<f32>().ok())
                .unwrap_or(0.0);
            if q > 0.0 && best.is_none_or(|(bq, _)| q > bq) {
                best = Some((q, lang));
            }
        }
        best.map_or(Language::English, |(_, l)| l)
    }
}

/// The files as served: each line's indentation and every whole-line `//` comment left out
/// (the sources hold neither a multi-line string nor a template literal, so nothing else
/// changes). About a fifth of the bytes; the sources stay readable and no build tool is
/// involved.
fn compact(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    for line in source.lines().map(str::trim_start) {
        if !line.is_empty() && !line.starts_with("//") {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The page around the package, per language, the files and their version.
struct Pages {
    /// (name, served body, content type)
    files: Vec<(&'static str, String, &'static str)>,
    version: String,
    /// For each of [`Language::ALL`], the template's text around its three slots: before the
    /// package, before the `<noscript>` part of the head, before that of the body, after it.
    parts: Vec<[String; 4]>,
    /// The texts of the path without JavaScript, for each of [`Language::ALL`].
    nojs: Vec<serde_json::Map<String, Value>>,
}

/// The slots of the template, in order.
const SLOTS: [&str; 3] = ["{{package}}", "{{nojs_head}}", "{{nojs_body}}"];

/// What goes into the page's two `<noscript>` elements: HTML, already escaped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NoScript {
    /// Inside `<head>` (a `<meta http-equiv="refresh">`, say).
    pub head: String,
    /// Inside `<main>`.
    pub body: String,
}

pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

static PAGES: LazyLock<Pages> = LazyLock::new(|| {
    let files: Vec<_> = SOURCES
        .iter()
        .map(|(name, source, kind)| (*name, compact(source), *kind))
        .collect();
    let mut h = Sha256::new();
    for (name, body, _) in &files {
        h.update(name.as_bytes());
        h.update(body.as_bytes());
    }
    let version: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let strings: Value = serde_json::from_str(STRINGS).unwrap_or_default();
    let parts = Language::ALL
        .iter()
        .map(|lang| {
            let page = with_texts(TEMPLATE, &strings[lang.tag()], *lang, &version);
            let mut parts: [String; 4] = Default::default();
            for (slot, part) in parts.iter_mut().zip(split_slots(&page, &SLOTS)) {
                *slot = part;
            }
            parts
        })
        .collect();
    let nojs = Language::ALL
        .iter()
        .map(|lang| {
            strings["nojs"][lang.tag()]
                .as_object()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    Pages {
        files,
        version,
        parts,
        nojs,
    }
});

/// A text of the path without JavaScript in `lang` (`page/strings.json`, `nojs`), with
/// `{n}` replaced by `n`; not escaped.
pub fn nojs_text(lang: Language, key: &str, n: u64) -> String {
    let i = Language::ALL.iter().position(|l| *l == lang).unwrap_or(0);
    PAGES
        .nojs
        .get(i)
        .and_then(|m| m.get(key))
        .and_then(Value::as_str)
        .unwrap_or(key)
        .replace("{n}", &n.to_string())
}

/// The template with the language's texts put in (`{{key}}` for each key of its table, and
/// `{{text}}` for the table itself, as data for the script).
fn with_texts(template: &str, table: &Value, lang: Language, version: &str) -> String {
    // Data for the script; `<` escaped so the block can never close early.
    let text = table.to_string().replace('<', "\\u003c");
    let mut page = template
        .replace("{{lang}}", lang.tag())
        .replace("{{version}}", version)
        .replace("{{text}}", &text);
    if let Some(map) = table.as_object() {
        for (key, value) in map {
            page = page.replace(
                &format!("{{{{{key}}}}}"),
                &escape_html(value.as_str().unwrap_or("")),
            );
        }
    }
    page
}

/// Splits a filled template at its slots, in order: one more part than slots.
fn split_slots(page: &str, slots: &[&str]) -> Vec<String> {
    let mut parts = Vec::with_capacity(slots.len() + 1);
    let mut rest = page;
    for slot in slots {
        let (before, after) = rest.split_once(slot).unwrap_or((rest, ""));
        parts.push(before.to_string());
        rest = after;
    }
    parts.push(rest.to_string());
    parts
}

/// The DOOMSDAY loader: one document with all its script and style inline, per language,
/// and the policy that admits exactly those (by hash) and its blob: workers.
struct Loader {
    /// For each of [`Language::ALL`], the text around [`LOADER_SLOTS`].
    parts: Vec<Vec<String>>,
    csp: String,
}

/// The loader's slots, in order.
const LOADER_SLOTS: [&str; 5] = [
    "{{package}}",
    "{{keys}}",
    "{{snapshot}}",
    "{{nojs_head}}",
    "{{nojs_body}}",
];

static LOADER: LazyLock<Loader> = LazyLock::new(|| {
    use base64::{Engine, engine::general_purpose::STANDARD};
    // One script: the pure-JS crypto and the loader, which is also its workers' source.
    let script = compact(CRYPTO_JS) + &compact(LOADER_JS);
    let style = compact(STYLE_CSS);
    let hash = |s: &str| STANDARD.encode(Sha256::digest(s.as_bytes()));
    let csp = format!(
        "default-src 'self'; script-src 'sha256-{}'; style-src 'self' 'sha256-{}'; \
         img-src 'self' data:; worker-src blob:; connect-src 'self'; base-uri 'self'; \
         form-action 'self'; frame-ancestors 'none'",
        hash(&script),
        hash(&style)
    );
    let strings: Value = serde_json::from_str(STRINGS).unwrap_or_default();
    let parts = Language::ALL
        .iter()
        .map(|lang| {
            let page = with_texts(LOADER_TEMPLATE, &strings[lang.tag()], *lang, version())
                .replace("{{style}}", &style)
                .replace("{{script}}", &script);
            split_slots(&page, &LOADER_SLOTS)
        })
        .collect();
    Loader { parts, csp }
});

/// The loader's Content-Security-Policy: its own inline script and style by their SHA-256,
/// its workers from `blob:` URLs (made from that script), everything else from this origin —
/// the rendered snapshot loads the site's own files under it (its inline scripts do not run).
pub fn loader_csp() -> &'static str {
    &LOADER.csp
}

/// The loader for a package: `keys_json` the JWK set, `snapshot_json` the sealed snapshot
/// (`{"iv", "data", "html"}`) or `null`; all JSON of b64url values and fixed keys.
pub fn loader(
    package_json: &str,
    keys_json: &str,
    snapshot_json: &str,
    lang: Language,
    nojs: &NoScript,
) -> String {
    let i = Language::ALL.iter().position(|l| *l == lang).unwrap_or(0);
    let Some(parts) = LOADER.parts.get(i) else {
        return String::new();
    };
    let safe = |json: &str| json.replace('<', "\\u003c");
    let fills = [
        safe(package_json),
        safe(keys_json),
        safe(snapshot_json),
        nojs.head.clone(),
        nojs.body.clone(),
    ];
    let mut out = String::with_capacity(
        parts.iter().map(String::len).sum::<usize>() + fills.iter().map(String::len).sum::<usize>(),
    );
    for (part, fill) in parts.iter().zip(&fills) {
        out.push_str(part);
        out.push_str(fill);
    }
    if let Some(last) = parts.last() {
        out.push_str(last);
    }
    out
}

/// The digest of the page's files that names their directory.
pub fn version() -> &'static str {
    &PAGES.version
}

/// The HTML 429 for a package (its JSON: b64url values and fixed keys, so no `<` can end the
/// data block early), with what it offers a browser without JavaScript.
pub fn page(package_json: &str, lang: Language, nojs: &NoScript) -> String {
    let i = Language::ALL.iter().position(|l| *l == lang).unwrap_or(0);
    let Some(parts) = PAGES.parts.get(i) else {
        return String::new();
    };
    let fills = [package_json, nojs.head.as_str(), nojs.body.as_str()];
    let mut out = String::with_capacity(
        parts.iter().map(String::len).sum::<usize>() + fills.iter().map(|f| f.len()).sum::<usize>(),
    );
    for (part, fill) in parts.iter().zip(fills) {
        out.push_str(part);
        out.push_str(fill);
    }
    out.push_str(&parts[3]);
    out
}

/// A file of the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Asset {
    pub body: &'static str,
    pub content_type: &'static str,
    /// The path names this build's version: cacheable for good. A page of another build (a
    /// fleet in the middle of an upgrade) gets this build's file, revalidated every time.
    pub current: bool,
}

/// The file at `path` (under [`STATIC_PREFIX`]), if there is one.
pub fn asset(path: &str) -> Option<Asset> {
    let rest = path.strip_prefix(STATIC_PREFIX)?;
    let (version, name) = rest.split_once('/')?;
    let (_, body, content_type) = PAGES.files.iter().find(|(n, _, _)| *n == name)?;
    Some(Asset {
        body: body.as_str(),
        content_type,
        current: version == PAGES.version,
    })
}

/// The bytes a browser loads for the page besides the HTML itself.
pub fn files_bytes() -> usize {
    PAGES.files.iter().map(|(_, body, _)| body.len()).sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn languages_from_accept_language() {
        use Language::*;
        assert_eq!(Language::from_accept_language(None), English);
        assert_eq!(
            Language::from_accept_language(Some("tr-TR,tr;q=0.9")),
            Turkish
        );
        assert_eq!(
            Language::from_accept_language(Some("de-DE,tr;q=0.8,en;q=0.7")),
            Turkish
        );
        assert_eq!(
            Language::from_accept_language(Some("en-US,en;q=0.9,tr;q=0.8")),
            English
        );
        assert_eq!(Language::from_accept_language(Some("tr;q=0, fr")), English);
        assert_eq!(Language::from_accept_language(Some("TR")), Turkish);
        assert_eq!(Language::from_accept_language(Some(";;;,q=,")), English);
    }

    #[test]
    fn every_text_in_both_languages_and_no_placeholder_left() {
        let strings: Value = serde_json::from_str(STRINGS).unwrap();
        let en = strings["en"].as_object().unwrap();
        let tr = strings["tr"].as_object().unwrap();
        let keys = |m: &serde_json::Map<String, Value>| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(en), keys(tr));
        let nojs = strings["nojs"].as_object().unwrap();
        assert_eq!(
            keys(nojs["en"].as_object().unwrap()),
            keys(nojs["tr"].as_object().unwrap())
        );
        let none = NoScript::default();
        for lang in Language::ALL {
            let html = page("{}", lang, &none);
            assert!(!html.contains("{{"), "{html}");
            assert!(html.contains(&format!("<html lang=\"{}\">", lang.tag())));
            assert!(html.contains("id=\"sentry-challenge\">{}</script>"));
        }
        assert!(page("{}", Language::Turkish, &none).contains("Tarayıcınız denetleniyor"));
        let filled = page(
            "{}",
            Language::English,
            &NoScript {
                head: "<meta x>".into(),
                body: "<p>y</p>".into(),
            },
        );
        assert!(
            filled.contains("<noscript><meta x></noscript>\n</head>"),
            "{filled}"
        );
        assert!(
            filled.contains("<noscript><p>y</p></noscript>\n</main>"),
            "{filled}"
        );
        assert!(nojs_text(Language::Turkish, "delay", 5).contains("5 sn"));
    }

    #[test]
    fn the_page_and_its_files_weigh_at_most_24_kib() {
        let signer = crate::sentry::challenge::Signer::generate().unwrap();
        let content = crate::sentry::continuation("/some/page?with=a&query=string");
        let pkg = signer
            .issue("198.51.100.7".parse().unwrap(), 20, 300, &content, 1_000)
            .unwrap();
        let json = serde_json::to_string(&pkg).unwrap();
        // The page as sent with either offer for browsers without JavaScript (a browser
        // with it parses neither).
        let source = "198.51.100.7".parse().unwrap();
        let token = signer
            .delay_token(source, 1_005, 1_300, "/some/page?with=a&query=string")
            .unwrap();
        let offers = [
            crate::sentry::NoJsOffer::Delay { token, seconds: 5 },
            crate::sentry::NoJsOffer::Command,
        ];
        for lang in Language::ALL {
            for offer in &offers {
                let nojs = crate::sentry::nojs::noscript(
                    offer,
                    lang,
                    "https://www.example.com:8443",
                    "/some/page?with=a&query=string",
                );
                let total = page(&json, lang, &nojs).len() + files_bytes();
                eprintln!("{lang:?}, {offer:?}: {total} bytes");
                assert!(total <= 24 * 1024, "{lang:?}: {total} bytes");
            }
        }
    }

    #[test]
    fn the_loader_is_one_document_under_a_policy_of_hashes() {
        let html = loader(
            "{\"v\":1}",
            "{\"keys\":[]}",
            "null",
            Language::Turkish,
            &NoScript::default(),
        );
        assert!(!html.contains("{{"), "no placeholder left");
        assert!(html.contains("<html lang=\"tr\">"));
        assert!(html.contains("id=\"sentry-challenge\">{\"v\":1}</script>"));
        assert!(html.contains("id=\"sentry-snapshot\">null</script>"));
        // Nothing loaded from elsewhere: no src, no stylesheet link.
        assert!(!html.contains(" src=") && !html.contains("<link"), "{html}");
        let script = html
            .rsplit_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .unwrap()
            .0;
        assert!(script.contains("SentryCrypto") && script.contains("createObjectURL"));
        use base64::{Engine, engine::general_purpose::STANDARD};
        let hash = STANDARD.encode(Sha256::digest(script.as_bytes()));
        assert!(loader_csp().contains(&format!("script-src 'sha256-{hash}'")));
        assert!(!loader_csp().contains("unsafe"));
        // A block's data cannot close it early.
        let hostile = loader(
            "</script><script>x",
            "{}",
            "null",
            Language::English,
            &NoScript::default(),
        );
        assert!(!hostile.contains("</script><script>x"));
    }

    #[test]
    fn files_by_version() {
        let v = version();
        assert_eq!(v.len(), 16);
        let a = asset(&format!("/.sentry/static/{v}/worker.js")).unwrap();
        assert!(a.current && a.body.contains("importScripts"));
        assert!(!asset("/.sentry/static/0/worker.js").unwrap().current);
        assert!(asset(&format!("/.sentry/static/{v}/nope.js")).is_none());
        assert!(asset("/.sentry/static/worker.js").is_none());
        assert!(
            page("{}", Language::English, &NoScript::default())
                .contains(&format!("/.sentry/static/{v}/challenge.js"))
        );
    }
}

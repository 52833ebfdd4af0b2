//! The `blocklist` socket module.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;

use super::{
    Blocklist, BlocklistError,
    import::{self, Format},
    matcher::compile_one,
    model::{Entry, NameError, Pattern, PatternType, normalise, rule_domain},
};
use crate::{
    admin::{ApiError, NoParams, PageParams, ParamKind, ParamSpec, Registry, run_blocking},
    datapath::Datapath,
    protocol::codes,
};

const INVALID_DOMAIN: &str = "INVALID_DOMAIN";
const PUBLIC_SUFFIX: &str = "PUBLIC_SUFFIX";
const DOMAIN_NOT_FOUND: &str = "DOMAIN_NOT_FOUND";
const INVALID_PATTERN: &str = "INVALID_PATTERN";
const PATTERN_NOT_FOUND: &str = "PATTERN_NOT_FOUND";
const BLOCKLIST_DISABLED: &str = "BLOCKLIST_DISABLED";
const IMPORT_FAILED: &str = "IMPORT_FAILED";
/// Another name holds the domain's key (the installation's domain hash): `add` refused it.
const DOMAIN_KEY_CLASH: &str = "DOMAIN_KEY_CLASH";

/// What the `blocklist` actions work with.
pub struct Handles {
    /// `None` with `[blocklist] enabled = false`.
    pub list: Option<Arc<Blocklist>>,
    /// For the kernel set's size in `status`.
    pub datapath: Option<Arc<Datapath>>,
}

/// A failure of the list's store: `INTERNAL_ERROR`, like every daemon error.
impl From<BlocklistError> for ApiError {
    fn from(e: BlocklistError) -> Self {
        ApiError::of_host(&e)
    }
}

fn list(h: &Handles) -> Result<Arc<Blocklist>, ApiError> {
    h.list.clone().ok_or_else(|| {
        ApiError::new(
            BLOCKLIST_DISABLED,
            "the blocklist is disabled ([blocklist] enabled = false)",
        )
    })
}

fn name_error(e: NameError) -> ApiError {
    match e {
        NameError::Invalid(m) => ApiError::new(INVALID_DOMAIN, m),
        NameError::PublicSuffix(m) => ApiError::new(PUBLIC_SUFFIX, m),
    }
}

fn weight(raw: Option<&str>) -> Result<f64, ApiError> {
    let Some(raw) = raw else { return Ok(1.0) };
    raw.parse::<f64>()
        .ok()
        .filter(|w| (0.0..=1.0).contains(w))
        .ok_or_else(|| {
            ApiError::new(
                codes::INVALID_PARAMETER,
                format!("weight {raw:?} must be a number from 0 to 1"),
            )
        })
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddParams {
    domain: String,
    reason: Option<String>,
    subdomains: Option<bool>,
    weight: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncParams {
    source: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainParams {
    domain: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatternParams {
    pattern: String,
    #[serde(rename = "type")]
    kind: String,
    weight: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemovePatternParams {
    pattern: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportParams {
    path: String,
    format: String,
    reason: Option<String>,
}

const DOMAIN: ParamSpec = ParamSpec::required(
    "domain",
    ParamKind::String { max_len: 300 },
    "domain name (IDN allowed)",
);

fn pattern_kind(raw: &str) -> Result<PatternType, ApiError> {
    match PatternType::parse(raw) {
        Some(k @ (PatternType::Contains | PatternType::Regex)) => Ok(k),
        _ => Err(ApiError::new(
            codes::INVALID_PARAMETER,
            format!(
                "type {raw:?}: patterns are contains or regex (exact and subdomain rules are entries: blocklist add)"
            ),
        )),
    }
}

pub fn register(registry: &mut Registry, handles: Arc<Handles>) {
    registry.module(
        "blocklist",
        "gambling-domain blocklist: entries, patterns, matching, kernel rules",
    );

    let c = Arc::clone(&handles);
    registry.action(
        "blocklist",
        "add",
        "block a domain (and by default its subdomains); a new version",
        vec![
            DOMAIN,
            ParamSpec::optional(
                "reason",
                ParamKind::String { max_len: 500 },
                None,
                "why (shown in the list)",
            ),
            ParamSpec::optional(
                "subdomains",
                ParamKind::Boolean,
                Some("true"),
                "also every subdomain",
            ),
            ParamSpec::optional(
                "weight",
                ParamKind::String { max_len: 16 },
                Some("1.0"),
                "confidence 0..1",
            ),
        ],
        move |p: AddParams| {
            let c = Arc::clone(&c);
            async move {
                let list = list(&c)?;
                let domain = rule_domain(&p.domain).map_err(name_error)?;
                let w = weight(p.weight.as_deref())?;
                let reason = p.reason.unwrap_or_else(|| "added by operator".into());
                let entry = Entry::new(&domain, p.subdomains.unwrap_or(true), w, &reason, now());
                let e = entry.clone();
                let applied =
                    run_blocking(move || list.upsert(vec![e]).map_err(ApiError::from)).await?;
                if let Some(clash) = applied.refused.first() {
                    return Err(ApiError::new(DOMAIN_KEY_CLASH, clash.to_string()));
                }
                Ok::<_, ApiError>(
                    json!({"domain": domain, "entry": entry, "version": applied.version}),
                )
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "blocklist",
        "remove",
        "unblock a domain; a new version",
        vec![DOMAIN],
        move |p: DomainParams| {
            let c = Arc::clone(&c);
            async move {
                let list = list(&c)?;
                let domain = normalise(&p.domain).map_err(name_error)?;
                let d = domain.clone();
                let applied = run_blocking(move || list.remove(&d).map_err(ApiError::from))
                    .await?
                    .ok_or_else(|| {
                        ApiError::new(
                            DOMAIN_NOT_FOUND,
                            format!("{domain:?} is not on the blocklist"),
                        )
                    })?;
                Ok::<_, ApiError>(
                    json!({"domain": domain, "removed": true, "version": applied.version}),
                )
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "blocklist",
        "add_pattern",
        "add a contains or regex pattern with a weight",
        vec![
            ParamSpec::required("pattern", ParamKind::String { max_len: 500 }, "substring or regular expression"),
            ParamSpec::required("type", ParamKind::String { max_len: 16 }, "contains or regex"),
            ParamSpec::optional("weight", ParamKind::String { max_len: 16 }, Some("0.7"), "confidence 0..1"),
        ],
        move |p: PatternParams| {
            let c = Arc::clone(&c);
            async move {
                let list = list(&c)?;
                let kind = pattern_kind(&p.kind)?;
                let pattern = match kind {
                    PatternType::Contains => {
                        let s = p.pattern.trim().to_ascii_lowercase();
                        if s.len() < 3 {
                            return Err(ApiError::new(INVALID_PATTERN, "a contains pattern needs at least 3 characters"));
                        }
                        s
                    }
                    _ => {
                        compile_one(&p.pattern).map_err(|e| ApiError::new(INVALID_PATTERN, format!("regex: {e}")))?;
                        p.pattern.clone()
                    }
                };
                let w = weight(p.weight.as_deref())?;
                let pat = Pattern { pattern: pattern.clone(), kind, weight: w };
                let applied = run_blocking(move || list.add_pattern(pat).map_err(ApiError::from)).await?;
                Ok::<_, ApiError>(json!({"pattern": pattern, "type": kind, "weight": w, "version": applied.version}))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "blocklist",
        "remove_pattern",
        "remove a contains or regex pattern",
        vec![
            ParamSpec::required("pattern", ParamKind::String { max_len: 500 }, "as added"),
            ParamSpec::required(
                "type",
                ParamKind::String { max_len: 16 },
                "contains or regex",
            ),
        ],
        move |p: RemovePatternParams| {
            let c = Arc::clone(&c);
            async move {
                let list = list(&c)?;
                let kind = pattern_kind(&p.kind)?;
                let pattern = p.pattern.clone();
                let applied = run_blocking(move || {
                    list.remove_pattern(&pattern, kind).map_err(ApiError::from)
                })
                .await?
                .ok_or_else(|| {
                    ApiError::new(
                        PATTERN_NOT_FOUND,
                        format!("no {} pattern {:?}", kind.as_str(), p.pattern),
                    )
                })?;
                Ok::<_, ApiError>(
                    json!({"pattern": p.pattern, "removed": true, "version": applied.version}),
                )
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "blocklist",
        "list",
        "entries page by page, and the patterns",
        vec![
            ParamSpec::optional(
                "page",
                ParamKind::Integer {
                    min: 1,
                    max: 10_000_000,
                },
                Some("1"),
                "page number",
            ),
            ParamSpec::optional(
                "per_page",
                ParamKind::Integer { min: 1, max: 1000 },
                Some("50"),
                "entries per page",
            ),
            ParamSpec::optional(
                "search",
                ParamKind::String { max_len: 253 },
                None,
                "part of a domain",
            ),
        ],
        move |p: PageParams| {
            let c = Arc::clone(&c);
            async move {
                let list = list(&c)?;
                let page = usize::try_from(p.page).unwrap_or(1);
                let per_page = usize::try_from(p.per_page).unwrap_or(50);
                let search = p.search.map(|s| s.to_ascii_lowercase());
                let (entries, total) = list.page(
                    (page - 1).saturating_mul(per_page),
                    per_page,
                    search.as_deref(),
                );
                Ok::<_, ApiError>(json!({
                    "version": list.version(),
                    "total": total,
                    "page": page,
                    "per_page": per_page,
                    "entries": entries,
                    "patterns": list.patterns(),
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "blocklist",
        "verify",
        "would this domain be blocked? matched patterns and confidence (nothing is logged)",
        vec![DOMAIN],
        move |p: DomainParams| {
            let c = Arc::clone(&c);
            async move {
                let list = list(&c)?;
                let name = normalise(&p.domain).map_err(name_error)?;
                serde_json::to_value(list.verify(&name))
                    .map_err(|e| ApiError::internal(e.to_string()))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "blocklist",
        "status",
        "version, counts, checksum and the kernel's share",
        vec![],
        move |_: NoParams| {
            let c = Arc::clone(&c);
            async move {
                let list = list(&c)?;
                let kernel = c
                    .datapath
                    .as_ref()
                    .and_then(|d| d.domains.kernel_len().ok());
                // Rules the full kernel set could not take (the resolver still blocks them).
                let left_out = c
                    .datapath
                    .as_ref()
                    .and_then(|d| d.domains.fill().ok())
                    .map(|f| f.left_out);
                let sources = list.syncer.schedule().sources;
                let status = run_blocking(move || {
                    Ok((
                        list.checksum(),
                        list.syncer.states(&sources),
                        list.brands().len(),
                        list,
                    ))
                })
                .await?;
                let (checksum, sources, brands, list) = status;
                Ok::<_, ApiError>(json!({
                    "enabled": true,
                    "version": list.version(),
                    "entries": list.len(),
                    "patterns": list.patterns().len(),
                    "checksum": checksum,
                    "threshold": list.threshold(),
                    "lookalike_brands": brands,
                    "sources": sources,
                    "publisher_key": list.publisher.public_key(),
                    "kernel_rules": list.kernel_rules(),
                    "kernel_entries": kernel,
                    "kernel_left_out": left_out,
                }))
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "blocklist",
        "sync",
        "fetch the configured sources now ([blocklist] sources); a source whose checksum does not match is rejected whole",
        vec![ParamSpec::optional("source", ParamKind::String { max_len: 64 }, None, "one source by name (default: all)")],
        move |p: SyncParams| {
            let c = Arc::clone(&c);
            async move {
                let list = list(&c)?;
                let mut sources = list.syncer.schedule().sources;
                if sources.is_empty() {
                    return Err(ApiError::new(
                        codes::INVALID_PARAMETER,
                        "no sources configured: add [[blocklist.sources]] to the configuration and reload",
                    ));
                }
                if let Some(name) = &p.source {
                    sources.retain(|s| &s.name == name);
                    if sources.is_empty() {
                        return Err(ApiError::new(codes::INVALID_PARAMETER, format!("no source named {name:?}")));
                    }
                }
                run_blocking(move || {
                    let results = list.syncer.sync_all(&list, &sources);
                    Ok(json!({
                        "success": results.iter().all(|r| r.error.is_none()),
                        "version": list.version(),
                        "entries": list.len(),
                        "sources": results,
                    }))
                })
                .await
            }
        },
    );

    let c = Arc::clone(&handles);
    registry.action(
        "blocklist",
        "import",
        "import a hosts file, AdBlock list, plain list or seed JSON; broken lines are reported and skipped",
        vec![
            ParamSpec::required("path", ParamKind::String { max_len: 4096 }, "file on the server"),
            ParamSpec::optional("format", ParamKind::String { max_len: 16 }, Some("auto"), "auto, hosts, adblock, plain or json"),
            ParamSpec::optional("reason", ParamKind::String { max_len: 500 }, None, "reason recorded on every entry"),
        ],
        move |p: ImportParams| {
            let c = Arc::clone(&c);
            async move {
                let list = list(&c)?;
                let format = match p.format.as_str() {
                    "auto" => None,
                    f => Some(Format::parse(f).ok_or_else(|| {
                        ApiError::new(codes::INVALID_PARAMETER, format!("format {f:?}: auto, hosts, adblock, plain or json"))
                    })?),
                };
                let path = p.path.clone();
                let reason = p.reason.unwrap_or_else(|| format!("imported from {}", p.path));
                run_blocking(move || {
                    let meta = std::fs::metadata(&path)
                        .map_err(|e| ApiError::new(IMPORT_FAILED, format!("{path}: {e}")))?;
                    if meta.len() > 512 * 1024 * 1024 {
                        return Err(ApiError::new(IMPORT_FAILED, format!("{path}: larger than 512 MiB")));
                    }
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| ApiError::new(IMPORT_FAILED, format!("{path}: {e}")))?;
                    let format = format.unwrap_or_else(|| Format::detect(&text));
                    let parsed = import::parse_batch(&text, format, &reason, now());
                    // The file's text before the batch: the memory the list hands back after a
                    // large batch then includes it.
                    drop(text);
                    let parsed_entries = parsed.entries.len();
                    let applied = list.upsert_batch(parsed.entries).map_err(ApiError::from)?;
                    let skipped_total = parsed.skipped.len();
                    let skipped: Vec<_> = parsed.skipped.into_iter().take(100).collect();
                    // Names whose key another name holds: left out, each with the reason.
                    let refused: Vec<_> = applied
                        .refused
                        .iter()
                        .take(100)
                        .map(|c| json!({"domain": c.name, "reason": c.to_string()}))
                        .collect();
                    Ok(json!({
                        "imported": parsed_entries - applied.refused.len(),
                        "skipped": skipped_total,
                        "skipped_lines": skipped,
                        "refused": applied.refused.len(),
                        "refused_entries": refused,
                        "format": format!("{format:?}").to_lowercase(),
                        "version": applied.version,
                        "entries": list.len(),
                    }))
                })
                .await
            }
        },
    );

    // The actions that change no state (a `read` token of the HTTPS API may call them).
    registry.reads("blocklist", &["list", "verify", "status"]);
}

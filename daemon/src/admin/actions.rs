//! Socket module `admin`: the HTTPS API's tokens and the audit log. The HTTPS API itself
//! refuses this module (tokens are minted over the socket only).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;

use super::{
    ApiError, NoParams, ParamKind, ParamSpec, Registry,
    audit::AuditLog,
    run_blocking,
    tokens::{self, Scope, TokenError, Tokens},
};

pub const MODULE: &str = "admin";

pub struct Handles {
    pub tokens: Arc<Tokens>,
    pub audit: Arc<AuditLog>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateParams {
    name: String,
    scope: String,
    ttl: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameParams {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    limit: i64,
}

const NAME: ParamSpec = ParamSpec::required(
    "name",
    ParamKind::String { max_len: 64 },
    "token name: 1-64 of letters, digits, - and _",
);

fn checked_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ApiError::new(
            "INVALID_TOKEN_NAME",
            format!("token name {name:?}: 1-64 of letters, digits, - and _"),
        ));
    }
    Ok(())
}

fn token_error(e: TokenError) -> ApiError {
    let code = match &e {
        TokenError::Exists(_) => "TOKEN_EXISTS",
        TokenError::NotFound(_) => "TOKEN_NOT_FOUND",
        TokenError::Full => "TOKEN_STORE_FULL",
        TokenError::Sign(_) | TokenError::Store(_) => crate::protocol::codes::INTERNAL_ERROR,
    };
    ApiError::new(code, e.to_string())
}

pub fn register(registry: &mut Registry, handles: Arc<Handles>) {
    registry.module(
        MODULE,
        "the HTTPS admin API's tokens and the audit log (socket only)",
    );

    let h = Arc::clone(&handles);
    registry.action(
        MODULE,
        "token_create",
        "mint a bearer token for the HTTPS admin API (shown once)",
        vec![
            NAME,
            ParamSpec::required(
                "scope",
                ParamKind::String { max_len: 512 },
                "read (actions that change nothing), write (every action) or modules separated by commas",
            ),
            ParamSpec::required(
                "ttl",
                ParamKind::String { max_len: 16 },
                "lifetime: seconds, or a number with s, m, h or d (at most 366d)",
            ),
        ],
        move |p: CreateParams| {
            let h = Arc::clone(&h);
            async move {
                checked_name(&p.name)?;
                let scope = Scope::parse(&p.scope, &h.tokens.known_modules())
                    .map_err(|e| ApiError::new("INVALID_SCOPE", e))?;
                let ttl = tokens::parse_ttl(&p.ttl).map_err(|e| ApiError::new("INVALID_TTL", e))?;
                let (token, record) = run_blocking(move || {
                    h.tokens
                        .create(&p.name, &scope, ttl)
                        .map_err(token_error)
                })
                .await?;
                Ok(json!({
                    "token": token,
                    "name": record.name,
                    "scope": record.scope,
                    "created": record.created,
                    "expires": record.expires,
                    "message": "keep the token now: it is not shown again",
                }))
            }
        },
    );

    let h = Arc::clone(&handles);
    registry.action(
        MODULE,
        "token_list",
        "the minted tokens (names, scopes, expiry, revocation; never the tokens)",
        vec![],
        move |_: NoParams| {
            let h = Arc::clone(&h);
            async move {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                let tokens: Vec<_> = h
                    .tokens
                    .list()
                    .into_iter()
                    .map(|r| {
                        let state = if r.revoked.is_some() {
                            "revoked"
                        } else if r.expires <= now {
                            "expired"
                        } else {
                            "valid"
                        };
                        json!({
                            "name": r.name,
                            "scope": r.scope,
                            "created": r.created,
                            "expires": r.expires,
                            "revoked": r.revoked,
                            "state": state,
                        })
                    })
                    .collect();
                Ok(json!({ "total": tokens.len(), "tokens": tokens }))
            }
        },
    );

    let h = Arc::clone(&handles);
    registry.action(
        MODULE,
        "token_revoke",
        "revoke a token at once (kept as revoked; survives restarts)",
        vec![NAME],
        move |p: NameParams| {
            let h = Arc::clone(&h);
            async move {
                let record =
                    run_blocking(move || h.tokens.revoke(&p.name).map_err(token_error)).await?;
                Ok(json!({ "revoked": true, "name": record.name, "revoked_at": record.revoked }))
            }
        },
    );

    let h = Arc::clone(&handles);
    registry.action(
        MODULE,
        "audit",
        "the audit log of state-changing actions, newest first",
        vec![ParamSpec::optional(
            "limit",
            ParamKind::Integer {
                min: 1,
                max: 10_000,
            },
            Some("50"),
            "how many entries",
        )],
        move |p: AuditParams| {
            let h = Arc::clone(&h);
            async move {
                let limit = usize::try_from(p.limit).unwrap_or(50);
                let entries =
                    run_blocking(move || h.audit.recent(limit).map_err(ApiError::from)).await?;
                Ok(json!({ "total": entries.len(), "entries": entries }))
            }
        },
    );

    registry.reads(MODULE, &["token_list", "audit"]);
}

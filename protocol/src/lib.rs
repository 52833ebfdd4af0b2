//! The admin socket's wire format: newline-delimited JSON with the phantom-api envelope.
//! Shared by the daemon (`phantom_daemon::protocol` re-exports this crate) and the
//! `phantom-api` client, so the two cannot drift apart.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest request frame accepted, newline excluded.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// The daemon's version, as reported in every reply's metadata (the workspace version: every
/// crate of the workspace shares it).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Environment variable that names the admin socket for `phantom-api`.
pub const SOCKET_ENV: &str = "PHANTOM_SOCKET";

/// Module and action under which the daemon describes its own API (used by `--help`).
pub const DESCRIBE_MODULE: &str = "api";
pub const DESCRIBE_ACTION: &str = "describe";

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Request {
    pub module: String,
    pub action: String,
    #[serde(default)]
    pub params: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Metadata {
    pub module: String,
    pub action: String,
    pub timestamp: String,
    pub version: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Response {
    pub success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    pub metadata: Metadata,
}

/// Error codes every module may return; modules add their own (e.g. `CLIENT_EXISTS`).
pub mod codes {
    pub const INVALID_JSON: &str = "INVALID_JSON";
    pub const INVALID_REQUEST: &str = "INVALID_REQUEST";
    pub const FRAME_TOO_LARGE: &str = "FRAME_TOO_LARGE";
    pub const UNKNOWN_MODULE: &str = "UNKNOWN_MODULE";
    pub const UNKNOWN_ACTION: &str = "UNKNOWN_ACTION";
    pub const MISSING_PARAMETER: &str = "MISSING_PARAMETER";
    pub const INVALID_PARAMETER: &str = "INVALID_PARAMETER";
    pub const UNKNOWN_PARAMETER: &str = "UNKNOWN_PARAMETER";
    pub const PERMISSION_DENIED: &str = "PERMISSION_DENIED";
    pub const UNAVAILABLE: &str = "UNAVAILABLE";
    pub const INTERNAL_ERROR: &str = "INTERNAL_ERROR";
}

/// RFC 3339 UTC with a `Z` suffix, second precision, as the original phantom-api printed.
pub fn timestamp_now() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

pub fn rfc3339(t: time::OffsetDateTime) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    let t = t.to_offset(time::UtcOffset::UTC);
    t.format(&fmt)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

impl Response {
    pub fn ok(module: &str, action: &str, data: Value) -> Self {
        Self {
            success: true,
            data: Some(data),
            error: None,
            code: None,
            metadata: Metadata::now(module, action),
        }
    }

    pub fn fail(module: &str, action: &str, code: &str, error: impl Into<String>) -> Self {
        Self {
            success: false,
            data: None,
            error: Some(error.into()),
            code: Some(code.to_string()),
            metadata: Metadata::now(module, action),
        }
    }
}

impl Metadata {
    pub fn now(module: &str, action: &str) -> Self {
        Self {
            module: module.to_string(),
            action: action.to_string(),
            timestamp: timestamp_now(),
            version: VERSION.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_is_rfc3339_utc() {
        let t = time::macros::datetime!(2026-11-23 03:05:09 UTC);
        assert_eq!(rfc3339(t), "2026-11-23T03:05:09Z");
    }

    #[test]
    fn failure_envelope_has_code_and_no_data() -> Result<(), serde_json::Error> {
        let v = serde_json::to_value(Response::fail("core", "x", codes::UNKNOWN_ACTION, "no"))?;
        assert_eq!(v["success"], false);
        assert_eq!(v["code"], "UNKNOWN_ACTION");
        assert!(v.get("data").is_none());
        assert_eq!(v["metadata"]["module"], "core");
        Ok(())
    }
}

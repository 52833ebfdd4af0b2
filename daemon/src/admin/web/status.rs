//! The HTTP status of an envelope, chosen from its error code (docs/admin-api.md has the
//! table). Success is 200.

use axum::http::StatusCode;

/// Codes of the HTTPS transport itself (the socket never answers them).
pub mod codes {
    /// No bearer token, or one that is malformed, badly signed, expired, revoked or unknown.
    pub const UNAUTHORIZED: &str = "UNAUTHORIZED";
    /// The token's scope does not cover the action.
    pub const INSUFFICIENT_SCOPE: &str = "INSUFFICIENT_SCOPE";
    /// The source address is outside `[admin] http_allow`.
    pub const SOURCE_NOT_ALLOWED: &str = "SOURCE_NOT_ALLOWED";
    /// The action is served over the socket only (the `admin` module).
    pub const SOCKET_ONLY: &str = "SOCKET_ONLY";
    /// Over the per-token or per-source request rate.
    pub const RATE_LIMITED: &str = "RATE_LIMITED";
    /// No such route.
    pub const NOT_FOUND: &str = "NOT_FOUND";
    /// A body over the listener's limit.
    pub const BODY_TOO_LARGE: &str = "BODY_TOO_LARGE";
}

pub fn for_code(code: &str) -> StatusCode {
    use crate::protocol::codes as c;
    match code {
        codes::UNAUTHORIZED => StatusCode::UNAUTHORIZED,
        codes::INSUFFICIENT_SCOPE | codes::SOURCE_NOT_ALLOWED | codes::SOCKET_ONLY => {
            StatusCode::FORBIDDEN
        }
        c::PERMISSION_DENIED => StatusCode::FORBIDDEN,
        codes::RATE_LIMITED => StatusCode::TOO_MANY_REQUESTS,
        codes::BODY_TOO_LARGE | c::FRAME_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
        codes::NOT_FOUND | c::UNKNOWN_MODULE | c::UNKNOWN_ACTION => StatusCode::NOT_FOUND,
        c::INVALID_JSON
        | c::INVALID_REQUEST
        | c::MISSING_PARAMETER
        | c::INVALID_PARAMETER
        | c::UNKNOWN_PARAMETER
        | "CONFIRMATION_REQUIRED"
        | "MALFORMED" => StatusCode::BAD_REQUEST,
        c::UNAVAILABLE | "PORT_UNAVAILABLE" => StatusCode::SERVICE_UNAVAILABLE,
        "EXIT_UNREACHABLE" | "TLS_FAILED" => StatusCode::BAD_GATEWAY,
        c::INTERNAL_ERROR => StatusCode::INTERNAL_SERVER_ERROR,
        other if other.starts_with("INVALID_") => StatusCode::BAD_REQUEST,
        other if other.ends_with("_NOT_FOUND") => StatusCode::NOT_FOUND,
        other
            if other.ends_with("_EXISTS")
                || other.ends_with("_ACTIVE")
                || other.ends_with("_INACTIVE")
                || other.ends_with("_ENABLED")
                || other.ends_with("_DISABLED")
                || other.ends_with("_FULL")
                || other.ends_with("_REFUSED")
                || other.ends_with("_CLASH") =>
        {
            StatusCode::CONFLICT
        }
        other if other.ends_with("_FAILED") => StatusCode::INTERNAL_SERVER_ERROR,
        // A well-formed request the module refused for a reason of its own.
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_statuses() {
        for (code, status) in [
            ("UNAUTHORIZED", 401),
            ("INSUFFICIENT_SCOPE", 403),
            ("SOURCE_NOT_ALLOWED", 403),
            ("RATE_LIMITED", 429),
            ("INVALID_JSON", 400),
            ("UNKNOWN_PARAMETER", 400),
            ("INVALID_PARAMETER", 400),
            ("MISSING_PARAMETER", 400),
            ("INVALID_CLIENT_NAME", 400),
            ("UNKNOWN_ACTION", 404),
            ("CLIENT_NOT_FOUND", 404),
            ("CLIENT_EXISTS", 409),
            ("GHOST_INACTIVE", 409),
            ("MULTIHOP_ALREADY_ENABLED", 409),
            ("SUBNET_FULL", 409),
            ("UNAVAILABLE", 503),
            ("EXIT_UNREACHABLE", 502),
            ("INTERNAL_ERROR", 500),
            ("SUBNET_CHANGE_FAILED", 500),
            ("DOMAIN_NOT_THIS_SERVER", 422),
        ] {
            assert_eq!(for_code(code).as_u16(), status, "{code}");
        }
    }
}

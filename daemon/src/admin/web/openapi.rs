//! `GET /api/v1/openapi.json`: an OpenAPI 3.1 document made from the registry once at start:
//! every action as `POST /api/v1/<module>/<action>` with its parameters (types, limits,
//! defaults, required) as the request body's schema, and the envelope as the reply (the
//! registry declares no reply schemas, so `data` is an object of the action's own).

use serde_json::{Map, Value, json};

use crate::admin::registry::{ParamKind, Registry};

fn param_schema(kind: ParamKind, help: &str, default: Option<&str>) -> Value {
    let mut s = match kind {
        ParamKind::String { max_len } => json!({"type": "string", "maxLength": max_len}),
        ParamKind::Integer { min, max } => {
            json!({"type": ["integer", "string"], "minimum": min, "maximum": max})
        }
        ParamKind::Boolean => json!({"type": ["boolean", "string"]}),
        ParamKind::IpAddr => json!({
            "type": "string",
            "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}],
        }),
        ParamKind::Source => json!({
            "type": "string",
            "description": "an IPv4 or IPv6 address, or an IPv6 prefix (address/length)",
        }),
    };
    if let Value::Object(o) = &mut s {
        let text = match o.get("description").and_then(Value::as_str) {
            Some(d) => format!("{help} ({d})"),
            None => help.to_string(),
        };
        o.insert("description".into(), Value::String(text));
        if let Some(d) = default {
            o.insert("default".into(), Value::String(d.to_string()));
        }
    }
    s
}

fn envelope() -> Value {
    json!({
        "type": "object",
        "required": ["success", "metadata"],
        "properties": {
            "success": {"type": "boolean"},
            "data": {"type": "object", "description": "the action's reply (success only)"},
            "error": {"type": "string", "description": "a sentence (failure only)"},
            "code": {"type": "string", "description": "UPPER_SNAKE error code (failure only)"},
            "metadata": {
                "type": "object",
                "required": ["module", "action", "timestamp", "version"],
                "properties": {
                    "module": {"type": "string"},
                    "action": {"type": "string"},
                    "timestamp": {"type": "string", "format": "date-time"},
                    "version": {"type": "string"},
                },
            },
        },
    })
}

fn failure(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}},
    })
}

/// The document, for the registry as it is (the `admin` module left out: socket only).
pub fn document(registry: &Registry) -> Value {
    let mut paths = Map::new();
    for a in registry.catalogue() {
        if a.module == crate::admin::actions::MODULE {
            continue;
        }
        let mut properties = Map::new();
        let mut required = Vec::new();
        for p in a.params {
            properties.insert(p.name.to_string(), param_schema(p.kind, p.help, p.default));
            if p.required && p.default.is_none() {
                required.push(Value::String(p.name.to_string()));
            }
        }
        let mut body_schema = json!({
            "type": "object",
            "additionalProperties": false,
            "properties": properties,
        });
        if !required.is_empty()
            && let Value::Object(o) = &mut body_schema
        {
            o.insert("required".into(), Value::Array(required.clone()));
        }
        let op = json!({
            "operationId": format!("{}_{}", a.module, a.action),
            "summary": a.summary,
            "tags": [a.module],
            "description": if a.read_only {
                "Changes no state: a `read` token may call it."
            } else {
                "Changes state: needs a `write` token or one scoped to this module; audited."
            },
            "requestBody": {
                "required": !required.is_empty(),
                "content": {"application/json": {"schema": body_schema}},
            },
            "responses": {
                "200": {
                    "description": "success envelope",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}},
                },
                "400": failure("malformed JSON, unknown, missing or invalid parameter"),
                "401": failure("no valid bearer token"),
                "403": failure("scope or source not allowed"),
                "429": failure("over the per-token or per-source rate"),
                "default": failure("a failure envelope; the status follows its code"),
            },
        });
        paths.insert(
            format!("/api/v1/{}/{}", a.module, a.action),
            json!({ "post": op }),
        );
    }
    paths.insert(
        "/api/v1/dashboard".into(),
        json!({"get": {
            "operationId": "dashboard_snapshot",
            "summary": "what the dashboard's panels show: one shared snapshot of read actions, at most a second old",
            "tags": ["dashboard"],
            "description": "Any valid token; panels of modules outside its scope are left out and named in `hidden`. docs/dashboard.md.",
            "responses": {
                "200": {
                    "description": "the snapshot",
                    "content": {"application/json": {"schema": {
                        "type": "object",
                        "required": ["generated_at", "refresh_ms", "token", "panels", "hidden"],
                        "properties": {
                            "generated_at": {"type": "integer", "description": "Unix seconds"},
                            "refresh_ms": {"type": "integer"},
                            "token": {"type": "object"},
                            "panels": {"type": "object", "description": "panel name -> part -> the read action's data (or its error and code)"},
                            "hidden": {"type": "array", "items": {"type": "string"}},
                        },
                    }}},
                },
                "401": failure("no valid bearer token"),
                "403": failure("source not allowed"),
                "429": failure("over the per-token or per-source rate"),
            },
        }}),
    );
    let mut tags: Vec<Value> = registry
        .catalogue()
        .iter()
        .filter(|a| a.module != crate::admin::actions::MODULE)
        .map(|a| (a.module, a.module_summary))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .map(|(name, description)| json!({"name": name, "description": description}))
        .collect();
    tags.push(json!({"name": "dashboard", "description": "the dashboard at `/`"}));
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Phantom admin API",
            "version": crate::protocol::VERSION,
            "description": "Every action of phantomd's admin socket over HTTPS. docs/admin-api.md.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": tags,
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            },
            "schemas": {"Envelope": envelope()},
        },
    })
}

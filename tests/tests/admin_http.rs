//! The HTTPS admin API of the real daemon (`[admin] http_listen`), with curl over real TLS
//! from a second namespace: every registered action over both transports gives the same
//! envelope; the sentry aliases; each refusal a clear 4xx that changes nothing; revocation
//! survives kill -9; the audit log holds each write and no VPN client address or queried name;
//! the OpenAPI document lists every action.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{collections::BTreeSet, time::Duration};

use phantom_tests::{
    ApiClient, BpffsDir, Daemon, DaemonConfig, GuardedLink, NetNs, WireguardSettings, api,
    mint_token, phantom_api, require_root,
};
use serde_json::{Value, json};

const VPN_SUBNET: &str = "198.51.100.0/24";
const ADMIN: &str = "192.0.2.1:9443";
/// In the allowlist.
const OPERATOR: &str = GuardedLink::PEER_V4;
/// Outside it.
const STRANGER: &str = GuardedLink::PEER_V4_SECOND;
const PER_TOKEN: usize = 120;
const PER_SOURCE: usize = 400;

/// One HTTPS request with curl from `from` in `ns`: (status, JSON body or the raw text).
fn https(
    ns: &NetNs,
    from: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut cmd = ns.command("curl");
    cmd.args(["-sk", "--max-time", "30", "--interface", from, "-X", method]);
    cmd.args(["-w", "\n%{http_code}"]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    cmd.arg(format!("https://{ADMIN}{path}"));
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status: u16 = status.trim().parse().unwrap_or(0);
    let value = serde_json::from_str(body).unwrap_or(Value::String(body.to_string()));
    (status, value)
}

/// `n` identical POSTs on one keep-alive connection; the statuses.
fn burst(ns: &NetNs, from: &str, path: &str, token: &str, n: usize) -> Vec<u16> {
    let url = format!("https://{ADMIN}{path}");
    let mut cmd = ns.command("curl");
    cmd.args(["-sk", "--max-time", "60", "--interface", from, "-X", "POST"]);
    cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    cmd.args(["-d", "{}", "-w", "%{http_code}\n"]);
    for _ in 0..n {
        // `-o` applies to one URL each.
        cmd.args(["-o", "/dev/null", &url]);
    }
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap_or(0))
        .collect()
}

/// The parts of an envelope that must match across transports (the timestamp differs).
fn comparable(reply: &Value) -> Value {
    let mut r = reply.clone();
    r["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("timestamp")
        .unwrap();
    r
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// Parameters for a read-only action's required parameters.
fn read_param(name: &str) -> Value {
    match name {
        "client_name" => json!("alice"),
        "new_subnet" => json!("10.99.0.0/24"),
        "domain" => json!("lookup-probe.example"),
        "ip" => json!("203.0.113.77"),
        "destination" => json!("203.0.113.77"),
        "protocol" => json!("tcp"),
        other => panic!("no walk value for the read parameter {other}"),
    }
}

/// Where scripts/bootstrap.sh installs openapi-spec-validator (no Debian package has it).
const VALIDATOR_PYTHON: &str = "/opt/phantom/openapi-venv/bin/python";

/// Checks the document with openapi-spec-validator (OpenAPI 3.1 schema and semantics). Without
/// the validator installed the check is skipped, saying so.
fn validate_openapi(doc: &Value) {
    let python =
        std::env::var("PHANTOM_OPENAPI_PYTHON").unwrap_or_else(|_| VALIDATOR_PYTHON.into());
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), doc.to_string()).unwrap();
    let out = std::process::Command::new(&python)
        .args([
            "-c",
            "import json, sys\nfrom openapi_spec_validator import validate\nvalidate(json.load(open(sys.argv[1])))\nprint('valid')",
        ])
        .arg(file.path())
        .output();
    match out {
        Ok(o) if o.status.success() => eprintln!("openapi-spec-validator: the document is valid"),
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named") => {
            eprintln!(
                "openapi-spec-validator is not installed for {python}: validation skipped (scripts/bootstrap.sh installs it)"
            )
        }
        Ok(o) => panic!(
            "the OpenAPI document does not validate:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => eprintln!(
            "{python}: {e}: OpenAPI validation skipped (scripts/bootstrap.sh installs the validator)"
        ),
    }
}

/// Writes walked with parameters their action refuses itself (an object that does not exist,
/// a value it rejects), so the handler runs on both transports and nothing changes. The other
/// writes get an unknown parameter, which the registry refuses before the handler.
fn write_params(module: &str, action: &str) -> Option<Value> {
    Some(match (module, action) {
        ("core", "remove_client" | "enable_client" | "disable_client") => {
            json!({"client_name": "walk-nobody"})
        }
        ("blocklist", "remove") => json!({"domain": "walk-never-added.example"}),
        ("multihop", "remove_vpn_config" | "enable_multihop") => {
            json!({"exit_name": "walk-nobody"})
        }
        ("sentry", "set_mode") => json!({"mode": "WALK"}),
        _ => return None,
    })
}

#[test]
fn admin_api_over_https_matches_the_socket_and_refuses_clearly() {
    if !require_root("admin_api_over_https_matches_the_socket_and_refuses_clearly") {
        return;
    }
    let started = std::time::Instant::now();
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path());
    config.wireguard = Some(WireguardSettings::new(VPN_SUBNET, GuardedLink::SERVER_V4));
    config.admin_extra = format!(
        "http_listen = \"0.0.0.0:9443\"\nhttp_allow = [\"127.0.0.0/8\", \"{OPERATOR}/32\"]\n\
         http_rate_per_token = {PER_TOKEN}\nhttp_rate_per_source = {PER_SOURCE}\n"
    );
    config.extra_toml = "[sentry]\nenabled = true\nlisten = \"127.0.0.1:18080\"\nupstream = \"http://127.0.0.1:18000\"\n".into();
    let mut daemon = Daemon::start(&link.server, &config);
    let alice = api(&daemon, &["core", "add_client", "client_name=alice"]);
    let alice_ip = alice["client"]["ip"].as_str().unwrap().to_string();
    api(&daemon, &["blocklist", "add", "domain=casino-walk.example"]);

    // The key and the self-signed certificate are private files in the state directory.
    use std::os::unix::fs::PermissionsExt;
    for f in ["jwt-key.p8", "tls/key.pem"] {
        let path = daemon.dir().join("state/admin").join(f);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
    }

    // The issue's spelling of the CLI.
    let (code, created, out) = phantom_api(
        &daemon.socket(),
        &[
            "admin", "token", "create", "--name", "walk", "--scope", "write", "--ttl", "1h",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let walk = created["data"]["token"].as_str().unwrap().to_string();
    let (code, listed, out) = phantom_api(&daemon.socket(), &["admin", "token", "list"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(listed["data"]["tokens"][0]["name"], "walk");
    assert!(
        !out.contains(&walk),
        "token_list never shows a token: {out}"
    );

    // The walk: every action of the registry, over the socket, HTTPS, and the socket again.
    let mut socket = ApiClient::connect(&daemon.socket());
    let describe = socket.ok("api", "describe", json!({}));
    let mut walked = 0;
    let mut volatile = Vec::new();
    let mut handler_refusals = Vec::new();
    for (module, m) in describe["modules"].as_object().unwrap() {
        for (action, a) in m["actions"].as_object().unwrap() {
            let read_only = a["read_only"].as_bool().unwrap();
            let mut params = serde_json::Map::new();
            if read_only {
                for p in a["params"].as_array().unwrap() {
                    if p["required"] == true && p["default"].is_null() {
                        let name = p["name"].as_str().unwrap();
                        params.insert(name.into(), read_param(name));
                    }
                }
            } else if let Some(Value::Object(p)) = write_params(module, action) {
                params = p;
            } else {
                // A write the registry refuses before it runs: nothing changes, on either
                // transport.
                params.insert("walk_unknown".into(), json!(1));
            }
            let params = Value::Object(params);
            let s1 = socket.call(module, action, params.clone());
            let (status, h) = https(
                &link.peer,
                OPERATOR,
                "POST",
                &format!("/api/v1/{module}/{action}"),
                Some(&walk),
                Some(&params.to_string()),
            );
            let s2 = socket.call(module, action, params.clone());
            walked += 1;
            if module == "admin" {
                assert_eq!(status, 403, "{module} {action}: {h}");
                assert_eq!(h["code"], "SOCKET_ONLY");
                continue;
            }
            assert_eq!(
                status == 200,
                h["success"] == true,
                "{module} {action}: status {status} for {h}"
            );
            if !read_only {
                assert_eq!(
                    h["success"], false,
                    "{module} {action} changed something: {h}"
                );
                if write_params(module, action).is_none() {
                    assert_eq!(h["code"], "UNKNOWN_PARAMETER", "{module} {action}: {h}");
                    assert_eq!(status, 400);
                } else {
                    assert_ne!(h["code"], "UNKNOWN_PARAMETER", "{module} {action}: {h}");
                    handler_refusals.push(format!("{module} {action}: {} {}", status, h["code"]));
                }
            }
            let (c1, ch, c2) = (comparable(&s1), comparable(&h), comparable(&s2));
            if c1 == c2 {
                assert_eq!(ch, c1, "{module} {action}: HTTPS and socket differ");
            } else {
                // Live figures (rates, counters, uptime, response times) differ between any
                // two calls: the same fields, the same outcome.
                volatile.push(format!("{module} {action}"));
                assert_eq!(ch["success"], c1["success"], "{module} {action}");
                assert_eq!(keys(&ch["data"]), keys(&c1["data"]), "{module} {action}");
                assert_eq!(ch["metadata"], c1["metadata"], "{module} {action}");
            }
        }
    }
    eprintln!(
        "walked {walked} actions over both transports; live data compared by fields: {volatile:?}; writes refused by their handler: {handler_refusals:?}"
    );
    assert!(walked > 60, "{walked} actions");

    // A write over HTTPS, audited under its token.
    let (status, added) = https(
        &link.peer,
        OPERATOR,
        "POST",
        "/api/v1/core/add_client",
        Some(&walk),
        Some(r#"{"client_name":"web-ok"}"#),
    );
    assert_eq!(status, 200, "{added}");
    let (status, again) = https(
        &link.peer,
        OPERATOR,
        "POST",
        "/api/v1/core/add_client",
        Some(&walk),
        Some(r#"{"client_name":"web-ok"}"#),
    );
    assert_eq!(
        (status, again["code"].as_str()),
        (409, Some("CLIENT_EXISTS"))
    );

    // The sentry aliases.
    let (status, st) = https(
        &link.peer,
        OPERATOR,
        "GET",
        "/sentry/status",
        Some(&walk),
        None,
    );
    assert_eq!(status, 200, "{st}");
    assert_eq!(
        keys(&st["data"]),
        keys(&api(&daemon, &["sentry", "status"]))
    );
    let (status, r) = https(
        &link.peer,
        OPERATOR,
        "POST",
        "/sentry/whitelist",
        Some(&walk),
        Some(r#"{"ip":"203.0.113.9"}"#),
    );
    assert_eq!(status, 200, "{r}");
    let (_, wl) = https(
        &link.peer,
        OPERATOR,
        "GET",
        "/sentry/whitelist",
        Some(&walk),
        None,
    );
    assert!(wl["data"].to_string().contains("203.0.113.9"), "{wl}");
    let (status, r) = https(
        &link.peer,
        OPERATOR,
        "DELETE",
        "/sentry/whitelist?ip=203.0.113.9",
        Some(&walk),
        None,
    );
    assert_eq!(status, 200, "{r}");
    assert!(
        !api(&daemon, &["sentry", "whitelist_list"])
            .to_string()
            .contains("203.0.113.9")
    );
    let (status, r) = https(
        &link.peer,
        OPERATOR,
        "POST",
        "/sentry/mode",
        Some(&walk),
        Some(r#"{"mode":"DEFCON_1"}"#),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        api(&daemon, &["sentry", "status"])["current_mode"],
        "DEFCON_1"
    );
    let (status, r) = https(
        &link.peer,
        OPERATOR,
        "POST",
        "/sentry/config",
        Some(&walk),
        Some(r#"{"sensitivity_factor":"3"}"#),
    );
    assert_eq!(status, 200, "{r}");

    // Refusals: each a 4xx with a clear code and sentence, and no client made.
    let reader = mint_token(&daemon, "reader", "read", "1h");
    let dns_only = mint_token(&daemon, "dns-only", "dns", "1h");
    let expiring = mint_token(&daemon, "expiring", "write", "1");
    let revoked = mint_token(&daemon, "revoked", "write", "1h");
    api(&daemon, &["admin", "token_revoke", "name=revoked"]);
    let foreign = {
        // Same claims, another key: the signature does not verify.
        let mut parts: Vec<String> = walk.split('.').map(String::from).collect();
        let sig = parts[2].clone().into_bytes();
        let mut sig = sig;
        sig[10] = if sig[10] == b'A' { b'B' } else { b'A' };
        parts[2] = String::from_utf8(sig).unwrap();
        parts.join(".")
    };
    std::thread::sleep(Duration::from_millis(2100)); // `expiring` is past its second
    let add = "/api/v1/core/add_client";
    let refused = |who: &str,
                   from: &str,
                   token: Option<&str>,
                   body: &str,
                   status: u16,
                   code: &str,
                   says: &str| {
        let (got, reply) = https(&link.peer, from, "POST", add, token, Some(body));
        assert_eq!(got, status, "{who}: {reply}");
        assert_eq!(reply["success"], false, "{who}: {reply}");
        assert_eq!(reply["code"], code, "{who}: {reply}");
        let error = reply["error"].as_str().unwrap();
        assert!(error.contains(says), "{who}: {error:?} should say {says:?}");
    };
    let body = r#"{"client_name":"refused-1"}"#;
    refused(
        "no token",
        OPERATOR,
        None,
        body,
        401,
        "UNAUTHORIZED",
        "no bearer token",
    );
    refused(
        "expired",
        OPERATOR,
        Some(&expiring),
        body,
        401,
        "UNAUTHORIZED",
        "expired",
    );
    refused(
        "bad signature",
        OPERATOR,
        Some(&foreign),
        body,
        401,
        "UNAUTHORIZED",
        "signature",
    );
    refused(
        "revoked",
        OPERATOR,
        Some(&revoked),
        body,
        401,
        "UNAUTHORIZED",
        "revoked",
    );
    refused(
        "read scope",
        OPERATOR,
        Some(&reader),
        body,
        403,
        "INSUFFICIENT_SCOPE",
        "changes state",
    );
    refused(
        "module scope",
        OPERATOR,
        Some(&dns_only),
        body,
        403,
        "INSUFFICIENT_SCOPE",
        "outside its modules",
    );
    refused(
        "stranger",
        STRANGER,
        Some(&walk),
        body,
        403,
        "SOURCE_NOT_ALLOWED",
        "allowlist",
    );
    refused(
        "malformed JSON",
        OPERATOR,
        Some(&walk),
        r#"{"client_name":"#,
        400,
        "INVALID_JSON",
        "malformed JSON",
    );
    refused(
        "unknown field",
        OPERATOR,
        Some(&walk),
        r#"{"client_name":"refused-1","colour":"red"}"#,
        400,
        "UNKNOWN_PARAMETER",
        "colour",
    );
    refused(
        "wrong type",
        OPERATOR,
        Some(&walk),
        r#"{"client_name":["refused-1"]}"#,
        400,
        "INVALID_PARAMETER",
        "client_name",
    );
    // The read token reads; the dns token calls dns.
    assert_eq!(
        https(
            &link.peer,
            OPERATOR,
            "POST",
            "/api/v1/core/list_clients",
            Some(&reader),
            None
        )
        .0,
        200
    );
    // (The resolver is off here: the dns module answers for itself, not the scope.)
    let (_, r) = https(
        &link.peer,
        OPERATOR,
        "POST",
        "/api/v1/dns/flush_cache",
        Some(&dns_only),
        None,
    );
    assert_eq!(r["metadata"]["action"], "flush_cache");
    assert_ne!(r["code"], "INSUFFICIENT_SCOPE", "{r}");
    // Minting is socket only.
    let (status, r) = https(
        &link.peer,
        OPERATOR,
        "POST",
        "/api/v1/admin/token_create",
        Some(&walk),
        Some(r#"{"name":"sneaky","scope":"write","ttl":"1h"}"#),
    );
    assert_eq!(
        (status, r["code"].as_str()),
        (403, Some("SOCKET_ONLY")),
        "{r}"
    );

    // Over the per-token rate, then over the per-source rate (from the namespace's loopback,
    // a source of its own, with several tokens).
    let burster = mint_token(&daemon, "burster", "read", "1h");
    let statuses = burst(
        &link.peer,
        OPERATOR,
        "/api/v1/sentry/status",
        &burster,
        PER_TOKEN + 5,
    );
    assert_eq!(statuses.len(), PER_TOKEN + 5);
    assert!(
        statuses[..PER_TOKEN].iter().all(|s| *s == 200),
        "{statuses:?}"
    );
    assert!(
        statuses[PER_TOKEN..].iter().all(|s| *s == 429),
        "{statuses:?}"
    );
    let (status, r) = https(
        &link.peer,
        OPERATOR,
        "POST",
        "/api/v1/sentry/status",
        Some(&burster),
        None,
    );
    assert_eq!((status, r["code"].as_str()), (429, Some("RATE_LIMITED")));
    assert!(r["error"].as_str().unwrap().contains("token"), "{r}");
    let mut from_loopback = Vec::new();
    for i in 0..4 {
        let t = mint_token(&daemon, &format!("src{i}"), "read", "1h");
        from_loopback.extend(burst(
            &link.server,
            "127.0.0.1",
            "/api/v1/sentry/status",
            &t,
            101,
        ));
    }
    let ok = from_loopback.iter().filter(|s| **s == 200).count();
    assert_eq!(ok, PER_SOURCE, "per-source cap: {from_loopback:?}");
    assert!(from_loopback[PER_SOURCE..].iter().all(|s| *s == 429));

    // No refusal made a client.
    let clients = api(&daemon, &["core", "list_clients", "per_page=100"]).to_string();
    assert!(!clients.contains("refused-1"), "{clients}");
    assert!(clients.contains("web-ok"));

    // Revocation survives kill -9.
    api(&daemon, &["admin", "token_revoke", "name=reader"]);
    daemon.kill9();
    daemon.restart();
    let (status, r) = https(
        &link.peer,
        OPERATOR,
        "POST",
        "/api/v1/core/list_clients",
        Some(&reader),
        None,
    );
    assert_eq!(
        (status, r["code"].as_str()),
        (401, Some("UNAUTHORIZED")),
        "{r}"
    );
    assert!(r["error"].as_str().unwrap().contains("revoked"));
    let (status, _) = https(
        &link.peer,
        OPERATOR,
        "POST",
        "/api/v1/core/list_clients",
        Some(&walk),
        None,
    );
    assert_eq!(status, 200, "the other tokens still work after the restart");

    // The audit log: each write of the test, newest first, nothing of a VPN client's.
    let (code, audit, out) = phantom_api(&daemon.socket(), &["admin", "audit", "limit=1000"]);
    assert_eq!(code, 0, "{out}");
    let entries = audit["data"]["entries"].as_array().unwrap();
    let https_writes: Vec<&Value> = entries
        .iter()
        .filter(|e| e["transport"] == "https")
        .collect();
    let has = |token: &str, action: &str, outcome: &str| {
        https_writes
            .iter()
            .any(|e| e["token"] == token && e["action"] == action && e["outcome"] == outcome)
    };
    assert!(has("walk", "add_client", "ok"), "{audit}");
    assert!(has("walk", "add_client", "CLIENT_EXISTS"));
    assert!(has("walk", "whitelist_add", "ok"));
    assert!(has("walk", "whitelist_remove", "ok"));
    assert!(has("walk", "set_mode", "ok"));
    assert!(has("walk", "set_config", "ok"));
    assert!(
        https_writes
            .iter()
            .any(|e| e["token"] == "dns-only" && e["action"] == "flush_cache")
    );
    assert!(
        has("walk", "unblock", "UNKNOWN_PARAMETER"),
        "the walk's writes too"
    );
    // The socket's writes: the tokens minted and revoked, the clients added.
    assert!(entries.iter().any(|e| e["transport"] == "socket"
        && e["action"] == "token_revoke"
        && e["params"]["name"] == "reader"));
    // Reads are not audited. Refusals by the transport (token, scope, source, JSON) never
    // reach the action; those the registry's validation made are audited with their code.
    assert!(!https_writes.iter().any(|e| e["action"] == "list_clients"));
    let refused: Vec<&&Value> = https_writes
        .iter()
        .filter(|e| {
            e["params"].to_string().contains("refused-1")
                || e["params"]["client_name"] == "[1 items]"
        })
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused.iter().all(|e| e["outcome"] != "ok"));
    let times: Vec<&str> = entries
        .iter()
        .map(|e| e["time"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");
    let text = std::fs::read_to_string(daemon.dir().join("state/admin/audit.jsonl")).unwrap();
    assert!(
        !text.contains(&alice_ip),
        "a VPN client's address in the audit log"
    );
    assert!(
        !text.contains("lookup-probe.example"),
        "a queried name in the audit log"
    );
    assert!(
        !text.contains(&walk[walk.len() - 20..]),
        "a token in the audit log"
    );

    // The OpenAPI document: every action but the socket-only module's.
    let (status, doc) = https(
        &link.peer,
        OPERATOR,
        "GET",
        "/api/v1/openapi.json",
        None,
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    for (module, m) in describe["modules"].as_object().unwrap() {
        for (action, a) in m["actions"].as_object().unwrap() {
            let path = format!("/api/v1/{module}/{action}");
            if module == "admin" {
                assert!(!paths.contains_key(&path));
                continue;
            }
            let op = &paths[&path]["post"];
            let schema = &op["requestBody"]["content"]["application/json"]["schema"];
            for p in a["params"].as_array().unwrap() {
                let name = p["name"].as_str().unwrap();
                assert!(schema["properties"][name].is_object(), "{path} {name}");
            }
        }
    }
    validate_openapi(&doc);
    assert!(
        !daemon
            .log()
            .contains("listed as read-only is not registered"),
        "every read-only name is a registered action"
    );
    eprintln!("admin API test took {:?}", started.elapsed());
}

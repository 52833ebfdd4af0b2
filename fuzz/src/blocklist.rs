//! `blocklist_import`: every import format (hosts, AdBlock, plain, seed JSON, and the guess).
//! `blocklist_api`: the public blocklist API's requests (query strings, headers, bodies)
//! through its real routes on a real list.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
};

use axum::{
    body::Body,
    extract::ConnectInfo,
    http::{Request, StatusCode},
};
use http_body_util::BodyExt;
use phantom_daemon::blocklist::{
    Blocklist,
    api::router,
    import::{self, Format},
    model::{Entry, Pattern, PatternType, rule_domain},
};

/// Input: a list's text. Each format (and the guessed one) accepts entries in normal form,
/// at or below a registrable domain, and reports every line it skips with a reason.
pub fn blocklist_import(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let guessed = Format::detect(text);
    for format in [Format::Hosts, Format::Adblock, Format::Plain, Format::Json] {
        let parsed = import::parse(text, format, "fuzz", 1);
        for entry in &parsed.entries {
            let again = rule_domain(&entry.domain).unwrap_or_else(|e| {
                panic!(
                    "an accepted entry {:?} no longer reads: {e:?}",
                    entry.domain
                )
            });
            assert_eq!(again, entry.domain, "entries in normal form");
            assert!(!entry.patterns.is_empty());
        }
        for skipped in &parsed.skipped {
            assert!(!skipped.reason.is_empty(), "a skipped line says why");
        }
        if format == guessed {
            assert!(parsed.entries.len() + parsed.skipped.len() <= text.len() + 1);
        }
    }
}

/// The list the API serves: a few entries and patterns, in a directory of its own.
fn list() -> &'static Arc<Blocklist> {
    static LIST: OnceLock<(tempfile::TempDir, Arc<Blocklist>)> = OnceLock::new();
    &LIST
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let list = Arc::new(Blocklist::open(dir.path(), 0.5, &[], None).expect("a list"));
            list.upsert(vec![
                Entry::new("both.example", true, 1.0, "known \"casino\" \u{e7}", 1),
                Entry::new("exact.example", false, 0.75, "line\nbreak", 2),
            ])
            .expect("entries");
            list.add_pattern(Pattern {
                pattern: "bet".into(),
                kind: PatternType::Contains,
                weight: 0.7,
            })
            .expect("a pattern");
            (dir, list)
        })
        .1
}

/// Input: `METHOD target` on the first line, `name: value` header lines, an empty line, the
/// body. Whatever the request, the reply is one the API documents (never a server error)
/// and its body reads to the end.
pub fn blocklist_api(data: &[u8]) {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let Ok(head) = std::str::from_utf8(head) else {
        return;
    };
    let mut lines = head.lines();
    let Some((method, target)) = lines.next().and_then(|l| l.split_once(' ')) else {
        return;
    };
    let mut request = Request::builder().method(method).uri(target);
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            request = request.header(name.trim(), value.trim());
        }
    }
    let Ok(mut request) = request.body(Body::from(body.to_vec())) else {
        return;
    };
    // A new source for every request: the rate limiter is not what is fuzzed here.
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let peer = Ipv4Addr::from(
        NEXT.fetch_add(1, Ordering::Relaxed)
            .wrapping_add(0x0a00_0000),
    );
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::new(IpAddr::V4(peer), 40_000)));
    crate::runtime().block_on(async {
        let mut app = router(Arc::clone(list()));
        std::future::poll_fn(|cx| {
            tower_service::Service::<Request<Body>>::poll_ready(&mut app, cx)
        })
        .await
        .expect("the router is ready");
        let response = tower_service::Service::call(&mut app, request)
            .await
            .expect("the router answers");
        let status = response.status();
        assert!(
            !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
            "a server error for a request: {status}"
        );
        let body = response
            .into_body()
            .collect()
            .await
            .expect("the body reads to its end");
        let _ = body.to_bytes();
    });
}

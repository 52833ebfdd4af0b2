//! Foundation end-to-end tests: the real phantomd in a network namespace, its XDP guard on a
//! veth uplink, its admin socket and metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a failed test

use std::time::Duration;

use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, GuardedLink, http_get, metric_value, phantom_api, require_root,
};
use serde_json::{Value, json};

fn start(link: &GuardedLink, bpffs: &BpffsDir) -> Daemon {
    Daemon::start(
        &link.server,
        &DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path()),
    )
}

/// Packets and bytes the daemon reports for `address` via `phantom-api datapath top_sources`.
fn source_counts(daemon: &Daemon, address: &str) -> Option<(u64, u64)> {
    let (code, reply, out) =
        phantom_api(&daemon.socket(), &["datapath", "top_sources", "count=100"]);
    assert_eq!(code, 0, "{out}");
    reply["data"]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["address"] == address)
        .map(|s| (s["packets"].as_u64().unwrap(), s["bytes"].as_u64().unwrap()))
}

// Frame sizes on the wire as XDP sees them (Ethernet header included, no FCS).
const UDP_PAYLOAD: usize = 100;
const UDP4_FRAME: u64 = 14 + 20 + 8 + UDP_PAYLOAD as u64;
const UDP6_FRAME: u64 = 14 + 40 + 8 + UDP_PAYLOAD as u64;
const PING4_FRAME: u64 = 14 + 20 + 8 + 56;

#[test]
fn udp_and_icmp_are_counted_exactly_per_source() {
    if !require_root("udp_and_icmp_are_counted_exactly_per_source") {
        return;
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let daemon = start(&link, &bpffs);

    link.send_udp(
        GuardedLink::PEER_V4,
        GuardedLink::SERVER_V4,
        25,
        UDP_PAYLOAD,
    );
    assert_eq!(
        link.ping(GuardedLink::SERVER_V4, 7),
        7,
        "ping through the guard"
    );
    link.send_udp(
        GuardedLink::PEER_V4_SECOND,
        GuardedLink::SERVER_V4,
        5,
        UDP_PAYLOAD,
    );
    link.send_udp(
        GuardedLink::PEER_V6,
        GuardedLink::SERVER_V6,
        11,
        UDP_PAYLOAD,
    );
    std::thread::sleep(Duration::from_millis(200));

    let expected = [
        (
            GuardedLink::PEER_V4,
            25 + 7,
            25 * UDP4_FRAME + 7 * PING4_FRAME,
        ),
        (GuardedLink::PEER_V4_SECOND, 5, 5 * UDP4_FRAME),
        (GuardedLink::PEER_V6, 11, 11 * UDP6_FRAME),
    ];
    for (addr, packets, bytes) in expected {
        assert_eq!(
            source_counts(&daemon, addr),
            Some((packets, bytes)),
            "counts for {addr} via phantom-api"
        );
    }

    // The same numbers in /metrics, scraped from inside the daemon's namespace.
    let body = http_get(&link.server, "127.0.0.1:9469", "/metrics");
    for (addr, packets, bytes) in expected {
        assert_eq!(
            metric_value(
                &body,
                &format!("phantom_datapath_source_packets_total{{source=\"{addr}\"}}")
            ),
            Some(packets as f64),
            "{addr} packets in /metrics:\n{body}"
        );
        assert_eq!(
            metric_value(
                &body,
                &format!("phantom_datapath_source_bytes_total{{source=\"{addr}\"}}")
            ),
            Some(bytes as f64),
        );
    }
    let ipv4 = metric_value(
        &body,
        "phantom_datapath_packets_total{verdict=\"pass\",reason=\"ipv4\"}",
    );
    assert!(ipv4.is_some_and(|v| v >= 37.0), "verdict counter: {ipv4:?}");
    assert_eq!(
        metric_value(
            &body,
            "phantom_datapath_program_attached{program=\"xdp_guard\",kind=\"xdp\",interface=\"up0\",mode=\"native\"}"
        ),
        Some(1.0)
    );
    assert!(body.contains("phantom_build_info{version="));
    assert!(
        metric_value(
            &body,
            "phantom_admin_requests_total{module=\"datapath\",action=\"top_sources\",outcome=\"success\"}"
        )
        .is_some_and(|v| v >= 3.0),
        "admin request counter:\n{body}"
    );

    // `window` keeps only recent sources; counters add up.
    let mut client = daemon.client();
    let recent = client.ok("datapath", "top_sources", json!({"count": 2, "window": 60}));
    assert_eq!(recent["count"], 2);
    assert_eq!(recent["sources"][0]["address"], GuardedLink::PEER_V4);
    let counters = client.ok("datapath", "counters", json!({}));
    assert!(counters["totals"]["packets"].as_u64().unwrap() >= 48);
    assert_eq!(counters["totals"]["dropped"], 0);
}

/// Builds the bad frames: malformed JSON, truncated requests, wrong shapes, unknown targets,
/// bad parameters and binary junk. None contains a newline, so each is exactly one frame.
fn bad_frames(n: usize) -> Vec<Vec<u8>> {
    let valid = br#"{"module":"datapath","action":"top_sources","params":{"count":"5"}}"#;
    let fixed: Vec<&[u8]> = vec![
        b"{",
        b"}",
        b"null",
        b"[]",
        b"42",
        b"\"core\"",
        b"{}",
        br#"{"module":"core"}"#,
        br#"{"action":"server_status"}"#,
        br#"{"module":"","action":""}"#,
        br#"{"module":7,"action":"x"}"#,
        br#"{"module":"nope","action":"status"}"#,
        br#"{"module":"core","action":"nope"}"#,
        br#"{"module":"datapath","action":"status","params":[1,2]}"#,
        br#"{"module":"datapath","action":"status","params":"x"}"#,
        br#"{"module":"datapath","action":"status","params":{"bogus":1}}"#,
        br#"{"module":"datapath","action":"top_sources","params":{"count":"-1"}}"#,
        br#"{"module":"datapath","action":"top_sources","params":{"count":"lots"}}"#,
        br#"{"module":"datapath","action":"top_sources","params":{"count":1e400}}"#,
        br#"{"module":"datapath","action":"top_sources","params":{"window":{"a":1}}}"#,
        br#"{"module":"core","action":"service_logs","params":{"lines":99999999999999999999}}"#,
        b"\xff\xfe\x00\x01garbage",
        b"{\"module\":\"core\",\"action\":\"server_status\"\x00}",
    ];
    let mut frames: Vec<Vec<u8>> = fixed.iter().map(|f| f.to_vec()).collect();
    // Deeply nested JSON (beyond serde_json's recursion limit).
    frames.push(format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes());
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    while frames.len() < n {
        let r = next();
        let frame = match r % 4 {
            // A valid request cut short.
            0 => valid[..(1 + (r >> 8) as usize % (valid.len() - 1))].to_vec(),
            // Random bytes without newlines, never only whitespace.
            1 => {
                let len = 1 + (r >> 8) as usize % 300;
                let mut f: Vec<u8> = (0..len).map(|_| (next() % 256) as u8).collect();
                f.retain(|b| *b != b'\n');
                f.push(b'#');
                f
            }
            // Unknown module/action names, some long and odd.
            2 => format!(
                r#"{{"module":"m{}","action":"{}"}}"#,
                r % 1000,
                "a".repeat((r >> 16) as usize % 200)
            )
            .into_bytes(),
            // A known action with a parameter of the wrong type.
            _ => format!(
                r#"{{"module":"datapath","action":"top_sources","params":{{"count":"{}x"}}}}"#,
                r % 97
            )
            .into_bytes(),
        };
        frames.push(frame);
    }
    frames
}

#[test]
fn a_thousand_bad_frames_get_errors_and_the_daemon_keeps_serving() {
    if !require_root("a_thousand_bad_frames_get_errors_and_the_daemon_keeps_serving") {
        return;
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let mut daemon = start(&link, &bpffs);

    const OVERSIZED: usize = 10;
    let frames = bad_frames(1000 - OVERSIZED);
    let mut client = daemon.client();
    for (i, frame) in frames.iter().enumerate() {
        let mut bytes = frame.clone();
        bytes.push(b'\n');
        let line = client.send_raw(&bytes).unwrap_or_else(|| {
            panic!(
                "no reply to frame {i}: {:?}",
                String::from_utf8_lossy(frame)
            )
        });
        let reply: Value = serde_json::from_str(&line).expect("reply is JSON");
        assert_eq!(
            reply["success"],
            false,
            "frame {i} accepted: {}",
            String::from_utf8_lossy(frame)
        );
        let code = reply["code"].as_str().unwrap_or_default();
        assert!(
            !code.is_empty() && code.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
            "frame {i}: code {code:?}"
        );
        assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()));
        assert!(reply["metadata"]["timestamp"].as_str().is_some());
    }
    // The same connection still answers a correct request.
    let ok = client.call("core", "server_status", json!({}));
    assert_eq!(ok["success"], true, "{ok}");

    // Oversized frames: an error reply, then a clean close.
    for _ in 0..OVERSIZED {
        let mut big = daemon.client();
        let mut frame = br#"{"module":"core","action":"server_status","params":{"pad":""#.to_vec();
        frame.extend(std::iter::repeat_n(b'x', 1024 * 1024 + 10));
        frame.extend_from_slice(b"\"}}\n");
        let line = big.send_raw(&frame).expect("a reply before the close");
        let reply: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(reply["code"], "FRAME_TOO_LARGE");
        assert_eq!(
            big.read_line(),
            None,
            "connection closed after an oversized frame"
        );
    }

    assert!(daemon.is_running(), "daemon died:\n{}", daemon.log());
    let mut fresh = daemon.client();
    assert_eq!(fresh.call("datapath", "status", json!({}))["success"], true);
    let body = http_get(&link.server, "127.0.0.1:9469", "/metrics");
    let errors = metric_value(
        &body,
        "phantom_admin_requests_total{module=\"unknown\",action=\"unknown\",outcome=\"error\"}",
    )
    .unwrap_or(0.0);
    assert!(errors >= 500.0, "unknown-target errors counted: {errors}");
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
}

#[test]
fn restarts_keep_counts_and_exactly_one_attachment() {
    if !require_root("restarts_keep_counts_and_exactly_one_attachment") {
        return;
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let mut daemon = start(&link, &bpffs);
    assert_eq!(link.xdp_attachments().len(), 1);

    link.send_udp(
        GuardedLink::PEER_V4,
        GuardedLink::SERVER_V4,
        10,
        UDP_PAYLOAD,
    );
    assert_eq!(
        source_counts(&daemon, GuardedLink::PEER_V4),
        Some((10, 10 * UDP4_FRAME))
    );

    // Clean stop: the guard is detached, the maps stay pinned.
    assert!(daemon.stop().success(), "{}", daemon.log());
    assert!(
        link.xdp_attachments().is_empty(),
        "guard detached on SIGTERM"
    );
    let pinned = bpffs.entries();
    assert!(pinned.contains(&"PH_SOURCES".to_string()), "{pinned:?}");
    assert!(
        !pinned.iter().any(|e| e.starts_with("link_")),
        "no pinned link after SIGTERM: {pinned:?}"
    );

    daemon.restart();
    assert_eq!(link.xdp_attachments().len(), 1);
    link.send_udp(GuardedLink::PEER_V4, GuardedLink::SERVER_V4, 5, UDP_PAYLOAD);
    assert_eq!(
        source_counts(&daemon, GuardedLink::PEER_V4),
        Some((15, 15 * UDP4_FRAME))
    );

    // kill -9: the pinned guard keeps counting while the daemon is down...
    daemon.kill9();
    assert_eq!(link.xdp_attachments().len(), 1, "guard survives a crash");
    link.send_udp(GuardedLink::PEER_V4, GuardedLink::SERVER_V4, 3, UDP_PAYLOAD);
    // ...and the next start adopts it instead of attaching a second time.
    daemon.restart();
    let attachments = link.xdp_attachments();
    assert_eq!(attachments.len(), 1, "{attachments:?}");
    assert!(daemon.log().contains("adopted the pinned link"));
    link.send_udp(GuardedLink::PEER_V4, GuardedLink::SERVER_V4, 2, UDP_PAYLOAD);
    assert_eq!(
        source_counts(&daemon, GuardedLink::PEER_V4),
        Some((20, 20 * UDP4_FRAME))
    );
    let links: Vec<String> = bpffs
        .entries()
        .into_iter()
        .filter(|e| e.starts_with("link_"))
        .collect();
    assert_eq!(links, vec!["link_xdp_guard"], "one pinned link");

    // The datapath reports the same single attachment.
    let status = daemon.client().ok("datapath", "status", json!({}));
    let programs = status["programs"].as_array().unwrap();
    assert_eq!(programs.len(), 1);
    assert_eq!(programs[0]["interface"], GuardedLink::SERVER_DEV);
    assert_eq!(programs[0]["mode"], "native");

    assert!(daemon.stop().success());
    assert!(link.xdp_attachments().is_empty());
}

#[test]
fn phantom_api_cli_lists_modules_and_returns_envelopes() {
    if !require_root("phantom_api_cli_lists_modules_and_returns_envelopes") {
        return;
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let daemon = start(&link, &bpffs);
    let socket = daemon.socket();

    let (code, _, help) = phantom_api(&socket, &["--help"]);
    assert_eq!(code, 0);
    for word in [
        "core",
        "datapath",
        "server_status",
        "top_sources",
        "counters",
        "status",
    ] {
        assert!(help.contains(word), "--help lacks {word}:\n{help}");
    }
    let (code, _, help) = phantom_api(&socket, &["datapath", "--help"]);
    assert_eq!(code, 0);
    assert!(help.contains("count=<integer 1..=10000>"), "{help}");

    for (module, action) in [("core", "server_status"), ("datapath", "status")] {
        let (code, reply, out) = phantom_api(&socket, &[module, action]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(reply["success"], true);
        assert_eq!(reply["metadata"]["module"], module);
        assert_eq!(reply["metadata"]["action"], action);
        assert_eq!(reply["metadata"]["version"], env!("CARGO_PKG_VERSION"));
        let ts = reply["metadata"]["timestamp"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.len() == 20, "RFC 3339 UTC: {ts}");
    }
    let (_, status, _) = phantom_api(&socket, &["core", "server_status", "--pretty"]);
    let data = &status["data"];
    assert_eq!(data["service"]["running"], true);
    assert_eq!(data["service"]["pid"], daemon.pid().unwrap().to_string());
    assert_eq!(data["datapath"]["programs"][0]["program"], "xdp_guard");
    assert_eq!(data["configuration"]["port"], 51820);

    let (code, reply, _) = phantom_api(&socket, &["core", "nope"]);
    assert_ne!(code, 0);
    assert_eq!(reply["success"], false);
    assert_eq!(reply["code"], "UNKNOWN_ACTION");
    let (code, reply, _) = phantom_api(&socket, &["datapath", "top_sources", "count=0"]);
    assert_ne!(code, 0);
    assert_eq!(reply["code"], "INVALID_PARAMETER");
    let (code, reply, _) = phantom_api(&socket, &["core", "service_logs", "lines=5"]);
    assert_eq!(code, 0);
    assert!(
        reply["data"]["logs"]
            .as_array()
            .is_some_and(|l| !l.is_empty() && l.len() <= 5)
    );

    let missing = daemon.dir().join("missing.sock");
    let (code, reply, _) = phantom_api(&missing, &["core", "server_status"]);
    assert_eq!(code, 3);
    assert_eq!(reply["code"], "DAEMON_UNREACHABLE");
}

#[test]
fn socket_refuses_unprivileged_peers() {
    if !require_root("socket_refuses_unprivileged_peers") {
        return;
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let daemon = start(&link, &bpffs);
    let socket = daemon.socket();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // Open the file mode so that only SO_PEERCRED stands between `nobody` and the daemon.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let cli = daemon.dir().join("phantom-api");
    std::fs::copy(phantom_tests::bin_dir().join("phantom-api"), &cli).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&cli)
        .arg("--socket")
        .arg(&socket)
        .args(["core", "server_status"])
        .output()
        .unwrap();
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(
        reply["code"],
        "PERMISSION_DENIED",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(out.status.code(), Some(0));
}

#[test]
fn sighup_reloads_and_rejects_a_broken_config() {
    if !require_root("sighup_reloads_and_rejects_a_broken_config") {
        return;
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let daemon = start(&link, &bpffs);
    daemon.edit_config("level = \"info\"", "level = \"debug\"");
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for_log(&daemon, "SIGHUP: configuration reloaded");

    std::fs::write(daemon.config_path(), "this is = not [valid toml").unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for_log(&daemon, "configuration rejected, keeping the running one");
    assert_eq!(
        daemon.client().call("core", "server_status", json!({}))["success"],
        true
    );
}

fn wait_for_log(daemon: &Daemon, needle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !daemon.log().contains(needle) {
        assert!(
            std::time::Instant::now() < deadline,
            "log lacks {needle:?}:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

//! `admin`: one action of the real daemon over its admin socket and over the HTTPS admin API,
//! interleaved in the same run: the latency HTTPS adds (TLS, HTTP, allowlist, rate limits and
//! token verification) on a kept-alive connection, each side one request at a time.

use std::time::Instant;

use phantom_tests::{
    ApiClient, BpffsDir, Daemon, DaemonConfig, NetNs, mint_token,
    wstunnel::{WstunnelOptions, connect_tls},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    BoxError, Cli,
    report::{percentile, table},
};

const ADMIN: &str = "127.0.0.1:9443";
/// A small action that touches no disk and no kernel: what the transport costs shows.
const MODULE: &str = "dns";
const ACTION: &str = "get_dns_servers";

/// One request on a kept-alive TLS connection; the reply's status.
async fn https_call<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    tls: &mut S,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> Result<u16, BoxError> {
    tls.write_all(request).await?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tls.read(&mut chunk).await?;
        if n == 0 {
            return Err("connection closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or("no content-length")?;
        if buf.len() >= end + 4 + length {
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            return Ok(status);
        }
    }
}

pub fn run(cli: &Cli) -> Result<(), BoxError> {
    let ns = NetNs::new("phbench-admin");
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new("lo", bpffs.path());
    config.datapath_enabled = false;
    config.metrics_listen = "off".into();
    config.admin_extra = format!(
        "http_listen = {ADMIN:?}\nhttp_rate_per_token = 100000000\nhttp_rate_per_source = 100000000\n"
    );
    let daemon = Daemon::start(&ns, &config);
    let token = mint_token(&daemon, "bench", "read", "1h");
    let per_round = cli.admin_calls;
    let rounds = cli.admin_rounds;
    let socket_path = daemon.socket();
    let (socket, https) = ns.run(move || -> Result<(Vec<f64>, Vec<f64>), BoxError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut client = ApiClient::connect(&socket_path);
        let request = format!(
            "POST /api/v1/{MODULE}/{ACTION} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
        )
        .into_bytes();
        let opts = WstunnelOptions::new(ADMIN.parse()?, "localhost", "");
        let mut tls = rt.block_on(connect_tls(&opts))?;
        let mut buf = Vec::new();
        let (mut socket, mut https) = (Vec::new(), Vec::new());
        // Warm-up, then interleaved rounds: both sides see the same machine at the same time.
        for _ in 0..100 {
            client.ok(MODULE, ACTION, serde_json::json!({}));
            rt.block_on(https_call(&mut tls, &request, &mut buf))?;
        }
        for _ in 0..rounds {
            for _ in 0..per_round {
                let started = Instant::now();
                client.ok(MODULE, ACTION, serde_json::json!({}));
                socket.push(started.elapsed().as_secs_f64() * 1e3);
            }
            for _ in 0..per_round {
                let started = Instant::now();
                let status = rt.block_on(https_call(&mut tls, &request, &mut buf))?;
                https.push(started.elapsed().as_secs_f64() * 1e3);
                if status != 200 {
                    return Err(format!("HTTPS answered {status}").into());
                }
            }
        }
        Ok((socket, https))
    })?;
    let (mut socket, mut https) = (socket, https);
    let (s50, h50) = (percentile(&mut socket, 0.5), percentile(&mut https, 0.5));
    let (s99, h99) = (percentile(&mut socket, 0.99), percentile(&mut https, 0.99));
    table(
        "Admin API: the same action over the socket and over HTTPS",
        &format!(
            "`{MODULE} {ACTION}` on the real daemon, {} calls per transport in {rounds} interleaved rounds after 100 warm-up calls each, one at a time on a kept-alive connection (HTTPS: TLS 1.3, bearer token, allowlist and rate limits)",
            per_round * rounds
        ),
        "| measure | socket | HTTPS | added | target |\n| --- | ---: | ---: | ---: | ---: |",
        &[
            format!(
                "| p50 | {s50:.3} ms | {h50:.3} ms | {:.3} ms | added <= 1 ms |",
                h50 - s50
            ),
            format!(
                "| p99 | {s99:.3} ms | {h99:.3} ms | {:.3} ms | — |",
                h99 - s99
            ),
        ],
    );
    drop(daemon);
    Ok(())
}

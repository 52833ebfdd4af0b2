//! `sentry-page`: the sentry's challenge page in headless Chromium against the real daemon.
//! Hashes per second of the page's workers (pure-JS and WebCrypto SHA-256, one worker and
//! one per CPU) beside the Rust reference solver on the same machine; the time from the first
//! byte of the 429 to the upstream's content per difficulty; the page's weight.
//!
//! Every visit comes from a fresh source, so none holds a ticket: the namespace's loopback
//! carries 127.0.0.10 and up, and a browser that opens http://127.0.0.N connects from
//! 127.0.0.N (loopback, so a secure context: WebCrypto is there).

use std::time::{Duration, Instant};

use fantoccini::{Client, Locator};
use phantom_daemon::{
    sentry::{
        challenge::{Signer, decode_payload},
        solver,
    },
    source::Source,
};
use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, NetNs, UpstreamSite, api, browser::Browser, http_from,
    wstunnel::block_on_in,
};
use serde_json::Value;

use crate::{
    BoxError, Cli,
    report::{percentile, table},
};

const PORT: u16 = 18080;

/// Source addresses: one per visit.
struct Sources {
    next: u8,
}

impl Sources {
    /// A fresh source over the static threshold (2 requests, `ip_static_threshold` = 1).
    fn fresh(&mut self, ns: &NetNs) -> Result<String, BoxError> {
        let ip = format!("127.0.0.{}", self.next);
        self.next = self.next.checked_add(1).ok_or("out of source addresses")?;
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
        for _ in 0..2 {
            http_from(
                ns,
                &ip,
                &format!("{ip}:{PORT}"),
                "GET /warm-up",
                &[],
                b"",
                Duration::from_secs(5),
            )?;
        }
        Ok(ip)
    }
}

fn difficulty(daemon: &Daemon, bits: u32) {
    api(
        daemon,
        &[
            "sentry",
            "set_config",
            &format!("base_difficulty={bits}"),
            &format!("max_difficulty={bits}"),
        ],
    );
}

async fn attr(c: &Client, id: &str, name: &str) -> Option<String> {
    c.find(Locator::Id(id)).await.ok()?.attr(name).await.ok()?
}

/// The page's workers' rate (candidates per second) over `seconds`, at a difficulty they do
/// not finish.
async fn rate(c: &Client, url: &str, seconds: u64) -> Result<f64, BoxError> {
    c.goto(url).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while attr(c, "sentry", "data-rate").await.is_none() {
        if Instant::now() > deadline {
            return Err(format!("{url}: the page never reported a rate").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let rate = attr(c, "sentry", "data-rate")
        .await
        .and_then(|r| r.parse().ok())
        .ok_or("no rate")?;
    c.goto("about:blank").await?;
    Ok(rate)
}

/// One visit: from the 429's first byte to the upstream's content (ms), and the page's record.
async fn visit(c: &Client, url: &str, path: &str) -> Result<(f64, Value), BoxError> {
    c.goto(url).await?;
    let want = format!("{} {path} ", UpstreamSite::BODY_PREFIX);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = c
            .execute(
                "return document.body ? document.body.innerText : ''",
                vec![],
            )
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        if text.contains(&want) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{url}: never reached the upstream ({text:?})").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = c
        .execute(
            "const n = performance.getEntriesByType('navigation')[0]; \
             return [performance.timeOrigin + n.responseEnd, sessionStorage.getItem('sentry-challenge')]",
            vec![],
        )
        .await?;
    let arrived = v[0].as_f64().ok_or("no navigation timing")?;
    let record: Value = serde_json::from_str(
        v[1].as_str()
            .ok_or_else(|| format!("{url}: reached the upstream without a challenge"))?,
    )?;
    let first_byte = record["first_byte_at"]
        .as_f64()
        .ok_or("no first byte time")?;
    Ok((arrived - first_byte, record))
}

/// The Rust reference solver's candidates per second (one thread).
fn rust_rate() -> Result<f64, BoxError> {
    let signer = Signer::generate()?;
    let subject: Source = "127.0.0.1".parse()?;
    let (mut hashes, t) = (0u64, Instant::now());
    while t.elapsed() < Duration::from_secs(3) {
        let p = signer.issue(subject, 22, 300, b"x", 1_000)?;
        hashes += solver::solve(&decode_payload(&p)?)?.hashes;
    }
    Ok(hashes as f64 / t.elapsed().as_secs_f64())
}

pub fn run(cli: &Cli) -> Result<(), BoxError> {
    let ns = NetNs::new("phbench-page");
    let _site = UpstreamSite::start(&ns, "127.0.0.1:18000");
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new("lo", bpffs.path());
    config.datapath_enabled = false;
    config.metrics_listen = "off".into();
    config.extra_toml = format!(
        "[sentry]\nenabled = true\nlisten = \"0.0.0.0:{PORT}\"\nupstream = \"http://127.0.0.1:18000\"\n\
         activation_cpu_threshold = 0.0\nip_static_threshold = 1\nhard_block_after = 1000\n\
         calm_seconds = 86400\n"
    );
    let daemon = Daemon::start(&ns, &config);
    api(&daemon, &["sentry", "set_mode", "mode=DEFCON_1"]);
    let mut sources = Sources { next: 10 };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());

    // Page weight: the 429 as a browser gets it, and its files.
    let ip = sources.fresh(&ns)?;
    let page = http_from(
        &ns,
        &ip,
        &format!("{ip}:{PORT}"),
        "GET /weight?q=1",
        &[],
        b"",
        Duration::from_secs(5),
    )?;
    let mut files = Vec::new();
    for part in page.body.split("/.sentry/static/").skip(1) {
        let path = format!(
            "/.sentry/static/{}",
            part.split('"').next().ok_or("no path")?
        );
        let body = http_from(
            &ns,
            &ip,
            &format!("{ip}:{PORT}"),
            &format!("GET {path}"),
            &[],
            b"",
            Duration::from_secs(5),
        )?
        .body;
        let name = path.rsplit('/').next().unwrap_or("").to_string();
        files.push((name, body.len()));
    }
    // The worker, loaded by the script rather than the page.
    let worker = page
        .body
        .split("/.sentry/static/")
        .nth(1)
        .and_then(|p| p.split('/').next())
        .map(|v| format!("/.sentry/static/{v}/worker.js"))
        .ok_or("no version")?;
    let worker_len = http_from(
        &ns,
        &ip,
        &format!("{ip}:{PORT}"),
        &format!("GET {worker}"),
        &[],
        b"",
        Duration::from_secs(5),
    )?
    .body
    .len();
    files.push(("worker.js".into(), worker_len));

    let seconds = cli.page_seconds;
    let runs = cli.page_runs;
    let browser = Browser::start(&ns);
    let (rates, latencies) = block_on_in(&ns, || async {
        let c = browser.session(1000, 700).await;
        // Rates at 30 bits (minutes of work: never finished within the window).
        difficulty(&daemon, 30);
        let mut rates = Vec::new();
        for (sha, label) in [("js", "pure-JS"), ("webcrypto", "WebCrypto")] {
            for workers in [1, cpus] {
                let ip = sources.fresh(&ns)?;
                let r = rate(
                    &c,
                    &format!("http://{ip}:{PORT}/rate#sentry-sha={sha}&sentry-workers={workers}"),
                    seconds,
                )
                .await?;
                rates.push((label, workers, r));
            }
        }
        let mut latencies = Vec::new();
        for bits in [16u32, 18, 20] {
            difficulty(&daemon, bits);
            let (mut total, mut solve, mut tried) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..runs {
                let ip = sources.fresh(&ns)?;
                let path = format!("/article?bits={bits}&run={i}");
                let (ms, rec) = visit(&c, &format!("http://{ip}:{PORT}{path}"), &path).await?;
                total.push(ms);
                solve.push(rec["solve_ms"].as_f64().unwrap_or(0.0));
                tried.push(rec["tried"].as_f64().unwrap_or(0.0));
            }
            latencies.push((bits, total, solve, tried));
        }
        c.close().await?;
        Ok::<_, BoxError>((rates, latencies))
    })?;
    drop(browser);
    let rust = rust_rate()?;

    let html = page.body.len();
    let mut rows = vec![format!("| the HTML 429 (with its package) | {html} |")];
    rows.extend(files.iter().map(|(n, l)| format!("| `{n}` | {l} |")));
    let total: usize = html + files.iter().map(|(_, l)| l).sum::<usize>();
    rows.push(format!("| **total** (target <= 24,576) | **{total}** |"));
    table(
        "Challenge page: weight",
        "the 429 page as Chromium gets it (no Accept-Language: English) and every file it loads, uncompressed; no request leaves the origin",
        "| part | bytes |\n| --- | ---: |",
        &rows,
    );

    let mut rows: Vec<String> = rates
        .iter()
        .map(|(label, workers, r)| {
            format!("| page, {label} SHA-256 | {workers} | {:.3} |", r / 1e6)
        })
        .collect();
    rows.push(format!(
        "| Rust reference solver (`solver::solve`, release build) | 1 | {:.3} |",
        rust / 1e6
    ));
    table(
        "Challenge page: candidates per second in headless Chromium",
        &format!(
            "the page opened from a fresh loopback source (a secure context) at 30 bits, the SHA-256 and the number of workers chosen by the page's fragment knobs; the rate the page shows after {seconds} s (candidates since the search began over the elapsed time; one candidate is two SHA-256). The Rust solver on the same machine right after, one thread, 3 s of 22-bit packages"
        ),
        "| solver | workers | M candidates/s |\n| --- | ---: | ---: |",
        &rows,
    );

    let rows: Vec<String> = latencies
        .into_iter()
        .map(|(bits, mut total, mut solve, mut tried)| {
            format!(
                "| {bits} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
                (1u64 << (bits - 1)) as f64,
                percentile(&mut tried, 0.5),
                percentile(&mut solve, 0.5),
                percentile(&mut total, 0.5),
                percentile(&mut total, 1.0),
                if bits == 16 { "<= 3,000" } else { "—" },
            )
        })
        .collect();
    table(
        "Challenge page: from the 429 to the upstream's content",
        &format!(
            "{runs} visits per difficulty, each from a fresh loopback source (no ticket) in DEFCON_1, the page's defaults ({cpus} workers, pure-JS SHA-256, WebCrypto signature and AES-GCM); from the 429's first byte (navigation timing of the challenge page) to the end of the upstream's answer (navigation timing of the page it continued to)"
        ),
        "| difficulty (bits) | expected candidates | median candidates | median solve ms | median ms to content | max ms | target (median) |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        &rows,
    );
    drop(daemon);
    Ok(())
}

//! `phantom-bench sentry`: the sentry's speed targets, every row of a table from one run.
//!
//! - Proxy throughput and latency: wrk against the upstream directly, then through the sentry
//!   proxy on the embedded store, then on a private redis-server (the harness's `RedisServer`),
//!   then through nginx when there is one (all on loopback).
//! - Challenge issue and proof verification per core (one thread).
//! - The reference solver's time per difficulty.

use std::{
    convert::Infallible,
    net::SocketAddr,
    process::Command,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use phantom_daemon::{
    config::{SentryConfig, Tunables},
    sentry::{
        Sentry,
        challenge::{Authenticated, Proof, Signer, decode_payload, package_digest},
        proxy, solver,
        store::{Store, embedded::EmbeddedStore, redis::RedisStore, unix_now},
    },
};

use phantom_daemon::source::{Source, SourcePrefix};
use phantom_tests::RedisServer;

use crate::{
    BoxError, Cli,
    report::{cpu_seconds, cpu_seconds_of, table},
};

const BODY: &[u8] = &[b'x'; 1024];

/// A minimal hyper site: 200 with a 1 KiB body, after `service_time` (an application's own
/// wait, e.g. a database query; zero = a static file). It runs on `site`, a runtime of its own
/// (threads and timer), as a separate server process would: sharing the proxy's runtime would
/// let each delay the other's tasks and timers and charge that to the proxy.
fn upstream(
    site: &tokio::runtime::Runtime,
    service_time: Duration,
) -> Result<SocketAddr, BoxError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    site.spawn(async move {
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
            return;
        };
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(move |_req: Request<Incoming>| async move {
                    if !service_time.is_zero() {
                        // A precise wait, not tokio's millisecond timer wheel: that one
                        // releases every pending answer on the same tick, so a closed-loop
                        // client's requests all arrive (and leave) in tick-aligned bursts,
                        // which no real application produces and which any proxy in between
                        // then has to queue.
                        let _ = tokio::task::spawn_blocking(move || {
                            std::thread::sleep(service_time);
                        })
                        .await;
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(BODY))))
                });
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn start_proxy(
    config: SentryConfig,
    store: Store,
) -> Result<(SocketAddr, Arc<Sentry>), BoxError> {
    let sentry = Sentry::with_parts(
        &config,
        store,
        Signer::generate()?,
        None,
        SourcePrefix::DEFAULT,
    )
    .await?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    // Keep the sender for the life of the process: the proxy runs until the bench exits.
    std::mem::forget(tx);
    tokio::spawn(Arc::clone(&sentry).run(rx.clone()));
    let addr = free_loopback_port()?;
    proxy::serve(addr, Arc::clone(&sentry), rx).await?;
    Ok((addr, sentry))
}

/// A loopback address whose port was free a moment ago, for a server that binds by itself.
fn free_loopback_port() -> Result<SocketAddr, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// One wrk run: (requests/s, p50 ms, p99 ms, requests); every answer must be 2xx.
fn wrk(addr: SocketAddr, seconds: u32, connections: u32) -> Result<(f64, f64, f64, f64), BoxError> {
    wrk_answers(addr, seconds, connections, true)
}

/// One wrk run; with `only_2xx`, a non-2xx answer is an error.
fn wrk_answers(
    addr: SocketAddr,
    seconds: u32,
    connections: u32,
    only_2xx: bool,
) -> Result<(f64, f64, f64, f64), BoxError> {
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            &format!("http://{addr}/"),
        ])
        .output()
        .map_err(|e| format!("cannot run wrk (scripts/bootstrap.sh installs it): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |prefix: &str| -> Option<String> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string()))
    };
    let ms = |v: &str| -> Option<f64> {
        let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = num.parse().ok()?;
        Some(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => return None,
        })
    };
    let rps: f64 = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no Requests/sec in wrk output: {text}"))?;
    let p50 = field("50%").and_then(|v| ms(&v)).ok_or("no p50")?;
    let p99 = field("99%").and_then(|v| ms(&v)).ok_or("no p99")?;
    let requests: f64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    if only_2xx && text.contains("Non-2xx") {
        return Err(format!("wrk saw non-2xx answers: {text}").into());
    }
    Ok((rps, p50, p99, requests))
}

/// The 1-minute load average (/proc/loadavg), to print next to figures from a shared machine.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// The `stat` files of this process's sentry proxy threads (named `sentry-proxy-<n>`), in the
/// order they were started.
fn proxy_thread_stats() -> Vec<String> {
    let mut tids: Vec<u32> = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    tids.retain(|t| {
        std::fs::read_to_string(format!("/proc/self/task/{t}/comm"))
            .is_ok_and(|c| c.starts_with("sentry-proxy"))
    });
    tids.sort_unstable();
    tids.into_iter()
        .map(|t| format!("/proc/self/task/{t}/stat"))
        .collect()
}

/// CPU seconds so far of the processes or threads whose `stat` files are `stats`.
fn cpu_of(stats: &[String]) -> f64 {
    stats.iter().map(|s| cpu_seconds_of(s)).sum()
}

/// Calls of one command so far on `redis` (INFO commandstats, through redis-cli).
fn redis_calls(redis: &RedisServer, command: &str) -> f64 {
    Command::new("redis-cli")
        .arg("-s")
        .arg(redis.socket())
        .args(["INFO", "commandstats"])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
                l.strip_prefix(&format!("cmdstat_{command}:calls="))
                    .and_then(|r| r.split(',').next())
                    .and_then(|n| n.parse().ok())
            })
        })
        .unwrap_or(0.0)
}

/// Commands of every kind so far on `redis` (INFO commandstats, through redis-cli).
fn redis_commands(redis: &RedisServer) -> f64 {
    Command::new("redis-cli")
        .arg("-s")
        .arg(redis.socket())
        .args(["INFO", "commandstats"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info:"))
                .filter_map(|l| {
                    l.split_once(":calls=")
                        .and_then(|(_, r)| r.split(',').next())
                        .and_then(|n| n.parse::<f64>().ok())
                })
                .sum()
        })
        .unwrap_or(0.0)
}

/// The redis-server's process id, for its CPU time.
fn redis_pid(redis: &RedisServer) -> Result<u32, BoxError> {
    Ok(redis.pid().ok_or("redis-server is not running")?)
}

/// nginx as a plain reverse proxy in the sentry's place: the field's reference for what one
/// HTTP hop costs on this machine. Found through `PHANTOM_BENCH_NGINX` (scripts/bench.sh
/// unpacks the distribution's package privately) or on PATH; the row is left out without it.
struct Nginx {
    child: std::process::Child,
    /// Configuration, pid, logs and temp paths; removed once nginx is down.
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl Nginx {
    fn binary() -> Option<std::path::PathBuf> {
        if let Some(p) = std::env::var_os("PHANTOM_BENCH_NGINX") {
            return Some(p.into());
        }
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("nginx"))
                .find(|p| p.is_file())
        })
    }

    fn start(binary: &std::path::Path, upstream: SocketAddr, tag: &str) -> Result<Self, BoxError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("phantom-bench-nginx-{tag}-"))
            .tempdir()?;
        let addr = free_loopback_port()?;
        let d = dir.path().display();
        // As many workers as the sentry's runtime has threads; keep-alive to the upstream
        // like the sentry's connection pool; no access log (the sentry writes none per
        // request either).
        let conf = format!(
            "user root root;\nworker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 4096; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body;\n \
             proxy_temp_path {d}/proxy;\n fastcgi_temp_path {d}/fastcgi;\n \
             uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n \
             upstream site {{ server {upstream}; keepalive 256; }}\n \
             server {{\n  listen {addr};\n  location / {{\n   proxy_pass http://site;\n   \
             proxy_http_version 1.1;\n   proxy_set_header Connection \"\";\n   \
             proxy_set_header X-Forwarded-For $remote_addr;\n  }}\n }}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf)?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let nginx = Self { child, dir, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(nginx.dir.path().join("error.log")).unwrap_or_default();
                return Err(format!("nginx did not start: {log}").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }

    /// The `stat` files of the master and its workers.
    fn stats(&self) -> Vec<String> {
        let pid = self.child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        std::iter::once(pid.to_string())
            .chain(children.split_whitespace().map(str::to_string))
            .map(|p| format!("/proc/{p}/stat"))
            .collect()
    }

    fn version(binary: &std::path::Path) -> String {
        Command::new(binary)
            .arg("-v")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stderr)
                    .trim()
                    .replace("nginx version: ", "")
            })
            .unwrap_or_else(|_| "nginx".into())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The master takes its workers down on SIGTERM; SIGKILL would leave them behind.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// `n` packages from `issuer` for `subject`, solved: the proofs a client would post.
fn solved_proofs(
    issuer: &Signer,
    subject: Source,
    difficulty: u32,
    n: usize,
    now: u64,
) -> Result<Vec<Proof>, BoxError> {
    (0..n)
        .map(|_| {
            let p = issuer.issue(subject, difficulty, 300, b"<p>Verified.</p>", now)?;
            let solved = solver::solve(&decode_payload(&p)?)?;
            Ok(Proof {
                payload: p.payload,
                signature: p.signature,
                pow_nonce: solved.pow_nonce,
                kid: p.kid,
            })
        })
        .collect()
}

/// Proofs of packages another host issued and recorded in the shared Redis, verified the way
/// the proof endpoint does on a host that did not issue them: (proofs/s on one runtime thread,
/// this thread's CPU µs per proof, redis-server's CPU µs per proof).
fn fleet_verification(issuer: &Signer, redis: &RedisServer) -> Result<(f64, f64, f64), BoxError> {
    const PROOFS: usize = 60_000;
    const IN_FLIGHT: usize = 64;
    let subject: Source = "198.51.100.1".parse()?;
    let now = unix_now();
    // Difficulty 1: solving is not what is measured.
    let proofs = solved_proofs(issuer, subject, 1, PROOFS, now)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = Arc::new(Store::Redis(RedisStore::connect(&redis.url())?));
        // The issuing host's records, as its challenge path leaves them.
        for chunk in proofs.chunks(IN_FLIGHT) {
            let mut set = tokio::task::JoinSet::new();
            for p in chunk {
                let store = Arc::clone(&store);
                let digest = B64.encode(package_digest(&p.payload, &p.signature));
                set.spawn(async move { store.record_issued(&digest, 300).await });
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
        }
        let verifier = Arc::new(Signer::generate()?);
        verifier.learn_keys([issuer.own_jwk()]);
        let proofs = Arc::new(proofs);
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let redis_cpu = cpu_seconds(redis_pid(redis)?);
        let cpu = cpu_seconds_of("/proc/thread-self/stat");
        let started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..IN_FLIGHT {
            let (store, verifier, proofs, next) = (
                Arc::clone(&store),
                Arc::clone(&verifier),
                Arc::clone(&proofs),
                Arc::clone(&next),
            );
            set.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(proof) = proofs.get(i) else {
                        return Ok::<_, BoxError>(());
                    };
                    let digest = package_digest(&proof.payload, &proof.signature);
                    let vouched = if verifier.issued_here(&digest) {
                        Some(Authenticated::IssuedHere)
                    } else if store.issued_recorded(&B64.encode(digest)).await? {
                        Some(Authenticated::FleetRecord)
                    } else {
                        None
                    };
                    let (v, by) = verifier
                        .verify_vouched(proof, subject, now, vouched)
                        .map_err(|r| format!("verify: {}", r.code()))?;
                    if by != Authenticated::FleetRecord {
                        return Err(format!("authenticated by {}", by.name()).into());
                    }
                    if !store.use_nonce(&v.session_nonce, 300).await? {
                        return Err("nonce already used".into());
                    }
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        let took = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds_of("/proc/thread-self/stat") - cpu;
        let redis_cpu = cpu_seconds(redis_pid(redis)?) - redis_cpu;
        let n = PROOFS as f64;
        Ok((n / took, cpu / n * 1e6, redis_cpu / n * 1e6))
    })
}

/// Proof redemption as the proof endpoint does it (`Sentry::redeem`: the package recognised,
/// expiry, subject, commitment, the used-nonce record made durable, the ticket, its signed
/// cookie) against the real embedded store on disk, `IN_FLIGHT` proofs at a time on one
/// runtime thread. Returns (proofs/s, the process's CPU µs per proof — runtime thread,
/// journal writer and the kernel's share of the syncs —, proofs).
fn redemption_on_disk(seconds: f64) -> Result<(f64, f64, usize), BoxError> {
    const IN_FLIGHT: usize = 256;
    const PROOFS: usize = 120_000;
    // A directory on the disk the state directory would be on (not a tmpfs).
    let dir = tempfile::Builder::new()
        .prefix("phantom-bench-sentry-store-")
        .tempdir_in("/var/tmp")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let config = SentryConfig {
            enabled: true,
            ..SentryConfig::default()
        };
        let store = Store::Embedded(Box::new(EmbeddedStore::open(dir.path())?));
        let sentry = Sentry::with_parts(
            &config,
            store,
            Signer::generate()?,
            None,
            SourcePrefix::DEFAULT,
        )
        .await?;
        let peer: std::net::IpAddr = "198.51.100.1".parse()?;
        let now = unix_now();
        // Packages this host issued (difficulty 1: solving is not what is measured).
        let proofs = Arc::new(solved_proofs(
            &sentry.signer,
            sentry.source_of(peer),
            1,
            PROOFS,
            now,
        )?);
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let cpu = cpu_seconds(std::process::id());
        let started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..IN_FLIGHT {
            let (sentry, proofs, next) =
                (Arc::clone(&sentry), Arc::clone(&proofs), Arc::clone(&next));
            set.spawn(async move {
                let mut done = 0usize;
                while Instant::now() < deadline {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(proof) = proofs.get(i) else { break };
                    sentry
                        .redeem(peer, proof)
                        .await
                        .map_err(|e| format!("redeem: {e:?}"))?;
                    done += 1;
                }
                Ok::<_, BoxError>(done)
            });
        }
        let mut n = 0usize;
        while let Some(r) = set.join_next().await {
            n += r??;
        }
        let took = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds(std::process::id()) - cpu;
        Ok((n as f64 / took, cpu / n.max(1) as f64 * 1e6, n))
    })
}

/// The proxy on Redis in DEFCON_1 with every request over `ip_static_threshold`, so each one
/// is challenged (a package issued and recorded for the fleet) rather than passed: (answers/s,
/// share challenged, round trips per request counted by the store (a pipeline is one),
/// commands per request counted by redis-server).
fn redis_under_challenge(
    rt: &tokio::runtime::Runtime,
    site: &tokio::runtime::Runtime,
    redis: &RedisServer,
    seconds: u32,
) -> Result<(f64, f64, f64, f64), BoxError> {
    let up = upstream(site, Duration::ZERO)?;
    rt.block_on(async {
        let config = SentryConfig {
            enabled: true,
            upstream: format!("http://{up}"),
            redis_url: redis.url(),
            tunables: Tunables {
                activation_cpu_threshold: 0.0,
                ip_static_threshold: 1,
                // Challenged, never hard-blocked: the state being measured.
                hard_block_after: 1_000,
                ..Tunables::default()
            },
            ..SentryConfig::default()
        };
        let (addr, sentry) = start_proxy(
            config.clone(),
            Store::Redis(RedisStore::connect(&config.redis_url)?),
        )
        .await?;
        sentry
            .set_mode(phantom_daemon::sentry::Mode::Defcon1)
            .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let trips = sentry.store.round_trips();
        let commands = redis_commands(redis);
        let challenged = sentry.counters.challenged.load(Ordering::Relaxed);
        let (rps, _, _, requests) =
            tokio::task::spawn_blocking(move || wrk_answers(addr, seconds, 16, false)).await??;
        let trips = (sentry.store.round_trips() - trips) as f64;
        let commands = redis_commands(redis) - commands;
        let challenged = (sentry.counters.challenged.load(Ordering::Relaxed) - challenged) as f64;
        let requests = requests.max(1.0);
        // The per-second tick's own calls (config, state, whitelist, keys, counts) are in
        // the totals; they are a few per second against thousands of requests.
        Ok((
            rps,
            challenged / requests,
            trips / requests,
            commands / requests,
        ))
    })
}

fn per_second(seconds: f64, mut f: impl FnMut() -> Result<(), BoxError>) -> Result<f64, BoxError> {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        for _ in 0..64 {
            f()?;
        }
        n += 64;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// wrk figures: (requests/s, p50 ms, p99 ms, requests).
type WrkResult = (f64, f64, f64, f64);

/// Median of one figure over rounds.
fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Median of each figure over rounds.
fn median(runs: Vec<WrkResult>) -> WrkResult {
    let pick = |f: fn(&WrkResult) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    (pick(|r| r.0), pick(|r| r.1), pick(|r| r.2), pick(|r| r.3))
}

/// A scenario's rows, its Redis round trips per request, the requests challenged, and the
/// load average before and after.
type Scenario = (Vec<String>, f64, u64, (f64, f64));

/// One scenario: the upstream directly, through the proxy on the embedded store, through the
/// proxy on Redis with the gate forced open. Returns the rows and the Redis round trips per
/// request.
fn proxy_scenario(
    rt: &tokio::runtime::Runtime,
    site: &tokio::runtime::Runtime,
    redis: &RedisServer,
    service_time: Duration,
    seconds: u32,
    connections: u32,
    rounds: usize,
) -> Result<Scenario, BoxError> {
    let load_before = load_average();
    let up = upstream(site, service_time)?;
    let nginx = match Nginx::binary() {
        Some(bin) => Some((
            Nginx::start(&bin, up, &service_time.as_millis().to_string())?,
            Nginx::version(&bin),
        )),
        None => {
            eprintln!(
                "phantom-bench: no nginx (PHANTOM_BENCH_NGINX or PATH); scripts/bench.sh provides one. The nginx row is left out."
            );
            None
        }
    };
    let nginx_addr = nginx.as_ref().map(|(n, _)| n.addr);
    let nginx_stats = nginx.as_ref().map(|(n, _)| n.stats()).unwrap_or_default();
    let already = proxy_thread_stats();
    let (direct, embedded, on_redis, by_nginx, ticket_calls, embedded_sentry, cpu) =
        rt.block_on(async {
            let base = SentryConfig {
                enabled: true,
                upstream: format!("http://{up}"),
                tunables: Tunables {
                    // The state measured is NORMAL: each proxy sees traffic only during its own
                    // runs, and a faster proxy's bursts would otherwise cross the learned
                    // threshold and put it in DEFCON_1 (its requests then challenged).
                    sensitivity_factor: 100.0,
                    ..Tunables::default()
                },
                ..SentryConfig::default()
            };
            // NORMAL mode, the usual state.
            let (embedded_addr, embedded_sentry) = start_proxy(
                base.clone(),
                Store::Embedded(Box::new(EmbeddedStore::in_memory())),
            )
            .await?;
            // On Redis with the gate forced open, so every request takes the armed path: wrk's
            // one source is soon past the ticket ceiling, where the trust-ticket lookup decides
            // (a revocation), and its "no ticket" answer stands for a second
            // (docs/sentry.md, step 7).
            let armed = SentryConfig {
                redis_url: redis.url(),
                tunables: Tunables {
                    activation_cpu_threshold: 0.0,
                    ..base.tunables.clone()
                },
                ..base
            };
            let (redis_addr, _) = start_proxy(
                armed.clone(),
                Store::Redis(RedisStore::connect(&armed.redis_url)?),
            )
            .await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            // The proxies' threads: the embedded one's started first (lower ids), then the
            // Redis one's.
            let mut started = proxy_thread_stats();
            started.retain(|s| !already.contains(s));
            let redis_threads = started.split_off(started.len() / 2);
            let embedded_threads = started;
            // One wrk run, with the CPU seconds `stats` used during it per request (µs).
            let run = move |addr, stats: Vec<String>| {
                tokio::task::spawn_blocking(move || {
                    let cpu = cpu_of(&stats);
                    let r = wrk(addr, seconds, connections)?;
                    Ok::<_, BoxError>((r, (cpu_of(&stats) - cpu) / r.3.max(1.0) * 1e6))
                })
            };
            // Rounds interleave the three paths, so slow phases of a shared machine hit all
            // three alike; each figure is the median over the rounds.
            let (mut d, mut e, mut r, mut n) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut e_cpu, mut r_cpu, mut n_cpu) = (Vec::new(), Vec::new(), Vec::new());
            let mut ticket_calls = 0.0;
            for _ in 0..rounds {
                d.push(run(up, Vec::new()).await??.0);
                let (x, c) = run(embedded_addr, embedded_threads.clone()).await??;
                e.push(x);
                e_cpu.push(c);
                let before = redis_calls(redis, "ttl");
                let (x, c) = run(redis_addr, redis_threads.clone()).await??;
                r.push(x);
                r_cpu.push(c);
                ticket_calls += redis_calls(redis, "ttl") - before;
                if let Some(addr) = nginx_addr {
                    let (x, c) = run(addr, nginx_stats.clone()).await??;
                    n.push(x);
                    n_cpu.push(c);
                }
            }
            let cpu = (
                median_of(e_cpu),
                median_of(r_cpu),
                (!n_cpu.is_empty()).then(|| median_of(n_cpu)),
            );
            let requests: f64 = r.iter().map(|x| x.3).sum();
            let (direct, embedded, on_redis) = (median(d), median(e), median(r));
            let on_redis = (on_redis.0, on_redis.1, on_redis.2, requests);
            let by_nginx = (!n.is_empty()).then(|| median(n));
            Ok::<_, BoxError>((
                direct,
                embedded,
                on_redis,
                by_nginx,
                ticket_calls,
                embedded_sentry,
                cpu,
            ))
        })?;
    let challenged = embedded_sentry.counters.challenged.load(Ordering::Relaxed);
    let label = if service_time.is_zero() {
        "static 1 KiB upstream (CPU-bound)".to_string()
    } else {
        format!("upstream with {} ms service time", service_time.as_millis())
    };
    let row = |name: &str, r: WrkResult, cpu: Option<f64>| {
        format!(
            "| {label}, c={connections} | {name} | {:.0} | {:.0}% | {:.3} | {:.3} | {:+.3} | {} |",
            r.0,
            100.0 * r.0 / direct.0,
            r.1,
            r.2,
            r.2 - direct.2,
            cpu.map_or("—".to_string(), |c| format!("{c:.1}"))
        )
    };
    let mut rows = vec![
        row("upstream directly", direct, None),
        row("sentry proxy, embedded store", embedded, Some(cpu.0)),
        row("sentry proxy, Redis store, armed", on_redis, Some(cpu.1)),
    ];
    if let (Some(result), Some((_, version))) = (by_nginx, nginx.as_ref()) {
        rows.push(row(
            &format!("{version} reverse proxy (no defence; comparison)"),
            result,
            cpu.2,
        ));
    }
    Ok((
        rows,
        ticket_calls / on_redis.3.max(1.0),
        challenged,
        (load_before, load_average()),
    ))
}

pub fn run(cli: &Cli) -> Result<(), BoxError> {
    let seconds = cli.sentry_seconds;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let site = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-site")
        .enable_all()
        .build()?;
    let redis = RedisServer::start();
    let mut rows = Vec::new();
    let mut trips = Vec::new();
    let mut challenged = 0;
    let mut loads = Vec::new();
    for (service_time, connections) in [(Duration::ZERO, 16), (Duration::from_millis(5), 64)] {
        let (r, t, c, load) = proxy_scenario(
            &rt,
            &site,
            &redis,
            service_time,
            seconds,
            connections,
            cli.sentry_rounds.max(1),
        )?;
        rows.extend(r);
        trips.push(format!("{t:.3}"));
        challenged += c;
        loads.push(format!("{:.2} to {:.2}", load.0, load.1));
    }
    table(
        "Sentry proxy against the upstream directly (wrk, loopback)",
        &format!(
            "wrk -t1 -d{seconds}s --latency, median of {} interleaved rounds, against a hyper \
             upstream (its own runtime, as a separate server process; the 5 ms wait is a precise \
             sleep), then through the sentry proxy in NORMAL mode (embedded store; {challenged} \
             challenges issued), then through a proxy on a redis-server with the activation gate \
             forced open (wrk's one source past the ticket ceiling: its ticket lookup's \
             \"none\" stands for a second), then through nginx as a plain reverse proxy (2 workers, keep-alive \
             upstream); the rows of a scenario are one run. Store round trips per request on \
             Redis (TTL calls / requests): {}; on the embedded store: none (in-process). \
             Load average (1 min) at the start and end of each scenario: {}. Proxy CPU: \
             the proxy's own CPU time during its wrk runs per request answered (the sentry's \
             proxy threads; nginx's master and workers; redis-server's not included), \
             a figure the load of other processes on a shared machine moves far less than \
             requests/s",
            cli.sentry_rounds.max(1),
            trips.join(", "),
            loads.join("; ")
        ),
        "| scenario | path | requests/s | vs direct | p50 ms | p99 ms | p99 added ms | proxy CPU µs per request |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        &rows,
    );

    // A redis-server of its own: the scenarios above leave the fleet's penalties and kernel
    // blocks for the loopback source in theirs, and a blocked source is refused before the
    // store is asked, which is not the state measured here.
    let fresh = RedisServer::start();
    let (rps, share, trips_per_request, commands_per_request) =
        redis_under_challenge(&rt, &site, &fresh, seconds)?;
    drop(fresh);
    table(
        "Sentry on Redis under attack: round trips per request in DEFCON_1",
        &format!(
            "wrk -t1 -c16 -d{seconds}s from one source through the proxy on a redis-server, \
             mode DEFCON_1, the source over ip_static_threshold so every request is challenged \
             (hard_block_after high enough that it never is blocked); round trips counted by the \
             store (a pipeline counts once), commands by redis-server (INFO commandstats), both \
             including the per-second upkeep"
        ),
        "| answers/s | challenged | store round trips per request | Redis commands per request |\n| ---: | ---: | ---: | ---: |",
        &[format!(
            "| {rps:.0} | {:.1}% | {trips_per_request:.3} | {commands_per_request:.3} |",
            share * 100.0
        )],
    );

    if cli.sentry_proxy_only {
        return Ok(());
    }
    // Crypto, one thread.
    let signer = Signer::generate()?;
    let subject: Source = "198.51.100.1".parse()?;
    let now = unix_now();
    let content = b"<!doctype html><p>Verified.</p>";
    let issue_rate = per_second(2.0, || {
        signer.issue(subject, 16, 300, content, now)?;
        Ok(())
    })?;
    // Proofs for packages of difficulty 8 (solving is not what is measured here).
    let proofs = solved_proofs(&signer, subject, 8, 2_000, now)?;
    let store = EmbeddedStore::in_memory();
    let local = tokio::runtime::Builder::new_current_thread().build()?;
    let mut i = 0usize;
    let mut round = 0u64;
    let verify_here = per_second(2.0, || {
        let proof = &proofs[i % proofs.len()];
        let v = signer
            .verify(proof, subject, now)
            .map_err(|r| format!("verify: {}", r.code()))?;
        if i.is_multiple_of(proofs.len()) {
            round += 1;
        }
        // A fresh nonce name per call, so the used-nonce check does its insert every time.
        local.block_on(store.use_nonce(&format!("{}{round}", v.session_nonce), 300))?;
        i += 1;
        Ok(())
    })?;
    // Another host (or this one after a restart): no memory of the package, full ECDSA.
    let peer = Signer::generate()?;
    peer.learn_keys([signer.own_jwk()]);
    let mut j = 0usize;
    let verify_full = per_second(2.0, || {
        peer.verify(&proofs[j % proofs.len()], subject, now)
            .map_err(|r| format!("verify: {}", r.code()))?;
        j += 1;
        Ok(())
    })?;
    let (verify_fleet, fleet_cpu_us, redis_cpu_us) = fleet_verification(&signer, &redis)?;
    drop(redis);
    let (redeem_rate, redeem_cpu_us, redeemed) = redemption_on_disk(3.0)?;
    table(
        "Sentry challenge crypto per core",
        "one thread, 2 s per row; issue = nonce, key, AES-256-GCM of a 33-byte page, ECDSA P-256 \
         signature; verify = signature (or the issued-package memory), expiry, subject, commitment, \
         plus the embedded used-nonce insert; the fleet row: another host's proofs on a \
         single-threaded runtime, 64 in flight, each one record lookup (EXISTS) and the used-nonce \
         SET NX on a local redis-server, as the proof endpoint does",
        "| operation | per second (one core) | target |\n| --- | ---: | ---: |",
        &[
            format!("| challenge issue (difficulty 16) | {issue_rate:.0} | >= 10,000 |"),
            format!(
                "| proof verification, package issued by this host | {verify_here:.0} | >= 30,000 |"
            ),
            format!(
                "| proof verification, package another host of the fleet issued (its record in Redis; {fleet_cpu_us:.1} µs CPU per proof here, {redis_cpu_us:.1} µs in redis-server) | {verify_fleet:.0} | >= 30,000 |"
            ),
            format!(
                "| proof verification, full ECDSA (no record: another host without a shared store, or after a restart) | {verify_full:.0} | — |"
            ),
            format!(
                "| proof redemption (`Sentry::redeem`: verification, the used nonce durable in the on-disk embedded store, ticket, signed cookie), 256 in flight on one runtime thread; {redeemed} proofs, {redeem_cpu_us:.1} µs CPU per proof for the whole process ({:.0} per CPU-second) | {redeem_rate:.0} | >= 20,000 |",
                1e6 / redeem_cpu_us.max(0.001)
            ),
        ],
    );

    // Solver per difficulty.
    let mut rows = Vec::new();
    for d in [16u32, 18, 20, 22, 24] {
        let runs = if d <= 20 { 8 } else { 3 };
        let (mut total, mut hashes) = (Duration::ZERO, 0u64);
        for _ in 0..runs {
            let p = signer.issue(subject, d, 300, content, now)?;
            let payload = decode_payload(&p)?;
            let t = Instant::now();
            let s = solver::solve(&payload)?;
            total += t.elapsed();
            hashes += s.hashes;
        }
        let mean = total.as_secs_f64() / f64::from(runs);
        rows.push(format!(
            "| {d} | {:.0} | {runs} | {:.1} | {:.3} | {:.2} |",
            (1u64 << (d - 1)) as f64,
            hashes as f64 / f64::from(runs),
            mean * 1000.0,
            hashes as f64 / total.as_secs_f64() / 1e6
        ));
    }
    table(
        "Reference solver time per difficulty",
        "the Rust reference solver (what the browser page does), one thread, random secret nonce \
         per run; expected work 2^(d-1) candidates of two SHA-256 each",
        "| difficulty (bits) | expected candidates | runs | mean candidates | mean ms | M candidates/s |\n| ---: | ---: | ---: | ---: | ---: | ---: |",
        &rows,
    );
    Ok(())
}

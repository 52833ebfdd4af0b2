//! `blocklist`: the blocklist engine with a large list: matcher throughput, memory, delta
//! computation; then the public API of the real daemon over HTTP with the same number of
//! domains: a delta (JSON, gzip) and full-list throughput from the shared body.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    path::Path,
    sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use phantom_tests::{Daemon, DaemonConfig, NetNs, api};

use phantom_daemon::blocklist::{
    Blocklist,
    model::{Entry, Pattern, PatternType},
};

use crate::{
    BoxError, Cli,
    report::{percentile, rss_mib, rss_of, table},
};

pub fn run(cli: &Cli) -> Result<(), BoxError> {
    let state = tempfile::Builder::new().prefix("phantom-bench").tempdir()?;
    let n = cli.domains as usize;
    let before = rss_mib();
    // Exact/subdomain rules alone first: no patterns, no lookalike brands.
    let list = Blocklist::open(state.path(), 0.5, &[], None)?;
    let entries: Vec<Entry> = (0..n)
        .map(|i| {
            Entry::new(
                &format!("casino{i}.bet{}.example", i % 997),
                i % 2 == 0,
                1.0,
                "bench",
                0,
            )
        })
        .collect();
    let started = Instant::now();
    list.upsert(entries)?;
    let load = started.elapsed().as_secs_f64();
    let rss = rss_mib() - before;
    let base = list.version();

    let queries: Vec<String> = (0..1_000_000usize)
        .map(|i| match i % 4 {
            0 => format!("casino{}.bet{}.example", i % n, (i % n) % 997),
            1 => format!(
                "www.casino{}.bet{}.example",
                (i % n) & !1,
                ((i % n) & !1) % 997
            ),
            2 => format!("www.site{i}.example.com"),
            _ => format!("cdn{i}.static.example.org"),
        })
        .collect();
    let rate = |f: &dyn Fn(&str) -> bool| {
        let started = Instant::now();
        let mut blocked = 0usize;
        for q in &queries {
            blocked += usize::from(f(q));
        }
        std::hint::black_box(blocked);
        queries.len() as f64 / started.elapsed().as_secs_f64()
    };
    let suffix_rate = rate(&|q| list.is_blocked(q));
    let suffix_verify_rate = rate(&|q| list.verify(q).blocked);
    list.set_lookalike_brands(
        &phantom_daemon::config::BlocklistConfig::default().lookalike_brands(),
    );

    for i in 0..50 {
        list.add_pattern(Pattern {
            pattern: format!("slot{i:02}"),
            kind: PatternType::Contains,
            weight: 0.7,
        })?;
    }
    for i in 0..20 {
        list.add_pattern(Pattern {
            pattern: format!(r"^jg{i:02}\d{{3}}\.com$"),
            kind: PatternType::Regex,
            weight: 0.8,
        })?;
    }
    let full_rate = rate(&|q| list.is_blocked(q));
    let full_verify_rate = rate(&|q| list.verify(q).blocked);

    let removed: Vec<String> = (0..500)
        .map(|i| format!("casino{i}.bet{}.example", i % 997))
        .collect();
    for d in &removed {
        list.remove(d)?;
    }
    list.upsert(
        (0..500)
            .map(|i| Entry::new(&format!("new{i}.example"), true, 1.0, "bench", 0))
            .collect(),
    )?;
    let mut delta_ms = Vec::new();
    let mut size = 0;
    for _ in 0..20 {
        let started = Instant::now();
        let delta = list.delta(base)?.ok_or("no delta")?;
        size = delta.0.len() + delta.1.len();
        delta_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    table(
        "Blocklist engine with a large list",
        "single thread; 1,000,000 queries (half hits on exact or subdomain rules, half misses); the full engine adds 50 contains and 20 regex patterns and lookalike detection; memory is the resident growth of the process once the list is loaded (the import's transient entries handed back)",
        "| measurement | value | target |\n| --- | ---: | ---: |",
        &[
            format!("| load {n} entries (one version, SQLite + engine) | {load:.2} s | |"),
            format!(
                "| resident memory of the list and engine, {n} entries | {rss:.0} MiB | <= 150 MB |"
            ),
            format!(
                "| exact/subdomain lookups per second (resolver path: blocked or not) | {:.2} M/s | >= 5 M/s |",
                suffix_rate / 1e6
            ),
            format!(
                "| exact/subdomain with the full report (`verify`: matched patterns) | {:.2} M/s | |",
                suffix_verify_rate / 1e6
            ),
            format!(
                "| full engine (suffix + 50 contains + 20 regex + lookalikes of {} brands), resolver path | {:.2} M/s | >= 1 M/s |",
                phantom_daemon::config::BlocklistConfig::default()
                    .lookalike_brands()
                    .len(),
                full_rate / 1e6
            ),
            format!(
                "| full engine with the full report (`verify`) | {:.2} M/s | |",
                full_verify_rate / 1e6
            ),
            format!(
                "| delta of {size} changes among {n} entries, p50 | {:.2} ms | <= 5 ms |",
                percentile(&mut delta_ms, 0.5)
            ),
        ],
    );
    drop(list);
    api_over_http(cli)
}

/// The `n`th domain of the list the API part imports.
fn api_domain(i: usize) -> String {
    format!("casino{i}.bet{}.example", i % 997)
}

/// Client sources on the namespace's loopback: the API limits each to 120 requests a minute,
/// so every connection comes from the next one (127.0.1.1 onwards).
struct Sources(AtomicU32);

impl Sources {
    fn next(&self) -> Ipv4Addr {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 1, 1)) + n)
    }
}

/// Requests one connection makes before the next source takes over.
const PER_CONNECTION: usize = 100;

/// A keep-alive HTTP/1.1 client of the API from one source.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes read past the current response.
    pending: Vec<u8>,
}

/// One response: status, body bytes on the wire.
struct Reply {
    status: u16,
    bytes: usize,
}

impl Client {
    fn connect(source: Ipv4Addr) -> Result<Self, BoxError> {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket,
        };
        use std::os::fd::AsRawFd;
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )?;
        bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(std::net::SocketAddrV4::new(source, 0)),
        )?;
        connect(
            fd.as_raw_fd(),
            &SockaddrIn::from(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 3000)),
        )?;
        let stream = TcpStream::from(fd);
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Self {
            stream,
            buf: vec![0; 1 << 20],
            pending: Vec::new(),
        })
    }

    fn fill(&mut self) -> Result<(), BoxError> {
        let n = self.stream.read(&mut self.buf)?;
        if n == 0 {
            return Err("connection closed".into());
        }
        self.pending.extend_from_slice(&self.buf[..n]);
        Ok(())
    }

    /// Reads exactly `n` body bytes (discarding them).
    fn skip(&mut self, mut n: usize) -> Result<(), BoxError> {
        let have = self.pending.len().min(n);
        self.pending.drain(..have);
        n -= have;
        while n > 0 {
            let got = self.stream.read(&mut self.buf[..n.min(1 << 20)])?;
            if got == 0 {
                return Err("connection closed in a body".into());
            }
            n -= got;
        }
        Ok(())
    }

    /// A line ending in CRLF, from the buffered bytes.
    fn line(&mut self) -> Result<String, BoxError> {
        loop {
            if let Some(i) = self.pending.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.pending[..i]).into_owned();
                self.pending.drain(..i + 2);
                return Ok(line);
            }
            self.fill()?;
        }
    }

    fn get(&mut self, path: &str, gzip: bool) -> Result<Reply, BoxError> {
        let accept = if gzip {
            "Accept-Encoding: gzip\r\n"
        } else {
            ""
        };
        self.stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\n{accept}\r\n").as_bytes())?;
        let status_line = self.line()?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let (mut length, mut chunked) = (None, false);
        loop {
            let line = self.line()?;
            if line.is_empty() {
                break;
            }
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            }
        }
        let mut bytes = 0;
        if chunked {
            loop {
                let size = usize::from_str_radix(self.line()?.trim(), 16)?;
                self.skip(size)?;
                self.line()?;
                bytes += size;
                if size == 0 {
                    break;
                }
            }
        } else if let Some(n) = length {
            self.skip(n)?;
            bytes = n;
        }
        Ok(Reply { status, bytes })
    }
}

/// `clients` threads fetching the full list (`gzip` or identity) for `seconds`: (requests
/// per second, bytes per request, answers other than 200).
fn full_list_rate(
    sources: &Sources,
    clients: usize,
    seconds: u32,
    gzip: bool,
) -> Result<(f64, f64, u64), BoxError> {
    let done = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let other = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|s| -> Result<(), BoxError> {
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(|| -> Result<(), BoxError> {
                    while !stop.load(Ordering::Relaxed) {
                        let mut client = Client::connect(sources.next())?;
                        for _ in 0..PER_CONNECTION {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            let reply = client.get("/api/v1/blocklist?format=full", gzip)?;
                            if reply.status == 200 {
                                done.fetch_add(1, Ordering::Relaxed);
                                bytes.fetch_add(reply.bytes as u64, Ordering::Relaxed);
                            } else {
                                other.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(u64::from(seconds)));
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().map_err(|_| "a client thread panicked")??;
        }
        Ok(())
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    let done = done.load(Ordering::Relaxed);
    Ok((
        done as f64 / elapsed,
        bytes.load(Ordering::Relaxed) as f64 / done.max(1) as f64,
        other.load(Ordering::Relaxed),
    ))
}

/// The real daemon's blocklist API with `cli.domains` domains, on loopback in a namespace of
/// its own: a delta of 1,000 changes (JSON, gzip) and full-list throughput.
fn api_over_http(cli: &Cli) -> Result<(), BoxError> {
    let n = cli.domains as usize;
    let ns = NetNs::new("phbl");
    let dir = tempfile::Builder::new().prefix("phantom-bench").tempdir()?;
    let list = dir.path().join("list.txt");
    {
        let mut plain = std::io::BufWriter::new(std::fs::File::create(&list)?);
        for i in 0..n {
            writeln!(plain, "{}", api_domain(i))?;
        }
    }
    let mut config = DaemonConfig::new("lo", Path::new("/nonexistent"));
    config.datapath_enabled = false;
    config.metrics_listen = "off".into();
    config.log_level = "warn".into();
    config.blocklist_api = Some("127.0.0.1:3000".into());
    let daemon = Daemon::start(&ns, &config);
    let pid = daemon.pid().ok_or("the daemon has no pid")?;
    let started = Instant::now();
    let imported = api(
        &daemon,
        &[
            "blocklist",
            "import",
            &format!("path={}", list.display()),
            "format=plain",
        ],
    );
    let import_s = started.elapsed().as_secs_f64();
    let base = imported["version"]
        .as_u64()
        .ok_or("the import gave no version")?;
    // 1,000 changes after `base`: 500 removed, 500 added (one version each way).
    let mut admin = daemon.client();
    for i in 0..500 {
        admin.ok(
            "blocklist",
            "remove",
            serde_json::json!({ "domain": api_domain(i * 7) }),
        );
    }
    let added = dir.path().join("added.txt");
    std::fs::write(
        &added,
        (0..500)
            .map(|i| format!("new{i}.example\n"))
            .collect::<String>(),
    )?;
    api(
        &daemon,
        &[
            "blocklist",
            "import",
            &format!("path={}", added.display()),
            "format=plain",
        ],
    );
    let idle_rss = rss_of(pid);

    let sources = Sources(AtomicU32::new(0));
    let (clients, seconds, deltas) = (cli.api_clients, cli.api_seconds, cli.api_deltas);
    let measured = ns.run(|| -> Result<_, String> {
        let run = || -> Result<_, BoxError> {
            // Deltas: the first computes the new version's checksum; then the steady state.
            let path = format!("/api/v1/blocklist?version={base}");
            let mut client = Client::connect(sources.next())?;
            let first = Instant::now();
            let reply = client.get(&path, true)?;
            let first_ms = first.elapsed().as_secs_f64() * 1e3;
            if reply.status != 200 {
                return Err(format!("delta: status {}", reply.status).into());
            }
            let delta_bytes = reply.bytes;
            let mut delta_ms = Vec::with_capacity(deltas);
            for i in 0..deltas {
                if (i + 1) % PER_CONNECTION == 0 {
                    client = Client::connect(sources.next())?;
                }
                let at = Instant::now();
                let reply = client.get(&path, true)?;
                delta_ms.push(at.elapsed().as_secs_f64() * 1e3);
                if reply.status != 200 {
                    return Err(format!("delta: status {}", reply.status).into());
                }
            }
            // The full list: the first request of each encoding makes its body.
            let mut made = Vec::new();
            for gzip in [true, false] {
                let mut client = Client::connect(sources.next())?;
                let at = Instant::now();
                let reply = client.get("/api/v1/blocklist?format=full", gzip)?;
                made.push((at.elapsed().as_secs_f64(), reply.bytes, reply.status));
            }
            // One client, then `clients` at once (when more than one), each encoding.
            let mut rates = Vec::new();
            for c in [1, clients] {
                if c == 1 && !rates.is_empty() {
                    continue;
                }
                for gzip in [true, false] {
                    rates.push((c, gzip, full_list_rate(&sources, c, seconds, gzip)?));
                }
            }
            Ok((first_ms, delta_bytes, delta_ms, made, rates))
        };
        run().map_err(|e| e.to_string())
    })?;
    let (first_ms, delta_bytes, mut delta_ms, made, rates) = measured;
    let busy_rss = rss_of(pid);
    let made_row = |(s, bytes, status): (f64, usize, u16), what: &str| {
        format!(
            "| first full-list request after a change, {what} (makes the shared body: {:.1} MB) | {:.2} s{} | |",
            bytes as f64 / 1e6,
            s,
            if status == 200 {
                String::new()
            } else {
                format!(" (status {status})")
            }
        )
    };
    let rate_row = |&(clients, gzip, (rate, bytes, other)): &(usize, bool, (f64, f64, u64))| {
        format!(
            "| full list of {n} domains, {}, {clients} client{} for {seconds} s | {rate:.1} requests/s ({:.0} MB/s){} | |",
            if gzip { "gzip" } else { "identity" },
            if clients == 1 { "" } else { "s at once" },
            rate * bytes / 1e6,
            if other == 0 {
                String::new()
            } else {
                format!(", {other} not 200")
            }
        )
    };
    table(
        "Blocklist API over HTTP (the real daemon)",
        &format!(
            "phantomd (release) in a namespace of its own with {n} domains imported through the socket, then 500 removed and 500 added; clients on the namespace's loopback, each connection from its own source (the API allows 120 requests a minute per source), keep-alive for up to {PER_CONNECTION} requests; a request's time is from sending it to the last body byte read; the machine's two CPUs are shared by the daemon and the clients"
        ),
        "| measurement | value | target |\n| --- | ---: | ---: |",
        &[
            format!("| import {n} domains (socket call, one version) | {import_s:.1} s | |"),
            format!(
                "| delta of 1000 changes among {n} entries over HTTP, JSON + gzip ({delta_bytes} bytes), p50 | {:.2} ms | <= 5 ms |",
                percentile(&mut delta_ms, 0.5)
            ),
            format!(
                "| the same, p99 | {:.2} ms | |",
                percentile(&mut delta_ms, 0.99)
            ),
            format!(
                "| the first delta after the change (computes the version's checksum) | {first_ms:.0} ms | |"
            ),
            made_row(made[0], "gzip"),
            made_row(made[1], "identity"),
        ]
        .into_iter()
        .chain(rates.iter().map(rate_row))
        .chain([format!(
            "| daemon resident memory: list loaded / with both bodies made, after the runs | {idle_rss:.0} MiB / {busy_rss:.0} MiB | |"
        )])
        .collect::<Vec<_>>(),
    );
    Ok(())
}

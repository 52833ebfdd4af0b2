//! TLS on the sentry's own listener (`[sentry] tls = "files"`), with a certificate a test CA
//! issued for the server's namespace address: Debian's headless Chromium, trusting that CA
//! and nothing else (no certificate errors accepted), opens a challenged URL on
//! `https://192.0.2.1` and ends on the upstream's page — a secure context reached over the
//! network, not loopback: WebCrypto verifies and decrypts, the ticket cookie is `Secure`, the
//! upstream is told `X-Forwarded-Proto: https`. curl, verifying against the same CA, gets the
//! 429 first. A flood of idle and garbage connections from one source does not stop another
//! source being served over TLS.
//!
//! Ghost mode on the same port: one TLS listener serves both. The secret path reaches the
//! relay (WireGuard through the stock client's wss tunnel, a ping through it), every other
//! request the sentry (a wrong secret gets the site, not the relay's 400), and each service's
//! certificate goes to clients asking for its name; after `ghost disable` the secret path is
//! the site's too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    io::Write,
    net::TcpStream,
    path::Path,
    time::{Duration, Instant},
};

use fantoccini::{Client, Locator};
use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, GuardedLink, NetNs, UpstreamSite, WgQuickClient,
    WireguardSettings, api,
    browser::Browser,
    require_root,
    wstunnel::{self, WstunnelClient, WstunnelOptions, block_on_in},
};

const PORT: u16 = 18443;
const UPSTREAM: &str = "127.0.0.1:18000";
const SITE: &str = "https://192.0.2.1:18443";

/// A test root and a leaf for the server's address signed by it: (root PEM, leaf PEM, leaf
/// key PEM).
fn test_ca() -> (String, String, String) {
    let mut root = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root.distinguished_name
        .push(rcgen::DnType::CommonName, "phantom sentry test root");
    let root_key = rcgen::KeyPair::generate().unwrap();
    let root_cert = root.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::new(root, root_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![GuardedLink::SERVER_V4.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    (root_cert.pem(), leaf.pem(), leaf_key.serialize_pem())
}

/// The test CA and the server's certificate, written to files in a directory of their own.
struct TestCa {
    dir: tempfile::TempDir,
    /// The root's PEM, for the browser's trust store.
    ca: String,
    ca_file: std::path::PathBuf,
    cert_file: std::path::PathBuf,
    key_file: std::path::PathBuf,
}

impl TestCa {
    fn write() -> Self {
        let (ca, cert, key) = test_ca();
        let dir = tempfile::tempdir().unwrap();
        let (ca_file, cert_file, key_file) = (
            dir.path().join("ca.pem"),
            dir.path().join("cert.pem"),
            dir.path().join("key.pem"),
        );
        std::fs::write(&ca_file, &ca).unwrap();
        std::fs::write(&cert_file, cert).unwrap();
        std::fs::write(&key_file, key).unwrap();
        Self {
            dir,
            ca,
            ca_file,
            cert_file,
            key_file,
        }
    }
}

/// curl from `ns` (source `from`), verifying the server against `ca`: (status, body).
fn curl(ns: &NetNs, from: &str, ca: &Path, path: &str) -> (u16, String) {
    let out = ns
        .command("curl")
        .args(["-sS", "--max-time", "10", "--interface", from, "--cacert"])
        .arg(ca)
        .args(["-w", "\n%{http_code}", &format!("{SITE}{path}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    assert!(
        out.status.success(),
        "curl {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code.trim().parse().unwrap_or(0), body.to_string())
}

async fn body_text(c: &Client) -> String {
    c.execute(
        "return document.body ? document.body.innerText : ''",
        vec![],
    )
    .await
    .ok()
    .and_then(|v| v.as_str().map(str::to_string))
    .unwrap_or_default()
}

async fn attr(c: &Client, id: &str, name: &str) -> Option<String> {
    c.find(Locator::Id(id)).await.ok()?.attr(name).await.ok()?
}

#[test]
fn the_challenge_page_passes_chromium_over_the_sentrys_own_tls() {
    if !require_root("the_challenge_page_passes_chromium_over_the_sentrys_own_tls") {
        return;
    }
    let started = Instant::now();
    let link = GuardedLink::new();
    let _site = UpstreamSite::start(&link.server, UPSTREAM);
    let bpffs = BpffsDir::new();
    let TestCa {
        dir: _files,
        ca,
        ca_file,
        cert_file,
        key_file,
    } = TestCa::write();

    let mut config = DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path());
    config.datapath_enabled = false;
    config.extra_toml = format!(
        "[sentry]\nenabled = true\nlisten = \"0.0.0.0:{PORT}\"\n\
         upstream = \"http://{UPSTREAM}\"\nactivation_cpu_threshold = 0.0\n\
         ip_static_threshold = 2\nbase_difficulty = 14\nmax_difficulty = 14\n\
         hard_block_after = 100\ncalm_seconds = 3600\n\
         tls = \"files\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert_file.display(),
        key_file.display()
    );
    let daemon = Daemon::start(&link.server, &config);
    api(&daemon, &["sentry", "set_mode", "mode=DEFCON_1"]);
    let status = api(&daemon, &["sentry", "status"]);
    assert_eq!(status["tls"]["mode"], "files", "{status}");
    assert!(
        status["tls"]["certificate_expires_at"].as_i64().unwrap() > 1_700_000_000,
        "{status}"
    );

    // curl verifies the chain against the test root: challenged past the threshold.
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(curl(&link.peer, GuardedLink::PEER_V4, &ca_file, "/warm-up").0);
    }
    assert_eq!(codes.last(), Some(&429), "{codes:?}");
    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = link
        .peer
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{}:{PORT}/", GuardedLink::SERVER_V4),
        ])
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");

    // The browser trusts the test root only: navigation fails on any certificate error, and
    // the page on https://192.0.2.1 is a secure context.
    let browser = Browser::start_trusting(&link.peer, &ca);
    block_on_in(&link.peer, || async {
        let c = browser.session(1000, 700).await;
        c.goto(&format!("{SITE}/article?id=7")).await.unwrap();
        let want = format!("{} /article?id=7 ", UpstreamSite::BODY_PREFIX);
        let deadline = Instant::now() + Duration::from_secs(60);
        let text = loop {
            let text = body_text(&c).await;
            if text.contains(&want) {
                break text;
            }
            assert!(
                Instant::now() < deadline,
                "the browser never reached the upstream; it shows {text:?} (state {:?}, error {:?})",
                attr(&c, "sentry", "data-state").await,
                attr(&c, "sentry", "data-error").await,
            );
            // Chromium abandons a navigation when its namespace's addresses change under it
            // (the peer link's own IPv6 link-local address leaving its tentative state, a
            // second or two after the link came up): a person would reload, and so does the
            // test; any other error page stays an error.
            if text.contains("ERR_NETWORK_CHANGED") {
                eprintln!("the navigation met a network change; loading the page again");
                c.goto(&format!("{SITE}/article?id=7")).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(text.contains("proto=https"), "{text}");
        let context = c
            .execute(
                "return [window.isSecureContext, typeof crypto.subtle, location.protocol]",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(context, serde_json::json!([true, "object", "https:"]));
        // The page writes its record as it leaves for the site: wait for it, not just once.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let record = loop {
            let record = c
                .execute("return sessionStorage.getItem('sentry-challenge')", vec![])
                .await
                .unwrap();
            if record.is_string() || std::time::Instant::now() > deadline {
                break record;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        let record: serde_json::Value =
            serde_json::from_str(record.as_str().expect("the page left its record")).unwrap();
        assert_eq!(record["verify"], "webcrypto", "{record}");
        assert_eq!(record["aes"], "webcrypto", "{record}");
        let ticket = c.get_named_cookie("sentry_ticket").await.unwrap();
        assert_eq!(ticket.secure(), Some(true), "{ticket:?}");
        assert_eq!(ticket.http_only(), Some(true), "{ticket:?}");
        c.close().await.unwrap();
    });
    let status = api(&daemon, &["sentry", "status"]);
    assert_eq!(status["challenges"]["solved"], 1, "{status}");

    // One source floods the TLS port with idle connections and garbage; another source is
    // still served over TLS meanwhile, and the daemon keeps answering its socket.
    let flood: Vec<TcpStream> = link.peer.run(|| {
        let mut held = Vec::new();
        let target: std::net::SocketAddr = format!("{}:{PORT}", GuardedLink::SERVER_V4)
            .parse()
            .unwrap();
        for i in 0..400 {
            let Ok(mut stream) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
                continue;
            };
            if i % 2 == 0 {
                // Not TLS at all.
                let _ = stream.write_all(b"\x16\x03\x01\xff\xffgarbage that is no ClientHello");
            }
            held.push(stream);
        }
        held
    });
    eprintln!("flood: {} connections opened", flood.len());
    // (A source of its own: the browser's address is over the threshold without its cookie.)
    let (code, body) = curl(
        &link.server,
        GuardedLink::SERVER_V4,
        &ca_file,
        "/after-flood",
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("proto=https"), "{body}");
    api(&daemon, &["sentry", "status"]);
    drop(flood);
    eprintln!(
        "the_challenge_page_passes_chromium_over_the_sentrys_own_tls: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// curl from the client namespace to `https://<host>:PORT<path>` with `host` resolved to the
/// server, verifying against `ca`: the body, or `None` when TLS or the request failed.
fn curl_named(ns: &NetNs, host: &str, ca: &Path, path: &str) -> Option<String> {
    let out = ns
        .command("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args([
            "--resolve",
            &format!("{host}:{PORT}:{}", GuardedLink::SERVER_V4),
            &format!("https://{host}:{PORT}{path}"),
        ])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One upgrade attempt on the shared port: the HTTP status (0: no HTTP answer).
fn upgrade_status(ns: &NetNs, opts: &WstunnelOptions, path: &str) -> u16 {
    let (opts, path) = (opts.clone(), path.to_string());
    block_on_in(ns, move || async move {
        let Ok(mut tls) = wstunnel::connect_tls(&opts).await else {
            return 0;
        };
        let jwt = wstunnel::stock_jwt("127.0.0.1", 51820);
        wstunnel::upgrade(&mut tls, &opts.host, &path, Some(&jwt))
            .await
            .map(|r| r.status)
            .unwrap_or(0)
    })
}

#[test]
fn ghost_and_the_sentry_share_one_tls_port() {
    if !require_root("ghost_and_the_sentry_share_one_tls_port") {
        return;
    }
    const GHOST_DOMAIN: &str = "192.0.2.1.nip.io";
    let started = Instant::now();
    let link = GuardedLink::new();
    let _site = UpstreamSite::start(&link.server, UPSTREAM);
    let bpffs = BpffsDir::new();
    let TestCa {
        dir: _files,
        ca: _,
        ca_file,
        cert_file,
        key_file,
    } = TestCa::write();
    let mut config = DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path());
    config.datapath_enabled = false;
    config.wireguard = Some(WireguardSettings::new(
        "198.51.100.0/24",
        GuardedLink::SERVER_V4,
    ));
    // The sentry in NORMAL mode: every source passes, so what answers is plainly the site.
    config.extra_toml = format!(
        "[sentry]\nenabled = true\nlisten = \"0.0.0.0:{PORT}\"\n\
         upstream = \"http://{UPSTREAM}\"\n\
         tls = \"files\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
         [ghost]\ntls = \"self_signed\"\nport = {PORT}\n",
        cert_file.display(),
        key_file.display()
    );
    let daemon = Daemon::start(&link.server, &config);
    api(&daemon, &["core", "add_client", "client_name=alice"]);
    let enabled = api(
        &daemon,
        &["ghost", "enable", &format!("domain={GHOST_DOMAIN}")],
    );
    assert_eq!(enabled["status"], "active", "{enabled}");
    let secret = enabled["secret"].as_str().unwrap().to_string();
    assert!(
        enabled["connection_command"]
            .as_str()
            .unwrap()
            .ends_with(&format!("wss://{GHOST_DOMAIN}:{PORT}")),
        "{enabled}"
    );
    let ghost_cert = daemon.dir().join("state/ghost/tls/cert.pem");

    // Each name gets its own certificate on the one port.
    let site = curl_named(&link.peer, GuardedLink::SERVER_V4, &ca_file, "/page").unwrap();
    assert!(
        site.contains(&format!("{} /page ", UpstreamSite::BODY_PREFIX)),
        "{site}"
    );
    let by_name = curl_named(&link.peer, GHOST_DOMAIN, &ghost_cert, "/other").unwrap();
    assert!(
        by_name.contains("/other"),
        "the site under ghost's name: {by_name}"
    );
    assert!(
        curl_named(&link.peer, GHOST_DOMAIN, &ca_file, "/").is_none(),
        "ghost's name must get ghost's certificate, not the site's"
    );

    // The secret path is the relay's; a wrong one is the site's (not the relay's 400).
    let opts = WstunnelOptions::new(
        format!("{}:{PORT}", GuardedLink::SERVER_V4)
            .parse()
            .unwrap(),
        GHOST_DOMAIN,
        &secret,
    );
    assert_eq!(
        upgrade_status(&link.peer, &opts, &format!("/{secret}/events")),
        101
    );
    assert_eq!(
        upgrade_status(&link.peer, &opts, "/not-the-secret/events"),
        200
    );

    // WireGuard through the stock client's tunnel on the shared port.
    let export = api(&daemon, &["ghost", "export", "client_name=alice"]);
    let wg_config = export["config"].as_str().unwrap().to_string();
    let tunnel = WstunnelClient::start(&link.peer, opts.clone());
    let wg = WgQuickClient::up(&link.peer, &wg_config);
    let deadline = Instant::now() + Duration::from_secs(20);
    while link.ping("198.51.100.1", 1) != 1 {
        assert!(
            Instant::now() < deadline,
            "no ping through the shared port's tunnel"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = api(&daemon, &["ghost", "status"]);
    let relay = &status["services"]["relay"];
    assert_eq!(relay["shares_sentry_port"], true, "{status}");
    assert!(relay["tunnels_open"].as_i64().unwrap() >= 1, "{status}");
    drop(wg);
    drop(tunnel);

    // Ghost gone: the secret path and ghost's name are the site's.
    api(&daemon, &["ghost", "disable"]);
    assert_eq!(
        upgrade_status(&link.peer, &opts, &format!("/{secret}/events")),
        200
    );
    assert!(curl_named(&link.peer, GHOST_DOMAIN, &ghost_cert, "/").is_none());
    eprintln!(
        "ghost_and_the_sentry_share_one_tls_port: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

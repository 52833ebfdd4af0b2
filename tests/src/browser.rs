//! A real browser: Debian's headless Chromium driven over WebDriver (chromedriver) from inside
//! a test's namespace, so the pages it opens are the daemon's, reached over the test's own
//! links. The driver, the browser and its profile directory go away on `Drop`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

use crate::{NetNs, Process};

/// Where scripts/bootstrap.sh's packages put them.
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const DRIVER_PORT: u16 = 9515;

/// chromedriver (and the Chromium it starts) in a namespace.
pub struct Browser {
    _driver: Process,
    profile: tempfile::TempDir,
    /// Started with a test CA in its trust store: certificate errors are errors.
    trusts_ca: bool,
}

/// NSS's certutil (libnss3-tools): Chromium on Linux trusts the roots of `$HOME/.pki/nssdb`.
pub const CERTUTIL: &str = "/usr/bin/certutil";

impl Browser {
    /// Starts chromedriver inside `ns`; [`Browser::session`] opens the browser, which accepts
    /// any certificate.
    pub fn start(ns: &NetNs) -> Self {
        Self::launch(ns, None)
    }

    /// As [`Browser::start`], but the browser trusts the root certificate `ca_pem` (a test
    /// CA, added to the NSS database of the browser's own `$HOME`) and nothing else: a
    /// certificate it cannot verify fails the navigation, and a page served with one the CA
    /// issued is a secure context.
    pub fn start_trusting(ns: &NetNs, ca_pem: &str) -> Self {
        Self::launch(ns, Some(ca_pem))
    }

    fn launch(ns: &NetNs, ca_pem: Option<&str>) -> Self {
        for tool in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: scripts/bootstrap.sh installs Debian's chromium and chromium-driver"
            );
        }
        let profile = tempfile::tempdir().unwrap();
        let home = profile.path().join("home");
        if let Some(ca) = ca_pem {
            assert!(
                Path::new(CERTUTIL).exists(),
                "{CERTUTIL} is missing: scripts/bootstrap.sh installs libnss3-tools"
            );
            let db = home.join(".pki/nssdb");
            std::fs::create_dir_all(&db).unwrap();
            let ca_file = profile.path().join("test-ca.pem");
            std::fs::write(&ca_file, ca).unwrap();
            let db_arg = format!("sql:{}", db.display());
            for args in [
                vec!["-N", "-d", &db_arg, "--empty-password"],
                vec![
                    "-A",
                    "-d",
                    &db_arg,
                    "-t",
                    "C,,",
                    "-n",
                    "phantom-test-ca",
                    "-i",
                    ca_file.to_str().unwrap(),
                ],
            ] {
                let out = std::process::Command::new(CERTUTIL)
                    .args(&args)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "certutil {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        } else {
            std::fs::create_dir_all(&home).unwrap();
        }
        let driver = Process::spawn(
            "chromedriver",
            ns.command(CHROMEDRIVER)
                .env("HOME", &home)
                .arg(format!("--port={DRIVER_PORT}"))
                .arg("--allowed-ips=127.0.0.1"),
        );
        // Wait for the driver's port inside the namespace.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = ns.run(|| {
                std::net::TcpStream::connect_timeout(
                    &([127, 0, 0, 1], DRIVER_PORT).into(),
                    Duration::from_millis(200),
                )
                .is_ok()
            });
            if up {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            _driver: driver,
            profile,
            trusts_ca: ca_pem.is_some(),
        }
    }

    /// A new headless Chromium session (call inside the namespace's runtime, e.g. from
    /// `wstunnel::block_on_in`). Self-signed certificates are accepted (the daemon's admin
    /// listener makes one at first start) unless the browser was started trusting a CA.
    pub async fn session(&self, width: u32, height: u32) -> Client {
        self.open(width, height, true).await
    }

    /// Like [`Browser::session`], with JavaScript turned off for every site (Chromium's
    /// content setting, as a user or a policy turns it off): pages' scripts never run, while
    /// WebDriver can still read and drive the page.
    pub async fn session_without_javascript(&self, width: u32, height: u32) -> Client {
        self.open(width, height, false).await
    }

    async fn open(&self, width: u32, height: u32, javascript: bool) -> Client {
        let mut caps = json!({
            "browserName": "chrome",
            "acceptInsecureCerts": !self.trusts_ca,
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    // As root, Chromium's own sandbox cannot start; the namespace is the fence.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--hide-scrollbars",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", self.profile.path().join("profile").display()),
                ],
            },
        });
        if !javascript {
            caps["goog:chromeOptions"]["prefs"] =
                json!({"profile.managed_default_content_settings.javascript": 2});
        }
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{DRIVER_PORT}"))
            .await
            .expect("a Chromium session through chromedriver")
    }
}

/// Where a test's screenshots go: `$PHANTOM_SCREENSHOT_DIR` (docs/screenshots when the
/// pictures in the docs are refreshed), else `phantom-screenshots` in the temp directory.
pub fn screenshot_dir() -> PathBuf {
    let dir = std::env::var_os("PHANTOM_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("phantom-screenshots"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Saves the page, scrolled to its top, as `<name>.png` in [`screenshot_dir`] and says where.
pub async fn screenshot(client: &Client, name: &str) -> PathBuf {
    // A form the test typed into may have scrolled the page.
    let _ = client.execute("window.scrollTo(0, 0)", vec![]).await;
    let png = client.screenshot().await.unwrap();
    let path = screenshot_dir().join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
    path
}

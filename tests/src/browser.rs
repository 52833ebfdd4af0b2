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
}

impl Browser {
    /// Starts chromedriver inside `ns`; [`Browser::session`] opens the browser.
    pub fn start(ns: &NetNs) -> Self {
        for tool in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: scripts/bootstrap.sh installs Debian's chromium and chromium-driver"
            );
        }
        let driver = Process::spawn(
            "chromedriver",
            ns.command(CHROMEDRIVER)
                .arg(format!("--port={DRIVER_PORT}"))
                .arg("--allowed-ips=127.0.0.1"),
        );
        let profile = tempfile::tempdir().unwrap();
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
        }
    }

    /// A new headless Chromium session (call inside the namespace's runtime, e.g. from
    /// `wstunnel::block_on_in`). Self-signed certificates are accepted: the daemon's admin
    /// listener makes one at first start.
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
            "acceptInsecureCerts": true,
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

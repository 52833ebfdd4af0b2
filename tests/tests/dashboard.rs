//! The admin dashboard at `/` in a real browser: Debian's headless Chromium, driven over
//! WebDriver from the operator's namespace, against the real daemon's HTTPS admin listener.
//! It signs in with a token, watches the panels move while a VPN client pings and queries
//! through its tunnel and a burst hits the sentry, adds a client and shows its QR code,
//! blocks a domain, switches the sentry mode, and hides the write forms from a read token.
//! Screenshots go to `$PHANTOM_SCREENSHOT_DIR` (docs/screenshots for the docs' pictures).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use fantoccini::{Client, Locator};
use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, GuardedLink, Process, UpstreamSite, WgQuickClient,
    WireguardSettings, api,
    browser::{Browser, screenshot},
    http_from, mint_token, require_root,
    wstunnel::block_on_in,
};
use serde_json::Value;

const VPN_SUBNET: &str = "198.51.100.0/24";
const VPN_SERVER: &str = "198.51.100.1";
const ADMIN: &str = "https://192.0.2.1:9443";
const SITE: &str = "192.0.2.1:8080";
/// The operator's browser (in the allowlist).
const OPERATOR: &str = GuardedLink::PEER_V4;
/// The source of the burst on the sentry.
const BURSTER: &str = GuardedLink::PEER_V4_SECOND;

async fn text(c: &Client, id: &str) -> String {
    for _ in 0..10 {
        // An element of a panel may be redrawn between finding and reading it.
        if let Ok(e) = c.find(Locator::Id(id)).await
            && let Ok(t) = e.text().await
        {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot read #{id}");
}

/// A displayed number ("1,234", "12.5 KiB", "–") as a float; `None` when it is not one.
fn number(s: &str) -> Option<f64> {
    let digits: String = s
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == '.')
        .filter(|c| *c != ',')
        .collect();
    digits.parse().ok()
}

/// Polls until `ok` holds for the element's text, or panics after `within` with what it saw.
async fn until(c: &Client, id: &str, within: Duration, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + within;
    loop {
        let t = text(c, id).await;
        if ok(&t) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "#{id} never became what the test waits for; it shows {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Clicks the element; again if the page re-rendered it between finding and clicking (the
/// panels redraw every poll).
async fn click(c: &Client, css: &str) {
    let mut last = None;
    for _ in 0..10 {
        match c.find(Locator::Css(css)).await {
            Ok(e) => match e.click().await {
                Ok(()) => return,
                Err(err) => last = Some(err.to_string()),
            },
            Err(err) => last = Some(err.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot click {css}: {last:?}");
}

async fn type_into(c: &Client, id: &str, value: &str) {
    let e = c.find(Locator::Id(id)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(value).await.unwrap();
}

async fn sign_in(c: &Client, token: &str) {
    type_into(c, "token", token).await;
    click(c, "#sign-in-form button[type=submit]").await;
}

#[test]
fn dashboard_in_chromium_signs_in_watches_live_panels_and_runs_the_usual_tasks() {
    if !require_root("dashboard_in_chromium_signs_in_watches_live_panels_and_runs_the_usual_tasks")
    {
        return;
    }
    let started = Instant::now();
    let link = GuardedLink::new();
    let _site = UpstreamSite::start(&link.server, "127.0.0.1:18000");
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path());
    config.wireguard = Some(WireguardSettings::new(VPN_SUBNET, GuardedLink::SERVER_V4));
    config.dns_section =
        "listen = \"auto\"\nprimary = \"127.0.0.53\"\nsecondary = \"127.0.0.54\"\n".into();
    config.admin_extra =
        format!("http_listen = \"0.0.0.0:9443\"\nhttp_allow = [\"{OPERATOR}/32\"]\n");
    config.extra_toml = format!(
        "[sentry]\nenabled = true\nlisten = \"{SITE}\"\nupstream = \"http://127.0.0.1:18000\"\n\
         activation_cpu_threshold = 0.0\nip_static_threshold = 200\nstats_interval_seconds = 1\n\
         hard_block_after = 1000\n"
    );
    let daemon = Daemon::start(&link.server, &config);
    let write = mint_token(&daemon, "ops-alice", "write", "1h");
    let read = mint_token(&daemon, "ops-viewer", "read", "1h");

    // The VPN client that will move the WireGuard, datapath and DNS panels.
    api(&daemon, &["core", "add_client", "client_name=alice"]);
    let export = api(&daemon, &["core", "export_client", "client_name=alice"]);
    let alice = WgQuickClient::up(&link.peer, export["config"].as_str().unwrap());
    let alice_ip = api(&daemon, &["core", "list_clients"])["clients"][0]["ip"]
        .as_str()
        .unwrap()
        .to_string();

    let browser = Browser::start(&link.peer);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        block_on_in(&link.peer, || async {
            let c = browser.session(1400, 1300).await;
            c.goto(&format!("{ADMIN}/")).await.unwrap();
            c.wait()
                .for_element(Locator::Id("sign-in-form"))
                .await
                .unwrap();
            screenshot(&c, "dashboard-sign-in").await;

            // A token the daemon did not mint is refused on the page.
            sign_in(&c, "eyJhbGciOiJFUzI1NiJ9.e30.c2ln").await;
            let why = until(&c, "sign-in-error", Duration::from_secs(10), |t| {
                !t.is_empty()
            })
            .await;
            assert!(why.to_lowercase().contains("token"), "{why}");

            sign_in(&c, &write).await;
            until(&c, "who", Duration::from_secs(10), |t| {
                t.contains("ops-alice")
            })
            .await;
            assert_eq!(text(&c, "wg-clients").await, "1");

            // Traffic: the client pings through its tunnel; a burst hits the sentry.
            let _ping = Process::spawn(
                "ping through the tunnel",
                link.peer
                    .command("ping")
                    .args(["-q", "-i", "0.2", "-s", "1000", VPN_SERVER]),
            );
            let (link_ref, stop_ref) = (&link, &stop);
            s.spawn(move || {
                while !stop_ref.load(Ordering::Relaxed) {
                    let _ = http_from(
                        &link_ref.peer,
                        BURSTER,
                        SITE,
                        "GET /burst",
                        &["Accept: application/json".to_string()],
                        b"",
                        Duration::from_secs(5),
                    );
                }
            });
            until(&c, "wg-connected", Duration::from_secs(20), |t| t == "1").await;
            let row = until(&c, "wg-table", Duration::from_secs(10), |t| {
                t.contains("connected")
            })
            .await;
            assert!(row.contains("alice") && row.contains(&alice_ip), "{row}");
            let rx = until(&c, "wg-rx", Duration::from_secs(20), |t| {
                number(t).is_some_and(|n| n > 0.0) && !t.starts_with("0 ")
            })
            .await;
            let rate = until(&c, "sentry-rate", Duration::from_secs(20), |t| {
                number(t).is_some_and(|n| n > 0.0)
            })
            .await;
            let pps = until(&c, "dp-pps", Duration::from_secs(20), |t| {
                number(t).is_some_and(|n| n > 0.0)
            })
            .await;
            eprintln!("live: tunnel {rx}/s, sentry {rate} requests/s, datapath {pps} packets/s");
            let talkers = until(&c, "sentry-talkers", Duration::from_secs(10), |t| {
                t.contains(BURSTER)
            })
            .await;
            assert!(talkers.contains(BURSTER), "{talkers}");
            // Block a domain from the page; the VPN client's resolver answers NXDOMAIN for it.
            type_into(&c, "domain-name", "casino-dashboard.example").await;
            click(&c, "#domain-form button").await;
            until(&c, "bl-entries", Duration::from_secs(10), |t| t == "1").await;
            let dig = link
                .peer
                .command("dig")
                .args(["+tries=1", "+time=3"])
                .arg(format!("@{VPN_SERVER}"))
                .arg("casino-dashboard.example")
                .output()
                .unwrap();
            let answer = String::from_utf8_lossy(&dig.stdout).into_owned();
            assert!(answer.contains("NXDOMAIN"), "{answer}");
            until(&c, "dns-blocked", Duration::from_secs(10), |t| {
                number(t).is_some_and(|n| n >= 1.0)
            })
            .await;

            // A few more polls so the charts have a history in the picture.
            tokio::time::sleep(Duration::from_secs(8)).await;
            screenshot(&c, "dashboard-live").await;
            stop.store(true, Ordering::Relaxed);

            // Add a client and see its QR code.
            type_into(&c, "client-name", "bob-phone").await;
            click(&c, "#add-client-form button").await;
            c.wait()
                .for_element(Locator::Css("#qr-dialog[open]"))
                .await
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let w = c
                    .execute(
                        "return document.getElementById('qr-image').naturalWidth",
                        vec![],
                    )
                    .await
                    .unwrap();
                if w.as_u64().unwrap_or(0) > 100 {
                    break;
                }
                assert!(Instant::now() < deadline, "the QR image never loaded: {w}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(text(&c, "qr-title").await, "bob-phone");
            screenshot(&c, "dashboard-client-qr").await;
            click(&c, "#qr-dialog form button").await;
            until(&c, "wg-clients", Duration::from_secs(10), |t| t == "2").await;

            // A client with an expiry date from the picker: cut off at the end of that day.
            type_into(&c, "client-name", "guest-2099").await;
            c.execute(
                "document.getElementById('client-expires').value = '2099-12-31'",
                vec![],
            )
            .await
            .unwrap();
            click(&c, "#add-client-form button").await;
            c.wait()
                .for_element(Locator::Css("#qr-dialog[open]"))
                .await
                .unwrap();
            click(&c, "#qr-dialog form button").await;
            until(&c, "wg-clients", Duration::from_secs(10), |t| t == "3").await;

            // Switch the sentry's mode (the burst may have raised it to DEFCON_1 on its own).
            c.find(Locator::Id("mode-select"))
                .await
                .unwrap()
                .select_by_value("DOOMSDAY")
                .await
                .unwrap();
            click(&c, "#mode-form button").await;
            until(&c, "mode", Duration::from_secs(10), |t| t == "DOOMSDAY").await;
            screenshot(&c, "dashboard-doomsday").await;

            // Whitelist an address, deny another, disable and remove the new client.
            type_into(&c, "whitelist-ip", "203.0.113.7").await;
            click(&c, "#whitelist-form button[value=add]").await;
            until(&c, "whitelist-size", Duration::from_secs(10), |t| {
                t.starts_with("1 ")
            })
            .await;
            type_into(&c, "address-ip", "198.18.0.66").await;
            click(&c, "#address-form button[value=deny]").await;
            until(&c, "toast", Duration::from_secs(10), |t| {
                t.contains("datapath deny")
            })
            .await;
            click(&c, "button[data-client='bob-phone']:nth-of-type(2)").await;
            until(&c, "wg-table", Duration::from_secs(10), |t| {
                t.lines()
                    .any(|l| l.contains("bob-phone") && l.contains("disabled"))
            })
            .await;
            click(&c, "button[data-client='bob-phone']:nth-of-type(3)").await;
            c.accept_alert().await.unwrap();
            until(&c, "wg-clients", Duration::from_secs(10), |t| t == "2").await;

            // A read token sees the panels and no write forms.
            click(&c, "#sign-out").await;
            sign_in(&c, &read).await;
            until(&c, "who", Duration::from_secs(10), |t| {
                t.contains("ops-viewer")
            })
            .await;
            let add = c.find(Locator::Id("add-client-form")).await.unwrap();
            assert!(
                !add.is_displayed().await.unwrap(),
                "a read token sees no write forms"
            );
            let cls = c
                .execute("return document.body.className", vec![])
                .await
                .unwrap();
            assert_eq!(cls, Value::String("read-only".into()));
            c.close().await.unwrap();
        });
    });
    drop(alice);

    // What the page did, the daemon did.
    let clients = api(&daemon, &["core", "list_clients"]);
    let names: Vec<&str> = clients["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(
        !names.contains(&"bob-phone"),
        "removed from the page: {clients}"
    );
    let guest = api(&daemon, &["core", "get_client", "client_name=guest-2099"]);
    assert_eq!(guest["client"]["expires_at"], 4_102_444_799_i64, "{guest}");
    let denied = api(&daemon, &["datapath", "list_denied"]).to_string();
    assert!(denied.contains("198.18.0.66"), "{denied}");
    let whitelist = api(&daemon, &["sentry", "whitelist_list"]).to_string();
    assert!(whitelist.contains("203.0.113.7"), "{whitelist}");
    assert_eq!(
        api(&daemon, &["sentry", "status"])["current_mode"],
        "DOOMSDAY"
    );
    assert_eq!(
        api(
            &daemon,
            &["blocklist", "verify", "domain=casino-dashboard.example"]
        )["blocked"],
        true
    );
    // Each write is audited under the token's name, and no VPN client's address or queried
    // name is in the log.
    let audit = api(&daemon, &["admin", "audit", "limit=1000"]);
    let entries = audit["entries"].as_array().unwrap();
    for action in [
        "add_client",
        "export_client",
        "add",
        "set_mode",
        "whitelist_add",
        "deny",
        "disable_client",
        "remove_client",
    ] {
        assert!(
            entries.iter().any(|e| e["transport"] == "https"
                && e["token"] == "ops-alice"
                && e["action"] == action
                && e["outcome"] == "ok"),
            "no audited {action}: {audit}"
        );
    }
    let log = audit.to_string();
    assert!(
        !log.contains(&alice_ip),
        "a VPN client's address in the audit log"
    );
    eprintln!("dashboard test took {:?}", started.elapsed());
}

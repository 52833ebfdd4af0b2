//! `dashboard`: what an open dashboard costs the daemon. The real daemon (WireGuard server
//! with clients, resolver, datapath on the namespace's loopback, sentry) is measured for the
//! same length of time idle and then with the dashboard open in headless Chromium, signed in
//! and polling; the daemon's CPU time (user + system, /proc) over each stretch gives the
//! share of one CPU.

use std::time::{Duration, Instant};

use fantoccini::Locator;
use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, NetNs, WireguardSettings, api, browser::Browser, mint_token,
    wstunnel::block_on_in,
};

use crate::{
    BoxError, Cli,
    report::{cpu_seconds, table},
};

const ADMIN: &str = "127.0.0.1:9443";

/// The daemon's CPU seconds over `seconds` of wall time, as a percentage of one CPU.
fn cpu_share(pid: u32, seconds: u64, during: impl FnOnce(Duration)) -> f64 {
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    during(Duration::from_secs(seconds));
    let (cpu1, wall) = (cpu_seconds(pid), t0.elapsed().as_secs_f64());
    100.0 * (cpu1 - cpu0) / wall
}

pub fn run(cli: &Cli) -> Result<(), BoxError> {
    let ns = NetNs::new("phbench-dash");
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new("lo", bpffs.path());
    config.metrics_listen = "off".into();
    config.wireguard = Some(WireguardSettings::new("10.201.0.0/24", "127.0.0.1"));
    config.dns_section =
        "listen = \"auto\"\nprimary = \"127.0.0.53\"\nsecondary = \"127.0.0.54\"\n".into();
    config.admin_extra = format!("http_listen = {ADMIN:?}\n");
    config.extra_toml = "[sentry]\nenabled = true\nlisten = \"127.0.0.1:18080\"\nupstream = \"http://127.0.0.1:18000\"\n".into();
    let daemon = Daemon::start(&ns, &config);
    let clients = cli.dashboard_clients;
    for i in 0..clients {
        api(
            &daemon,
            &["core", "add_client", &format!("client_name=bench-{i:03}")],
        );
    }
    let token = mint_token(&daemon, "bench", "write", "1h");
    let pid = daemon.pid().ok_or("the daemon is not running")?;
    let seconds = cli.dashboard_seconds;

    // Settle after start-up and the client additions, then the idle stretch.
    std::thread::sleep(Duration::from_secs(3));
    let idle = cpu_share(pid, seconds, std::thread::sleep);

    let browser = Browser::start(&ns);
    let (open, polls) = block_on_in(&ns, || async {
        let c = browser.session(1400, 1200).await;
        c.goto(&format!("https://{ADMIN}/")).await?;
        c.find(Locator::Id("token"))
            .await?
            .send_keys(&token)
            .await?;
        c.find(Locator::Css("#sign-in-form button[type=submit]"))
            .await?
            .click()
            .await?;
        c.wait()
            .for_element(Locator::Css("#dashboard:not([hidden])"))
            .await?;
        // Page load and sign-in are done; what stays is the open page.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
        let mut polls = 0u32;
        let mut last = String::new();
        let end = t0 + Duration::from_secs(seconds);
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = c.find(Locator::Id("updated")).await?.text().await?;
            if now != last {
                polls += 1;
                last = now;
            }
        }
        let open = 100.0 * (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
        c.close().await?;
        Ok::<_, BoxError>((open, polls))
    })?;
    drop(browser);

    table(
        "Dashboard: the daemon's CPU with the dashboard open",
        &format!(
            "the real daemon (WireGuard server with {clients} clients, resolver, datapath on the namespace's loopback, sentry) for {seconds} s idle, then {seconds} s with the dashboard open in headless Chromium over HTTPS, signed in, polling every 2 s ({polls} distinct snapshots seen); the daemon's user + system CPU time from /proc over each stretch"
        ),
        "| stretch | daemon CPU (% of one CPU) | target |\n| --- | ---: | ---: |",
        &[
            format!("| idle | {idle:.3} % | — |"),
            format!("| dashboard open | {open:.3} % | — |"),
            format!("| added by the dashboard | {:.3} % | <= 1 % |", open - idle),
        ],
    );
    drop(daemon);
    Ok(())
}

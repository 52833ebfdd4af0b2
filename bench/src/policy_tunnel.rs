//! `policy-tunnel`: an unlimited client's TCP throughput through the tunnel (iperf3, both
//! directions) with the VPN-interface programs attached (rules, isolation switch, limits, the
//! DNS filter, the multihop mark and the encrypted-DNS filter, while another client has a rate
//! limit and 16 rules, so every lookup runs) against the same daemon with those programs not
//! attached (`[datapath] vpn_interface` naming no interface; the XDP guard stays), rounds
//! interleaved, medians compared.

use std::time::{Duration, Instant};

use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, NetNs, Process, WgQuickClient, WireguardSettings, api,
    iperf3_mbits, veth,
};

use crate::{BoxError, Cli, report::table};

const SERVICE: &str = "203.0.113.80";

/// Mbit/s (`iperf3_mbits`: a run the server was still too busy for is tried again).
fn iperf(ns: &NetNs, download: bool, secs: u32) -> Result<f64, BoxError> {
    let secs = secs.to_string();
    let mut args = vec!["-c", SERVICE, "-t", &secs, "-O", "1"];
    if download {
        args.push("-R");
    }
    Ok(iperf3_mbits(ns, &args, 10)?)
}

fn wait_ping(ns: &NetNs) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = ns
            .command("ping")
            .args(["-n", "-q", "-c", "1", "-W", "1", SERVICE])
            .stdout(std::process::Stdio::null())
            .status()?
            .success();
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the tunnel never carried a ping".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Restarts the daemon with the VPN-interface programs attached or not.
fn restart(daemon: &mut Daemon, attached: bool) -> Result<(), BoxError> {
    daemon.stop();
    let path = daemon.config_path();
    let text = std::fs::read_to_string(&path)?;
    let line = "vpn_interface = \"phnone0\"\n";
    let text = text.replace(line, "");
    let text = if attached {
        text
    } else {
        text.replace("[datapath]\n", &format!("[datapath]\n{line}"))
    };
    std::fs::write(&path, text)?;
    daemon.restart();
    Ok(())
}

pub fn run(cli: &Cli) -> Result<(), BoxError> {
    let server = NetNs::new("bts");
    let client = NetNs::new("btc");
    let upstream = NetNs::new("btu");
    veth(&server, "a0", &client, "eth0");
    veth(&server, "up0", &upstream, "srv0");
    server.ip(&["addr", "add", "192.0.2.1/28", "dev", "a0"]);
    server.ip(&["addr", "add", "203.0.113.1/24", "dev", "up0"]);
    client.ip(&["addr", "add", "192.0.2.2/28", "dev", "eth0"]);
    client.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    upstream.ip(&["addr", "add", &format!("{SERVICE}/24"), "dev", "srv0"]);
    upstream.ip(&["route", "add", "default", "via", "203.0.113.1"]);
    let _iperf = Process::spawn(
        "iperf3 server",
        upstream.command("iperf3").args(["-s", "-B", SERVICE]),
    );
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new("a0", bpffs.path());
    config.wireguard = Some(WireguardSettings::new("198.51.100.0/24", "192.0.2.1"));
    let mut daemon = Daemon::start(&server, &config);
    for name in ["fast", "slow"] {
        api(
            &daemon,
            &["core", "add_client", &format!("client_name={name}")],
        );
    }
    let rules: Vec<String> = (0..16)
        .map(|i| format!("allow tcp 192.0.2.{i}/32 443"))
        .collect();
    api(
        &daemon,
        &[
            "core",
            "set_client_acl",
            "client_name=slow",
            &format!("rules={}", serde_json::to_string(&rules)?),
        ],
    );
    api(
        &daemon,
        &[
            "core",
            "set_client_policy",
            "client_name=slow",
            "download_kbps=10000",
            "upload_kbps=10000",
        ],
    );
    let export = api(&daemon, &["core", "export_client", "client_name=fast"]);
    let _fast = WgQuickClient::up(
        &client,
        export["config"].as_str().ok_or("no client config")?,
    );
    wait_ping(&client)?;
    let secs = 4;
    let rounds = cli.rounds.clamp(1, 15);
    // [attached][download] samples.
    let mut samples = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    for round in 0..rounds {
        // The order alternates (with, without; then without, with): a drift of the machine
        // over the run then weighs on both alike.
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for attached in order {
            if round > 0 || !attached {
                restart(&mut daemon, attached)?;
                wait_ping(&client)?;
            }
            for download in [true, false] {
                samples[usize::from(attached)][usize::from(download)]
                    .push(iperf(&client, download, secs)?);
            }
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut rows = Vec::new();
    let mut round_rows = Vec::new();
    for (download, label) in [(true, "download (server to client)"), (false, "upload")] {
        let (with, without) = (
            &samples[1][usize::from(download)],
            &samples[0][usize::from(download)],
        );
        // Each round's own ratio: the two variants of a round ran back to back, so a drift of
        // the machine over the run cancels out of it.
        let ratios: Vec<f64> = with.iter().zip(without).map(|(w, o)| w / o).collect();
        rows.push(format!(
            "| {label} | {:.0} | {:.0} | {:.1} % | {:.1} % |",
            median(with),
            median(without),
            median(with) / median(without) * 100.0,
            median(&ratios) * 100.0
        ));
        for (round, (w, o)) in with.iter().zip(without).enumerate() {
            round_rows.push(format!(
                "| {label} | {} | {w:.0} | {o:.0} | {:.1} % |",
                round + 1,
                w / o * 100.0
            ));
        }
    }
    table(
        "An unlimited client's tunnel throughput with the VPN-interface programs (iperf3)",
        &format!(
            "the real daemon (embedded WireGuard) and a wg-quick (wireguard-go) client in namespaces, one TCP stream to iperf3 in an upstream namespace, {secs} s after a first second left out; another client holds a 10 Mbit/s limit and 16 rules; {rounds} rounds with and without the programs interleaved, in alternating order (a restart between), medians"
        ),
        "| direction | Mbit/s with (median) | Mbit/s without (median) | with / without, medians | with / without, median of the rounds' ratios |\n| --- | ---: | ---: | ---: | ---: |",
        &rows,
    );
    table(
        "The rounds",
        "each round's two variants, back to back",
        "| direction | round | Mbit/s with | Mbit/s without | with / without |\n| --- | ---: | ---: | ---: | ---: |",
        &round_rows,
    );
    Ok(())
}

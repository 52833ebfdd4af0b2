//! `core`: the WireGuard server with many clients, in-process, in a namespace of its own: the
//! work the `core` actions do, without the socket round trip.

use std::time::Instant;

use phantom_daemon::{config::WireguardConfig, core::Server};
use phantom_tests::{NetNs, unique_ifname};

use crate::{
    BoxError, Cli,
    report::{percentile, table},
};

pub fn run(cli: &Cli) -> Result<(), BoxError> {
    let ns = NetNs::new("phbench-core");
    let state = tempfile::Builder::new().prefix("phantom-bench").tempdir()?;
    let n = cli.clients;
    let config = WireguardConfig {
        interface: unique_ifname("phbw"),
        subnet: "198.18.0.0/18".into(),
        endpoint: "192.0.2.1".into(),
        ..WireguardConfig::default()
    };
    let state_dir = state.path().to_path_buf();
    let rows = ns.run(move || -> Result<Vec<String>, BoxError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let server = Server::start(&config, &state_dir).await?;
            let mut add = Vec::with_capacity(n as usize);
            for i in 0..n {
                let started = Instant::now();
                server
                    .add_client(&format!("client{i:05}"), None)
                    .await
                    .map_err(|e| format!("add_client: {e:?}"))?;
                add.push(started.elapsed().as_secs_f64() * 1e3);
            }
            let mut list = Vec::new();
            for page in 0..50usize {
                let started = Instant::now();
                let (clients, _) = server.store.page(page * 10 * 19 % (n as usize), 10, None)?;
                let live = server.live();
                std::hint::black_box((clients, live));
                list.push(started.elapsed().as_secs_f64() * 1e3);
            }
            let started = Instant::now();
            server
                .change_subnet(phantom_daemon::wg::Subnet::parse("198.18.64.0/18")?)
                .await?;
            let change = started.elapsed().as_secs_f64();
            server.shutdown();
            drop(server);
            // Start-up on a store of n clients: interface, n peers, address, NAT.
            let started = Instant::now();
            let server = Server::start(&config, &state_dir).await?;
            let startup = started.elapsed().as_secs_f64();
            let peers = server.device_state()?.peers.len();
            server.shutdown();
            Ok::<_, BoxError>(vec![
                format!("| add_client (store + live peer), {n} clients, p50 | {:.2} ms | <= 5 ms |", percentile(&mut add.clone(), 0.5)),
                format!("| add_client, p99 | {:.2} ms | |", percentile(&mut add, 0.99)),
                format!("| list_clients page of 10 (store + live peer state), p50 | {:.2} ms | <= 10 ms |", percentile(&mut list.clone(), 0.5)),
                format!("| list_clients page, p99 | {:.2} ms | |", percentile(&mut list, 0.99)),
                format!("| change_subnet, {n} clients | {:.2} s | <= 2 s |", change),
                format!("| start-up reconciliation, {n} clients ({peers} peers restored) | {:.2} s | <= 2 s |", startup),
            ])
        })
    })?;
    table(
        "WireGuard server with many clients (embedded userspace device)",
        "in-process calls of the core module in a namespace of its own; latencies over every add and 50 page reads",
        "| operation | measured | target |\n| --- | ---: | ---: |",
        &rows,
    );
    Ok(())
}

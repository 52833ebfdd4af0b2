//! The end-to-end test harness every Phantom test builds on, one file per concern:
//!
//! - `netns.rs` — [`NetNs`], [`veth`], [`GuardedLink`]: network namespaces and veth pairs,
//!   removed on `Drop`. Nothing here touches the host's own interfaces, routes or firewall:
//!   links are created directly inside the test's namespaces. [`BpffsDir`]: a private pin
//!   directory under /sys/fs/bpf, removed (and so every pinned map and link released) on
//!   `Drop`. Host-wide unique names ([`unique_name`], [`unique_ifname`]) and [`require_root`].
//! - `process.rs` — [`run`] (a command that must succeed) and [`Process`] (a background
//!   process killed on `Drop`).
//! - `daemon.rs` — [`Daemon`]: the real `phantomd` binary started inside a namespace on a temp
//!   state dir with its own socket; stopped with SIGTERM or `kill -9`, always killed on
//!   `Drop`. [`ApiClient`] and [`phantom_api`]: the admin socket, raw and through the real CLI.
//! - `wg_client.rs` — [`WgQuickClient`]: a stock `wg-quick` client in a namespace.
//!   `two_clients.rs` — [`TwoClients`]: two clients on links of their own, a server and an
//!   upstream behind it; [`connect_client`] adds a client and brings it up.
//! - `disk.rs` — [`SmallDisk`]: a small tmpfs for a state directory, filled on demand and
//!   always unmounted on `Drop` (the disk-full faults).
//! - `dnsmasq.rs` — [`dnsmasq`] (and [`dnsmasq_with`] for other options) and [`dig`]. `redis.rs` — [`RedisServer`].
//! - `upstream.rs` — [`UpstreamSite`] and [`http_from`] (the sentry's two sides).
//!   `http.rs` — [`http_get`] and [`metric_value`].
//! - [`browser`]: headless Chromium over WebDriver (chromedriver) inside a namespace, and
//!   screenshots.
//! - [`wstunnel`]: a client reproducing the stock `wstunnel client` (ghost mode).
//!
//! Tests that need root call [`require_root`] first; without root they print why and return
//! (cargo counts them as passed; `cargo xtask test` reads the names they record in
//! `$PHANTOM_SKIPPED_TESTS` and counts them as skipped).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

pub mod browser;
mod daemon;
mod disk;
mod dnsmasq;
mod http;
mod iperf;
mod netns;
mod one_client;
mod process;
mod redis;
mod two_clients;
mod upstream;
mod wg_client;
pub mod wstunnel;

pub use daemon::{
    ApiClient, Daemon, DaemonConfig, WireguardSettings, api, api_err, bin_dir, mint_token,
    phantom_api,
};
pub use disk::SmallDisk;
pub use dnsmasq::{DnsmasqOptions, dig, dnsmasq, dnsmasq_with};
pub use http::{http_get, metric_value};
pub use iperf::iperf3_mbits;
pub use netns::{
    BpffsDir, GuardedLink, NetNs, SKIPPED_TESTS_ENV, UdpListener, require_root, unique_ifname,
    unique_name, veth,
};
pub use one_client::OneClient;
pub use process::{Process, run};
pub use redis::RedisServer;
pub use two_clients::{TwoClients, connect_client};
pub use upstream::{HttpReply, UpstreamSite, http_from};
pub use wg_client::WgQuickClient;

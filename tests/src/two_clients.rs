//! Two VPN clients, each on a link of its own to the server, and an upstream namespace behind
//! the server: the set-up of the tests that tell clients apart (per-client policy and limits,
//! the resolver's answers per client).

use crate::{Daemon, NetNs, WgQuickClient, api, veth};

/// The server (links `a0` to alice, `b0` to bob, `up0` to the upstream), each client with a
/// default route over its link, and the upstream with one address on `srv0` and a default
/// route back through the server. Every namespace is removed on `Drop`.
pub struct TwoClients {
    pub server: NetNs,
    pub alice: NetNs,
    pub bob: NetNs,
    pub upstream: NetNs,
}

impl TwoClients {
    /// The server's address on alice's link: the endpoint the clients are given.
    pub const ENDPOINT: &'static str = "192.0.2.1";

    /// The upstream gets `upstream_addr`, which must be in 203.0.113.0/24 (the server is .1).
    pub fn new(upstream_addr: &str) -> Self {
        let t = Self {
            server: NetNs::new("phs"),
            alice: NetNs::new("pha"),
            bob: NetNs::new("phb"),
            upstream: NetNs::new("phu"),
        };
        veth(&t.server, "a0", &t.alice, "eth0");
        veth(&t.server, "b0", &t.bob, "eth0");
        veth(&t.server, "up0", &t.upstream, "srv0");
        t.server.ip(&["addr", "add", "192.0.2.1/28", "dev", "a0"]);
        t.server.ip(&["addr", "add", "192.0.2.17/28", "dev", "b0"]);
        t.server
            .ip(&["addr", "add", "203.0.113.1/24", "dev", "up0"]);
        t.alice.ip(&["addr", "add", "192.0.2.2/28", "dev", "eth0"]);
        t.alice.ip(&["route", "add", "default", "via", "192.0.2.1"]);
        t.bob.ip(&["addr", "add", "192.0.2.18/28", "dev", "eth0"]);
        t.bob.ip(&["route", "add", "default", "via", "192.0.2.17"]);
        t.upstream
            .ip(&["addr", "add", &format!("{upstream_addr}/24"), "dev", "srv0"]);
        t.upstream
            .ip(&["route", "add", "default", "via", "203.0.113.1"]);
        t
    }
}

/// Adds the client `name` and brings up a stock client in `ns` with the configuration the
/// daemon exports for it.
pub fn connect_client(daemon: &Daemon, ns: &NetNs, name: &str) -> WgQuickClient {
    api(
        daemon,
        &["core", "add_client", &format!("client_name={name}")],
    );
    let export = api(
        daemon,
        &["core", "export_client", &format!("client_name={name}")],
    );
    WgQuickClient::up(ns, export["config"].as_str().unwrap_or_default())
}

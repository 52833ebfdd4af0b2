//! One VPN client on a link to the server and an upstream namespace behind the server with
//! several addresses: the set-up of the tests that watch what one client's traffic meets on
//! its way out (the encrypted-DNS and SNI filters).

use crate::{NetNs, veth};

/// The server (link `a0` to alice, `up0` to the upstream), alice with a default route over her
/// link, and the upstream with the given addresses on `up0` and a default route back through
/// the server. Every namespace is removed on `Drop`.
pub struct OneClient {
    pub server: NetNs,
    pub alice: NetNs,
    pub upstream: NetNs,
}

impl OneClient {
    /// The server's address on alice's link: the endpoint the client is given.
    pub const ENDPOINT: &'static str = "192.0.2.1";

    /// The upstream gets `upstream_addrs`, which must be in 203.0.113.0/24 (the server is .1).
    pub fn new(upstream_addrs: &[&str]) -> Self {
        let t = Self {
            server: NetNs::new("phs"),
            alice: NetNs::new("pha"),
            upstream: NetNs::new("phu"),
        };
        veth(&t.server, "a0", &t.alice, "eth0");
        veth(&t.server, "up0", &t.upstream, "up0");
        t.server.ip(&["addr", "add", "192.0.2.1/28", "dev", "a0"]);
        t.server
            .ip(&["addr", "add", "203.0.113.1/24", "dev", "up0"]);
        t.alice.ip(&["addr", "add", "192.0.2.2/28", "dev", "eth0"]);
        t.alice.ip(&["route", "add", "default", "via", "192.0.2.1"]);
        for a in upstream_addrs {
            t.upstream
                .ip(&["addr", "add", &format!("{a}/24"), "dev", "up0"]);
        }
        t.upstream
            .ip(&["route", "add", "default", "via", "203.0.113.1"]);
        t
    }
}

//! Finds the uplink interface. Reads the calling thread's network namespace.

use crate::error::Error;

/// The interface of the IPv4 default route, else of the IPv6 one.
pub fn default_route_interface() -> Result<String, Error> {
    if let Ok(text) = std::fs::read_to_string("/proc/net/route")
        && let Some(name) = ipv4_default(&text)
    {
        return Ok(name);
    }
    if let Ok(text) = std::fs::read_to_string("/proc/net/ipv6_route")
        && let Some(name) = ipv6_default(&text)
    {
        return Ok(name);
    }
    Err(Error::config(
        "datapath.uplink = \"auto\" but there is no default route; name the interface",
    ))
}

fn ipv4_default(text: &str) -> Option<String> {
    // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

fn ipv6_default(text: &str) -> Option<String> {
    // dest dest_plen src src_plen next_hop metric refcnt use flags iface
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() >= 10 && f[0].bytes().all(|b| b == b'0') && f[1] == "00" && f[9] != "lo")
            .then(|| f[9].to_string())
    })
}

pub fn ifindex(name: &str) -> Result<u32, Error> {
    nix::net::if_::if_nametoindex(name)
        .map_err(|e| Error::config(format!("uplink interface {name:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ipv4_default() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    eth1\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(ipv4_default(text).as_deref(), Some("eth1"));
    }

    #[test]
    fn finds_ipv6_default() {
        let text = "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
                    00000000000000000000000000000000 00 00000000000000000000000000000000 00 20010db8000000000000000000000001 00000400 00000001 00000000 00000003     eth2\n";
        assert_eq!(ipv6_default(text).as_deref(), Some("eth2"));
    }
}

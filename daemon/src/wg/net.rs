//! The server side of the tunnel in the host's network: the interface's address, MTU and link
//! state (rtnetlink), IP forwarding, and NAT for the client subnet (nftables, a table of our
//! own, replaced atomically so it is never duplicated).

use std::{
    io::Write,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use futures_util::TryStreamExt;
use rtnetlink::LinkUnspec;

use super::{WgError, subnet::Subnet};
use crate::error::Error;

/// Our nftables table; nothing else of the host's ruleset is touched.
pub const NFT_TABLE: &str = "phantom";

/// Gives `iface` exactly the server address, sets the MTU and brings it up.
pub async fn configure_interface(iface: &str, subnet: &Subnet, mtu: u16) -> Result<(), WgError> {
    let index =
        nix::net::if_::if_nametoindex(iface).map_err(|source| WgError::NoSuchInterface {
            iface: iface.to_string(),
            source,
        })?;
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(conn);
    let result = async {
        // Remove addresses that are not the server's (a subnet change, or a stranger).
        let mut addrs = handle.address().get().set_link_index_filter(index).execute();
        let mut stale = Vec::new();
        while let Some(msg) = addrs.try_next().await.map_err(WgError::Netlink)? {
            let ours = msg.attributes.iter().any(|a| {
                matches!(a, rtnetlink::packet_route::address::AddressAttribute::Address(std::net::IpAddr::V4(ip))
                    if *ip == subnet.server_ip() && msg.header.prefix_len == subnet.prefix)
            });
            if !ours {
                stale.push(msg);
            }
        }
        for msg in stale {
            handle.address().del(msg).execute().await.map_err(WgError::Netlink)?;
        }
        handle
            .address()
            .add(index, subnet.server_ip().into(), subnet.prefix)
            .replace()
            .execute()
            .await
            .map_err(WgError::Netlink)?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(u32::from(mtu)).up().build())
            .execute()
            .await
            .map_err(WgError::Netlink)
    }
    .await;
    task.abort();
    result
}

/// IPv4 routes of this namespace that overlap `subnet`, except those on `own_iface`
/// (`(destination, interface)`). Default routes do not count.
pub fn overlapping_routes(subnet: &Subnet, own_iface: &str) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string("/proc/net/route") else {
        return Vec::new();
    };
    let hex = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::from_be);
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || f[0] == own_iface {
                return None;
            }
            let (dest, mask) = (hex(f[1])?, hex(f[7])?);
            if mask == 0 {
                return None;
            }
            let shorter = mask & Subnet::mask_of(subnet.prefix);
            (dest & shorter == u32::from(subnet.network) & shorter).then(|| {
                (
                    format!("{}/{}", Ipv4Addr::from(dest), mask.count_ones()),
                    f[0].to_string(),
                )
            })
        })
        .collect()
}

/// Turns on IPv4 forwarding in this network namespace.
pub fn enable_forwarding() -> Result<(), WgError> {
    let path = std::path::Path::new("/proc/sys/net/ipv4/ip_forward");
    std::fs::write(path, "1").map_err(|e| Error::io(path, e).into())
}

fn nft(script: &str) -> Result<(), WgError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(WgError::NftSpawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(WgError::NftIo)?;
    }
    let out = child.wait_with_output().map_err(WgError::NftIo)?;
    if !out.status.success() {
        return Err(WgError::NftRefused {
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Rules other modules put into our table (the multihop exit's NAT), in front of core's own.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NatExtension {
    pub postrouting: Vec<String>,
    pub forward: Vec<String>,
}

/// What our table holds. Kept here because the table is always replaced whole: a core
/// change (restart_service, a subnet change) must carry the other modules' rules along.
#[derive(Default)]
struct TableParts {
    core: Option<(String, Subnet)>,
    extensions: std::collections::BTreeMap<&'static str, NatExtension>,
}

static TABLE: std::sync::Mutex<TableParts> = std::sync::Mutex::new(TableParts {
    core: None,
    extensions: std::collections::BTreeMap::new(),
});

fn table_parts() -> std::sync::MutexGuard<'static, TableParts> {
    match TABLE.lock() {
        Ok(t) => t,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn render_table(parts: &TableParts) -> String {
    let mut postrouting = String::new();
    let mut forward = String::new();
    for ext in parts.extensions.values() {
        for rule in &ext.postrouting {
            postrouting.push_str(&format!("    {rule}\n"));
        }
        for rule in &ext.forward {
            forward.push_str(&format!("    {rule}\n"));
        }
    }
    if let Some((iface, subnet)) = &parts.core {
        postrouting.push_str(&format!(
            "    ip saddr {subnet} oifname != \"{iface}\" masquerade comment \"phantom: VPN clients out\"\n"
        ));
        forward.push_str(&format!(
            "    iifname \"{iface}\" accept\n    oifname \"{iface}\" ct state established,related accept\n"
        ));
    }
    format!(
        "table inet {NFT_TABLE}\n\
         delete table inet {NFT_TABLE}\n\
         table inet {NFT_TABLE} {{\n\
           chain postrouting {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
         {postrouting}\
           }}\n\
           chain forward {{\n\
             type filter hook forward priority filter; policy accept;\n\
         {forward}\
           }}\n\
         }}\n"
    )
}

/// Masquerades the client subnet out of every interface but the tunnel, and lets forwarded
/// client traffic through. The table is replaced in one transaction: never duplicated, never
/// half there.
pub fn install_nat(iface: &str, subnet: &Subnet) -> Result<(), WgError> {
    let mut parts = table_parts();
    let previous = parts.core.replace((iface.to_string(), *subnet));
    let result = nft(&render_table(&parts));
    if result.is_err() {
        parts.core = previous;
    }
    result
}

/// Puts `owner`'s rules into our table (`None` takes them out), keeping everything else.
pub fn set_nat_extension(owner: &'static str, ext: Option<NatExtension>) -> Result<(), WgError> {
    let mut parts = table_parts();
    let previous = match ext {
        Some(ext) => parts.extensions.insert(owner, ext),
        None => parts.extensions.remove(owner),
    };
    if parts.core.is_none() && parts.extensions.is_empty() {
        return nft(&format!(
            "table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"
        ));
    }
    let result = nft(&render_table(&parts));
    if result.is_err() {
        match previous {
            Some(p) => parts.extensions.insert(owner, p),
            None => parts.extensions.remove(owner),
        };
    }
    result
}

/// Removes our table (shutdown).
pub fn remove_nat() -> Result<(), WgError> {
    let mut parts = table_parts();
    parts.core = None;
    parts.extensions.clear();
    nft(&format!(
        "table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"
    ))
}

/// Our table as nft lists it (JSON), for `get_firewall_status`.
pub fn nat_ruleset() -> Result<serde_json::Value, WgError> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "inet", NFT_TABLE])
        .output()
        .map_err(WgError::NftSpawn)?;
    if !out.status.success() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(&out.stdout).map_err(WgError::NftOutput)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_modules_rules_come_first_and_survive_a_core_change()
    -> Result<(), Box<dyn std::error::Error>> {
        let mut parts = TableParts {
            core: Some(("wg0".into(), Subnet::parse("10.8.0.0/24")?)),
            ..Default::default()
        };
        parts.extensions.insert(
            "multihop",
            NatExtension {
                postrouting: vec!["oifname \"wg_vpn\" masquerade".into()],
                forward: vec!["iifname \"wg_vpn\" drop".into()],
            },
        );
        let text = render_table(&parts);
        let ext = text
            .find("oifname \"wg_vpn\" masquerade")
            .ok_or("no extension")?;
        let core = text.find("ip saddr 10.8.0.0/24").ok_or("no core rule")?;
        assert!(ext < core, "{text}");
        assert_eq!(text.matches("delete table inet phantom").count(), 1);
        parts.core = Some(("wg0".into(), Subnet::parse("10.9.0.0/24")?));
        assert!(render_table(&parts).contains("iifname \"wg_vpn\" drop"));
        Ok(())
    }
}

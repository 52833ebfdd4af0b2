//! The exit's place in the host's routing, all through rtnetlink: the interface address, the
//! exit table (a default route through the exit and, behind it, an `unreachable` default so
//! marked traffic never falls back to the server's own uplink), and the fwmark rule.
//!
//! Everything we add carries our own routing protocol number, so "ours" is what the kernel
//! says is ours: clean-up and the exactly-once checks never touch an operator's entries.

use std::{future::Future, net::Ipv4Addr};

use futures_util::{Stream, TryStreamExt};
use rtnetlink::{
    Handle, IpVersion, LinkUnspec, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        route::{RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
};

/// The routing protocol number on our rules and routes (`ip rule` / `ip route` show it as
/// `proto 109`).
pub const PROTO_PHANTOM: u8 = 109;
/// Metric of the fail-closed `unreachable` default: behind the exit's route.
pub const KILL_SWITCH_METRIC: u32 = 4_000_000_000;

/// What the exit's routing consists of.
#[derive(Clone, Debug)]
pub struct Plan {
    pub interface: String,
    pub address: (Ipv4Addr, u8),
    pub mtu: u16,
    pub table: u32,
    pub mark: u32,
    pub priority: u32,
}

/// What went wrong putting the exit into the host's routing, or taking it out.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// No rtnetlink socket.
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("interface {name}: {source}")]
    NoSuchInterface {
        name: String,
        #[source]
        source: nix::errno::Errno,
    },
    /// The kernel refused a request; `what` names it (`rule`, `delete route`, `addresses`...).
    #[error("{what}: netlink: {source}")]
    Netlink {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    /// The exit interface's reverse-path filter setting.
    #[error("{path}: {source}")]
    RpFilter {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The error of the netlink request `what`.
fn nl(what: &'static str) -> impl Fn(rtnetlink::Error) -> RoutingError {
    move |source| RoutingError::Netlink { what, source }
}

/// Runs `f` with a fresh rtnetlink connection.
async fn with_handle<T, F, Fut>(f: F) -> Result<T, RoutingError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, RoutingError>>,
{
    let (conn, handle, _) = rtnetlink::new_connection().map_err(RoutingError::Socket)?;
    let task = tokio::spawn(conn);
    let result = f(handle).await;
    task.abort();
    result
}

fn ifindex(name: &str) -> Result<u32, RoutingError> {
    nix::net::if_::if_nametoindex(name).map_err(|source| RoutingError::NoSuchInterface {
        name: name.to_string(),
        source,
    })
}

/// The exit interface: exactly its address, MTU, up; loose reverse-path filtering, since
/// answers arrive on it from addresses the main table routes elsewhere.
pub async fn configure_interface(plan: &Plan) -> Result<(), RoutingError> {
    let index = ifindex(&plan.interface)?;
    let (ip, prefix) = plan.address;
    with_handle(|handle| async move {
        let mut addrs = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut stale = Vec::new();
        while let Some(msg) = addrs.try_next().await.map_err(nl("addresses"))? {
            let ours = msg.attributes.iter().any(
                |a| matches!(a, AddressAttribute::Address(std::net::IpAddr::V4(a)) if *a == ip),
            ) && msg.header.prefix_len == prefix;
            if !ours {
                stale.push(msg);
            }
        }
        for msg in stale {
            handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(nl("address"))?;
        }
        handle
            .address()
            .add(index, ip.into(), prefix)
            .replace()
            .execute()
            .await
            .map_err(nl("address"))?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .mtu(u32::from(plan.mtu))
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("link"))
    })
    .await?;
    let path = format!("/proc/sys/net/ipv4/conf/{}/rp_filter", plan.interface);
    std::fs::write(&path, "2").map_err(|source| RoutingError::RpFilter { path, source })
}

fn table_of(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn rule_table(msg: &RuleMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

/// The entries of a netlink dump (`what`) that `ours` picks.
async fn collect_ours<T>(
    mut dump: impl Stream<Item = Result<T, rtnetlink::Error>> + Unpin,
    what: &'static str,
    ours: impl Fn(&T) -> bool,
) -> Result<Vec<T>, RoutingError> {
    let mut picked = Vec::new();
    while let Some(msg) = dump.try_next().await.map_err(nl(what))? {
        if ours(&msg) {
            picked.push(msg);
        }
    }
    Ok(picked)
}

async fn our_routes(handle: &Handle, table: u32) -> Result<Vec<RouteMessage>, RoutingError> {
    let dump = handle
        .route()
        .get(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(table)
                .build(),
        )
        .execute();
    // Dumps return every table; keep ours in the exit table.
    collect_ours(dump, "routes", |msg| {
        table_of(msg) == table && msg.header.protocol == RouteProtocol::Other(PROTO_PHANTOM)
    })
    .await
}

async fn our_rules(handle: &Handle) -> Result<Vec<RuleMessage>, RoutingError> {
    let dump = handle.rule().get(IpVersion::V4).execute();
    collect_ours(dump, "rules", |msg| {
        msg.attributes.iter().any(|a| {
            matches!(
                a,
                RuleAttribute::Protocol(RouteProtocol::Other(PROTO_PHANTOM))
            )
        })
    })
    .await
}

/// Deletes `entries` one by one with `delete` (a rule's or a route's request), stopping at
/// the first the kernel refuses; `what` names the request in that error.
async fn delete_all<T, Fut>(
    entries: Vec<T>,
    what: &'static str,
    delete: impl Fn(T) -> Fut,
) -> Result<(), RoutingError>
where
    Fut: Future<Output = Result<(), rtnetlink::Error>>,
{
    for entry in entries {
        delete(entry).await.map_err(nl(what))?;
    }
    Ok(())
}

async fn delete_rules(handle: &Handle, rules: Vec<RuleMessage>) -> Result<(), RoutingError> {
    delete_all(rules, "delete rule", |msg| handle.rule().del(msg).execute()).await
}

async fn delete_routes(handle: &Handle, routes: Vec<RouteMessage>) -> Result<(), RoutingError> {
    delete_all(routes, "delete route", |msg| {
        handle.route().del(msg).execute()
    })
    .await
}

/// Splits our entries into "the first one that is what we want is there" and the rest, which
/// go: each entry of ours exists exactly once.
fn keep_first<T>(entries: Vec<T>, wanted: impl Fn(&T) -> bool) -> (bool, Vec<T>) {
    let mut kept = false;
    let mut rest = Vec::new();
    for e in entries {
        if !kept && wanted(&e) {
            kept = true;
        } else {
            rest.push(e);
        }
    }
    (kept, rest)
}

fn metric(msg: &RouteMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Priority(p) => Some(*p),
        _ => None,
    })
}

fn oif(msg: &RouteMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

/// Removes every rule and exit-table route of ours; returns how many of each went.
pub async fn clear(table: u32) -> Result<(usize, usize), RoutingError> {
    with_handle(|handle| async move {
        let rules = our_rules(&handle).await?;
        let n_rules = rules.len();
        delete_rules(&handle, rules).await?;
        let routes = our_routes(&handle, table).await?;
        let n_routes = routes.len();
        delete_routes(&handle, routes).await?;
        Ok((n_rules, n_routes))
    })
    .await
}

fn rule_matches(msg: &RuleMessage, plan: &Plan) -> bool {
    let has = |want: &RuleAttribute| msg.attributes.iter().any(|a| a == want);
    msg.header.action == RuleAction::ToTable
        && rule_table(msg) == plan.table
        && has(&RuleAttribute::FwMark(plan.mark))
        && has(&RuleAttribute::Priority(plan.priority))
}

/// The rule (marked packets look up the exit table) and the fail-closed `unreachable`
/// default in that table, each exactly once: entries that are already right stay (no gap
/// for traffic), any other rule of ours goes. Needs no interface.
pub async fn apply_rule_and_kill_switch(plan: &Plan) -> Result<(), RoutingError> {
    let plan = plan.clone();
    with_handle(|handle| async move {
        let proto = RouteProtocol::Other(PROTO_PHANTOM);
        let unreachable: Vec<RouteMessage> = our_routes(&handle, plan.table)
            .await?
            .into_iter()
            .filter(|m| m.header.kind == RouteType::Unreachable)
            .collect();
        let (have_kill, extra) = keep_first(unreachable, |m| {
            metric(m) == Some(KILL_SWITCH_METRIC) && m.header.destination_prefix_length == 0
        });
        delete_routes(&handle, extra).await?;
        if !have_kill {
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(plan.table)
                .protocol(proto)
                .kind(RouteType::Unreachable)
                .priority(KILL_SWITCH_METRIC)
                .build();
            handle
                .route()
                .add(route)
                .execute()
                .await
                .map_err(nl("unreachable route"))?;
        }
        let (have_rule, extra) = keep_first(our_rules(&handle).await?, |m| rule_matches(m, &plan));
        delete_rules(&handle, extra).await?;
        if !have_rule {
            let mut add = handle
                .rule()
                .add()
                .v4()
                .fw_mark(plan.mark)
                .priority(plan.priority)
                .table_id(plan.table)
                .action(RuleAction::ToTable);
            add.message_mut()
                .attributes
                .push(RuleAttribute::Protocol(proto));
            add.execute().await.map_err(nl("rule"))?;
        }
        Ok(())
    })
    .await
}

/// The default route through the exit interface, exactly once (a recreated interface has a
/// new index: a route to the old one goes).
pub async fn apply_exit_route(plan: &Plan) -> Result<(), RoutingError> {
    let index = ifindex(&plan.interface)?;
    let plan = plan.clone();
    with_handle(|handle| async move {
        let routes: Vec<RouteMessage> = our_routes(&handle, plan.table)
            .await?
            .into_iter()
            .filter(|m| m.header.kind != RouteType::Unreachable)
            .collect();
        let (have_exit, extra) = keep_first(routes, |m| {
            m.header.kind == RouteType::Unicast
                && oif(m) == Some(index)
                && m.header.destination_prefix_length == 0
        });
        delete_routes(&handle, extra).await?;
        if !have_exit {
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(plan.table)
                .protocol(RouteProtocol::Other(PROTO_PHANTOM))
                .scope(RouteScope::Link)
                .output_interface(index)
                .pref_source(plan.address.0)
                .build();
            handle
                .route()
                .add(route)
                .execute()
                .await
                .map_err(nl("exit route"))?;
        }
        Ok(())
    })
    .await
}

/// How many of our rules and exit-table routes the kernel holds, and whether the exit route
/// is there (the link going away takes it with it).
pub async fn census(plan: &Plan) -> Result<(usize, usize, bool), RoutingError> {
    let index = nix::net::if_::if_nametoindex(plan.interface.as_str()).ok();
    let table = plan.table;
    with_handle(|handle| async move {
        let rules = our_rules(&handle).await?.len();
        let routes = our_routes(&handle, table).await?;
        let exit_route = routes
            .iter()
            .any(|m| m.header.kind == RouteType::Unicast && index.is_some() && oif(m) == index);
        Ok((rules, routes.len(), exit_route))
    })
    .await
}

/// Deletes a link of that name if one is left (an exit interface a crash left behind).
pub async fn delete_link(name: &str) -> Result<bool, RoutingError> {
    let Ok(index) = nix::net::if_::if_nametoindex(name) else {
        return Ok(false);
    };
    with_handle(|handle| async move {
        handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(nl("delete link"))?;
        Ok(true)
    })
    .await
}

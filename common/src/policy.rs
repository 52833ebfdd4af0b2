//! Per-client traffic policy on WireGuard ingress (`tc_client_policy`): ordered allow/deny
//! rules per client and a switch that isolates clients from each other. [`decide`] is the one
//! decision: the kernel program runs it on every packet and the daemon's `core test_policy`
//! runs the same function, so the answer and what packets do cannot drift apart.

/// Rules one client may have.
pub const MAX_ACL_RULES: usize = 16;
/// Clients with rules the kernel holds.
pub const MAX_ACL_CLIENTS: u32 = 65_536;

pub const PROTO_ANY: u8 = 0;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const ACTION_DENY: u8 = 0;
pub const ACTION_ALLOW: u8 = 1;

/// One rule: destination network, protocol, destination port range, action. A rule with a
/// port range narrower than everything matches TCP and UDP only (ICMP has no port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclRule {
    /// Network byte order.
    pub net: [u8; 4],
    pub mask: [u8; 4],
    pub port_lo: u16,
    pub port_hi: u16,
    /// `PROTO_*`.
    pub proto: u8,
    /// `ACTION_*`.
    pub action: u8,
    pub _pad: [u8; 2],
}

/// A client's rules, in order: the first that matches decides; none matching allows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientAcl {
    pub count: u32,
    pub _pad: u32,
    pub rules: [AclRule; MAX_ACL_RULES],
}

/// The switches (index 0 of `PH_CP_CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    /// 1 = client-to-client traffic dropped.
    pub isolate: u32,
    /// The client subnet (network byte order) and its mask; mask 0 = none.
    pub v4_net: [u8; 4],
    pub v4_mask: [u8; 4],
    /// The server's own address in the subnet: always reachable.
    pub server: [u8; 4],
    /// The VPN interface's link-layer header length (0 for WireGuard): one lookup fewer per
    /// packet than the shared per-interface map.
    pub l2_len: u32,
}

/// What the policy did. The discriminant is the counter slot.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyVerdict {
    /// A rule allowed it.
    Allowed = 0,
    /// A rule denied it: dropped.
    Denied = 1,
    /// No rule matched (or the client has none): allowed.
    NoMatch = 2,
    /// Client to client while isolation is on: dropped.
    Isolated = 3,
    /// Not IPv4 from a client, or not parsable: passed untouched.
    NotInspected = 4,
}

impl PolicyVerdict {
    pub const ALL: [PolicyVerdict; 5] = [
        PolicyVerdict::Allowed,
        PolicyVerdict::Denied,
        PolicyVerdict::NoMatch,
        PolicyVerdict::Isolated,
        PolicyVerdict::NotInspected,
    ];
    pub const SLOTS: u32 = 8;

    pub const fn name(self) -> &'static str {
        match self {
            PolicyVerdict::Allowed => "allowed",
            PolicyVerdict::Denied => "denied",
            PolicyVerdict::NoMatch => "no_match",
            PolicyVerdict::Isolated => "isolated",
            PolicyVerdict::NotInspected => "not_inspected",
        }
    }

    /// Whether the packet is dropped.
    pub const fn drops(self) -> bool {
        matches!(self, PolicyVerdict::Denied | PolicyVerdict::Isolated)
    }
}

#[inline(always)]
fn in_net(addr: [u8; 4], net: [u8; 4], mask: [u8; 4]) -> bool {
    u32::from_ne_bytes(addr) & u32::from_ne_bytes(mask) == u32::from_ne_bytes(net)
}

/// Isolation first (client to another client, not the server), then the client's rules in
/// order. Returns the verdict and the index of the deciding rule (`u32::MAX`: none).
/// `dport` is ignored for ICMP.
#[inline(always)]
pub fn decide(
    cfg: &PolicyConfig,
    acl: Option<&ClientAcl>,
    dst: [u8; 4],
    proto: u8,
    dport: u16,
) -> (PolicyVerdict, u32) {
    if cfg.isolate != 0
        && u32::from_ne_bytes(cfg.v4_mask) != 0
        && in_net(dst, cfg.v4_net, cfg.v4_mask)
        && dst != cfg.server
    {
        return (PolicyVerdict::Isolated, u32::MAX);
    }
    let Some(acl) = acl else {
        return (PolicyVerdict::NoMatch, u32::MAX);
    };
    let has_port = proto == PROTO_TCP || proto == PROTO_UDP;
    let mut i = 0;
    while i < MAX_ACL_RULES {
        if i as u32 >= acl.count {
            break;
        }
        let r = &acl.rules[i];
        let proto_ok = r.proto == PROTO_ANY || r.proto == proto;
        let all_ports = r.port_lo == 0 && r.port_hi == u16::MAX;
        let port_ok = all_ports || (has_port && dport >= r.port_lo && dport <= r.port_hi);
        if proto_ok && port_ok && in_net(dst, r.net, r.mask) {
            return if r.action == ACTION_ALLOW {
                (PolicyVerdict::Allowed, i as u32)
            } else {
                (PolicyVerdict::Denied, i as u32)
            };
        }
        i += 1;
    }
    (PolicyVerdict::NoMatch, u32::MAX)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers and byte arrays only, no implicit padding (sizes checked in
    // the tests).
    unsafe impl aya::Pod for super::AclRule {}
    unsafe impl aya::Pod for super::ClientAcl {}
    unsafe impl aya::Pod for super::PolicyConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(net: [u8; 4], bits: u32, proto: u8, ports: (u16, u16), action: u8) -> AclRule {
        let mask = if bits == 0 {
            0
        } else {
            u32::MAX << (32 - bits)
        };
        AclRule {
            net,
            mask: mask.to_be_bytes(),
            port_lo: ports.0,
            port_hi: ports.1,
            proto,
            action,
            _pad: [0; 2],
        }
    }

    #[test]
    fn layouts() {
        assert_eq!(core::mem::size_of::<AclRule>(), 16);
        assert_eq!(core::mem::size_of::<ClientAcl>(), 8 + 16 * MAX_ACL_RULES);
        assert_eq!(core::mem::size_of::<PolicyConfig>(), 20);
    }

    #[test]
    fn first_match_wins_ports_bind_tcp_and_udp_and_isolation_comes_first() {
        let mut acl = ClientAcl::default();
        acl.rules[0] = rule([203, 0, 113, 0], 24, PROTO_TCP, (22, 22), ACTION_DENY);
        acl.rules[1] = rule([203, 0, 113, 0], 24, PROTO_ANY, (0, u16::MAX), ACTION_ALLOW);
        acl.rules[2] = rule([0, 0, 0, 0], 0, PROTO_ICMP, (0, u16::MAX), ACTION_DENY);
        acl.count = 3;
        let cfg = PolicyConfig {
            isolate: 1,
            v4_net: [198, 51, 100, 0],
            v4_mask: [255, 255, 255, 0],
            server: [198, 51, 100, 1],
            l2_len: 0,
        };
        let d = |dst, proto, port| decide(&cfg, Some(&acl), dst, proto, port);
        assert_eq!(
            d([203, 0, 113, 5], PROTO_TCP, 22),
            (PolicyVerdict::Denied, 0)
        );
        assert_eq!(
            d([203, 0, 113, 5], PROTO_TCP, 80),
            (PolicyVerdict::Allowed, 1)
        );
        assert_eq!(
            d([203, 0, 113, 5], PROTO_ICMP, 0),
            (PolicyVerdict::Allowed, 1)
        );
        assert_eq!(d([192, 0, 2, 9], PROTO_ICMP, 0), (PolicyVerdict::Denied, 2));
        assert_eq!(d([192, 0, 2, 9], PROTO_UDP, 53).0, PolicyVerdict::NoMatch);
        assert_eq!(
            d([198, 51, 100, 3], PROTO_TCP, 80).0,
            PolicyVerdict::Isolated
        );
        assert_eq!(
            d([198, 51, 100, 1], PROTO_UDP, 53).0,
            PolicyVerdict::NoMatch
        );
        // A port rule never matches ICMP.
        let mut icmp = ClientAcl::default();
        icmp.rules[0] = rule([0, 0, 0, 0], 0, PROTO_ANY, (1, 1000), ACTION_DENY);
        icmp.count = 1;
        assert_eq!(
            decide(&cfg, Some(&icmp), [192, 0, 2, 9], PROTO_ICMP, 0).0,
            PolicyVerdict::NoMatch
        );
        assert_eq!(
            decide(&cfg, Some(&icmp), [192, 0, 2, 9], PROTO_UDP, 999).0,
            PolicyVerdict::Denied
        );
        assert_eq!(
            decide(&cfg, None, [192, 0, 2, 9], PROTO_UDP, 999).0,
            PolicyVerdict::NoMatch
        );
    }
}

//! Types shared by Phantom's eBPF programs and the userspace daemon.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel writes these structs into maps and the
//! daemon reads them back byte for byte, so a field added here changes both sides at once.
#![no_std]

pub mod dns;
pub mod dns_filter;
pub mod net;
pub mod policy;
pub mod xdp;

/// Map and program names, shared so the daemon never spells them differently from the object.
/// BPF object names are limited to 15 characters.
pub mod names {
    /// Per-source counters (LRU, per-CPU).
    pub const SOURCES_MAP: &str = "PH_SOURCES";
    /// Clock, per-second series and counters by verdict (one per-CPU value).
    pub const COUNTERS_MAP: &str = "PH_COUNTERS";
    /// Allow and deny entries by source.
    pub const POLICY_MAP: &str = "PH_POLICY";
    /// Allow and deny entries by IPv6 prefix (`[sources] ipv6_prefix`): consulted for an IPv6
    /// source whose own address has no live entry.
    pub const POLICY_NET_MAP: &str = "PH_POLICY_NET";
    /// The guard's settings from the daemon (`GuardConfig`).
    pub const GUARD_CONFIG_MAP: &str = "PH_GUARD_CFG";
    /// Per-CPU cache of live denies in front of the policy map.
    pub const DENY_CACHE_MAP: &str = "PH_DENY_CACHE";
    /// Per-CPU cache of passed sources and their pending counts in front of the policy and
    /// per-source maps.
    pub const PASS_CACHE_MAP: &str = "PH_PASS_CACHE";
    /// Policy generation: bumped by the daemon after every write to the policy maps or the
    /// guard's settings (it retires cached denies and cached passes).
    pub const POLICY_GEN_MAP: &str = "PH_POLICY_GEN";
    /// Bitmap of protected TCP ports.
    pub const PORTS_MAP: &str = "PH_PORTS";
    /// Blocked domain hashes for the DNS answer filter.
    pub const DOMAINS_MAP: &str = "PH_DOMAINS";
    /// The installation's key of the domain hash (one entry).
    pub const DNS_KEY_MAP: &str = "PH_DNS_KEY";
    /// DNS filter verdict counters.
    pub const DNS_VERDICTS_MAP: &str = "PH_DNS_VERDICTS";
    /// DNS filter policy: dry run and the own resolver's mark.
    pub const DNS_POLICY_MAP: &str = "PH_DNS_POLICY";
    /// Clients with blocking switched off.
    pub const DNS_EXEMPT_MAP: &str = "PH_DNS_EXEMPT";
    /// Per-interface link-layer header length for the TC programs.
    pub const IFACES_MAP: &str = "PH_IFACES";
    /// Scratch space for the DNS filter (per-CPU).
    pub const DNS_SCRATCH_MAP: &str = "PH_DNS_SCRATCH";
    /// Multihop mark configuration.
    pub const MULTIHOP_MAP: &str = "PH_MULTIHOP";
    /// Multihop mark counters.
    pub const MULTIHOP_STATS_MAP: &str = "PH_MH_STATS";
    /// The guard attached to the uplink.
    pub const XDP_GUARD: &str = "xdp_guard";
    /// An XDP program that only returns `XDP_PASS`: the baseline of the benchmark.
    pub const XDP_BASELINE: &str = "xdp_baseline";
    /// DNS answer filter, TC egress on the VPN interface.
    pub const TC_DNS_FILTER: &str = "tc_dns_filter";
    /// Multihop mark, TC ingress on the VPN interface.
    pub const TC_MULTIHOP_MARK: &str = "tc_multihop_mark";
    /// Encrypted DNS to other resolvers dropped, TC ingress on the VPN interface.
    pub const TC_ENCRYPTED_DNS: &str = "tc_encrypted_dns";
    pub const ENC_DNS_MAP: &str = "PH_ENC_DNS";
    pub const ENC_DNS_RESOLVERS_MAP: &str = "PH_ENC_DNS_RESOLVERS";
    pub const DOH_V4_MAP: &str = "PH_DOH_V4";
    pub const DOH_V6_MAP: &str = "PH_DOH_V6";
    pub const ENC_DNS_STATS_MAP: &str = "PH_ENC_DNS_STATS";
    /// Per-client rules and isolation, TC ingress on the VPN interface.
    pub const TC_CLIENT_POLICY: &str = "tc_client_policy";
    pub const CLIENT_ACL_MAP: &str = "PH_CLIENT_ACL";
    pub const CLIENT_POLICY_CONFIG_MAP: &str = "PH_CP_CONFIG";
    pub const CLIENT_POLICY_STATS_MAP: &str = "PH_CP_STATS";
    /// Per-client rate limits and quotas (by client address): `tc_client_policy` meters what
    /// clients send, `tc_client_limit` (TC egress on the VPN interface) what they receive.
    pub const CLIENT_LIMIT_MAP: &str = "PH_CLIENT_LIMIT";
    pub const CLIENT_FLAGS_MAP: &str = "PH_CLIENT_FLAGS";
    pub const CLIENT_DROPS_MAP: &str = "PH_CLIENT_DROPS";
    pub const TC_CLIENT_LIMIT: &str = "tc_client_limit";
    /// The SNI filter inside `tc_encrypted_dns`: its switches, ECH front names and counters.
    pub const SNI_MAP: &str = "PH_SNI";
    pub const ECH_FRONTS_MAP: &str = "PH_ECH_FRONTS";
    pub const SNI_STATS_MAP: &str = "PH_SNI_STATS";
}

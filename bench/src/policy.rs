//! `policy`: the per-packet cost of `tc_client_policy` (BPF_PROG_TEST_RUN) with 10,000 clients
//! holding 16 rules each, beside the same program for a client without rules and beside
//! `tc_multihop_mark` switched off (a TC program that returns at once), same run; then with
//! 10,000 clients holding a rate limit and a quota as well (`tc_client_policy` metering the
//! upload, `tc_client_limit` the download), for a limited and an unlimited client.

use aya::{
    maps::{Array, HashMap},
    programs::SchedClassifier,
};
use phantom_common::{
    dns::IfaceInfo,
    names,
    policy::{
        ACTION_ALLOW, ACTION_DENY, AclRule, ClientAcl, ClientLimit, LimitDir, MAX_ACL_RULES,
        PROTO_ANY, PROTO_UDP, PolicyConfig, QUOTA_THROTTLE, SLOT_HAS_LIMIT, SLOT_HAS_RULES,
        acl_entry, client_slot, ns_per_byte_q16,
    },
};

use crate::{
    BoxError, Cli,
    bpf::{PER_RUN_TIME, ipv4_frame, leak, load_object, mac, median_ns, pin_dir, program},
    report::table,
};

/// Clients with rules in the map.
const CLIENTS: u32 = 10_000;

/// 16 rules: 15 allowing one address of 192.0.2.0/24 each, then one denying UDP ports 1-100
/// to 203.0.113.0/24 (a UDP packet to 203.0.113.80 port 9 walks all 16).
fn worst_case_rules() -> ClientAcl {
    let mut acl = ClientAcl::default();
    for (i, r) in acl.rules.iter_mut().enumerate() {
        *r = AclRule {
            net: [192, 0, 2, i as u8],
            mask: [255, 255, 255, 255],
            port_lo: 0,
            port_hi: u16::MAX,
            proto: PROTO_ANY,
            action: ACTION_ALLOW,
            _pad: [0; 2],
        };
    }
    acl.rules[MAX_ACL_RULES - 1] = AclRule {
        net: [203, 0, 113, 0],
        mask: [255, 255, 255, 0],
        port_lo: 1,
        port_hi: 100,
        proto: PROTO_UDP,
        action: ACTION_DENY,
        _pad: [0; 2],
    };
    acl.count = MAX_ACL_RULES as u32;
    acl
}

/// The rules that cost the most to walk: the first 15 have the packet's network and protocol
/// and fail only on the port (the network is checked first: docs/policy.md, "Speed"); the
/// last denies.
fn port_rules() -> ClientAcl {
    let mut acl = worst_case_rules();
    for (i, r) in acl.rules[..MAX_ACL_RULES - 1].iter_mut().enumerate() {
        *r = AclRule {
            net: [203, 0, 113, 0],
            mask: [255, 255, 255, 0],
            port_lo: 1000 + i as u16,
            port_hi: 1000 + i as u16,
            proto: PROTO_UDP,
            action: ACTION_ALLOW,
            _pad: [0; 2],
        };
    }
    acl
}

/// Clients of 10.0.0.0/16 (a /16 is the largest client subnet: one flag slot per address).
fn client(i: u32) -> [u8; 4] {
    let [_, _, c, d] = (i + 2).to_be_bytes();
    [10, 0, c, d]
}

/// Adds `bit` to the flags of `addr`'s slot, as the daemon does before it inserts an entry.
fn flag(ebpf: &mut aya::Ebpf, addr: [u8; 4], bit: u32) -> Result<(), BoxError> {
    let mut flags: Array<_, u32> = Array::try_from(
        ebpf.map_mut(names::CLIENT_FLAGS_MAP)
            .ok_or("no flags map")?,
    )?;
    let slot = client_slot(addr);
    let have = flags.get(&slot, 0)?;
    flags.set(slot, &(have | bit), 0)?;
    Ok(())
}

pub fn run(cli: &Cli) -> Result<(), BoxError> {
    let pins = pin_dir("policy")?;
    let mut ebpf = load_object(pins.path(), cli)?;
    program::<SchedClassifier>(&mut ebpf, names::TC_CLIENT_POLICY)?.load()?;
    program::<SchedClassifier>(&mut ebpf, names::TC_MULTIHOP_MARK)?.load()?;
    program::<SchedClassifier>(&mut ebpf, names::TC_CLIENT_LIMIT)?.load()?;
    // BPF_PROG_TEST_RUN hands skb programs an Ethernet frame on the loopback device.
    let mut ifaces: HashMap<_, u32, IfaceInfo> =
        HashMap::try_from(ebpf.map_mut(names::IFACES_MAP).ok_or("no ifaces map")?)?;
    ifaces.insert(&1, &IfaceInfo { l2_len: 14 }, 0)?;
    {
        // Each in the first entry of its slot, which its flags (side bit clear) point at.
        let mut acls: Array<_, ClientAcl> =
            Array::try_from(ebpf.map_mut(names::CLIENT_ACL_MAP).ok_or("no ACL map")?)?;
        let rules = worst_case_rules();
        for i in 0..CLIENTS {
            let addr = client(i);
            acls.set(
                acl_entry(client_slot(addr), SLOT_HAS_RULES),
                &ClientAcl { addr, ..rules },
                0,
            )?;
        }
        let addr = client(CLIENTS / 2 + 1);
        acls.set(
            acl_entry(client_slot(addr), SLOT_HAS_RULES),
            &ClientAcl {
                addr,
                ..port_rules()
            },
            0,
        )?;
    }
    for i in 0..CLIENTS {
        flag(&mut ebpf, client(i), SLOT_HAS_RULES)?;
    }
    let set_config = |ebpf: &mut aya::Ebpf, on: bool, limits: bool| -> Result<(), BoxError> {
        let mut cfg: Array<_, PolicyConfig> = Array::try_from(
            ebpf.map_mut(names::CLIENT_POLICY_CONFIG_MAP)
                .ok_or("no policy config map")?,
        )?;
        cfg.set(
            0,
            &PolicyConfig {
                isolate: u32::from(on),
                v4_net: [10, 0, 0, 0],
                v4_mask: [255, 255, 0, 0],
                server: [10, 0, 0, 1],
                // BPF_PROG_TEST_RUN hands skb programs an Ethernet frame.
                l2_len: 14,
                limits: u32::from(limits),
            },
            0,
        )?;
        Ok(())
    };
    let set_isolation = |ebpf: &mut aya::Ebpf, on: bool| set_config(ebpf, on, false);
    set_isolation(&mut ebpf, false)?;

    let service = [203, 0, 113, 80];
    let with_rules = leak(ipv4_frame(mac(1), client(CLIENTS / 2), service));
    let port_walk = leak(ipv4_frame(mac(1), client(CLIENTS / 2 + 1), service));
    let first_rule = leak(ipv4_frame(mac(1), client(7), [192, 0, 2, 0]));
    let no_rules = leak(ipv4_frame(mac(1), [10, 0, 200, 9], service));
    let to_client = leak(ipv4_frame(mac(1), [10, 0, 200, 9], client(3)));
    let (repeat, rounds) = (cli.repeat, cli.rounds);

    let baseline = median_ns(
        program::<SchedClassifier>(&mut ebpf, names::TC_MULTIHOP_MARK)?,
        no_rules,
        repeat,
        rounds,
    )?;
    let prog = program::<SchedClassifier>(&mut ebpf, names::TC_CLIENT_POLICY)?;
    let mut rows = vec![format!(
        "| `tc_multihop_mark` switched off (returns at once): the baseline | {baseline:.1} |"
    )];
    for (label, frame) in [
        (
            "client without rules, isolation off (its slot's flags, no lookup)",
            no_rules,
        ),
        ("client with 16 rules, the first matches", first_rule),
        (
            "client with 16 rules, all 16 walked (the last denies)",
            with_rules,
        ),
        (
            "client with 16 rules, all 16 walked, 15 failing on the port only",
            port_walk,
        ),
    ] {
        rows.push(format!(
            "| {label}, {CLIENTS} clients with rules | {:.1} |",
            median_ns(prog, frame, repeat, rounds)?
        ));
    }
    set_isolation(&mut ebpf, true)?;
    let prog = program::<SchedClassifier>(&mut ebpf, names::TC_CLIENT_POLICY)?;
    rows.push(format!(
        "| isolation on, client to client (dropped), {CLIENTS} clients with rules | {:.1} |",
        median_ns(prog, to_client, repeat, rounds)?
    ));
    set_config(&mut ebpf, false, true)?;
    // Every client limited (100 Gbit/s each way, never reached by the test run) with a quota
    // far from used up: each packet runs the bucket and the counters.
    {
        let mut limits: Array<_, ClientLimit> = Array::try_from(
            ebpf.map_mut(names::CLIENT_LIMIT_MAP)
                .ok_or("no limit map")?,
        )?;
        let dir = LimitDir {
            ns_per_byte_q16: ns_per_byte_q16(100_000_000),
            floor_ns_per_byte_q16: ns_per_byte_q16(1_000),
            burst_bytes: 64 << 20,
            ..LimitDir::default()
        };
        let limit = ClientLimit {
            up: dir,
            down: dir,
            quota_bytes: u64::MAX / 2,
            quota_action: QUOTA_THROTTLE,
            ..ClientLimit::default()
        };
        // Each in its slot, as the daemon writes them.
        for addr in (0..CLIENTS - 1)
            .map(client)
            // One more limited client, without rules.
            .chain([[10, 0, 200, 9]])
        {
            limits.set(client_slot(addr), &ClientLimit { addr, ..limit }, 0)?;
        }
    }
    for i in 0..CLIENTS - 1 {
        flag(&mut ebpf, client(i), SLOT_HAS_LIMIT)?;
    }
    flag(&mut ebpf, [10, 0, 200, 9], SLOT_HAS_LIMIT)?;
    let limited_down = leak(ipv4_frame(mac(1), service, client(CLIENTS / 3)));
    let unlimited_down = leak(ipv4_frame(mac(1), service, [10, 0, 201, 9]));
    let neither = leak(ipv4_frame(mac(1), [10, 0, 201, 9], service));
    let prog = program::<SchedClassifier>(&mut ebpf, names::TC_CLIENT_POLICY)?;
    for (label, frame) in [
        (
            "limited client with 16 rules, the first allows, upload metered",
            first_rule,
        ),
        ("limited client without rules, upload metered", no_rules),
        (
            "client without rules or limit (its slot's flags, no lookup)",
            neither,
        ),
    ] {
        rows.push(format!(
            "| {label}, {CLIENTS} clients with rules and limits | {:.1} |",
            median_ns(prog, frame, repeat, rounds)?
        ));
    }
    let prog = program::<SchedClassifier>(&mut ebpf, names::TC_CLIENT_LIMIT)?;
    for (label, frame) in [
        (
            "`tc_client_limit`: limited client, download metered",
            limited_down,
        ),
        (
            "`tc_client_limit`: unlimited client (its slot's flags, no lookup)",
            unlimited_down,
        ),
    ] {
        rows.push(format!(
            "| {label}, {CLIENTS} clients with limits | {:.1} |",
            median_ns(prog, frame, repeat, rounds)?
        ));
    }
    table(
        "Client policy per-packet cost (BPF_PROG_TEST_RUN)",
        &format!(
            "{repeat} runs per measurement, median of {rounds}; 64-byte IPv4/UDP frames; {PER_RUN_TIME}"
        ),
        "| program and input | ns/packet |\n| --- | ---: |",
        &rows,
    );
    Ok(())
}

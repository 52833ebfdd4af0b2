//! `sni`: the per-packet cost of the SNI filter inside `tc_encrypted_dns` with a million
//! blocked domains (BPF_PROG_TEST_RUN): ClientHellos with an allowed name, a blocked one and
//! ECH to a front name, and what the filter adds to packets that are not a ClientHello (the
//! same packets with the SNI filter off, in the same run).

use aya::{
    maps::{Array, HashMap},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use phantom_common::{
    dns::{DOMAIN_EXACT, EncryptedDnsConfig, IfaceInfo, SniConfig},
    names,
};
use phantom_daemon::datapath::{DomainFilter, Owner};

use crate::{
    BoxError, Cli,
    bpf::{PER_RUN_TIME, dns_answer, leak, load_object, mac, median_ns, pin_dir, program},
    report::table,
};

/// TC verdicts as the program returns them.
const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;

pub fn run(cli: &Cli) -> Result<(), BoxError> {
    let pins = pin_dir("sni")?;
    let state = tempfile::Builder::new().prefix("phantom-bench").tempdir()?;
    let mut ebpf = load_object(pins.path(), cli)?;
    program::<SchedClassifier>(&mut ebpf, names::TC_ENCRYPTED_DNS)?.load()?;
    program::<SchedClassifier>(&mut ebpf, names::TC_DNS_FILTER)?.load()?;
    // BPF_PROG_TEST_RUN hands skb programs an Ethernet frame on the loopback device.
    let mut ifaces: HashMap<_, u32, IfaceInfo> =
        HashMap::try_from(ebpf.map_mut(names::IFACES_MAP).ok_or("no ifaces map")?)?;
    ifaces.insert(&1, &IfaceInfo { l2_len: 14 }, 0)?;

    let domains = DomainFilter::open(
        ebpf.take_map(names::DOMAINS_MAP)
            .ok_or("no domain map")?
            .try_into()?,
        ebpf.take_map(names::DNS_KEY_MAP)
            .ok_or("no domain hash key map")?
            .try_into()?,
        state.path(),
    )?;
    let rules: Vec<(String, bool)> = (0..cli.domains)
        .map(|i| (format!("casino{i}.bet{}.example", i % 997), i % 2 == 0))
        .collect();
    domains.replace(Owner::Blocklist, &rules)?;
    let mut fronts: HashMap<_, u64, u8> = HashMap::try_from(
        ebpf.map_mut(names::ECH_FRONTS_MAP)
            .ok_or("no ECH front map")?,
    )?;
    fronts.insert(
        &domains.hasher().hash("cloudflare-ech.com"),
        &DOMAIN_EXACT,
        0,
    )?;
    let mut enc: Array<_, EncryptedDnsConfig> =
        Array::try_from(ebpf.take_map(names::ENC_DNS_MAP).ok_or("no PH_ENC_DNS")?)?;
    enc.set(
        0,
        &EncryptedDnsConfig {
            drop_dot_doq: 1,
            drop_doh: 1,
        },
        0,
    )?;
    let mut sni: Array<_, SniConfig> =
        Array::try_from(ebpf.take_map(names::SNI_MAP).ok_or("no PH_SNI")?)?;
    // The DNS filter on an answer it passes: the reference the machine's speed is read by.
    let answer = leak(dns_answer("www.example.com"));
    let dns_ns = median_ns(
        program::<SchedClassifier>(&mut ebpf, names::TC_DNS_FILTER)?,
        answer,
        cli.repeat / 4,
        cli.rounds,
    )?;
    let prog = program::<SchedClassifier>(&mut ebpf, names::TC_ENCRYPTED_DNS)?;

    let allowed = leak(tcp_frame(443, &client_hello("www.example.com", false)));
    let blocked = leak(tcp_frame(
        443,
        &client_hello("www.casino2.bet2.example", false),
    ));
    let ech = leak(tcp_frame(443, &client_hello("cloudflare-ech.com", true)));
    let blocked_v6 = leak(tcp6_frame(&client_hello(
        "WWW.Casino2.Bet2.Example.",
        false,
    )));
    let allowed_v6 = leak(tcp6_frame(&client_hello("www.example.com", false)));
    let ack = leak(tcp_frame(443, &[]));
    let data = leak(tcp_frame(443, &[0x17; 512]));
    let other = leak(tcp_frame(8080, &client_hello("www.example.com", false)));

    let on = SniConfig {
        drop_blocked: 1,
        strict: 1,
    };
    let off = SniConfig::default();
    // The verdicts first: the figures are of the paths they name.
    sni.set(0, &on, 0)?;
    for (frame, want, what) in [
        (allowed, TC_ACT_UNSPEC, "an allowed ClientHello"),
        (blocked, TC_ACT_SHOT, "a blocked ClientHello"),
        (ech, TC_ACT_SHOT, "an ECH ClientHello to a front"),
        (
            blocked_v6,
            TC_ACT_SHOT,
            "a blocked ClientHello over IPv6, in capitals with a trailing dot",
        ),
        (
            allowed_v6,
            TC_ACT_UNSPEC,
            "an allowed ClientHello over IPv6",
        ),
        (ack, TC_ACT_UNSPEC, "an ACK"),
        (data, TC_ACT_UNSPEC, "application data"),
    ] {
        let got = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat: 1,
                ..TestRunOptions::default()
            })?
            .return_value as i32;
        if got != want {
            return Err(format!("{what}: the program returned {got}, not {want}").into());
        }
    }

    let repeat = cli.repeat / 4;
    let n = cli.domains;
    let mut hello_rows = Vec::new();
    for (label, frame) in [
        (
            format!(
                "ClientHello, allowed name (517 bytes, 15 extensions, the name 13th), {n} domains"
            ),
            allowed,
        ),
        (
            format!("ClientHello, subdomain of a rule: dropped, {n} domains"),
            blocked,
        ),
        (
            format!("ClientHello with ECH to a front name, strict: dropped, {n} domains"),
            ech,
        ),
    ] {
        hello_rows.push(format!(
            "| {label} | {:.1} |",
            median_ns(prog, frame, repeat, cli.rounds)?
        ));
    }
    hello_rows.push(format!(
        "| reference: tc_dns_filter, an answer it passes (3 labels), {n} domains | {dns_ns:.1} |"
    ));
    let mut added_rows = Vec::new();
    for (label, frame) in [
        ("TCP/443 ACK, no payload", ack),
        ("TCP/443 application data (512 bytes)", data),
        ("TCP/8080 segment (a ClientHello to another port)", other),
    ] {
        // Interleaved, so both columns see the same machine.
        let mut offs = Vec::new();
        let mut ons = Vec::new();
        for _ in 0..cli.rounds {
            sni.set(0, &off, 0)?;
            offs.push(median_ns(prog, frame, repeat, 1)?);
            sni.set(0, &on, 0)?;
            ons.push(median_ns(prog, frame, repeat, 1)?);
        }
        let (off_ns, on_ns) = (median(offs), median(ons));
        added_rows.push(format!(
            "| {label} | {off_ns:.1} | {on_ns:.1} | {:+.1} |",
            on_ns - off_ns
        ));
    }
    table(
        "SNI filter per-ClientHello cost (tc_encrypted_dns, BPF_PROG_TEST_RUN)",
        &format!(
            "{repeat} runs per measurement, median of {}; DoT/DoQ and DoH checks on, SNI filter and strict on; {PER_RUN_TIME}",
            cli.rounds
        ),
        "| input | ns/packet |\n| --- | ---: |",
        &hello_rows,
    );
    table(
        "SNI filter cost on packets that are not a ClientHello",
        &format!(
            "{repeat} runs per measurement, median of {} interleaved pairs; DoT/DoQ and DoH checks on in both columns; {PER_RUN_TIME}",
            cli.rounds
        ),
        "| input | SNI off (ns) | SNI and strict on (ns) | added (ns) |\n| --- | ---: | ---: | ---: |",
        &added_rows,
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// An Ethernet/IPv4/TCP segment (ACK|PSH) from a VPN client to 203.0.113.7:`dport`.
fn tcp_frame(dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20];
    f[0..6].copy_from_slice(&mac(1));
    f[6..12].copy_from_slice(&mac(2));
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((40 + payload.len()) as u16).to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&[198, 51, 100, 2]);
    f[30..34].copy_from_slice(&[203, 0, 113, 7]);
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&dport.to_be_bytes());
    f[46] = 5 << 4;
    f[47] = 0x18;
    f[48..50].copy_from_slice(&64240u16.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An Ethernet/IPv6/TCP segment (ACK|PSH) from a VPN client to 2001:db8::7, port 443.
fn tcp6_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 40 + 20];
    f[0..6].copy_from_slice(&mac(1));
    f[6..12].copy_from_slice(&mac(2));
    f[12..14].copy_from_slice(&0x86DDu16.to_be_bytes());
    f[14] = 0x60;
    f[18..20].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    f[20] = 6;
    f[21] = 64;
    f[22..38].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    f[38..54].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
    f[54..56].copy_from_slice(&40000u16.to_be_bytes());
    f[56..58].copy_from_slice(&443u16.to_be_bytes());
    f[66] = 5 << 4;
    f[67] = 0x18;
    f[68..70].copy_from_slice(&64240u16.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A ClientHello shaped like a browser's (OpenSSL's curl sends 517 bytes): GREASE, twelve
/// extensions before the server name, a key share and padding to 517 bytes; with an
/// `encrypted_client_hello` extension when `ech` is set.
fn client_hello(name: &str, ech: bool) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, ty: u16, data: &[u8]) {
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
    }
    let mut exts = Vec::new();
    ext(&mut exts, 0x0a0a, &[]);
    ext(&mut exts, 0x0017, &[]);
    ext(&mut exts, 0xff01, &[0]);
    ext(
        &mut exts,
        0x000a,
        &[0, 8, 0x0a, 0x0a, 0, 0x1d, 0, 0x17, 0, 0x18],
    );
    ext(&mut exts, 0x000b, &[1, 0]);
    ext(&mut exts, 0x0023, &[]);
    ext(&mut exts, 0x0010, b"\x00\x0c\x02h2\x08http/1.1");
    ext(&mut exts, 0x0005, &[1, 0, 0, 0, 0]);
    ext(
        &mut exts,
        0x000d,
        &[0, 8, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, 0x05, 0x03],
    );
    ext(&mut exts, 0x0012, &[]);
    let mut share = vec![0, 38, 0, 0x1d, 0, 32];
    share.extend_from_slice(&[0x11; 32]);
    ext(&mut exts, 0x0033, &share);
    ext(&mut exts, 0x002d, &[1, 1]);
    if ech {
        let mut e = vec![0, 0, 1, 0, 1, 0x42, 0, 32];
        e.extend_from_slice(&[7; 32]);
        e.extend_from_slice(&[0, 144]);
        e.extend_from_slice(&[9; 144]);
        ext(&mut exts, 0xfe0d, &e);
    }
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name.as_bytes());
    ext(&mut exts, 0x0000, &sni);
    ext(&mut exts, 0x002b, &[4, 0x03, 0x04, 0x03, 0x03]);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0x5a; 32]);
    body.push(32);
    body.extend_from_slice(&[0x33; 32]);
    body.extend_from_slice(&[0, 8, 0x13, 0x01, 0x13, 0x02, 0xc0, 0x2b, 0xc0, 0x2f]);
    body.extend_from_slice(&[1, 0]);
    // Padding (21) to 517 bytes in all, as OpenSSL pads.
    let so_far = 5 + 4 + body.len() + 2 + exts.len() + 4;
    let pad = 517usize.saturating_sub(so_far);
    ext(&mut exts, 0x0015, &vec![0; pad]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![0x01, 0];
    hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

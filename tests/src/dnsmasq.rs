//! DNS in the tests: a private dnsmasq and `dig`.

use std::time::Duration;

use crate::{NetNs, Process};

/// `dig @server name qtype` from inside `ns` (one try, two seconds): (status, answer data).
/// The status is "NO REPLY: ..." when nothing came back.
pub fn dig(
    ns: &NetNs,
    server: &str,
    name: &str,
    qtype: &str,
    extra: &[&str],
) -> (String, Vec<String>) {
    let out = ns
        .command("dig")
        .arg(format!("@{server}"))
        .args([name, qtype, "+tries=1", "+time=2"])
        .args(extra)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or_default().to_string())
        .unwrap_or_else(|| format!("NO REPLY: {text}"));
    let mut answers = Vec::new();
    let mut in_answer = false;
    for line in text.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            in_answer = true;
            continue;
        }
        if in_answer {
            if line.trim().is_empty() {
                break;
            }
            if let Some(last) = line.split_whitespace().last() {
                answers.push(last.to_string());
            }
        }
    }
    (status, answers)
}

/// dnsmasq in `ns` on `listen` addresses, serving only `records` (`name,addr[,addr6]`),
/// forwarding nothing; returns once it answers `probe` (one of the records' names) on the
/// first address.
pub fn dnsmasq(ns: &NetNs, listen: &[&str], records: &[&str], probe: &str) -> Process {
    dnsmasq_with(ns, listen, records, probe, &DnsmasqOptions::default())
}

/// What [`dnsmasq_with`] may change; the defaults are [`dnsmasq`]'s.
#[derive(Clone, Debug)]
pub struct DnsmasqOptions {
    /// `--local-ttl`: the TTL of the answers it makes itself (records, `--address`). Default
    /// 300 (cacheable answers, as real zones give; dnsmasq's own default is 0); `None` leaves
    /// dnsmasq's.
    pub local_ttl: Option<u32>,
    /// More arguments after the usual ones (`--server=...`, `--conf-file=...`, ...).
    pub args: Vec<String>,
    /// How long it may take to answer the probe (checked every 100 ms); default 5 s.
    pub ready_timeout: Duration,
}

impl Default for DnsmasqOptions {
    fn default() -> Self {
        Self {
            local_ttl: Some(300),
            args: Vec::new(),
            ready_timeout: Duration::from_secs(5),
        }
    }
}

/// [`dnsmasq`] with other options; the probe may also be a name it forwards (its answer must
/// be NOERROR).
pub fn dnsmasq_with(
    ns: &NetNs,
    listen: &[&str],
    records: &[&str],
    probe: &str,
    options: &DnsmasqOptions,
) -> Process {
    let mut cmd = ns.command("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--pid-file=",
        "--user=root",
        "--log-facility=-",
    ]);
    if let Some(ttl) = options.local_ttl {
        cmd.arg(format!("--local-ttl={ttl}"));
    }
    for l in listen {
        cmd.arg(format!("--listen-address={l}"));
    }
    for r in records {
        cmd.arg(format!("--host-record={r}"));
    }
    cmd.args(&options.args);
    let mut p = Process::spawn("dnsmasq", &mut cmd);
    for _ in 0..(options.ready_timeout.as_millis() / 100).max(1) {
        if dig(ns, listen[0], probe, "A", &[]).0 == "NOERROR" {
            return p;
        }
        assert!(p.is_running(), "dnsmasq exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("dnsmasq did not answer");
}

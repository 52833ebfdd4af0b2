//! Multihop end-to-end: VPN clients (stock wg-quick) reach an "internet" echo service through
//! the phantom server, and, with multihop on, through an exit namespace running a stock
//! WireGuard server (wireguard-go + wg) with its own NAT, standing in for a VPN provider.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a failed test

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use phantom_tests::{
    BpffsDir, Daemon, DaemonConfig, NetNs, WgQuickClient, WireguardSettings, api, api_err,
    http_get, metric_value, require_root, run, unique_ifname, veth,
};
use serde_json::Value;

const VPN_SUBNET: &str = "198.51.100.0/24";
const SERVER_UPLINK: &str = "203.0.113.1";
const EXIT_PUBLIC: &str = "203.0.113.129";
const ECHO: &str = "203.0.113.10:8080";
const EXIT_ENDPOINT: &str = "198.18.0.2:51821";
const EXIT_TUNNEL_NET: &str = "198.18.66.0/24";
const EXIT_TUNNEL_SERVER: &str = "198.18.66.1/24";
const EXIT_TUNNEL_PHANTOM: &str = "198.18.66.2";
const MONITOR_INTERVAL: u64 = 3;
const PROBE_TIMEOUT: u64 = 2;

/// A plain-HTTP service answering every request with the caller's address.
struct EchoService {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoService {
    fn start(ns: &NetNs, addr: &str) -> Self {
        let addr: SocketAddr = addr.parse().unwrap();
        let listener = ns.run(move || TcpListener::bind(addr).expect("bind echo"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        stream.set_nonblocking(false).unwrap();
                        stream
                            .set_read_timeout(Some(Duration::from_secs(2)))
                            .unwrap();
                        let mut request = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => request.extend_from_slice(&buf[..n]),
                            }
                        }
                        let body = format!("{}\n", peer.ip());
                        let _ = write!(
                            stream,
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wg_key(args: &[&str], input: Option<&str>) -> String {
    let mut child = Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("wg");
    if let Some(input) = input {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The provider: a stock WireGuard server (wireguard-go, configured with `wg`) in its own
/// namespace, masquerading its tunnel out to the internet host.
struct ExitServer {
    ifname: String,
    dir: tempfile::TempDir,
    public_key: String,
    peer_public_key: String,
    process: Option<Child>,
}

impl ExitServer {
    fn new(ns: &NetNs, peer_public_key: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let private = wg_key(&["genkey"], None);
        let public_key = wg_key(&["pubkey"], Some(&private));
        let key_file = dir.path().join("exit.key");
        std::fs::write(&key_file, &private).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let nft = dir.path().join("exit.nft");
        std::fs::write(
            &nft,
            format!(
                "table inet exitnat {{\n chain post {{\n  type nat hook postrouting priority srcnat; policy accept;\n  ip saddr {EXIT_TUNNEL_NET} oifname \"out0\" masquerade\n }}\n}}\n"
            ),
        )
        .unwrap();
        run(ns.command("nft").arg("-f").arg(&nft));
        ns.sysctl("net.ipv4.ip_forward", "1");
        let mut exit = Self {
            ifname: unique_ifname("phx"),
            dir,
            public_key,
            peer_public_key: peer_public_key.into(),
            process: None,
        };
        exit.start(ns);
        exit
    }

    fn start(&mut self, ns: &NetNs) {
        let child = ns
            .command("wireguard-go")
            .args(["-f", &self.ifname])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wireguard-go");
        self.process = Some(child);
        let sock = PathBuf::from(format!("/var/run/wireguard/{}.sock", self.ifname));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "wireguard-go did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        run(ns.command("wg").args([
            "set",
            &self.ifname,
            "listen-port",
            "51821",
            "private-key",
            &self.dir.path().join("exit.key").display().to_string(),
            "peer",
            &self.peer_public_key,
            "allowed-ips",
            &format!("{EXIT_TUNNEL_PHANTOM}/32"),
        ]));
        ns.ip(&["addr", "add", EXIT_TUNNEL_SERVER, "dev", &self.ifname]);
        ns.ip(&["link", "set", &self.ifname, "up"]);
    }

    /// Stops the WireGuard server (SIGTERM to the wireguard-go we started, by pid).
    fn stop(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ExitServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Five namespaces: two VPN clients, the phantom server, the exit and the internet host.
struct Topology {
    client: NetNs,
    other_client: NetNs,
    server: NetNs,
    exit: NetNs,
    internet: NetNs,
}

impl Topology {
    fn new() -> Self {
        let t = Self {
            client: NetNs::new("phc"),
            other_client: NetNs::new("pho"),
            server: NetNs::new("phs"),
            exit: NetNs::new("phe"),
            internet: NetNs::new("phi"),
        };
        veth(&t.server, "cl1", &t.client, "eth0");
        veth(&t.server, "cl2", &t.other_client, "eth0");
        veth(&t.server, "up0", &t.internet, "in0");
        veth(&t.server, "ex0", &t.exit, "ex0");
        veth(&t.exit, "out0", &t.internet, "in1");
        t.server.ip(&["addr", "add", "192.0.2.1/25", "dev", "cl1"]);
        t.client.ip(&["addr", "add", "192.0.2.2/25", "dev", "eth0"]);
        t.server
            .ip(&["addr", "add", "192.0.2.129/25", "dev", "cl2"]);
        t.other_client
            .ip(&["addr", "add", "192.0.2.130/25", "dev", "eth0"]);
        t.server
            .ip(&["addr", "add", "203.0.113.1/25", "dev", "up0"]);
        t.internet
            .ip(&["addr", "add", "203.0.113.10/25", "dev", "in0"]);
        t.server.ip(&["addr", "add", "198.18.0.1/24", "dev", "ex0"]);
        t.exit.ip(&["addr", "add", "198.18.0.2/24", "dev", "ex0"]);
        t.exit
            .ip(&["addr", "add", "203.0.113.129/25", "dev", "out0"]);
        t.internet
            .ip(&["addr", "add", "203.0.113.130/25", "dev", "in1"]);
        t.exit
            .ip(&["route", "add", "default", "via", "203.0.113.130"]);
        t
    }

    fn daemon(&self, bpffs: &BpffsDir, interface: &str) -> Daemon {
        let mut config = self.config(bpffs, interface, &format!("http://{ECHO}/ip"));
        // The first enable fails just before the mark goes on: the rollback is tested.
        config.env.push((
            "PHANTOM_FAIL_AT".into(),
            "multihop.enable.before_mark".into(),
        ));
        Daemon::start(&self.server, &config)
    }

    fn config(&self, bpffs: &BpffsDir, interface: &str, echo_url: &str) -> DaemonConfig {
        let mut config = DaemonConfig::new("up0", bpffs.path());
        config.wireguard = Some(WireguardSettings::new(VPN_SUBNET, "192.0.2.1"));
        // Phantom's resolver on the tunnel address, forwarding to the internet host.
        config.dns_section =
            "listen = \"auto\"\nprimary = \"203.0.113.10\"\nsecondary = \"203.0.113.10\"\n".into();
        config.extra_toml = format!(
            "[multihop]\ninterface = {interface:?}\nmonitor_interval_seconds = {MONITOR_INTERVAL}\nprobe_timeout_seconds = {PROBE_TIMEOUT}\necho_url = {echo_url:?}\n"
        );
        config
    }
}

/// The address the echo service sees a request from `ns` come from; `None` when the
/// request does not get through.
fn seen_as(ns: &NetNs) -> Option<String> {
    let addr: SocketAddr = ECHO.parse().unwrap();
    ns.run(move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        write!(
            stream,
            "GET /ip HTTP/1.1\r\nHost: {ECHO}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        Some(answer.split_once("\r\n\r\n")?.1.trim().to_string())
    })
}

/// Asks phantom's resolver (on the server's tunnel address) for `name` from the client and
/// returns the address the upstream (the internet host) sees the forwarded query come from.
fn upstream_sees(topo: &Topology, name: &str) -> Option<String> {
    let listener = topo.internet.udp_listener("203.0.113.10:53");
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    topo.client
        .send_udp_from("0.0.0.0:0", "198.51.100.1:53", &query);
    listener.recv().map(|(_, from)| from.ip().to_string())
}

/// Waits until requests from `ns` are seen as `want`.
fn wait_seen_as(ns: &NetNs, want: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if seen_as(ns).as_deref() == Some(want) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn ping(ns: &NetNs, to: &str) -> bool {
    (0..5).any(|_| {
        ns.command("ping")
            .args(["-c", "1", "-W", "2", to])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// `ip rule` lines of the server that look up the exit table.
fn rules_to_exit_table(ns: &NetNs) -> Vec<String> {
    let out = ns.ip(&["rule", "show"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("lookup 100"))
        .map(str::to_string)
        .collect()
}

fn exit_table(ns: &NetNs) -> Vec<String> {
    let out = ns
        .command("ip")
        .args(["route", "show", "table", "100"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

fn nft_table(ns: &NetNs) -> String {
    let out = ns
        .command("nft")
        .args(["list", "table", "inet", "phantom"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn link_exists(ns: &NetNs, dev: &str) -> bool {
    ns.command("ip")
        .args(["link", "show", "dev", dev])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Exactly one rule and one exit route plus the fail-closed route: each of our entries once.
fn assert_exactly_once(ns: &NetNs, iface: &str) {
    let rules = rules_to_exit_table(ns);
    assert_eq!(rules.len(), 1, "ip rule: {rules:?}");
    assert!(rules[0].contains("fwmark 0x6d68"), "{rules:?}");
    let table = exit_table(ns);
    assert_eq!(table.len(), 2, "ip route show table 100: {table:?}");
    assert_eq!(
        table
            .iter()
            .filter(|l| l.starts_with(&format!("default dev {iface} ")) && l.contains("proto 109"))
            .count(),
        1,
        "{table:?}"
    );
    assert_eq!(
        table
            .iter()
            .filter(|l| l.starts_with("unreachable default"))
            .count(),
        1,
        "{table:?}"
    );
}

fn assert_no_trace(ns: &NetNs, iface: &str) {
    assert!(
        rules_to_exit_table(ns).is_empty(),
        "{:?}",
        rules_to_exit_table(ns)
    );
    assert!(exit_table(ns).is_empty(), "{:?}", exit_table(ns));
    assert!(!link_exists(ns, iface), "{iface} still there");
    assert!(!nft_table(ns).contains("multihop"), "{}", nft_table(ns));
}

fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn metrics(ns: &NetNs) -> String {
    http_get(ns, "127.0.0.1:9469", "/metrics")
}

/// Polls `f` until it holds or `within` passes.
fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn clients_leave_through_the_exit_while_multihop_is_on() {
    if !require_root("clients_leave_through_the_exit_while_multihop_is_on") {
        return;
    }
    let topo = Topology::new();
    let _echo = EchoService::start(&topo.internet, &format!("0.0.0.0:{}", 8080));
    let files = tempfile::tempdir().unwrap();
    let iface = unique_ifname("phv");

    // Phantom's side of the exit: the provider hands out a wg-quick file.
    let phantom_private = wg_key(&["genkey"], None);
    let phantom_public = wg_key(&["pubkey"], Some(&phantom_private));
    let mut exit = ExitServer::new(&topo.exit, &phantom_public);
    let provider_file = provider_file(&phantom_private, &exit);

    let bpffs = BpffsDir::new();
    let mut daemon = topo.daemon(&bpffs, &iface);
    api(&daemon, &["core", "add_client", "client_name=alice"]);
    api(&daemon, &["core", "add_client", "client_name=bob"]);
    let alice_conf = api(&daemon, &["core", "export_client", "client_name=alice"])["config"]
        .as_str()
        .unwrap()
        .to_string();
    let bob_conf = api(&daemon, &["core", "export_client", "client_name=bob"])["config"]
        .as_str()
        .unwrap()
        .replace("192.0.2.1:51820", "192.0.2.129:51820");
    let _alice = WgQuickClient::up(&topo.client, &alice_conf);
    let _bob = WgQuickClient::up(&topo.other_client, &bob_conf);

    // Off: the internet host sees the server's address.
    assert!(
        wait_seen_as(&topo.client, SERVER_UPLINK, Duration::from_secs(15)),
        "off: {:?}",
        seen_as(&topo.client)
    );

    assert_eq!(
        upstream_sees(&topo, "off.example").as_deref(),
        Some(SERVER_UPLINK),
        "off: the resolver forwards from the server's address"
    );

    // Bad input: clear failures, nothing changes.
    let bad_key = provider_file.replace(&exit.public_key, "bm90IGEga2V5");
    let bad_port = provider_file.replace(EXIT_ENDPOINT, "198.18.0.2:70000");
    for (args, code) in [
        (
            vec![
                "multihop".to_string(),
                "import_vpn_config".into(),
                format!(
                    "config_path={}",
                    files.path().join("missing.conf").display()
                ),
            ],
            "CONFIG_NOT_FOUND",
        ),
        (
            vec![
                "multihop".into(),
                "import_vpn_config".into(),
                format!(
                    "config_path={}",
                    write_file(files.path(), "notwg.conf", "{\"hello\": \"world\"}\n")
                ),
            ],
            "INVALID_VPN_CONFIG",
        ),
        (
            vec![
                "multihop".into(),
                "import_vpn_config".into(),
                format!(
                    "config_path={}",
                    write_file(files.path(), "badkey.conf", &bad_key)
                ),
            ],
            "INVALID_VPN_CONFIG",
        ),
        (
            vec![
                "multihop".into(),
                "import_vpn_config".into(),
                format!(
                    "config_path={}",
                    write_file(files.path(), "badport.conf", &bad_port)
                ),
            ],
            "INVALID_VPN_CONFIG",
        ),
        (
            vec![
                "multihop".into(),
                "enable_multihop".into(),
                "exit_name=nowhere".into(),
            ],
            "EXIT_NOT_FOUND",
        ),
        (
            vec!["multihop".into(), "disable_multihop".into()],
            "MULTIHOP_NOT_ENABLED",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(api_err(&daemon, &args), code, "{args:?}");
    }
    let listed = api(&daemon, &["multihop", "list_exits"]);
    assert_eq!(listed["total"], 0, "{listed}");
    assert_eq!(api(&daemon, &["multihop", "status"])["enabled"], false);

    // Import: stored 0600, optimisations reported.
    let path = write_file(files.path(), "provider.conf", &provider_file);
    let imported = api(
        &daemon,
        &[
            "multihop",
            "import_vpn_config",
            &format!("config_path={path}"),
            "custom_name=exit-a",
        ],
    );
    assert_eq!(imported["success"], true);
    assert_eq!(imported["exit_name"], "exit-a");
    assert!(imported["message"].as_str().unwrap().contains("exit-a"));
    let optimizations: Vec<&str> = imported["optimizations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        optimizations,
        vec!["MTU optimized to 1420", "PersistentKeepalive set to 25"]
    );
    let stored = daemon.dir().join("state/multihop/exits/exit-a.json");
    let mode = std::fs::metadata(&stored).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", stored.display());
    assert_eq!(
        api_err(
            &daemon,
            &[
                "multihop",
                "import_vpn_config",
                &format!("config_path={path}"),
                "custom_name=exit-a",
            ],
        ),
        "EXIT_EXISTS"
    );
    let listed = api(&daemon, &["multihop", "list_exits"]);
    assert_eq!(listed["total"], 1);
    assert_eq!(listed["multihop_enabled"], false);
    assert_eq!(listed["active_exit"], Value::Null);
    let entry = &listed["exits"][0];
    assert_eq!(entry["name"], "exit-a");
    assert_eq!(entry["endpoint"], EXIT_ENDPOINT);
    assert_eq!(entry["active"], false);
    assert_eq!(entry["provider"], "Custom");
    assert!(entry["imported_at"].as_str().unwrap().starts_with("20"));
    assert_eq!(entry["multihop_enhanced"], true);

    // An exit that does not answer: no handshake, nothing left behind.
    let dead = write_file(
        files.path(),
        "dead.conf",
        &provider_file.replace(EXIT_ENDPOINT, "198.18.0.2:51899"),
    );
    api(
        &daemon,
        &[
            "multihop",
            "import_vpn_config",
            &format!("config_path={dead}"),
        ],
    );
    assert_eq!(
        api_err(&daemon, &["multihop", "enable_multihop", "exit_name=dead"]),
        "EXIT_UNREACHABLE"
    );
    assert_no_trace(&topo.server, &iface);
    assert_eq!(
        api(
            &daemon,
            &["multihop", "remove_vpn_config", "exit_name=dead"]
        )["was_active"],
        false
    );

    // A failure half-way (injected just before the mark) removes everything enabling added.
    assert_eq!(
        api_err(
            &daemon,
            &["multihop", "enable_multihop", "exit_name=exit-a"]
        ),
        "MULTIHOP_SETUP_FAILED"
    );
    assert_no_trace(&topo.server, &iface);
    assert_eq!(api(&daemon, &["multihop", "status"])["enabled"], false);
    assert_eq!(seen_as(&topo.client).as_deref(), Some(SERVER_UPLINK));

    // On: the internet host sees the exit's address.
    let on = api(
        &daemon,
        &["multihop", "enable_multihop", "exit_name=exit-a"],
    );
    assert_eq!(on["exit_name"], "exit-a");
    assert_eq!(on["multihop_enabled"], true);
    assert_eq!(on["handshake_established"], true, "{on}");
    assert_eq!(on["connection_verified"], true, "{on}");
    assert_eq!(on["monitor_started"], true);
    for field in ["traffic_flow", "peer_access", "message"] {
        assert!(on[field].is_string(), "{field}: {on}");
    }
    assert_eq!(
        api_err(
            &daemon,
            &["multihop", "enable_multihop", "exit_name=exit-a"]
        ),
        "MULTIHOP_ALREADY_ENABLED"
    );
    assert!(
        wait_seen_as(&topo.client, EXIT_PUBLIC, Duration::from_secs(10)),
        "on: {:?}",
        seen_as(&topo.client)
    );
    assert!(wait_seen_as(
        &topo.other_client,
        EXIT_PUBLIC,
        Duration::from_secs(10)
    ));
    assert_eq!(
        upstream_sees(&topo, "on.example").as_deref(),
        Some(EXIT_PUBLIC),
        "on: the clients' lookups leave through the exit too"
    );
    // Clients still reach each other and the server itself directly.
    assert!(ping(&topo.client, "198.51.100.3"), "alice -> bob");
    assert!(ping(&topo.other_client, "198.51.100.2"), "bob -> alice");
    assert!(ping(&topo.client, "198.51.100.1"), "alice -> server");
    assert_exactly_once(&topo.server, &iface);
    assert!(nft_table(&topo.server).contains("phantom: multihop exit"));

    let test = api(&daemon, &["multihop", "test_vpn"]);
    assert_eq!(test["exit_name"], "exit-a");
    assert_eq!(test["endpoint"], EXIT_ENDPOINT);
    assert_eq!(test["tests"]["handshake"]["passed"], true, "{test}");
    assert_eq!(test["tests"]["external_ip"]["passed"], true, "{test}");
    assert_eq!(test["tests"]["external_ip"]["vpn_ip"], EXIT_PUBLIC);
    assert_eq!(test["all_tests_passed"], true);
    assert!(test["message"].is_string());

    // status and list_exits carry the PHANTOM_API.md fields.
    assert!(
        eventually(Duration::from_secs(MONITOR_INTERVAL * 3), || {
            api(&daemon, &["multihop", "status"])["vpn_interface"]["status"] == "up"
        }),
        "the monitor sees the exit up"
    );
    let status = api(&daemon, &["multihop", "status"]);
    assert_eq!(status["enabled"], true);
    assert_eq!(status["active_exit"], "exit-a");
    assert_eq!(status["available_configs"], 1);
    assert_eq!(status["vpn_interface"]["name"], iface.as_str());
    assert_eq!(status["vpn_interface"]["peers"], 1);
    assert!(status["vpn_interface"]["rx_bytes"].as_u64().unwrap() > 0);
    assert!(status["vpn_interface"]["tx_bytes"].as_u64().unwrap() > 0);
    assert_eq!(status["monitor_status"]["running"], true);
    assert_eq!(status["monitor_status"]["exit_reachable"], true);
    assert!(
        status["traffic_routing"]
            .as_str()
            .unwrap()
            .contains("Table 100")
    );
    assert!(
        status["traffic_flow"]
            .as_str()
            .unwrap()
            .contains(iface.as_str())
    );
    let listed = api(&daemon, &["multihop", "list_exits"]);
    assert_eq!(listed["exits"][0]["active"], true);
    assert_eq!(listed["multihop_enabled"], true);
    assert_eq!(listed["active_exit"], "exit-a");
    let m = metrics(&topo.server);
    assert_eq!(metric_value(&m, "phantom_multihop_enabled"), Some(1.0));
    assert_eq!(metric_value(&m, "phantom_multihop_exit_up"), Some(1.0));

    // The client subnet cannot move while multihop is on.
    let info = api(&daemon, &["core", "get_subnet_info"]);
    assert_eq!(info["blockers"]["multihop"], true);
    assert_eq!(info["can_change"], false);
    assert_eq!(
        api_err(
            &daemon,
            &[
                "core",
                "change_subnet",
                "new_subnet=198.51.100.128/25",
                "confirm=true"
            ]
        ),
        "SUBNET_CHANGE_REFUSED"
    );

    // The exit stops: status and metrics say so at the next check, and client traffic does
    // not fall back to the server's own address.
    exit.stop();
    let stopped = Instant::now();
    assert!(
        eventually(
            Duration::from_secs(MONITOR_INTERVAL + PROBE_TIMEOUT + 2),
            || {
                let s = api(&daemon, &["multihop", "status"]);
                s["vpn_interface"]["status"] == "down"
                    && s["monitor_status"]["exit_reachable"] == false
            }
        ),
        "status shows the exit down: {}",
        api(&daemon, &["multihop", "status"])
    );
    let m = metrics(&topo.server);
    assert_eq!(
        metric_value(&m, "phantom_multihop_exit_up"),
        Some(0.0),
        "{m}"
    );
    assert!(metric_value(&m, "phantom_multihop_events_total{event=\"exit_down\"}").unwrap() >= 1.0);
    eprintln!("exit down seen after {:?}", stopped.elapsed());
    assert_eq!(
        seen_as(&topo.client),
        None,
        "no fallback to the server's address"
    );

    // The exit comes back: the monitor restores the path without an admin call.
    exit.start(&topo.exit);
    assert!(
        eventually(Duration::from_secs(MONITOR_INTERVAL * 4 + 10), || {
            api(&daemon, &["multihop", "status"])["vpn_interface"]["status"] == "up"
        }),
        "monitor restores the exit: {}",
        api(&daemon, &["multihop", "status"])
    );
    assert!(wait_seen_as(
        &topo.client,
        EXIT_PUBLIC,
        Duration::from_secs(10)
    ));
    let m = metrics(&topo.server);
    assert_eq!(metric_value(&m, "phantom_multihop_exit_up"), Some(1.0));
    assert!(
        metric_value(&m, "phantom_multihop_events_total{event=\"exit_restored\"}").unwrap() >= 1.0
    );
    let log = api(&daemon, &["multihop", "get_session_log", "lines=100"]);
    let lines: Vec<&str> = log["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    for event in [
        " import ",
        " enable_failed ",
        " enable ",
        " exit_down ",
        " exit_up ",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(event)),
            "{event} in {lines:#?}"
        );
    }
    assert_eq!(
        api(&daemon, &["multihop", "get_session_log", "lines=2"])["logs"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Off again: the server's address again.
    let off = api(&daemon, &["multihop", "disable_multihop"]);
    assert_eq!(off["multihop_enabled"], false);
    assert_eq!(off["previous_exit"], "exit-a");
    assert_eq!(off["interface_cleaned"], true);
    assert!(off["message"].is_string());
    assert!(wait_seen_as(
        &topo.client,
        SERVER_UPLINK,
        Duration::from_secs(10)
    ));
    assert_no_trace(&topo.server, &iface);
    assert_eq!(
        upstream_sees(&topo, "off-again.example").as_deref(),
        Some(SERVER_UPLINK)
    );

    // Restarts with multihop on (clean stop, then kill -9): on again, each entry once.
    api(
        &daemon,
        &["multihop", "enable_multihop", "exit_name=exit-a"],
    );
    assert!(wait_seen_as(
        &topo.client,
        EXIT_PUBLIC,
        Duration::from_secs(10)
    ));
    assert!(daemon.stop().success());
    assert!(
        !daemon.log().contains("still referenced at shutdown"),
        "multihop lets go of the datapath at shutdown"
    );
    daemon.restart();
    let status = api(&daemon, &["multihop", "status"]);
    assert_eq!(status["enabled"], true);
    assert_eq!(status["active_exit"], "exit-a");
    assert_exactly_once(&topo.server, &iface);
    assert!(
        wait_seen_as(&topo.client, EXIT_PUBLIC, Duration::from_secs(30)),
        "after restart: {:?}",
        seen_as(&topo.client)
    );
    daemon.kill9();
    daemon.restart();
    assert_eq!(api(&daemon, &["multihop", "status"])["enabled"], true);
    assert_exactly_once(&topo.server, &iface);
    assert!(
        wait_seen_as(&topo.client, EXIT_PUBLIC, Duration::from_secs(30)),
        "after kill -9: {:?}",
        seen_as(&topo.client)
    );
    assert_eq!(
        api(&daemon, &["datapath", "multihop_mark"])["enabled"],
        true
    );

    // reset_state leaves no trace.
    let reset = api(&daemon, &["multihop", "reset_state"]);
    assert_eq!(reset["reset_complete"], true);
    assert_eq!(reset["cleanup_successful"], true, "{reset}");
    assert!(!reset["cleaned_up"].as_array().unwrap().is_empty());
    assert!(reset["message"].is_string());
    assert_no_trace(&topo.server, &iface);
    assert_eq!(
        api(&daemon, &["datapath", "multihop_mark"])["enabled"],
        false
    );
    assert_eq!(api(&daemon, &["multihop", "status"])["enabled"], false);
    assert!(wait_seen_as(
        &topo.client,
        SERVER_UPLINK,
        Duration::from_secs(10)
    ));

    // Removing the active exit turns multihop off first. (This daemon process carries the
    // one-shot fault injection too: its first enable fails and rolls back as well.)
    assert_eq!(
        api_err(
            &daemon,
            &["multihop", "enable_multihop", "exit_name=exit-a"]
        ),
        "MULTIHOP_SETUP_FAILED"
    );
    assert_no_trace(&topo.server, &iface);
    api(
        &daemon,
        &["multihop", "enable_multihop", "exit_name=exit-a"],
    );
    let removed = api(
        &daemon,
        &["multihop", "remove_vpn_config", "exit_name=exit-a"],
    );
    assert_eq!(removed["removed"], "exit-a");
    assert_eq!(removed["was_active"], true);
    assert!(removed["message"].is_string());
    assert_no_trace(&topo.server, &iface);
    assert_eq!(api(&daemon, &["multihop", "status"])["enabled"], false);
    assert_eq!(api(&daemon, &["multihop", "list_exits"])["total"], 0);
    assert!(!stored.exists());

    // A crash half-way through an enable leaves entries of ours while the state says off:
    // the next start removes them (and only them).
    topo.server.ip(&[
        "rule", "add", "fwmark", "0x6d68", "lookup", "100", "priority", "100", "proto", "109",
    ]);
    topo.server.ip(&[
        "route",
        "add",
        "unreachable",
        "default",
        "table",
        "100",
        "metric",
        "4000000000",
        "proto",
        "109",
    ]);
    topo.server
        .ip(&["route", "add", "192.0.2.0/24", "dev", "up0", "table", "100"]);
    daemon.kill9();
    daemon.restart();
    assert!(rules_to_exit_table(&topo.server).is_empty());
    assert_eq!(
        exit_table(&topo.server),
        vec!["192.0.2.0/24 dev up0 scope link".to_string()],
        "an operator's own route in table 100 stays"
    );
    assert!(
        api(&daemon, &["multihop", "get_session_log", "lines=5"])["logs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains(" leftovers_removed "))
    );
}

/// The provider's wg-quick file for Phantom's side of `exit`.
fn provider_file(phantom_private: &str, exit: &ExitServer) -> String {
    format!(
        "# a provider's file\n[Interface]\nPrivateKey = {phantom_private}\nAddress = {EXIT_TUNNEL_PHANTOM}/32\nDNS = 198.18.66.1\n\n[Peer]\nPublicKey = {}\nAllowedIPs = 0.0.0.0/0, ::/0\nEndpoint = {EXIT_ENDPOINT}\n",
        exit.public_key
    )
}

#[test]
fn enable_starts_the_exit_handshake_itself_and_reports_a_failed_echo_lookup_apart() {
    if !require_root(
        "enable_starts_the_exit_handshake_itself_and_reports_a_failed_echo_lookup_apart",
    ) {
        return;
    }
    let started = Instant::now();
    let topo = Topology::new();
    let files = tempfile::tempdir().unwrap();
    let iface = unique_ifname("phv");
    let phantom_private = wg_key(&["genkey"], None);
    let phantom_public = wg_key(&["pubkey"], Some(&phantom_private));
    let exit = ExitServer::new(&topo.exit, &phantom_public);
    // The echo host's name does not resolve here (a new user without a working resolver):
    // the exit itself is fine.
    let bpffs = BpffsDir::new();
    let daemon = Daemon::start(
        &topo.server,
        &topo.config(&bpffs, &iface, "http://echo.invalid:8080/ip"),
    );
    let path = write_file(
        files.path(),
        "provider.conf",
        &provider_file(&phantom_private, &exit),
    );
    api(
        &daemon,
        &[
            "multihop",
            "import_vpn_config",
            &format!("config_path={path}"),
            "custom_name=exit-a",
        ],
    );
    let on = api(
        &daemon,
        &["multihop", "enable_multihop", "exit_name=exit-a"],
    );
    // Enabling started the handshake itself (a datagram through the exit), so the exit is
    // reported as answering; the probe's failure is reported on its own, as a warning.
    assert_eq!(on["multihop_enabled"], true, "{on}");
    assert_eq!(on["handshake_established"], true, "{on}");
    assert_eq!(on["connection_verified"], false, "{on}");
    let error = on["verification_error"].as_str().unwrap_or_default();
    assert!(error.contains("cannot resolve echo.invalid"), "{on}");
    let warning = on["warning"].as_str().unwrap_or_default();
    assert!(
        warning.contains("handshake with the exit is established") && warning.contains(error),
        "{on}"
    );
    assert!(
        !on.to_string()
            .contains("did not complete a WireGuard handshake"),
        "{on}"
    );
    assert_exactly_once(&topo.server, &iface);
    let status = api(&daemon, &["multihop", "status"]);
    assert_eq!(status["enabled"], true, "{status}");
    assert!(
        status["vpn_interface"]["latest_handshake_seconds_ago"]
            .as_u64()
            .is_some_and(|a| a <= 5),
        "{status}"
    );
    // The monitor judges the exit by its handshake when the echo host cannot be looked up:
    // reachable, and no re-establishing every round.
    assert!(
        eventually(Duration::from_secs(MONITOR_INTERVAL * 3), || {
            api(&daemon, &["multihop", "status"])["monitor_status"]["checks"]["up"]
                .as_u64()
                .is_some_and(|n| n >= 1)
        }),
        "{}",
        api(&daemon, &["multihop", "status"])
    );
    let monitor = api(&daemon, &["multihop", "status"])["monitor_status"].clone();
    assert_eq!(monitor["exit_reachable"], true, "{monitor}");
    assert_eq!(monitor["events"]["reestablished"], 0, "{monitor}");
    api(&daemon, &["multihop", "disable_multihop"]);
    assert_no_trace(&topo.server, &iface);
    drop(exit);
    eprintln!("test took {:?}", started.elapsed());
}

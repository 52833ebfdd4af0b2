//! The end-to-end test harness every Phantom test builds on.
//!
//! - [`NetNs`], [`veth`]: network namespaces and veth pairs, removed on `Drop`. Nothing here
//!   touches the host's own interfaces, routes or firewall: links are created directly inside
//!   the test's namespaces.
//! - [`BpffsDir`]: a private pin directory under /sys/fs/bpf, removed (and so every pinned
//!   map and link released) on `Drop`.
//! - [`Daemon`]: the real `phantomd` binary started inside a namespace on a temp state dir
//!   with its own socket; stopped with SIGTERM or `kill -9`, always killed on `Drop`.
//! - [`ApiClient`] and [`phantom_api`]: the admin socket, raw and through the real CLI.
//!
//! Tests that need root call [`require_root`] first; without root they print why and pass.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::{fd::AsFd, unix::net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

pub mod wstunnel;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A name unique on this host for this process: namespaces and pin paths are host-wide.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// True when the test may run. Without root it prints why it is skipping.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!(
        "SKIP {test}: needs root for network namespaces and eBPF (run the README test command as root)"
    );
    false
}

/// Runs a command and panics with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace, deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> Self {
        let name = unique_name(prefix);
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Output {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs inside this namespace (network only; mounts stay the host's so
    /// bpffs pins stay visible).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it creates live here.
    pub fn run<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> R {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                let file = fs::File::open(&path).expect("open netns");
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("setns");
                f()
            })
            .join()
            .expect("namespace thread panicked")
        })
    }

    /// Writes a sysctl of this namespace (`net.ipv4.ip_forward` -> /proc/sys/net/ipv4/ip_forward).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let value = value.to_string();
        self.run(move || {
            fs::write(&path, value).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        });
    }

    /// Waits up to `timeout` for one UDP datagram on `addr` inside this namespace; the socket
    /// is bound before this returns, so traffic sent afterwards is caught.
    pub fn udp_listener(&self, addr: &str) -> UdpListener {
        let addr: SocketAddr = addr.parse().unwrap();
        let socket = self.run(move || std::net::UdpSocket::bind(addr).expect("bind listener"));
        socket
            .set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        UdpListener { socket }
    }

    /// Sends one UDP datagram from `from` (an address of this namespace; port 0 = any).
    pub fn send_udp_from(&self, from: &str, to: &str, payload: &[u8]) {
        let from: SocketAddr = from.parse().unwrap();
        let to: SocketAddr = to.parse().unwrap();
        let payload = payload.to_vec();
        self.run(move || {
            let sock = std::net::UdpSocket::bind(from).expect("bind sender");
            sock.send_to(&payload, to).expect("send");
        });
    }

    /// Names of the TCX programs attached to `dev` in this namespace (`egress` or ingress),
    /// straight from the kernel (BPF_PROG_QUERY).
    pub fn tcx_programs(&self, dev: &str, egress: bool) -> Vec<String> {
        let dev = std::ffi::CString::new(dev).unwrap();
        self.run(move || {
            let attach = if egress {
                aya::programs::TcAttachType::Egress
            } else {
                aya::programs::TcAttachType::Ingress
            };
            let (_, programs) = aya::programs::SchedClassifier::query_tcx(dev.as_c_str(), attach)
                .expect("query tcx");
            programs
                .iter()
                .map(|p| p.name_as_str().unwrap_or("?").to_string())
                .collect()
        })
    }

    /// The MAC address of `dev` in this namespace.
    pub fn mac(&self, dev: &str) -> String {
        let out = self.ip(&["-j", "link", "show", "dev", dev]);
        let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j link");
        v[0]["address"].as_str().expect("address").to_string()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A bound UDP socket inside a namespace.
pub struct UdpListener {
    socket: std::net::UdpSocket,
}

impl UdpListener {
    /// The next datagram and its source, or `None` after the timeout (1.5 s).
    pub fn recv(&self) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = vec![0u8; 65536];
        let (n, from) = self.socket.recv_from(&mut buf).ok()?;
        buf.truncate(n);
        Some((buf, from))
    }
}

/// A background process (dnsmasq, a sender...) killed on drop.
pub struct Process {
    child: Child,
    name: String,
}

impl Process {
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            child,
            name: name.into(),
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stock WireGuard client in a namespace, brought up by `wg-quick` (userspace wireguard-go)
/// from a configuration text exactly as given; `wg-quick down` on drop.
pub struct WgQuickClient {
    dir: tempfile::TempDir,
    conf: PathBuf,
    ns_path: PathBuf,
}

impl WgQuickClient {
    pub fn up(ns: &NetNs, config: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("wgquick")
            .tempdir()
            .unwrap();
        // wg-quick hands the DNS line to resolvconf; the test namespace has no resolver to
        // change, so a no-op stands in for it.
        let bin = dir.path().join("bin");
        fs::create_dir_all(&bin).unwrap();
        let resolvconf = bin.join("resolvconf");
        fs::write(&resolvconf, "#!/bin/sh\ncat >/dev/null\nexit 0\n").unwrap();
        fs::set_permissions(&resolvconf, fs::Permissions::from_mode(0o755)).unwrap();
        let conf = dir.path().join(format!("{}.conf", unique_ifname("phc")));
        fs::write(&conf, config).unwrap();
        fs::set_permissions(&conf, fs::Permissions::from_mode(0o600)).unwrap();
        let client = Self {
            dir,
            conf,
            ns_path: ns.path(),
        };
        run(&mut client.wg_quick("up"));
        client
    }

    fn wg_quick(&self, verb: &str) -> Command {
        let path = format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns_path.display()))
            .arg("--")
            .arg("env")
            .arg(format!("PATH={path}"))
            .arg("WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go")
            .args(["wg-quick", verb])
            .arg(&self.conf);
        cmd
    }

    /// The interface name (the config file's name).
    pub fn interface(&self) -> String {
        self.conf
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

impl Drop for WgQuickClient {
    fn drop(&mut self) {
        let _ = self
            .wg_quick("down")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Creates a veth pair with `a_dev` in `a` and `b_dev` in `b`, both up.
pub fn veth(a: &NetNs, a_dev: &str, b: &NetNs, b_dev: &str) {
    a.ip(&[
        "link",
        "add",
        a_dev,
        "type",
        "veth",
        "peer",
        "name",
        b_dev,
        "netns",
        b.name(),
    ]);
    a.ip(&["link", "set", a_dev, "up"]);
    b.ip(&["link", "set", b_dev, "up"]);
}

/// Two namespaces joined by a veth pair with fixed documentation addresses and static
/// neighbour entries (no ARP/ND noise, so per-source counts are exact):
/// server `up0` 192.0.2.1/24, 2001:db8::1/64 — peer `peer0` 192.0.2.2/24 (+ .3), 2001:db8::2/64.
pub struct GuardedLink {
    pub server: NetNs,
    pub peer: NetNs,
}

impl GuardedLink {
    pub const SERVER_DEV: &'static str = "up0";
    pub const PEER_DEV: &'static str = "peer0";
    pub const SERVER_V4: &'static str = "192.0.2.1";
    pub const PEER_V4: &'static str = "192.0.2.2";
    pub const PEER_V4_SECOND: &'static str = "192.0.2.3";
    pub const SERVER_V6: &'static str = "2001:db8::1";
    pub const PEER_V6: &'static str = "2001:db8::2";

    pub fn new() -> Self {
        let server = NetNs::new("phs");
        let peer = NetNs::new("php");
        veth(&server, Self::SERVER_DEV, &peer, Self::PEER_DEV);
        server.ip(&["addr", "add", "192.0.2.1/24", "dev", Self::SERVER_DEV]);
        server.ip(&[
            "addr",
            "add",
            "2001:db8::1/64",
            "dev",
            Self::SERVER_DEV,
            "nodad",
        ]);
        peer.ip(&["addr", "add", "192.0.2.2/24", "dev", Self::PEER_DEV]);
        peer.ip(&["addr", "add", "192.0.2.3/24", "dev", Self::PEER_DEV]);
        peer.ip(&[
            "addr",
            "add",
            "2001:db8::2/64",
            "dev",
            Self::PEER_DEV,
            "nodad",
        ]);
        let server_mac = server.mac(Self::SERVER_DEV);
        let peer_mac = peer.mac(Self::PEER_DEV);
        for (ns, dev, addr, mac) in [
            (&peer, Self::PEER_DEV, Self::SERVER_V4, &server_mac),
            (&peer, Self::PEER_DEV, Self::SERVER_V6, &server_mac),
            (&server, Self::SERVER_DEV, Self::PEER_V4, &peer_mac),
            (&server, Self::SERVER_DEV, Self::PEER_V4_SECOND, &peer_mac),
            (&server, Self::SERVER_DEV, Self::PEER_V6, &peer_mac),
        ] {
            ns.ip(&[
                "neigh",
                "replace",
                addr,
                "lladdr",
                mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        Self { server, peer }
    }

    /// Sends `count` UDP datagrams of `payload` bytes from `from` (an address of the peer) to
    /// `to` port 9 (discard), inside the peer namespace.
    pub fn send_udp(&self, from: &str, to: &str, count: usize, payload: usize) {
        let from: std::net::IpAddr = from.parse().unwrap();
        let to: std::net::IpAddr = to.parse().unwrap();
        self.peer.run(move || {
            let sock = std::net::UdpSocket::bind(SocketAddr::new(from, 0)).expect("bind");
            let data = vec![0x5au8; payload];
            for _ in 0..count {
                sock.send_to(&data, SocketAddr::new(to, 9)).expect("send");
            }
        });
    }

    /// `ping -c count` from the peer to `to`; returns how many replies came back.
    pub fn ping(&self, to: &str, count: u32) -> u32 {
        self.ping_from(None, to, count)
    }

    /// `ping -c count [-I from] to` from the peer; returns how many replies came back.
    pub fn ping_from(&self, from: Option<&str>, to: &str, count: u32) -> u32 {
        let mut cmd = self.peer.command("ping");
        cmd.args([
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.05",
            "-W",
            "1",
        ]);
        if let Some(from) = from {
            cmd.args(["-I", from]);
        }
        let out = cmd.arg(to).output().expect("ping");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split(',')
            .find_map(|part| part.trim().strip_suffix(" received"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// XDP attachments on the server's uplink as bpftool sees them in that namespace.
    pub fn xdp_attachments(&self) -> Vec<Value> {
        let out = run(self.server.command("bpftool").args([
            "-j",
            "net",
            "show",
            "dev",
            Self::SERVER_DEV,
        ]));
        let v: Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
        v.as_array()
            .into_iter()
            .flatten()
            .flat_map(|entry| entry["xdp"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}

impl Default for GuardedLink {
    fn default() -> Self {
        Self::new()
    }
}

/// A private directory on bpffs for pinned maps and links; removed on drop, which releases
/// every pin in it (and so detaches a pinned XDP link a killed daemon left behind).
pub struct BpffsDir {
    path: PathBuf,
}

impl BpffsDir {
    pub fn new() -> Self {
        let root = Path::new("/sys/fs/bpf");
        let mounted = nix::sys::statfs::statfs(root)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
        if !mounted {
            run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]));
        }
        let path = root.join(unique_name("phantom-test-"));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names pinned in the directory.
    pub fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.path)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Default for BpffsDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Directory holding the workspace's built binaries (`phantomd`, `phantom-api`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PHANTOM_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<test binary> -> target/<profile>
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("deps dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("profile dir")
    } else {
        dir
    };
    assert!(
        dir.join("phantomd").exists(),
        "phantomd not found in {}: build the workspace binaries first (cargo build --workspace --bins) or set PHANTOM_BIN_DIR",
        dir.display()
    );
    dir.to_path_buf()
}

/// The `[wireguard]` section of a test daemon. Interface names must be unique on the host
/// (userspace WireGuard's control sockets live in one directory for all namespaces).
#[derive(Clone, Debug)]
pub struct WireguardSettings {
    pub interface: String,
    pub subnet: String,
    pub listen_port: u16,
    pub endpoint: String,
}

impl WireguardSettings {
    pub fn new(subnet: &str, endpoint: &str) -> Self {
        Self {
            interface: unique_ifname("phw"),
            subnet: subnet.into(),
            listen_port: 51820,
            endpoint: endpoint.into(),
        }
    }
}

/// An interface name unique on this host, at most 15 characters.
pub fn unique_ifname(prefix: &str) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}{n}", std::process::id() % 100_000);
    name.chars().take(15).collect()
}

/// Settings of a test daemon; `toml()` renders the config file.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub uplink: String,
    pub bpffs: PathBuf,
    pub metrics_listen: String,
    pub datapath_enabled: bool,
    /// `[datapath] vpn_interface`; `None` leaves the default (the WireGuard interface).
    pub vpn_interface: Option<String>,
    /// The `[wireguard]` section; `None` runs without the WireGuard server.
    pub wireguard: Option<WireguardSettings>,
    /// Extra environment for the daemon (fault injection).
    pub env: Vec<(String, String)>,
    /// `[blocklist] api_listen`; `None` = off.
    pub blocklist_api: Option<String>,
    pub log_level: String,
    /// The body of the `[dns]` section (the resolver is off by default).
    pub dns_section: String,
    /// More lines for the `[blocklist]` section.
    pub blocklist_extra: String,
    /// Whole sections appended to the file (`[[blocklist.sources]]` tables, ...).
    pub extra_toml: String,
}

impl DaemonConfig {
    pub fn new(uplink: &str, bpffs: &Path) -> Self {
        Self {
            uplink: uplink.into(),
            bpffs: bpffs.to_path_buf(),
            metrics_listen: "127.0.0.1:9469".into(),
            datapath_enabled: true,
            vpn_interface: None,
            wireguard: None,
            env: Vec::new(),
            blocklist_api: None,
            log_level: "info".into(),
            dns_section: "listen = \"off\"\nprimary = \"127.0.0.53\"\nsecondary = \"127.0.0.54\"\n"
                .into(),
            blocklist_extra: String::new(),
            extra_toml: String::new(),
        }
    }

    fn toml(&self, dir: &Path) -> String {
        format!(
            "state_dir = {state:?}\n\
             [log]\nlevel = {level:?}\n\
             [admin]\nsocket = {socket:?}\n\
             [metrics]\nlisten = {metrics:?}\n\
             [datapath]\nenabled = {enabled}\nuplink = {uplink:?}\nbpffs = {bpffs:?}\n{vpn}\
             {wireguard}\
             [dns]\n{dns}\
             [blocklist]\napi_listen = {blocklist_api:?}\n{blocklist_extra}{extra}",
            dns = self.dns_section,
            blocklist_extra = self.blocklist_extra,
            extra = self.extra_toml,
            state = dir.join("state").display().to_string(),
            level = self.log_level,
            socket = dir.join("phantom.sock").display().to_string(),
            metrics = self.metrics_listen,
            enabled = self.datapath_enabled,
            uplink = self.uplink,
            bpffs = self.bpffs.display().to_string(),
            blocklist_api = self.blocklist_api.clone().unwrap_or_else(|| "off".into()),
            wireguard = match &self.wireguard {
                None => "[wireguard]\nenabled = false\n".to_string(),
                Some(w) => format!(
                    "[wireguard]\nenabled = true\ninterface = {:?}\nsubnet = {:?}\nlisten_port = {}\nendpoint = {:?}\n",
                    w.interface, w.subnet, w.listen_port, w.endpoint
                ),
            },
            vpn = self
                .vpn_interface
                .as_ref()
                .map(|v| format!("vpn_interface = {v:?}\n"))
                .unwrap_or_default(),
        )
    }
}

/// The real `phantomd`, running inside a namespace. Killed on drop.
pub struct Daemon {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    ns_path: PathBuf,
    child: Option<Child>,
    log_path: PathBuf,
    starts: u32,
}

impl Daemon {
    /// Writes the config and starts the daemon; returns once its socket answers.
    pub fn start(ns: &NetNs, config: &DaemonConfig) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("phantomd-test")
            .tempdir()
            .unwrap();
        // Let the permission test's unprivileged user reach the socket path.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(dir.path().join("phantom.toml"), config.toml(dir.path())).unwrap();
        let mut daemon = Self {
            env: config.env.clone(),
            log_path: dir.path().join("phantomd.log"),
            dir,
            ns_path: ns.path(),
            child: None,
            starts: 0,
        };
        daemon.spawn();
        daemon
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("phantom.sock")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("phantom.toml")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the daemon has written to stderr, across restarts.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn client(&self) -> ApiClient {
        ApiClient::connect(&self.socket())
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns_path.display()))
            .arg("--")
            .arg(bin_dir().join("phantomd"))
            .arg("--config")
            .arg(self.config_path())
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().expect("spawn phantomd");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "phantomd exited during start-up ({status}):\n{}",
                    self.log()
                );
            }
            if let Ok(stream) = UnixStream::connect(self.socket()) {
                let mut client = ApiClient::from_stream(stream);
                if client
                    .call("api", "describe", json!({}))
                    .get("success")
                    .and_then(Value::as_bool)
                    == Some(true)
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "phantomd did not become ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.pid().expect("daemon not running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut child = self.child.take().expect("daemon not running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("phantomd ignored SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`: no cleanup at all, as in a crash.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon not running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts the daemon again on the same config and state.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        self.spawn();
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A raw admin-socket client: one JSON line out, one line back.
pub struct ApiClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ApiClient {
    pub fn connect(socket: &Path) -> Self {
        Self::from_stream(UnixStream::connect(socket).expect("connect to the admin socket"))
    }

    fn from_stream(stream: UnixStream) -> Self {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        Self {
            reader: BufReader::new(stream),
            writer,
        }
    }

    /// Sends bytes as they are (no newline added) and reads one reply line, if any. A write
    /// that fails because the daemon answered and closed early still reads that answer.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Option<String> {
        let _ = self.writer.write_all(bytes);
        self.read_line()
    }

    pub fn read_line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line),
        }
    }

    /// One request; returns the whole envelope.
    pub fn call(&mut self, module: &str, action: &str, params: Value) -> Value {
        let mut frame =
            serde_json::to_vec(&json!({"module": module, "action": action, "params": params}))
                .unwrap();
        frame.push(b'\n');
        let line = self.send_raw(&frame).expect("no reply from the daemon");
        serde_json::from_str(&line).expect("reply is not JSON")
    }

    /// One request that must succeed; returns `data`.
    pub fn ok(&mut self, module: &str, action: &str, params: Value) -> Value {
        let reply = self.call(module, action, params);
        assert_eq!(reply["success"], true, "{module} {action} failed: {reply}");
        reply["data"].clone()
    }
}

/// Runs the real `phantom-api` CLI against `socket`; returns the exit code and parsed stdout
/// (`Value::Null` when stdout is not JSON, e.g. for `--help`).
pub fn phantom_api(socket: &Path, args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(bin_dir().join("phantom-api"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run phantom-api");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), value, stdout)
}

/// `phantom-api <args>` against `daemon`, which must succeed; returns `data`.
pub fn api(daemon: &Daemon, args: &[&str]) -> Value {
    let (code, reply, out) = phantom_api(&daemon.socket(), args);
    assert_eq!(code, 0, "phantom-api {args:?}: {out}");
    reply["data"].clone()
}

/// `phantom-api <args>` against `daemon`, which must fail; returns the error code.
pub fn api_err(daemon: &Daemon, args: &[&str]) -> String {
    let (code, reply, out) = phantom_api(&daemon.socket(), args);
    assert_ne!(code, 0, "phantom-api {args:?} should fail: {out}");
    assert_eq!(reply["success"], false);
    reply["code"].as_str().unwrap_or_default().to_string()
}

/// `GET path` over HTTP/1.1 from inside `ns`; returns the body of a 200 answer.
pub fn http_get(ns: &NetNs, addr: &str, path: &str) -> String {
    let addr: SocketAddr = addr.parse().unwrap();
    let path = path.to_string();
    ns.run(move || {
        let mut stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        }
    })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// The value of the sample `name{labels}` in a Prometheus text exposition.
pub fn metric_value(exposition: &str, name_and_labels: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(name_and_labels)?;
        rest.strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

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
    let mut cmd = ns.command("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--pid-file=",
        "--user=root",
        "--log-facility=-",
        // Cacheable answers, as real zones give (host records default to TTL 0).
        "--local-ttl=300",
    ]);
    for l in listen {
        cmd.arg(format!("--listen-address={l}"));
    }
    for r in records {
        cmd.arg(format!("--host-record={r}"));
    }
    let mut p = Process::spawn("dnsmasq", &mut cmd);
    for _ in 0..50 {
        if dig(ns, listen[0], probe, "A", &[]).0 == "NOERROR" {
            return p;
        }
        assert!(p.is_running(), "dnsmasq exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("dnsmasq did not answer");
}

/// A private `redis-server` on a Unix socket in a temp dir (no TCP port, no persistence),
/// killed by pid on drop. `stop`/`start` simulate an outage on the same socket.
pub struct RedisServer {
    dir: tempfile::TempDir,
    process: Option<Process>,
}

impl RedisServer {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("phantom-redis")
            .tempdir()
            .unwrap();
        let mut server = Self { dir, process: None };
        server.resume();
        server
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// The `redis_url` for the daemon.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    /// Kills the server (as in a crash); the socket stops answering.
    pub fn stop(&mut self) {
        self.process = None;
        let _ = fs::remove_file(self.socket());
    }

    /// (Re)starts the server on the same socket and waits until it answers PING.
    pub fn resume(&mut self) {
        let sock = self.socket();
        let _ = fs::remove_file(&sock);
        let process = Process::spawn(
            "redis-server",
            Command::new("redis-server")
                .args(["--port", "0", "--unixsocket"])
                .arg(&sock)
                .args([
                    "--unixsocketperm",
                    "700",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(self.dir.path()),
        );
        self.process = Some(process);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping() {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn ping(&self) -> bool {
        let Ok(mut s) = UnixStream::connect(self.socket()) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }
}

/// One HTTP/1.1 answer as a client sees it.
#[derive(Clone, Debug)]
pub struct HttpReply {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends one request (`target` = "METHOD /path") from source address `from` (an address
/// inside `ns`) to `to`, with `Connection: close`; `extra_headers` are full lines without CRLF. Connecting gives up after
/// `timeout` (a source dropped in XDP never connects): then `Err`.
pub fn http_from(
    ns: &NetNs,
    from: &str,
    to: &str,
    target: &str,
    extra_headers: &[String],
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<HttpReply> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd;
    let from: std::net::Ipv4Addr = from.parse().expect("IPv4 source");
    let to: std::net::SocketAddrV4 = to.parse().expect("IPv4 ip:port");
    let mut request = format!(
        "{target} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in extra_headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    ns.run(move || -> std::io::Result<HttpReply> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let tv =
            nix::sys::time::TimeVal::new(timeout.as_secs() as i64, timeout.subsec_micros() as i64);
        // Linux bounds a blocking connect() by the send timeout.
        setsockopt(&fd, sockopt::SendTimeout, &tv)?;
        setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
        bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(std::net::SocketAddrV4::new(from, 0)),
        )?;
        connect(fd.as_raw_fd(), &SockaddrIn::from(to))?;
        let mut stream = TcpStream::from(fd);
        stream.write_all(&bytes)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).to_string();
        let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("no HTTP head: {text:?}"),
            )
        })?;
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let body = if chunked {
            dechunk(rest)
        } else {
            rest.to_string()
        };
        Ok(HttpReply {
            status,
            headers,
            body,
        })
    })
}

/// A plain HTTP/1.1 site inside a namespace: answers every request with 200 and a body
/// naming the path (and echoing `X-Forwarded-For`), and counts requests. Stops on drop.
pub struct UpstreamSite {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UpstreamSite {
    pub const BODY_PREFIX: &'static str = "hello from upstream";

    pub fn start(ns: &NetNs, addr: &str) -> Self {
        let addr: SocketAddr = addr.parse().unwrap();
        let listener = ns.run(move || std::net::TcpListener::bind(addr).expect("bind upstream"));
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, r) = (stop.clone(), requests.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let r = r.clone();
                        std::thread::spawn(move || serve_upstream(stream, &r));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Self {
            stop,
            requests,
            thread: Some(thread),
        }
    }
}

fn serve_upstream(stream: TcpStream, requests: &std::sync::atomic::AtomicU64) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let (mut length, mut xff, mut close) = (0usize, String::new(), false);
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = v.trim().parse().unwrap_or(0),
                    "x-forwarded-for" => xff = v.trim().to_string(),
                    "connection" => close = v.trim().eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        requests.fetch_add(1, Ordering::Relaxed);
        let text = format!(
            "{} {path} xff={xff} body={}",
            UpstreamSite::BODY_PREFIX,
            body.len()
        );
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        if reader.get_mut().write_all(reply.as_bytes()).is_err() || close {
            return;
        }
    }
}

impl Drop for UpstreamSite {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

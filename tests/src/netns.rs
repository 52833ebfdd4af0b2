//! Network namespaces, veth pairs and pin directories, all removed on `Drop`. Nothing here
//! touches the host's own interfaces, routes or firewall: links are created directly inside
//! the test's namespaces.

use std::{
    fs,
    net::SocketAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use serde_json::Value;

use crate::run;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A name unique on this host for this process: namespaces and pin paths are host-wide.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// The environment variable naming the file where skipped tests are recorded, one name a line
/// (`cargo xtask test` sets it and counts them as skipped, not passed).
pub const SKIPPED_TESTS_ENV: &str = "PHANTOM_SKIPPED_TESTS";

/// True when the test may run. Without root it prints why it is skipping and records its name
/// in the file `$PHANTOM_SKIPPED_TESTS` names, when set.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!(
        "SKIP {test}: needs root for network namespaces and eBPF (run the README test command as root)"
    );
    if let Some(path) = std::env::var_os(SKIPPED_TESTS_ENV) {
        use std::io::Write;
        // One write of one line to a file opened for appending: lines of tests running at
        // once in several processes never interleave.
        let appended = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(format!("{test}\n").as_bytes()));
        if let Err(e) = appended {
            eprintln!(
                "cannot record the skip in {}: {e}",
                PathBuf::from(path).display()
            );
        }
    }
    false
}

/// An interface name unique on this host, at most 15 characters.
pub fn unique_ifname(prefix: &str) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}{n}", std::process::id() % 100_000);
    name.chars().take(15).collect()
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

    /// [`Self::mac`] as its six bytes.
    pub fn mac_bytes(&self, dev: &str) -> [u8; 6] {
        let mac = self.mac(dev);
        let bytes: Vec<u8> = mac
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("hex MAC byte"))
            .collect();
        bytes
            .try_into()
            .unwrap_or_else(|_| panic!("{dev}: MAC {mac} is not six bytes"))
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
        self.send_udp_on(None, from, to, count, payload);
    }

    /// [`Self::send_udp`] from a thread bound to `cpu` when given: veth runs the receiving
    /// side's XDP on the sending CPU, so per-CPU state (the guard's pass cache) sees every
    /// datagram on that CPU.
    pub fn send_udp_on(
        &self,
        cpu: Option<usize>,
        from: &str,
        to: &str,
        count: usize,
        payload: usize,
    ) {
        let from: std::net::IpAddr = from.parse().unwrap();
        let to: std::net::IpAddr = to.parse().unwrap();
        self.peer.run(move || {
            if let Some(cpu) = cpu {
                let mut cpus = nix::sched::CpuSet::new();
                cpus.set(cpu).expect("cpu set");
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus)
                    .expect("sched_setaffinity");
            }
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
        Self::with_prefix("phantom-test-")
    }

    /// A directory named `<prefix><unique>` (not created: the daemon creates its own).
    pub fn with_prefix(prefix: &str) -> Self {
        let root = Path::new("/sys/fs/bpf");
        let mounted = nix::sys::statfs::statfs(root)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
        if !mounted {
            run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]));
        }
        let path = root.join(unique_name(prefix));
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

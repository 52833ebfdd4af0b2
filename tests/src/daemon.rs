//! The real `phantomd` in a namespace, and its admin socket, raw and through the real CLI.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{NetNs, unique_ifname};

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
    /// More lines for the `[log]` section (e.g. `format = "json"`).
    pub log_extra: String,
    /// The body of the `[dns]` section (the resolver is off by default).
    pub dns_section: String,
    /// More lines for the `[blocklist]` section.
    pub blocklist_extra: String,
    /// Whole sections appended to the file (`[[blocklist.sources]]` tables, ...).
    pub extra_toml: String,
    /// More lines for the `[admin]` section (the HTTPS API's keys).
    pub admin_extra: String,
    /// More lines for the `[metrics]` section.
    pub metrics_extra: String,
    /// The state directory; `None` = `state` in the daemon's temp dir.
    pub state_dir: Option<PathBuf>,
    /// More lines for the `[datapath]` section (map capacities, ...).
    pub datapath_extra: String,
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
            log_extra: String::new(),
            dns_section: "listen = \"off\"\nprimary = \"127.0.0.53\"\nsecondary = \"127.0.0.54\"\n"
                .into(),
            blocklist_extra: String::new(),
            extra_toml: String::new(),
            admin_extra: String::new(),
            metrics_extra: String::new(),
            state_dir: None,
            datapath_extra: String::new(),
        }
    }

    fn toml(&self, dir: &Path) -> String {
        format!(
            "state_dir = {state:?}\n\
             [log]\nlevel = {level:?}\n{log_extra}\
             [admin]\nsocket = {socket:?}\n{admin_extra}\
             [metrics]\nlisten = {metrics:?}\n{metrics_extra}\
             [datapath]\nenabled = {enabled}\nuplink = {uplink:?}\nbpffs = {bpffs:?}\n{vpn}{datapath_extra}\
             {wireguard}\
             [dns]\n{dns}\
             [blocklist]\napi_listen = {blocklist_api:?}\n{blocklist_extra}{extra}",
            dns = self.dns_section,
            datapath_extra = self.datapath_extra,
            blocklist_extra = self.blocklist_extra,
            extra = self.extra_toml,
            admin_extra = self.admin_extra,
            metrics_extra = self.metrics_extra,
            state = self
                .state_dir
                .clone()
                .unwrap_or_else(|| dir.join("state"))
                .display()
                .to_string(),
            level = self.log_level,
            log_extra = self.log_extra,
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

    /// Rewrites the daemon's configuration file with the first `from` replaced by `to`, for
    /// the next start or SIGHUP. Panics when the file has no `from`: an edit that cannot
    /// apply would leave the test checking the old settings.
    pub fn edit_config(&self, from: &str, to: &str) {
        let path = self.config_path();
        let text = fs::read_to_string(&path).expect("the daemon's configuration file");
        assert!(
            text.contains(from),
            "{from:?} is not in {}:\n{text}",
            path.display()
        );
        fs::write(&path, text.replacen(from, to, 1)).expect("the configuration file written");
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

    /// `phantomd` on this daemon's config, in its namespace, its output appended to the log.
    fn phantomd_command(&mut self) -> Command {
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
        cmd
    }

    fn spawn(&mut self) {
        let child = self.phantomd_command().spawn().expect("spawn phantomd");
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
            // A connection closed without a reply (a daemon that exits just after binding its
            // socket, say) is not ready yet: the next round reports an exit with its log.
            if let Ok(stream) = UnixStream::connect(self.socket()) {
                let mut client = ApiClient::from_stream(stream);
                let ready = client
                    .send("api", "describe", json!({}))
                    .and_then(|line| serde_json::from_str::<Value>(&line).ok())
                    .and_then(|reply| reply.get("success").and_then(Value::as_bool));
                if ready == Some(true) {
                    return;
                }
                // Left in the test's output: a daemon that accepts and then closes without an
                // answer (`None`) is worth knowing about even when the next round finds it ready.
                eprintln!("phantomd start-up probe: not ready (success {ready:?}); trying again");
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

    /// The environment of the next start (replacing the config's).
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        self.env = env;
    }

    /// Starts the daemon again on the same config and state.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        self.spawn();
    }

    /// Starts the daemon again on the same config and state when it must refuse to start:
    /// waits for it to exit (panicking if it becomes ready instead) and returns the status.
    pub fn restart_refused(&mut self) -> std::process::ExitStatus {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        let mut child = self.phantomd_command().spawn().expect("spawn phantomd");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline || UnixStream::connect(self.socket()).is_ok() {
                let _ = child.kill();
                let _ = child.wait();
                panic!("phantomd started where it must refuse:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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

    /// One request; returns the reply's line, or `None` when the connection closed first.
    pub fn send(&mut self, module: &str, action: &str, params: Value) -> Option<String> {
        let mut frame =
            serde_json::to_vec(&json!({"module": module, "action": action, "params": params}))
                .unwrap();
        frame.push(b'\n');
        self.send_raw(&frame)
    }

    /// One request; returns the whole envelope.
    pub fn call(&mut self, module: &str, action: &str, params: Value) -> Value {
        let line = self
            .send(module, action, params)
            .expect("no reply from the daemon");
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

/// A bearer token of the HTTPS admin API (`admin token_create`), minted over the socket.
pub fn mint_token(daemon: &Daemon, name: &str, scope: &str, ttl: &str) -> String {
    let data = api(
        daemon,
        &[
            "admin",
            "token_create",
            &format!("name={name}"),
            &format!("scope={scope}"),
            &format!("ttl={ttl}"),
        ],
    );
    data["token"].as_str().unwrap().to_string()
}

/// `phantom-api <args>` against `daemon`, which must fail; returns the error code.
pub fn api_err(daemon: &Daemon, args: &[&str]) -> String {
    let (code, reply, out) = phantom_api(&daemon.socket(), args);
    assert_ne!(code, 0, "phantom-api {args:?} should fail: {out}");
    assert_eq!(reply["success"], false);
    reply["code"].as_str().unwrap_or_default().to_string()
}

//! A private redis-server for the sentry's shared store.

use std::{
    fs,
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use crate::Process;

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

    /// The running server's process id (`None` while stopped).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::id)
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

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered until
    /// `unpause` (a stall, not a crash).
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a paused server run again (SIGCONT); it answers what queued up meanwhile.
    pub fn unpause(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.pid().expect("redis-server is not running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .expect("signal redis-server");
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

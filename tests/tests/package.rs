//! The Debian package (`cargo xtask package`, docs/packaging.md), built from the debug binaries
//! the other tests run: it holds the expected files with the default configuration as a
//! conffile; lintian finds no errors; `systemd-analyze verify` accepts the unit with the
//! package's files in place; the packaged phantomd accepts the packaged configuration; the man
//! pages render; the completions load in bash and complete.
//!
//! The package is extracted into a directory (`dpkg-deb -x`), never installed on the host.
//! None of this needs root, except the last test: the real daemon speaks systemd's notify
//! protocol (the unit's `Type=notify` and `WatchdogSec=`). Tools: dpkg-deb, lintian, systemd-analyze, man, groff, bash
//! (scripts/bootstrap.sh installs lintian).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    time::{Duration, Instant},
};

use phantom_tests::{BpffsDir, Daemon, DaemonConfig, GuardedLink, bin_dir, require_root};

/// What every test here inspects: the .deb and the tree it extracts to.
struct Built {
    deb: PathBuf,
    root: PathBuf,
}

/// Builds the package once per test binary, in `<bin dir>/package-test` (replaced each run).
fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let bins = bin_dir();
        let out_dir = bins.join("package-test");
        let _ = std::fs::remove_dir_all(&out_dir);
        std::fs::create_dir_all(&out_dir).unwrap();
        let started = std::time::Instant::now();
        // The xtask binary is built with the workspace's binaries (`cargo build --bins`).
        let out = run(Command::new(bins.join("xtask"))
            .args(["package", "--fast", "--bin-dir"])
            .arg(&bins)
            .arg("--out-dir")
            .arg(&out_dir));
        let deb = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        eprintln!(
            "package built in {:?}: {}",
            started.elapsed(),
            deb.display()
        );
        let root = out_dir.join("root");
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
        Built { deb, root }
    })
}

/// Runs `cmd`; panics with its output unless it succeeds.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (scripts/bootstrap.sh installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn package_holds_the_binaries_unit_config_man_pages_and_completions() {
    let b = built();
    let listing = stdout(&run(Command::new("dpkg-deb").arg("-c").arg(&b.deb)));
    for path in [
        "./usr/sbin/phantomd",
        "./usr/bin/phantom-api",
        "./usr/lib/systemd/system/phantomd.service",
        "./etc/phantom/phantom.toml",
        "./usr/share/man/man8/phantomd.8.gz",
        "./usr/share/man/man1/phantom-api.1.gz",
        "./usr/share/bash-completion/completions/phantomd",
        "./usr/share/bash-completion/completions/phantom-api",
        "./usr/share/zsh/vendor-completions/_phantomd",
        "./usr/share/fish/vendor_completions.d/phantomd.fish",
        "./usr/share/doc/phantom/copyright",
        "./usr/share/doc/phantom/changelog.gz",
    ] {
        let line = listing
            .lines()
            .find(|l| l.ends_with(&format!(" {path}")))
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"));
        assert!(
            line.contains("root/root"),
            "{path} is not owned by root: {line}"
        );
        if path.contains("/sbin/") || path.contains("/bin/") {
            assert!(line.starts_with("-rwxr-xr-x"), "{path} is not 0755: {line}");
        }
    }
    // The configuration is a conffile: dpkg keeps the operator's edits across upgrades.
    let conffiles = stdout(&run(Command::new("dpkg-deb")
        .args(["-I"])
        .arg(&b.deb)
        .arg("conffiles")));
    assert_eq!(conffiles.trim(), "/etc/phantom/phantom.toml");
    let fields = stdout(&run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&b.deb)
        .args(["Package", "Depends"])));
    assert!(fields.contains("Package: phantom\n"), "{fields}");
    for dep in ["libc6", "nftables", "passwd"] {
        assert!(fields.contains(dep), "Depends lacks {dep}: {fields}");
    }
    // The maintainer scripts: postinst makes the admin socket's group.
    let postinst = stdout(&run(Command::new("dpkg-deb")
        .args(["-I"])
        .arg(&b.deb)
        .arg("postinst")));
    assert!(postinst.contains("groupadd --system phantom"), "{postinst}");
    // The packaged default configuration names that group for the socket.
    let config = std::fs::read_to_string(b.root.join("etc/phantom/phantom.toml")).unwrap();
    assert!(config.contains("group = \"phantom\""), "{config}");
}

#[test]
fn lintian_reports_no_errors() {
    let b = built();
    let out = Command::new("lintian")
        .args(["--tag-display-limit", "0", "--fail-on", "error"])
        .arg(&b.deb)
        .output()
        .expect("lintian (scripts/bootstrap.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("lintian:\n{text}");
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E: ")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    assert!(out.status.success(), "lintian failed:\n{text}");
}

#[test]
fn packaged_phantomd_accepts_the_packaged_config() {
    let b = built();
    let config = b.root.join("etc/phantom/phantom.toml");
    let out = run(Command::new(b.root.join("usr/sbin/phantomd"))
        .arg("--check-config")
        .arg("--config")
        .arg(&config));
    assert!(stdout(&out).contains(": OK"), "{}", stdout(&out));
    // And refuses a broken one, which is what keeps the unit's ExecStartPre useful.
    let broken = b.root.join("broken.toml");
    std::fs::write(&broken, "[admin]\nsockett = \"/x\"\n").unwrap();
    let out = Command::new(b.root.join("usr/sbin/phantomd"))
        .arg("--check-config")
        .arg("--config")
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a broken configuration passed");
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let b = built();
    // A root holding the package and what the unit refers to on a host: systemd's own units
    // (sysinit.target, ...) and /bin/kill (ExecReload). Copied from the host, read only.
    let root = b.root.parent().unwrap().join("verify-root");
    let _ = std::fs::remove_dir_all(&root);
    // Hard links: the same files, without another copy of the binaries on disk.
    run(Command::new("cp").arg("-al").arg(&b.root).arg(&root));
    let units = root.join("usr/lib/systemd/system");
    run(Command::new("cp")
        .args(["-a", "-n", "/lib/systemd/system/."])
        .arg(&units));
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/kill", root.join("bin/kill")).unwrap();
    let unit = units.join("phantomd.service");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(&unit)
        // Documentation=man:... is checked with man(1): let it find the packaged pages.
        .env("MANPATH", root.join("usr/share/man"))
        .output()
        .expect("systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("phantomd.service"),
        "systemd-analyze verify: {}\n{text}",
        out.status
    );
    // The hardening the docs promise is in the unit that was verified.
    let text = std::fs::read_to_string(&unit).unwrap();
    for line in [
        "ExecStartPre=/usr/sbin/phantomd --check-config --config /etc/phantom/phantom.toml",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "StateDirectory=phantom",
        "RuntimeDirectory=phantom",
        "ReadWritePaths=/sys/fs/bpf",
        "Restart=on-failure",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_BPF CAP_PERFMON CAP_NET_BIND_SERVICE CAP_CHOWN",
    ] {
        assert!(text.lines().any(|l| l == line), "the unit lacks {line}");
    }
}

/// `page` rendered by man(1) as plain text; groff's warnings (-ww) fail the test.
fn render_man(page: &Path) -> String {
    let out = run(Command::new("man")
        .args(["--warnings=w", "-l"])
        .arg(page)
        .env("MANWIDTH", "80")
        .env("MANPAGER", "cat")
        .env("MAN_KEEP_FORMATTING", ""));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.trim().is_empty(),
        "{}: warnings:\n{stderr}",
        page.display()
    );
    stdout(&out)
}

#[test]
fn man_pages_render() {
    let b = built();
    let phantomd = render_man(&b.root.join("usr/share/man/man8/phantomd.8.gz"));
    for word in [
        "phantomd",
        "--check-config",
        "--print-default-config",
        "--config",
    ] {
        assert!(
            phantomd.contains(word),
            "phantomd(8) lacks {word}:\n{phantomd}"
        );
    }
    // The hidden flags the package build uses are not part of the documented interface.
    assert!(!phantomd.contains("--print-man-page"), "{phantomd}");
    let api = render_man(&b.root.join("usr/share/man/man1/phantom-api.1.gz"));
    for word in [
        "phantom-api",
        "--socket",
        "PHANTOM_SOCKET",
        "EXIT STATUS",
        "--qr",
    ] {
        assert!(api.contains(word), "phantom-api(1) lacks {word}:\n{api}");
    }
}

/// Loads the completion file `file` in a fresh bash, completes `words` (the cursor on the
/// last one) and returns the candidates.
fn complete(b: &Built, file: &str, func: &str, words: &[&str]) -> Vec<String> {
    let script = format!(
        "source {file} || exit 1; complete -p {cmd} >/dev/null || exit 1; \
         COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE=\"${{COMP_WORDS[*]}}\"; \
         COMP_POINT=${{#COMP_LINE}}; {func} {cmd} \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        file = b
            .root
            .join("usr/share/bash-completion/completions")
            .join(file)
            .display(),
        cmd = words[0],
        words = words
            .iter()
            .map(|w| format!("'{w}'"))
            .collect::<Vec<_>>()
            .join(" "),
        cword = words.len() - 1,
    );
    // The packaged phantom-api first on PATH, as after installing the package.
    let path = format!(
        "{}:{}",
        b.root.join("usr/bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = run(Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &script])
        .env("PATH", path)
        .env("PHANTOM_SOCKET", b.root.join("no-daemon.sock")));
    stdout(&out).lines().map(str::to_string).collect()
}

#[test]
fn bash_completions_load_and_complete() {
    let b = built();
    let got = complete(b, "phantomd", "_phantomd", &["phantomd", "--check"]);
    assert_eq!(got, ["--check-config"], "phantomd --check<TAB>");
    let got = complete(b, "phantom-api", "_phantom_api", &["phantom-api", "--pr"]);
    assert_eq!(got, ["--pretty"], "phantom-api --pr<TAB>");
    // Modules come from the running daemon; with none there is nothing to offer (and no
    // error on the terminal).
    let got = complete(b, "phantom-api", "_phantom_api", &["phantom-api", ""]);
    assert!(got.iter().all(String::is_empty), "{got:?}");
}

/// The packaged unit is `Type=notify` with `WatchdogSec=`: the real daemon, started the way
/// systemd starts it (`NOTIFY_SOCKET`, `WATCHDOG_USEC`), says READY=1 once its socket answers,
/// pings the watchdog at half the interval, and says STOPPING=1 on SIGTERM.
#[test]
fn daemon_tells_systemd_ready_watchdog_and_stopping() {
    if !require_root("daemon_tells_systemd_ready_watchdog_and_stopping") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 512];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path());
    config.datapath_enabled = false;
    config.env = vec![
        ("NOTIFY_SOCKET".into(), path.display().to_string()),
        // 400 ms: a ping every 200 ms.
        ("WATCHDOG_USEC".into(), "400000".into()),
    ];
    let mut daemon = Daemon::start(&link.server, &config);
    assert_eq!(recv(), "READY=1\n", "the first notification");
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(recv(), "WATCHDOG=1\n");
    }
    // Five pings at 200 ms take about a second; far less would mean no period at all.
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "five watchdog pings in {:?}",
        started.elapsed()
    );
    assert!(daemon.stop().success(), "{}", daemon.log());
    notify
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut rest = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(n) = notify.recv(&mut buf) {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        rest.iter().any(|m| m == "STOPPING=1\n"),
        "no STOPPING=1 after SIGTERM: {rest:?}"
    );
}

/// With a daemon answering on the socket, the packaged phantom-api completion offers its
/// modules, then the chosen module's actions, as `phantom-api --help` lists them.
#[test]
fn phantom_api_completion_offers_the_running_daemons_modules_and_actions() {
    if !require_root("phantom_api_completion_offers_the_running_daemons_modules_and_actions") {
        return;
    }
    let b = built();
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path());
    config.datapath_enabled = false;
    let daemon = Daemon::start(&link.server, &config);
    let socket = daemon.socket().display().to_string();
    let words = |w: &[&str]| -> Vec<String> {
        let mut all = vec!["phantom-api", "--socket", socket.as_str()];
        all.extend_from_slice(w);
        complete(b, "phantom-api", "_phantom_api", &all)
    };
    let modules = words(&[""]);
    for m in ["core", "datapath", "blocklist", "dns"] {
        assert!(
            modules.iter().any(|x| x == m),
            "modules {modules:?} lack {m}"
        );
    }
    assert_eq!(words(&["da"]), ["datapath"]);
    let actions = words(&["core", ""]);
    assert!(
        actions.iter().any(|a| a == "server_status"),
        "core's actions: {actions:?}"
    );
    assert_eq!(words(&["core", "server_sta"]), ["server_status"]);
    // Past the action only options complete (parameters are key=value, free text).
    assert!(
        words(&["core", "server_status", ""])
            .iter()
            .all(String::is_empty)
    );
}

/// `[log] format = "json"`: every line the daemon writes to stderr is one JSON object with a
/// time stamp, a level and the message, for log shippers; `core service_logs` keeps text.
#[test]
fn daemon_logs_one_json_object_a_line_when_asked() {
    if !require_root("daemon_logs_one_json_object_a_line_when_asked") {
        return;
    }
    let link = GuardedLink::new();
    let bpffs = BpffsDir::new();
    let mut config = DaemonConfig::new(GuardedLink::SERVER_DEV, bpffs.path());
    config.datapath_enabled = false;
    config.log_extra = "format = \"json\"\n".into();
    let mut daemon = Daemon::start(&link.server, &config);
    // The ring behind `core service_logs` keeps plain text.
    let data = daemon
        .client()
        .ok("core", "service_logs", serde_json::json!({}));
    let kept = data["logs"].as_array().unwrap();
    assert!(
        kept.iter().any(|l| l
            .as_str()
            .is_some_and(|l| l.contains("phantomd ready") && !l.starts_with('{'))),
        "{data}"
    );
    assert!(daemon.stop().success());
    let log = daemon.log();
    let mut messages = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(v["level"].is_string(), "{line}");
        messages.push(v["fields"]["message"].as_str().unwrap_or("").to_string());
    }
    for m in ["phantomd ready", "SIGTERM: shutting down"] {
        assert!(messages.iter().any(|x| x == m), "no {m:?} in {messages:?}");
    }
}

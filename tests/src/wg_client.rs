//! A stock WireGuard client (`wg-quick`) inside a namespace.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
};

use crate::{NetNs, run, unique_ifname};

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

//! Makes sure the pin directory lives on a bpf filesystem.

use std::path::Path;

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use crate::error::Error;

const BPFFS_ROOT: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> Result<(), Error> {
    mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| Error::Datapath(format!("cannot mount bpffs on {}: {e}", path.display())))
}

/// Creates `dir` on bpffs, mounting bpffs on /sys/fs/bpf (or on `dir` itself when it lies
/// elsewhere) if nothing is mounted yet.
pub fn ensure(dir: &Path) -> Result<(), Error> {
    if is_bpffs(dir) {
        return Ok(());
    }
    let root = Path::new(BPFFS_ROOT);
    if dir.starts_with(root) && !is_bpffs(root) {
        mount_bpffs(root)?;
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    if !is_bpffs(dir) {
        mount_bpffs(dir)?;
    }
    Ok(())
}

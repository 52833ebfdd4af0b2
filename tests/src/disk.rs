//! A small disk for the state directory: a tmpfs the test mounts on a temp directory and
//! always unmounts on `Drop`, filled to the last byte on demand (the disk-full faults).

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use crate::run;

/// A tmpfs of a fixed size on a private temp directory (mode 0700), unmounted on drop (lazily,
/// so a process still holding a file never keeps it mounted).
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size_kib` KiB.
    pub fn new(size_kib: u64) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("phantom-disk")
            .tempdir()
            .unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_kib}k,mode=0700"))
            .arg("phantom-test-disk")
            .arg(dir.path()));
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn filler(&self) -> PathBuf {
        self.dir.path().join("filler")
    }

    /// Fills every free byte (a file written until `ENOSPC`); `free` gives them back.
    pub fn fill(&self) {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.filler())
            .unwrap();
        let chunk = vec![0u8; 4096];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", self.filler().display()),
            }
        }
        // The last partial page too.
        while file.write(&[0u8]).is_ok_and(|n| n == 1) {}
        assert_eq!(self.available(), 0, "the disk is not full");
    }

    /// Removes what `fill` wrote.
    pub fn free(&self) {
        fs::remove_file(self.filler()).unwrap();
    }

    /// Bytes free on the disk.
    pub fn available(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(self.dir.path()).unwrap();
        st.blocks_available() * st.fragment_size()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

//! Verified programs kept on bpffs between starts.
//!
//! The kernel's verifier is most of a start: on a 2-CPU host the six programs take about a
//! second, and on a restart that second is time every VPN client goes without a tunnel. A
//! verified program does not change while the object, its load-time constants and the kernel
//! stay the same, so each program is pinned after its load under
//! `<bpffs>/programs/<program>-<key>`, where the key hashes exactly those three. The next
//! start adopts the pinned program instead of loading it again, after checking that it still
//! uses the maps this start uses: a map replaced since (an upgrade changed its shape, the
//! configuration its capacity, an operator removed its pin) means the program is loaded and
//! verified again, and its stale pin removed.
//!
//! A stop leaves the pins (they keep only the programs' code and their own private maps in
//! the kernel); removing the pin directory removes them with the maps.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use aya::{
    maps::MapInfo,
    programs::{Program, SchedClassifier, Xdp},
};
use aya_obj::programs::XdpAttachType;
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::error::Error;

/// Maps only the programs read and write, whose contents need not outlive one load: an adopted
/// program keeps its own. Global sections (`.rodata` and the like) are frozen at load and
/// covered by the key.
const PROGRAM_PRIVATE_MAPS: [&str; 4] = [
    "PH_DNS_SCRATCH",
    "PH_SNI_SCRATCH",
    "PH_LOG_GATE",
    "PH_CP_CLOCK",
];

/// The kernel keeps 15 bytes of an object's name.
const KERNEL_NAME_LEN: usize = 15;

fn kernel_name(name: &str) -> &str {
    name.get(..KERNEL_NAME_LEN).unwrap_or(name)
}

/// Where this start's programs are pinned, and what they must use to be adopted.
pub struct ProgramPins {
    dir: PathBuf,
    key: String,
    /// The id of each map this start shares with user space (by its kernel name).
    shared_maps: HashMap<String, u32>,
}

/// How a program came to be loaded.
pub enum Loaded {
    /// Taken from the pin of an earlier start: no verifier run.
    Adopted,
    /// Loaded and verified now.
    Verified,
}

impl ProgramPins {
    /// `object` is the eBPF object, `constants` the load-time values written into it, and
    /// `shared_maps` the (name, pin path) of every other map of the object.
    pub fn new<'a>(
        pin_dir: &Path,
        object: &[u8],
        constants: &[u8],
        shared_maps: impl Iterator<Item = (&'a str, PathBuf)>,
    ) -> Result<Self, Error> {
        let dir = pin_dir.join("programs");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut hash = Sha256::new();
        for part in [object, constants, release.as_bytes()] {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part);
        }
        let key = hash.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut shared = HashMap::new();
        // A shared map without a pin is left out, so no pinned program that uses it is adopted.
        for (name, pin) in shared_maps {
            if let Ok(info) = MapInfo::from_pin(&pin) {
                shared.insert(kernel_name(name).to_string(), info.id());
            }
        }
        Ok(Self {
            dir,
            key,
            shared_maps: shared,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-{}", self.key))
    }

    /// Puts the pinned program in `program`'s place when there is one for this key and it
    /// uses this start's maps; otherwise loads and verifies `program` and pins it. Either
    /// way the pins of other keys for this program are removed.
    pub fn load(&self, name: &str, program: &mut Program) -> Result<Loaded, Error> {
        let path = self.path(name);
        let loaded = match self.adopt(program, &path) {
            Ok(Some(adopted)) => {
                *program = adopted;
                Loaded::Adopted
            }
            outcome => {
                if let Err(e) = outcome {
                    warn!(program = name, error = %e, "pinned program not adopted; verifying it again");
                }
                if path.exists() {
                    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                }
                load_fresh(name, program)?;
                // Without the pin the next start verifies again; this one is unaffected.
                if let Err(e) = program.pin(&path) {
                    warn!(program = name, error = %e, "cannot pin the verified program");
                }
                Loaded::Verified
            }
        };
        self.remove_other_keys(name);
        Ok(loaded)
    }

    /// The pinned program at `path`, when it exists and every map it uses is either this
    /// start's (same id) or one of its own.
    fn adopt(&self, program: &Program, path: &Path) -> Result<Option<Program>, Error> {
        if !path.exists() {
            return Ok(None);
        }
        let pinned = match program {
            Program::Xdp(_) => Program::Xdp(Xdp::from_pin(path, XdpAttachType::Interface)?),
            Program::SchedClassifier(_) => {
                Program::SchedClassifier(SchedClassifier::from_pin(path)?)
            }
            _ => return Ok(None),
        };
        let map_ids = pinned
            .info()?
            .map_ids()?
            .ok_or_else(|| Error::Datapath("the kernel does not list a program's maps".into()))?;
        for id in map_ids {
            let info = MapInfo::from_id(id)?;
            let map = info.name_as_str().unwrap_or_default();
            let same = match self.shared_maps.get(map) {
                Some(current) => *current == id,
                None => map.starts_with('.') || PROGRAM_PRIVATE_MAPS.contains(&map),
            };
            if !same {
                return Err(Error::Datapath(format!(
                    "it uses map {map} (id {id}), which this start replaced"
                )));
            }
        }
        Ok(Some(pinned))
    }

    fn remove_other_keys(&self, name: &str) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let prefix = format!("{name}-");
        let current = format!("{name}-{}", self.key);
        for entry in entries.flatten() {
            let file = entry.file_name();
            let file = file.to_string_lossy();
            if !file.starts_with(&prefix) || file == current {
                continue;
            }
            if let Err(e) = std::fs::remove_file(entry.path()) {
                warn!(program = name, pin = %entry.path().display(), error = %e, "cannot remove an old program's pin");
            }
        }
    }
}

fn load_fresh(name: &str, program: &mut Program) -> Result<(), Error> {
    match program {
        Program::Xdp(p) => p.load()?,
        Program::SchedClassifier(p) => p.load()?,
        _ => {
            return Err(Error::Datapath(format!(
                "{name} in the object is neither XDP nor a TC classifier"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use aya_obj::{Object, maps::PinningType};

    use super::*;

    /// A map the object does not pin must be listed as private (or be the log ring, which the
    /// loader pins, or a global section); otherwise no program that uses it is ever adopted
    /// and every restart verifies it again.
    #[test]
    fn every_unpinned_map_of_the_object_is_private_or_pinned_by_the_loader() {
        let object = Object::parse(super::super::ebpf_object()).unwrap();
        let mut unpinned: Vec<&str> = object
            .maps
            .iter()
            .filter(|(name, map)| {
                map.pinning() == PinningType::None
                    && !name.starts_with('.')
                    && name.as_str() != super::super::kernel_log::RING_MAP
            })
            .map(|(name, _)| name.as_str())
            .collect();
        unpinned.sort_unstable();
        let mut private = PROGRAM_PRIVATE_MAPS.to_vec();
        private.sort_unstable();
        assert_eq!(unpinned, private);
    }

    #[test]
    fn a_kernel_name_keeps_fifteen_bytes() {
        assert_eq!(kernel_name("PH_CLIENT_LIMIT"), "PH_CLIENT_LIMIT");
        assert_eq!(kernel_name("PH_CLIENT_LIMITS"), "PH_CLIENT_LIMIT");
        assert_eq!(kernel_name("AYA_LOGS"), "AYA_LOGS");
    }
}

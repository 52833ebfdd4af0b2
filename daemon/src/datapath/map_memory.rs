//! Writes into the kernel maps that allocate an element when it is inserted
//! (`BPF_F_NO_PREALLOC`: the prefix deny list, the domain set, the DNS exemptions, the DoH
//! address sets, the ECH fronts).
//!
//! Such a map takes each new element from the kernel's BPF memory allocator, whose per-CPU
//! caches are refilled in the background (for per-CPU values by a work item that first has to
//! populate the per-CPU allocator). Inserts made back to back from user space can find the
//! cache empty and get `ENOMEM` with plenty of memory free. On Linux 6.18, `phantom-bench
//! xdp`, which writes 1,000 prefix denies in a loop after 110,000 other entries, failed part
//! way in 4 runs of 20. The daemon's own writes have not met it (each is paced by the lookups
//! around it), but nothing in the kernel promises that, and an operator's deny must not fail
//! for it (docs/datapath.md, "Maps that allocate on insert"). A short wait lets the refill
//! run, so such an insert is tried again before its error counts.

use std::time::Duration;

use aya::maps::MapError;

/// Tries of one insert that meets `ENOMEM`, and the wait before each retry: at most about
/// 0.1 s before the error is reported as it is.
const TRIES: u32 = 50;
const WAIT: Duration = Duration::from_millis(2);

/// Runs `insert` again, after a short wait, while the kernel answers `ENOMEM`.
pub fn retrying_out_of_memory<T>(
    mut insert: impl FnMut() -> Result<T, MapError>,
) -> Result<T, MapError> {
    let mut tries = 1;
    loop {
        match insert() {
            Err(e) if is_out_of_memory(&e) && tries < TRIES => {
                tries += 1;
                std::thread::sleep(WAIT);
            }
            other => return other,
        }
    }
}

/// Whether the kernel refused a map write for want of memory (`ENOMEM`).
pub fn is_out_of_memory(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOMEM))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enomem() -> MapError {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_elem",
            io_error: std::io::Error::from_raw_os_error(libc::ENOMEM),
        })
    }

    #[test]
    fn an_insert_out_of_memory_is_tried_again_and_other_errors_are_not() {
        let mut calls = 0;
        let r = retrying_out_of_memory(|| {
            calls += 1;
            if calls < 3 { Err(enomem()) } else { Ok(calls) }
        });
        assert_eq!(r.ok(), Some(3));

        let mut calls = 0;
        let r: Result<(), _> = retrying_out_of_memory(|| {
            calls += 1;
            Err(MapError::KeyNotFound)
        });
        assert!(matches!(r, Err(MapError::KeyNotFound)));
        assert_eq!(calls, 1);

        let mut calls = 0;
        let r: Result<(), _> = retrying_out_of_memory(|| {
            calls += 1;
            Err(enomem())
        });
        assert!(r.as_ref().is_err_and(is_out_of_memory));
        assert_eq!(calls, TRIES);
    }
}

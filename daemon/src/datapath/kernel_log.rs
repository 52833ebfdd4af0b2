//! The kernel programs' own log: their rare events (a full map losing an active entry, an
//! insert refused, malformed input skipped) and, with `datapath.kernel_samples`, samples of
//! their verdicts. The programs write records with aya-log-ebpf into the `AYA_LOGS` ring
//! buffer; aya-log's `EbpfLogger` reads them as `log` records, and [`Forward`] turns each into
//! a `tracing` event of the same level under the target `phantom_daemon::datapath::kernel`,
//! with the program's module as `program` (docs/datapath.md, "Kernel events").

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use tokio::{io::unix::AsyncFd, task::JoinHandle};
use tracing::{debug, error, info, trace, warn};

use crate::{error::Error, tasks::Shutdown};

/// The read-only global of the eBPF object that switches the verdict samples on.
const SAMPLES_GLOBAL: &str = "PH_KERNEL_SAMPLES";

/// The ring buffer the programs log into.
pub const RING_MAP: &str = "AYA_LOGS";

/// The bytes [`configure`] writes into the object, for the key of a verified program.
pub fn constants(samples: bool) -> [u8; 2] {
    [aya_log::Level::Info as u8, u8::from(samples)]
}

/// Sets the object's log switches before it is loaded: aya-log's level (records up to `info`:
/// the rare events are `warn` and `info`, the samples `info`) and the samples' switch. Both are
/// read-only globals, so the verifier drops the code they switch off.
pub fn configure(loader: &mut EbpfLoader<'_>, samples: bool) {
    static LEVEL: u8 = aya_log::Level::Info as u8;
    static SAMPLES_ON: u8 = 1;
    static SAMPLES_OFF: u8 = 0;
    loader
        .override_global(aya_log::LEVEL, &LEVEL, true)
        .override_global(
            SAMPLES_GLOBAL,
            if samples { &SAMPLES_ON } else { &SAMPLES_OFF },
            true,
        );
}

/// Records forwarded, by level (`error`, `warn`, `info`, `debug`, `trace`).
#[derive(Debug, Default)]
pub struct RecordCounts([AtomicU64; 5]);

impl RecordCounts {
    pub const LEVELS: [&'static str; 5] = ["error", "warn", "info", "debug", "trace"];

    /// (level, records) for each level.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        Self::LEVELS
            .iter()
            .zip(&self.0)
            .map(|(level, n)| (*level, n.load(Ordering::Relaxed)))
            .collect()
    }
}

/// A `log::Log` that hands aya-log's records to `tracing`.
pub struct Forward {
    counts: Arc<RecordCounts>,
}

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let program = record.target();
        let message = record.args();
        let slot = match record.level() {
            log::Level::Error => {
                error!(target: "phantom_daemon::datapath::kernel", program, "{message}");
                0
            }
            log::Level::Warn => {
                warn!(target: "phantom_daemon::datapath::kernel", program, "{message}");
                1
            }
            log::Level::Info => {
                info!(target: "phantom_daemon::datapath::kernel", program, "{message}");
                2
            }
            log::Level::Debug => {
                debug!(target: "phantom_daemon::datapath::kernel", program, "{message}");
                3
            }
            log::Level::Trace => {
                trace!(target: "phantom_daemon::datapath::kernel", program, "{message}");
                4
            }
        };
        self.counts.0[slot].fetch_add(1, Ordering::Relaxed);
    }

    fn flush(&self) {}
}

pub type KernelLogger = EbpfLogger<Forward>;

/// Takes the object's `AYA_LOGS` ring buffer; [`spawn`] reads it.
pub fn open(ebpf: &mut Ebpf, counts: Arc<RecordCounts>) -> Result<KernelLogger, Error> {
    EbpfLogger::init_with_logger(ebpf, Forward { counts })
        .map_err(|e| Error::Datapath(format!("cannot read the eBPF programs' log: {e}")))
}

/// Forwards records as they arrive, until shutdown.
pub fn spawn(logger: KernelLogger, mut shutdown: Shutdown) -> JoinHandle<()> {
    tokio::spawn(async move {
        // SAFETY: the logger owns the ring buffer's descriptor and keeps it open, unchanged,
        // for as long as the `AsyncFd` holds it (flushing reads the mapped pages only).
        let registered =
            unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                warn!(error = %e, "cannot watch the eBPF programs' log; kernel events are not logged");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                ready = fd.readable_mut() => match ready {
                    Ok(mut guard) => {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                    Err(e) => {
                        warn!(error = %e, "the eBPF programs' log failed; kernel events are no longer logged");
                        return;
                    }
                },
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_counted_by_level() {
        let counts = Arc::new(RecordCounts::default());
        let forward = Forward {
            counts: Arc::clone(&counts),
        };
        for level in [log::Level::Warn, log::Level::Info, log::Level::Info] {
            log::Log::log(
                &forward,
                &log::Record::builder()
                    .level(level)
                    .target("phantom::guard")
                    .args(format_args!("PH_SOURCES is full"))
                    .build(),
            );
        }
        assert_eq!(
            counts.snapshot(),
            [
                ("error", 0),
                ("warn", 1),
                ("info", 2),
                ("debug", 0),
                ("trace", 0)
            ]
        );
    }
}

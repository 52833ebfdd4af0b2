//! The blocklist's collector: its size, version and the state of each synced source.

use std::sync::Arc;

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::Blocklist;
use crate::metrics::{gauge, gauge_family};

/// The blocklist's size and version.
pub struct BlocklistCollector {
    pub list: Arc<Blocklist>,
}

impl std::fmt::Debug for BlocklistCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlocklistCollector")
    }
}

impl Collector for BlocklistCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(
            &mut encoder,
            "phantom_blocklist_entries",
            "Domains on the blocklist",
            self.list.len() as i64,
        )?;
        gauge(
            &mut encoder,
            "phantom_blocklist_version",
            "The blocklist's version (milliseconds since the epoch of its last change)",
            self.list.version() as i64,
        )?;
        // In-memory state of the configured sources: no I/O at scrape time.
        let states = self
            .list
            .syncer
            .states(&self.list.syncer.schedule().sources);
        let label = |name: &str| vec![("source", name.to_string())];
        gauge_family(
            &mut encoder,
            "phantom_blocklist_source_failing",
            "1 while the last sync attempt of this source failed (its error is in blocklist status)",
            states
                .iter()
                .map(|s| (label(&s.name), i64::from(s.error.is_some()))),
        )?;
        gauge_family(
            &mut encoder,
            "phantom_blocklist_source_last_success_timestamp_seconds",
            "When this source last synced successfully (Unix seconds; 0: never)",
            states.iter().map(|s| {
                (
                    label(&s.name),
                    s.last_success
                        .and_then(|t| i64::try_from(t).ok())
                        .unwrap_or(0),
                )
            }),
        )?;
        gauge_family(
            &mut encoder,
            "phantom_blocklist_source_entries",
            "Entries in this source's last accepted download",
            states
                .iter()
                .map(|s| (label(&s.name), i64::try_from(s.entries).unwrap_or(i64::MAX))),
        )
    }
}

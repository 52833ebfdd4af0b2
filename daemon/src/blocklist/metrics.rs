//! The blocklist's collector: its size and version.

use std::sync::Arc;

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::Blocklist;
use crate::metrics::gauge;

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
        )
    }
}

//! Background work every domain starts for itself: the shutdown signal the tasks watch and a
//! periodic job on the blocking pool.

use std::{sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle};
use tracing::warn;

/// Turns true once, when the daemon stops; every task ends when it sees that.
pub type Shutdown = watch::Receiver<bool>;

/// Runs `job` on the blocking pool now and then every `period` until shutdown. A job that runs
/// long delays the next run instead of piling runs up. `what` names it in the log should the
/// job panic.
pub fn every(
    what: &'static str,
    period: Duration,
    mut shutdown: Shutdown,
    job: impl Fn() + Send + Sync + 'static,
) -> JoinHandle<()> {
    let job = Arc::new(job);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticks.tick() => {
                    let job = Arc::clone(&job);
                    if let Err(e) = tokio::task::spawn_blocking(move || job()).await {
                        warn!(error = %e, "{what} failed");
                    }
                }
            }
        }
    })
}

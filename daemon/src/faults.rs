//! Fault injection for the rollback and error-reply tests: `PHANTOM_FAIL_AT=<point>` in the daemon's
//! environment makes that step fail once. Nothing sets it outside tests.

use std::sync::atomic::{AtomicBool, Ordering};

/// The failure a fault point injects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("injected failure at {0}")]
pub struct InjectedFault(pub &'static str);

/// Fails once when `PHANTOM_FAIL_AT` names `point`.
pub fn fail_point(point: &'static str) -> Result<(), InjectedFault> {
    static FIRED: AtomicBool = AtomicBool::new(false);
    if std::env::var("PHANTOM_FAIL_AT").is_ok_and(|p| p == point)
        && !FIRED.swap(true, Ordering::SeqCst)
    {
        return Err(InjectedFault(point));
    }
    Ok(())
}

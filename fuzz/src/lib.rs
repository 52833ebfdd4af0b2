//! Phantom's fuzz targets: one function per target, each taking arbitrary bytes and asserting
//! what must hold for every input (no panic, and the target's own invariant). The libFuzzer
//! binaries in `fuzz_targets/` call these (`cargo xtask fuzz <target>`); `tests/corpus.rs`
//! feeds every file of `corpus/<target>/` through the same function on stable Rust, as part
//! of the test command. See docs/testing.md, "Fuzzing".
// A fuzz target reports a broken invariant by panicking: that is what libFuzzer catches.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admin;
mod blocklist;
mod dns;
mod ghost;
pub mod sentry;
mod wg;

pub use admin::admin_frame;
pub use blocklist::{blocklist_api, blocklist_import};
pub use dns::{dns_filter, dns_wire};
pub use ghost::ghost_upgrade;
pub use sentry::sentry_proof;
pub use wg::wg_import;

/// A target: arbitrary bytes in, a panic when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target, by the name of its binary and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("admin_frame", admin_frame),
    ("blocklist_api", blocklist_api),
    ("blocklist_import", blocklist_import),
    ("dns_filter", dns_filter),
    ("dns_wire", dns_wire),
    ("ghost_upgrade", ghost_upgrade),
    ("sentry_proof", sentry_proof),
    ("wg_import", wg_import),
];

/// One runtime for the async targets (current thread, with timers and a blocking pool).
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// Splits `data` in two at a length read from its first two bytes (big-endian), for targets
/// that take two inputs.
pub(crate) fn split2(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (data, &[]);
    }
    let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
    let rest = &data[2..];
    rest.split_at(n.min(rest.len()))
}

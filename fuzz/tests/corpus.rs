//! Replays every committed corpus file through its target on stable Rust (what libFuzzer runs
//! under `cargo xtask fuzz`): a crash once found stays fixed. One test per target.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a failed test

use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// Feeds every file of `corpus/<target>/` to the target; fails naming the file that panicked.
fn replay(target: &str) {
    let (_, run) = phantom_fuzz::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no target {target}"));
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no seed", dir.display());
    for file in &files {
        let data = std::fs::read(file).unwrap();
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            panic!("{target}: {} fails", file.display());
        }
    }
    eprintln!("{target}: {} corpus files replayed", files.len());
}

macro_rules! corpus_tests {
    ($($target:ident),* $(,)?) => {
        $(
            #[test]
            fn $target() {
                replay(stringify!($target));
            }
        )*

        #[test]
        fn every_target_has_a_replay_test() {
            let tested = [$(stringify!($target)),*];
            for (name, _) in phantom_fuzz::TARGETS {
                assert!(tested.contains(name), "{name} has no replay test");
            }
        }
    };
}

corpus_tests!(
    admin_frame,
    blocklist_api,
    blocklist_import,
    dns_filter,
    dns_wire,
    ghost_upgrade,
    sentry_proof,
    wg_import,
);

/// Writes the sentry seeds that carry signatures (made with the target's fixed key):
/// `cargo test -p phantom-fuzz --test corpus -- --ignored signed_sentry_seeds`.
#[test]
#[ignore = "writes corpus files; run by hand when the sentry's formats change"]
fn signed_sentry_seeds() {
    use phantom_fuzz::sentry::{NOW, delay_token, ticket_cookie};
    let dir = corpus_dir("sentry_proof");
    let ready = delay_token(NOW - 10, NOW + 100, "/after?x=1");
    let seeds = [
        ("valid_cookie", ticket_cookie(NOW + 3600)),
        ("expired_cookie", ticket_cookie(NOW - 1)),
        ("delay_token_ready", ready.clone()),
        ("delay_token_early", delay_token(NOW + 30, NOW + 100, "/")),
        ("pass_form_token", format!("token={ready}&to=%2F")),
    ];
    for (name, text) in seeds {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

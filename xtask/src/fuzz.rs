//! `cargo xtask fuzz <target|all> --seconds N`: libFuzzer runs of the fuzz crate's targets
//! through cargo-fuzz on the pinned nightly (the eBPF side's, read from daemon/build.rs),
//! one time box per target, then one line per target: executions, execs/s, corpus size.
//!
//! The committed corpus (`fuzz/corpus/<target>/`) is read, never written: new inputs go to a
//! working corpus under the target directory (`fuzz/corpus/<target>/`), crashes to
//! `fuzz/artifacts/<target>/` there.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::{step, target_dir, workspace_root};

/// The cargo-fuzz release installed when none is there.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The nightly daemon/build.rs builds the eBPF crate with (`EBPF_TOOLCHAIN`).
fn pinned_nightly() -> Result<String> {
    let path = workspace_root().join("daemon/build.rs");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("const EBPF_TOOLCHAIN: &str = \"")
                .and_then(|rest| rest.strip_suffix("\";"))
        })
        .map(str::to_string)
        .with_context(|| format!("no EBPF_TOOLCHAIN in {}", path.display()))
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The nightly and cargo-fuzz, each installed only when missing (a second call costs two
/// version checks).
fn ensure_tools(nightly: &str) -> Result<()> {
    if !succeeds(Command::new("rustup").args(["run", nightly, "rustc", "--version"])) {
        step(
            &format!("install {nightly}"),
            Command::new("rustup").args([
                "toolchain",
                "install",
                nightly,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]),
        )?;
    }
    if !succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        step(
            &format!("install cargo-fuzz {CARGO_FUZZ_VERSION}"),
            Command::new("cargo")
                .args([
                    "install",
                    "cargo-fuzz",
                    "--locked",
                    "--version",
                    CARGO_FUZZ_VERSION,
                ])
                // Built in a temporary directory of its own, not among the project's builds.
                .env_remove("CARGO_TARGET_DIR"),
        )?;
    }
    Ok(())
}

/// The targets: fuzz/fuzz_targets/*.rs.
fn targets() -> Result<Vec<String>> {
    let dir = workspace_root().join("fuzz/fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".rs"))
                .map(str::to_string)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// `cargo fuzz <args>` on the nightly, from the workspace root.
fn cargo_fuzz(nightly: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", nightly, "cargo", "fuzz"])
        .current_dir(workspace_root())
        // rustup's proxy of the stable toolchain that runs xtask sets these; the nightly's
        // cargo must not inherit them.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC");
    cmd
}

/// What the build and each run are given: no sanitizer (safe Rust: a panic, an overflow or an
/// out-of-bounds index is what a crash is) and debug assertions on.
const BUILD_ARGS: [&str; 6] = [
    "--fuzz-dir",
    "fuzz",
    "--features",
    "libfuzzer",
    "--sanitizer=none",
    "--debug-assertions",
];

/// One run's figures, read from libFuzzer's output.
#[derive(Default)]
struct Figures {
    runs: Option<u64>,
    execs_per_sec: Option<u64>,
    corpus: Option<String>,
    coverage: Option<String>,
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == name)?;
    words.next()
}

/// Runs one target for `seconds`: its figures, and whether it crashed.
fn run_target(
    nightly: &str,
    target: &str,
    seconds: u64,
    extra: &[String],
) -> Result<(Figures, bool)> {
    let base = target_dir().join("fuzz");
    let work = base.join("corpus").join(target);
    let artifacts = base.join("artifacts").join(target);
    for dir in [&work, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let seeds = workspace_root().join("fuzz/corpus").join(target);
    eprintln!("==> fuzz {target} for {seconds} s");
    let mut cmd = cargo_fuzz(nightly);
    cmd.args(["run", target])
        .args(BUILD_ARGS)
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .args(extra)
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut figures = Figures::default();
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        eprintln!("{line}");
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            figures.runs = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
            figures.execs_per_sec = v.trim().parse().ok();
        } else if let Some(corp) = field(&line, "corp:") {
            // `#123 NEW cov: 456 ft: 789 corp: 12/3456b ...`: the last one is the final size.
            figures.corpus = Some(corp.to_string());
            figures.coverage = field(&line, "cov:").map(str::to_string);
        }
    }
    let status = child.wait()?;
    Ok((figures, !status.success()))
}

/// `cargo xtask fuzz`.
pub fn run(target: &str, seconds: u64, extra: &[String]) -> Result<()> {
    let all = targets()?;
    let chosen: Vec<String> = if target == "all" {
        all.clone()
    } else if all.iter().any(|t| t == target) {
        vec![target.to_string()]
    } else {
        bail!(
            "no fuzz target {target:?}; targets: {}, or all",
            all.join(", ")
        );
    };
    let nightly = pinned_nightly()?;
    ensure_tools(&nightly)?;
    step(
        &format!("build the fuzz targets ({nightly})"),
        cargo_fuzz(&nightly).arg("build").args(BUILD_ARGS),
    )?;
    let mut lines = Vec::new();
    let mut crashed = Vec::new();
    for t in &chosen {
        let (f, crash) = run_target(&nightly, t, seconds, extra)?;
        let show = |v: Option<String>| v.unwrap_or_else(|| "?".into());
        lines.push(format!(
            "fuzz {t}: {seconds} s, {} runs, {} execs/s, corpus {} (inputs/bytes), cov {}{}",
            show(f.runs.map(|v| v.to_string())),
            show(f.execs_per_sec.map(|v| v.to_string())),
            show(f.corpus),
            show(f.coverage),
            if crash { ", CRASHED" } else { "" }
        ));
        if crash {
            crashed.push(t.clone());
        }
    }
    for line in &lines {
        println!("{line}");
    }
    if !crashed.is_empty() {
        bail!(
            "crashed: {} (inputs in {}; docs/testing.md says how to add one to the corpus)",
            crashed.join(", "),
            target_dir().join("fuzz/artifacts").display()
        );
    }
    Ok(())
}

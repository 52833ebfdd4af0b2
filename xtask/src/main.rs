//! `cargo xtask <command>`: build, run, test and bench automation.
//!
//! The README's two commands (scripts/run.sh, scripts/test.sh) install the toolchains first
//! and then call into here.
#![allow(clippy::print_stderr)]

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod fuzz;
mod package;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build phantomd (release) and run it; extra arguments go to phantomd.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Format check, clippy (warnings are errors), build, then every test.
    Test {
        /// Skip the format and clippy checks.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the Debian package (docs/packaging.md); prints the .deb's path.
    Package {
        /// Pack the phantomd and phantom-api already built in this directory instead of
        /// building the release binaries.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Where the .deb goes (default: <target dir>/debian).
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Compress with gzip -1 instead of xz: a larger file, built in a fraction of the time.
        #[arg(long)]
        fast: bool,
    },
    /// Run fuzz targets (fuzz/, cargo-fuzz with libFuzzer on the pinned nightly) for a time
    /// box each; prints execs/s and corpus size per target (docs/testing.md, "Fuzzing").
    Fuzz {
        /// A target (a file name of fuzz/fuzz_targets/ without `.rs`), or `all`.
        target: String,
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Extra libFuzzer options (e.g. -max_len=4096).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build and run the benchmarks; extra arguments go to phantom-bench.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn step(name: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("==> {name}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `phantomd` and `phantom-api`, release build.
fn build_release_daemon() -> Result<()> {
    step(
        "build phantomd and phantom-api (release)",
        cargo().args([
            "build",
            "--release",
            "--bin",
            "phantomd",
            "--bin",
            "phantom-api",
        ]),
    )
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Run { args } => {
            build_release_daemon()?;
            let bin = target_dir().join("release/phantomd");
            eprintln!("==> {} {}", bin.display(), args.join(" "));
            // Replace this process so signals (SIGTERM, SIGHUP, Ctrl-C) reach phantomd itself.
            use std::os::unix::process::CommandExt;
            let err = Command::new(&bin).args(&args).exec();
            Err(err).with_context(|| format!("cannot run {}", bin.display()))
        }
        Cmd::Test { no_lint, args } => {
            if !no_lint {
                step("format check", cargo().args(["fmt", "--all", "--check"]))?;
                step(
                    "clippy",
                    cargo()
                        .args(["clippy", "--all-targets"])
                        .args(WITH_FUZZ)
                        .args(["--", "-D", "warnings"]),
                )?;
            }
            // The end-to-end tests start the real binaries; build them first.
            step("build binaries", cargo().args(["build", "--bins"]))?;
            if !is_root() {
                eprintln!(
                    "==> NOTE: not root: the end-to-end tests (namespaces, eBPF) skip; run as root to exercise them"
                );
            }
            let bin_dir = target_dir().join("debug");
            // Tests that skip for want of root write their names here (phantom_tests::
            // require_root); one file per run.
            let skipped = target_dir().join(format!("skipped-tests-{}.txt", std::process::id()));
            let _ = std::fs::remove_file(&skipped);
            let result = run_tests(
                cargo()
                    .args(["test", "--no-fail-fast"])
                    .args(WITH_FUZZ)
                    .args(&args)
                    .env("PHANTOM_BIN_DIR", &bin_dir)
                    .env(SKIPPED_TESTS_ENV, &skipped),
                &skipped,
            );
            let _ = std::fs::remove_file(&skipped);
            result
        }
        Cmd::Package {
            bin_dir,
            out_dir,
            fast,
        } => {
            let bin_dir = match bin_dir {
                Some(dir) => dir,
                None => {
                    build_release_daemon()?;
                    target_dir().join("release")
                }
            };
            let out_dir = out_dir.unwrap_or_else(|| target_dir().join("debian"));
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("cannot create {}", out_dir.display()))?;
            eprintln!("==> package");
            let deb = package::build(
                &workspace_root(),
                &package::Options {
                    bin_dir,
                    out_dir,
                    fast,
                },
            )?;
            println!("{}", deb.display());
            Ok(())
        }
        Cmd::Fuzz {
            target,
            seconds,
            args,
        } => fuzz::run(&target, seconds, &args),
        Cmd::Bench { args } if args.first().map(String::as_str) == Some("ghost") => {
            // Ghost throughput needs namespaces, wg-quick and the wstunnel test client, which
            // live in the end-to-end test crate: an ignored test there is the bench.
            step(
                "build release binaries",
                cargo().args(["build", "--release", "--bins"]),
            )?;
            step(
                "ghost throughput bench",
                cargo()
                    .args([
                        "test",
                        "--release",
                        "-p",
                        "phantom-tests",
                        "--test",
                        "ghost",
                    ])
                    .args(["--", "--ignored", "--nocapture", "bench_ghost"])
                    .env("PHANTOM_BIN_DIR", target_dir().join("release")),
            )
        }
        Cmd::Bench { args } => {
            step(
                "build phantom-bench",
                cargo().args([
                    "build",
                    "--release",
                    "--bin",
                    "phantom-bench",
                    "--bin",
                    "phantomd",
                    "--bin",
                    "phantom-api",
                ]),
            )?;
            // The bench starts phantomd and phantom-api through the test harness, which finds
            // them here (as for the tests).
            let release = target_dir().join("release");
            let status = Command::new(release.join("phantom-bench"))
                .args(&args)
                .env("PHANTOM_BIN_DIR", &release)
                .status()?;
            if !status.success() {
                bail!("phantom-bench failed ({status})");
            }
            Ok(())
        }
    }
}

/// The default members and the fuzz crate (its targets' library and the replay of their
/// corpora, on stable): every member but the eBPF crate, which builds only for BPF.
const WITH_FUZZ: [&str; 3] = ["--workspace", "--exclude", "phantom-ebpf"];

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// What the test harness reads to find where skipped tests are recorded (the same name as
/// `phantom_tests::SKIPPED_TESTS_ENV`; xtask does not depend on the harness).
const SKIPPED_TESTS_ENV: &str = "PHANTOM_SKIPPED_TESTS";

/// The distinct test names recorded in `path` (none when it does not exist).
fn skipped_tests(path: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Runs `cargo test`, echoing its output, and ends with one summary line over every test
/// binary (cargo prints a result line per binary, the last of which is often doc-tests). Tests
/// that returned early for want of root pass as far as cargo is concerned; the names they
/// recorded in `skipped` move them from passed to skipped.
fn run_tests(cmd: &mut Command, skipped: &Path) -> Result<()> {
    use std::io::{BufRead, BufReader};
    eprintln!("==> tests");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match kind {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    let need_root = skipped_tests(skipped).len() as u64;
    let passed = passed.saturating_sub(need_root);
    println!(
        "tests: {passed} passed, {failed} failed, {} skipped ({ignored} ignored, {need_root} need root)",
        ignored + need_root
    );
    if !status.success() {
        bail!("tests failed ({status})");
    }
    Ok(())
}

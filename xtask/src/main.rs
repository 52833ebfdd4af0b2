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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Run { args } => {
            step(
                "build phantomd",
                cargo().args([
                    "build",
                    "--release",
                    "--bin",
                    "phantomd",
                    "--bin",
                    "phantom-api",
                ]),
            )?;
            let bin = target_dir().join("release/phantomd");
            eprintln!("==> {} {}", bin.display(), args.join(" "));
            let status = Command::new(&bin).args(&args).status()?;
            if !status.success() {
                bail!("phantomd exited with {status}");
            }
            Ok(())
        }
        Cmd::Test { no_lint, args } => {
            if !no_lint {
                step("format check", cargo().args(["fmt", "--all", "--check"]))?;
                step(
                    "clippy",
                    cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]),
                )?;
            }
            // The end-to-end tests start the real binaries; build them first.
            step("build binaries", cargo().args(["build", "--bins"]))?;
            let bin_dir = target_dir().join("debug");
            step(
                "tests",
                cargo()
                    .args(["test", "--no-fail-fast"])
                    .args(&args)
                    .env("PHANTOM_BIN_DIR", &bin_dir),
            )
        }
        Cmd::Bench { args } => {
            step(
                "build phantom-bench",
                cargo().args(["build", "--release", "--bin", "phantom-bench"]),
            )?;
            let status = Command::new(target_dir().join("release/phantom-bench"))
                .args(&args)
                .status()?;
            if !status.success() {
                bail!("phantom-bench failed ({status})");
            }
            Ok(())
        }
    }
}

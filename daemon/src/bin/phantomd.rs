//! `phantomd`: the Phantom daemon.

use std::path::PathBuf;

use clap::{CommandFactory, Parser};
use phantom_daemon::{
    config::{Config, DEFAULT_CONFIG_PATH},
    daemon::{Options, run},
};

#[derive(Parser)]
#[command(
    name = "phantomd",
    version,
    about = "Phantom: WireGuard VPN host daemon",
    long_about = "Phantom: WireGuard VPN host daemon. One process runs the WireGuard server, its \
eBPF data plane (an XDP guard and TC programs), the DNS resolver that blocks gambling domains \
for every client, the sentry reverse proxy, ghost mode, multihop, the admin socket that \
phantom-api(1) speaks, and Prometheus metrics.\n\n\
SIGHUP re-reads the configuration file (log settings, blocklist sources and brands; an invalid \
file changes nothing). SIGTERM shuts down cleanly and detaches the XDP guard.\n\n\
Files: /etc/phantom/phantom.toml (the configuration), /var/lib/phantom (state_dir), \
/run/phantom/phantom.sock (the admin socket, for root and the phantom group).\n\n\
Under systemd (phantomd.service, Type=notify) it sends READY=1 once every listener is up, \
WATCHDOG=1 at half of WatchdogSec=, and STOPPING=1 on shutdown."
)]
struct Cli {
    /// Configuration file; written with the defaults when it does not exist.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Overrides `state_dir` from the configuration.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Validate the configuration file and exit.
    #[arg(long)]
    check_config: bool,
    /// Print the default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Print this man page (roff) and exit; the package build uses it.
    #[arg(long, hide = true)]
    print_man_page: bool,
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell) and exit;
    /// the package build uses it.
    #[arg(long, hide = true, value_name = "SHELL")]
    print_completions: Option<clap_complete::Shell>,
}

/// Writes the man page or a completion script for this command line to stdout.
fn print_docs(cli: &Cli) -> Option<std::process::ExitCode> {
    let mut cmd = Cli::command();
    let mut out = std::io::stdout();
    if let Some(shell) = cli.print_completions {
        clap_complete::generate(shell, &mut cmd, "phantomd", &mut out);
        return Some(std::process::ExitCode::SUCCESS);
    }
    if cli.print_man_page {
        let man = clap_mangen::Man::new(cmd)
            .section("8")
            .manual("System Administration");
        return Some(match man.render(&mut out) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("phantomd: {e}");
                std::process::ExitCode::FAILURE
            }
        });
    }
    None
}

/// Allocations from this size up get pages of their own, handed back when freed.
const MMAP_THRESHOLD_BYTES: libc::c_int = 256 * 1024;

fn main() -> std::process::ExitCode {
    // glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
    // after a million-name import the list's big tables and the import's buffers land in the
    // heap, and the heap keeps about 35 MiB it cannot give back. A fixed threshold turns the
    // dynamic one off: resident memory after an import is then what a restart loads (79 against
    // 117 MiB, docs/benchmarks.md).
    // SAFETY: mallopt only sets the allocator's parameter; no thread has started yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
    }
    let cli = Cli::parse();
    if let Some(code) = print_docs(&cli) {
        return code;
    }
    if cli.print_default_config {
        return match Config::default().to_toml() {
            Ok(text) => {
                print!("{text}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("phantomd: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if cli.check_config {
        return match std::fs::read_to_string(&cli.config)
            .map_err(|e| e.to_string())
            .and_then(|t| Config::from_toml(&t).map_err(|e| e.to_string()))
        {
            Ok(_) => {
                println!("{}: OK", cli.config.display());
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("phantomd: {}: {e}", cli.config.display());
                std::process::ExitCode::FAILURE
            }
        };
    }
    match run(Options {
        config_path: cli.config,
        state_dir: cli.state_dir,
    }) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("phantomd: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

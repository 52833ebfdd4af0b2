//! The daemon's descriptor limit. Every connection a listener admits is a descriptor (two
//! where it also holds one upstream), and systemd starts services with a soft
//! `RLIMIT_NOFILE` of 1,024: far below what the listeners' caps allow together. At start the
//! soft limit is raised as far as the hard limit allows; [`shortfall`] says when even that is
//! less than the caps need, naming who needs what.

use nix::sys::resource::{Resource, getrlimit, rlim_t, setrlimit};

/// `RLIMIT_NOFILE` as the daemon runs with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit in force: the most descriptors the daemon may hold.
    pub limit: u64,
    /// The hard limit (what an unprivileged process may raise the soft limit to).
    pub hard: u64,
    /// The soft limit the daemon was started with.
    pub started_with: u64,
}

/// What the kernel allows a process at most (`fs.nr_open`), when the hard limit says
/// "unlimited".
fn nr_open() -> Option<rlim_t> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (to `fs.nr_open` when the hard limit is
/// unlimited). On failure the limit stays as it was and is reported as such.
pub fn raise() -> Result<OpenFiles, nix::Error> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let target = if hard == nix::sys::resource::RLIM_INFINITY {
        nr_open().unwrap_or(soft)
    } else {
        hard
    };
    let limit = if target > soft {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
        target
    } else {
        soft
    };
    Ok(OpenFiles {
        limit,
        hard,
        started_with: soft,
    })
}

/// The limit as it is now, without changing it.
pub fn current() -> Result<OpenFiles, nix::Error> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(OpenFiles {
        limit: soft,
        hard,
        started_with: soft,
    })
}

/// Descriptors one part of the daemon may hold at most.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    /// Who: a listener's name, or "other".
    pub what: &'static str,
    pub descriptors: u64,
}

/// Descriptors the daemon holds besides its connections: state files and SQLite, BPF maps and
/// links, the WireGuard device, the resolver's UDP sockets, netlink, the log.
pub const RESERVE: u64 = 256;

/// The sum of `needs`.
pub fn needed(needs: &[Need]) -> u64 {
    needs.iter().map(|n| n.descriptors).sum()
}

/// `None` when `needs` fit under `limit`; otherwise a line naming who needs what.
pub fn shortfall(limit: u64, needs: &[Need]) -> Option<String> {
    let total = needed(needs);
    // 0: the limit could not be read; nothing to compare against.
    if limit == 0 || total <= limit {
        return None;
    }
    let parts: Vec<String> = needs
        .iter()
        .map(|n| format!("{} {}", n.what, n.descriptors))
        .collect();
    Some(format!(
        "the connection caps may need {total} descriptors ({}) but RLIMIT_NOFILE allows {limit}: \
         under a flood the last connections fail at accept; raise the hard limit (LimitNOFILE= in the unit)",
        parts.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn raising_reaches_the_hard_limit_and_a_shortfall_names_everyone() {
        let raised = raise().unwrap();
        assert_eq!(
            raised,
            OpenFiles {
                started_with: raised.started_with,
                ..current().unwrap()
            }
        );
        assert!(raised.limit >= raised.started_with);
        let needs = [
            Need {
                what: "sentry proxy",
                descriptors: 600,
            },
            Need {
                what: "metrics",
                descriptors: 64,
            },
            Need {
                what: "other",
                descriptors: RESERVE,
            },
        ];
        assert_eq!(needed(&needs), 920);
        assert_eq!(shortfall(1024, &needs), None);
        let line = shortfall(512, &needs).unwrap();
        assert!(
            line.contains("920")
                && line.contains("sentry proxy 600")
                && line.contains("metrics 64"),
            "{line}"
        );
    }
}

#!/usr/bin/env bash
# Sets up this machine (idempotent) and runs phantomd on embedded defaults.
# Arguments go to phantomd, e.g. scripts/run.sh --config /etc/phantom/phantom.toml
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec cargo xtask run "$@"

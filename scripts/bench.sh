#!/usr/bin/env bash
# Sets up this machine (idempotent) and prints the benchmark tables (needs root).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec cargo xtask bench "$@"

#!/usr/bin/env bash
# Sets up this machine (idempotent) and runs every check and test: format, clippy, unit tests,
# and the end-to-end tests in network namespaces (these need root; without it they skip and
# say why). Arguments go to `cargo test`, e.g. scripts/test.sh restarts
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec cargo xtask test "$@"

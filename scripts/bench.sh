#!/usr/bin/env bash
# Sets up this machine (idempotent) and prints the benchmark tables (needs root).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh

# nginx, the sentry bench's reference reverse proxy. Unpacked from the distribution's package
# into a private directory instead of installed: installing would start a system nginx on
# port 80.
if [ -z "${PHANTOM_BENCH_NGINX:-}" ] && ! command -v nginx >/dev/null 2>&1; then
  nginx_dir="${XDG_CACHE_HOME:-$HOME/.cache}/phantom-bench/nginx"
  if [ ! -x "$nginx_dir/usr/sbin/nginx" ]; then
    echo "[bench] unpacking the distribution's nginx into $nginx_dir" >&2
    tmp="$(mktemp -d)"
    chmod 777 "$tmp" # apt fetches as the unprivileged _apt user
    (cd "$tmp" && apt-get download -qq nginx >/dev/null)
    mkdir -p "$nginx_dir"
    dpkg -x "$tmp"/nginx_*.deb "$nginx_dir"
    rm -rf "$tmp"
  fi
  export PHANTOM_BENCH_NGINX="$nginx_dir/usr/sbin/nginx"
fi
exec cargo xtask bench "$@"

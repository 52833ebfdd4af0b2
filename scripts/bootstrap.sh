#!/usr/bin/env bash
# One-time machine set-up shared by scripts/run.sh and scripts/test.sh.
# Idempotent: every step checks before it acts, so a second run takes seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Pinned toolchains. The userspace side reads rust-toolchain.toml; the eBPF side is
# built by aya-build with the dated nightly named in daemon/build.rs. Keep the three in step.
STABLE="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$ROOT/rust-toolchain.toml")"
NIGHTLY="nightly-2026-10-30"
BPF_LINKER_VERSION="0.13.0"
APT_PACKAGES=(
  build-essential pkg-config iproute2 iputils-ping nftables wireguard-tools wireguard-go
  redis-server dnsutils dnsmasq-base dnsperf bpftool tcpdump curl ca-certificates pebble wrk
  python3 python3-venv
  # The dashboard test drives Debian's Chromium over WebDriver (fonts-liberation: Chromium
  # only recommends it, and without a font its screenshots are boxes).
  chromium chromium-driver fonts-liberation
  # libnss3-tools: certutil puts a test CA in the browser's trust store (the sentry TLS test).
  libnss3-tools
  # A real DoT/DoH server and a DoT client for the encrypted-DNS test (tests/tests/encrypted_dns.rs).
  dnsdist knot-dnsutils
  # openssl s_server: the TLS server of the SNI test (tests/tests/sni.rs).
  openssl
  # iperf3: the rate-limit test and the policy-tunnel bench (tests/tests/client_limits.rs).
  iperf3
  # libfaketime: the quota test starts the daemon a minute before a month ends, to see the
  # period roll over (tests/tests/client_limits.rs).
  faketime
  # promtool checks the alert rules and the dashboard's queries in ops/ (Debian ships it in
  # the prometheus package; the server is never started).
  prometheus
  # The package test (tests/tests/package.rs): lintian checks the .deb, man renders its pages;
  # dpkg-deb and dpkg-shlibdeps come with build-essential (dpkg-dev).
  lintian man-db
)
# openapi-spec-validator (the admin API test validates its OpenAPI document with it; no Debian
# package has it), in a venv of its own.
OPENAPI_VENV="/opt/phantom/openapi-venv"
OPENAPI_VALIDATOR_VERSION="0.9.0"

log() { printf '[bootstrap] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
else
  SUDO=""
fi

install_apt_packages() {
  local missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing apt packages: ${missing[*]}"
    $SUDO apt-get update -qq
    # --no-install-recommends: wireguard-tools would otherwise pull in a kernel image.
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

install_toolchains() {
  if ! command -v rustup >/dev/null 2>&1; then
    log "rustup is required (install it from the distribution or rustup.rs first)"
    exit 1
  fi
  rustup toolchain list | grep -q "^${STABLE}-" || {
    log "installing Rust ${STABLE}"
    rustup toolchain install "$STABLE" --profile minimal --component clippy,rustfmt
  }
  rustup toolchain list | grep -q "^${NIGHTLY}-" || {
    log "installing Rust ${NIGHTLY} (eBPF side)"
    rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src
  }
  # A nightly installed earlier without rust-src cannot build core for bpfel.
  rustup component list --toolchain "$NIGHTLY" --installed | grep -q '^rust-src' ||
    rustup component add rust-src --toolchain "$NIGHTLY"
}

# bpf-linker must use the same LLVM as the nightly that compiles the eBPF crate.
# Debian's LLVM 14 is too old, so it links against the libLLVM shipped in that nightly.
install_bpf_linker() {
  local sysroot llvm_lib llvm_major prefix stamp
  sysroot="$(rustc +"$NIGHTLY" --print sysroot)"
  llvm_major="$(rustc +"$NIGHTLY" -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
  prefix="${CARGO_HOME:-$HOME/.cargo}/phantom-llvm-${NIGHTLY}"
  stamp="$prefix/bpf-linker-${BPF_LINKER_VERSION}-llvm${llvm_major}.ok"
  if [ -f "$stamp" ] && command -v bpf-linker >/dev/null 2>&1 && bpf-linker --version >/dev/null 2>&1; then
    return
  fi
  log "building bpf-linker ${BPF_LINKER_VERSION} against LLVM ${llvm_major} of ${NIGHTLY}"
  mkdir -p "$prefix/lib"
  for lib in "$sysroot"/lib/libLLVM*.so*; do
    ln -sf "$lib" "$prefix/lib/$(basename "$lib")"
  done
  llvm_lib="$(ls "$sysroot"/lib/libLLVM.so.* | head -n1)"
  ln -sf "$llvm_lib" "$prefix/lib/libLLVM.so"
  LLVM_PREFIX="$prefix" RUSTFLAGS="-C link-arg=-Wl,-rpath,$prefix/lib" \
    cargo +"$STABLE" install bpf-linker --version "$BPF_LINKER_VERSION" --locked --force \
    --no-default-features --features "llvm-${llvm_major}"
  bpf-linker --version >/dev/null
  touch "$stamp"
}

install_openapi_validator() {
  if "$OPENAPI_VENV/bin/python" -c 'import openapi_spec_validator' >/dev/null 2>&1; then
    return
  fi
  log "installing openapi-spec-validator $OPENAPI_VALIDATOR_VERSION in $OPENAPI_VENV"
  $SUDO python3 -m venv "$OPENAPI_VENV"
  $SUDO "$OPENAPI_VENV/bin/pip" install -q "openapi-spec-validator==$OPENAPI_VALIDATOR_VERSION"
}

ensure_bpffs() {
  if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
    log "mounting bpffs on /sys/fs/bpf"
    $SUDO mkdir -p /sys/fs/bpf
    $SUDO mount -t bpf bpf /sys/fs/bpf
  fi
}

install_apt_packages
install_toolchains
install_bpf_linker
install_openapi_validator
ensure_bpffs

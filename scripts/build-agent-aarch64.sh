#!/usr/bin/env bash
# Cross-builds the edge agent for 64-bit Raspberry Pi OS (aarch64-unknown-linux-gnu) on a
# Debian x86_64 machine, as one static, stripped file (the flags are in .cargo/config.toml):
#   scripts/build-agent-aarch64.sh     # -> target/aarch64-unknown-linux-gnu/release/edge-agent
# Run the result here with Debian's qemu-user: qemu-aarch64 target/.../edge-agent --help
#
# The Rust standard library for aarch64 comes from rustup when it has it or can fetch it, and
# otherwise from Debian's packages (rustc-web with libstd-rust-web-dev:arm64), so the build never
# depends on rustup's server. AGENT_TOOLCHAIN=rustup|debian forces one. Installs
# gcc-aarch64-linux-gnu (linker, and the C compiler `ring` needs) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
bin=target/$target/release/edge-agent

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_install() {
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@"
}

rustup_has_target() {
  command -v rustup >/dev/null || return 1
  rustup target list --installed | grep -qx "$target" && return 0
  echo "fetching the $target standard library with rustup" >&2
  timeout 180 rustup target add "$target"
}

# Debian's rustc-web carries the aarch64 standard library as a package of the arm64 architecture.
debian_toolchain() {
  local sysroot=/usr/lib/rustlib/$target
  if [ ! -x /usr/bin/rustc ] || [ ! -x /usr/bin/cargo ] || [ ! -d "$sysroot" ]; then
    echo "installing Debian's Rust toolchain with the $target standard library" >&2
    dpkg --print-foreign-architectures | grep -qx arm64 || $sudo dpkg --add-architecture arm64
    apt_install rustc-web cargo-web libstd-rust-web-dev:arm64
  fi
  [ -d "$sysroot" ] || { echo "Debian's libstd-rust-web-dev:arm64 did not provide $sysroot" >&2; return 1; }
}

command -v aarch64-linux-gnu-gcc >/dev/null || apt_install gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu

case "${AGENT_TOOLCHAIN:-auto}" in
  rustup) rustup_has_target; toolchain=rustup ;;
  debian) debian_toolchain; toolchain=debian ;;
  auto)
    if rustup_has_target; then
      toolchain=rustup
    elif echo "rustup cannot provide $target here; using Debian's packages instead" >&2 &&
      debian_toolchain; then
      toolchain=debian
    else
      echo "error: no Rust standard library for $target: rustup cannot fetch it and Debian's" \
        "packages (rustc-web, libstd-rust-web-dev:arm64) cannot be installed" >&2
      exit 1
    fi ;;
  *) echo "AGENT_TOOLCHAIN must be rustup, debian or unset" >&2; exit 2 ;;
esac

echo "building the agent for $target with the $toolchain toolchain" >&2
if [ "$toolchain" = debian ]; then
  # rustup's ~/.cargo/bin comes first on PATH: name Debian's compiler and cargo explicitly.
  RUSTC=/usr/bin/rustc /usr/bin/cargo build --release --locked --target "$target" -p edge-agent
else
  cargo build --release --locked --target "$target" -p edge-agent
fi

# The flags above are what make it run on any Pi OS and under qemu here: check they took effect
# (a RUSTFLAGS variable, for one, silently replaces them).
if aarch64-linux-gnu-readelf --program-headers "$bin" | grep -q INTERP; then
  echo "error: $bin is dynamically linked; .cargo/config.toml's +crt-static did not apply" >&2
  exit 1
fi
if aarch64-linux-gnu-readelf --section-headers "$bin" | grep -q '\.symtab'; then
  echo "error: $bin is not stripped; .cargo/config.toml's strip=symbols did not apply" >&2
  exit 1
fi
echo "$bin ($(stat -c %s "$bin") bytes, static, stripped)"

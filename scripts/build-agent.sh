#!/usr/bin/env bash
# Cross-builds the edge agent for Raspberry Pi OS on a Debian x86_64 machine, as one static,
# stripped file (the flags are in .cargo/config.toml):
#   scripts/build-agent.sh aarch64   # 64-bit Pi OS (arm64: Pi 3, 4, 5)
#                                    #   -> target/aarch64-unknown-linux-gnu/release/edge-agent
#   scripts/build-agent.sh armv7     # 32-bit Pi OS (armhf: Pi 2, 3, Zero 2 W)
#                                    #   -> target/armv7-unknown-linux-gnueabihf/release/edge-agent
# Run the result here with Debian's qemu-user: qemu-aarch64 (or qemu-arm) …/edge-agent --help
#
# The Rust standard library for the target comes from rustup when it has it or can fetch it, and
# otherwise from Debian's packages (rustc-web with libstd-rust-web-dev:arm64 or :armhf), so the
# build never depends on rustup's server. AGENT_TOOLCHAIN=rustup|debian forces one. Installs the
# cross gcc (linker, and the C compiler `ring` needs) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  aarch64) target=aarch64-unknown-linux-gnu debian_arch=arm64 gnu=aarch64-linux-gnu ;;
  armv7) target=armv7-unknown-linux-gnueabihf debian_arch=armhf gnu=arm-linux-gnueabihf ;;
  *) echo "usage: $0 aarch64|armv7" >&2; exit 2 ;;
esac
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

# Debian's rustc-web carries each target's standard library as a package of that architecture.
debian_toolchain() {
  local sysroot=/usr/lib/rustlib/$target
  if [ ! -x /usr/bin/rustc ] || [ ! -x /usr/bin/cargo ] || [ ! -d "$sysroot" ]; then
    echo "installing Debian's Rust toolchain with the $target standard library" >&2
    dpkg --print-foreign-architectures | grep -qx "$debian_arch" ||
      $sudo dpkg --add-architecture "$debian_arch"
    apt_install rustc-web cargo-web "libstd-rust-web-dev:$debian_arch"
  fi
  [ -d "$sysroot" ] || {
    echo "Debian's libstd-rust-web-dev:$debian_arch did not provide $sysroot" >&2
    return 1
  }
}

command -v "$gnu-gcc" >/dev/null || apt_install "gcc-$gnu" "binutils-$gnu"

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
        "packages (rustc-web, libstd-rust-web-dev:$debian_arch) cannot be installed" >&2
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
if "$gnu-readelf" --program-headers "$bin" | grep -q INTERP; then
  echo "error: $bin is dynamically linked; .cargo/config.toml's +crt-static did not apply" >&2
  exit 1
fi
if "$gnu-readelf" --section-headers "$bin" | grep -q '\.symtab'; then
  echo "error: $bin is not stripped; .cargo/config.toml's strip=symbols did not apply" >&2
  exit 1
fi
size=$(stat -c %s "$bin")
if [ "$size" -ge 10000000 ]; then
  echo "error: $bin is $size bytes; a Pi agent must stay under 10 MB" >&2
  exit 1
fi
echo "$bin ($size bytes, static, stripped)"

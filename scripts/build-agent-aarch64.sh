#!/usr/bin/env bash
# Cross-builds the edge agent for 64-bit Raspberry Pi OS (aarch64-unknown-linux-gnu) on a
# Debian/Ubuntu x86_64 machine:
#   scripts/build-agent-aarch64.sh            # -> target/aarch64-unknown-linux-gnu/release/edge-agent
# Installs what it needs when missing: the Rust target (rustup) and Debian's
# gcc-aarch64-linux-gnu (linker, and the C compiler `ring` needs). Run the result here with
# Debian's qemu-user:  qemu-aarch64 -L /usr/aarch64-linux-gnu target/.../edge-agent --help
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu

if ! rustup target list --installed | grep -qx "$target"; then
  rustup target add "$target"
fi
if ! command -v aarch64-linux-gnu-gcc >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq gcc-aarch64-linux-gnu
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
cargo build --release --locked --target "$target" -p edge-agent
echo "target/$target/release/edge-agent"

#!/usr/bin/env bash
# Builds the edge agent's Debian packages for Raspberry Pi OS, one per architecture:
#   scripts/package-agent.sh              # both -> target/packages/edge-agent_<version>_arm64.deb
#                                         #         and target/packages/edge-agent_<version>_armhf.deb
#   scripts/package-agent.sh arm64        # 64-bit Pi OS only (or armhf: 32-bit)
#   scripts/package-agent.sh --binary target/debug/edge-agent --arch amd64 --out DIR
#                                         # packs a build you already have (the package tests)
#
# Each package holds the static agent (scripts/build-agent.sh), its hardened systemd unit, the
# settings as a conffile (/etc/edge-agent/agent.toml), the annotated example and the agent's doc;
# its maintainer scripts (edge-agent/packaging/debian/) create the `edge-agent` system user in the
# i2c and gpio groups and enable the unit. Built with dpkg-deb, Debian's own tool: nothing to
# install, and the layout is plain to read here rather than generated.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  echo "usage: $0 [arm64|armhf ...] | --binary FILE --arch DEBIAN_ARCH [--out DIR]" >&2
  exit 2
}

binary="" arch="" out=target/packages arches=()
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=${2:?}; shift 2 ;;
    --arch) arch=${2:?}; shift 2 ;;
    --out) out=${2:?}; shift 2 ;;
    arm64 | armhf) arches+=("$1"); shift ;;
    *) usage ;;
  esac
done
if [ -n "$binary" ] || [ -n "$arch" ]; then
  { [ -n "$binary" ] && [ -n "$arch" ] && [ ${#arches[@]} -eq 0 ]; } || usage
fi
[ ${#arches[@]} -gt 0 ] || [ -n "$binary" ] || arches=(arm64 armhf)

version=$(cargo pkgid -p edge-agent | sed 's/.*[@#]//')
pkg=edge-agent/packaging
# Reproducible: every file dated by the last commit; dpkg-deb dates the archive's members by it.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
stage=""
trap 'rm -rf "$stage"' EXIT

# pack BINARY DEBIAN_ARCH COMPRESSION: stages the tree and builds the .deb into $out.
pack() {
  local bin=$1 debian_arch=$2 compression=$3
  local deb
  rm -rf "$stage"
  stage=$(mktemp -d)
  chmod 0755 "$stage"
  install -D -m 0755 "$bin" "$stage/usr/bin/edge-agent"
  install -D -m 0644 "$pkg/edge-agent.service" "$stage/lib/systemd/system/edge-agent.service"
  install -D -m 0644 "$pkg/agent.toml" "$stage/etc/edge-agent/agent.toml"
  install -D -m 0644 edge-agent/agent.example.toml "$stage/usr/share/doc/edge-agent/agent.example.toml"
  install -D -m 0644 docs/edge-agent.md "$stage/usr/share/doc/edge-agent/edge-agent.md"
  cat > "$stage/usr/share/doc/edge-agent/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: edge-agent

Files: *
Copyright: 2026 the telemetry platform's authors
License: Apache-2.0
 On Debian systems the full text of the license is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
  chmod 0644 "$stage/usr/share/doc/edge-agent/copyright"
  install -d -m 0755 "$stage/DEBIAN"
  install -m 0755 "$pkg/debian/postinst" "$pkg/debian/prerm" "$pkg/debian/postrm" "$stage/DEBIAN/"
  echo /etc/edge-agent/agent.toml > "$stage/DEBIAN/conffiles"
  # Installed-Size is in KiB, of everything but the control files.
  local size
  size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
  cat > "$stage/DEBIAN/control" <<EOF
Package: edge-agent
Version: $version
Architecture: $debian_arch
Maintainer: Telemetry platform team <telemetry@example.com>
Installed-Size: $size
Depends: passwd
Section: net
Priority: optional
Homepage: https://github.com/example/telemetry
Description: telemetry edge agent: Raspberry Pi sensors to the hub
 Reads the Pi's sensors (CPU temperature, throttling, load, memory; BME280 over
 I2C, DS18B20 over 1-Wire, GPIO inputs) and sends the readings over a WebSocket
 to a telemetry hub. Readings wait in an on-disk log until the hub has
 acknowledged them, so an unreliable uplink, a restart, an upgrade or a power
 cut loses and duplicates nothing. One static binary; runs as the edge-agent
 system user under a hardened systemd unit.
EOF
  find "$stage" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
  mkdir -p "$out"
  deb="$out/edge-agent_${version}_${debian_arch}.deb"
  dpkg-deb --root-owner-group $compression --build "$stage" "$deb" >/dev/null
  echo "$deb ($(stat -c %s "$deb") bytes)"
}

if [ -n "$binary" ]; then
  # Fast compression: the tests pack a debug build of a hundred megabytes.
  pack "$binary" "$arch" "-Zgzip -z1"
fi
for debian_arch in "${arches[@]}"; do
  case "$debian_arch" in
    arm64) rust_arch=aarch64 target=aarch64-unknown-linux-gnu ;;
    armhf) rust_arch=armv7 target=armv7-unknown-linux-gnueabihf ;;
  esac
  scripts/build-agent.sh "$rust_arch"
  pack "target/$target/release/edge-agent" "$debian_arch" -Zxz
done

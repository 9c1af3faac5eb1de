#!/usr/bin/env bash
# Runs the edge agent with the simulated source against a local hub, in one command:
#   scripts/run-agent-demo.sh [DEVICE_ID]
# Uses the hub at $HUB_URL (default ws://127.0.0.1:8080/ws) if one answers there, with the secret
# in .dev/hub-secret (what scripts/run-hub.sh uses); otherwise starts one on the embedded broker
# and stops it on exit. The agent's log lives in a temp directory. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
device=${1:-demo-pi}
listen=${HUB_LISTEN:-127.0.0.1:8080}
url=${HUB_URL:-ws://$listen/ws}

mkdir -p .dev
if [ ! -s .dev/hub-secret ]; then
  head -c 32 /dev/urandom | base64 | tr -d '\n=' > .dev/hub-secret
fi
export HUB_AUTH__HS256_SECRET="${HUB_AUTH__HS256_SECRET:-$(cat .dev/hub-secret)}"
cargo build --release --locked -p hub -p edge-agent
hub=target/release/hub

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

if ! "$hub" probe "http://$listen/healthz" >/dev/null 2>&1; then
  HUB_LISTEN=$listen "$hub" serve &
  pids+=($!)
  for _ in $(seq 50); do
    "$hub" probe "http://$listen/healthz" >/dev/null 2>&1 && break
    sleep 0.1
  done
fi

"$hub" token --sub "$device" --role agent --ttl 24h > "$work/token"
viewer=$("$hub" token --sub dashboard --role viewer --ttl 12h)
cat <<MSG
Agent $device -> $url, simulated sensors, log in $work/data.
Watch it: websocat "ws://$listen/ws?token=$viewer"  then send {"type":"subscribe","channel":"devices.$device"}
MSG
AGENT_HUB__URL=$url AGENT_AUTH__TOKEN_FILE=$work/token AGENT_STORAGE__DIR=$work/data \
  target/release/edge-agent --simulate &
pids+=($!)
wait "${pids[-1]}"

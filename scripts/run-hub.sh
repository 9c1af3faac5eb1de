#!/usr/bin/env bash
# Runs one hub on the embedded broker (no Redis) at 127.0.0.1:8080 with five simulated demo
# devices, and prints the dashboard's address and tokens to try it. HUB_DEMO__DEVICES=0 turns
# the demo devices off.
# The HS256 secret is generated once into .dev/hub-secret (ignored by git). Set HUB_* variables
# to change anything, e.g. HUB_LISTEN=0.0.0.0:8080 scripts/run-hub.sh
set -euo pipefail
cd "$(dirname "$0")/.."

mkdir -p .dev
if [ ! -s .dev/hub-secret ]; then
  head -c 32 /dev/urandom | base64 | tr -d '\n=' > .dev/hub-secret
fi
export HUB_AUTH__HS256_SECRET="${HUB_AUTH__HS256_SECRET:-$(cat .dev/hub-secret)}"
export HUB_LISTEN="${HUB_LISTEN:-127.0.0.1:8080}"
export HUB_DEMO__DEVICES="${HUB_DEMO__DEVICES:-5}"

cargo build --release --locked -p hub
hub=target/release/hub
viewer=$("$hub" token --sub dashboard --role viewer --ttl 12h)
agent=$("$hub" token --sub pi-01 --role agent --ttl 12h --groups demo)
cat <<MSG
Dashboard (live demo fleet of $HUB_DEMO__DEVICES devices):
  http://$HUB_LISTEN/?token=$viewer
Hub on ws://$HUB_LISTEN/ws (embedded broker). Tokens valid for 12 hours:
  viewer: $viewer
  agent (device pi-01, group demo): $agent
Try it with any WebSocket client, e.g. websocat:
  websocat "ws://$HUB_LISTEN/ws?token=\$VIEWER"   then send {"type":"subscribe","channel":"fleet"}
  websocat -H "Authorization: Bearer \$AGENT" ws://$HUB_LISTEN/ws   then send {"type":"publish","seq":1,"data":{"temp_c":21.5}}
Metrics: http://$HUB_LISTEN/metrics   Protocol: docs/protocol.md   Stop: Ctrl-C (drains)
MSG
exec "$hub"

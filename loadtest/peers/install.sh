#!/usr/bin/env bash
# Installs what the peer servers need, when missing: the npm packages of package-lock.json
# (ws, socket.io, @socket.io/redis-adapter, redis) and the pinned Python `websockets`.
set -euo pipefail
cd "$(dirname "$0")"
for tool in node npm python3 redis-server; do
  command -v "$tool" >/dev/null || { echo "the peer servers need $tool" >&2; exit 1; }
done
# Installed again when package-lock.json changed since the last install.
lock=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ "$(cat node_modules/.installed-lock 2>/dev/null)" != "$lock" ]; then
  npm ci --silent --no-audit --no-fund
  echo "$lock" > node_modules/.installed-lock
fi
python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt 2>&1 |
  grep -v 'Running pip as the .root. user' >&2 || true
python3 -c 'import websockets.asyncio.server' ||
  { echo "python3 cannot import websockets after installing requirements.txt" >&2; exit 1; }

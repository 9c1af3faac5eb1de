#!/usr/bin/env bash
# Mints tokens for the k6 scenarios with the hub's own `token` subcommand: N agent tokens
# (device ids PREFIX001, PREFIX002, ...) and one viewer token (no `channels` claim, so it may
# subscribe to anything unless the hub sets auth.viewer_channels).
#
# Usage: loadtest/k6/tokens.sh [-n AGENTS] [-o TOKENS_FILE] [-t TTL] [-p PREFIX] [-g GROUPS]
#   -n  number of agent tokens            [env AGENTS, default 2]
#   -o  write JSON to this file (for TOKENS_FILE) instead of printing `export` lines
#   -t  token lifetime, e.g. 2h, 30d      [env TTL, default 2h]; longer than the run (soak!)
#   -p  device id prefix                  [env PREFIX, default k6-agent-]
#   -g  groups for the agent tokens, comma-separated [env GROUPS, default none]
# Key: like scripts/run-hub.sh: HUB_AUTH__HS256_SECRET, else the repo's .dev/hub-secret (other
# HUB_* variables or HUB_CONFIG work too, e.g. for RS256 with auth.private_key_file).
# Binary: HUB_BIN, default target/release/hub, else target/debug/hub (relative to the repo root).
#
#   eval "$(loadtest/k6/tokens.sh -n 4)"            # exports VIEWER_TOKEN and AGENT_TOKENS
#   loadtest/k6/tokens.sh -n 100 -o /tmp/tokens.json && TOKENS_FILE=/tmp/tokens.json k6 run ...
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"

n="${AGENTS:-2}"; out=""; ttl="${TTL:-2h}"; prefix="${PREFIX:-k6-agent-}"; groups="${GROUPS:-}"
while getopts "n:o:t:p:g:h" opt; do
  case "$opt" in
    n) n="$OPTARG" ;; o) out="$OPTARG" ;; t) ttl="$OPTARG" ;; p) prefix="$OPTARG" ;;
    g) groups="$OPTARG" ;;
    *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
done
case "$n" in ''|*[!0-9]*) echo "tokens.sh: -n must be a number" >&2; exit 2 ;; esac

hub="${HUB_BIN:-}"
if [ -z "$hub" ]; then
  if [ -x "$root/target/release/hub" ]; then hub="$root/target/release/hub"; else hub="$root/target/debug/hub"; fi
fi
case "$hub" in /*) ;; *) hub="$root/$hub" ;; esac
[ -x "$hub" ] || { echo "tokens.sh: no hub binary at $hub (set HUB_BIN or build it)" >&2; exit 1; }

if [ -z "${HUB_AUTH__HS256_SECRET:-}" ] && [ -z "${HUB_AUTH__PRIVATE_KEY_FILE:-}" ] && [ -z "${HUB_CONFIG:-}" ]; then
  if [ -s "$root/.dev/hub-secret" ]; then
    HUB_AUTH__HS256_SECRET="$(cat "$root/.dev/hub-secret")"
    export HUB_AUTH__HS256_SECRET
  else
    echo "tokens.sh: set HUB_AUTH__HS256_SECRET (the hub's secret) or create .dev/hub-secret (scripts/run-hub.sh does)" >&2
    exit 1
  fi
fi

group_args=()
[ -n "$groups" ] && group_args=(--groups "$groups")
viewer="$("$hub" token --sub k6-viewer --role viewer --ttl "$ttl")"
ids=(); toks=()
for ((i = 1; i <= n; i++)); do
  id="$(printf '%s%03d' "$prefix" "$i")"
  ids+=("$id")
  toks+=("$("$hub" token --sub "$id" --role agent --ttl "$ttl" "${group_args[@]}")")
done

if [ -n "$out" ]; then
  umask 077
  {
    printf '{"viewer":"%s","agents":[' "$viewer"
    for ((i = 0; i < n; i++)); do
      [ "$i" -gt 0 ] && printf ','
      printf '\n  {"id":"%s","token":"%s"}' "${ids[$i]}" "${toks[$i]}"
    done
    printf '\n]}\n'
  } > "$out"
  echo "tokens.sh: wrote 1 viewer and $n agent tokens to $out (TOKENS_FILE=$(cd "$(dirname "$out")" && pwd)/$(basename "$out"))" >&2
else
  printf 'export VIEWER_TOKEN=%s\n' "$viewer"
  printf 'export AGENT_TOKENS=%s\n' "$(IFS=,; echo "${toks[*]}")"
fi

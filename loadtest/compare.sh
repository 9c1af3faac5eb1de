#!/usr/bin/env bash
# The hub side by side with the raw ceiling and the servers users would pick instead (Node ws,
# Python websockets, socket.io on its Redis adapter; loadtest/peers/): the same generator, the
# same viewers, rate and payload, every server pinned to the same core. Prints each run and then
# one table (the JSON lines are kept in target/compare.jsonl).
#   loadtest/compare.sh [VIEWERS] [RATE]     defaults: 2000 viewers, 400 pub/s for 5 s
# SERVER_CPU (default 0) is the servers' core; GENERATOR_CPUS (default 1) the generator's: more
# than one (e.g. 2,3,4,5) spreads the viewers over one worker process per CPU. TARGETS picks the
# servers (default: raw hub node-ws python-websockets socketio).
set -euo pipefail
cd "$(dirname "$0")/.."
viewers=${1:-2000}
rate=${2:-400}
seconds=${SECONDS_PER_RUN:-5}
server_cpu=${SERVER_CPU:-0}
generator_cpus=${GENERATOR_CPUS:-1}
read -r -a targets <<< "${TARGETS:-raw hub node-ws python-websockets socketio}"

loadtest/peers/install.sh
cargo build --release --locked -p hub -p loadtest >&2
spread=()
case "$generator_cpus" in *,*) spread=(--generator-cpus "$generator_cpus") ;; esac
results=target/compare.jsonl
: > "$results"
for target in "${targets[@]}"; do
  out=$(taskset -c "$generator_cpus" target/release/fanout --target "$target" \
    --server-cpu "$server_cpu" --viewers "$viewers" --rate "$rate" --seconds "$seconds" \
    "${spread[@]}")
  grep -v '^{' <<< "$out" >&2
  grep '^{' <<< "$out" >> "$results"
done
echo
echo "$viewers viewers, $rate pub/s of ~250 bytes for $seconds s; servers on CPU $server_cpu," \
  "generator on CPU $generator_cpus ($(nproc) CPUs, $(uname -m))"
python3 loadtest/peers/table.py < "$results"

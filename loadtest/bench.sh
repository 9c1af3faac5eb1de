#!/usr/bin/env bash
# The single-hub benchmark suite on one machine: the server (hub or raw ceiling) pinned to CPU 0,
# the generator to CPU 1, so the ratios hold on a noisy box. Prints each run's table and JSON
# line; collect the JSON lines with `| grep '^{'`.
#   loadtest/bench.sh [VIEWERS] [RATES...]        defaults: 2000 viewers, 100 200 400 800 pub/s
# Bounded: each run publishes for SECONDS (default 5) and every wait inside has a deadline.
set -euo pipefail
cd "$(dirname "$0")/.."
viewers=${1:-2000}
shift || true
rates=("$@")
[ ${#rates[@]} -gt 0 ] || rates=(100 200 400 800)
seconds=${SECONDS_PER_RUN:-5}
cargo build --release --locked -p hub -p loadtest >&2
run() { taskset -c 1 target/release/fanout --server-cpu 0 --seconds "$seconds" "$@"; }

echo "== fan-out: $viewers viewers on fleet, raw ceiling vs hub, same rates"
for rate in "${rates[@]}"; do
  run --target raw --viewers "$viewers" --rate "$rate"
  run --target hub --viewers "$viewers" --rate "$rate"
done
echo "== tracing: the same fan-out with OTLP export off, sampling 1 % and 100 % of publications"
trace_rate=${TRACE_RATE:-400}
run --target hub --viewers "$viewers" --rate "$trace_rate"
run --target hub --viewers "$viewers" --rate "$trace_rate" --trace-sample 0.01
run --target hub --viewers "$viewers" --rate "$trace_rate" --trace-sample 1.0
echo "== connects: as fast as the generator can open them"
run --target raw --viewers "$viewers" --rate 1 --connect-rate 50000
run --target hub --viewers "$viewers" --rate 1 --connect-rate 50000
echo "== idle connections: memory per connection, after one ping interval (20 s)"
idle=${IDLE_VIEWERS:-9000}
run --target raw --viewers "$idle" --rate 1 --connect-rate 5000 --settle 22
run --target hub --viewers "$idle" --rate 1 --connect-rate 5000 --settle 22

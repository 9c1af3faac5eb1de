"""Formats `fanout` JSON lines (stdin) as one Markdown table, then one line comparing the hub
with the best peer. Used by loadtest/compare.sh."""

import json
import sys

runs = [json.loads(line) for line in sys.stdin if line.startswith("{")]
if not runs:
    sys.exit("no fanout results on stdin")


def per_core_second(rate, cpu_percent):
    return rate / (cpu_percent / 100) if cpu_percent > 0 else 0.0


print("| server | deliveries/s | loss | p50 / p99 ms | server CPU | deliveries per server core-second "
      "| RSS per connection | connects per server core-second |")
print("|---|---|---|---|---|---|---|---|")
for r in runs:
    loss = r["expected"] - r["delivered"]
    loss_pct = 100 * loss / r["expected"] if r["expected"] else 0
    print(
        f"| {r['target']} | {r['deliveries_per_s']:,.0f} | {max(loss, 0):,} ({loss_pct:.1f} %) "
        f"| {r['latency_ms']['p50']:.1f} / {r['latency_ms']['p99']:.1f} "
        f"| {r['server_cpu_percent']:.0f} % "
        f"| {per_core_second(r['deliveries_per_s'], r['server_cpu_percent']):,.0f} "
        f"| {r['rss_per_connection'] / 1024:.1f} KiB "
        f"| {per_core_second(r['connect_per_s'], r['connect_server_cpu_percent']):,.0f} |"
    )

hub = next((r for r in runs if r["target"] == "hub"), None)
peers = [r for r in runs if r["target"] not in ("hub", "raw") and r["deliveries_per_s"] > 0]
if hub and peers:
    best = max(peers, key=lambda r: r["deliveries_per_s"])
    hub_eff = per_core_second(hub["deliveries_per_s"], hub["server_cpu_percent"])
    best_eff = per_core_second(best["deliveries_per_s"], best["server_cpu_percent"])
    print()
    print(
        f"hub: {hub['deliveries_per_s'] / best['deliveries_per_s']:.1f}x the deliveries of "
        f"{best['target']}, the best peer, on the same core"
        + (f" ({hub_eff / best_eff:.1f}x per core-second)" if best_eff else "")
    )

#!/usr/bin/env python3
"""Draws bench/throughput_latency.png from bench/results.jsonl (bench run)."""
import json
import sys
from collections import defaultdict

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

src = sys.argv[1] if len(sys.argv) > 1 else "bench/results.jsonl"
out = sys.argv[2] if len(sys.argv) > 2 else "bench/throughput_latency.png"
rows = [json.loads(l) for l in open(src) if l.strip()]
by = defaultdict(dict)
for r in rows:
    by[r["stack"]][r["devices"]] = r  # the last run wins
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
for stack, d in sorted(by.items()):
    xs = sorted(d)
    a.plot(xs, [d[x]["chunk_msgs_per_s"] for x in xs], marker="o", label=stack)
    b.plot(xs, [d[x]["p50_ms"] for x in xs], marker="o", label=f"{stack} p50")
    b.plot(xs, [d[x]["p99_ms"] for x in xs], marker="x", linestyle="--", label=f"{stack} p99")
a.set(xlabel="devices (one 50 KB image each, 512 B chunks)", ylabel="chunk messages / s", title="Throughput")
b.set(xlabel="devices", ylabel="HELLO → ACK_OK (ms)", title="Latency", yscale="log")
for ax in (a, b):
    ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out, dpi=110)
print(out)

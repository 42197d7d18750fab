#!/usr/bin/env python3
"""Draws bench/throughput_latency.png from bench/results.jsonl (bench run).

With several runs per stack and device count (`bench run --repeat N`) it
draws the median, with bars from the lowest to the highest run."""
import json
import sys
from collections import defaultdict

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

src = sys.argv[1] if len(sys.argv) > 1 else "bench/results.jsonl"
out = sys.argv[2] if len(sys.argv) > 2 else "bench/throughput_latency.png"
rows = [json.loads(l) for l in open(src) if l.strip()]
by = defaultdict(lambda: defaultdict(list))
for r in rows:
    by[r["stack"]][r["devices"]].append(r)


def med(runs, key):
    v = sorted(r[key] for r in runs)
    return v[len(v) // 2], v[0], v[-1]


fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
for stack, d in sorted(by.items()):
    xs = sorted(d)
    m = [med(d[x], "chunk_msgs_per_s") for x in xs]
    bars = a.errorbar(xs, [y for y, _, _ in m],
               yerr=[[y - lo for y, lo, _ in m], [hi - y for y, _, hi in m]],
               marker="o", capsize=3, label=stack)
    color = bars.lines[0].get_color()
    b.plot(xs, [med(d[x], "p50_ms")[0] for x in xs], marker="o", color=color, label=f"{stack} p50")
    b.plot(xs, [med(d[x], "p99_ms")[0] for x in xs], marker="x", linestyle="--", color=color,
           label=f"{stack} p99")
a.set(xlabel="devices (one 50 KB image each, 512 B chunks)", ylabel="chunk messages / s", title="Throughput")
b.set(xlabel="devices", ylabel="HELLO → ACK_OK (ms)", title="Latency", yscale="log")
for ax in (a, b):
    ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out, dpi=110)
print(out)

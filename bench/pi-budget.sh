#!/usr/bin/env bash
# A Pi-sized budget for the gateway (bench/RESULTS.md, "Pi-sized budget"): a
# wake burst against `barngate serve` confined to one core at a reduced CPU
# quota and 256 MiB of memory, the load generator on the other core.
#
#   bench/pi-budget.sh [bench burst options...]
#       default: --devices 100 --registered 1000 --loss 0.05
#
# An estimate of a Raspberry Pi 4, not a measurement of one: a Pi 4 core
# (Cortex-A72, 1.5-1.8 GHz, no AES instructions) does roughly a third of what
# one core of this machine does on this path; the quota stands for that.
#
# Environment:
#   PI_CPU_QUOTA=N      percent of one core (default 33)
#   PI_MEMORY_MAX=SIZE  memory limit (default 256M)
#   BARNGATE_BIN=PATH   the gateway (default: <target dir>/release/barngate; the
#                       shipped build: cargo build --release --no-default-features
#                       --features mimalloc)
#   BENCH_BIN=PATH      the load generator (default: <target dir>/release/examples/bench,
#                       else .../debug/examples/bench)
#
# The limits, whichever this host allows, first that works:
#   1. systemd-run --scope -p CPUQuota -p MemoryMax -p AllowedCPUs=0 (systemd running);
#   2. a cgroup v2 group under /sys/fs/cgroup (cpu.max, memory.max, memory.swap.max=0);
#   3. cgroup v1 groups (cpu.cfs_quota_us; memory.limit_in_bytes and memsw);
#   4. no CPU quota, only `prlimit --as` (address space: a much looser stand-in).
# Each with `taskset -c 0` (bench --pin: the gateway on CPU 0, the load on CPU 1).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

quota=${PI_CPU_QUOTA:-33}
mem=${PI_MEMORY_MAX:-256M}
tdir=$(realpath -m "${CARGO_TARGET_DIR:-target}")
bin=$(realpath -m "${BARNGATE_BIN:-$tdir/release/barngate}")
bench=${BENCH_BIN:-}
if [ -z "$bench" ]; then
  bench=$tdir/release/examples/bench
  [ -x "$bench" ] || bench=$tdir/debug/examples/bench
fi
[ -x "$bin" ] || { echo "pi-budget: no gateway at $bin (cargo build --release --no-default-features --features mimalloc)" >&2; exit 1; }
[ -x "$bench" ] || { echo "pi-budget: no load generator at $bench (cargo build --release --example bench)" >&2; exit 1; }
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--devices 100 --registered 1000 --loss 0.05)

mem_bytes=$(numfmt --from=iec "$mem")
period=100000
quota_us=$((period * quota / 100))
wrapper=$(mktemp)
groups=()
cleanup() {
  rm -f "$wrapper"
  local g
  for g in "${groups[@]}"; do
    # Any process still inside goes back to the parent first.
    if [ -f "$g/cgroup.procs" ]; then
      while read -r p; do echo "$p" > "$(dirname "$g")/cgroup.procs" 2>/dev/null || true; done < "$g/cgroup.procs"
      rmdir "$g" 2>/dev/null || true
    fi
  done
}
trap cleanup EXIT

own_v1() { # the cgroup v1 path of this shell for a controller
  sed -n "s/^[0-9]*:$1:\(.*\)$/\1/p" /proc/self/cgroup | head -1
}

how=""
if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null; then
  how="systemd-run --scope: CPUQuota=${quota}%, MemoryMax=$mem, MemorySwapMax=0, AllowedCPUs=0"
  printf '#!/bin/sh\nexec systemd-run --quiet --scope -p CPUQuota=%s%% -p MemoryMax=%s -p MemorySwapMax=0 -p AllowedCPUs=0 %q "$@"\n' \
    "$quota" "$mem" "$bin" > "$wrapper"
elif [ -f /sys/fs/cgroup/cgroup.controllers ] && grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null \
  && g=/sys/fs/cgroup/barngate-pi-budget.$$ && mkdir "$g" 2>/dev/null; then
  groups+=("$g")
  echo "$quota_us $period" > "$g/cpu.max"
  echo "$mem_bytes" > "$g/memory.max"
  echo 0 > "$g/memory.swap.max" 2>/dev/null || true
  how="cgroup v2 $g: cpu.max $quota_us/$period, memory.max $mem"
  printf '#!/bin/sh\necho $$ > %q/cgroup.procs\nexec %q "$@"\n' "$g" "$bin" > "$wrapper"
elif [ -w "/sys/fs/cgroup/cpu$(own_v1 cpu)" ] && [ -w "/sys/fs/cgroup/memory$(own_v1 memory)" ]; then
  gc=/sys/fs/cgroup/cpu$(own_v1 cpu)/barngate-pi-budget.$$
  gm=/sys/fs/cgroup/memory$(own_v1 memory)/barngate-pi-budget.$$
  gc=${gc/\/\//\/}; gm=${gm/\/\//\/}
  mkdir "$gc" "$gm"
  groups+=("$gc" "$gm")
  echo "$period" > "$gc/cpu.cfs_period_us"
  echo "$quota_us" > "$gc/cpu.cfs_quota_us"
  echo "$mem_bytes" > "$gm/memory.limit_in_bytes"
  # No swap past the limit where the kernel accounts it (there is none here anyway).
  echo "$mem_bytes" > "$gm/memory.memsw.limit_in_bytes" 2>/dev/null || true
  how="cgroup v1: cpu.cfs_quota_us $quota_us/$period (${quota} % of one core), memory.limit_in_bytes $mem"
  printf '#!/bin/sh\necho $$ > %q/cgroup.procs\necho $$ > %q/cgroup.procs\nexec %q "$@"\n' "$gc" "$gm" "$bin" > "$wrapper"
else
  how="no cgroup available: prlimit --as=$mem only (no CPU quota)"
  printf '#!/bin/sh\nexec prlimit --as=%s %q "$@"\n' "$mem_bytes" "$bin" > "$wrapper"
fi
chmod +x "$wrapper"

echo "pi-budget: $how; taskset -c 0 (gateway), load generator on CPU 1"
echo "pi-budget: $bench burst ${args[*]} --pin --gateway-bin $bin (confined)"
"$bench" burst "${args[@]}" --pin --gateway-bin "$wrapper"
for g in "${groups[@]}"; do
  for f in memory.max_usage_in_bytes memory.peak memory.failcnt memory.events cpu.stat; do
    if [ -f "$g/$f" ]; then
      echo "pi-budget: ${g#/sys/fs/cgroup/}/$f: $(tr '\n' ' ' < "$g/$f")"
    fi
  done
done

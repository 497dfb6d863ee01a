#!/usr/bin/env bash
# All of tvctl's benchmarks, in one run; each prints its tables (docs/BENCHMARKS.md explains
# them and holds the results):
#   1. scripts/bench-peer.sh:    tvctl side by side with trace-cmd (`record -N -t` into
#      `trace-cmd listen`, and `record` to a local file) on one guest image, the same workloads
#      (W1 fork+exec under -e sched, W2 dd bs=1 under -e raw_syscalls), runs interleaved,
#      PAIRS rounds (default 3): min/median/max of every figure and within-round ratios, plus
#      a loss ladder (§5).
#   2. scripts/bench-channel.sh: what one virtio-serial channel carries (a guest dd through the
#      same FIFO) against tvctl's collector with a synthetic source (§6).
#   3. scripts/bench-collect.sh: tvctl alone at the guest's fastest event rate (§1).
# Usage: scripts/bench.sh   (env: PAIRS, W1_N, W2_COUNT, LADDER, ROUNDS, ... as the scripts take)
set -euo pipefail
cd "$(dirname "$0")/.."
echo "=== bench-peer (BENCHMARKS §5)"
scripts/bench-peer.sh
echo "=== bench-channel (BENCHMARKS §6)"
scripts/bench-channel.sh
echo "=== bench-collect (BENCHMARKS §1)"
scripts/bench-collect.sh

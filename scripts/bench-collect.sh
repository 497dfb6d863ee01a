#!/usr/bin/env bash
# Benchmarks of tvctl on the built-in guest; results go to docs/BENCHMARKS.md by hand.
#
# 1. Collection throughput: the guest generates syscall events as fast as it can
#    (dd with 1-byte blocks under raw_syscalls tracing) while tvctl records; we report MB/s
#    per CPU collected (bytes in the trace.dat / recording time) and lost events.
# 2. Agent overhead: the guest command reads the agent's CPU time (utime+stime of all its
#    threads, /proc/PID/stat) before and after the workload; we report it as % of one vCPU.
# 3. Host cost: tvctl's own CPU time (all threads) for the run.
#
# Usage: scripts/bench-collect.sh [VCPUS] [DD_COUNT]
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
vcpus=${1:-2}
count=${2:-400000}
dom=tvctl-bench-$vcpus
root=/var/lib/tvctl-bench
out=$(mktemp -d)
trap 'rm -rf "$out"; virsh destroy "$dom" >/dev/null 2>&1 || true' EXIT

scripts/install-deps.sh >/dev/null
cargo build --quiet --release --bin tvctl
scripts/build-guest.sh >/dev/null
tvctl=target/release/tvctl
scripts/guest-domain.sh "$dom" "$vcpus" 512 >/dev/null
$tvctl --dir "$root" -q setup "$dom" >/dev/null
virsh destroy "$dom" >/dev/null 2>&1 || true
log=/var/lib/tvctl-lab/$dom.console.log
: > "$log" 2>/dev/null || true

# The agent's pid and CPU ticks, printed by a guest command to the console.
ticks='a=$(pidof tvctl-agent | cut -d" " -f1); echo BENCH-TICKS $(cut -d" " -f14,15 /proc/$a/stat) $(getconf CLK_TCK 2>/dev/null || echo 100)'
guest_cmd="$ticks > /dev/console; t0=\$(cut -d. -f1 /proc/uptime); dd if=/dev/zero of=/dev/null bs=1 count=$count 2>/dev/null; $ticks > /dev/console"

# tvctl runs under a small wrapper that reports its CPU time (user+sys, all threads): the
# host-side cost of collecting (boot wait included, which is idle).
python3 - "$out/host-cpu.txt" "$tvctl" --dir "$root" trace "$dom" -e raw_syscalls -b 8192 \
  -o "$out/bench.dat" --json -- /bin/sh -c "$guest_cmd" > "$out/summary.json" <<'PY'
import resource, subprocess, sys
rc = subprocess.run(sys.argv[2:]).returncode
u = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(f"{u.ru_utime:.2f} {u.ru_stime:.2f}\n")
sys.exit(rc)
PY

python3 - "$out/summary.json" "$log" "$out/host-cpu.txt" <<'PY'
import json, sys, re
s = json.load(open(sys.argv[1]))
d = s["duration_s"]
print(f"recording: {d:.1f} s, {s['total_events']} events, {s['total_lost_events']} lost, splice={s['splice']}")
for c in s["cpus"]:
    print(f"  cpu{c['cpu']}: {c['bytes']/1e6:.1f} MB, {c['bytes']/1e6/d:.2f} MB/s, {c['events']} events ({c['events']/d:.0f}/s), lost {c['lost_events']}")
tot = s["total_bytes"]
print(f"  all CPUs: {tot/1e6/d:.2f} MB/s, {s['total_events']/d:.0f} events/s")
ticks = [l.split() for l in open(sys.argv[2], errors="replace") if l.startswith("BENCH-TICKS")]
if len(ticks) >= 2:
    a, b = ticks[-2], ticks[-1]
    hz = int(b[3])
    used = (int(b[1]) + int(b[2]) - int(a[1]) - int(a[2])) / hz
    print(f"agent CPU time during the workload: {used:.2f} s = {100*used/d:.1f} % of one vCPU over {d:.1f} s")
else:
    print("agent CPU time: not found in the console log", file=sys.stderr)
user, system = map(float, open(sys.argv[3]).read().split())
print(f"host: tvctl used {user:.2f} s user + {system:.2f} s system CPU for the whole run "
      f"({(user + system) / (tot / 1e6):.3f} s per MB collected)")
PY

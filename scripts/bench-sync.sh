#!/usr/bin/env bash
# Clock-sync and host-recording benchmark: RUNS runs of
#   tvctl trace DOM --host -e sched:sched_switch -H 'sched:*' -H 'irq:*' --duration SECS
# on the built-in guest (TCG, 2 vCPUs), each judged by the real `trace-cmd report`.
# Per run: the guest's error bound (ns), the median probe round trip (ns), the causal chains
# in and out of order in the merged report, and tvctl's host CPU time per MB of data
# collected (host and guest files together, and the host file's share).
# Prints one line per run, then min / median / max. Results go to docs/BENCHMARKS.md by hand.
#
# Usage: scripts/bench-sync.sh [RUNS] [SECS]
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
runs=${1:-10}
secs=${2:-3}
dom=tvctl-bench-sync
root=/var/lib/tvctl-bench
out=$(mktemp -d)
trap 'rm -rf "$out"; virsh -c qemu:///system destroy "$dom" >/dev/null 2>&1 || true' EXIT

scripts/install-deps.sh >/dev/null
cargo build --quiet --release --bin tvctl
scripts/build-guest.sh >/dev/null
tvctl=$top/target/release/tvctl
scripts/guest-domain.sh "$dom" 2 512 >/dev/null
$tvctl --dir "$root" -q setup "$dom" >/dev/null

for i in $(seq 1 "$runs"); do
  python3 - "$out/run$i" "$tvctl" --dir "$root" --json trace "$dom" --host \
    -e sched:sched_switch -H 'sched:*' -H 'irq:*' --duration "$secs" -o "$out/run$i.dat" <<'PY'
import json, re, resource, subprocess, sys
prefix = sys.argv[1]
p = subprocess.run(sys.argv[2:], capture_output=True, text=True)
u = resource.getrusage(resource.RUSAGE_CHILDREN)
if p.returncode != 0:
    sys.exit(f"tvctl exited {p.returncode}: {p.stderr}")
s = json.loads(p.stdout)
files = [s["host"]["output"]] + [g["output"] for g in s["guests"]]
rep = subprocess.run(["trace-cmd", "report"] + sum([["-i", f] for f in files], []),
                     capture_output=True, text=True).stdout
host = files[0].rsplit("/", 1)[-1]
chains = {}
for line in rep.splitlines():
    m = re.search(r"tvctl-sync (\d+)", line)
    if m:
        chains.setdefault(m.group(1), []).append(line.split(":")[0].strip())
good = sum(1 for v in chains.values()
           if len(v) == 3 and v[0] == host and v[2] == host and v[1] != host)
g = s["guests"][0]
mb = (s["host"]["total_bytes"] + g["total_bytes"]) / 1e6
cpu = u.ru_utime + u.ru_stime
print(json.dumps({
    "bound_ns": g["sync"]["bound_ns"], "rtt_ns": g["sync"]["round_trip_ns"],
    "samples": g["sync"]["samples"], "chains": len(chains), "violations": len(chains) - good,
    "host_mb": s["host"]["total_bytes"] / 1e6, "total_mb": mb, "cpu_s": cpu,
    "ms_per_mb": 1000 * cpu / mb if mb else None}))
PY
done | tee "$out/runs.jsonl"

python3 - "$out/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def row(key, unit=""):
    v = sorted(r[key] for r in runs if r[key] is not None)
    print(f"{key:>11}: min {v[0]:.6g}  median {statistics.median(v):.6g}  max {v[-1]:.6g} {unit}")
print(f"{len(runs)} runs")
for k, u in [("bound_ns", "ns"), ("rtt_ns", "ns"), ("samples", ""), ("chains", ""),
             ("violations", ""), ("host_mb", "MB"), ("total_mb", "MB"), ("cpu_s", "s"),
             ("ms_per_mb", "ms of host CPU per MB")]:
    row(k, u)
PY

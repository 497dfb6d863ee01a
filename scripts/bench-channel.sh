#!/usr/bin/env bash
# What one virtio-serial data channel carries here, and how much of it tvctl's collector gets
# (issue 11, P2), on the built-in guest under TCG, runs interleaved:
#   raw:   the guest's dd writes N bytes of zeros into the port trace-path-cpu0 (block size B);
#          on the host a reader takes them from the same FIFO (trace-path-cpu0.out), raising
#          its pipe to 1 MiB as tvctl does, and times first byte -> last byte with the host's
#          clock; the guest's dd times itself with the guest's clock.
#   tvctl: the agent runs with --synthetic (guest/init's tvctl.synthetic=1), so a recording
#          streams empty pages as fast as the port takes them: no ring buffer, no events in
#          the way. `tvctl trace --duration D` collects them; MB/s = cpu0's bytes / the
#          recording's duration, and the host CPU per MB from tvctl's rusage.
# The guest has 1 vCPU, so one port carries everything and the two paths compare directly.
# A third path times the host's own `dd bs=1M` into BENCH_OUT: tvctl writes every byte there,
# so on a disk its rate is bounded by the file system's (put BENCH_OUT on tmpfs to see the
# collector alone).
# Usage: scripts/bench-channel.sh   (env: ROUNDS=3 RAW_MB=256 DURATION=8 BLOCKS="4096 65536 1048576")
# Results: a table on stdout, and $BENCH_OUT/results.json (default /var/lib/tvctl-bench/channel).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
die() { echo "bench-channel: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
export ROUNDS=${ROUNDS:-3} RAW_MB=${RAW_MB:-256} DURATION=${DURATION:-8}
export BLOCKS=${BLOCKS:-"4096 65536 1048576"}
export BENCH_OUT=${BENCH_OUT:-/var/lib/tvctl-bench/channel}
uri="${LIBVIRT_DEFAULT_URI:-qemu:///system}"
dom=tvctl-bench-channel
lab=/var/lib/tvctl-lab/$dom
root=/var/lib/tvctl-bench/root
guest="${TVCTL_GUEST_DIR:-/var/lib/libvirt/images/tvctl}"
tvctl=target/release/tvctl

scripts/install-deps.sh >/dev/null
cargo build --quiet --release --bin tvctl
scripts/build-guest.sh >/dev/null

mkdir -p "$BENCH_OUT"
trap 'virsh -c "$uri" destroy "$dom" >/dev/null 2>&1 || true' EXIT
. scripts/lib/bench-domain.sh
bench_boot "$dom" 1 "$guest/initrd.img" "tvctl.shell=1 tvctl.synthetic=1"
echo "bench-channel: $dom booted (1 vCPU, console $lab/console.log)"

PYTHONPATH="$top/scripts/lib" python3 - "$dom" "$lab/shell.sock" "$root" "$top/$tvctl" "$lab/console.log" <<'PY'
import fcntl, json, os, resource, statistics, subprocess, sys, threading, time
from guestshell import GuestShell

DOM, SOCK, ROOT, TVCTL, CONSOLE = sys.argv[1:6]
ROUNDS, RAW_MB, DURATION = int(os.environ["ROUNDS"]), int(os.environ["RAW_MB"]), float(os.environ["DURATION"])
BLOCKS = [int(b) for b in os.environ["BLOCKS"].split()]
OUT = os.environ["BENCH_OUT"]
F_SETPIPE_SZ = 1031


def die(msg):
    print(f"bench-channel: {msg}", file=sys.stderr)
    try:
        print("--- end of the guest console ---\n" + open(CONSOLE, errors="replace").read()[-3000:], file=sys.stderr)
    except OSError:
        pass
    sys.exit(1)


sh = GuestShell(SOCK, 180, die)
port = sh.run("for p in /sys/class/virtio-ports/*; do [ \"$(cat $p/name)\" = trace-path-cpu0 ] && echo /dev/${p##*/}; done")[1].strip()
if not port.startswith("/dev/vport"):
    die(f"no trace-path-cpu0 port in the guest: {port!r}")
fifo = os.path.join(ROOT, DOM, "trace-path-cpu0.out")


def raw(block):
    """Guest dd -> port -> QEMU -> FIFO -> host reader: (host MB/s, guest MB/s, host s, guest s)."""
    total = RAW_MB << 20
    count = total // block
    total = count * block
    got = {"n": 0, "first": None, "last": None}
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass
    # Whatever a previous run left in the FIFO goes first.
    try:
        while os.read(fd, 1 << 20):
            pass
    except BlockingIOError:
        pass
    os.set_blocking(fd, True)

    def reader():
        while got["n"] < total:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            now = time.monotonic()
            if got["first"] is None:
                got["first"] = now
            got["n"] += len(b)
            got["last"] = now

    t = threading.Thread(target=reader)
    t.start()
    t0 = time.monotonic()
    rc, out = sh.run(f"t0=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/zero of={port} bs={block} count={count} 2>/dev/null; "
                     f"t1=$(cut -d' ' -f1 /proc/uptime); echo GUEST $t0 $t1", timeout=900)
    t_dd_done = time.monotonic()
    t.join(120)
    os.close(fd)
    if got["n"] < total:
        die(f"the host read {got['n']} of {total} bytes")
    g = [l for l in out.splitlines() if l.startswith("GUEST")][-1].split()
    guest_s = float(g[2]) - float(g[1])
    host_s = got["last"] - got["first"]
    return {"block": block, "bytes": total, "host_s": host_s, "guest_s": guest_s,
            "host_mbs": total / 1e6 / host_s, "guest_mbs": total / 1e6 / guest_s if guest_s > 0 else None,
            "first_byte_after_s": got["first"] - t0, "last_byte_after_dd_s": got["last"] - t_dd_done}


def tvctl_run():
    out = os.path.join(OUT, "channel.dat")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([TVCTL, "--dir", ROOT, "--json", "trace", DOM, "-e", "sched:sched_switch",
                        "--duration", str(DURATION), "-o", out], capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        die(f"tvctl exited {p.returncode}: {p.stderr[-2000:]}")
    s = json.loads(p.stdout)
    cpu0 = [c for c in s["cpus"] if c["cpu"] == 0][0]
    host_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    os.unlink(out)
    return {"bytes": cpu0["bytes"], "duration_s": s["duration_s"], "mbs": cpu0["bytes"] / 1e6 / s["duration_s"],
            "host_cpu_s": host_cpu, "ms_per_mb": 1000 * host_cpu / (cpu0["bytes"] / 1e6), "complete": s["complete"]}


def disk():
    """The host's own buffered write rate into OUT (tvctl writes its data files there)."""
    path = os.path.join(OUT, "ddtest")
    t = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", "count=2048"], check=True,
                   capture_output=True)
    s = time.monotonic() - t
    os.unlink(path)
    return {"host_mbs": 2048 * 1048576 / 1e6 / s}


results = []
for r in range(ROUNDS):
    order = ["tvctl", "disk"] + [f"raw{b}" for b in BLOCKS]
    if r % 2:
        order.reverse()
    for what in order:
        res = tvctl_run() if what == "tvctl" else disk() if what == "disk" else raw(int(what[3:]))
        res.update(round=r + 1, what=what)
        results.append(res)
        print(f"  round {r + 1} {what}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                    for k, v in res.items() if k not in ("round", "what")), flush=True)
json.dump(results, open(os.path.join(OUT, "results.json"), "w"), indent=1)


def mmm(xs):
    xs = sorted(xs)
    return f"{xs[0]:.1f} / {statistics.median(xs):.1f} / {xs[-1]:.1f}"


print("\n| path | MB/s on the host (min / median / max) | guest dd's own MB/s | host CPU ms/MB |")
print("| --- | --- | --- | --- |")
for b in BLOCKS:
    rs = [x for x in results if x["what"] == f"raw{b}"]
    print(f"| guest dd bs={b} → FIFO → host reader | {mmm([x['host_mbs'] for x in rs])} | "
          f"{mmm([x['guest_mbs'] for x in rs if x['guest_mbs']])} | |")
dk = [x for x in results if x["what"] == "disk"]
print(f"| host dd bs=1M into {OUT} (no channel) | {mmm([x['host_mbs'] for x in dk])} | | |")
ts = [x for x in results if x["what"] == "tvctl"]
print(f"| tvctl, synthetic pages | {mmm([x['mbs'] for x in ts])} | | {mmm([x['ms_per_mb'] for x in ts])} |")
best = {r: max(x["host_mbs"] for x in results if x["round"] == r and x["what"].startswith("raw")) for r in range(1, ROUNDS + 1)}
fs = {r: [x["host_mbs"] for x in results if x["round"] == r and x["what"] == "disk"][0] for r in range(1, ROUNDS + 1)}
ratios = [x["mbs"] / best[x["round"]] for x in ts]
rs = sorted(ratios)
print(f"\ntvctl / best raw dd in the same round: {rs[0]:.2f} / {statistics.median(rs):.2f} / {rs[-1]:.2f} "
      f"(min / median / max; target >= 0.90)")
rs = sorted(x["mbs"] / min(best[x["round"]], fs[x["round"]]) for x in ts)
print(f"tvctl / min(best raw dd, the folder's own write rate): {rs[0]:.2f} / {statistics.median(rs):.2f} / {rs[-1]:.2f}")
PY

#!/usr/bin/env bash
# tvctl side by side with trace-cmd (issue 11): the same guest image, the same workloads, runs
# interleaved in rounds, per figure min/median/max and the within-round ratios tvctl/trace-cmd.
# Results go to docs/BENCHMARKS.md ("5. Side by side with trace-cmd") by hand.
#
# Tools, on one booted guest (built-in guest, 2 vCPUs, 512 MiB, initrd-peer.img = the normal
# initramfs + the host's trace-cmd and its libraries + virtio_net, QEMU user networking):
#   tvctl     host: tvctl --json trace DOM -e EV -b KB -o F -- /bin/sh -c W
#   tc-net    host: trace-cmd listen -p PORT -d DIR (one per run, to get its CPU time)
#             guest: trace-cmd record -N 10.0.2.2:PORT -t -e EV -b KB /bin/sh -c W
#   tc-local  guest: trace-cmd record -e EV -b KB -o /tmp/bp/t.dat /bin/sh -c W
# Workloads (W, the same text for every tool):
#   W1  -e sched:        N fork+exec of /bin/true (N calibrated to ~5 s untraced unless given)
#   W2  -e raw_syscalls: dd if=/dev/zero of=/dev/null bs=1 count=M
#   ladder: W2 at several counts with the default ring buffer (no -b), events lost.
# How each figure is measured is printed with the results (and in docs/BENCHMARKS.md §5).
#
# Usage: scripts/bench-peer.sh [PAIRS] [W1_N|auto] [W2_COUNT]
# Env: PAIRS (3), W1_N (auto), W2_COUNT (300000), LADDER ("30000 100000 300000"; "" = none),
#      BENCH_PEER_OUT (results folder, default /var/tmp/tvctl-bench-peer/<UTC time>),
#      KEEP_DAT=1 keeps the trace files.
# The guest is built into its own folder (TVCTL_GUEST_DIR, default
# /var/lib/libvirt/images/tvctl-bench-peer), so the image other tests boot is not replaced.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
export PAIRS=${1:-${PAIRS:-3}}
export W1_N=${2:-${W1_N:-auto}}
export W2_COUNT=${3:-${W2_COUNT:-300000}}
export LADDER=${LADDER-30000 100000 300000}
export BENCH_PEER_OUT=${BENCH_PEER_OUT:-/var/tmp/tvctl-bench-peer/$(date -u +%Y%m%dT%H%M%SZ)}
export TVCTL_GUEST_DIR=${TVCTL_GUEST_DIR:-/var/lib/libvirt/images/tvctl-bench-peer}
dom=tvctl-bench-peer
root=/var/lib/tvctl-bench
lab=/var/lib/tvctl-lab/$dom
uri=qemu:///system
tvctl=target/release/tvctl

die() { echo "bench-peer: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
command -v python3 >/dev/null || die "python3 missing"
[ -x /usr/bin/trace-cmd ] || die "/usr/bin/trace-cmd missing (apt-get install trace-cmd)"
[ "$PAIRS" -ge 1 ] 2>/dev/null || die "PAIRS must be a number >= 1 (got '$PAIRS')"

scripts/install-deps.sh >/dev/null
cargo build --quiet --release --bin tvctl
TVCTL_GUEST_PEER=1 scripts/build-guest.sh >/dev/null
for f in vmlinuz initrd-peer.img; do
  [ -f "$TVCTL_GUEST_DIR/$f" ] || die "$TVCTL_GUEST_DIR/$f missing after build-guest.sh"
done

# A fresh bench domain every time: the built-in guest's XML + the shell port + a user NIC.
mkdir -p "$BENCH_PEER_OUT"
trap 'virsh -c "$uri" destroy "$dom" >/dev/null 2>&1 || true' EXIT
. scripts/lib/bench-domain.sh
bench_boot "$dom" 2 "$TVCTL_GUEST_DIR/initrd-peer.img" "tvctl.shell=1 tvctl.net=1" \
  "<interface type='user'><model type='virtio'/></interface>"
echo "bench-peer: $dom booted (console $lab/console.log); results in $BENCH_PEER_OUT"

PYTHONPATH="$top/scripts/lib" python3 - "$dom" "$lab/shell.sock" "$root" "$top/$tvctl" "$lab/console.log" <<'PY'
import json, os, re, shlex, signal, socket, statistics, subprocess, sys, time, base64

DOM, SOCK, ROOT, TVCTL, CONSOLE = sys.argv[1:6]
OUT = os.environ["BENCH_PEER_OUT"]
PAIRS = int(os.environ["PAIRS"])
W1_N = os.environ["W1_N"]
W2_COUNT = int(os.environ["W2_COUNT"])
LADDER = [int(x) for x in os.environ["LADDER"].split()]
KEEP_DAT = os.environ.get("KEEP_DAT") == "1"
HZ = 100  # USER_HZ on x86_64: /proc/<pid>/stat times are in 1/100 s
T_START = time.time()


def die(msg):
    print(f"bench-peer: {msg}", file=sys.stderr)
    try:
        print("--- end of the guest console ---\n" + open(CONSOLE, errors="replace").read()[-3000:], file=sys.stderr)
    except OSError:
        pass
    sys.exit(1)


from guestshell import GuestShell as _Shell  # scripts/lib, on PYTHONPATH


def GuestShell(path, timeout):
    return _Shell(path, timeout, die)


# One line per sample, with builtins only (no fork: W's own CPU stays W's, and the sample costs
# the same for every tool): uptime; utime+stime of tvctl-agent; utime+stime+cutime+cstime of
# every trace-cmd process; utime stime cutime cstime of the calling shell ($$); and, in ns, the
# run time of every thread of tvctl-agent and of the trace-cmd processes (schedstat's first
# field), which has no 10 ms tick truncation per process.
SAMPLER = r'''
bp_sample() {
  bp_tag=$1
  read -r bp_up bp_idle < /proc/uptime
  bp_ag=0; bp_tc=0; bp_agns=0; bp_tcns=0
  for bp_f in /proc/[0-9]*/stat; do
    read -r bp_l 2>/dev/null < $bp_f || continue
    set -- $bp_l
    bp_pid=$1
    case "$2" in
      "(tvctl-agent)") bp_ag=$((bp_ag + ${14} + ${15})) ;;
      "(trace-cmd)") bp_tc=$((bp_tc + ${14} + ${15} + ${16} + ${17})) ;;
      *) continue ;;
    esac
    bp_ns=0
    for bp_s in /proc/$bp_pid/task/*/schedstat; do
      read -r bp_t bp_rest 2>/dev/null < $bp_s && bp_ns=$((bp_ns + bp_t))
    done
    case "$2" in
      "(tvctl-agent)") bp_agns=$((bp_agns + bp_ns)) ;;
      *) bp_tcns=$((bp_tcns + bp_ns)) ;;
    esac
  done
  read -r bp_l < /proc/$$/stat
  set -- $bp_l
  echo "$bp_up $bp_ag $bp_tc ${14} ${15} ${16} ${17} $bp_agns $bp_tcns" > /tmp/bp/$bp_tag
}
# After tvctl exits the agent still tears its instance down: 'post' is the last sample before
# the first second in which the agent used at most 3 ticks (at most 30 s).
bp_settle() {
  bp_sample post
  read -r bp_l < /tmp/bp/post; set -- $bp_l; bp_prev=$2; bp_n=0
  while [ $bp_n -lt 30 ]; do
    sleep 1
    bp_sample settle
    read -r bp_l < /tmp/bp/settle; set -- $bp_l
    [ $(($2 - bp_prev)) -le 3 ] && break
    mv /tmp/bp/settle /tmp/bp/post
    bp_prev=$2; bp_n=$((bp_n + 1))
  done
}
'''


def w1(n):
    return f". /tmp/bp/s.sh; bp_sample start; i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done; bp_sample end"


def w2(m):
    return f". /tmp/bp/s.sh; bp_sample start; dd if=/dev/zero of=/dev/null bs=1 count={m} 2>/dev/null; bp_sample end"


def samples(sh):
    """The samples of the last run, as dicts; 'tree' is the wrapper's /proc stat (trace-cmd)."""
    _, out = sh.run("for f in pre start end post tree; do [ -f /tmp/bp/$f ] && echo \"$f $(cat /tmp/bp/$f)\"; done; true")
    got = {}
    for line in out.splitlines():
        f = line.split()
        if not f:
            continue
        if f[0] == "tree":
            st = f[1:]
            got["tree"] = {"cutime": int(st[15]), "cstime": int(st[16])}
        elif f[0] in ("pre", "start", "end", "post"):
            up, ag, tc, u, s, cu, cs = f[1:8]
            agns, tcns = (f[8:10] + ["0", "0"])[:2]
            got[f[0]] = {"up": float(up), "ag": int(ag), "tc": int(tc), "self": int(u) + int(s) + int(cu) + int(cs),
                         "agns": int(agns), "tcns": int(tcns)}
    for k in ("pre", "start", "end", "post"):
        if k not in got:
            die(f"sample '{k}' missing (did W run?): {out!r}")
    return got


EV_LINE = re.compile(r"\[\d+\]\s+\d+\.\d+:\s+\S+:")
DROPPED = re.compile(r"CPU:\d+ \[(\d+ )?EVENTS DROPPED\]")


def judge(path):
    """Counts a trace file with the host's trace-cmd report: event lines, dropped-event marks,
    buffer stats (overrun + dropped events, when the file has them), ring-buffer data bytes."""
    p = subprocess.Popen(["trace-cmd", "report", path], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, errors="replace")
    events = dropped = dropped_unknown = 0
    for line in p.stdout:
        if EV_LINE.search(line):
            events += 1
        else:
            m = DROPPED.search(line)
            if m:
                if m.group(1):
                    dropped += int(m.group(1))
                else:
                    dropped_unknown += 1
    # A damaged file is a result, not a reason to stop: trace-cmd listen stops its readers 1 s
    # after the client's end, and data still in flight is cut (partial pages; report may crash
    # on them). The events read before the crash are counted and the run is marked.
    report_rc = p.wait()
    if report_rc != 0:
        print(f"  warning: trace-cmd report {path} exited {report_rc} after {events} events", flush=True)
    st = subprocess.run(["trace-cmd", "report", "--stat", path], capture_output=True, text=True, errors="replace").stdout
    stats = None
    if "No stats in this file" not in st:
        stats = sum(int(x) for x in re.findall(r"^(?:overrun|dropped events): (\d+)", st, re.M))
    sizes = [int(x) for x in re.findall(r"^\s+(\d+) bytes in size", st, re.M)]
    data = sum(sizes)
    dump = subprocess.run(["trace-cmd", "dump", "--summary", path], capture_output=True, text=True, errors="replace").stdout
    clock = re.search(r'"(\w[\w-]*)" clock', dump)
    lost = max(stats or 0, dropped)
    return {"events": events, "lost": lost, "lost_marks": dropped, "lost_marks_unknown": dropped_unknown,
            "lost_stats": stats, "data_bytes": data, "file_bytes": os.path.getsize(path),
            "clock": clock.group(1) if clock else "?", "report_rc": report_rc,
            "partial_pages": sum(1 for x in sizes if x % 4096)}


def guest_split(s, tool):
    """Guest CPU (s) and wall (s) at start-up / window / stop from the samples."""
    pre, start, end, post = s["pre"], s["start"], s["end"], s["post"]
    r = {"wall_startup": start["up"] - pre["up"], "wall_window": end["up"] - start["up"],
         "wall_stop": post["up"] - end["up"], "w_cpu": end["self"] / HZ}
    if tool == "tvctl":
        r["cpu_startup"] = (start["ag"] - pre["ag"]) / HZ
        r["cpu_window"] = (end["ag"] - start["ag"]) / HZ
        r["cpu_stop"] = (post["ag"] - end["ag"]) / HZ
        r["cpu_window_ns"] = (end["agns"] - start["agns"]) / 1e9
    else:
        # The wrapper's children times = trace-cmd's whole tree, W included; W's own share is
        # what W read of itself at its end.
        tree = (s["tree"]["cutime"] + s["tree"]["cstime"]) / HZ
        total = tree - end["self"] / HZ
        r["cpu_startup"] = start["tc"] / HZ
        r["cpu_window"] = (end["tc"] - start["tc"]) / HZ
        r["cpu_stop"] = total - end["tc"] / HZ
        r["tree_cpu"] = tree
        # Every trace-cmd process lives through W (the recorders start before, end after).
        r["cpu_window_ns"] = (end["tcns"] - start["tcns"]) / 1e9
    return r


def add_per_event(r):
    ev = r["events"]
    r["cpu_total"] = r["cpu_startup"] + r["cpu_window"] + r["cpu_stop"]
    # Interrupt and softirq work (virtio-net, TCP, virtio-serial) is billed to whatever task
    # runs, often W: the tool's cost partly shows up as W's own CPU.
    r["cpu_tool_w"] = r["cpu_total"] + r["w_cpu"]
    r["us_per_event_ws"] = (r["cpu_window"] + r["cpu_stop"]) / ev * 1e6 if ev else float("nan")
    r["us_per_event_all"] = r["cpu_total"] / ev * 1e6 if ev else float("nan")
    mb = r["data_bytes"] / 1e6
    r["host_ms_per_mb"] = r["host_cpu"] / mb * 1e3 if (mb and r.get("host_cpu") is not None) else float("nan")
    return r


def wait4(proc, timeout=None):
    """Reaps proc and returns its CPU time (user + system, all threads and reaped children).
    With a timeout, a process still there after it is killed (its time still counts)."""
    deadline = time.time() + timeout if timeout else None
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG if deadline else 0)
        if pid:
            break
        if time.time() > deadline:
            print(f"bench-peer: pid {proc.pid} still running {timeout} s after SIGINT: killed", file=sys.stderr)
            proc.kill()
            deadline = None
        else:
            time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ru.ru_utime + ru.ru_stime


LIBVIRT_RETRIES = []


def libvirt_back(timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        if subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode == 0:
            return True
        time.sleep(1)
    return False


def run_tvctl(sh, tag, ev, buf, w):
    out = f"{OUT}/{tag}.dat"
    argv = [TVCTL, "--dir", ROOT, "--json", "trace", DOM, "-e", ev] + (["-b", str(buf)] if buf else []) \
        + ["-o", out, "--", "/bin/sh", "-c", w]
    for attempt in range(1, 4):
        sh.run(". /tmp/bp/s.sh; rm -f /tmp/bp/start /tmp/bp/end /tmp/bp/post /tmp/bp/tree; bp_sample pre")
        with open(f"{OUT}/{tag}.json", "w") as jo, open(f"{OUT}/{tag}.stderr", "w") as je:
            p = subprocess.Popen(argv, stdout=jo, stderr=je)
            host = wait4(p)
        # Exit 3: libvirtd was not reachable (other sessions' tests restart it); nothing ran in
        # the guest. Wait for it and run again; counted in the results.
        if p.returncode == 3 and attempt < 3:
            LIBVIRT_RETRIES.append(tag)
            print(f"  {tag}: libvirtd not reachable (tvctl exit 3): waiting for it, then again", flush=True)
            if not libvirt_back():
                die("libvirtd did not come back within 120 s")
            continue
        break
    if p.returncode != 0:
        die(f"{shlex.join(argv)} exited {p.returncode}:\n{open(f'{OUT}/{tag}.stderr').read()[-2000:]}")
    sh.run(". /tmp/bp/s.sh; bp_settle")
    js = json.load(open(f"{OUT}/{tag}.json"))
    r = {"tool": "tvctl", "host_cpu": host, "attempts": attempt, "json_events": js["total_events"], "json_lost": js["total_lost_events"],
         "buffer_kb": js.get("buffer_kb"), "command": shlex.join(argv)}
    r.update(guest_split(samples(sh), "tvctl"))
    r.update(judge(out))
    r["lost_file"] = r["lost"]
    r["lost"] = js["total_lost_events"]
    r["clock"] = js.get("clock", "?")  # a v6 file names no clock
    if not KEEP_DAT:
        os.unlink(out)
    return add_per_event(r)


def listening(port):
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            for line in open(f).readlines()[1:]:
                x = line.split()
                if int(x[1].rsplit(":", 1)[1], 16) == port and x[3] == "0A":
                    return True
        except OSError:
            pass
    return False


PORT = [19100]


LISTEN_FAILURES = []


def run_tc(sh, tag, ev, buf, w, mode):
    """trace-cmd in the guest. In network mode trace-cmd listen gives up on a client that is
    silent for 5 s (MSG_WAIT_MSEC in its trace-msg.c, no option): that happens in a slow guest;
    such a run is counted and repeated, at most 3 times."""
    for attempt in range(1, 4):
        r = run_tc_once(sh, tag if attempt == 1 else f"{tag}-try{attempt}", ev, buf, w, mode)
        if r is not None:
            r["attempts"] = attempt
            return r
    die(f"{tag}: trace-cmd listen failed 3 times: {LISTEN_FAILURES[-3:]}")


def run_tc_once(sh, tag, ev, buf, w, mode):
    bufarg = f" -b {buf}" if buf else ""
    evarg = f" -e {ev}"
    listen = None
    if mode == "net":
        PORT[0] += 1
        port = PORT[0]
        ldir = f"{OUT}/{tag}-listen"
        os.makedirs(ldir)
        largv = ["trace-cmd", "listen", "-p", str(port), "-d", ldir]
        llog = open(f"{OUT}/{tag}-listen.log", "w")
        listen = subprocess.Popen(largv, stdout=llog, stderr=llog)
        t = time.time()
        while not listening(port):
            if listen.poll() is not None or time.time() - t > 30:
                die(f"trace-cmd listen -p {port} did not start: {open(llog.name).read()}")
            time.sleep(0.1)
        rec = f"trace-cmd record -N 10.0.2.2:{port} -t{evarg}{bufarg} /bin/sh -c {shlex.quote(w)}"
    else:
        rec = f"trace-cmd record{evarg}{bufarg} -o /tmp/bp/t.dat /bin/sh -c {shlex.quote(w)}"
    wrapper = f"""cd /tmp/bp
{rec} > /tmp/bp/tc.log 2>&1
echo $? > /tmp/bp/tc.rc
read -r l < /proc/$$/stat
echo "$l" > /tmp/bp/tree
"""
    sh.run(f"rm -f /tmp/bp/start /tmp/bp/end /tmp/bp/post /tmp/bp/tree /tmp/bp/t.dat*; cat > /tmp/bp/tc.sh <<'BP_EOF'\n{wrapper}BP_EOF")
    sh.run(". /tmp/bp/s.sh; bp_sample pre; sh /tmp/bp/tc.sh; bp_sample post")
    _, rc = sh.run("cat /tmp/bp/tc.rc")
    if rc.strip() != "0":
        _, log = sh.run("cat /tmp/bp/tc.log", ok=False)
        die(f"guest: {rec} exited {rc.strip()}:\n{log[-2000:]}")
    s = samples(sh)
    r = {"tool": f"tc-{mode}", "command": rec}
    if mode == "net":
        # The client is done; wait until listen's child has written the file and exited, then
        # stop listen and take its CPU time (its children's included: it reaps them).
        t = time.time()
        while True:
            kids = open(f"/proc/{listen.pid}/task/{listen.pid}/children").read().split()
            if not kids and os.listdir(ldir):
                break
            if time.time() - t > 120:
                die(f"trace-cmd listen still busy 120 s after the guest finished ({ldir})")
            time.sleep(0.2)
        listen.send_signal(signal.SIGINT)
        r["host_cpu"] = wait4(listen, 20)
        r["listen_command"] = shlex.join(largv)
        files = [f"{ldir}/{f}" for f in os.listdir(ldir)]
        if len(files) != 1:
            die(f"expected one file from trace-cmd listen in {ldir}, found {files}")
        path = files[0]
        log = open(f"{OUT}/{tag}-listen.log", errors="replace").read()
        bad = [l for l in log.splitlines() if "reading client" in l or "timed out" in l.lower()]
        if bad or os.path.getsize(path) == 0:
            why = bad[0] if bad else "empty file"
            LISTEN_FAILURES.append({"tag": tag, "why": why, "file_bytes": os.path.getsize(path)})
            print(f"  {tag}: trace-cmd listen failed ({why}, file {os.path.getsize(path)} bytes): again", flush=True)
            return None
    else:
        # After the measurement: copy the file to the host (base64 through the shell) and count
        # it there; trace-cmd report in the guest takes minutes under TCG.
        path = f"{OUT}/{tag}.dat"
        _, size = sh.run("stat -c %s /tmp/bp/t.dat")
        _, b64 = sh.run("base64 /tmp/bp/t.dat", timeout=900)
        data = base64.b64decode("".join(b64.split()))
        if len(data) != int(size):
            die(f"copy of the guest's t.dat: {len(data)} bytes, guest says {size.strip()}")
        open(path, "wb").write(data)
        sh.run("rm -f /tmp/bp/t.dat")
        r["host_cpu"] = None
    r.update(guest_split(s, "tc"))
    r.update(judge(path))
    if not KEEP_DAT:
        os.unlink(path)
    return add_per_event(r)


def fmt(x, nd=2):
    if x is None or x != x:
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:,.0f}".replace(",", " ")
    return f"{x:.{nd}f}"


FIGURES = [
    ("cpu_startup", "guest CPU start-up (s)", 2),
    ("cpu_window", "guest CPU window (s)", 2),
    ("cpu_window_ns", "guest CPU window, schedstat ns (s)", 3),
    ("cpu_stop", "guest CPU stop (s)", 2),
    ("us_per_event_ws", "(window+stop) µs/event", 2),
    ("us_per_event_all", "whole run µs/event", 2),
    ("host_ms_per_mb", "host CPU ms/MB", 1),
    ("host_cpu", "host CPU (s)", 2),
    ("events", "events", 0),
    ("lost", "lost", 0),
    ("data_bytes", "ring-buffer data (MB)", 2),
    ("file_bytes", "file size (MB)", 2),
    ("wall_startup", "wall start-up (s)", 1),
    ("wall_window", "wall window = W (s)", 1),
    ("wall_stop", "wall stop (s)", 1),
    ("w_cpu", "W's own CPU (s)", 2),
    ("cpu_tool_w", "tool + W guest CPU (s)", 2),
]
TOOLS = ["tvctl", "tc-net", "tc-local"]


def val(r, key):
    v = r.get(key)
    if v is None:
        return None
    if key in ("data_bytes", "file_bytes"):
        return v / 1e6
    return v


def mmm(xs, nd):
    xs = [x for x in xs if x is not None and x == x]
    if not xs:
        return "n/a"
    return " / ".join(fmt(x, nd) for x in (min(xs), statistics.median(xs), max(xs)))


def table(rounds, title):
    lines = [f"#### {title}", "",
             "| figure | tvctl min / med / max | trace-cmd -N min / med / max | trace-cmd local min / med / max "
             "| tvctl/-N min / med / max | tvctl/local min / med / max |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for key, name, nd in FIGURES:
        cells = [mmm([val(rd[t], key) for rd in rounds if t in rd], nd) for t in TOOLS]
        for other in ("tc-net", "tc-local"):
            ratios = []
            for rd in rounds:
                a, b = val(rd["tvctl"], key), val(rd[other], key)
                if a is not None and b:
                    ratios.append(a / b)
            cells.append(mmm(ratios, 2))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def damage(r):
    d = []
    if r.get("partial_pages"):
        d.append(f"{r['partial_pages']} CPU(s) end in a partial page")
    if r.get("report_rc"):
        d.append(f"report exited {r['report_rc']}")
    if r.get("attempts", 1) > 1:
        d.append(f"attempt {r['attempts']}")
    return "; ".join(d) or "ok"


def runs_table(rounds, title):
    lines = [f"#### {title}: every run", "",
             "| round | tool | order | CPU start-up / window / stop (s) | events (tvctl's JSON) | lost | events + lost | data MB | file MB | host CPU (s) | wall start-up / W / stop (s) | clock | file |",
             "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for i, rd in enumerate(rounds, 1):
        for t in TOOLS:
            if t not in rd:
                continue
            r = rd[t]
            lines.append(f"| {i} | {t} | {r['order']} | {fmt(r['cpu_startup'])} / {fmt(r['cpu_window'])} / {fmt(r['cpu_stop'])} "
                         f"| {r['events']}{' (' + str(r['json_events']) + ')' if 'json_events' in r else ''} | {r['lost']} | {r['events'] + r['lost']} | {fmt(r['data_bytes']/1e6)} | {fmt(r['file_bytes']/1e6)} "
                         f"| {fmt(r.get('host_cpu'))} | {fmt(r['wall_startup'],1)} / {fmt(r['wall_window'],1)} / {fmt(r['wall_stop'],1)} | {r['clock']} | {damage(r)} |")
    return "\n".join(lines) + "\n"


def run_one(sh, tool, tag, ev, buf, w):
    t = time.time()
    if tool == "tvctl":
        r = run_tvctl(sh, tag, ev, buf, w)
    else:
        r = run_tc(sh, tag, ev, buf, w, tool[3:])
    r["elapsed"] = time.time() - t
    print(f"  {tag}: {r['events']} events, {r['lost']} lost, guest CPU {r['cpu_startup']:.2f}/{r['cpu_window']:.2f}/"
          f"{r['cpu_stop']:.2f} s, host CPU {fmt(r.get('host_cpu'))} s, {r['elapsed']:.0f} s", flush=True)
    return r


def rounds_of(sh, name, ev, buf, w, n, tools=TOOLS):
    rounds = []
    for i in range(n):
        # Rotate the order each round, so no tool always runs first (or after the same one).
        order = tools[i % len(tools):] + tools[:i % len(tools)]
        rd = {}
        for k, tool in enumerate(order, 1):
            rd[tool] = run_one(sh, tool, f"{name}-r{i+1}-{tool}", ev, buf, w)
            rd[tool]["order"] = k
        rounds.append(rd)
    return rounds


sh = GuestShell(SOCK, 600)
sh.run(f"mkdir -p /tmp/bp; cat > /tmp/bp/s.sh <<'BP_EOF'\n{SAMPLER}BP_EOF")
# The same ring-buffer clock for both tools: tvctl's instances start with the kernel's default
# (local); trace-cmd records with whatever the top-level buffer has.
sh.run("echo local > /sys/kernel/tracing/trace_clock")
_, guest_info = sh.run("uname -r; grep -c ^processor /proc/cpuinfo; trace-cmd --version 2>&1 | grep '^trace-cmd version'; "
                       "mkdir /sys/kernel/tracing/instances/bp-default; cat /sys/kernel/tracing/instances/bp-default/buffer_size_kb; "
                       "rmdir /sys/kernel/tracing/instances/bp-default")
gi = guest_info.split("\n")
default_kb = int(gi[3].split()[0])
print(f"guest: kernel {gi[0]}, {gi[1]} CPUs, {gi[2].strip()}, default ring buffer {default_kb} KiB per CPU")

if W1_N == "auto":
    _, out = sh.run(f"/bin/sh -c {shlex.quote(w1(50))}; cat /tmp/bp/start /tmp/bp/end")
    start_line, end_line = [l for l in out.splitlines() if l.strip()][-2:]
    per = (float(end_line.split()[0]) - float(start_line.split()[0])) / 50
    n1 = max(20, min(5000, round(5.0 / max(per, 1e-3))))
    print(f"W1 calibration: 50 fork+exec took {per*50:.2f} s untraced: N = {n1} for ~5 s")
else:
    n1 = int(W1_N)
load = open("/proc/loadavg").read().split()[:3]
doms = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--name"], capture_output=True, text=True).stdout.split()
print(f"host: load {' '.join(load)}, {len(doms)} running domains (this one included)")

# Agent idle cost: its CPU over 20 s with no session.
_, out = sh.run("a=$(pidof tvctl-agent); read u x < /proc/uptime; echo $u $(cut -d' ' -f14,15 /proc/$a/stat); sleep 20; "
                "read u x < /proc/uptime; echo $u $(cut -d' ' -f14,15 /proc/$a/stat)")
a, b = [l.split() for l in out.strip().splitlines()]
idle_pct = 100 * ((int(b[1]) + int(b[2])) - (int(a[1]) + int(a[2]))) / HZ / (float(b[0]) - float(a[0]))
print(f"tvctl-agent idle (no session): {idle_pct:.1f} % of one vCPU over {float(b[0]) - float(a[0]):.0f} s")
# Warm-up, not counted: the agent reads the guest's static metadata once per boot; trace-cmd's
# files get into the page cache.
print("warm-up (not counted):", flush=True)
warm = {t: run_one(sh, t, f"warmup-{t}", "sched", 8192, w1(5)) for t in TOOLS}

results = {"agent_idle_pct": idle_pct, "warmup": warm, "pairs": PAIRS, "w1_n": n1, "w2_count": W2_COUNT, "ladder": LADDER, "default_kb": default_kb,
           "load_before": load, "domains_running": len(doms), "w1": w1(n1), "w2": w2(W2_COUNT)}
print(f"W1 (-e sched -b 8192, {PAIRS} rounds): /bin/sh -c {shlex.quote(w1(n1))}", flush=True)
results["W1"] = rounds_of(sh, "w1", "sched", 8192, w1(n1), PAIRS)
print(f"W2 (-e raw_syscalls -b 8192, {PAIRS} rounds): /bin/sh -c {shlex.quote(w2(W2_COUNT))}", flush=True)
results["W2"] = rounds_of(sh, "w2", "raw_syscalls", 8192, w2(W2_COUNT), PAIRS)
results["ladder_runs"] = {}
for m in LADDER:
    # Default buffer: the size a new instance gets (tvctl) = what the top level is set back to
    # for trace-cmd (its -b 8192 runs left the top level at 8 MiB).
    sh.run(f"echo {default_kb} > /sys/kernel/tracing/buffer_size_kb")
    print(f"ladder: W2 count={m}, -e raw_syscalls, default buffer ({default_kb} KiB/CPU)", flush=True)
    results["ladder_runs"][m] = rounds_of(sh, f"ladder{m}", "raw_syscalls", None, w2(m), 1)
results["load_after"] = open("/proc/loadavg").read().split()[:3]
results["listen_failures"] = LISTEN_FAILURES
results["libvirt_retries"] = LIBVIRT_RETRIES
results["elapsed_s"] = time.time() - T_START
json.dump(results, open(f"{OUT}/results.json", "w"), indent=1)

every = [r for k in ("W1", "W2") for rd in results[k] for r in rd.values()] + \
        [r for rds in results["ladder_runs"].values() for rd in rds for r in rd.values()]
damaged = [f"{r['tool']} ({damage(r)})" for r in every if r.get("partial_pages") or r.get("report_rc")]
md = [f"Files with partial pages or that trace-cmd report could not read to the end: {len(damaged)} of "
      f"{len(every)}" + (": " + ", ".join(damaged) if damaged else "") + ".",
      f"Rounds: {PAIRS}; W1 N = {n1}; W2 count = {W2_COUNT}; host load before {' '.join(load)}, after "
      f"{' '.join(results['load_after'])}; {len(doms)} running domains at the start. "
      f"tvctl-agent idle (no session): {idle_pct:.1f} % of one vCPU. trace-cmd listen failures "
      f"(run repeated): {len(LISTEN_FAILURES)}" + "".join(f"; {f['tag']}: {f['why']}" for f in LISTEN_FAILURES)
      + f". tvctl runs repeated because libvirtd was restarted by someone else: {len(LIBVIRT_RETRIES)}"
      + (f" ({', '.join(LIBVIRT_RETRIES)})" if LIBVIRT_RETRIES else "") + ".", ""]
md.append(table(results["W1"], f"W1: {n1} fork+exec, -e sched -b 8192"))
md.append(table(results["W2"], f"W2: dd bs=1 count={W2_COUNT}, -e raw_syscalls -b 8192"))
md.append(runs_table(results["W1"], "W1"))
md.append(runs_table(results["W2"], "W2"))
lad = ["#### Loss ladder: W2 with -e raw_syscalls, default buffer "
       f"({default_kb} KiB per CPU), one run per tool", "",
       "| dd count | tool | events | lost | lost (%) | wall W (s) | data MB | file |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
for m, rds in results["ladder_runs"].items():
    for t in TOOLS:
        r = rds[0][t]
        pct = 100 * r["lost"] / (r["events"] + r["lost"]) if (r["events"] + r["lost"]) else 0
        lad.append(f"| {m} | {t} | {r['events']} | {r['lost']} | {pct:.1f} | {fmt(r['wall_window'],1)} | {fmt(r['data_bytes']/1e6)} | {damage(r)} |")
md.append("\n".join(lad) + "\n")
cmds = ["#### Commands (last round of each)", ""]
for name in ("W1", "W2"):
    for t in TOOLS:
        r = results[name][-1][t]
        cmds.append(f"- {name} {t}: `{r['command']}`" + (f" (host: `{r['listen_command']}`)" if r.get("listen_command") else ""))
md.append("\n".join(cmds) + "\n")
text = "\n".join(md)
open(f"{OUT}/tables.md", "w").write(text)
print()
print(text)
print(f"bench-peer: done in {results['elapsed_s']/60:.1f} min; {OUT}/results.json, {OUT}/tables.md")
PY

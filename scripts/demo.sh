#!/usr/bin/env bash
# The demo: tvctl's main job on the built-in test guest, from a fresh machine.
#   1. installs what is missing and starts libvirtd (scripts/install-deps.sh)
#   2. builds tvctl and the built-in guest (Debian's cloud kernel + busybox + tvctl-agent)
#   3. defines the domain "tvctl-demo" (2 vCPUs) if it does not exist
#   4. tvctl setup tvctl-demo       (channels + FIFOs through the libvirt API)
#   5. tvctl trace tvctl-demo ...   (boots it, records 5 s, writes tvctl-demo.dat)
#   6. shows the first lines of `trace-cmd report` and the summary, then stops the domain
# Run it again at will: every step is idempotent.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
dom=${TVCTL_DEMO_DOMAIN:-tvctl-demo}
out=${TVCTL_DEMO_OUTPUT:-$top/tvctl-demo.dat}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "installing dependencies and starting libvirtd"
scripts/install-deps.sh
if [ ! -e /sys/kernel/tracing/events/header_page ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi
step "building tvctl and the built-in guest"
cargo build --quiet --release --bin tvctl
scripts/build-guest.sh
tvctl=$top/target/release/tvctl

step "defining the domain $dom"
scripts/guest-domain.sh "$dom" 2
if virsh -c qemu:///system domstate "$dom" 2>/dev/null | grep -q running; then
  virsh -c qemu:///system destroy "$dom" >/dev/null   # boot the freshly built guest
fi

step "tvctl setup $dom"
"$tvctl" setup "$dom"

step "tvctl trace $dom -e sched:sched_switch -e 'irq:*' --duration 5 -o $out"
"$tvctl" trace "$dom" -e sched:sched_switch -e 'irq:*' --duration 5 -o "$out"

step "trace-cmd report $out | head -20"
trace-cmd report "$out" 2>/dev/null | head -20 || true

step "tvctl status $dom"
"$tvctl" status "$dom" || true
virsh -c qemu:///system destroy "$dom" >/dev/null 2>&1 || true
echo
echo "done: open $out with trace-cmd report or KernelShark; undo with: $tvctl teardown $dom"

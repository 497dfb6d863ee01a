#!/usr/bin/env bash
# The whole test suite, from a fresh clone, as root: installs what is missing, starts libvirtd,
# builds the built-in guest and the Debian guest, then runs the checks and every test tier
# (docs/testing.md):
#   fmt, clippy (host and agent builds), pure + integration tests, guest tests.
# A tier that needs libvirt or the guest fails when they are missing; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

tier() { # name, command...: must pass, or nothing after it can run
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name"
  "$@"
  echo "=== $name: $((SECONDS - t0)) s"
}
# The check tiers all run even when one fails, so one CI run shows every failure; the script
# still exits non-zero, naming the tiers that failed.
failed=()
check() { # name, command...
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name"
  if "$@"; then
    echo "=== $name: $((SECONDS - t0)) s"
  else
    echo "=== $name: FAILED after $((SECONDS - t0)) s"
    failed+=("$name")
  fi
}

tier "install dependencies" scripts/install-deps.sh
# Host tracefs: the trace.dat tests record real pages on this machine.
if [ ! -e /sys/kernel/tracing/events/header_page ]; then
  mount -t tracefs nodev /sys/kernel/tracing
fi
tier "build guest" scripts/build-guest.sh
# The Debian guest (systemd + qemu-guest-agent) of tests/guest_debian.rs; minutes once, then cached.
tier "build Debian guest" scripts/build-debian-guest.sh
check "fmt" cargo fmt --check
check "clippy (host)" cargo clippy --all-targets -- -D warnings
check "clippy (agent, no host features)" cargo clippy --no-default-features --lib --bin tvctl-agent -- -D warnings
check "unit tests" cargo test --no-fail-fast --lib --bins
# Every tests/*.rs is in exactly one of the two tiers below: guest_* boot guests, the rest do not.
integration=() guest=()
for f in tests/*.rs; do
  name=$(basename "$f" .rs)
  case "$name" in
    guest_*) guest+=(--test "$name") ;;
    *) integration+=(--test "$name") ;;
  esac
done
check "integration tests (pure + real libvirtd + host tracefs)" cargo test --no-fail-fast "${integration[@]}"
check "guest tests (boot the built-in guest)" cargo test --no-fail-fast "${guest[@]}"
check "doc tests" cargo test --doc
check "fuzz (bounded, 15 s per target)" scripts/fuzz.sh 15
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED tiers:' ; printf ' [%s]' "${failed[@]}"; echo
  exit 1
fi
echo "all tiers passed"

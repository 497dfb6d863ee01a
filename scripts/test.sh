#!/usr/bin/env bash
# The whole test suite, from a fresh clone, as root: installs what is missing, starts libvirtd,
# builds the built-in guest, then runs the checks and every test tier (docs/testing.md):
#   fmt, clippy (host and agent builds), pure + integration tests, guest tests.
# A tier that needs libvirt or the guest fails when they are missing; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

tier() { # name, command...
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name"
  "$@"
  echo "=== $name: $((SECONDS - t0)) s"
}

tier "install dependencies" scripts/install-deps.sh
# Host tracefs: the trace.dat tests record real pages on this machine.
if [ ! -e /sys/kernel/tracing/events/header_page ]; then
  mount -t tracefs nodev /sys/kernel/tracing
fi
tier "build guest" scripts/build-guest.sh
tier "fmt" cargo fmt --check
tier "clippy (host)" cargo clippy --all-targets -- -D warnings
tier "clippy (agent, no host features)" cargo clippy --no-default-features --lib --bin tvctl-agent -- -D warnings
tier "unit tests" cargo test --lib --bins
# Every tests/*.rs is in exactly one of the two tiers below: guest_* boot guests, the rest do not.
integration=() guest=()
for f in tests/*.rs; do
  name=$(basename "$f" .rs)
  case "$name" in
    guest_*) guest+=(--test "$name") ;;
    *) integration+=(--test "$name") ;;
  esac
done
tier "integration tests (pure + real libvirtd + host tracefs)" cargo test "${integration[@]}"
tier "guest tests (boot the built-in guest)" cargo test "${guest[@]}"
tier "doc tests" cargo test --doc
tier "fuzz (bounded, 15 s per target)" scripts/fuzz.sh 15
echo "all tiers passed"

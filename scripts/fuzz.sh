#!/usr/bin/env bash
# Builds the fuzz targets of fuzz/ and runs each for a bounded time or number of inputs; fails if
# any target crashes (panic, failed assertion, over-budget allocation, timeout, out of memory).
#   scripts/fuzz.sh [SECONDS_PER_TARGET | --runs N] [--jobs J] [TARGET...]
# Default: 15 s per target, every target, as many at a time as there are cores (one process
# per target; --jobs 1 runs them one after the other). Needs only the stable toolchain: the
# targets are built with rustc's SanitizerCoverage flags and linked with libFuzzer (from the
# libfuzzer-sys crate, compiled with the system's C++ compiler). Inputs that found new coverage
# are kept in fuzz/work/corpus/<target>/ for the next run; crashes land in
# fuzz/artifacts/<target>/. docs/testing.md, "Fuzzing", says how to reproduce one.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

usage() {
  echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET | --runs N] [--jobs J] [TARGET...]" >&2
  exit 2
}

limit=(-max_total_time=15)
what="15 s"
jobs=$(nproc)
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) [ $# -ge 2 ] || usage; limit=(-runs="$2"); what="$2 inputs"; shift 2 ;;
    --jobs) [ $# -ge 2 ] || usage; jobs=$2; shift 2 ;;
    -h|--help) usage ;;
    -*) usage ;;
    *[!0-9]*) targets+=("$1"); shift ;;
    *) limit=(-max_total_time="$1"); what="$1 s"; shift ;;
  esac
done
if [ ${#targets[@]} -eq 0 ]; then
  for f in fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi
for t in "${targets[@]}"; do
  [ -f "fuzz_targets/$t.rs" ] || { echo "fuzz: no target $t in fuzz/fuzz_targets/" >&2; exit 2; }
done

# --target keeps these flags off build scripts and proc macros, which run on the host unlinked
# from libFuzzer. Overflow checks and debug assertions come from fuzz/Cargo.toml's profile.
triple=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
t0=$SECONDS
cargo build --release --features libfuzzer --bins --target "$triple"
echo "fuzz: built in $((SECONDS - t0)) s; running ${targets[*]} for $what each ($jobs at a time)"
bin=${CARGO_TARGET_DIR:-$PWD/target}/$triple/release

# Each run logs to a folder of its own, so runs at the same time (two sessions, or CI beside a
# long run) never write into each other's logs; work/latest is the newest. The corpus folders
# are shared on purpose: libFuzzer only adds files to them, named by content.
run_dir=work/runs/$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$run_dir"
ln -sfn "runs/${run_dir##*/}" work/latest
# Keep the 20 newest runs' logs.
ls -1dt work/runs/*/ | tail -n +21 | xargs -r rm -rf

run_one() { # target: runs it, writes $run_dir/<target>.log and its exit code to <target>.rc
  local t=$1
  mkdir -p "work/corpus/$t" "artifacts/$t"
  # The checked-in seeds are read, never written: new inputs go to work/corpus only.
  local rc=0
  "$bin/$t" "work/corpus/$t" "corpus/$t" "${limit[@]}" \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
    >"$run_dir/$t.log" 2>&1 || rc=$?
  echo "$rc" >"$run_dir/$t.rc"
}

running=0
for t in "${targets[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then wait -n || true; running=$((running - 1)); fi
done
wait

failed=()
printf '%-10s %14s %12s %8s %9s  %s\n' target inputs inputs/s seconds corpus coverage
for t in "${targets[@]}"; do
  log=$run_dir/$t.log
  final_stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
  runs=$(final_stat number_of_executed_units)
  rate=$(final_stat average_exec_per_sec)
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 || true)
  printf '%-10s %14s %12s %8s %9s  %s\n' "$t" "${runs:-?}" "${rate:-?}" "${secs:-?}" \
    "$(find "work/corpus/$t" -type f | wc -l)" "${cov:-?}"
  if [ "$(cat "$run_dir/$t.rc")" != 0 ]; then failed+=("$t"); fi
done

for t in "${failed[@]}"; do
  echo "=== fuzz: $t FAILED (exit $(cat "$run_dir/$t.rc")); end of fuzz/$run_dir/$t.log:" >&2
  # What failed first (the panic message sits above a long backtrace), then the end.
  grep -a -m1 -A2 -e 'panicked at' -e 'tvctl-fuzz: allocation' -e 'ERROR: libFuzzer' \
    "$run_dir/$t.log" >&2 || true
  echo "..." >&2
  grep -a -v -e '^WARNING: Failed to find function' "$run_dir/$t.log" | tail -15 >&2
  crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$run_dir/$t.log" | tail -1)
  if [ -n "$crash" ]; then
    echo "reproduce: $bin/$t $PWD/$crash" >&2
    echo "  or, uninstrumented with a backtrace: cargo test --manifest-path fuzz/Cargo.toml replay" >&2
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: no crash in ${#targets[@]} targets; logs in fuzz/$run_dir"

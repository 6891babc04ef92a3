#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for TARGET_SECONDS each, one after the
# other, and prints a table of executions and crashes. Exit status 1 if any target
# crashed (its reproducer is in the artifacts directory printed in the table).
#
#   fuzz/run.sh [TARGET_SECONDS] [TARGET...]      # default: 60 s, every target
#
# Needs cargo-fuzz (installed into ~/.cache/swimlane-tools when missing, about 1.5
# minutes) and a nightly toolchain (`cargo +nightly`; without one, the default
# toolchain with RUSTC_BOOTSTRAP=1). The seed corpus in fuzz/corpus/<target> is only
# read; what the fuzzer learns goes to $SWIMLANE_FUZZ_WORK (default
# ~/.cache/swimlane-fuzz), kept between runs so a longer run picks up where the last
# one stopped. Environment: CARGO_TARGET_DIR (default ~/.cache/swimlane-target-fuzz),
# FUZZ_SANITIZER (address, the default, or none: about twice as many executions).
set -euo pipefail
cd "$(dirname "$0")"

ALL_TARGETS=(upload_body stored_records sample_codecs blob_header blob_read bus_event
  bus_records model_safetensors model_onnx auth_header)

secs="${1:-60}"
shift || true
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${ALL_TARGETS[@]}"); fi
case "$secs" in '' | *[!0-9]*) echo "TARGET_SECONDS must be a number, not '$secs'" >&2; exit 2 ;; esac

TOOLS="$HOME/.cache/swimlane-tools"
export PATH="$TOOLS/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz into $TOOLS (once per machine)"
  cargo install cargo-fuzz --locked --root "$TOOLS"
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  echo "==> no nightly toolchain: using the default one with RUSTC_BOOTSTRAP=1"
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/swimlane-target-fuzz}"
work="${SWIMLANE_FUZZ_WORK:-$HOME/.cache/swimlane-fuzz}"
sanitizer="${FUZZ_SANITIZER:-address}"
mkdir -p "$work/logs"

echo "==> building ${#targets[@]} fuzz targets (sanitizer: $sanitizer)"
for t in "${targets[@]}"; do
  "${fuzz[@]}" build -s "$sanitizer" "$t"
done

rows=()
failed=0
crashed=0
for t in "${targets[@]}"; do
  corpus="$work/corpus/$t"
  artifacts="$work/artifacts/$t"
  log="$work/logs/$t.log"
  mkdir -p "$corpus" "$artifacts"
  before=$(find "$artifacts" -type f | wc -l)
  echo "==> $t for ${secs}s (log: $log)"
  set +e
  "${fuzz[@]}" run -s "$sanitizer" "$t" "$corpus" "corpus/$t" -- \
    -max_total_time="$secs" -artifact_prefix="$artifacts/" -print_final_stats=1 \
    -rss_limit_mb=2048 -timeout=30 >"$log" 2>&1
  rc=$?
  set -e
  execs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log" | tail -1)
  if [ -z "$execs" ]; then
    execs=$(grep -o 'Done [0-9]* runs' "$log" | awk '{print $2}' | tail -1)
  fi
  after=$(find "$artifacts" -type f | wc -l)
  crashes=$((after - before))
  status=ok
  if [ "$rc" -ne 0 ] || [ "$crashes" -gt 0 ]; then
    status="FAILED (exit $rc; see $log and $artifacts)"
    failed=1
    crashed=$((crashed + 1))
  fi
  rows+=("$(printf '%-18s %8s %14s %8s  %s' "$t" "$secs" "${execs:-?}" "$crashes" "$status")")
done

echo
printf '%-18s %8s %14s %8s  %s\n' target seconds executions crashes status
for r in "${rows[@]}"; do echo "$r"; done
echo "fuzz: $((${#targets[@]} - crashed)) passed, $crashed failed"
exit "$failed"

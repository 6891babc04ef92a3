#!/usr/bin/env bash
# Where the pipeline's CPU goes, per worker process: `swimlane bench pipeline` on the
# embedded bus with `perf record` attached to each worker as it starts, then
# bench/profile_classify.py over the recordings (training and scoring against
# everything else, by the stacks each sample is in).
#
#   bench/profile_pipeline.sh                         # 300 users, 1 trainer
#   bench/profile_pipeline.sh --users 96 --trainers 2 # any `bench pipeline` flags
#   CORRECTIONS=1000 bench/profile_pipeline.sh         # corrections a user (250)
#   LEAF=1 bench/profile_pipeline.sh                   # leaves only (below)
#
# The call graphs (perf's dwarf unwinding, 16 kB of stack copied a sample) say on whose
# behalf the time is spent but inflate what they measure: ingest's burst CPU doubled
# under them (bench/README.md, "Session sixteen"). With LEAF=1 the workers are recorded
# without call graphs at a higher rate, and bench/profile_leaves.py prints each kind of
# worker's functions by samples instead of the parts below.
#
# Needs `perf` (Debian: `linux-perf`) and permission to profile one's own processes
# (`kernel.perf_event_paranoid` <= 2; kernel frames need root or <= 1). Writes the
# recordings and the bench's JSON to bench/out/profile/ (gitignored).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "perf is missing (Debian: apt-get install linux-perf)" >&2; exit 1; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/swimlane-target}
echo "== building swimlane (release)" >&2
cargo build --release -q -p swimlane
BIN=$CARGO_TARGET_DIR/release/swimlane
OUT=bench/out/profile
rm -rf "$OUT" && mkdir -p "$OUT"
args=("$@")
[[ " ${args[*]-} " == *" --users "* ]] || args+=(--users 300)
[[ " ${args[*]-} " == *" --trainers "* ]] || args+=(--trainers 1)
# One model thread, as the workers run on this 2-core machine (candle's second thread
# spins otherwise).
RAYON_NUM_THREADS=1 "$BIN" bench pipeline --bus embedded --corrections "${CORRECTIONS:-250}" --paced 0 --json \
  "${args[@]}" >"$OUT/bench.json" 2>"$OUT/bench.log" &
bench=$!
declare -A seen=()
# Attach to each worker as soon as it exists (before its first upload arrives).
while kill -0 "$bench" 2>/dev/null; do
  for p in $(pgrep -f "^$BIN worker " || true); do
    [ -n "${seen[$p]-}" ] && continue
    seen[$p]=1
    kind=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | awk '{print $3}') || continue
    if [ "${LEAF:-0}" = 1 ]; then
      perf record -q -F 1999 -p "$p" -o "$OUT/$kind-$p.data" >/dev/null 2>&1 &
    else
      perf record -q -F 499 --call-graph dwarf,16384 -p "$p" -o "$OUT/$kind-$p.data" \
        >/dev/null 2>&1 &
    fi
  done
  sleep 0.02
done
wait "$bench" || { cat "$OUT/bench.log" >&2; exit 1; }
wait
if [ "${LEAF:-0}" = 1 ]; then
  python3 bench/profile_leaves.py "$OUT"/*.data
else
  python3 bench/profile_classify.py "$OUT"/*.data
fi
python3 - "$OUT/bench.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["runs"]:
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["burst_cpu_seconds"].items()))
    print(f"bench, {r['trainers']} trainer(s): {r['cpu_ms_per_user']} ms of CPU a user; "
          f"outside training and scoring by the CPU counters {r['cpu_outside_model_share']:.1%}; "
          f"burst CPU s: {cpu}")
PY

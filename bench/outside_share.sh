#!/usr/bin/env bash
# How the CPU outside training and scoring (issue 16's "at most 25%") depends on the
# job's size: `swimlane bench pipeline` on the embedded bus (1 trainer, no pacing) at
# several correction counts a user, then a least-squares line through each of
#   outside CPU a user = fixed + per-correction x corrections
#   model CPU a user   = fixed + per-correction x corrections
# and the share the two lines give at any count, including the limit of ever more
# corrections (outside per correction over all CPU per correction).
#
#   bench/outside_share.sh                              # 100, 250 and 500 corrections
#   CORRECTIONS="100 250 500 1000" REPEAT=2 bench/outside_share.sh
#   BIN=/path/to/swimlane bench/outside_share.sh        # a binary already built
#   HISTORY=3 bench/outside_share.sh                    # on a store that has run a while
#                                                       # (`bench pipeline --history`)
#
# Writes each run's JSON to bench/out/outside_share/ (gitignored).
set -euo pipefail
cd "$(dirname "$0")/.."
USERS=${USERS:-300}
CORRECTIONS=${CORRECTIONS:-"100 250 500"}
REPEAT=${REPEAT:-2}
HISTORY=${HISTORY:-0}
OUT=bench/out/outside_share
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/swimlane-target}
if [ -z "${BIN:-}" ]; then
  echo "== building swimlane (release)" >&2
  cargo build --release -q -p swimlane
  BIN=$CARGO_TARGET_DIR/release/swimlane
fi
rm -rf "$OUT" && mkdir -p "$OUT"
# The counts alternate within each repeat, so a slow minute of the machine falls on
# several of them.
for r in $(seq 1 "$REPEAT"); do
  for c in $CORRECTIONS; do
    echo "== $USERS users x $c corrections, history $HISTORY (repeat $r)" >&2
    # One model thread, as the workers run on this 2-core machine.
    RAYON_NUM_THREADS=1 "$BIN" bench pipeline --bus embedded --trainers 1 --users "$USERS" \
      --corrections "$c" --paced 0 --history "$HISTORY" --json >"$OUT/c$c-r$r.json" \
      2>"$OUT/c$c-r$r.log"
  done
done
python3 - "$OUT" <<'PY'
import glob, json, os, sys

rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    d = json.load(open(path))
    r = d["runs"][0]
    users = d["users"]
    total = sum(r["burst_cpu_seconds"].values())
    model = r["burst_model_cpu_seconds"]
    rows.append((d["corrections"], 1e3 * total / users, 1e3 * model / users))
rows.sort()
print(f"{'corrections':>11} {'fleet ms/user':>13} {'model':>7} {'outside':>8} {'share':>6}")
for c, t, m in rows:
    print(f"{c:>11} {t:>13.2f} {m:>7.2f} {t - m:>8.2f} {100 * (t - m) / t:>5.1f}%")


def line(points):
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


if len({c for c, _, _ in rows}) < 2:
    sys.exit("need at least two correction counts for the lines")
of, op = line([(c, t - m) for c, t, m in rows])
mf, mp = line([(c, m) for c, t, m in rows])
print(f"outside CPU a user: {of:.2f} ms + {1e3 * op:.2f} us x corrections")
print(f"model CPU a user:   {mf:.2f} ms + {1e3 * mp:.2f} us x corrections")
for c in (100, 250, 500, 1000):
    o, m = of + op * c, mf + mp * c
    print(f"  by the lines at {c:>4} corrections: outside {100 * o / (o + m):.1f}%")
print(f"  with ever more corrections: outside {100 * op / (op + mp):.1f}%")
PY

#!/usr/bin/env bash
# candle (swimlane-model, release) versus PyTorch (CPU) training the same micro model on
# the same data with the same batch size, epochs, optimiser and thread count, in one
# invocation. Prints a JSON summary and writes it to bench/out/model_vs_pytorch.json.
#
#   bench/model_vs_pytorch.sh            # defaults
#   EPOCHS=5 SWIMMERS=200 THREADS="1 2" BATCHES="32 128" bench/model_vs_pytorch.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/bench/out
mkdir -p "$OUT"
VENV=${VENV:-$HOME/.cache/swimlane-bench-venv}
EPOCHS=${EPOCHS:-5}
SWIMMERS=${SWIMMERS:-200}
WINDOWS=${WINDOWS:-60}
THREADS=${THREADS:-"1 2"}
BATCHES=${BATCHES:-"32 128"}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/swimlane-target-model}

echo "== building swimlane (release)" >&2
cargo build --release -q -p swimlane
BIN=$CARGO_TARGET_DIR/release/swimlane

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  echo "== creating $VENV and installing torch (about 3.5 GB, a minute)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch
fi

DATA=$OUT/bench-samples.safetensors
echo "== exporting $SWIMMERS swimmers x $WINDOWS windows" >&2
"$BIN" model export-dataset --out "$DATA" --swimmers "$SWIMMERS" --windows "$WINDOWS" --seed 1 >&2

RESULTS=$OUT/runs.jsonl
: > "$RESULTS"
for b in $BATCHES; do
  for t in $THREADS; do
    echo "== batch $b, $t thread(s): candle" >&2
    RAYON_NUM_THREADS=$t "$BIN" model bench-train --data "$DATA" --epochs "$EPOCHS" --batch "$b" --threads "$t" >> "$RESULTS"
    echo "== batch $b, $t thread(s): pytorch" >&2
    OMP_NUM_THREADS=$t MKL_NUM_THREADS=$t "$VENV/bin/python" bench/pytorch_train.py \
      --data "$DATA" --epochs "$EPOCHS" --batch "$b" --threads "$t" >> "$RESULTS"
  done
done

"$VENV/bin/python" - "$RESULTS" "$OUT/model_vs_pytorch.json" <<'PY'
import json, sys, platform, os
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
pairs = []
for r in runs:
    if r["framework"] != "candle":
        continue
    p = next(x for x in runs if x["framework"] == "pytorch" and x["threads"] == r["threads"] and x["batch"] == r["batch"])
    pairs.append({
        "threads": r["threads"], "batch": r["batch"], "samples": r["samples"], "epochs": r["epochs"],
        "candle_train_samples_per_sec": round(r["train_samples_per_sec"]),
        "pytorch_train_samples_per_sec": round(p["train_samples_per_sec"]),
        "candle_over_pytorch": round(r["train_samples_per_sec"] / p["train_samples_per_sec"], 3),
        "candle_final_loss": round(r["final_train_loss"], 4), "pytorch_final_loss": round(p["final_train_loss"], 4),
        "candle_infer_single_us": round(r["infer_single_us_per_window"], 2),
        "pytorch_infer_single_us": round(p["infer_single_us_per_window"], 2),
        "candle_infer_batch256_us_per_window": round(r["infer_batch256_us_per_window"], 3),
        "pytorch_infer_batch256_us_per_window": round(p["infer_batch256_us_per_window"], 3),
    })
summary = {"benchmark": "micro model training, candle vs pytorch (CPU)", "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "torch_version": next((r["torch_version"] for r in runs if "torch_version" in r), None),
           "results": pairs}
s = json.dumps(summary, indent=2)
open(sys.argv[2], "w").write(s + "\n")
print(s)
PY

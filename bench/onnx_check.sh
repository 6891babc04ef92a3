#!/usr/bin/env bash
# The ONNX exports checked by the ONNX reference tools (issue 9): swimlane exports the
# base model and fine-tuned personal models (`swimlane model export`), predicts 1,200
# windows of unseen swimmers with candle and with swimlane's own ONNX evaluator
# (`swimlane model predict` on the safetensors and on the ONNX file), then
# bench/onnx_check.py runs onnx.checker.check_model(full_check=True) and onnxruntime on
# the same windows (max abs diff <= 1e-5, identical predicted classes) and measures
# onnxruntime's CPU latency per window (batch 1, one thread, median; target < 1 ms).
# Exits non-zero on any failure. Writes the summary to bench/out/onnx_check.json.
#
#   bench/onnx_check.sh
#   PROFILE=release ONNX_VENV=/path/to/venv bench/onnx_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${ONNX_VENV:-$HOME/.cache/swimlane-tools/onnx-venv}
PROFILE=${PROFILE:-dev}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/swimlane-target}

apt_install() {
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# Building swimlane needs no protoc (swimlane-model writes its own ONNX types; only its
# tests use candle-onnx, whose build script runs protoc).

# The Python side lives in a virtual environment outside the repository.
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV" >&2
  mkdir -p "$(dirname "$VENV")"
  if ! python3 -m venv "$VENV"; then
    rm -rf "$VENV"
    echo "==> installing python3-venv" >&2
    apt_install python3-venv
    python3 -m venv "$VENV"
  fi
fi
if ! "$VENV/bin/python" -c 'import onnx, onnxruntime, numpy' 2>/dev/null; then
  echo "==> installing onnx and onnxruntime into $VENV" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check 'onnx>=1.15' 'onnxruntime>=1.17' numpy
fi

echo "==> building swimlane ($PROFILE)" >&2
if [ "$PROFILE" = release ]; then
  cargo build -q --release -p swimlane
  BIN=$CARGO_TARGET_DIR/release/swimlane
else
  cargo build -q -p swimlane
  BIN=$CARGO_TARGET_DIR/debug/swimlane
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "==> the parity set: base model, fine-tuned models, windows (into $WORK)" >&2
"$BIN" model onnx-parity-set --out "$WORK" --seed 0 --swimmers 3 --windows-per-swimmer 200

# name, model_version, parent_version, training_run per line ("-" for none).
"$VENV/bin/python" -c '
import json, sys
for m in json.load(open(sys.argv[1]))["models"]:
    print(m["name"], m["model_version"], m["parent_version"] or "-", m["training_run"] or "-", int(m.get("fallback", False)))
' "$WORK/models.json" > "$WORK/models.txt"

while read -r name version parent run fallback; do
  if [ "$fallback" = 1 ]; then
    # The device's file with the base-model fallback: written, with candle's answer, by
    # onnx-parity-set itself.
    "$BIN" model predict --model "$WORK/$name.onnx" --input "$WORK/windows.json" > "$WORK/$name.swimlane-onnx.json"
    continue
  fi
  args=(--model-version "$version")
  if [ "$parent" != - ]; then args+=(--parent-version "$parent"); fi
  if [ "$run" != - ]; then args+=(--training-run "$run"); fi
  "$BIN" model export --model "$WORK/$name.safetensors" --format onnx --out "$WORK/$name.onnx" "${args[@]}"
  "$BIN" model predict --model "$WORK/$name.safetensors" --input "$WORK/windows.json" > "$WORK/$name.candle.json"
  "$BIN" model predict --model "$WORK/$name.onnx" --input "$WORK/windows.json" > "$WORK/$name.swimlane-onnx.json"
done < "$WORK/models.txt"

echo "==> onnx.checker and onnxruntime" >&2
"$VENV/bin/python" "$ROOT/bench/onnx_check.py" --dir "$WORK" --out "$ROOT/bench/out/onnx_check.json"

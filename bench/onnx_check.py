"""Check swimlane's ONNX exports with the ONNX reference tools (issue 9).

For every model named in DIR/models.json (written by `swimlane model onnx-parity-set`),
with DIR/NAME.onnx (`swimlane model export`), DIR/NAME.candle.json (`swimlane model
predict` on the safetensors file: candle) and DIR/NAME.swimlane-onnx.json (the same on
the ONNX file: swimlane's own ONNX evaluator), all on DIR/windows.json:

- the file is at most 1 MiB and `onnx.checker.check_model(model, full_check=True)`
  passes; opset >= 17; input `window` float32 [batch, 32, 16] and output
  `probabilities` float32 [batch, 6] with a symbolic batch dimension; the metadata
  names the model's version and lineage and the labels in output order;
- ONNX Runtime (CPU) on the same windows, in one batch and one window at a time, and
  swimlane's evaluator differ from candle's probabilities by at most the tolerance and
  predict the same class for every window;
- ONNX Runtime's CPU latency per window (batch 1, one thread, median of many runs) is
  under the target.

Prints a JSON summary (also written to --out) and exits 1 on any failure.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

MAX_BYTES = 1 << 20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--tolerance", type=float, default=1e-5)
    ap.add_argument("--latency-runs", type=int, default=5000)
    ap.add_argument("--latency-target-ms", type=float, default=1.0)
    ap.add_argument("--out")
    a = ap.parse_args()

    failures = []

    def check(ok, what):
        if not ok:
            failures.append(what)
            print(f"FAIL: {what}", file=sys.stderr)
        return ok

    models = json.load(open(os.path.join(a.dir, "models.json")))["models"]
    samples = json.load(open(os.path.join(a.dir, "windows.json")))["samples"]
    x = np.asarray([s["frames"] for s in samples], dtype=np.float32)
    check(x.ndim == 3 and x.shape[1:] == (32, 16), f"windows have shape {x.shape}")
    check(len(x) >= 1000, f"only {len(x)} windows")

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    results = []
    latency = None
    for m in models:
        name = m["name"]
        path = os.path.join(a.dir, name + ".onnx")
        size = os.path.getsize(path)
        check(size <= MAX_BYTES, f"{name}: {size} bytes is over 1 MiB")
        model = onnx.load(path)
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:  # the checker's own error types vary by version
            check(False, f"{name}: onnx.checker.check_model(full_check=True): {e}")
        opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        check(opset >= 17, f"{name}: opset {opset} < 17")
        md = {p.key: p.value for p in model.metadata_props}

        def shape(v):
            t = v.type.tensor_type
            return t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]

        g = model.graph
        check([i.name for i in g.input] == ["window"], f"{name}: inputs {[i.name for i in g.input]}")
        check([o.name for o in g.output] == ["probabilities"], f"{name}: outputs {[o.name for o in g.output]}")
        check(shape(g.input[0]) == (onnx.TensorProto.FLOAT, ["batch", 32, 16]), f"{name}: input {shape(g.input[0])}")
        check(shape(g.output[0]) == (onnx.TensorProto.FLOAT, ["batch", 6]), f"{name}: output {shape(g.output[0])}")

        candle = json.load(open(os.path.join(a.dir, name + ".candle.json")))
        swimlane_onnx = json.load(open(os.path.join(a.dir, name + ".swimlane-onnx.json")))
        labels = candle["labels"]
        check(md.get("labels", "").split(",") == labels, f"{name}: metadata labels {md.get('labels')} != {labels}")
        check(md.get("window") == "32x16", f"{name}: window {md.get('window')}")
        check(md.get("model_version") == m["model_version"], f"{name}: model_version {md.get('model_version')}")
        check(md.get("parent_version") == (m["parent_version"] or ""), f"{name}: parent_version {md.get('parent_version')}")
        check(md.get("training_run") == (m["training_run"] or ""), f"{name}: training_run {md.get('training_run')}")
        if m.get("fallback"):
            check(md.get("fallback") == "base", f"{name}: fallback {md.get('fallback')}")
        else:
            check("fallback" not in md, f"{name}: a fallback it should not have")

        sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        p_ort = sess.run(["probabilities"], {"window": x})[0]
        check(p_ort.shape == (len(x), len(labels)), f"{name}: onnxruntime output shape {p_ort.shape}")
        # Batch 1 (the phone's case) must give what the batch gives.
        single = np.concatenate([sess.run(None, {"window": x[i : i + 1]})[0] for i in range(100)])
        p_c = np.asarray(candle["probabilities"], dtype=np.float64)
        p_so = np.asarray(swimlane_onnx["probabilities"], dtype=np.float64)
        p_o = p_ort.astype(np.float64)
        row = {
            "model": name,
            "model_version": md.get("model_version"),
            "onnx_bytes": size,
            "windows": int(len(x)),
            "max_abs_diff_onnxruntime_vs_candle": float(np.max(np.abs(p_o - p_c))),
            "class_mismatches_onnxruntime_vs_candle": int(np.sum(p_o.argmax(1) != p_c.argmax(1))),
            "max_abs_diff_swimlane_onnx_vs_candle": float(np.max(np.abs(p_so - p_c))),
            "class_mismatches_swimlane_onnx_vs_candle": int(np.sum(p_so.argmax(1) != p_c.argmax(1))),
            "max_abs_diff_batch1_vs_batched": float(np.max(np.abs(single.astype(np.float64) - p_o[:100]))),
            "accuracy_on_all_windows": float(np.mean(p_o.argmax(1) == np.asarray([labels.index(s["label"]) for s in samples]))) if all("label" in s for s in samples) else None,
        }
        for k in ("max_abs_diff_onnxruntime_vs_candle", "max_abs_diff_swimlane_onnx_vs_candle", "max_abs_diff_batch1_vs_batched"):
            check(row[k] <= a.tolerance, f"{name}: {k} = {row[k]:.3e} > {a.tolerance}")
        for k in ("class_mismatches_onnxruntime_vs_candle", "class_mismatches_swimlane_onnx_vs_candle"):
            check(row[k] == 0, f"{name}: {k} = {row[k]}")
        results.append(row)
        print(f"{name}: {size} bytes, onnxruntime vs candle max abs diff {row['max_abs_diff_onnxruntime_vs_candle']:.3e}, "
              f"{row['class_mismatches_onnxruntime_vs_candle']} classes differ", file=sys.stderr)

        if latency is None:
            # One window at a time, as the phone runs it: batch 1, one thread.
            one = x[:1]
            for _ in range(300):
                sess.run(None, {"window": one})
            ts = []
            for i in range(a.latency_runs):
                w = x[i % len(x) : i % len(x) + 1]
                t = time.perf_counter_ns()
                sess.run(None, {"window": w})
                ts.append(time.perf_counter_ns() - t)
            ts.sort()
            latency = {
                "model": name,
                "runs": a.latency_runs,
                "batch": 1,
                "threads": 1,
                "median_us": statistics.median(ts) / 1e3,
                "p90_us": ts[int(0.9 * (len(ts) - 1))] / 1e3,
                "p99_us": ts[int(0.99 * (len(ts) - 1))] / 1e3,
                "target_us": a.latency_target_ms * 1e3,
            }
            check(latency["median_us"] < latency["target_us"],
                  f"onnxruntime CPU latency per window {latency['median_us']:.1f} us is over {latency['target_us']:.0f} us")

    summary = {
        "benchmark": "swimlane ONNX exports: onnx.checker, onnxruntime parity with candle, CPU latency",
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "tolerance": a.tolerance,
        "models": results,
        "onnxruntime_latency_per_window": latency,
        "failures": failures,
        "ok": not failures,
    }
    s = json.dumps(summary, indent=2)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        open(a.out, "w").write(s + "\n")
    print(s)
    if failures:
        print(f"{len(failures)} check(s) failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

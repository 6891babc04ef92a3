#!/usr/bin/env python3
"""Where a profiled pipeline's CPU goes (bench/profile_pipeline.sh).

Reads `perf script` of each worker's recording (files named KIND-PID.data) and sorts
every sample into one part by the frames of its stack, first match wins:

- training: the trainer's `fine_tune`, and loading the parent (`MicroModel::load_for`
  under the trainer's stage), what a run records as `train_cpu_seconds`;
- scoring: the validator's model code (`swimlane_model::`) outside store transactions,
  what a verdict records as `validate_cpu_seconds`;
- then the parts outside them: the publisher's export check, the embedded bus's polls
  and lag gauge, SQLite's WAL checkpoints, its commits, the rest of SQLite, SHA-256,
  the familiarity, HTTP, JSON, decoding uploads, the allocator, page faults, the rest.

Prints each worker's parts and the fleet's, as shares of the samples (perf samples
at a fixed rate, so shares of CPU time), the share outside training and scoring, and
that share again without SQLite's samples: what the pipeline would spend outside if
the store cost nothing. The call graphs overstate ingest's SQLite time
(bench/README.md, "Session sixteen"), so that last figure is if anything too low.
"""
import collections
import os
import re
import subprocess
import sys

PARTS = [
    ("export check", ("export_device_parts_checked", "stage::export_onnx")),
    ("bus polls and lag", ("EmbeddedConsumer", "high_watermark", "ChangeWatch")),
    ("sqlite: WAL checkpoints", ("walCheckpoint",)),
    ("sqlite: commits", ("sqlite3VdbeHalt",)),
    ("sqlite: reads and statements", ("sqlite3",)),
    ("SHA-256", ("sha2::",)),
    ("familiarity", ("swimlane_core::familiar",)),
    ("HTTP", ("hyper::", "axum::")),
    ("JSON", ("serde_json",)),
    ("decoding uploads", ("validate_upload",)),
    ("allocator", ("malloc", "mi_", "free")),
    ("page faults", ("asm_exc_page_fault",)),
]


def stacks(path):
    """Each sample's frames, leaf first."""
    p = subprocess.Popen(
        ["perf", "script", "-i", path, "--no-inline"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    cur = None
    for line in p.stdout:
        line = line.rstrip("\n")
        if not line.strip():
            if cur is not None:
                yield cur
            cur = None
        elif not line[0].isspace():
            cur = []
        elif cur is not None:
            sym = line.strip().split(None, 1)[1] if " " in line.strip() else "?"
            sym = re.sub(r" \([^()]*\)$", "", sym)
            cur.append(re.sub(r"\+0x[0-9a-f]+$", "", sym))
    if cur:
        yield cur
    p.wait()


def part(kind, frames):
    s = " ".join(frames)
    if kind == "trainer" and (
        "fine_tune" in s or ("load_for" in s and "swimlane_trainer::" in s)
    ):
        return "training"
    if kind == "validator" and "swimlane_model::" in s and "Db::transact" not in s:
        return "scoring"
    for name, patterns in PARTS:
        if any(p in s for p in patterns):
            return name
    return "the rest"


def show(title, counts):
    n = sum(counts.values())
    print(f"{title}: {n} samples")
    for name, c in counts.most_common():
        print(f"  {c / n:6.1%}  {name}")


def main(files):
    if not files:
        sys.exit("usage: profile_classify.py KIND-PID.data ...")
    fleet = collections.Counter()
    by_kind = collections.defaultdict(collections.Counter)
    for f in files:
        kind = os.path.basename(f).split("-")[0]
        for frames in stacks(f):
            p = part(kind, frames)
            by_kind[kind][p] += 1
            fleet[p] += 1
    for kind in sorted(by_kind):
        show(kind, by_kind[kind])
    show("fleet", fleet)
    n = sum(fleet.values())
    model = fleet["training"] + fleet["scoring"]
    print(f"outside training and scoring: {(n - model) / n:.1%} of the fleet's samples")
    # The floor the store's design leaves: the share with every SQLite sample (its
    # statements, commits and checkpoints, with the system calls under them) taken out
    # of both the outside and the whole, as if storing cost nothing.
    store = sum(c for name, c in fleet.items() if name.startswith("sqlite:"))
    print(
        f"in SQLite: {store / n:.1%} of the fleet's samples; outside training and "
        f"scoring without them: {(n - model - store) / (n - store):.1%}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])

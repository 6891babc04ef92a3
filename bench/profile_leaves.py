#!/usr/bin/env python3
"""The functions a profiled pipeline's workers spend their samples in, leaves only
(`LEAF=1 bench/profile_pipeline.sh`).

Reads each worker's recording (files named KIND-PID.data, recorded without call
graphs, so perf disturbs the workers little) and prints per kind of worker (every
process of that kind together): its samples, the kernel's share, and the functions
with the most samples, `[k]` marking the kernel's. A leaf says where the time is
spent, not on whose behalf: `bench/profile_pipeline.sh` without `LEAF=1` records call
graphs for that, at the cost of inflating what it measures.

    python3 bench/profile_leaves.py bench/out/profile/*.data [--top N]
"""
import collections
import os
import re
import subprocess
import sys


def leaves(path):
    """{(symbol, is_kernel): samples} of one recording."""
    out = subprocess.run(
        ["perf", "report", "-i", path, "--no-children", "--sort", "sym", "--stdio",
         "-g", "none", "-n"],
        capture_output=True, text=True,
    ).stdout
    counts = collections.Counter()
    for line in out.splitlines():
        # "    12.90%          181  [.] __memmove_avx512_unaligned_erms"
        m = re.match(r"^\s*[\d.]+%\s+(\d+)\s+\[(.)\]\s+(.*?)\s*$", line)
        if m:
            counts[(m.group(3), m.group(2) == "k")] += int(m.group(1))
    return counts


def main():
    args = sys.argv[1:]
    top = 15
    if "--top" in args:
        i = args.index("--top")
        top = int(args[i + 1])
        del args[i:i + 2]
    kinds = collections.defaultdict(collections.Counter)
    for path in args:
        kind = os.path.basename(path).split("-")[0]
        kinds[kind].update(leaves(path))
    fleet = collections.Counter()
    for kind in sorted(kinds):
        c = kinds[kind]
        fleet.update(c)
        report(kind, c, top)
    report("fleet", fleet, top)


def report(title, c, top):
    total = sum(c.values())
    if total == 0:
        print(f"{title}: no samples")
        return
    kernel = sum(v for (_, k), v in c.items() if k)
    print(f"{title}: {total} samples, {100 * kernel / total:.1f}% in the kernel")
    for (sym, k), v in c.most_common(top):
        print(f"  {100 * v / total:5.1f}%  {'[k] ' if k else ''}{sym[:110]}")


if __name__ == "__main__":
    main()

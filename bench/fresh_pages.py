#!/usr/bin/env python3
"""What a page of memory costs the first time on this machine (bench/README.md, "Where
the CPU goes at 887c6eb"): 4 KiB writes into pages a file has not had in the page cache
against the same writes over pages it has, and first touches of anonymous memory
against touching it again and after MADV_DONTNEED. System CPU per page, from getrusage.

    python3 bench/fresh_pages.py [DIR]     # DIR: where the scratch file goes (default .)
"""
import mmap
import os
import resource
import sys
import time

PAGES = 100_000  # 400 MB


def sys_seconds():
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def writes(path, trunc):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if trunc else 0), 0o600)
    buf = b"x" * 4096
    s0, t0 = sys_seconds(), time.perf_counter()
    for i in range(PAGES):
        os.pwrite(fd, buf, i * 4096)
    s1, t1 = sys_seconds(), time.perf_counter()
    os.close(fd)
    return (s1 - s0) / PAGES * 1e6, (t1 - t0) / PAGES * 1e6


def touches(m):
    s0, t0 = sys_seconds(), time.perf_counter()
    for i in range(PAGES):
        m[i * 4096] = 1
    s1, t1 = sys_seconds(), time.perf_counter()
    return (s1 - s0) / PAGES * 1e6, (t1 - t0) / PAGES * 1e6


def main():
    path = os.path.join(sys.argv[1] if len(sys.argv) > 1 else ".", "fresh_pages.scratch")
    try:
        rows = [
            ("pwrite 4 KiB, pages new to the page cache", writes(path, True)),
            ("pwrite 4 KiB over the same pages, cached", writes(path, False)),
        ]
        os.unlink(path)
        rows.append(("pwrite 4 KiB, a new file again", writes(path, True)))
    finally:
        if os.path.exists(path):
            os.unlink(path)
    m = mmap.mmap(-1, PAGES * 4096)
    rows.append(("first touch of anonymous memory", touches(m)))
    rows.append(("touching it again", touches(m)))
    m.madvise(mmap.MADV_DONTNEED)
    rows.append(("after MADV_DONTNEED", touches(m)))
    print(f"{'what':<45} {'sys us/page':>12} {'wall us/page':>13}")
    for what, (s, w) in rows:
        print(f"{what:<45} {s:>12.2f} {w:>13.2f}")


if __name__ == "__main__":
    main()

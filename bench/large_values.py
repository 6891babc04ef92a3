#!/usr/bin/env python3
"""What keeping large values out of SQLite's pages could save, in process CPU.

An upload's windows are five values of about 100 kB. This writes them as the embedded
store does (one SQLite transaction in WAL mode, synchronous=FULL, secure_delete, the
default autocheckpoint, so the WAL's pages are also copied into the database file) and
as a file of their own (written, fdatasync'd, its directory fsync'd) beside a commit of
a small row that would name it; then reads them back both ways. It prints the process
CPU (and wall time) per upload for each. Python's own overhead is in both columns, the
same for both.

    python3 bench/large_values.py [--uploads 200] [--dir DIR]

DIR (default: a fresh directory under ~/.cache) must be on the disk the store uses:
/tmp may be a memory file system.
"""
import argparse
import os
import shutil
import sqlite3
import tempfile
import time


def timed(f, n):
    w, c = time.perf_counter(), time.process_time()
    f()
    return (time.process_time() - c) / n * 1e3, (time.perf_counter() - w) / n * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--uploads", type=int, default=200)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    base = a.dir or os.path.expanduser("~/.cache")
    os.makedirs(base, exist_ok=True)
    d = tempfile.mkdtemp(prefix="large-values-", dir=base)
    try:
        run(d, a.uploads)
    finally:
        shutil.rmtree(d)


def run(d, n):
    c = sqlite3.connect(os.path.join(d, "store.sqlite"), isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=FULL")
    c.execute("PRAGMA secure_delete=ON")
    c.execute("CREATE TABLE kv(id INTEGER PRIMARY KEY, k BLOB NOT NULL UNIQUE, ver INTEGER NOT NULL, v BLOB)")
    vals = [os.urandom(100_000) for _ in range(5)]
    side = os.path.join(d, "values")
    os.makedirs(side)

    def in_sqlite():
        for i in range(n):
            c.execute("BEGIN IMMEDIATE")
            for j, v in enumerate(vals):
                c.execute("INSERT INTO kv(k, ver, v) VALUES (?, ?, ?)", (f"u{i}/{j}".encode(), i, v))
            c.execute("COMMIT")

    def read_sqlite():
        for i in range(n):
            for j in range(5):
                c.execute("SELECT v FROM kv WHERE k = ?", (f"u{i}/{j}".encode(),)).fetchone()

    blob = b"".join(vals)

    def in_files():
        for i in range(n):
            fd = os.open(os.path.join(side, f"f{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.write(fd, blob)
            os.fdatasync(fd)
            os.close(fd)
            dfd = os.open(side, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
            c.execute("BEGIN IMMEDIATE")
            c.execute("INSERT INTO kv(k, ver, v) VALUES (?, ?, ?)", (f"s{i}".encode(), i, b"x" * 24))
            c.execute("COMMIT")

    def read_files():
        for i in range(n):
            fd = os.open(os.path.join(side, f"f{i}"), os.O_RDONLY)
            for j in range(5):
                os.pread(fd, 100_000, j * 100_000)
            os.close(fd)

    for name, f in [
        ("write 5 x 100 kB in SQLite", in_sqlite),
        ("write 5 x 100 kB as a file + a small commit", in_files),
        ("read 5 x 100 kB from SQLite", read_sqlite),
        ("read 5 x 100 kB from the file", read_files),
    ]:
        cpu, wall = timed(f, n)
        print(f"{name:45s} {cpu:6.3f} ms CPU  {wall:6.2f} ms wall  an upload")


if __name__ == "__main__":
    main()

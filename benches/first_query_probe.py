"""Where the first exact clip_index query after opening a database spends its time (issue 8).

Builds two 1M x 512 random clip_index databases (SQLite's default 4 KiB pages and 64 KiB pages),
then, each in a fresh process:
- the first three exact queries on a new connection, without and with PRAGMA mmap_size;
- the raw cost of reading the same float32 chunk blobs (8,000 x 256 KiB) through SQLite's blob
  API into Python, with nothing kept;
- the cost of touching 2 GiB of fresh anonymous memory (what holding the vectors in process
  memory costs on first load), with 4 KiB pages and with MADV_HUGEPAGE.

    make build && .venv/bin/python benches/first_query_probe.py [--dir /tmp/fq]
"""
import argparse, ctypes, mmap, os, shutil, sqlite3, subprocess, sys, tempfile, time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
N, DIMS = 1_000_000, 512


def connect(path, ext):
    db = sqlite3.connect(path, isolation_level=None)
    db.enable_load_extension(True)
    db.load_extension(ext)
    return db


def build(path, page_size, ext):
    if os.path.exists(path):
        return
    db = connect(path, ext)
    db.execute(f"PRAGMA page_size={page_size}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(f"CREATE VIRTUAL TABLE items USING clip_index(embedding float[{DIMS}], metric=cosine)")
    rng = np.random.default_rng(0)
    for s in range(0, N, 10_000):
        data = rng.standard_normal((10_000, DIMS), dtype=np.float32)
        db.execute("BEGIN")
        db.executemany("INSERT INTO items(rowid, embedding) VALUES (?, ?)",
                       [(s + i + 1, data[i].tobytes()) for i in range(10_000)])
        db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def first_queries(path, mmap_on, ext):
    db = connect(path, ext)
    if mmap_on:
        db.execute("PRAGMA mmap_size=17179869184")
    q = np.random.default_rng(1).standard_normal(DIMS, dtype=np.float32).tobytes()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        db.execute("SELECT rowid FROM items WHERE embedding MATCH ? AND k = 10", (q,)).fetchall()
        times.append((time.perf_counter() - t) * 1000)
    return times


def raw_read(path, mmap_on):
    db = sqlite3.connect(path)
    if mmap_on:
        db.execute("PRAGMA mmap_size=17179869184")
    ids = [r[0] for r in db.execute("SELECT id FROM items_vectors")]
    t = time.perf_counter()
    for i in ids:
        with db.blobopen("items_vectors", "vectors", i, readonly=True) as b:
            b.read()
    return (time.perf_counter() - t) * 1000


def touch(huge):
    n = 2 << 30
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        m.madvise(mmap.MADV_HUGEPAGE)
    buf = (ctypes.c_char * n).from_buffer(m)
    t = time.perf_counter()
    ctypes.memset(buf, 1, n)
    ms = (time.perf_counter() - t) * 1000
    del buf
    m.close()
    return ms


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        what, path, mm, ext = sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5]
        if what == "first":
            print(" / ".join(f"{t:,.0f}" for t in first_queries(path, mm, ext)))
        elif what == "raw":
            print(f"{raw_read(path, mm):,.0f}")
        else:
            print(f"{touch(mm):,.0f}")
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="archaeclip-fq-")
    os.makedirs(work, exist_ok=True)
    # A copy of the extension: `make build` replacing dist/ while this runs would crash it.
    ext = os.path.join(work, "archaeclip.so")
    shutil.copy(os.path.join(HERE, "..", "dist", "archaeclip.so"), ext)
    ext = ext[:-3]
    child = lambda *a: subprocess.run([sys.executable, __file__, "--child", *map(str, a)],
                                      check=True, capture_output=True, text=True).stdout.strip()
    print(f"{N:,} x {DIMS} random vectors, cosine, k = 10; ms")
    print("| page size | first 3 exact queries | same, mmap_size | raw blob read of the chunks | same, mmap_size |")
    print("|---|---|---|---:|---:|")
    for page in (4096, 65536):
        path = os.path.join(work, f"p{page}.db")
        build(path, page, ext)
        cols = [child("first", path, 0, ext), child("first", path, 1, ext),
                child("raw", path, 0, ext), child("raw", path, 1, ext)]
        print(f"| {page} | " + " | ".join(cols) + " |", flush=True)
    print(f"\ntouching 2 GiB of fresh memory: 4 KiB pages {child('touch', '-', 0, ext)} ms, "
          f"MADV_HUGEPAGE {child('touch', '-', 1, ext)} ms")


if __name__ == "__main__":
    main()

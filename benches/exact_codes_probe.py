"""Exact clip_index queries with and without stored int8 codes (codes=on, the default, against
codes=off) at 1M x 512 random rows, each measurement in a fresh process (issue 8's "first query
after opening"): insert rate while building, then the first N queries of a new connection with
SQLite's default pragmas and with PRAGMA mmap_size.

    make build && OPENBLAS_NUM_THREADS=1 .venv/bin/python benches/exact_codes_probe.py [--dir /tmp/fq] [--n 24]
        [--page-size 65536]

--page-size builds (and names) the files with that SQLite page size instead of the default 4096.
"""
import argparse, json, os, sqlite3, subprocess, sys, time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
EXT = os.path.join(HERE, "..", "dist", "archaeclip")
N, D = 1_000_000, 512


def conn(path):
    db = sqlite3.connect(path, isolation_level=None)
    db.enable_load_extension(True)
    db.load_extension(EXT)
    return db


def build(path, opts, page_size=None):
    if os.path.exists(path):
        return
    db = conn(path)
    if page_size:
        db.execute(f"PRAGMA page_size={int(page_size)}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(f"CREATE VIRTUAL TABLE items USING clip_index(embedding float[{D}], metric=cosine{opts})")
    rng = np.random.default_rng(0)
    spent = 0.0
    for s in range(0, N, 10_000):
        data = rng.standard_normal((10_000, D), dtype=np.float32)
        rows = [(s + i + 1, data[i].tobytes()) for i in range(10_000)]
        t = time.perf_counter()
        db.execute("BEGIN")
        db.executemany("INSERT INTO items(rowid, embedding) VALUES (?, ?)", rows)
        db.execute("COMMIT")
        spent += time.perf_counter() - t
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    print(f"{path}: {N / spent:,.0f} rows/s, file {os.path.getsize(path) / (N * D * 4):.3f}x raw", flush=True)


def queries(path, mmap_on, n):
    db = conn(path)
    if mmap_on:
        db.execute("PRAGMA mmap_size=17179869184")
    rng = np.random.default_rng(1)
    times, answers = [], []
    for _ in range(n):
        q = rng.standard_normal(D, dtype=np.float32).tobytes()
        t = time.perf_counter()
        rows = db.execute("SELECT rowid FROM items WHERE embedding MATCH ? AND k = 10", (q,)).fetchall()
        times.append(round((time.perf_counter() - t) * 1000, 1))
        answers.append([r[0] for r in rows])
    return times, answers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/fq")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--page-size", type=int, default=None)
    ap.add_argument("--child", nargs=3)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(queries(a.child[0], a.child[1] == "1", int(a.child[2]))))
        return
    os.makedirs(a.dir, exist_ok=True)
    suffix = f"-{a.page_size}" if a.page_size else ""
    paths = {"codes=on": os.path.join(a.dir, f"codes{suffix}.db"), "codes=off": os.path.join(a.dir, f"off{suffix}.db")}
    build(paths["codes=on"], "", a.page_size)
    build(paths["codes=off"], ", codes=off", a.page_size)
    answers = {}
    for mm in ("0", "1"):
        for name, path in paths.items():
            out = subprocess.run([sys.executable, __file__, "--child", path, mm, str(a.n)],
                                 capture_output=True, text=True, check=True)
            times, ans = json.loads(out.stdout)
            answers.setdefault(mm, []).append(ans)
            print(f"{name:10} {'mmap' if mm == '1' else 'default':8} first {times[0]:8.1f} ms, "
                  f"then {times[1:4]}, last 8 median {sorted(times[-8:])[4]:.1f} ms", flush=True)
        assert answers[mm][0] == answers[mm][1], "codes=on and codes=off disagree"
    print("codes=on and codes=off returned the same rowids for every query")


if __name__ == "__main__":
    main()

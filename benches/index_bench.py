#!/usr/bin/env python3
"""The persistent index: archaeclip's clip_index against sqlite-vec 0.1.9's vec0, on the same
vectors, in one run: insert throughput, file size, the first query after opening the database
and the median of repeated queries, recall@k against an exact numpy answer; then clip_index
with its HNSW graph (hnsw=on): build time, graph size on disk and in memory, and recall against
latency as the oversampling grows. Queries run twice where the page reads matter: with
SQLite's defaults, and with `PRAGMA mmap_size` (which lets SQLite read pages without a system
call each).

    .venv/bin/python benches/index_bench.py --n 100000
    .venv/bin/python benches/index_bench.py --n 1000000 --data clustered
    .venv/bin/python benches/index_bench.py --n 1000000 --page-size 65536   # every file with 64 KiB pages
    .venv/bin/python benches/index_bench.py --n 1000000 --inserts-only 3     # inserts alone, alternated
    .venv/bin/python benches/index_bench.py --n 1000000 --data clustered --hnsw-only --hnsw-m 16
                                                  # the HNSW graph alone, with another M
    .venv/bin/python benches/index_bench.py --n 1000000 --first-only 7 --baseline /tmp/old/archaeclip
                                                  # first exact query, fresh processes, alternated

Data: `random` (standard normal) and `clustered` (shaped like real embeddings: a few thousand
centres, each point a centre plus noise, all normalized); 512 dimensions, cosine, k = 10.
Each engine gets its own file (so sizes are comparable), built with executemany in transactions
of 10,000 rows; "first" is the first query on a freshly opened connection (the file in the OS
page cache), "median" the median of the next queries. Needs numpy and sqlite-vec (the project
venv has both).
"""
import argparse
import math
import os
import sqlite3
import statistics
import tempfile
import time

import numpy as np
import sqlite_vec

HERE = os.path.dirname(os.path.abspath(__file__))
EXT = os.path.join(HERE, "..", "dist", "archaeclip")
BATCH = 10_000


def connect(path, engine):
    db = sqlite3.connect(path, isolation_level=None)
    db.enable_load_extension(True)
    if engine in ("clip_index", "hnsw"):
        db.load_extension(EXT)
    else:
        sqlite_vec.load(db)
    db.enable_load_extension(False)
    return db


def make_data(kind, n, dims, queries, seed=0, extra=0):
    """The rows, and `queries` query vectors followed by `extra` more drawn the same way from
    a generator of their own (so the first `queries` do not depend on `extra`)."""
    rng = np.random.default_rng(seed)
    more = np.random.default_rng(seed + 1)
    if kind == "random":
        data = rng.standard_normal((n, dims), dtype=np.float32)
        q = rng.standard_normal((queries, dims), dtype=np.float32)
        return data, np.concatenate([q, more.standard_normal((extra, dims), dtype=np.float32)])
    centres = rng.standard_normal((min(4000, max(1, n // 100)), dims), dtype=np.float32)
    data = np.empty((n, dims), dtype=np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        idx = rng.integers(0, len(centres), e - s)
        data[s:e] = centres[idx] + 0.35 * rng.standard_normal((e - s, dims), dtype=np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    qi = rng.integers(0, len(centres), queries)
    q = centres[qi] + 0.35 * rng.standard_normal((queries, dims), dtype=np.float32)
    qi = more.integers(0, len(centres), extra)
    q2 = centres[qi] + 0.35 * more.standard_normal((extra, dims), dtype=np.float32)
    return data, np.concatenate([q, q2])


def data_and_truth(kind, args):
    """The rows, the queries (the exact ones, then the extra ones of the approximate modes) and
    each query's exact top k."""
    data, queries = make_data(kind, args.n, args.dims, args.queries,
                              extra=max(0, args.recall_queries - args.queries))
    return data, queries, exact_topk(data, queries, args.k)


def remove_db(path):
    """Removes a database file and its WAL and shared-memory files, where present."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)


def exact_topk(data, queries, k):
    """Exact cosine top-k (float64 scores over unit rows), in blocks to bound memory."""
    norms = np.linalg.norm(data, axis=1).astype(np.float64)
    qs = queries.astype(np.float64)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    best = [[] for _ in range(len(qs))]
    for s in range(0, len(data), 200_000):
        block = data[s : s + 200_000].astype(np.float64) / norms[s : s + 200_000, None]
        scores = qs @ block.T
        for i, row in enumerate(scores):
            top = np.argpartition(-row, k)[:k]
            best[i].extend((float(row[j]), s + int(j) + 1) for j in top)
    return [[rid for _, rid in sorted(b, key=lambda x: (-x[0], x[1]))[:k]] for b in best]


MMAP = 1 << 36


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(engine, path, data, page_size=None, hnsw_options=None):
    n, dims = data.shape
    db = connect(path, engine)
    if page_size:
        # Before anything is written: a new file takes its page size from the first write.
        db.execute(f"PRAGMA page_size={int(page_size)}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    if engine == "clip_index":
        db.execute(f"CREATE VIRTUAL TABLE items USING clip_index(embedding float[{dims}], metric=cosine)")
    elif engine == "hnsw":
        extra = "".join(f", {name}={int(value)}" for name, value in (hnsw_options or {}).items())
        db.execute(f"CREATE VIRTUAL TABLE items USING clip_index(embedding float[{dims}], metric=cosine, hnsw=on{extra})")
    else:
        db.execute(f"CREATE VIRTUAL TABLE items USING vec0(embedding float[{dims}] distance_metric=cosine)")
    t = time.perf_counter()
    for s in range(0, n, BATCH):
        rows = [(s + i + 1, data[s + i].tobytes()) for i in range(min(BATCH, n - s))]
        db.execute("BEGIN")
        db.executemany("INSERT INTO items(rowid, embedding) VALUES (?, ?)", rows)
        db.execute("COMMIT")
    seconds = time.perf_counter() - t
    if engine == "hnsw":
        # The graph is saved as the log grows; 'optimize' saves the rest.
        t = time.perf_counter()
        db.execute("INSERT INTO items(items) VALUES ('optimize')")
        seconds += time.perf_counter() - t
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    if page_size:
        got = db.execute("PRAGMA page_size").fetchone()[0]
        assert got == page_size, f"{engine}: page size {got}, asked for {page_size}"
    db.close()
    return n / seconds, os.path.getsize(path)


def timed_queries(db, sql, queries, k):
    times, results = [], []
    for q in queries:
        t = time.perf_counter()
        results.append([r[0] for r in db.execute(sql, (q.tobytes(), k))])
        times.append((time.perf_counter() - t) * 1000)
    return times, results


def hnsw_run(path, queries, k, truth, mmap):
    """On a fresh connection: the first HNSW query (it loads the saved graph) with the memory it
    took, then recall and median latency per oversampling factor, over all of `queries`."""
    db = connect(path, "clip_index")
    if mmap:
        db.execute(f"PRAGMA mmap_size={MMAP}")
    sql = "SELECT rowid FROM items WHERE embedding MATCH ? AND k = ? AND mode = 'hnsw' AND oversample = {}"
    before = rss_mib()
    first, _ = timed_queries(db, sql.format(10), queries[:1], k)
    memory = rss_mib() - before
    curves = []
    for f in (1, 2, 4, 10, 20, 40):
        t, r = timed_queries(db, sql.format(f), queries, k)
        curves.append(("hnsw", f, statistics.median(t), recall(r, truth, k), missed(r, truth, k)))
    db.close()
    return first[0], memory, curves


# The quantized modes and the oversampling factors measured for each.
QUANTIZED = (("int8", (1, 2, 4, 8)), ("int4", (4, 8, 16, 32)), ("binary", (4, 8, 16, 32, 64)))


def query_run(engine, path, queries, k, truth, mmap=False, timed=None):
    """Exact queries on a fresh connection, the first `timed` of `queries`; for clip_index, then
    the quantized curves over all of them."""
    db = connect(path, engine)
    if mmap:
        db.execute(f"PRAGMA mmap_size={MMAP}")
    sql = "SELECT rowid FROM items WHERE embedding MATCH ? AND k = ? ORDER BY distance"
    times, results = timed_queries(db, sql, queries[:timed], k)
    curves = []
    # Each quantized mode's first query, which builds its in-memory copy (ms).
    copies = {}
    if engine == "clip_index" and not mmap:
        for mode, factors in QUANTIZED:
            for i, f in enumerate(factors):
                q_sql = sql.replace("k = ?", f"k = ? AND mode = '{mode}' AND oversample = {f}")
                # A mode's first query builds its in-memory copy: not timed.
                if i == 0:
                    copies[mode] = timed_queries(db, q_sql, queries[:1], k)[0][0]
                t, r = timed_queries(db, q_sql, queries, k)
                curves.append((mode, f, statistics.median(t), recall(r, truth, k), missed(r, truth, k)))
    db.close()
    return times, results, curves, copies


def recall(results, truth, k):
    return sum(len(set(r[:k]) & set(t[:k])) for r, t in zip(results, truth)) / (k * len(results))


def missed(results, truth, k):
    """Queries that found none of their true top k: an HNSW search that ends in the wrong part
    of the graph misses the whole answer, which recall alone averages away."""
    return sum(not set(r[:k]) & set(t[:k]) for r, t in zip(results, truth))


def plot(curves, exact_ms, kind, args):
    """recall@k against median latency, one line per mode, as a dependency-free SVG."""
    w, h, m = 520, 340, 50
    pts = [(med, rec) for _, _, med, rec, _ in curves] + [(exact_ms, 1.0)]
    # Latencies span three decades (HNSW ~1 ms, exact ~60 ms): a log axis.
    lo, hi = math.log10(min(p[0] for p in pts) / 1.3), math.log10(max(p[0] for p in pts) * 1.3)
    y_min = min(0.5, min(p[1] for p in pts))
    sx = lambda v: m + (w - 2 * m) * (math.log10(v) - lo) / (hi - lo)
    sy = lambda v: h - m - (h - 2 * m) * (v - y_min) / (1 - y_min)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
           f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">median query (ms, log scale)</text>',
           f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">recall@{args.k}</text>',
           f'<text x="{w / 2}" y="20" text-anchor="middle">clip_index, {kind}, {args.n:,} x {args.dims}</text>']
    for i in range(5):
        xv, yv = 10 ** (lo + (hi - lo) * i / 4), y_min + (1 - y_min) * i / 4
        out.append(f'<text x="{sx(xv)}" y="{h - m + 14}" text-anchor="middle">{xv:.3g}</text>')
        out.append(f'<text x="{m - 4}" y="{sy(yv) + 4}" text-anchor="end">{yv:.2f}</text>')
    for mode, colour in (("int8", "#1f77b4"), ("int4", "#9467bd"), ("binary", "#d62728"), ("hnsw", "#2ca02c")):
        line = [(med, rec, f) for mm, f, med, rec, _ in curves if mm == mode]
        path = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b, _ in line)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}"/>')
        for a, b, f in line:
            out.append(f'<circle cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="3" fill="{colour}"/>')
            out.append(f'<text x="{sx(a) + 5:.1f}" y="{sy(b) + 12:.1f}" fill="{colour}">x{f}</text>')
        if line:
            out.append(f'<text x="{sx(line[-1][0]) + 5:.1f}" y="{sy(line[-1][1]) - 6:.1f}" fill="{colour}">{mode}</text>')
    out.append(f'<line x1="{sx(exact_ms):.1f}" y1="{m}" x2="{sx(exact_ms):.1f}" y2="{h - m}" stroke="grey" stroke-dasharray="4"/>')
    out.append(f'<text x="{sx(exact_ms) - 4:.1f}" y="{m + 10}" text-anchor="end" fill="grey">exact</text>')
    out.append("</svg>")
    path = args.plot.replace(".svg", "") + f"-{kind}.svg"
    with open(path, "w") as f:
        f.write("\n".join(out))
    print(f"plot: {path}")


def inserts_only(args, kinds, workdir):
    """Insert throughput alone, the engines' builds alternated R times on the same data."""
    for kind in kinds:
        data, _ = make_data(kind, args.n, args.dims, 1)
        rates = {"clip_index": [], "vec0": []}
        for r in range(args.inserts_only):
            order = ["clip_index", "vec0"] if r % 2 == 0 else ["vec0", "clip_index"]
            for engine in order:
                path = os.path.join(workdir, f"{engine}-{kind}-{args.n}-inserts.db")
                remove_db(path)
                rate, _ = build(engine, path, data, args.page_size)
                remove_db(path)
                rates[engine].append(rate)
                print(f"  {kind} build {r + 1} {engine}: {rate:,.0f} rows/s", flush=True)
        a, b = statistics.median(rates["clip_index"]), statistics.median(rates["vec0"])
        pairs = [x / y for x, y in zip(rates["clip_index"], rates["vec0"])]
        print(f"\n{kind}, {args.n:,} x {args.dims}, inserts (rows/s), {args.inserts_only} builds each:\n")
        print("| | clip_index | vec0 | clip_index / vec0 |")
        print("|---|---:|---:|---:|")
        print(f"| median | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |")
        print(f"| range | {min(rates['clip_index']):,.0f}-{max(rates['clip_index']):,.0f} | "
              f"{min(rates['vec0']):,.0f}-{max(rates['vec0']):,.0f} | "
              f"{min(pairs):.2f}-{max(pairs):.2f}x (per build pair) |")
        print(flush=True)


# One process per first query: a fresh connection in a long-lived process would find memory the
# allocator kept from the last one, and thread pools already started.
FIRST_QUERY = r"""
import sqlite3, sys, time
path, engine, ext, qfile, k, mmap = sys.argv[1:7]
db = sqlite3.connect(path, isolation_level=None)
db.enable_load_extension(True)
if engine == "vec0":
    import sqlite_vec
    sqlite_vec.load(db)
else:
    db.load_extension(ext)
if mmap != "0":
    db.execute(f"PRAGMA mmap_size = {int(mmap)}")
q = open(qfile, "rb").read()
t = time.perf_counter()
rows = db.execute("SELECT rowid FROM items WHERE embedding MATCH ? AND k = ? ORDER BY distance", (q, int(k))).fetchall()
print((time.perf_counter() - t) * 1000, ",".join(str(r[0]) for r in rows))
"""


def first_only(args, kinds, workdir):
    """The first exact query after opening, each in a new process, R rounds: clip_index, the
    baseline build when given, and vec0, in an order that rotates each round; each with
    SQLite's default pragmas and with PRAGMA mmap_size."""
    import subprocess
    import sys

    builds = [("clip_index", EXT)]
    if args.baseline:
        builds.append(("baseline", args.baseline))
    builds.append(("vec0", ""))
    engines = [(name, ext, mmap) for mmap in (0, MMAP) for name, ext in builds]
    for kind in kinds:
        data, queries = make_data(kind, args.n, args.dims, args.first_only)
        truth = exact_topk(data, queries, args.k)
        paths = {}
        for engine in ("clip_index", "vec0"):
            path = os.path.join(workdir, f"{engine}-{kind}-{args.n}-first.db")
            if not os.path.exists(path):
                build(engine, path, data, args.page_size)
            paths[engine] = path
        del data
        label = lambda name, mmap: name + (", mmap" if mmap else "")
        times = {label(n, m): [] for n, _, m in engines}
        results = {label(n, m): [] for n, _, m in engines}
        for r in range(args.first_only):
            # "First" means the file is in the OS page cache, not in the process: a VM that
            # reclaims cold pages would otherwise time a disk read now and then.
            for path in paths.values():
                with open(path, "rb") as f:
                    while f.read(16 << 20):
                        pass
            qfile = os.path.join(workdir, "first-query.bin")
            with open(qfile, "wb") as f:
                f.write(queries[r].tobytes())
            order = engines[r % len(engines):] + engines[: r % len(engines)]
            for name, ext, mmap in order:
                engine = "vec0" if name == "vec0" else "clip_index"
                out = subprocess.run(
                    [sys.executable, "-c", FIRST_QUERY, paths[engine], engine, ext, qfile, str(args.k), str(mmap)],
                    check=True, capture_output=True, text=True,
                ).stdout.split()
                times[label(name, mmap)].append(float(out[0]))
                results[label(name, mmap)].append([int(x) for x in out[1].split(",")])
                print(f"  {kind} round {r + 1} {label(name, mmap)}: {float(out[0]):,.1f} ms", flush=True)
        print(f"\n{kind}, {args.n:,} x {args.dims}, first exact query after opening (ms), "
              f"{args.first_only} processes each:\n")
        print("| | median | range | recall@k |")
        print("|---|---:|---:|---:|")
        for name, t in times.items():
            print(f"| {name} | {statistics.median(t):,.1f} | {min(t):,.1f}-{max(t):,.1f} | "
                  f"{recall(results[name], truth, args.k):.3f} |")
        print()
        for mmap in (0, MMAP):
            ours = times[label("clip_index", mmap)]
            for name, _ in builds[1:]:
                theirs = times[label(name, mmap)]
                pairs = [b / a for a, b in zip(ours, theirs)]
                print(f"{label(name, mmap)} / {label('clip_index', mmap)}: "
                      f"{statistics.median(theirs) / statistics.median(ours):.2f}x (medians), "
                      f"{min(pairs):.2f}-{max(pairs):.2f}x per round")
        print(flush=True)


def hnsw_section(kind, data, queries, truth, args, workdir):
    """Builds the HNSW table on a file of its own, then runs the queries on fresh connections,
    with SQLite's default pragmas and with PRAGMA mmap_size; the file is removed."""
    path = os.path.join(workdir, f"hnsw-{kind}-{args.n}.db")
    remove_db(path)
    options = {"hnsw_m": args.hnsw_m, "hnsw_ef_construction": args.hnsw_ef_construction}
    options = {name: value for name, value in options.items() if value is not None}
    t = time.perf_counter()
    rate, size = build("hnsw", path, data, args.page_size, options)
    built = time.perf_counter() - t
    graph_bytes = sqlite3.connect(path).execute("SELECT sum(length(data)) FROM items_hnsw").fetchone()[0]
    runs = {}
    for mmap in (False, True):
        first, memory, curves = hnsw_run(path, queries, args.k, truth, mmap)
        runs[mmap] = dict(first=first, memory=memory, curves=curves)
        print(f"  {kind} hnsw mmap={mmap}: {runs[mmap]}", flush=True)
    remove_db(path)
    return dict(options=options, built=built, rate=rate, size=size, graph_bytes=graph_bytes, runs=runs)


def print_hnsw(kind, hnsw, raw, queries, args, vec0_median=None):
    h = hnsw["runs"]
    described = ", ".join(f"{name}={value}" for name, value in hnsw["options"].items()) or "the table's defaults"
    print(f"\nclip_index HNSW (hnsw=on, {described}; int8 graph, exact rescoring; {kind}, {queries} queries):\n")
    print("| | |")
    print("|---|---:|")
    print(f"| build: inserts + final save (s) | {hnsw['built']:,.1f} ({hnsw['rate']:,.0f} rows/s) |")
    print(f"| graph on disk (MiB) | {hnsw['graph_bytes'] / 2**20:,.0f} ({hnsw['graph_bytes'] / raw:.2f}x the raw vectors) |")
    print(f"| file size / raw float32 | {hnsw['size'] / raw:.3f} |")
    for mmap in (False, True):
        label = "PRAGMA mmap_size" if mmap else "default pragmas"
        print(f"| first HNSW query after open, {label} (ms) | {h[mmap]['first']:,.1f} |")
        print(f"| memory taken by loading the graph, {label} (MiB) | {h[mmap]['memory']:,.0f} |")
    ratio = " vec0 exact / this |" if vec0_median else ""
    print(f"\n| oversample (ef = k x oversample) | median (ms) | median, mmap (ms) | recall@{args.k} | "
          f"queries with none of their top {args.k} |{ratio}")
    print("|---:|---:|---:|---:|---:|" + ("---:|" if vec0_median else ""))
    for (_, f, med, rec, miss), (_, _, med_m, _, _) in zip(h[False]["curves"], h[True]["curves"]):
        extra = f" {vec0_median / med:.0f}x |" if vec0_median else ""
        print(f"| {f} | {med:,.2f} | {med_m:,.2f} | {rec:.3f} | {miss} |{extra}")
    print(flush=True)


def hnsw_only(args, kinds, workdir):
    """Only the HNSW table: build, graph size, first query, and the recall/latency curve."""
    for kind in kinds:
        data, queries, truth = data_and_truth(kind, args)
        hnsw = hnsw_section(kind, data, queries, truth, args, workdir)
        print_hnsw(kind, hnsw, data.nbytes, len(queries), args)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dims", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=20,
                    help="exact queries, timed on each engine (vec0 takes ~1 s each at 1M)")
    ap.add_argument("--recall-queries", type=int, default=200,
                    help="queries for the quantized and HNSW modes, whose recall varies from query to "
                         "query: the exact ones first, then more drawn the same way")
    ap.add_argument("--hnsw-m", type=int, default=None, help="hnsw_m of the HNSW table (default: the table's)")
    ap.add_argument("--hnsw-ef-construction", type=int, default=None,
                    help="hnsw_ef_construction of the HNSW table (default: the table's)")
    ap.add_argument("--data", choices=["random", "clustered", "both"], default="both")
    ap.add_argument("--dir", default=None, help="where the database files go (default: a temp dir)")
    ap.add_argument("--page-size", type=int, default=None,
                    help="SQLite page size for every engine's file (default: SQLite's, 4096). Large reads of "
                         "chunk blobs cost one page lookup per page: 65536 cuts those 16-fold")
    ap.add_argument("--inserts-only", type=int, default=None, metavar="R",
                    help="only the insert comparison: build each engine's file R times, the engines "
                         "alternated (the first engine alternating too), and print the rates, their "
                         "medians and the ratio")
    ap.add_argument("--first-only", type=int, default=None, metavar="R",
                    help="only the first exact query after opening: R new processes per engine, the "
                         "engines alternated; the files are built once and kept in --dir")
    ap.add_argument("--baseline", default=None, metavar="EXT",
                    help="with --first-only: another build of archaeclip (its path without .so) "
                         "measured alongside, on the same file")
    ap.add_argument("--hnsw-only", action="store_true",
                    help="only the HNSW table (with --hnsw-m / --hnsw-ef-construction to compare graphs)")
    ap.add_argument("--plot", default=None, help="write a recall/latency plot per data set: PREFIX-random.svg, PREFIX-clustered.svg")
    args = ap.parse_args()
    kinds = ["random", "clustered"] if args.data == "both" else [args.data]
    workdir = args.dir or tempfile.mkdtemp(prefix="index-bench-")
    os.makedirs(workdir, exist_ok=True)
    print(f"{args.n:,} x {args.dims}, k = {args.k}, {args.queries} exact queries, "
          f"{max(args.queries, args.recall_queries)} for the approximate modes, page size "
          f"{args.page_size or 'default (4096)'}, files in {workdir}", flush=True)
    if args.inserts_only:
        inserts_only(args, kinds, workdir)
        return
    if args.first_only:
        first_only(args, kinds, workdir)
        return
    if args.hnsw_only:
        hnsw_only(args, kinds, workdir)
        return
    for kind in kinds:
        data, queries, truth = data_and_truth(kind, args)
        raw = data.nbytes
        rows = {}
        for engine in ["clip_index", "vec0"]:
            path = os.path.join(workdir, f"{engine}-{kind}-{args.n}.db")
            remove_db(path)
            rate, size = build(engine, path, data, args.page_size)
            times, results, curves, copies = query_run(engine, path, queries, args.k, truth, timed=args.queries)
            rows[engine] = dict(
                rate=rate,
                size=size / raw,
                first=times[0],
                median=statistics.median(times[1:]),
                recall=recall(results, truth[: args.queries], args.k),
                curves=curves,
                copies=copies,
            )
            if engine == "clip_index":
                times, _, _, _ = query_run(engine, path, queries, args.k, truth, mmap=True, timed=args.queries)
                rows[engine]["first_mmap"] = times[0]
                rows[engine]["median_mmap"] = statistics.median(times[1:])
            print(f"  {kind} {engine}: {rows[engine]}", flush=True)
            remove_db(path)
        hnsw = hnsw_section(kind, data, queries, truth, args, workdir)
        del data
        a, b = rows["clip_index"], rows["vec0"]
        print(f"\n{kind}, {args.n:,} x {args.dims}, exact top-{args.k} cosine:\n")
        print("| | clip_index | vec0 | vec0 / clip_index |")
        print("|---|---:|---:|---:|")
        print(f"| insert (rows/s) | {a['rate']:,.0f} | {b['rate']:,.0f} | {b['rate'] / a['rate']:.2f}x |")
        print(f"| file size / raw float32 | {a['size']:.3f} | {b['size']:.3f} | {b['size'] / a['size']:.2f}x |")
        print(f"| first query after open (ms) | {a['first']:,.1f} | {b['first']:,.1f} | {b['first'] / a['first']:.1f}x |")
        print(f"| median query (ms) | {a['median']:,.2f} | {b['median']:,.2f} | {b['median'] / a['median']:.1f}x |")
        print(f"| first query, PRAGMA mmap_size (ms) | {a['first_mmap']:,.1f} | | |")
        print(f"| median query, PRAGMA mmap_size (ms) | {a['median_mmap']:,.2f} | | |")
        print(f"| recall@{args.k} | {a['recall']:.3f} | {b['recall']:.3f} | |")
        print(f"\nclip_index quantized candidates + exact float32 rescoring ({kind}, {len(queries)} queries):\n")
        print(f"| mode | oversample | median (ms) | recall@{args.k} | queries with none of their top {args.k} | vec0 exact / this |")
        print("|---|---:|---:|---:|---:|---:|")
        for mode, f, med, rec, miss in a["curves"]:
            print(f"| {mode} | {f} | {med:,.2f} | {rec:.3f} | {miss} | {b['median'] / med:.0f}x |")
        print("\nEach mode's first query, which builds its in-memory copy (not in the medians): "
              + ", ".join(f"{m} {ms:,.0f} ms" for m, ms in a["copies"].items()))
        print_hnsw(kind, hnsw, raw, len(queries), args, b["median"])
        print(flush=True)
        if args.plot:
            plot(a["curves"] + hnsw["runs"][False]["curves"], a["median"], kind, args)


if __name__ == "__main__":
    main()

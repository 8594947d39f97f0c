#!/usr/bin/env python3
"""clip_index's quantized modes side by side in one run: exact float32, int8, int4 and binary
candidates (each rescored exactly with float32), recall@k against an exact numpy answer and the
median latency, as the oversampling grows. The data, the build and the recall are
benches/index_bench.py's (imported), so the numbers line up with its tables; this script skips
vec0 and HNSW, which makes a 1M run take minutes instead of half an hour.

    .venv/bin/python benches/quantized_bench.py --n 1000000
    .venv/bin/python benches/quantized_bench.py --n 1000000 --dir /tmp/qb --keep --ext /tmp/old/archaeclip

"first" is each mode's first query on the connection, which reads or builds what the mode
scans (the int8 mode reads the stored int8 codes; int4 and binary build copies from the float32
chunks); "median" the median of the next ones. `--keep` leaves the database files in `--dir` and
reuses them, so that two builds (`--ext`) can be timed on the same files.

Why int4 exists: at 1M x 512 the int8 copy is 512 MB, and this machine's two cores read memory
at ~28 GB/s, so an int8 scan cannot take less than ~18 ms; int4 reads half of that.
"""
import argparse
import os
import statistics
import tempfile

import index_bench as ib

MODES = (("int8", (1, 2, 4)), ("int4", (4, 8, 16, 32)), ("binary", (16, 32, 64)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dims", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--data", choices=["random", "clustered", "both"], default="both")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--ext", default=None, help="the archaeclip build to load (path without .so; default dist/)")
    ap.add_argument("--keep", action="store_true", help="keep the files in --dir and reuse them")
    args = ap.parse_args()
    if args.ext:
        ib.EXT = args.ext
    kinds = ["random", "clustered"] if args.data == "both" else [args.data]
    workdir = args.dir or tempfile.mkdtemp(prefix="quantized-bench-")
    os.makedirs(workdir, exist_ok=True)
    print(f"{args.n:,} x {args.dims}, k = {args.k}, {args.queries} queries, files in {workdir}", flush=True)
    for kind in kinds:
        data, queries = ib.make_data(kind, args.n, args.dims, args.queries)
        truth = ib.exact_topk(data, queries, args.k)
        path = os.path.join(workdir, f"quantized-{kind}-{args.n}.db")
        if not (args.keep and os.path.exists(path)):
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
            ib.build("clip_index", path, data)
        del data
        db = ib.connect(path, "clip_index")
        sql = "SELECT rowid FROM items WHERE embedding MATCH ? AND k = ? ORDER BY distance"
        first, _ = ib.timed_queries(db, sql, queries[:1], args.k)
        times, results = ib.timed_queries(db, sql, queries, args.k)
        rows = [("exact", "", first[0], statistics.median(times), ib.recall(results, truth, args.k))]
        for mode, factors in MODES:
            for f in factors:
                q_sql = sql.replace("k = ?", f"k = ? AND mode = '{mode}' AND oversample = {f}")
                first = [float("nan")]
                if f == factors[0]:
                    first, _ = ib.timed_queries(db, q_sql, queries[:1], args.k)
                times, results = ib.timed_queries(db, q_sql, queries, args.k)
                rows.append((mode, f, first[0], statistics.median(times), ib.recall(results, truth, args.k)))
        db.close()
        if not args.keep:
            os.remove(path)
        print(f"\n{kind}, {args.n:,} x {args.dims}, top-{args.k} cosine, candidates rescored with float32 "
              f"({os.path.basename(ib.EXT)} from {os.path.dirname(os.path.abspath(ib.EXT))}):\n")
        print(f"| mode | oversample | first (ms) | median (ms) | recall@{args.k} |")
        print("|---|---:|---:|---:|---:|")
        for mode, f, fst, med, rec in rows:
            shown = "" if fst != fst else f"{fst:,.1f}"
            print(f"| {mode} | {f} | {shown} | {med:,.2f} | {rec:.3f} |")
        print(flush=True)


if __name__ == "__main__":
    main()

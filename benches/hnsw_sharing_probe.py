#!/usr/bin/env python3
"""One process, several connections to one clip_index with an HNSW graph (as Datasette opens
them): each connection's first HNSW query and then its first exact query, their times and how
much resident memory each added. The graph and the float32 chunks are shared by the process's
connections, so only the first connection should pay.

    make build && .venv/bin/python benches/hnsw_sharing_probe.py --n 100000
"""
import argparse
import os
import tempfile
import time

from index_bench import connect, make_data, rss_mib


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--connections", type=int, default=4)
    args = ap.parse_args()
    path = os.path.join(tempfile.mkdtemp(prefix="hnsw-sharing-"), "index.db")
    data, queries = make_data("clustered", args.n, 512, 1)
    db = connect(path, "clip_index")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE VIRTUAL TABLE items USING clip_index(embedding float[512], hnsw=on)")
    for s in range(0, args.n, 10_000):
        db.execute("BEGIN")
        db.executemany("INSERT INTO items(rowid, embedding) VALUES (?, ?)",
                       [(s + i + 1, data[s + i].tobytes()) for i in range(min(10_000, args.n - s))])
        db.execute("COMMIT")
    db.execute("INSERT INTO items(items) VALUES ('optimize')")
    db.close()
    del data
    exact = "SELECT rowid FROM items WHERE embedding MATCH ? AND k = 10"
    held = []
    for i in range(args.connections):
        c = connect(path, "clip_index")
        held.append(c)
        for label, sql in (("HNSW", exact + " AND mode = 'hnsw'"), ("exact", exact)):
            before, t = rss_mib(), time.perf_counter()
            c.execute(sql, (queries[0].tobytes(),)).fetchall()
            print(f"connection {i}: first {label} query {1000 * (time.perf_counter() - t):.1f} ms, "
                  f"resident memory +{rss_mib() - before:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()

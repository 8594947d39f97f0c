#!/usr/bin/env python3
"""Is clip_index's poor HNSW recall on random Gaussian data the graph's or our int8 codes'?
Builds usearch's own index (the PyPI wheel, the same library clip_index embeds) with clip_index's
parameters (M = 16, ef_construction = 128, cosine) on standard-normal rows, once with float32
and once with clip_index's per-row int8 codes, and prints recall@10 against exact cosine.

    python3 -m venv /tmp/usv && /tmp/usv/bin/pip install usearch numpy
    /tmp/usv/bin/python benches/usearch_random_check.py --n 20000
"""
import argparse

import numpy as np
from usearch.index import Index


def int8_codes(x):
    """clip_index's graph codes: each row scaled by its own max |x| / 127, rounded."""
    scale = np.abs(x).max(axis=1, keepdims=True)
    return np.clip(np.round(x * 127 / scale), -127, 127).astype(np.int8)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--dims", type=int, default=512)
    ap.add_argument("--queries", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    data = rng.standard_normal((args.n, args.dims), dtype=np.float32)
    queries = rng.standard_normal((args.queries, args.dims), dtype=np.float32)
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    q_unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argsort(-(q_unit @ unit.T), axis=1)[:, :10]
    print(f"{args.n:,} x {args.dims} standard normal, cosine, recall@10 over {args.queries} queries")
    for dtype, rows, qs in (("f32", data, queries), ("i8", int8_codes(data), int8_codes(queries))):
        index = Index(ndim=args.dims, metric="cos", dtype=dtype, connectivity=16, expansion_add=128)
        index.add(np.arange(args.n), rows)
        for ef in (10, 40, 160):
            index.expansion_search = ef
            found = index.search(qs, 10)
            recall = np.mean([len(set(found.keys[i]) & set(truth[i])) / 10 for i in range(len(qs))])
            print(f"  {dtype} ef={ef}: {recall:.3f}")


if __name__ == "__main__":
    main()

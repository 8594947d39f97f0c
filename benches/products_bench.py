#!/usr/bin/env python3
"""The linear-layer products of one CLIP training step: archaeclip's packed kernels
(benches/products.rs, packing and output allocation included, as a step runs them) against
torch's matmuls (MKL/oneDNN) on the same shapes, 2 threads each, in one invocation.

Developer-run (torch is not a CI dependency), from the repository root:

    /tmp/refvenv/bin/python benches/products_bench.py

ops: fwd y = x·Wᵀ, dX = dY·W, dW = dYᵀ·X (x (m, k), W (n, k), dY (m, n)). Median of 7 after a
warm-up, both sides; the ratio is torch's time over archaeclip's (> 1: archaeclip faster).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time

THREADS = 2
RUNS = 7
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def archaeclip() -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS))
    out = subprocess.run(["cargo", "bench", "--locked", "--quiet", "--bench", "products", "--", "--json"],
                         cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    # float32 rows only: torch's matmuls here are float32 (the AMX bf16 rows are not comparable).
    return {(r["m"], r["k"], r["n"], r["op"]): r["seconds"] for r in rows
            if r.get("precision", "fp32") == "fp32"}


def torch_median(f) -> float:
    f()
    t = []
    for _ in range(RUNS):
        start = time.perf_counter()
        f()
        t.append(time.perf_counter() - start)
    return statistics.median(t)


def main():
    import torch

    torch.set_num_threads(THREADS)
    ours = archaeclip()
    print(f"{'rows x in -> out':>20} {'op':>4} {'torch ms':>9} {'arch. ms':>9} {'torch GF/s':>11} "
          f"{'arch. GF/s':>11} {'ratio':>7}")
    ratios = []
    for (m, k, n, op), s in ours.items():
        x, w, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
        f = {"fwd": lambda: x @ w.t(), "dX": lambda: dy @ w, "dW": lambda: dy.t() @ x}[op]
        t = torch_median(f)
        flops = 2 * m * k * n
        ratios.append(t / s)
        print(f"{f'{m} x {k} -> {n}':>20} {op:>4} {t * 1e3:>9.2f} {s * 1e3:>9.2f} {flops / t / 1e9:>11.1f} "
              f"{flops / s / 1e9:>11.1f} {t / s:>6.2f}x")
    print(f"median ratio {statistics.median(ratios):.2f}x over {len(ratios)} products "
          f"(torch {torch.__version__}, {THREADS} threads, {os.cpu_count()} CPUs here)")


if __name__ == "__main__":
    main()

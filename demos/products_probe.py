#!/usr/bin/env python
"""Issue 16 (session 44): the policy's matrix products in a training batch at the 2019 setting, one thread.

1. ``--in-batch``: every ``fused_gru._lin`` call of a few training batches timed (a perf_counter wrapper), grouped by
   the operands' shapes: ms per batch and GFLOP/s of each product, as it runs among the batch's other work;
2. ``--alone``: the three weight-gradient products of one inner step (reductions over the 2,000 rows: K = 64 and 34
   against the 192 gate columns, 64 against the 66 head columns) timed alone, in the orientations ``_lin`` could
   take, and the same done once for 20 steps' rows (40,000-row reductions, as a batch-deferred weight gradient
   would): the per-step equivalent of that one product.

    OPENBLAS_NUM_THREADS=1 python demos/products_probe.py --in-batch --alone
"""
import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from badger_runtime.bench import train as bt  # noqa: E402
from badger_runtime.training import fused_gru  # noqa: E402

M = 2000  # rows of one inner step: batch 100 x N = 20


def in_batch(batches: int = 6, warmup: int = 2):
    stats = collections.defaultdict(lambda: [0, 0.0])
    real = fused_gru._lin

    def timed(a, w, b=None):
        t = time.perf_counter()
        out = real(a, w, b)
        key = (tuple(a.shape), a.is_contiguous(), tuple(w.shape), w.is_contiguous(), b is not None)
        stats[key][0] += 1
        stats[key][1] += time.perf_counter() - t
        return out

    fused_gru._lin = timed
    try:
        cfg, task, ops, policy, opt = bt.reference_trainer(0, 1)
        times = []
        for i, (ep, wiring) in enumerate(bt.reference_batches(cfg, task, np.random.default_rng(0), batches)):
            if i == warmup:
                stats.clear()
            t = time.perf_counter()
            bt.training_step(ops, policy, opt, cfg, ep, wiring, bt.REFERENCE["steps"])
            if i >= warmup:
                times.append(time.perf_counter() - t)
    finally:
        fused_gru._lin = real
    n = len(times)
    print(f"batch: {1e3 * np.median(times):.1f} ms (median of {n})")
    total = 0.0
    for ((m, k), a_contig, (cols, _), w_contig, bias), (calls, dt) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
        total += dt
        print(f"  [{m} x {k}]{'' if a_contig else ' (view)'} x [{k} x {cols}]{'' if w_contig else ' (view)'}"
              f"{' + b' if bias else ''}: {calls / n:.0f} calls, {1e3 * dt / n:.2f} ms per batch, "
              f"{2 * m * k * cols * calls / dt / 1e9:.0f} GFLOP/s")
    print(f"  all products: {1e3 * total / n:.1f} ms per batch")


def _best(f, n: int) -> float:
    for _ in range(10):
        f()
    out = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            f()
        out.append((time.perf_counter() - t) / n)
    return min(out)


def alone(steps: int = 20):
    lin = fused_gru._lin
    for k, cols in ((64, 192), (34, 192), (64, 66)):
        x, g = torch.randn(M, k), torch.randn(M, cols)
        flop = 2 * M * k * cols
        for name, f in (("_lin(x^T, g^T)^T (as training runs it)", lambda: lin(x.t(), g.t()).t()),
                        ("_lin(g^T, x^T)", lambda: lin(g.t(), x.t())),
                        ("torch.mm(x^T, g)", lambda: torch.mm(x.t(), g))):
            t = _best(f, 200)
            print(f"K = {k}, {cols} columns, {name}: {1e3 * t:.3f} ms, {flop / t / 1e9:.0f} GFLOP/s")
        xs, gs = torch.randn(steps * M, k), torch.randn(steps * M, cols)
        t = _best(lambda: lin(xs.t(), gs.t()).t(), 20)
        print(f"K = {k}, {cols} columns, one product over {steps} steps' rows: {1e3 * t / steps:.3f} ms per step, "
              f"{steps * flop / t / 1e9:.0f} GFLOP/s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in-batch", action="store_true")
    p.add_argument("--alone", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.in_batch or not args.alone:
        in_batch()
    if args.alone or not args.in_batch:
        alone()


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Issue 16's training profile at the 2019 code's setting (batch 100, N = 20, 20 inner steps,
scalar feedback, d = 3, dense routing, 1 round, 1 thread): torch ops and autograd nodes per batch
(load-independent counts) and the top ops by self CPU time, from the torch profiler over
``--batches`` batches after one warm-up.

    python demos/profile_train.py --batches 3
"""
import argparse

import numpy as np
from torch.profiler import ProfilerActivity, profile

from badger_runtime.bench.train import (matmul_limits, reference_batches, reference_flops, reference_trainer,
                                        training_step)


#: the ops whose self time is matmul work (torch's BLAS, and oneDNN's linear, which the fused GRU step uses)
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args(argv)
    cfg, task, ops, policy, opt = reference_trainer(seed=0, threads=1)
    rng = np.random.default_rng(0)

    def batch():
        training_step(ops, policy, opt, cfg, *reference_batches(cfg, task, rng, 1)[0], 20)

    batch()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.batches):
            batch()
    events = prof.key_averages()
    ops_per_batch = sum(e.count for e in events if not e.key.startswith(("autograd::engine", "Optimizer"))
                        and "Backward" not in e.key) / args.batches
    nodes = sum(e.count for e in events if e.key.startswith("autograd::engine::evaluate_function")) / args.batches
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    top = [e for e in top if not e.key.startswith(("autograd::engine", "Optimizer.step"))][:args.top]
    print(f"torch ops per batch (forward and backward calls, profiler events): {ops_per_batch:,.0f}")
    print(f"autograd nodes per batch: {nodes:,.0f}")
    print("top ops by self CPU time (share, calls per batch): " + ", ".join(
        f"{e.key.replace('aten::', '')} {100 * e.self_cpu_time_total / total:.0f}% ({e.count / args.batches:.0f})"
        for e in top))
    # the ceiling of any fusion that keeps torch's matmuls: were every other op free, a batch would still
    # take its matmuls' time; against the limit (the batch's model FLOPs at a large matmul's rate)
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / args.batches / 1e6
    flops = reference_flops(cfg.policy)
    limit = flops / (matmul_limits(threads=1)[1] * 1e9)  # at the fastest matmul found: the limit (bench.train)
    per_batch = total / args.batches / 1e6
    print(f"matmuls ({', '.join(m.split('::')[1] for m in MATMULS)}): {1e3 * mm:.0f} ms of "
          f"{1e3 * per_batch:.0f} ms of self CPU time per batch ({100 * mm / per_batch:.0f}%); the batch at the "
          f"limit: {1e3 * limit:.0f} ms, so with every other op free: {100 * limit / mm:.0f}% of the limit")


if __name__ == "__main__":
    main()

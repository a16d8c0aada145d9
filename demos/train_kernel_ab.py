#!/usr/bin/env python
"""Issue 16: the training step at the 2019 setting (batch 100, N = 20, 20 inner steps, d = 3, one thread)
three ways in one process, interleaved (thread CPU time per batch of 4 batches, ``--rounds`` rounds):

- ``before``: ``nn.GRUCell`` and the heads split twice per step (the code before session 37);
- ``ops``: the GRU step as one autograd node with torch ops (``fused_gru.GRUStep``), heads split once
  (what training runs without a C compiler);
- ``kernel``: the GRU step and the heads as one node with the gates in the compiled kernel and the products
  through oneDNN where torch has it (``fused_gru.PolicyStepKernel``), the default.

The limits are ``badger bench train``'s (the model's FLOPs at a one-thread 384 x 384 matmul's rate, measured
after every round): torch's default matmul, and the fastest found (torch's oneDNN linear where it is faster).

    python demos/train_kernel_ab.py --rounds 8
"""
import argparse
import sys
import time

import numpy as np

from badger_runtime import engine
from badger_runtime.bench.train import (matmul_limits, reference_batches, reference_flops, reference_trainer,
                                        training_step)
from badger_runtime.rollout import AgentState, agent_step
from badger_runtime.training import kernels
from badger_runtime.training.model import ExpertPolicy

ROWS = ("before", "ops", "kernel")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args(argv)
    cfg, task, ops, policy, opt = reference_trainer(seed=0, threads=1)
    eps = reference_batches(cfg, task, np.random.default_rng(0), 4)
    lib = kernels.kernel()
    mode = ["kernel"]

    def step(ops_, policy_, cfg_, wiring, state, *a, **k):
        if mode[0] == "before":  # drop the split heads a step leaves for the next
            state = AgentState(state.h, state.heads)
        return agent_step(ops_, policy_, cfg_, wiring, state, *a, **k)

    engine.agent_step = step
    res = {k: [] for k in ROWS}
    lim, best = [], []
    for _ in range(args.rounds):
        for k in ROWS:
            mode[0] = k
            ExpertPolicy.fused = k != "before"
            kernels._KERNEL = lib if k == "kernel" else False
            training_step(ops, policy, opt, cfg, *eps[0], 20)  # warm-up
            t0 = time.thread_time()
            for i in range(4):
                training_step(ops, policy, opt, cfg, *eps[i], 20)
            res[k].append((time.thread_time() - t0) / 4)
        for acc, rate in zip((lim, best), matmul_limits(threads=1)):
            acc.append(rate)
    flops = reference_flops(cfg.policy)
    g, gb = sorted(lim)[len(lim) // 2], sorted(best)[len(best) // 2]
    at_limit, at_best = flops / (g * 1e9), flops / (gb * 1e9)
    print(f"torch.mm {min(lim):.0f}-{max(lim):.0f} GFLOP/s (median {g:.0f}), batch at that limit "
          f"{1e3 * at_limit:.1f} ms; fastest matmul found {gb:.0f} GFLOP/s, batch {1e3 * at_best:.1f} ms")
    for k, v in res.items():
        med = sorted(v)[len(v) // 2]
        print(f"{k:7s} ms/batch median {1e3 * med:.1f} (min {1e3 * min(v):.1f}, max {1e3 * max(v):.1f}): "
              f"{100 / med:.0f} episodes/s, {100 * at_limit / med:.1f} % of the torch.mm limit "
              f"(best round {100 * at_limit / min(v):.1f} %), {100 * at_best / med:.1f} % of the fastest matmul's")


if __name__ == "__main__":
    main(sys.argv[1:])

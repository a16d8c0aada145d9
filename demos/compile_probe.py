#!/usr/bin/env python
"""Issue 16 probe: the training step at the 2019 setting (batch 100, N = 20, 20 steps, scalar
feedback, dense routing, 1 round, 1 thread), eager against torch.compile, interleaved; CPU time
per batch (thread time, median over the timed batches after the warm-ups).

    python demos/compile_probe.py                 # the policy's forward compiled (dynamic shapes)
    python demos/compile_probe.py --whole         # the whole inner step (rollout.agent_step) compiled
    python demos/compile_probe.py --whole --mode max-autotune-no-cudagraphs

The compiled variant must compute the eager one's outputs (checked on the first batch, 1e-5).
"""
import argparse
import time

import numpy as np
import torch

import badger_runtime.engine as engine
from badger_runtime.bench.train import reference_batches, reference_setup, training_step
from badger_runtime.rollout import agent_step
from badger_runtime.training.model import ExpertPolicy


def one_batch(ops, policy, opt, cfg, ep, w):
    c0 = time.thread_time()
    out = training_step(ops, policy, opt, cfg, ep, w, 20)
    return time.thread_time() - c0, out.outputs.detach()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--whole", action="store_true", help="compile rollout.agent_step, not only the policy's forward")
    p.add_argument("--mode", default=None, help="torch.compile mode (default: inductor's default)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds of --batches batches per variant")
    p.add_argument("--batches", type=int, default=3)
    args = p.parse_args(argv)
    cfg, task, ops = reference_setup(seed=0, threads=1)
    data = reference_batches(cfg, task, np.random.default_rng(0), args.batches + 1)
    eager = ExpertPolicy(cfg.policy)
    comp = ExpertPolicy(cfg.policy)
    comp.load_state_dict(eager.state_dict())
    opts = {"eager": torch.optim.Adam(eager.parameters(), 1e-4), "compiled": torch.optim.Adam(comp.parameters(), 1e-4)}
    compiled_step = torch.compile(agent_step, dynamic=False, mode=args.mode) if args.whole else None
    if not args.whole:
        comp.forward = torch.compile(comp.forward, dynamic=True, mode=args.mode)

    def variant(name):
        if name == "compiled" and compiled_step is not None:
            engine.agent_step = compiled_step
        else:
            engine.agent_step = agent_step
        return eager if name == "eager" else comp

    # warm-up (the compile) and the parity check on the same batch and the same weights
    t_first = {}
    first = {}
    for name in ("eager", "compiled"):
        t0 = time.perf_counter()
        _, first[name] = one_batch(ops, variant(name), opts[name], cfg, *data[0])
        t_first[name] = time.perf_counter() - t0
    diff = float((first["eager"] - first["compiled"]).abs().max())
    print(f"first batch (compile) wall s: eager {t_first['eager']:.2f}, compiled {t_first['compiled']:.2f}; "
          f"max |outputs eager - compiled| = {diff:.2e}", flush=True)
    assert diff < 1e-5, "the compiled step computes something else"
    times = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for name in ("eager", "compiled"):
            pol = variant(name)
            for ep, w in data[1:]:
                times[name].append(one_batch(ops, pol, opts[name], cfg, ep, w)[0])
    engine.agent_step = agent_step
    for name, ts in times.items():
        m = float(np.median(ts))
        print(f"{name}: median CPU s/batch {m:.4f} ({100 / m:.0f} episodes/s), over {len(ts)} batches", flush=True)
    print(f"compiled / eager: {np.median(times['compiled']) / np.median(times['eager']):.3f}")


if __name__ == "__main__":
    main()

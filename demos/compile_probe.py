#!/usr/bin/env python
"""Issue 16 probe: the training step at the 2019 setting (batch 100, N = 20, 20 steps, scalar
feedback, 1 thread) with the expert policy eager, then with its forward under torch.compile
(dynamic shapes), then eager again; CPU time per batch (median of 6 after one warm-up).

    python demos/compile_probe.py
"""
import time

import numpy as np
import torch

from badger_runtime.config import AgentConfig
from badger_runtime.rollout import rollout, sample_wiring
from badger_runtime.tasks import default_config, make_task
from badger_runtime.training.model import ExpertPolicy, torch_ops
torch.set_num_threads(1); torch.manual_seed(0)
cfg = AgentConfig().validate()
task = make_task(default_config("guessing", feedback="scalar"))
ops = torch_ops()
def run(policy, label, reps=6):
    opt = torch.optim.Adam(policy.parameters(), 1e-4)
    rng = np.random.default_rng(0); ts=[]
    for r in range(reps+1):
        ep = task.sample(rng, 100, dims=3, experts=20, steps=20, addr_dim=cfg.policy.addr_dim)
        w = sample_wiring(rng, cfg, 100, 20)
        c0 = time.thread_time()
        out = rollout(ops, policy, cfg, ep, w, steps=20)
        opt.zero_grad(set_to_none=True); out.losses.mean().backward(); opt.step()
        if r: ts.append(time.thread_time()-c0)
        else: print(label, "first (compile) CPU s", round(time.thread_time()-c0,2), flush=True)
    print(label, "median CPU s/batch", round(float(np.median(ts)),4), "episodes/s", round(100/float(np.median(ts)),1), flush=True)
if __name__ == "__main__":
    base = ExpertPolicy(cfg.policy)
    run(base, "eager")
    comp = ExpertPolicy(cfg.policy)
    comp.load_state_dict(base.state_dict())
    comp.forward = torch.compile(comp.forward, dynamic=True)
    run(comp, "compiled")
    run(base, "eager again")

"""`badger bench train`: outer-loop training throughput against N experts and inner steps.

Measures full training steps (rollout + backward + Adam) of the torch model on the
scalar-feedback guessing game; reports episodes/s and expert-steps/s (episodes x N x T
per second). Needs the 'train' extra.
"""

from __future__ import annotations

import platform
import time

import numpy as np


def bench_train(experts=(5, 20, 40, 80), steps=(10, 20, 40), batch: int = 64, repeats: int = 5, dims: int = 3,
                threads: int = 1, seed: int = 0) -> dict:
    import torch

    from ..config import AgentConfig
    from ..rollout import rollout, sample_wiring
    from ..tasks import default_config, make_task
    from ..training.model import ExpertPolicy, torch_ops

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = AgentConfig().validate()
    task = make_task(default_config("guessing", feedback="scalar"))
    policy = ExpertPolicy(cfg.policy)
    opt = torch.optim.Adam(policy.parameters(), 1e-4)
    ops = torch_ops()
    rng = np.random.default_rng(seed)
    rows = []
    for n in experts:
        for T in steps:
            times = []
            for r in range(repeats + 1):
                ep = task.sample(rng, batch, dims=dims, experts=n, steps=T, addr_dim=cfg.policy.addr_dim)
                w = sample_wiring(rng, cfg, batch, n)
                t0 = time.perf_counter()
                out = rollout(ops, policy, cfg, ep, w, steps=T)
                opt.zero_grad(set_to_none=True)
                out.losses.mean().backward()
                opt.step()
                if r:  # the first is a warm-up
                    times.append(time.perf_counter() - t0)
            sec = float(np.median(times))
            rows.append({"experts": n, "steps": T, "batch": batch, "sec_per_batch": sec,
                         "episodes_per_s": batch / sec, "expert_steps_per_s": batch * n * T / sec})
    return {"bench": "train", "threads": threads, "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor() or None, "rows": rows}

"""`badger bench train`: outer-loop training throughput against N experts and inner steps.

Measures full training steps (rollout + backward + Adam) of the torch model on the
scalar-feedback guessing game; reports episodes/s and expert-steps/s (episodes x N x T
per second). Needs the 'train' extra.

``reference`` adds the 2019 code's setting (batch 100, N = 20, 20 inner steps, hidden 64, d = 3,
scalar feedback, one round) measured against this machine's limit: the model's FLOPs per batch
(``model_flops``, forward x 3 for forward + backward) at the GFLOP/s a plain one-thread matmul
reaches in the same run (``matmul_gflops``), so ``fraction_of_limit`` = episodes/s over the
episodes/s the FLOPs would allow.
"""

from __future__ import annotations

import platform
import time

import numpy as np


REFERENCE = {"batch": 100, "experts": 20, "steps": 20, "dims": 3}  # the 2019 code's setting


def model_flops(spec, *, batch: int, experts: int, steps: int, dims: int, slots: int, rounds: int = 1,
                dense: bool = True, candidates: int = 0) -> float:
    """FLOPs of one training batch (forward x 3: forward + backward) of the inner loop: the GRU
    cell and the heads for every expert and round, routing (dense: N^2 scores and mixes; sparse:
    N x C), sensing (scores and reads over the J slots) and pushing (d x N)."""
    H, A, K = spec.hidden, spec.addr_dim, spec.read_heads
    n, senders = experts, (experts if dense else candidates + 1)
    gru = 2 * 3 * H * (spec.msg_dim + spec.sensed_dim + H)
    heads = 2 * H * spec.heads_dim
    route = 2 * n * senders * (spec.key_dim + spec.msg_dim)
    sense = 2 * n * K * slots * (A + spec.read_width)
    push = 2 * dims * n * (2 * A + 1)
    per_episode_step = rounds * (n * (gru + heads) + route) + sense + push
    return 3.0 * batch * steps * per_episode_step


def matmul_gflops(threads: int = 1, size: int = 384, repeats: int = 30) -> float:
    """GFLOP/s of a plain float32 matmul on this machine (the best of ``repeats``), torch, ``threads``."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def bench_train(experts=(5, 20, 40, 80), steps=(10, 20, 40), batch: int = 64, repeats: int = 5, dims: int = 3,
                threads: int = 1, seed: int = 0, reference: bool = True) -> dict:
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
    sizes = [(batch, n, T, dims) for n in experts for T in steps]
    if reference:
        r = REFERENCE
        sizes.append((r["batch"], r["experts"], r["steps"], r["dims"]))
    for batch, n, T, dims in sizes:
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
        flops = model_flops(cfg.policy, batch=batch, experts=n, steps=T, dims=dims, slots=dims + 1)
        rows.append({"experts": n, "steps": T, "batch": batch, "sec_per_batch": sec,
                     "episodes_per_s": batch / sec, "expert_steps_per_s": batch * n * T / sec,
                     "gflop_per_batch": flops / 1e9, "gflops": flops / sec / 1e9})
    limit = matmul_gflops(threads)
    out = {"bench": "train", "threads": threads, "torch": torch.__version__, "machine": platform.machine(),
           "processor": platform.processor() or None, "matmul_gflops": limit, "rows": rows}
    if reference:
        ref = rows[-1] | {"setting": "2019 reference: batch 100, N = 20, 20 steps, hidden 64, d = 3, scalar"}
        ref["limit_episodes_per_s"] = limit * 1e9 / (ref["gflop_per_batch"] * 1e9) * ref["batch"]
        ref["fraction_of_limit"] = ref["episodes_per_s"] / ref["limit_episodes_per_s"]
        out["reference"] = ref
        out["fraction_of_limit"] = ref["fraction_of_limit"]
    return out

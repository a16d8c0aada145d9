"""`badger bench train`: outer-loop training throughput against N experts and inner steps.

Measures full training steps (rollout + backward + Adam) of the torch model on the
scalar-feedback guessing game; reports episodes/s and expert-steps/s (episodes x N x T
per second), the microseconds per expert-step (wall and this thread's CPU time: the machine is
shared, and CPU time leaves out the time other processes took), the process's peak RSS so far,
and how the time grows with N (``growth``: the slope of log seconds against log N). Routing
is dense attention (the default agent's, O(N^2)) or top-k over C candidate senders
(``routing="topk", candidates=C``: the deployed runtimes' sparse math, O(N C)). Needs the
'train' extra.

``reference`` adds the 2019 code's setting (batch 100, N = 20, 20 inner steps, hidden 64, d = 3,
scalar feedback, one round) measured against this machine's limit: the model's FLOPs per batch
(``model_flops``, forward x 3 for forward + backward) at the GFLOP/s a plain one-thread matmul
reaches in the same run (``matmul_gflops``, the best of 30), so ``fraction_of_limit`` = episodes/s
over the episodes/s the FLOPs would allow; ``cpu_fraction_of_limit`` is the same with the batch's
CPU time in place of its wall time (on a shared machine the wall time counts other processes' turns).
"""

from __future__ import annotations

import math
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


def matmul_gflops(threads: int = 1, size: int = 384, repeats: int = 30, backend: str = "torch") -> float:
    """GFLOP/s of a plain float32 matmul on this machine (the best of ``repeats``), ``threads``: torch's
    default (``torch.mm``: MKL in the x86 wheels) or, with ``backend="onednn"``, torch's oneDNN linear
    (``training.fused_gru.onednn_linear``, what the training step's policy products use where it exists;
    on AMD CPUs ~2x the MKL rate, docs/benchmarks.md). NaN where that backend is missing."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    if backend == "onednn":
        from ..training.fused_gru import onednn_linear

        op = onednn_linear()
        if op is None:
            return float("nan")
        run = lambda: op(a, b, None, "none", [], "")  # noqa: E731
    else:
        run = lambda: torch.mm(a, b)  # noqa: E731
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def matmul_limits(threads: int = 1) -> tuple[float, float]:
    """(torch's default matmul GFLOP/s, the fastest float32 matmul found: that or torch's oneDNN linear):
    the two limits ``bench_train`` reports (``matmul_gflops``, ``best_matmul_gflops``)."""
    limit, onednn = matmul_gflops(threads), matmul_gflops(threads, backend="onednn")
    return limit, limit if math.isnan(onednn) else max(limit, onednn)


def reference_batches(cfg, task, rng: np.random.Generator, n: int) -> list:
    """n (episode, wiring) pairs of the 2019 setting (``REFERENCE``: batch 100, N = 20, 20 steps, d = 3),
    as the benchmark and the probes in demos/ time them."""
    from ..rollout import sample_wiring

    r = REFERENCE
    return [(task.sample(rng, r["batch"], dims=r["dims"], experts=r["experts"], steps=r["steps"],
                         addr_dim=cfg.policy.addr_dim), sample_wiring(rng, cfg, r["batch"], r["experts"]))
            for _ in range(n)]


def reference_flops(spec) -> float:
    """The model FLOPs of one training batch of the 2019 setting (forward x 3), as ``bench_train``
    counts its reference row."""
    r = REFERENCE
    return model_flops(spec, batch=r["batch"], experts=r["experts"], steps=r["steps"], dims=r["dims"],
                       slots=r["dims"] + 1)


def reference_setup(seed: int = 0, threads: int = 1):
    """The 2019 code's training setting (the limit's reference and the probes' in demos/): torch on
    ``threads`` threads, seeded; the default agent (dense attention, 1 round, hidden 64) and the
    scalar-feedback guessing game. Returns (agent config, task, torch ops)."""
    import torch

    from ..config import AgentConfig
    from ..tasks import default_config, make_task
    from ..training.model import torch_ops

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return AgentConfig().validate(), make_task(default_config("guessing", feedback="scalar")), torch_ops()


def reference_trainer(seed: int = 0, threads: int = 1):
    """``reference_setup`` and a fresh policy with its optimizer (Adam, lr 1e-4, as ``bench_train``):
    (agent config, task, torch ops, policy, optimizer), what the probes in demos/ train."""
    import torch

    from ..training.model import ExpertPolicy

    cfg, task, ops = reference_setup(seed, threads)
    policy = ExpertPolicy(cfg.policy)
    return cfg, task, ops, policy, torch.optim.Adam(policy.parameters(), 1e-4)


def training_step(ops, policy, opt, cfg, episode, wiring, steps: int):
    """One outer-loop step as the benchmarks time it: the rollout, the backward pass of the mean
    loss, an optimizer step. Returns the rollout."""
    from ..rollout import rollout

    out = rollout(ops, policy, cfg, episode, wiring, steps=steps)
    opt.zero_grad(set_to_none=True)
    out.losses.mean().backward()
    opt.step()
    return out


def bench_train(experts=(5, 20, 40, 80), steps=(10, 20, 40), batch: int = 64, repeats: int = 5, dims: int = 3,
                threads: int = 1, seed: int = 0, reference: bool = True, routing: str = "dense", k: int = 8,
                candidates: int = 0) -> dict:
    import os
    import resource

    import torch

    from ..config import AgentConfig, RoutingConfig
    from ..rollout import sample_wiring
    from ..training.model import ExpertPolicy

    ref_cfg, task, ops = reference_setup(seed, threads)  # the 2019 setting: dense attention
    cfg = AgentConfig(routing=RoutingConfig(kind=routing, k=k, candidates=candidates)).validate()
    policy = ExpertPolicy(cfg.policy)
    opt = torch.optim.Adam(policy.parameters(), 1e-4)
    rng = np.random.default_rng(seed)
    rows = []
    sizes = [(batch, n, T, dims, cfg) for n in experts for T in steps]
    if reference:
        r = REFERENCE
        sizes.append((r["batch"], r["experts"], r["steps"], r["dims"], ref_cfg))
    for batch, n, T, dims, acfg in sizes:
        times, cpu = [], []
        for r in range(repeats + 1):
            ep = task.sample(rng, batch, dims=dims, experts=n, steps=T, addr_dim=acfg.policy.addr_dim)
            w = sample_wiring(rng, acfg, batch, n)
            t0, c0 = time.perf_counter(), time.thread_time()
            training_step(ops, policy, opt, acfg, ep, w, T)
            if r:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
                cpu.append(time.thread_time() - c0)
        sec, cpu_sec = float(np.median(times)), float(np.median(cpu))
        rc = acfg.routing
        sparse = rc.kind == "topk" and 0 < rc.candidates < n
        flops = model_flops(acfg.policy, batch=batch, experts=n, steps=T, dims=dims, slots=dims + 1, dense=not sparse,
                            candidates=rc.candidates)
        rows.append({"experts": n, "steps": T, "batch": batch, "routing": rc.kind, "k": rc.k,
                     "candidates": rc.candidates if sparse else 0, "sec_per_batch": sec, "cpu_sec_per_batch": cpu_sec,
                     "episodes_per_s": batch / sec, "expert_steps_per_s": batch * n * T / sec,
                     "us_per_expert_step": sec / (batch * n * T) * 1e6,
                     "cpu_us_per_expert_step": cpu_sec / (batch * n * T) * 1e6,
                     "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                     "gflop_per_batch": flops / 1e9, "gflops": flops / sec / 1e9})
    limit, best = matmul_limits(threads)
    from ..training.fused_gru import onednn_linear
    from ..training.kernels import kernel

    fused = kernel() is not None and ExpertPolicy.fused
    out = {"bench": "train", "threads": threads, "torch": torch.__version__, "machine": platform.machine(),
           "processor": platform.processor() or None, "matmul_gflops": limit, "loadavg_at_end": os.getloadavg(),
           # the fastest float32 matmul found here (torch's default or its oneDNN linear): the machine's limit
           "best_matmul_gflops": best,
           # whether the GRU step ran with its gates compiled (training/kernels.py) or in torch ops, and
           # whether its products went through oneDNN (either fused path uses it, fused_gru._lin)
           "gru_kernel": fused, "onednn_products": ExpertPolicy.fused and onednn_linear() is not None,
           "rows": rows, "growth": growth(rows[:-1] if reference else rows)}
    if reference:
        ref = rows[-1] | {"setting": "2019 reference: batch 100, N = 20, 20 steps, hidden 64, d = 3, scalar"}
        ref["limit_episodes_per_s"] = limit * 1e9 / (ref["gflop_per_batch"] * 1e9) * ref["batch"]
        ref["fraction_of_limit"] = ref["episodes_per_s"] / ref["limit_episodes_per_s"]
        # the same by this thread's CPU time: leaves out what other processes took on a shared machine
        # (the limit is the best of repeated matmuls: it already leaves that out)
        ref["cpu_fraction_of_limit"] = ref["batch"] / ref["cpu_sec_per_batch"] / ref["limit_episodes_per_s"]
        # against the fastest matmul found on this machine (where oneDNN outruns torch's default, as on AMD
        # CPUs, this is the honest limit: the fraction above overstates how close training is to it)
        ref["best_limit_episodes_per_s"] = best * 1e9 / (ref["gflop_per_batch"] * 1e9) * ref["batch"]
        ref["fraction_of_best_limit"] = ref["episodes_per_s"] / ref["best_limit_episodes_per_s"]
        out["reference"] = ref
        out["fraction_of_limit"] = ref["fraction_of_limit"]
        out["cpu_fraction_of_limit"] = ref["cpu_fraction_of_limit"]
        out["fraction_of_best_limit"] = ref["fraction_of_best_limit"]
    return out


def growth(rows: list[dict]) -> dict:
    """Per inner-step count T: the least-squares slope of log(seconds per batch) against log(N)
    (1.0: linear in N, 2.0: quadratic), over the rows' N (at least two)."""
    out = {}
    for T in sorted({r["steps"] for r in rows}):
        rs = [r for r in rows if r["steps"] == T]
        if len({r["experts"] for r in rs}) < 2:
            continue
        x, y = np.log([r["experts"] for r in rs]), np.log([r["sec_per_batch"] for r in rs])
        out[str(T)] = {"slope": round(float(np.polyfit(x, y, 1)[0]), 2),
                       "n": [min(r["experts"] for r in rs), max(r["experts"] for r in rs)]}
    return out

"""How well could N experts' pushes fit d outputs at all? (issue 13: is the output side the limit?)

The membrane collects the outputs as ``membrane.push`` does: output j = sum over experts n of
softmax_n(a_j . key_n / sqrt(addr_dim)) (c_n + u_n . a_j), with a_j the task's random output
addresses (``tasks.guessing.random_addresses``: directions of addr_dim - 2 entries, norm
sqrt(addr_dim - 2)). Here the keys and the affine pushes (c, u) are not produced by a policy but
fitted directly to one random target (uniform in [-1, 1], the guessing game's) by Adam: the error
they reach (3 x MSE, the tables' unit; chance 1.0) is what the best possible agent of N experts
could reach on that target in the limit, whatever it sensed and said. Compare with the trained
agent's error at the same d and N (docs/results.md).

    python demos/push_capacity.py --seed 0 --dims 128,512,2048 --experts 32,320 --addr-dim 8,16
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from badger_runtime.tasks.guessing import random_addresses  # noqa: E402


def best_fit(d: int, n: int, addr_dim: int, seed: int, iters: int) -> tuple[float, float]:
    """(the error reached, the keys' mean norm) for one random target of d outputs."""
    import torch

    rng = np.random.default_rng(seed)
    a = torch.as_tensor(random_addresses(rng, (d,), addr_dim))
    y = torch.as_tensor(rng.uniform(-1, 1, d).astype(np.float32))
    g = torch.Generator().manual_seed(seed)
    key = torch.randn(n, a.shape[1], generator=g).requires_grad_()
    c = torch.zeros(n, requires_grad=True)
    u = torch.zeros(n, a.shape[1], requires_grad=True)
    opt = torch.optim.Adam([key, c, u], lr=0.05)
    for _ in range(iters):
        w = torch.softmax(a @ key.T / math.sqrt(addr_dim), dim=1)  # [d, n]; the kind flags are 0 on outputs
        out = (w * (c[None] + a @ u.T)).sum(1)
        loss = 3 * ((out - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach()), float(key.detach().norm(dim=1).mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default="128,512,2048")
    p.add_argument("--experts", default="32,320")
    p.add_argument("--addr-dim", default="8,16", help="the policy's addr_dim (scale-v1: 8)")
    p.add_argument("--iters", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    ns = [int(x) for x in args.experts.split(",")]
    t0 = time.perf_counter()
    print("| addr_dim | d | " + " | ".join(f"N = {n}: error (key norm)" for n in ns) + " |")
    print("|---|---|" + "---|" * len(ns))
    for A in (int(x) for x in args.addr_dim.split(",")):
        for d in (int(x) for x in args.dims.split(",")):
            cells = [best_fit(d, n, A, args.seed, args.iters) for n in ns]
            print(f"| {A} | {d} | " + " | ".join(f"{e:.3f} ({k:.1f})" for e, k in cells) + " |", flush=True)
    print(f"\n_{time.perf_counter() - t0:.0f} s, seed {args.seed}, {args.iters} Adam steps (lr 0.05) per cell._")


if __name__ == "__main__":
    main()

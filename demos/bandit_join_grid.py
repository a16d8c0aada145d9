"""How fresh experts hot-added to the handcrafted bandit cell (``training/inits.arm_index``) change its
regret, for several ways of letting them into their arm's score: the first push-key copy of the arm's
address written after ``join_after`` pulls, and further copies at further counts (``join_more``), so
that among the experts of an arm the more experienced outweigh the newer. For each setting: the
regret at T steps of the unchanged agent and of the same agent with as many fresh experts again at
mid-episode, paired over the same seeded episodes (tuning seed, never an evaluation seed).

    python demos/bandit_join_grid.py --seed 12345 --episodes 400 --join-after 2,5 --join-more ";20,100" --hidden 128
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from badger_runtime.config import AgentConfig, PolicySpec
from badger_runtime.episodes import schedule
from badger_runtime.evaluation import run_episodes
from badger_runtime.tasks import default_config
from badger_runtime.training.inits import arm_index
from badger_runtime.training.model import ExpertPolicy, torch_ops


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--episodes", type=int, default=400)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--arms", type=int, default=10)
    ap.add_argument("--experts", type=int, default=20)
    ap.add_argument("--beta", type=float, default=48.0)
    ap.add_argument("--kappa", type=float, default=0.8)
    ap.add_argument("--n-cap", type=int, default=400)
    ap.add_argument("--hidden", type=int, default=128, help="hidden units (each further copy needs addr_dim - 2)")
    ap.add_argument("--join-after", default="5", help="comma list: the first copy's pull counts")
    ap.add_argument("--join-more", default="", help="';'-separated settings, each a comma list of further "
                                                     "copies' pull counts ('' : none)")
    args = ap.parse_args()
    spec = PolicySpec(hidden=args.hidden, msg_dim=16, key_dim=8, addr_dim=24, read_heads=2, id_dim=8, init_noise=0.0)
    agent = AgentConfig(policy=spec)
    task = default_config("bandit", layout="arms", dims=(2, 10), experts=(10, 20))
    kw = dict(dims=args.arms, experts=args.experts, episodes=args.episodes, seed=args.seed, steps=args.steps)
    print("| join_after | further copies at | unchanged | + fresh at mid-episode | paired difference (SEM) |")
    print("|---|---|---|---|---|")
    for first in (int(j) for j in args.join_after.split(",")):
        for more in args.join_more.split(";"):
            levels = tuple((int(a), 8.0) for a in more.split(",") if a)
            pol = arm_index(ExpertPolicy(spec), beta=args.beta, kappa=args.kappa, n_cap=args.n_cap, join_after=first,
                            join_more=levels)
            with torch.no_grad():
                base = run_episodes(torch_ops(), pol, agent, task, **kw).metrics["regret"].sum(axis=0)
                grown = run_episodes(torch_ops(), pol, agent, task, **kw,
                                     changes=schedule(args.steps // 2, args.experts, "fresh")).metrics["regret"].sum(axis=0)
            d = np.asarray(grown) - np.asarray(base)
            print(f"| {first} | {more or '-'} | {base.mean():.2f} | {grown.mean():.2f} | "
                  f"{d.mean():+.2f} ({d.std() / np.sqrt(d.size):.2f}) |", flush=True)


if __name__ == "__main__":
    main()

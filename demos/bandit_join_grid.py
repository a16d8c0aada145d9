"""How fresh experts hot-added to the handcrafted bandit cell (``training/inits.arm_index``) change its
regret, for several ways of letting them into their arm's score: the first push-key copy of the arm's
address written after ``join_after`` pulls, and further copies at further counts (``join_more``), so
that among the experts of an arm the more experienced outweigh the newer. For each setting: the
regret at T steps of the unchanged agent and of the same agent with as many fresh experts again at
mid-episode, paired over the same seeded episodes (tuning seed, never an evaluation seed).

    python demos/bandit_join_grid.py --seed 12345 --episodes 400 --join-after 2,5 --join-more ";20,100" --hidden 128

With ``--policy NAME`` the same paired measurement of a shipped policy (its card's cell, through
onnxruntime, torch-free) instead of the grid:

    python demos/bandit_join_grid.py --policy bandit-v5 --seed 0 --episodes 200
"""

from __future__ import annotations

import argparse

import numpy as np

from badger_runtime.episodes import schedule
from badger_runtime.evaluation import run_episodes


def paired(ops, pol, agent, task, args) -> tuple[float, float, float, float]:
    """(unchanged, grown, difference, its SEM): regret at T, as many fresh experts again at T / 2."""
    kw = dict(dims=args.arms, experts=args.experts, episodes=args.episodes, seed=args.seed, steps=args.steps)
    base = np.asarray(run_episodes(ops, pol, agent, task, **kw).metrics["regret"]).sum(axis=0)
    grown = np.asarray(run_episodes(ops, pol, agent, task, **kw, changes=schedule(args.steps // 2, args.experts,
                                                                                "fresh")).metrics["regret"]).sum(axis=0)
    d = grown - base
    return base.mean(), grown.mean(), d.mean(), d.std() / np.sqrt(d.size)


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
    ap.add_argument("--policy", default=None, help="a shipped policy instead of the grid")
    args = ap.parse_args()
    print("| join_after | further copies at | unchanged | + fresh at mid-episode | paired difference (SEM) |")
    print("|---|---|---|---|---|")
    if args.policy:
        from badger_runtime.engine import numpy_ops
        from badger_runtime.policy_card import load_policy

        pol = load_policy(args.policy)
        b, g, d, se = paired(numpy_ops(), pol, pol.agent, pol.task, args)
        print(f"| ({args.policy}) | | {b:.2f} | {g:.2f} | {d:+.2f} ({se:.2f}) |")
        return
    import torch

    from badger_runtime.config import AgentConfig, PolicySpec
    from badger_runtime.tasks import default_config
    from badger_runtime.training.inits import arm_index
    from badger_runtime.training.model import ExpertPolicy, torch_ops

    spec = PolicySpec(hidden=args.hidden, msg_dim=16, key_dim=8, addr_dim=24, read_heads=2, id_dim=8, init_noise=0.0)
    agent = AgentConfig(policy=spec)
    task = default_config("bandit", layout="arms", dims=(2, 10), experts=(10, 20))
    for first in (int(j) for j in args.join_after.split(",")):
        for more in args.join_more.split(";"):
            levels = tuple((int(a), 8.0) for a in more.split(",") if a)
            pol = arm_index(ExpertPolicy(spec), beta=args.beta, kappa=args.kappa, n_cap=args.n_cap, join_after=first,
                            join_more=levels)
            with torch.no_grad():
                b, g, d, se = paired(torch_ops(), pol, agent, task, args)
            print(f"| {first} | {more or '-'} | {b:.2f} | {g:.2f} | {d:+.2f} ({se:.2f}) |", flush=True)


if __name__ == "__main__":
    main()

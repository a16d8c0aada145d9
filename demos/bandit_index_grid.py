"""Tune the handcrafted bandit cell (``train.init = "arm_index"``, training/inits.py) on training-
distribution episodes: for each (beta, kappa) of a grid, the cumulative regret at T steps for some K,
over episodes drawn with a tuning seed (never an evaluation seed), next to Thompson sampling on the
same draws. Prints a markdown table (and ``--json``: the rows).

    python demos/bandit_index_grid.py --seed 12345 --episodes 100 --steps 1000 --arms 5,10

With ``--change-every A B`` the arm means are drawn afresh every U[A, B] steps (the continual
setting; no Thompson column): the table gives the agent's regret per step.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from badger_runtime.config import AgentConfig, PolicySpec
from badger_runtime.evaluation import evaluate
from badger_runtime.tasks import default_config
from badger_runtime.training.inits import arm_index
from badger_runtime.training.model import ExpertPolicy, torch_ops


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--arms", default="5,10")
    ap.add_argument("--beta", type=floats, default=[1.5, 2.0, 3.0, 4.0])
    ap.add_argument("--kappa", type=floats, default=[0.25, 0.5, 1.0])
    ap.add_argument("--n-cap", type=floats, default=[0.0], help="the running mean's cap on 1 / rate (0: none)")
    ap.add_argument("--change-every", type=int, nargs=2, default=(0, 0))
    ap.add_argument("--choice", default="sample", choices=("sample", "argmax"),
                    help="how the environment picks the arm from the scores (the card states it)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    spec = PolicySpec(hidden=64, msg_dim=16, key_dim=8, addr_dim=24, read_heads=2, id_dim=8, init_noise=0.0)
    agent = AgentConfig(policy=spec)
    changing = args.change_every[1] > 0
    task = default_config("bandit", layout="arms", dims=(2, 10), experts=(10, 20),
                          change_every=tuple(args.change_every), choice=args.choice)
    arms = [int(k) for k in args.arms.split(",")]
    rows = []
    what = "regret per step" if changing else "regret / Thompson"
    print(f"| beta | kappa | n_cap | {' | '.join(f'K = {k}: {what}' for k in arms)} | "
          f"{'mean' if changing else 'mean ratio'} |")
    print(f"|---|---|---|{'---|' * len(arms)}---|")
    for beta, kappa, cap in itertools.product(args.beta, args.kappa, args.n_cap):
        pol = arm_index(ExpertPolicy(spec), beta=beta, kappa=kappa, n_cap=int(cap) or None)
        row = {"beta": beta, "kappa": kappa, "n_cap": int(cap)}
        for K in arms:
            with torch.no_grad():
                r = evaluate(torch_ops(), pol, agent, task, dims=K, experts=K, episodes=args.episodes, seed=args.seed,
                             steps=args.steps)
            row[K] = (r["final_regret"] / args.steps,) if changing else (r["final_regret"],
                                                                        r["baselines"]["thompson"][-1])
        row["ratio"] = sum(v[0] if changing else v[0] / v[1] for v in (row[K] for K in arms)) / len(arms)
        rows.append(row)
        cells = " | ".join(f"{row[K][0]:.4f}" if changing else f"{row[K][0]:.1f} / {row[K][1]:.1f}" for K in arms)
        print(f"| {beta:g} | {kappa:g} | {int(cap)} | {cells} | {row['ratio']:.3f} |", flush=True)
    best = min(rows, key=lambda r: r["ratio"])
    print(f"\nbest: {', '.join(f'{k} {best[k]:g}' for k in ('beta', 'kappa', 'n_cap'))} "
          f"({'mean regret per step' if changing else 'mean ratio'} {best['ratio']:.3f})")
    if args.json:
        print(json.dumps({"args": vars(args), "rows": [{str(k): v for k, v in r.items()} for r in rows]}))


if __name__ == "__main__":
    main()

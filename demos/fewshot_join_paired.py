"""Fresh experts joining a few-shot agent, paired over the same episodes (torch-free).

The product rule's check (`growth.NOISE_SEMS`: within 3 standard errors of the unchanged agent) compares
two unpaired means. This prints both, and the paired difference with its standard error over episodes:
the same episodes (same seed) played by the unchanged agent of N experts and by one that gets as many
fresh experts again at step 20 of 40, accuracy over steps 31-40 (4-way held-out digits, one expert per
(class, feature) cell, then two):

    python demos/fewshot_join_paired.py --policy fewshot-v4 --episodes 300 --seed 0

The unpaired means are those of `badger eval --policy P --task fewshot --dims 4 --experts 256 --steps 40
[--add-at 20 --add 256 --init fresh] --episodes 300 --seed 0 --json` (the same episodes, the same code).
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from badger_runtime.engine import numpy_ops
from badger_runtime.episodes import schedule
from badger_runtime.evaluation import run_episodes
from badger_runtime.policy_card import load_policy
from badger_runtime.tasks import fewshot as fs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="fewshot-v4")
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", choices=("fresh", "clone"), default="fresh")
    args = ap.parse_args(argv)
    ops = numpy_ops()
    pol = load_policy(args.policy)
    task = dataclasses.replace(fs.FewShotTask.evaluation_config(pol.task), steps=40, baselines="none")
    kw = dict(dims=4, experts=256, episodes=args.episodes, seed=args.seed, steps=40)
    base = run_episodes(ops, pol, pol.agent, task, **kw).metrics["correct"][30:40].mean(axis=0)
    grown = run_episodes(ops, pol, pol.agent, task, changes=schedule(20, 256, args.init, allow_harmful=True),
                         **kw).metrics["correct"][30:40].mean(axis=0)
    d = grown - base
    n = len(d)
    print(f"{args.policy}, {n} episodes, seed {args.seed}, 256 + 256 {args.init} at step 20 of 40, steps 31-40:")
    print(f"  unchanged {base.mean():.4f} (SEM {base.std() / np.sqrt(n):.4f}), grown {grown.mean():.4f} "
          f"(SEM {grown.std() / np.sqrt(n):.4f})")
    print(f"  paired difference {d.mean():+.4f} +- {d.std(ddof=1) / np.sqrt(n):.4f}")


if __name__ == "__main__":
    main()

"""Cross-entropy and accuracy by shot count (examples of the true class seen before), torch-free.

The guard of `train.guard_weight` holds each shot count's cross-entropy to the initial policy's; this
prints both measures per shot count for policies on the few-shot validation episodes (training digit
classes, test-split examples, balanced streams of 11 per class, logit scale 8, as in training):

    python demos/fewshot_ce_by_shot.py --policy fewshot-v2 fewshot-v4 --episodes 100 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from badger_runtime.engine import numpy_ops
from badger_runtime.evaluation import run_episodes
from badger_runtime.policy_card import load_policy
from badger_runtime.tasks import fewshot as fs
from badger_runtime.tasks.classification_baselines import shots_before


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", nargs="+", default=["fewshot-v2", "fewshot-v4"])
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in args.policy:
        pol = load_policy(name)
        task = dataclasses.replace(fs.FewShotTask.evaluation_config(pol.task), steps=44, baselines="none",
                                   classes_pool="train", split="test", shots=11, logit_scale=8.0)
        res = run_episodes(numpy_ops(), pol, pol.agent, task, dims=4, experts=256, episodes=args.episodes,
                           seed=args.seed, steps=44)
        shots = shots_before(np.concatenate([ep.ys for ep in res.episodes], axis=1))
        ce, acc = res.metrics["loss"], res.metrics["correct"]
        print(f"{name}: shots 1..6 cross-entropy", [round(float(ce[shots == k].mean()), 4) for k in range(1, 7)],
              "accuracy", [round(float(acc[shots == k].mean()), 3) for k in range(1, 7)])


if __name__ == "__main__":
    main()

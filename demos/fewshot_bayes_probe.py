"""What a count-aware nearest class mean does by shot count (issue 14's per-shot goal), numpy only.

fewshot-v3 / v4 learned an additive prior over a class's example count: +0.08 at one shot, but below
nearest class mean (NCM) at four and five shots (docs/results.md). Is that the price of any count
prior? This probe runs, on exactly the episodes of `badger eval --task fewshot ... --seed S` (held-out
digits 6-9, 4-way, balanced streams of 11 shots; `--validation`: training classes 0-5, test split):

- NCM (the baseline of the eval report);
- "shift": NCM's squared distance plus an additive score per count, + c / n for a class seen n times
  (a bonus for a class with few examples: the form and the sign of what fewshot-v4's readout learned);
- "gaussian": the predictive likelihood of a Gaussian class whose mean is estimated from n examples,
  variance s2 per feature: x ~ N(mean, s2 (1 + 1/n)), score -d / (2 s2 (1 + 1/n)) - F/2 log(1 + 1/n):
  the distance is weighed by the count, not only shifted.

and prints accuracy by shots seen before (1..5), the mean over the episode, and the paired difference
from NCM with its standard error over episodes (`classification_baselines.paired_by_shot`):

    python demos/fewshot_bayes_probe.py --episodes 500 --seed 0
    python demos/fewshot_bayes_probe.py --episodes 300 --seed 0 --validation

`--prior` prints instead what the policy itself learned: what one more example of its class costs an
expert's score, 1 -> 2 .. 7 -> 8 examples (`training.inits.count_prior`; needs torch for the cell's layout):

    python demos/fewshot_bayes_probe.py --prior --policy fewshot-v4
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from badger_runtime.episodes import sample_batches
from badger_runtime.policy_card import load_policy
from badger_runtime.tasks import classification_baselines as cb
from badger_runtime.tasks import fewshot as fs


def episodes(policy: str, n: int, seed: int, validation: bool) -> tuple[np.ndarray, np.ndarray]:
    """xs [T, E, F], ys [T, E]: the episodes `badger eval --policy POLICY --task fewshot --classes 4
    --steps 44 --option shots=11 --episodes n --seed seed` plays (`--validation`: with `--option
    classes_pool=train --option split=test --option scaling=known --experts 256`)."""
    pol = load_policy(policy)
    task = dataclasses.replace(fs.FewShotTask.evaluation_config(pol.task), shots=11, baselines="none")
    if validation:
        task = dataclasses.replace(task, classes_pool="train", split="test", scaling="known")
    xs, ys = [], []
    for _, ep, _ in sample_batches(task.validate(), pol.agent, dims=4, experts=256, episodes=n, seed=seed, steps=44):
        xs.append(ep.xs)
        ys.append(ep.ys)
    return np.concatenate(xs, axis=1).astype(np.float64), np.concatenate(ys, axis=1)


def count_aware(xs: np.ndarray, ys: np.ndarray, C: int, *, shift: float = 0.0, s2: float | None = None) -> np.ndarray:
    """correct [T, E] of NCM with an additive + shift / n per class (s2 None) or the Gaussian predictive
    score with variance s2 per feature."""
    T, E, F = xs.shape
    sums, n = np.zeros((E, C, F)), np.zeros((E, C))
    pred = np.zeros((T, E), np.int64)
    rows = np.arange(E)
    for t in range(T):
        if t:
            seen = np.maximum(n, 1.0)
            d = ((sums / seen[..., None] - xs[t][:, None, :]) ** 2).sum(-1)
            if s2 is None:
                score = -d + shift / seen
            else:
                v = 1.0 + 1.0 / seen
                score = -d / (2 * s2 * v) - F / 2 * np.log(v)
            pred[t] = np.argmax(np.where(n > 0, score, -np.inf), axis=1)
        sums[rows, ys[t]] += xs[t]
        n[rows, ys[t]] += 1.0
    return pred == ys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="fewshot-v4", help="whose evaluation episodes (its card's task)")
    ap.add_argument("--episodes", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--validation", action="store_true", help="training classes 0-5, test split")
    ap.add_argument("--s2", type=float, nargs="*", default=[0.02, 0.03, 0.05, 0.08])
    ap.add_argument("--shift", type=float, nargs="*", default=[0.1, 0.2, 0.4])
    ap.add_argument("--prior", action="store_true", help="print the policy's learned count prior and stop")
    args = ap.parse_args(argv)
    if args.prior:
        from badger_runtime.training.inits import count_prior

        steps = count_prior(load_policy(args.policy))
        print(f"{args.policy}: score cost of one more example, 1 -> 2 .. 7 -> 8: "
              + " / ".join(f"{x:.3f}" for x in steps) + " (twice the count units' weights)")
        return
    xs, ys = episodes(args.policy, args.episodes, args.seed, args.validation)
    ncm = cb.nearest_class_mean(xs, ys, 4)["correct"]
    rows = [("NCM", ncm)] + [(f"shift c = {c}", count_aware(xs, ys, 4, shift=c)) for c in args.shift]
    rows += [(f"gaussian s2 = {s}", count_aware(xs, ys, 4, s2=s)) for s in args.s2]
    where = "training classes 0-5, test split" if args.validation else "held-out digits 6-9"
    print(f"{where}, 4-way, balanced streams of 11, {args.episodes} episodes, seed {args.seed}")
    print("| learner | 1 | 2 | 3 | 4 | 5 | mean | minus NCM at 1..5 (paired SEM) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, c in rows:
        acc = cb.accuracy_by_shot(c, ys, 5)[1:6]
        p = cb.paired_by_shot(c, ncm, ys, 5)
        diff = " / ".join(f"{d:+.3f} ({s:.3f})" for d, s in zip(p["diff"][1:6], p["sem"][1:6]))
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in acc) + f" | {c.mean():.4f} | {diff} |")


if __name__ == "__main__":
    main()

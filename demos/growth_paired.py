"""Fresh experts joining an agent of an error-measured task, paired over the same episodes (torch-free).

The card's verdict (`growth.measure_growth`: "hurts" when the grown agent's mean final error is above the
unchanged agent's by more than `growth.NOISE_SEMS` of its standard errors) compares two unpaired means.
This prints, for each seed, both means in the card's own setting (`growth.growth_setting`: the trained
maximum d, the trained minimum N, as many again joining at mid-episode), the verdict, and the paired
difference with its standard error over the same episodes, for fresh experts and for clones:

    python demos/growth_paired.py --policy dimensions-v2 --episodes 256 --seeds 0,12345
    python demos/growth_paired.py --policy runs/x.onnx   # an exported candidate (its card beside it)
    python demos/growth_paired.py --policy dimensions-v5 --episodes 500 --seeds 0,12345 --add 15  # +15 to 5
    python demos/growth_paired.py --policy guessing-quorum-v3 --episodes 64 --seeds 1000-1011  # 12 clone draws

With more than one seed it ends with a summary over the seeds: the unchanged agent's mean error, the
geometric mean and the range of each kind's ratio, and at how many seeds the cards' rule says it hurts. Each
episode draws whom its clones copy (``rollout.clone_sources``; until session 40 one draw served a batch of 250
episodes, so one seed's clone verdict was one draw: with 3 experts, whether the expert that hears the error was
copied); the seeds now add episodes and draws alike.

The unpaired means are those of the card's `badger eval` commands (the same episodes, the same code).
"""

from __future__ import annotations

import argparse

import numpy as np

from badger_runtime.growth import final_errors, growth_setting, worse
from badger_runtime.policy_card import load_policy


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, help="a shipped policy's name or an .onnx path")
    ap.add_argument("--episodes", type=int, default=256)
    ap.add_argument("--seeds", default="0", help="comma-separated, or a range A-B (inclusive)")
    ap.add_argument("--add", type=int, default=None, help="experts joining (default: as many again, the card's)")
    args = ap.parse_args(argv)
    pol = load_policy(args.policy)
    s = growth_setting(pol)
    if s is None:
        raise SystemExit(f"{pol.name}: its task ({pol.task.name}) is not measured by an error")
    ratios = {"fresh": [], "clone": []}
    hurt = {"fresh": 0, "clone": 0}
    unchanged = []
    seeds = parse_seeds(args.seeds)
    for seed in seeds:
        base = final_errors(pol, s, episodes=args.episodes, seed=seed)
        unchanged.append(base.mean())
        n = base.size
        add = s.experts if args.add is None else args.add
        print(f"{args.policy}, seed {seed}, {n} episodes, d = {s.dims}, N = {s.experts} + {add} at step {s.at} "
              f"of {s.steps}: unchanged {base.mean():.4g} (SEM {base.std() / np.sqrt(n):.2g}; median "
              f"{np.median(base):.2g}, 99th percentile {np.quantile(base, 0.99):.2g}, worst {base.max():.2g})")
        for init in ("fresh", "clone"):
            g = final_errors(pol, s, episodes=args.episodes, seed=seed, init=init, add=args.add)
            d, ratio, bad = g - base, g.mean() / max(base.mean(), 1e-12), worse(base, g.mean())
            ratios[init].append(ratio)
            hurt[init] += bad
            print(f"  {init:5s} {g.mean():.4g} ({ratio:.3f}x; card rule: {'hurts' if bad else 'ok'}), "
                  f"paired difference {d.mean():+.4g} +- {d.std(ddof=1) / np.sqrt(n):.2g}")
    if len(seeds) > 1:
        print(f"over {len(seeds)} seeds: unchanged {np.mean(unchanged):.3g} (mean); " + "; ".join(
            f"{init} {np.exp(np.mean(np.log(r))):.2f}x (geometric mean; {min(r):.2f}-{max(r):.2f}x), "
            f"hurts at {hurt[init]} of {len(seeds)}" for init, r in ratios.items()))


def parse_seeds(text: str) -> list[int]:
    """'0,12345' or '1000-1011' (inclusive) -> the seeds."""
    if "-" in text and "," not in text:
        a, b = (int(x) for x in text.split("-"))
        return list(range(a, b + 1))
    return [int(x) for x in text.split(",")]


if __name__ == "__main__":
    main()

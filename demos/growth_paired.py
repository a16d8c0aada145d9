"""Fresh experts joining an agent of an error-measured task, paired over the same episodes (torch-free).

The card's verdict (`growth.measure_growth`: "hurts" when the grown agent's mean final error is above the
unchanged agent's by more than `growth.NOISE_SEMS` of its standard errors) compares two unpaired means.
This prints, for each seed, both means in the card's own setting (`growth.growth_setting`: the trained
maximum d, the trained minimum N, as many again joining at mid-episode), the verdict, and the paired
difference with its standard error over the same episodes, for fresh experts and for clones:

    python demos/growth_paired.py --policy dimensions-v2 --episodes 256 --seeds 0,12345
    python demos/growth_paired.py --policy runs/x.onnx   # an exported candidate (its card beside it)

The unpaired means are those of the card's `badger eval` commands (the same episodes, the same code).
"""

from __future__ import annotations

import argparse

import numpy as np

from badger_runtime.engine import numpy_ops
from badger_runtime.episodes import schedule
from badger_runtime.evaluation import run_episodes
from badger_runtime.growth import NOISE_SEMS, growth_setting
from badger_runtime.policy_card import load_policy


def paired(pol, *, episodes: int, seed: int) -> dict:
    """Final errors of the unchanged, fresh-grown and clone-grown agents on the same episodes."""
    s = growth_setting(pol)
    if s is None:
        raise SystemExit(f"{pol.name}: its task ({pol.task.name}) is not measured by an error")

    def finals(init=None):
        changes = schedule(s.at, s.experts, init, allow_harmful=True) if init else ()
        return run_episodes(numpy_ops(), pol, pol.agent, s.task, dims=s.dims, experts=s.experts, episodes=episodes,
                            seed=seed, steps=s.steps, changes=changes).errors[-1]

    base = finals()
    out = {"setting": s, "unchanged": base}
    for init in ("fresh", "clone"):
        out[init] = finals(init)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, help="a shipped policy's name or an .onnx path")
    ap.add_argument("--episodes", type=int, default=256)
    ap.add_argument("--seeds", default="0", help="comma-separated")
    args = ap.parse_args(argv)
    pol = load_policy(args.policy)
    for seed in (int(x) for x in args.seeds.split(",")):
        r = paired(pol, episodes=args.episodes, seed=seed)
        s, base = r["setting"], r["unchanged"]
        n = base.size
        sem = base.std() / np.sqrt(n)
        print(f"{args.policy}, seed {seed}, {n} episodes, d = {s.dims}, N = {s.experts} + {s.experts} at step {s.at} "
              f"of {s.steps}: unchanged {base.mean():.4g} (SEM {sem:.2g})")
        for init in ("fresh", "clone"):
            g = r[init]
            d = g - base
            verdict = "hurts" if g.mean() > base.mean() + NOISE_SEMS * sem else "ok"
            print(f"  {init:5s} {g.mean():.4g} ({g.mean() / max(base.mean(), 1e-12):.3f}x; card rule: {verdict}), "
                  f"paired difference {d.mean():+.4g} +- {d.std(ddof=1) / np.sqrt(n):.2g}")


if __name__ == "__main__":
    main()

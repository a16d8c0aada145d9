#!/usr/bin/env python
"""Full-size versions of the paper's figures with our shipped policies, for the docs.

    python demos/paper_figures.py                      # -> docs/figures/*.png, numbers as JSON on stdout
    python demos/paper_figures.py --episodes 2000 --seed 1 --out /tmp/figs

Runs every sub-demo of `badger demo` (main, guessing = Fig. 6 + 9, communication = Fig. 8,
dimensions = Fig. 7, growing) at full size and higher resolution, and prints one JSON object:
{"seed", "episodes", "out", "demos": {name: {policy, runtime, figures, numbers, seconds}}}.
The policies are `badger demo`'s defaults (Fig. 6 / 8: guessing-one-expert-v2, Fig. 7: dimensions-v6, Fig. 9:
guessing-converge-v2, growing: scale-v2; docs/figures/ was made before session 44 with the v1 policies, now in
policies/retired/). Without the Fig. 7 policy Fig. 7 is skipped (reported under "skipped"). torch is never
imported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from badger_runtime.demo.run import (DEFAULT_DIMS_POLICY, DEFAULT_GROW_POLICY, DEFAULT_ONE_EXPERT_POLICY,
                                     DEFAULT_POLICY, DEMOS,
                                     DemoOptions, run_demo)
from badger_runtime.policy_card import PolicyError

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation episodes")
    p.add_argument("--episodes", type=int, default=None,
                   help="episodes per evaluation (default: each demo's full size, 300 to 1000)")
    p.add_argument("--out", default=str(REPO / "docs" / "figures"), help="folder for the PNGs")
    p.add_argument("--dpi", type=int, default=150)
    p.add_argument("--policy", default=DEFAULT_POLICY, help="the Fig. 9 / main policy")
    p.add_argument("--one-expert-policy", default=DEFAULT_ONE_EXPERT_POLICY, help="the Fig. 6 / 8 policy")
    p.add_argument("--dims-policy", default=DEFAULT_DIMS_POLICY, help="the Fig. 7 policy")
    p.add_argument("--grow-policy", default=DEFAULT_GROW_POLICY, help="the growing policy")
    p.add_argument("--only", nargs="*", choices=DEMOS, default=list(DEMOS), help="run only these demos")
    args = p.parse_args(argv)
    if args.episodes is not None and args.episodes < 1:
        p.error("--episodes must be >= 1")

    out = Path(args.out)
    report = {"seed": args.seed, "episodes": args.episodes, "out": str(out), "demos": {}}
    t0 = time.perf_counter()
    for name in args.only:
        o = DemoOptions(out=out, seed=args.seed, episodes=args.episodes, dpi=args.dpi, policy=args.policy,
                        one_expert_policy=args.one_expert_policy, dims_policy=args.dims_policy,
                        grow_policy=args.grow_policy,
                        log=lambda msg: print(msg, file=sys.stderr))
        try:
            res = run_demo(name, o)
        except PolicyError as e:
            res = {"demo": name, "skipped": str(e)}
        report["demos"][name] = res
        print(f"{name}: {res.get('skipped') or ', '.join(res['figures'])} ({res.get('seconds', 0):.1f} s)",
              file=sys.stderr)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

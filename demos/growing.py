"""Growing an agent during inference, on the actor runtime (the paper's procedure, steps 3-5).

3. Run the agent (a frozen policy) on new guessing-game episodes: its experts adapt by messages.
4. Mid-episode, from another task and without pausing the agent, add experts by cloning living
   ones (``ActorAgent.add_experts(n, "clone")``; also shown: fresh experts).
5. Keep going: does the agent use the added experts? The plot shows the error by inner step,
   before and after the hot-add, against the same episodes run with N0 experts throughout and
   with N0 + K experts throughout.

    python demos/growing.py --out demo-output --episodes 100
    python demos/growing.py --policy guessing-one-expert-v2 --out demo-output --add 3 --at 10

Writes OUT/growing.png and OUT/growing.json (the numbers plotted, the command, message counts)
and prints the JSON summary. The add lands while step ``--at`` is running (a few scheduler
passes after its observation went out), so the new experts take part from step at + 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from badger_runtime.engine import numpy_ops
from badger_runtime.episodes import schedule
from badger_runtime.evaluation import run_episodes
from badger_runtime.policy_card import load_policy

DEFAULT_POLICY = "dimensions-v6"  # trained over a range of N; clones are harmless to it (its card)


def run_arm(pol, agent_cfg, task, *, dims, experts, episodes, seed, steps, add_at=None, add_n=0, init="clone",
            concurrency=4):
    """Errors [T, E] and message counters of one arm; ``add_n`` experts join after step ``add_at``."""
    changes = (schedule(add_at + 1, add_n, init, allow_harmful=True)  # measured, harm included
               if add_at is not None and add_n > 0 else ())
    res = run_episodes(numpy_ops(), pol, agent_cfg, task, dims=dims, experts=experts, episodes=episodes, seed=seed,
                       steps=steps, changes=changes, runtime="actors", concurrency=concurrency)
    return res.errors, res.runtime


def plot(path: Path, curves: dict, add_at: int, title: str):
    from badger_runtime.demo.figures import label_axes, save_png, subplots

    fig, ax = subplots(figsize=(7.5, 4.5), dpi=120)
    for label, err in curves.items():
        m = err.mean(axis=1)
        sem = err.std(axis=1) / np.sqrt(err.shape[1])
        steps = np.arange(len(m))
        ax.plot(steps, m, label=label, lw=1.8)
        ax.fill_between(steps, m - sem, m + sem, alpha=0.2)
    ax.axvline(add_at + 0.5, color="k", ls=":", lw=1)
    ax.text(add_at + 0.7, ax.get_ylim()[1] * 0.92, "experts added", fontsize=8)
    ax.set_yscale("log")
    label_axes(ax, xlabel="inner step", ylabel="error (3 x MSE), mean over episodes", title=title, legend="best",
               grid=False)
    fig.tight_layout()
    save_png(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default=None, help=f"default: {DEFAULT_POLICY} (trained over a range of N; clones are "
                                                   "harmless to it)")
    p.add_argument("--out", required=True, help="folder for growing.png and growing.json")
    p.add_argument("--experts", type=int, default=None, help="N0 (default: the trained N, or 5)")
    p.add_argument("--add", type=int, default=None, help="K experts to add (default: N0)")
    p.add_argument("--init", choices=("clone", "fresh", "both"), default="both")
    p.add_argument("--at", type=int, default=None, help="inner step during which they are added (default: steps/2)")
    p.add_argument("--steps", type=int, default=None, help="inner steps (default: the policy's horizon)")
    p.add_argument("--dims", type=int, default=None)
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    pol = load_policy(args.policy or DEFAULT_POLICY)
    task, agent_cfg = pol.task, pol.agent
    n0 = args.experts or (task.experts[0] if task.experts[0] == task.experts[1] else 5)
    k = args.add or n0
    steps = args.steps or task.steps
    at = steps // 2 if args.at is None else args.at
    dims = args.dims or task.dims[1]
    if not (0 <= at < steps - 1) or n0 < 1 or k < 1:
        p.error("need 0 <= --at < --steps - 1, --experts >= 1 and --add >= 1")
    kw = dict(dims=dims, episodes=args.episodes, seed=args.seed, steps=steps, concurrency=args.concurrency)
    curves, messages = {}, {}
    arms = [(f"N={n0} throughout", n0, None, "clone")]
    for init in (("clone", "fresh") if args.init == "both" else (args.init,)):
        arms.append((f"N={n0}, +{k} {'cloned' if init == 'clone' else 'fresh'} at step {at}", n0, at, init))
    arms.append((f"N={n0 + k} throughout", n0 + k, None, "clone"))
    for label, n, add_at, init in arms:
        err, c = run_arm(pol, agent_cfg, task, experts=n, add_at=add_at, add_n=k, init=init, **kw)
        curves[label] = err
        messages[label] = {k2: c[k2] for k2 in ("sent", "delivered", "dropped", "added")}
        print(f"{label}: error at step {at} {err[at].mean():.4f}, final {err[-1].mean():.4f}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "growing.png"
    plot(png, curves, at, f"{pol.name}: growing during inference (actor runtime), d={dims}, "
                          f"{args.episodes} episodes, seed {args.seed}")
    summary = {
        "demo": "growing", "policy": pol.name, "dims": dims, "experts": n0, "added": k, "add_step": at,
        "steps": steps, "episodes": args.episodes, "seed": args.seed, "png": str(png),
        "command": "python demos/growing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "arms": {label: {"before_add": float(err[at].mean()), "final": float(err[-1].mean()),
                         "final_sem": float(err[-1].std() / np.sqrt(err.shape[1])),
                         "mse_by_step": [round(float(v), 6) for v in err.mean(axis=1)], "messages": messages[label]}
                 for label, err in curves.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "growing.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k2: v for k2, v in summary.items() if k2 != "arms"} |
                     {"final": {lab: round(a["final"], 4) for lab, a in summary["arms"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

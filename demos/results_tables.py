#!/usr/bin/env python
"""Compute the tables of docs/results.md from the shipped policies (torch-free, seeded).

    python demos/results_tables.py --seed 0 > docs/results_tables.md

Every row names the `badger` command that gives the same number on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

from badger_runtime.engine import fresh_hurts, numpy_ops
from badger_runtime.evaluation import evaluate
from badger_runtime.longrun import horizon_report, jump_report
from badger_runtime.policy_card import load_policy
from badger_runtime.tasks import baselines as bl

REF_FIG7 = {1: 0.07, 2: 0.02, 3: 0.03, 4: 0.05, 5: 0.08, 6: 0.14, 7: 0.25, 8: 0.35, 9: 0.45, 10: 0.50}
REF_GROW = {1: 1.2, 6: 0.35, 11: 0.2, 16: 0.15}
SECTIONS = ("fig69", "fig7", "long", "jumps")
DIMS_POLICIES = ("policies/dimensions-v1.onnx", "policies/dimensions-v2.onnx", "policies/dimensions-v3.onnx",
                 "policies/dimensions-v4.onnx", "policies/dimensions-v5.onnx", "policies/dimensions-v6.onnx")
#: how each dimension policy was made, for the Fig. 7 table's heading (others: their trained ranges)
DIMS_WHAT = {
    "dimensions-v1": "trained d in [{}, {}], N in [{}, {}] (the paper's setting).",
    "dimensions-v2": "then fine-tuned on d in [1, 6] with experts added mid-episode.",
    "dimensions-v3": "then fine-tuned further with fresh experts added mid-episode in every batch.",
    "dimensions-v4": "then with up to three times as many fresh experts joining (`train.grow_most = 3`).",
    "dimensions-v5": "then with up to four times as many (`train.grow_most = 4`).",
    "dimensions-v6": "then with a push gate (`task.output_flag`, the `push_gate` surgery) and as many newcomers.",
}


def f(x, n=4):
    return "-" if x is None else f"{x:.{n}f}"


def harmful(pol) -> str:
    """The flag a command needs to add fresh experts to a policy whose card says they hurt it."""
    return "--allow-harmful-growth " if fresh_hurts(pol) else ""


def hot_add(pol, d, n0, add, init, episodes, seed, steps=20, at=10):
    """Final-step error of agents of n0 experts that get ``add`` experts at step ``at``: the number
    `badger eval --policy P --dims d --experts n0 --add-at at --add add --init init` prints."""
    from badger_runtime.episodes import schedule

    changes = schedule(at, add, init, allow_harmful=True) if add else ()  # measured, harm included
    r = evaluate(numpy_ops(), pol, pol.agent, pol.task, dims=d, experts=n0, episodes=episodes, seed=seed, steps=steps,
                 changes=changes, baselines=False)
    return r["final_mse"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, default=500)
    p.add_argument("--dims-policies", default=",".join(DIMS_POLICIES),
                   help="comma-separated: the dimension policies of the Fig. 7, growing and hot-add tables, in order")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    args = p.parse_args(argv)
    E, S = args.episodes, args.seed
    want = set(args.only.split(","))
    if want - set(SECTIONS):
        p.error(f"--only: unknown sections {sorted(want - set(SECTIONS))}; choose from {SECTIONS}")
    ops = numpy_ops()
    out = []
    w = out.append
    t0 = time.perf_counter()
    if "fig69" in want:
        fig6_fig9(w, ops, S)
    if "fig7" in want:
        fig7(w, ops, [load_policy(p) for p in args.dims_policies.split(",")], E, S)
    if "long" in want:
        long_horizons(w, S)
    if "jumps" in want:
        jumps(w, S)
    w(f"_Tables made by `python demos/results_tables.py --seed {S} --episodes {E}"
      f"{'' if want == set(SECTIONS) else ' --only ' + args.only}` in {time.perf_counter() - t0:.0f} s._")
    print("\n".join(out))
    return 0


def fig6_fig9(w, ops, S):
    w("### Fig. 6 and Fig. 9 (3 experts, d = 3, per-dimension error to expert 0 only)\n")
    w("| policy | final error (step 19) | first step < 0.01 | command |")
    w("|---|---|---|---|")
    for name in ("guessing-one-expert-v1", "guessing-converge-v1", "guessing-nonstationary-v1"):
        pol = load_policy(f"policies/{name}.onnx")
        task = dataclasses.replace(pol.task, jump_every=(0, 0), steps=20)
        r = evaluate(ops, pol, pol.agent, task, dims=3, experts=3, episodes=1000, seed=S)
        s = bl.steps_to_reach(np.asarray(r["mse_by_step"]), 0.01)
        w(f"| {name} | {f(r['final_mse'], 6)} | {s} | `badger eval --policy policies/{name}.onnx --task guessing --steps 20 "
          f"--episodes 1000 --seed {S} --json` |")
        adam = r["optimizer"]
    targets = np.random.default_rng([S, 0]).uniform(-1, 1, (1000, 3)).astype(np.float32)
    best = min(((bl.steps_to_reach(bl.adam(targets, 100, lr), 0.01) or 999, lr) for lr in bl.ADAM_LR_GRID))
    w(f"| Adam, lr tuned on mean error over 20 steps (lr={adam['param']['lr']:.3g}) | {f(adam['final_mse'])} | "
      f"{bl.steps_to_reach(np.asarray(adam['mse_by_step']), 0.01)} | (same command: `optimizer`) |")
    w(f"| Adam, lr tuned for the fewest steps to < 0.01 (lr={best[1]:.3g}, 100-step budget) | - | {best[0]} | "
      f"`tasks.baselines.adam` over `ADAM_LR_GRID` |")
    w("")



def fig7(w, ops, pols, E, S):
    w("### Fig. 7: dimension generalization (scalar feedback, N = 20, final step)\n")
    w(" ".join(f"`{p.name}`: {DIMS_WHAT.get(p.name, 'trained d in [{}, {}], N in [{}, {}]')}".format(
        *p.task.dims, *p.task.experts) for p in pols) + "\n")
    names = " | ".join(p.name for p in pols)
    w(f"| d | {names} | mean-solution | chance | tuned Nelder-Mead | 2019 reference | command (per policy) |")
    w("|---|" + "---|" * len(pols) + "---|---|---|---|---|")
    for d in range(1, 11):
        r = [evaluate(ops, p, p.agent, p.task, dims=d, experts=20, episodes=E, seed=S) for p in pols]
        w(f"| {d} | " + " | ".join(f(x["final_mse"], 3) for x in r) + f" | {f(r[0]['mean_solution'], 3)} | "
          f"{f(r[0]['chance'], 3)} | {f(r[0]['optimizer']['final_mse'], 3)} | {REF_FIG7[d]} | "
          f"`badger eval --policy POLICY --dims {d} --experts 20 --episodes {E} --seed {S} --json` |")
    w("")
    w("### Growing: the same policies at d = 6, N = 1 .. 160 (trained N in [5, 40])\n")
    w(f"| N | {names} | 2019 reference | command (per policy) |")
    w("|---|" + "---|" * len(pols) + "---|---|")
    for n in (1, 5, 10, 20, 40, 80, 160):
        r = [evaluate(ops, p, p.agent, p.task, dims=6, experts=n, episodes=E, seed=S, baselines=False) for p in pols]
        w(f"| {n} | " + " | ".join(f(x["final_mse"], 3) for x in r) + " | "
          f"{REF_GROW.get(n, '0.14-0.16' if n >= 16 else '-')} | "
          f"`badger eval --policy POLICY --dims 6 --experts {n} --episodes {E} --seed {S} --json` |")
    w("")
    w("### Hot-adding experts to a running agent (N = 5, +15 experts at step 10 of 20, final step)\n")
    w("| policy | d | N = 5 throughout | +15 cloned | +15 fresh | N = 20 throughout | command (+15 fresh) |")
    w("|---|---|---|---|---|---|---|")
    for p in pols:
        for d in (3, 6):
            arms = [hot_add(p, d, 5, 0, None, E, S), hot_add(p, d, 5, 15, "clone", E, S),
                    hot_add(p, d, 5, 15, "fresh", E, S), hot_add(p, d, 20, 0, None, E, S)]
            w(f"| {p.name} | {d} | " + " | ".join(f(a, 3) for a in arms) +
              f" | `badger eval --policy {p.name} --dims {d} --experts 5 --add-at 10 --add 15 --init fresh "
              f"{harmful(p)}--episodes {E} --seed {S} --json` |")
    w("")


def long_horizons(w, S):
    w("### Long horizons: error at inner step 20, 100, 1,000, 10,000 (one episode, never reset)\n")
    w("| policy | 20 | 100 | 1,000 | 10,000 | max abs state | command |")
    w("|---|---|---|---|---|---|---|")
    for name in ("guessing-one-expert-v1", "guessing-converge-v1", "guessing-nonstationary-v1", "dimensions-v1",
                 "dimensions-v2", "dimensions-v3"):
        pol = load_policy(f"policies/{name}.onnx")
        r = horizon_report(pol, steps=10_000, episodes=50, seed=S)
        e = r["error_at"]
        w(f"| {name} | {f(e['20'])} | {f(e['100'])} | {f(e['1000'])} | {f(e['10000'])} | "
          f"{r['max_abs_state']:.5f} | `badger longrun --policy policies/{name}.onnx --steps 10000 --episodes 50 "
          f"--seed {S} --json` |")
    w("")


def jumps(w, S):
    w("### Non-stationary targets (jump every U[20, 60] steps, never reset; recovered = error < 0.05)\n")
    w("| policy | error just before a jump | recovery (mean / median / p90 steps) | reset at every jump "
      "(mean / median / p90) | ratio | Adam restarted (mean curve) | command |")
    w("|---|---|---|---|---|---|---|")
    for name in ("guessing-converge-v1", "guessing-nonstationary-v1"):
        pol = load_policy(f"policies/{name}.onnx")
        r = jump_report(pol, steps=1000, episodes=200, seed=S, jump_every=(20, 60))
        a, z = r["recovery_steps"]["agent_never_reset"], r["recovery_steps"]["agent_reset_at_jumps"]
        cens = f" ({a['censored_fraction']:.0%} never recover)" if a["censored_fraction"] > 0.01 else ""
        w(f"| {name} | {f(r['error_before_jump']['mean'])} | {f(a['mean'], 2)} / {a['median']} / {a['p90']}{cens} | "
          f"{f(z['mean'], 2)} / {z['median']} / {z['p90']} | {f(r['ratio_to_reset'], 2)} | "
          f"{r['recovery_steps']['optimizer_restarted']['mean_curve_steps_to_threshold']} | "
          f"`badger longrun --policy policies/{name}.onnx --steps 1000 --episodes 200 --seed {S} "
          f"--jump-every 20 60 --json` |")
    w("")


if __name__ == "__main__":
    sys.exit(main())

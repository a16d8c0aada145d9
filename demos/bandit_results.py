#!/usr/bin/env python
"""The bandit tables and figures of docs/results.md (torch-free, seeded).

    python demos/bandit_results.py --seed 0 --episodes 200 > /tmp/bandit_tables.md

Every row names the ``badger`` command that gives the same numbers on its own (``badger eval``
prints ``regret_at`` and ``baselines_regret_at``). Writes docs/figures/bandit_regret.png (regret
over time, the trained policy and the baselines on the same draws),
docs/figures/bandit_experts.png (regret against N at K = 50) and docs/figures/bandit_continual.png
(the 10,000-step check).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from badger_runtime.engine import numpy_ops
from badger_runtime.evaluation import evaluate
from badger_runtime.policy_card import load_policy
from badger_runtime.tasks import default_config, make_task
from badger_runtime.tasks.bandit import longrun_report, plot_longrun

NAMES = {"thompson": "Thompson", "ucb1": "UCB1", "epsilon_greedy": "eps-greedy (tuned)",
         "uniform_random": "uniform random"}
POINTS = ("100", "500", "1000")
OTHER_POLICIES = ("guessing-converge-v1", "guessing-nonstationary-v1", "guessing-quorum-v1", "guessing-one-expert-v1",
                  "dimensions-v1", "dimensions-v2")


def run(pol, *, K, N, T, E, S, task=None, **opts):
    """(report, command) of `badger eval --policy P --task bandit --arms K --experts N --steps T ...`."""
    base = task or (pol.task if pol.task.name == "bandit" else default_config("bandit"))
    t = dataclasses.replace(base, change_every=(0, 0), steps=T, **opts).validate()
    past = pol.horizon is not None and T > pol.horizon  # an episodic policy, run past its horizon on purpose
    r = evaluate(numpy_ops(), pol, pol.agent, t, dims=K, experts=N, episodes=E, seed=S, past_horizon=past)
    flags = "".join(f" --option {k}={v}" for k, v in opts.items() if k != "arm_dist")
    if "arm_dist" in opts:
        flags += f" --arm-dist {opts['arm_dist']}"
    cmd = (f"badger eval --policy {pol.name} --task bandit --arms {K} --experts {N} --steps {T} --episodes {E} "
           f"--seed {S}{flags}{' --past-horizon' if past else ''} --json")
    return r, cmd


def at(curve, p):
    return curve[int(p) - 1] if int(p) <= len(curve) else None


def pts(curve):
    return " / ".join(f"{at(curve, p):.1f}" for p in POINTS if at(curve, p) is not None)


def cells(r, key=None):
    return pts(r["regret_by_step"] if key is None else r["baselines"][key])


def plot_curves(rows, path, title):
    from badger_runtime.demo.figures import save_png, subplots

    fig, axes = subplots(1, len(rows), figsize=(4.2 * len(rows), 3.8), squeeze=False)
    colors = {"thompson": "tab:green", "ucb1": "tab:red", "epsilon_greedy": "tab:orange", "uniform_random": "tab:gray"}
    for ax, (label, r) in zip(axes[0], rows):
        t = np.arange(1, len(r["regret_by_step"]) + 1)
        for k, c in colors.items():
            ax.plot(t, r["baselines"][k], color=c, lw=1.1, label=NAMES[k])
        ax.plot(t, r["regret_by_step"], color="tab:blue", lw=2.0, label="Badger agent")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("inner step (arm pulls)")
        top = max(max(r["baselines"]["ucb1"]), max(r["regret_by_step"])) * 1.1
        ax.set_ylim(0, top)
    axes[0, 0].set_ylabel("cumulative regret (mean over episodes)")
    axes[0, 0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def plot_experts(ns, ours, base, path, title):
    from badger_runtime.demo.figures import label_axes, save_png, subplots

    fig, ax = subplots(figsize=(6, 3.8))
    for p, m in zip(POINTS, ("o", "s", "^")):
        if at(base["thompson"], p) is None:
            continue
        ax.plot(ns, [at(o, p) for o in ours], marker=m, label=f"Badger agent, T = {p}")
        ax.axhline(at(base["thompson"], p), ls=":", color=ax.lines[-1].get_color(), lw=1)
    ax.set_xscale("log")
    label_axes(ax, xlabel="experts N", ylabel="cumulative regret", title=title, legend="best", grid=False)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--policy", default="bandit-v1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--figures", default="docs/figures")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: arms,gaussian,others,experts,continual")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    E, S, T = args.episodes, args.seed, args.steps
    pol = load_policy(args.policy)
    N = pol.task.experts[1]
    n_for = make_task(pol.task).experts_for  # N at K arms (the 'arms' membrane needs N >= K)
    lo, hi = pol.task.dims
    n_text = f"N = {N}" if n_for(100) == N else f"N = {N} or K if larger"
    fig = lambda what: (f"{args.figures}/bandit_{what}.png" if pol.name == "bandit-v1"  # noqa: E731
                        else f"{args.figures}/{pol.name}_{what}.png")
    out = []
    w = out.append
    t0 = time.perf_counter()

    if "arms" not in skip:
        w(f"### Regret at T = {' / '.join(POINTS)} (Bernoulli arms, {n_text}, {E} episodes, seed {S})\n")
        w(f"`{pol.name}` was trained with K in [{lo}, {hi}]. Each cell: cumulative regret after 100 / 500 / 1,000 "
          f"pulls, mean over episodes; the baselines ran on the same arm draws.\n")
        w("| K | Badger agent | Thompson | UCB1 | eps-greedy (tuned eps) | uniform random | agent / Thompson | "
          "agent / UCB1 | command |")
        w("|---|---|---|---|---|---|---|---|---|")
        curves = []
        for K in (hi // 2, hi, 20, 50, 100):
            r, cmd = run(pol, K=K, N=n_for(K), T=T, E=E, S=S)
            th, ucb = r["baselines"]["thompson"], r["baselines"]["ucb1"]
            ratio = lambda b: " / ".join(f"{at(r['regret_by_step'], q) / at(b, q):.2f}" for q in POINTS  # noqa: E731
                                         if at(b, q) is not None)
            w(f"| {K}{' (trained)' if K <= hi else ''} | {cells(r)} | {cells(r, 'thompson')} | {cells(r, 'ucb1')} | "
              f"{cells(r, 'epsilon_greedy')} ({r['epsilon']:g}) | {cells(r, 'uniform_random')} | {ratio(th)} | "
              f"{ratio(ucb)} | `{cmd}` |")
            if K in (hi, 50, 100):
                curves.append((f"K = {K}" + (" (trained)" if K <= hi else ""), r))
        w("")
        plot_curves(curves, fig("regret"),
                    f"{pol.name}: Bernoulli bandits, {n_text}, {E} episodes (seed {S}); trained K in [{lo}, {hi}]")

    if "gaussian" not in skip:
        w(f"### Gaussian arms (never trained on: means ~ N(0, 1), rewards N(mean, 1); {n_text}, {E} episodes)\n")
        w("| K | Badger agent | Thompson (Gaussian) | UCB1 | eps-greedy | uniform random | command |")
        w("|---|---|---|---|---|---|---|")
        for K in (hi, 50):
            r, cmd = run(pol, K=K, N=n_for(K), T=T, E=E, S=S, arm_dist="gaussian")
            w(f"| {K} | {cells(r)} | {cells(r, 'thompson')} | {cells(r, 'ucb1')} | {cells(r, 'epsilon_greedy')} | "
              f"{cells(r, 'uniform_random')} | `{cmd}` |")
        w("")

    if "others" not in skip:
        w(f"### Never trained on bandits: the first wave's guessing and dimension policies (retired since session 44; "
          f"K = 10, T = 500, {E} episodes)\n")
        w("| policy | arm choice | regret at 100 / 500 | uniform random | UCB1 | agent / random at 500 | command |")
        w("|---|---|---|---|---|---|---|")
        for name in OTHER_POLICIES:
            other = load_policy(name)
            n = other.task.experts[1] if other.task.experts[0] == other.task.experts[1] else 20
            for choice in ("sample", "argmax"):
                r, cmd = run(other, K=10, N=n, T=500, E=E, S=S, choice=choice)
                rand = r["baselines"]["uniform_random"]
                w(f"| {name} (N = {n}) | {choice} | {cells(r)} | {cells(r, 'uniform_random')} | {cells(r, 'ucb1')} | "
                  f"{at(r['regret_by_step'], 500) / at(rand, 500):.2f} | `{cmd}` |")
        w("")

    if "experts" not in skip:
        n0 = n_for(50)
        ns = sorted({1, 2, 3, N, 2 * N, 5 * N, 10 * N} if n0 == N else {n0, 2 * n0, 5 * n0})
        w(f"### Regret against the number of experts (K = 50, trained N in [{pol.task.experts[0]}, {N}], "
          f"{E} episodes)\n")
        w("| N | regret at 100 / 500 / 1,000 | command |")
        w("|---|---|---|")
        ours, base = [], None
        for n in ns:
            r, cmd = run(pol, K=50, N=n, T=T, E=E, S=S)
            ours.append(r["regret_by_step"])
            base = r["baselines"]
            w(f"| {n} | {cells(r)} | `{cmd}` |")
        w(f"| Thompson (same draws) | {pts(base['thompson'])} | |")
        w(f"| UCB1 (same draws) | {pts(base['ucb1'])} | |")
        w("")
        plot_experts(ns, ours, base, fig("experts"),
                     f"{pol.name}: K = 50, regret against N (dotted: Thompson)")

    if "continual" not in skip:
        r = longrun_report(pol, steps=10_000, episodes=50, seed=S, change_every=(500, 1500))
        plot_longrun(r, fig("continual"))
        w(f"### The 10,000-step check (K = {r['arms']}, N = {N}: means drawn afresh every U[500, 1500] steps, "
          f"never reset; 50 episodes, {r['changes']} changes)\n")
        w("Fraction of pulls on the best arm in windows of steps after each change (the episode start counts as "
          "one), for the changes in the first and in the second half of the run:\n")
        wins = list(r["agent"]["best_after_change_first_half"])
        w("| who | half | " + " | ".join(wins) + " | regret per step (all) |")
        w("|---|---|" + "---|" * len(wins) + "---|")
        for key, label in (("agent", pol.name + " (never reset)"),
                           ("thompson_restarted_at_changes", "Thompson told of each change"),
                           ("thompson", "Thompson, never restarted")):
            for half in ("first", "second"):
                v = r[key][f"best_after_change_{half}_half"]
                w(f"| {label} | {half} | " + " | ".join("-" if v[k] is None else f"{v[k]:.2f}" for k in wins) +
                  f" | {r[key]['mean_regret_per_step']:.4f} |")
        w(f"\nCommand: `badger longrun --policy {pol.name} --task bandit --steps 10000 --episodes 50 --seed {S} "
          f"--change-every 500 1500 --json` (max abs state {r['max_abs_state']:.5f}, finite: {r['finite']}).\n")

    flags = "" if pol.name == "bandit-v1" else f" --policy {pol.name}"
    flags += f" --skip {args.skip}" if args.skip else ""
    w(f"_Made by `python demos/bandit_results.py{flags} --seed {S} --episodes {E}` in {time.perf_counter() - t0:.0f} s._")
    print("\n".join(out))


if __name__ == "__main__":
    main()

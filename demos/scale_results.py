#!/usr/bin/env python
"""Issue 13's numbers for a policy of the scale task (many outputs, partial feedback), with commands.

    python demos/scale_results.py --policy scale-v1 --seed 0 --out docs/figures > /tmp/scale_tables.md

Prints markdown tables (every row names the `badger` command that gives its number on its own)
and writes two figures into --out: error against N (log axis) for several d, and the hot-add
curves. Sections: error vs N; message ablations; hot-add and removal; the same hot-add for
every shipped policy; 10,000 inner steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from badger_runtime.engine import fresh_hurts, numpy_ops
from badger_runtime.episodes import schedule
from badger_runtime.evaluation import run_episodes
from badger_runtime.growth import evaluation_setting, growth_setting, measure_growth
from badger_runtime.longrun import horizon_report
from badger_runtime.policy_card import every_policy, load_policy

OPS = numpy_ops()


SHARDED_FROM = 1000  # agents this large run in the sharded runtime (its sparse routing, one tick per round)


def final(pol, task, *, dims, experts, episodes, seed, steps=None, changes=(), agent=None, curve=False):
    runtime = "sharded" if experts >= SHARDED_FROM and not changes else "engine"
    res = run_episodes(OPS, pol, agent or pol.agent, task, dims=dims, experts=experts, episodes=episodes, seed=seed,
                       steps=steps, changes=changes, runtime=runtime)
    e = res.errors
    return (e.mean(axis=1), e[-1].std() / np.sqrt(e.shape[1])) if curve else float(e[-1].mean())


#: per policy, the flags that make `badger eval` run the setting measured here (a policy trained with
#: target jumps is evaluated on the stationary game: `--task NAME` gives the task's evaluation setting)
EVAL_FLAGS: dict[str, dict] = {}


def shipped_settings(other: list):
    """Each shipped policy measured by an error (the guessing and scale tasks; the others' names go to
    ``other``: a bandit's regret, a classifier's accuracy are measured elsewhere), with the setting
    its rows use (``growth.growth_setting``): (name, policy, task, d = the trained max, N = the trained
    min (>= 2 unless fixed), steps within its horizon, the mid-episode step of a change). The retired policies
    (policies/retired/) keep their rows: the table is where their verdicts were measured."""
    for name in sorted(every_policy()):
        sp = load_policy(name)
        g = growth_setting(sp)
        if g is None:
            other.append(name)
            continue
        EVAL_FLAGS[sp.name] = g.flags
        yield name, sp, g.task, g.dims, g.experts, g.steps, g.at


def cmd(pol, **flags) -> str:
    parts = [f"badger eval --policy {pol.name}"]
    for k, v in {**EVAL_FLAGS.get(pol.name, {}), **flags}.items():
        parts.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}"))
        if k == "init" and v == "fresh" and fresh_hurts(pol):
            parts.append("--allow-harmful-growth")  # the card's growth refuses it otherwise
    return "`" + " ".join(parts) + " --json`"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default="scale-v1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--out", default="docs/figures")
    p.add_argument("--quick", action="store_true", help="fewer sizes (a smoke run)")
    p.add_argument("--longrun-steps", type=int, default=10_000)
    p.add_argument("--dims", default=None,
                   help="the d of the error-vs-N table, comma list (default: the trained max d, 4x and 16x it); the "
                        "first is the d of the other sections (default: the trained max)")
    p.add_argument("--only", default="n,ablations,hot,shipped,remove,long",
                   help="the sections to make (comma list of n, ablations, hot, shipped, remove, long)")
    args = p.parse_args(argv)

    def want(section: str) -> bool:
        return section in args.only.split(",")

    t_start = time.perf_counter()
    pol = load_policy(args.policy)
    task, EVAL_FLAGS[pol.name] = evaluation_setting(pol)
    S, E = args.seed, args.episodes
    n_lo, n_hi = task.experts
    d_lo, d_hi = task.dims
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    w = print
    dims_list = ([int(x) for x in args.dims.split(",")] if args.dims else
                 [d_hi, 4 * d_hi] if args.quick else [d_hi, 4 * d_hi, 16 * d_hi])
    d, n = dims_list[0], n_hi
    curves, ns = {}, []

    # -- error against N ------------------------------------------------------------------------
    if want("n"):
        ns = [1, 2, 4, 8, 16, 32, 64, 128, 320, 1000] if not args.quick else [1, 4, 16, 64]
        ns = sorted(set(ns + [n_hi, 10 * n_hi]))
        w(f"### Error against the number of experts ({pol.name}: trained d in [{d_lo}, {d_hi}], N in [{n_lo}, {n_hi}])\n")
        w("Final-step error (3 x MSE; chance 1.0), mean over episodes, by d (columns) and N (rows); "
          f"seed {S}.\n")
        w("| N | " + " | ".join(f"d = {d}" for d in dims_list) + " | command |")
        w("|---|" + "---|" * (len(dims_list) + 1))
        curves = {d: [] for d in dims_list}
        for n_ in ns:
            row = []
            for d_ in dims_list:
                eps = E if n_ * d_ <= 64 * 1024 else max(4, E // 4)
                v = final(pol, task, dims=d_, experts=n_, episodes=eps, seed=S)
                curves[d_].append(v)
                row.append(f"{v:.3f}" + ("" if eps == E else f" ({eps} ep.)"))
            extra = {"runtime": "sharded"} if n_ >= SHARDED_FROM else {}
            w(f"| {n_} | " + " | ".join(row) + f" | {cmd(pol, dims='D', experts=n_, episodes=E, seed=S, **extra)} |")
        w("")
        _plot_vs_n(out_dir / "scale_error_vs_n.png", ns, curves, (n_lo, n_hi), pol.name)

    # -- ablations -------------------------------------------------------------------------------
    if want("ablations"):
        w(f"### Message ablations (d = {d}, N = {n}, the same episodes)\n")
        w("| agent | final error | command |")
        w("|---|---|---|")
        for label, ab in (("as trained", "none"), ("messages cut (empty inboxes)", "cut"),
                          ("messages shuffled between experts", "shuffle")):
            agent = dataclasses.replace(pol.agent, routing=dataclasses.replace(pol.agent.routing, ablation=ab))
            v = final(pol, task, dims=d, experts=n, episodes=E, seed=S, agent=agent)
            extra = {} if ab == "none" else {"ablate": ab}
            w(f"| {label} | {v:.3f} | {cmd(pol, dims=d, experts=n, episodes=E, seed=S, **extra)} |")
        v = final(pol, task, dims=d, experts=1, episodes=E, seed=S)
        w(f"| one expert | {v:.3f} | {cmd(pol, dims=d, experts=1, episodes=E, seed=S)} |")
        w("")

    # -- hot-add and removal ----------------------------------------------------------------------
    if want("hot"):
        T = task.steps
        at = T // 2
        n0 = max(1, n_hi // 4)
        w(f"### Hot-add and removal (d = {d}, {T} steps, changes before step {at})\n")
        grown = schedule(at, n0, "fresh", allow_harmful=True)  # measured, harm included
        arms = {f"N = {n0} throughout": dict(experts=n0),
                f"N = {n0}, +{n0} fresh at step {at}": dict(experts=n0, changes=grown),
                f"N = {2 * n0} throughout": dict(experts=2 * n0),
                f"N = {2 * n0}, -{n0} at step {at}": dict(experts=2 * n0, changes=schedule(remove_at=at, remove=n0))}
        flags = {f"N = {n0} throughout": dict(experts=n0),
                 f"N = {n0}, +{n0} fresh at step {at}": dict(experts=n0, add_at=at, add=n0, init="fresh"),
                 f"N = {2 * n0} throughout": dict(experts=2 * n0),
                 f"N = {2 * n0}, -{n0} at step {at}": dict(experts=2 * n0, remove_at=at, remove=n0)}
        hot = {}
        w(f"| agent | error at step {at - 1} | at step {min(at + 9, T - 1)} | final | command |")
        w("|---|---|---|---|---|")
        for label, kw in arms.items():
            c, _ = final(pol, task, dims=d, episodes=E, seed=S, curve=True, **kw)
            hot[label] = c
            w(f"| {label} | {c[at - 1]:.3f} | {c[min(at + 9, T - 1)]:.3f} | {c[-1]:.3f} | "
              f"{cmd(pol, dims=d, episodes=E, seed=S, **flags[label])} |")
        w("")
        _plot_hot(out_dir / "scale_hot_add.png", hot, at, pol.name, d)

    # -- every shipped policy: hot-adding fresh experts ---------------------------------------------
    if want("shipped"):
        w("### Hot-adding fresh experts to every shipped policy (as many again at mid-episode; final step)\n")
        w("(The clone columns: the same command with `--init clone`, `--allow-harmful-growth` where the card refuses "
          "clones; `growth.measure_growth` runs both, on the same episodes.)\n")
        w("| policy | d | N | unchanged | + N fresh | ratio | + N clones | ratio | seed-to-seed noise (SEM) "
          "| command |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        other = []
        e = lambda x: f"{x:.4f}" if x >= 1e-3 else f"{x:.2g}"  # noqa: E731 (errors under 0.001: two digits)
        for name, sp, et, dd, nn, steps, mid in shipped_settings(other):
            g = measure_growth(sp, episodes=E * 4, seed=S)  # what `badger export` writes into a card's growth
            w(f"| {name} | {dd} | {nn} | {e(g['unchanged'])} | {e(g['fresh_final'])} | {g['ratio']:.2f} | "
              f"{e(g['clone_final'])} | {g['clone_ratio']:.2f} | {e(g['sem'])} | `{g['command']}` |")
        if other:
            w(f"\n(Not in this table, measured by their own task's metric: {', '.join(other)}; see README.)")
        w("")

    # -- every shipped policy: removing half the experts ----------------------------------------------
    if want("remove"):
        w("### Removing half the experts of every shipped policy (2N, N removed at mid-episode; final step)\n")
        w("| policy | d | 2N -> N | 2N throughout | N throughout | 2N, N removed | removed / N throughout | SEM | command |")
        w("|---|---|---|---|---|---|---|---|---|")
        other = []
        for name, sp, et, dd, nn, steps, mid in shipped_settings(other):
            big, _ = final(sp, et, dims=dd, experts=2 * nn, episodes=E * 4, seed=S, steps=steps, curve=True)
            small, _ = final(sp, et, dims=dd, experts=nn, episodes=E * 4, seed=S, steps=steps, curve=True)
            cut, sem = final(sp, et, dims=dd, experts=2 * nn, episodes=E * 4, seed=S, steps=steps, curve=True,
                             changes=schedule(remove_at=mid, remove=nn))
            w(f"| {name} | {dd} | {2 * nn} -> {nn} | {big[-1]:.4f} | {small[-1]:.4f} | {cut[-1]:.4f} | "
              f"{cut[-1] / max(small[-1], 1e-9):.2f} | {sem:.4f} | "
              f"{cmd(sp, dims=dd, experts=2 * nn, steps=steps, remove_at=mid, remove=nn, episodes=E * 4, seed=S)} |")
        if other:
            w(f"\n(Not in this table, measured by their own task's metric: {', '.join(other)}; see the removal "
              "table of the partitioned membranes.)")
        w("")

    # -- long horizon ------------------------------------------------------------------------------
    if want("long"):
        r = horizon_report(pol, steps=args.longrun_steps, episodes=20, seed=S, dims=d)
        w(f"### {args.longrun_steps:,} inner steps, never reset (d = {r['dims']}, N = {r['experts']})\n")
        w("| step | " + " | ".join(r["error_at"]) + " | max abs state | command |")
        w("|---|" + "---|" * (len(r["error_at"]) + 2))
        w("| error | " + " | ".join(f"{v:.4f}" for v in r["error_at"].values()) + f" | {r['max_abs_state']:.4f} | "
          f"`badger longrun --policy {pol.name} --steps {args.longrun_steps} --episodes 20 --seed {S}"
          f"{'' if d == d_hi else f' --dims {d}'} --json` |")
        w("")
    only = "" if set(args.only.split(",")) >= {"n", "ablations", "hot", "shipped", "remove", "long"} else \
        f" --only {args.only}"
    dims_flag = f" --dims {args.dims}" if args.dims else ""
    w(f"_Made by `python demos/scale_results.py --policy {args.policy} --seed {S} --episodes {E}{dims_flag}{only}` in "
      f"{time.perf_counter() - t_start:.0f} s._")
    print(json.dumps({"curves": {str(k): v for k, v in curves.items()}, "ns": ns}), file=sys.stderr)
    return 0


def _figure():
    from badger_runtime.demo.figures import subplots

    return subplots(figsize=(7.5, 4.5), dpi=120)


def _save(fig, ax, path, xlabel, ylabel, title):
    from badger_runtime.demo.figures import save_png

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def _plot_vs_n(path, ns, curves, trained, name):
    fig, ax = _figure()
    ax.axvspan(*trained, color="0.9", label=f"trained N in [{trained[0]}, {trained[1]}]")
    for d, ys in curves.items():
        ax.plot(ns, ys, marker="o", label=f"d = {d}")
    ax.set_xscale("log")
    _save(fig, ax, path, "experts N (log)", "final-step error (3 x MSE; chance 1.0)",
          f"{name}: error against the number of experts")


def _plot_hot(path, hot, at, name, d):
    fig, ax = _figure()
    for label, c in hot.items():
        ax.plot(np.arange(len(c)), c, label=label, lw=1.6)
    ax.axvline(at - 0.5, color="k", ls=":", lw=1)
    ax.set_yscale("log")
    _save(fig, ax, path, "inner step", "error (3 x MSE)", f"{name}: experts added or removed mid-episode (d = {d})")


if __name__ == "__main__":
    sys.exit(main())

"""The few-shot classification results of docs/results.md, from the shipped policy, torch-free.

Runs the `badger` commands it prints (the same code path, in process), writes
``docs/figures/fewshot.png`` and prints the markdown tables:

    python demos/fewshot_results.py --policy policies/fewshot-v4.onnx --seed 0 --episodes 500

Held-out digits (4-way, balanced streams of 11 shots, accuracy by shots seen before), the
datasets never seen in training (online accuracy over the first 10 / 25 / 50 examples), 10-way
digits against the number of experts, and the 10,000-step check (classes change every U[50, 150]
steps, never reset).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np

from badger_runtime.cli import main

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("nearest_class_mean", "one_nearest_neighbour", "online_logistic_regression", "chance")
SHORT = {"nearest_class_mean": "NCM", "one_nearest_neighbour": "1-NN", "online_logistic_regression": "logreg",
         "chance": "chance"}


def badger(args: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(args)
    if rc:
        raise SystemExit(f"badger {' '.join(args)} failed ({rc})")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def command(args: list[str]) -> str:
    return "badger " + " ".join(args)


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def main_(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="policies/fewshot-v4.onnx")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--episodes", type=int, default=500)
    ap.add_argument("--experts", default="1,10,40,160,320,640,960", help="N for the 10-way table")
    ap.add_argument("--long-episodes", type=int, default=4)
    ap.add_argument("--long-steps", type=int, default=10_000)
    ap.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "fewshot.png"))
    ap.add_argument("--json", default=None, help="also write every report here")
    ap.add_argument("--figure-only", default=None, metavar="JSON",
                    help="redraw the figure from the reports a previous run wrote with --json (no evaluation)")
    a = ap.parse_args(argv)
    if a.figure_only:
        figure(a.figure, json.loads(Path(a.figure_only).read_text()))
        return
    P, S, E = a.policy, str(a.seed), str(a.episodes)
    t0 = time.perf_counter()
    reports, md = {}, []

    # 1. held-out digits, 1..10 shots
    args = ["eval", "--policy", P, "--task", "fewshot", "--classes", "4", "--steps", "44", "--option", "shots=11",
            "--episodes", E, "--seed", S, "--json"]
    r = reports["heldout_digits"] = badger(args)
    md.append(f"### Held-out digits 6-9 (4-way, never trained on; N = {r['task']['experts']}, balanced streams of "
              f"11 examples per class, {r['episodes']} episodes)\n")
    md.append(f"`{command(args)}`; accuracy of the prediction on an example whose class was seen k times before.\n")
    md.append("| shots k | agent | " + " | ".join(SHORT[b] for b in BASELINES) + " | agent - NCM |")
    md.append("|---|---|" + "---|" * len(BASELINES) + "---|")
    for k in range(1, 11):
        ag, ncm = r["accuracy_by_shot"][k], r["baselines_by_shot"]["nearest_class_mean"][k]
        md.append(f"| {k} | **{fmt(ag)}** | " + " | ".join(fmt(r["baselines_by_shot"][b][k]) for b in BASELINES)
                  + f" | {ag - ncm:+.3f} |")
    md.append(f"\n(logistic regression lr {r['logreg_lr']}, tuned on training-split episodes; k = 0: agent "
              f"{fmt(r['accuracy_by_shot'][0])}, NCM {fmt(r['baselines_by_shot']['nearest_class_mean'][0])})\n")

    # 2. datasets never seen in training
    md.append("### Datasets never seen in training (features standardised online; N = classes x features)\n")
    md.append("Online accuracy: the mean over the first n examples of the prediction made before each label.\n")
    md.append("| dataset | C | F | N | n | agent | NCM | 1-NN | logreg (lr) | chance | command |")
    md.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for ds in ("iris", "wine", "breast_cancer"):
        args = ["eval", "--policy", P, "--task", "fewshot", "--dataset", ds, "--steps", "50", "--episodes", E,
                "--seed", S, "--json"]
        r = reports[ds] = badger(args)
        for n in ("10", "25", "50"):
            b = r["baselines_online"]
            md.append(f"| {ds} | {r['classes']} | {r['features']} | {r['task']['experts']} | {n} | "
                      f"**{fmt(r['online_accuracy'][n])}** | {fmt(b['nearest_class_mean'][n])} | "
                      f"{fmt(b['one_nearest_neighbour'][n])} | {fmt(b['online_logistic_regression'][n])} "
                      f"({r['logreg_lr']}) | {fmt(b['chance'][n])} | " + (f"`{command(args)}`" if n == "10" else "") + " |")
    md.append("")

    # 3. 10-way digits against N
    Ns = [int(n) for n in a.experts.split(",")]
    md.append("### 10-way digits (all classes, test-split examples) against the number of experts N\n")
    md.append("The same policy; N = 640 = 10 classes x 64 features fills the grid once (fewer experts see fewer "
              "features, more repeat cells). Mean accuracy over the 50 steps and at the last step.\n")
    md.append("| N | mean accuracy | last step | command |")
    md.append("|---|---|---|---|")
    by_n = []
    for n in Ns:
        args = ["eval", "--policy", P, "--task", "fewshot", "--classes", "10", "--option", "classes_pool=all",
                "--option", "split=test", "--steps", "50", "--experts", str(n), "--episodes", str(min(a.episodes, 200)),
                "--seed", S, "--option", "baselines=fast" if n != Ns[-1] else "baselines=all", "--json"]
        r = badger(args)
        by_n.append(r)
        md.append(f"| {n} | {fmt(r['mean_accuracy'])} | {fmt(r['final_accuracy'])} | `{command(args)}` |")
    base = by_n[-1]["baselines"]
    md.append("| baselines (same episodes) | " + ", ".join(f"{SHORT[b]} {np.mean(base[b]):.3f}" for b in BASELINES)
              + " | " + ", ".join(f"{SHORT[b]} {base[b][-1]:.3f}" for b in BASELINES) + " | |\n")
    reports["ten_way"] = [{k: r[k] for k in ("mean_accuracy", "final_accuracy", "accuracy_by_step")}
                          | {"experts": r["task"]["experts"]} for r in by_n]
    reports["ten_way_baselines"] = base

    # 4. the 10,000-step check
    args = ["longrun", "--policy", P, "--task", "fewshot", "--classes", "3", "--experts", "192", "--steps",
            str(a.long_steps), "--episodes", str(a.long_episodes), "--seed", S, "--jump-every", "50", "150", "--json",
            "--full"]
    r = reports["longrun"] = badger(args)
    ac = r["after_change"]
    md.append(f"### {a.long_steps:,} steps, never reset: held-out digits, 3 of 4 classes (and their labels) drawn "
              "afresh every U[50, 150] steps\n")
    md.append(f"`{command(args)}`\n")
    md.append("| accuracy over the 20 steps before step | " + " | ".join(r["accuracy_at"]) + " |")
    md.append("|---|" + "---|" * len(r["accuracy_at"]))
    md.append("| agent, never reset | " + " | ".join(fmt(v) for v in r["accuracy_at"].values()) + " |\n")
    md.append(f"{r['changes']} changes; accuracy over the 20 steps before a change {fmt(r['accuracy_before_change'])}; "
              f"mean accuracy over the {ac['steps']} steps after a change: never reset "
              f"**{fmt(ac['mean']['agent_never_reset'])}**, the same agent reset at the change "
              f"{fmt(ac['mean']['agent_reset_at_changes'])}, NCM restarted at the change "
              f"{fmt(ac['mean']['nearest_class_mean_restarted'])}; largest state entry {r['max_abs_state']:.4f}; "
              f"continual: **{r['continual']}**.\n")

    figure(a.figure, reports)
    md.append(f"_Made by `python demos/fewshot_results.py --policy {P} --seed {a.seed} --episodes {a.episodes}` in "
              f"{time.perf_counter() - t0:.0f} s._")
    print("\n".join(md))
    if a.json:
        Path(a.json).write_text(json.dumps(reports))


def figure(path, reports):
    from badger_runtime.demo.figures import C_AGENT, C_BASELINES, _caption, _figure, _save, label_axes

    fig = _figure(16.0, 8.4)
    panels = [("heldout_digits", "held-out digits 6-9, 4-way: accuracy by shots seen"), ("iris", "iris (never seen)"),
              ("wine", "wine (never seen)"), ("breast_cancer", "breast cancer (never seen)")]
    for i, (key, title) in enumerate(panels):
        ax = fig.add_axes([0.05 + 0.245 * i, 0.56, 0.2, 0.36])
        r = reports[key]
        if key == "heldout_digits":
            k = np.arange(1, 11)
            ax.plot(k, r["accuracy_by_shot"][1:], color=C_AGENT, lw=2.4, marker="o", label="agent")
            for b in BASELINES:
                ax.plot(k, r["baselines_by_shot"][b][1:], color=C_BASELINES[b], lw=1.4, marker=".",
                        ls=":" if b == "chance" else "-", label=SHORT[b])
            xlabel = "examples of the class seen before (shots)"
        else:
            x = np.arange(1, len(r["accuracy_by_step"]) + 1)
            cum = lambda v: np.cumsum(v) / np.arange(1, len(v) + 1)  # noqa: E731
            ax.plot(x, cum(r["accuracy_by_step"]), color=C_AGENT, lw=2.4, label="agent")
            for b in BASELINES:
                ax.plot(x, cum(r["baselines"][b]), color=C_BASELINES[b], lw=1.4, ls=":" if b == "chance" else "-",
                        label=SHORT[b])
            xlabel = "examples seen (online accuracy so far)"
        ax.set_ylim(0, 1.0)
        label_axes(ax, xlabel=xlabel, ylabel="accuracy" if i == 0 else None, title=title,
                   legend="lower right" if i == 0 else None)
    ax = fig.add_axes([0.05, 0.1, 0.42, 0.33])
    ns = [r["experts"] for r in reports["ten_way"]]
    ax.plot(ns, [r["mean_accuracy"] for r in reports["ten_way"]], color=C_AGENT, lw=2.2, marker="o",
            label="agent, mean over 50 steps")
    ax.plot(ns, [r["final_accuracy"] for r in reports["ten_way"]], color=C_AGENT, lw=1.2, ls="--", marker="s",
            label="agent, step 50")
    ncm = reports["ten_way_baselines"]["nearest_class_mean"]
    ax.axhline(np.mean(ncm), color=C_BASELINES["nearest_class_mean"], lw=1.2, label="NCM, mean over 50 steps")
    ax.axvline(640, color="#2ca02c", lw=6, alpha=0.25, label="N = 10 x 64 (one expert per cell)")
    ax.set_xscale("log")
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns], fontsize=8)
    ax.minorticks_off()
    ax.set_ylim(0, 1.0)
    label_axes(ax, xlabel="number of experts N (same policy, log scale)", ylabel="accuracy",
               title="10-way digits (test split) against N", legend="upper left")
    ax = fig.add_axes([0.56, 0.1, 0.41, 0.33])
    ac = reports["longrun"]["after_change"]
    x = np.arange(len(ac["agent_never_reset"]))
    ax.plot(x, ac["agent_never_reset"], color=C_AGENT, lw=2.2, label="agent, never reset")
    ax.plot(x, ac["agent_reset_at_changes"], color=C_AGENT, lw=1.2, ls="--", label="agent reset at the change")
    ax.plot(x, ac["nearest_class_mean_restarted"], color=C_BASELINES["nearest_class_mean"], lw=1.2,
            label="NCM restarted at the change")
    ax.set_ylim(0, 1.0)
    steps = reports["longrun"]["steps"]
    label_axes(ax, xlabel="steps since the classes changed", ylabel="accuracy", legend="lower right",
               title=f"{steps:,} steps never reset (held-out digits, classes change every U[50, 150])")
    name = Path(str(reports["heldout_digits"].get("policy", "fewshot"))).stem  # the policy the reports ran
    fig.suptitle(f"Online few-shot classification with one shared expert policy ({name})", fontsize=12)
    _caption(fig, "Every curve is on the same episodes and example order as the agent's. The agent sees one example "
                  "per inner step and the label of the previous one; its weights are frozen.", width=200)
    _save(fig, path, None)


if __name__ == "__main__":
    main_()

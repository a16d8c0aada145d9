"""`badger demo [guessing|dimensions|growing|communication|fewshot]`: the paper's figures, re-run.

No sub-demo: the main demo (the default policy on the guessing game: a loss-by-step table
against tuned Adam and the mean solution, messages and rounds, and figures). Every run
writes its PNGs and ``results.json`` into ``--out`` (default ./demo-output). torch is
never imported.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from . import (DEFAULT_DIMS_POLICY, DEFAULT_FEWSHOT_POLICY, DEFAULT_GROW_POLICY, DEFAULT_ONE_EXPERT_POLICY,
               DEFAULT_POLICY, DEMOS)

SUB = tuple(d for d in DEMOS if d != "main")


def register(sub) -> argparse.ArgumentParser:
    from ..cli.common import SEED

    p = sub.add_parser("demo", help="re-run the paper's experiments with the shipped policies; write figures",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", nargs="?", choices=SUB, default=None,
                   help="a sub-demo: guessing (Fig. 6, 9), dimensions (Fig. 7), growing (more experts), "
                        "communication (Fig. 8), fewshot (learning iris from scratch); none: the main demo")
    p.add_argument("--out", default="demo-output", help="folder for the PNG figures and results.json")
    p.add_argument("--quick", action="store_true", help="few episodes, low resolution: a few seconds")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the episodes")
    p.add_argument("--episodes", type=int, default=None, help="episodes per evaluation (default: per demo)")
    p.add_argument("--policy", default=None,
                   help="the chosen demo's policy: main / guessing (Fig. 9): "
                        f"{DEFAULT_POLICY}; dimensions: {DEFAULT_DIMS_POLICY}; growing: {DEFAULT_GROW_POLICY}; "
                        f"communication: {DEFAULT_ONE_EXPERT_POLICY}; fewshot: {DEFAULT_FEWSHOT_POLICY}")
    p.add_argument("--one-expert-policy", default=DEFAULT_ONE_EXPERT_POLICY,
                   help="the Fig. 6 policy (last-step trained) used by guessing and communication")
    p.add_argument("--dims-policy", default=None,
                   help=f"the Fig. 7 policy (scalar feedback, trained d in [1, 6]) used by dimensions (default "
                        f"{DEFAULT_DIMS_POLICY}); growing takes it too when --grow-policy is not given")
    p.add_argument("--grow-policy", default=None,
                   help=f"the policy grown by the growing demo (default {DEFAULT_GROW_POLICY}, trained with experts "
                        "added mid-episode)")
    p.add_argument("--runtime", choices=("actors", "engine"), default="actors",
                   help="the main demo's runtime: actors (experts as trio tasks exchanging msgpack messages) or "
                        "engine (batched numpy + onnxruntime, ~20x faster); sub-demos use the engine")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object instead of tables")
    p.set_defaults(fn=cmd_demo)
    return p


def options_from_args(args):
    from .run import DemoOptions

    o = DemoOptions(out=Path(args.out), quick=args.quick, seed=args.seed, one_expert_policy=args.one_expert_policy,
                    dims_policy=args.dims_policy or DEFAULT_DIMS_POLICY,
                    grow_policy=args.grow_policy or args.dims_policy or DEFAULT_GROW_POLICY, episodes=args.episodes,
                    runtime=args.runtime)
    which = args.which or "main"
    if args.policy:  # (the growing demo ran its default whatever --policy or --dims-policy named)
        if which == "dimensions":
            o.dims_policy = args.policy
        elif which == "growing":
            o.grow_policy = args.policy
        elif which == "communication":
            o.one_expert_policy = args.policy
        elif which == "fewshot":
            o.fewshot_policy = args.policy
        else:
            o.policy = args.policy
    if args.episodes is not None and args.episodes < 1:
        from ..config import ConfigError

        raise ConfigError("--episodes must be >= 1")
    return o


def cmd_demo(args):
    from rich.console import Console

    from .run import run_demo

    which = args.which or "main"
    o = options_from_args(args)
    console = Console(stderr=args.json)
    if not args.json:
        o.log = lambda msg: None
    with console.status(f"running the {which} demo ...", spinner="dots"):
        res = run_demo(which, o)
    _write_results(o.out, res)
    if args.json:
        print(json.dumps(res))
        return
    PRINTERS[which](console, res)
    if "skipped" in res:
        console.print(f"[yellow]skipped:[/] {res['skipped']}", soft_wrap=True)
        return
    for note in res.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    console.print(f"runtime: {res['runtime']}; {res['seconds']:.1f} s", highlight=False, soft_wrap=True)
    console.print(f"wrote {len(res['figures'])} figure(s) to {o.out.resolve()}/ :", highlight=False, soft_wrap=True)
    for f in res["figures"]:
        console.print(f"  {f}", highlight=False, soft_wrap=True)


def _write_results(out: Path, res: dict):
    """Merge this demo's results into OUT/results.json (one entry per demo)."""
    path = Path(out) / "results.json"
    try:
        allres = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        allres = {}
    allres[res["demo"]] = res
    path.write_text(json.dumps(allres, indent=1, default=float))


def _g(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _final_line(console, agent, optimizer=None, mean_solution=None, chance=None, label="final step"):
    parts = [f"agent {_g(agent)}"]
    if optimizer is not None:
        parts.append(f"optimizer {_g(optimizer)}")
    if mean_solution is not None:
        parts.append(f"mean-solution {_g(mean_solution)}")
    if chance is not None:
        parts.append(f"chance {_g(chance)}")
    console.print(f"{label}: " + " | ".join(parts), highlight=False, soft_wrap=True)


def _loss_table(title, agent, optimizer, opt_name, mean_solution):
    from rich.table import Table

    t = Table(title=title)
    t.add_column("step", justify="right")
    t.add_column("agent", justify="right", style="bold")
    t.add_column(opt_name, justify="right")
    t.add_column("mean solution", justify="right")
    for i, (a, b) in enumerate(zip(agent, optimizer)):
        t.add_row(str(i), _g(a), _g(b), _g(mean_solution))
    return t


def _opt_name(opt: dict) -> str:
    (k, v), = opt["param"].items()
    return f"{opt['name']} ({k}={v:.3g})"


def print_main(console, res):
    n = res["numbers"]
    opt = n["optimizer"]
    title = (f"{Path(res['policy']).stem}: error (3 x MSE) by inner step, N={n['experts']} d={n['dims']}, "
             f"{n['episodes']} episodes")
    console.print(_loss_table(title, n["agent_mse_by_step"], opt["mse_by_step"], _opt_name(opt), n["mean_solution"]))
    console.print(f"messages exchanged: {n['messages_total']} ({_g(n['messages_per_episode'])} per episode); "
                  f"communication rounds used: {n['rounds_total']} ({_g(n['rounds_per_step'])} per step)",
                  highlight=False, soft_wrap=True)
    st = n.get("message_stats") or {}
    if st:
        console.print(f"actor runtime: {st['sent']} sent, {st['delivered']} delivered, {st['dropped']} dropped, "
                      f"{st['bad_frames']} bad frames; {st['policy_calls']} policy calls for {st['policy_rows']} "
                      "expert steps (micro-batched)", highlight=False, soft_wrap=True)
    _final_line(console, n["agent_final"], opt["final_mse"], n["mean_solution"], n["chance"])


def print_guessing(console, res):
    n6, n9 = res["numbers"]["fig6"], res["numbers"]["fig9"]
    opt = n9["optimizer"]
    console.print(_loss_table(f"Fig. 9 ({n9['policy']}, {n9['episodes']} episodes): error by inner step",
                              n9["agent_mse_by_step"], opt["mse_by_step"], _opt_name(opt), n9["mean_solution"]))
    console.print(f"Fig. 6 ({n6['policy']}): peak error {_g(n6['peak_mse'])} at step {n6['peak_step']}, "
                  f"final {_g(n6['agent_final'])} (it oscillates, then hits the target at the last step)",
                  highlight=False, soft_wrap=True)
    _final_line(console, n9["agent_final"], opt["final_mse"], n9["mean_solution"], n9["chance"])


def print_dimensions(console, res):
    if "skipped" in res:
        return
    from rich.table import Table

    n = res["numbers"]
    lo, hi = n["trained_dims"]
    t = Table(title=f"Fig. 7: error at the last step vs d (N={n['experts']}, {n['episodes']} episodes per d)")
    for c in ("d", "agent", "(sem)", n["by_dims"][0]["optimizer"], "mean solution", "chance"):
        t.add_column(c, justify="right")
    for r in n["by_dims"]:
        d = f"{r['d']}*" if lo <= r["d"] <= hi else str(r["d"])
        t.add_row(d, _g(r["agent_final"]), _g(r["agent_final_sem"]), _g(r["optimizer_final"]), _g(r["mean_solution"]),
                  _g(r["chance"]))
    console.print(t)
    console.print(f"* trained range d in [{lo}, {hi}]")
    d = max(lo, 2)  # at d = 1 the mean solution is exact (its error is 0): the line compares at the first d it is not
    r = next(r for r in n["by_dims"] if r["d"] == d)
    _final_line(console, r["agent_final"], r["optimizer_final"], r["mean_solution"], r["chance"],
                label=f"final step (d={d})")


def print_growing(console, res):
    from rich.table import Table

    n = res["numbers"]
    ds = sorted({r["d"] for r in n["by_experts"]})
    lo, hi = n["trained_experts"]
    t = Table(title=f"Growing: error at the last step vs N experts ({n['episodes']} episodes each)")
    t.add_column("N", justify="right")
    for d in ds:
        t.add_column(f"agent d={d}", justify="right")
    by = {(r["d"], r["experts"]): r for r in n["by_experts"]}
    for N in sorted({r["experts"] for r in n["by_experts"]}):
        t.add_row(f"{N}*" if lo <= N <= hi else str(N), *[_g(by[(d, N)]["agent_final"]) for d in ds])
    t.add_row("mean sol.", *[_g(n["mean_solution"][f"d={d}"]) for d in ds], style="dim")
    console.print(t)
    console.print(f"* trained range N in [{lo}, {hi}]")
    h = n["hot_add"]
    t = Table(title=f"Hot-add at step {h['add_at']} (d={h['dims']}, {h['episodes']} episodes)")
    for c in ("variant", f"error at step {h['add_at'] - 1} (before)", "final error"):
        t.add_column(c, justify="right" if c != "variant" else "left")
    for r in h["variants"]:
        t.add_row(r["variant"], _g(r["before_add"]), _g(r["final"]))
    console.print(t)
    d0 = f"d={ds[0]}"
    best = min(r["agent_final"] for r in n["by_experts"] if r["d"] == ds[0])
    _final_line(console, best, None, n["mean_solution"][d0], n["chance"][d0], label=f"final step (best N, {d0})")


def print_communication(console, res):
    from rich.table import Table

    n = res["numbers"]
    t = Table(title=f"Fig. 8: routing attention over the inner loop (N={n['experts']}, {n['episodes']} episodes)")
    t.add_column("step", justify="right")
    t.add_column("mean self weight", justify="right")
    t.add_column("others -> expert 0 (hears the error)", justify="right")
    for i, (a, b) in enumerate(zip(n["self_weight_by_step"], n["others_to_expert0_by_step"])):
        t.add_row(str(i), _g(a), _g(b))
    console.print(t)
    _final_line(console, n["agent_final"], None, n["mean_solution"])


def print_fewshot(console, res):
    if "skipped" in res:
        return
    from rich.table import Table

    n = res["numbers"]
    t = Table(title=f"{Path(res['policy']).stem} learning iris from scratch: one episode, step by step "
                    f"(N={n['experts']}, features standardised online)")
    for c in ("step", "features", "scores", "prediction", "label", ""):
        t.add_column(c, justify="right")
    for s in n["episode"][:20]:
        t.add_row(str(s["step"]), " ".join(f"{v:+.2f}" for v in s["features"]),
                  " ".join(f"{v:+.2f}" for v in s["scores"]), str(s["prediction"]), str(s["label"]),
                  "[green]right[/]" if s["correct"] else "[red]wrong[/]")
    console.print(t)
    t = Table(title=f"Online accuracy over the first k examples ({n['episodes']} episodes, same episodes for all)")
    t.add_column("learner")
    ks = list(next(iter(n["online_accuracy"].values())))
    for k in ks:
        t.add_column(f"first {k}", justify="right")
    for name, acc in n["online_accuracy"].items():
        t.add_row(name.replace("_", " "), *[_g(acc[k]) for k in ks], style="bold" if name == "agent" else None)
    console.print(t)


PRINTERS = {"main": print_main, "guessing": print_guessing, "dimensions": print_dimensions, "growing": print_growing,
            "communication": print_communication, "fewshot": print_fewshot}


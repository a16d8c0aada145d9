"""`badger ...`: a thin command line over the library (parses, calls, prints).

torch is imported only by the commands that need it (train, export, eval of a
checkpoint); everything else runs on a base install.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .config import ConfigError

TASKS = ("guessing", "dimensions")


def _add_eval_flags(p: argparse.ArgumentParser):
    p.add_argument("--task", choices=TASKS, default=None,
                   help="default: the policy's own task; guessing: the stationary guessing game with the policy's "
                        "addresses; dimensions: the same with random addresses per episode")
    p.add_argument("--dims", type=int, default=None, help="d, the number of outputs (default: the trained maximum)")
    p.add_argument("--experts", type=int, default=None, help="N, the number of experts (default: as trained)")
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="inner steps (default: the policy's training horizon)")
    p.add_argument("--rounds", type=int, default=None, help="communication rounds per step (max for non-fixed rules)")
    p.add_argument("--routing", default=None, help="override the routing kind (dense, topk, hardwired, homogeneous, random)")
    p.add_argument("--agreement", default=None, help="override the agreement rule (fixed, convergence, quorum)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _resolve(args, agent, task):
    """Apply the eval flags to the policy's own configs."""
    agent = dataclasses.replace(agent, routing=dataclasses.replace(agent.routing),
                                agreement=dataclasses.replace(agent.agreement))
    if args.routing:
        agent.routing.kind = args.routing
    if args.agreement:
        agent.agreement.rule = args.agreement
    if args.rounds is not None:
        agent.agreement.rounds = args.rounds
    agent.validate()
    if args.task is not None:  # the stationary game (a policy trained with target jumps runs without them)
        task = dataclasses.replace(task, jump_every=(0, 0))
    if args.task == "dimensions":
        task = dataclasses.replace(task, addresses="random")
    if args.steps is not None:
        task = dataclasses.replace(task, steps=args.steps).validate()
    dims = task.dims[1] if args.dims is None else args.dims
    experts = args.experts if args.experts is not None else (
        task.experts[0] if task.experts[0] == task.experts[1] else 20)
    if dims < 1 or experts < 1 or args.episodes < 1:
        raise ConfigError("--dims, --experts and --episodes must be >= 1")
    return agent, task, dims, experts


def _print_report(report: dict, as_json: bool):
    if as_json:
        print(json.dumps(report))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"d={report['task']['dims']} N={report['task']['experts']} ({report['episodes']} episodes, "
                    f"seed {report['seed']})")
    t.add_column("step", justify="right")
    t.add_column("agent", justify="right")
    opt = report.get("optimizer")
    if opt:
        t.add_column(opt["name"], justify="right")
    for i, v in enumerate(report["mse_by_step"]):
        row = [str(i), f"{v:.4f}"]
        if opt:
            row.append(f"{opt['mse_by_step'][i]:.4f}")
        t.add_row(*row)
    Console().print(t)
    print(f"final {report['final_mse']:.4f}  chance {report.get('chance', float('nan')):.3f}  "
          f"mean-solution {report.get('mean_solution', float('nan')):.3f}")


def cmd_eval(args):
    if bool(args.checkpoint) == bool(args.policy):
        raise ConfigError("give exactly one of --checkpoint CKPT or --policy NAME.onnx")
    from .evaluation import evaluate

    if args.policy:
        from .engine import numpy_ops
        from .policy_card import load_policy

        pol = load_policy(args.policy)
        agent, task, dims, experts = _resolve(args, pol.agent, pol.task)
        report = evaluate(numpy_ops(), pol, agent, task, dims=dims, experts=experts, episodes=args.episodes,
                          seed=args.seed, steps=task.steps)
        report["policy"] = str(args.policy)
    else:
        import torch

        from .training.model import torch_ops
        from .training.train import load_checkpoint, policy_from_checkpoint

        pol, cfg = policy_from_checkpoint(load_checkpoint(args.checkpoint))
        agent, task, dims, experts = _resolve(args, cfg.agent, cfg.task)
        with torch.no_grad():
            report = evaluate(torch_ops(), pol, agent, task, dims=dims, experts=experts, episodes=args.episodes,
                              seed=args.seed, steps=task.steps)
        report["checkpoint"] = str(args.checkpoint)
    _print_report(report, args.json)


def cmd_train(args):
    from .config import load_experiment
    from .training.train import train

    cfg = load_experiment(args.config, args.set)
    summary = train(cfg, args.out, resume=args.resume, progress=not args.quiet, final_eval=not args.no_eval)
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"} |
                     ({"final_mse": summary["eval"]["final_mse"]} if "eval" in summary else {})))


def cmd_export(args):
    from .training.export import export

    extra = {}
    if args.command_line:
        extra["training_command"] = args.command_line
    card = export(args.checkpoint, args.out, name=args.name, extra=extra or None)
    if args.eval_episodes:
        from .engine import numpy_ops
        from .evaluation import evaluate
        from .policy_card import card_paths, load_policy, write_card

        pol = load_policy(args.out)
        t = dataclasses.replace(pol.task, jump_every=(0, 0), steps=20 if pol.task.jump_every[1] else pol.task.steps)
        dims = sorted({t.dims[0], t.dims[1]})
        n = t.experts[0] if t.experts[0] == t.experts[1] else 20
        card["evaluation"] = []
        for d in dims:
            r = evaluate(numpy_ops(), pol, pol.agent, t, dims=d, experts=n, episodes=args.eval_episodes, seed=0)
            card["evaluation"].append({"command": f"badger eval --policy {args.out} --dims {d} --experts {n} "
                                                  f"--episodes {args.eval_episodes} --seed 0 --json",
                                       "dims": d, "experts": n, "final_mse": r["final_mse"],
                                       "mse_by_step": [round(v, 6) for v in r["mse_by_step"]],
                                       "chance": r["chance"], "mean_solution": r["mean_solution"],
                                       "optimizer": {k: r["optimizer"][k] for k in ("name", "param", "final_mse")}})
        if pol.task.jump_every[1]:
            from .longrun import jump_report

            a, b = pol.task.jump_every
            r = jump_report(pol, steps=1000, episodes=200, seed=0, jump_every=(a, b))
            card["evaluation_jumps"] = {k: v for k, v in r.items() if "by_step" not in k} | {
                "command": f"badger longrun --policy {args.out} --steps 1000 --episodes 200 --seed 0 "
                           f"--jump-every {a} {b} --json"}
        write_card(card, card_paths(args.out)[1])  # the .onnx is unchanged, so its sha256 still holds
    print(json.dumps({"onnx": str(args.out), "sha256": card["sha256"], "export": card["export"]}))


def cmd_longrun(args):
    from .longrun import horizon_report, jump_report
    from .policy_card import load_policy

    pol = load_policy(args.policy)
    if args.jump_every:
        a, b = args.jump_every
        if not 1 <= a <= b:
            raise ConfigError("--jump-every A B needs 1 <= A <= B")
        report = jump_report(pol, steps=args.steps, episodes=args.episodes, seed=args.seed, jump_every=(a, b),
                             threshold=args.threshold)
        if args.plot:
            from .longrun import jump_traces, plot_jump_traces

            plot_jump_traces(jump_traces(pol, steps=min(args.steps, 300), seed=args.seed, jump_every=(a, b)),
                             args.plot, title=f"{pol.name}: targets jump every U[{a}, {b}] steps, never reset")
            report["plot"] = args.plot
        if not args.full:
            report = {k: v for k, v in report.items() if "by_step" not in k}
    else:
        report = horizon_report(pol, steps=args.steps, episodes=args.episodes, seed=args.seed)
    print(json.dumps(report, indent=None if args.json else 2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="badger", description="Badger agents: many experts, one shared policy.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="learn an expert policy (needs the 'train' extra: torch)")
    t.add_argument("config", nargs="?", default=None, help="TOML config (see configs/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=3e-4")
    t.add_argument("--out", required=True, help="run folder: checkpoint, metrics, summary")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="seeded evaluation with baselines on the same episodes")
    e.add_argument("--checkpoint", default=None)
    e.add_argument("--policy", default=None, help="policies/NAME.onnx (torch-free)")
    _add_eval_flags(e)
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="write the expert policy to ONNX with its card")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True, help="policies/NAME.onnx")
    x.add_argument("--name", default=None)
    x.add_argument("--eval-episodes", type=int, default=1000, help="episodes for the card's evaluation (0: none)")
    x.add_argument("--command-line", default=None, help="the training command, recorded in the card")
    x.set_defaults(fn=cmd_export)

    lr = sub.add_parser("longrun", help="long-horizon stability, or recovery after target jumps (no reset)")
    lr.add_argument("--policy", required=True)
    lr.add_argument("--steps", type=int, default=10_000)
    lr.add_argument("--episodes", type=int, default=100)
    lr.add_argument("--seed", type=int, default=0)
    lr.add_argument("--jump-every", type=int, nargs=2, metavar=("A", "B"), default=None,
                    help="targets jump every U[A, B] steps; report recovery times")
    lr.add_argument("--threshold", type=float, default=0.05, help="recovered = error back under this")
    lr.add_argument("--full", action="store_true", help="include the error curves")
    lr.add_argument("--plot", default=None, metavar="PNG", help="with --jump-every: plot error over time")
    lr.add_argument("--json", action="store_true", help="one line of JSON")
    lr.set_defaults(fn=cmd_longrun)

    # Subcommands that live beside the code they drive (each module has register(sub)):
    from .actors.cli import register as _reg_actors; _reg_actors(sub)  # noqa: E702
    from .serve.cli import register as _reg_serve; _reg_serve(sub)  # noqa: E702
    from .demo.cli import register as _reg_demo; _reg_demo(sub)  # noqa: E702
    from .bench.cli import register as _reg_bench

    _reg_bench(sub)  # other bench kinds register on the returned subparsers
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as e:  # includes PolicyError's siblings below
        print(f"badger: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        from .policy_card import PolicyError

        if isinstance(e, PolicyError):
            print(f"badger: error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`badger longrun`: long-horizon stability, or recovery when the targets jump (never reset)."""

from __future__ import annotations

import json
import sys

from .common import SEED, int_in, note_retired


def register(sub):
    lr = sub.add_parser("longrun", help="long-horizon stability, or recovery after target jumps (no reset); "
                                        "--task bandit: the continual bandit check")
    lr.add_argument("--policy", required=True, help="a shipped policy's name or a path to NAME.onnx")
    lr.add_argument("--task", default=None, metavar="NAME",
                    help="the task (default: the policy's own). A task with its own long run reports it: bandit "
                         "(arm means drawn afresh every U[A, B] steps, --change-every, default 200 800: best-arm "
                         "pulls after each change, regret per step over time), fewshot (classes that change every "
                         "U[A, B] steps, --change-every or --jump-every, default 50 150)")
    lr.add_argument("--dims", "--classes", "--arms", dest="dims", type=int_in(1, 100_000, "--dims"), default=None,
                    help="the number of outputs (a classifier's classes, a bandit's arms; default: as trained)")
    lr.add_argument("--experts", type=int_in(1, 1_000_000, "--experts"), default=None, help="N (default: as trained)")
    lr.add_argument("--dataset", default=None, help="classification tasks: the dataset")
    lr.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="any other task setting")
    lr.add_argument("--change-every", type=int_in(1, 10_000_000, "--change-every"), nargs=2, metavar=("A", "B"),
                    default=None, help="bandit, fewshot: what the agent faces changes every U[A, B] steps")
    lr.add_argument("--window", type=int_in(1, 1_000_000, "--window"), default=None,
                    help="a task's own long run: the window its rates are averaged over (bandit: regret per step, "
                         "default 100 steps; fewshot: accuracy, default 20)")
    lr.add_argument("--steps", type=int_in(1, 10_000_000, "--steps"), default=10_000)
    lr.add_argument("--episodes", type=int_in(1, 100_000, "--episodes"), default=100)
    lr.add_argument("--seed", type=SEED, default=0)
    lr.add_argument("--jump-every", type=int_in(1, 10_000_000, "--jump-every"), nargs=2, metavar=("A", "B"),
                    default=None, help="targets jump every U[A, B] steps; report recovery times")
    lr.add_argument("--threshold", type=float, default=0.05, help="recovered = error back under this")
    lr.add_argument("--full", action="store_true", help="include the error curves (a task's own long run: all "
                                                          "its curves)")
    lr.add_argument("--plot", default=None, metavar="PNG", help="with --jump-every or --task bandit: plot over time")
    lr.add_argument("--routing", default=None, help="bandit long run: override the routing kind (an ablation)")
    lr.add_argument("--degree", type=int_in(0, 1_000_000, "--degree"), default=None,
                    help="bandit long run, random routing: senders each receiver hears besides itself (0: only itself)")
    lr.add_argument("--candidates", type=int_in(0, 1_000_000, "--candidates"), default=None,
                    help="bandit long run, top-k routing: senders each receiver scores (0: all; as `badger serve "
                         "--candidates`)")
    lr.add_argument("--k", type=int_in(1, 1_000_000, "--k"), default=None,
                    help="bandit long run, top-k routing: senders kept")
    lr.add_argument("--json", action="store_true", help="one line of JSON")
    lr.set_defaults(fn=cmd_longrun)


def cmd_longrun(args):
    from ..config import ConfigError
    from ..longrun import horizon_report, jump_report
    from ..policy_card import load_policy

    from ..tasks import task_class

    pol = load_policy(args.policy)
    note_retired(pol)
    if pol.horizon is not None and (args.steps or 0) > pol.horizon:  # (the long run's point: a stress check)
        print(f"badger: note: {pol.name} is episodic (horizon {pol.horizon}, its card's lifetime): this runs it "
              f"past its horizon; the runtimes refuse that unless asked", file=sys.stderr)
    name = args.task or pol.task.name
    cls = task_class(name)
    for flag, v in (("--change-every", args.change_every), ("--jump-every", args.jump_every)):
        if v is not None and not 1 <= v[0] <= v[1]:
            raise ConfigError(f"{flag} A B needs 1 <= A <= B")
    change = args.change_every or args.jump_every
    routed = any(v is not None for v in (args.routing, args.degree, args.candidates, args.k))
    if routed and name != "bandit":
        raise ConfigError("--routing / --degree / --candidates / --k: only the bandit long run takes another routing")
    if hasattr(cls, "longrun_report"):  # the task's own long run (its own default change schedule)
        from .common import resolve_task

        steps, args.steps = args.steps, None  # --steps is the long run's length, not the episodes'
        args.task = name  # the task's evaluation setting (e.g. held-out classes), with --option applied
        task = resolve_task(args, pol.task)
        given = {k: v for k, v in (("change_every", tuple(change) if change else None), ("window", args.window))
                 if v is not None}
        if routed:
            import dataclasses

            r = pol.agent.routing
            r = dataclasses.replace(r, kind=args.routing or r.kind,
                                    degree=r.degree if args.degree is None else args.degree,
                                    candidates=r.candidates if args.candidates is None else args.candidates,
                                    k=r.k if args.k is None else args.k)
            given["agent_config"] = dataclasses.replace(pol.agent, routing=r).validate()
        report = cls.longrun_report(pol, task=task, steps=steps, episodes=args.episodes, seed=args.seed,
                                    dims=args.dims, experts=args.experts, full=args.full or bool(args.plot), **given)
        if args.plot:
            if not hasattr(cls, "plot_longrun"):
                raise ConfigError(f"--plot: task {name!r} has no long-run plot")
            cls.plot_longrun(report, args.plot)
            report["plot"] = args.plot
        print(json.dumps(report, indent=None if args.json else 2))
        return
    if args.jump_every:
        if args.dims is not None or args.experts is not None:
            raise ConfigError("--jump-every runs at the policy's own d and N: drop --dims / --experts")
        a, b = args.jump_every
        report = jump_report(pol, steps=args.steps, episodes=args.episodes, seed=args.seed, jump_every=(a, b),
                             threshold=args.threshold)
        if args.plot:
            from ..longrun import jump_traces, plot_jump_traces

            plot_jump_traces(jump_traces(pol, steps=min(args.steps, 300), seed=args.seed, jump_every=(a, b)),
                             args.plot, title=f"{pol.name}: targets jump every U[{a}, {b}] steps, never reset")
            report["plot"] = args.plot
        if not args.full:
            report = {k: v for k, v in report.items() if "by_step" not in k}
    else:
        report = horizon_report(pol, steps=args.steps, episodes=args.episodes, seed=args.seed, dims=args.dims,
                                experts=args.experts)
    print(json.dumps(report, indent=None if args.json else 2))

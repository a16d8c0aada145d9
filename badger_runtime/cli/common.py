"""What several commands share: checked number types, the evaluation flags, the report printer.

Imports nothing of the command modules (they import this), so the ``cli`` package has no cycle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from ..config import MAX_SEED, AgentConfig, ConfigError, TaskConfig
from ..engine import MAX_ROUNDS  # one bound for the library, the CLI and the server


def note_retired(pol) -> None:
    """Say on stderr when a command runs a retired policy (``OnnxPolicy.retired``; or a policy's name or path, whose
    card alone is read here): it still runs, for the results it made, but the shipped policy its card names is the
    one to use."""
    note = None
    if isinstance(pol, (str, os.PathLike)):
        from ..policy_card import PolicyError, card_paths, is_retired, resolve_policy, retired_note

        try:
            onnx, card = card_paths(resolve_policy(pol))
            note = retired_note(json.loads(card.read_text())) if is_retired(onnx) else None
        except (PolicyError, OSError, ValueError):
            return  # the command itself says why it cannot load it
    elif pol.retired:
        note = pol.retired
    if note:
        print(f"badger: note: {note}", file=sys.stderr)


def int_in(lo: int, hi: int | None = None, what: str = "a value"):
    """An argparse type: an integer in [lo, hi] (a clear error otherwise, never a traceback)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{what} must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}")
        return v

    return parse


SEED = int_in(0, MAX_SEED, "--seed")


def add_eval_flags(p: argparse.ArgumentParser, runtime_default: str = "engine"):
    """The flags of ``badger eval`` / ``badger run``: which task, sizes, seeds, routing, changes."""
    from ..tasks import task_names

    names = task_names()
    p.add_argument("--task", default=None, metavar="NAME",
                   help=f"the task to run the policy on; registered: {', '.join(names)} (default: the policy's own; "
                        f"naming the policy's own task runs its stationary evaluation setting)")
    p.add_argument("--dims", "--classes", "--arms", dest="dims", type=int_in(1, 100_000, "--dims"), default=None,
                   help="d, the number of outputs: the guessing game's dimensions, a classifier's classes, a "
                        "bandit's arms (default: the task's largest trained value)")
    p.add_argument("--dataset", default=None, help="classification tasks: the dataset (a task setting)")
    p.add_argument("--arm-dist", dest="arm_dist", default=None, help="bandit tasks: the arms' distribution")
    p.add_argument("--addresses", choices=("random", "fixed"), default=None,
                   help="output addresses: random per episode, or the task's fixed table")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting of the task, e.g. --option feedback=per_dim")
    p.add_argument("--experts", type=int_in(1, 1_000_000, "--experts"), default=None,
                   help="N, the number of experts (default: as trained)")
    p.add_argument("--episodes", type=int_in(1, 10_000_000, "--episodes"), default=1000,
                   help="episodes to evaluate (default 1000), drawn from --seed")
    p.add_argument("--seed", type=SEED, default=0,
                   help="seed of the episodes (targets, addresses, wiring, noise): the same seed, the same episodes")
    p.add_argument("--steps", type=int_in(1, 10_000_000, "--steps"), default=None,
                   help="inner steps (default: the task's episode length)")
    p.add_argument("--rounds", type=int_in(1, MAX_ROUNDS, "--rounds"), default=None,
                   help="communication rounds per step (the maximum for non-fixed rules)")
    p.add_argument("--routing", default=None, help="override the routing kind (dense, topk, hardwired, homogeneous, "
                                                   "random)")
    p.add_argument("--candidates", type=int_in(0, 1_000_000, "--candidates"), default=None,
                   help="top-k routing: senders each receiver scores (0: all; C > 0: O(N C) sparse); without "
                        "--routing it selects top-k, as `badger serve --candidates` does")
    p.add_argument("--k", type=int_in(1, 1_000_000, "--k"), default=None,
                   help="top-k routing: senders kept (without --routing it selects top-k)")
    p.add_argument("--degree", type=int_in(0, 1_000_000, "--degree"), default=None,
                   help="random routing: senders each receiver hears besides itself (0: only itself); without "
                        "--routing it selects random routing")
    p.add_argument("--agreement", default=None, help="override the agreement rule (fixed, convergence, quorum)")
    p.add_argument("--ablate", choices=("none", "cut", "shuffle"), default=None,
                   help="messages ablation (batched engine): cut = every inbox empty, shuffle = each expert "
                        "gets another expert's inbox")
    p.add_argument("--add-at", type=int_in(0, 10_000_000, "--add-at"), default=None, metavar="T",
                   help="hot-add experts before inner step T")
    p.add_argument("--add", type=int_in(1, 1_000_000, "--add"), default=0, metavar="M", help="how many to add")
    p.add_argument("--init", choices=("fresh", "clone"), default="fresh", help="added experts: fresh or cloned")
    p.add_argument("--allow-harmful-growth", action="store_true",
                   help="add fresh experts even to a policy whose card says they make it worse (its card's "
                        "growth); refused otherwise")
    p.add_argument("--remove-at", type=int_in(0, 10_000_000, "--remove-at"), default=None, metavar="T",
                   help="remove experts before inner step T")
    p.add_argument("--remove", type=int_in(1, 1_000_000, "--remove"), default=0, metavar="M",
                   help="how many to remove (chosen at random by the seed)")
    p.add_argument("--runtime", choices=("engine", "sharded", "actors", "ray"), default=runtime_default,
                   help="engine: batched numpy + onnxruntime; sharded: the sharded actor runtime; actors: one "
                        "trio task per expert; ray: the sharded runtime's shards as Ray actors (the 'cluster' extra; "
                        "a local Ray instance, or the cluster RAY_ADDRESS names)")
    p.add_argument("--past-horizon", action="store_true",
                   help="step an episodic policy past its horizon (its card's lifetime); refused otherwise")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="the agent's numbers only: skip the task's baselines (a classifier's online logistic "
                        "regression is most of a few-shot evaluation's time)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _parse_option(item: str) -> tuple[str, object]:
    from ..config import _parse_value

    if "=" not in item:
        raise ConfigError(f"--option {item!r} is not of the form KEY=VALUE")
    k, v = item.split("=", 1)
    return k.strip(), _parse_value(v.strip())


def resolve_task(args, own: TaskConfig) -> TaskConfig:
    """The task settings an evaluation runs: the policy's own (or, with ``--task``, that task's
    evaluation setting), with the flags applied and validated."""
    from ..config import _coerce, _hints
    from ..tasks import task_class

    name = args.task or own.name
    cls = task_class(name)
    if name == own.name:
        task = own if args.task is None else cls.evaluation_config(own)
    else:
        task = cls.config_class(name=name, experts=own.experts, steps=own.steps)
    changes = dict(_parse_option(o) for o in args.option)
    for flag in ("dataset", "arm_dist", "addresses"):
        if getattr(args, flag, None) is not None:
            changes[flag] = getattr(args, flag)
    if args.steps is not None:
        changes["steps"] = args.steps
    hints = _hints(type(task))
    for k, v in changes.items():
        if k not in hints or k == "name":
            raise ConfigError(f"task {name!r} has no setting {k!r}; its settings: "
                              f"{sorted(h for h in hints if h != 'name')}")
        changes[k] = _coerce(hints[k], v, f"task.{k}")
    return dataclasses.replace(task, **changes).validate()


def resolve_agent(args, agent: AgentConfig) -> AgentConfig:
    agent = dataclasses.replace(agent, routing=dataclasses.replace(agent.routing),
                                agreement=dataclasses.replace(agent.agreement))
    topk_flags = args.candidates is not None or args.k is not None
    degree = getattr(args, "degree", None)
    if args.routing:
        agent.routing.kind = args.routing
    elif topk_flags and degree is not None:
        raise ConfigError("--candidates / --k are top-k routing's and --degree the random graph's: give --routing")
    elif topk_flags or degree is not None:  # as `badger serve --candidates C` does: the flag names its routing
        agent.routing.kind = "topk" if topk_flags else "random"
    if args.candidates is not None:
        agent.routing.candidates = args.candidates
    if args.k is not None:
        agent.routing.k = args.k
    if getattr(args, "degree", None) is not None:
        agent.routing.degree = args.degree
    if getattr(args, "ablate", None):
        agent.routing.ablation = args.ablate
    if args.agreement:
        agent.agreement.rule = args.agreement
    if args.rounds is not None:
        agent.agreement.rounds = args.rounds
    kind = agent.routing.kind  # a flag the routing does not read was ignored without a word
    unread = [flag for flag, v, reads in (("--candidates", args.candidates, kind == "topk"),
                                          ("--k", args.k, kind == "topk"),
                                          ("--degree", getattr(args, "degree", None), kind == "random"))
              if v is not None and not reads]
    if unread:
        raise ConfigError(f"{' and '.join(unread)}: not read by {kind!r} routing (--candidates and --k are top-k's, "
                          "--degree the random graph's: add --routing topk or --routing random)")
    return agent.validate()


def resolve_eval(args, agent: AgentConfig, task: TaskConfig):
    """Apply the eval flags to a policy's configs: (agent, task, dims, experts, changes)."""
    from ..episodes import schedule
    from ..tasks import make_task

    agent = resolve_agent(args, agent)
    task = resolve_task(args, task)
    t = make_task(task)
    dims = t.default_dims() if args.dims is None else args.dims
    experts = args.experts if args.experts is not None else t.experts_for(dims)
    changes = schedule(args.add_at, args.add, args.init, args.remove_at, args.remove, args.allow_harmful_growth)
    return agent, task, dims, experts, changes


def print_report(report: dict, as_json: bool):
    if as_json:
        print(json.dumps(report))
        return
    from rich.console import Console
    from rich.table import Table

    curves = {k: v for k, v in report.items() if k.endswith("_by_step") and isinstance(v, list)}
    t = Table(title=f"{report['task']['name']} d={report['task']['dims']} N={report['task']['experts']} "
                    f"({report['episodes']} episodes, seed {report['seed']})")
    t.add_column("step", justify="right")
    for k in curves:
        t.add_column(k.removesuffix("_by_step"), justify="right")
    opt = report.get("optimizer")
    if opt:
        t.add_column(opt["name"], justify="right")
    T = max(len(v) for v in curves.values()) if curves else 0
    stride = max(1, T // 40)
    for i in range(0, T, stride):
        row = [str(i)] + [_num(v[i]) for v in curves.values()]
        if opt:
            row.append(_num(opt['mse_by_step'][i]))
        t.add_row(*row)
    Console().print(t)
    summary = {k: v for k, v in report.items() if isinstance(v, float) and k != "seconds"}
    print("  ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    for line in _report_lines(report):
        print(line)


def _num(v: float) -> str:
    """Four significant digits (a 0.0000073 error printed as 0.0000 at four decimals)."""
    return f"{v:.4f}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.4g}"


def _report_lines(report: dict) -> list[str]:
    """What the table and the summary leave out: the runtime and its messages, the membership changes, the
    baselines' numbers (the JSON report has them all)."""
    lines = []
    if "runtime" in report:
        msg = report.get("messages")
        counts = ", ".join(f"{k} {v:,}" for k, v in msg.items()) if isinstance(msg, dict) else \
            f"{msg:,}" if isinstance(msg, int) else None
        lines.append(f"runtime {report['runtime']}" + (f": messages {counts}" if counts else ""))
    for c in report.get("changes", []):
        lines.append(f"before step {c['at']}: {c['kind']} {c['n']}" + (f" ({c['init']})" if c["kind"] == "add" else ""))
    regrets = [("agent", report.get("regret_at")), *(report.get("baselines_regret_at") or {}).items()]
    for name, at in regrets:
        if isinstance(at, dict) and at:
            lines.append(f"regret {name}: " + ", ".join(f"T={t} {v:.4g}" for t, v in at.items()))
    return lines

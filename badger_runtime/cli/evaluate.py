"""`badger eval` (any runtime) and `badger run` (the same report from the actor runtime)."""

from __future__ import annotations

import argparse
import sys

from .common import add_eval_flags, int_in, note_retired, print_report, resolve_eval


def register(sub):
    e = sub.add_parser("eval", help="seeded evaluation with the task's baselines on the same episodes")
    e.add_argument("--checkpoint", default=None, help="a training checkpoint (needs torch)")
    e.add_argument("--policy", default=None, help="a shipped policy's name or a path to NAME.onnx (torch-free)")
    add_eval_flags(e)
    e.set_defaults(fn=cmd_eval)

    p = sub.add_parser("run", help="evaluate a policy with the actor runtime (one trio task per expert, "
                                   "msgpack messages); prints eval's report plus message counts",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--policy", required=True, help="a shipped policy's name or a path to NAME.onnx")
    add_eval_flags(p, runtime_default="actors")
    p.add_argument("--per-expert-calls", action="store_true",
                   help="one onnxruntime call per expert step instead of one micro-batched call per round")
    p.add_argument("--no-encode", action="store_true",
                   help="pass Message objects between actors instead of msgpack frames (faster; skips decoding)")
    p.add_argument("--concurrency", type=int_in(1, 10_000, "--concurrency"), default=4,
                   help="episodes (agents) running at once")
    p.set_defaults(fn=cmd_run, checkpoint=None)


def _runtime_kw(args) -> dict:
    kw = {"past_horizon": args.past_horizon}
    if args.runtime != "actors":
        return kw
    return kw | {"micro_batch": not getattr(args, "per_expert_calls", False),
                 "encode": not getattr(args, "no_encode", False), "concurrency": getattr(args, "concurrency", 4)}


def _note_untrained(pol, task, dims: int, experts: int):
    """Say on stderr when d or N is outside what the policy was trained with (its card's ranges): the numbers
    then measure how it generalises, which a user asking for d = 50 of a d = 3 policy may not expect."""
    if task.name != pol.task.name:
        return
    out = [f"{name} = {v} is outside the trained {lo}..{hi}" for name, v, (lo, hi) in
           (("d", dims, pol.task.dims), ("N", experts, pol.task.experts)) if not lo <= v <= hi]
    if out:
        print(f"badger: note: {pol.name}: {'; '.join(out)} (its card's ranges)", file=sys.stderr)


def cmd_eval(args):
    from ..config import ConfigError
    from ..evaluation import evaluate

    if bool(args.checkpoint) == bool(args.policy):
        raise ConfigError("give exactly one of --checkpoint CKPT or --policy NAME")
    if args.policy:
        from ..engine import numpy_ops
        from ..policy_card import load_policy

        pol = load_policy(args.policy)
        note_retired(pol)
        agent, task, dims, experts, changes = resolve_eval(args, pol.agent, pol.task)
        _note_untrained(pol, task, dims, experts)
        report = evaluate(numpy_ops(), pol, agent, task, dims=dims, experts=experts, episodes=args.episodes,
                          seed=args.seed, changes=changes, runtime=args.runtime, baselines=args.baselines,
                          **_runtime_kw(args))
        report["policy"] = pol.name if str(args.policy) == pol.name else str(args.policy)
        if args.runtime == "actors":
            report["micro_batch"] = not getattr(args, "per_expert_calls", False)
    else:
        if args.runtime != "engine":
            raise ConfigError("a checkpoint runs in the torch engine only; export it to run it elsewhere")
        import torch

        from ..training.model import torch_ops
        from ..training.train import load_checkpoint, policy_from_checkpoint

        pol, cfg = policy_from_checkpoint(load_checkpoint(args.checkpoint))
        agent, task, dims, experts, changes = resolve_eval(args, cfg.agent, cfg.task)
        with torch.no_grad():
            report = evaluate(torch_ops(), pol, agent, task, dims=dims, experts=experts, episodes=args.episodes,
                              seed=args.seed, changes=changes, baselines=args.baselines)
        report["checkpoint"] = str(args.checkpoint)
    print_report(report, args.json)


def cmd_run(args):
    cmd_eval(args)

"""``badger run``: ``badger eval``'s report computed by the actor runtime, plus message counts."""

from __future__ import annotations

import argparse


def register(sub):
    from ..cli import _add_eval_flags

    p = sub.add_parser("run", help="evaluate a policy with the actor runtime (one trio task per expert, "
                                   "msgpack messages); prints eval's report plus message counts",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--policy", required=True, help="policies/NAME.onnx (card beside it)")
    _add_eval_flags(p)
    p.add_argument("--per-expert-calls", action="store_true",
                   help="one onnxruntime call per expert step instead of one micro-batched call per round")
    p.add_argument("--no-encode", action="store_true",
                   help="pass Message objects between actors instead of msgpack frames (faster; skips decoding)")
    p.add_argument("--concurrency", type=int, default=4, help="episodes (agents) running at once")
    p.set_defaults(fn=cmd_run)


def cmd_run(args):
    from ..cli import _print_report, _resolve
    from ..config import ConfigError
    from ..policy_card import load_policy
    from .episodes import evaluate_actors

    if args.concurrency < 1:
        raise ConfigError("--concurrency must be >= 1")
    pol = load_policy(args.policy)
    agent, task, dims, experts = _resolve(args, pol.agent, pol.task)
    report = evaluate_actors(pol, agent, task, dims=dims, experts=experts, episodes=args.episodes, seed=args.seed,
                             steps=task.steps, micro_batch=not args.per_expert_calls, encode=not args.no_encode,
                             concurrency=args.concurrency)
    report["policy"] = str(args.policy)
    _print_report(report, args.json)
    if not args.json:
        m = report["messages"]
        print(f"messages: sent {m['sent']}  delivered {m['delivered']}  dropped {m['dropped']}  "
              f"bad frames {m['bad_frames']}  policy calls {report['policy_calls']}")

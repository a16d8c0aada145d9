"""`badger bench ...`: speed and memory benchmarks (results are printed as JSON; docs/benchmarks.md
records them with the command that produced them)."""

from __future__ import annotations

import json


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def cmd_bench_train(args):
    from .train import bench_train

    print(json.dumps(bench_train(experts=_ints(args.experts), steps=_ints(args.steps), batch=args.batch,
                                 repeats=args.repeats, threads=args.threads, seed=args.seed)))


def register(sub):
    b = sub.add_parser("bench", help="benchmarks: train, runtime, serve")
    bsub = b.add_subparsers(dest="bench", required=True)
    t = bsub.add_parser("train", help="training samples/s vs number of experts and inner steps (needs torch)")
    t.add_argument("--experts", default="5,20,40,80", help="comma-separated N values")
    t.add_argument("--steps", default="10,20,40", help="comma-separated inner-step counts")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", action="store_true", help="(output is always JSON)")
    t.set_defaults(fn=cmd_bench_train)
    return bsub

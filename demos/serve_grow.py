#!/usr/bin/env python
"""Hot-add 1,000 experts to a running served agent (issue 13), through `badger serve`.

Starts a server with sparse routing (top-k over C candidates, so a session can hold thousands
of experts), opens two sessions of the same seed (so the same output addresses and the same
first experts), plays the guessing game on both (per-dimension feedback: outputs - target),
and halfway through adds ``--add`` fresh experts to one of them with `add_experts`. Prints
the error of both by step and a JSON summary (with the command that made it).

    python demos/serve_grow.py --policy scale-v1 --dims 256 --experts 100 --add 1000 --steps 30
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np

from badger_runtime.serve.client import Client
from badger_runtime.serve.load import start_server


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default="scale-v1")
    p.add_argument("--dims", type=int, default=256)
    p.add_argument("--experts", type=int, default=100)
    p.add_argument("--add", type=int, default=1000)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--candidates", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-harmful-growth", action="store_true",
                   help="for a policy whose card says fresh experts make it worse (refused otherwise)")
    args = p.parse_args(argv)
    at = args.steps // 2
    with tempfile.TemporaryDirectory() as state:
        proc, address = start_server(args.policy, state, ["--candidates", str(args.candidates), "--no-fsync",
                                                          "--max-experts", str(args.experts + args.add + 10),
                                                          "--max-dims", str(max(256, args.dims))])
        try:
            errors, seconds = {}, {}
            with Client(address) as c:
                target = np.random.default_rng([args.seed, 99]).uniform(-1, 1, args.dims).astype(np.float32)
                for name in ("unchanged", "grown"):
                    info = c.open(session=name, dims=args.dims, experts=args.experts, seed=args.seed, past_horizon=True)
                    prev, errs, t_add = np.zeros(args.dims, np.float32), [], None
                    fb_size = dict(info["parts"])["feedback"]
                    t0 = time.perf_counter()
                    for t in range(args.steps):
                        if name == "grown" and t == at:
                            t1 = time.perf_counter()
                            r = c.add_experts(name, args.add, init="fresh", allow_harmful=args.allow_harmful_growth)
                            t_add = time.perf_counter() - t1
                            assert r["experts"] == args.experts + args.add
                        err = prev - target
                        fb = err if fb_size == args.dims else np.array([3 * np.mean(err**2)], np.float32)
                        r = c.step(name, prev, fb, t=t)
                        prev = np.asarray(r["outputs"], np.float32)
                        errs.append(float(3 * np.mean((prev - target) ** 2)))
                    errors[name], seconds[name] = errs, (time.perf_counter() - t0, t_add)
        finally:
            proc.terminate()
            proc.wait(30)
    print("| step | " + " | ".join(errors) + " |")
    print("|---|---|---|")
    for t in range(args.steps):
        mark = " (added)" if t == at else ""
        print(f"| {t}{mark} | " + " | ".join(f"{errors[k][t]:.4f}" for k in errors) + " |")
    print(json.dumps({"command": "python demos/serve_grow.py " + " ".join(sys.argv[1:] if argv is None else argv),
                      "policy": args.policy, "dims": args.dims, "experts": args.experts, "added": args.add,
                      "add_at": at, "final": {k: v[-1] for k, v in errors.items()},
                      "add_seconds": seconds["grown"][1], "session_seconds": {k: v[0] for k, v in seconds.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

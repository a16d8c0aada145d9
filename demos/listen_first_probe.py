"""Would a runtime rule make hot-added fresh experts harmless? "Listen first": a fresh expert that
joins a running agent may not push (its outputs are masked out of the membrane's push) for its first
K inner steps, and with ``--mute`` nobody hears its messages either, so during that time the agent's
outputs are exactly the unchanged agent's. The question is what happens once it starts to push:
has listening brought it up to date? (issue 13: fresh experts hurt dimensions-v2 and
guessing-quorum-v2.)

A probe, not a runtime feature: it wraps ``engine.Agent`` for the run (the numpy engine) and
reports the final-step error for each K next to the unchanged agent's, on the same episodes.

    python demos/listen_first_probe.py --policy dimensions-v2 --dims 6 --experts 5 --steps 20 --at 10 \\
        --listen 0,3,6 --episodes 256 --seed 12345
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from badger_runtime.engine import Agent, numpy_ops  # noqa: E402
from badger_runtime.episodes import Change  # noqa: E402
from badger_runtime.evaluation import evaluate  # noqa: E402
from badger_runtime.policy_card import load_policy  # noqa: E402
from badger_runtime.rollout import Wiring  # noqa: E402

VETERAN = 10 ** 9  # the age of the experts an agent starts with (and of clones)


@contextlib.contextmanager
def listen_first(k: int, mute: bool):
    """Within the block, fresh experts added to an ``engine.Agent`` neither push (nor, with ``mute``,
    send messages anyone hears) for their first ``k`` steps."""
    step, add = Agent.step, Agent.add_experts

    def masked_step(self, *a, **kw):
        age = getattr(self, "_age", None)
        if age is None:
            return step(self, *a, **kw)
        new = age < k
        w = self.wiring
        can_push = np.asarray(w.can_push, bool) & ~new  # the veterans (VETERAN age) always push
        route = w.route_mask
        if mute and new.any():
            B, N = w.batch, w.n_experts
            route = np.ones((B, N, N), bool) if route is None else np.array(route, bool)
            route[:, :, new] = False  # nobody hears a listener ...
            route[:, new, new] = True  # ... but itself (every receiver keeps a sender)
        self.wiring = Wiring(w.noise, route, w.can_sense, can_push, w.ids, w.seats)
        try:
            return step(self, *a, **kw)
        finally:
            self.wiring, self._age = w, age + 1

    def aged_add(self, n, init="clone", **kw):
        N = self.n_experts
        out = add(self, n, init=init, **kw)
        age = getattr(self, "_age", np.full(N, VETERAN))
        self._age = np.concatenate([age, np.zeros(n, np.int64) if init == "fresh" else np.full(n, VETERAN)])
        return out

    Agent.step, Agent.add_experts = masked_step, aged_add
    try:
        yield
    finally:
        Agent.step, Agent.add_experts = step, add


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="dimensions-v2")
    p.add_argument("--dims", type=int, default=6)
    p.add_argument("--experts", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--at", type=int, default=10, help="as many fresh experts again join before this step")
    p.add_argument("--listen", default="0,3,6", help="comma-separated K: steps a newcomer listens first")
    p.add_argument("--mute", action="store_true", help="listeners' messages are not heard either")
    p.add_argument("--episodes", type=int, default=256)
    p.add_argument("--seed", type=int, default=12345)
    args = p.parse_args(argv)
    pol = load_policy(args.policy)
    task = pol.task
    kw = dict(dims=args.dims, experts=args.experts, episodes=args.episodes, seed=args.seed, steps=args.steps,
              baselines=False)
    rows = {"unchanged": evaluate(numpy_ops(), pol, pol.agent, task, **kw)["final_mse"]}
    for k in (int(x) for x in args.listen.split(",")):
        with listen_first(k, args.mute):
            join = Change(args.at, "add", args.experts, "fresh", allow_harmful=True)  # measured, harm included
            r = evaluate(numpy_ops(), pol, pol.agent, task, changes=(join,), **kw)
        rows[f"listen {k}"] = r["final_mse"]
    print(json.dumps({"policy": args.policy, "mute": args.mute, "final_mse": rows, "config": vars(args)}, indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Issue 13 probe: through what do fresh experts that join a running agent hurt it, their pushes (the
outputs they weigh in on) or their messages (what the others hear)? The same episodes four times: the
agent of N, then with M fresh experts joining at step T as `badger eval --add-at T --add M --init fresh`
does (plain), with the newcomers kept from pushing (no_push: the membrane's `can_push` false for them),
kept from being heard (no_send: the old experts' routing masks drop them; dense topologies only), and
both (silent). Paired differences of the final error against the unchanged agent (batched engine), and the
newcomers' share of the output weight (the push attention, mean over outputs and episodes) in the plain run.

    python demos/newcomer_harm_probe.py --policy dimensions-v5 --dims 6 --experts 5 --add 15 --seeds 0,12345
"""
import argparse

import numpy as np

from badger_runtime import engine
from badger_runtime.engine import numpy_ops
from badger_runtime.episodes import schedule
from badger_runtime.evaluation import run_episodes
from badger_runtime.policy_card import load_policy

MODES = ("plain", "no_push", "no_send", "silent")


def restricting(mode: str):
    """engine.Agent.add_experts that then takes from the newcomers what ``mode`` says."""
    add = engine.Agent.add_experts

    def add_then_restrict(self, n, *a, **k):
        old = self.n_experts
        out = add(self, n, *a, **k)
        w = self.wiring
        if mode in ("no_push", "silent"):
            w.can_push = np.concatenate([w.can_push[:old], np.zeros(n, bool)])
        if mode in ("no_send", "silent"):
            if w.route_mask is not None and not isinstance(w.route_mask, np.ndarray):
                raise SystemExit("no_send needs a dense topology (a mask or everyone hears everyone)")
            M = w.n_experts
            mask = np.ones((w.batch, M, M), bool) if w.route_mask is None else np.array(w.route_mask, bool)
            mask[:, :old, old:] = False  # the old experts no longer hear the newcomers
            w.route_mask = mask
        self._indeg = None
        return out
    return add_then_restrict


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="dimensions-v5")
    p.add_argument("--dims", type=int, default=6)
    p.add_argument("--experts", type=int, default=5)
    p.add_argument("--add", type=int, default=15)
    p.add_argument("--init", choices=("fresh", "clone"), default="fresh", help="what the newcomers are")
    p.add_argument("--at", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--episodes", type=int, default=500)
    p.add_argument("--seeds", default="0")
    args = p.parse_args(argv)
    pol = load_policy(args.policy)
    plain = engine.Agent.add_experts
    for seed in (int(s) for s in args.seeds.split(",")):
        kw = dict(dims=args.dims, experts=args.experts, episodes=args.episodes, seed=seed, steps=args.steps)
        base = run_episodes(numpy_ops(), pol, pol.agent, pol.task, **kw).errors[-1]
        who = f"N = {args.experts} + {args.add} {args.init} at step {args.at}"
        row = [f"{pol.name}, seed {seed}, d = {args.dims}, {who}: "
               f"unchanged {base.mean():.4g}"]
        for mode in MODES:
            engine.Agent.add_experts = plain if mode == "plain" else restricting(mode)
            try:
                r = run_episodes(numpy_ops(), pol, pol.agent, pol.task, **kw, record=mode == "plain",
                                 changes=schedule(args.at, args.add, args.init, allow_harmful=True))
            finally:
                engine.Agent.add_experts = plain
            d = r.errors[-1] - base
            row.append(f"{mode} {r.errors[-1].mean():.4g} ({d.mean():+.3g} +- {d.std(ddof=1) / np.sqrt(d.size):.2g})")
            if mode == "plain":
                infos = [batch[2].infos for batch in r.traces]  # per batch: (episode, wiring, trajectory)
                share = {t + 1: np.concatenate([np.asarray(i[t].push_weights) for i in infos])[..., args.experts:]
                         .sum(-1).mean() for t in sorted({args.at, args.at + 1, args.at + 4, args.steps - 1})}
        print("; ".join(row))
        print(f"  the newcomers' share of the output weight ({args.add} of {args.experts + args.add} experts): "
              + ", ".join(f"step {t}: {v:.2f}" for t, v in share.items()))


if __name__ == "__main__":
    main()

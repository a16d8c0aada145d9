"""Seeded episodes run by the actor runtimes, for ``evaluation.run_episodes``.

``evaluation.run_episodes(..., runtime="actors" | "sharded")`` draws the same seeded batches
as the batched engine (``episodes.sample_batches``) and hands each batch here:

- ``actor_batch``: one ``ActorAgent`` per episode (``concurrency`` of them at a time), each fed
  by its own ``episodes.Driver`` through ``episodes.adrive``;
- ``sharded_batch``: one ``ShardedAgent`` for the whole batch.

With every message delivered and fixed rounds the outputs equal the batched engine's
(tests/test_actors.py, tests/test_sharded.py).
"""

from __future__ import annotations

import numpy as np
import trio

from ..episodes import Driver, Trajectory, adrive, growth_rng
from .runtime import ActorAgent, Counters
from .shard import ShardCounters
from .sharded import ShardedAgent

__all__ = ["actor_batch", "run_concurrently", "sharded_batch"]


async def run_concurrently(jobs, fn, concurrency: int):
    """Await ``fn(*job)`` for every job, at most ``concurrency`` at a time."""
    limit = trio.CapacityLimiter(max(1, concurrency))

    async def guarded(job):
        async with limit:
            await fn(*job)

    async with trio.open_nursery() as n:
        for job in jobs:
            n.start_soon(guarded, job)


def _join(trajs: list[Trajectory]) -> Trajectory:
    """Batch-1 trajectories of the same steps -> one trajectory of their batch."""
    cat = lambda xs: np.concatenate(xs, axis=1)  # noqa: E731
    return Trajectory(cat([t.outputs for t in trajs]), None, cat([t.rounds for t in trajs]),
                      {k: cat([t.metrics[k] for t in trajs]) for k in trajs[0].metrics},
                      [], 0.0, sum(t.messages for t in trajs), [])


def actor_batch(ops, policy, agent, ep, wiring, *, start: int, steps: int, rounds=None, record=False, changes=(),
                seed: int = 0, micro_batch: bool = True, encode: bool = True, concurrency: int = 4, **agent_kw):
    """Run each episode of a batch with its own ``ActorAgent``; returns (Trajectory, counters)."""
    trajs: list = [None] * ep.batch
    total, calls = Counters(), [0, 0]

    async def one(i):
        a = ActorAgent(policy, agent, ep.interface.select(slice(i, i + 1)), wiring.select(slice(i, i + 1)),
                       micro_batch=micro_batch, encode=encode, episode_index=start + i, seed=seed, **agent_kw)
        async with a.running():
            trajs[i] = await adrive(a, Driver(ops, ep.select(slice(i, i + 1)), steps, rounds=rounds,
                                              changes=changes, with_losses=False, seed=seed + start + i))
        total.add(a.counters)
        calls[0] += a.batcher.calls
        calls[1] += a.batcher.rows

    trio.run(run_concurrently, [(i,) for i in range(ep.batch)], one, concurrency)
    c = total
    return _join(trajs), {"sent": c.sent, "delivered": c.delivered, "dropped": c.dropped, "bad_frames": c.bad_frames,
                          "added": c.added, "removed": c.removed, "peak_mailbox": c.peak_mailbox,
                          "policy_calls": calls[0], "policy_rows": calls[1]}


def sharded_batch(ops, policy, agent, ep, wiring, *, start: int, steps: int, rounds=None, record=False, changes=(),
                  seed: int = 0, rng=None, **agent_kw):
    """Run a batch with one ``ShardedAgent`` (``rng``: what growing draws from, as the engine's);
    returns (Trajectory, counters)."""

    async def main():
        a = ShardedAgent(policy, agent, ep.interface, wiring, episode_index=start,
                         rng=rng if rng is not None else growth_rng(seed, start), **agent_kw)
        async with a.running():
            traj = await adrive(a, Driver(ops, ep, steps, rounds=rounds, changes=changes, record=record,
                                          with_losses=False, seed=seed + start))
        return traj, a

    traj, a = trio.run(main)
    c: ShardCounters = a.counters
    return traj, {"frames": c.frames, "blocks": c.blocks, "block_bytes": c.block_bytes, "delivered": c.delivered,
                  "bad_frames": c.bad_frames, "policy_calls": a.batcher.calls, "policy_rounds": a.batcher.rounds}

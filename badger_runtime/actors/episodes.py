"""Seeded guessing-game episodes computed by the actor runtime, and ``badger run``'s report.

The episodes and the agents' wiring come from the same seeded streams, drawn in the same
chunks, as ``evaluation.run_episodes``, so the same seed gives the same episodes, the same
initial states and the same topologies; with every message delivered and fixed rounds the
guesses equal the batched engine's (tests/test_actors.py checks 1e-5 for every routing kind).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import trio

from .. import routing
from ..config import AgentConfig, TaskConfig
from ..evaluation import episode_rngs, fixed_address_table
from ..rollout import Wiring, sample_wiring
from ..tasks import guessing
from ..xp import NumpyOps
from .runtime import ActorAgent, Counters

OPS = NumpyOps()
CHUNK = 250  # evaluation.run_episodes' default chunk: the rngs must be drawn in the same chunks


def episode_slice(ep: guessing.Episode, b: int) -> guessing.Episode:
    """Episode ``b`` of a batch, as a batch of one."""
    sl = slice(b, b + 1)
    targets = ep.targets[sl] if ep.targets.ndim == 2 else ep.targets[:, sl]
    jumps = None if ep.jumps is None else ep.jumps[:, sl]
    return guessing.Episode(ep.feedback, targets, ep.out_addr[sl], ep.slot_addr[sl], ep.visible, ep.n_experts, jumps)


def wiring_slice(w: Wiring, b: int) -> Wiring:
    sl = slice(b, b + 1)
    topo = w.route_mask
    topo = routing.Neighbors(topo.idx[sl]) if isinstance(topo, routing.Neighbors) else (
        None if topo is None else topo[sl])
    return Wiring(w.noise[sl], topo, w.can_sense, w.can_push, None if w.ids is None else w.ids[sl])


@dataclass
class ActorEpisodes:
    """Like ``evaluation.Episodes``, plus the runtime's counters."""

    errors: np.ndarray  # [T, E]
    guesses: np.ndarray  # [T, E, d]
    rounds: np.ndarray  # [T, E]
    targets: np.ndarray  # [E, d]
    counters: Counters = field(default_factory=Counters)
    policy_calls: int = 0
    policy_rows: int = 0


async def play(agent: ActorAgent, ep: guessing.Episode, steps: int, rounds: int | None = None, t0: int = 0,
               guess=None):
    """Feed a running agent ``steps`` guessing-game observations; returns (guesses [T, d], errors [T],
    rounds [T], last guess [1, d]). The same observation/error code as ``rollout.rollout``."""
    guess = OPS.zeros((1, ep.dims)) if guess is None else guess
    gs, es, rs = [], [], []
    for t in range(t0, t0 + steps):
        slot_val = guessing.observe(OPS, ep, guess, t)
        out, info = await agent.step(slot_val[0], rounds=rounds)
        guess = out[None]
        gs.append(out)
        es.append(float(guessing.error(OPS, guess, np.asarray(ep.targets_at(t), np.float32))[0]))
        rs.append(info.rounds)
    return np.stack(gs), np.asarray(es, np.float32), np.asarray(rs), guess


def sample_episodes(agent: AgentConfig, task: TaskConfig, *, dims: int, experts: int, episodes: int, seed: int,
                    steps: int) -> list[tuple[int, guessing.Episode, Wiring]]:
    """[(index, episode, wiring)] of batch 1, drawn exactly as ``evaluation.run_episodes`` draws them."""
    rng_task, rng_wire = episode_rngs(seed)
    addresses = fixed_address_table(task, dims, agent.policy.addr_dim)
    jobs = []
    done = 0
    while done < episodes:
        b = min(CHUNK, episodes - done)
        ep = guessing.sample(rng_task, task, b, dims, experts, agent.policy.addr_dim, steps=steps, addresses=addresses)
        wiring = sample_wiring(rng_wire, agent, b, experts)
        jobs += [(done + i, episode_slice(ep, i), wiring_slice(wiring, i)) for i in range(b)]
        done += b
    return jobs


async def run_concurrently(jobs, fn, concurrency: int):
    """Await ``fn(*job)`` for every job, at most ``concurrency`` at a time."""
    limit = trio.CapacityLimiter(max(1, concurrency))

    async def guarded(job):
        async with limit:
            await fn(*job)

    async with trio.open_nursery() as n:
        for job in jobs:
            n.start_soon(guarded, job)


def run_actor_episodes(policy, agent: AgentConfig, task: TaskConfig, *, dims: int, experts: int, episodes: int,
                       seed: int, steps: int | None = None, rounds: int | None = None, micro_batch: bool = True,
                       encode: bool = True, concurrency: int = 4, **agent_kw) -> ActorEpisodes:
    """``evaluation.run_episodes`` computed by actor agents (one per episode, ``concurrency`` at a time)."""
    steps = steps or task.steps
    jobs = sample_episodes(agent, task, dims=dims, experts=experts, episodes=episodes, seed=seed, steps=steps)
    T = steps
    guesses = np.zeros((T, episodes, dims), np.float32)
    errors = np.zeros((T, episodes), np.float32)
    used = np.zeros((T, episodes), np.int64)
    targets = np.stack([ep.targets[0] if ep.targets.ndim == 2 else ep.targets[0, 0] for _, ep, _ in jobs])
    total = Counters()
    calls = [0, 0]

    async def one(i, ep, w):
        a = ActorAgent(policy, agent, ep, w, micro_batch=micro_batch, encode=encode, episode_index=i, seed=seed,
                       **agent_kw)
        async with a.running():
            g, e, r, _ = await play(a, ep, steps, rounds)
        guesses[:, i], errors[:, i], used[:, i] = g, e, r
        total.add(a.counters)
        calls[0] += a.batcher.calls
        calls[1] += a.batcher.rows

    trio.run(run_concurrently, jobs, one, concurrency)
    return ActorEpisodes(errors, guesses, used, targets, total, calls[0], calls[1])


def evaluate_actors(policy, agent: AgentConfig, task: TaskConfig, *, dims: int, experts: int, episodes: int = 1000,
                    seed: int = 0, steps: int | None = None, rounds: int | None = None, micro_batch: bool = True,
                    encode: bool = True, concurrency: int = 4, baselines: bool = True) -> dict:
    """``evaluation.evaluate``'s report (same keys, same baselines), computed by the actor runtime,
    plus ``messages`` (sent / delivered / dropped / bad_frames) and ``policy_calls``."""
    from ..evaluation import make_report

    steps = steps or task.steps
    t0 = time.perf_counter()
    res = run_actor_episodes(policy, agent, task, dims=dims, experts=experts, episodes=episodes, seed=seed,
                             steps=steps, rounds=rounds, micro_batch=micro_batch, encode=encode,
                             concurrency=concurrency)
    report = make_report(agent, task, res.errors, res.rounds, res.targets, dims=dims, experts=experts, seed=seed,
                         seconds=time.perf_counter() - t0, baselines=baselines)
    c = res.counters
    report["runtime"] = "actors"
    report["messages"] = {"sent": c.sent, "delivered": c.delivered, "dropped": c.dropped, "bad_frames": c.bad_frames}
    report["policy_calls"] = res.policy_calls
    report["micro_batch"] = micro_batch
    return report

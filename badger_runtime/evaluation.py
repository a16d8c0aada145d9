"""Seeded evaluation of a policy on any task, in any runtime, with the task's baselines.

``run_episodes`` draws the seeded batches (``episodes.sample_batches``) and drives each
through a runtime: ``engine`` (``engine.Agent``: numpy + onnxruntime, or torch ops for a
checkpoint), ``sharded`` (``actors.ShardedAgent``, one per batch), ``actors``
(``actors.ActorAgent``, one per episode) or ``ray`` (``cluster.RayShardedAgent``, one per batch,
its shards Ray actors). ``evaluate`` turns the result into the JSON report of
``badger eval`` / ``badger run``: the runtime-independent keys here, the task's own keys
(its metrics by step and its baselines on the same episodes) from ``Task.report``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from . import routing
from .config import AgentConfig, ConfigError, TaskConfig
from .episodes import CHUNK, Change, Driver, drive, episode_rngs, growth_rng, sample_batches

RUNTIMES = ("engine", "sharded", "actors", "ray")
MEMORY_BUDGET = 2**26  # float32 entries the largest temporaries of one batch may take (~256 MiB each)


def fit_chunk(chunk: int, agent: AgentConfig, *, dims: int, experts: int, slots: int) -> int:
    """Episodes per batch so that one batch's largest temporaries stay within ``MEMORY_BUDGET``
    (the sensing scores [B, N, K, J], the push weights [B, d, N], the routing scores). Only large
    agents are cut into smaller batches; every evaluation small enough keeps its batches of ``chunk``."""
    spec, r = agent.policy, agent.routing
    n = experts
    route = n * (r.candidates + 1) * (spec.key_dim + spec.msg_dim) if routing.is_sparse(r, n) else n * n
    per_episode = max(n * spec.read_heads * slots, dims * n, route)
    return max(1, min(chunk, MEMORY_BUDGET // max(1, per_episode)))

__all__ = ["Episodes", "RUNTIMES", "episode_rngs", "evaluate", "make_report", "run_episodes"]


@dataclass
class Episodes:
    """What a seeded evaluation recorded (E episodes, T steps)."""

    metrics: dict  # name -> [T, E] (the task's metrics of each step's outputs)
    outputs: np.ndarray  # [T, E, d]
    rounds: np.ndarray  # [T, E] communication rounds used
    episodes: list  # the task's episode batches, in order (for the baselines)
    traces: list = field(default_factory=list)  # [(episode, wiring, Trajectory)] of the first batch (record)
    messages: int = 0  # expert -> expert messages delivered (runtimes that count them)
    runtime: dict = field(default_factory=dict)  # the runtime's own counters

    @property
    def errors(self) -> np.ndarray:
        """The guessing game's error [T, E] (3 x MSE)."""
        return self.metrics["error"]


def _engine_batch(ops, policy, agent, ep, wiring, *, start, steps, rounds, record, changes, seed, rng=None,
                  past_horizon=False, **_):
    from .engine import Agent

    runtime = Agent(policy, agent, ops=ops, check_inputs=False, past_horizon=past_horizon).start(
        ep.interface, wiring, rng=rng if rng is not None else growth_rng(seed, start))
    runtime.record = record
    traj = drive(runtime, Driver(ops, ep, steps, rounds=rounds, record=record, changes=changes, with_losses=False,
                                 seed=seed + start))
    return traj, {}


def run_episodes(ops, policy, agent: AgentConfig, task: TaskConfig, *, dims: int, experts: int, episodes: int,
                 seed: int, steps: int | None = None, rounds: int | None = None, chunk: int = CHUNK,
                 record: bool = False, changes: tuple[Change, ...] = (), runtime: str = "engine",
                 **runtime_kw) -> Episodes:
    """Roll out ``episodes`` seeded episodes of ``task`` through ``runtime`` (see the module doc)."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    from .engine import MAX_EXPERTS, check_growth, check_rounds, int_arg

    # (checked here: the runtimes run these agents unchecked, and rounds=0 reported an agent that never called its
    # policy as if it had; steps=0 ran the task's default)
    episodes, dims = int_arg(episodes, "episodes", 1), int_arg(dims, "dims", 1)
    experts = int_arg(experts, "experts", 1, MAX_EXPERTS)
    steps, rounds = None if steps is None else int_arg(steps, "steps", 1), check_rounds(rounds)
    if not isinstance(changes, (tuple, list)) or not all(isinstance(c, Change) for c in changes):
        raise ConfigError("changes must be a tuple of episodes.Change (episodes.schedule makes one)")
    for c in changes:  # a refused hot-add is refused before any step is run, not halfway through
        if c.kind == "add":
            check_growth(policy, c.init, c.allow_harmful)
    if runtime == "engine":
        run_batch = _engine_batch
    elif runtime == "sharded":
        from .actors.episodes import sharded_batch as run_batch
    elif runtime == "ray":
        from .cluster.ray_shards import ray_batch as run_batch
    else:
        from .actors.episodes import actor_batch as run_batch
    steps = steps or task.steps
    for c in changes:  # one that never happens was reported as if it had
        if c.at >= steps:
            raise ConfigError(f"a change before step {c.at} ({c.kind} {c.n}) would never happen: the episodes have "
                              f"steps 0..{steps - 1} (--{c.kind}-at T needs T < --steps)")
    metrics, outputs, used, eps, traces, counters = {}, [], [], [], [], {}
    messages = 0
    rngs = episode_rngs(seed)
    chunk = fit_chunk(chunk, agent, dims=dims, experts=experts, slots=2 * dims + 1)
    for start, ep, wiring in sample_batches(task, agent, dims=dims, experts=experts, episodes=episodes, seed=seed,
                                            steps=steps, chunk=chunk, rngs=rngs):
        traj, extra = run_batch(ops, policy, agent, ep, wiring, start=start, steps=steps, rounds=rounds,
                                record=record, changes=changes, seed=seed, **runtime_kw)
        for k, v in traj.metrics.items():
            metrics.setdefault(k, []).append(v)
        outputs.append(ops.to_numpy(traj.outputs))
        used.append(traj.rounds)
        eps.append(ep)
        messages += traj.messages
        for k, v in extra.items():  # totals over the batches; peaks are maxima
            counters[k] = max(counters.get(k, 0), v) if k.startswith("peak") else counters.get(k, 0) + v
        if record and not traces:
            traces = [(ep, wiring, traj)]
    return Episodes({k: np.concatenate(v, axis=1) for k, v in metrics.items()}, np.concatenate(outputs, axis=1),
                    np.concatenate(used, axis=1), eps, traces, messages, counters)


def evaluate(ops, policy, agent: AgentConfig, task: TaskConfig, *, dims: int, experts: int, episodes: int = 1000,
             seed: int = 0, steps: int | None = None, rounds: int | None = None, baselines: bool = True,
             changes: tuple[Change, ...] = (), runtime: str = "engine", **runtime_kw) -> dict:
    """The JSON report of ``badger eval``: the agent's metrics by step and the task's baselines."""
    steps = steps or task.steps
    t0 = time.perf_counter()
    res = run_episodes(ops, policy, agent, task, dims=dims, experts=experts, episodes=episodes, seed=seed,
                       steps=steps, rounds=rounds, changes=changes, runtime=runtime, **runtime_kw)
    report = make_report(agent, task, res, dims=dims, experts=experts, seed=seed,
                         seconds=time.perf_counter() - t0, baselines=baselines)
    if changes:
        report["changes"] = [dataclasses.asdict(c) for c in changes]
    if runtime == "engine":
        report["messages"] = {"delivered": res.messages}
    else:
        counters = dict(res.runtime)
        report["runtime"] = runtime
        report["policy_calls"] = counters.pop("policy_calls", None)
        report["messages"] = counters
    return report


def make_report(agent: AgentConfig, task: TaskConfig, res: Episodes, *, dims: int, experts: int, seed: int,
                seconds: float, baselines: bool = True) -> dict:
    """The evaluation report of ``res`` (whichever runtime computed it): the runtime-independent
    keys, then the task's (``Task.report``: its metrics by step, its baselines)."""
    from .tasks import make_task

    steps = res.rounds.shape[0]
    report = {
        "task": dataclasses.asdict(task) | {"dims": dims, "experts": experts},
        "episodes": int(res.rounds.shape[1]),
        "seed": seed,
        "steps": steps,
        "routing": agent.routing.kind,
        "agreement": agent.agreement.rule,
        "rounds_mean": float(res.rounds.mean()),
        "seconds": round(seconds, 3),
    }
    report.update(make_task(task).report(res.metrics, res.episodes, steps=steps, seed=seed, baselines=baselines))
    return report

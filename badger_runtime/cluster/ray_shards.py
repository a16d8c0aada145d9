"""Agents larger than one machine: the sharded runtime's shards as Ray actors.

``RayShardedAgent`` is ``actors.ShardedAgent`` with its shards moved out of the process: each
shard is a Ray actor (``ShardActor``) that holds its experts' state (a ``ShardCore`` built from
only its part of the agent, ``actors.shard.cut``) and runs its own rows of the policy. A
communication round is the same per-round block exchange: each shard's (key, value) block is the
return value of its previous call, so it lives in Ray's object store (on the shard's node), and
the next round's call of every shard that needs it takes it as an argument (Ray fetches it to
that shard's node). The membrane (this process: the observation and the competitive heads'
reads, the agreement verdict, the outputs mixed from the pushes; ``actors.sharded.ShardedMembrane``)
and the rollout maths (``ShardCore``) are the in-process runtime's, unchanged, so the outputs
equal ``ShardedAgent``'s (tests/test_cluster.py: 1e-5 over steps with hot-add and removal).

The driver never waits inside a round with the fixed agreement rule: it submits every shard's
rounds and waits only for the pushes (Ray orders each actor's calls and resolves the block
arguments). Convergence and quorum need the votes after each round (one small ``ray.get``).

Growing and shrinking happen between steps, by the engine's rule: the state is gathered, changed
with ``rollout.grow`` / ``rollout.shrink``, cut again and sent to the actors. Shards are placed
with Ray's ``SPREAD`` strategy (one per node first). Every call to a dead actor raises
``ray.exceptions.RayActorError``; an agent does not survive losing a shard (a served session
does: ``cluster.sessions``).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..actors.batcher import DEFAULT_POLICY_CHUNK, chunk_bounds, step_rows
from ..actors.shard import DEFAULT_TILE, ShardCore, cut, needs
from ..actors.sharded import OPS, ShardedMembrane
from ..config import AgentConfig
from ..membrane import Interface
from ..rollout import AgentState, StepInfo, Wiring, initial_state


def policy_source(policy):
    """What a shard actor needs to build the policy: an ONNX policy's file (each actor opens its
    own onnxruntime session), or the policy object itself (e.g. ``NumpyPolicy``, picklable)."""
    path = getattr(policy, "path", None)
    if path is not None and getattr(policy, "session", None) is not None:
        return {"onnx": str(path)}
    return {"object": policy}


def _open(source, threads: int = 1):
    if "onnx" in source:
        from ..policy_card import load_policy

        return load_policy(source["onnx"], threads=threads)
    return source["object"]


def _rss_kib() -> tuple[int, int]:
    """(current, peak) resident memory of this process, KiB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with open("/proc/self/status") as f:
            cur = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        cur = peak
    return cur, peak


class ShardActor:
    """One shard in a Ray actor: its ``ShardCore`` and its rows of the policy (see the module doc)."""

    def __init__(self, source, cfg: AgentConfig, tile: int = DEFAULT_TILE, policy_chunk: int = DEFAULT_POLICY_CHUNK,
                 threads: int = 1):
        self.policy = _open(source, threads)
        self.cfg, self.tile, self.chunk = cfg, tile, policy_chunk
        self.core: ShardCore | None = None
        self.busy = 0.0  # seconds spent computing (sense, rounds, push): the rest of a step is transport
        self.baseline_kib = _rss_kib()[1]  # after imports and the policy: what the experts add is above it

    def load(self, part) -> int:
        """Own shard ``part`` (at start and after a membership change); returns its experts."""
        # arrays from the object store are read-only views: the shard owns writable copies of its state
        part = dataclasses.replace(part, h=np.array(part.h), heads=np.array(part.heads))
        self.core = ShardCore.from_part(part, self.cfg, self.tile)
        return self.core.n

    def observe(self, payload: dict) -> dict:
        """Sense the observation; returns the block of the first round."""
        t0 = time.perf_counter()
        self.core.sense(payload["slot_addr"], payload["slot_val"], payload.get("competed"))
        out = self._block()
        self.busy += time.perf_counter() - t0
        return out

    def _block(self) -> dict:
        b = self.core.block()
        return {"lo": self.core.lo, "key": np.ascontiguousarray(b["key"]), "value": np.ascontiguousarray(b["value"])}

    def round(self, r: int, active: np.ndarray, *blocks) -> tuple[dict, dict]:
        """One communication round: the blocks heard (mine added here), the inboxes, the policy on my
        rows, the update of the episodes still ``active``. Returns (my next block, my vote payload)."""
        t0 = time.perf_counter()
        core = self.core
        if core.index in core.needs:
            own = core.block()
            core.take_block(core.lo, own["key"], own["value"])
        for b in blocks:
            core.take_block(int(b["lo"]), b["key"], b["value"])
        h2, hd2 = self._policy(core.h, core.inbox(), core.sensed)
        change, vote = core.apply(h2, hd2, np.asarray(active, bool), self.cfg.agreement.rule)
        out = self._block(), core.vote_payload(change, vote)
        self.busy += time.perf_counter() - t0
        return out

    def _policy(self, h, inbox, sensed):
        B, n = h.shape[:2]
        rows, spec = B * n, self.policy.spec
        h2, hd2 = np.empty((rows, spec.hidden), np.float32), np.empty((rows, spec.heads_dim), np.float32)
        step_rows(self.policy, chunk_bounds(rows, self.chunk), h.reshape(rows, -1), inbox.reshape(rows, -1),
                  sensed.reshape(rows, -1), h2, hd2)
        return h2.reshape(B, n, -1), hd2.reshape(B, n, -1)

    def push(self, last_block=None) -> dict:
        """My experts' pushes (``last_block``: my last round's output, passed so that an error in that
        round reaches the membrane here instead of being dropped with the unused block)."""
        t0 = time.perf_counter()
        out = {**self.core.push_block(), "lo": self.core.lo}
        self.busy += time.perf_counter() - t0
        return out

    def busy_seconds(self) -> float:
        return self.busy

    def ping(self) -> None:
        return None

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        return self.core.h, self.core.heads

    def memory(self) -> dict:
        """Where this shard runs and what it holds: node, pid, resident and peak memory (MiB), and
        the peak above the actor's baseline (imports + policy)."""
        import os

        import ray

        cur, peak = _rss_kib()
        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "experts": None if self.core is None else self.core.n, "rss_mib": cur / 1024,
                "peak_mib": peak / 1024, "peak_above_baseline_mib": (peak - self.baseline_kib) / 1024}


class RayShardedAgent(ShardedMembrane):
    """B episodes of N experts in S shards that are Ray actors (see the module doc). The runtime
    interface of ``engine.Agent`` (a plain ``step``), so ``episodes.drive`` runs it::

        agent = RayShardedAgent(policy, cfg, interface, wiring, shards=4)
        out, info = agent.step(slot_values)  # [B, J] -> [B, d]
        agent.close()                        # the actors go

    Ray must be initialised (``cluster.connect``); ``shards`` defaults to the cluster's CPUs."""

    def __init__(self, policy, cfg: AgentConfig, interface: Interface, wiring: Wiring, *,
                 shards: int | None = None, tile: int = DEFAULT_TILE, policy_chunk: int = DEFAULT_POLICY_CHUNK,
                 threads: int = 1, episode_index: int = 0, state: AgentState | None = None,
                 rng: np.random.Generator | None = None, past_horizon: bool = False, actor_options: dict | None = None):
        from . import require_ray

        self.ray = ray = require_ray()
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised: badger_runtime.cluster.connect() first")
        if shards is None:
            shards = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._init_membrane(policy, cfg, interface, wiring, shards=shards, tile=tile, rng=rng,
                            past_horizon=past_horizon, episode_index=episode_index)
        self._policy_chunk, self._threads = policy_chunk, threads
        self._source = ray.put(policy_source(policy))
        self._actor_options = actor_options or {}
        self._actor_class = None
        self.actors: list = []
        self.counters = {"blocks": 0, "delivered": 0, "rounds": 0}
        self._partition(wiring, state if state is not None else initial_state(OPS, policy, wiring))

    # -- the shards -----------------------------------------------------------------
    def _new_actor(self):
        if self._actor_class is None:  # one CPU per shard, or a share of them if there are more shards than CPUs
            cpus = float(self.ray.cluster_resources().get("CPU", 1.0))
            opts = {"num_cpus": min(1.0, cpus / max(1, self.S)), "scheduling_strategy": "SPREAD"}
            self._actor_class = self.ray.remote(**(opts | self._actor_options))(ShardActor)
        return self._actor_class.remote(self._source, self.cfg, self._tile, self._policy_chunk, self._threads)

    def _build_shards(self, wiring: Wiring, st: AgentState):
        ray = self.ray
        while len(self.actors) > self.S:
            ray.kill(self.actors.pop())
        while len(self.actors) < self.S:
            self.actors.append(self._new_actor())
        cores = [cut(i, self.bounds, wiring, st.h, st.heads, self._vis) for i in range(self.S)]
        ray.get([a.load.remote(part) for a, part in zip(self.actors, cores)])
        # which shards each shard hears (the same rule as ShardCore.needs, computed once here)
        self._needs = [needs(self.bounds, part.topo) for part in cores]
        self._blocks_per_round = sum(len(n) - (i in n) for i, n in enumerate(self._needs))  # from other shards
        self._indeg = wiring.in_degrees().sum(axis=1)  # [B] messages delivered per round

    def _resize(self, wiring: Wiring, st: AgentState):
        self._partition(wiring, st)

    def state(self) -> AgentState:
        """The experts' state gathered from the shard actors (tests, growing)."""
        parts = self.ray.get([a.state.remote() for a in self.actors])
        return AgentState(np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=1))

    def busy(self) -> list[float]:
        """Seconds each shard actor has spent computing so far (the rest of the wall time is
        transport, scheduling and waiting for the other shards' blocks)."""
        return self.ray.get([a.busy_seconds.remote() for a in self.actors])

    def ping_ms(self, calls: int = 20) -> float:
        """The median round trip of an empty call to a shard actor (Ray's floor per call), ms."""
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            self.ray.get(self.actors[0].ping.remote())
            times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1e3)

    def memory(self) -> list[dict]:
        """Each shard actor's node and memory (``ShardActor.memory``)."""
        return self.ray.get([a.memory.remote() for a in self.actors])

    def close(self):
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the membrane -----------------------------------------------------------------
    def step(self, slot_values, rounds: int | None = None) -> tuple[np.ndarray, StepInfo]:
        """One inner step: observation [B, J] -> outputs [B, d] (see the module doc)."""
        ray = self.ray
        vals, R = self._checked(slot_values, rounds)
        blocks = [a.observe.remote(ob) for a, ob in zip(self.actors, self._observations(vals, R))]
        acfg = self._agreement(R)
        active = np.ones(self.B, bool)
        used = np.zeros(self.B, np.float32)
        delivered = 0
        for r in range(R):
            used += active
            delivered += int(self._indeg[active].sum())
            outs = [a.round.options(num_returns=2).remote(r, active, *[blocks[j] for j in self._needs[i] if j != i])
                    for i, a in enumerate(self.actors)]
            self.counters["blocks"] += self._blocks_per_round
            self.counters["rounds"] += 1
            blocks = [o[0] for o in outs]
            if acfg.rule != "fixed" and r + 1 < R:
                active = self._verdict(acfg, r, active, list(enumerate(ray.get([o[1] for o in outs]))))
                if not active.any():
                    break
        out = self._outputs(ray.get([a.push.remote(b) for a, b in zip(self.actors, blocks)]))
        self.t += 1
        self.counters["delivered"] += delivered
        return out, StepInfo(used, messages=delivered, experts=self.N)


def ray_batch(ops, policy, agent, ep, wiring, *, start: int, steps: int, rounds=None, record=False, changes=(),
              seed: int = 0, rng=None, **agent_kw):
    """``evaluation.run_episodes(..., runtime="ray")``: a batch with one ``RayShardedAgent`` (Ray is
    joined or started by ``cluster.connect``: ``RAY_ADDRESS`` names a cluster); returns
    (Trajectory, counters)."""
    from ..episodes import Driver, drive, growth_rng
    from . import connect

    connect()
    with RayShardedAgent(policy, agent, ep.interface, wiring, episode_index=start,
                         rng=rng if rng is not None else growth_rng(seed, start), **agent_kw) as a:
        traj = drive(a, Driver(ops, ep, steps, rounds=rounds, changes=changes, record=record, with_losses=False,
                               seed=seed + start))
        return traj, dict(a.counters) | {"shards": a.S}


__all__ = ["RayShardedAgent", "ShardActor", "policy_source", "ray_batch"]

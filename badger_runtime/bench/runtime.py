"""`badger bench runtime`: the three ways to run one agent, side by side, against N experts.

Engines (one agent of N experts, the guessing game, R communication rounds per inner step):

- ``batched``: ``engine.Agent``, the numpy + onnxruntime engine (``rollout.agent_step``): the limit.
- ``sharded``: ``actors.sharded.ShardedAgent``, the actor runtime's fast path (S shard actors,
  one gathered tick per round).
- ``actors``: ``actors.runtime.ActorAgent``, the per-expert actor runtime (one trio task per
  expert, one message per sender and receiver), only up to ``actor_max_n`` experts (it is slow).
- ``ray`` (asked for by name; the ``cluster`` extra): ``cluster.ray_shards.RayShardedAgent``, the
  sharded runtime with its shards as Ray actors exchanging their blocks through the object store;
  on a local Ray instance, ``ray_nodes`` local Ray nodes side by side (``ray.cluster_utils``), or
  the cluster at ``ray_address``. Its memory is the driver's peak plus every shard actor's peak
  above its own baseline (``per_node_mib``: the same by node).

For each N, all engines step the same seeded episode (same wiring and initial state) in one
process, one after the other: ``warmup`` untimed steps, then up to ``steps`` timed ones (fewer if
``max_seconds`` is spent). Reported per (N, engine):

- ``expert_steps_per_s`` = N x timed steps / seconds (an inner step with R rounds counts once);
- ``messages_per_s``: expert -> expert messages delivered per second: per round every receiver
  hears its in-degree (N with everyone-hears-everyone topologies, the C listed senders with top-k
  over candidates); the batched engine's messages are counted the same way (logically), the
  per-expert actors' are their ``delivered`` counter;
- ``peak_mib`` and ``kib_per_expert``: peak RSS (``ru_maxrss``) of a fresh subprocess per
  (engine, N) that builds the agent and runs one step, minus the same process's peak after
  imports and policy load (so onnxruntime's arena growth during the step is included);
- ``max_diff_vs_batched``: the largest difference of its outputs from the batched engine's on
  the same steps (the engines compute the same rollout);
- ``fraction_of_limit``: expert-steps/s over the policy-call limit measured in the same run (the
  rows/s of the policy alone in onnxruntime calls of 4,096 rows, over the rounds per step; the best of its
  measurement before and after the engines);
  ``cpu_seconds_per_step`` and ``cpu_fraction_of_limit``: the same with this process's CPU time
  (all its threads) for both, which leaves out the time other processes took on a shared machine
  (a load-independent measure of the work: 1.0 = no work but the policy calls);
  ``rows_limit_expert_steps_per_s``, ``fraction_of_rows_limit`` and ``cpu_fraction_of_rows_limit``: the same
  against the policy over N distinct rows (``policy_rates(distinct=True)``), which reads the experts' state from
  memory as a runtime must, where the limit above calls it on one chunk hot in the cache.

Timing runs in a subprocess per N (``isolate``), with ``OPENBLAS_NUM_THREADS`` etc. set to
``blas_threads``: with the machine's 2 cores shared, a multi-threaded BLAS stalls in its thread
barriers (a 500 x 1000 x 16 matmul took 0.2 ms single-threaded and 0.1-8 ms with 2 threads).
Dense routing (and top-k without candidates) scores N^2 pairs: sizes over
``routing.MAX_DENSE_ENTRIES`` are refused before anything runs (``routing.topology``'s error).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ENGINES = ("batched", "sharded", "actors", "ray")
DEFAULT_ENGINES = ("batched", "sharded", "actors")  # ray only when asked for (an optional extra)
DEFAULT_POLICY = "policies/guessing-converge-v2.onnx"


@dataclass
class RuntimeBench:
    policy: str = DEFAULT_POLICY
    experts: list = field(default_factory=lambda: [10, 100, 1000, 10_000, 100_000])
    engines: list = field(default_factory=lambda: list(DEFAULT_ENGINES))
    routing: str = "topk"
    k: int = 8
    candidates: int = 32  # top-k: senders each receiver scores, for N > candidates_above
    candidates_above: int = 1000
    degree: int = 4  # random graph
    rounds: int = 4
    dims: int = 3
    steps: int = 3  # timed inner steps per (engine, N)
    warmup: int = 1
    seed: int = 0
    threads: int = 1  # onnxruntime intra-op threads
    blas_threads: int = 1
    shards: int | None = None  # sharded: None = one per core
    tile: int = 4096
    policy_chunk: int = 4096
    encode: bool = False  # sharded: msgpack-encode the shard messages
    route_threads: bool | None = None  # sharded: route each shard in a worker thread (None: by shard size)
    route_kernel: bool | None = None  # sharded: route listed senders with the compiled kernel (None: by shard size)
    actor_encode: bool = True  # per-expert actors: msgpack frames (their default)
    actor_max_n: int = 1000
    max_seconds: float = 60.0  # per (engine, N): stop timing once this is spent
    memory: bool = True
    isolate: bool = True
    ray_nodes: int = 1  # ray: local Ray nodes started side by side (each with cpus / ray_nodes CPUs)
    ray_address: str | None = None  # ray: join this cluster instead
    ray_object_store_mib: int = 0  # ray: each local node's object store (0: Ray's default)

    def routing_for(self, n: int) -> dict:
        c = self.candidates if (self.routing == "topk" and n > self.candidates_above) else 0
        return {"kind": self.routing, "k": self.k, "candidates": c, "degree": self.degree}


# ---- building the same agent three ways ---------------------------------------------------------------

def agent_config(policy, spec: RuntimeBench, n: int):
    a = policy.agent
    return dataclasses.replace(a, routing=dataclasses.replace(a.routing, **spec.routing_for(n)),
                               agreement=dataclasses.replace(a.agreement, rule="fixed", rounds=spec.rounds))


def check_sizes(spec: RuntimeBench):
    """Refuse, before running anything, sizes whose routing would score N^2 pairs past the limit."""
    from .. import routing
    from ..config import ConfigError, RoutingConfig

    for n in spec.experts:
        if n < 1:
            raise ConfigError(f"--experts must be >= 1, got {n}")
        cfg = RoutingConfig(**spec.routing_for(n))
        cfg.validate()
        try:
            routing.check_size(cfg, n, 1)
        except ConfigError as e:
            raise ConfigError(f"bench runtime: N = {n:,}: {e}") from None
    for e in spec.engines:
        if e not in ENGINES:
            raise ConfigError(f"unknown engine {e!r} (engines: {', '.join(ENGINES)})")
    if spec.steps < 1 or spec.rounds < 1 or spec.warmup < 0 or spec.max_seconds <= 0:
        raise ConfigError("--steps and --rounds must be >= 1, --warmup >= 0, --max-seconds > 0")


class _Engine:
    """What the benchmark needs of one runtime kind: how to build it, whether its ``step`` is a
    coroutine, how it runs (an async context), what it reports beyond the timings, and what it
    holds that must be released. The in-process batched engine is the default."""

    name = "batched"
    coroutine = False  # the actor runtimes' step is a coroutine (awaited inside their ``running()``)

    def build(self, policy, cfg, ep, wiring, spec: RuntimeBench):
        from ..engine import Agent

        return Agent(policy, cfg).start(ep.interface, wiring)

    def prepare(self, spec: RuntimeBench):
        """Before the runtime is built (ray: join or start the cluster)."""

    def running(self, runtime):
        from contextlib import asynccontextmanager

        if self.coroutine:
            return runtime.running()

        @asynccontextmanager
        async def nothing():
            yield runtime
        return nothing()

    def after_step(self, timed: "_Timed"):
        """After each timed step (outside its time)."""

    def extra(self, runtime) -> dict:
        return {}

    def finish(self, timed: "_Timed", spec: RuntimeBench, warmed: bool) -> dict:
        """After the run: what else the row reports, and the runtime's resources released."""
        return {}

    def memory(self, runtime, out: dict) -> dict:
        """The memory probe's row (ray: the shard actors' peaks are part of it)."""
        return out


class _Sharded(_Engine):
    name, coroutine = "sharded", True

    def build(self, policy, cfg, ep, wiring, spec):
        from ..actors.sharded import ShardedAgent

        return ShardedAgent(policy, cfg, ep.interface, wiring, shards=spec.shards, tile=spec.tile,
                            policy_chunk=spec.policy_chunk, encode=spec.encode, route_threads=spec.route_threads,
                            compiled_routing=spec.route_kernel)

    def extra(self, a) -> dict:
        return {"shards": a.shards, "route_threads": a.route_threads, "route_kernel": a.compiled_routing,
                "policy_calls_per_round": len(a.batcher.chunks),
                "shard_messages": a.counters.frames, "block_bytes": a.counters.block_bytes}


class _Actors(_Engine):
    name, coroutine = "actors", True

    def build(self, policy, cfg, ep, wiring, spec):
        from ..actors.runtime import ActorAgent

        return ActorAgent(policy, cfg, ep.interface, wiring, encode=spec.actor_encode, step_timeout=None)

    def extra(self, a) -> dict:
        c = a.counters
        return {"sent": c.sent, "delivered": c.delivered, "dropped": c.dropped, "policy_calls": a.batcher.calls}


class _Ray(_Engine):
    name = "ray"

    def prepare(self, spec):
        ray_cluster(spec)  # started after the other engines ran: its processes do not slow them

    def build(self, policy, cfg, ep, wiring, spec):
        from ..cluster.ray_shards import RayShardedAgent

        return RayShardedAgent(policy, cfg, ep.interface, wiring, shards=spec.shards, tile=spec.tile,
                               policy_chunk=spec.policy_chunk, threads=spec.threads)

    def after_step(self, timed):
        """The shards' compute in this step: the busiest shard's and all shards' seconds."""
        busy = timed.runtime.busy()
        step = [b - a for a, b in zip(timed.busy0, busy)] if timed.busy0 else busy
        timed.busy.append((max(step), sum(step)))
        timed.busy0 = busy

    def extra(self, a) -> dict:
        nodes = sorted({m["node"] for m in a.memory()})
        return {"shards": a.shards, "nodes": len(nodes), "shard_blocks": a.counters["blocks"],
                "ray_ping_ms": round(a.ping_ms(), 3)}

    def finish(self, timed, spec, warmed):
        """Of each timed step, the shards' compute, and the rest per round: moving the blocks through
        Ray, scheduling the calls, waiting and the membrane's side cost."""
        sl = slice(spec.warmup, None) if warmed else slice(-1, None)
        wall = np.array([r[0] for r in timed.steps[sl]])
        busy = np.array(timed.busy[sl])  # [steps, (max, sum)]
        timed.runtime.close()
        return {"shard_compute_s_per_step": float(busy[:, 0].mean()), "shard_compute_sum_s_per_step":
                float(busy[:, 1].mean()),
                # the rest of each step per round: at most wall - the busiest shard (shards in parallel), at
                # least wall - all shards' compute (shards one after the other, as on cores shared with others)
                "ray_overhead_s_per_round": float((wall - busy[:, 0]).mean() / spec.rounds),
                "ray_overhead_min_s_per_round": float(np.maximum(wall - busy[:, 1], 0).mean() / spec.rounds)}

    def memory(self, runtime, out):
        """The experts live in the shard actors: their peaks above their own baselines."""
        shards = runtime.memory()
        runtime.close()
        per_node: dict = {}
        for m in shards:
            per_node[m["node"][:12]] = per_node.get(m["node"][:12], 0.0) + m["peak_above_baseline_mib"]
        return out | {"driver_peak_mib": out["peak_mib"], "peak_mib": out["peak_mib"] + sum(per_node.values()),
                      "per_node_mib": {k: round(v, 1) for k, v in per_node.items()},
                      "shard_rss_mib": [round(m["rss_mib"], 1) for m in shards]}


_ENGINES = {e.name: e for e in (_Engine(), _Sharded(), _Actors(), _Ray())}
assert tuple(_ENGINES) == ENGINES


class _Timed:
    """A runtime behind ``episodes.adrive`` that times each step (plain or coroutine ``step``)."""

    def __init__(self, engine: _Engine, runtime, deadline: float | None):
        self.engine, self.runtime, self.deadline = engine, runtime, deadline
        self.steps: list = []  # (seconds, messages, outputs, process CPU seconds)
        self.busy: list = []  # ray: the busiest shard actor's compute seconds, per step
        self.busy0: list = []

    def expert_ids(self):
        return self.runtime.expert_ids()

    async def step(self, obs, rounds=None):
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.runtime.step(obs, rounds=rounds)
        if self.engine.coroutine:
            out = await out
        outputs, info = out
        self.steps.append((time.perf_counter() - t0, info.messages or 0, np.asarray(outputs, np.float32),
                           time.process_time() - c0))
        self.engine.after_step(self)
        return outputs, info

    def running(self):
        return self.engine.running(self.runtime)


def _base(policy, spec: RuntimeBench, n: int):
    """The seeded episode and wiring every engine runs (the draws of ``engine.Agent.reset``)."""
    from ..episodes import sample_batches

    _, ep, wiring = next(sample_batches(policy.task, agent_config(policy, spec, n), dims=spec.dims, experts=n,
                                        episodes=1, seed=spec.seed, steps=spec.warmup + spec.steps))
    return ep, wiring


def _drive(timed: _Timed, episode, spec: RuntimeBench, max_steps: int) -> list:
    """Run the task through the timed runtime (the one driver loop); returns [(seconds, messages, outputs)]."""
    import trio

    from ..episodes import Driver, adrive
    from ..xp import NumpyOps

    class _Deadline(Driver):
        @property
        def finished(self):
            late = timed.deadline is not None and timed.steps and time.perf_counter() > timed.deadline
            return super().finished or bool(late)

    async def main():
        async with timed.running():
            await adrive(timed, _Deadline(NumpyOps(), episode, max_steps, rounds=spec.rounds, with_losses=False))

    trio.run(main)
    return timed.steps


def policy_rows_per_s(policy, rows: int, chunk: int = 4096, repeats: int = 3) -> float:
    """The policy-call limit: rows per second of the policy alone over ``rows`` rows, in onnxruntime
    calls of ``chunk`` rows (the best of ``repeats``): what no runtime can beat on this machine."""
    return policy_rates(policy, rows, chunk, repeats)[0]


#: ``policy_rates(distinct=True)`` cycles through at most this many distinct rows (51 MB of policy inputs
#: for the GRU-64 policies: past the last-level cache, as a runtime's rows are)
DISTINCT_ROWS_MAX = 131_072


def policy_rates(policy, rows: int, chunk: int = 4096, repeats: int = 3,
                 distinct: bool = False) -> tuple[float, float]:
    """``policy_rows_per_s`` by the wall clock and by this process's CPU time (the best of each).

    ``distinct=False`` (the limit every fraction has been measured against): one chunk of rows, called
    ``rows // chunk`` times, its inputs hot in the cache. ``distinct=True``: the same number of calls over
    distinct rows (up to ``DISTINCT_ROWS_MAX``, then again from the first), as a runtime reads the
    state of its N experts: the same work with its memory traffic, 9-14 % slower here (docs/benchmarks.md)."""
    spec = policy.spec
    rng = np.random.default_rng(0)
    c = max(1, min(chunk, rows))
    calls = max(1, rows // c)
    held = c * min(calls, max(1, DISTINCT_ROWS_MAX // c)) if distinct else c
    h = rng.uniform(-1, 1, (held, spec.hidden)).astype(np.float32)
    inbox = rng.standard_normal((held, spec.msg_dim)).astype(np.float32)
    sensed = rng.standard_normal((held, spec.sensed_dim)).astype(np.float32)
    starts = [(i * c) % held for i in range(calls)]
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for a in starts:
            policy.step(h[a:a + c], inbox[a:a + c], sensed[a:a + c])
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return calls * c / best, calls * c / max(best_cpu, 1e-9)


def time_engines(spec: RuntimeBench, n: int) -> list[dict]:
    """Time every engine of ``spec`` at N = n in this process (same episode, same steps), and the
    policy-call limits in the same run (``fraction_of_limit`` and ``fraction_of_rows_limit`` per row): each
    the best of its measurement before and after the engines, as this machine's speed drifts over a run."""
    from ..policy_card import load_policy

    policy = load_policy(spec.policy, threads=spec.threads)
    cfg = agent_config(policy, spec, n)
    ep, wiring = _base(policy, spec, n)

    def limits():  # expert-steps/s the policy calls allow: (hot chunk, distinct rows) x (wall, CPU)
        return [r / spec.rounds for d in (False, True) for r in policy_rates(policy, n, distinct=d)]

    before = limits()
    rows, ref = [], None
    for engine in sorted(spec.engines, key=ENGINES.index):  # the batched engine first: the reference
        row = {"experts": n, "engine": engine, "routing": cfg.routing.kind, "k": cfg.routing.k,
               "candidates": cfg.routing.candidates, "rounds": spec.rounds}
        if engine == "actors" and n > spec.actor_max_n:
            rows.append(row | {"skipped": f"per-expert actors run only up to --actor-max-n {spec.actor_max_n}"})
            continue
        kind = _ENGINES[engine]
        kind.prepare(spec)
        t0 = time.perf_counter()
        runner = _Timed(kind, kind.build(policy, cfg, ep, wiring, spec), None)
        setup = time.perf_counter() - t0
        runner.deadline = time.perf_counter() + spec.max_seconds
        res = _drive(runner, ep, spec, spec.warmup + spec.steps)
        timed = res[spec.warmup:] or res[-1:]  # a single (slow) step that used the budget is the measurement
        sec = sum(r[0] for r in timed)
        cpu = sum(r[3] for r in timed)
        msgs = sum(r[1] for r in timed)
        outs = np.stack([r[2] for r in res])
        if ref is None and engine == "batched":
            ref = outs
        row |= {"setup_s": round(setup, 4), "steps_timed": len(timed), "warmup_used": len(res) <= spec.warmup,
                "seconds_per_step": sec / len(timed), "expert_steps_per_s": n * len(timed) / sec,
                "messages_per_step": msgs / len(timed), "messages_per_s": msgs / sec,
                "cpu_seconds_per_step": cpu / len(timed), "loadavg": os.getloadavg()[0]}
        if ref is not None and engine != "batched":
            m = min(len(ref), len(outs))
            row["max_diff_vs_batched"] = float(np.abs(ref[:m] - outs[:m]).max())
        row |= kind.extra(runner.runtime)
        row |= kind.finish(runner, spec, warmed=len(res) > spec.warmup)
        rows.append(row)
        del runner
    limit, limit_cpu, rows_limit, rows_limit_cpu = (max(a, b) for a, b in zip(before, limits()))
    for row in rows:
        if "expert_steps_per_s" not in row:
            continue
        rate, cpu_rate = row["expert_steps_per_s"], n / max(row["cpu_seconds_per_step"], 1e-9)
        row |= {"limit_expert_steps_per_s": limit, "fraction_of_limit": rate / limit,
                "cpu_limit_expert_steps_per_s": limit_cpu, "cpu_fraction_of_limit": cpu_rate / limit_cpu,
                "rows_limit_expert_steps_per_s": rows_limit, "fraction_of_rows_limit": rate / rows_limit,
                "cpu_fraction_of_rows_limit": cpu_rate / rows_limit_cpu}
    return rows


def memory_probe(spec: RuntimeBench, engine: str, n: int) -> dict:
    """Peak RSS of building the agent and running one step, above this process's peak after imports."""
    import resource

    import trio  # noqa: F401  (imported before the baseline, as every engine's imports)

    from ..actors import runtime as _rt  # noqa: F401
    from ..actors import sharded as _sh  # noqa: F401
    from ..engine import Agent as _Agent  # noqa: F401
    from ..policy_card import load_policy

    policy = load_policy(spec.policy, threads=spec.threads)
    kind = _ENGINES[engine]
    kind.prepare(spec)  # (Ray's own driver-side memory is part of the baseline)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = agent_config(policy, spec, n)
    ep, wiring = _base(policy, spec, n)
    runner = _Timed(kind, kind.build(policy, cfg, ep, wiring, spec), None)
    _drive(runner, ep, spec, 1)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = kind.memory(runner.runtime, {"baseline_mib": base_kib / 1024, "peak_mib": (peak_kib - base_kib) / 1024})
    out["kib_per_expert"] = out["peak_mib"] * 1024 / n
    return out


def ray_cluster(spec: RuntimeBench):
    """Ray for the ``ray`` engine in this (measuring) process: the cluster at ``ray_address``, else
    ``ray_nodes`` local nodes side by side (``ray.cluster_utils.Cluster``: one head + K - 1 workers,
    each ``cpus // K`` CPUs), else one local instance. Left running until the process exits."""
    from ..cluster import connect, require_ray

    ray = require_ray()
    if ray.is_initialized():
        return ray
    store = spec.ray_object_store_mib * 2**20 or None
    if spec.ray_address or spec.ray_nodes <= 1:
        return connect(spec.ray_address, object_store_memory=None if spec.ray_address else store)
    from ray.cluster_utils import Cluster

    cpus = max(1, (os.cpu_count() or 1) // spec.ray_nodes)
    node = {"num_cpus": cpus, "object_store_memory": store, "include_dashboard": False} if store else {
        "num_cpus": cpus, "include_dashboard": False}
    global _CLUSTER
    _CLUSTER = cluster = Cluster(initialize_head=True, head_node_args=node)
    for _ in range(spec.ray_nodes - 1):
        cluster.add_node(**{k: v for k, v in node.items() if k != "include_dashboard"})
    cluster.wait_for_nodes()
    return connect(cluster.address)


_CLUSTER = None


def ray_cluster_stop():
    """Leave Ray and stop the local nodes ``ray_cluster`` started (if any)."""
    global _CLUSTER
    from ..cluster import disconnect, have_ray

    if have_ray():
        disconnect()
    if _CLUSTER is not None:
        _CLUSTER.shutdown()
        _CLUSTER = None


# ---- subprocesses ------------------------------------------------------------------------------------

def _env(spec: RuntimeBench) -> dict:
    env = dict(os.environ)
    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(spec.blas_threads)
    return env


def _subprocess(spec: RuntimeBench, job: dict, timeout: float):
    cmd = [sys.executable, "-m", "badger_runtime.bench.runtime", json.dumps(job | {"spec": dataclasses.asdict(spec)})]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(spec), check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        tail = (p.stderr or "").strip().splitlines()[-3:]
        return {"error": f"exit {p.returncode}: {' | '.join(tail)}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_runtime(spec: RuntimeBench, log=None) -> dict:
    """Run the benchmark (see the module doc); returns the JSON-able report."""
    check_sizes(spec)
    log = log or (lambda *a: None)
    rows = []
    per_run = spec.max_seconds * (spec.warmup + 2) * len(spec.engines) + 120
    for n in spec.experts:
        log(f"N = {n:,}: timing {', '.join(spec.engines)}")
        if spec.isolate:
            got = _subprocess(spec, {"job": "time", "n": n}, per_run)
            if isinstance(got, dict):  # the whole run failed
                got = [{"experts": n, "engine": e, **got} for e in spec.engines]
        else:
            got = time_engines(spec, n)
        for row in got:
            if spec.memory and "skipped" not in row and "error" not in row:
                log(f"N = {n:,}: memory of {row['engine']}")
                mem = _subprocess(spec, {"job": "memory", "engine": row["engine"], "n": n},
                                  spec.max_seconds * 4 + 120)
                row |= {k: v for k, v in mem.items() if k != "error"}
                if "error" in mem:
                    row["memory_error"] = mem["error"]
            rows.append(row)
    return {"bench": "runtime", "machine": machine(), "settings": dataclasses.asdict(spec), "rows": rows,
            "targets": targets(rows), "growth": growth(rows)}


def machine() -> dict:
    import onnxruntime
    import trio

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpus": os.cpu_count(), "machine": platform.machine(), "processor": _cpu_name(),
            "python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "trio": trio.__version__, "loadavg_at_end": load}


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def targets(rows: list[dict]) -> dict:
    """Issue 7's targets, where the rows measure them."""
    by = {(r["experts"], r["engine"]): r for r in rows if "expert_steps_per_s" in r}
    out = {}
    if (1000, "batched") in by and (1000, "sharded") in by:
        ratio = by[(1000, "sharded")]["expert_steps_per_s"] / by[(1000, "batched")]["expert_steps_per_s"]
        out["sharded_vs_batched_at_1000"] = {"ratio": round(ratio, 3), "target": ">= 0.5", "met": ratio >= 0.5}
    act = {n: r["messages_per_s"] for (n, e), r in by.items() if e == "actors"}
    if act:
        n_best = max(act, key=act.get)
        out["actors_messages_per_s"] = {"best": round(act[n_best]), "at_n": n_best, "target": ">= 100000",
                                        "met": act[n_best] >= 100_000,
                                        "by_n": {str(n): round(v) for n, v in sorted(act.items())}}
    over = {}
    for (n, e), r in sorted(by.items()):
        if e == "ray" and (n, "sharded") in by:
            rounds = r.get("rounds") or 1
            sh = by[(n, "sharded")]["seconds_per_step"]
            over[str(n)] = {"ray_s_per_round": round(r["seconds_per_step"] / rounds, 5),
                            "sharded_s_per_round": round(sh / rounds, 5),
                            "difference_s_per_round": round((r["seconds_per_step"] - sh) / rounds, 5),
                            "ray_overhead_s_per_round": [r.get("ray_overhead_min_s_per_round"),
                                                         r.get("ray_overhead_s_per_round")]}
    if over:
        out["ray_round_overhead"] = over
    if (100_000, "sharded") in by:
        r = by[(100_000, "sharded")]
        out["sharded_step_at_100000"] = {"seconds": round(r["seconds_per_step"], 3), "target": "< 2 s",
                                         "met": r["seconds_per_step"] < 2.0}
        if "peak_mib" in r:
            out["sharded_memory_at_100000"] = {"peak_gib": round(r["peak_mib"] / 1024, 3), "target": "< 4 GiB",
                                               "met": r["peak_mib"] < 4096}
    return out


def growth(rows: list[dict]) -> dict:
    """How step time grows with N: the least-squares slope of log(seconds per step) against log(N),
    per engine and routing regime (1.0 = linear in N, 2.0 = quadratic), over N >= 1000 for the
    sparse regime (top-k over C candidates, random graphs) and N >= 100 for the others (where fixed
    per-step costs no longer dominate)."""
    out: dict = {}
    groups: dict = {}
    for r in rows:
        if "seconds_per_step" not in r:
            continue
        sparse = r.get("routing") == "random" or (r.get("routing") == "topk" and r.get("candidates", 0) > 0)
        if r["experts"] >= (1000 if sparse else 100):
            groups.setdefault((r["engine"], "sparse" if sparse else "dense"), []).append(r)
    for (engine, regime), rs in sorted(groups.items()):
        if len({r["experts"] for r in rs}) < 2:
            continue
        x = np.log([r["experts"] for r in rs])
        y = np.log([r["seconds_per_step"] for r in rs])
        slope = float(np.polyfit(x, y, 1)[0])
        out.setdefault(engine, {})[regime] = {"slope": round(slope, 2), "n": [int(min(np.exp(x).round())),
                                                                               int(max(np.exp(x).round()))]}
    return out


# ---- the figure --------------------------------------------------------------------------------------

def plot_runtime(report: dict, path: str | Path):
    from ..demo.figures import save_png, subplots

    rows = [r for r in report["rows"] if "expert_steps_per_s" in r]
    fig, axes = subplots(1, 3, figsize=(15, 4.4))
    styles = {"batched": ("tab:blue", "o", "batched engine (limit)"),
              "sharded": ("tab:green", "s", "sharded actor runtime (fast path)"),
              "actors": ("tab:red", "^", "per-expert actors"),
              "ray": ("tab:purple", "D", "sharded, shards as Ray actors")}
    for engine, (color, marker, label) in styles.items():
        rs = sorted((r for r in rows if r["engine"] == engine), key=lambda r: r["experts"])
        if not rs:
            continue
        n = [r["experts"] for r in rs]
        axes[0].plot(n, [r["expert_steps_per_s"] for r in rs], marker=marker, color=color, label=label)
        axes[1].plot(n, [r["seconds_per_step"] for r in rs], marker=marker, color=color, label=label)
        mem = [(r["experts"], r["peak_mib"]) for r in rs if (r.get("peak_mib") or 0) > 0]
        if mem:
            axes[2].plot(*zip(*mem), marker=marker, color=color, label=label)
    ns = sorted({r["experts"] for r in rows})
    if ns:
        sh = {r["experts"]: r["seconds_per_step"] for r in rows if r["engine"] == "sharded"}
        if sh:
            n0 = max(sh)
            axes[1].plot(ns, [sh[n0] * n / n0 for n in ns], ":", color="gray", label="linear in N (through the last point)")
    s = report.get("settings", {})
    if s.get("routing") == "topk" and s.get("candidates") and ns and min(ns) <= s.get("candidates_above", 0) < max(ns):
        for ax in axes:
            ax.axvline(s["candidates_above"], color="gray", lw=0.8, ls="--")
        axes[0].annotate(f"exact top-k (O(N^2)) | top-k over C = {s['candidates']} candidates (O(N C))",
                         (s["candidates_above"], 0.96), xycoords=("data", "axes fraction"), ha="center",
                         fontsize=7, color="dimgray")
    axes[0].set_ylabel("expert-steps / s")
    axes[1].set_ylabel("seconds per inner step")
    axes[2].set_ylabel("peak memory above baseline (MiB)")
    titles = ["throughput", f"step time ({s.get('rounds', '?')} rounds per step)", "memory"]
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("experts N")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    route = s.get("routing", "topk")
    where = (f"for N > {s.get('candidates_above')}" if s.get("candidates_above") else "(every N > C)")
    fig.suptitle(f"badger bench runtime: {route} routing, k = {s.get('k')}, candidates C = {s.get('candidates')} "
                 f"{where}; {report.get('machine', {}).get('cpus')} cores", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, path, dpi=110)


def markdown_table(report: dict) -> str:
    head = ("| N | engine | routing | s / step | expert-steps/s | % of limit (wall / CPU) | % of distinct-rows limit | "
            "messages/s | peak MiB | KiB / expert | max diff vs batched |\n" + "|---" * 11 + "|")
    lines = [head]
    for r in report["rows"]:
        route = r.get("routing", "?") + (f" k={r['k']}" if r.get("routing") == "topk" else "") + (
            f" C={r['candidates']}" if r.get("candidates") else "")
        if "expert_steps_per_s" not in r:
            why = r.get("skipped") or r.get("error", "")
            lines.append(f"| {r['experts']:,} | {r['engine']} | {route} | - | - | - | - | - | - | - | {why} |")
            continue
        mem = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-"
        per = f"{r['kib_per_expert']:.2f}" if r.get("kib_per_expert") is not None else "-"
        diff = f"{r['max_diff_vs_batched']:.1e}" if "max_diff_vs_batched" in r else "-"
        frac = (f"{100 * r['fraction_of_limit']:.0f}% / {100 * r['cpu_fraction_of_limit']:.0f}%"
                if "cpu_fraction_of_limit" in r else "-")
        rows = (f"{100 * r['fraction_of_rows_limit']:.0f}% / {100 * r['cpu_fraction_of_rows_limit']:.0f}%"
                if "cpu_fraction_of_rows_limit" in r else "-")
        lines.append(f"| {r['experts']:,} | {r['engine']} | {route} | {r['seconds_per_step']:.4g} | "
                     f"{r['expert_steps_per_s']:,.0f} | {frac} | {rows} | {r['messages_per_s']:,.0f} | {mem} | {per} | "
                     f"{diff} |")
    return "\n".join(lines)


def _worker(arg: str):
    job = json.loads(arg)
    spec = RuntimeBench(**job.pop("spec"))
    try:
        if job["job"] == "time":
            out = time_engines(spec, job["n"])
        else:
            out = memory_probe(spec, job["engine"], job["n"])
    finally:
        if "ray" in spec.engines:
            ray_cluster_stop()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1])

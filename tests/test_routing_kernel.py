"""The compiled sparse routing (routing_kernel.c, ``routing.route_listed_compiled``): the inboxes of
``routing.route`` over listed senders, to float rounding, and the sharded runtime that uses it."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from badger_runtime import routing
from badger_runtime.actors import shard
from badger_runtime.actors.sharded import ShardedAgent
from badger_runtime.config import RoutingConfig
from badger_runtime.engine import numpy_ops
from badger_runtime.evaluation import run_episodes
from badger_runtime.xp import NumpyOps

HAVE_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


def numpy_route(cfg, q, key, value, idx):
    return routing.route(NumpyOps(), cfg, q, key, value, routing.Neighbors(idx))[0]


def compiled(cfg, q, key, value, idx):
    out = np.full(q.shape[:2] + (value.shape[-1],), np.nan, np.float32)
    assert routing.route_listed_compiled(cfg, q, key, value, idx, out)
    return out


def problem(rng, B, N, C, Dk, Dm, width=40):
    heads = rng.standard_normal((B, N, width), dtype=np.float32)
    q = heads[..., 3:3 + Dk]  # a strided view, as the runtime's query heads
    key = rng.standard_normal((B, N, Dk), dtype=np.float32)
    value = rng.standard_normal((B, N, Dm), dtype=np.float32)
    return q, key, value, routing._draw_senders(rng, B, N, C)


def test_the_kernel_is_built_where_a_compiler_is_found():
    assert (routing.route_kernel() is not None) == HAVE_CC


needs_kernel = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: routing runs numpy's path, tested above")


@needs_kernel
@pytest.mark.parametrize("B,N,C,Dk,Dm,kind,k", [
    (1, 1000, 32, 8, 16, "topk", 8),  # the runtime's default (the unrolled path)
    (3, 60, 12, 8, 16, "topk", 4), (2, 40, 7, 5, 3, "topk", 8),  # k >= C: softmax over every listed sender
    (2, 40, 7, 5, 3, "random", 8), (1, 30, 1, 8, 16, "topk", 8), (2, 300, 64, 16, 32, "topk", 1)])
def test_the_kernel_computes_numpy_routing(B, N, C, Dk, Dm, kind, k):
    rng = np.random.default_rng(N + C)
    q, key, value, idx = problem(rng, B, N, C, Dk, Dm)
    cfg = RoutingConfig(kind=kind, k=k, candidates=C)
    np.testing.assert_allclose(compiled(cfg, q, key, value, idx), numpy_route(cfg, q, key, value, idx), atol=2e-6)


@needs_kernel
def test_ties_at_the_kth_score_keep_exactly_k_senders_the_earliest_listed_first():
    """Senders 1..4 carry the same key (equal scores) and different values; with k = 2 and sender 0
    scoring highest, the kept ones are 0 and the earliest listed of the tied: 1."""
    key = np.zeros((1, 6, 8), np.float32)
    key[0, 0] = 2.0
    key[0, 1:5] = 1.0
    value = np.arange(6 * 4, dtype=np.float32).reshape(1, 6, 4)
    q = np.ones((1, 1, 8), np.float32)
    idx = np.array([[[0, 1, 2, 3, 4, 5]]], np.int64)
    got = compiled(RoutingConfig(kind="topk", k=2), q, key, value, idx)
    s = np.array([2.0, 1.0]) * 8 / np.sqrt(8)
    w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    np.testing.assert_allclose(got[0, 0], w[0] * value[0, 0] + w[1] * value[0, 1], rtol=1e-6)
    # the same sender listed twice scores the same: both copies count, as in numpy
    idx = np.array([[[5, 0, 0, 1]]], np.int64)
    cfg = RoutingConfig(kind="topk", k=3)
    np.testing.assert_allclose(compiled(cfg, q, key, value, idx), numpy_route(cfg, q, key, value, idx), rtol=1e-6)


@needs_kernel
@pytest.mark.parametrize("C,Dm,k", [(32, 16, 8), (12, 16, 4), (64, 32, 5), (80, 16, 8), (32, 5, 8)])
def test_many_ties_keep_the_earliest_listed_of_the_tied(C, Dm, k):
    """Keys from a few values, so most receivers tie at their k-th score (the vector rank's fallback), and
    distinct senders: the kept are the k best, ties to the earliest listed (a stable sort)."""
    rng = np.random.default_rng(C + Dm)
    N, M = 200, 50
    key = rng.integers(-1, 2, (1, N, 8)).astype(np.float32)
    value = rng.standard_normal((1, N, Dm), dtype=np.float32)
    q = rng.integers(-1, 2, (1, M, 8)).astype(np.float32)
    idx = np.stack([rng.permutation(N)[:C] for _ in range(M)])[None].astype(np.int64)
    got = compiled(RoutingConfig(kind="topk", k=k), q, key, value, idx)
    for m in range(M):
        s = key[0, idx[0, m]] @ q[0, m] / np.sqrt(8)
        kept = np.argsort(-s, kind="stable")[:k]
        w = np.exp(s[kept] - s[kept].max())
        np.testing.assert_allclose(got[0, m], (w / w.sum()) @ value[0, idx[0, m, kept]], rtol=1e-5, atol=1e-6)


@needs_kernel
def test_nan_keys_rank_last_as_in_numpy_and_an_all_nan_list_gives_nan():
    rng = np.random.default_rng(3)
    q, key, value, idx = problem(rng, 1, 50, 10, 8, 16)
    key[0, idx[0, :, 0]] = np.nan  # every receiver's first listed sender is broken
    cfg = RoutingConfig(kind="topk", k=4)
    ref = numpy_route(cfg, q, key, value, idx)
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(compiled(cfg, q, key, value, idx), ref, atol=2e-6)
    key[:] = np.nan
    assert np.isnan(compiled(cfg, q, key, value, idx)).all() and np.isnan(numpy_route(cfg, q, key, value, idx)).all()


@needs_kernel
def test_a_listed_sender_outside_the_agent_is_an_error_not_a_read():
    rng = np.random.default_rng(4)
    q, key, value, idx = problem(rng, 1, 20, 4, 8, 16)
    for bad in (20, -1):
        idx2 = idx.copy()
        idx2[0, 7, 2] = bad
        with pytest.raises(IndexError, match="outside"):
            routing.route_listed_compiled(RoutingConfig(kind="topk", k=2), q, key, value, idx2,
                                          np.zeros((1, 20, 16), np.float32))


@needs_kernel
def test_what_the_kernel_does_not_take_is_left_to_numpy():
    rng = np.random.default_rng(5)
    q, key, value, idx = problem(rng, 1, 30, 6, 8, 16)
    out = np.zeros((1, 30, 16), np.float32)
    topk = RoutingConfig(kind="topk", k=2)
    for cfg, args in [(RoutingConfig(kind="homogeneous"), (q, key, value, idx)),
                      (dataclasses.replace(topk, ablation="cut"), (q, key, value, idx)),
                      (topk, (q.astype(np.float64), key, value, idx)),
                      (topk, (q, key[:, ::-1], value, idx)),  # not contiguous
                      (topk, (q, key, value, idx.astype(np.int32))),
                      (topk, (q, key, value, np.zeros((1, 30, 1025), np.int64)))]:
        assert not routing.route_listed_compiled(cfg, *args, out)
    assert not out.any()


def test_the_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("BADGER_KERNELS", "0")
    monkeypatch.setattr(routing, "_KERNEL", None)
    assert routing.route_kernel() is None
    rng = np.random.default_rng(6)
    q, key, value, idx = problem(rng, 1, 30, 6, 8, 16)
    assert not routing.route_listed_compiled(RoutingConfig(kind="topk", k=2), q, key, value, idx,
                                             np.zeros((1, 30, 16), np.float32))


def test_the_sharded_runtime_routes_large_shards_with_the_kernel_and_computes_the_same_rollout(tiny_policy,
                                                                                                monkeypatch):
    """compiled_routing=None (the default): the kernel once a shard holds shard.ROUTE_KERNEL_MIN_EXPERTS experts
    (never for a topology it does not take); the rollout equals numpy routing's to 1e-5."""
    from badger_runtime.policy_card import load_policy

    pol = load_policy(tiny_policy)
    a = pol.agent
    agent = dataclasses.replace(a, routing=dataclasses.replace(a.routing, kind="topk", k=3, candidates=6),
                                agreement=dataclasses.replace(a.agreement, rule="fixed", rounds=2))
    kw = {"dims": 3, "experts": 40, "episodes": 3, "seed": 2, "steps": 5}
    ref = run_episodes(numpy_ops(), pol, agent, pol.task, runtime="sharded", shards=2, **kw)
    ran = []
    real = routing.route_listed_compiled
    monkeypatch.setattr(routing, "route_listed_compiled", lambda *a: ran.append(real(*a)) or ran[-1])
    got = run_episodes(numpy_ops(), pol, agent, pol.task, runtime="sharded", shards=2, compiled_routing=True, **kw)
    assert ran == ([True] * 20 if HAVE_CC else [])  # every shard's every round (5 steps x 2 rounds x 2 shards)
    assert np.abs(ref.outputs - got.outputs).max() <= 1e-5
    engine = run_episodes(numpy_ops(), pol, agent, pol.task, **kw)
    assert np.abs(engine.outputs - got.outputs).max() <= 1e-5

    from badger_runtime.engine import Agent
    from badger_runtime.episodes import sample_batches

    def make(cfg, **k):
        _, ep, w = next(sample_batches(pol.task, cfg, dims=3, experts=40, episodes=1, seed=0, steps=4))
        return ShardedAgent(pol, cfg, ep.interface, Agent(pol, cfg).start(ep.interface, w).wiring, shards=2, **k)

    assert not make(agent).compiled_routing  # 20 experts a shard
    monkeypatch.setattr(shard, "ROUTE_KERNEL_MIN_EXPERTS", 20)
    assert make(agent).compiled_routing == HAVE_CC
    assert not make(agent, compiled_routing=False).compiled_routing
    dense = dataclasses.replace(agent, routing=dataclasses.replace(agent.routing, candidates=0))
    assert not make(dense, compiled_routing=True).compiled_routing  # a dense topology: numpy's routing


def test_the_kernel_routes_through_hot_adds_and_removals_as_numpy_does(tiny_policy, monkeypatch):
    """A membership change re-cuts the shards (new cores, a new sender list): with the kernel forced on,
    the rollout across a hot-add of clones and a removal equals the engine's to 1e-5."""
    from badger_runtime.episodes import schedule
    from badger_runtime.policy_card import load_policy

    pol = load_policy(tiny_policy)
    a = pol.agent
    agent = dataclasses.replace(a, routing=dataclasses.replace(a.routing, kind="topk", k=3, candidates=6))
    ran = []
    real = routing.route_listed_compiled
    monkeypatch.setattr(routing, "route_listed_compiled", lambda *args: ran.append(real(*args)) or ran[-1])
    kw = {"dims": 3, "experts": 30, "episodes": 2, "seed": 5, "steps": 8,
          "changes": schedule(add_at=2, add=12, init="clone", remove_at=5, remove=20, allow_harmful=True)}
    ref = run_episodes(numpy_ops(), pol, agent, pol.task, **kw)
    got = run_episodes(numpy_ops(), pol, agent, pol.task, runtime="sharded", shards=2, compiled_routing=True, **kw)
    assert np.abs(ref.outputs - got.outputs).max() <= 1e-5
    assert ran == ([True] * 16 if HAVE_CC else [])  # 8 steps x 1 round x 2 shards, before and after each change


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 3), N=st.integers(1, 70), C=st.integers(1, 80), Dk=st.sampled_from([1, 3, 8, 16]),
       Dm=st.one_of(st.integers(1, 20), st.sampled_from([32, 48])), k=st.integers(1, 12),
       kind=st.sampled_from(["topk", "dense", "random"]), repeats=st.booleans(), seed=st.integers(0, 2**16))
def test_the_kernel_computes_numpy_routing_for_any_shape(B, N, C, Dk, Dm, k, kind, repeats, seed):
    """Any batch, agent size, list length (senders listed more than once too), key and message width, k and
    routing kind: the kernel's inboxes are numpy's (ties aside: scores drawn from a continuous law)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, N, Dk + 5), dtype=np.float32)[..., 2:2 + Dk]
    key = rng.standard_normal((B, N, Dk), dtype=np.float32)
    value = rng.standard_normal((B, N, Dm), dtype=np.float32)
    idx = rng.integers(0, N, (B, N, C)) if repeats else np.sort(rng.random((B, N, N)).argsort(-1)[..., :C], -1)
    cfg = RoutingConfig(kind=kind, k=k, candidates=C)
    np.testing.assert_allclose(compiled(cfg, q, key, value, idx.astype(np.int64)),
                               numpy_route(cfg, q, key, value, idx.astype(np.int64)), atol=3e-6, rtol=1e-5)

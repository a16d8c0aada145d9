"""The actor runtime's fast path (actors/sharded.py): the same rollout as the batched engine and as
the per-expert actors, whatever the number of shards, tiles and policy chunks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import trio

from badger_runtime.actors.runtime import ActorAgent
from badger_runtime.actors.sharded import ShardedAgent, shard_bounds
from badger_runtime.engine import Agent, InputError, numpy_ops
from badger_runtime.episodes import Driver, sample_batches
from badger_runtime.evaluation import run_episodes
from badger_runtime.policy_card import load_policy
from badger_runtime.rollout import rollout
from badger_runtime.routing import in_degrees

ROUTINGS = [("dense", {}), ("topk", {"k": 2}), ("topk", {"k": 2, "candidates": 3}), ("hardwired", {}),
            ("homogeneous", {}), ("random", {"degree": 2})]
FEEDBACK = {"dense": "per_dim", "topk": "scalar", "hardwired": "per_dim", "homogeneous": "one_expert",
            "random": "one_expert"}


@pytest.fixture(scope="module")
def pol(tiny_policy):
    return load_policy(tiny_policy)


def cfg_with(pol, kind="dense", rule="fixed", rounds=1, eps=1e-3, quorum=0.5, **routing):
    a = pol.agent
    return dataclasses.replace(a, routing=dataclasses.replace(a.routing, kind=kind, **routing),
                               agreement=dataclasses.replace(a.agreement, rule=rule, rounds=rounds, eps=eps,
                                                             quorum=quorum))


def run_sharded_episodes(pol, agent, task, **kw):
    return run_episodes(numpy_ops(), pol, agent, task, runtime="sharded", **kw)


def run_actor_episodes(pol, agent, task, **kw):
    return run_episodes(numpy_ops(), pol, agent, task, runtime="actors", **kw)


def engine_episode(pol, agent, batch, n, d, seed, steps=8):
    """A seeded batch of episodes and engine.Agent on it (the draws of Agent.reset)."""
    _, ep, w = next(sample_batches(pol.task, agent, dims=d, experts=n, episodes=batch, seed=seed, steps=steps))
    return ep, Agent(pol, agent).start(ep.interface, w)


# -- parity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,extra", ROUTINGS, ids=[k + ("-C" if "candidates" in e else "") for k, e in ROUTINGS])
def test_parity_with_batched_engine(pol, kind, extra):
    """Fixed rounds 1..3: the sharded runtime's guesses equal evaluation.run_episodes' (same seed) to
    1e-5 for every routing option, with shards, tiles and policy chunks that cut the experts
    unevenly (7 experts: 3 shards, tiles of 2 receivers, onnxruntime calls of 5 rows)."""
    task = dataclasses.replace(pol.task, feedback=FEEDBACK[kind])
    for rounds in (1, 2, 3):
        agent = cfg_with(pol, kind, rounds=rounds, **extra)
        kw = {"dims": 3, "experts": 7, "episodes": 4, "seed": 20 + rounds, "steps": 4}
        a = run_episodes(numpy_ops(), pol, agent, task, **kw)
        b = run_sharded_episodes(pol, agent, task, shards=3, tile=2, policy_chunk=5, **kw)
        assert np.abs(a.outputs - b.outputs).max() <= 1e-5, (kind, rounds)
        assert np.array_equal(a.rounds, b.rounds)
        assert b.runtime['policy_rounds'] == 4 * rounds  # one gathered policy evaluation per round
        assert b.runtime['policy_calls'] == 4 * rounds * int(np.ceil(4 * 7 / 5))  # ... in calls of <= 5 rows


@pytest.mark.parametrize("rule,eps,quorum", [("convergence", 0.2, 0.5), ("quorum", 1e-3, 0.6)])
def test_convergence_and_quorum_match_the_batched_engine(pol, rule, eps, quorum):
    """The membrane applies agreement.still_talking to the shards' votes and changes; episodes that
    agreed keep their state while the others talk on, as in rollout.agent_step."""
    agent = cfg_with(pol, "dense", rule=rule, rounds=4, eps=eps, quorum=quorum)
    kw = {"dims": 3, "experts": 6, "episodes": 6, "seed": 2, "steps": 5}
    a = run_episodes(numpy_ops(), pol, agent, pol.task, **kw)
    for shards in (1, 4):
        b = run_sharded_episodes(pol, agent, pol.task, shards=shards, **kw)
        assert np.array_equal(a.rounds, b.rounds)
        assert np.abs(a.outputs - b.outputs).max() <= 1e-5
        assert b.rounds.min() >= 1 and b.rounds.max() <= 4
        assert len(np.unique(b.rounds)) > 1  # the rule decided: episodes of one batch stop at different rounds


def test_convergence_can_stop_after_one_round(pol):
    kw = {"dims": 3, "experts": 6, "episodes": 6, "seed": 2, "steps": 5}
    c = run_sharded_episodes(pol, cfg_with(pol, "dense", rule="convergence", rounds=5, eps=10.0), pol.task,
                             shards=3, **kw)
    assert (c.rounds == 1).all()


@pytest.mark.parametrize("kind,extra", [("topk", {"k": 3}), ("random", {"degree": 3}), ("hardwired", {})])
def test_shard_count_does_not_change_the_rollout(pol, kind, extra):
    agent = cfg_with(pol, kind, rounds=2, **extra)
    kw = {"dims": 2, "experts": 9, "episodes": 3, "seed": 4, "steps": 4}
    ref = run_sharded_episodes(pol, agent, pol.task, shards=1, tile=4096, policy_chunk=0, **kw)
    for shards, tile, chunk, enc in [(2, 3, 4, False), (3, 1, 1, True), (9, 4096, 0, False), (50, 2, 7, True)]:
        b = run_sharded_episodes(pol, agent, pol.task, shards=shards, tile=tile, policy_chunk=chunk, encode=enc, **kw)
        assert np.abs(ref.outputs - b.outputs).max() <= 1e-6, (shards, tile, chunk, enc)
        assert b.runtime['delivered'] == ref.runtime['delivered']
        if enc:
            assert b.runtime['block_bytes'] > 0


def test_same_rollout_as_the_per_expert_actors(pol):
    """Both modes of the actor runtime compute the same rollout, and deliver the same messages."""
    agent = cfg_with(pol, "topk", rounds=3, k=2, candidates=3)
    task = dataclasses.replace(pol.task, feedback="per_dim")
    kw = {"dims": 3, "experts": 8, "episodes": 2, "seed": 9, "steps": 4}
    a = run_actor_episodes(pol, agent, task, **kw)
    b = run_sharded_episodes(pol, agent, task, shards=3, **kw)
    assert np.abs(a.outputs - b.outputs).max() <= 1e-5
    assert a.runtime['delivered'] == b.runtime['delivered'] == 2 * 4 * 3 * 8 * 4  # episodes x steps x rounds x N x (C+1)


@pytest.mark.parametrize("route_threads", [False, True])
def test_one_episode_step_by_step_matches_engine_agent(pol, route_threads):
    """The stepwise form beside engine.Agent (as the bench runs it), on a sparse graph larger than a tile;
    with ``route_threads`` each shard routes in a worker thread, concurrently with the others."""
    agent = cfg_with(pol, "topk", rounds=2, k=4, candidates=6)
    ep, eng = engine_episode(pol, agent, 1, 300, 3, seed=1)
    sh = ShardedAgent(pol, agent, eng.interface, eng.wiring, shards=3, tile=64, policy_chunk=128, encode=True,
                      route_threads=route_threads)
    outs = []

    async def main():
        async with sh.running():
            driver = Driver(numpy_ops(), ep, 4)
            while not driver.finished:
                obs = driver.observation()
                ref, _ = eng.step(obs)
                guess, info = await sh.step(obs)
                driver.record(guess, info)
                outs.append(np.abs(ref - guess).max())
                assert info.messages == 300 * 7 * 2  # (C + 1 self-loop) senders per receiver and round
                assert info.rounds.tolist() == [2.0]
        st = sh.state()
        assert np.abs(st.h - eng.state.h).max() <= 1e-5

    trio.run(main)
    assert max(outs) <= 1e-5
    assert sh.batcher.rounds == 8 and sh.batcher.calls == 8 * 3  # 300 rows in calls of <= 128
    # double-buffered state and in-place inboxes: after its first round a shard hands the batcher its
    # rows without copies (3 shards x (8 inboxes + 7 states: the first round's state is its own copy))
    assert sh.batcher.copies_skipped == 3 * (8 + 7)


def test_an_engine_snapshot_continues_in_the_sharded_runtime(pol):
    """``ShardedAgent.from_agent`` of a restored snapshot (what a served session checkpoints) steps on as the engine
    agent that made the snapshot does (1e-5), keeps its step count, draws the same newcomers, and leaves the agent
    it was made from as it was."""
    agent = cfg_with(pol, "topk", rounds=2, k=4, candidates=6)
    ep, eng = engine_episode(pol, agent, 1, 40, 3, seed=2, steps=8)
    driver = Driver(numpy_ops(), ep, 8)
    for _ in range(3):
        out, info = eng.step(driver.observation())
        driver.record(out, info)
    restored = Agent(pol, agent).restore(eng.snapshot())
    before = restored.snapshot()
    sh = ShardedAgent.from_agent(restored, shards=3, tile=16)
    assert sh.t == eng.t == 3
    diffs = []

    async def main():
        async with sh.running():
            for t in range(5):
                if t == 2:
                    assert sh.add_experts(2, init="fresh") == eng.add_experts(2, init="fresh")
                obs = driver.observation()
                ref, info = eng.step(obs)
                got, _ = await sh.step(obs)
                driver.record(ref, info)
                diffs.append(float(np.abs(ref - got).max()))

    trio.run(main)
    assert max(diffs) <= 1e-5 and sh.t == eng.t == 8
    after = restored.snapshot()
    assert all(np.array_equal(np.asarray(before[k]), np.asarray(after[k])) for k in ("h", "heads", "noise", "t"))
    with pytest.raises(RuntimeError, match="reset"):
        ShardedAgent.from_agent(Agent(pol, agent))


def test_membrane_refuses_bad_use(pol):
    agent = cfg_with(pol, "dense", rounds=1)
    eng = Agent(pol, agent).reset(2, 5, 2, seed=0)
    sh = ShardedAgent(pol, agent, eng.interface, eng.wiring, shards=2)

    async def main():
        with pytest.raises(RuntimeError, match="not running"):
            await sh.step(np.zeros((2, eng.slots)))
        async with sh.running():
            with pytest.raises(InputError):
                await sh.step(np.zeros((2, eng.slots + 1)))
            with pytest.raises(InputError):
                await sh.step(np.full((2, eng.slots), np.nan))
            with pytest.raises(InputError):
                await sh.step(np.zeros((2, eng.slots)), rounds=0)
            out, _ = await sh.step(np.zeros((2, eng.slots)))  # still fine after refusals
            assert out.shape == (2, 2)

    trio.run(main)


def test_shards_hear_only_the_shards_they_need(pol):
    """Hardwired layers: the input layer hears no one but itself, so its shard gets no blocks."""
    agent = cfg_with(pol, "hardwired", rounds=2, self_loops=False)
    eng = Agent(pol, agent).reset(1, 9, 2, seed=0)
    sh = ShardedAgent(pol, agent, eng.interface, eng.wiring, shards=3)  # one shard per layer
    assert [s.core.needs for s in sh._shards] == [[], [0, 1], [1]]

    async def main():
        async with sh.running():
            obs = np.zeros((1, eng.slots), np.float32)
            for _ in range(3):
                ref, _ = eng.step(obs)
                out, info = await sh.step(obs)
                assert np.abs(ref - out).max() <= 1e-5
                assert info.messages == 2 * int(eng.wiring.route_mask.sum())

    trio.run(main)
    assert sh.counters.blocks == 3 * 2 * 2  # steps x rounds x (0 -> 1, 1 -> 2; a shard keeps its own)


def test_helpers():
    assert shard_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_bounds(2, 5) == [(0, 1), (1, 2)]
    assert in_degrees(None, 4, 1).tolist() == [[4, 4, 4, 4]]
    mask = np.array([[[True, False], [True, True]]])
    assert in_degrees(mask, 2, 1).tolist() == [[1, 2]]


def test_actor_agent_and_sharded_agent_step_the_same_episode(pol):
    """The bench's setting: one episode, ActorAgent and ShardedAgent built from engine.Agent's wiring."""
    agent = cfg_with(pol, "topk", rounds=2, k=3)
    ep, eng = engine_episode(pol, agent, 1, 12, 2, seed=3)
    outs = {}

    async def main():
        from badger_runtime.episodes import adrive

        for name, a in (("actors", ActorAgent(pol, agent, eng.interface, eng.wiring)),
                        ("sharded", ShardedAgent(pol, agent, eng.interface, eng.wiring, shards=5))):
            async with a.running():
                outs[name] = (await adrive(a, Driver(numpy_ops(), ep, 3))).outputs[:, 0]

    trio.run(main)
    ref = rollout(numpy_ops(), pol, agent, ep, eng.wiring, steps=3).outputs[:, 0]
    assert np.abs(outs["actors"] - ref).max() <= 1e-5
    assert np.abs(outs["sharded"] - ref).max() <= 1e-5


@pytest.mark.parametrize("feedback", ["per_dim", "one_expert"])
def test_competitive_heads_are_the_same_in_every_runtime(tiny_competitive_policy, feedback):
    """Competitive read heads normalise over every expert: the membrane computes them for the
    shards and for the per-expert actors; the rollout equals the batched engine's, also across a
    hot-add (sharded: the engine's growing rule)."""
    from badger_runtime.episodes import schedule

    pol = load_policy(tiny_competitive_policy)
    assert pol.spec.competitive_heads == 1
    task = dataclasses.replace(pol.task, feedback=feedback)
    kw = {"dims": 3, "experts": 7, "episodes": 3, "seed": 5, "steps": 5}
    ref = run_episodes(numpy_ops(), pol, pol.agent, task, **kw)
    sh = run_sharded_episodes(pol, pol.agent, task, shards=3, tile=2, **kw)
    act = run_actor_episodes(pol, pol.agent, task, **kw)
    assert np.abs(ref.outputs - sh.outputs).max() <= 1e-5
    assert np.abs(ref.outputs - act.outputs).max() <= 1e-5
    grown = schedule(add_at=2, add=4, init="clone")
    a = run_episodes(numpy_ops(), pol, pol.agent, task, changes=grown, **kw)
    b = run_sharded_episodes(pol, pol.agent, task, shards=2, changes=grown, **kw)
    assert np.abs(a.outputs - b.outputs).max() <= 1e-5
    c = run_actor_episodes(pol, pol.agent, task, changes=grown, **kw)
    assert np.isfinite(c.outputs).all() and c.runtime["added"] == 3 * 4


@pytest.mark.parametrize("runtime", ["engine", "sharded"])
def test_a_membership_change_leaves_every_batch_before_it_untouched(runtime):
    """An evaluation with a hot-add and one without face the same episodes and wirings in every
    batch (growing draws from its own stream): up to the change their outputs are identical, also
    in the batches after the first (once, growing drew from the wiring stream, so from the second
    batch on the two runs had different wirings)."""
    from badger_runtime.episodes import schedule

    pol = load_policy("guessing-converge-v2")
    kw = {"dims": 3, "experts": 4, "episodes": 6, "seed": 2, "steps": 6, "chunk": 2, "runtime": runtime}
    same = run_episodes(numpy_ops(), pol, pol.agent, pol.task, **kw)
    grown = run_episodes(numpy_ops(), pol, pol.agent, pol.task, changes=schedule(add_at=3, add=4, init="fresh"), **kw)
    assert np.array_equal(same.outputs[:3], grown.outputs[:3])  # [T, E, d]: all 6 episodes, 3 batches
    assert not np.array_equal(same.outputs[3:], grown.outputs[3:])  # the change did something


def test_clones_in_a_grid_membrane_copy_the_same_cell_in_every_runtime():
    """In the few-shot grid (one expert per (class, feature) cell) a clone copies the expert of the
    cell it joins at, in the engine, the sharded runtime and the per-expert actors alike: the three
    compute the same outputs across the hot-add (each draws its sources from its own stream, so a
    random source would make them differ)."""
    from badger_runtime.episodes import schedule
    from badger_runtime.tasks.fewshot import FewShotTask

    pytest.importorskip("sklearn")
    pol = load_policy("fewshot-v2")
    task = dataclasses.replace(FewShotTask.evaluation_config(pol.task), dataset="iris", steps=8,
                               baselines="none").validate()
    kw = dict(dims=2, experts=8, episodes=2, seed=0, steps=8, changes=schedule(3, 8, "clone"))  # N = C x F = 2 x 4
    ref = run_episodes(numpy_ops(), pol, pol.agent, task, **kw)
    for runtime in ("sharded", "actors"):
        other = run_episodes(numpy_ops(), pol, pol.agent, task, runtime=runtime, **kw)
        assert np.abs(ref.outputs - other.outputs).max() <= 1e-5, runtime


def test_routing_threads_follow_the_shard_size(pol, monkeypatch):
    """route_threads=None (the default): worker threads once a shard routes ROUTE_THREAD_MIN_ROWS rows
    and there is more than one shard to overlap; True / False force it."""
    from badger_runtime.actors import sharded

    agent = cfg_with(pol, "topk", rounds=1, k=4, candidates=6)
    _, eng = engine_episode(pol, agent, 1, 300, 3, seed=1)
    make = lambda **kw: ShardedAgent(pol, agent, eng.interface, eng.wiring, **kw)  # noqa: E731
    assert not make(shards=3).route_threads  # 100 rows a shard
    monkeypatch.setattr(sharded, "ROUTE_THREAD_MIN_ROWS", 100)
    assert make(shards=3).route_threads and not make(shards=1).route_threads
    assert not make(shards=3, route_threads=False).route_threads and make(shards=1, route_threads=True).route_threads

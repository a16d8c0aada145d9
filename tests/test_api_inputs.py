"""The library API with bad arguments: a clear error of the project's own (InputError, PolicyError, RuntimeError
for calls out of order) and the agent as it was, in every runtime. (Each case here was a raw numpy / onnxruntime
traceback, a silently different meaning, or a corrupted agent before.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import trio

from badger_runtime import Agent, InputError, PolicyError, load_policy
from badger_runtime.engine import numpy_ops
from badger_runtime.evaluation import run_episodes


@pytest.fixture(scope="module")
def pol():
    return load_policy("guessing-converge-v2")


def fresh(pol, seed=0):
    return Agent(pol).reset(batch=1, experts=3, dims=3, seed=seed)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (np.array_equal(np.asarray(a[k]), np.asarray(b[k])) if isinstance(a[k], np.ndarray) else a[k] == b[k])
        for k in a if k != "route_neighbors")


def step(agent, seed=1):
    obs = np.random.default_rng(seed).uniform(-1, 1, (1, agent.slots)).astype(np.float32)
    return agent.step(obs)[0]


def _drop(key):
    return lambda s: {k: v for k, v in s.items() if k != key}


def _with(**kw):
    return lambda s: {**s, **kw}


@pytest.mark.parametrize("damage, says", [
    (_drop("heads"), "KeyError"),  # left the agent half restored, unable to step
    (lambda s: {**s, "h": np.full_like(s["h"], np.nan)}, "NaN"),  # stepped to NaN outputs
    (_with(t=-1000), "snapshot t must be an int >= 0"),  # ran an episodic policy 1,020 steps without a horizon error
    (lambda s: {**s, "heads": s["heads"][..., :-1]}, "heads has shape"),
    (lambda s: {**s, "noise": s["noise"][:, :2]}, "noise has shape"),  # broke the next add_experts
    (lambda s: {**s, "h": np.concatenate([s["h"], s["h"]])}, "heads has shape"),  # another batch
    (lambda s: {**s, "parts": [["observation", 3], ["feedback", 9]]}, "do not add up"),
    (_with(visibility={"kind": "nope"}), "not a snapshot"),
    (_with(rng="garbage"), "not a snapshot"),
    (lambda s: "not a dict", "a snapshot is a dict"),
])
def test_a_refused_snapshot_leaves_the_agent_as_it_was(pol, damage, says):
    agent, twin = fresh(pol), fresh(pol)
    step(agent), step(twin)
    before = agent.snapshot()
    with pytest.raises(InputError, match=says):
        agent.restore(damage(fresh(pol, seed=5).snapshot()))
    assert same(agent.snapshot(), before)
    assert np.array_equal(step(agent, 2), step(twin, 2))


def test_a_snapshot_of_another_policy_is_refused(pol):
    other = Agent(load_policy("scale-v4")).reset(batch=1, experts=4, dims=8, seed=0)
    agent = fresh(pol)
    with pytest.raises(InputError, match="has shape"):  # (it was accepted, and the next step failed in onnxruntime)
        agent.restore(other.snapshot())
    step(agent)


@pytest.mark.parametrize("rounds", [0, -1, 2.9, "2", True, 10**5])
def test_rounds_are_an_int_in_range_in_every_runtime(pol, rounds):
    """The actor runtimes truncated 2.9 to 2 and parsed '2'; 10^5 rounds blocked the event loop and then left an
    actor agent unable to step; run_episodes(rounds=0) reported an agent that never ran its policy."""
    agent = fresh(pol)
    with pytest.raises(InputError, match="rounds must be an int in 1..64"):
        agent.step(np.zeros((1, agent.slots), np.float32), rounds=rounds)
    assert agent.t == 0
    with pytest.raises(InputError, match="rounds must be an int"):
        run_episodes(numpy_ops(), pol, pol.agent, pol.task, dims=3, experts=3, episodes=2, seed=0, rounds=rounds)

    from badger_runtime.actors.sharded import ShardedAgent

    sh = ShardedAgent(pol, pol.agent, agent.interface, agent.wiring, shards=1)

    async def main():
        async with sh.running():
            with pytest.raises(InputError, match="rounds must be an int"):
                await sh.step(np.zeros((1, agent.slots), np.float32), rounds=rounds)
            await sh.step(np.zeros((1, agent.slots), np.float32))  # still steps

    trio.run(main)


@pytest.mark.parametrize("bad", ["N", -1])
def test_route_neighbors_outside_the_agent_are_refused(pol, bad):
    """A snapshot's sparse routing may name only experts 0..N-1: an index of N (or -1) is refused and the agent
    steps on as it was (an index of N was accepted, and the next step failed with an IndexError)."""
    routing = dataclasses.replace(pol.agent.routing, kind="topk", candidates=2, k=1)
    agent = Agent(pol, dataclasses.replace(pol.agent, routing=routing).validate()).reset(batch=1, experts=4, dims=3,
                                                                                         seed=0)
    step(agent)
    snap, before = agent.snapshot(), agent.snapshot()
    idx = np.array(snap["route_neighbors"])
    idx[0, 0, 0] = 4 if bad == "N" else -1
    with pytest.raises(InputError, match="route_neighbors"):
        agent.restore({**snap, "route_neighbors": idx})
    assert same(agent.snapshot(), before) and np.array_equal(agent.snapshot()["route_neighbors"],
                                                             before["route_neighbors"])
    step(agent)


@pytest.mark.parametrize("kind", ["complex", "bool", "str"])
def test_inputs_are_real_numbers_not_cast(pol, kind):
    """Complex values (numpy dropped the imaginary part with only a warning), booleans (read as 1 and 0) and strings
    (parsed: '0.5' was 0.5) are refused as inputs with an InputError, in the batched engine and the sharded runtime,
    and the agent is as it was; Python ints and object arrays of numbers are still numbers."""
    agent = fresh(pol)
    good = np.full((1, agent.slots), 0.5, np.float32)
    bad = {"complex": good + 1j, "bool": good > 0, "str": good.astype(str)}[kind]
    before = agent.snapshot()
    with pytest.raises(InputError, match="must be real numbers"):
        agent.step(bad)
    with pytest.raises(InputError, match="must be real numbers"):
        agent.observation({"observation": bad[:, :3], "feedback": good[:, :3]})
    assert same(agent.snapshot(), before)
    agent.step(good.astype(object))
    agent.step(np.ones((1, agent.slots), np.int64))

    from badger_runtime.actors.sharded import ShardedAgent

    sh = ShardedAgent(pol, pol.agent, agent.interface, agent.wiring, shards=1)

    async def main():
        async with sh.running():
            with pytest.raises(InputError, match="must be real numbers"):
                await sh.step(bad)
            await sh.step(good)  # still steps

    trio.run(main)


@pytest.mark.parametrize("kw, says", [({"episodes": 0}, "episodes must be"), ({"steps": 0}, "steps must be"),
                                      ({"dims": 0}, "dims must be"), ({"experts": 1.5}, "experts must be")])
def test_an_evaluation_refuses_what_it_cannot_run(pol, kw, says):
    args = dict(dims=3, experts=3, episodes=2, seed=0) | kw
    with pytest.raises(InputError, match=says):
        run_episodes(numpy_ops(), pol, pol.agent, pol.task, **args)


@pytest.mark.parametrize("indices", [np.array([True, False, False]), {0: "x"}, "01", [True]])
def test_expert_indices_are_integers(pol, indices):
    """A boolean mask removed experts 0 and 1 (True and False as indices); a dict removed its keys."""
    agent = fresh(pol)
    with pytest.raises(InputError, match="must be integers"):
        agent.remove_experts(indices)
    assert agent.n_experts == 3


@pytest.mark.parametrize("kw, says", [({"n": 1.5}, "number of experts to add must be an int"),
                                      ({"n": True}, "must be an int"),
                                      ({"n": 1, "init": "clone", "source": 1.9}, "source .* must be an int"),
                                      ({"n": 1, "init": "clone", "source": 0, "sources": np.zeros(1, np.int64)},
                                       "not both")])
def test_growth_arguments_mean_what_they_say(pol, kw, says):
    agent = fresh(pol)
    before = agent.snapshot()
    with pytest.raises(InputError, match=says):
        agent.add_experts(**kw)
    assert same(agent.snapshot(), before)


def test_calls_before_reset_say_so(pol):
    agent = Agent(pol)
    for call in (lambda: agent.n_experts, agent.snapshot, lambda: agent.observation({}),
                 lambda: agent.add_experts(1), lambda: agent.remove_experts([0])):
        with pytest.raises(RuntimeError, match=r"start\(\) or reset\(\) the agent"):
            call()


@pytest.mark.parametrize("kw", [{"experts": 1.5}, {"experts": True}, {"dims": 0}, {"seed": -1}, {"batch": "2"},
                                {"experts": 1 << 30}])
def test_reset_takes_int_counts(pol, kw):
    with pytest.raises(InputError, match="must be an int"):
        Agent(pol).reset(**({"batch": 1, "experts": 3, "dims": 3, "seed": 0} | kw))


@pytest.mark.parametrize("path", [None, 3, ""])
def test_load_policy_names_what_it_takes(path):
    with pytest.raises(PolicyError, match="a path or a shipped policy's name"):
        load_policy(path)


def test_a_deeply_nested_card_is_refused(tmp_path):
    import shutil

    from badger_runtime.policy_card import resolve_policy

    onnx = resolve_policy("guessing-converge-v2")
    shutil.copy(onnx, tmp_path / "p.onnx")
    (tmp_path / "p.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PolicyError, match="not valid JSON"):
        load_policy(tmp_path / "p.onnx")


def test_an_agent_config_of_another_policy_is_refused(pol):
    """Agent(policy, other_policy.agent) was accepted and failed inside its first step."""
    from badger_runtime.config import ConfigError

    with pytest.raises(ConfigError, match="not this policy's"):
        Agent(pol, load_policy("scale-v4").agent)

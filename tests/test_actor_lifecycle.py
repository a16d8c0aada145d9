"""The rules of a step and of membership in both actor runtimes, at their edges: a step cancelled
by its caller or cut by ``close()``, membership changed before the agent runs or while a step is
in flight, and an agent used after it was closed (actors/lifecycle.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import trio

from badger_runtime.actors.lifecycle import AgentClosed
from badger_runtime.actors.runtime import ActorAgent, StepTimeout
from badger_runtime.actors.sharded import ShardedAgent
from badger_runtime.actors.supervisor import Supervision
from badger_runtime.engine import numpy_ops
from badger_runtime.episodes import Driver, sample_batches
from badger_runtime.policy_card import load_policy


@pytest.fixture(scope="module")
def pol(tiny_policy):
    return load_policy(tiny_policy)


def cfg_with(pol, rule="fixed", rounds=3):
    a = pol.agent
    return dataclasses.replace(a, agreement=dataclasses.replace(a.agreement, rule=rule, rounds=rounds, eps=1e-3))


def make(pol, runtime, rule="fixed", n=6, steps=6, **kw):
    """(agent, driver) of one batch: an ActorAgent (1 episode) or a ShardedAgent (2 episodes, 3 shards)."""
    agent = cfg_with(pol, rule)
    episodes = 1 if runtime == "actors" else 2
    _, ep, w = next(sample_batches(pol.task, agent, dims=3, experts=n, episodes=episodes, seed=0, steps=steps))
    a = (ActorAgent(pol, agent, ep.interface, w, **kw) if runtime == "actors"
         else ShardedAgent(pol, agent, ep.interface, w, shards=3, **kw))
    return a, Driver(numpy_ops(), ep, steps)


async def cancelled_step(a, obs, at: int):
    """Start a step and cancel it from outside at its ``at``-th policy call (0: before any): deterministic, where
    counting scheduler passes depended on trio's (randomised) order."""
    calls, policy_step = [], a.batcher.step
    with trio.CancelScope() as cs:
        async def counted(*args, **kw):
            calls.append(1)
            if len(calls) == at:
                cs.cancel()
            return await policy_step(*args, **kw)

        a.batcher.step = counted
        if not at:
            cs.cancel()
        try:
            await a.step(obs)
        finally:
            a.batcher.step = policy_step
    return cs.cancelled_caught


@pytest.mark.parametrize("runtime", ["actors", "sharded"])
@pytest.mark.parametrize("rule", ["fixed", "quorum"])
@pytest.mark.parametrize("at", [0, 1, 3])
def test_a_step_that_did_not_finish_is_never_followed_by_another(pol, runtime, rule, at):
    """A cancelled step leaves experts mid-step with its messages in flight: stepping on mixed the two
    steps' traffic (stale outputs, wrong numbers, or a hang). The agent refuses instead, saying why."""
    a, drv = make(pol, runtime, rule)

    async def main():
        async with a.running():
            with trio.fail_after(30):
                assert await cancelled_step(a, drv.observation(), at)
                assert a.t == 0
                with pytest.raises(RuntimeError, match="step 0 did not finish .cancelled.*cannot step again"):
                    await a.step(drv.observation())

    trio.run(main)


@pytest.mark.parametrize("runtime", ["actors", "sharded"])
def test_a_timed_out_step_is_named_so(pol, runtime, monkeypatch):
    a, drv = make(pol, runtime, "quorum", step_timeout=0.2)

    async def stall(*args, **kw):  # the policy never answers
        await trio.sleep_forever()

    monkeypatch.setattr(a.batcher, "step", stall)

    async def main():
        async with a.running():
            with pytest.raises(StepTimeout):
                await a.step(drv.observation())
            with pytest.raises(RuntimeError, match="step 0 did not finish .timed out"):
                await a.step(drv.observation())

    trio.run(main)


@pytest.mark.parametrize("runtime", ["actors", "sharded"])
def test_closing_the_agent_ends_a_step_in_flight(pol, runtime):
    """close() from another task while a step waits for its experts: the step raises AgentClosed
    (it waited forever before: no one closed the membrane's mailbox)."""
    a, drv = make(pol, runtime, "quorum", step_timeout=None)
    got = []

    async def main():
        async with trio.open_nursery() as n:
            await n.start(a.run)

            async def stepper():
                try:
                    await a.step(drv.observation())
                    got.append("returned")
                except AgentClosed as e:
                    got.append(str(e))

            n.start_soon(stepper)
            for _ in range(3):
                await trio.sleep(0)
            a.close()
            with trio.fail_after(10):
                while len(n.child_tasks):
                    await trio.sleep(0.01)

    trio.run(main)
    assert got == ["the agent was closed while step 0 ran"]


@pytest.mark.parametrize("rule", ["restart", "remove"])
def test_an_expert_removed_before_its_task_ran_is_not_a_crash(pol, rule):
    """Added and removed between two steps (its task not yet started): the task found its mailbox
    closed, supervision took that for a crash and removed it again, which killed the agent."""
    a, drv = make(pol, "actors", supervision=Supervision(rule))

    async def main():
        async with a.running():
            drv.record(*await a.step(drv.observation()))
            live = a.live_ids()
            new = a.add_experts(2, init="fresh", allow_harmful=True)
            a.remove_experts(new)
            assert a.live_ids() == live
            drv.record(*await a.step(drv.observation()))
            drv.record(*await a.step(drv.observation()))

    trio.run(main)
    assert a.counters.crashes == 0 and a.counters.added == 2 and a.counters.removed == 2


def test_experts_removed_before_the_agent_runs_are_never_started(pol):
    a, drv = make(pol, "actors")
    assert a.remove_experts([2]) == 5

    async def main():
        async with a.running():
            out, info = await a.step(drv.observation())
            assert info.experts == 5 and np.isfinite(out).all()

    trio.run(main)


def test_a_refused_resize_during_a_step_draws_nothing(pol, monkeypatch):
    """The sharded agent refuses a membership change mid-step before it draws (clone sources, noise,
    edges), so a later legal change is the one an agent that never asked would make."""
    a, drv = make(pol, "sharded", "quorum")
    policy_step, seen = a.batcher.step, []

    async def step_and_try(*args, **kw):  # a membership change asked for while the shards step
        before = a._rng.bit_generator.state
        for change in (lambda: a.add_experts(2, init="clone"), lambda: a.remove_experts([1])):
            with pytest.raises(RuntimeError, match="between inner steps"):
                change()
        seen.append(a._rng.bit_generator.state == before and a.N == 6)
        return await policy_step(*args, **kw)

    monkeypatch.setattr(a.batcher, "step", step_and_try)

    async def main():
        async with a.running():
            await a.step(drv.observation())

    trio.run(main)
    assert seen and all(seen)


@pytest.mark.parametrize("runtime", ["actors", "sharded"])
def test_a_closed_agent_refuses_membership_changes(pol, runtime):
    a, drv = make(pol, runtime)

    async def main():
        async with a.running():
            await a.step(drv.observation())

    trio.run(main)
    for change in (lambda: a.add_experts(1, init="clone"), lambda: a.remove_experts([0])):
        with pytest.raises(RuntimeError, match="the agent is closed"):
            change()


def test_the_membrane_forgets_removed_experts(pol):
    """What a removed expert last pushed and its read query are dropped with it (they piled up
    under add / remove churn)."""
    a, drv = make(pol, "actors")

    async def main():
        async with a.running():
            for _ in range(2):
                await a.step(drv.observation())
            assert {0, 1} <= set(a.membrane._finished)
            a.remove_experts([0, 1])
            await a.step(drv.observation())
            m = a.membrane
            assert not {0, 1} & (set(m._finished) | set(m._pushes) | set(m._read_query))

    trio.run(main)


def test_the_sharded_counts_survive_a_membership_change(pol):
    """The policy's calls and rounds were counted from the last resize on (an eval with --add-at 10 reported 10
    rounds of 20)."""
    from badger_runtime.evaluation import run_episodes
    from badger_runtime.episodes import schedule

    agent = cfg_with(pol, "fixed", rounds=2)
    for changes in ((), schedule(3, 2, "clone", allow_harmful=True)):
        run = run_episodes(numpy_ops(), pol, agent, pol.task, dims=3, experts=6, episodes=2, seed=0, steps=6,
                           changes=changes, runtime="sharded", shards=2)
        assert run.runtime["policy_rounds"] == 6 * 2, changes


@pytest.mark.parametrize("runtime", ["actors", "sharded"])
def test_a_second_step_while_one_runs_is_refused(pol, runtime):
    """The membrane feeds one observation at a time: a step started while another runs (here from inside the first
    step's first policy call: deterministic) is refused at once with a RuntimeError, and the first step finishes
    (two steps at once hung until the step timeout before the rule)."""
    a, drv = make(pol, runtime, "quorum", step_timeout=None)
    refused, done, policy_step = [], [], a.batcher.step
    obs = drv.observation()

    async def hooked(*args, **kw):
        if not refused:
            try:
                await a.step(obs)
                refused.append("not refused")
            except RuntimeError as e:
                refused.append(str(e))
        return await policy_step(*args, **kw)

    async def main():
        async with a.running():
            a.batcher.step = hooked
            with trio.fail_after(10):
                done.append(await a.step(obs))

    trio.run(main)
    assert refused == ["a step is already running: the membrane feeds one observation at a time"] and len(done) == 1

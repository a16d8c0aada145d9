"""The actor runtime: parity with the batched engine, bad frames, supervision, growing and
shrinking during a run, message accounting, the `badger run` command."""

from __future__ import annotations

import dataclasses
import json
import logging

import msgpack
import numpy as np
import pytest
import trio

from badger_runtime.actors import expert as ex
from badger_runtime.actors.messages import Message, encode
from badger_runtime.actors.runtime import ActorAgent
from badger_runtime.actors.supervisor import Supervision
from badger_runtime.actors.transport import MEMBRANE
from badger_runtime.engine import numpy_ops
from badger_runtime.episodes import Driver, sample_batches
from badger_runtime.evaluation import run_episodes
from badger_runtime.policy_card import load_policy
from badger_runtime.rollout import rollout

# (routing kind, extra routing settings): every routing option of the model
ROUTINGS = [("dense", {}), ("topk", {"k": 2}), ("topk", {"k": 2, "candidates": 3}), ("hardwired", {}),
            ("homogeneous", {}), ("random", {"degree": 2})]
MAX_DIFF: dict = {}  # measured parity, printed at the end of the module


@pytest.fixture(scope="module")
def pol(tiny_policy):
    return load_policy(tiny_policy)


def cfg_with(pol, kind="dense", rule="fixed", rounds=1, eps=1e-3, **routing):
    a = pol.agent
    return dataclasses.replace(a, routing=dataclasses.replace(a.routing, kind=kind, **routing),
                               agreement=dataclasses.replace(a.agreement, rule=rule, rounds=rounds, eps=eps))


def one_episode(pol, agent, *, n=5, d=3, seed=0, steps=6, feedback=None):
    task = dataclasses.replace(pol.task, feedback=feedback or pol.task.feedback)
    _, ep, w = next(sample_batches(task, agent, dims=d, experts=n, episodes=1, seed=seed, steps=steps))
    return ep, w


def reference(pol, agent, ep, w, steps):
    return rollout(numpy_ops(), pol, agent, ep, w, steps=steps).outputs[:, 0]  # [T, d]


def run_actor_episodes(pol, agent, task, **kw):
    """The actor runtime through the one seeded evaluation (``runtime="actors"``)."""
    return run_episodes(numpy_ops(), pol, agent, task, runtime="actors", **kw)


def drive(pol, agent, ep, w, steps, hook=None, **kw):
    """Run one actor episode; ``hook(agent, t, nursery)`` runs before step t. Returns (guesses, agent)."""
    out = []

    async def main():
        a = ActorAgent(pol, agent, ep.interface, w, **kw)
        driver = Driver(numpy_ops(), ep, steps)
        async with trio.open_nursery() as nursery:
            async with a.running():
                while not driver.finished:
                    if hook is not None:
                        await hook(a, driver.t, nursery)
                    g, info = await a.step(driver.observation())
                    driver.record(g, info)
                    out.append(g[0])
        out.append(a)

    trio.run(main)
    agent_obj = out.pop()
    return np.stack(out), agent_obj


# -- parity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("micro_batch", [True, False], ids=["micro-batched", "per-expert"])
@pytest.mark.parametrize("kind,extra", ROUTINGS, ids=[k + ("-C" if "candidates" in e else "") for k, e in ROUTINGS])
def test_parity_with_batched_engine(pol, kind, extra, micro_batch):
    """All messages delivered, fixed rounds 1..3: the actors' guesses equal the batched ONNX
    engine's (evaluation.run_episodes, same seed) to 1e-5, for every routing option."""
    feedback = {"dense": "per_dim", "topk": "scalar", "hardwired": "per_dim", "homogeneous": "one_expert",
                "random": "one_expert"}[kind]
    task = dataclasses.replace(pol.task, feedback=feedback)
    for rounds in (1, 2, 3):
        agent = cfg_with(pol, kind, rounds=rounds, **extra)
        kw = dict(dims=3, experts=6, episodes=3, seed=11 + rounds, steps=5)
        a = run_episodes(numpy_ops(), pol, agent, task, **kw)
        b = run_actor_episodes(pol, agent, task, micro_batch=micro_batch, **kw)
        diff = float(np.abs(a.outputs - b.outputs).max())
        MAX_DIFF[(kind, bool(extra.get("candidates")), micro_batch, rounds)] = diff
        assert diff <= 1e-5, (kind, rounds, diff)
        assert np.array_equal(a.rounds, b.rounds)
        c = b.runtime
        assert c["sent"] == c["delivered"] > 0 and c["dropped"] == 0 and c["bad_frames"] == 0
        if micro_batch:  # one onnxruntime call per round of each episode
            assert c["policy_calls"] == 3 * 5 * rounds


def test_parity_without_encoding(pol):
    agent = cfg_with(pol, "dense", rounds=2)
    kw = dict(dims=2, experts=4, episodes=2, seed=5, steps=4)
    a = run_episodes(numpy_ops(), pol, agent, pol.task, **kw)
    b = run_actor_episodes(pol, agent, pol.task, encode=False, **kw)
    assert np.abs(a.outputs - b.outputs).max() <= 1e-5


@pytest.mark.parametrize("rule,eps", [("convergence", 0.05), ("quorum", 1e-3)])
def test_convergence_and_quorum_end_within_the_round_limit(pol, rule, eps):
    agent = cfg_with(pol, "dense", rule=rule, rounds=4, eps=eps)
    agent.agreement.quorum = 0.6
    kw = dict(dims=3, experts=5, episodes=3, seed=2, steps=5)
    a = run_episodes(numpy_ops(), pol, agent, pol.task, **kw)
    for mb in (True, False):
        b = run_actor_episodes(pol, agent, pol.task, micro_batch=mb, **kw)
        assert b.rounds.min() >= 1 and b.rounds.max() <= 4
        # the same rule, applied by the membrane to the experts' reported votes and changes
        assert np.array_equal(a.rounds, b.rounds)
        assert np.abs(a.outputs - b.outputs).max() <= 1e-5


def test_convergence_can_stop_early(pol):
    agent = cfg_with(pol, "dense", rule="convergence", rounds=5, eps=10.0)  # any change counts as converged
    b = run_actor_episodes(pol, agent, pol.task, dims=2, experts=3, episodes=2, seed=0, steps=3)
    assert (b.rounds == 1).all()


# -- the sans-IO expert ------------------------------------------------------------------------
def test_expert_core_without_an_event_loop(pol):
    spec = pol.spec
    h = np.zeros(spec.hidden, np.float32)
    hd = np.zeros(spec.heads_dim, np.float32)
    core = ex.ExpertCore(1, spec, pol.agent.routing, h, hd, np.zeros(spec.id_dim, np.float32),
                         senders={0: 0, 1: 0, 2: 1}, receivers={0: 0, 2: 1})
    obs = Message("observe", MEMBRANE, (1,), 0, 0, 0, {"slot_addr": np.ones((2, spec.addr_dim), np.float32),
                                                        "slot_val": np.ones(2, np.float32), "rounds": 1})
    core.on_observe(obs, fixed=True)
    core.begin_step()
    assert core.sensed.shape == (spec.sensed_dim,)
    payload, to = core.outbox()
    assert to == [0]  # expert 2 joins at step 1
    assert not core.round_ready() and core.missing() == [0, 1]

    def msg(sender, step=0, rnd=0):
        return Message("msg", sender, (1,), 0, step, rnd, {k: np.ones_like(v) for k, v in payload.items()})

    assert core.on_message(msg(1)) is None
    assert core.on_message(msg(7)) == "unknown_sender"
    core.on_lost(0, 0, 0)  # the transport lost expert 0's message
    assert core.round_ready()
    inbox, senders = core.round_inbox()
    assert senders == [1] and np.allclose(inbox, 1.0)
    vote, change, used = core.apply(np.ones(spec.hidden), np.ones(spec.heads_dim))
    assert used == 1 and core.phase == ex.DONE and change == 1.0
    assert core.on_message(msg(1)) == "stale"
    assert core.finish() is not None and core.phase == ex.IDLE
    with pytest.raises(ex.MessageError):  # a message that does not fit this policy
        one = np.ones(1, np.float32)
        core.on_message(Message("msg", 1, (1,), 0, 1, 0, {"key": one, "query": one, "value": one}))


# -- bad frames -------------------------------------------------------------------------------
def bad_frames():
    good = {"key": np.ones(4, np.float32), "query": np.ones(4, np.float32), "value": np.ones(6, np.float32)}
    obs = {"slot_addr": np.ones((3, 6), np.float32), "slot_val": np.ones(3, np.float32), "rounds": 1}
    return [
        b"\xc1\xc1 not msgpack",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"version": 99, "kind": "msg"}),
        encode(Message("msg", 0, (0,), 0, 0, 0, good)),  # a schema-valid msg the transport did not carry
        encode(Message("observe", 3, (0,), 0, 0, 0, obs)),  # observations come from the membrane only
        encode(Message("observe", MEMBRANE, (0,), 0, 0, 0, {**obs, "slot_addr": np.ones(3, np.float32)})),  # 1-D
        encode(Message("push", MEMBRANE, (0,), 0, 0, 0, {"key": good["key"], "value": good["value"]})),
        encode(Message("control", MEMBRANE, (0,), 0, 0, 0, {"op": "add"})),  # missing fields
    ]


def test_bad_frames_are_counted_and_never_crash_an_expert(pol, caplog):
    agent = cfg_with(pol, "dense", rounds=2)
    ep, w = one_episode(pol, agent, n=4, steps=5)
    ref = reference(pol, agent, ep, w, 5)
    frames = bad_frames()

    async def hook(a, t, nursery):
        if t in (1, 3):
            for i, f in enumerate(frames):
                a.inject_frame(a.live_ids()[i % a.n_experts], f)
            a._mb_send.send_nowait(_raw_envelope(b"\x00junk"))  # and one for the membrane

    with caplog.at_level(logging.WARNING, logger="badger_runtime.actors"):
        g, a = drive(pol, agent, ep, w, 5, hook)
    assert np.abs(g - ref).max() <= 1e-5  # nothing changed the agent's behaviour
    assert a.counters.bad_frames == 2 * (len(frames) + 1)
    assert a.counters.crashes == 0 and a.counters.dropped == 0
    assert "bad frame rejected" in caplog.text


def _raw_envelope(data):
    from badger_runtime.actors.transport import Envelope, Frame

    return Envelope(Frame(data))


def test_corrupted_messages_are_bad_frames_counted_dropped(pol):
    agent = cfg_with(pol, "dense", rounds=2)
    ep, w = one_episode(pol, agent, n=4, steps=4)
    hits = []

    def fault(sender, receiver, t, r):
        if (sender + receiver + t + r) % 5 == 0:
            hits.append(1)
            return "corrupt"
        return None

    g, a = drive(pol, agent, ep, w, 4, fault=fault)
    c = a.counters
    assert np.isfinite(g).all()
    assert c.bad_frames == len(hits) == c.dropped_by["bad_frame"]
    assert c.sent == c.delivered + c.dropped


# -- supervision ------------------------------------------------------------------------------
@pytest.mark.parametrize("at", ["send", "observe"])
def test_a_crashed_expert_restarts_from_its_last_state(pol, caplog, at):
    agent = cfg_with(pol, "dense", rounds=2)
    ep, w = one_episode(pol, agent, n=4, steps=5)
    ref = reference(pol, agent, ep, w, 5)

    async def hook(a, t, nursery):
        if t == 2:
            a.crash(1, at)
            a.crash(3, at)

    with caplog.at_level(logging.WARNING, logger="badger_runtime.actors"):
        g, a = drive(pol, agent, ep, w, 5, hook, supervision=Supervision("restart"))
    assert np.abs(g - ref).max() <= 1e-5  # the restart is invisible: same state, no message lost
    assert a.counters.crashes == 2 and a.counters.restarts == 2 and a.n_experts == 4
    assert [e[0] for e in a.events].count("restart") == 2
    assert "crashed" in caplog.text and "restarted" in caplog.text


def test_a_crashed_expert_is_removed_and_the_agent_keeps_running(pol):
    agent = cfg_with(pol, "dense", rounds=2)
    ep, w = one_episode(pol, agent, n=4, steps=5)

    async def hook(a, t, nursery):
        if t == 2:
            a.crash(2)

    g, a = drive(pol, agent, ep, w, 5, hook, supervision=Supervision("remove"))
    assert np.isfinite(g).all() and g.shape == (5, 3)
    assert a.live_ids() == [0, 1, 3] and a.counters.removed_on_crash == 1
    assert a.counters.sent == a.counters.delivered + a.counters.dropped


def test_restart_intensity_escalates_to_removal(pol):
    agent = cfg_with(pol, "dense", rounds=1)
    ep, w = one_episode(pol, agent, n=3, steps=6)

    async def hook(a, t, nursery):
        if 0 in a.live_ids():
            a.crash(0)

    g, a = drive(pol, agent, ep, w, 6, hook, supervision=Supervision("restart", max_restarts=2))
    assert a.counters.restarts == 2 and a.counters.removed_on_crash == 1
    assert 0 not in a.live_ids() and np.isfinite(g).all()


@pytest.mark.parametrize("rule", ["restart", "remove"])
def test_a_failed_policy_call_is_retried_not_blamed_on_the_experts(pol, rule):
    """A transient failure of the round's shared policy call: every expert waiting on it restarts and the step
    completes as if nothing happened (under 'remove' the waiting experts were removed, down to one); a persistent
    failure escalates out of the agent instead of emptying it."""
    agent = cfg_with(pol, "dense", rounds=2)
    ep, w = one_episode(pol, agent, n=4, steps=4)
    ref = reference(pol, agent, ep, w, 4)
    real, failures = pol.step, []

    def flaky(*args):
        if len(failures) < 1 and args[0].shape[0] > 1:  # the first micro-batched call fails once
            failures.append(1)
            raise RuntimeError("onnxruntime: a transient failure")
        return real(*args)

    async def hook(a, t, nursery):
        if t == 1:
            a.batcher.policy = type("Flaky", (), {"step": staticmethod(flaky)})()

    g, a = drive(pol, agent, ep, w, 4, hook, supervision=Supervision(rule))
    assert failures and a.n_experts == 4 and a.counters.removed_on_crash == 0
    assert np.abs(g - ref).max() <= 1e-5

    def broken(*args):
        raise RuntimeError("onnxruntime: the session is gone")

    async def hook2(a, t, nursery):
        if t == 1:
            a.batcher.policy = type("Broken", (), {"step": staticmethod(broken)})()

    from badger_runtime.actors.batcher import PolicyCallError

    with pytest.raises(BaseExceptionGroup) as info:  # (the agent's nursery: the escalated error, and the step it ended)
        drive(pol, agent, ep, w, 4, hook2, supervision=Supervision(rule))
    assert info.value.subgroup(PolicyCallError) is not None, info.value


# -- growing and shrinking while the agent runs ------------------------------------------------
@pytest.mark.parametrize("kind,extra", ROUTINGS, ids=[k + ("-C" if "candidates" in e else "") for k, e in ROUTINGS])
def test_add_and_remove_from_another_task_mid_step(pol, kind, extra):
    """Changes land while a step is running (after a few scheduler passes), from another task;
    every message is delivered or counted dropped, and the agent keeps producing outputs."""
    agent = cfg_with(pol, kind, rounds=3, **extra)
    ep, w = one_episode(pol, agent, n=6, steps=8)
    plan = {1: ("add", 2, "clone"), 2: ("remove", 1), 3: ("add", 1, "fresh"), 5: ("remove", 2), 6: ("add", 3, "clone")}

    async def changer(a, t, passes):
        for _ in range(passes):
            await trio.sleep(0)
        op = plan[t]
        if op[0] == "add":
            a.add_experts(op[1], init=op[2])
        else:
            a.remove_experts(a.live_ids()[-op[1]:])

    async def hook(a, t, nursery):
        if t in plan:
            nursery.start_soon(changer, a, t, 3 + 2 * t)

    g, a = drive(pol, agent, ep, w, 8, hook)
    c = a.counters
    assert np.isfinite(g).all()
    assert c.sent == c.delivered + c.dropped  # after close: nothing in flight, nothing lost silently
    assert c.added == 6 and c.removed == 3 and len(a.live_ids()) == 9
    assert set(c.dropped_by) <= {"receiver_removed", "sender_removed", "no_receiver", "stale", "shutdown"}


def test_messages_to_a_removed_expert_are_counted_dropped(pol):
    """Remove an expert while messages to it sit in its mailbox (delayed delivery keeps some in transit)."""
    agent = cfg_with(pol, "dense", rounds=3)
    ep, w = one_episode(pol, agent, n=5, steps=4)

    async def remover(a):
        for _ in range(6):
            await trio.sleep(0)
        a.remove_experts([4])

    async def hook(a, t, nursery):
        if t == 2:
            nursery.start_soon(remover, a)

    g, a = drive(pol, agent, ep, w, 4, hook, fault=lambda s, r, t, rr: 3 if r == 4 else None)
    c = a.counters
    assert c.dropped_by.get("receiver_removed", 0) + c.dropped_by.get("no_receiver", 0) > 0
    assert c.sent == c.delivered + c.dropped
    assert np.isfinite(g).all()


def test_dropped_and_delayed_messages_are_accounted(pol):
    agent = cfg_with(pol, "random", rounds=2, degree=3)
    ep, w = one_episode(pol, agent, n=6, steps=5)
    rng = np.random.default_rng(0)
    decided = {"drop": 0}

    def fault(sender, receiver, t, r):
        u = rng.random()
        if u < 0.2:
            decided["drop"] += 1
            return "drop"
        return int(rng.integers(1, 5)) if u < 0.5 else None

    g, a = drive(pol, agent, ep, w, 5, fault=fault)
    c = a.counters
    assert np.isfinite(g).all()
    assert c.dropped_by["fault"] == decided["drop"] and c.sent == c.delivered + c.dropped


@pytest.mark.parametrize("kind", ["dense", "topk", "homogeneous"])
def test_results_do_not_depend_on_ids_or_spawn_order(pol, kind):
    agent = cfg_with(pol, kind, rounds=2, k=3)
    ep, w = one_episode(pol, agent, n=5, steps=4)
    ref = reference(pol, agent, ep, w, 4)
    ids = [907, 13, 5000, 2, 77]
    g, _ = drive(pol, agent, ep, w, 4, expert_ids=ids, spawn_order=[5000, 2, 907, 77, 13])
    assert np.abs(g - ref).max() <= 1e-5


# -- the command line -------------------------------------------------------------------------
def test_badger_run_prints_evals_report_plus_message_counts(tiny_policy, capsys):
    from badger_runtime.cli import main

    args = ["--policy", str(tiny_policy), "--dims", "2", "--experts", "4", "--episodes", "6", "--seed", "3",
            "--steps", "4", "--rounds", "2", "--json"]
    assert main(["eval", *args]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert main(["run", *args]) == 0
    run = json.loads(capsys.readouterr().out)
    assert set(ev) <= set(run)
    for k in ("task", "episodes", "seed", "steps", "routing", "agreement", "chance", "random_guess",
              "mean_solution", "optimizer"):
        assert run[k] == ev[k], k
    assert np.allclose(run["mse_by_step"], ev["mse_by_step"], atol=1e-5)
    m = run["messages"]
    assert m["sent"] == m["delivered"] == 6 * 4 * 2 * 16 and m["dropped"] == 0 and m["bad_frames"] == 0
    assert main(["run", *args, "--per-expert-calls", "--no-encode"]) == 0
    run2 = json.loads(capsys.readouterr().out)
    assert np.allclose(run2["mse_by_step"], ev["mse_by_step"], atol=1e-5)
    assert run2["policy_calls"] == 6 * 4 * 2 * 4
    # the text report too (it printed only the float fields: no message counts, no changes)
    assert main(["run", *args[:-1], "--add-at", "2", "--add", "1", "--init", "clone"]) == 0
    text = capsys.readouterr().out
    assert "runtime actors: messages sent" in text and "before step 2: add 1 (clone)" in text


def test_growing_demo_writes_its_figure(tiny_policy, tmp_path, capsys):
    import runpy
    from pathlib import Path

    demo = runpy.run_path(str(Path(__file__).parents[1] / "demos" / "growing.py"))
    out = tmp_path / "out"
    assert demo["main"](["--policy", str(tiny_policy), "--out", str(out), "--experts", "3", "--add", "2",
                         "--steps", "6", "--at", "2", "--episodes", "4", "--dims", "2"]) == 0
    summary = json.loads((out / "growing.json").read_text())
    assert (out / "growing.png").stat().st_size > 10_000
    assert len(summary["arms"]) == 4
    grown = [a for label, a in summary["arms"].items() if "+2" in label]
    assert all(a["messages"]["added"] == 4 * 2 for a in grown)  # 2 experts hot-added in each of 4 episodes
    assert all(np.isfinite(a["mse_by_step"]).all() for a in summary["arms"].values())


def test_expert_core_refuses_events_out_of_phase(pol):
    """The expert's phases are a transition table: an illegal event raises PhaseError (not an
    assert, which python -O would strip)."""
    spec = pol.spec
    core = ex.ExpertCore(0, spec, pol.agent.routing, np.zeros(spec.hidden, np.float32),
                         np.zeros(spec.heads_dim, np.float32), np.zeros(spec.id_dim, np.float32))
    for event in ("outbox", "finish", "take_decision"):
        with pytest.raises(ex.PhaseError, match=f"{event} in phase 'idle'"):
            getattr(core, event)()
    with pytest.raises(ex.PhaseError):
        core.apply(np.zeros(spec.hidden), np.zeros(spec.heads_dim))
    assert set(ex.TRANSITIONS) == {"begin_step", "outbox", "apply", "take_decision", "finish"}


@pytest.mark.parametrize("micro_batch", [True, False])
def test_mailboxes_stay_within_their_invariant(pol, micro_batch):
    """Mailboxes are unbounded channels, bounded by the protocol (actors/transport.py): no mailbox
    ever holds more than ~2 x in-degree + rounds + a few frames, also when experts run at their
    own pace (per-expert calls) and through the quorum barrier."""
    N, R = 6, 3
    for rule in ("fixed", "quorum"):
        agent = cfg_with(pol, "dense", rule=rule, rounds=R)
        res = run_actor_episodes(pol, agent, pol.task, dims=3, experts=N, episodes=2, seed=1, steps=5,
                                 micro_batch=micro_batch)
        assert 0 < res.runtime["peak_mailbox"] <= 2 * N + R + 4, res.runtime

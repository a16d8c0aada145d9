"""A hypothesis state machine over the actor runtime.

trio runs in a background thread (with a MockClock that jumps when every task is blocked,
so a deadlock becomes a step timeout at once); rules call into it with ``trio.from_thread``.
Rules step the agent, add and remove experts between steps and in the middle of a step,
drop / delay / corrupt messages, inject bad frames and crash experts. After every rule, with
the runtime quiescent, the invariants hold:

- every expert->expert message sent was delivered or counted dropped (nothing in flight);
- no expert computed an inbox with a message from an expert that does not exist;
- every stage ended within its round limit; outputs are finite;
- membership is what the rules and the supervisor made it; bad frames are all counted;
- a step without faults equals the batched math (``rollout.agent_step``) applied to the
  experts' states just before it (to 1e-5), whatever happened before: growth, removals,
  crashes with restarts, earlier faults. For topologies where everyone hears everyone, the
  reference orders the experts by a random permutation: the result must not depend on
  expert ids or spawn order.

The last tests plant bugs in the runtime (a drop not counted, a restart from a wrong state, a
receiver that ignores removals) and check that the machine catches each of them.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from badger_runtime.actors import expert as ex
from badger_runtime.actors import runtime as rt
from badger_runtime.actors.runtime import ActorAgent
from badger_runtime.actors.supervisor import Supervision
from badger_runtime.engine import numpy_ops
from badger_runtime.evaluation import episode_rngs
from badger_runtime.policy_card import load_policy
from badger_runtime.rollout import AgentState, Wiring, agent_step, sample_wiring
from badger_runtime.tasks import guessing

ROUTINGS = [("dense", {}), ("topk", {"k": 2}), ("topk", {"k": 2, "candidates": 2}), ("hardwired", {}),
            ("homogeneous", {}), ("random", {"degree": 2})]
ALL_TO_ALL = ("dense", "homogeneous")  # and topk without candidates
D = 2  # outputs


class TrioHost:
    """A trio run in a background thread that test code calls into."""

    def __init__(self):
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self._ready.wait(10)

    def _run(self):
        # Deterministic scheduling, as pytest-trio does under hypothesis, so that a failing
        # example replays (and shrinks) the same way. Private trio knobs: skipped if gone.
        core_run = getattr(trio._core, "_run", None)
        if hasattr(core_run, "_ALLOW_DETERMINISTIC_SCHEDULING") and hasattr(core_run, "_r"):
            core_run._ALLOW_DETERMINISTIC_SCHEDULING = True
            core_run._r.seed(0)
        try:
            trio.run(self._main, clock=trio.testing.MockClock(autojump_threshold=0))
        except BaseException as e:  # surfaced by close()
            self.error = e

    async def _main(self):
        self.token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as n:
            self.nursery = n
            self._ready.set()
            await self._stop.wait()
            n.cancel_scope.cancel()

    def call(self, afn, *args):
        return trio.from_thread.run(afn, *args, trio_token=self.token)

    def sync(self, fn, *args):
        return trio.from_thread.run_sync(fn, *args, trio_token=self.token)

    def quiesce(self):
        self.call(trio.testing.wait_all_tasks_blocked)

    def close(self):
        try:
            self.sync(self._stop.set)
        except trio.RunFinishedError:
            pass
        self.thread.join(10)
        core_run = getattr(trio._core, "_run", None)
        if hasattr(core_run, "_ALLOW_DETERMINISTIC_SCHEDULING"):
            core_run._ALLOW_DETERMINISTIC_SCHEDULING = False
        if self.error is not None:
            raise self.error


POLICY = {}


@pytest.fixture(scope="module", autouse=True)
def policy(tiny_policy):
    POLICY["pol"] = load_policy(tiny_policy)
    yield
    POLICY.clear()


class ActorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.host = TrioHost()
        self.agent = None
        self.checks_passed = True

    # -- set-up -----------------------------------------------------------------------------
    @initialize(routing=st.sampled_from(ROUTINGS), n=st.integers(1, 6), micro_batch=st.booleans(),
                encode=st.booleans(), rounds=st.integers(1, 3), rule_=st.sampled_from(["fixed", "fixed", "convergence",
                                                                                      "quorum"]),
                supervision=st.sampled_from(["restart", "remove"]), self_loops=st.booleans(),
                seed=st.integers(0, 2**16), shuffle_ids=st.booleans())
    def start(self, routing, n, micro_batch, encode, rounds, rule_, supervision, self_loops, seed, shuffle_ids):
        pol = POLICY["pol"]
        kind, extra = routing
        a = pol.agent
        self.cfg = dataclasses.replace(
            a, routing=dataclasses.replace(a.routing, kind=kind, self_loops=self_loops, **extra),
            agreement=dataclasses.replace(a.agreement, rule=rule_, rounds=rounds, eps=0.05))
        self.all_to_all = kind in ALL_TO_ALL or (kind == "topk" and not extra.get("candidates"))
        rng_task, rng_wire = episode_rngs(seed)
        task = dataclasses.replace(pol.task, feedback="per_dim")
        self.ep = guessing.sample(rng_task, task, 1, D, pol.spec.addr_dim, steps=1)
        wiring = sample_wiring(rng_wire, self.cfg, 1, n)
        self.rng = np.random.default_rng(seed)
        ids = list(range(n))
        order = None
        if shuffle_ids and self.all_to_all:  # arbitrary ids and spawn order
            ids = sorted(self.rng.choice(10_000, size=n, replace=False).tolist())
            order = self.rng.permutation(ids).tolist()
        self.fault_state = {"on": False, "drop": 0.0, "delay": 0.0, "corrupt": 0.0, "drops": 0, "corrupts": 0}
        self.agent = ActorAgent(pol, self.cfg, self.ep.interface, wiring, expert_ids=ids, spawn_order=order,
                                micro_batch=micro_batch, encode=encode, supervision=Supervision(supervision, 2),
                                fault=self._fault, seed=seed, step_timeout=30.0)
        self.agent.on_deliver = self._on_deliver
        self.violations: list = []
        self.spawned = set(ids)
        self.removed_by_rules: set = set()
        self.bad_injected = 0
        self.rounds = rounds
        self.cloned = False
        self.host.call(self.host.nursery.start, self.agent.run)

    def teardown(self):
        if self.agent is not None:
            try:
                self.host.sync(self.agent.close)
                self.host.call(self.agent.stopped.wait)
                c = self.agent.counters
                if self.checks_passed:  # else an invariant failed: let its error be the one reported
                    assert c.sent == c.delivered + c.dropped, "messages lost at shutdown"
            finally:
                self.host.close()
        else:
            self.host.close()

    # -- hooks (run in the trio thread) -------------------------------------------------------
    def _fault(self, sender, receiver, t, r):
        f = self.fault_state
        if not f["on"]:
            return None
        u = self.rng.random()
        if u < f["drop"]:
            f["drops"] += 1
            return "drop"
        if u < f["drop"] + f["corrupt"]:
            f["corrupts"] += 1
            return "corrupt"
        if u < f["drop"] + f["corrupt"] + f["delay"]:
            return int(self.rng.integers(1, 6))
        return None

    def _on_deliver(self, receiver, t, r, senders):
        live = set(self.agent.live_ids())
        if receiver not in live or not set(senders) <= live or not set(senders) <= self.spawned:
            self.violations.append((receiver, t, r, senders, sorted(live)))

    # -- the reference: the batched math on the experts' current states ------------------------
    def _reference(self, vals, R):
        pol, a = POLICY["pol"], self.agent
        snap = self.host.sync(a.snapshot)
        ids = sorted(snap)
        if self.all_to_all:
            ids = self.rng.permutation(ids).tolist()
        n = len(ids)
        mask = self.host.sync(a.directory.mask, ids)[None]
        s = [snap[e] for e in ids]
        idents = None if s[0]["ident"] is None else np.stack([x["ident"] for x in s])[None]
        w = Wiring(np.zeros((1, n, pol.spec.hidden), np.float32), mask, np.array([x["can_sense"] for x in s]),
                   np.array([x["can_push"] for x in s]), idents)
        state = AgentState(np.stack([x["h"] for x in s])[None], np.stack([x["heads"] for x in s])[None])
        new, out, info = agent_step(numpy_ops(), pol, self.cfg, w, state, self.ep.interface, vals[None], rounds=R)
        return out[0], {e: new.h[0, i] for i, e in enumerate(ids)}, int(info.rounds[0])

    # -- rules ---------------------------------------------------------------------------------
    def _observation(self, seed):
        return np.random.default_rng(seed).uniform(-1.5, 1.5, size=self.ep.slots).astype(np.float32)

    def _check_step(self, out, info, R):
        assert out.shape == (1, D) and np.isfinite(out).all()
        assert info.rounds.shape == (1,) and 1 <= info.rounds[0] <= R
        assert all(1 <= r <= R for r in info.expert_rounds.values()), info.expert_rounds

    @precondition(lambda self: self.agent is not None)
    @rule(seed=st.integers(0, 2**16), rounds=st.one_of(st.none(), st.integers(1, 3)))
    def step(self, seed, rounds):
        self._step(seed, rounds)

    def _step(self, seed, rounds):
        vals = self._observation(seed)
        R = rounds or self.rounds
        # Top-k is discontinuous where scores tie, and a clone ties with its source exactly: a
        # 1e-7 difference in how a batch row is computed then flips the choice. No reference there.
        clean = not self.fault_state["on"] and not (self.cfg.routing.kind == "topk" and self.cloned)
        before = set(self.agent.live_ids())
        ref = self._reference(vals, R) if clean else None
        out, info = self.host.call(self.agent.step, vals[None], R)
        self._check_step(out, info, R)
        if ref is not None and set(self.agent.live_ids()) == before:  # no supervisor removal during it
            ref_out, ref_h, ref_rounds = ref
            if ref_rounds == info.rounds[0]:  # a convergence/quorum verdict may flip on a 1e-7 tie
                assert np.abs(out[0] - ref_out).max() <= 1e-5, (out, ref_out)
                snap = self.host.sync(self.agent.snapshot)
                for e, h in ref_h.items():
                    assert np.abs(snap[e]["h"] - h).max() <= 1e-5, e

    @precondition(lambda self: self.agent is not None)
    @rule(seed=st.integers(0, 2**16), passes=st.integers(0, 40), op=st.sampled_from(["clone", "fresh", "remove"]),
          count=st.integers(1, 3))
    def step_while_changing(self, seed, passes, op, count):
        """Add or remove experts from another task in the middle of a step."""
        vals = self._observation(seed)
        a, R = self.agent, self.rounds
        pick = np.random.default_rng(seed)

        async def change():
            for _ in range(passes):
                await trio.sleep(0)
            if op == "remove":
                live = a.live_ids()
                if len(live) > 1:
                    gone = pick.choice(live, size=min(count, len(live) - 1), replace=False).tolist()
                    a.remove_experts(gone)
                    self.removed_by_rules |= set(gone)
            elif a.n_experts < 10:
                self.spawned |= set(a.add_experts(count, init=op))
                self.cloned |= op == "clone"

        async def both():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(change)
                res = await a.step(vals[None], R)
            return res

        out, info = self.host.call(both)
        self._check_step(out, info, R)

    @precondition(lambda self: self.agent is not None and self.agent.n_experts < 10)
    @rule(count=st.integers(1, 3), init=st.sampled_from(["clone", "fresh"]))
    def add(self, count, init):
        self.spawned |= set(self.host.sync(self.agent.add_experts, count, init))
        self.cloned |= init == "clone"

    @precondition(lambda self: self.agent is not None and self.agent.n_experts > 1)
    @rule(data=st.data())
    def remove(self, data):
        live = self.agent.live_ids()
        gone = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=len(live) - 1, unique=True))
        self.host.sync(self.agent.remove_experts, gone)
        self.removed_by_rules |= set(gone)

    @precondition(lambda self: self.agent is not None)
    @rule(drop=st.sampled_from([0.0, 0.1, 0.3]), delay=st.sampled_from([0.0, 0.3]),
          corrupt=st.sampled_from([0.0, 0.1]))
    def faults(self, drop, delay, corrupt):
        """Drop / corrupt / delay that fraction of the messages from now on (all 0: no faults)."""
        self.fault_state.update(on=drop + delay + corrupt > 0, drop=drop, delay=delay, corrupt=corrupt)

    @precondition(lambda self: self.agent is not None)
    @rule(data=st.data(), at=st.sampled_from(["send", "observe"]), step_now=st.booleans(),
          seed=st.integers(0, 2**16))
    def crash(self, data, at, step_now, seed):
        """Make an expert raise at its next ``at`` point (now, or in a later step)."""
        e = data.draw(st.sampled_from(self.agent.live_ids()))
        self.host.sync(self.agent.crash, e, at)
        if step_now:
            self._step(seed, None)

    @precondition(lambda self: self.agent is not None)
    @rule(data=st.data(), junk=st.binary(max_size=40))
    def bad_frame(self, data, junk):
        e = data.draw(st.sampled_from(self.agent.live_ids()))
        self.host.sync(self.agent.inject_frame, e, b"\xc1" + junk)  # 0xc1 is never valid msgpack
        self.bad_injected += 1

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def accounted(self):
        if self.agent is None:
            return
        self.checks_passed = False
        self.host.quiesce()
        c = self.agent.counters
        assert c.in_flight == 0, f"sent {c.sent} != delivered {c.delivered} + dropped {c.dropped}"
        assert c.dropped_by.get("fault", 0) == self.fault_state["drops"]
        assert not self.violations, f"inbox with a message from a missing expert: {self.violations[:3]}"
        live = set(self.agent.live_ids())
        gone = {e for what, e, _ in self.agent.events if what == "remove"}
        assert live == self.spawned - gone and self.removed_by_rules <= gone
        # injected bad frames are counted when read: a crashed-and-removed expert may not read them
        assert c.bad_frames <= self.bad_injected + self.fault_state["corrupts"]
        self.checks_passed = True


SETTINGS = settings(max_examples=100, stateful_step_count=12, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


def test_actor_state_machine():
    run_state_machine_as_test(ActorMachine, settings=SETTINGS)


# -- the machine must catch planted bugs ---------------------------------------------------------
def _uncounted_fault_drop(monkeypatch):
    orig = rt.ActorAgent._lose

    def lose(self, rcv, meta, reason):
        if reason == "fault":  # the bug: lose the message, tell the receiver, count nothing
            rec = self._records.get(rcv)
            if rec is not None:
                rec.send.send_nowait(rt.Lost(*meta))
            return
        orig(self, rcv, meta, reason)

    monkeypatch.setattr(rt.ActorAgent, "_lose", lose)


def _restart_from_scratch(monkeypatch):
    orig = ex.ExpertCore.restore

    def restore(self, snap):  # the bug: restart with a blank state instead of the last one
        orig(self, snap)
        self.h = np.zeros_like(self.h)

    monkeypatch.setattr(ex.ExpertCore, "restore", restore)


def _ignore_removals(monkeypatch):
    # the bug: receivers keep using buffered messages of removed senders
    monkeypatch.setattr(ex.ExpertCore, "on_peers_removed", lambda self, ids: 0)


@pytest.mark.parametrize("plant", [_uncounted_fault_drop, _restart_from_scratch, _ignore_removals])
def test_the_machine_catches_a_broken_runtime(monkeypatch, plant):
    plant(monkeypatch)
    with pytest.raises(Exception) as info:
        run_state_machine_as_test(ActorMachine, settings=settings(SETTINGS, max_examples=150, phases=[Phase.generate],
                                                                  derandomize=True))
    err = info.value
    while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:  # raised through a nursery
        err = err.exceptions[0]
    assert isinstance(err, (AssertionError, rt.StepTimeout)) or "Flaky" in type(err).__name__, info.value

"""The actor runtime: every expert is a trio task with its own state and a mailbox.

``ActorAgent`` is one agent (one episode) whose experts are tasks in a nursery it owns.
Experts share nothing: each holds an ``ExpertCore`` (its state, its view of its neighbours)
and a trio memory channel as its mailbox; everything it learns arrives there as a msgpack
frame of the versioned schema in ``messages`` (``encode=False`` passes the ``Message``
objects themselves, for speed; the checks of ``decode`` are then skipped).

One inner step (``await agent.step(slot_values)``) is the paper's agent step:

1. The **membrane** (the agent's only interface to the environment, run by the caller of
   ``step``) sends every expert taking part an ``observe`` frame with the input slots it
   may read (addresses and values; which slots an expert sees is wiring, see
   ``guessing`` and ``routing.membrane_masks``).
2. Each expert senses, then runs rounds: send its (key, value) to its out-neighbours
   (``msg`` frames, one encode per round, one envelope per receiver), wait until it has a
   message or a loss notice from every in-neighbour, compute its inbox with its own query
   (``ExpertCore.round_inbox``), and step the policy (``PolicyBatcher``).
3. **Agreement.** Fixed rounds need no coordination at all: every expert counts its own
   rounds, and with ``micro_batch=False`` experts run through them at their own pace,
   bounded only by the messages they wait for. Convergence and quorum are predicates over
   *all* experts (the largest message change; the fraction voting done), so after each
   round every expert sends the membrane a ``vote`` frame (its vote and its change) and
   waits for the verdict; the membrane applies ``agreement.still_talking`` (the same
   function as the batched engine) and broadcasts continue/stop. This is the one place
   with a per-round barrier, and only these two rules have it; all experts then use the
   same number of rounds, as in the batched engine.
4. At the end of the stage each expert that may push sends its push (key, value); the
   others send a ``done`` vote. The membrane mixes the pushes by its output addresses
   (``membrane.push``) and returns the outputs when every expert has finished the stage.

**Delivery accounting.** Expert-to-expert messages are counted per receiver: ``sent`` when
the transport takes an envelope, then exactly one of ``delivered`` (used in a receiver's
inbox) or ``dropped``, with a reason (``dropped_by``): ``fault`` (injected), ``bad_frame``
(corrupt), ``receiver_removed`` / ``no_receiver`` (the receiver is gone), ``sender_removed``
(its sender was removed before it was used), ``unknown_sender``, ``stale`` (arrived after
its round), ``duplicate``, ``shutdown`` (in flight when the agent closed). ``in_flight =
sent - delivered - dropped`` is 0 whenever the agent is quiescent. When the transport loses
a message it tells the receiver (a ``Lost`` notice, as a dead-letter office would), so
nobody waits forever for a message that will not come; a receiver then computes its inbox
over the messages it has.

**Membership changes** (``add_experts``, ``remove_experts``) are plain synchronous calls,
safe from any task of the same trio run, while a step is running: nothing is paused. A new
expert joins at the next inner step; its neighbours learn of it by ``control`` frames. A
removed expert's task is cancelled at once, its mailbox and buffered messages are counted
dropped, its pending policy request is withdrawn, and the others are told by ``control``
frames (a receiver stops waiting for it; messages from it not yet used are dropped).

**Supervision** (after Erlang/OTP's one_for_one): an expert whose task raises is restarted
from its last state (its mailbox is kept, so no message is lost), or removed; more than
``max_restarts`` restarts of one expert escalate to removal. Every crash is logged (logger
``badger_runtime.actors``), counted and kept in ``events``.

**Fault injection** (tests): ``fault(sender, receiver, step, round)`` returns None (deliver),
``"drop"``, ``"corrupt"`` (the frame's bytes are damaged: the receiver counts a bad frame) or
an int n >= 1 (deliver after n scheduler passes: late and out of order). ``crash(eid)``
makes an expert raise at its next round start. ``inject_frame(eid, data)`` puts raw bytes
into a mailbox (a bad frame is counted and ignored, never crashes the expert).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import trio

from .. import routing
from ..config import AgentConfig, ConfigError
from ..engine import InputError, check_add, check_horizon, check_rounds, check_values, growth_init, integers
from ..membrane import Interface, normal_seats, seat_array
from ..rollout import StepInfo, Wiring, clone_candidates, fresh_state, initial_state, rebalance_plan
from ..xp import NumpyOps
from .batcher import PolicyBatcher, PolicyCallError
from .lifecycle import AgentClosed, Lifecycle, StepTimeout
from .supervisor import Supervision
from .transport import MEMBRANE, Counters, Envelope, Fault, Frame, Lost
from .directory import Directory
from .expert import COLLECT, DONE, IDLE, SEND, VOTE, ExpertCore
from .membrane_core import MembraneCore
from .messages import Message, MessageError, encode

log = logging.getLogger("badger_runtime.actors")
OPS = NumpyOps()



class ExpertCrash(RuntimeError):
    """Raised inside an expert by ``ActorAgent.crash`` (fault injection)."""


@dataclass
class _Record:
    core: ExpertCore
    send: trio.MemorySendChannel
    recv: trio.MemoryReceiveChannel
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    snapshot: object = None
    restarts: int = 0
    crash_at: str | None = None
    removed: bool = False


class ActorAgent(Lifecycle):
    """One agent of N experts as trio actors, stepped by its membrane (see the module doc).

    ``interface`` and ``wiring`` describe one episode (batch 1: ``select`` of the batched ones):
    slot and output addresses, which experts sense / push, the topology, initial noise and
    identity features. ``expert_ids`` names the experts (default
    0..N-1, in wiring order; messages are ordered by id, so ids in wiring order reproduce the
    batched engine's summation order), ``spawn_order`` the order their tasks start.
    """

    def __init__(self, policy, cfg: AgentConfig, interface: Interface, wiring: Wiring, *,
                 expert_ids=None, spawn_order=None, micro_batch: bool = True, encode: bool = True,
                 supervision: Supervision | None = None, fault: Fault | None = None, episode_index: int = 0,
                 seed: int = 0, step_timeout: float | None = 60.0, past_horizon: bool = False):
        if cfg.routing.ablation == "shuffle":
            raise ConfigError("the 'shuffle' messages ablation runs in the batched engine only")
        if interface.batch != 1 or wiring.noise.shape[0] != 1:
            raise ValueError("an ActorAgent runs one episode: pass batch-1 selections (interface.select([b]))")
        self.policy = policy
        self.cfg = cfg
        self.spec = cfg.policy
        self.past_horizon = past_horizon  # step an episodic policy past its horizon (asked for explicitly)
        self.interface = interface
        self.slot_addr = np.asarray(interface.slot_addr[0], np.float32)
        self.out_addr = np.asarray(interface.out_addr[0], np.float32)
        self.encode = encode
        self.supervision = supervision or Supervision()
        self.fault = fault
        self.episode_index = episode_index
        self.step_timeout = step_timeout
        self.rng = np.random.default_rng([seed, episode_index, 2])
        self.counters = Counters()
        self.events: deque = deque(maxlen=1000)  # (what, expert, detail) of crashes, restarts, changes
        # test hook, called when an expert computes its inbox: (receiver, step, round, senders)
        self.on_deliver: Callable | None = None
        n = wiring.n_experts
        ids = list(range(n)) if expert_ids is None else [int(i) for i in expert_ids]
        if len(ids) != n:
            raise ValueError(f"{len(ids)} expert ids for {n} experts")
        topo = wiring.route_mask
        topo = routing.Neighbors(topo.idx[0:1]) if isinstance(topo, routing.Neighbors) else (
            None if topo is None else topo[0])
        self.directory = Directory.from_wiring(cfg.routing, ids, topo, wiring.can_sense, wiring.can_push, self.rng,
                                               wiring.seats)
        self.batcher = PolicyBatcher(policy, micro_batch, expected=self.directory.n_active)
        st = initial_state(OPS, policy, wiring)
        self._records: dict[int, _Record] = {}
        for i, e in enumerate(ids):
            ident = None if wiring.ids is None else wiring.ids[0, i]
            self._new_record(e, st.h[0, i], st.heads[0, i], ident)
        self._next_id = max(ids) + 1
        self._spawn_order = list(ids) if spawn_order is None else [int(i) for i in spawn_order]
        if sorted(self._spawn_order) != sorted(ids):
            raise ValueError("spawn_order must list every expert id once")
        self._mb_send, self._mb_recv = trio.open_memory_channel(math.inf)
        self._nursery: trio.Nursery | None = None
        self._closed = trio.Event()
        self.stopped = trio.Event()  # set when run() has ended and everything is accounted
        self.t = 0
        self._stepping = False
        self._rebalance_due = False
        self.membrane = MembraneCore(self.spec, interface, self.directory)  # the membrane's view of a stage
        for e, rec in self._records.items():
            self.membrane.set_read_query(e, rec.core.competitive_query())

    # -- lifecycle ----------------------------------------------------------------------
    def _new_record(self, eid: int, h, heads, ident) -> _Record:
        m = self.directory.members[eid]
        core = ExpertCore(eid, self.spec, self.cfg.routing, h, heads, ident, can_sense=m.can_sense,
                          can_push=m.can_push, senders=self.directory.senders_of(eid),
                          receivers=self.directory.receivers_of(eid))
        send, recv = trio.open_memory_channel(math.inf)
        rec = _Record(core, send, recv)
        rec.snapshot = core.snapshot()
        self._records[eid] = rec
        return rec

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        """Own the expert tasks until ``close()`` (use with ``nursery.start``)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for e in self._spawn_order:
                    nursery.start_soon(self._supervise, e, self._records[e])
                task_status.started(self)
                await self._closed.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._shutdown()
            self.stopped.set()


    def _shutdown(self):
        """Count what is still in flight as dropped ('shutdown') and close the mailboxes."""
        for rec in self._records.values():
            self.counters.drop("shutdown", self._drain(rec) + rec.core.discard_all())
        self._records.clear()
        self._nursery = None
        self._mb_send.close()  # a step still waiting for its experts ends (AgentClosed) instead of hanging

    def _drain(self, rec: _Record) -> int:
        n = 0
        while True:
            try:
                item = rec.recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if isinstance(item, Envelope) and item.meta is not None:
                n += 1
        rec.send.close()
        rec.recv.close()
        return n

    # -- membership ----------------------------------------------------------------------
    def live_ids(self) -> list[int]:
        return self.directory.live()

    def expert_ids(self) -> list[int]:
        return self.live_ids()

    @property
    def n_experts(self) -> int:
        return len(self.directory.members)

    def add_experts(self, n: int, init: str | None = None, source: int | None = None, *,
                    allow_harmful: bool = False) -> list[int]:
        """Add n experts while the agent runs (they join at the next inner step); returns their ids.

        ``clone`` copies a living expert's current state and messages (``source``, or a random
        one per new expert), ``fresh`` starts from the policy's initial state with new noise,
        as ``rollout.grow`` does; None: the kind the card does not refuse (``engine.default_init``).
        Unlike ``rollout.grow``, nobody else is rewired: the newcomer gets edges by the directory's
        growing rule (see ``directory``)."""
        self._check_open()
        check_add(self.cfg, len(self._records), n, 1)
        init = growth_init(self.policy, init, source, allow_harmful)
        if source is not None and source not in self._records:
            raise InputError(f"no expert {source} to clone")
        new = []
        live = self.live_ids()  # in the order of the membrane's visibility rows
        cands = (clone_candidates(self.interface, len(live), n, self.directory.seats(live))
                 if init == "clone" and source is None else None)
        for i in range(n):
            eid = self._next_id
            self._next_id += 1
            if init == "clone":
                if source is not None:
                    src = source
                elif cands is not None and cands[i].size:  # an expert that senses what the newcomer will
                    src = int(live[int(self.rng.choice(cands[i]))])
                else:
                    src = int(self.rng.choice(self.live_ids()))
            else:
                src = None
            h, heads = self._start_state(src)
            ident = (self.rng.standard_normal(self.spec.id_dim).astype(np.float32) if self.spec.id_dim else None)
            member, senders, receivers = self.directory.plan_add(eid, src)
            self.directory.add(member, senders, receivers)
            rec = self._new_record(eid, h, heads, ident)
            self.membrane.set_read_query(eid, rec.core.competitive_query())
            for e in (senders | receivers) - {eid}:
                self._post(e, Message("control", MEMBRANE, (e,), self.episode_index, member.join, 0,
                                      {"op": "add", "id": eid, "join": member.join,
                                       "hears_me": int(e in senders), "i_hear": int(e in receivers)}))
            self.counters.added += 1
            self.events.append(("add", eid, {"init": init, "source": src, "join": member.join}))
            log.info("expert %d added (%s of %s), joins at step %d", eid, init, src, member.join)
            if self._nursery is not None:
                self._nursery.start_soon(self._supervise, eid, rec)
            else:
                self._spawn_order.append(eid)
            new.append(eid)
        return new

    def remove_experts(self, ids, reason: str = "removed") -> int:
        """Remove experts at once, even mid-step; returns how many remain (at least one must)."""
        self._check_open()
        ids = integers(ids, "expert ids")
        unknown = [i for i in ids if i not in self._records]
        if unknown:
            raise InputError(f"no experts {unknown} (live: {self.live_ids()})")
        if len(ids) >= len(self._records):
            raise InputError("cannot remove every expert: an agent needs at least one")
        for e in ids:
            rec = self._records.pop(e)
            if self._nursery is None and e in self._spawn_order:  # not started yet: never will be
                self._spawn_order.remove(e)
            self.directory.remove(e)
            rec.removed = True
            rec.scope.cancel()
            self.batcher.withdraw(e)
            self.counters.drop("receiver_removed", self._drain(rec) + rec.core.discard_all())
            self.counters.removed += 1
            self.events.append(("remove", e, reason))
            log.info("expert %d removed (%s)", e, reason)
        payload = {"op": "remove", "ids": np.asarray(ids, np.int64)}
        for e in self._records:
            self._post(e, Message("control", MEMBRANE, (e,), self.episode_index, max(self.t, 0), 0, payload))
        lone = self.directory.lone_hears_itself()
        if lone is not None:  # as routing.topology: a lone expert hears itself rather than no one
            join = self.directory.next_join()  # from the next step: this one's messages are sent
            self._post(lone, Message("control", MEMBRANE, (lone,), self.episode_index, max(self.t, 0), 0,
                                     {"op": "add", "id": lone, "join": join, "hears_me": 1, "i_hear": 1}))
        self._to_membrane(Message("control", MEMBRANE, (MEMBRANE,), self.episode_index, max(self.t, 0), 0, payload))
        if self._stepping:
            self._rebalance_due = True  # when the stage is over: experts are re-seated between steps
        else:
            self._rebalance()
        if self.batcher.micro_batch:
            self.batcher.poke()
        return len(self._records)

    def _start_state(self, src: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(h, heads) of an expert that starts now: a copy of expert ``src``'s, or fresh (new noise)."""
        if src is not None:
            core = self._records[src].core
            return core.h.copy(), core.heads.copy()
        noise = self.rng.standard_normal((1, 1, self.spec.hidden)).astype(np.float32)
        fresh = fresh_state(OPS, self.policy, noise)
        return fresh.h[0, 0], fresh.heads[0, 0]

    def _rebalance(self):
        """After a removal, as the batched engine (``rollout.rebalance_plan``): survivors of parts over
        their share move to the parts left short of readers and restart there, as clones of a reader
        of the new part or fresh. Between steps only (every expert is idle)."""
        self._rebalance_due = False
        live = self.live_ids()
        seats, moves = rebalance_plan(self.interface, normal_seats(self.directory.seats(live)), len(live))
        seats = seat_array(seats, len(live))
        for i, src in moves:
            eid = live[i]
            rec = self._records[eid]
            h, heads = self._start_state(live[src] if src >= 0 else None)
            self.directory.members[eid].seat = int(seats[i])
            rec.core.h, rec.core.heads = np.array(h, np.float32), np.array(heads, np.float32)
            rec.snapshot = rec.core.snapshot()
            self.membrane.set_read_query(eid, rec.core.competitive_query())
            self.events.append(("reseat", eid, {"seat": int(seats[i]), "source": live[src] if src >= 0 else None}))
            log.info("expert %d re-seated at %d (%s)", eid, seats[i], "fresh" if src < 0 else f"clone of {live[src]}")

    # -- fault injection (tests) -------------------------------------------------------------
    def crash(self, eid: int, at: str = "send"):
        """Make expert ``eid`` raise at its next ``at`` point ('send': a round start; 'observe')."""
        self._records[eid].crash_at = at

    def inject_frame(self, eid: int, data):
        """Put raw bytes (or a Message) into expert ``eid``'s mailbox, outside the transport."""
        frame = Frame(None, data) if isinstance(data, Message) else Frame(data)
        self._records[eid].send.send_nowait(Envelope(frame))

    def snapshot(self) -> dict:
        """Each live expert's state and wiring (for tests and references; experts never read it)."""
        out = {}
        for e in self.live_ids():
            c, m = self._records[e].core, self.directory.members[e]
            out[e] = {"h": c.h.copy(), "heads": c.heads.copy(), "ident": None if c.ident is None else c.ident.copy(),
                      "can_sense": m.can_sense, "can_push": m.can_push, "join": m.join, "seat": m.seat}
        return out

    # -- the transport -------------------------------------------------------------------
    def _frame(self, msg: Message) -> Frame:
        return Frame(encode(msg)) if self.encode else Frame(None, msg)

    def _post(self, eid: int, msg: Message):
        """Runtime -> expert frames (observations, verdicts, control): reliable, not counted."""
        rec = self._records.get(eid)
        if rec is not None:
            self._put(rec.send, Envelope(self._frame(msg)))

    def _to_membrane(self, msg: Message):
        self._put(self._mb_send, Envelope(self._frame(msg)))

    def _put(self, send: trio.MemorySendChannel, item):
        """Into a mailbox (unbounded, with the invariant in ``transport``: the peak is recorded)."""
        send.send_nowait(item)
        used = send.statistics().current_buffer_used
        if used > self.counters.peak_mailbox:
            self.counters.peak_mailbox = used

    def _send_msg(self, sender: int, t: int, r: int, payload: dict, to: list[int]):
        if not to:
            return
        msg = Message("msg", sender, tuple(to), self.episode_index, t, r, payload)
        frame = self._frame(msg)
        meta = (sender, t, r)
        for rcv in to:
            self.counters.sent += 1
            action = None if self.fault is None else self.fault(sender, rcv, t, r)
            if action is None:
                self._deliver(rcv, Envelope(frame, meta))
            elif action == "drop":
                self._lose(rcv, meta, "fault")
            elif action == "corrupt":
                raw = bytearray(frame.data if frame.data is not None else encode(msg))
                raw[len(raw) // 2 :] = b"\xc1" * (len(raw) - len(raw) // 2)  # 0xc1: never valid msgpack
                self._deliver(rcv, Envelope(Frame(bytes(raw)), meta))
            elif isinstance(action, int) and action >= 1 and self._nursery is not None:
                self._nursery.start_soon(self._deliver_later, rcv, Envelope(frame, meta), action)
            else:
                raise ValueError(f"fault hook returned {action!r}: None, 'drop', 'corrupt' or an int >= 1")

    def _deliver(self, rcv: int, env: Envelope):
        rec = self._records.get(rcv)
        if rec is None:
            self.counters.drop("no_receiver")
            return
        self._put(rec.send, env)

    def _lose(self, rcv: int, meta, reason: str):
        self.counters.drop(reason)
        rec = self._records.get(rcv)
        if rec is not None:
            rec.send.send_nowait(Lost(*meta))

    async def _deliver_later(self, rcv: int, env: Envelope, passes: int):
        try:
            for _ in range(passes):
                await trio.sleep(0)
        except trio.Cancelled:
            self.counters.drop("shutdown")
            raise
        self._deliver(rcv, env)

    # -- an expert ---------------------------------------------------------------------
    async def _supervise(self, eid: int, rec: _Record):
        if rec.removed:  # removed before its task first ran (its mailbox is closed): nothing to do
            return
        with rec.scope:
            while True:
                try:
                    await self._expert(eid, rec)
                    return
                except Exception as exc:  # the supervision boundary: an expert's failure stays its own
                    if rec.removed:  # it failed on its way out (a closed mailbox): not a crash
                        return
                    self.counters.crashes += 1
                    self.events.append(("crash", eid, repr(exc)))
                    log.warning("expert %d crashed at step %d round %d: %r", eid, rec.core.t, rec.core.r, exc)
                    action = self.supervision.decide(rec.restarts, alone=len(self._records) == 1,
                                                     shared=isinstance(exc, PolicyCallError))
                    if action == "escalate":
                        raise
                    if action == "restart":
                        rec.restarts += 1
                        self.counters.restarts += 1
                        rec.core.restore(rec.snapshot)
                        self.events.append(("restart", eid, rec.restarts))
                        log.warning("expert %d restarted from its last state (restart %d)", eid, rec.restarts)
                        continue
                    if self._closed.is_set():  # closing: every expert goes anyway
                        return
                    self.counters.removed_on_crash += 1
                    self.remove_experts([eid], reason="crashed")
                    return

    def _crash_point(self, rec: _Record, where: str):
        if rec.crash_at == where:
            rec.crash_at = None
            raise ExpertCrash(f"injected crash of expert {rec.core.eid} at {where}")

    async def _pump(self, eid: int, rec: _Record, ready: Callable[[], bool]):
        """Handle mail until ``ready()``. Everything already in the mailbox is handled first, so
        an expert acts on the latest news (e.g. never uses a message from an expert whose
        removal notice is waiting)."""
        while True:
            while True:
                try:
                    item = rec.recv.receive_nowait()
                except trio.WouldBlock:
                    break
                self._handle(eid, rec, item)
            if ready():
                return
            item = await rec.recv.receive()
            if rec.removed:  # handed over just before the removal: it dies with the expert
                if isinstance(item, Envelope) and item.meta is not None:
                    self.counters.drop("receiver_removed")
                await trio.lowlevel.checkpoint()  # raises Cancelled
            self._handle(eid, rec, item)

    async def _still_here(self, rec: _Record):
        """After an await: a removed expert does nothing more (its cancelled scope ends it here)."""
        if rec.removed:
            await trio.lowlevel.checkpoint()

    def _handle(self, eid: int, rec: _Record, item):
        core = rec.core
        if isinstance(item, Lost):
            core.on_lost(item.sender, item.step, item.round)
            return
        self.counters.frames += 1
        try:
            msg = item.frame.message()
            if msg.kind == "msg":
                if item.meta is None or item.meta != (msg.sender, msg.step, msg.round):
                    raise MessageError("msg frame that the transport did not carry")
                why = core.on_message(msg)
                if why is not None:
                    self.counters.drop(why)
            elif msg.sender != MEMBRANE:
                raise MessageError(f"{msg.kind} frame from expert {msg.sender}: only the membrane sends those")
            elif msg.kind == "observe":
                core.on_observe(msg, self.cfg.agreement.rule == "fixed")
            elif msg.kind == "vote":
                core.on_decision(msg.step, msg.round, msg.payload.get("decision") == "stop")
            elif msg.kind == "control":
                op = msg.payload["op"]
                if op == "add":
                    p = msg.payload
                    core.on_peer_added(int(p["id"]), int(p["join"]), bool(p["hears_me"]), bool(p["i_hear"]))
                elif op == "remove":
                    self.counters.drop("sender_removed", core.on_peers_removed(msg.payload["ids"].tolist()))
            else:
                raise MessageError(f"{msg.kind} frames are not for experts")
        except (MessageError, KeyError, TypeError, ValueError, AttributeError) as e:
            self.counters.bad_frames += 1
            log.warning("expert %d: bad frame rejected: %s", eid, e)
            if item.meta is not None:
                self.counters.drop("bad_frame")
                core.on_lost(*item.meta)

    async def _expert(self, eid: int, rec: _Record):
        core = rec.core
        while True:
            rec.snapshot = core.snapshot()
            ph = core.phase
            if ph == IDLE:
                await self._pump(eid, rec, core.has_observation)
                await self._still_here(rec)
                self._crash_point(rec, "observe")
                core.begin_step()
            elif ph == SEND:
                self._crash_point(rec, "send")
                t, r = core.t, core.r
                payload, to = core.outbox()
                self._send_msg(eid, t, r, payload, to)
            elif ph == COLLECT:
                await self._pump(eid, rec, core.round_ready)
                await self._still_here(rec)
                inbox, senders = core.round_inbox()
                if self.on_deliver is not None:
                    self.on_deliver(eid, core.t, core.r, senders)
                h, heads = await self.batcher.step(eid, core.h, inbox, core.sensed)
                await self._still_here(rec)
                t, r = core.t, core.r
                vote, change, used = core.apply(h, heads)
                self.counters.delivered += used
                if core.phase == VOTE:
                    self._to_membrane(Message("vote", eid, (MEMBRANE,), self.episode_index, t, r,
                                              {"vote": vote, "change": change}))
            elif ph == VOTE:
                await self._pump(eid, rec, core.has_decision)
                await self._still_here(rec)
                core.take_decision()
            elif ph == DONE:
                t, rounds = core.t, core.r
                push = core.finish()
                payload = push if push is not None else {"done": rounds}
                if self.spec.competitive_heads:  # the membrane normalises these over every expert
                    payload = {**payload, "read_query": core.competitive_query()}
                self._to_membrane(Message("push" if push is not None else "vote", eid, (MEMBRANE,),
                                          self.episode_index, t, rounds, payload))

    # -- the membrane ----------------------------------------------------------------------
    def _membrane_handle(self, item: Envelope):
        self.counters.frames += 1
        try:
            msg = item.frame.message()
            self.membrane.on_frame(msg, msg.sender == MEMBRANE)
        except (MessageError, KeyError, TypeError, ValueError, AttributeError) as e:
            self.counters.bad_frames += 1
            log.warning("membrane: bad frame rejected: %s", e)

    async def _membrane_wait(self, ready: Callable[[], bool]):
        while not ready():
            try:
                item = await self._mb_recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise AgentClosed(f"the agent was closed while step {self.t} ran") from None
            self._membrane_handle(item)

    async def step(self, slot_values, rounds: int | None = None) -> tuple[np.ndarray, StepInfo]:
        """One inner step: slot values [1, J] (``interface.parts``) -> outputs [1, d]."""
        self._check_steppable()
        check_horizon(self.policy, self.t, self.past_horizon)
        vals = check_values("observation", slot_values, (1, self.slot_addr.shape[0]))[0]
        R = check_rounds(rounds) or self.cfg.agreement.rounds
        scope = trio.fail_after(self.step_timeout) if self.step_timeout else nullcontext()
        if self._rebalance_due:  # a removal during a step that did not finish
            self._rebalance()
        try:
            with self._one_step(), scope:
                return await self._step(vals, R)
        except trio.TooSlowError:
            waiting = {e: (r.core.phase, r.core.t, r.core.r, r.core.missing())
                       for e, r in self._records.items() if r.core.phase != IDLE}
            raise StepTimeout(f"step {self.t} did not finish in {self.step_timeout}s; experts not idle "
                              f"(phase, step, round, waiting for): {waiting}") from None

    async def _step(self, vals: np.ndarray, R: int) -> tuple[np.ndarray, StepInfo]:
        t, core = self.t, self.membrane
        delivered0, frames0 = self.counters.delivered, self.counters.frames
        self.directory.begin_step(t)
        for e, payload in core.observations(vals, R):
            self._post(e, Message("observe", MEMBRANE, (e,), self.episode_index, t, 0, payload))
        used = R
        acfg = type(self.cfg.agreement)(**{**self.cfg.agreement.__dict__, "rounds": R})
        if acfg.rule != "fixed":
            for r in range(R - 1):
                await self._membrane_wait(lambda: core.votes_ready(t, r))
                stop, verdicts = core.verdicts(acfg, t, r)
                for e, payload in verdicts:
                    self._post(e, Message("vote", MEMBRANE, (e,), self.episode_index, t, r, payload))
                if stop:
                    used = r + 1
                    break
        await self._membrane_wait(lambda: core.stage_done(t))
        out, expert_rounds = core.outputs(t)
        info = StepInfo(np.array([used]), messages=self.counters.delivered - delivered0,
                        experts=len(expert_rounds), frames=self.counters.frames - frames0,
                        expert_rounds=expert_rounds)
        self.t += 1
        if self._rebalance_due:
            self._rebalance()
        return out[None], info

"""One expert as a sans-IO state machine: its state, what it has heard, what it says next.

``ExpertCore`` holds everything one expert owns: its recurrent state ``h``, the heads of its
last policy step (its query/key/value message, read query, vote and push: *its outbox*), its
identity features, what it has sensed this step, its view of who it talks to, and the
messages it has received but not yet used. It does no IO and never awaits: the actor shell
(``runtime.ActorAgent``) feeds it decoded messages (``on_*``) and asks it for the next effect
(``outbox``, ``round_inbox``, ``apply``, ``finish``), in the manner of h11's protocol objects.
So it is tested without an event loop, and a supervisor can snapshot and restore it.

The maths are the shared functions, called on one expert (B = 1 slices):

- sensing: ``membrane.sense`` with this expert's read query over the slots the membrane
  showed it (an expert that may see no slot senses zeros, as a fully masked softmax gives);
- routing, receiver side: a sender sends its (key, value) to its out-neighbours; the receiver
  scores the keys it received with its *own* query and calls ``routing.route`` (dense softmax,
  top-k, or the uniform homogeneous average) over exactly those senders, ordered by sender
  id. Hearing only one's in-neighbours equals the batched engine's masked softmax, so with
  every message delivered the inbox equals the engine's row for this expert. Top-k keeps
  every sender tied with the k-th score, as the dense engine does, so the choice never
  depends on ids or arrival order (the sparse engine, top-k over C candidates, breaks exact
  ties by position; they arise only between an expert and its clone). An expert that hears
  no one gets a zero inbox (a fully masked softmax);
- agreement: the vote (sigmoid of the vote head) and the largest change of the message value
  in the round, which the membrane needs to apply ``agreement.still_talking``.

Phases of one inner step::

    idle --observe--> send(t, 0) --outbox sent--> collect(t, r) --policy step--> (vote | send(t, r+1) | done)
    vote --decision--> send(t, r+1) | done;     done --finish--> idle
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .. import agreement, membrane, routing
from ..config import PolicySpec, RoutingConfig
from ..rollout import split_heads
from ..xp import NumpyOps
from .messages import Message, MessageError

OPS = NumpyOps()

IDLE, SEND, COLLECT, VOTE, DONE = "idle", "send", "collect", "vote", "done"

# The transitions of one inner step, as a table (event -> (phase it needs, phases it may lead to)).
TRANSITIONS = {
    "begin_step": (IDLE, (SEND,)),
    "outbox": (SEND, (COLLECT,)),
    "apply": (COLLECT, (SEND, VOTE, DONE)),
    "take_decision": (VOTE, (SEND, DONE)),
    "finish": (DONE, (IDLE,)),
}


class PhaseError(RuntimeError):
    """An event in a phase where it is illegal (a runtime bug; never stripped like an assert)."""


@dataclass
class Observation:
    step: int
    slot_addr: np.ndarray  # [J, A] the slots this expert may read (J may be 0)
    slot_val: np.ndarray  # [J]
    rounds: int  # the stage's round limit
    fixed: bool  # fixed rule: no decisions to wait for
    competed: np.ndarray | None = None  # [Kc*(1+A) + Kc] the competitive heads' reads (from the membrane)


@dataclass
class Snapshot:
    """What a supervisor restores after a crash (the mailbox and buffered messages are kept)."""

    h: np.ndarray
    heads: np.ndarray
    sensed: np.ndarray | None
    phase: str
    t: int
    r: int
    rounds: int
    fixed: bool
    consumed: tuple[int, int]


class ExpertCore:
    """One expert: its own state and its own view of its neighbours (see the module doc)."""

    def __init__(self, eid: int, spec: PolicySpec, route_cfg: RoutingConfig, h, heads, ident=None, *,
                 can_sense: bool = True, can_push: bool = True, senders: dict[int, int] | None = None,
                 receivers: dict[int, int] | None = None):
        self.eid = eid
        self.spec = spec
        self.route_cfg = route_cfg
        self.h = np.asarray(h, np.float32).copy()
        self.heads = np.asarray(heads, np.float32).copy()
        self.ident = None if ident is None else np.asarray(ident, np.float32).copy()
        self.can_sense = bool(can_sense)
        self.can_push = bool(can_push)
        # who I hear / who hears me: expert id -> first inner step it takes part in
        self.senders: dict[int, int] = dict(senders or {})
        self.receivers: dict[int, int] = dict(receivers or {})
        self.phase = IDLE
        self.t, self.r, self.rounds, self.fixed = -1, 0, 1, True
        self.sensed: np.ndarray | None = None
        self.consumed = (-1, -1)  # the last (step, round) whose inbox was used
        self._obs: deque[Observation] = deque()
        self._got: dict[tuple[int, int], dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        self._lost: dict[tuple[int, int], set[int]] = {}
        self._decisions: dict[tuple[int, int], bool] = {}

    # -- the mailbox side: what arrives ------------------------------------------------
    def on_observe(self, msg: Message, fixed: bool):
        p = msg.payload
        addr, val, rounds = p.get("slot_addr"), p.get("slot_val"), p.get("rounds")
        A = self.spec.addr_dim
        if (not isinstance(addr, np.ndarray) or not isinstance(val, np.ndarray) or addr.ndim != 2
                or addr.shape[1] != A or val.shape != addr.shape[:1] or type(rounds) is not int or rounds < 1):
            raise MessageError(f"observe: needs slot_addr [J, {A}], slot_val [J] and rounds >= 1")
        kc = self.spec.competitive_heads
        competed = p.get("competed")
        width = kc * (self.spec.read_width + 1)
        if kc and (not isinstance(competed, np.ndarray) or competed.shape != (width,)):
            raise MessageError(f"observe: a policy with {kc} competitive heads needs 'competed' [{width}]")
        self._obs.append(Observation(msg.step, addr, val, rounds, fixed, competed if kc else None))

    def on_message(self, msg: Message) -> str | None:
        """Buffer a routed message; returns None, or why it is discarded (counted dropped).
        A message that is malformed for this policy raises MessageError (a bad frame)."""
        key, value = msg.payload["key"], msg.payload["value"]
        if key.shape != (self.spec.key_dim,) or value.shape != (self.spec.msg_dim,):
            raise MessageError(f"msg: key {key.shape} / value {value.shape} do not fit this policy "
                               f"({self.spec.key_dim},) / ({self.spec.msg_dim},)")
        if not _addressed_to(msg, self.eid):
            raise MessageError(f"msg from {msg.sender} is not addressed to expert {self.eid}")
        at = (msg.step, msg.round)
        if msg.sender not in self.senders:
            return "unknown_sender"
        if at <= self.consumed:
            return "stale"
        got = self._got.setdefault(at, {})
        if msg.sender in got:  # at most once per sender and round (a resend after a crash)
            return "duplicate"
        got[msg.sender] = (key, value)
        return None

    def on_lost(self, sender: int, step: int, rnd: int):
        """The transport says a message to me from ``sender`` for (step, round) will not come."""
        if (step, rnd) > self.consumed:
            self._lost.setdefault((step, rnd), set()).add(sender)

    def on_decision(self, step: int, rnd: int, stop: bool):
        if step >= self.t:
            self._decisions[(step, rnd)] = stop

    def on_peer_added(self, eid: int, join: int, hears_me: bool, i_hear: bool):
        if hears_me:
            self.receivers[eid] = join
        if i_hear:
            self.senders[eid] = join

    def on_peers_removed(self, ids) -> int:
        """Forget removed experts; returns how many buffered messages from them are discarded."""
        gone = set(ids)
        for e in gone:
            self.senders.pop(e, None)
            self.receivers.pop(e, None)
        n = 0
        for got in self._got.values():
            for e in gone & got.keys():
                del got[e]
                n += 1
        return n

    def discard_all(self) -> int:
        """Drop everything buffered (this expert is removed); returns the message count."""
        n = sum(len(g) for g in self._got.values())
        self._got.clear()
        self._lost.clear()
        return n

    # -- the actor side: what to do next -----------------------------------------------
    def has_observation(self) -> bool:
        return bool(self._obs)

    def begin_step(self):
        """Take the next observation and sense it (idle -> send)."""
        self._require("begin_step")
        ob = self._obs.popleft()
        self.t, self.r, self.rounds, self.fixed = ob.step, 0, ob.rounds, ob.fixed
        kc, A = self.spec.competitive_heads, self.spec.addr_dim
        K = self.spec.read_heads - kc  # the heads this expert reads itself (the competitive ones: the membrane)
        if not self.can_sense or ob.slot_addr.shape[0] == 0:
            std = np.zeros((1, 1, K * self.spec.read_width), np.float32)
        else:
            rq = split_heads(self.spec, self.heads)["read_query"][kc * A:]
            std = membrane.read(OPS, rq[None, None, :], ob.slot_addr[None], ob.slot_val[None], None,
                                self.spec.read_moments)
        comp = None
        if kc:
            split = ob.competed.size - kc
            comp = (ob.competed[None, None, :split], ob.competed[None, None, split:])
        sensed = membrane.assemble(OPS, comp, std if K else None)[0, 0]
        if self.ident is not None:
            sensed = np.concatenate([sensed, self.ident])
        self.sensed = np.asarray(sensed, np.float32)
        self.phase = SEND

    def outbox(self) -> tuple[dict[str, np.ndarray], list[int]]:
        """This round's message (the heads of my last step) and who receives it (send -> collect)."""
        self._require("outbox")
        hd = split_heads(self.spec, self.heads)
        payload = {"key": hd["key"], "query": hd["query"], "value": hd["value"]}
        to = sorted(e for e, j in self.receivers.items() if j <= self.t)
        self.phase = COLLECT
        return payload, to

    def expected(self) -> set[int]:
        return {e for e, j in self.senders.items() if j <= self.t}

    def round_ready(self) -> bool:
        at = (self.t, self.r)
        have = self._got.get(at, {}).keys() | self._lost.get(at, set())
        return self.expected() <= have

    def missing(self) -> list[int]:
        at = (self.t, self.r)
        return sorted(self.expected() - self._got.get(at, {}).keys() - self._lost.get(at, set()))

    def round_inbox(self) -> tuple[np.ndarray, list[int]]:
        """My inbox for this round: my query against the keys I received (no state change)."""
        got = self._got.get((self.t, self.r), {})
        senders = sorted(got)
        if not senders:
            return np.zeros(self.spec.msg_dim, np.float32), senders
        keys = np.stack([got[s][0] for s in senders])
        vals = np.stack([got[s][1] for s in senders])
        q = split_heads(self.spec, self.heads)["query"]
        inbox, _ = routing.route(OPS, self.route_cfg, q[None, None, :], keys[None], vals[None], None)
        return np.asarray(inbox[0, 0], np.float32), senders

    def apply(self, h, heads) -> tuple[float, float, int]:
        """Commit the policy step of this round. Returns (vote, change, messages used)."""
        self._require("apply")
        h = np.asarray(h, np.float32).reshape(self.spec.hidden)
        heads = np.asarray(heads, np.float32).reshape(self.spec.heads_dim)
        old_v = split_heads(self.spec, self.heads)["value"]
        new = split_heads(self.spec, heads)
        change = float(agreement.message_change(OPS, old_v, new["value"]))
        vote = float(agreement.votes(OPS, new["vote"]))
        self.h, self.heads = h.copy(), heads.copy()
        at = (self.t, self.r)
        used = len(self._got.pop(at, {}))
        self._lost.pop(at, None)
        self.consumed = at
        self.r += 1
        if self.fixed:
            self.phase = DONE if self.r >= self.rounds else SEND
        else:
            self.phase = DONE if self.r >= self.rounds else VOTE
        return vote, change, used

    def _require(self, event: str):
        need = TRANSITIONS[event][0]
        if self.phase != need:
            raise PhaseError(f"expert {self.eid}: {event} in phase {self.phase!r} (it needs {need!r})")

    def has_decision(self) -> bool:
        return (self.t, self.r - 1) in self._decisions

    def take_decision(self):
        self._require("take_decision")
        stop = self._decisions.pop((self.t, self.r - 1))
        self.phase = DONE if stop else SEND

    def finish(self) -> dict[str, np.ndarray] | None:
        """End the stage (done -> idle): my push (key, value) if I may push, else None."""
        self._require("finish")
        self.phase = IDLE
        self._decisions = {k: v for k, v in self._decisions.items() if k[0] > self.t}
        if not self.can_push:
            return None
        hd = split_heads(self.spec, self.heads)
        return {"key": hd["push_key"], "value": hd["push_value"]}

    def competitive_query(self) -> np.ndarray:
        """My competitive read heads' queries (the membrane normalises them over every expert)."""
        return np.ascontiguousarray(split_heads(self.spec, self.heads)["read_query"][
            :self.spec.competitive_heads * self.spec.addr_dim])

    # -- supervision ------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        return Snapshot(self.h.copy(), self.heads.copy(), None if self.sensed is None else self.sensed.copy(),
                        self.phase, self.t, self.r, self.rounds, self.fixed, self.consumed)

    def restore(self, s: Snapshot):
        self.h, self.heads = s.h.copy(), s.heads.copy()
        self.sensed = None if s.sensed is None else s.sensed.copy()
        self.phase, self.t, self.r, self.rounds, self.fixed, self.consumed = (
            s.phase, s.t, s.r, s.rounds, s.fixed, s.consumed)


def _addressed_to(msg, eid: int) -> bool:
    """Is expert ``eid`` among the message's receivers? The set is built once per message
    object: a fan-out delivers the same object to every receiver (without encoding), which
    made the plain tuple scan O(N) per delivery, O(N^2) per round."""
    rs = msg.__dict__.get("_receiver_set")
    if rs is None:
        rs = msg.__dict__["_receiver_set"] = frozenset(msg.receivers)
    return eid in rs

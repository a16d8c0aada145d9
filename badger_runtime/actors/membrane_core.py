"""The actor agent's membrane as a sans-IO state machine (beside ``expert.ExpertCore``).

``MembraneCore`` is the membrane's side of one inner step, with no IO and no awaiting: the actor
shell (``runtime.ActorAgent``) asks it what to tell the experts (``observations``,
``verdicts``), feeds it every frame the experts send it (``on_frame``), asks whether it can go on
(``votes_ready``, ``stage_done``) and for the step's outputs (``outputs``). So the membrane's
logic (who sees which slot, the agreement decision, mixing the pushes into outputs) is tested
without an event loop, and the shell only moves frames.

One inner step::

    observations(t) -> [(expert, observe payload)]           every expert taking part
    for each round r < R - 1 (convergence / quorum rules only):
        on_frame(vote) ... until votes_ready(t, r)
        verdicts(t, r) -> (stop, [(expert, decision payload)])
    on_frame(push | done) ... until stage_done(t)
    outputs(t) -> (outputs [d], rounds used per expert)

The experts taking part are the directory's ``active()`` ones, read afresh at every question,
so an expert added or removed mid-step is accounted as the batched engine would.
"""

from __future__ import annotations

import numpy as np

from .. import agreement, membrane
from ..config import AgreementConfig, PolicySpec
from ..membrane import Interface, normal_seats
from ..xp import NumpyOps
from .directory import Directory
from .messages import Message, MessageError

OPS = NumpyOps()


class MembraneCore:
    """What the membrane knows during a step: the experts' votes, who finished, their pushes."""

    def __init__(self, spec: PolicySpec, interface: Interface, directory: Directory):
        self.spec = spec
        self.interface = interface
        self.directory = directory
        self.slot_addr = np.asarray(interface.slot_addr[0], np.float32)
        self.out_addr = np.asarray(interface.out_addr[0], np.float32)
        self._votes: dict[tuple[int, int], dict[int, tuple[float, float]]] = {}
        self._finished: dict[int, tuple[int, int]] = {}  # expert -> (step, rounds)
        self._pushes: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # expert -> (step, key, value)
        self._read_query: dict[int, np.ndarray] = {}  # expert -> its competitive heads' read queries

    def set_read_query(self, eid: int, query: np.ndarray):
        """An expert's competitive read queries (at its start; then from its end-of-stage frame)."""
        self._read_query[eid] = np.asarray(query, np.float32)

    # -- what the experts are told -----------------------------------------------------
    def visible(self, active: list[int]) -> np.ndarray:
        """[n, J] which slots each taking-part expert may read (by its seat, as the batched engine)."""
        J = self.slot_addr.shape[0]
        vis = self.interface.visible(len(active), normal_seats(self.directory.seats(active)))
        v = np.ones((len(active), J), bool) if vis is None else np.asarray(vis[0], bool).copy()
        v &= np.array([self.directory.members[e].can_sense for e in active], bool)[:, None]
        return v

    def observations(self, vals: np.ndarray, rounds: int) -> list[tuple[int, dict]]:
        """The observe payload of every expert taking part: the slots it may read and the round limit."""
        active = self.directory.active()
        vis = self.visible(active)
        out = [(e, {"slot_addr": self.slot_addr[vis[i]], "slot_val": vals[vis[i]], "rounds": rounds})
               for i, e in enumerate(active)]
        if self.spec.competitive_heads and active:  # normalised over every expert: computed here
            rq = np.stack([self._read_query[e] for e in active])[None]
            reads, shares = membrane.compete(OPS, rq, self.slot_addr[None], vals[None], vis[None],
                                             self.spec.read_moments)
            competed = np.concatenate([reads[0], shares[0]], axis=-1).astype(np.float32)
            for i, (_, payload) in enumerate(out):
                payload["competed"] = competed[i]
        return out

    def votes_ready(self, t: int, r: int) -> bool:
        return set(self.directory.active()) <= self._votes.get((t, r), {}).keys()

    def verdicts(self, acfg: AgreementConfig, t: int, r: int) -> tuple[bool, list[tuple[int, dict]]]:
        """After round r: stop or go on (``agreement.still_talking`` on the experts' reported votes and
        message changes, as the batched engine applies it), and the decision for each expert."""
        who = self.directory.active()
        if not who:  # everyone taking part was removed mid-step (only newcomers are left)
            return True, []
        got = self._votes.pop((t, r))
        votes = np.array([[got[e][0] for e in who]], np.float32)
        change = np.array([max(got[e][1] for e in who)], np.float32)
        stop = not bool(agreement.still_talking(OPS, acfg, r + 1, np.ones(1, bool), change, votes)[0])
        decision = {"decision": "stop" if stop else "continue"}
        return stop, [(e, decision) for e in who]

    def stage_done(self, t: int) -> bool:
        return all(self._finished.get(e, (-1,))[0] == t for e in self.directory.active())

    def outputs(self, t: int) -> tuple[np.ndarray, dict[int, int]]:
        """The step's outputs [d] (``membrane.push`` over the pushing experts) and each expert's rounds."""
        who = self.directory.active()
        pushers = [e for e in who if self.directory.members[e].can_push]
        if pushers:
            pk = np.stack([self._pushes[e][1] for e in pushers])[None]
            pv = np.stack([self._pushes[e][2] for e in pushers])[None]
            out, _ = membrane.push(OPS, pk, pv, self.out_addr[None], None)
            out = np.asarray(out[0], np.float32)
        else:
            out = np.zeros(self.out_addr.shape[0], np.float32)
        rounds = {e: self._finished[e][1] for e in who}
        self._votes = {k: v for k, v in self._votes.items() if k[0] > t}
        return out, rounds

    # -- what the experts say ----------------------------------------------------------
    def on_frame(self, msg: Message, from_membrane: bool):
        """Take a frame addressed to the membrane. Raises MessageError for one it refuses."""
        if msg.kind == "control" and from_membrane:  # a membership change: the questions above re-read
            if msg.payload.get("op") == "remove":     # the directory; what removed experts said is dropped
                for e in np.asarray(msg.payload["ids"]).tolist():
                    self._finished.pop(e, None), self._pushes.pop(e, None), self._read_query.pop(e, None)
            return
        if msg.sender not in self.directory.members:
            return  # a frame from an expert removed since it was sent
        A = self.spec.addr_dim
        if msg.kind == "push":
            k, v = msg.payload["key"], msg.payload["value"]
            if k.shape != (A,) or v.shape != (1 + A,):
                raise MessageError(f"push: key {k.shape} / value {v.shape}, expected ({A},) / ({1 + A},)")
            self._pushes[msg.sender] = (msg.step, k, v)
            self._finished[msg.sender] = (msg.step, msg.round)
            self._take_read_query(msg)
        elif msg.kind == "vote" and "done" in msg.payload:
            self._finished[msg.sender] = (msg.step, msg.round)
            self._take_read_query(msg)
        elif msg.kind == "vote":
            self._votes.setdefault((msg.step, msg.round), {})[msg.sender] = (
                float(msg.payload["vote"]), float(msg.payload["change"]))
        else:
            raise MessageError(f"{msg.kind} frames are not for the membrane")

    def _take_read_query(self, msg: Message):
        kc = self.spec.competitive_heads * self.spec.addr_dim
        if not kc:
            return
        q = msg.payload.get("read_query")
        if not isinstance(q, np.ndarray) or q.shape != (kc,):
            raise MessageError(f"{msg.kind}: a policy with competitive heads sends read_query [{kc}]")
        self._read_query[msg.sender] = q

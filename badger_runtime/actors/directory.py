"""The routing directory: who is alive, and the wiring between them. Nothing else.

What it holds, and why each piece must be shared:

- **membership**: the live expert ids and, for each, the first inner step it takes part in
  (an expert added during step t joins at step t + 1, so no stage ever sees half an expert).
  Delivery needs to know which mailboxes exist; the membrane and the policy micro-batcher
  need to know how many experts take part in a stage.
- **roles**: per expert, its layer (hardwired topology: input / hidden / output) and whether
  the membrane lets it sense the input slots and push outputs. These are the agent's
  wiring, drawn when the episode starts (``rollout.sample_wiring``), not learned state.
- **edges**: for each expert, whom it may hear (the topology mask of ``routing.topology``).
  With dense, top-k and homogeneous routing everyone hears everyone (up to self-loops); the
  hardwired and random graphs, and top-k's C candidate senders per receiver, are fixed
  per episode.

What it does *not* hold, and why it is not a central brain: no expert state, no keys,
queries or values, no messages, no attention weights, no votes. Every routing decision that
the policy makes (dense or top-k attention) is made by the receiving expert, with its own
query, over the keys it received in messages; the directory only says whose messages may
reach whom, as a wiring diagram does. It is consulted when experts are added or removed
(to give the newcomer and its neighbours their edges, sent to them as control messages) and
by the transport to find a mailbox; an expert's own view of its neighbours lives in the
expert (``ExpertCore.senders`` / ``receivers``) and changes only by messages.

Growing (``plan_add``): dense / top-k / homogeneous: the newcomer hears and is heard by
everyone. Hardwired: a clone takes its source's layer, a fresh expert joins the hidden
layer; its edges follow the layer rule of ``routing.topology``. Sender lists (random graph,
top-k over candidates): a clone copies its source's in- and out-edges; a fresh expert hears
``degree`` (or C) random experts and is heard by as many random experts (so in-degrees of
those grow by one: the graph stays connected without rewiring anyone else). Removing an
expert deletes its edges and nothing else: an expert whose senders are all gone hears no
one (a zero inbox), except that a lone survivor is given a self-loop, as
``routing.topology`` wires a lone expert. (``rollout.grow``, the batched engine's rule,
redraws the whole topology for the new size instead.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import routing
from ..config import RoutingConfig


@dataclass
class Member:
    eid: int
    layer: int  # 0 input, 1 hidden (or no layers), 2 output
    can_sense: bool
    can_push: bool
    join: int  # the first inner step this expert takes part in
    seat: int = 0  # which part of the input it reads, for life (membrane.Visibility)


class Directory:
    def __init__(self, cfg: RoutingConfig, rng: np.random.Generator | None = None, growth: str = "all"):
        if growth not in ("all", "layers", "random"):
            raise ValueError(f"unknown growth rule {growth!r}")
        self.cfg = cfg
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.growth = growth
        self.members: dict[int, Member] = {}
        self.hears: dict[int, set[int]] = {}  # receiver -> the senders it may hear
        self.step = -1  # the last inner step begun
        self._changes = 0  # membership changes so far (invalidates the cached active count)
        self._n_active = None

    @classmethod
    def from_wiring(cls, cfg: RoutingConfig, ids, topology, can_sense, can_push, rng=None,
                    seats=None) -> "Directory":
        """Build from one episode's wiring: ``topology`` is a mask [N, N] (receiver, sender), sender
        lists [N, C] (``routing.Neighbors`` of one episode), or None (everyone hears everyone);
        ``seats`` [N] (default 0 .. N - 1) the experts' seats."""
        ids = [int(i) for i in ids]
        n = len(ids)
        if len(set(ids)) != n:
            raise ValueError("expert ids must be distinct")
        sparse = isinstance(topology, routing.Neighbors)
        growth = ("random" if sparse else "layers" if cfg.kind == "hardwired" and n >= 3 else "all")
        d = cls(cfg, rng, growth)
        layers = routing.roles(cfg, n)
        seats = range(n) if seats is None else [int(s) for s in seats]
        for i, e in enumerate(ids):
            d.members[e] = Member(e, int(layers[i]), bool(can_sense[i]), bool(can_push[i]), 0, seats[i])
            if sparse:
                d.hears[e] = {ids[s] for s in topology.idx[0, i]}
            else:
                d.hears[e] = {ids[s] for s in range(n) if topology is None or topology[i, s]}
        return d

    # -- queries ---------------------------------------------------------------------
    def live(self) -> list[int]:
        return sorted(self.members)

    def active(self, step: int | None = None) -> list[int]:
        """Experts taking part in inner step ``step`` (default: the current one), by id."""
        t = self.step if step is None else step
        return sorted(e for e, m in self.members.items() if m.join <= t)

    def n_active(self) -> int:
        """How many experts take part in the current step (cached: asked once per policy request)."""
        key = (self.step, len(self.members), self._changes)
        if self._n_active is None or self._n_active[0] != key:
            self._n_active = (key, sum(1 for m in self.members.values() if m.join <= self.step))
        return self._n_active[1]

    def next_join(self) -> int:
        return self.step + 1

    def senders_of(self, eid: int) -> dict[int, int]:
        return {s: self.members[s].join for s in self.hears[eid]}

    def receivers_of(self, eid: int) -> dict[int, int]:
        return {r: self.members[r].join for r, hs in self.hears.items() if eid in hs}

    def seats(self, ids) -> np.ndarray:
        """The seats [n] of experts ``ids``, in that order."""
        return np.array([self.members[e].seat for e in ids], np.int64)

    def free_seat(self) -> int:
        """The lowest seat no live expert holds (where the next newcomer sits)."""
        taken = {m.seat for m in self.members.values()}
        return next(s for s in range(len(taken) + 1) if s not in taken)

    def mask(self, ids) -> np.ndarray:
        """The topology mask [n, n] (receiver, sender) among ``ids``, in that order."""
        ids = list(ids)
        return np.array([[s in self.hears[r] for s in ids] for r in ids], dtype=bool)

    # -- changes ---------------------------------------------------------------------
    def begin_step(self, t: int):
        self.step = t

    def plan_add(self, eid: int, source: int | None) -> tuple[Member, set[int], set[int]]:
        """The newcomer's member record (at the lowest free seat), the experts it hears, and the
        experts that hear it."""
        member, senders, receivers = self._plan_edges(eid, source)
        member.seat = self.free_seat()
        return member, senders, receivers

    def _plan_edges(self, eid: int, source: int | None) -> tuple[Member, set[int], set[int]]:
        live = self.live()
        join = self.next_join()
        loop = {eid} if self.cfg.self_loops else set()
        src = self.members.get(source) if source is not None else None
        if self.growth == "all":
            m = Member(eid, src.layer if src else 1, src.can_sense if src else True,
                       src.can_push if src else True, join)
            return m, set(live) | loop, set(live) | loop
        if self.growth == "layers":
            layer = src.layer if src else 1
            m = Member(eid, layer, layer == 0, layer == 2, join)

            def hears(recv_layer, send_layer):
                return send_layer == recv_layer - 1 or (recv_layer == 1 and send_layer == 1)

            senders = {e for e in live if hears(layer, self.members[e].layer)} | loop
            receivers = {e for e in live if hears(self.members[e].layer, layer)} | loop
            return m, senders, receivers
        # sender lists: random graph, or top-k over C candidates (degree = C)
        m = Member(eid, 1, src.can_sense if src else True, src.can_push if src else True, join)
        if src is not None:
            senders = (self.hears[source] - {source}) | loop
            receivers = {r for r, hs in self.hears.items() if source in hs and r != source} | loop
            return m, senders, receivers
        c = self.cfg.degree if self.cfg.kind == "random" else self.cfg.candidates
        k = min(c, len(live))
        senders = {int(e) for e in self.rng.choice(live, size=k, replace=False)} | loop
        receivers = {int(e) for e in self.rng.choice(live, size=k, replace=False)} | loop
        return m, senders, receivers

    def add(self, member: Member, senders: set[int], receivers: set[int]):
        e = member.eid
        if e in self.members:
            raise ValueError(f"expert {e} already exists")
        self.members[e] = member
        self._changes += 1
        self.hears[e] = set(senders)
        for r in receivers:
            if r != e:
                self.hears[r].add(e)

    def remove(self, eid: int):
        del self.members[eid]
        self._changes += 1
        del self.hears[eid]
        for hs in self.hears.values():
            hs.discard(eid)

    def lone_hears_itself(self) -> int | None:
        """If one expert is left and it hears no one, let it hear itself (as ``routing.topology``
        wires a lone expert); returns its id when this added the edge."""
        if len(self.members) == 1:
            (e,) = self.members
            if not self.hears[e]:
                self.hears[e] = {e}
                return e
        return None

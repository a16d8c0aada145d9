"""One shard of the sharded runtime, without IO: ``ShardCore`` holds the state of experts
[lo, hi) of B episodes and computes its part of the shared maths (sense, route, apply, push);
``actors.sharded.ShardedAgent`` is the trio shell that moves its blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import agreement, membrane, native, routing
from ..config import AgentConfig
from ..rollout import Wiring, split_heads
from ..xp import NumpyOps
from .messages import MessageError

OPS = NumpyOps()
DEFAULT_TILE = 4096  # receivers routed at once inside a shard
#: shards of at least this many experts route listed senders with the compiled kernel (routing_kernel.c) where it
#: applies. Smaller shards keep numpy's routing: the kernel computes the same inboxes to float rounding, not bit
#: for bit, and the published evaluations (docs/results.md, up to 1,280 experts) were made with numpy's.
#: N = 100,000: -32 to -35 % CPU per step (docs/benchmarks.md)
ROUTE_KERNEL_MIN_EXPERTS = 16_384


def routes_compiled(cfg: AgentConfig, topo, n: int, force: bool | None = None) -> bool:
    """Whether a shard of ``n`` experts routes with the compiled kernel: only attention over listed senders
    (a ``Neighbors`` topology, no ablation) and where the kernel is built; then ``force``, or by default
    when ``n >= ROUTE_KERNEL_MIN_EXPERTS``."""
    wanted = n >= ROUTE_KERNEL_MIN_EXPERTS if force is None else bool(force)
    if not wanted or not isinstance(topo, routing.Neighbors) or not routing.kernel_routes(cfg.routing):
        return False
    return routing.route_kernel() is not None  # (built at the first shard that wants it)


@dataclass
class ShardCounters:
    frames: int = 0  # messages handled by a mailbox (blocks, observations, votes, pushes)
    blocks: int = 0  # (key, value) blocks delivered shard -> shard
    block_bytes: int = 0  # their encoded size (encode=True)
    delivered: int = 0  # logical expert -> expert messages: receivers' in-degrees, per round taken
    bad_frames: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ShardPart:
    """What shard ``index`` owns, cut from a whole agent's arrays: its experts' rows."""

    index: int
    bounds: list  # every shard's [lo, hi)
    batch: int
    experts: int  # N, all shards together
    h: np.ndarray  # [B, n, H] (owned copies)
    heads: np.ndarray  # [B, n, heads_dim]
    ids: np.ndarray | None  # [B, n, id_dim]
    visible: np.ndarray | None  # [1 or B, n, J] or None (all)
    topo: object  # routing.Neighbors [B, n, C] | bool mask [B, n, N] | None (everyone hears everyone)


def cut(index: int, bounds: list[tuple[int, int]], wiring: Wiring, h, heads, visible) -> ShardPart:
    """Shard ``index``'s part of an agent (``visible``: every expert's, [1 or B, N, J] or None)."""
    lo, hi = bounds[index]
    B, N = wiring.noise.shape[:2]
    topo = wiring.route_mask
    if isinstance(topo, routing.Neighbors):
        topo = routing.Neighbors(topo.idx[:, lo:hi])
    elif topo is not None:
        topo = np.asarray(topo, bool)[:, lo:hi]
    return ShardPart(index, list(bounds), B, N, np.array(h[:, lo:hi], np.float32),
                     np.array(heads[:, lo:hi], np.float32),
                     None if wiring.ids is None else np.asarray(wiring.ids[:, lo:hi], np.float32),
                     None if visible is None else visible[:, lo:hi], topo)


def needs(bounds: list[tuple[int, int]], topo) -> list[int]:
    """The shards whose experts some expert of a shard may hear (``topo``: the shard's part of the
    topology, as in ``ShardPart``)."""
    starts = np.array([a for a, _ in bounds])
    if topo is None:
        need = set(range(len(bounds)))
    elif isinstance(topo, routing.Neighbors):
        need = set(np.unique(np.searchsorted(starts, topo.idx, side="right") - 1).tolist())
    else:
        heard = topo.any(axis=(0, 1))  # [N]
        need = {j for j, (a, b) in enumerate(bounds) if heard[a:b].any()}
    return sorted(need)


class ShardCore:
    """One shard: the state of experts [lo, hi) of B episodes and the shard's part of the maths.

    No IO and no awaiting (the trio shell is ``ShardedAgent``): ``sense`` at the start of an inner
    step, ``take_block`` for each (key, value) block heard, ``inbox`` for the round, ``apply``
    the policy's rows, ``push_block`` at the end.
    """

    def __init__(self, index: int, bounds: list[tuple[int, int]], policy, cfg: AgentConfig, wiring: Wiring,
                 h, heads, visible, tile: int = DEFAULT_TILE, compiled_routing: bool | None = None):
        self._setup(cut(index, bounds, wiring, h, heads, visible), cfg, tile, compiled_routing)

    @classmethod
    def from_part(cls, part: "ShardPart", cfg: AgentConfig, tile: int = DEFAULT_TILE,
                  compiled_routing: bool | None = None) -> "ShardCore":
        """A shard from its part, already cut from the agent's arrays (a shard living elsewhere:
        ``cluster.ray_shards`` sends each Ray actor only its part)."""
        core = cls.__new__(cls)
        core._setup(part, cfg, tile, compiled_routing)
        return core

    def _setup(self, part: "ShardPart", cfg: AgentConfig, tile: int, compiled_routing: bool | None = None):
        self.index = part.index
        self.lo, self.hi = part.bounds[part.index]
        bounds = part.bounds
        self.spec = spec = cfg.policy
        self.cfg = cfg
        self.h, self.heads = part.h, part.heads  # owned copies
        B, N = part.batch, part.experts
        self.B, self.N, self.n = B, N, self.hi - self.lo
        self.ids, self.visible, self.topo = part.ids, part.visible, part.topo
        self.tile = max(1, int(tile))
        # route with the compiled kernel (routing.route_listed_compiled): see routes_compiled
        self.compiled_routing = routes_compiled(cfg, self.topo, self.n, compiled_routing)
        self.needs = needs(bounds, self.topo)
        # [B] messages my experts hear per round (each of my n receivers: N senders, its C listed ones, or its mask row)
        if self.topo is None:
            self.indeg = np.full(B, self.n * N, np.int64)
        elif isinstance(self.topo, routing.Neighbors):
            self.indeg = np.full(B, self.n * self.topo.idx.shape[-1], np.int64)
        else:
            self.indeg = self.topo.sum(axis=(1, 2)).astype(np.int64)
        # senders' keys and values, as heard; read at random by the routing (rows on cache-line boundaries)
        self.keys = native.zeros_aligned((B, N, spec.key_dim), np.float32)
        self.values = native.zeros_aligned((B, N, spec.msg_dim), np.float32)
        self.inbox_buf = np.zeros((B, self.n, spec.msg_dim), np.float32)
        self.sensed: np.ndarray | None = None

    # -- an inner step ----------------------------------------------------------------
    def sense(self, slot_addr, slot_val, competed=None):
        """What my experts read from the input slots: rows of ``membrane.sense``. The competitive
        heads' part (``membrane.compete``, a normalisation over every expert) comes from the
        membrane: ``competed`` [B, n, Kc*(1+A) + Kc]."""
        spec = self.spec
        kc = spec.competitive_heads * spec.addr_dim
        rq = split_heads(spec, self.heads)["read_query"][..., kc:]
        std = None
        if rq.shape[-1]:
            parts = []
            for a in range(0, self.n, self.tile):
                b = min(a + self.tile, self.n)
                vis = None if self.visible is None else self.visible[:, a:b]
                parts.append(membrane.read(OPS, rq[:, a:b], slot_addr, slot_val, vis, spec.read_moments))
            std = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        comp = None
        if spec.competitive_heads:
            split = competed.shape[-1] - spec.competitive_heads
            comp = (competed[..., :split], competed[..., split:])
        sensed = membrane.assemble(OPS, comp, std)
        if self.ids is not None:
            sensed = np.concatenate([sensed, self.ids], axis=-1)
        self.sensed = np.ascontiguousarray(sensed, np.float32)
        return self.sensed

    def block(self) -> dict[str, np.ndarray]:
        """My experts' message of this round (the heads of their last step): [B, n, ...] views."""
        hd = split_heads(self.spec, self.heads)
        return {"key": hd["key"], "query": hd["query"], "value": hd["value"]}

    def take_block(self, lo: int, key, value):
        """Copy a block heard from the shard owning experts [lo, lo + n)."""
        n = key.shape[1]
        if key.shape != (self.B, n, self.spec.key_dim) or value.shape != (self.B, n, self.spec.msg_dim):
            raise MessageError(f"block: key {key.shape} / value {value.shape} do not fit "
                               f"({self.B}, n, {self.spec.key_dim}) / ({self.B}, n, {self.spec.msg_dim})")
        if lo < 0 or lo + n > self.N:
            raise MessageError(f"block: experts [{lo}, {lo + n}) outside [0, {self.N})")
        self.keys[:, lo:lo + n] = key
        self.values[:, lo:lo + n] = value

    def inbox(self) -> np.ndarray:
        """My receivers' inboxes this round: rows of ``routing.route`` over the senders heard."""
        q = split_heads(self.spec, self.heads)["query"]
        cfg = self.cfg.routing
        if self.compiled_routing and routing.route_listed_compiled(cfg, q, self.keys, self.values, self.topo.idx,
                                                                   self.inbox_buf):  # (a Neighbors topology)
            return self.inbox_buf  # one pass over all my receivers, no temporaries to bound by tiles
        for a in range(0, self.n, self.tile):
            b = min(a + self.tile, self.n)
            if isinstance(self.topo, routing.Neighbors):
                mask = routing.Neighbors(self.topo.idx[:, a:b])
            elif self.topo is None:
                # everyone hears everyone: route's homogeneous rule builds its own [N, N] weights,
                # so give it this tile's (all-true) rows instead
                mask = np.ones((self.B, b - a, self.N), bool) if cfg.kind == "homogeneous" else None
            else:
                mask = self.topo[:, a:b]
            inbox, _ = routing.route(OPS, cfg, q[:, a:b], self.keys, self.values, mask)
            self.inbox_buf[:, a:b] = inbox
        return self.inbox_buf

    def apply(self, h_new, heads_new, active: np.ndarray, rule: str, adopt: bool = False):
        """Commit the round's policy step (episodes no longer ``active`` keep their state).
        Returns (largest message change per episode [B], votes [B, n]) for the membrane.

        ``adopt``: keep ``h_new`` and ``heads_new`` themselves as the state instead of copying them
        (the caller leaves them alone until the next ``apply``: ``RowBatcher``'s double-buffered
        views); the rows of episodes no longer active are first overwritten with the kept state."""
        change = None
        if rule == "convergence":
            old, new = split_heads(self.spec, self.heads)["value"], split_heads(self.spec, heads_new)["value"]
            change = np.asarray(agreement.message_change(OPS, old, new).max(axis=1), np.float32)
        if adopt:
            if not active.all():
                np.copyto(h_new, self.h, where=~active[:, None, None])
                np.copyto(heads_new, self.heads, where=~active[:, None, None])
            self.h, self.heads = h_new, heads_new
        elif active.all():
            np.copyto(self.h, h_new)
            np.copyto(self.heads, heads_new)
        else:
            np.copyto(self.h, h_new, where=active[:, None, None])
            np.copyto(self.heads, heads_new, where=active[:, None, None])
        vote = None
        if rule == "quorum":
            vote = np.asarray(agreement.votes(OPS, split_heads(self.spec, self.heads)["vote"]), np.float32)
        return change, vote

    def vote_payload(self, change, vote) -> dict[str, np.ndarray]:
        """What the membrane decides agreement from after a round (``apply``'s results; zeros for
        what the rule does not use)."""
        return {"vote": vote if vote is not None else np.zeros((self.B, self.n), np.float32),
                "change": change if change is not None else np.zeros(self.B, np.float32)}

    def push_block(self) -> dict[str, np.ndarray]:
        """My experts' pushes, and the competitive read queries the membrane needs next step."""
        hd = split_heads(self.spec, self.heads)
        kc = self.spec.competitive_heads * self.spec.addr_dim
        return {"key": hd["push_key"], "value": hd["push_value"],
                "read_query": np.ascontiguousarray(hd["read_query"][..., :kc])}

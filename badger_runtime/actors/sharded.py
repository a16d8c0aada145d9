"""The actor runtime's fast path: experts in shards, one gathered tick per communication round.

The per-expert runtime (``runtime.ActorAgent``) makes every expert a trio task and every routed
message a frame in a mailbox; at ~5-10 us of Python per message, it is the *messages*, not the
policy, that cost. ``ShardedAgent`` keeps the actor model (actors that share nothing and talk only
by messages) but makes the actor a **shard** of many experts, so a round costs S^2 messages
instead of N x in-degree:

- **Shards** (trio tasks, ``shards`` of them, default one per core) partition the experts into
  contiguous ranges. A shard owns its experts' state (``h``, the heads of their last policy step,
  what they sensed) as arrays; nobody else reads or writes them.
- **A round is one gathered tick.** Each shard publishes its experts' (key, query, value) block
  as ONE ``msg`` message (``messages.Message``; msgpack-encoded with ``encode=True``, passed as
  the object otherwise) to the shards that may hear any of them (the wiring says which). Each
  shard copies the blocks it receives into its own sender arrays ``[B, N, Dk]`` / ``[B, N, Dm]``
  and computes its receivers' inboxes with ``routing.route`` (dense, top-k, homogeneous,
  hardwired masks, or the sparse O(N C) sender lists) over those arrays, in tiles of at most
  ``tile`` receivers so the temporaries stay in cache.
- **One policy evaluation per round.** Every shard hands its rows (state, inbox, sensed) to the
  shared ``RowBatcher``; the last one to arrive runs the policy on all rows of all shards and
  wakes the others, who take their rows back. onnxruntime is slower per row on one huge batch
  than on cache-sized ones (a 100,000-row call took ~2.3x as long as 25 calls of 4,096 rows on
  the 2-core machine), so the evaluation is split into calls of at most ``policy_chunk`` rows
  (0: one call), bound once to preallocated buffers (IOBinding, no copies of the outputs).
- **Agreement.** Fixed rounds need no coordination beyond the batcher. Convergence and quorum
  are predicates over all experts: after each round each shard sends the membrane one ``vote``
  message (its largest message change per episode, its experts' votes); the membrane applies
  ``agreement.still_talking`` (the batched engine's function) and sends back the episodes still
  talking; episodes that agreed keep their state, as in ``rollout.agent_step``.
- **The membrane** (the caller of ``step``) hands each shard the observation (one ``observe``
  message), and mixes the shards' ``push`` blocks with ``membrane.push``.

Each shard computes exactly the rows of ``rollout.agent_step`` for its experts, with the shared
functions (``membrane.sense``, ``routing.route``, ``agreement.still_talking``, ``membrane.push``,
``rollout.split_heads``), so the rollout equals the batched engine's (``run_sharded_episodes``
against ``evaluation.run_episodes``: tests/test_sharded.py, 1e-5 on the guesses) whatever the
number of shards. A ``ShardedAgent`` runs B episodes at once (batch-B wiring, as
``engine.Agent``).

Not here (the per-expert runtime has them): supervision and restarts, fault injection,
per-message delivery accounting. Growing and shrinking happen between inner steps: the shards'
states are gathered, changed with ``rollout.grow`` (the batched engine's rule) or a selection,
and the experts re-partitioned into shards. A failing policy call or shard ends the step
with its exception. Everything runs in one thread: shards interleave, they do not run in
parallel (onnxruntime's ``threads`` are the parallel part).
"""

from __future__ import annotations

import itertools
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import trio

from .. import agreement, membrane
from ..config import AgentConfig, ConfigError
from ..engine import InputError, check_add, check_horizon, check_rounds, check_values, expert_indices, growth_init
from ..membrane import Interface
from ..rollout import AgentState, StepInfo, Wiring, clone_sources, grow, initial_state, rebalance, shrink
from ..xp import NumpyOps
from .batcher import DEFAULT_POLICY_CHUNK, RowBatcher
from .lifecycle import AgentClosed, Lifecycle, StepTimeout
from .messages import Message, MessageError, encode
from .shard import DEFAULT_TILE, ShardCore, ShardCounters
from .transport import MEMBRANE, Frame

OPS = NumpyOps()
#: ``route_threads=None``: shards route in worker threads when one holds at least this many rows (B x n);
#: measured at N = 100,000 on 2 idle cores: 0.74 -> 0.615 s per step (docs/benchmarks.md)
ROUTE_THREAD_MIN_ROWS = 16_384


def default_shards(n_experts: int) -> int:
    """One shard per core (never more shards than experts)."""
    return max(1, min(n_experts, os.cpu_count() or 1))


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal expert ranges [lo, hi) for ``shards`` shards (none empty)."""
    shards = max(1, min(int(shards), n))
    edges = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


# ---- what every sharded runtime shares ------------------------------------------------------------

class ShardedMembrane:
    """The parts of a sharded runtime that do not depend on how shards talk: the partition of the
    experts into shards, the membrane's side of an inner step (the observation and the competitive
    heads' reads, the agreement verdict from the shards' votes, the outputs mixed from their
    pushes), and growing or shrinking between steps by the batched engine's rule. ``ShardedAgent``
    (trio tasks in this process) and ``cluster.ray_shards.RayShardedAgent`` (Ray actors) are its
    shells; a shell implements ``_build_shards`` (after a partition), ``_resize`` (after a membership
    change) and ``state()``."""

    def _init_membrane(self, policy, cfg: AgentConfig, interface: Interface, wiring: Wiring, *, shards, tile,
                       rng, past_horizon: bool, episode_index: int):
        if cfg.routing.ablation == "shuffle":
            raise ConfigError("the 'shuffle' messages ablation runs in the batched engine only")
        if interface.batch != wiring.batch:
            raise ValueError(f"interface batch {interface.batch} != wiring batch {wiring.batch}")
        self.policy, self.cfg, self.spec = policy, cfg, cfg.policy
        self.past_horizon = past_horizon  # step an episodic policy past its horizon (asked for explicitly)
        self.interface = interface
        self.B = wiring.batch
        self.episode_index = episode_index
        self.slot_addr = np.asarray(interface.slot_addr, np.float32)
        self.out_addr = np.asarray(interface.out_addr, np.float32)
        self._shards_wanted, self._tile = shards, tile
        self._rq_offset = self.spec.head_slices["read_query"].start
        self._rng = rng if rng is not None else np.random.default_rng([episode_index, 2])
        self.t = 0

    def _partition(self, wiring: Wiring, st: AgentState):
        """Cut the experts into shards (at start, and after a membership change)."""
        self.wiring = wiring
        self.N = N = wiring.n_experts
        self.can_push = None if wiring.can_push.all() else np.asarray(wiring.can_push[None, :], bool)
        vis = wiring.can_sense[None, :, None]
        visible = self.interface.visible(N, wiring.seats)
        if visible is not None:
            vis = vis & visible
        vis = None if vis.all() else np.asarray(vis, bool)
        self._vis = vis  # every expert's visibility (the competitive heads' normalisation is the membrane's)
        kc = self.spec.competitive_heads * self.spec.addr_dim
        self._read_query = np.array(st.heads[..., self._rq_offset:self._rq_offset + kc], np.float32)
        self.bounds = shard_bounds(N, self._shards_wanted if self._shards_wanted is not None else default_shards(N))
        self.S = len(self.bounds)
        self._build_shards(wiring, st)

    # -- membership (between inner steps) ------------------------------------------------
    def expert_ids(self) -> list[int]:
        return list(range(self.N))

    @property
    def n_experts(self) -> int:
        return self.N

    @property
    def shards(self) -> int:
        return self.S

    def add_experts(self, n: int, init: str | None = None, source: int | None = None, *,
                    allow_harmful: bool = False) -> list[int]:
        """Add n experts by the batched engine's rule (``rollout.grow``), re-partitioned into shards
        (init None: the kind the card does not refuse, ``engine.default_init``)."""
        self._check_between_steps()
        N = self.N
        check_add(self.cfg, N, n, self.B)
        init = growth_init(self.policy, init, source, allow_harmful)
        sources = None
        if init == "clone":
            if source is not None and not 0 <= source < N:
                raise InputError(f"no expert {source} to clone (the agent has {N})")
            sources = np.full(n, source) if source is not None else clone_sources(self._rng, self.interface, N, n,
                                                                                          self.wiring.seats, self.B)
        wiring, st = grow(OPS, self.policy, self.cfg, self._rng, self.wiring, self.state(), n, sources)
        self._resize(wiring, st)
        return list(range(N, N + n))

    def remove_experts(self, ids) -> int:
        """Remove experts by index (as ``engine.Agent.remove_experts``); returns how many remain."""
        self._check_between_steps()
        idx = expert_indices(ids, self.N)
        keep = np.setdiff1d(np.arange(self.N), idx)
        if keep.size == 0:
            raise InputError("cannot remove every expert: an agent needs at least one")
        wiring, st = shrink(self.cfg, self._rng, self.wiring, self.state(), keep)
        wiring, st = rebalance(OPS, self.policy, self.interface, self._rng, wiring, st)
        self._resize(wiring, st)
        return int(keep.size)

    _stepping = False  # True while a step awaits its shards (ShardedAgent): experts join or leave between steps

    def _check_between_steps(self):
        """Refuse a membership change during a step, before anything is drawn (the agent and its
        generator are unchanged)."""
        if self._stepping:
            raise RuntimeError("experts join or leave a sharded agent between inner steps")
        if isinstance(self, Lifecycle):  # (RayShardedAgent's shards are Ray actors: it has no event loop to close)
            self._check_open()

    # -- the membrane's side of a step ----------------------------------------------------
    def _checked(self, slot_values, rounds: int | None) -> tuple[np.ndarray, int]:
        """The observation [B, J] and the rounds of a step, checked (the agent is unchanged if refused)."""
        check_horizon(self.policy, self.t, self.past_horizon)
        vals = check_values("observation", slot_values, (self.B, self.slot_addr.shape[1]))
        R = check_rounds(rounds) or self.cfg.agreement.rounds
        return vals, R

    def _observations(self, vals: np.ndarray, R: int) -> list[dict]:
        """Each shard's ``observe`` payload: the slots, and its rows of the competitive heads' reads
        (``membrane.compete``: a normalisation over every expert, so the membrane's job)."""
        obs = {"slot_addr": self.slot_addr, "slot_val": vals, "rounds": R}
        if not self.spec.competitive_heads:
            return [obs] * self.S
        reads, shares = membrane.compete(OPS, self._read_query, self.slot_addr, vals, self._vis,
                                         self.spec.read_moments)
        competed = np.concatenate([reads, shares], axis=-1).astype(np.float32)
        return [{**obs, "competed": np.ascontiguousarray(competed[:, lo:hi])} for lo, hi in self.bounds]

    def _agreement(self, R: int):
        return type(self.cfg.agreement)(**{**self.cfg.agreement.__dict__, "rounds": R})

    def _verdict(self, acfg, r: int, active: np.ndarray, votes: list[tuple[int, dict]]) -> np.ndarray:
        """The episodes still talking after round r, from every shard's ``vote`` payload
        (its experts' votes [B, n], its largest message change [B]): ``agreement.still_talking``."""
        vote = np.zeros((self.B, self.N), np.float32)
        change = np.zeros((self.B, self.S), np.float32)
        for i, payload in votes:
            lo, hi = self.bounds[i]
            vote[:, lo:hi] = payload["vote"]
            change[:, i] = payload["change"]
        return agreement.still_talking(OPS, acfg, r + 1, active, change.max(axis=1), vote)

    def _outputs(self, pushes) -> np.ndarray:
        """The outputs [B, d] mixed from every shard's ``push`` payload (``membrane.push``); keeps
        the competitive read queries the next step's observation needs."""
        A = self.spec.addr_dim
        pk = np.zeros((self.B, self.N, A), np.float32)
        pv = np.zeros((self.B, self.N, 1 + A), np.float32)
        for p in pushes:
            lo = int(p["lo"])
            n = p["key"].shape[1]
            pk[:, lo:lo + n], pv[:, lo:lo + n] = p["key"], p["value"]
            self._read_query[:, lo:lo + n] = p["read_query"]
        out, _ = membrane.push(OPS, pk, pv, self.out_addr, self.can_push)
        return np.asarray(out, np.float32)


# ---- the agent ----------------------------------------------------------------------------------

@dataclass
class _Shard:
    core: ShardCore
    send: trio.MemorySendChannel
    recv: trio.MemoryReceiveChannel
    feeds: list[int] = field(default_factory=list)  # the shards that need my block
    stash: dict = field(default_factory=dict)  # (kind, step, round) -> [messages] that came early


class ShardedAgent(ShardedMembrane, Lifecycle):
    """B episodes of N experts in S shards (see the module doc); stepped by its membrane.

    ``interface`` and ``wiring`` are batched as for ``rollout.agent_step`` (``engine.Agent``'s can
    be passed as they are). Use as::

        agent = ShardedAgent(policy, cfg, interface, wiring, shards=4)
        async with agent.running():
            out, info = await agent.step(slot_values)  # [B, J] -> [B, d]
    """

    def __init__(self, policy, cfg: AgentConfig, interface: Interface, wiring: Wiring, *,
                 shards: int | None = None, tile: int = DEFAULT_TILE, policy_chunk: int = DEFAULT_POLICY_CHUNK,
                 encode: bool = False, episode_index: int = 0, step_timeout: float | None = None,
                 state: AgentState | None = None, rng: np.random.Generator | None = None,
                 past_horizon: bool = False, route_threads: bool | None = None,
                 compiled_routing: bool | None = None):
        self._init_membrane(policy, cfg, interface, wiring, shards=shards, tile=tile, rng=rng,
                            past_horizon=past_horizon, episode_index=episode_index)
        self.encode = encode
        # route each shard's receivers in a worker thread (numpy releases the GIL in the gathers,
        # the top-k and the matmuls), so the shards' routing runs on several cores at once; None:
        # when some shard routes at least ROUTE_THREAD_MIN_ROWS rows (a thread hop costs ~0.1 ms)
        self._route_threads = route_threads
        # route listed senders (sparse top-k) with the compiled kernel, routing.route_listed_compiled;
        # None: in shards of at least shard.ROUTE_KERNEL_MIN_EXPERTS experts (shard.routes_compiled)
        self._compiled_routing = compiled_routing
        self.step_timeout = step_timeout
        self._policy_chunk = policy_chunk
        self.counters = ShardCounters()
        self._mb_send, self._mb_recv = trio.open_memory_channel(math.inf)
        self._mb_stash: dict = {}
        self._nursery: trio.Nursery | None = None
        self._shard_scope: trio.CancelScope | None = None
        self._closed = trio.Event()
        self._stepping = False
        self._partition(wiring, state if state is not None else initial_state(OPS, policy, wiring))

    @classmethod
    def from_agent(cls, agent, **kw) -> "ShardedAgent":
        """The sharded runtime continuing an engine ``Agent`` where it is: its episodes (interface), experts and
        wiring, state, step count (its horizon) and growth generator, copied (the engine agent is left as it was).
        With ``Agent(policy).restore(snapshot)`` this continues a snapshot, a served session's included. ``kw``:
        the runtime's own settings (``shards``, ``tile``, ...)."""
        import copy

        if agent.state is None:
            raise RuntimeError("start() or reset() the agent before handing it to the sharded runtime")
        st = AgentState(np.array(agent.state.h, np.float32), np.array(agent.state.heads, np.float32))
        sh = cls(agent.policy, agent.cfg, agent.interface, copy.deepcopy(agent.wiring), state=st,
                 rng=copy.deepcopy(agent._rng), past_horizon=agent.past_horizon, **kw)
        sh.t = agent.t
        return sh

    def _build_shards(self, wiring: Wiring, st: AgentState):
        """One trio shard per range of experts, and the batcher of their policy rows."""
        old = getattr(self, "batcher", None)
        self.batcher = RowBatcher(self.policy, self.bounds, self.B, self._policy_chunk)
        if old is not None:  # the agent's counts, not those since its last membership change
            self.batcher.calls, self.batcher.rounds = old.calls, old.rounds
        self._shards: list[_Shard] = []
        for i in range(self.S):
            core = ShardCore(i, self.bounds, self.policy, self.cfg, wiring, st.h, st.heads, self._vis, self._tile,
                             self._compiled_routing)
            core.inbox_buf = self.batcher.inbox_view(i)  # inboxes computed in place: no copy into the batcher
            send, recv = trio.open_memory_channel(math.inf)
            self._shards.append(_Shard(core, send, recv))
        for i, sh in enumerate(self._shards):
            for j in sh.core.needs:
                if j != i:
                    self._shards[j].feeds.append(i)

    # -- lifecycle --------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        """Own the shard tasks until ``close()`` (use with ``nursery.start``)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._start_shards()
                task_status.started()
                await self._closed.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._mb_send.close()  # a step still waiting for its shards ends (AgentClosed) instead of hanging

    def _start_shards(self):
        """Start this partition's shard tasks as one group (a later resize cancels the group)."""
        scope = self._shard_scope = trio.CancelScope()
        shards = list(self._shards)

        async def group():
            with scope:
                async with trio.open_nursery() as n:
                    for sh in shards:
                        n.start_soon(self._shard_task, sh)

        self._nursery.start_soon(group)

    def _resize(self, wiring: Wiring, st: AgentState):
        if self._shard_scope is not None:
            self._shard_scope.cancel()  # the shards wait for the next observation: nothing is lost
        self._partition(wiring, st)
        if self._nursery is not None:
            self._start_shards()

    def state(self) -> AgentState:
        """The experts' state gathered from the shards (tests, references; shards never read it)."""
        return AgentState(np.concatenate([s.core.h for s in self._shards], axis=1),
                          np.concatenate([s.core.heads for s in self._shards], axis=1))

    # -- the transport ----------------------------------------------------------------
    def _frame(self, msg: Message) -> Frame:
        if self.encode:
            data = encode(msg)
            if msg.kind == "msg":
                self.counters.block_bytes += len(data) * len(msg.receivers)
            return Frame(data)
        return Frame(None, msg)

    def _post(self, to: int, msg: Message):
        self._shards[to].send.send_nowait(self._frame(msg))

    async def _receive(self, recv, stash: dict, kind: str, t: int, r: int):
        """The next message of ``kind`` for (step t, round r); others of the same kind that come
        early wait in ``stash``."""
        key = (kind, t, r)
        if stash.get(key):
            return stash[key].pop()
        while True:
            try:
                frame = await recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise AgentClosed(f"the agent was closed while step {self.t} ran") from None
            self.counters.frames += 1
            try:
                msg = frame.message()
            except MessageError:
                self.counters.bad_frames += 1
                raise
            k = (msg.kind, msg.step, msg.round)
            if k == key:
                return msg
            stash.setdefault(k, []).append(msg)

    # -- a shard ----------------------------------------------------------------------
    @property
    def route_threads(self) -> bool:
        """Whether the shards route in worker threads (see ``route_threads`` in the constructor)."""
        if self._route_threads is None:
            return self.S > 1 and max(hi - lo for lo, hi in self.bounds) * self.B >= ROUTE_THREAD_MIN_ROWS
        return self._route_threads

    @property
    def compiled_routing(self) -> bool:
        """Whether the shards route listed senders with the compiled kernel (see the constructor)."""
        return any(sh.core.compiled_routing for sh in self._shards)

    async def _shard_task(self, sh: _Shard):
        core, i = sh.core, sh.core.index
        rule = self.cfg.agreement.rule
        t = self.t
        while True:
            ob = await self._receive(sh.recv, sh.stash, "observe", t, 0)
            p = ob.payload
            R = int(p["rounds"])
            core.sense(p["slot_addr"], p["slot_val"], p.get("competed"))
            active = np.ones(self.B, bool)
            for r in range(R):
                blk = core.block()
                if sh.feeds:
                    self._post_block(sh, t, r, blk)
                if i in core.needs:
                    core.take_block(core.lo, blk["key"], blk["value"])
                for _ in range(len(core.needs) - (i in core.needs)):
                    msg = await self._receive(sh.recv, sh.stash, "msg", t, r)
                    core.take_block(int(msg.payload["lo"]), msg.payload["key"], msg.payload["value"])
                    self.counters.blocks += 1
                inbox = await trio.to_thread.run_sync(core.inbox) if self.route_threads else core.inbox()
                self.counters.delivered += int(core.indeg[active].sum())
                h2, hd2 = await self.batcher.step(i, core.h, inbox, core.sensed if r == 0 else None)
                change, vote = core.apply(h2, hd2, active, rule, adopt=True)  # double-buffered views
                if rule != "fixed" and r + 1 < R:
                    self._mb_send.send_nowait(self._frame(Message("vote", i, (MEMBRANE,), self.episode_index,
                                                                  t, r, core.vote_payload(change, vote))))
                    d = await self._receive(sh.recv, sh.stash, "vote", t, r)
                    active = np.asarray(d.payload["active"], bool).copy()
                    if not active.any():
                        break
            self._mb_send.send_nowait(self._frame(Message("push", i, (MEMBRANE,), self.episode_index, t, 0,
                                                          {**core.push_block(), "lo": core.lo})))
            t += 1

    def _post_block(self, sh: _Shard, t: int, r: int, blk: dict):
        msg = Message("msg", sh.core.index, tuple(sh.feeds), self.episode_index, t, r, {**blk, "lo": sh.core.lo})
        frame = self._frame(msg)
        for j in sh.feeds:
            self._shards[j].send.send_nowait(frame)

    # -- the membrane -----------------------------------------------------------------
    async def step(self, slot_values, rounds: int | None = None) -> tuple[np.ndarray, StepInfo]:
        """One inner step: observation [B, J] (previous outputs, then feedback) -> outputs [B, d]."""
        self._check_steppable()
        vals, R = self._checked(slot_values, rounds)
        scope = trio.fail_after(self.step_timeout) if self.step_timeout else nullcontext()
        try:
            with self._one_step(), scope:
                return await self._step(vals, R)
        except trio.TooSlowError:
            raise StepTimeout(f"step {self.t} did not finish in {self.step_timeout}s") from None

    async def _step(self, vals: np.ndarray, R: int):
        t = self.t
        frames0, delivered0 = self.counters.frames, self.counters.delivered
        for i, ob in enumerate(self._observations(vals, R)):
            self._post(i, Message("observe", MEMBRANE, (i,), self.episode_index, t, 0, ob))
        acfg = self._agreement(R)
        active = np.ones(self.B, bool)
        used = np.zeros(self.B, np.float32)
        for r in range(agreement.max_rounds(acfg)):
            used += active
            if acfg.rule == "fixed" or r + 1 >= R:
                continue  # nothing to decide: every shard counts its rounds
            votes = []
            for _ in range(self.S):
                m = await self._receive(self._mb_recv, self._mb_stash, "vote", t, r)
                votes.append((m.sender, m.payload))
            active = self._verdict(acfg, r, active, votes)
            for i in range(self.S):
                self._post(i, Message("vote", MEMBRANE, (i,), self.episode_index, t, r, {"active": active}))
            if not active.any():
                break
        pushes = []
        for _ in range(self.S):
            pushes.append((await self._receive(self._mb_recv, self._mb_stash, "push", t, 0)).payload)
        out = self._outputs(pushes)
        self.t += 1
        info = StepInfo(used, messages=self.counters.delivered - delivered0, experts=self.N,
                        frames=self.counters.frames - frames0)
        return out, info

"""The inner loop, written once.

An agent step (``agent_step``) takes the experts' states and one observation (input
slots with addresses) and returns new states and the outputs:

    sense (membrane) -> rounds of [route -> policy step] until agreement -> push (membrane)

``rollout`` runs agent steps through a task episode (``engine.Agent`` driven by
``episodes.Driver``). Both are generic over the array namespace (``xp``): the torch model
trains through them with autograd, the deploy engine runs them on numpy with the policy
in onnxruntime, and the actor runtimes run the per-expert pieces of the same functions.
No task is imported here: an episode is seen through its ``membrane.Interface``. The
policy is the only learned part; it is any object with

    spec: PolicySpec
    h0: array [H]                      # learned mean initial state
    step(h [M,H], inbox [M,Dm], sensed [M,S]) -> (h' [M,H], heads [M,heads_dim])

Conventions: an expert's messages (its query/key/value and other heads) are the
heads of its last policy step; before its first step they are all zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import agreement, membrane, routing
from .config import AgentConfig, PolicySpec
from .membrane import Interface


def split_heads(spec: PolicySpec, heads, ops=None) -> dict[str, Any]:
    """The named heads of a heads vector [..., heads_dim] (views). With ``ops``, the namespace's
    ``split`` (torch: one autograd node whose backward is one ``cat``, where a slice per head
    would back-propagate a zero-filled full-size gradient per head)."""
    if ops is not None:
        return dict(zip((name for name, _ in spec.heads), ops.split(heads, [size for _, size in spec.heads])))
    return {name: heads[..., s] for name, s in spec.head_slices.items()}


@dataclass
class Wiring:
    """Per-episode structure of an agent: topology, membrane roles, identities, initial noise."""

    noise: np.ndarray  # [B, N, H] standard normal: each expert's own initial state
    route_mask: np.ndarray | routing.Neighbors | None  # [B, N, N] bool, sender lists, or None (all)
    can_sense: np.ndarray  # [N] bool
    can_push: np.ndarray  # [N] bool
    ids: np.ndarray | None = None  # [B, N, id_dim] identity features
    seats: np.ndarray | None = None  # [N] each expert's seat (membrane.Visibility); None: 0 .. N - 1

    @property
    def n_experts(self) -> int:
        return self.noise.shape[1]

    @property
    def batch(self) -> int:
        return self.noise.shape[0]

    def in_degrees(self) -> np.ndarray:
        """[B, N] messages each expert hears per round (``routing.in_degrees``)."""
        return routing.in_degrees(self.route_mask, self.n_experts, self.batch)

    def select(self, idx) -> "Wiring":
        """The wiring of some of the episodes (``idx``: a slice or indices on the batch axis)."""
        topo = self.route_mask
        if isinstance(topo, routing.Neighbors):
            topo = routing.Neighbors(topo.idx[idx])
        elif topo is not None:
            topo = topo[idx]
        return Wiring(self.noise[idx], topo, self.can_sense, self.can_push, None if self.ids is None else self.ids[idx],
                      self.seats)


def sample_wiring(rng: np.random.Generator, cfg: AgentConfig, batch: int, n: int) -> Wiring:
    spec = cfg.policy
    noise = rng.standard_normal((batch, n, spec.hidden)).astype(np.float32)
    mask = routing.topology(cfg.routing, n, batch, rng)
    can_sense, can_push = routing.membrane_masks(cfg.routing, n)
    ids = rng.standard_normal((batch, n, spec.id_dim)).astype(np.float32) if spec.id_dim else None
    return Wiring(noise, mask, can_sense, can_push, ids)


@dataclass
class AgentState:
    h: Any  # [B, N, H]
    heads: Any  # [B, N, heads_dim]
    #: ``split_heads`` of ``heads`` as ``agent_step`` left it (None: split when needed). The next step
    #: reads these views instead of splitting again: with torch each split is an autograd node whose
    #: backward is a ``cat`` with zero-filled pieces (issue 16). A state built any other way has none.
    parts: dict | None = field(default=None, repr=False, compare=False)


def initial_state(ops, policy, wiring: Wiring) -> AgentState:
    return fresh_state(ops, policy, wiring.noise)


def fresh_state(ops, policy, noise: np.ndarray) -> AgentState:
    """The policy's initial state of experts whose initial noise is ``noise`` [B, n, H] (an agent
    that starts, or experts that join or restart fresh): h = tanh(h0 + init_noise x noise), no heads."""
    spec = policy.spec
    h = ops.tanh(ops.asarray(policy.h0) + spec.init_noise * ops.asarray(noise))
    B, n, _ = noise.shape
    return AgentState(h, ops.zeros((B, n, spec.heads_dim)))


#: Visibility kinds that deal the slots out to the experts in turn (each seat reads its own part):
#: what an expert holds is then about its part, and a clone copies an expert of the same part.
PARTITIONED_VISIBILITY = ("cyclic", "grid")


def clone_candidates(interface, N: int, n: int, seats: np.ndarray | None = None) -> list[np.ndarray] | None:
    """For each of n experts joining an agent of N (at ``seats``, None: 0 .. N - 1; the newcomers
    take the lowest free seats, ``membrane.seats_after_add``) whose membrane deals the slots out
    to the experts (``PARTITIONED_VISIBILITY``: say one (class, feature) cell each): the indices
    below N of the experts that read the same slots. None for any other membrane: any expert will do.

    A clone carries its source's state. Where each expert holds what its own part of the input
    says (a prototype of its cell), a clone of another part's expert holds a state about slots it
    does not read (fewshot-v1 fell from 0.912 to 0.838 with such clones; docs/results.md). Where the
    experts share one problem (the guessing game: only the first expert hears the error, the
    others learn it from messages), any expert is a fair source: restricting the clones to the
    deaf seats hurt the guessing policies (measured, session 21), so the rule is not applied there."""
    vis_rule = getattr(interface, "visibility", None)
    if vis_rule is None or vis_rule.kind not in PARTITIONED_VISIBILITY:
        return None
    vis = interface.visible(N + n, membrane.seats_after_add(seats, N, n))
    if vis is None:
        return None
    packed = np.packbits(np.asarray(vis[0], bool), axis=1)
    by_row: dict[bytes, list[int]] = {}
    for r in range(N):
        by_row.setdefault(packed[r].tobytes(), []).append(r)
    return [np.asarray(by_row.get(packed[N + i].tobytes(), ()), np.int64) for i in range(n)]


def clone_sources(rng: np.random.Generator, interface, N: int, n: int, seats: np.ndarray | None = None,
                  batch: int | None = None) -> np.ndarray:
    """Whom n new experts clone in an agent of N at ``seats`` (every runtime's rule): with a
    partitioned membrane, for each an expert drawn among those that read the same slots
    (``clone_candidates``; among all N when none does); otherwise ``rng.integers(0, N, size=n)``.

    ``batch`` B: [B, n], each episode's own draws (a batch of B episodes is B agents, each of which
    copies whom it draws: what a served agent or an actor runtime's episode does). None: [n], one
    draw for every episode (training's batches, whose recipes drew so)."""
    cands = clone_candidates(interface, N, n, seats)
    if cands is None:
        return rng.integers(0, N, size=n if batch is None else (batch, n))
    cols = [rng.choice(c, size=batch) if c.size else rng.integers(0, N, size=batch) for c in cands]  # size None: one
    return np.array(cols, np.int64) if batch is None else np.stack(cols, axis=1).astype(np.int64)


def repeated(a, copies: int):
    """``a`` (an array with the batch first, a ``Neighbors`` topology or None) drawn for B / ``copies`` episodes,
    repeated ``copies`` times along the batch: a batch that is ``copies`` copies of the same episodes (ES's
    candidates, each scored on the same episodes) gets the same draws in every copy."""
    if copies == 1 or a is None:
        return a
    if isinstance(a, routing.Neighbors):
        return routing.Neighbors(np.tile(a.idx, (copies, 1, 1)))
    return np.tile(a, (copies,) + (1,) * (np.ndim(a) - 1))


def episodes_per_copy(B: int, copies: int) -> int:
    """B / ``copies``: the episodes of one copy in a batch of B that is ``copies`` copies of the same episodes
    (ValueError where it is not)."""
    if copies < 1 or B % copies:
        raise ValueError(f"a batch of {B} episodes is not {copies} copies of the same episodes")
    return B // copies


def rebalance_plan(interface, seats: np.ndarray | None, n: int) -> tuple[np.ndarray | None, list[tuple[int, int]]]:
    """After a removal from an agent whose membrane deals the slots out (``PARTITIONED_VISIBILITY``):
    which survivors change seat so that the n experts left read the parts an agent of n experts
    has (seats 0 .. n - 1 read them), moving as few as possible. ``seats`` [n]: the survivors'
    seats (None: 0 .. n - 1, nothing to do).

    Returns (the new seats, normalised as ``membrane.normal_seats``; [(expert index, source)]):
    each moved expert sits at a free seat of a part short of readers, taken from a part with more
    than its share (highest seats first), and restarts: ``source`` is the index of a survivor that
    reads its new part (its state is copied, as a clone's) or -1 (no one does: a fresh expert's
    state). A pure function of the visibility rule and the seats (every runtime applies it the same
    way); for any other membrane a removal moves no one (each expert keeps its own slots)."""
    rule = getattr(interface, "visibility", None)
    if seats is None or rule is None or rule.kind not in PARTITIONED_VISIBILITY:
        return seats, []
    seats = np.asarray(seats, np.int64)
    asked = np.union1d(seats, np.arange(n))  # the seats that matter: the survivors' and 0 .. n - 1
    rows = rule.mask(asked.size, interface.slots, asked)
    if rows is None:
        return membrane.normal_seats(seats), []
    keys = dict(zip(asked.tolist(), (r.tobytes() for r in np.packbits(rows[0], axis=1))))  # seat -> its part
    want: dict[bytes, int] = {}
    for s in range(n):
        want[keys[s]] = want.get(keys[s], 0) + 1
    have: dict[bytes, int] = {}
    for s in seats.tolist():
        have[keys[s]] = have.get(keys[s], 0) + 1
    free = sorted(set(range(n)) - set(int(s) for s in seats))
    dest, short = [], dict(have)
    for s in free:  # the free seats of parts short of readers, lowest first
        if short.get(keys[s], 0) < want[keys[s]]:
            dest.append(s)
            short[keys[s]] = short.get(keys[s], 0) + 1
    spare, extra = [], dict(have)
    for i in np.argsort(-seats, kind="stable"):  # the highest seats of parts over their share move
        k = keys[int(seats[i])]
        if extra[k] > want.get(k, 0):
            spare.append(int(i))
            extra[k] -= 1
    moved = spare[:len(dest)]
    gone = set(moved)
    reader: dict[bytes, int] = {}  # part -> the first staying expert that reads it
    for j in range(n):
        if j not in gone:
            reader.setdefault(keys[int(seats[j])], j)
    new = seats.copy()
    moves = []
    for i, s in zip(moved, dest):
        new[i] = s
        moves.append((i, reader.get(keys[s], -1)))
    return membrane.normal_seats(new), moves


def rebalance(ops, policy, interface, rng: np.random.Generator, wiring: Wiring, state: AgentState,
              copies: int = 1) -> tuple[Wiring, AgentState]:
    """Apply ``rebalance_plan`` to running agents after ``shrink``: the moved experts take their new
    seats and restart as clones of their new part's reader (state and initial noise) or fresh
    (new noise, the policy's initial state); identities and everyone else are unchanged.
    ``copies``: the batch is that many copies of the same episodes; each copy gets the same draws
    (``repeated``)."""
    new_seats, moves = rebalance_plan(interface, wiring.seats, wiring.n_experts)
    if not moves:
        return wiring, state
    h, heads, noise = np.array(state.h), np.array(state.heads), np.array(wiring.noise)
    B0 = episodes_per_copy(noise.shape[0], copies)
    for i, src in moves:
        if src >= 0:
            h[:, i], heads[:, i], noise[:, i] = h[:, src], heads[:, src], noise[:, src]
        else:
            noise[:, i] = repeated(rng.standard_normal((B0, noise.shape[2])).astype(np.float32), copies)
            fresh = fresh_state(ops, policy, noise[:, i:i + 1])
            h[:, i], heads[:, i] = np.asarray(fresh.h)[:, 0], np.asarray(fresh.heads)[:, 0]
    return (Wiring(noise, wiring.route_mask, wiring.can_sense, wiring.can_push, wiring.ids, new_seats),
            AgentState(ops.asarray(h), ops.asarray(heads)))


def grow(ops, policy, cfg: AgentConfig, rng: np.random.Generator, wiring: Wiring, state: AgentState, n: int,
         sources: np.ndarray | None = None, copies: int = 1) -> tuple[Wiring, AgentState]:
    """Add n experts to running agents (the paper's growing, without retraining).

    ``sources`` [n] clones those experts in every episode, [B, n] each episode's own (their state,
    messages and initial noise); None adds fresh experts (the policy's initial state, zero messages).
    New experts get new identity features and the lowest free seats; the topology is redrawn for
    the new size. ``copies``: the batch is that many copies of the same episodes (ES's candidates);
    what is drawn here (noise, identities, topology) is drawn once and repeated in every copy.
    """
    B, N = wiring.noise.shape[:2]
    B0 = episodes_per_copy(B, copies)
    spec = policy.spec
    ids = None if wiring.ids is None else repeated(rng.standard_normal((B0, n, spec.id_dim)).astype(np.float32),
                                                   copies)
    if sources is not None:
        sources = np.asarray(sources, np.int64)
        at = (slice(None), sources) if sources.ndim == 1 else (np.arange(B)[:, None], sources)  # [B, n]: per episode
        noise, h_new, heads_new = wiring.noise[at], state.h[at], state.heads[at]
    else:
        noise = repeated(rng.standard_normal((B0, n, spec.hidden)).astype(np.float32), copies)
        fresh = fresh_state(ops, policy, noise)
        h_new, heads_new = fresh.h, fresh.heads
    cat = lambda a, b: None if a is None else np.concatenate([a, b], axis=1)  # noqa: E731
    total = N + n
    can_sense, can_push = routing.membrane_masks(cfg.routing, total)
    topo = repeated(routing.topology(cfg.routing, total, B0, rng), copies)
    new_wiring = Wiring(cat(wiring.noise, noise), topo, can_sense, can_push,
                        cat(wiring.ids, ids), membrane.seats_after_add(wiring.seats, N, n))
    return new_wiring, AgentState(ops.concat([state.h, h_new], axis=1), ops.concat([state.heads, heads_new], axis=1))


def shrink(cfg: AgentConfig, rng: np.random.Generator, wiring: Wiring, state: AgentState,
           keep: np.ndarray, copies: int = 1) -> tuple[Wiring, AgentState]:
    """Keep only experts ``keep`` (indices, ascending) of running agents; the topology is redrawn
    for the new size (the rule every runtime that removes by index follows; once for all ``copies`` of
    the same episodes); the survivors keep their seats (``membrane.Visibility``)."""
    sel = lambda a: None if a is None else a[:, keep]  # noqa: E731
    n, B0 = len(keep), episodes_per_copy(wiring.batch, copies)
    can_sense, can_push = routing.membrane_masks(cfg.routing, n)
    topo = repeated(routing.topology(cfg.routing, n, B0, rng), copies)
    new = Wiring(np.array(sel(wiring.noise)), topo, can_sense, can_push,
                 None if wiring.ids is None else np.array(sel(wiring.ids)),
                 membrane.seats_after_removal(wiring.seats, wiring.n_experts, keep))
    return new, AgentState(sel(state.h), sel(state.heads))


@dataclass
class StepInfo:
    """What one inner step reports, whichever runtime computed it."""

    rounds: Any  # [B] communication rounds each episode used
    messages: int | None = None  # expert -> expert messages delivered in the step (None: not counted)
    experts: int | None = None  # experts that took part
    frames: int | None = None  # runtime frames handled (the actor runtimes)
    expert_rounds: dict | None = None  # expert id -> rounds it ran (the per-expert actors)
    route_weights: Any = None  # [B, N, N or C] of the last round (when recorded)
    push_weights: Any = None  # [B, d, N]
    messages_sent: Any = None  # [B, N, Dm] the experts' last message values (when recorded)
    vote_loss: Any = None  # summed 'done'-vote loss over rounds (when asked for)
    push_spread: Any = None  # [B] the experts' answers' push-weighted variance (membrane.push_spread; when asked for)


def agent_step(ops, policy, cfg: AgentConfig, wiring: Wiring, state: AgentState, interface: Interface, slot_val,
               rounds: int | None = None, record: bool = False, vote_loss=None, spread: bool = False):
    """One inner step of the agent. Returns (new state, outputs [B, d], StepInfo).

    ``interface`` is the membrane's view of the episodes (addresses, who reads which slot);
    ``slot_val`` [B, J] the input slot values. ``vote_loss`` (a number, e.g. 0.0) asks for the
    votes' training loss in ``StepInfo``; ``spread`` its ``push_spread``."""
    spec = policy.spec
    B, N, H = state.h.shape
    acfg = cfg.agreement if rounds is None else type(cfg.agreement)(**{**cfg.agreement.__dict__, "rounds": rounds})
    heads = state.parts if state.parts is not None else split_heads(spec, state.heads, ops)  # once per tensor

    vis = wiring.can_sense[None, :, None]
    visible = interface.visible(N, wiring.seats)
    if visible is not None:
        vis = vis & visible
    if vis.all():
        vis = None
    sensed = membrane.sense(ops, heads["read_query"], ops.asarray(interface.slot_addr), slot_val,
                            None if vis is None else ops.asbool(vis), spec.competitive_heads, spec.read_moments)
    if wiring.ids is not None:
        sensed = ops.concat([sensed, ops.asarray(wiring.ids)], axis=-1)
    mask = wiring.route_mask
    if isinstance(mask, np.ndarray):
        mask = ops.asbool(mask)

    # what the agreement rule reads after a round (the fixed rule reads neither: not computed)
    need_vote = acfg.rule == "quorum" or vote_loss is not None
    need_change = acfg.rule == "convergence" or vote_loss is not None
    h, hd = state.h, state.heads
    active = ops.ones_bool((B,))
    used = ops.zeros((B,))
    w_route = None
    R = agreement.max_rounds(acfg)
    for r in range(R):
        inbox, w_route = routing.route(ops, cfg.routing, heads["query"], heads["key"], heads["value"], mask)
        h_new, hd_new = policy.step(h.reshape(B * N, H), inbox.reshape(B * N, -1), sensed.reshape(B * N, -1))
        h_new, hd_new = h_new.reshape(B, N, H), hd_new.reshape(B, N, -1)
        prev_value = heads["value"]
        if r == 0:  # every episode takes the first round
            h, hd = h_new, hd_new
        else:  # episodes that agreed keep their state
            a = active[:, None, None]
            h, hd = ops.where(a, h_new, h), ops.where(a, hd_new, hd)
        used = used + ops.float_(active)
        heads = split_heads(spec, hd, ops)
        vote = agreement.votes(ops, heads["vote"]) if need_vote else None
        change = agreement.message_change(ops, prev_value, heads["value"]) if need_change else None  # [B, N]
        if vote_loss is not None and r > 0:  # training signal of the 'done' vote (see agreement.vote_target)
            vote_loss = vote_loss + agreement.vote_loss(ops, acfg, vote, change)
        active = agreement.still_talking(ops, acfg, r + 1, active, None if change is None else ops.amax(change, axis=-1),
                                         vote)
        if r + 1 < R and not ops.item_any(active):  # (after the last round there is nothing to decide)
            break

    can_push = None if wiring.can_push.all() else ops.asbool(wiring.can_push[None, :])
    out_addr = ops.asarray(interface.out_addr)
    out, w_push = membrane.push(ops, heads["push_key"], heads["push_value"], out_addr, can_push)
    info = StepInfo(used, experts=N, vote_loss=vote_loss)
    if spread:
        info.push_spread = membrane.push_spread(ops, w_push, heads["push_value"], out_addr, out)
    if record:
        info.route_weights, info.push_weights, info.messages_sent = w_route, w_push, heads["value"]
    return AgentState(h, hd, heads), out, info


@dataclass
class Rollout:
    outputs: Any  # [T, B, d] each step's outputs
    losses: Any  # [T, B] each step's training loss (the task's; the guessing game's 3 x MSE)
    rounds: Any  # [T, B]
    state: AgentState
    traces: list[StepInfo] = field(default_factory=list)
    vote_loss: Any = 0.0  # mean over steps of the summed vote loss (with_vote_loss=True)
    metrics: dict = field(default_factory=dict)  # name -> [T, B] numpy (with_metrics=True)


def rollout(ops, policy, cfg: AgentConfig, episode, wiring: Wiring, *, steps: int, rounds: int | None = None,
            record: bool = False, state: AgentState | None = None, prev_output=None, t0: int = 0,
            with_vote_loss: bool = False, with_metrics: bool = False) -> Rollout:
    """Run an agent through a batch of task episodes (``tasks.TaskEpisode``) for ``steps`` inner
    steps: ``engine.Agent`` (with these ops) driven by ``episodes.Driver``."""
    from .engine import Agent
    from .episodes import Driver, drive

    agent = Agent(policy, cfg, ops=ops, check_inputs=False).start(episode.interface, wiring, state=state, t=t0)
    agent.record, agent.vote_loss = record, with_vote_loss
    driver = Driver(ops, episode, steps, t0=t0, prev_output=prev_output, rounds=rounds, record=record,
                    with_vote_loss=with_vote_loss, with_metrics=with_metrics)
    traj = drive(agent, driver)
    return Rollout(traj.outputs, traj.losses, traj.rounds, agent.state, traj.infos if record else [],
                   traj.vote_loss, traj.metrics)

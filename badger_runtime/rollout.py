"""The inner loop, written once.

An agent step (``agent_step``) takes the experts' states and one observation (input
slots with addresses) and returns new states and the outputs:

    sense (membrane) -> rounds of [route -> policy step] until agreement -> push (membrane)

``rollout`` runs agent steps through a task episode. Both are generic over the
array namespace (``xp``): the torch model trains through them with autograd, the
deploy engine runs them on numpy with the policy in onnxruntime, and the actor
runtime runs the per-expert pieces of the same functions. The policy is the only
learned part; it is any object with

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
from .tasks import guessing


def split_heads(spec: PolicySpec, heads) -> dict[str, Any]:
    out, i = {}, 0
    for name, size in spec.heads:
        out[name] = heads[..., i : i + size]
        i += size
    return out


@dataclass
class Wiring:
    """Per-episode structure of an agent: topology, membrane roles, identities, initial noise."""

    noise: np.ndarray  # [B, N, H] standard normal: each expert's own initial state
    route_mask: np.ndarray | routing.Neighbors | None  # [B, N, N] bool, sender lists, or None (all)
    can_sense: np.ndarray  # [N] bool
    can_push: np.ndarray  # [N] bool
    ids: np.ndarray | None = None  # [B, N, id_dim] identity features

    @property
    def n_experts(self) -> int:
        return self.noise.shape[1]


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


def initial_state(ops, policy, wiring: Wiring) -> AgentState:
    spec = policy.spec
    noise = ops.asarray(wiring.noise)
    h = ops.tanh(ops.asarray(policy.h0) + spec.init_noise * noise)
    B, N, _ = wiring.noise.shape
    return AgentState(h, ops.zeros((B, N, spec.heads_dim)))


def grow(ops, policy, cfg: AgentConfig, rng: np.random.Generator, wiring: Wiring, state: AgentState, n: int,
         sources: np.ndarray | None = None) -> tuple[Wiring, AgentState]:
    """Add n experts to running agents (the paper's growing, without retraining).

    ``sources`` [n] clones those experts (their state, messages and initial noise);
    None adds fresh experts (the policy's initial state, zero messages). New experts get
    new identity features; the topology is redrawn for the new size.
    """
    B, N = wiring.noise.shape[:2]
    spec = policy.spec
    ids = None if wiring.ids is None else rng.standard_normal((B, n, spec.id_dim)).astype(np.float32)
    if sources is not None:
        noise = wiring.noise[:, sources]
        h_new, heads_new = state.h[:, sources], state.heads[:, sources]
    else:
        noise = rng.standard_normal((B, n, spec.hidden)).astype(np.float32)
        fresh = initial_state(ops, policy, Wiring(noise, None, wiring.can_sense[:n], wiring.can_push[:n]))
        h_new, heads_new = fresh.h, fresh.heads
    cat = lambda a, b: None if a is None else np.concatenate([a, b], axis=1)  # noqa: E731
    total = N + n
    can_sense, can_push = routing.membrane_masks(cfg.routing, total)
    new_wiring = Wiring(cat(wiring.noise, noise), routing.topology(cfg.routing, total, B, rng), can_sense, can_push,
                        cat(wiring.ids, ids))
    return new_wiring, AgentState(ops.concat([state.h, h_new], axis=1), ops.concat([state.heads, heads_new], axis=1))


@dataclass
class StepInfo:
    rounds: Any  # [B] rounds used
    route_weights: Any = None  # [B, N, N] of the last round (when recorded)
    push_weights: Any = None  # [B, d, N]
    messages: Any = None  # [B, N, Dm]
    vote_loss: Any = None  # summed 'done'-vote loss over rounds (when asked for)


def agent_step(ops, policy, cfg: AgentConfig, wiring: Wiring, state: AgentState, slot_addr, slot_val,
               visible, out_addr, rounds: int | None = None, record: bool = False, vote_loss=None):
    """One inner step of the agent. Returns (new state, outputs [B, d], StepInfo).

    ``vote_loss`` (a number, e.g. 0.0) asks for the votes' training loss in ``StepInfo``."""
    spec = policy.spec
    B, N, H = state.h.shape
    acfg = cfg.agreement if rounds is None else type(cfg.agreement)(**{**cfg.agreement.__dict__, "rounds": rounds})
    heads = split_heads(spec, state.heads)

    vis = wiring.can_sense[None, :, None]
    if visible is not None:
        vis = vis & visible
    if vis.all():
        vis = None
    sensed = membrane.sense(ops, heads["read_query"], ops.asarray(slot_addr), slot_val,
                            None if vis is None else ops.asbool(vis))
    if wiring.ids is not None:
        sensed = ops.concat([sensed, ops.asarray(wiring.ids)], axis=-1)
    mask = wiring.route_mask
    if isinstance(mask, np.ndarray):
        mask = ops.asbool(mask)

    h, hd = state.h, state.heads
    active = ops.ones_bool((B,))
    used = ops.zeros((B,))
    w_route = None
    for r in range(agreement.max_rounds(acfg)):
        heads = split_heads(spec, hd)
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
        new_heads = split_heads(spec, hd)
        vote = ops.sigmoid(new_heads["vote"][..., 0])
        if vote_loss is not None and r > 0:  # training signal of the 'done' vote (see agreement.vote_target)
            vote_loss = vote_loss + agreement.vote_loss(ops, acfg, vote, prev_value, new_heads["value"])
        active = agreement.still_talking(ops, acfg, r + 1, active, prev_value, new_heads["value"], vote)
        if not ops.item_any(active):
            break

    heads = split_heads(spec, hd)
    can_push = None if wiring.can_push.all() else ops.asbool(wiring.can_push[None, :])
    out, w_push = membrane.push(ops, heads["push_key"], heads["push_value"], ops.asarray(out_addr), can_push)
    info = StepInfo(used, vote_loss=vote_loss)
    if record:
        info.route_weights, info.push_weights, info.messages = w_route, w_push, heads["value"]
    return AgentState(h, hd), out, info


@dataclass
class Rollout:
    guesses: Any  # [T, B, d]
    errors: Any  # [T, B] 3 x MSE of each step's guess
    rounds: Any  # [T, B]
    state: AgentState
    traces: list[StepInfo] = field(default_factory=list)
    vote_loss: Any = 0.0  # mean over steps of the summed vote loss (with_vote_loss=True)


def rollout(ops, policy, cfg: AgentConfig, ep: guessing.Episode, wiring: Wiring, *, steps: int,
            rounds: int | None = None, record: bool = False, state: AgentState | None = None,
            prev_guess=None, t0: int = 0, with_vote_loss: bool = False) -> Rollout:
    """Run an agent through a guessing-game episode for ``steps`` inner steps."""
    T = steps
    state = state if state is not None else initial_state(ops, policy, wiring)
    guess = prev_guess if prev_guess is not None else ops.zeros((ep.batch, ep.dims))
    guesses, errors, used, traces, vote_loss = [], [], [], [], 0.0
    for t in range(t0, t0 + T):
        slot_val = guessing.observe(ops, ep, guess, t)
        state, guess, info = agent_step(ops, policy, cfg, wiring, state, ep.slot_addr, slot_val, ep.visible,
                                        ep.out_addr, rounds=rounds, record=record,
                                        vote_loss=0.0 if with_vote_loss else None)
        if with_vote_loss:
            vote_loss = vote_loss + info.vote_loss / T
        guesses.append(guess)
        errors.append(guessing.error(ops, guess, ops.asarray(ep.targets_at(t))))
        used.append(info.rounds)
        if record:
            traces.append(info)
    return Rollout(ops.stack(guesses), ops.stack(errors), ops.stack(used), state, traces, vote_loss)

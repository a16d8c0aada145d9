"""The batched deploy engine: numpy + onnxruntime, no torch.

It runs the shared inner-loop math (``rollout.agent_step``) with numpy ops and the
policy's ONNX graph: one onnxruntime call per communication round for all experts
of all episodes. This is the speed limit the actor runtime is measured against,
and the reference it must agree with.

``Agent`` is the step-by-step form (a served session, a long-running agent):
reset once, then ``step(observation)`` as the environment feeds it.
"""

from __future__ import annotations

import numpy as np

from .config import AgentConfig
from .membrane import KIND_FEEDBACK, KIND_OBSERVATION
from .policy_card import OnnxPolicy
from .rollout import AgentState, Wiring, agent_step, grow, initial_state, sample_wiring
from .routing import Neighbors, membrane_masks, topology
from .tasks import guessing
from .xp import NumpyOps

OPS = NumpyOps()


def numpy_ops() -> NumpyOps:
    return OPS


class InputError(ValueError):
    """An observation the agent refuses (wrong shape, NaN/inf, out of range); the agent is unchanged."""


# Observations larger than this (in absolute value) are refused: the policy was trained on
# values of order 1, and a huge value would saturate every gate it touches.
MAX_ABS_INPUT = 1e3


def check_values(name: str, x, shape: tuple[int, ...]) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be numbers, got {type(x).__name__}") from None
    if a.shape != shape:
        raise InputError(f"{name} must have shape {shape}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name} contains NaN or inf; refused (the agent's state is unchanged)")
    if np.any(np.abs(a) > MAX_ABS_INPUT):
        raise InputError(f"{name} has values beyond +-{MAX_ABS_INPUT:g}; refused (scale your inputs)")
    return a


class Agent:
    """B agents of N experts with d outputs, stepped one inner step at a time (the deploy form).

    Each step's observation is the agent's previous output (d values) and the feedback on
    it (1 scalar error, or d per-dimension errors), as the guessing game's membrane
    defines; addresses are drawn at ``reset``. Experts can be added (``clone`` copies a
    living expert's state, ``fresh`` starts from the policy's initial state) or removed
    between steps; nothing else changes. Bad observations raise ``InputError`` and leave
    the agent as it was.
    """

    def __init__(self, policy: OnnxPolicy, agent: AgentConfig | None = None, feedback: str | None = None):
        self.policy = policy
        self.cfg = agent or policy.agent
        self.feedback = feedback or policy.task.feedback
        self.state: AgentState | None = None
        self.wiring: Wiring | None = None
        self.t = 0

    # -- lifecycle ------------------------------------------------------------------
    def reset(self, batch: int, experts: int, dims: int, seed: int, addresses: np.ndarray | None = None):
        if batch < 1 or experts < 1 or dims < 1:
            raise InputError("batch, experts and dims must be >= 1")
        self.seed = seed
        rng_task = np.random.default_rng([seed, 0])
        self._rng = np.random.default_rng([seed, 1])
        task = type(self.policy.task)(**{**self.policy.task.__dict__, "feedback": self.feedback})
        self.episode = guessing.sample(rng_task, task, batch, dims, experts, self.cfg.policy.addr_dim, steps=1,
                                       addresses=addresses)
        self.wiring = sample_wiring(self._rng, self.cfg, batch, experts)
        self.state = initial_state(OPS, self.policy, self.wiring)
        self.t = 0
        return self

    @property
    def n_experts(self) -> int:
        return self.wiring.n_experts

    @property
    def slots(self) -> int:
        return self.episode.slot_addr.shape[1]

    def observation(self, prev_output, feedback) -> np.ndarray:
        """Slot values from the previous output [B, d] and its feedback [B, 1 or d]."""
        B, d = self.episode.batch, self.episode.dims
        n_fb = 1 if self.feedback == "scalar" else d
        prev = check_values("previous output", prev_output, (B, d))
        fb = check_values("feedback", feedback, (B, n_fb))
        return np.concatenate([prev, fb], axis=-1)

    def step(self, slot_values, rounds: int | None = None, record: bool = False):
        """Advance one inner step. slot_values: [B, J] (previous outputs, then feedback)."""
        if self.state is None:
            raise RuntimeError("reset() the agent before stepping it")
        vals = check_values("observation", slot_values, (self.episode.batch, self.slots))
        self.state, out, info = agent_step(OPS, self.policy, self.cfg, self.wiring, self.state,
                                           self.episode.slot_addr, vals, self.episode.visible,
                                           self.episode.out_addr, rounds=rounds, record=record)
        self.t += 1
        return out, info

    # -- growing and shrinking ----------------------------------------------------------
    def _rewire(self, noise, ids, h, heads):
        n = noise.shape[1]
        B = noise.shape[0]
        mask = topology(self.cfg.routing, n, B, self._rng)
        can_sense, can_push = membrane_masks(self.cfg.routing, n)
        self.wiring = Wiring(noise, mask, can_sense, can_push, ids)
        self.episode = self.episode.with_experts(n)
        self.state = AgentState(h, heads)

    def add_experts(self, n: int, init: str = "clone", source: int | None = None) -> list[int]:
        """Add n experts; returns their indices. ``clone`` copies expert ``source`` (default: a
        random living expert per new one), ``fresh`` draws a new initial state."""
        if n < 1:
            raise InputError("add at least one expert")
        if init not in ("clone", "fresh"):
            raise InputError(f"init must be 'clone' or 'fresh', got {init!r}")
        N = self.n_experts
        sources = None
        if init == "clone":
            if source is not None and not 0 <= source < N:
                raise InputError(f"no expert {source} to clone (the agent has {N})")
            sources = np.full(n, source) if source is not None else self._rng.integers(0, N, size=n)
        self.wiring, self.state = grow(OPS, self.policy, self.cfg, self._rng, self.wiring, self.state, n, sources)
        self.episode = self.episode.with_experts(self.n_experts)
        return list(range(N, N + n))

    def remove_experts(self, indices) -> int:
        """Remove experts by index; returns how many remain (at least one must)."""
        idx = sorted(set(int(i) for i in indices))
        N = self.n_experts
        if any(i < 0 or i >= N for i in idx):
            raise InputError(f"expert indices must be in [0, {N}), got {idx}")
        keep = np.array([i for i in range(N) if i not in set(idx)], dtype=np.int64)
        if keep.size == 0:
            raise InputError("cannot remove every expert: an agent needs at least one")
        w, st = self.wiring, self.state
        sel = lambda a: None if a is None else a[:, keep].copy()  # noqa: E731
        self._rewire(sel(w.noise), sel(w.ids), sel(st.h), sel(st.heads))
        return int(keep.size)

    # -- snapshots --------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Everything needed to continue this agent exactly (arrays + small metadata)."""
        w, st, ep = self.wiring, self.state, self.episode
        return {"t": self.t, "seed": self.seed, "feedback": self.feedback, "h": st.h, "heads": st.heads,
                "noise": w.noise, "ids": w.ids, "targets": ep.targets,
                "route_mask": w.route_mask if isinstance(w.route_mask, np.ndarray) else None,
                "route_neighbors": w.route_mask.idx if isinstance(w.route_mask, Neighbors) else None,
                "out_addr": ep.out_addr, "slot_addr": ep.slot_addr, "rng": self._rng.bit_generator.state}

    def restore(self, snap: dict):
        spec = self.cfg.policy
        h = np.asarray(snap["h"], np.float32)
        if h.ndim != 3 or h.shape[2] != spec.hidden:
            raise InputError(f"snapshot state has shape {h.shape}; this policy's experts hold {spec.hidden} values")
        self.feedback, self.seed, self.t = snap["feedback"], snap["seed"], snap["t"]
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = snap["rng"]
        B, N, _ = h.shape
        can_sense, can_push = membrane_masks(self.cfg.routing, N)
        route = snap["route_mask"]
        if snap.get("route_neighbors") is not None:
            route = Neighbors(np.asarray(snap["route_neighbors"], np.int64))
        self.wiring = Wiring(np.asarray(snap["noise"], np.float32), route, can_sense, can_push, snap["ids"])
        vis = guessing._visibility(self.feedback, N, snap["out_addr"].shape[1])
        self.episode = guessing.Episode(self.feedback, snap["targets"], snap["out_addr"], snap["slot_addr"], vis, N)
        self.state = AgentState(h, np.asarray(snap["heads"], np.float32))
        return self


__all__ = ["Agent", "InputError", "numpy_ops", "KIND_FEEDBACK", "KIND_OBSERVATION"]


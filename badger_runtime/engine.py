"""The batched deploy engine: numpy + onnxruntime, no torch.

It runs the shared inner-loop math (``rollout.agent_step``) with numpy ops and the
policy's ONNX graph: one onnxruntime call per communication round for all experts
of all episodes. This is the speed limit the actor runtime is measured against,
and the reference it must agree with.

``BatchedAgent`` is the step-by-step form (a served session, a long-running agent):
reset once, then ``step(observation)`` as the environment feeds it.
"""

from __future__ import annotations

import numpy as np

from .config import AgentConfig
from .membrane import KIND_FEEDBACK, KIND_OBSERVATION
from .policy_card import OnnxPolicy
from .rollout import AgentState, Wiring, agent_step, initial_state, sample_wiring
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


class BatchedAgent:
    """B agents of N experts on d-dimensional guessing-style inputs, stepped one inner step at a time.

    Observation of a step: the previous output (d values) and feedback (1 scalar error,
    or d per-dimension errors), as in the guessing game; addresses are drawn at reset.
    """

    def __init__(self, policy: OnnxPolicy, agent: AgentConfig | None = None, feedback: str | None = None):
        self.policy = policy
        self.cfg = agent or policy.agent
        self.feedback = feedback or policy.task.feedback
        self.state: AgentState | None = None
        self.wiring: Wiring | None = None
        self.t = 0

    def reset(self, batch: int, experts: int, dims: int, seed: int, addresses: np.ndarray | None = None):
        rng_task, rng_wire = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
        task = type(self.policy.task)(**{**self.policy.task.__dict__, "feedback": self.feedback})
        self.episode = guessing.sample(rng_task, task, batch, dims, experts, self.cfg.policy.addr_dim, steps=1,
                                       addresses=addresses)
        self.wiring = sample_wiring(rng_wire, self.cfg, batch, experts)
        self.state = initial_state(OPS, self.policy, self.wiring)
        self.t = 0
        return self

    @property
    def slots(self) -> int:
        return self.episode.slot_addr.shape[1]

    def step(self, slot_values, rounds: int | None = None, record: bool = False):
        """Advance one inner step. slot_values: [B, J] (previous outputs then feedback)."""
        if self.state is None:
            raise RuntimeError("reset() the agent before stepping it")
        vals = check_values("observation", slot_values, (self.episode.batch, self.slots))
        self.state, out, info = agent_step(OPS, self.policy, self.cfg, self.wiring, self.state,
                                           self.episode.slot_addr, vals, self.episode.visible,
                                           self.episode.out_addr, rounds=rounds, record=record)
        self.t += 1
        return out, info


__all__ = ["BatchedAgent", "InputError", "numpy_ops", "KIND_FEEDBACK", "KIND_OBSERVATION"]

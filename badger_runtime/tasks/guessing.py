"""The guessing game (paper Fig. 6, 7, 9): guess d numbers drawn from U[-1, 1]^d.

Each inner step the agent outputs a guess and, at the next step, sees its last
guess and feedback on it:

- ``scalar``: one number, err = 3 * mean((guess - target)^2) (black-box
  optimisation, the reference code's setting);
- ``per_dim``: the signed error guess_i - target_i for every dimension;
- ``one_expert``: per-dimension error, but only expert 0 sees it (Fig. 6/9): the
  others must learn it through messages.

Errors are reported as 3 x MSE, so guessing 0 scores 1.0 ("chance").
With ``jump_every = [a, b]`` the targets jump to fresh values every U[a, b]
steps without resetting the agent (the non-stationary variant).

Sampling is numpy (seeded); ``observe`` and ``loss`` are written against ``xp``
ops so the same code feeds the torch model and the deploy engines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import TaskConfig
from ..membrane import KIND_FEEDBACK, KIND_OBSERVATION, N_KIND_FLAGS


def random_addresses(rng: np.random.Generator, shape: tuple[int, ...], addr_dim: int) -> np.ndarray:
    """Random address parts: Gaussian directions scaled to norm sqrt(addr_dim - 2)."""
    a = rng.standard_normal((*shape, addr_dim - N_KIND_FLAGS))
    a /= np.linalg.norm(a, axis=-1, keepdims=True) + 1e-12
    return (a * np.sqrt(addr_dim - N_KIND_FLAGS)).astype(np.float32)


def with_kind(addr: np.ndarray, kind: int | None) -> np.ndarray:
    flags = np.zeros((*addr.shape[:-1], N_KIND_FLAGS), np.float32)
    if kind is not None:
        flags[..., kind] = 1.0
    return np.concatenate([flags, addr], axis=-1)


@dataclass
class Episode:
    """A batch of B guessing-game episodes for agents of N experts."""

    feedback: str
    targets: np.ndarray  # [B, d], or [T, B, d] when targets jump over time
    out_addr: np.ndarray  # [B, d, A] output addresses
    slot_addr: np.ndarray  # [B, J, A] input slot addresses
    visible: np.ndarray | None  # [1, N, J] which expert sees which slot (None = all)
    n_experts: int
    jumps: np.ndarray | None = None  # [T, B] bool: targets changed at this step

    @property
    def batch(self) -> int:
        return self.out_addr.shape[0]

    @property
    def dims(self) -> int:
        return self.out_addr.shape[1]

    def targets_at(self, t: int) -> np.ndarray:
        return self.targets if self.targets.ndim == 2 else self.targets[min(t, len(self.targets) - 1)]

    def with_experts(self, n: int) -> "Episode":
        """The same episodes for an agent of n experts (after growing or shrinking)."""
        vis = None if self.visible is None else _visibility(self.feedback, n, self.dims)
        return Episode(self.feedback, self.targets, self.out_addr, self.slot_addr, vis, n, self.jumps)


def _visibility(feedback: str, n: int, d: int) -> np.ndarray | None:
    if feedback != "one_expert":
        return None
    vis = np.ones((1, n, 2 * d), dtype=bool)
    vis[:, 1:, d:] = False  # feedback slots: expert 0 only
    return vis


def fixed_addresses(seed: int, d: int, addr_dim: int) -> np.ndarray:
    return random_addresses(np.random.default_rng([seed, d]), (d,), addr_dim)


def sample(
    rng: np.random.Generator,
    cfg: TaskConfig,
    batch: int,
    d: int,
    n: int,
    addr_dim: int,
    steps: int | None = None,
    addresses: np.ndarray | None = None,
) -> Episode:
    """Draw B episodes of dimension d. ``addresses`` ([d, A-2]) fixes the output addresses."""
    T = steps or cfg.steps
    targets = rng.uniform(-1.0, 1.0, size=(batch, d)).astype(np.float32)
    if addresses is None:
        base = random_addresses(rng, (batch, d), addr_dim)
    else:
        base = np.broadcast_to(addresses, (batch, d, addr_dim - N_KIND_FLAGS)).astype(np.float32)
    jumps = None
    a, b = cfg.jump_every
    if b > 0:
        seq = np.empty((T, batch, d), np.float32)
        jumps = np.zeros((T, batch), bool)
        next_jump = rng.integers(a, b + 1, size=batch)
        cur = targets.copy()
        for t in range(T):
            hit = next_jump <= t
            if t > 0 and hit.any():
                cur[hit] = rng.uniform(-1.0, 1.0, size=(int(hit.sum()), d))
                jumps[t, hit] = True
                next_jump[hit] = t + rng.integers(a, b + 1, size=int(hit.sum()))
            seq[t] = cur
        targets = seq
    out_addr = with_kind(base, None)
    if cfg.feedback == "scalar":
        err_addr = np.zeros((batch, 1, addr_dim), np.float32)
        err_addr[..., KIND_FEEDBACK] = 1.0
        slot_addr = np.concatenate([with_kind(base, KIND_OBSERVATION), err_addr], axis=1)
    else:
        slot_addr = np.concatenate([with_kind(base, KIND_OBSERVATION), with_kind(base, KIND_FEEDBACK)], axis=1)
    return Episode(cfg.feedback, targets, out_addr, slot_addr, _visibility(cfg.feedback, n, d), n, jumps)


def error(ops, guess, target):
    """3 x mean squared error over dimensions: [B]."""
    diff = guess - target
    return 3.0 * ops.mean(diff * diff, axis=-1)


def observe(ops, ep: Episode, prev_guess, t: int):
    """Slot values at inner step t: the previous guess and the feedback on it.

    At t = 0 nothing has been guessed yet: every slot is 0. So at step t the agent
    has had exactly t feedbacks, as a classical optimizer making its (t+1)-th guess.
    """
    if t == 0:
        n_fb = 1 if ep.feedback == "scalar" else ep.dims
        return ops.zeros((ep.batch, ep.dims + n_fb))
    target = ops.asarray(ep.targets_at(t - 1))
    if ep.feedback == "scalar":
        fb = error(ops, prev_guess, target)[:, None]
    else:
        fb = prev_guess - target
    return ops.concat([prev_guess, fb], axis=-1)


def mean_solution(ep: Episode, t: int = 0) -> np.ndarray:
    """Every output set to the mean of its episode's targets (the paper's dashed line)."""
    tg = ep.targets_at(t)
    return np.repeat(tg.mean(axis=-1, keepdims=True), tg.shape[-1], axis=-1)

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

Sampling is numpy (seeded); ``observe`` and ``error`` are written against ``xp``
ops so the same code feeds the torch model and the deploy engines. Registered as the
task ``guessing`` (``GuessingTask``; settings ``GuessingConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ConfigError, TaskConfig
from ..membrane import KIND_FEEDBACK, KIND_OBSERVATION, N_KIND_FLAGS, Interface, Visibility
from . import Task, TaskEpisode

FEEDBACKS = ("scalar", "per_dim", "one_expert")
MAX_NELDER_MEAD_DIMS = 256  # the scalar-feedback baseline is O(d^2) per episode


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
class GuessingConfig(TaskConfig):
    """The guessing game's settings (``dims``: the range of d, the numbers to guess)."""

    name: str = "guessing"
    feedback: str = "scalar"  # scalar | per_dim | one_expert
    jump_every: tuple[int, int] = (0, 0)  # non-stationary: targets jump every U[a,b] steps (0 = never)
    # output addresses carry the observation flag (each output's address is then its observation slot's): a
    # constant component of every output address, so a push key can weigh an expert in or out of every
    # output at once (its entry there is a gate on the push attention); off for every policy before it
    output_flag: bool = False

    def validate(self):
        super().validate()
        if self.feedback not in FEEDBACKS:
            raise ConfigError(f"task.feedback must be one of {FEEDBACKS}, got {self.feedback!r}")
        a, b = self.jump_every
        if a < 0 or b < a:
            raise ConfigError("task.jump_every must be [a, b] with 0 <= a <= b")
        return self


def interface(feedback: str, base: np.ndarray, output_flag: bool = False) -> Interface:
    """The membrane's view of guessing episodes with output address parts ``base`` [B, d, A-2]:
    d observation slots (the last guess), then the feedback slots (1 scalar or d per-dimension).
    ``output_flag``: the outputs' addresses carry the observation flag (``GuessingConfig.output_flag``)."""
    B, d = base.shape[:2]
    addr_dim = base.shape[-1] + N_KIND_FLAGS
    out_addr = with_kind(base, KIND_OBSERVATION if output_flag else None)
    if feedback == "scalar":
        err_addr = np.zeros((B, 1, addr_dim), np.float32)
        err_addr[..., KIND_FEEDBACK] = 1.0
        slot_addr = np.concatenate([with_kind(base, KIND_OBSERVATION), err_addr], axis=1)
    else:
        slot_addr = np.concatenate([with_kind(base, KIND_OBSERVATION), with_kind(base, KIND_FEEDBACK)], axis=1)
    vis = Visibility("first", d, 2 * d) if feedback == "one_expert" else Visibility()
    return Interface(slot_addr, out_addr, vis, (("observation", d), ("feedback", 1 if feedback == "scalar" else d)))


@dataclass
class Episode(TaskEpisode):
    """A batch of B guessing-game episodes."""

    feedback: str
    targets: np.ndarray  # [B, d], or [T, B, d] when targets jump over time
    interface: Interface
    jumps: np.ndarray | None = None  # [T, B] bool: targets changed at this step

    @property
    def out_addr(self) -> np.ndarray:
        return self.interface.out_addr

    @property
    def slot_addr(self) -> np.ndarray:
        return self.interface.slot_addr

    def targets_at(self, t: int) -> np.ndarray:
        return self.targets if self.targets.ndim == 2 else self.targets[min(t, len(self.targets) - 1)]

    def first_targets(self) -> np.ndarray:
        return self.targets if self.targets.ndim == 2 else self.targets[0]

    def select(self, idx) -> "Episode":
        targets = self.targets[idx] if self.targets.ndim == 2 else self.targets[:, idx]
        jumps = None if self.jumps is None else self.jumps[:, idx]
        return Episode(self.feedback, targets, self.interface.select(idx), jumps)

    def observe(self, ops, t: int, prev_output):
        return observe(ops, self, prev_output, t)

    def loss(self, ops, t: int, output):
        return error(ops, output, ops.asarray(self.targets_at(t)))

    def metrics(self, t: int, output: np.ndarray) -> dict[str, np.ndarray]:
        return {"error": np.asarray(error(_NP, np.asarray(output, np.float32), self.targets_at(t)))}


def fixed_addresses(seed: int, d: int, addr_dim: int) -> np.ndarray:
    return random_addresses(np.random.default_rng([seed, d]), (d,), addr_dim)


def address_table(cfg: TaskConfig, d: int, addr_dim: int) -> np.ndarray | None:
    """The fixed output addresses [d, A-2] of a task with ``addresses = 'fixed'``, else None."""
    if cfg.addresses != "fixed":
        return None
    return fixed_addresses(cfg.address_seed, d, addr_dim)


def sample(
    rng: np.random.Generator,
    cfg: GuessingConfig,
    batch: int,
    d: int,
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
    if cfg.jump_every[1] > 0:
        targets, jumps = _jumping(rng, cfg, targets, T)
    return Episode(cfg.feedback, targets, interface(cfg.feedback, base, cfg.output_flag), jumps)


def _jumping(rng, cfg: GuessingConfig, targets: np.ndarray, T: int):
    """[T, B, d] targets that jump every U[a, b] steps from ``targets``, and the jumps [T, B]."""
    a, b = cfg.jump_every
    batch, d = targets.shape
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
    return seq, jumps


def error(ops, guess, target):
    """3 x mean squared error over dimensions: [B]."""
    diff = guess - target
    return 3.0 * ops.mean(diff * diff, axis=-1)


def observe(ops, ep: Episode, prev_guess, t: int):
    """Slot values at inner step t: the previous guess and the feedback on it.

    At t = 0 nothing has been guessed yet: every slot is 0. So at step t the agent
    has had exactly t feedbacks, as a classical optimizer making its (t+1)-th guess.
    """
    if t == 0 or prev_guess is None:
        n_fb = 1 if ep.feedback == "scalar" else ep.dims
        return ops.zeros((ep.batch, ep.dims + n_fb))
    target = ops.asarray(ep.targets_at(t - 1))
    if ep.feedback == "scalar":
        fb = error(ops, prev_guess, target)[:, None]
    else:
        fb = prev_guess - target
    return ops.concat([prev_guess, fb], axis=-1)


class GuessingTask(Task):
    """The guessing game as a registered task (see the module doc)."""

    name = "guessing"
    config_class = GuessingConfig
    growth_metric = "error"  # (and scale's, a subclass)

    @classmethod
    def evaluation_config(cls, cfg: GuessingConfig) -> GuessingConfig:
        """The stationary game (a policy trained with target jumps runs without them)."""
        import dataclasses

        return dataclasses.replace(cfg, jump_every=(0, 0))

    def card_evaluations(self) -> list[tuple[int, int, int]]:
        """The smallest and largest trained d, each with the default N and the smallest trained N where they
        differ (20 steps for a policy trained with target jumps)."""
        steps = 20 if self.cfg.jump_every[1] else self.cfg.steps
        ns = sorted({self.cfg.experts[0], self.default_experts()})
        return [(d, n, steps) for d in sorted({self.cfg.dims[0], self.cfg.dims[1]}) for n in ns]

    def sample(self, rng: np.random.Generator, batch: int, *, dims: int, experts: int, steps: int,
               addr_dim: int) -> Episode:
        return sample(rng, self.cfg, batch, dims, addr_dim, steps=steps, addresses=address_table(self.cfg, dims, addr_dim))

    def extend(self, rng: np.random.Generator, episode: Episode, steps: int) -> Episode:
        """A never-reset agent's next batch: the same targets, or (jumping targets) fresh ones drawn
        for steps 0..steps-1 on the same addresses."""
        if not self.cfg.jump_every[1]:
            return episode
        fresh = sample(rng, self.cfg, episode.batch, episode.dims, episode.interface.out_addr.shape[-1],
                       steps=steps, addresses=address_table(self.cfg, episode.dims, episode.out_addr.shape[-1]))
        return Episode(episode.feedback, fresh.targets, episode.interface, fresh.jumps)

    def report(self, metrics: dict[str, np.ndarray], episodes: list[Episode], *, steps: int, seed: int,
               baselines: bool = True) -> dict:
        """``mse_by_step`` (3 x MSE, mean over episodes), ``final_mse`` (+ its standard error) and,
        for stationary targets, the baselines on the same targets: ``chance`` (guess 0),
        ``random_guess``, ``mean_solution`` and the tuned classical ``optimizer``."""
        from . import baselines as bl

        errs = metrics["error"]
        report = {"mse_by_step": errs.mean(axis=1).tolist(), "final_mse": float(errs[-1].mean()),
                  "final_mse_sem": float(errs[-1].std() / np.sqrt(errs.shape[1]))}
        if baselines and self.cfg.jump_every[1] == 0:
            targets = np.concatenate([ep.first_targets() for ep in episodes], axis=0)
            report["chance"] = float(bl.zero_guess(targets, steps)[-1])
            report["random_guess"] = float(bl.random_guess(targets, steps, np.random.default_rng(seed))[-1])
            report["mean_solution"] = float(bl.mean_solution(targets, steps)[-1])
            if self.cfg.feedback == "scalar" and targets.shape[1] > MAX_NELDER_MEAD_DIMS:
                report["optimizer"] = None  # its simplex holds d + 1 points of d numbers per episode
                report["notes"] = [f"the tuned Nelder-Mead baseline is skipped above d = {MAX_NELDER_MEAD_DIMS} "
                                   f"(its simplex is (d + 1) x d per episode)"]
            else:
                report["optimizer"] = bl.tuned(self.cfg.feedback, targets, steps, seed=seed)
        return report


class _NumpyFloat:
    """The two ops ``error`` needs, on float32 numpy arrays (metrics are numpy, never torch)."""

    @staticmethod
    def mean(x, axis=None):
        return np.mean(x, axis=axis)


_NP = _NumpyFloat()

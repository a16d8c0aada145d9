"""The guessing game at scale: many outputs, and feedback that each expert hears only in part.

Why this task measures whether many experts matter (issue 13): an expert's push is affine in
the output address (``membrane.push``: c_e + u_e . b_i), so one expert can fit at most
``addr_dim - 1`` numbers exactly (7 with the usual 8-entry addresses, 2 of them kind flags).
With d in the tens to thousands, covering d outputs needs many experts dividing the address
space among themselves (the push attention decides who drives which output): the best
possible error falls as N grows until N ~ d / 7, so an agent that uses its experts improves
with N far past any N seen in training, and one expert alone stays near chance.

Each expert reads the per-dimension error of only a random ``feedback_fraction`` of the
outputs (``membrane.Visibility('fraction')``, a hash of the expert's seat and the slot): what
the others heard reaches it only through messages, so cutting messages costs accuracy.

Settings are the guessing game's (``GuessingConfig``) with per-dimension feedback by default,
plus ``feedback_fraction``; the report and baselines are the guessing game's (the tuned Adam
baseline sees every error, so it is a reference, not a target, at large d).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..config import ConfigError
from ..membrane import Visibility
from .guessing import Episode, GuessingConfig, GuessingTask


@dataclass
class ScaleConfig(GuessingConfig):
    name: str = "scale"
    feedback: str = "per_dim"
    dims: tuple[int, int] = (16, 128)
    experts: tuple[int, int] = (4, 32)
    feedback_fraction: float = 0.5  # the part of the per-dimension errors each expert reads

    def validate(self):
        super().validate()
        if self.feedback != "per_dim":
            raise ConfigError("the scale task gives per-dimension feedback (task.feedback = 'per_dim')")
        if not 0.0 < self.feedback_fraction <= 1.0:
            raise ConfigError("task.feedback_fraction must be in (0, 1]")
        return self


class ScaleTask(GuessingTask):
    """The guessing game at scale (see the module doc)."""

    name = "scale"
    config_class = ScaleConfig

    def sample(self, rng: np.random.Generator, batch: int, *, dims: int, experts: int, steps: int,
               addr_dim: int) -> Episode:
        ep = super().sample(rng, batch, dims=dims, experts=experts, steps=steps, addr_dim=addr_dim)
        return _with_partial_feedback(ep, self.cfg.feedback_fraction, int(rng.integers(2**31)))

    def extend(self, rng: np.random.Generator, episode: Episode, steps: int) -> Episode:
        if not self.cfg.jump_every[1]:
            return episode
        fresh = super().extend(rng, episode, steps)
        return dataclasses.replace(fresh, interface=episode.interface)


def _with_partial_feedback(ep: Episode, fraction: float, seed: int) -> Episode:
    if fraction >= 1.0:
        return ep
    d = ep.dims
    vis = Visibility("fraction", d, 2 * d, fraction, seed)
    return dataclasses.replace(ep, interface=dataclasses.replace(ep.interface, visibility=vis, _masks={}))

"""The agreement rule: when a communication stage ends.

A stage runs rounds of message exchange; after each round the rule decides, per
episode, whether the experts have agreed:

- ``fixed``: exactly ``rounds`` rounds.
- ``convergence``: stop once no message changed by more than ``eps`` (max abs) in
  the last round, or after ``rounds`` rounds.
- ``quorum``: every expert emits a vote in (0, 1) (its learned 'done' head); stop
  once at least ``quorum`` of the experts vote above 0.5, or after ``rounds``. In
  training (``train.vote_weight``) a vote learns to predict that the expert's own
  message has settled (changed by less than ``eps`` in the round): the stage ends when
  a quorum of experts expects no more change, without measuring it.

Each rule needs only quantities an expert can see or broadcast (its own change,
its own vote): the actor runtime evaluates them without a global lock-step.
"""

from __future__ import annotations

from .config import AgreementConfig


def max_rounds(cfg: AgreementConfig) -> int:
    return cfg.rounds


def still_talking(ops, cfg: AgreementConfig, rounds_done: int, active, prev_value, new_value, vote):
    """Which episodes go on to another round after ``rounds_done`` rounds.

    active: [B] bool; prev_value/new_value: [B, N, Dm] messages before/after the
    round; vote: [B, N] the experts' 'done' votes in (0, 1).
    """
    if rounds_done >= cfg.rounds:
        return active & False
    if cfg.rule == "fixed":
        return active
    if cfg.rule == "convergence":
        delta = ops.amax(ops.abs(ops.detach(new_value) - ops.detach(prev_value)), axis=(-1, -2))
        return active & (delta >= cfg.eps)
    if cfg.rule == "quorum":
        frac = ops.mean(ops.float_(ops.detach(vote) > 0.5), axis=-1)
        return active & (frac < cfg.quorum)
    raise ValueError(f"unknown agreement rule {cfg.rule!r}")


def vote_target(ops, cfg: AgreementConfig, prev_value, new_value):
    """What an expert's 'done' vote is trained to say after a round: 1 when its own message
    changed by less than ``eps`` (max abs) in that round. [B, N] in {0, 1}."""
    change = ops.amax(ops.abs(ops.detach(new_value) - ops.detach(prev_value)), axis=-1)
    return ops.float_(change < cfg.eps)


def vote_loss(ops, cfg: AgreementConfig, vote, prev_value, new_value):
    """Binary cross-entropy of the votes [B, N] against ``vote_target`` (mean over experts)."""
    y = vote_target(ops, cfg, prev_value, new_value)
    p = vote * (1 - 2e-6) + 1e-6
    return -ops.mean(y * ops.log(p) + (1 - y) * ops.log(1 - p))

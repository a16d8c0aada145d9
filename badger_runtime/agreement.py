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


def message_change(ops, prev_value, new_value):
    """How far each expert's message moved in a round: max |new - prev| over its entries.

    prev_value, new_value: [..., N, Dm] -> [..., N] (no gradient: a stopping signal)."""
    return ops.amax(ops.abs(ops.detach(new_value) - ops.detach(prev_value)), axis=-1)


def votes(ops, vote_head):
    """The experts' 'done' votes in (0, 1) from their vote head [..., N, 1] -> [..., N]."""
    return ops.sigmoid(vote_head[..., 0])


def still_talking(ops, cfg: AgreementConfig, rounds_done: int, active, change, vote):
    """Which episodes go on to another round after ``rounds_done`` rounds.

    active: [B] bool; change: [B] the largest message change of any expert in the last round
    (``message_change``, max over experts); vote: [B, N] the experts' 'done' votes (``votes``).
    Each input is something an expert knows of itself and can broadcast.
    """
    if rounds_done >= cfg.rounds:
        return active & False
    if cfg.rule == "fixed":
        return active
    if cfg.rule == "convergence":
        return active & (change >= cfg.eps)
    if cfg.rule == "quorum":
        frac = ops.mean(ops.float_(ops.detach(vote) > 0.5), axis=-1)
        return active & (frac < cfg.quorum)
    raise ValueError(f"unknown agreement rule {cfg.rule!r}")


def vote_target(ops, cfg: AgreementConfig, change):
    """What an expert's 'done' vote is trained to say after a round: 1 when its own message
    changed by less than ``eps`` (``message_change``, [B, N]) in that round. [B, N] in {0, 1}."""
    return ops.float_(change < cfg.eps)


def vote_loss(ops, cfg: AgreementConfig, vote, change):
    """Binary cross-entropy of the votes [B, N] against ``vote_target`` (mean over experts)."""
    y = vote_target(ops, cfg, change)
    p = vote * (1 - 2e-6) + 1e-6
    return -ops.mean(y * ops.log(p) + (1 - y) * ops.log(1 - p))

"""Supervision of expert actors (after Erlang/OTP's one_for_one), as a decision without IO.

An expert whose task raises is restarted from its last state (its mailbox is kept, so no
message is lost) or removed; more than ``max_restarts`` restarts of one expert escalate to
removal. The last expert of an agent cannot be removed: it is restarted, and past ten times the
limit the failure escalates out of the agent. A failure of the policy call the experts of a round
share (``PolicyCallError``) is no expert's own: it is retried (a restart) up to ``max_restarts``
and then escalates, whatever the rule, where removing the experts that waited on it shrank the
agent to one expert without mending anything.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Supervision:
    rule: str = "restart"  # 'restart' from the last state, or 'remove'
    max_restarts: int = 3  # per expert; one more crash removes it

    def __post_init__(self):
        if self.rule not in ("restart", "remove"):
            raise ValueError(f"supervision rule must be 'restart' or 'remove', got {self.rule!r}")

    def decide(self, restarts: int, alone: bool, shared: bool = False) -> str:
        """What to do with an expert that crashed after ``restarts`` restarts: 'restart', 'remove'
        or 'escalate' (``alone``: it is the agent's last expert; ``shared``: the failure is the round's
        shared policy call's, not the expert's own)."""
        if shared:
            return "restart" if restarts < self.max_restarts else "escalate"
        if self.rule == "restart" and restarts < self.max_restarts:
            return "restart"
        if alone:
            return "escalate" if restarts >= 10 * max(1, self.max_restarts) else "restart"
        return "remove"

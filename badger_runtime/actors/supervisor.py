"""Supervision of expert actors (after Erlang/OTP's one_for_one), as a decision without IO.

An expert whose task raises is restarted from its last state (its mailbox is kept, so no
message is lost) or removed; more than ``max_restarts`` restarts of one expert escalate to
removal. The last expert of an agent cannot be removed: it is restarted, and past ten times the
limit the failure escalates out of the agent.
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

    def decide(self, restarts: int, alone: bool) -> str:
        """What to do with an expert that crashed after ``restarts`` restarts: 'restart', 'remove'
        or 'escalate' (``alone``: it is the agent's last expert)."""
        if self.rule == "restart" and restarts < self.max_restarts:
            return "restart"
        if alone:
            return "escalate" if restarts >= 10 * max(1, self.max_restarts) else "restart"
        return "remove"

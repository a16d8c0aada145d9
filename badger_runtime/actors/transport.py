"""What the actor runtime's transport carries, and how it accounts for it.

- ``Frame``: one encoded message (msgpack bytes, or the ``Message`` itself with ``encode=False``),
  shared by the envelopes of a multicast and decoded once.
- ``Envelope``: what a mailbox holds: a frame, plus ``meta`` (sender, step, round) for the
  expert-to-expert messages the transport counts.
- ``Lost``: the transport's notice to a receiver that a message to it will not come (a dead-letter
  notice), so nobody waits for ever.
- ``Counters``: per-message accounting (sent, then exactly one of delivered or dropped with a
  reason), restarts, membership changes.
- ``Fault``: the test hook that decides what happens to one message (None deliver, "drop",
  "corrupt", or n >= 1 scheduler passes of delay).

Mailboxes are unbounded trio memory channels with this invariant (checked in
tests/test_actors.py, ``Counters.peak_mailbox``): a step puts at most, per expert, one ``observe`` frame, its in-neighbours'
messages of the current and the next round (an expert sends round r + 1 only after using its
round-r inbox), one decision per round and the control frames of membership changes; the
membrane's mailbox holds at most one vote per expert and round plus one push or done per
expert. So a mailbox never holds more than about 2 x in-degree + rounds + changes frames,
and nothing waits on a full mailbox (which could deadlock the round barrier).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .messages import Message, decode

MEMBRANE = 1 << 62  # the membrane's address in frames (expert ids are smaller)

Fault = Callable[[int, int, int, int], "None | str | int"]


class Frame:
    """One encoded message as the transport carries it. A multicast frame is shared by its
    receivers' envelopes: the first receiver decodes (and validates) it, the others reuse the
    read-only result. With ``encode=False`` it carries the ``Message`` itself."""

    __slots__ = ("data", "msg")

    def __init__(self, data: bytes | None = None, msg: Message | None = None):
        self.data, self.msg = data, msg

    def message(self) -> Message:
        if self.msg is None:
            self.msg = decode(self.data)
        return self.msg


@dataclass
class Envelope:
    """What travels in a mailbox: a frame, plus the transport's note of an expert message."""

    frame: Frame
    meta: tuple[int, int, int] | None = None  # (sender, step, round) for counted expert messages


@dataclass
class Lost:
    """The transport's notice that a message to this mailbox was lost."""

    sender: int
    step: int
    round: int


@dataclass
class Counters:
    sent: int = 0  # expert->expert envelopes (one per receiver)
    delivered: int = 0  # used in a receiver's inbox
    dropped: int = 0
    dropped_by: dict = field(default_factory=dict)  # reason -> count
    bad_frames: int = 0  # frames that failed to decode or validate (any mailbox)
    frames: int = 0  # every frame handled by a mailbox (messages, observations, votes, control)
    crashes: int = 0
    restarts: int = 0
    removed_on_crash: int = 0
    added: int = 0
    removed: int = 0
    peak_mailbox: int = 0  # the most frames any mailbox held at once (see the invariant above)

    @property
    def in_flight(self) -> int:
        return self.sent - self.delivered - self.dropped

    def drop(self, reason: str, n: int = 1):
        if n:
            self.dropped += n
            self.dropped_by[reason] = self.dropped_by.get(reason, 0) + n

    def add(self, other: "Counters"):
        for k in ("sent", "delivered", "dropped", "bad_frames", "frames", "crashes", "restarts",
                  "removed_on_crash", "added", "removed"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.peak_mailbox = max(self.peak_mailbox, other.peak_mailbox)
        for k, v in other.dropped_by.items():
            self.dropped_by[k] = self.dropped_by.get(k, 0) + v

    def as_dict(self) -> dict:
        return {"sent": self.sent, "delivered": self.delivered, "dropped": self.dropped,
                "bad_frames": self.bad_frames, "dropped_by": dict(self.dropped_by), "crashes": self.crashes,
                "restarts": self.restarts}

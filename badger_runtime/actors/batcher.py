"""Policy evaluation for the actors: one onnxruntime call per round (micro-batched) or per expert.

Every expert steps the same policy once per communication round. A batch-1 onnxruntime call
costs ~14 us; one call for 1000 rows costs well under a millisecond. So in ``micro_batch``
mode the experts of a round park their requests here and the request that completes the
round (the ``expected()``-th, i.e. one per expert taking part in the stage) runs them all as
one call and wakes the others. There is no batcher task and no timer: the round's last
arrival flushes, and ``poke()`` re-checks when the expected count drops (an expert removed
mid-round). Rows are independent, so the result is the same as per-expert calls.

With ``micro_batch=False`` every request is its own call (no coordination at all between
experts: each runs at its own pace).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import trio


@dataclass
class _Request:
    h: np.ndarray
    inbox: np.ndarray
    sensed: np.ndarray
    done: trio.Event = field(default_factory=trio.Event)
    result: tuple[np.ndarray, np.ndarray] | None = None
    error: BaseException | None = None


class PolicyBatcher:
    def __init__(self, policy, micro_batch: bool = True, expected: Callable[[], int] | None = None):
        if micro_batch and expected is None:
            raise ValueError("micro-batching needs expected(): how many requests make a round")
        self.policy = policy
        self.micro_batch = micro_batch
        self.expected = expected
        self.calls = 0  # onnxruntime calls
        self.rows = 0  # expert steps evaluated
        self._pending: dict[int, _Request] = {}

    async def step(self, eid: int, h, inbox, sensed) -> tuple[np.ndarray, np.ndarray]:
        """One policy step for expert ``eid``: (h' [H], heads [heads_dim])."""
        if not self.micro_batch:
            await trio.lowlevel.checkpoint()
            self.calls += 1
            self.rows += 1
            h2, hd = self.policy.step(h[None], inbox[None], sensed[None])
            return h2[0], hd[0]
        if eid in self._pending:
            raise RuntimeError(f"expert {eid} already has a policy request in this round")
        req = _Request(h, inbox, sensed)
        self._pending[eid] = req
        self.poke()
        try:
            await req.done.wait()
        finally:
            if self._pending.get(eid) is req:
                del self._pending[eid]
        if req.error is not None:
            raise req.error
        return req.result

    def withdraw(self, eid: int):
        """Forget a request whose expert is gone (removed mid-round)."""
        self._pending.pop(eid, None)

    def poke(self):
        """Flush if the round is complete."""
        if self._pending and len(self._pending) >= self.expected():
            self.flush()

    def flush(self):
        reqs = list(self._pending.values())
        self._pending.clear()
        self.calls += 1
        self.rows += len(reqs)
        try:
            h2, hd = self.policy.step(np.stack([r.h for r in reqs]), np.stack([r.inbox for r in reqs]),
                                      np.stack([r.sensed for r in reqs]))
        except Exception as e:  # every waiter gets the error; its supervisor decides
            for r in reqs:
                r.error = e
                r.done.set()
            return
        for i, r in enumerate(reqs):
            r.result = (h2[i], hd[i])
            r.done.set()

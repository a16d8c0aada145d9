"""Policy evaluation for the actors: ``PolicyBatcher`` (per-expert actors: one onnxruntime call per
round, micro-batched, or per expert) and ``RowBatcher`` (shards: one gathered evaluation per round).

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


class PolicyCallError(RuntimeError):
    """The policy call failed (onnxruntime raised): a failure every expert waiting on the call shares, not one of
    them (``supervisor.Supervision.decide``'s ``shared``); the original error is its ``__cause__``."""

    @classmethod
    def of(cls, e: Exception, experts: int) -> "PolicyCallError":
        err = cls(f"the policy call of {experts} expert{'s' * (experts != 1)} failed: {type(e).__name__}: "
                  f"{str(e)[:200]}")
        err.__cause__ = e
        return err


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
            try:
                h2, hd = self.policy.step(h[None], inbox[None], sensed[None])
            except Exception as e:
                raise PolicyCallError.of(e, 1) from e
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
            err = PolicyCallError.of(e, len(reqs))
            for r in reqs:
                r.error = err
                r.done.set()
            return
        for i, r in enumerate(reqs):
            r.result = (h2[i], hd[i])
            r.done.set()


DEFAULT_POLICY_CHUNK = 4096  # rows per onnxruntime call of a RowBatcher


def chunk_bounds(rows: int, chunk: int) -> list[tuple[int, int]]:
    """[a, b) row ranges of at most ``chunk`` rows (0 or less: one range) covering ``rows``."""
    chunk = rows if chunk <= 0 else int(chunk)
    return [(a, min(a + chunk, rows)) for a in range(0, rows, max(chunk, 1))]


def step_rows(policy, chunks, h, inbox, sensed, h_out, heads_out):
    """The policy on rows [rows, .] in calls of the ``chunks`` ranges, written into ``h_out`` and
    ``heads_out``."""
    for a, b in chunks:
        h_out[a:b], heads_out[a:b] = policy.step(h[a:b], inbox[a:b], sensed[a:b])


class RowBatcher:
    """Gathers every shard's policy rows of a round into one evaluation, then scatters the results.

    Rows live in preallocated buffers, shard i at rows ``[B lo_i, B hi_i)`` (its [B, n_i] rows,
    episode-major). The shard that completes the round runs the policy on all rows (in calls of at
    most ``chunk`` rows; 0 = one call) and wakes the others; each takes back views of its rows of
    the output buffers. The state buffers are double-buffered: a round reads the state from one
    and writes the new state into the other, so the views a round returns stay valid through the
    next round (which overwrites the other pair) and a shard that keeps them as its state
    (``ShardCore.apply(adopt=True)``) hands them back as the next round's input without a copy;
    likewise an inbox already computed in place (``inbox_view``) is not copied. The sensed rows
    are constant during an inner step: a shard sends them with its first round only.
    """

    def __init__(self, policy, bounds: list[tuple[int, int]], batch: int, chunk: int = DEFAULT_POLICY_CHUNK):
        spec = policy.spec
        self.policy = policy
        self.bounds = bounds
        self.batch = batch
        rows = batch * bounds[-1][1]
        self.rows_total = rows
        self._state = [np.zeros((rows, spec.hidden), np.float32) for _ in range(2)]
        self._heads = [np.zeros((rows, spec.heads_dim), np.float32) for _ in range(2)]
        self._p = 0  # this round reads _state[_p], writes _state[1 - _p] and _heads[1 - _p]
        self._out = 1  # the buffers the last evaluation wrote
        self.inbox = np.zeros((rows, spec.msg_dim), np.float32)
        self.sensed = np.zeros((rows, spec.sensed_dim), np.float32)
        self.chunks = chunk_bounds(rows, chunk)
        self._bindings = [self._bind(p) for p in (0, 1)]
        self.calls = 0  # onnxruntime calls
        self.rounds = 0  # gathered evaluations (one per round)
        self.rows = 0  # expert steps evaluated
        self.copies_skipped = 0  # state / inbox rows handed in as the buffers themselves
        self._waiting: dict[int, trio.Event] = {}
        self._error: BaseException | None = None

    def _bind(self, p: int):
        """IOBinding per chunk for a round that reads state buffer ``p`` (None: call ``policy.step``
        and copy)."""
        sess = getattr(self.policy, "session", None)
        if sess is None or not hasattr(sess, "io_binding"):
            return None
        out = []
        for a, b in self.chunks:
            bind = sess.io_binding()
            bind.bind_cpu_input("state", self._state[p][a:b])
            bind.bind_cpu_input("inbox", self.inbox[a:b])
            bind.bind_cpu_input("sensed", self.sensed[a:b])
            for name, buf in (("state_out", self._state[1 - p][a:b]), ("heads", self._heads[1 - p][a:b])):
                bind.bind_output(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            out.append(bind)
        return out

    def _rows(self, shard: int) -> slice:
        lo, hi = self.bounds[shard]
        return slice(self.batch * lo, self.batch * hi)

    def inbox_view(self, shard: int) -> np.ndarray:
        """Shard ``shard``'s rows of the inbox buffer as [B, n, msg_dim]: a shard that computes its
        inboxes into it hands them in without a copy."""
        rows = self._rows(shard)
        return self.inbox[rows].reshape(self.batch, (rows.stop - rows.start) // self.batch, -1)

    def _put(self, buf: np.ndarray, x, n: int):
        """Copy x [B, n_i, ...] into the rows ``buf`` unless x is those rows already."""
        if isinstance(x, np.ndarray) and x.__array_interface__["data"][0] == buf.__array_interface__["data"][0] \
                and x.nbytes == buf.nbytes and x.flags.c_contiguous:
            self.copies_skipped += 1
            return
        buf[...] = x.reshape(n, -1)

    async def step(self, shard: int, h, inbox, sensed=None):
        """Shard ``shard``'s rows for this round -> (h' [B, n, H], heads [B, n, heads_dim]) views."""
        if shard in self._waiting:
            raise RuntimeError(f"shard {shard} already has rows in this round")
        rows = self._rows(shard)
        n = rows.stop - rows.start
        self._put(self._state[self._p][rows], h, n)
        self._put(self.inbox[rows], inbox, n)
        if sensed is not None:
            self.sensed[rows] = sensed.reshape(n, -1)
        done = trio.Event()
        self._waiting[shard] = done
        if len(self._waiting) == len(self.bounds):
            self._flush()
        await done.wait()
        if self._error is not None:
            raise self._error
        B, out = self.batch, self._out
        return self._state[out][rows].reshape(B, n // B, -1), self._heads[out][rows].reshape(B, n // B, -1)

    def _flush(self):
        waiting, self._waiting = self._waiting, {}
        self._error = None
        p = self._p
        try:
            if self._bindings[p] is not None:
                run = self.policy.session.run_with_iobinding
                for bind in self._bindings[p]:
                    run(bind)
            else:
                step_rows(self.policy, self.chunks, self._state[p], self.inbox, self.sensed, self._state[1 - p],
                          self._heads[1 - p])
        except Exception as e:  # noqa: BLE001  (every waiting shard gets the error and raises it)
            self._error = e
        else:
            self._out, self._p = 1 - p, 1 - p  # the new state is the next round's input
        self.calls += len(self.chunks)
        self.rounds += 1
        self.rows += self.rows_total
        for ev in waiting.values():
            ev.set()

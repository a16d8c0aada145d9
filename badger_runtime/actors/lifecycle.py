"""The lifecycle both actor runtimes share: ``async with agent.running():``, and the rules of a step.

An agent steps once at a time, only while it runs, and only after every earlier step finished: a step
that ends early (cancelled by its caller, timed out, or failed mid-way) leaves experts or shards
mid-step, with messages of that step in flight, so the agent refuses to step again rather than mix
that step's traffic into the next one's (close it and start another, from a checkpoint taken
before). ``close()`` while a step runs ends that step with an error instead of leaving it waiting.
"""

from __future__ import annotations

from contextlib import asynccontextmanager, contextmanager

import trio


class AgentClosed(RuntimeError):
    """The agent was closed while a step waited for its experts."""


class StepTimeout(RuntimeError):
    """An inner step did not finish in ``step_timeout`` seconds (both runtimes): a runtime bug (the text says who
    waits for whom). The agent is then mid-step: close it."""


class Lifecycle:
    """``async with agent.running():`` the agent's tasks live inside the block (a nursery owns
    them); ``close()`` ends them. The class provides ``run(task_status=...)``, ``_closed``,
    ``_nursery`` (while it runs), ``_stepping`` and ``t`` (the next inner step)."""

    _unfinished: str | None = None  # why the agent cannot step again: a step that did not finish

    @asynccontextmanager
    async def running(self):
        async with trio.open_nursery() as n:
            await n.start(self.run)
            try:
                yield self
            finally:
                self.close()

    def close(self):
        self._closed.set()

    def _check_open(self):
        """Refuse a membership change of a closed agent (its experts or shards are gone)."""
        if self._closed.is_set():
            raise RuntimeError("the agent is closed: its experts are gone")

    def _check_steppable(self):
        """Refuse a step the agent cannot take now (nothing is changed)."""
        if self._nursery is None:
            raise RuntimeError("the agent is not running: use `async with agent.running():`")
        if self._stepping:
            raise RuntimeError("a step is already running: the membrane feeds one observation at a time")
        if self._unfinished is not None:
            raise RuntimeError(f"{self._unfinished}: its experts may be mid-step with its messages in flight, so "
                               "this agent cannot step again; close it and start another (from a checkpoint)")

    @contextmanager
    def _one_step(self):
        """Around the awaited part of a step: marks the agent stepping, and unable to step again if
        the step does not finish (an exception or a cancellation leaves this block)."""
        self._stepping = True
        try:
            yield
        except BaseException as e:
            why = ("cancelled" if isinstance(e, trio.Cancelled) else "timed out" if isinstance(e, trio.TooSlowError)
                   else type(e).__name__)
            self._unfinished = f"step {self.t} did not finish ({why})"
            raise
        finally:
            self._stepping = False

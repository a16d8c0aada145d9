"""The lifecycle both actor runtimes share: ``async with agent.running():``."""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio


class Lifecycle:
    """``async with agent.running():`` the agent's tasks live inside the block (a nursery owns
    them); ``close()`` ends them. The class provides ``run(task_status=...)`` and ``_closed``."""

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

"""The actor runtime: every expert a trio task with its own state, talking only by messages.

- ``messages``: the versioned msgpack schema of the frames (``Message``, ``encode``, ``decode``).
- ``expert``: ``ExpertCore``, one expert as a sans-IO state machine (the shared maths on B = 1).
- ``directory``: membership and wiring (what it holds and why: its docstring).
- ``batcher``: policy evaluation, one onnxruntime call per round or per expert.
- ``runtime``: ``ActorAgent`` (nursery, mailboxes, membrane, supervision, counters, faults).
- ``sharded``: ``ShardedAgent``, the fast path (experts in shards, one gathered tick per round).
- ``episodes``: the seeded batches of ``evaluation.run_episodes`` run on actors or shards.

Names are imported lazily so ``import badger_runtime.actors.messages`` does not load trio.
"""

from __future__ import annotations

_EXPORTS = {
    "ActorAgent": "runtime", "Counters": "runtime", "Supervision": "runtime",
    "StepTimeout": "lifecycle", "ExpertCrash": "runtime", "MEMBRANE": "runtime", "AgentClosed": "lifecycle",
    "ExpertCore": "expert", "Directory": "directory", "PolicyBatcher": "batcher", "ShardedAgent": "sharded",
    "actor_batch": "episodes", "sharded_batch": "episodes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

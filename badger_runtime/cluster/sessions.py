"""Served sessions on Ray actors: one server front, the sessions' agents spread over a cluster.

``badger serve --ray [ADDRESS]`` gives the ``SessionManager`` a ``RayPlacement``: every session's
``engine.Agent`` then lives in its own Ray actor (``AgentHost``), placed by Ray anywhere in the
cluster (``SPREAD``), while the server keeps the protocol, the limits, the locks and the
checkpoints exactly as for local sessions.

The server holds a **mirror** of each hosted agent: an ``engine.Agent`` equal to the actor's agent
after its last completed change. Every change the actor makes returns its new state (after a
step: the experts' state and ``t``; after a membership change or a restore: its whole snapshot),
which the mirror takes. So everything the manager reads (``t``, ``n_experts``, the interface, the
observation check, ``snapshot()`` for undo and for the store's checkpoint) is answered locally,
and the mirror is the session's checkpoint in the server: it outlives the actor. When a call finds
its actor dead (``RayActorError``: the process was killed, its node lost), a new actor is started
from the mirror and the call is retried once, so the session continues exactly where its last
completed request left it (tests/test_cluster.py kills an actor mid-session). A server restart
restores every session from the store's files, as always, onto fresh actors.

Bad input raises inside the actor and comes back as the same exception (``InputError``,
``HorizonError``), so the manager answers it as for a local session.
"""

from __future__ import annotations

import numpy as np

from ..engine import Agent
from ..rollout import AgentState
from .ray_shards import _open, policy_source


class AgentHost:
    """A served session's ``engine.Agent`` in a Ray actor (built from a snapshot)."""

    def __init__(self, source, agent_config, snapshot: dict, past_horizon: bool):
        self.policy = _open(source)
        self.agent = Agent(self.policy, agent_config, past_horizon=past_horizon).restore(snapshot)

    def call(self, method: str, args: tuple, kw: dict) -> dict:
        """Run ``agent.method(*args, **kw)``; returns {"ok": result, "sync": what the mirror needs}
        or {"error": the exception} (raised again in the server, unwrapped)."""
        a = self.agent
        try:
            if method in ("set_past_horizon", "set_interface"):  # settings the mirror already holds
                setattr(a, method[4:], args[0])
                return {"ok": None, "sync": {}}
            result = getattr(a, method)(*args, **kw)
        except Exception as e:  # noqa: BLE001 (the server raises it again and answers it)
            return {"error": e}
        if method == "step":
            return {"ok": result, "sync": {"h": a.state.h, "heads": a.state.heads, "t": a.t}}
        return {"ok": None if method == "restore" else result, "sync": {"full": a.snapshot()}}

    def pid(self) -> int:
        import os

        return os.getpid()


class RayHostedAgent:
    """The server's handle on a session's agent in a Ray actor: the ``engine.Agent`` interface the
    manager uses, answered by the mirror for reads and by the actor for changes (module doc)."""

    def __init__(self, placement: "RayPlacement", mirror: Agent):
        self._placement = placement
        self.local = mirror
        self.restarts = 0
        self.actor = placement.spawn(mirror)

    # reads: the mirror (t, n_experts, dims, slots, batch, interface, observation(), seed, policy, ...)
    def __getattr__(self, name):
        if name == "local":  # not set yet (during construction)
            raise AttributeError(name)
        return getattr(self.local, name)

    @property
    def past_horizon(self) -> bool:
        return self.local.past_horizon

    @past_horizon.setter
    def past_horizon(self, value: bool):
        self._call("set_past_horizon", bool(value))
        self.local.past_horizon = bool(value)

    @property
    def interface(self):
        return self.local.interface

    @interface.setter
    def interface(self, value):  # e.g. a bandit step's feedback slot pointed at the pulled arm
        self._call("set_interface", value)
        self.local.interface = value

    def snapshot(self) -> dict:
        return self.local.snapshot()

    # changes: the actor, then the mirror
    def restore(self, snap: dict) -> "RayHostedAgent":
        self._call("restore", snap)
        return self

    def step(self, slot_values, rounds: int | None = None, record: bool | None = None):
        return self._call("step", np.asarray(slot_values, np.float32), rounds=rounds)

    def add_experts(self, n: int, init: str | None = None, source: int | None = None, sources=None, *,
                    allow_harmful: bool = False) -> list[int]:
        return self._call("add_experts", n, init=init, source=source, sources=sources, allow_harmful=allow_harmful)

    def remove_experts(self, indices) -> int:
        return self._call("remove_experts", list(indices))

    def _call(self, method: str, *args, **kw):
        ray = self._placement.ray
        try:
            reply = ray.get(self.actor.call.remote(method, args, kw))
        except ray.exceptions.RayActorError:
            # the actor is gone: a new one from the mirror (the state after the last completed change)
            self.restarts += 1
            self._placement.restarted(self)
            self.actor = self._placement.spawn(self.local)
            reply = ray.get(self.actor.call.remote(method, args, kw))
        if "error" in reply:
            raise reply["error"]
        sync = reply["sync"]
        if "full" in sync:
            self.local.restore(sync["full"])
        elif "h" in sync:
            self.local.state = AgentState(sync["h"], sync["heads"])
            self.local.t = sync["t"]
        return reply["ok"]


class RayPlacement:
    """Where a ``SessionManager`` puts its sessions' agents: one Ray actor each (``place``).

    ``address``: a Ray cluster to join (None: a local instance, or the cluster ``RAY_ADDRESS``
    names); ``actor_options``: Ray options of every host actor (default: 1/4 CPU, spread)."""

    def __init__(self, policy, agent_config=None, *, address: str | None = None, actor_options: dict | None = None,
                 log=None):
        from . import connect

        self.ray = connect(address)
        self.policy = policy
        self.agent_config = agent_config or policy.agent
        self.source = self.ray.put(policy_source(policy))
        opts = {"num_cpus": 0.25, "scheduling_strategy": "SPREAD", "max_restarts": 0} | (actor_options or {})
        self._cls = self.ray.remote(**opts)(AgentHost)
        self.log = log
        self.restarts = 0

    def spawn(self, mirror: Agent):
        return self._cls.remote(self.source, mirror.cfg, mirror.snapshot(), mirror.past_horizon)

    def place(self, agent: Agent) -> RayHostedAgent:
        """Move a freshly built (or restored) session agent into a Ray actor."""
        return RayHostedAgent(self, agent)

    def restarted(self, hosted: RayHostedAgent):
        self.restarts += 1
        if self.log is not None:
            self.log("warning", "session_actor_restarted", t=hosted.local.t, experts=hosted.local.n_experts,
                     restarts=hosted.restarts)

    def describe(self) -> dict:
        res = self.ray.cluster_resources()
        return {"placement": "ray", "nodes": len(self.ray.nodes()), "cpus": res.get("CPU", 0),
                "actor_restarts": self.restarts}


__all__ = ["AgentHost", "RayHostedAgent", "RayPlacement"]

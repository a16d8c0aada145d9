"""Episodes: one seeded sampler, one driver, one loop for every runtime.

- ``sample_batches``: the seeded stream of (task episodes, agent wiring) batches that every
  evaluation draws (``eval``, ``run``, ``longrun``, ``demo``, ``bench``): the same seed gives
  the same episodes, initial states and topologies whatever the runtime.
- ``Driver``: feeds one batch of task episodes to a runtime, step by step, without doing any
  IO: ``observation()`` asks the task for step t's slot values (from step t - 1's outputs),
  ``record(outputs, info)`` scores them with the task, ``due()`` lists the membership changes
  (hot-adds, removals) scheduled before step t.
- ``drive(runtime, driver)`` / ``await adrive(runtime, driver)``: the loop, for a runtime whose
  ``step`` is a plain call (``engine.Agent``, a served session) or a coroutine (the actor
  runtimes). Runtimes and the loop never see the task; the driver never sees the runtime's
  internals (see ``engine`` for the runtime interface).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from .config import AgentConfig, ConfigError
from .rollout import StepInfo, Wiring, sample_wiring

CHUNK = 250  # episodes per batch in seeded evaluations (the stream is drawn in batches of this size)


def episode_rngs(seed: int):
    """Separate streams for the task and for the agent's wiring, so the same seed gives
    the same episodes whatever the number of experts."""
    return np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])


def growth_rng(seed: int, start: int) -> np.random.Generator:
    """What growing draws from (new experts' noise, clone sources, new links) in the batch whose
    first episode is ``start``: a stream of its own, so that an evaluation with a membership change
    and one without draw the same episodes and wirings in every batch (every runtime uses it)."""
    return np.random.default_rng([seed, 2, start])


def sample_batches(task, agent: AgentConfig, *, dims: int, experts: int, episodes: int, seed: int, steps: int,
                   chunk: int = CHUNK, rngs=None) -> Iterator[tuple[int, Any, Wiring]]:
    """Seeded batches ``(first episode index, task episodes, wiring)`` of at most ``chunk`` episodes.

    ``task`` is a ``tasks.Task`` (or its settings). The task stream draws the episodes, the
    agent stream the wiring, both in the same chunks in every runtime (``rngs``: the two
    streams, default ``episode_rngs(seed)``)."""
    from .tasks import Task, make_task

    task = task if isinstance(task, Task) else make_task(task)
    rng_task, rng_wire = rngs if rngs is not None else episode_rngs(seed)
    done = 0
    while done < episodes:
        b = min(chunk, episodes - done)
        ep = task.sample(rng_task, b, dims=dims, experts=experts, steps=steps, addr_dim=agent.policy.addr_dim)
        yield done, ep, sample_wiring(rng_wire, agent, b, experts)
        done += b


def objective_weights(kind: str, steps: int) -> np.ndarray:
    """How the training objective weighs the loss of each of ``steps`` inner steps (sums to 1):
    ``last`` (the last step only), ``mean``, ``weighted`` (later steps count more, every step counts).
    Both outer loops use it (BPTT: ``training.train``; ES: ``cluster.es``)."""
    if kind == "last":
        w = np.zeros(steps, np.float32)
        w[-1] = 1.0
    elif kind == "mean":
        w = np.ones(steps, np.float32)
    else:
        w = np.arange(1, steps + 1, dtype=np.float32)
    return w / w.sum()


def objective_terms(errors, log_floor: float = 0.0):
    """What the objective weighs at each inner step (numpy or torch, any shape): the errors themselves
    or, with ``train.log_floor`` > 0, log(error + log_floor): each step then counts by its error's
    ratio to the floor, so a harm of 1.5x at an error of 1e-4 weighs what it weighs at 1."""
    if not log_floor:
        return errors
    if isinstance(errors, np.ndarray):
        return np.log(errors + log_floor)
    return (errors + log_floor).log()


# ---- membership changes ---------------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    """A membership change applied before inner step ``at``: add ``n`` experts (``init`` fresh or
    clone) or remove ``n`` of them (chosen at random by the driver's seed). ``allow_harmful``: add
    fresh experts even to a policy whose card says they hurt it (``engine.check_growth``)."""

    at: int
    kind: str  # "add" | "remove"
    n: int
    init: str = "fresh"
    allow_harmful: bool = False

    def __post_init__(self):
        if self.kind not in ("add", "remove"):
            raise ConfigError(f"a change is 'add' or 'remove', got {self.kind!r}")
        if self.init not in ("fresh", "clone"):
            raise ConfigError(f"new experts are 'fresh' or 'clone', got {self.init!r}")
        if self.at < 0 or self.n < 1:
            raise ConfigError(f"a change needs at >= 0 and n >= 1, got at={self.at} n={self.n}")


def schedule(add_at: int | None = None, add: int = 0, init: str = "fresh", remove_at: int | None = None,
             remove: int = 0, allow_harmful: bool = False) -> tuple[Change, ...]:
    """The changes of ``badger eval --add-at T --add M --init I --remove-at T --remove M
    [--allow-harmful-growth]``."""
    out = []
    if add_at is not None or add:
        if add_at is None or add < 1:
            raise ConfigError("--add-at T and --add M go together (M >= 1)")
        out.append(Change(add_at, "add", add, init, allow_harmful))
    if remove_at is not None or remove:
        if remove_at is None or remove < 1:
            raise ConfigError("--remove-at T and --remove M go together (M >= 1)")
        out.append(Change(remove_at, "remove", remove))
    return tuple(sorted(out, key=lambda c: c.at))


# ---- the driver -------------------------------------------------------------------------------

@dataclass
class Trajectory:
    """What a driver recorded over its steps."""

    outputs: Any  # [T, B, d]
    losses: Any  # [T, B] the task's training loss of each step's outputs
    rounds: Any  # [T, B] communication rounds used
    metrics: dict = field(default_factory=dict)  # name -> [T, B] numpy (with_metrics)
    infos: list = field(default_factory=list)  # StepInfo per step (record)
    vote_loss: Any = 0.0  # mean over steps of the summed 'done'-vote loss (with_vote_loss)
    messages: int = 0  # expert -> expert messages delivered (when the runtime counts them)
    experts: list = field(default_factory=list)  # experts taking part, per step


class Driver:
    """Feeds ``steps`` inner steps of a batch of task episodes to a runtime (no IO; see the module doc).

    ``ops`` is the array namespace the task computes with (torch in training, so the loss is
    differentiable; numpy otherwise); ``t0`` and ``prev_output`` continue agents that already
    ran (the slot values at t0 are the feedback on ``prev_output``); ``changes`` are hot-adds
    and removals (``Change``) at absolute inner steps; ``seed`` picks the experts a removal takes.
    """

    def __init__(self, ops, episode, steps: int, *, t0: int = 0, prev_output=None, rounds: int | None = None,
                 changes: tuple[Change, ...] = (), record: bool = False, with_vote_loss: bool = False,
                 with_metrics: bool = True, with_losses: bool = True, seed: int = 0):
        if steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        self.ops, self.episode = ops, episode
        self.t, self.end, self.rounds = t0, t0 + steps, rounds
        self.prev = prev_output if prev_output is not None else ops.zeros((episode.batch, episode.dims))
        self.changes = tuple(changes)
        self.record_infos, self.with_vote_loss = record, with_vote_loss
        self.with_metrics, self.with_losses = with_metrics, with_losses
        self._rng = np.random.default_rng([seed, 3])
        self._outputs, self._losses, self._rounds, self._infos, self._experts = [], [], [], [], []
        self._metrics: dict[str, list] = {}
        self._vote_loss = 0.0
        self._messages = 0
        self._steps = steps

    @property
    def finished(self) -> bool:
        return self.t >= self.end

    def due(self) -> list[Change]:
        """The membership changes to apply before this step."""
        return [c for c in self.changes if c.at == self.t]

    def apply(self, runtime, change: Change):
        """Apply a change to any runtime (their add/remove calls are synchronous)."""
        if change.kind == "add":
            runtime.add_experts(change.n, init=change.init, allow_harmful=change.allow_harmful)
            return
        ids = runtime.expert_ids()
        if change.n >= len(ids):
            raise ConfigError(f"cannot remove {change.n} of {len(ids)} experts: at least one must stay")
        pick = self._rng.choice(len(ids), size=change.n, replace=False)
        runtime.remove_experts([ids[i] for i in sorted(pick)])

    def observation(self):
        """Slot values [B, J] for this step."""
        return self.episode.observe(self.ops, self.t, self.prev)

    def record(self, outputs, info: StepInfo):
        """Take this step's outputs [B, d] and what the runtime reported."""
        ops, t = self.ops, self.t
        if self.with_losses:
            self._losses.append(self.episode.loss(ops, t, outputs))
        if self.with_metrics:
            for k, v in self.episode.metrics(t, ops.to_numpy(outputs)).items():
                self._metrics.setdefault(k, []).append(np.asarray(v))
        if self.with_vote_loss:
            self._vote_loss = self._vote_loss + info.vote_loss / self._steps
        self._outputs.append(outputs)
        r = info.rounds
        if not isinstance(r, (int, float, np.ndarray)):
            r = ops.to_numpy(r)
        self._rounds.append(np.broadcast_to(np.asarray(r), (self.episode.batch,)))
        self._messages += info.messages or 0
        self._experts.append(info.experts)
        if self.record_infos:
            self._infos.append(info)
        self.prev = outputs
        self.t += 1

    def result(self) -> Trajectory:
        ops = self.ops
        stack = (lambda xs: ops.stack(xs)) if self._outputs else (lambda xs: None)
        return Trajectory(stack(self._outputs), stack(self._losses) if self._losses else None,
                          np.stack(self._rounds) if self._rounds else None,
                          {k: np.stack(v) for k, v in self._metrics.items()}, self._infos, self._vote_loss,
                          self._messages, self._experts)


def drive(runtime, driver: Driver) -> Trajectory:
    """Run a driver to its end against a runtime whose ``step`` is a plain call."""
    while not driver.finished:
        for change in driver.due():
            driver.apply(runtime, change)
        out, info = runtime.step(driver.observation(), rounds=driver.rounds)
        driver.record(out, info)
    return driver.result()


async def adrive(runtime, driver: Driver) -> Trajectory:
    """``drive`` for a runtime whose ``step`` is a coroutine (the actor runtimes)."""
    while not driver.finished:
        for change in driver.due():
            driver.apply(runtime, change)
        out, info = await runtime.step(driver.observation(), rounds=driver.rounds)
        driver.record(out, info)
    return driver.result()


__all__ = ["CHUNK", "Change", "Driver", "Trajectory", "adrive", "drive", "episode_rngs", "objective_terms",
           "objective_weights", "sample_batches", "schedule"]

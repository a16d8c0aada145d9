"""Task families behind one interface, and the registry that names them.

A task family is one module plus one line in ``REGISTRY`` (or a ``register`` call from your
own code). A task of your own package reaches every ``badger`` command, ``badger export`` and a
served session (the process that runs it must know the task) by an entry point in the
``badger.tasks`` group (``name = "module:TaskClass"`` in your pyproject.toml's
``[project.entry-points."badger.tasks"]``), or, without packaging, by naming its module in the
environment variable ``BADGER_TASKS`` (comma-separated; each module registers its tasks when
imported, e.g. with ``@register``). The inner loop never imports a task: ``rollout``, ``engine``, the actor runtimes
and ``serve`` see an episode only through its ``interface`` (``membrane.Interface``: slot and
output addresses, who reads which slot) and the slot values the driver (``episodes.Driver``)
hands them; the driver calls the task.

What a task implements (``tasks/guessing.py`` is the reference; ``tests/test_tasks.py``
registers a toy task from the test file alone):

- a **settings class**, a subclass of ``config.TaskConfig`` with the task's own typed
  settings and ``validate()``; ``name`` in a config picks it (so policy cards and checkpoints
  keep their task settings);
- a **task class** (subclass of ``Task``): ``sample(rng, batch, dims=, experts=, steps=,
  addr_dim=)`` draws a seeded batch of episodes; ``report(metrics, episodes, ...)`` turns the
  per-step metrics into the task's report keys and adds its baselines on the same episodes;
  optionally ``extend`` (what a never-reset agent meets after the episode's end);
- an **episode class** (subclass of ``TaskEpisode``): holds the batch's private data
  (targets, labels, reward tables) and its ``interface``; ``observe(ops, t, prev_output)``
  gives the slot values [B, J] at inner step t from the outputs of step t - 1;
  ``loss(ops, t, output)`` the training loss [B] of step t's outputs (written against ``xp``
  ops, so torch differentiates it); ``metrics(t, output)`` what is reported (numpy, [B] each).

Everything a task draws comes from the generator it is given, so the same seed gives the same
episodes in every runtime.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
from typing import Any, ClassVar

import numpy as np

from ..config import ConfigError, TaskConfig
from ..membrane import Interface

# name -> "module:Class" (imported when first used, so optional dependencies stay optional)
REGISTRY: dict[str, str] = {
    "guessing": "badger_runtime.tasks.guessing:GuessingTask",
    "scale": "badger_runtime.tasks.scale:ScaleTask",
    "gym": "badger_runtime.tasks.gym:GymTask",
    "bandit": "badger_runtime.tasks.bandit:BanditTask",
    "fewshot": "badger_runtime.tasks.fewshot:FewShotTask",
}
_BUILTIN = frozenset(REGISTRY)
_loaded: dict[str, type["Task"]] = {}


def register(task_cls: type["Task"]) -> type["Task"]:
    """Register a task class under its ``name`` (usable as a class decorator)."""
    name = getattr(task_cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError("a task class needs a non-empty string `name`")
    if not (isinstance(task_cls.config_class, type) and issubclass(task_cls.config_class, TaskConfig)):
        raise ValueError(f"task {name!r}: config_class must be a subclass of config.TaskConfig")
    _loaded[name] = task_cls
    REGISTRY.setdefault(name, f"{task_cls.__module__}:{task_cls.__qualname__}")
    return task_cls


def unregister(name: str):
    """Forget a task registered at run time (tests)."""
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in task")
    _loaded.pop(name, None)
    REGISTRY.pop(name, None)


PLUGIN_GROUP = "badger.tasks"  # entry points: task name -> "module:TaskClass" (imported when first used)
PLUGIN_ENV = "BADGER_TASKS"  # modules to import, comma-separated: each registers its tasks
_plugins: list[str] = []  # the BADGER_TASKS value whose modules were imported (once per value)


def _load_plugins():
    """The tasks of other packages (entry points) and of the modules BADGER_TASKS names."""
    env = os.environ.get(PLUGIN_ENV, "")
    if _plugins and _plugins[0] == env:
        return
    _plugins[:] = [env]
    for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        REGISTRY.setdefault(ep.name, ep.value)
    for module in filter(None, (m.strip() for m in env.split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"{PLUGIN_ENV}: cannot import task module {module!r}: {e}") from None


def unknown_task(name: str) -> str:
    """The error for a task name nobody registered, saying how one is."""
    return (f"unknown task {str(name)[:64]!r}; registered tasks: {task_names()} (a task of your own: name its "
            f"module in {PLUGIN_ENV}, or give your package an entry point in the '{PLUGIN_GROUP}' group)")


def task_names() -> list[str]:
    _load_plugins()
    return sorted(REGISTRY)


def task_class(name: str) -> type["Task"]:
    _load_plugins()
    if name not in REGISTRY:
        raise ConfigError(unknown_task(name))
    if name not in _loaded:
        module, cls = REGISTRY[name].split(":")
        _loaded[name] = getattr(importlib.import_module(module), cls)
    return _loaded[name]


def config_class(name: str) -> type[TaskConfig]:
    return task_class(name).config_class


def make_task(cfg: TaskConfig) -> "Task":
    """The task object for a settings object (validated)."""
    cls = task_class(cfg.name)
    if not isinstance(cfg, cls.config_class):
        raise ConfigError(f"task {cfg.name!r} takes {cls.config_class.__name__} settings, got {type(cfg).__name__}")
    return cls(cfg.validate())


def default_config(name: str = "guessing", **settings) -> TaskConfig:
    """The settings of task ``name`` with some of them given."""
    return config_class(name)(name=name, **settings).validate()


class TaskEpisode:
    """A batch of B episodes drawn by a task: its private data and its ``interface``.

    ``batch_axes`` names the array fields that have a batch axis and where it is, so
    ``select`` (one episode for an actor agent, a sub-batch) works without task code.
    """

    interface: Interface
    batch_axes: ClassVar[dict[str, int]] = {}

    @property
    def batch(self) -> int:
        return self.interface.batch

    @property
    def dims(self) -> int:
        return self.interface.dims

    @property
    def slots(self) -> int:
        return self.interface.slots

    def observe(self, ops, t: int, prev_output) -> Any:
        """Slot values [B, J] at inner step t; ``prev_output`` [B, d] is step t - 1's output
        (zeros before the agent's first step)."""
        raise NotImplementedError

    def loss(self, ops, t: int, output) -> Any:
        """The training loss [B] of step t's outputs [B, d] (lower is better)."""
        raise NotImplementedError

    def metrics(self, t: int, output: np.ndarray) -> dict[str, np.ndarray]:
        """What is reported of step t's outputs: name -> [B] (numpy)."""
        raise NotImplementedError

    def trajectory_loss(self, ops, t0: int, outputs) -> Any:
        """An extra training loss (a scalar) over the outputs [T, B, d] of steps t0 .. t0 + T - 1, for
        what a per-step loss cannot say (e.g. a score-function term for a discrete choice whose
        effect comes later). Training adds it with weight T / episode length. Default: None."""
        return None

    def loss_groups(self, t: int) -> np.ndarray | None:
        """int [B]: the group of step t's prediction for ``train.guard_weight`` (-1: in no group), e.g.
        how many examples of the true class the agent saw before; None: the task has no groups."""
        return None

    def select(self, idx) -> "TaskEpisode":
        """Some of the episodes (``idx``: a slice or an index array on the batch axis)."""
        changes: dict[str, Any] = {"interface": self.interface.select(idx)}
        for name, axis in self.batch_axes.items():
            a = getattr(self, name)
            if a is not None:
                changes[name] = a[(slice(None),) * axis + (idx,)]
        return dataclasses.replace(self, **changes)


class Task:
    """A task family with its settings (see the module doc for what a subclass implements)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[TaskConfig]] = TaskConfig
    size_name: ClassVar[str] = "dims"  # what d is called in this task (dims, classes, arms)
    loss_name: ClassVar[str] = "error"  # the metric the training loss follows (names a metrics() key)
    # The metrics() key, lower is better, by which `badger export` measures what fresh experts and clones joining
    # mid-episode do to a policy (the card's growth verdicts, which every runtime then holds it to: growth.py).
    # None: not measured (a task judged by its own report, e.g. a bandit's regret; its cards say it by hand).
    growth_metric: ClassVar[str | None] = None
    # Whether loss() is differentiable in the outputs (BPTT trains through it); False: train with --outer es
    # (an environment the agent acts in is a black box)
    differentiable: ClassVar[bool] = True
    # A task whose feedback slot points at one of the outputs (the bandit's pulled arm) names the
    # field a served step gives that output's index in, and ``point`` sets it (see ``point``).
    pointer_field: ClassVar[str | None] = None

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    @classmethod
    def evaluation_config(cls, cfg: TaskConfig) -> TaskConfig:
        """The settings ``badger eval --task NAME`` runs for a policy trained on ``cfg`` of this task
        (e.g. the guessing game without target jumps). Default: ``cfg``."""
        return cfg

    def sample(self, rng: np.random.Generator, batch: int, *, dims: int, experts: int, steps: int,
               addr_dim: int) -> TaskEpisode:
        raise NotImplementedError

    def point(self, interface: Interface, index: int | None, slot_values: np.ndarray) -> Interface:
        """A task with a ``pointer_field``: the interface of one episode whose feedback slot points at
        output ``index`` (None: at none) for a step with these slot values [1, J]; a new object (a
        served step: the old one is left intact for its undo)."""
        raise NotImplementedError(f"task {self.name!r} has no pointer field")

    def extend(self, rng: np.random.Generator, episode: TaskEpisode, steps: int) -> TaskEpisode:
        """The same episodes, carried on up to inner step ``steps`` (a never-reset agent's next
        batch in training). Default: unchanged."""
        return episode

    def default_dims(self) -> int:
        return self.cfg.dims[1]

    def default_experts(self) -> int:
        """The number of experts when none is asked: Fig. 7's N = 20 where the trained range holds it,
        else the range's nearest end (a policy trained on N in [3, 6] runs with 6, not 20)."""
        lo, hi = self.cfg.experts
        return min(max(20, lo), hi)

    def experts_for(self, dims: int) -> int:
        """The default number of experts at ``dims`` outputs (``badger eval`` and long runs without
        ``--experts``). Default: ``default_experts()`` whatever the dims."""
        return self.default_experts()

    def card_evaluations(self) -> list[tuple[int, int, int]]:
        """(dims, experts, steps) at which ``badger export`` evaluates a policy for its card."""
        return [(self.default_dims(), self.default_experts(), self.cfg.steps)]

    def card_notes(self) -> dict:
        """What a policy card says about this task beyond its settings (e.g. how the outputs are used)."""
        return {}

    def card_summary(self, report: dict) -> dict:
        """Report keys a card's evaluation row keeps besides the floats and ``*_by_step`` curves."""
        return {}

    def card_extras(self, policy, onnx: str, *, episodes: int, seed: int) -> dict:
        """The task's own card entries beyond the evaluation rows (e.g. its long-run check)."""
        return {}

    #: A task whose 10,000-step check is its own long run (arms or classes that change, never reset)
    #: defines ``continual_check(policy, *, episodes, seed) -> dict`` with a bool
    #: ``"continual"``; the others are held to ``longrun.horizon_report`` (tests/test_longrun.py).
    continual_check = None

    def report(self, metrics: dict[str, np.ndarray], episodes: list[TaskEpisode], *, steps: int, seed: int,
               baselines: bool = True) -> dict:
        """The task's report keys from the metrics ([T, E] each) of ``episodes`` (the batches in
        order), with its baselines on the same episodes. Default: the mean of each metric by step."""
        return {f"{k}_by_step": v.mean(axis=1).tolist() for k, v in metrics.items()}


__all__ = ["PLUGIN_ENV", "PLUGIN_GROUP", "REGISTRY", "Task", "TaskEpisode", "config_class", "default_config",
           "make_task", "register", "task_class", "task_names", "unknown_task", "unregister"]

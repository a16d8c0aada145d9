"""The curriculum: which task settings training batch (or ES generation) b draws from.

``train.stages`` override the task's ranges and settings until a batch; fixed addresses can be
redrawn every ``change_every`` batches. Both outer loops use it (``training.train``, BPTT, and
``cluster.es``, ES); torch-free.
"""

from __future__ import annotations

from dataclasses import replace

from .config import ConfigError, ExperimentConfig, Stage, TaskConfig


def stage_at(cfg: ExperimentConfig, batch: int) -> Stage | None:
    for s in cfg.train.stages:
        if batch < s.until:
            return s
    return None


def task_at(cfg: ExperimentConfig, batch: int) -> tuple[TaskConfig, Stage | None]:
    s = stage_at(cfg, batch)
    task = cfg.task
    if s is not None:
        task = replace(task, dims=s.dims or task.dims, experts=s.experts or task.experts,
                       addresses=s.addresses or task.addresses, **stage_settings(task, s))
        if task.addresses == "fixed" and s.change_every:
            task = replace(task, address_seed=cfg.task.address_seed + 1000 + batch // s.change_every)
    return task, s


def stage_settings(task: TaskConfig, stage: Stage) -> dict:
    """A stage's other task settings, checked against the task's settings class."""
    from .config import _coerce, _hints

    hints = _hints(type(task))
    unknown = set(stage.settings) - set(hints) | ({"name"} & set(stage.settings))
    if unknown:
        raise ConfigError(f"train.stages: task {task.name!r} has no settings {sorted(unknown)}")
    return {k: _coerce(hints[k], v, f"train.stages.settings.{k}") for k, v in stage.settings.items()}


__all__ = ["stage_at", "stage_settings", "task_at"]

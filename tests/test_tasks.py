"""Tasks as plugins: a task registered from this file alone runs through every runtime.

The toy task below is everything a task family has to write (settings, episodes, the task);
the batched engine, the per-expert actors, the sharded actors and a served session run it
through the same driver and agree. Also: the registry, the CLI's --task, the guessing task.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from badger_runtime import tasks
from badger_runtime.config import ConfigError, ExperimentConfig, TaskConfig, from_dict, to_dict
from badger_runtime.engine import numpy_ops
from badger_runtime.tasks.guessing import GuessingConfig
from badger_runtime.episodes import Driver, sample_batches, schedule
from badger_runtime.evaluation import evaluate, run_episodes
from badger_runtime.membrane import KIND_FEEDBACK, KIND_OBSERVATION, Interface, Visibility
from badger_runtime.policy_card import load_policy
from badger_runtime.tasks.guessing import random_addresses, with_kind


# ---- a complete task family, in 40 lines -------------------------------------------------------

@dataclass
class ToyConfig(TaskConfig):
    name: str = "toy"
    dims: tuple[int, int] = (2, 4)
    experts: tuple[int, int] = (3, 3)
    steps: int = 5
    scale: float = 0.5  # targets in U[-scale, scale]

    def validate(self):
        super().validate()
        if not 0 < self.scale <= 1:
            raise ConfigError("task.scale must be in (0, 1]")
        return self


@dataclass
class ToyEpisode(tasks.TaskEpisode):
    """Copy a hidden vector: the agent sees its last output and the signed error of its sum."""

    targets: np.ndarray  # [B, d]
    interface: Interface
    batch_axes: ClassVar[dict[str, int]] = {"targets": 0}

    def observe(self, ops, t, prev_output):
        err = ops.sum(prev_output - ops.asarray(self.targets), axis=-1, keepdims=True)
        return ops.concat([prev_output, err * (1.0 if t else 0.0)], axis=-1)

    def loss(self, ops, t, output):
        diff = output - ops.asarray(self.targets)
        return ops.mean(diff * diff, axis=-1)

    def metrics(self, t, output):
        return {"error": np.mean((output - self.targets) ** 2, axis=-1)}


class ToyTask(tasks.Task):
    name = "toy"
    config_class = ToyConfig

    def sample(self, rng, batch, *, dims, experts, steps, addr_dim):
        targets = rng.uniform(-self.cfg.scale, self.cfg.scale, (batch, dims)).astype(np.float32)
        base = random_addresses(rng, (batch, dims), addr_dim)
        fb = np.zeros((batch, 1, addr_dim), np.float32)
        fb[..., KIND_FEEDBACK] = 1.0
        itf = Interface(np.concatenate([with_kind(base, KIND_OBSERVATION), fb], axis=1), with_kind(base, None),
                        Visibility("first", dims, dims + 1), (("last", dims), ("error", 1)))
        return ToyEpisode(targets, itf)


@pytest.fixture
def toy():
    tasks.register(ToyTask)
    yield ToyTask
    tasks.unregister("toy")


@pytest.fixture(scope="module")
def pol(tiny_policy):
    return load_policy(tiny_policy)


# ---- every runtime, one driver ---------------------------------------------------------------------

def test_a_task_registered_here_runs_in_every_runtime_with_parity(toy, pol):
    cfg = ToyConfig(dims=(3, 3)).validate()
    kw = dict(dims=3, experts=4, episodes=3, seed=7, steps=5)
    ref = run_episodes(numpy_ops(), pol, pol.agent, cfg, **kw)
    assert ref.outputs.shape == (5, 3, 3) and ref.metrics["error"].shape == (5, 3)
    for runtime in ("sharded", "actors"):
        res = run_episodes(numpy_ops(), pol, pol.agent, cfg, runtime=runtime, **kw)
        assert np.abs(res.outputs - ref.outputs).max() <= 1e-5, runtime
        assert np.allclose(res.metrics["error"], ref.metrics["error"], atol=1e-5)
    # the report of an unknown task: its metrics by step (Task.report's default)
    report = evaluate(numpy_ops(), pol, pol.agent, cfg, **kw)
    assert report["task"]["name"] == "toy" and len(report["error_by_step"]) == 5


def test_a_served_session_runs_the_registered_task(toy, pol):
    """A session opened on the toy task, stepped with the driver's slot values (by name and as one
    vector), gives the batched engine's outputs for the same seed."""
    from badger_runtime.serve.protocol import validate_request
    from badger_runtime.serve.sessions import SessionManager

    m = SessionManager(pol)
    cfg = ToyConfig(dims=(2, 2)).validate()

    secret = {}

    def call(kind, **body):
        req = validate_request({"id": 1, "kind": kind, "session": "s", "body": body | secret})
        r = m.handle(req)
        assert r["ok"], r
        return r["body"]

    info = call("open", task="toy", experts=3, dims=2, seed=11)
    secret["secret"] = info["secret"]
    assert info["task"] == "toy" and info["parts"] == [["last", 2], ["error", 1]]
    ref = run_episodes(numpy_ops(), pol, pol.agent, cfg, dims=2, experts=3, episodes=1, seed=11, steps=6)
    _, ep, _ = next(sample_batches(cfg, pol.agent, dims=2, experts=3, episodes=1, seed=11, steps=6))
    driver = Driver(numpy_ops(), ep, 6)
    while not driver.finished:
        obs = driver.observation()
        body = {"slots": obs[0]} if driver.t % 2 else {"last": obs[0, :2], "error": obs[0, 2:]}
        out = call("step", t=driver.t, **body)["outputs"]
        assert np.abs(out - ref.outputs[driver.t, 0]).max() <= 1e-6
        driver.record(np.asarray(out, np.float32)[None], type("I", (), {"rounds": 1, "messages": 0,
                                                                      "experts": 3, "vote_loss": None})())


def test_membership_changes_apply_in_every_runtime(toy, pol):
    """--add-at / --remove-at: the same schedule runs in each runtime (engine vs sharded: the same
    growing rule, so the same outputs; actors: their own rule, the same sizes)."""
    cfg = ToyConfig(dims=(2, 2)).validate()
    changes = schedule(add_at=2, add=3, init="fresh", remove_at=4, remove=2)
    kw = dict(dims=2, experts=4, episodes=2, seed=3, steps=6, changes=changes)
    ref = run_episodes(numpy_ops(), pol, pol.agent, cfg, **kw)
    sh = run_episodes(numpy_ops(), pol, pol.agent, cfg, runtime="sharded", **kw)
    assert np.abs(ref.outputs - sh.outputs).max() <= 1e-5
    act = run_episodes(numpy_ops(), pol, pol.agent, cfg, runtime="actors", **kw)
    assert act.runtime["added"] == 2 * 3 and act.runtime["removed"] == 2 * 2
    assert np.isfinite(act.outputs).all()


# ---- the registry and settings -----------------------------------------------------------------------

def test_registry_and_settings(toy):
    assert {"guessing", "scale", "toy"} <= set(tasks.task_names())
    cfg = from_dict(ExperimentConfig, {"task": {"name": "toy", "scale": 0.25}})
    assert isinstance(cfg.task, ToyConfig) and cfg.task.scale == 0.25
    assert from_dict(ExperimentConfig, to_dict(cfg)).task == cfg.task  # round trip through cards/checkpoints
    with pytest.raises(ConfigError, match="unknown setting"):
        from_dict(ExperimentConfig, {"task": {"name": "toy", "feedback": "scalar"}})
    with pytest.raises(ConfigError, match="registered tasks"):
        from_dict(ExperimentConfig, {"task": {"name": "nope"}})
    with pytest.raises(ConfigError, match="scale"):
        ToyConfig(scale=2.0).validate()
    with pytest.raises(ValueError, match="built-in"):
        tasks.unregister("guessing")


def test_selecting_episodes_keeps_the_batch_fields(toy):
    ep = ToyTask(ToyConfig()).sample(np.random.default_rng(0), 5, dims=3, experts=3, steps=4, addr_dim=6)
    one = ep.select(slice(2, 3))
    assert one.batch == 1 and np.array_equal(one.targets, ep.targets[2:3])
    assert np.array_equal(one.interface.out_addr, ep.interface.out_addr[2:3])
    assert one.interface.visible(4).shape == (1, 4, 4) and not one.interface.visible(4)[0, 1, 3]


def test_cli_task_flag_lists_and_uses_registered_tasks(toy, tiny_policy, capsys):
    from badger_runtime.cli import main

    assert main(["eval", "--policy", str(tiny_policy), "--task", "toy", "--dims", "2", "--episodes", "3",
                 "--steps", "4", "--json", "--option", "scale=0.3"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["task"]["name"] == "toy" and r["task"]["scale"] == 0.3 and len(r["error_by_step"]) == 4
    assert main(["eval", "--policy", str(tiny_policy), "--task", "nope", "--episodes", "2"]) == 2
    assert "registered tasks" in capsys.readouterr().err
    assert main(["eval", "--policy", str(tiny_policy), "--task", "toy", "--option", "feedback=x"]) == 2
    assert "has no setting 'feedback'" in capsys.readouterr().err


def test_a_task_of_another_package_reaches_every_command(tiny_policy, tmp_path):
    """A plugin author's task, registered by its own module, in a fresh `badger` process: BADGER_TASKS names the
    module (nothing told the CLI, `badger export` or a server about a task registered outside the package)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "my_tasks.py").write_text("from badger_runtime import tasks\nfrom tests.test_tasks import ToyTask\n"
                                          "tasks.register(ToyTask)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])}

    def badger(*argv, **extra):
        return subprocess.run([sys.executable, "-m", "badger_runtime.cli", *argv], env={**env, **extra},
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)

    args = ["eval", "--policy", str(tiny_policy), "--task", "toy", "--dims", "2", "--episodes", "2", "--steps", "3",
            "--no-baselines", "--json"]
    r = badger(*args)
    assert r.returncode == 2 and "BADGER_TASKS" in r.stderr and "badger.tasks" in r.stderr, r.stderr
    r = badger(*args, BADGER_TASKS="my_tasks")
    assert r.returncode == 0 and json.loads(r.stdout)["task"]["name"] == "toy", r.stderr
    r = badger(*args, BADGER_TASKS="no_such_module")
    assert r.returncode == 2 and "cannot import task module 'no_such_module'" in r.stderr, r.stderr


def test_visibility_rules_hold_for_any_number_of_experts():
    v = Visibility("fraction", 2, 6, 0.5, seed=3)
    m5, m9 = v.mask(5, 6), v.mask(9, 6)
    assert m5.shape == (1, 5, 6) and m5[:, :, :2].all()  # slots outside [lo, hi) are read by everyone
    assert np.array_equal(m9[:, :5], m5)  # growing keeps what the first experts read
    assert 0.3 < m9[0, :, 2:].mean() < 0.7
    assert Visibility.from_dict(v.to_dict()) == v
    assert Visibility("first", 1, 2).mask(3, 2)[0].tolist() == [[True, True], [True, False], [True, False]]
    assert Visibility().mask(4, 3) is None


def test_guessing_task_keeps_its_numbers(pol):
    """The guessing game as a registered task: the same seed gives the same episodes as before the
    task interface (targets, then addresses, drawn from the task stream)."""
    t = tasks.make_task(dataclasses.replace(pol.task, feedback="scalar"))
    ep = t.sample(np.random.default_rng([0, 0]), 2, dims=3, experts=4, steps=5, addr_dim=pol.spec.addr_dim)
    rng = np.random.default_rng([0, 0])
    targets = rng.uniform(-1.0, 1.0, size=(2, 3)).astype(np.float32)
    assert np.array_equal(ep.targets, targets)
    assert ep.interface.parts == (("observation", 3), ("feedback", 1))


@pytest.mark.parametrize("experts, n", [((3, 3), 3), ((5, 40), 20), ((3, 6), 6), ((30, 40), 30)])
def test_default_experts_stay_in_the_trained_range(experts, n):
    """Without --experts an agent gets Fig. 7's N = 20 only where the trained range holds it: a policy
    trained on N in [3, 6] would otherwise run out of its range by default."""
    assert tasks.make_task(GuessingConfig(experts=experts)).default_experts() == n


def test_a_guessing_card_is_evaluated_at_the_default_and_the_smallest_trained_n():
    """A policy trained on N in [3, 6] gets card rows at N = 3 and 6 (the default), each trained d once."""
    t = tasks.make_task(GuessingConfig(experts=(3, 6), dims=(3, 3), steps=20))
    assert t.card_evaluations() == [(3, 3, 20), (3, 6, 20)]
    t = tasks.make_task(GuessingConfig(experts=(3, 3), dims=(1, 6), steps=20))
    assert t.card_evaluations() == [(1, 3, 20), (6, 3, 20)]


def test_a_task_says_by_which_metric_growth_is_measured(toy):
    """growth.py measured the guessing game and scale only (a fixed list): a task opts in with growth_metric."""
    from badger_runtime.growth import growth_metric

    assert [growth_metric(n) for n in ("guessing", "scale", "bandit", "fewshot", "toy")] == \
        ["error", "error", None, None, None]

    class Measured(ToyTask):
        name = "toy_measured"
        growth_metric = "error"

    tasks.register(Measured)
    try:
        assert growth_metric("toy_measured") == "error"
    finally:
        tasks.unregister("toy_measured")

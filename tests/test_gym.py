"""Bring your own environment: Gymnasium environments run as tasks through the adapter."""

from __future__ import annotations

import numpy as np
import pytest

from badger_runtime.config import ConfigError
from badger_runtime.engine import numpy_ops
from badger_runtime.evaluation import evaluate, run_episodes
from badger_runtime.policy_card import load_policy
from badger_runtime.tasks import default_config, make_task


@pytest.fixture(scope="module")
def pol(tiny_policy):
    return load_policy(tiny_policy)


def test_cartpole_runs_as_a_task(pol):
    """Box observations + Discrete actions: 4 observation slots, reward and done slots, 2 outputs;
    the agent is never reset when the pole falls (the environment is)."""
    cfg = default_config("gym", env="CartPole-v1", steps=60)
    task = make_task(cfg)
    assert task.default_dims() == 2 and task.features == 4
    res = run_episodes(numpy_ops(), pol, pol.agent, task.cfg, dims=2, experts=3, episodes=3, seed=0, steps=60)
    assert res.outputs.shape == (60, 3, 2) and np.isfinite(res.outputs).all()
    rewards = res.metrics["reward"]
    assert rewards[0].sum() == 0 and (rewards[1:] == 1.0).all()  # CartPole pays 1 per step, also the last one
    ep = res.episodes[0]
    assert ep.interface.parts == (("observation", 4), ("reward", 1), ("done", 1))
    report = evaluate(numpy_ops(), pol, pol.agent, task.cfg, dims=2, experts=3, episodes=2, seed=0, steps=60)
    assert report["env"] == "CartPole-v1" and len(report["reward_by_step"]) == 60
    assert report["episodes_finished"] >= 1  # an untrained agent drops the pole within 60 steps


def test_box_actions_and_the_same_episodes_in_the_actor_runtime(pol):
    """Box actions (Pendulum): outputs squashed into the action box; the actor runtime drives the
    same environments from the same seed to the same rewards."""
    cfg = default_config("gym", env="Pendulum-v1", steps=8)
    a = run_episodes(numpy_ops(), pol, pol.agent, cfg, dims=1, experts=3, episodes=2, seed=4, steps=8)
    b = run_episodes(numpy_ops(), pol, pol.agent, cfg, dims=1, experts=3, episodes=2, seed=4, steps=8,
                     runtime="actors")
    assert np.abs(a.outputs - b.outputs).max() <= 1e-5
    assert np.allclose(a.metrics["reward"], b.metrics["reward"], atol=1e-4)
    assert (a.metrics["reward"][1:] < 0).all()  # Pendulum's cost


def test_bad_environments_are_refused(pol):
    with pytest.raises(ConfigError, match="actions"):
        make_task(default_config("gym", env="CartPole-v1")).sample(np.random.default_rng(0), 1, dims=3, experts=2,
                                                                   steps=2, addr_dim=6)
    with pytest.raises(ConfigError, match="obs_scale"):
        default_config("gym", obs_scale=0.0)
    for env, why in (("NoSuchEnv-v0", "NameNotFound"), ("CartPole-v99", "cannot make it")):  # a traceback before
        with pytest.raises(ConfigError, match=f"task.env '{env}'.*{why}"):
            make_task(default_config("gym", env=env))


def test_backpropagation_through_an_environment_is_refused_with_the_outer_loop_that_works(tmp_path):
    """BPTT on a gym task ended in torch's 'element 0 of tensors does not require grad' traceback."""
    pytest.importorskip("torch")
    from badger_runtime.config import ExperimentConfig, from_dict
    from badger_runtime.training.train import train

    cfg = from_dict(ExperimentConfig, {"task": {"name": "gym", "env": "CartPole-v1", "dims": [2, 2], "experts": [3, 3],
                                                "steps": 4}, "train": {"batches": 1, "batch_size": 2}})
    with pytest.raises(ConfigError, match="no differentiable loss.*--outer es"):
        train(cfg, tmp_path / "run", progress=False, final_eval=False, log=lambda *a: None)
    assert not (tmp_path / "run").exists()  # refused before anything was written

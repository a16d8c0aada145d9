"""Bring your own environment: a Gymnasium environment as a task.

Any environment with a ``Box`` observation space and a ``Box`` or ``Discrete`` action space runs
as a task: each observation entry is an input slot, the reward and the end-of-episode flag are
feedback slots, each action entry (``Box``) or action (``Discrete``) is an output dimension.
Addresses are drawn once per environment id (seeded), so a slot means the same thing in every
episode. The agent is never reset when the environment's episode ends: it is reset, the agent
sees ``done = 1`` with the last reward, and carries on (as a meta-learner across trials).

    badger eval --policy P --task gym --option env=CartPole-v1 --steps 500 --episodes 8 --json
    from badger_runtime.tasks import default_config; default_config("gym", env="Pendulum-v1")

``Discrete`` actions are the argmax of the outputs; ``Box`` actions are the outputs scaled into
the box (``tanh`` then affine). Environments are stepped in ``observe`` (numpy, not
differentiable): the loss is zero, so these tasks are for evaluation and for gradient-free
outer loops. Gymnasium is an optional extra (``pip install 'badger-runtime[gym]'``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..config import ConfigError, TaskConfig
from ..membrane import KIND_FEEDBACK, KIND_OBSERVATION, N_KIND_FLAGS, Interface
from . import Task, TaskEpisode
from .guessing import random_addresses, with_kind

MISSING = "the gym task needs Gymnasium: pip install 'badger-runtime[gym]'"


def _gym():
    try:
        import gymnasium
    except ImportError:
        raise ImportError(MISSING) from None
    return gymnasium


@dataclass
class GymConfig(TaskConfig):
    name: str = "gym"
    env: str = "CartPole-v1"  # a Gymnasium environment id (gymnasium.make)
    dims: tuple[int, int] = (1, 1)  # set from the action space when the task is built
    experts: tuple[int, int] = (20, 20)
    steps: int = 200
    obs_scale: float = 1.0  # observations are multiplied by this, then clipped to +-obs_clip
    obs_clip: float = 10.0
    reward_scale: float = 1.0

    def validate(self):
        super().validate()
        if not self.env:
            raise ConfigError("task.env must name a Gymnasium environment")
        if self.obs_scale <= 0 or self.obs_clip <= 0 or self.reward_scale <= 0:
            raise ConfigError("task.obs_scale, task.obs_clip and task.reward_scale must be > 0")
        return self


@dataclass
class GymEpisode(TaskEpisode):
    """B environments stepped by the agent's outputs (see the module doc)."""

    envs: list
    interface: Interface
    seeds: np.ndarray  # [B] each environment's reset seed
    cfg: GymConfig
    discrete: bool
    low: np.ndarray | None = None  # Box action bounds [d]
    high: np.ndarray | None = None
    reward: np.ndarray = field(default=None)  # [B] the reward of the last action
    returns: list = field(default_factory=list)  # returns of environment episodes that ended
    running: np.ndarray = field(default=None)  # [B] the return so far of each environment's episode
    batch_axes: ClassVar[dict[str, int]] = {"seeds": 0}

    def select(self, idx) -> "GymEpisode":
        picked = np.arange(len(self.envs))[idx]
        return dataclasses.replace(self, envs=[self.envs[i] for i in np.atleast_1d(picked)],
                                   interface=self.interface.select(idx), seeds=self.seeds[idx], reward=None,
                                   running=None, returns=[])

    def action(self, output: np.ndarray):
        if self.discrete:
            return np.argmax(output, axis=-1)
        return self.low + (np.tanh(output) + 1.0) * 0.5 * (self.high - self.low)

    def _obs(self, obs) -> np.ndarray:
        c = self.cfg
        return np.clip(np.asarray(obs, np.float32).reshape(-1) * c.obs_scale, -c.obs_clip, c.obs_clip)

    def observe(self, ops, t: int, prev_output):
        B = len(self.envs)
        rows = np.zeros((B, self.slots), np.float32)
        if self.reward is None or t == 0:
            self.reward, self.running = np.zeros(B, np.float32), np.zeros(B, np.float32)
            for b, env in enumerate(self.envs):
                obs, _ = env.reset(seed=int(self.seeds[b]))
                rows[b, :-2] = self._obs(obs)
            return ops.asarray(rows)
        acts = self.action(np.asarray(ops.to_numpy(prev_output), np.float32))
        for b, env in enumerate(self.envs):
            obs, r, terminated, truncated, _ = env.step(acts[b] if self.discrete else acts[b].astype(np.float32))
            self.reward[b] = r
            self.running[b] += r
            done = terminated or truncated
            if done:
                self.returns.append(float(self.running[b]))
                self.running[b] = 0.0
                obs, _ = env.reset()
            rows[b, :-2] = self._obs(obs)
            rows[b, -2] = np.clip(r * self.cfg.reward_scale, -self.cfg.obs_clip, self.cfg.obs_clip)
            rows[b, -1] = float(done)
        return ops.asarray(rows)

    def loss(self, ops, t: int, output):
        return ops.zeros((len(self.envs),))  # no gradient through an environment

    def metrics(self, t: int, output: np.ndarray) -> dict[str, np.ndarray]:
        return {"reward": np.array(self.reward if self.reward is not None else np.zeros(len(self.envs)))}


class GymTask(Task):
    """A Gymnasium environment (``cfg.env``) as a task (see the module doc)."""

    name = "gym"
    config_class = GymConfig
    differentiable = False  # loss() is zeros: no gradient through an environment

    def __init__(self, cfg: GymConfig):
        gym = _gym()
        try:
            probe = gym.make(cfg.env)
        except gym.error.Error as e:  # an unknown id, a missing extra (box2d, mujoco), a deprecated version
            raise ConfigError(f"task.env {cfg.env!r}: Gymnasium cannot make it ({type(e).__name__}: {e})") from None
        obs_space, act_space = probe.observation_space, probe.action_space
        probe.close()
        if not isinstance(obs_space, gym.spaces.Box):
            raise ConfigError(f"{cfg.env}: observations must be a Box space, got {obs_space}")
        if isinstance(act_space, gym.spaces.Discrete):
            self.discrete, d, self.low, self.high = True, int(act_space.n), None, None
        elif isinstance(act_space, gym.spaces.Box):
            self.discrete, d = False, int(np.prod(act_space.shape))
            self.low = np.asarray(act_space.low, np.float32).reshape(-1)
            self.high = np.asarray(act_space.high, np.float32).reshape(-1)
        else:
            raise ConfigError(f"{cfg.env}: actions must be a Box or Discrete space, got {act_space}")
        self.features = int(np.prod(obs_space.shape))
        super().__init__(dataclasses.replace(cfg, dims=(d, d)))

    def default_dims(self) -> int:
        return self.cfg.dims[0]

    def sample(self, rng: np.random.Generator, batch: int, *, dims: int, experts: int, steps: int,
               addr_dim: int) -> GymEpisode:
        d = self.cfg.dims[0]
        if dims != d:
            raise ConfigError(f"{self.cfg.env} has {d} actions; got --dims {dims}")
        gym = _gym()
        table = np.random.default_rng([len(self.cfg.env), *self.cfg.env.encode()])  # fixed per environment id
        feat = random_addresses(table, (self.features,), addr_dim)
        acts = random_addresses(table, (d,), addr_dim)
        fb = np.zeros((2, addr_dim), np.float32)
        fb[:, KIND_FEEDBACK] = 1.0
        fb[1, N_KIND_FLAGS] = 1.0  # the end-of-episode slot: another feedback address
        slot_addr = np.concatenate([with_kind(feat, KIND_OBSERVATION), fb], axis=0)
        itf = Interface(np.broadcast_to(slot_addr, (batch, *slot_addr.shape)).copy(),
                        np.broadcast_to(with_kind(acts, None), (batch, d, addr_dim)).copy(), parts=(
                            ("observation", self.features), ("reward", 1), ("done", 1)))
        envs = [gym.make(self.cfg.env) for _ in range(batch)]
        return GymEpisode(envs, itf, rng.integers(0, 2**31, size=batch), self.cfg, self.discrete, self.low,
                          self.high)

    def report(self, metrics: dict[str, np.ndarray], episodes: list[Any], *, steps: int, seed: int,
               baselines: bool = True) -> dict:
        rewards = metrics["reward"]
        returns = [r for ep in episodes for r in ep.returns]
        return {"env": self.cfg.env, "reward_by_step": rewards.mean(axis=1).tolist(),
                "total_reward": float(rewards.sum(axis=0).mean()), "episodes_finished": len(returns),
                "mean_return": float(np.mean(returns)) if returns else None}

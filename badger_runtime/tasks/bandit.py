"""The K-armed bandit: pick one of K arms each inner step, sense the reward, never reset.

Each episode has K arms with hidden means (Bernoulli arms: means ~ U[0, 1]; Gaussian arms,
for evaluation only: means ~ N(0, 1), rewards N(mean, sigma^2)). K varies per episode: the
arms are the agent's **outputs**, one per arm at a random per-episode address, so one policy
runs with any K. Every inner step t:

- the agent outputs K arm scores;
- the environment picks the arm from them: ``choice = "sample"`` draws it from
  softmax(scores / temperature) with a uniform number drawn with the episode (so a run is a
  pure function of the seed and the outputs), ``choice = "argmax"`` takes the best score;
- at step t + 1 the agent senses the reward on that arm.

The membrane's view (``interface``): K observation slots (the agent's own previous scores, at
the arm addresses with the observation flag, as in the guessing game), then two slots whose
addresses **point at the pulled arm**: ``pulled`` (value 1 once an arm was pulled; address: that
arm's output address with the observation flag) and ``feedback`` (value: the **loss** of the pull,
1 - r for a Bernoulli reward r, 0.5 - r / (2 sigma) for a Gaussian one; address: the arm's output
address scaled by the reward 2r - 1 (r / sigma for a Gaussian one), with the feedback flag). Before
the first pull both hold 0 at the bare kind flag. So an expert reading these slots reads which arm
was pulled and what it paid as addresses, whatever K: summing the ``pulled`` pointers counts
each arm's pulls, summing the ``feedback`` pointers its wins minus losses (with ``pointer = "arm"``
the feedback address is not scaled; that did not learn: docs/results.md). Feedback is a loss as
in every task here (the guessing game's feedback is its error, 0 = perfect), so a policy trained
on another task family runs on bandits through the same interface.

With ``layout = "arms"`` (``arms_interface``) the membrane instead gives every arm two slots at
its address, ``pulled`` (1 on the arm pulled at the previous step) and ``feedback`` (2 x its loss
- 1 on that arm), and deals them out: expert e reads arm e mod K's two slots and no other arm's
(``Visibility('cyclic', blocks=2)``), so N >= K experts are needed and each can keep its own arm's
count and sum, first-order in what it reads. Nothing moves: the addresses stay put, a served step
sends the two parts, K values each.

The pointers are written by ``observe`` into the episode's interface (``point_feedback``): the
runtimes read the slot addresses at every step (the engine, the actor runtimes, which hold views
of the same array), and a served session takes the pulled arm as the step's ``arm`` field.

Everything random is drawn with the episode: the means, the reward table rewards[t, b, k]
(``bandit_baselines.draw_rewards``: what arm k pays at step t if pulled) and the uniform
numbers used to sample an arm. The classical baselines (Thompson, UCB1, epsilon-greedy tuned on
training episodes, uniform random) face exactly the same draws.

Training through the discrete choice (see ``trajectory_loss``): the per-step loss is the
expected instantaneous regret under the policy's softmax, sum_k pi_k (mu* - mu_k) (exact and
dense: the immediate effect of the choice), plus a score-function term for the pulled arm's
effect on later steps (what the agent learns from the reward it hears).

With ``change_every = [a, b]`` the means are drawn afresh every U[a, b] steps without resetting
the agent (the continual check, ``longrun_report``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..config import ConfigError, TaskConfig
from ..membrane import KIND_FEEDBACK, KIND_OBSERVATION, N_KIND_FLAGS, Interface, Visibility
from ..xp import softmax_composed
from . import Task, TaskEpisode
from . import bandit_baselines as bb
from .guessing import random_addresses, with_kind

DISTS = bb.DISTS
CHOICES = ("sample", "argmax")
POINTERS = ("reward", "arm")
LAYOUTS = ("pointer", "arms")
RELAX = ("none", "straight_through")
TUNE_EPISODES = 200  # epsilon-greedy's rate is tuned on this many training-distribution episodes
TUNE_SEED = 12345  # ... drawn with this seed (never an evaluation seed's stream)


@dataclass
class BanditConfig(TaskConfig):
    """The bandit's settings (``dims``: the range of K, the number of arms)."""

    name: str = "bandit"
    dims: tuple[int, int] = (2, 10)
    steps: int = 100
    arm_dist: str = "bernoulli"  # bernoulli | gaussian (evaluation only)
    sigma: float = 1.0  # Gaussian arms: the reward noise
    choice: str = "sample"  # how the environment picks the arm from the scores: sample | argmax
    temperature: float = 0.25  # choice = sample: softmax(scores / temperature)
    change_every: tuple[int, int] = (0, 0)  # the means are drawn afresh every U[a, b] steps (0 = never)
    layout: str = "pointer"  # the membrane: two slots pointing at the pulled arm ('pointer') or two per arm ('arms')
    pointer: str = "reward"  # the feedback slot's address: the pulled arm's times its reward ('reward') or not ('arm')
    relax: str = "none"  # training: 'straight_through' makes the later steps differentiable in the choice
    sf_weight: float = 1.0  # training: weight of the score-function term (0: the dense surrogate only)
    sf_discount: float = 0.98  # training: discount of the regret-to-go in the score-function term

    def validate(self):
        super().validate()
        if self.arm_dist not in DISTS:
            raise ConfigError(f"task.arm_dist must be one of {DISTS}, got {self.arm_dist!r}")
        if self.relax not in RELAX:
            raise ConfigError(f"task.relax must be one of {RELAX}, got {self.relax!r}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"task.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.pointer not in POINTERS:
            raise ConfigError(f"task.pointer must be one of {POINTERS}, got {self.pointer!r}")
        if self.choice not in CHOICES:
            raise ConfigError(f"task.choice must be one of {CHOICES}, got {self.choice!r}")
        if not self.temperature > 0 or not self.sigma > 0:
            raise ConfigError("task.temperature and task.sigma must be > 0")
        a, b = self.change_every
        if a < 0 or b < a or (b > 0 and a < 1):
            raise ConfigError("task.change_every must be [0, 0] or [a, b] with 1 <= a <= b")
        if self.sf_weight < 0 or not 0 <= self.sf_discount <= 1:
            raise ConfigError("task.sf_weight must be >= 0 and task.sf_discount in [0, 1]")
        return self


# ---- the environment's choice and the feedback ----------------------------------------------------

def softmax_np(scores: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(scores, np.float64) / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def choose(scores: np.ndarray, uniform: np.ndarray, choice: str, temperature: float) -> np.ndarray:
    """The pulled arms [B] from the scores [B, K]: the arm whose softmax(scores / temperature)
    interval holds the uniform number [B] (``sample``), or the first best score (``argmax``)."""
    scores = np.asarray(scores)
    if choice == "argmax":
        return np.argmax(scores, axis=-1)
    cdf = np.cumsum(softmax_np(scores, temperature), axis=-1)
    return np.minimum((cdf < np.asarray(uniform)[..., None] * cdf[..., -1:]).sum(axis=-1), scores.shape[-1] - 1)


def feedback_code(reward: np.ndarray, dist: str, sigma: float = 1.0) -> np.ndarray:
    """The feedback slot's value for a pull: its loss, 1 - r for a Bernoulli reward (0: a win, 1: a
    loss), 0.5 - r / (2 sigma) for a Gaussian one (the same mean and scale for an arm of mean 0.5)."""
    r = np.asarray(reward, np.float32)
    return (1.0 - r) if dist == "bernoulli" else 0.5 - r / np.float32(2.0 * sigma)


def pointer_scale(loss, pointer: str) -> np.ndarray:
    """How far the feedback slot's address points along the pulled arm's address: 1 - 2 x loss (the
    reward: 2r - 1 for a Bernoulli arm, r / sigma for a Gaussian one) with ``pointer = "reward"``, 1
    with ``pointer = "arm"``."""
    loss = np.asarray(loss, np.float32)
    return (1.0 - 2.0 * loss) if pointer == "reward" else np.ones_like(loss)


def interface(base: np.ndarray) -> Interface:
    """The membrane's view of bandit episodes with arm address parts ``base`` [B, K, A-2]: K observation
    slots at the arm addresses, then the ``pulled`` and ``feedback`` pointer slots (unset)."""
    B, K = base.shape[:2]
    ptr = np.zeros((B, 2, base.shape[-1] + N_KIND_FLAGS), np.float32)
    ptr[:, 0, KIND_OBSERVATION] = 1.0
    ptr[:, 1, KIND_FEEDBACK] = 1.0
    slot_addr = np.concatenate([with_kind(base, KIND_OBSERVATION), ptr], axis=1)
    return Interface(slot_addr, with_kind(base, None), Visibility(), (("observation", K), ("pulled", 1), ("feedback", 1)))


def arms_interface(base: np.ndarray) -> Interface:
    """``layout = "arms"``: the membrane's view with two slots per arm at the arm's address, ``pulled``
    (observation flag; value 1 on the arm pulled at the previous step, else 0) and ``feedback``
    (feedback flag; value ``arm_feedback`` of the pull's loss on the pulled arm, else 0). The slots are
    dealt out to the experts (``Visibility('cyclic', blocks=2)``): expert e reads both slots of arm
    e mod K and no other arm's, so an agent needs N >= K experts and each keeps its own arm's
    statistics (a count and a sum: first-order in what it reads, whatever its address)."""
    B, K = base.shape[:2]
    slot_addr = np.concatenate([with_kind(base, KIND_OBSERVATION), with_kind(base, KIND_FEEDBACK)], axis=1)
    return Interface(slot_addr, with_kind(base, None), Visibility("cyclic", 0, 2 * K, blocks=2),
                     (("pulled", K), ("feedback", K)))


def arm_feedback(loss):
    """The ``arms`` layout's feedback value on the pulled arm: 2 x loss - 1 (a Bernoulli arm: -1 for a
    win, +1 for a loss; a Gaussian one: -r / sigma), so that an arm never pulled reads 0, as no evidence."""
    return 2.0 * loss - 1.0


def point_feedback(itf: Interface, arms, scale=None, copy: bool = False) -> Interface:
    """Point each episode's ``pulled`` and ``feedback`` slots (the last two) at its pulled arm (``arms``
    [B]; -1: none yet, the bare kind flags): the arm's output address part, times ``scale`` [B]
    (default 1) for the feedback slot. Written into ``itf.slot_addr`` in place (every runtime reads
    it at each step), or, with ``copy``, into a new interface (a served session's step, which must
    leave the old one intact)."""
    arms = np.asarray(arms, np.int64).reshape(-1)
    scale = np.ones(arms.shape, np.float32) if scale is None else np.asarray(scale, np.float32).reshape(-1)
    addr = itf.slot_addr.copy() if copy else itf.slot_addr
    part = np.where((arms >= 0)[:, None], itf.out_addr[np.arange(itf.batch), np.maximum(arms, 0), N_KIND_FLAGS:], 0.0)
    addr[:, -2, N_KIND_FLAGS:] = part
    addr[:, -1, N_KIND_FLAGS:] = part * scale[:, None]
    return Interface(addr, itf.out_addr, itf.visibility, itf.parts) if copy else itf


def draw_means(rng: np.random.Generator, shape: tuple[int, ...], dist: str) -> np.ndarray:
    return (rng.uniform(0.0, 1.0, shape) if dist == "bernoulli" else rng.standard_normal(shape)).astype(np.float32)


def _draw_table(rng, means: np.ndarray, dist: str, sigma: float) -> np.ndarray:
    """rewards[t, b, k] for per-step means [T, B, K] (``bandit_baselines.draw_rewards`` when they stay put)."""
    if dist == "bernoulli":
        return (rng.random(means.shape) < means).astype(np.float32)
    return (means + sigma * rng.standard_normal(means.shape)).astype(np.float32)


@dataclass
class Episode(TaskEpisode):
    """A batch of B bandit episodes over inner steps [t_off, t_off + T)."""

    interface: Interface
    means: np.ndarray  # [T, B, K] the arms' means at each step (a broadcast view when they stay put)
    rewards: np.ndarray  # [T, B, K] what each arm pays at each step if pulled
    uniforms: np.ndarray  # [T, B] the numbers the sampled choice uses
    dist: str = "bernoulli"
    sigma: float = 1.0
    choice: str = "sample"
    temperature: float = 0.25
    sf_weight: float = 0.0
    sf_discount: float = 0.98
    pointer: str = "reward"
    relax: str = "none"
    t_off: int = 0  # row 0 of the tables is inner step t_off (agents continued across batches)
    changes: np.ndarray | None = None  # [T, B] bool: the means changed at this step
    next_change: np.ndarray | None = None  # [B] the step of each episode's next change
    layout: str = "pointer"  # pointer | arms (``arms_interface``)

    batch_axes: ClassVar[dict[str, int]] = {"means": 1, "rewards": 1, "uniforms": 1, "changes": 1, "next_change": 0}

    @property
    def end(self) -> int:
        return self.t_off + self.rewards.shape[0]

    def row(self, t: int) -> int:
        i = t - self.t_off
        if not 0 <= i < self.rewards.shape[0]:
            raise IndexError(f"inner step {t} is outside this episode's steps [{self.t_off}, {self.end})")
        return i

    def gaps(self, t: int, steps: int | None = None) -> np.ndarray:
        """[B, K] each arm's pseudo-regret at step t: best mean - its mean ([steps, B, K] for the
        steps t .. t + steps - 1)."""
        mu = self.means[self.row(t)] if steps is None else self.means[self.row(t):self.row(t + steps - 1) + 1]
        return (mu.max(axis=-1, keepdims=True) - mu).astype(np.float32)

    def actions(self, t: int, scores: np.ndarray) -> np.ndarray:
        """The arms [B] pulled at step t given that step's scores [B, K] (numpy)."""
        return choose(scores, self.uniforms[self.row(t)], self.choice, self.temperature)

    def observe(self, ops, t: int, prev_output):
        """Slot values at step t: the previous scores, 1 in ``pulled`` and the loss of the arm pulled at
        t - 1 in ``feedback``, whose addresses now point at that arm (every slot is 0 at t = 0, the
        pointers unset)."""
        if self.layout == "arms":
            return self._observe_arms(ops, t, prev_output)
        B, K = self.batch, self.dims
        if not isinstance(self.interface.slot_addr, np.ndarray):  # after relaxed steps (training): numpy again
            self.interface.slot_addr = np.array(self.interface.slot_addr.detach().cpu().numpy(), np.float32)
        if t == 0 or prev_output is None:
            point_feedback(self.interface, np.full(B, -1))
            return ops.zeros((B, K + 2))
        a = self.actions(t - 1, ops.to_numpy(prev_output))
        if self.relax == "straight_through" and getattr(prev_output, "requires_grad", False):
            return self._observe_relaxed(ops, t, prev_output, a)
        fb = feedback_code(self.rewards[self.row(t - 1), np.arange(B), a], self.dist, self.sigma)
        point_feedback(self.interface, a, pointer_scale(fb, self.pointer))
        pulled_fb = np.stack([np.ones(B, np.float32), fb], axis=-1)
        return ops.concat([ops.asarray(prev_output), ops.asarray(pulled_fb)], axis=-1)

    def _observe_arms(self, ops, t: int, prev_output):
        """``layout = "arms"``: [B, 2K] slot values, the pulled arm's one-hot and its ``arm_feedback``
        (zeros at t = 0). With the straight-through relaxation (training) the one-hot h enters as
        h + pi - stop_gradient(pi), as in ``_observe_relaxed``, and the feedback as that times every
        arm's code (what pulling each arm would have told)."""
        B, K = self.batch, self.dims
        if t == 0 or prev_output is None:
            return ops.zeros((B, 2 * K))
        a = self.actions(t - 1, ops.to_numpy(prev_output))
        codes = arm_feedback(feedback_code(self.rewards[self.row(t - 1)], self.dist, self.sigma))  # [B, K]
        if self.relax == "straight_through" and getattr(prev_output, "requires_grad", False):
            y = self._straight_through(ops, prev_output, a)
            return ops.concat([y, y * ops.asarray(codes)], axis=-1)
        hard = np.eye(K, dtype=np.float32)[a]
        return ops.asarray(np.concatenate([hard, hard * codes], axis=-1).astype(np.float32))

    def _straight_through(self, ops, prev_output, a: np.ndarray):
        """The pulled arms' one-hot [B, K] as h + pi - stop_gradient(pi), pi = softmax(scores / temperature):
        the forward value is h, the gradient that of pi (training, ``relax = "straight_through"``)."""
        pi = softmax_composed(ops, prev_output / self.temperature)
        return ops.asarray(np.eye(self.dims, dtype=np.float32)[a]) + pi - pi.detach()

    def _observe_relaxed(self, ops, t: int, prev_output, a: np.ndarray):
        """Training only (torch, ``relax = "straight_through"``): the same slot values and pointer
        addresses in the forward pass, but differentiable in the choice probabilities pi = softmax(scores
        / temperature) of step t - 1: the pulled arm's one-hot h enters as h + pi - stop_gradient(pi), so
        the later losses say (to first order) what pulling each arm would have changed, through what
        the agent would have heard (every arm's loss and address). The slot addresses become a tensor
        the engine reads at this step."""
        B = self.batch
        torch = ops.torch
        y = self._straight_through(ops, prev_output, a)  # [B, K]
        codes = feedback_code(self.rewards[self.row(t - 1)], self.dist, self.sigma)  # [B, K] every arm's loss
        arms = ops.asarray(self.interface.out_addr[..., N_KIND_FLAGS:])  # [B, K, A-2]
        pulled = torch.einsum("bk,bkd->bd", y, arms)
        fb_ptr = torch.einsum("bk,bkd->bd", y * ops.asarray(pointer_scale(codes, self.pointer)), arms)
        flags = np.zeros((B, 2, N_KIND_FLAGS), np.float32)
        flags[:, 0, KIND_OBSERVATION] = flags[:, 1, KIND_FEEDBACK] = 1.0
        ptr = ops.concat([ops.asarray(flags), torch.stack([pulled, fb_ptr], dim=1)], axis=-1)
        obs = ops.asarray(self.interface.out_addr[:, :, :].copy())
        obs[..., KIND_OBSERVATION] = 1.0
        self.interface.slot_addr = ops.concat([obs, ptr], axis=1)
        fb = (y * ops.asarray(codes)).sum(dim=-1, keepdim=True)
        return ops.concat([prev_output, ops.asarray(np.ones((B, 1), np.float32)), fb], axis=-1)

    def loss(self, ops, t: int, output):
        """The expected instantaneous regret under softmax(scores / temperature): [B]."""
        pi = softmax_composed(ops, output / self.temperature)
        return ops.sum(pi * ops.asarray(self.gaps(t)), axis=-1)

    def metrics(self, t: int, output: np.ndarray) -> dict[str, np.ndarray]:
        a = self.actions(t, np.asarray(output))
        g = self.gaps(t)[np.arange(self.batch), a]
        return {"regret": g, "best": (g <= 0.0).astype(np.float32)}

    def trajectory_loss(self, ops, t0: int, outputs):
        """The score-function term for each pull's effect on the later steps of the chunk.

        Mean over steps t and episodes of log pi(a_t) x A_t (A_t detached), where A_t measures how
        much the expected regret went down after the pull: with g_s = sum_k pi_s,k gap_s,k the
        expected regret at step s (the realized one averaged over the sampling: less noise),
        A_t = (1 - gamma) sum_{s > t} gamma^(s - t - 1) (g_s - g_t), minus its mean over the batch at
        step t. Subtracting g_t (fixed before the pull) removes how hard the episode is from the
        credit; (1 - gamma) puts A_t on the scale of a per-step regret, the dense loss's."""
        if not self.sf_weight or self.choice != "sample":
            return None
        T = outputs.shape[0]
        if T < 2:
            return None
        out = ops.to_numpy(outputs)
        rows = np.arange(self.batch)
        gaps = self.gaps(t0, T)  # [T, B, K]
        g = (softmax_np(out, self.temperature) * gaps).sum(axis=-1)  # [T, B] expected regret
        r0 = self.row(t0)
        acts = choose(out, self.uniforms[r0:r0 + T], self.choice, self.temperature)  # [T, B]
        gamma = self.sf_discount
        # D[t, s] = gamma^(s - t - 1) for s > t: togo = D g = sum_{s>t} gamma^(s-t-1) g_s, weight = D 1
        lag = np.arange(T)[None, :] - np.arange(T)[:, None]
        D = np.where(lag > 0, float(gamma) ** np.maximum(lag - 1, 0), 0.0)
        togo, weight = D @ g, D.sum(axis=1)
        adv = (1.0 - gamma) * (togo - weight[:, None] * g)
        adv = adv - adv.mean(axis=1, keepdims=True)
        logp = _logsoftmax_composed(ops, outputs / self.temperature)  # [T, B, K]
        onehot = np.zeros(out.shape, np.float32)
        onehot[np.arange(T)[:, None], rows[None, :], acts] = 1.0
        logp_a = ops.sum(logp * ops.asarray(onehot), axis=-1)  # [T, B]
        return self.sf_weight * ops.mean(logp_a * ops.asarray(adv.astype(np.float32)))


def _logsoftmax_composed(ops, z):
    m = ops.detach(ops.amax(z, axis=-1, keepdims=True))
    return z - m - ops.log(ops.sum(ops.exp(z - m), axis=-1, keepdims=True))


# ---- sampling --------------------------------------------------------------------------------------

def _means_over_time(rng, cfg: BanditConfig, batch: int, K: int, T: int, first: np.ndarray, t0: int,
                     next_change: np.ndarray | None):
    """Per-step means [T, B, K] from ``first`` [B, K] at step t0, changes [T, B], next change [B]."""
    a, b = cfg.change_every
    if not b:
        return np.broadcast_to(first, (T, batch, K)), None, None
    means = np.empty((T, batch, K), np.float32)
    changes = np.zeros((T, batch), bool)
    nxt = t0 + rng.integers(a, b + 1, size=batch) if next_change is None else next_change.copy()
    cur = first.copy()
    for s in range(T):
        hit = nxt <= t0 + s
        if hit.any():
            cur[hit] = draw_means(rng, (int(hit.sum()), K), cfg.arm_dist)
            changes[s, hit] = True
            nxt[hit] = t0 + s + rng.integers(a, b + 1, size=int(hit.sum()))
        means[s] = cur
    return means, changes, nxt


def sample(rng: np.random.Generator, cfg: BanditConfig, batch: int, K: int, addr_dim: int, steps: int) -> Episode:
    """Draw B episodes of K arms for ``steps`` inner steps (arm addresses, means, rewards, uniforms)."""
    base = random_addresses(rng, (batch, K), addr_dim)
    first = draw_means(rng, (batch, K), cfg.arm_dist)
    means, changes, nxt = _means_over_time(rng, cfg, batch, K, steps, first, 0, None)
    itf = arms_interface(base) if cfg.layout == "arms" else interface(base)
    return _episode(rng, cfg, itf, means, 0, changes, nxt)


def _episode(rng, cfg: BanditConfig, itf: Interface, means: np.ndarray, t_off: int, changes, nxt) -> Episode:
    T, B, K = means.shape
    if changes is None:
        rewards = bb.draw_rewards(rng, means[0], T, cfg.arm_dist, cfg.sigma)
    else:
        rewards = _draw_table(rng, means, cfg.arm_dist, cfg.sigma)
    uniforms = rng.random((T, B)).astype(np.float32)
    return Episode(itf, means, rewards, uniforms, cfg.arm_dist, cfg.sigma, cfg.choice, cfg.temperature, cfg.sf_weight,
                   cfg.sf_discount, cfg.pointer, cfg.relax, t_off, changes, nxt, cfg.layout)


def extend(rng: np.random.Generator, cfg: BanditConfig, ep: Episode, steps: int) -> Episode:
    """The same episodes carried on up to inner step ``steps``: the same arms (and means, or their
    change process), fresh reward draws. Keeps the last step the agent already played (its reward
    is the next step's feedback)."""
    last = ep.end - 1
    i = ep.row(last)
    T = steps - last
    if T <= 1:
        return ep
    means, changes, nxt = _means_over_time(rng, cfg, ep.batch, ep.dims, T - 1, np.array(ep.means[i]), last + 1,
                                           ep.next_change)
    new = _episode(rng, cfg, ep.interface, means, last + 1, changes, nxt)
    cat = lambda x, y: np.concatenate([x[i:i + 1], y], axis=0)  # noqa: E731
    full = np.broadcast_to(ep.means[i], (T, ep.batch, ep.dims)) if changes is None else cat(ep.means, means)
    return dataclasses.replace(new, t_off=last, means=full, rewards=cat(ep.rewards, new.rewards),
                               uniforms=cat(ep.uniforms, new.uniforms),
                               changes=None if changes is None else cat(ep.changes, changes))


# ---- baselines ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def tuned_epsilon(K: int, steps: int, dist: str, sigma: float = 1.0) -> float:
    """Epsilon-greedy's rate, tuned once per (K, steps, dist) on ``TUNE_EPISODES`` training-distribution
    episodes drawn with ``TUNE_SEED`` (never the evaluation's draws); cached."""
    rng = np.random.default_rng([TUNE_SEED, K, steps])
    means = draw_means(rng, (TUNE_EPISODES, K), dist)
    return bb.tune_epsilon(means, bb.draw_rewards(rng, means, steps, dist, sigma), seed=TUNE_SEED)


def regret_at(curve, points=(100, 500, 1000, 10_000)) -> dict[str, float]:
    """Cumulative regret after step s (1-based) for the points the curve reaches."""
    return {str(s): float(curve[s - 1]) for s in points if s <= len(curve)}


def thompson_with_resets(means: np.ndarray, rewards: np.ndarray, resets: np.ndarray | None, *, seed: int = 0,
                         dist: str = "bernoulli", sigma: float = 1.0) -> np.ndarray:
    """Thompson sampling on per-step means [T, B, K] that may change, forgetting at the steps
    ``resets`` [T, B] marks (None: never): the per-step pseudo-regret [T, B]."""
    arms = bb.thompson(means, rewards, seed=seed, dist=dist, sigma=sigma, resets=resets)["arms"]
    return bb.step_regret(means, arms).astype(np.float32)


def _segments(changes: np.ndarray, e: int) -> list[tuple[int, int]]:
    """(start, end) of the stretches of constant means of episode e (the first starts at step 0)."""
    starts = [0] + [int(c) for c in np.flatnonzero(changes[:, e]) if c > 0]
    return list(zip(starts, starts[1:] + [changes.shape[0]]))


AFTER_CHANGE = ((0, 10), (10, 25), (25, 50), (50, 100), (100, 200), (200, 400))


def best_after_change(best: np.ndarray, changes: np.ndarray, windows=AFTER_CHANGE, lo: int = 0,
                      hi: int | None = None) -> dict[str, float | None]:
    """The fraction of best-arm pulls in windows of steps after each change of the means (the
    episode's start counts as one), over the stretches that start in [lo, hi) and last that long."""
    hi = best.shape[0] if hi is None else hi
    out = {}
    for a, b in windows:
        hits, n = 0.0, 0
        for e in range(best.shape[1]):
            for s, end in _segments(changes, e):
                if lo <= s < hi and s + a < end:
                    seg = best[s + a:min(s + b, end), e]
                    hits += float(seg.sum())
                    n += seg.size
        out[f"{a}-{b}"] = hits / n if n else None
    return out


def _long_task(policy, task: BanditConfig | None, change_every, steps: int) -> BanditConfig:
    """The settings of a long run: ``task`` (default: the policy's own if it is a bandit policy,
    else the bandit's defaults) with the means changing every U``change_every`` steps."""
    from . import default_config

    if task is None:
        task = policy.task if policy.task.name == "bandit" else default_config("bandit")
    return dataclasses.replace(task, change_every=tuple(change_every), steps=steps).validate()


def longrun_report(policy, *, task: BanditConfig | None = None, steps: int = 10_000, episodes: int = 50,
                   seed: int = 0, dims: int | None = None, experts: int | None = None,
                   change_every: tuple[int, int] = (200, 800), window: int = 100, baselines: bool = True,
                   full: bool = True, agent_config=None) -> dict:
    """The continual check: arm means drawn afresh every U[a, b] steps, the agent never reset.

    Reports the regret per step over time (mean over episodes, in windows of ``window`` steps),
    the fraction of best-arm pulls in windows after each change (``AFTER_CHANGE``) for the
    changes in the first and in the second half of the run, and the same for Thompson sampling
    told when the means change (restarted at each change) and for plain Thompson sampling (never
    restarted), on the same draws. ``keeps_finding`` compares the second half with the first.
    ``task``: the bandit's settings (default: the policy's own, or the bandit's defaults); ``dims``:
    K; without ``full`` the windows of regret are left out. ``agent_config``: the agent's settings
    (default: the policy's own; ``badger longrun --routing random --degree 0`` as an ablation)."""
    from ..longrun import long_rollout

    cfg = _long_task(policy, task, change_every, steps)
    run = long_rollout(policy, steps=steps, episodes=episodes, seed=seed, dims=dims, experts=experts, task=cfg,
                       upfront=True, agent_config=agent_config)  # the means drawn for all steps at once
    regret, best, ep, hmax = run.metrics["regret"], run.metrics["best"], run.episode, run.max_abs_state
    changes = ep.changes if ep.changes is not None else np.zeros(regret.shape, bool)
    half = steps // 2

    def summary(reg: np.ndarray, bst: np.ndarray) -> dict:
        w = reg.shape[0] // window * window
        return {"regret_per_step_by_window": reg[:w].reshape(-1, window, reg.shape[1]).mean(axis=(1, 2)).tolist(),
                "mean_regret_per_step": float(reg.mean()), "best_arm_fraction": float(bst.mean()),
                "best_after_change_first_half": best_after_change(bst, changes, hi=half),
                "best_after_change_second_half": best_after_change(bst, changes, lo=half)}

    K = ep.dims
    report = {"policy": getattr(policy, "name", "?"), "task": dataclasses.asdict(cfg),
              "routing": dataclasses.asdict((agent_config or policy.agent).routing),
              "steps": steps, "episodes": episodes, "seed": seed, "arms": K,
              "change_every": list(change_every), "window": window, "changes": int(changes[1:].sum()),
              "chance_best_fraction": 1.0 / K, "agent": summary(regret, best), "max_abs_state": hmax,
              "finite": bool(np.isfinite(regret).all())}
    if baselines:
        means = np.asarray(ep.means)
        gap_best = lambda reg: (reg <= 0.0).astype(np.float32)  # noqa: E731
        for name, resets in (("thompson_restarted_at_changes", changes), ("thompson", None)):
            reg = thompson_with_resets(means, ep.rewards, resets, seed=seed, dist=ep.dist, sigma=ep.sigma)
            report[name] = summary(reg, gap_best(reg))
    a = report["agent"]
    early, late = a["best_after_change_first_half"]["100-200"], a["best_after_change_second_half"]["100-200"]
    report["keeps_finding"] = {"window": "100-200", "first_half": early, "second_half": late,
                               "ratio": (late / early) if early and late is not None else None}
    if not full:
        for k in ("agent", "thompson", "thompson_restarted_at_changes"):
            if k in report:
                report[k].pop("regret_per_step_by_window")
    return report


def plot_longrun(report: dict, path):
    """Regret per step over time, agent vs Thompson (told of the changes / never restarted)."""
    from ..demo.figures import save_png, subplots

    w = report["window"]
    fig, ax = subplots(figsize=(10, 3.6))
    for key, label, color in (("agent", f"{report['policy']} (never reset)", "tab:blue"),
                              ("thompson_restarted_at_changes", "Thompson, restarted at each change", "tab:green"),
                              ("thompson", "Thompson, never restarted", "tab:gray")):
        if key in report:
            y = report[key]["regret_per_step_by_window"]
            ax.plot(np.arange(len(y)) * w + w / 2, y, label=label, color=color, lw=1.4)
    a, b = report["change_every"]
    ax.set_xlabel(f"inner step (the means change every U[{a}, {b}] steps; {report['episodes']} episodes)")
    ax.set_ylabel(f"regret per step ({w}-step windows)")
    ax.set_title(f"K = {report['arms']} arms, {report['steps']} steps without reset")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


CONTINUAL = {"steps": 10_000, "episodes": 50, "change_every": (500, 1500)}  # the card's 10,000-step check


def card_continual(policy, onnx, *, seed: int = 0, episodes: int = CONTINUAL["episodes"],
                   baselines: bool = True) -> dict:
    """The 10,000-step check (its own K and N): ``longrun_report`` without the curves. ``continual``:
    the state stays finite and the best-arm fraction 100-200 steps after a change in the second half
    is at least 0.75 x the first half's and at least twice chance (it keeps finding the best arm)."""
    c = CONTINUAL
    a, b = c["change_every"]
    r = longrun_report(policy, steps=c["steps"], episodes=episodes, seed=seed, change_every=(a, b), full=False,
                       baselines=baselines)
    k = r["keeps_finding"]
    r["continual"] = bool(r["finite"] and k["ratio"] is not None and k["ratio"] >= 0.75
                          and k["second_half"] >= 2 * r["chance_best_fraction"])
    return r | {"command": f"badger longrun --policy {onnx} --task bandit --steps {c['steps']} --episodes "
                              f"{c['episodes']} --seed {seed} --change-every {a} {b} --json"}


class BanditTask(Task):
    """The K-armed bandit as a registered task (see the module doc)."""

    name = "bandit"
    config_class = BanditConfig
    size_name = "arms"
    loss_name = "regret"

    @property
    def pointer_field(self) -> str | None:
        """A served step names the arm whose loss its feedback carries (``layout = "pointer"``); with
        ``layout = "arms"`` the step's ``pulled`` and ``feedback`` parts say it, one value per arm."""
        return "arm" if self.cfg.layout == "pointer" else None

    def point(self, interface: Interface, index: int | None, slot_values: np.ndarray) -> Interface:
        """The served step's pointer: the feedback slot points at arm ``index`` (scaled by the reward the
        step's feedback value carries), or at none."""
        if self.cfg.layout == "arms":
            return interface
        scale = pointer_scale(np.asarray(slot_values)[:, -1], self.cfg.pointer)
        return point_feedback(interface, np.full(interface.batch, -1 if index is None else index), scale, copy=True)

    @staticmethod
    def longrun_report(policy, **kw) -> dict:
        return longrun_report(policy, **kw)

    @staticmethod
    def plot_longrun(report: dict, path):
        plot_longrun(report, path)

    def continual_check(self, policy, *, episodes: int = CONTINUAL["episodes"], seed: int = 0,
                        baselines: bool = True) -> dict:
        return card_continual(policy, policy.name, seed=seed, episodes=episodes, baselines=baselines)

    def card_extras(self, policy, onnx: str, *, episodes: int, seed: int) -> dict:
        """The card's ``evaluation_continual``: the 10,000-step check (``card_continual``)."""
        return {"evaluation_continual": card_continual(policy, onnx, seed=seed)}

    @classmethod
    def evaluation_config(cls, cfg: BanditConfig) -> BanditConfig:
        """Stationary arms (a policy trained with changing means is evaluated without changes)."""
        return dataclasses.replace(cfg, change_every=(0, 0))

    def card_notes(self) -> dict:
        c = self.cfg
        how = (f"sampled from softmax(scores / {c.temperature:g}) with a uniform number drawn with the episode"
               if c.choice == "sample" else "the arm with the highest score (argmax)")
        continual = bool(c.change_every[1])
        feedback = ("two slots whose addresses point at the pulled arm: 'pulled' (value 1) and 'feedback' "
                    "(value: the pull's loss 1 - r; address scaled by the reward 2r - 1"
                    f"{'' if c.pointer == 'reward' else ': not with pointer = arm'}); a served step names the "
                    "pulled arm in its 'arm' field") if c.layout == "pointer" else (
                    "two slots per arm at the arm's address (layout = arms): 'pulled' (1 on the arm pulled at the "
                    "previous step, else 0) and 'feedback' (2 x loss - 1 on that arm: -1 a win, +1 a loss; else 0); "
                    "expert e reads arm e mod K's slots only, so an agent needs at least K experts")
        return {"task": "bandit", "arm_choice": how, "layout": c.layout, "feedback": feedback,
                "continual": continual,
                "continual_note": (f"trained with arm means drawn afresh every U{list(c.change_every)} steps, never "
                                   "reset: see evaluation_continual" if continual else
                                   "trained on stationary arms (episodic)")}

    def card_summary(self, report: dict) -> dict:
        return {k: report[k] for k in ("regret_at", "baselines_regret_at", "epsilon", "choice") if k in report}

    def card_evaluations(self) -> list[tuple[int, int, int]]:
        """The largest trained K and K = 50, for 1,000 steps."""
        n = self.default_experts()
        return [(self.cfg.dims[1], n, 1000), (50, self.experts_for(50), 1000)]

    def default_experts(self) -> int:
        return self.cfg.experts[1]

    def experts_for(self, dims: int) -> int:
        """The default number of experts at K arms: the trained maximum, and at least K with the
        ``arms`` layout (one expert per arm at least)."""
        n = self.default_experts()
        return max(n, dims) if self.cfg.layout == "arms" else n

    def sample(self, rng: np.random.Generator, batch: int, *, dims: int, experts: int, steps: int,
               addr_dim: int) -> Episode:
        if self.cfg.layout == "arms" and experts < dims:
            raise ConfigError(f"the bandit's 'arms' layout deals one arm to each expert: K = {dims} arms need at "
                              f"least {dims} experts, got {experts}")
        return sample(rng, self.cfg, batch, dims, addr_dim, steps)

    def extend(self, rng: np.random.Generator, episode: Episode, steps: int) -> Episode:
        return extend(rng, self.cfg, episode, steps)

    def report(self, metrics: dict[str, np.ndarray], episodes: list[Episode], *, steps: int, seed: int,
               baselines: bool = True) -> dict:
        """``regret_by_step`` (cumulative pseudo-regret after each step, mean over episodes),
        ``final_regret`` (+ its standard error), ``regret_at`` (after 100, 500, 1000, 10000 steps),
        ``best_arm_fraction``; and for stationary arms ``baselines``: {name: regret_by_step} of
        Thompson sampling, UCB1, epsilon-greedy (rate tuned on training-distribution episodes) and
        uniform random on the same arm draws (``baselines_regret_at`` at the same points)."""
        cum = np.cumsum(metrics["regret"], axis=0)  # [T, E]
        curve = cum.mean(axis=1)
        report = {"regret_by_step": curve.tolist(), "final_regret": float(curve[-1]),
                  "final_regret_sem": float(cum[-1].std() / np.sqrt(cum.shape[1])),
                  "regret_at": regret_at(curve), "best_arm_fraction": float(metrics["best"].mean()),
                  "choice": self.cfg.choice, "arm_dist": self.cfg.arm_dist}
        if baselines and not self.cfg.change_every[1]:
            means = np.concatenate([ep.means[0] for ep in episodes], axis=0)
            rewards = np.concatenate([ep.rewards[:steps] for ep in episodes], axis=1)
            K = means.shape[1]
            eps = tuned_epsilon(K, steps, self.cfg.arm_dist, self.cfg.sigma)
            report["baselines"] = bb.all_baselines(means, rewards, dist=self.cfg.arm_dist, eps=eps, seed=seed,
                                                   sigma=self.cfg.sigma)
            report["epsilon"] = eps
            report["baselines_regret_at"] = {k: regret_at(v) for k, v in report["baselines"].items()}
        return report


__all__ = ["BanditConfig", "BanditTask", "Episode", "choose", "extend", "feedback_code", "sample", "tuned_epsilon"]

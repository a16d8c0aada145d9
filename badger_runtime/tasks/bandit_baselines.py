"""Classical baselines for the K-armed bandit task family (numpy only, no torch).

Each of B episodes has K arms with means ``means[b, k]`` ([B, K]). To make every
policy face the same arm draws, the rewards are drawn up front:
``rewards[t, b, k]`` ([T, B, K]) is what arm k would pay at step t of episode b
if pulled (:func:`draw_rewards`). A policy only ever observes
``rewards[t, b, arm_t]``, the reward of the arm it pulled; it never sees
``means`` (they are used for scoring only) nor the other arms' rewards.

Every policy has the signature ``fn(means, rewards, *, seed=0, **params)`` and
returns ``{"name", "arms", "regret_by_step", "param"}``: ``arms`` the pulled arms
(int64 [T, B]), ``regret_by_step`` the mean over episodes of the cumulative
pseudo-regret after steps 0..t (a list of T floats, see :func:`regret_curve`)
and ``param`` the hyper-parameters used. A policy's own randomness comes from
``np.random.default_rng(seed)`` and never depends on the reward values, and
every argmax breaks ties uniformly at random. Policies are vectorised over the
B episodes (one Python iteration per step).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "BASELINES",
    "DISTS",
    "EPS_GRID",
    "all_baselines",
    "draw_rewards",
    "epsilon_greedy",
    "per_episode_regret",
    "regret_curve",
    "step_regret",
    "thompson",
    "tune_epsilon",
    "ucb1",
    "uniform_random",
]

#: Reward distributions :func:`draw_rewards` and the policies know.
DISTS: tuple[str, ...] = ("bernoulli", "gaussian")
#: Exploration rates searched by :func:`tune_epsilon` (1.0 is uniform random).
EPS_GRID: tuple[float, ...] = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def _check(means, rewards, changing: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``means`` [B, K] (or, where ``changing``, also per step: [T, B, K]) and ``rewards`` [T, B, K]."""
    mu = np.asarray(means, dtype=np.float64)
    r = np.asarray(rewards)
    if not (mu.ndim == 2 or (changing and mu.ndim == 3)):
        raise ValueError(f"means must have shape [B, K]{' or [T, B, K]' if changing else ''}, got {mu.shape}")
    if r.ndim != 3 or r.shape[1:] != mu.shape[-2:] or r.shape[0] < 1 or (mu.ndim == 3 and mu.shape[0] != r.shape[0]):
        raise ValueError(f"rewards must have shape [T >= 1, B, K] = [T, {mu.shape[-2]}, {mu.shape[-1]}], got {r.shape}")
    return mu, r


def _check_dist(dist: str) -> str:
    if dist not in DISTS:
        raise ValueError(f"dist must be one of {DISTS}, got {dist!r}")
    return dist


def draw_rewards(rng: np.random.Generator | int, means, steps: int, dist: str = "bernoulli",
                 sigma: float = 1.0) -> np.ndarray:
    """The pre-drawn reward table, float32 [T, B, K] for ``means`` [B, K].

    ``"bernoulli"``: rewards[t, b, k] ~ Bernoulli(means[b, k]) (means in [0, 1]);
    ``"gaussian"``: rewards[t, b, k] ~ N(means[b, k], sigma^2). ``rng`` is a
    ``np.random.Generator`` or a seed for ``np.random.default_rng``.
    """
    mu = np.asarray(means, dtype=np.float64)
    if mu.ndim != 2:
        raise ValueError(f"means must have shape [B, K], got {mu.shape}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    shape = (int(steps), *mu.shape)
    if _check_dist(dist) == "bernoulli":
        if np.any((mu < 0.0) | (mu > 1.0)):
            raise ValueError("Bernoulli means must lie in [0, 1]")
        return (rng.random(shape) < mu).astype(np.float32)
    return (mu + sigma * rng.standard_normal(shape)).astype(np.float32)


def step_regret(means, arms) -> np.ndarray:
    """Pseudo-regret of each pull, float64 [T, B]: max_k mu[b, k] - mu[b, arms[t, b]] for ``means``
    [B, K], or with means that change, [T, B, K], the step's own means."""
    mu = np.asarray(means, dtype=np.float64)
    a = np.asarray(arms)
    if a.ndim != 2 or mu.ndim not in (2, 3) or a.shape[1] != mu.shape[-2] or (mu.ndim == 3 and mu.shape[0] != a.shape[0]):
        raise ValueError(f"need means [B, K] or [T, B, K] and arms [T, B], got {mu.shape} and {a.shape}")
    if mu.ndim == 2:
        return mu.max(axis=1) - np.take_along_axis(mu, a.T, axis=1).T
    return mu.max(axis=2) - np.take_along_axis(mu, a[..., None], axis=2)[..., 0]


def per_episode_regret(means, arms) -> np.ndarray:
    """Cumulative pseudo-regret per episode, float64 [T, B]: entry [t, b] is the sum of
    ``step_regret`` over steps s <= t."""
    return np.cumsum(step_regret(means, arms), axis=0)


def regret_curve(means, arms) -> np.ndarray:
    """Mean over episodes of the cumulative pseudo-regret after steps 0..t, float64 [T]."""
    return per_episode_regret(means, arms).mean(axis=1)


def _argmax(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row-wise argmax of ``scores`` [B, K] with ties broken uniformly at random: [B]."""
    top = scores == scores.max(axis=1, keepdims=True)
    return np.argmax(np.where(top, rng.random(scores.shape), -1.0), axis=1)


def _result(name: str, means: np.ndarray, arms: np.ndarray, param: dict[str, Any]) -> dict:
    return {"name": name, "arms": arms, "regret_by_step": [float(x) for x in regret_curve(means, arms)],
            "param": param}


def _run(r: np.ndarray, choose, update) -> np.ndarray:
    """Play every episode of ``r`` [T, B, K]: ``choose(t)`` -> arms [B], then ``update(arm, reward)``.

    Returns the pulled arms, int64 [T, B]. Only the pulled arm's reward
    r[t, b, arm] reaches ``update``.
    """
    T, B, _ = r.shape
    rows = np.arange(B)
    arms = np.empty((T, B), dtype=np.int64)
    for t in range(T):
        arm = choose(t)
        arms[t] = arm
        update(arm, r[t, rows, arm].astype(np.float64))
    return arms


class _Stats:
    """Per-arm pull counts and reward sums, [B, K] each."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.n = np.zeros(shape)
        self.total = np.zeros(shape)
        self.rows = np.arange(shape[0])

    def add(self, arm: np.ndarray, reward: np.ndarray) -> None:
        self.n[self.rows, arm] += 1.0
        self.total[self.rows, arm] += reward

    def mean(self) -> np.ndarray:
        """Sample means, +inf for arms never pulled (so they are pulled first)."""
        return np.where(self.n > 0, self.total / np.maximum(self.n, 1.0), np.inf)


def uniform_random(means, rewards, *, seed: int = 0) -> dict:
    """Every step an arm drawn uniformly at random (the chance level)."""
    mu, r = _check(means, rewards)
    arms = np.random.default_rng(seed).integers(mu.shape[1], size=r.shape[:2], dtype=np.int64)
    return _result("uniform_random", mu, arms, {})


def ucb1(means, rewards, *, seed: int = 0, dist: str = "bernoulli", sigma: float = 1.0,
         c: float | None = None) -> dict:
    """UCB1 (Auer et al. 2002): pull each arm once, then argmax mean_hat + c sqrt(2 ln t / n).

    t is the number of pulls so far and n the arm's pull count; the initial
    pulls come in random order. ``c`` defaults to 1 for Bernoulli arms and to
    ``sigma`` for Gaussian arms (the bonus scaled by the known noise level).
    """
    mu, r = _check(means, rewards)
    c = float((1.0 if _check_dist(dist) == "bernoulli" else sigma) if c is None else c)
    rng = np.random.default_rng(seed)
    stats = _Stats(mu.shape)

    def choose(t: int) -> np.ndarray:
        bonus = c * np.sqrt(2.0 * np.log(max(t, 1)) / np.maximum(stats.n, 1.0))
        return _argmax(stats.mean() + bonus, rng)

    return _result("ucb1", mu, _run(r, choose, stats.add), {"c": c})


def _gaussian_posterior(n: np.ndarray, total: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Posterior (mean, sd) of an arm's mean under a N(0, 1) prior and N(., sigma^2) noise.

    ``n`` pulls with reward sum ``total`` (same shapes): precision 1 + n / sigma^2,
    mean (total / sigma^2) / precision.
    """
    var = float(sigma) ** 2
    precision = 1.0 + n / var
    return total / var / precision, 1.0 / np.sqrt(precision)


def thompson(means, rewards, *, seed: int = 0, dist: str = "bernoulli", sigma: float = 1.0,
             resets=None) -> dict:
    """Thompson sampling: pull the argmax of one posterior sample per arm.

    ``"bernoulli"``: Beta(1, 1) prior, Beta(1 + successes, 1 + failures)
    posterior. Rewards must lie in [0, 1]; a reward r counts as a Bernoulli
    trial with success probability r (the Bernoulli trick; for 0/1 rewards the
    trial is the reward itself). ``"gaussian"``: N(0, 1) prior on each mean and
    known noise ``sigma`` (conjugate update, see :func:`_gaussian_posterior`).

    Means that change over time are given per step ([T, B, K]); ``resets`` [T, B]
    (bool) makes an episode forget everything it learned before that step (an
    oracle told when the means change).
    """
    mu, r = _check(means, rewards, changing=True)
    rng = np.random.default_rng(seed)
    stats = _Stats(mu.shape[-2:])
    forget = None if resets is None else np.asarray(resets, dtype=bool)
    if _check_dist(dist) == "bernoulli":
        if np.any((r < 0.0) | (r > 1.0)):
            raise ValueError("Bernoulli Thompson sampling needs rewards in [0, 1]")
        param: dict[str, Any] = {"prior": "beta(1,1)"}

        def sample() -> np.ndarray:
            return rng.beta(1.0 + stats.total, 1.0 + stats.n - stats.total)

        def update(arm: np.ndarray, reward: np.ndarray) -> None:
            stats.add(arm, (rng.random(reward.shape) < reward).astype(np.float64))
    else:
        param = {"prior": "normal(0,1)", "sigma": float(sigma)}

        def sample() -> np.ndarray:
            mean, sd = _gaussian_posterior(stats.n, stats.total, sigma)
            return mean + sd * rng.standard_normal(mean.shape)

        update = stats.add

    def choose(t: int) -> np.ndarray:
        if forget is not None and forget[t].any():
            stats.n[forget[t]] = 0.0
            stats.total[forget[t]] = 0.0
        return _argmax(sample(), rng)

    return _result("thompson", mu, _run(r, choose, update), param)


def epsilon_greedy(means, rewards, *, seed: int = 0, eps: float = 0.1) -> dict:
    """With probability ``eps`` a uniformly random arm, else the best sample mean.

    The exploration coin is tossed first; a greedy step treats arms never
    pulled as infinitely good, so greedy steps pull every arm once (in random
    order) before exploiting. Hence eps = 1 is exactly :func:`uniform_random`
    in distribution and eps = 0 is "try each arm once, then greedy".
    """
    mu, r = _check(means, rewards)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must lie in [0, 1], got {eps}")
    rng = np.random.default_rng(seed)
    B, K = mu.shape
    stats = _Stats((B, K))

    def choose(t: int) -> np.ndarray:
        explore = rng.random(B) < eps
        return np.where(explore, rng.integers(K, size=B), _argmax(stats.mean(), rng))

    return _result("epsilon_greedy", mu, _run(r, choose, stats.add), {"eps": float(eps)})


def tune_epsilon(means_train, rewards_train, grid=EPS_GRID, seed: int = 0) -> float:
    """The eps in ``grid`` with the lowest final cumulative regret on the training episodes.

    ``means_train`` [B, K] and ``rewards_train`` [T, B, K] should be drawn apart
    from the evaluation episodes. Ties go to the first grid value.
    """
    values = tuple(float(e) for e in grid)
    if not values:
        raise ValueError("empty eps grid")
    finals = [epsilon_greedy(means_train, rewards_train, seed=seed, eps=e)["regret_by_step"][-1] for e in values]
    return values[int(np.argmin(finals))]


#: The baselines :func:`all_baselines` reports, by name.
BASELINES: tuple[str, ...] = ("thompson", "ucb1", "epsilon_greedy", "uniform_random")


def all_baselines(means, rewards, *, dist: str, eps: float, seed: int = 0,
                  sigma: float = 1.0) -> dict[str, list[float]]:
    """``regret_by_step`` of every baseline on the same episodes, keyed by name.

    ``eps`` is epsilon-greedy's rate (e.g. from :func:`tune_epsilon` on training
    episodes); ``dist`` and ``sigma`` select the Thompson prior and UCB1 scale.
    """
    runs = {
        "thompson": thompson(means, rewards, seed=seed, dist=dist, sigma=sigma),
        "ucb1": ucb1(means, rewards, seed=seed, dist=dist, sigma=sigma),
        "epsilon_greedy": epsilon_greedy(means, rewards, seed=seed, eps=eps),
        "uniform_random": uniform_random(means, rewards, seed=seed),
    }
    return {name: runs[name]["regret_by_step"] for name in BASELINES}

"""Tests for the classical K-armed bandit baselines (badger_runtime.tasks.bandit_baselines)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from badger_runtime.tasks import bandit_baselines as bb

from .conftest import top_level_imports

POLICIES = {
    "thompson": bb.thompson,
    "ucb1": bb.ucb1,
    "epsilon_greedy": bb.epsilon_greedy,
    "uniform_random": bb.uniform_random,
}


def _episodes(batch: int, arms: int, steps: int, seed: int = 0, dist: str = "bernoulli"):
    """(means [B, K], rewards [T, B, K]): U[0, 1] means for Bernoulli, N(0, 1) for Gaussian."""
    rng = np.random.default_rng(seed)
    means = rng.random((batch, arms)) if dist == "bernoulli" else rng.standard_normal((batch, arms))
    return means, bb.draw_rewards(rng, means, steps, dist)


@pytest.fixture(scope="module")
def bernoulli_k10():
    """All four baselines on 200 Bernoulli episodes, K = 10, T = 1000 (regret curves as arrays)."""
    means, rewards = _episodes(200, 10, 1000, seed=0)
    return {name: np.array(curve) for name, curve in
            bb.all_baselines(means, rewards, dist="bernoulli", eps=0.05, seed=0).items()}


def test_module_imports_numpy_only():
    mods = top_level_imports(bb.__file__)
    assert mods <= {"__future__", "typing", "numpy"}


def test_draw_rewards_shapes_and_moments():
    means = np.array([[0.1, 0.5, 0.9]])
    r = bb.draw_rewards(np.random.default_rng(0), means, 20000)
    assert r.shape == (20000, 1, 3) and r.dtype == np.float32
    assert set(np.unique(r)) <= {0.0, 1.0}
    np.testing.assert_allclose(r.mean(axis=0), means, atol=0.02)
    g = bb.draw_rewards(1, means, 20000, "gaussian", sigma=2.0)
    assert g.shape == (20000, 1, 3) and g.dtype == np.float32
    np.testing.assert_allclose(g.mean(axis=0), means, atol=0.05)
    np.testing.assert_allclose(g.std(axis=0), 2.0, atol=0.05)
    np.testing.assert_array_equal(bb.draw_rewards(3, means, 5), bb.draw_rewards(np.random.default_rng(3), means, 5))
    with pytest.raises(ValueError):
        bb.draw_rewards(0, np.array([[1.5]]), 5)
    with pytest.raises(ValueError):
        bb.draw_rewards(0, means, 5, "poisson")


def test_regret_curve_hand_computed():
    means = np.array([[0.2, 0.9, 0.5], [0.7, 0.1, 0.3]])
    arms = np.array([[0, 0], [1, 2], [2, 0]])
    per = bb.per_episode_regret(means, arms)
    np.testing.assert_allclose(per, [[0.7, 0.0], [0.7, 0.4], [1.1, 0.4]])
    np.testing.assert_allclose(bb.regret_curve(means, arms), [0.35, 0.55, 0.75])


def test_regret_zero_for_best_arm_and_nondecreasing():
    means, _ = _episodes(50, 7, 1)
    best = np.broadcast_to(means.argmax(axis=1), (30, 50))
    assert np.all(bb.regret_curve(means, best) == 0.0)
    arms = np.random.default_rng(1).integers(7, size=(30, 50))
    curve = bb.regret_curve(means, arms)
    assert curve.shape == (30,)
    assert np.all(np.diff(curve) >= 0.0) and curve[-1] > 0.0


@pytest.mark.parametrize("name", list(POLICIES))
def test_shapes_and_determinism(name):
    means, rewards = _episodes(16, 4, 40)
    fn = POLICIES[name]
    a, b, c = fn(means, rewards, seed=3), fn(means, rewards, seed=3), fn(means, rewards, seed=4)
    assert a["name"] == name
    assert a["arms"].shape == (40, 16) and a["arms"].dtype == np.int64
    assert a["arms"].min() >= 0 and a["arms"].max() < 4
    assert isinstance(a["regret_by_step"], list) and len(a["regret_by_step"]) == 40
    assert all(isinstance(x, float) and math.isfinite(x) for x in a["regret_by_step"])
    assert isinstance(a["param"], dict)
    np.testing.assert_array_equal(a["arms"], b["arms"])
    assert a["regret_by_step"] == b["regret_by_step"]
    assert not np.array_equal(a["arms"], c["arms"])
    np.testing.assert_allclose(a["regret_by_step"], bb.regret_curve(means, a["arms"]))


@pytest.mark.parametrize("fn", [bb.ucb1, lambda m, r, seed: bb.epsilon_greedy(m, r, seed=seed, eps=0.0)])
def test_each_arm_pulled_once_first_in_random_order(fn):
    means, rewards = _episodes(64, 6, 10)
    arms = fn(means, rewards, seed=0)["arms"]
    assert np.all(np.sort(arms[:6], axis=0) == np.arange(6)[:, None])
    assert len({tuple(col) for col in arms[:6].T}) > 1  # not one fixed order


def _perturb_unpulled(rewards: np.ndarray, arms: np.ndarray, pulled: bool = False) -> np.ndarray:
    """A copy of ``rewards`` with every entry of arms not pulled (or, if ``pulled``, the pulled one) changed."""
    mask = np.zeros(rewards.shape, dtype=bool)
    np.put_along_axis(mask, arms[..., None], True, axis=2)
    if not pulled:
        mask = ~mask
    return np.where(mask, 1.0 - rewards, rewards).astype(np.float32)


@pytest.mark.parametrize("fn,dist", [
    (bb.thompson, "bernoulli"),
    (bb.thompson, "gaussian"),
    (bb.ucb1, "bernoulli"),
    (bb.ucb1, "gaussian"),
    (bb.epsilon_greedy, "bernoulli"),
])
def test_policy_sees_only_the_pulled_arm(fn, dist):
    means, rewards = _episodes(40, 5, 200, seed=2, dist=dist)
    kw = {} if fn is bb.epsilon_greedy else {"dist": dist}
    arms = fn(means, rewards, seed=1, **kw)["arms"]
    other = _perturb_unpulled(rewards, arms)
    assert np.mean(other != rewards) > 0.5  # most of the table changed
    np.testing.assert_array_equal(fn(means, other, seed=1, **kw)["arms"], arms)
    # nor does it see the means (they only score the run) ...
    np.testing.assert_array_equal(fn(means[:, ::-1].copy(), rewards, seed=1, **kw)["arms"], arms)
    # ... but it does react to the rewards it observed
    assert not np.array_equal(fn(means, _perturb_unpulled(rewards, arms, pulled=True), seed=1, **kw)["arms"], arms)


def test_ucb1_matches_a_scalar_reference():
    """After the initial pulls UCB1 is deterministic (Gaussian rewards: no ties)."""
    means, rewards = _episodes(5, 4, 60, seed=5, dist="gaussian")
    arms = bb.ucb1(means, rewards, seed=0, dist="gaussian", sigma=1.0)["arms"]
    K = 4
    for b in range(5):
        n, total = np.zeros(K), np.zeros(K)
        for t in range(60):
            if t < K:
                arm = arms[t, b]
            else:
                arm = int(np.argmax(total / n + np.sqrt(2.0 * math.log(t) / n)))
                assert arms[t, b] == arm, (b, t)
            n[arm] += 1
            total[arm] += rewards[t, b, arm]


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_gaussian_posterior_matches_grid_bayes(sigma):
    """Conjugate update vs. prior N(0, 1) x likelihood evaluated on a grid of candidate means."""
    x = np.random.default_rng(0).normal(0.7, sigma, size=5)
    grid = np.linspace(-6.0, 6.0, 24001)
    log_post = -0.5 * grid**2 - 0.5 * ((x[:, None] - grid) ** 2).sum(axis=0) / sigma**2
    w = np.exp(log_post - log_post.max())
    w /= w.sum()
    mean = (w * grid).sum()
    sd = math.sqrt((w * (grid - mean) ** 2).sum())
    got_mean, got_sd = bb._gaussian_posterior(np.array([5.0, 0.0]), np.array([x.sum(), 0.0]), sigma)
    np.testing.assert_allclose([got_mean[0], got_sd[0]], [mean, sd], rtol=1e-4)
    np.testing.assert_allclose([got_mean[1], got_sd[1]], [0.0, 1.0])  # unpulled arm: the prior


def test_thompson_and_ucb1_sublinear_vs_random(bernoulli_k10):
    rand = bernoulli_k10["uniform_random"]
    assert rand[-1] > 300.0  # about 410: linear regret
    for name, bound in (("thompson", 0.1), ("ucb1", 0.4)):  # measured ~0.07 and ~0.32
        curve = bernoulli_k10[name]
        assert curve[-1] < bound * rand[-1], name
        # the second 500 steps add much less regret than the first 500
        assert curve[-1] - curve[499] < 0.65 * curve[499], name


def test_thompson_beats_ucb1_on_bernoulli(bernoulli_k10):
    assert bernoulli_k10["thompson"][-1] < 0.5 * bernoulli_k10["ucb1"][-1]  # measured ~27 vs ~130


def test_all_baselines_names_and_consistency(bernoulli_k10):
    assert list(bernoulli_k10) == ["thompson", "ucb1", "epsilon_greedy", "uniform_random"]
    assert all(curve.shape == (1000,) for curve in bernoulli_k10.values())
    means, rewards = _episodes(200, 10, 1000, seed=0)
    np.testing.assert_array_equal(bernoulli_k10["uniform_random"],
                                  bb.uniform_random(means, rewards, seed=0)["regret_by_step"])


def test_tuned_epsilon_in_grid_and_beats_random():
    train_means, train_rewards = _episodes(100, 10, 500, seed=10)
    eps = bb.tune_epsilon(train_means, train_rewards, seed=0)
    assert eps in bb.EPS_GRID and eps < 1.0
    assert bb.tune_epsilon(train_means, train_rewards, seed=0) == eps
    means, rewards = _episodes(100, 10, 500, seed=11)
    tuned = bb.epsilon_greedy(means, rewards, eps=eps)["regret_by_step"][-1]
    random = bb.epsilon_greedy(means, rewards, eps=1.0)["regret_by_step"][-1]
    assert tuned < 0.3 * random
    # eps = 1 is uniform random play
    assert random == pytest.approx(bb.uniform_random(means, rewards)["regret_by_step"][-1], rel=0.1)
    assert bb.tune_epsilon(train_means, train_rewards, grid=[1.0, 0.5]) == 0.5
    with pytest.raises(ValueError):
        bb.tune_epsilon(train_means, train_rewards, grid=[])


def test_gaussian_baselines_beat_random():
    means, rewards = _episodes(100, 10, 500, seed=7, dist="gaussian")
    res = bb.all_baselines(means, rewards, dist="gaussian", eps=0.05, seed=0)
    rand = res["uniform_random"][-1]
    for name in ("thompson", "ucb1", "epsilon_greedy"):
        assert res[name][-1] < 0.3 * rand, name
    assert bb.thompson(means, rewards, dist="gaussian", sigma=1.0)["param"] == {"prior": "normal(0,1)", "sigma": 1.0}
    assert bb.ucb1(means, rewards, dist="gaussian", sigma=2.0)["param"] == {"c": 2.0}


def test_thompson_bernoulli_trick_on_fractional_rewards():
    means, _ = _episodes(100, 10, 1)
    rewards = np.broadcast_to(means, (300, *means.shape)).astype(np.float32)  # reward = mean, never 0/1
    ts = bb.thompson(means, rewards)["regret_by_step"][-1]
    rand = bb.uniform_random(means, rewards)["regret_by_step"][-1]
    assert ts < 0.3 * rand
    with pytest.raises(ValueError):
        bb.thompson(means, rewards + 1.0)
    with pytest.raises(ValueError):
        bb.thompson(means, rewards, dist="poisson")


def test_bad_shapes_rejected():
    means, rewards = _episodes(4, 3, 5)
    with pytest.raises(ValueError):
        bb.ucb1(means, rewards[:, :2])
    with pytest.raises(ValueError):
        bb.uniform_random(means[0], rewards)
    with pytest.raises(ValueError):
        bb.epsilon_greedy(means, rewards, eps=1.5)

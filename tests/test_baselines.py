"""Tests for the classical guessing-game baselines (badger_runtime.tasks.baselines)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from badger_runtime.tasks import baselines as bl

from .conftest import top_level_imports


def _targets(batch: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, size=(batch, d)).astype(np.float32)


def test_module_imports_numpy_only():
    mods = top_level_imports(bl.__file__)
    assert "torch" not in mods and "scipy" not in mods
    assert mods <= {"__future__", "typing", "numpy"}


def test_errors_matches_definition():
    g = np.array([[0.0, 1.0], [0.5, -0.5]])
    t = np.array([[1.0, 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(bl.errors(g, t), [3 * 0.5, 3 * 0.25])


@pytest.mark.parametrize("d", [1, 3, 10])
def test_zero_guess_is_chance(d):
    mse = bl.zero_guess(_targets(5000, d), 7)
    assert mse.shape == (7,)
    assert np.allclose(mse, mse[0])
    assert abs(mse[0] - 1.0) < 0.05


@pytest.mark.parametrize("d", [2, 3, 6, 10])
def test_mean_solution_is_one_minus_one_over_d(d):
    mse = bl.mean_solution(_targets(5000, d), 5)
    assert mse.shape == (5,)
    assert np.allclose(mse, mse[0])
    assert abs(mse[0] - (1.0 - 1.0 / d)) < 0.05


def test_mean_solution_d1_is_zero():
    assert np.allclose(bl.mean_solution(_targets(100, 1), 4), 0.0)


def test_random_guess_is_about_two_and_seeded():
    tg = _targets(5000, 3)
    a = bl.random_guess(tg, 6, np.random.default_rng(7))
    b = bl.random_guess(tg, 6, 7)
    c = bl.random_guess(tg, 6, 8)
    assert a.shape == (6,)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(np.abs(a - 2.0) < 0.1)


def test_adam_good_lr_converges():
    mse = bl.adam(_targets(2000, 3), 20, lr=0.05)
    assert mse.shape == (20,)
    assert np.all(np.diff(mse) < 1e-9)  # monotone at this lr
    assert mse[-1] < 0.05
    assert bl.steps_to_reach(mse, 0.05) is not None


def test_adam_first_update_moves_lr_per_dimension():
    tg = np.array([[0.5, -0.5, 0.9]])
    # after one update every coordinate moves by ~lr towards its target
    mse = bl.adam(tg, 2, lr=0.1)
    g1 = np.array([0.1, -0.1, 0.1])
    np.testing.assert_allclose(mse[1], bl.errors(g1[None], tg)[0], rtol=1e-6)


def test_nelder_mead_d2_improves():
    mse = bl.nelder_mead(_targets(1000, 2), 20, scale=0.3)
    assert mse.shape == (20,)
    assert np.all(np.isfinite(mse))
    assert mse[19] < 0.3


def _nm_guesses(target: float, scale: float, steps: int) -> np.ndarray:
    """Per-step errors of a single 1-d episode (to compare with 3 (g - t)^2)."""
    return bl.nelder_mead(np.array([[target]]), steps, scale)


def test_nelder_mead_contraction_sequence():
    # d=1, target 0.3, scale 1: points 0, 1, reflect -1 (worse than worst) ->
    # inside contraction 0.5 (accepted); then reflect 1.0 -> inside contraction 0.25.
    expected = np.array([0.0, 1.0, -1.0, 0.5, 1.0, 0.25])
    np.testing.assert_allclose(
        _nm_guesses(0.3, 1.0, 6), 3.0 * (expected - 0.3) ** 2, rtol=1e-6, atol=1e-12
    )


def test_nelder_mead_reflection_and_expansion_sequence():
    # d=1, target 2, scale 1: points 0, 1, reflect 2 (new best) -> try expansion 3
    # (worse than reflection, so 2 is kept); then reflect from {2, 1} to 3.
    expected = np.array([0.0, 1.0, 2.0, 3.0, 3.0])
    np.testing.assert_allclose(
        _nm_guesses(2.0, 1.0, 5), 3.0 * (expected - 2.0) ** 2, rtol=1e-6, atol=1e-12
    )


@pytest.mark.parametrize(
    "fn",
    [
        lambda tg, T: bl.zero_guess(tg, T),
        lambda tg, T: bl.mean_solution(tg, T),
        lambda tg, T: bl.random_guess(tg, T, 0),
        lambda tg, T: bl.adam(tg, T, 0.1),
        lambda tg, T: bl.nelder_mead(tg, T, 0.5),
    ],
)
def test_shapes_and_determinism(fn):
    tg = _targets(64, 4)
    a, b = fn(tg, 9), fn(tg, 9)
    assert a.shape == (9,)
    np.testing.assert_array_equal(a, b)


def test_first_step_is_the_zero_guess():
    tg = _targets(300, 5)
    z = bl.zero_guess(tg, 3)[0]
    assert bl.adam(tg, 3, 0.3)[0] == pytest.approx(z, rel=1e-12)
    assert bl.nelder_mead(tg, 3, 0.5)[0] == pytest.approx(z, rel=1e-12)


@pytest.mark.parametrize("kind,name,key,grid", [
    ("scalar", "nelder_mead", "scale", bl.NM_SCALE_GRID),
    ("per_dim", "adam", "lr", bl.ADAM_LR_GRID),
    ("one_expert", "adam", "lr", bl.ADAM_LR_GRID),
])
def test_tuned(kind, name, key, grid):
    tg = _targets(200, 3, seed=1)
    res = bl.tuned(kind, tg, 20, seed=0)
    assert res["name"] == name
    assert set(res["param"]) == {key}
    assert res["param"][key] in grid
    assert isinstance(res["mse_by_step"], list) and len(res["mse_by_step"]) == 20
    assert all(isinstance(x, float) and math.isfinite(x) for x in res["mse_by_step"])
    assert res["final_mse"] == res["mse_by_step"][-1]
    assert res["mse_by_step"][0] == pytest.approx(bl.zero_guess(tg, 1)[0])
    assert np.mean(res["mse_by_step"]) < 1.0
    assert bl.tuned(kind, tg, 20, seed=0) == res  # deterministic


def test_tuned_custom_tune_targets_and_grid():
    tg = _targets(50, 2)
    res = bl.tuned("per_dim", tg, 10, tune_targets=_targets(40, 2, seed=3), grid=[1e-3, 0.2])
    assert res["param"]["lr"] == 0.2  # a tiny lr barely moves in 10 steps
    with pytest.raises(ValueError):
        bl.tuned("nonsense", tg, 10)
    with pytest.raises(ValueError):
        bl.tuned("scalar", tg, 10, tune_targets=_targets(10, 3))


def test_steps_to_reach():
    assert bl.steps_to_reach([1.0, 0.5, 0.2, 0.05], 0.3) == 2
    assert bl.steps_to_reach(np.array([1.0, 0.5]), 0.1) is None
    assert bl.steps_to_reach([0.01], 0.1) == 0
    assert bl.steps_to_reach([0.1, 0.09], 0.1) == 1  # strict inequality

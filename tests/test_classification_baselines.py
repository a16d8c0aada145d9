"""Tests for the online few-shot classification data and its classical baselines."""

from __future__ import annotations

import ast
import sys

import numpy as np
import pytest

from badger_runtime.tasks import classification_baselines as cb
from badger_runtime.tasks import classification_data as cd

pytest.importorskip("sklearn")


def _top_level_imports(module) -> set[str]:
    tree = ast.parse(open(module.__file__).read())
    mods = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def _random_episodes(B: int, T: int, C: int, F: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, C, size=(T, B))
    Xs = rng.standard_normal((T, B, F)) + 2.0 * ys[..., None]  # class-dependent means
    return Xs.astype(np.float32), ys


def _heldout_digits(batch: int, shots: int, seed: int = 0):
    ds = cd.load_dataset("digits")
    X = cd.scale_features("digits", ds.X)
    C = len(cd.DIGITS_HELDOUT_CLASSES)
    rng = np.random.default_rng(seed)
    return cd.sample_sequences(rng, X, ds.y, cd.DIGITS_HELDOUT_CLASSES, batch, C * shots, shots=shots)


def test_modules_import_no_torch_and_sklearn_lazily():
    for module in (cd, cb):
        mods = _top_level_imports(module)
        assert not mods & {"torch", "sklearn", "scipy"}, mods


@pytest.mark.parametrize(
    "name, shape, n_classes", [("digits", (1797, 64), 10), ("iris", (150, 4), 3), ("wine", (178, 13), 3),
                               ("breast_cancer", (569, 30), 2)]
)
def test_load_dataset(name, shape, n_classes):
    ds = cd.load_dataset(name)
    assert ds.X.shape == shape and ds.features == shape[1] and ds.n_classes == n_classes
    assert ds.X.dtype == np.float32 and ds.y.dtype == np.int64
    assert set(np.unique(ds.y)) == set(range(n_classes))
    assert cd.load_dataset(name) is ds  # cached
    with pytest.raises(ValueError):
        ds.X[0, 0] = 1.0  # the shared cached arrays are read-only


def test_unknown_dataset():
    with pytest.raises(ValueError, match="breast_cancer"):
        cd.load_dataset("mnist")
    with pytest.raises(ValueError):
        cd.scale_features("mnist", np.zeros((2, 2)))


def test_missing_sklearn_message(monkeypatch):
    for key in [k for k in sys.modules if k == "sklearn" or k.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, key, None)  # None in sys.modules makes the import fail
    cd.load_dataset.cache_clear()
    with pytest.raises(ImportError, match=r"pip install 'badger-runtime\[data\]'"):
        cd.load_dataset("iris")
    Xs, ys = _random_episodes(2, 3, 2)
    with pytest.raises(ImportError, match="needs scikit-learn"):
        cb.online_logistic_regression(Xs, ys, 2, lr=0.1)
    cd.load_dataset.cache_clear()


def test_digits_class_split_is_fixed_and_disjoint():
    assert cd.DIGITS_TRAIN_CLASSES == (0, 1, 2, 3, 4, 5)
    assert cd.DIGITS_HELDOUT_CLASSES == (6, 7, 8, 9)
    assert not set(cd.DIGITS_TRAIN_CLASSES) & set(cd.DIGITS_HELDOUT_CLASSES)


def test_split_examples_stratified_and_deterministic():
    ds = cd.load_dataset("digits")
    train, test = cd.split_examples(ds, 0.7, seed=3)
    assert len(np.intersect1d(train, test)) == 0
    assert len(train) + len(test) == len(ds.y)
    for c in range(ds.n_classes):
        n_c = np.sum(ds.y == c)
        assert np.sum(ds.y[train] == c) == round(0.7 * n_c)
    again = cd.split_examples(ds, 0.7, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(train, cd.split_examples(ds, 0.7, seed=4)[0])
    with pytest.raises(ValueError):
        cd.split_examples(ds, 1.0)


def test_sample_sequences_shapes_content_and_determinism():
    y = np.repeat(np.arange(5), 20)
    X = np.arange(len(y), dtype=np.float32)[:, None]  # feature = example index
    classes = [4, 1, 2]
    Xs, ys, perm = cd.sample_sequences(np.random.default_rng(0), X, y, classes, 16, 12)
    assert Xs.shape == (12, 16, 1) and ys.shape == (12, 16) and perm.shape == (16, 3)
    assert Xs.dtype == np.float32 and ys.dtype == np.int64 and perm.dtype == np.int64
    idx = Xs[..., 0].astype(np.int64)
    # the example shown has the original class that its episode label stands for
    assert np.array_equal(y[idx], np.take_along_axis(perm, ys.T, axis=1).T)
    for b in range(16):
        assert sorted(perm[b]) == sorted(classes)
        assert len(np.unique(idx[:, b])) == 12  # pools of 20 suffice: no example repeats
    again = cd.sample_sequences(np.random.default_rng(0), X, y, classes, 16, 12)
    for a, b in zip((Xs, ys, perm), again):
        assert np.array_equal(a, b)
    other = cd.sample_sequences(np.random.default_rng(1), X, y, classes, 16, 12)
    assert not np.array_equal(Xs, other[0])


def test_labels_are_shuffled_per_episode():
    _, _, perm = _heldout_digits(batch=50, shots=1)
    assert len({tuple(row) for row in perm}) > 10  # 24 possible permutations of 4 classes


def test_shots_gives_every_class_exactly_k_times():
    _, ys, _ = _heldout_digits(batch=20, shots=5)
    assert ys.shape == (20, 20)
    for b in range(20):
        assert np.array_equal(np.bincount(ys[:, b], minlength=4), [5, 5, 5, 5])
    assert len({tuple(col) for col in ys.T}) == 20  # random order per episode
    with pytest.raises(ValueError, match="steps"):
        cd.sample_sequences(np.random.default_rng(0), np.zeros((8, 1)), np.arange(8) % 4, [0, 1], 2, 5, shots=2)


def test_sample_sequences_reuses_a_pool_only_once_exhausted():
    y = np.array([0, 0, 1, 1, 1, 1, 1, 1])
    X = np.arange(len(y), dtype=np.float32)[:, None]
    Xs, ys, perm = cd.sample_sequences(np.random.default_rng(0), X, y, [0, 1], 5, 6, shots=3)
    for b in range(5):
        shown = Xs[:, b, 0].astype(np.int64)
        small = shown[y[shown] == 0]
        assert len(small) == 3 and set(small) == {0, 1}  # both used before one repeats
        assert len(np.unique(shown[y[shown] == 1])) == 3


def test_scale_features():
    ds = cd.load_dataset("digits")
    Z = cd.scale_features("digits", ds.X)
    assert Z.dtype == np.float32 and Z.min() == 0.0 and Z.max() == 1.0
    iris = cd.load_dataset("iris")
    assert np.array_equal(cd.scale_features("iris", iris.X), iris.X)


def test_online_standardize_matches_running_statistics_and_is_causal():
    rng = np.random.default_rng(0)
    Xs = rng.normal(100.0, 30.0, size=(10, 4, 5)).astype(np.float32)
    Xs[:, :, 0] = 7.0  # a constant feature stays 0 (floored std)
    Z = cd.online_standardize(Xs)
    assert Z.shape == Xs.shape and Z.dtype == np.float32
    assert np.all(Z[0] == 0.0) and np.all(Z[:, :, 0] == 0.0)
    for t in (1, 5, 9):
        seen = Xs[: t + 1].astype(np.float64)
        expect = np.clip((seen[t] - seen.mean(0)) / np.maximum(seen.std(0), cd.STD_FLOOR), -cd.CLIP, cd.CLIP)
        np.testing.assert_allclose(Z[t], expect, rtol=1e-4, atol=1e-4)
    for t in range(9):
        changed = Xs.copy()
        changed[t + 1 :] = rng.normal(size=changed[t + 1 :].shape) * 1e3
        assert np.array_equal(cd.online_standardize(changed)[: t + 1], Z[: t + 1])
    # an outlier among n examples (itself included) is at most sqrt(n - 1) stds away: clipping needs n > 26
    spike = rng.normal(size=(30, 1, 1))
    spike[29] = 1e9
    assert cd.online_standardize(spike)[29, 0, 0] == cd.CLIP
    assert cd.online_standardize(-spike)[29, 0, 0] == -cd.CLIP


def _prediction(fn, Xs, ys, C, t) -> int:
    """The label fn predicts for example t of episode 0, read off ``correct`` by trying every ys[t]."""
    hits = []
    for v in range(C):
        trial = ys.copy()
        trial[t, 0] = v
        if fn(Xs, trial, C)["correct"][t, 0]:
            hits.append(v)
    assert len(hits) == 1, f"step {t}: correct for labels {hits}; the prediction must not depend on ys[t]"
    return hits[0]


@pytest.mark.parametrize(
    "fn",
    [cb.nearest_class_mean, cb.one_nearest_neighbour, lambda Xs, ys, C: cb.online_logistic_regression(Xs, ys, C, 0.3)],
    ids=["ncm", "1nn", "logreg"],
)
def test_baselines_are_causal(fn):
    C, T = 3, 7
    Xs, ys = _random_episodes(B=2, T=T, C=C, seed=1)
    rng = np.random.default_rng(2)
    for t in range(1, T):
        before = _prediction(fn, Xs, ys, C, t)
        future_X, future_y = Xs.copy(), ys.copy()
        future_X[t + 1 :] = rng.standard_normal(future_X[t + 1 :].shape) * 10
        future_y[t + 1 :] = rng.integers(0, C, size=future_y[t + 1 :].shape)
        assert _prediction(fn, future_X, future_y, C, t) == before


def test_ncm_and_1nn_match_a_plain_loop():
    C = 4
    Xs, ys = _random_episodes(B=6, T=15, C=C, F=2, seed=5)
    ncm = cb.nearest_class_mean(Xs, ys, C)["correct"]
    nn = cb.one_nearest_neighbour(Xs, ys, C)["correct"]
    for b in range(6):
        for t in range(1, 15):
            x, past_X, past_y = Xs[t, b].astype(np.float64), Xs[:t, b].astype(np.float64), ys[:t, b]
            seen = np.unique(past_y)
            means = np.stack([past_X[past_y == c].mean(0) for c in seen])
            assert ncm[t, b] == (seen[np.argmin(((means - x) ** 2).sum(1))] == ys[t, b])
            assert nn[t, b] == (past_y[np.argmin(((past_X - x) ** 2).sum(1))] == ys[t, b])


def test_first_step_is_a_seeded_random_guess():
    Xs, ys = _random_episodes(B=400, T=3, C=4, seed=7)
    a = cb.nearest_class_mean(Xs, ys, 4, seed=0)["correct"][0]
    assert np.array_equal(a, cb.nearest_class_mean(Xs, ys, 4, seed=0)["correct"][0])
    assert abs(a.mean() - 0.25) < 0.08


def test_ncm_and_1nn_beat_chance_on_heldout_digits():
    C, shots = 4, 6
    Xs, ys, _ = _heldout_digits(batch=100, shots=shots)
    chance = cb.chance(ys, C)
    assert chance["accuracy_by_step"] == [0.25] * len(ys)
    for fn in (cb.nearest_class_mean, cb.one_nearest_neighbour):
        result = fn(Xs, ys, C)
        assert len(result["accuracy_by_step"]) == C * shots and result["correct"].shape == ys.shape
        by_shot = cb.accuracy_by_shot(result["correct"], ys, max_shot=shots)
        after_first = (cb.shots_before(ys) == 0)[1:]
        assert not result["correct"][1:][after_first].any()  # an unseen class is never predicted
        assert by_shot[5] > 0.8, (result["name"], by_shot)


def test_accuracy_by_shot_hand_made():
    ys = np.array([[0, 1, 0, 0, 1], [1, 1, 0, 1, 0]]).T  # [T=5, B=2]
    correct = np.array([[0, 0, 1, 0, 1], [0, 1, 0, 1, 0]], dtype=bool).T
    # shots before: episode 0: 0 0 1 2 1; episode 1: 0 1 0 2 1
    assert np.array_equal(cb.shots_before(ys).T, [[0, 0, 1, 2, 1], [0, 1, 0, 2, 1]])
    assert cb.accuracy_by_shot(correct, ys, max_shot=3) == [0.0, 0.75, 0.5, None]


def test_paired_by_shot_hand_made():
    ys = np.array([[0, 1, 0, 0, 1], [1, 1, 0, 1, 0]]).T  # shots before as above
    a = np.array([[0, 0, 1, 0, 1], [0, 1, 0, 1, 0]], dtype=bool).T
    b = np.array([[0, 1, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=bool).T
    out = cb.paired_by_shot(a, b, ys, max_shot=3)
    acc_a, acc_b = cb.accuracy_by_shot(a, ys, 3), cb.accuracy_by_shot(b, ys, 3)
    assert out["diff"][:3] == pytest.approx([x - y for x, y in zip(acc_a[:3], acc_b[:3])])
    # 1 shot: episode 0 has two predictions (a - b: +1, +1 -> +1), episode 1 two (0, 0 -> 0)
    assert out["diff"][1] == pytest.approx(0.5)
    assert out["sem"][1] == pytest.approx(np.std([1.0, 0.0], ddof=1) / np.sqrt(2))
    assert out["diff"][3] is None and out["sem"][3] is None
    assert cb.paired_by_shot(a, a, ys, max_shot=2) == {"diff": [0.0] * 3, "sem": [0.0] * 3}
    with pytest.raises(ValueError):
        cb.paired_by_shot(a[:4], b, ys)


def test_tune_and_all_baselines():
    C = 3
    Xs, ys = _random_episodes(B=4, T=6, C=C)
    grid = (0.01, 1.0)
    scores = [np.mean(cb.online_logistic_regression(Xs, ys, C, g)["accuracy_by_step"]) for g in grid]
    lr = cb.tune_logreg_lr(Xs, ys, C, grid=grid)
    assert lr == grid[int(np.argmax(scores))]
    results = cb.all_baselines(Xs, ys, C, logreg_lr=lr, seed=0)
    assert tuple(results) == cb.BASELINES
    assert all(len(acc) == 6 for acc in results.values())
    logreg = cb.online_logistic_regression(Xs, ys, C, lr)
    assert logreg["param"] == {"lr": lr} and results["online_logistic_regression"] == logreg["accuracy_by_step"]

"""Classical baselines for online few-shot classification (numpy; scikit-learn for logistic regression).

Every baseline plays B episodes in parallel: ``Xs`` [T, B, F] are the examples
in the order shown, ``ys`` [T, B] their episode labels in 0..C-1. The
prediction for example t may use ``Xs[:t]``, ``ys[:t]`` and ``Xs[t]`` only (its
own label is told after the prediction). A class not seen yet carries no
information; at step 0, when no class has been seen, a baseline guesses
uniformly at random with ``np.random.default_rng(seed)``.

Every baseline returns ``{"name", "accuracy_by_step", "correct"}`` (tuned ones
also ``"param"``): ``correct`` is a bool array [T, B], whether the prediction
for example t of episode b was right, and ``accuracy_by_step`` a list of T
floats, its mean over episodes. :func:`accuracy_by_shot` re-reads ``correct``
by how many times the example's class had been seen before.
"""

from __future__ import annotations

import numpy as np

from .classification_data import import_sklearn

__all__ = [
    "BASELINES",
    "LOGREG_LR_GRID",
    "accuracy_by_shot",
    "all_baselines",
    "chance",
    "nearest_class_mean",
    "one_nearest_neighbour",
    "online_logistic_regression",
    "paired_by_shot",
    "shots_before",
    "tune_logreg_lr",
]

#: Names of the baselines :func:`all_baselines` runs, in its order.
BASELINES: tuple[str, ...] = ("chance", "nearest_class_mean", "one_nearest_neighbour", "online_logistic_regression")
#: Learning rates searched by :func:`tune_logreg_lr` (0.003 .. 3, log spaced).
LOGREG_LR_GRID: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def _check(Xs: np.ndarray, ys: np.ndarray, C: int) -> tuple[np.ndarray, np.ndarray]:
    """Xs as float64 [T, B, F] and ys as int64 [T, B] with labels in 0..C-1."""
    Xs = np.asarray(Xs, dtype=np.float64)
    ys = np.asarray(ys, dtype=np.int64)
    if Xs.ndim != 3 or ys.shape != Xs.shape[:2] or len(ys) == 0:
        raise ValueError(f"Xs must be [T, B, F] and ys [T, B] with T >= 1, got {Xs.shape} and {ys.shape}")
    if ys.min() < 0 or ys.max() >= C:
        raise ValueError(f"labels must be in 0..{C - 1}, got {ys.min()}..{ys.max()}")
    return Xs, ys


def _result(name: str, pred: np.ndarray, ys: np.ndarray, **extra) -> dict:
    correct = pred == ys
    return {"name": name, "accuracy_by_step": [float(a) for a in correct.mean(axis=1)], "correct": correct} | extra


def chance(ys: np.ndarray, C: int, seed: int = 0) -> dict:
    """Uniform random guessing.

    ``accuracy_by_step`` is the exact expectation 1/C at every step;
    ``correct`` [T, B] is one seeded sample of random guesses (so it can be fed
    to :func:`accuracy_by_shot`), whose mean is only close to 1/C.
    """
    ys = np.asarray(ys, dtype=np.int64)
    pred = np.random.default_rng(seed).integers(0, C, size=ys.shape)
    return {"name": "chance", "accuracy_by_step": [1.0 / C] * len(ys), "correct": pred == ys}


def nearest_class_mean(Xs: np.ndarray, ys: np.ndarray, C: int, seed: int = 0) -> dict:
    """Prototype classifier: the seen class whose running mean is nearest (Euclidean) to x_t.

    Class means are over the examples of that class among 0..t-1; classes not
    seen yet are never predicted. Ties go to the lower label.
    """
    Xs, ys = _check(Xs, ys, C)
    T, B, F = Xs.shape
    sums = np.zeros((B, C, F))
    counts = np.zeros((B, C))
    pred = np.empty((T, B), dtype=np.int64)
    pred[0] = np.random.default_rng(seed).integers(0, C, size=B)
    rows = np.arange(B)
    for t in range(T):
        if t:
            means = sums / np.maximum(counts, 1.0)[..., None]
            dist = np.sum((means - Xs[t][:, None, :]) ** 2, axis=-1)
            pred[t] = np.argmin(np.where(counts > 0, dist, np.inf), axis=1)
        sums[rows, ys[t]] += Xs[t]
        counts[rows, ys[t]] += 1.0
    return _result("nearest_class_mean", pred, ys)


def one_nearest_neighbour(Xs: np.ndarray, ys: np.ndarray, C: int, seed: int = 0) -> dict:
    """The label of the nearest (Euclidean) earlier example of the episode.

    Vectorised over episodes through the [B, T, T] matrix of squared distances
    with the current and later examples masked out; ties go to the earliest.
    """
    Xs, ys = _check(Xs, ys, C)
    T, B, _ = Xs.shape
    X = Xs.transpose(1, 0, 2)  # [B, T, F]
    sq = np.sum(X * X, axis=-1)
    dist = sq[:, :, None] + sq[:, None, :] - 2.0 * X @ X.transpose(0, 2, 1)  # [B, t, s]
    dist[:, np.triu(np.ones((T, T), dtype=bool))] = np.inf  # s >= t is not seen at step t
    nearest = np.argmin(dist[:, 1:], axis=-1)  # [B, T-1]
    pred = np.empty((T, B), dtype=np.int64)
    pred[0] = np.random.default_rng(seed).integers(0, C, size=B)
    pred[1:] = np.take_along_axis(ys.T, nearest, axis=1).T
    return _result("one_nearest_neighbour", pred, ys)


def online_logistic_regression(Xs: np.ndarray, ys: np.ndarray, C: int, lr: float, seed: int = 0) -> dict:
    """One scikit-learn ``SGDClassifier`` per episode, one SGD step per example.

    Log-loss (one-vs-rest logistic regression for C > 2), constant learning rate
    ``lr``, scikit-learn's default L2 penalty (alpha = 1e-4). The model predicts
    example t (argmax over all C classes, so unlike the prototype baselines it
    may name a class not seen yet), then takes ``partial_fit`` on (x_t, y_t) with
    ``classes=range(C)``; before its first update it guesses at random.
    Parameter validation is skipped inside the loop. A Python loop over episodes
    and steps: about 40 s for 500 episodes of 50 steps (1.6 ms per update).
    """
    Xs, ys = _check(Xs, ys, C)
    sklearn = import_sklearn("sklearn")
    linear_model = import_sklearn("sklearn.linear_model")
    T, B, _ = Xs.shape
    pred = np.empty((T, B), dtype=np.int64)
    pred[0] = np.random.default_rng(seed).integers(0, C, size=B)
    labels = np.arange(C)
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        for b in range(B):
            model = linear_model.SGDClassifier(loss="log_loss", learning_rate="constant", eta0=lr, random_state=seed)
            for t in range(T):
                if t:
                    pred[t, b] = model.predict(Xs[t, b][None])[0]
                model.partial_fit(Xs[t, b][None], ys[t, b][None], classes=labels)
    return _result("online_logistic_regression", pred, ys, param={"lr": float(lr)})


def tune_logreg_lr(
    Xs: np.ndarray, ys: np.ndarray, C: int, grid: tuple[float, ...] = LOGREG_LR_GRID, seed: int = 0
) -> float:
    """The lr of ``grid`` with the best mean over steps of :func:`online_logistic_regression`'s accuracy.

    Run it on training-split sequences, not on the ones reported. Ties go to
    the first grid value. Costs len(grid) full runs of the baseline.
    """
    if not grid:
        raise ValueError("empty learning-rate grid")
    scores = [np.mean(online_logistic_regression(Xs, ys, C, lr, seed)["accuracy_by_step"]) for lr in grid]
    return float(grid[int(np.argmax(scores))])


def shots_before(ys: np.ndarray) -> np.ndarray:
    """int64 [T, B]: how many times example t's label appeared in ys[:t] of its episode."""
    ys = np.asarray(ys, dtype=np.int64)
    onehot = ys[..., None] == np.arange(int(ys.max()) + 1)  # [T, B, C]
    seen = np.cumsum(onehot, axis=0) - onehot  # counts before step t
    return np.take_along_axis(seen, ys[..., None], axis=-1)[..., 0].astype(np.int64)


def accuracy_by_shot(correct: np.ndarray, ys: np.ndarray, max_shot: int = 10) -> list[float | None]:
    """Entry k (0..max_shot): accuracy of the predictions on examples whose class was seen k times before.

    None where no prediction had exactly k earlier examples of its class.
    """
    correct = np.asarray(correct, dtype=bool)
    shots = shots_before(ys)
    if correct.shape != shots.shape:
        raise ValueError(f"correct {correct.shape} and ys {shots.shape} differ in shape")
    return [float(correct[shots == k].mean()) if np.any(shots == k) else None for k in range(max_shot + 1)]


def paired_by_shot(correct: np.ndarray, other: np.ndarray, ys: np.ndarray,
                   max_shot: int = 10) -> dict[str, list[float | None]]:
    """Paired difference of two learners on the same predictions, by shots seen before (0..max_shot).

    ``diff[k]``: accuracy of ``correct`` minus that of ``other`` [T, B] on the predictions whose class
    was seen k times before; ``sem[k]``: its standard error over episodes (each episode's own
    difference on its k-shot predictions; the episodes are independent, the predictions within one
    are not). None where fewer than two episodes have a k-shot prediction. Pairing removes the
    episodes' shared difficulty, so ``sem`` is well below the unpaired standard error of either
    accuracy.
    """
    correct, other = np.asarray(correct, dtype=np.float64), np.asarray(other, dtype=np.float64)
    shots = shots_before(ys)
    if correct.shape != shots.shape or other.shape != shots.shape:
        raise ValueError(f"correct {correct.shape}, other {other.shape} and ys {shots.shape} differ in shape")
    diff, sem = [], []
    for k in range(max_shot + 1):
        at = shots == k
        n = at.sum(axis=0)  # [B] predictions at k shots per episode
        has = n > 0
        if has.sum() < 2:
            diff.append(None)
            sem.append(None)
            continue
        d = np.where(at, correct - other, 0.0).sum(axis=0)[has] / n[has]
        diff.append(float((correct - other)[at].mean()))
        sem.append(float(d.std(ddof=1) / np.sqrt(len(d))))
    return {"diff": diff, "sem": sem}


def all_baselines(Xs: np.ndarray, ys: np.ndarray, C: int, *, logreg_lr: float, seed: int = 0) -> dict[str, list[float]]:
    """``accuracy_by_step`` of every baseline of :data:`BASELINES` on the same episodes."""
    results = [
        chance(ys, C, seed),
        nearest_class_mean(Xs, ys, C, seed),
        one_nearest_neighbour(Xs, ys, C, seed),
        online_logistic_regression(Xs, ys, C, logreg_lr, seed),
    ]
    return {r["name"]: r["accuracy_by_step"] for r in results}

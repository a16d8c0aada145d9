"""Data for the online few-shot classification task family (numpy; scikit-learn loaders).

An episode is a C-way problem: C original classes of one dataset, mapped to
episode labels 0..C-1 by a permutation drawn per episode, and a stream of
examples shown one per inner step. The learner predicts a label for example t
and is then told its true episode label, so its prediction at step t can use
the labels of examples 0..t-1 only.

The datasets are scikit-learn's bundled ones (no download):

- ``digits``: 8x8 grey images, 64 features in 0..16, 10 classes. Classes
  :data:`DIGITS_TRAIN_CLASSES` are for meta-training, :data:`DIGITS_HELDOUT_CLASSES`
  are never seen in training; :func:`split_examples` splits the examples of
  every class so 10-way problems can be evaluated on examples never trained on.
- ``iris`` (4 features, 3 classes), ``wine`` (13, 3), ``breast_cancer`` (30, 2):
  never seen in training, with other numbers of features and classes.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np

__all__ = [
    "CLIP",
    "DATASETS",
    "DIGITS_HELDOUT_CLASSES",
    "DIGITS_TRAIN_CLASSES",
    "SKLEARN_MISSING",
    "STD_FLOOR",
    "Dataset",
    "import_sklearn",
    "load_dataset",
    "online_standardize",
    "sample_sequences",
    "scale_features",
    "split_examples",
    "standardize_stream",
]

DATASETS: tuple[str, ...] = ("digits", "iris", "wine", "breast_cancer")
#: Digit classes the agent is meta-trained on.
DIGITS_TRAIN_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
#: Digit classes held out from meta-training (evaluation only).
DIGITS_HELDOUT_CLASSES: tuple[int, ...] = (6, 7, 8, 9)
SKLEARN_MISSING = "the classification task needs scikit-learn: pip install 'badger-runtime[data]'"

#: Floor on the running standard deviation in :func:`online_standardize`.
STD_FLOOR = 1e-3
#: :func:`online_standardize` clips its output to [-CLIP, CLIP].
CLIP = 5.0


@dataclass(frozen=True)
class Dataset:
    """A labelled dataset: ``X`` float32 [n, F], ``y`` int64 [n] in 0..n_classes-1."""

    name: str
    X: np.ndarray
    y: np.ndarray
    n_classes: int

    @property
    def features(self) -> int:
        """Number of features F."""
        return int(self.X.shape[1])


def import_sklearn(module: str = "sklearn") -> ModuleType:
    """Import ``module`` (``sklearn`` or one of its submodules), or raise ImportError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(SKLEARN_MISSING) from exc


@functools.lru_cache(maxsize=None)
def load_dataset(name: str) -> Dataset:
    """The bundled scikit-learn dataset ``name`` (one of :data:`DATASETS`), cached per process.

    The arrays are read-only because the cached object is shared by all callers.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    datasets = import_sklearn("sklearn.datasets")
    bunch = getattr(datasets, f"load_{name}")()
    X = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    X.flags.writeable = False
    y.flags.writeable = False
    return Dataset(name=name, X=X, y=y, n_classes=int(y.max()) + 1)


def split_examples(dataset: Dataset, fraction_train: float = 0.7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified example split: (train_idx, test_idx), sorted int64 index arrays.

    Every class contributes round(fraction_train * n_c) of its n_c examples to
    the training part, chosen by ``np.random.default_rng(seed)``; the same seed
    always gives the same split.
    """
    if not 0.0 < fraction_train < 1.0:
        raise ValueError(f"fraction_train must be in (0, 1), got {fraction_train}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(dataset.n_classes):
        idx = rng.permutation(np.flatnonzero(dataset.y == c))
        n_train = int(round(fraction_train * len(idx)))
        train.append(idx[:n_train])
        test.append(idx[n_train:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _draw(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """n indices from ``pool``: without replacement, reshuffled and reused once it runs out."""
    rounds = -(-n // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(rounds)])[:n]


def sample_sequences(
    rng: np.random.Generator,
    X: np.ndarray,
    y: np.ndarray,
    classes: Sequence[int],
    batch: int,
    steps: int,
    *,
    shots: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``batch`` episodes of ``steps`` examples over the original ``classes``.

    Returns ``(Xs, ys, perm)``:

    - ``Xs`` float32 [steps, batch, F]: the example shown at each step;
    - ``ys`` int64 [steps, batch]: its episode label in 0..C-1;
    - ``perm`` int64 [batch, C]: ``perm[b, j]`` is the original class of
      episode label j in episode b (a fresh random permutation per episode).

    With ``shots=None`` each step's label is uniform over the C labels; with
    ``shots=k`` every label appears exactly k times in a random order (then
    ``steps`` must equal C * k). Within an episode a class's examples are drawn
    without replacement while its pool lasts, then reused. Everything comes
    from ``rng``, so the same generator state gives the same episodes.
    """
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    classes = np.asarray(classes, dtype=np.int64)
    if X.ndim != 2 or y.shape != (len(X),):
        raise ValueError(f"X must be [n, F] and y [n], got {X.shape} and {y.shape}")
    C = len(classes)
    if C < 1 or len(np.unique(classes)) != C:
        raise ValueError(f"classes must be distinct and non-empty, got {classes.tolist()}")
    pools = {int(c): np.flatnonzero(y == c) for c in classes}
    empty = [c for c, pool in pools.items() if len(pool) == 0]
    if empty:
        raise ValueError(f"no examples of classes {empty}")
    if batch < 1 or steps < 1:
        raise ValueError(f"batch and steps must be >= 1, got {batch} and {steps}")
    if shots is not None and steps != C * shots:
        raise ValueError(f"shots={shots} with {C} classes needs steps={C * shots}, got {steps}")

    perm = np.stack([rng.permutation(classes) for _ in range(batch)])
    if shots is None:
        labels = rng.integers(0, C, size=(batch, steps))
    else:
        labels = np.stack([rng.permutation(np.repeat(np.arange(C), shots)) for _ in range(batch)])
    idx = np.empty((batch, steps), dtype=np.int64)
    for b in range(batch):
        for j in range(C):
            at = np.flatnonzero(labels[b] == j)
            if len(at):
                idx[b, at] = _draw(rng, pools[int(perm[b, j])], len(at))
    return X[idx.T], labels.T.astype(np.int64), perm.astype(np.int64)


def scale_features(name: str, X: np.ndarray) -> np.ndarray:
    """A fixed per-dataset scaling that needs no data statistics (float32, same shape).

    ``digits``: X / 16, since pixel values are known to lie in 0..16. The
    other datasets have no natural known range and are returned unchanged;
    :func:`online_standardize` puts them on a common scale.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    X = np.asarray(X, dtype=np.float32)
    return X / np.float32(16.0) if name == "digits" else X.copy()


def online_standardize(Xs: np.ndarray) -> np.ndarray:
    """Standardize each example by its episode's running statistics: [T, B, F] -> [T, B, F].

    Step t is mapped to (x_t - mean_t) / std_t with the per-feature mean and
    (population) std of examples 0..t of the same episode, the current one
    included; std is 1 at t = 0 (fewer than 2 examples) and at least
    :data:`STD_FLOOR` after; the result is clipped to [-CLIP, CLIP]. The map is
    causal: output[:t+1] depends on Xs[:t+1] only.

    Why: these are statistics the learner could compute itself from what it has
    seen in the episode, whereas dataset-wide statistics would leak information
    from examples (and classes) it has not seen. It also puts datasets with
    very different units (wine, breast_cancer) on one scale, so one policy can
    take features of any dataset.
    """
    Xs = np.asarray(Xs, dtype=np.float64)
    if Xs.ndim != 3 or len(Xs) == 0:
        raise ValueError(f"Xs must have shape [T, B, F] with T >= 1, got {Xs.shape}")
    return standardize_stream(Xs, None)[0]


def standardize_stream(raw: np.ndarray, stats: tuple | None):
    """``online_standardize`` of a stream that goes on chunk by chunk: [T, B, F] continuing
    ``stats`` (None: a fresh stream). Returns (standardised, the stats to continue from)."""
    raw = np.asarray(raw, np.float64)
    if stats is None:  # the first example is known at every step; shifting by it avoids cancellation
        stats = (0, raw[0].copy(), np.zeros(raw.shape[1:]), np.zeros(raw.shape[1:]))
    n0, shift, s1, s2 = stats
    x = raw - shift
    n = n0 + np.arange(1, len(raw) + 1, dtype=np.float64)[:, None, None]
    c1 = s1 + np.cumsum(x, axis=0)
    c2 = s2 + np.cumsum(x * x, axis=0)
    mean = c1 / n
    std = np.maximum(np.sqrt(np.maximum(c2 / n - mean * mean, 0.0)), STD_FLOOR)
    if n0 == 0:
        std[0] = 1.0
    return np.clip((x - mean) / std, -CLIP, CLIP).astype(np.float32), (n0 + len(raw), shift, c1[-1], c2[-1])

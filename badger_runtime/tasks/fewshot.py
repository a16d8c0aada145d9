"""Online few-shot classification on real data (registered as the task ``fewshot``).

Each episode is a C-way problem: C classes of a dataset, mapped to the episode's labels
0..C-1 by a permutation drawn per episode, and a stream of examples shown one per inner
step. At step t the agent sees example t's features and the label of example t - 1; it
outputs one score per class; its prediction (the argmax) is scored against example t's
label, which it is told at step t + 1. So the prediction at step t can use the labels of
examples 0..t-1 only, as for the classical online baselines run on the same episodes
(``classification_baselines``: nearest class mean, 1-NN, online logistic regression,
chance). The policy's weights are frozen: within an episode it learns only by its experts'
states and messages.

The membrane's view (``interface``):

- F **feature slots** (observation flag), one per feature, at addresses drawn per episode (the
  features are also shuffled per episode: a bag of (address, value)), so one policy runs on 4,
  13, 30 or 64 features;
- the same F features of the **labelled example** (example t - 1), at the same addresses
  (feedback flag): the feedback is the example with its label;
- C **label slots** (both flags) at the class addresses: their values are the one-hot label of
  example t - 1 (all zero at the first step). Slot addresses are fixed for an episode
  (``membrane.Interface``), so the label comes as values on class-addressed slots;
- C **outputs** at the class addresses (drawn per episode), one score per class. The training
  loss is the softmax cross-entropy of ``logit_scale`` x the scores against the true label.
- Who reads what: ``Visibility("grid")``, expert e reads the label slot of class e mod C and
  feature (e div C) mod F of both examples: N = C x F experts hold one (class, feature) cell each.

Data (``classification_data``): ``digits`` (64 features), ``iris`` (4), ``wine`` (13),
``breast_cancer`` (30). Digits 0-5 are for meta-training, 6-9 are held out; ``split`` picks the
training or test examples of every class (so 10-way problems over all digits can be
evaluated on examples never trained on). ``scaling``: ``known`` (digits / 16: pixel values
lie in 0..16), ``online`` (standardised with the episode's running mean and std, statistics
the agent could compute itself), ``auto`` (known for digits, online otherwise), ``none``
or ``mixed`` (training: known or online per batch). Training augmentations, on the training
digits only: ``transforms`` (the 8 rotations/flips of each digit image as classes of their
own: 48 training classes), ``project_prob`` (a batch's features are a random linear
projection of the pixels to F in ``features`` dimensions, then standardised online).

``shots = k`` draws balanced streams (every label k times in random order, repeated);
``shots = 0`` i.i.d. labels. ``change_every = [a, b]`` makes the stream non-stationary: every
U[a, b] steps the episode's classes and their labels are drawn afresh (the agent is never
told), for the 10,000-step check (``longrun_report``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError, TaskConfig
from ..membrane import KIND_FEEDBACK, KIND_OBSERVATION, N_KIND_FLAGS, Interface, Visibility
from . import Task, TaskEpisode
from . import classification_data as cd
from .guessing import random_addresses, with_kind

POOLS = ("train", "heldout", "all")
SPLITS = ("train", "test", "all")
SCALINGS = ("auto", "known", "online", "none", "mixed")
BASELINE_SETS = ("all", "fast", "none")  # fast: without online logistic regression (the slow one)
ONLINE_AT = (10, 25, 50)  # report the online accuracy over the first this many examples
MAX_SHOT = 10
NEVER = np.iinfo(np.int64).max // 2


@dataclass
class FewShotConfig(TaskConfig):
    """Online few-shot classification settings (``dims``: the range of C, the number of classes)."""

    name: str = "fewshot"
    dims: tuple[int, int] = (2, 5)
    steps: int = 40
    dataset: str = "digits"  # digits | iris | wine | breast_cancer
    classes_pool: str = "train"  # digits: train (0-5) | heldout (6-9) | all; other datasets: all their classes
    split: str = "train"  # examples of every class: train (70 %) | test (30 %) | all
    scaling: str = "auto"  # auto | known | online | none | mixed (training: known or online per batch)
    shots: int = 0  # 0: i.i.d. labels; k: balanced streams, every label k times in random order (repeated)
    change_every: tuple[int, int] = (0, 0)  # classes and labels drawn afresh every U[a, b] steps (0: never)
    transforms: bool = False  # training digits: the 8 rotations/flips of each image are classes of their own
    project_prob: float = 0.0  # chance that a batch's features are a random projection of the pixels
    features: tuple[int, int] = (4, 64)  # the projection's number of features F, drawn per batch from [lo, hi]
    logit_scale: float = 1.0  # the loss is cross-entropy of logit_scale x the agent's scores
    copy_prob: float = 0.0  # training aid: chance that a batch shows each example's own label with it
    loss_unseen: bool = True  # count the loss of predictions on a class not seen yet in the episode (batch)
    baselines: str = "all"  # all | fast (no logistic regression) | none

    def validate(self):
        super().validate()
        if self.dataset not in cd.DATASETS:
            raise ConfigError(f"task.dataset must be one of {cd.DATASETS}, got {self.dataset!r}")
        for key, allowed in (("classes_pool", POOLS), ("split", SPLITS), ("scaling", SCALINGS),
                             ("baselines", BASELINE_SETS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"task.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        a, b = self.change_every
        if a < 0 or b < a:
            raise ConfigError("task.change_every must be [a, b] with 0 <= a <= b")
        if b and a < 1:
            raise ConfigError("task.change_every must be [a, b] with 1 <= a <= b (or [0, 0]: never)")
        lo, hi = self.features
        if not 1 <= lo <= hi:
            raise ConfigError("task.features must be [lo, hi] with 1 <= lo <= hi")
        if self.shots < 0 or not 0.0 <= self.project_prob <= 1.0 or self.logit_scale <= 0:
            raise ConfigError("task.shots >= 0, task.project_prob in [0, 1] and task.logit_scale > 0 are needed")
        if not 0.0 <= self.copy_prob <= 1.0:
            raise ConfigError("task.copy_prob must be in [0, 1]")
        if self.scaling == "known" and self.dataset != "digits":
            raise ConfigError(f"task.scaling = 'known' exists for digits only (pixels in 0..16), not {self.dataset!r}; "
                              "use 'online' or 'none'")
        if (self.transforms or self.project_prob) and self.dataset != "digits":
            raise ConfigError("task.transforms and task.project_prob augment the digits only")
        return self


# ---- the examples an episode draws from ------------------------------------------------------


@dataclass(frozen=True)
class Source(cd.Dataset):
    """Examples to draw episodes from: a dataset's split (raw features ``X`` [n, F], class ids
    ``y`` [n]), the class ids episodes choose from (``pool``) and the examples of each (``members``)."""

    pool: np.ndarray
    members: dict


def _dihedral(X: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations and flips of 8x8 images [n, 64] -> 8 x [n, 64] (the identity first)."""
    img = X.reshape(-1, 8, 8)
    out = []
    for flip in (False, True):
        im = img[:, :, ::-1] if flip else img
        for k in range(4):
            out.append(np.rot90(im, k, axes=(1, 2)).reshape(-1, 64))
    return out


@functools.lru_cache(maxsize=None)
def source(dataset: str, classes_pool: str = "all", split: str = "all", transforms: bool = False) -> Source:
    """The examples of ``dataset`` a task draws from (cached; read-only arrays)."""
    ds = cd.load_dataset(dataset)
    if split == "all":
        keep = np.arange(len(ds.y))
    else:
        train, test = cd.split_examples(ds, 0.7, seed=0)
        keep = train if split == "train" else test
    X, y = ds.X[keep], ds.y[keep]
    if dataset == "digits":
        pool = {"train": cd.DIGITS_TRAIN_CLASSES, "heldout": cd.DIGITS_HELDOUT_CLASSES,
                "all": tuple(range(ds.n_classes))}[classes_pool]
    else:
        pool = tuple(range(ds.n_classes))
    pool = np.asarray(pool, np.int64)
    inside = np.isin(y, pool)
    X, y = X[inside], y[inside]
    if transforms:
        if dataset != "digits":
            raise ConfigError("transforms exist for the digits only")
        views = _dihedral(X)
        X = np.concatenate(views, axis=0)
        y = np.concatenate([y + 10 * k for k in range(len(views))])  # class id: digit + 10 x transform
        pool = np.concatenate([pool + 10 * k for k in range(len(views))])
    X = np.ascontiguousarray(X, np.float32)
    members = {int(c): np.flatnonzero(y == c) for c in pool}
    for a in (X, y, pool):
        a.flags.writeable = False
    return Source(f"{dataset}:{classes_pool}:{split}" + (":transforms" if transforms else ""), X, y, ds.n_classes,
                  pool, members)


def task_source(cfg: FewShotConfig) -> Source:
    return source(cfg.dataset, cfg.classes_pool if cfg.dataset == "digits" else "all", cfg.split,
                  cfg.transforms and cfg.dataset == "digits")


def resolve_scaling(cfg: FewShotConfig, rng: np.random.Generator | None = None, projected: bool = False) -> str:
    """The scaling of a batch: ``known`` or ``online`` (or ``none``)."""
    s = cfg.scaling
    if s == "mixed":
        s = "online" if (projected or cfg.dataset != "digits" or rng is None or rng.random() < 0.5) else "known"
    if s == "auto":
        s = "known" if cfg.dataset == "digits" and not projected else "online"
    if s == "known" and (projected or cfg.dataset != "digits"):
        s = "online"
    return s


# ---- streams ----------------------------------------------------------------------------------


@dataclass
class StreamState:
    """What a stream carries over when it goes on (``Task.extend``), per episode."""

    classes: np.ndarray  # [B, C] the class id of each label (the current mapping)
    next_change: np.ndarray  # [B] the absolute step of the next change (NEVER: none)
    last_label: np.ndarray  # [B] the label of the last example shown (-1: none yet)
    proj: np.ndarray | None  # [B, F, F0] the features' random projection (None: the raw features)
    order: np.ndarray  # [B, F] the order the features are shown in (drawn per episode)
    scaling: str  # known | online | none
    stats: tuple | None  # online standardisation: (n, shift [B, F], sum [B, F], sum of squares [B, F])


def _labels(rng, C: int, n: int, shots: int) -> np.ndarray:
    if shots:
        blocks = -(-n // (C * shots))
        return np.concatenate([rng.permutation(np.repeat(np.arange(C), shots)) for _ in range(blocks)])[:n]
    return rng.integers(0, C, size=n)


def draw_stream(rng: np.random.Generator, src: Source, state: StreamState, t0: int, steps: int, shots: int,
                change_every: tuple[int, int]):
    """Examples for absolute steps t0 .. t0 + steps - 1 of B streams: (index into ``src.X`` [T, B],
    labels [T, B], changes [T, B] bool: the mapping changed at this step). Updates ``state``."""
    B, C = state.classes.shape
    idx = np.empty((steps, B), np.int64)
    ys = np.empty((steps, B), np.int64)
    changes = np.zeros((steps, B), bool)
    a, b = change_every
    for e in range(B):
        t = 0
        while t < steps:
            if state.next_change[e] <= t0 + t:  # a change: fresh classes and labels
                state.classes[e] = rng.choice(src.pool, size=C, replace=False)
                state.next_change[e] = t0 + t + int(rng.integers(a, b + 1))
                changes[t, e] = True
            end = min(steps, state.next_change[e] - t0)
            n = end - t
            lab = _labels(rng, C, n, shots)
            ys[t:end, e] = lab
            for j in range(C):
                at = np.flatnonzero(lab == j)
                if len(at):
                    idx[t + at, e] = cd._draw(rng, src.members[int(state.classes[e, j])], len(at))
            t = end
    return idx, ys, changes


def features_of(src: Source, idx: np.ndarray, state: StreamState) -> np.ndarray:
    """The features [T, B, F] the agent sees for examples ``idx`` [T, B] (updates the stats)."""
    raw = src.X[idx]  # [T, B, F0]
    if state.proj is not None:
        raw = np.einsum("tbg,bfg->tbf", raw, state.proj)
    raw = np.take_along_axis(raw, state.order[None], axis=-1)
    if state.scaling == "known":
        return cd.scale_features("digits", raw)
    if state.scaling == "none":
        return raw.astype(np.float32)
    out, state.stats = cd.standardize_stream(raw, state.stats)
    return out


# ---- episodes ---------------------------------------------------------------------------------


#: Size of the kind flags in the slot addresses (as the guessing game's). Three kinds with the two
#: flags: features (observation flag), the labelled example's features (feedback flag), labels
#: (both flags: what the class is, as feedback).
FLAG_SCALE = 1.0


def interface(feat_addr: np.ndarray, class_addr: np.ndarray, flag_scale: float = FLAG_SCALE) -> Interface:
    """The membrane's view of B episodes with feature addresses [B, F, A-2] and class addresses
    [B, C, A-2]: F feature slots (observation flag), the F features of the labelled example at the
    same addresses (feedback flag), C label slots at the class addresses (both flags); C outputs at
    the class addresses (no flag). Who reads what (``Visibility('grid')``): expert e reads the
    label slot of class e mod C and feature (e div C) mod F of both examples, so N = C x F experts
    hold one (class, feature) cell each; fewer experts see fewer features (the same ones for every
    class; the task shuffles the features per episode), more repeat cells."""
    F, C = feat_addr.shape[1], class_addr.shape[1]
    slots = np.concatenate([_kind(feat_addr, (flag_scale, 0.0)), _kind(feat_addr, (0.0, flag_scale)),
                            _kind(class_addr, (flag_scale, flag_scale))], axis=1)
    return Interface(slots, with_kind(class_addr, None), Visibility("grid", 2 * F, 2 * F + C, period=F),
                     parts=(("features", F), ("example", F), ("label", C)))


def _kind(addr: np.ndarray, flags: tuple[float, float]) -> np.ndarray:
    """Addresses [..., A-2] with kind flags (observation, feedback) = ``flags``: [..., A]."""
    out = with_kind(addr, None)
    out[..., KIND_OBSERVATION], out[..., KIND_FEEDBACK] = flags
    return out


@dataclass
class Episode(TaskEpisode):
    """A batch of B classification streams over absolute steps t0 .. t0 + T - 1."""

    interface: Interface
    xs: np.ndarray  # [T, B, F] the features the agent sees (scaled)
    ys: np.ndarray  # [T, B] the labels
    jumps: np.ndarray  # [T, B] bool: the class mapping changed at this step
    prev_label: np.ndarray  # [B] the label of the example before t0 (-1: none)
    t0: int = 0
    logit_scale: float = 1.0
    state: StreamState | None = None  # to go on (Task.extend); None after select
    delay: int = 1  # the feedback is on example t - delay (0: a training aid, copy_prob)
    loss_unseen: bool = True
    prev_x: np.ndarray | None = None  # [B, F] the features of the example before t0 (None: none)
    batch_axes = {"xs": 1, "ys": 1, "jumps": 1, "prev_label": 0, "prev_x": 0}

    def select(self, idx) -> "Episode":
        return dataclasses.replace(super().select(idx), state=None)

    @property
    def classes(self) -> int:
        return self.interface.dims

    def _label_values(self, t: int) -> np.ndarray:
        """[B, C] one-hot of the label of example t - 1 (zeros before the first)."""
        prev = self.prev_label if t - self.delay < self.t0 else self.ys[t - self.delay - self.t0]
        return (prev[:, None] == np.arange(self.classes)[None, :]).astype(np.float32)

    def _example_values(self, t: int) -> np.ndarray:
        """[B, F] the features of example t - delay (zeros before the first)."""
        if t - self.delay >= self.t0:
            return self.xs[t - self.delay - self.t0]
        return self.prev_x if self.prev_x is not None else np.zeros_like(self.xs[0])

    def observe(self, ops, t: int, prev_output):
        return ops.asarray(np.concatenate([self.xs[t - self.t0], self._example_values(t), self._label_values(t)],
                                          axis=-1))

    def loss(self, ops, t: int, output):
        """Softmax cross-entropy of logit_scale x the scores against the label of example t: [B]
        (zero where the class was not seen before in this batch, with ``loss_unseen`` off)."""
        z = output * self.logit_scale
        m = ops.detach(ops.amax(z, axis=-1, keepdims=True))
        lse = m[:, 0] + ops.log(ops.sum(ops.exp(z - m), axis=-1))
        y = self.ys[t - self.t0]
        onehot = ops.asarray((y[:, None] == np.arange(self.classes)[None, :]).astype(np.float32))
        ce = lse - ops.sum(onehot * z, axis=-1)
        if self.loss_unseen:
            return ce
        seen = (self.ys[: t - self.t0] == y[None, :]).any(axis=0)
        return ce * ops.asarray(seen.astype(np.float32))

    def loss_groups(self, t: int) -> np.ndarray:
        """How many examples of the true class came before step t in this batch (capped at MAX_SHOT):
        the accuracy-by-shot groups of the report; -1 for none (no loss there, with ``loss_unseen`` off)."""
        from .classification_baselines import shots_before

        k = np.minimum(shots_before(self.ys[: t - self.t0 + 1])[-1], MAX_SHOT)
        return np.where((k == 0) & (not self.loss_unseen), -1, k)

    def metrics(self, t: int, output: np.ndarray) -> dict[str, np.ndarray]:
        out = np.asarray(output, np.float64)
        y = self.ys[t - self.t0]
        z = out * self.logit_scale
        m = z.max(axis=-1)
        loss = m + np.log(np.exp(z - m[:, None]).sum(axis=-1)) - z[np.arange(len(y)), y]
        return {"correct": (out.argmax(axis=-1) == y).astype(np.float32), "loss": loss.astype(np.float32)}


def sample(rng: np.random.Generator, cfg: FewShotConfig, batch: int, classes: int, addr_dim: int, steps: int,
           features: int | None = None) -> Episode:
    """B fresh streams of ``steps`` examples of a C-way problem (``classes`` = C)."""
    src = task_source(cfg)
    if classes > len(src.pool):
        raise ConfigError(f"{classes}-way problems need {classes} classes; {src.name} has {len(src.pool)} "
                          f"(digits: --option classes_pool=all for up to 10)")
    proj = None
    if cfg.project_prob and rng.random() < cfg.project_prob:
        F = features or int(rng.integers(cfg.features[0], cfg.features[1] + 1))
        proj = (rng.standard_normal((batch, F, src.features)) / np.sqrt(src.features)).astype(np.float32)
    F = src.features if proj is None else proj.shape[1]
    order = np.argsort(rng.random((batch, F)), axis=1)
    state = StreamState(np.zeros((batch, classes), np.int64), np.zeros(batch, np.int64), np.full(batch, -1),
                        proj, order, resolve_scaling(cfg, rng, projected=proj is not None), None)
    change = cfg.change_every if cfg.change_every[1] else (NEVER, NEVER)
    idx, ys, changes = draw_stream(rng, src, state, 0, steps, cfg.shots, change)
    changes[0] = False  # the first mapping is no change
    xs = features_of(src, idx, state)
    state.last_label = ys[-1].copy()
    itf = interface(random_addresses(rng, (batch, F), addr_dim), random_addresses(rng, (batch, classes), addr_dim))
    delay = 0 if cfg.copy_prob and rng.random() < cfg.copy_prob else 1
    return Episode(itf, xs, ys, changes, np.full(batch, -1), 0, cfg.logit_scale, state, delay, cfg.loss_unseen)


def extend(rng: np.random.Generator, cfg: FewShotConfig, ep: Episode, end: int) -> Episode:
    """The same streams carried on from the episode's end up to absolute step ``end`` (same
    addresses, the same class mapping until its next change, running statistics kept)."""
    if ep.state is None:
        raise ValueError("this episode cannot go on (it was selected from a batch)")
    src = task_source(cfg)
    state = dataclasses.replace(ep.state, classes=ep.state.classes.copy(), next_change=ep.state.next_change.copy())
    t0 = ep.t0 + len(ep.ys)
    change = cfg.change_every if cfg.change_every[1] else (NEVER, NEVER)
    idx, ys, changes = draw_stream(rng, src, state, t0, end - t0, cfg.shots, change)
    xs = features_of(src, idx, state)
    prev = state.last_label.copy()
    state.last_label = ys[-1].copy()
    return Episode(ep.interface, xs, ys, changes, prev, t0, ep.logit_scale, state, ep.delay, ep.loss_unseen,
                   ep.xs[-1].copy())


# ---- the logistic-regression baseline's learning rate ------------------------------------------

LR_TABLE = Path(__file__).with_name("fewshot_logreg_lr.json")
TUNE_EPISODES, TUNE_STEPS, TUNE_SEED = 64, 50, 0


def _lr_key(dataset: str, classes: int, scaling: str) -> str:
    return f"{dataset}/{classes}/{scaling}"


@functools.lru_cache(maxsize=None)
def _lr_table() -> dict:
    try:
        return json.loads(LR_TABLE.read_text())["lr"]
    except (OSError, ValueError, KeyError):
        return {}


def tuning_config(dataset: str, classes: int, scaling: str) -> FewShotConfig:
    """The episodes the logistic regression's lr is tuned on: training-split examples of the
    dataset (digits: the training classes, or all digits beyond 6 classes), i.i.d. labels."""
    pool = "train" if dataset == "digits" and classes <= len(cd.DIGITS_TRAIN_CLASSES) else "all"
    return FewShotConfig(dataset=dataset, dims=(classes, classes), classes_pool=pool, split="train",
                         scaling=scaling, steps=TUNE_STEPS).validate()


@functools.lru_cache(maxsize=None)
def logreg_lr(dataset: str, classes: int, scaling: str) -> float:
    """Online logistic regression's learning rate for (dataset, C, scaling): the shipped table
    (``fewshot_logreg_lr.json``, made by ``tune_lr_table``), else tuned now on
    ``TUNE_EPISODES`` training-split episodes with a fixed seed (and cached for the process)."""
    key = _lr_key(dataset, classes, scaling)
    if key in _lr_table():
        return float(_lr_table()[key])
    from .classification_baselines import tune_logreg_lr

    cfg = tuning_config(dataset, classes, scaling)
    ep = sample(np.random.default_rng([TUNE_SEED, 7]), cfg, TUNE_EPISODES, classes, 3 + N_KIND_FLAGS, TUNE_STEPS)
    return tune_logreg_lr(ep.xs, ep.ys, classes, seed=TUNE_SEED)


def tune_lr_table(entries, path: Path = LR_TABLE) -> dict:
    """Tune and write the shipped table for ``entries`` [(dataset, C, scaling)]."""
    table = dict(_lr_table())
    for dataset, classes, scaling in entries:
        key = _lr_key(dataset, classes, scaling)
        table.pop(key, None)
        _lr_table.cache_clear()
        logreg_lr.cache_clear()
        table[key] = logreg_lr(dataset, classes, scaling)
    doc = {"about": f"online logistic regression's lr, tuned by tasks.fewshot.tune_lr_table on {TUNE_EPISODES} "
                    f"training-split episodes of {TUNE_STEPS} steps (seed {TUNE_SEED}) over "
                    "classification_baselines.LOGREG_LR_GRID; key: dataset/C/scaling", "lr": dict(sorted(table.items()))}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    _lr_table.cache_clear()
    return doc


# ---- reports ----------------------------------------------------------------------------------


def online_accuracy(correct_by_step) -> dict[str, float]:
    """Mean accuracy over the first n predictions, n in ONLINE_AT (where the stream is that long)."""
    c = np.asarray(correct_by_step, np.float64)
    return {str(n): float(c[:n].mean()) for n in ONLINE_AT if n <= len(c)}


def paired_online(correct: np.ndarray, other: np.ndarray) -> dict[str, dict[str, float]]:
    """The online accuracy of ``correct`` minus that of ``other`` ([T, B], the same predictions) over the
    first n examples, n in ONLINE_AT: ``diff`` (mean over episodes) and ``sem`` (its standard error over
    the episodes' own differences)."""
    correct, other = np.asarray(correct, np.float64), np.asarray(other, np.float64)
    out = {}
    for n in ONLINE_AT:
        if n <= len(correct):
            d = correct[:n].mean(axis=0) - other[:n].mean(axis=0)
            out[str(n)] = {"diff": float(d.mean()),
                           "sem": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None}
    return out


def baseline_results(xs: np.ndarray, ys: np.ndarray, classes: int, *, lr: float | None, seed: int) -> list[dict]:
    """The classical baselines on the episodes ``xs`` [T, E, F], ``ys`` [T, E] (lr None: no
    logistic regression)."""
    from . import classification_baselines as cb

    out = [cb.chance(ys, classes, seed), cb.nearest_class_mean(xs, ys, classes, seed),
           cb.one_nearest_neighbour(xs, ys, classes, seed)]
    if lr is not None:
        out.append(cb.online_logistic_regression(xs, ys, classes, lr, seed))
    return out


# ---- the 10,000-step check -------------------------------------------------------------------------


def longrun_report(policy, *, task: FewShotConfig | None = None, steps: int = 10_000, episodes: int = 50,
                   seed: int = 0, change_every: tuple[int, int] = (50, 150), dims: int | None = None,
                   experts: int | None = None, checkpoints=(20, 100, 1000, 10_000), window: int = 20,
                   after: int = 40, full: bool = True) -> dict:
    """An endless stream whose classes (and their labels) change every U[a, b] steps; the agent is
    never reset nor told. Reports the accuracy over the ``window`` steps before each checkpoint,
    the accuracy just before each change, and the accuracy by steps since a change (``after``
    steps) next to the same agent reset at each change and nearest class mean restarted at each
    change (both measured on fresh episodes of the same problems, seed + 1). ``continual``: the
    accuracy at the last checkpoint is at least 0.9 x that at step 100, and the mean accuracy over
    the ``after`` steps after a change at least 0.9 x the reset agent's. ``dims``: the classes C;
    without ``full``, ``after_change`` keeps only its means."""
    from ..evaluation import run_episodes
    from ..longrun import long_rollout
    from . import classification_baselines as cb

    base = task if task is not None else FewShotTask.evaluation_config(policy.task)
    tk = FewShotTask(dataclasses.replace(base, change_every=tuple(change_every)).validate())
    C = dims or tk.default_dims()
    n = experts or tk.default_experts()
    run = long_rollout(policy, steps=steps, episodes=episodes, seed=seed, dims=C, experts=n, task=tk.cfg,
                       chunk_steps=min(500, steps))
    correct, jumps, hmax = run.metrics["correct"], run.jumps, run.max_abs_state
    T, E = correct.shape
    at = {str(s): float(correct[max(0, s - window):s].mean()) for s in checkpoints if s <= T}
    before, sums, counts = [], np.zeros(after), np.zeros(after)
    for e in range(E):
        js = list(np.flatnonzero(jumps[:, e]))
        for j, end in zip(js, js[1:] + [T]):
            before.append(correct[max(0, j - window):j, e].mean())
            seg = correct[j:min(end, j + after), e]
            sums[:len(seg)] += seg
            counts[:len(seg)] += 1
    never_reset = (sums / np.maximum(counts, 1)).tolist()
    fresh_task = dataclasses.replace(tk.cfg, change_every=(0, 0), baselines="none")
    from ..engine import numpy_ops

    # the reset agent's ``after`` steps may pass an episodic card's horizon: a probe, as the long run itself
    res = run_episodes(numpy_ops(), policy, policy.agent, fresh_task, dims=C, experts=n, episodes=4 * episodes,
                       seed=seed + 1, steps=after, past_horizon=True)
    reset = res.metrics["correct"].mean(axis=1).tolist()
    xs = np.concatenate([ep.xs for ep in res.episodes], axis=1)
    ys = np.concatenate([ep.ys for ep in res.episodes], axis=1)
    ncm = cb.nearest_class_mean(xs, ys, C, seed)["accuracy_by_step"]
    checks = sorted(int(k) for k in at)
    stays = at[str(checks[-1])] >= 0.9 * at["100"] if "100" in at and checks[-1] > 100 else None
    readapts = float(np.mean(never_reset)) >= 0.9 * float(np.mean(reset)) if counts[0] else None
    report = {
        "policy": policy.name, "task": dataclasses.asdict(tk.cfg) | {"dims": C, "experts": n}, "steps": T,
        "episodes": E, "seed": seed, "change_every": list(change_every), "changes": int(jumps.sum()),
        "accuracy_at": at, "window": window, "chance": 1.0 / C,
        "accuracy_before_change": float(np.mean(before)) if before else None,
        "after_change": {"steps": after, "agent_never_reset": never_reset, "agent_reset_at_changes": reset,
                         "nearest_class_mean_restarted": ncm,
                         "mean": {"agent_never_reset": float(np.mean(never_reset)),
                                  "agent_reset_at_changes": float(np.mean(reset)),
                                  "nearest_class_mean_restarted": float(np.mean(ncm))}},
        "max_abs_state": hmax, "finite": bool(np.isfinite(correct).all()),
        "stays_up": stays, "readapts": readapts, "continual": bool(stays and readapts),
    }
    if not full:
        report["after_change"] = {k: v for k, v in report["after_change"].items() if k in ("steps", "mean")}
    return report


#: Streams of the 10,000-step check (``continual_check``, and the card's), as tests/test_longrun.py's check of a
#: continual card (4 streams, the default until session 32: 80 predictions a window).
CONTINUAL_STREAMS = 10


class FewShotTask(Task):
    """Online few-shot classification as a registered task (see the module doc)."""

    name = "fewshot"
    config_class = FewShotConfig
    size_name = "classes"
    loss_name = "loss"

    @classmethod
    def evaluation_config(cls, cfg: FewShotConfig) -> FewShotConfig:
        """Held-out digit classes (all their examples), no augmentation, stationary, i.i.d. labels; the
        features scaled as trained when that was 'online' or 'none' (a policy trained on features
        standardised within the episode is run on them), else 'auto'."""
        scaling = cfg.scaling if cfg.scaling in ("online", "none") else "auto"
        return dataclasses.replace(cfg, classes_pool="heldout", split="all", scaling=scaling, shots=0,
                                   change_every=(0, 0), transforms=False, project_prob=0.0)

    def default_dims(self) -> int:
        return min(self.cfg.dims[1], len(task_source(self.cfg).pool))

    def default_experts(self) -> int:
        """C x F: one expert per (class, feature) cell of the default C (see ``interface``)."""
        return self.default_dims() * task_source(self.cfg).features

    def card_evaluations(self) -> list[tuple[int, int, int]]:
        """Held-out digits: all 4 classes, one expert per (class, feature) cell."""
        held = FewShotTask(self.evaluation_config(self.cfg))
        return [(held.default_dims(), held.default_experts(), self.cfg.steps)]

    def sample(self, rng: np.random.Generator, batch: int, *, dims: int, experts: int, steps: int,
               addr_dim: int) -> Episode:
        return sample(rng, self.cfg, batch, dims, addr_dim, steps)

    def extend(self, rng: np.random.Generator, episode: Episode, steps: int) -> Episode:
        return extend(rng, self.cfg, episode, steps)

    @staticmethod
    def longrun_report(policy, **kw) -> dict:
        return longrun_report(policy, **kw)

    def continual_check(self, policy, *, episodes: int = CONTINUAL_STREAMS, seed: int = 0) -> dict:
        """The 10,000-step check: wine (never seen in training), 3 classes drawn afresh every
        U[50, 150] steps, never reset (``longrun_report``; its ``continual``)."""
        long = dataclasses.replace(self.evaluation_config(self.cfg), dataset="wine").validate()
        return longrun_report(policy, task=long, steps=10_000, episodes=episodes, seed=seed, change_every=(50, 150))

    def card_extras(self, policy, onnx: str, *, episodes: int, seed: int) -> dict:
        """The card's ``evaluation_datasets`` (never-seen datasets: online accuracy over the first
        10 / 25 / 50 examples, with the baselines), ``continual`` (the 10,000-step check on wine,
        3 classes drawn afresh every U[50, 150] steps, 10 streams) and ``lifetime`` from it: {"kind": "continual",
        "horizon": None} if the check passes, else {"kind": "episodic", "horizon": the task's steps}."""
        from ..engine import numpy_ops
        from ..evaluation import evaluate

        rows = []
        base = self.evaluation_config(self.cfg)
        for ds in ("iris", "wine", "breast_cancer"):
            t = dataclasses.replace(base, dataset=ds, steps=50).validate()
            tk = FewShotTask(t)
            C, n = tk.default_dims(), tk.default_experts()
            # 50 steps: past the task's episode length, which is the card's horizon until the continual
            # check below decides the lifetime (a policy exported afresh is episodic until then)
            r = evaluate(numpy_ops(), policy, policy.agent, t, dims=C, experts=n, episodes=episodes, seed=seed,
                         past_horizon=True)
            rows.append({"command": f"badger eval --policy {onnx} --task fewshot --dataset {ds} --classes {C} "
                                    f"--experts {n} --steps 50 --episodes {episodes} --seed {seed} --json",
                         "dataset": ds, "classes": C, "experts": n, "online_accuracy": r["online_accuracy"],
                         "baselines_online": r["baselines_online"], "logreg_lr": r.get("logreg_lr")})
        streams = CONTINUAL_STREAMS
        lr = self.continual_check(policy, episodes=streams, seed=seed)
        keep = ("accuracy_at", "accuracy_before_change", "changes", "max_abs_state", "stays_up", "readapts")
        at, mean = lr["accuracy_at"], lr["after_change"]["mean"]
        evidence = (f"10,000 steps on wine, classes changing every U[50, 150] steps, never reset ({lr['changes']} "
                    f"changes, {lr['episodes']} streams, seed {seed}): accuracy {at.get('100', float('nan')):.3f} / "
                    f"{at.get('10000', float('nan')):.3f} over the 20 steps before step 100 / 10,000; over the 40 "
                    f"steps after a change {mean['agent_never_reset']:.3f} never reset vs "
                    f"{mean['agent_reset_at_changes']:.3f} reset at the change")
        lifetime = ({"kind": "continual", "horizon": None, "why": "passes the 10,000-step check: " + evidence}
                    if lr["continual"] else
                    {"kind": "episodic", "horizon": int(self.cfg.steps),
                     "why": "fails the 10,000-step check (reset it for each new problem): " + evidence})
        return {"lifetime": lifetime, "evaluation_datasets": rows,
                "continual": {"passes_10000_steps": lr["continual"],
                              "summary": "continual: re-adapts after class changes and stays up for 10,000 steps"
                                         if lr["continual"] else "episodic: reset it for each new problem",
                              "command": f"badger longrun --policy {onnx} --task fewshot --dataset wine --steps 10000 "
                                         f"--episodes {streams} --seed {seed} --jump-every 50 150 --json",
                              "after_change_mean": lr["after_change"]["mean"]} | {k: lr[k] for k in keep}}

    def report(self, metrics: dict[str, np.ndarray], episodes: list[Episode], *, steps: int, seed: int,
               baselines: bool = True) -> dict:
        """``accuracy_by_step`` (the prediction made before each label is given, mean over episodes),
        ``final_accuracy``, ``online_accuracy`` (first 10/25/50 examples), ``accuracy_by_shot``
        (by how many examples of the class came before, 0..10), ``loss_by_step``; and the
        ``baselines`` {name: accuracy_by_step} on exactly the same episodes (with their
        ``baselines_by_shot`` and ``baselines_online``, and ``paired_by_shot`` {name: {"diff",
        "sem"}}: the agent's accuracy minus the baseline's by shot count, paired over the same
        predictions, with its standard error over episodes; ``paired_online`` {name: {n: {"diff",
        "sem"}}} the same for the online accuracy over the first n examples)."""
        from . import classification_baselines as cb

        correct, loss = metrics["correct"], metrics["loss"]
        ys = np.concatenate([ep.ys for ep in episodes], axis=1)
        C = episodes[0].classes
        acc = correct.mean(axis=1)
        report = {"dataset": self.cfg.dataset, "classes": C, "features": int(episodes[0].xs.shape[-1]),
                  "scaling": episodes[0].state.scaling if episodes[0].state else self.cfg.scaling,
                  "accuracy_by_step": acc.tolist(), "final_accuracy": float(acc[-1]),
                  "final_accuracy_sem": float(correct[-1].std() / np.sqrt(correct.shape[1])),
                  "mean_accuracy": float(acc.mean()), "online_accuracy": online_accuracy(acc),
                  "loss_by_step": loss.mean(axis=1).tolist()}
        stationary = not self.cfg.change_every[1]
        if stationary:
            report["accuracy_by_shot"] = cb.accuracy_by_shot(correct > 0.5, ys, MAX_SHOT)
        which = self.cfg.baselines if baselines else "none"
        if which != "none" and stationary:
            xs = np.concatenate([ep.xs for ep in episodes], axis=1)
            lr = None
            if which == "all":
                lr = logreg_lr(self.cfg.dataset, C, report["scaling"])
                report["logreg_lr"] = lr
            res = baseline_results(xs, ys, C, lr=lr, seed=seed)
            report["baselines"] = {r["name"]: r["accuracy_by_step"] for r in res}
            report["baselines_by_shot"] = {r["name"]: cb.accuracy_by_shot(r["correct"], ys, MAX_SHOT) for r in res}
            report["paired_by_shot"] = {r["name"]: cb.paired_by_shot(correct > 0.5, r["correct"], ys, MAX_SHOT)
                                        for r in res if r["name"] != "chance"}
            report["baselines_online"] = {r["name"]: online_accuracy(r["accuracy_by_step"]) for r in res}
            report["paired_online"] = {r["name"]: paired_online(correct > 0.5, r["correct"])
                                       for r in res if r["name"] != "chance"}
        return report


__all__ = ["FewShotConfig", "FewShotTask", "Episode", "Source", "StreamState", "baseline_results", "draw_stream",
           "extend", "features_of", "interface", "logreg_lr", "longrun_report", "online_accuracy", "paired_online",
           "sample", "source", "tune_lr_table"]

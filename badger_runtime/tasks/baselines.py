"""Classical baselines for the guessing game (numpy only, no torch).

Each of B episodes has a target ``t`` in U[-1, 1]^d (``targets``: [B, d]). An
optimizer makes T guesses g_0 .. g_{T-1}; the error of a guess is

    err(g) = 3 * mean_i (g_i - t_i)^2

so guessing all zeros scores 1.0 on average ("chance"). Before guess g_t the
optimizer has seen the feedback on g_0 .. g_{t-1}:

- ``scalar``: err(g) only (black-box, derivative-free) -> :func:`nelder_mead`;
- ``per_dim`` / ``one_expert``: the signed vector g - t (proportional to the
  gradient of err) -> :func:`adam`.

As for the agent, the first guess g_0 is the zero vector.

Every baseline returns ``mse_by_step``: a float64 array of shape [T] whose entry
t is the mean over episodes of err(g_t), the error of the guess actually made
at step t (never a "best so far" curve). :func:`tuned` picks the optimizer's
hyper-parameter on a separate set of tuning episodes (by the area under the
curve, i.e. the mean of ``mse_by_step``) and reports it on ``targets``.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

__all__ = [
    "ADAM_LR_GRID",
    "NM_SCALE_GRID",
    "TUNE_EPISODES",
    "adam",
    "errors",
    "mean_solution",
    "nelder_mead",
    "random_guess",
    "steps_to_reach",
    "tuned",
    "zero_guess",
]

#: Log grid of Adam learning rates searched by :func:`tuned` (1e-3 .. 3).
ADAM_LR_GRID: tuple[float, ...] = tuple(float(x) for x in np.geomspace(1e-3, 3.0, 24))
#: Grid of Nelder-Mead initial-simplex scales searched by :func:`tuned` (0.05 .. 2).
NM_SCALE_GRID: tuple[float, ...] = tuple(float(x) for x in np.geomspace(0.05, 2.0, 17))
#: Number of tuning episodes :func:`tuned` draws when none are given.
TUNE_EPISODES = 256

# Standard Nelder-Mead coefficients.
_REFLECT, _EXPAND, _CONTRACT, _SHRINK = 1.0, 2.0, 0.5, 0.5


def _as_targets(targets) -> np.ndarray:
    tg = np.asarray(targets, dtype=np.float64)
    if tg.ndim != 2:
        raise ValueError(f"targets must have shape [B, d], got {tg.shape}")
    return tg


def _check_steps(steps: int) -> int:
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return steps


def errors(guess, targets) -> np.ndarray:
    """Per-episode error 3 * mean_i (guess_i - target_i)^2 of guesses [B, d]: [B]."""
    diff = np.asarray(guess, dtype=np.float64) - np.asarray(targets, dtype=np.float64)
    return 3.0 * np.mean(diff * diff, axis=-1)


def zero_guess(targets, steps: int) -> np.ndarray:
    """Always guess 0: "chance", about 1.0 at every step ([T])."""
    tg = _as_targets(targets)
    steps = _check_steps(steps)
    return np.full(steps, errors(np.zeros_like(tg), tg).mean())


def random_guess(targets, steps: int, rng=None) -> np.ndarray:
    """Each step an independent uniform guess in [-1, 1]^d: about 2.0 per step ([T]).

    ``rng`` is a ``np.random.Generator`` or a seed for ``np.random.default_rng``.
    """
    tg = _as_targets(targets)
    steps = _check_steps(steps)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    out = np.empty(steps)
    for t in range(steps):
        out[t] = errors(rng.uniform(-1.0, 1.0, size=tg.shape), tg).mean()
    return out


def mean_solution(targets, steps: int) -> np.ndarray:
    """Every output set to its episode's own target mean (the paper's dashed line).

    The expected error is exactly (1 - 1/d) x chance, and 0 for d = 1. Constant
    over steps ([T]).
    """
    tg = _as_targets(targets)
    steps = _check_steps(steps)
    guess = np.broadcast_to(tg.mean(axis=-1, keepdims=True), tg.shape)
    return np.full(steps, errors(guess, tg).mean())


def adam(
    targets,
    steps: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> np.ndarray:
    """Adam on the per-dimension feedback g - t used as the gradient ([T]).

    Starts at g_0 = 0; the feedback on g_t is used to choose g_{t+1} (one guess,
    one Adam update per step), vectorised over the batch.
    """
    tg = _as_targets(targets)
    steps = _check_steps(steps)
    b1, b2 = betas
    g = np.zeros_like(tg)
    m = np.zeros_like(tg)
    v = np.zeros_like(tg)
    out = np.empty(steps)
    for t in range(steps):
        out[t] = errors(g, tg).mean()
        grad = g - tg
        m = b1 * m + (1.0 - b1) * grad
        v = b2 * v + (1.0 - b2) * grad * grad
        k = t + 1
        m_hat = m / (1.0 - b1**k)
        v_hat = v / (1.0 - b2**k)
        g = g - lr * m_hat / (np.sqrt(v_hat) + eps)
    return out


def _nm_points(d: int, scale: float) -> Iterator[np.ndarray]:
    """Nelder-Mead as a generator: yields points to evaluate, receives their values.

    Initial simplex 0, scale * e_1, ..., scale * e_d; coefficients reflection 1,
    expansion 2, contraction 0.5, shrink 0.5. Every yielded point is one
    function evaluation; the generator never stops on its own.
    """
    simplex = np.zeros((d + 1, d))
    simplex[1:] = scale * np.eye(d)
    fvals = np.empty(d + 1)
    for i in range(d + 1):
        fvals[i] = yield simplex[i].copy()
    while True:
        order = np.argsort(fvals, kind="stable")
        simplex, fvals = simplex[order], fvals[order]
        best, second_worst, worst = fvals[0], fvals[-2], fvals[-1]
        centroid = simplex[:-1].mean(axis=0)
        xr = centroid + _REFLECT * (centroid - simplex[-1])
        fr = yield xr.copy()
        if fr < best:
            xe = centroid + _EXPAND * (xr - centroid)
            fe = yield xe.copy()
            if fe < fr:
                simplex[-1], fvals[-1] = xe, fe
            else:
                simplex[-1], fvals[-1] = xr, fr
            continue
        if fr < second_worst:
            simplex[-1], fvals[-1] = xr, fr
            continue
        if fr < worst:  # outside contraction
            xc = centroid + _CONTRACT * (xr - centroid)
            fc = yield xc.copy()
            if fc <= fr:
                simplex[-1], fvals[-1] = xc, fc
                continue
        else:  # inside contraction
            xc = centroid + _CONTRACT * (simplex[-1] - centroid)
            fc = yield xc.copy()
            if fc < worst:
                simplex[-1], fvals[-1] = xc, fc
                continue
        # shrink towards the best vertex; each new vertex is one evaluation
        for i in range(1, d + 1):
            simplex[i] = simplex[0] + _SHRINK * (simplex[i] - simplex[0])
            fvals[i] = yield simplex[i].copy()


def nelder_mead(targets, steps: int, scale: float) -> np.ndarray:
    """Nelder-Mead on the scalar feedback err(g), one evaluation per step ([T]).

    The initial simplex is 0 and scale * e_i (so g_0 = 0); entry t of the result
    is the mean error of the point evaluated at step t (the actual guess, not the
    best so far). Runs one generator per episode, all advanced in lock-step.
    """
    tg = _as_targets(targets)
    steps = _check_steps(steps)
    B, d = tg.shape
    gens = [_nm_points(d, float(scale)) for _ in range(B)]
    guesses = np.stack([next(g) for g in gens]) if B else np.zeros((0, d))
    out = np.empty(steps)
    for t in range(steps):
        f = errors(guesses, tg)
        out[t] = f.mean() if B else np.nan
        if t + 1 < steps:
            guesses = np.stack([gen.send(float(fi)) for gen, fi in zip(gens, f)])
    for gen in gens:
        gen.close()
    return out


def _default_tune_targets(d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 12345)
    return rng.uniform(-1.0, 1.0, size=(TUNE_EPISODES, d)).astype(np.float32)


def tuned(kind: str, targets, steps: int = 20, seed: int = 0, tune_targets=None, grid=None) -> dict:
    """Tune the baseline for feedback ``kind`` on separate episodes, report it on ``targets``.

    ``kind`` ``"scalar"`` -> Nelder-Mead (``scale`` over :data:`NM_SCALE_GRID`);
    ``"per_dim"`` / ``"one_expert"`` -> Adam (``lr`` over :data:`ADAM_LR_GRID`).
    ``grid`` overrides the searched values. The value minimising the mean over
    steps of ``mse_by_step`` on ``tune_targets`` (default: 256 episodes of the
    same d from ``np.random.default_rng(seed + 12345)``) wins; ties go to the
    first grid value. Returns ``{"name", "param", "mse_by_step", "final_mse"}``
    with ``mse_by_step`` a list of floats measured on ``targets``.
    """
    tg = _as_targets(targets)
    steps = _check_steps(steps)
    if kind == "scalar":
        name, key, fn = "nelder_mead", "scale", nelder_mead
        values = NM_SCALE_GRID if grid is None else tuple(grid)
    elif kind in ("per_dim", "one_expert"):
        name, key, fn = "adam", "lr", adam
        values = ADAM_LR_GRID if grid is None else tuple(grid)
    else:
        raise ValueError(f"unknown feedback kind {kind!r}")
    if not values:
        raise ValueError("empty hyper-parameter grid")
    tune = _default_tune_targets(tg.shape[1], seed) if tune_targets is None else _as_targets(tune_targets)
    if tune.shape[1] != tg.shape[1]:
        raise ValueError(f"tune_targets have d={tune.shape[1]}, targets d={tg.shape[1]}")
    scores = [float(np.mean(fn(tune, steps, v))) for v in values]
    best = float(values[int(np.argmin(scores))])
    curve = fn(tg, steps, best)
    return {
        "name": name,
        "param": {key: best},
        "mse_by_step": [float(x) for x in curve],
        "final_mse": float(curve[-1]),
    }


def steps_to_reach(mse_by_step, threshold: float) -> int | None:
    """First step index t (0-based) with mse_by_step[t] < threshold, or None."""
    hits = np.flatnonzero(np.asarray(mse_by_step, dtype=np.float64) < threshold)
    return int(hits[0]) if hits.size else None

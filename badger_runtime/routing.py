"""The router: who hears whom in a communication round, and with what weight.

Topologies are masks ``[B, N_receivers, N_senders]`` (True = may hear), built in
numpy when an episode starts. Weighting is either learned attention between the
receiver's query and the senders' keys (dense, top-k, hardwired, random) or a
uniform average (homogeneous). ``route`` is written once against ``xp`` ops and
runs in numpy (deploy) and torch (training).
"""

from __future__ import annotations

import numpy as np

from .config import ConfigError, RoutingConfig
from .xp import NEG, scaled_dot, softmax

# Dense attention materialises [B, N, N] scores; refuse sizes that cannot fit.
MAX_DENSE_ENTRIES = 2**28  # 268M float32 scores ~ 1 GiB


def roles(cfg: RoutingConfig, n: int) -> np.ndarray:
    """Layer of each expert for the hardwired topology: 0 input, 1 hidden, 2 output.

    Other topologies have no layers: every expert senses, talks and pushes (role 1).
    """
    r = np.ones(n, dtype=np.int8)
    if cfg.kind != "hardwired" or n < 3:
        return r
    n_io = max(1, n // 3)
    r[:n_io] = 0
    r[n - n_io :] = 2
    return r


def membrane_masks(cfg: RoutingConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(can_sense [N], can_push [N]): in the hardwired topology only input experts sense
    and only output experts push; elsewhere every expert does both."""
    r = roles(cfg, n)
    if cfg.kind != "hardwired" or n < 3:
        return np.ones(n, bool), np.ones(n, bool)
    return r == 0, r == 2


def topology(cfg: RoutingConfig, n: int, batch: int, rng: np.random.Generator | None = None) -> np.ndarray | None:
    """The mask of allowed (receiver, sender) pairs, or None for 'everyone hears everyone'."""
    if cfg.kind in ("dense", "topk") and n * n * batch > MAX_DENSE_ENTRIES:
        raise ConfigError(
            f"{cfg.kind} routing scores every pair of experts: batch {batch} x {n}^2 = {batch * n * n:,} "
            f"scores exceeds the limit of {MAX_DENSE_ENTRIES:,}; use fewer experts or a smaller batch"
        )
    eye = np.eye(n, dtype=bool)
    if cfg.kind in ("dense", "topk", "homogeneous"):
        if cfg.self_loops:
            return None
        if n == 1:  # a lone expert hears itself rather than no one
            return None
        return np.broadcast_to(~eye, (batch, n, n)).copy()
    if cfg.kind == "hardwired":
        r = roles(cfg, n)
        recv, send = r[:, None], r[None, :]
        allowed = (send == recv - 1) | ((recv == 1) & (send == 1))
        if n < 3:
            allowed = np.ones((n, n), bool)
        if cfg.self_loops:
            allowed |= eye
        else:
            allowed &= ~eye if n > 1 else allowed
        return np.broadcast_to(allowed, (batch, n, n)).copy()
    if cfg.kind == "random":
        if rng is None:
            raise ConfigError("random routing needs a random generator to draw its graph")
        m = np.zeros((batch, n, n), dtype=bool)
        others = n - 1
        deg = min(cfg.degree, others)
        if deg > 0:
            # for each receiver pick `deg` distinct senders other than itself
            keys = rng.random((batch, n, n))
            keys[:, eye] = np.inf
            picks = np.argsort(keys, axis=-1)[..., :deg]
            np.put_along_axis(m, picks, True, axis=-1)
        if cfg.self_loops or n == 1:
            m |= eye
        return m
    raise ConfigError(f"unknown routing kind {cfg.kind!r}")


def route(ops, cfg: RoutingConfig, query, key, value, mask=None):
    """Deliver messages: inbox[b, r] = sum_s w[b, r, s] * value[b, s].

    query, key: [B, N, Dk]; value: [B, N, Dm]; mask: [B, N, N] bool or None.
    Returns (inbox [B, N, Dm], weights [B, N, N]).
    """
    n = value.shape[-2]
    if cfg.kind == "homogeneous":
        if mask is None:
            w = ops.zeros((value.shape[0], n, n)) + (1.0 / n)
        else:
            m = ops.float_(mask)
            w = m / ops.sum(m, axis=-1, keepdims=True)
        return ops.matmul(w, value), w
    scores = scaled_dot(ops, query, key)
    if cfg.kind == "topk" and cfg.k < n:
        masked = scores if mask is None else ops.where(mask, scores, NEG)
        kth = ops.kth_largest(ops.detach(masked), cfg.k, axis=-1)
        keep = masked >= kth
        mask = keep if mask is None else (keep & mask)
    w = softmax(ops, scores, mask, axis=-1)
    return ops.matmul(w, value), w

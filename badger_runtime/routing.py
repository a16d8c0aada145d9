"""The router: who hears whom in a communication round, and with what weight.

Topologies are masks ``[B, N_receivers, N_senders]`` (True = may hear), built in
numpy when an episode starts. Weighting is either learned attention between the
receiver's query and the senders' keys (dense, top-k, hardwired, random) or a
uniform average (homogeneous). ``route`` is written once against ``xp`` ops and
runs in numpy (deploy) and torch (training). ``route_listed_compiled`` computes the
sparse top-k case in one compiled loop (``routing_kernel.c``) for the sharded runtime.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import native
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


@dataclass
class Neighbors:
    """A sparse topology: receiver m of episode b may hear senders idx[b, m, :] (and only them)."""

    idx: np.ndarray  # [B, N, C] int64

    @property
    def shape(self):
        return self.idx.shape


# Random graphs up to this size draw distinct senders from a full permutation (O(N^2) keys);
# larger ones (with C <= N/4) draw in O(N C) and redraw repeated senders until every list is
# distinct.
EXACT_DRAW_MAX_N = 2048


def _draw_senders(rng: np.random.Generator, batch: int, n: int, c: int) -> np.ndarray:
    """c distinct senders per receiver, never the receiver itself, ascending: [B, N, c]."""
    if n <= EXACT_DRAW_MAX_N or c > n // 4:  # (redrawing a dense list would take long)
        keys = rng.random((batch, n, n))
        keys[:, np.arange(n), np.arange(n)] = np.inf
        return np.sort(np.argsort(keys, axis=-1)[..., :c], axis=-1)
    own = np.arange(n)[None, :, None]
    draw = rng.integers(0, n - 1, size=(batch, n, c))
    draw = np.sort(draw + (draw >= own), axis=-1)  # skip the receiver's own index
    while True:
        dup = np.zeros(draw.shape, bool)
        dup[..., 1:] = draw[..., 1:] == draw[..., :-1]
        if not dup.any():
            return draw
        new = rng.integers(0, n - 1, size=int(dup.sum()))
        b, m, _ = np.nonzero(dup)
        draw[dup] = new + (new >= m)
        draw.sort(axis=-1)


def _neighbors(cfg: RoutingConfig, rng, batch: int, n: int, c: int) -> Neighbors:
    c = min(c, n - 1)
    idx = _draw_senders(rng, batch, n, c) if c > 0 else np.zeros((batch, n, 0), np.int64)
    if cfg.self_loops or c == 0:
        own = np.broadcast_to(np.arange(n)[None, :, None], (batch, n, 1))
        idx = np.concatenate([own, idx], axis=-1)
    return Neighbors(idx.astype(np.int64))


def is_sparse(cfg: RoutingConfig, n: int) -> bool:
    """Whether each of ``n`` receivers scores a list of senders (a random graph, top-k over C < n candidates)
    rather than every expert."""
    return cfg.kind == "random" or (cfg.kind == "topk" and 0 < cfg.candidates < n)


def check_size(cfg: RoutingConfig, n: int, batch: int):
    """ConfigError where routing that scores every pair of experts (no sparse lists) would not fit: ``batch`` x
    ``n``^2 scores above ``MAX_DENSE_ENTRIES``. ``topology`` checks it; a runtime about to grow checks it first."""
    if not is_sparse(cfg, n) and n * n * batch > MAX_DENSE_ENTRIES:
        raise ConfigError(
            f"{cfg.kind} routing scores every pair of experts: batch {batch} x {n}^2 = {batch * n * n:,} "
            f"scores exceeds the limit of {MAX_DENSE_ENTRIES:,}; use top-k routing with candidates "
            f"(routing.candidates = C scores C senders per receiver), fewer experts or a smaller batch"
        )


def topology(cfg: RoutingConfig, n: int, batch: int, rng: np.random.Generator | None = None):
    """Who may hear whom: None (everyone hears everyone), a bool mask [B, N, N], or Neighbors."""
    if is_sparse(cfg, n):
        if rng is None:
            raise ConfigError(f"{cfg.kind} routing needs a random generator to draw its graph")
        return _neighbors(cfg, rng, batch, n, cfg.degree if cfg.kind == "random" else cfg.candidates)
    check_size(cfg, n, batch)
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
    raise ConfigError(f"unknown routing kind {cfg.kind!r}")


def route(ops, cfg: RoutingConfig, query, key, value, mask=None):
    """Deliver messages: inbox[b, r] = sum_s w[b, r, s] * value[b, s].

    query, key: [B, N, Dk]; value: [B, N, Dm]; mask: [B, N, N] bool or None.
    Returns (inbox [B, N, Dm], weights [B, N, N]); with a ``Neighbors`` topology the
    weights are [B, N, C] over each receiver's listed senders.
    """
    inbox, w = _route(ops, cfg, query, key, value, mask)
    if cfg.ablation == "cut":  # evaluation ablation: nothing arrives
        inbox = inbox * 0.0
    elif cfg.ablation == "shuffle":  # evaluation ablation: each expert gets the next expert's inbox
        inbox = ops.concat([inbox[..., 1:, :], inbox[..., :1, :]], axis=-2)
    return inbox, w


def _route(ops, cfg: RoutingConfig, query, key, value, mask):
    if isinstance(mask, Neighbors):
        return _route_sparse(ops, cfg, query, key, value, mask.idx)
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


def _route_sparse(ops, cfg: RoutingConfig, query, key, value, idx):
    """Routing over listed senders: the same attention, O(N C) instead of O(N^2).

    Top-k scores the C listed senders with their keys, then gathers the values of the
    k kept ones only. Returned weights are over the kept senders ([B, N, k]) for top-k,
    over all listed senders ([B, N, C]) otherwise.
    """
    c = idx.shape[-1]
    if cfg.kind == "homogeneous":
        w = ops.zeros(idx.shape) + (1.0 / c)
    else:
        scores = ops.gather_dot(key, idx, query) * (1.0 / math.sqrt(query.shape[-1]))  # [B, N, C]
        if cfg.kind == "topk" and cfg.k < c:
            pos = ops.topk_indices(ops.detach(scores), cfg.k, axis=-1)
            scores = ops.take_along(scores, pos, axis=-1)
            idx = np.take_along_axis(idx, ops.to_numpy(pos), axis=-1)
        w = softmax(ops, scores, None, axis=-1)
    return ops.gather_mix(value, idx, w), w  # [B, N, Dm]


def in_degrees(topo, n: int, batch: int) -> np.ndarray:
    """Messages each receiver hears per round, [B, N]: the topology's in-degrees (N for everyone
    hears everyone; the listed senders for sender lists)."""
    if topo is None:
        return np.full((batch, n), n, np.int64)
    if isinstance(topo, Neighbors):
        return np.full((batch, n), topo.idx.shape[-1], np.int64)
    return np.asarray(topo, bool).sum(axis=-1).astype(np.int64)


# -- the compiled sparse routing (routing_kernel.c) -----------------------------------------------
_KERNEL = None  # the ctypes library; False once it could not be built; None before the first try
_KERNEL_SOURCE = Path(__file__).with_name("routing_kernel.c")
_L, _P = ctypes.c_long, ctypes.c_void_p
_KERNEL_SIGNATURES = {"route_topk": ([_L] * 7 + [_P, _L, _L, _P, _P, _P, _L, _L, _P, _L, _L], _L)}
_KERNEL_MAX = 1024  # listed senders per receiver and message width the kernel takes


def route_kernel():
    """The compiled routing library, or None (no C compiler, a failed build, ``BADGER_KERNELS=0``)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = native.load(_KERNEL_SOURCE, _KERNEL_SIGNATURES, "the routing kernel",
                              "routing runs in numpy") or False
    return _KERNEL or None


def _rows(a: np.ndarray, itemsize: int):
    """(batch stride, row stride) in elements where the last axis is contiguous, else None."""
    if a.strides[-1] != itemsize or any(st % itemsize for st in a.strides):
        return None
    return a.strides[0] // itemsize, a.strides[1] // itemsize


def kernel_routes(cfg: RoutingConfig) -> bool:
    """Whether the compiled kernel computes this routing over listed senders: attention (not the
    homogeneous average) and no evaluation ablation."""
    return cfg.kind != "homogeneous" and cfg.ablation == "none"


def route_listed_compiled(cfg: RoutingConfig, query, key, value, idx, out: np.ndarray) -> bool:
    """``route``'s inbox over listed senders (a ``Neighbors`` topology), computed by the compiled
    kernel into ``out`` [B, M, Dm]; True when it ran. False (nothing written) where it does not
    apply: no kernel, a routing kind other than attention over the listed senders, an ablation,
    float64, more than 1,024 senders listed or message entries, or arrays it cannot address.

    The same math as the numpy path to float rounding (tests/test_routing_kernel.py): the scores'
    sums run in another order, so a near-tie at the k-th score may keep another sender. Listed
    senders outside [0, N) raise IndexError and leave ``out`` partly written."""
    lib = route_kernel()
    if lib is None or not kernel_routes(cfg):
        return False
    B, M, C = idx.shape
    N, Dk, Dm = key.shape[1], key.shape[2], value.shape[2]
    arrays = (query, key, value, out)
    if (C > _KERNEL_MAX or Dm > _KERNEL_MAX or C < 1 or idx.dtype != np.int64
            or any(not isinstance(a, np.ndarray) or a.dtype != np.float32 for a in arrays)
            or not (key.flags.c_contiguous and value.flags.c_contiguous)
            or query.shape != (B, M, Dk) or key.shape[0] != B or value.shape[:2] != (B, N) or out.shape != (B, M, Dm)):
        return False
    q, ix, o = _rows(query, 4), _rows(idx, 8), _rows(out, 4)
    if q is None or ix is None or o is None:
        return False
    k = cfg.k if cfg.kind == "topk" and cfg.k < C else C
    bad = lib.route_topk(B, M, N, C, Dk, Dm, k, query.ctypes.data, *q, key.ctypes.data, value.ctypes.data,
                         idx.ctypes.data, *ix, out.ctypes.data, *o)
    if bad:
        raise IndexError(f"routing: a listed sender lies outside [0, {N})")
    return True

"""The few array operations the shared math needs, for numpy and for torch.

Router, agreement, membrane and the rollout are written once against this small
namespace, so the deploy engine (numpy + onnxruntime) and the training model
(torch, with autograd) run the same code. Only these primitives exist twice,
and the parity tests check the whole rollout, not each copy.

torch is never imported here: a torch tensor is recognised by its module name,
so ``import badger_runtime`` works where torch is not installed.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np

NEG = -1e9  # score given to masked-out attention entries (finite: no NaN when a row is all masked)
FUSED_SOFTMAX_MIN = 16  # TorchOps: torch's fused softmax over at least this many entries (its fast path)


#: NumpyOps.softmax reduces a last axis shorter than this slice by slice: numpy's reductions over a few
#: entries pay per row (at [10^5, 4, 4] float32: max 13.6 -> 0.7 ms, sum 5.5 -> 0.5 ms, session 41)
SMALL_AXIS = 8


def max_last(x):
    """``np.max(x, axis=-1, keepdims=True)`` as a chain of ``np.maximum`` over the last axis's slices (NaN
    propagates as in ``np.max``; the max of a set does not depend on the order)."""
    out = x[..., 0].copy()
    for j in range(1, x.shape[-1]):
        np.maximum(out, x[..., j], out=out)
    return out[..., None]


def sum_last(x):
    """``np.sum(x, axis=-1, keepdims=True)`` for a last axis of fewer than 8 entries, bit for bit: numpy's
    pairwise summation adds fewer than 8 numbers one after the other, from 0 (tests/test_engine.py)."""
    if x.shape[-1] >= 8:
        raise ValueError("sum_last: numpy sums 8 or more entries pairwise; use np.sum")
    out = x[..., 0] + x.dtype.type(0)  # numpy starts from 0: -0.0 sums to +0.0
    for j in range(1, x.shape[-1]):
        out += x[..., j]
    return out[..., None]


class NumpyOps:
    name = "numpy"

    def __init__(self, dtype=np.float32):
        self.dtype = dtype

    def asarray(self, x, like=None):
        return np.asarray(x, dtype=self.dtype)

    def asbool(self, x):
        return np.asarray(x, dtype=bool)

    def to_numpy(self, x):
        return np.asarray(x)

    def zeros(self, shape, like=None):
        return np.zeros(shape, dtype=self.dtype)

    def ones_bool(self, shape, like=None):
        return np.ones(shape, dtype=bool)

    def matmul(self, a, b):
        return np.matmul(a, b)

    def swap(self, a):  # swap the last two axes
        return np.swapaxes(a, -1, -2)

    def concat(self, xs, axis=-1):
        return np.concatenate(xs, axis=axis)

    def stack(self, xs, axis=0):
        return np.stack(xs, axis=axis)

    def matmul_parts(self, w, parts):
        """concat([w @ p for p in parts], -1) (one matmul per part)."""
        return np.concatenate([np.matmul(w, p) for p in parts], axis=-1)

    def split(self, x, sizes):
        """Views of consecutive pieces of ``sizes`` along the last axis."""
        out, i = [], 0
        for size in sizes:
            out.append(x[..., i:i + size])
            i += size
        return out

    def where(self, c, a, b):
        return np.where(c, a, b).astype(self.dtype, copy=False)

    def softmax(self, scores, mask=None, axis=-1):
        """``softmax_composed``'s arithmetic, in place in one new array (the composition allocates four or five
        of the scores' size): the same numbers bit for bit (tests/test_engine.py). Over a last axis of fewer
        than ``SMALL_AXIS`` entries (the membrane's reads of a few slots) the max and the sum go slice by
        slice (``max_last`` / ``sum_last``: numpy's own additions in its order, several times faster there)."""
        if 0 < scores.shape[axis] < SMALL_AXIS and axis in (-1, scores.ndim - 1):
            amax, total = max_last, sum_last
        else:
            amax, total = partial(np.max, axis=axis, keepdims=True), partial(np.sum, axis=axis, keepdims=True)
        if mask is None:
            e = np.exp(scores - amax(scores))
            e /= total(e)
            return e
        e = self.where(mask, scores, NEG)
        e -= amax(e)
        np.exp(e, out=e)
        np.copyto(e, 0.0, where=~np.asarray(mask, bool))  # where(mask, e, 0): NaNs outside the mask vanish too
        e /= total(e) + 1e-30
        return e

    def exp(self, x):
        return np.exp(x)

    def tanh(self, x):
        return np.tanh(x)

    def log(self, x):
        return np.log(x)

    def sigmoid(self, x):
        return 1.0 / (1.0 + np.exp(-x))

    def abs(self, x):
        return np.abs(x)

    def sum(self, x, axis=None, keepdims=False):
        return np.sum(x, axis=axis, keepdims=keepdims)

    def mean(self, x, axis=None, keepdims=False):
        return np.mean(x, axis=axis, keepdims=keepdims)

    def amax(self, x, axis=None, keepdims=False):
        return np.max(x, axis=axis, keepdims=keepdims)

    def any(self, x, axis=None, keepdims=False):
        return np.any(x, axis=axis, keepdims=keepdims)

    def all(self, x, axis=None):
        return np.all(x, axis=axis)

    def kth_largest(self, x, k, axis=-1):
        """The k-th largest value along ``axis`` (kept as a size-1 axis)."""
        n = x.shape[axis]
        part = np.partition(x, n - k, axis=axis)
        return np.take(part, [n - k], axis=axis)

    def item_any(self, x) -> bool:
        return bool(np.any(x))

    def gather_rows(self, x, idx):
        """x [B, N, D], idx [B, M, C] int -> x[b, idx[b, m, c]]: [B, M, C, D]."""
        B, N, D = x.shape
        flat = np.ascontiguousarray(x).reshape(B * N, D)
        if B > 1:
            idx = idx + (np.arange(B) * N)[:, None, None]
        return np.take(flat, idx, axis=0)

    def gather_dot(self, x, idx, q):
        """Scores of listed rows: x [B, N, D], idx [B, M, C], q [B, M, D] -> [B, M, C], the dot
        products x[b, idx[b, m, c]] . q[b, m]."""
        return np.matmul(self.gather_rows(x, idx), q[..., None])[..., 0]

    def gather_mix(self, x, idx, w):
        """Weighted sums of listed rows: x [B, N, D], idx [B, M, C], w [B, M, C] -> [B, M, D],
        sum over c of w[b, m, c] x[b, idx[b, m, c]]."""
        return np.matmul(w[..., None, :], self.gather_rows(x, idx))[..., 0, :]

    def topk_indices(self, x, k, axis=-1):
        """Positions of the k largest entries along the last axis (any order)."""
        return np.argpartition(-x, k - 1, axis=axis)[..., :k]

    def take_along(self, x, idx, axis=-1):
        return np.take_along_axis(x, idx, axis=axis)

    def float_(self, x):
        return x.astype(self.dtype, copy=False)

    def detach(self, x):
        return x


class TorchOps:
    name = "torch"

    def __init__(self, torch_module, dtype=None, device=None):
        self.torch = torch_module
        self.dtype = dtype or torch_module.float32
        self.device = device
        self._gather = _gather_function(torch_module)
        self._flat_cache: dict = {}  # id(numpy index) -> (index, B, N, flat torch index): sender lists repeat

    def asarray(self, x, like=None):
        t = self.torch
        if isinstance(x, t.Tensor):
            return x.to(self.dtype)
        # a copy: a tensor autograd saves for the backward pass must not alias a numpy array that the
        # caller may change later (a task that updates its slot addresses between steps)
        return t.tensor(np.asarray(x, dtype=np.float32), dtype=self.dtype, device=self.device)

    def asbool(self, x):
        t = self.torch
        if isinstance(x, t.Tensor):
            return x.bool()
        return t.as_tensor(np.asarray(x, dtype=bool), device=self.device)

    def to_numpy(self, x):
        return x.detach().cpu().numpy()

    def zeros(self, shape, like=None):
        return self.torch.zeros(shape, dtype=self.dtype, device=self.device)

    def ones_bool(self, shape, like=None):
        return self.torch.ones(shape, dtype=self.torch.bool, device=self.device)

    def matmul(self, a, b):
        return self.torch.matmul(a, b)

    def swap(self, a):
        return a.transpose(-1, -2)

    def concat(self, xs, axis=-1):
        return self.torch.cat(list(xs), dim=axis)

    def stack(self, xs, axis=0):
        return self.torch.stack(list(xs), dim=axis)

    def split(self, x, sizes):
        return self.torch.split(x, list(sizes), dim=-1)

    def softmax(self, scores, mask=None, axis=-1):
        """``xp.softmax`` as torch's fused softmax (one autograd node instead of six); masked
        entries (and all-masked rows) get weight 0. Over fewer than ``FUSED_SOFTMAX_MIN`` entries
        (the membrane's reads of a few slots) torch's kernel is slower than the composition, which
        is used there (forward + backward, one thread: 1.25 against 0.61 ms for [20,000, 12]; 0.22
        against 0.61 ms for [12,000, 20])."""
        t = self.torch
        if scores.shape[axis] < FUSED_SOFTMAX_MIN:
            return softmax_composed(self, scores, mask, axis)
        if mask is None:
            return t.softmax(scores, dim=axis)
        return t.softmax(scores.masked_fill(~mask, NEG), dim=axis) * mask

    def matmul_parts(self, w, parts):
        """concat([w @ p for p in parts], -1) as one matmul over the concatenated parts."""
        return self.torch.matmul(w, self.torch.cat(list(parts), dim=-1))

    def where(self, c, a, b):
        t = self.torch
        if not isinstance(a, t.Tensor):
            a = t.as_tensor(a, dtype=self.dtype, device=self.device)
        if not isinstance(b, t.Tensor):
            b = t.as_tensor(b, dtype=self.dtype, device=self.device)
        return t.where(c, a, b)

    def exp(self, x):
        return self.torch.exp(x)

    def tanh(self, x):
        return self.torch.tanh(x)

    def log(self, x):
        return self.torch.log(x)

    def sigmoid(self, x):
        return self.torch.sigmoid(x)

    def abs(self, x):
        return self.torch.abs(x)

    def sum(self, x, axis=None, keepdims=False):
        if axis is None:
            return x.sum()
        return x.sum(dim=axis, keepdim=keepdims)

    def mean(self, x, axis=None, keepdims=False):
        if axis is None:
            return x.mean()
        return x.mean(dim=axis, keepdim=keepdims)

    def amax(self, x, axis=None, keepdims=False):
        if axis is None:
            return x.max()
        return x.amax(dim=axis, keepdim=keepdims)

    def any(self, x, axis=None, keepdims=False):
        if axis is None:
            return x.any()
        return x.any(dim=axis, keepdim=keepdims)

    def all(self, x, axis=None):
        if axis is None:
            return x.all()
        return x.all(dim=axis)

    def kth_largest(self, x, k, axis=-1):
        return self.torch.topk(x, k, dim=axis).values.narrow(axis, k - 1, 1)

    def item_any(self, x) -> bool:
        return bool(x.any().item())

    def _flat_index(self, x, idx):
        """idx [B, M, C] into x [B, N, ...] -> indices into x flattened to [B N, ...]. A numpy index
        seen before (a wiring's sender lists, every round of every step) is converted once."""
        t = self.torch
        B, N = x.shape[:2]
        hit = self._flat_cache.get(id(idx))
        if hit is not None and hit[0] is idx and hit[1:3] == (B, N):
            return hit[3]
        flat = t.as_tensor(idx, dtype=t.long, device=x.device)
        if B > 1:
            flat = flat + (t.arange(B, device=x.device) * N)[:, None, None]
        if isinstance(idx, np.ndarray):
            if len(self._flat_cache) >= 4:
                self._flat_cache.clear()
            self._flat_cache[id(idx)] = (idx, B, N, flat)
        return flat

    def gather_rows(self, x, idx):
        flat = self._flat_index(x, idx)
        return x.reshape(-1, x.shape[-1]).index_select(0, flat.reshape(-1)).reshape(*flat.shape, x.shape[-1])

    def gather_dot(self, x, idx, q):
        """``NumpyOps.gather_dot`` as one autograd node that keeps no gathered copy for the backward
        pass (it gathers again): O(B M (C + D)) saved instead of O(B M C D)."""
        return self._gather.apply(x.reshape(-1, x.shape[-1]), self._flat_index(x, idx), q, False)

    def gather_mix(self, x, idx, w):
        """``NumpyOps.gather_mix`` as one autograd node (as ``gather_dot``)."""
        return self._gather.apply(x.reshape(-1, x.shape[-1]), self._flat_index(x, idx), w, True)

    def topk_indices(self, x, k, axis=-1):
        return self.torch.topk(x, k, dim=axis).indices

    def take_along(self, x, idx, axis=-1):
        t = self.torch
        return t.take_along_dim(x, t.as_tensor(idx, dtype=t.long, device=x.device), dim=axis)

    def float_(self, x):
        return x.to(self.dtype)

    def detach(self, x):
        return x.detach()


_GATHER: dict = {}  # torch module -> its GatherContract (torch is imported only by TorchOps' caller)


def _gather_function(torch):
    """The torch autograd function behind ``gather_dot`` and ``gather_mix``, over rows [R, D] and flat
    indices [B, M, C], built once. It saves the rows, indices and the other operand, never the
    gathered [B, M, C, D] copy (the backward pass gathers again)."""
    if torch in _GATHER:
        return _GATHER[torch]

    def gather(rows, idx):
        return rows.index_select(0, idx.reshape(-1)).reshape(*idx.shape, rows.shape[-1])

    class GatherContract(torch.autograd.Function):
        @staticmethod
        def forward(ctx, rows, idx, other, mix: bool):
            # mix: other = weights [B, M, C] -> sum over C; else other = queries [B, M, D] -> dot over D
            ctx.mix = mix
            ctx.save_for_backward(rows, idx, other)
            g = gather(rows, idx)
            return (g * other.unsqueeze(-1)).sum(-2) if mix else (g * other.unsqueeze(-2)).sum(-1)

        @staticmethod
        def backward(ctx, d):
            rows, idx, other = ctx.saved_tensors
            mix = ctx.mix
            d, other = (d.unsqueeze(-2), other.unsqueeze(-1)) if mix else (d.unsqueeze(-1), other.unsqueeze(-2))
            d_other = (gather(rows, idx) * d).sum(-1 if mix else -2) if ctx.needs_input_grad[2] else None
            d_rows = None
            if ctx.needs_input_grad[0]:
                d_rows = torch.zeros_like(rows).index_add_(0, idx.reshape(-1), (d * other).reshape(-1, rows.shape[-1]))
            return d_rows, None, d_other, None

    _GATHER[torch] = GatherContract
    return GatherContract


def ops_for(x: Any):
    """Pick the namespace for an array (numpy array -> NumpyOps, torch tensor -> TorchOps)."""
    if type(x).__module__.startswith("torch"):
        import torch  # only reached when the caller already holds a torch tensor

        return TorchOps(torch, dtype=x.dtype if x.is_floating_point() else None, device=x.device)
    return NumpyOps()


def softmax(ops, scores, mask=None, axis=-1):
    """Softmax along ``axis``; entries where ``mask`` is False get weight 0.

    A row whose mask is all False gets all-zero weights (not NaN). A namespace may compute it its
    own way (``ops.softmax``: torch's fused kernel, tests/test_model.py holds it equal to this).
    """
    fast = getattr(ops, "softmax", None)
    if fast is not None:
        return fast(scores, mask, axis)
    return softmax_composed(ops, scores, mask, axis)


def softmax_composed(ops, scores, mask=None, axis=-1):
    """``softmax`` composed of the namespace's max, exp, sum and division."""
    if mask is not None:
        scores = ops.where(mask, scores, NEG)
    m = ops.detach(ops.amax(scores, axis=axis, keepdims=True))
    e = ops.exp(scores - m)
    if mask is not None:
        e = ops.where(mask, e, 0.0)
    z = ops.sum(e, axis=axis, keepdims=True)
    return e / (z + 1e-30) if mask is not None else e / z


def scaled_dot(ops, q, k):
    """Attention scores q k^T / sqrt(dim): q [..., n, D], k [..., m, D] -> [..., n, m]."""
    return ops.matmul(q, ops.swap(k)) * (1.0 / math.sqrt(q.shape[-1]))

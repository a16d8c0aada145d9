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
from typing import Any

import numpy as np

NEG = -1e9  # score given to masked-out attention entries (finite: no NaN when a row is all masked)


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

    def where(self, c, a, b):
        return np.where(c, a, b).astype(self.dtype, copy=False)

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

    def gather_rows(self, x, idx):
        t = self.torch
        idx = t.as_tensor(idx, dtype=t.long, device=x.device)
        return x[t.arange(x.shape[0], device=x.device)[:, None, None], idx]

    def topk_indices(self, x, k, axis=-1):
        return self.torch.topk(x, k, dim=axis).indices

    def take_along(self, x, idx, axis=-1):
        t = self.torch
        return t.take_along_dim(x, t.as_tensor(idx, dtype=t.long, device=x.device), dim=axis)

    def float_(self, x):
        return x.to(self.dtype)

    def detach(self, x):
        return x.detach()


def ops_for(x: Any):
    """Pick the namespace for an array (numpy array -> NumpyOps, torch tensor -> TorchOps)."""
    if type(x).__module__.startswith("torch"):
        import torch  # only reached when the caller already holds a torch tensor

        return TorchOps(torch, dtype=x.dtype if x.is_floating_point() else None, device=x.device)
    return NumpyOps()


def softmax(ops, scores, mask=None, axis=-1):
    """Softmax along ``axis``; entries where ``mask`` is False get weight 0.

    A row whose mask is all False gets all-zero weights (not NaN).
    """
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

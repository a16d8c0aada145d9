"""``nn.GRUCell``'s step as one autograd node, for training on the CPU (issue 16).

The same function as ``torch.nn.GRUCell`` (PyTorch's gate order r, z, n; equal to ~3e-7 in float32, a
test holds values and gradients to it). torch's CPU GRU cell is a composition: its backward runs ~25
elementwise ops on [M, H] tensors, two ``cat`` of the gate gradients into [M, 3H] buffers and a clone
per gate, and its ``tanh`` kernel runs ~7x slower per element than its ``sigmoid`` on this project's
CPUs (docs/benchmarks.md). Two ways of the same math instead:

- ``GRUStepKernel`` (float32 on the CPU, where the kernels are built, ``kernels.py``): the elementwise
  work of the forward and of the backward pass is one loop each (``kernels.c``).
  ``PolicyStepKernel`` adds the heads' linear layer to the same node (``policy_step``, what
  ``ExpertPolicy`` runs in training).
- ``GRUStep`` (anywhere else): torch ops, fewer and in place: the backward writes the gate gradients
  into one [M, 3H] buffer and shares the r and z columns between the input and the hidden side;
  ``tanh`` is ``2 sigmoid(2x) - 1``.

Both compute their products with torch's oneDNN linear where it exists (``onednn_linear``: ~2x
``torch.mm``'s rate on AMD CPUs), else with ``torch.mm``. Only the training path uses them
(``ExpertPolicy.forward`` outside an ONNX export, a trace or torch.compile); the exported graph keeps
the GRU cell's own ops, which the deployment engines run.
"""

from __future__ import annotations

import os

import torch

from .kernels import kernel, usable


def _tanh_(x: torch.Tensor) -> torch.Tensor:
    """tanh(x) in place, as 2 sigmoid(2x) - 1."""
    return x.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)


_LINEAR = []  # [the oneDNN linear op or None], decided at first use


def onednn_linear():
    """torch's oneDNN linear (``torch.ops.mkldnn._linear_pointwise``: a @ w^T [+ b], strided inputs, no
    autograd), or None where it is missing, gives another result, or ``BADGER_ONEDNN=0``. On this project's
    machines it runs the policy's products ~2x faster than torch's default float32 matmul (MKL, which takes
    a slower path on AMD CPUs; docs/benchmarks.md); it is an internal op of torch's, checked once here."""
    if not _LINEAR:
        op = None
        if os.environ.get("BADGER_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available():
            try:
                op = torch.ops.mkldnn._linear_pointwise
                a, w, b = torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)
                if not torch.allclose(op(a.t().contiguous().t(), w, b, "none", [], ""), torch.addmm(b, a, w.t()),
                                      rtol=1e-5, atol=1e-6):
                    op = None
            except (AttributeError, RuntimeError):
                op = None
        _LINEAR.append(op)
    return _LINEAR[0]


def _lin(a, w, b=None):
    """a @ w^T (+ b) for 2-d a [M, K], w [N, K] (either may be a transposed view): oneDNN for float32 on
    the CPU where ``onednn_linear`` has it, else torch's matmul."""
    op = onednn_linear() if a.dtype == torch.float32 and a.device.type == "cpu" else None
    if op is None:
        return a @ w.t() if b is None else torch.addmm(b, a, w.t())
    # a broadcast operand (a zero stride: the gradient of a plain sum arrives so) sends oneDNN down a path
    # ~1,000x slower (200 ms for one [66 x 2000] x [2000 x 64] product; demos/gru_step_probe.py item 3 found
    # it): copy it
    a, w = (t.contiguous() if 0 in t.stride() else t for t in (a, w))
    return op(a, w, b, "none", [], "")


class GRUStep(torch.autograd.Function):
    """h' = GRUCell(x, h) with weights (w_ih [3H, I], w_hh [3H, H], b_ih [3H], b_hh [3H])."""

    @staticmethod
    def forward(ctx, x, h, w_ih, w_hh, b_ih, b_hh):
        H = h.shape[-1]
        gi = _lin(x, w_ih, b_ih)  # [M, 3H]
        gh = _lin(h, w_hh, b_hh)
        rz = gi[:, :2 * H].add_(gh[:, :2 * H]).sigmoid_()  # in gi's own columns
        r, z = rz[:, :H], rz[:, H:]
        hn = gh[:, 2 * H:]
        n = _tanh_(torch.addcmul(gi[:, 2 * H:], r, hn))
        out = torch.lerp(n, h, z)  # (1 - z) n + z h
        ctx.save_for_backward(x, h, w_ih, w_hh, rz, n, hn)
        return out

    @staticmethod
    def backward(ctx, g):
        x, h, w_ih, w_hh, rz, n, hn = ctx.saved_tensors
        H = h.shape[-1]
        r, z = rz[:, :H], rz[:, H:]
        gates = torch.empty(g.shape[0], 3 * H, dtype=g.dtype, device=g.device)  # dL/d(gi), columns r, z, n
        d_r, d_z, d_n = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:]
        torch.addcmul(rz, rz, rz, value=-1.0, out=gates[:, :2 * H])  # both gates' sigmoid': rz (1 - rz)
        gz = g * z
        t = g - gz  # g (1 - z)
        torch.addcmul(t, t * n, n, value=-1.0, out=d_n)  # n pre-activation: g (1 - z) (1 - n^2)
        d_z.mul_(g).mul_(h - n)  # z pre-activation: g (h - n) z (1 - z)
        d_r.mul_(d_n).mul_(hn)  # r pre-activation: dL/d(n_pre) hn r (1 - r)
        grad_x = grad_h = grad_wih = grad_whh = grad_bih = grad_bhh = None
        if ctx.needs_input_grad[0]:
            grad_x = _lin(gates, w_ih.t())
        if ctx.needs_input_grad[2]:
            grad_wih = _lin(x.t(), gates.t()).t()
        if ctx.needs_input_grad[4]:
            grad_bih = gates.sum(0)
        d_n.mul_(r)  # the hidden side's n columns: dL/d(hn) = dL/d(n_pre) r
        if ctx.needs_input_grad[1]:
            grad_h = _lin(gates, w_hh.t()).add_(gz)
        if ctx.needs_input_grad[3]:
            grad_whh = _lin(h.t(), gates.t()).t()
        if ctx.needs_input_grad[5]:
            grad_bhh = gates.sum(0)
        return grad_x, grad_h, grad_wih, grad_whh, grad_bih, grad_bhh


def _kernel_forward(x, h, w_ih, w_hh, b_ih, b_hh):
    """h' and what the backward pass keeps: the gates' products by torch (``_lin``), their elementwise
    work by the kernel."""
    h = h.contiguous()
    M, H = h.shape
    gi, gh = _lin(x, w_ih), _lin(h, w_hh)  # the kernel adds the biases
    b_ih, b_hh = b_ih.contiguous(), b_hh.contiguous()
    out, n, hn, rz = torch.empty_like(h), torch.empty_like(h), torch.empty_like(h), h.new_empty(M, 2 * H)
    kernel().gru_forward(M, H, gi.data_ptr(), gh.data_ptr(), h.data_ptr(), b_ih.data_ptr(), b_hh.data_ptr(),
                         out.data_ptr(), rz.data_ptr(), n.data_ptr(), hn.data_ptr())
    return out, (x, h, w_ih, w_hh, rz, n, hn)  # gi and gh are not kept


def _kernel_backward(g, need, x, h, w_ih, w_hh, rz, n, hn):
    """The gradients of (x, h, w_ih, w_hh, b_ih, b_hh) from g = dL/dh' [M, H] (None where ``need`` says so)."""
    g = g.contiguous()
    M, H = h.shape
    gates_i, gates_h = g.new_empty(M, 3 * H), g.new_empty(M, 3 * H)
    gz, b_i, b_h = torch.empty_like(g), g.new_empty(3 * H), g.new_empty(3 * H)
    kernel().gru_backward(M, H, g.data_ptr(), h.data_ptr(), rz.data_ptr(), n.data_ptr(), hn.data_ptr(),
                          gates_i.data_ptr(), gates_h.data_ptr(), gz.data_ptr(), b_i.data_ptr(), b_h.data_ptr())
    # weight gradients G^T A as (A^T G)^T: the narrow side (the input's columns) as the product's rows runs
    # faster (docs/benchmarks.md)
    return (_lin(gates_i, w_ih.t()) if need[0] else None, gz.add_(_lin(gates_h, w_hh.t())) if need[1] else None,
            _lin(x.t(), gates_i.t()).t() if need[2] else None, _lin(h.t(), gates_h.t()).t() if need[3] else None,
            b_i if need[4] else None, b_h if need[5] else None)


class GRUStepKernel(torch.autograd.Function):
    """``GRUStep`` with its elementwise work in the compiled kernel (float32, CPU)."""

    @staticmethod
    def forward(ctx, x, h, w_ih, w_hh, b_ih, b_hh):
        out, saved = _kernel_forward(x, h, w_ih, w_hh, b_ih, b_hh)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, g):
        return _kernel_backward(g, ctx.needs_input_grad, *ctx.saved_tensors)


class PolicyStepKernel(torch.autograd.Function):
    """``GRUStepKernel`` and the heads' linear layer after it, as one node: (h', heads = h' W_o^T + b_o).
    The gradient reaching h' from the heads joins the one from later steps in one product
    (dL/dh' = g_h + g_heads W_o), where two nodes would add them in a separate pass. (Autograd hands a
    zero gradient for an output that got none: grads are materialised, the Function's default.)"""

    @staticmethod
    def forward(ctx, x, h, w_ih, w_hh, b_ih, b_hh, w_o, b_o):
        out, saved = _kernel_forward(x, h, w_ih, w_hh, b_ih, b_hh)
        ctx.save_for_backward(*saved, w_o, out)
        return out, _lin(out, w_o, b_o)

    @staticmethod
    def backward(ctx, g_h, g_o):
        *saved, w_o, out = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = _lin(g_o, w_o.t()).add_(g_h)
        grads = _kernel_backward(g, need, *saved)
        return (*grads, _lin(out.t(), g_o.t()).t() if need[6] else None, g_o.sum(0) if need[7] else None)


def gru_step(cell: torch.nn.GRUCell, x: torch.Tensor, h: torch.Tensor, use_kernel: bool | None = None) -> torch.Tensor:
    """``cell(x, h)`` for 2-d x [M, I] and h [M, H] as one autograd node (a cell with biases): the
    compiled kernel where it applies (float32 on the CPU, ``use_kernel`` not False, ``kernel()``
    built), else ``GRUStep``."""
    args = (x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    if use_kernel is not False and usable(*args):
        return GRUStepKernel.apply(*args)
    return GRUStep.apply(*args)


def policy_step(cell: torch.nn.GRUCell, heads: torch.nn.Linear, x: torch.Tensor, h: torch.Tensor,
                use_kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h' = ``cell(x, h)``, ``heads(h')``): one node (``PolicyStepKernel``) where the kernel applies,
    else ``GRUStep`` (torch ops) and the linear layer."""
    args = (x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, heads.weight, heads.bias)
    if use_kernel is not False and heads.bias is not None and usable(*args):
        return PolicyStepKernel.apply(*args)
    h2 = GRUStep.apply(*args[:6])
    return h2, heads(h2)

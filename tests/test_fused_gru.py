"""The training path's GRU step (training/fused_gru.py) is nn.GRUCell's function: values and every
gradient, through the compiled kernel and through the torch-op fallback, and a whole training step."""

import shutil

import numpy as np
import pytest
import torch

from badger_runtime import native
from badger_runtime.bench.train import reference_setup
from badger_runtime.rollout import rollout, sample_wiring
from badger_runtime.training import fused_gru, kernels
from badger_runtime.training.model import ExpertPolicy


def _grads(fn, cell, x0, h0):
    x, h = x0.clone().requires_grad_(), h0.clone().requires_grad_()
    y = fn(x, h)
    weights = torch.linspace(-1.0, 2.0, y.numel(), dtype=y.dtype).reshape(y.shape)  # any upstream gradient
    (y * weights).sum().backward()
    out = [y.detach(), x.grad, h.grad] + [p.grad.clone() for p in cell.parameters()]
    cell.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("M,I,H", [(1, 3, 1), (37, 34, 64), (500, 10, 13)])
def test_fused_gru_step_equals_the_gru_cell(use_kernel, M, I, H):
    torch.manual_seed(M + I + H)
    cell = torch.nn.GRUCell(I, H)
    x0 = 3.0 * torch.randn(M, I)  # large pre-activations: saturated gates too
    h0 = torch.rand(M, H) * 2 - 1
    ref = _grads(cell, cell, x0, h0)
    got = _grads(lambda x, h: fused_gru.gru_step(cell, x, h, use_kernel=use_kernel), cell, x0, h0)
    for name, a, b in zip(["h'", "x", "h", "w_ih", "w_hh", "b_ih", "b_hh"], ref, got):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * (1 + a.abs().max())), name


def test_the_kernel_is_built_where_a_compiler_is_found_and_used_for_float32():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        assert kernels.kernel() is None  # then training runs GRUStep: the test above holds it
        return
    assert kernels.kernel() is not None
    cell = torch.nn.GRUCell(4, 3)
    x, h = torch.randn(5, 4), torch.zeros(5, 3, requires_grad=True)
    assert type(fused_gru.gru_step(cell, x, h).grad_fn).__name__.startswith("GRUStepKernel")
    assert type(fused_gru.gru_step(cell.double(), x.double(), h.double()).grad_fn).__name__.startswith("GRUStep")


def test_the_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("BADGER_KERNELS", "0")
    monkeypatch.setattr(kernels, "_KERNEL", None)
    assert kernels.kernel() is None
    cell = torch.nn.GRUCell(4, 3)
    y = fused_gru.gru_step(cell, torch.randn(2, 4), torch.zeros(2, 3, requires_grad=True))
    assert not type(y.grad_fn).__name__.startswith("GRUStepKernel")


def test_the_torch_op_path_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(3, 4).double()
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    h = (torch.rand(6, 4, dtype=torch.float64) * 2 - 1).requires_grad_()
    params = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    assert torch.autograd.gradcheck(lambda x, h, *w: fused_gru.GRUStep.apply(x, h, *w), (x, h, *params))


def test_a_training_rollout_with_the_fused_cell_equals_one_with_nn_grucell(monkeypatch):
    """The 2019 setting's rollout and backward pass: the same losses and the same gradient of every
    weight, with the fused cell (and the split heads the next step reuses) or with ``nn.GRUCell``."""
    cfg, task, ops = reference_setup(seed=0, threads=1)
    rng = np.random.default_rng(3)
    episode = task.sample(rng, 8, dims=3, experts=5, steps=6, addr_dim=cfg.policy.addr_dim)
    wiring = sample_wiring(rng, cfg, 8, 5)
    results = []
    for fused in (False, True):
        monkeypatch.setattr(ExpertPolicy, "fused", fused)
        torch.manual_seed(0)
        policy = ExpertPolicy(cfg.policy)
        out = rollout(ops, policy, cfg, episode, wiring, steps=6)
        out.losses.mean().backward()
        results.append((out.losses.detach(), [p.grad.clone() for p in policy.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads_a, grads_b):
        assert a.abs().max() > 0
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * a.abs().max())


@pytest.mark.parametrize("use_kernel", [True, False])
def test_saturated_gates_and_nan_behave_as_the_gru_cell(use_kernel):
    """Handcrafted policies drive the gates with pre-activations in the thousands: the fused step
    saturates as the cell does (no overflow to NaN), and a NaN input stays a NaN."""
    torch.manual_seed(1)
    cell = torch.nn.GRUCell(4, 6)
    x0 = torch.randn(9, 4) * 1e4
    h0 = torch.rand(9, 6) * 2 - 1
    ref = _grads(cell, cell, x0, h0)
    got = _grads(lambda x, h: fused_gru.gru_step(cell, x, h, use_kernel=use_kernel), cell, x0, h0)
    for a, b in zip(ref, got):
        assert torch.isfinite(b).all() and torch.allclose(a, b, rtol=1e-5, atol=1e-5 * (1 + a.abs().max()))
    x0[2, 1] = float("nan")
    with torch.no_grad():
        y = fused_gru.gru_step(cell, x0, h0, use_kernel=use_kernel)
        assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3]]).all()
        assert torch.equal(torch.isnan(y), torch.isnan(cell(x0, h0)))


@pytest.mark.parametrize("use", ["both", "state", "heads"])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_the_policy_step_equals_the_cell_then_the_heads(use_kernel, use):
    """``policy_step``: the GRU step and the heads' linear layer as one node, with gradients reaching
    h' from the heads, from later steps, or both."""
    torch.manual_seed(2)
    cell, heads = torch.nn.GRUCell(7, 5), torch.nn.Linear(5, 9)
    x0, h0 = torch.randn(11, 7), torch.rand(11, 5) * 2 - 1
    w_h, w_o = torch.randn(11, 5), torch.randn(11, 9)

    def run(fn):
        x, h = x0.clone().requires_grad_(), h0.clone().requires_grad_()
        h2, o = fn(x, h)
        loss = (h2 * w_h).sum() if use == "state" else (o * w_o).sum() if use == "heads" else \
            (h2 * w_h).sum() + (o * w_o).sum()
        loss.backward()
        params = list(cell.parameters()) + list(heads.parameters())
        out = [h2.detach(), o.detach(), x.grad, h.grad] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                                           for p in params]
        for p in params:
            p.grad = None
        return out

    def reference(x, h):
        h2 = cell(x, h)
        return h2, heads(h2)

    for a, b in zip(run(reference), run(lambda x, h: fused_gru.policy_step(cell, heads, x, h, use_kernel=use_kernel))):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * (1 + a.abs().max()))


def test_badger_fused_0_trains_with_the_gru_cell_itself():
    """``BADGER_FUSED=0``: ``ExpertPolicy`` runs ``nn.GRUCell`` and its heads as before session 37 (its float
    rounding, which the policies shipped before were trained with)."""
    import os
    import subprocess
    import sys

    code = ("import torch; from badger_runtime.training.model import ExpertPolicy; from badger_runtime.config import "
            "PolicySpec; p = ExpertPolicy(PolicySpec()); x = torch.randn(4, p.spec.msg_dim); "
            "s = torch.randn(4, p.spec.sensed_dim); h = torch.zeros(4, p.spec.hidden, requires_grad=True); "
            "a = p(h, x, s)[0]; print(ExpertPolicy.fused, type(a.grad_fn).__name__, "
            "torch.equal(a, p.cell(torch.cat([x, s], -1), h)))")
    for flag, fused in (("0", "False"), ("1", "True")):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "BADGER_FUSED": flag},
                             capture_output=True, text=True, check=True).stdout.split()
        assert out[0] == fused
        if fused == "False":
            assert out[1] != "PolicyStepKernelBackward" and not out[1].startswith("GRUStep") and out[2] == "True"


def test_the_kernels_build_in_the_temporary_folder_where_the_cache_cannot_be_written(monkeypatch, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked / "cache"))  # mkdir under a file fails, even for root
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(kernels, "_KERNEL", None)
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        assert kernels.kernel() is None
        return
    assert kernels.kernel() is not None
    assert list((tmp_path / "tmp").glob("badger-kernels-*/kernels-*.so"))


def test_a_failing_compiler_is_warned_about_and_training_runs_torch_ops(monkeypatch, tmp_path):
    false = shutil.which("false")
    assert false is not None
    monkeypatch.setenv("CC", false)  # a "compiler" that fails
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "_KERNEL", None)
    with pytest.warns(UserWarning, match="could not be built"):
        assert kernels.kernel() is None
    assert not list(tmp_path.rglob("*.tmp"))  # nothing half-built is left behind
    cell = torch.nn.GRUCell(4, 3)
    y = fused_gru.gru_step(cell, torch.randn(2, 4), torch.zeros(2, 3, requires_grad=True))
    assert type(y.grad_fn).__name__.startswith("GRUStepBackward")

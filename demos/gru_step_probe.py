#!/usr/bin/env python
"""Issue 16: the numbers behind the fused GRU step (training/fused_gru.py, docs/benchmarks.md), one thread,
the 2019 setting's shapes (M = 2,000 rows: batch 100 x N = 20; input 34, hidden 64, heads 66):

1. ``torch.tanh`` against ``torch.sigmoid`` per element (256k floats);
2. the compiled kernel's forward and backward alone (``kernels.c``, one call each);
3. the GRU step and the heads, forward + backward: ``nn.GRUCell`` + ``nn.Linear``, the torch-op node
   (``GRUStep``) + ``nn.Linear``, and the compiled node (``PolicyStepKernel``), interleaved;
4. a weight gradient G^T A as written and as (A^T G)^T, through ``torch.mm`` and through oneDNN;
5. the tensors a training batch keeps for its backward pass (MiB, by the storage they hold).

    python demos/gru_step_probe.py
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from badger_runtime.bench.train import reference_batches, reference_setup  # noqa: E402
from badger_runtime.rollout import rollout  # noqa: E402
from badger_runtime.training import fused_gru, kernels  # noqa: E402
from badger_runtime.training.model import ExpertPolicy  # noqa: E402

M, I, H, O = 2000, 34, 64, 66


def best_ms(f, calls=40, rounds=5):
    for _ in range(3):
        f()
    best = float("inf")
    for _ in range(rounds):
        t = time.thread_time()
        for _ in range(calls):
            f()
        best = min(best, (time.thread_time() - t) / calls)
    return best * 1e3


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    a = torch.randn(256_000)
    print(f"1. per 256k floats: torch.tanh {best_ms(lambda: torch.tanh(a)):.3f} ms, "
          f"torch.sigmoid {best_ms(lambda: torch.sigmoid(a)):.3f} ms")

    lib = kernels.kernel()
    if lib is not None:
        gi, gh, h = torch.randn(M, 3 * H), torch.randn(M, 3 * H), torch.rand(M, H) * 2 - 1
        b_i, b_h = torch.randn(3 * H), torch.randn(3 * H)
        out, n, hn, rz = torch.empty(M, H), torch.empty(M, H), torch.empty(M, H), torch.empty(M, 2 * H)
        g, gates_i, gates_h, gz = torch.randn(M, H), torch.empty(M, 3 * H), torch.empty(M, 3 * H), torch.empty(M, H)
        sums_i, sums_h = torch.empty(3 * H), torch.empty(3 * H)
        fwd = best_ms(lambda: lib.gru_forward(M, H, gi.data_ptr(), gh.data_ptr(), h.data_ptr(), b_i.data_ptr(),
                                              b_h.data_ptr(), out.data_ptr(), rz.data_ptr(), n.data_ptr(),
                                              hn.data_ptr()))
        bwd = best_ms(lambda: lib.gru_backward(M, H, g.data_ptr(), h.data_ptr(), rz.data_ptr(), n.data_ptr(),
                                               hn.data_ptr(), gates_i.data_ptr(), gates_h.data_ptr(), gz.data_ptr(),
                                               sums_i.data_ptr(), sums_h.data_ptr()))
        print(f"2. the compiled kernel alone, [{M} x {H}]: forward {fwd:.3f} ms, backward {bwd:.3f} ms")
    else:
        print("2. no compiled kernel here (no C compiler, or BADGER_KERNELS=0)")

    cell, heads = torch.nn.GRUCell(I, H), torch.nn.Linear(H, O)
    x, h0 = torch.randn(M, I, requires_grad=True), (torch.rand(M, H) * 2 - 1).requires_grad_()
    paths = {"nn.GRUCell + nn.Linear": lambda: heads(cell(x, h0)),
             "torch-op node + nn.Linear": lambda: fused_gru.policy_step(cell, heads, x, h0, use_kernel=False)[1],
             "compiled node": lambda: fused_gru.policy_step(cell, heads, x, h0)[1]}
    times = {k: [] for k in paths}
    for _ in range(5):
        for k, f in paths.items():
            times[k].append(best_ms(lambda: f().sum().backward(), calls=20, rounds=1))
    print("3. GRU step + heads, forward + backward (median of 5 interleaved rounds): " + ", ".join(
        f"{k} {sorted(v)[2]:.2f} ms" for k, v in times.items()))

    G, A = torch.randn(M, 3 * H), torch.randn(M, I)
    op = fused_gru.onednn_linear()
    rows = [("torch.mm", lambda: G.t() @ A, lambda: (A.t() @ G).t())]
    if op is not None:
        rows.append(("oneDNN", lambda: op(G.t(), A.t(), None, "none", [], ""),
                     lambda: op(A.t(), G.t(), None, "none", [], "").t()))
    for name, plain, flipped in rows:
        print(f"4. weight gradient [{3 * H} x {M}] x [{M} x {I}], {name}: G^T A {best_ms(plain):.3f} ms, "
              f"(A^T G)^T {best_ms(flipped):.3f} ms")

    cfg, task, ops = reference_setup(seed=0, threads=1)
    policy = ExpertPolicy(cfg.policy)
    (episode, wiring), = reference_batches(cfg, task, np.random.default_rng(0), 1)
    held = {}

    def pack(t):
        held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rollout(ops, policy, cfg, episode, wiring, steps=20)
    print(f"5. saved for the backward pass: {sum(held.values()) / 2**20:.1f} MiB per batch")


if __name__ == "__main__":
    main()

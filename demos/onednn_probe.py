#!/usr/bin/env python
"""Issue 16: torch's default float32 matmul (MKL in the x86 wheels) against torch's oneDNN linear
(``torch.ops.mkldnn._linear_pointwise``, what ``training.fused_gru`` uses for the policy's products) at the
shapes of the 2019 setting's training step and at the benchmark limit's 384 x 384, one thread, best of 5 x 40
calls each. On the AMD EPYC machines of this project oneDNN ran every shape ~2x faster (MKL takes a slower
path on AMD CPUs), so the limit ``badger bench train`` measured with ``torch.mm`` was half the machine's.

    python demos/onednn_probe.py
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from badger_runtime.training.fused_gru import onednn_linear  # noqa: E402
from gru_step_probe import best_ms  # noqa: E402  (demos/, this script's folder)

#: (what, M, K, N): the products of one inner step at batch 100, N = 20 (M = 2,000 rows), hidden 64
SHAPES = [("the limit's matmul", 384, 384, 384),
          ("forward: h W_hh^T", 2000, 64, 192), ("forward: x W_ih^T", 2000, 34, 192), ("forward: heads", 2000, 64, 66),
          ("backward: dx", 2000, 192, 34), ("backward: dh", 2000, 192, 64), ("backward: d heads", 2000, 66, 64),
          ("weight grad W_hh", 192, 2000, 64), ("weight grad W_ih", 192, 2000, 34), ("weight grad heads", 66, 2000, 64)]


def main():
    torch.set_num_threads(1)
    op = onednn_linear()
    if op is None:
        print("no oneDNN linear in this torch build (or BADGER_ONEDNN=0)")
        return
    print(f"{'product':22s} {'M x K x N':>16s} {'torch.mm ms':>12s} {'GFLOP/s':>8s} {'oneDNN ms':>10s} {'GFLOP/s':>8s}")
    for what, m, k, n in SHAPES:
        a, w = torch.randn(m, k), torch.randn(n, k)
        mm, dnn = best_ms(lambda: a @ w.t()), best_ms(lambda: op(a, w, None, "none", [], ""))
        gf = 2 * m * k * n / 1e6
        print(f"{what:22s} {f'{m} x {k} x {n}':>16s} {mm:12.3f} {gf / mm:8.0f} {dnn:10.3f} {gf / dnn:8.0f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Issue 16 probe: the GRU cell's two matmuls (nn.GRUCell: x W_i + h W_h) against one merged matmul
[x, h] @ [[W_ir W_iz W_in 0], [W_hr W_hz 0 W_hn]] (one product, 4/3 the FLOPs), forward + backward,
2,000 rows (batch 100 x N 20), hidden 64, input 34; one thread; interleaved; CPU time.

    python demos/gru_merge_probe.py
"""
import time

import torch


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    R, I, H = 2000, 34, 64
    x = torch.randn(R, I, requires_grad=True); h = torch.randn(R, H, requires_grad=True)
    cell = torch.nn.GRUCell(I, H)
    Wi, Wh = cell.weight_ih.detach(), cell.weight_hh.detach()  # [3H, I], [3H, H]
    bi, bh = cell.bias_ih.detach(), cell.bias_hh.detach()
    W = torch.zeros(I + H, 4 * H)
    W[:I, :3 * H] = Wi.t(); W[I:, :2 * H] = Wh[:2 * H].t(); W[I:, 3 * H:] = Wh[2 * H:].t()
    b = torch.cat([bi[:2 * H] + bh[:2 * H], bi[2 * H:], bh[2 * H:]])
    W.requires_grad_(True); b.requires_grad_(True)

    def merged(x, h):
        g = torch.addmm(b, torch.cat([x, h], 1), W)
        rz = torch.sigmoid(g[:, :2 * H]); r, z = rz[:, :H], rz[:, H:]
        n = torch.tanh(g[:, 2 * H:3 * H] + r * g[:, 3 * H:])
        return n + z * (h - n)

    with torch.no_grad():
        print("max diff", float((merged(x, h) - cell(x, h)).abs().max()))

    def run(f, reps=50):
        t = time.thread_time()
        for _ in range(reps):
            out = f(x, h); out.sum().backward()
        return (time.thread_time() - t) / reps * 1e3

    for f in (cell, merged):
        run(f, 10)
    res = {"GRUCell": [], "merged": []}
    for _ in range(5):
        res["GRUCell"].append(run(cell)); res["merged"].append(run(merged))
    for k, v in res.items():
        print(k, "ms per step fwd+bwd:", " ".join(f"{t:.2f}" for t in sorted(v)))


if __name__ == "__main__":
    main()

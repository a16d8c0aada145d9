#!/usr/bin/env python
"""Issue 16, tried in session 37 and not kept: the inner step's three small unmasked attentions (the
router's, the membrane's reads, its push) as one compiled autograd node each, forward and backward in
C (the same build as the kept kernels, ``badger_runtime/native.py``), against torch's composition (``bmm``,
fused softmax, ``bmm``) at the 2019 setting's shapes (B = 100, N = 20, 2 read heads over 4 slots, 3
outputs), forward + backward, one thread, CPU time, interleaved.

    python demos/attention_kernel_probe.py

Session 37 (idle machine): the compiled node was **slower** for the router (0.68 against 0.34 ms per
step) and the reads (0.64 against 0.42), about even for the push (0.19-0.21 against 0.21-0.23): at 4-20 keys per query
the loops are too short for the vector units, where torch's batched matmuls are already near their
rate. The GRU cell's gates, which are long elementwise passes, are what the kept kernel fuses.
"""
import ctypes
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from badger_runtime import membrane, native, routing  # noqa: E402
from badger_runtime.config import AgentConfig  # noqa: E402
from badger_runtime.training.model import torch_ops  # noqa: E402

#: the kept kernels' exp (native_math.h), then the attention tried here
SOURCE = r"""#include <math.h>
#include <stdint.h>

#include "native_math.h"  /* exp_clamped */

/* ---- attention without a mask, batched: O = softmax(scale Q K^T) V (the router's, the membrane's reads and
 * its push) ----
 * Q [B, n, D], K [B, m, D], V [B, m, E] -> O [B, n, E], W [B, n, m] (the weights, kept for the backward pass).
 * Scratch: kt [D, m] and vt [E, m], the batch's K and V transposed, so the loops over the m keys are contiguous. */
void attn_forward(long B, long n, long m, long D, long E, float scale, const float *restrict Q,
                  const float *restrict K, const float *restrict V, float *restrict O, float *restrict W,
                  float *restrict kt) {
    for (long b = 0; b < B; b++) {
        const float *q = Q + b * n * D, *k = K + b * m * D, *v = V + b * m * E;
        float *o = O + b * n * E, *w = W + b * n * m;
        for (long j = 0; j < m; j++)
            for (long d = 0; d < D; d++) kt[d * m + j] = k[j * D + d];
        for (long i = 0; i < n; i++) {
            float *wi = w + i * m, *oi = o + i * E;
            const float *qi = q + i * D;
#pragma omp simd
            for (long j = 0; j < m; j++) wi[j] = 0.0f;
            for (long d = 0; d < D; d++) {
                float qd = qi[d] * scale;
                const float *kd = kt + d * m;
#pragma omp simd
                for (long j = 0; j < m; j++) wi[j] += qd * kd[j];
            }
            float mx = -INFINITY;
            for (long j = 0; j < m; j++) mx = wi[j] > mx ? wi[j] : mx;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (long j = 0; j < m; j++) {
                wi[j] = exp_clamped(wi[j] - mx);
                sum += wi[j];
            }
            float inv = 1.0f / sum;
#pragma omp simd
            for (long j = 0; j < m; j++) wi[j] *= inv;
#pragma omp simd
            for (long e = 0; e < E; e++) oi[e] = 0.0f;
            for (long j = 0; j < m; j++) {
                float wj = wi[j];
                const float *vj = v + j * E;
#pragma omp simd
                for (long e = 0; e < E; e++) oi[e] += wj * vj[e];
            }
        }
    }
}

/* dO [B, n, E] and the forward's Q, K, V, W -> dQ [B, n, D], dK [B, m, D], dV [B, m, E] (overwritten).
 * Scratch: vt [E, m], dw [m]. */
void attn_backward(long B, long n, long m, long D, long E, float scale, const float *restrict Q,
                   const float *restrict K, const float *restrict V, const float *restrict W,
                   const float *restrict dO, float *restrict dQ, float *restrict dK, float *restrict dV,
                   float *restrict vt, float *restrict dw) {
    for (long b = 0; b < B; b++) {
        const float *q = Q + b * n * D, *k = K + b * m * D, *v = V + b * m * E, *w = W + b * n * m;
        const float *go = dO + b * n * E;
        float *gq = dQ + b * n * D, *gk = dK + b * m * D, *gv = dV + b * m * E;
        for (long j = 0; j < m; j++)
            for (long e = 0; e < E; e++) vt[e * m + j] = v[j * E + e];
        for (long x = 0; x < m * D; x++) gk[x] = 0.0f;
        for (long x = 0; x < m * E; x++) gv[x] = 0.0f;
        for (long i = 0; i < n; i++) {
            const float *wi = w + i * m, *goi = go + i * E, *qi = q + i * D;
            float *gqi = gq + i * D;
            /* dW_ij = dO_i . V_j */
#pragma omp simd
            for (long j = 0; j < m; j++) dw[j] = 0.0f;
            for (long e = 0; e < E; e++) {
                float ge = goi[e];
                const float *ve = vt + e * m;
#pragma omp simd
                for (long j = 0; j < m; j++) dw[j] += ge * ve[j];
            }
            /* dS_ij = W_ij (dW_ij - sum_j W_ij dW_ij), times the scale */
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (long j = 0; j < m; j++) dot += wi[j] * dw[j];
#pragma omp simd
            for (long j = 0; j < m; j++) dw[j] = scale * wi[j] * (dw[j] - dot);
#pragma omp simd
            for (long d = 0; d < D; d++) gqi[d] = 0.0f;
            for (long j = 0; j < m; j++) {
                float s = dw[j], wj = wi[j];
                const float *kj = k + j * D;
                float *gkj = gk + j * D, *gvj = gv + j * E;
#pragma omp simd
                for (long d = 0; d < D; d++) {
                    gqi[d] += s * kj[d];
                    gkj[d] += s * qi[d];
                }
#pragma omp simd
                for (long e = 0; e < E; e++) gvj[e] += wj * goi[e];
            }
        }
    }
}
"""

_LIB = []


def build():
    p, n, f = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    with tempfile.TemporaryDirectory() as tmp:  # the built library lives in native's cache, not beside its source
        src = Path(tmp) / "attn.c"
        src.write_text(SOURCE)
        lib = native.load(src, {"attn_forward": ([n] * 5 + [f] + [p] * 6, None),
                                "attn_backward": ([n] * 5 + [f] + [p] * 10, None)}, "the attention probe", "")
    if lib is None:
        raise SystemExit("no C compiler (or BADGER_KERNELS=0): nothing to compare")
    _LIB.append(lib)


class Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        lib = _LIB[0]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, n, D = q.shape
        m, E = k.shape[1], v.shape[2]
        scale = 1.0 / math.sqrt(D)
        out, w = q.new_empty(B, n, E), q.new_empty(B, n, m)
        scratch = q.new_empty(D * m)
        lib.attn_forward(B, n, m, D, E, scale, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), w.data_ptr(),
                         scratch.data_ptr())
        ctx.save_for_backward(q, k, v, w)
        ctx.mark_non_differentiable(w)
        return out, w

    @staticmethod
    def backward(ctx, d_out, _d_w):
        lib = _LIB[0]
        q, k, v, w = ctx.saved_tensors
        B, n, D = q.shape
        m, E = k.shape[1], v.shape[2]
        d_out = d_out.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        vt, dw = q.new_empty(E * m), q.new_empty(m)
        lib.attn_backward(B, n, m, D, E, 1.0 / math.sqrt(D), q.data_ptr(), k.data_ptr(), v.data_ptr(), w.data_ptr(),
                          d_out.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), vt.data_ptr(), dw.data_ptr())
        need = ctx.needs_input_grad
        return dq if need[0] else None, dk if need[1] else None, dv if need[2] else None




def main():
    build()
    torch.set_num_threads(1)
    plain = torch_ops()
    cfg = AgentConfig().validate()
    B, N, A, J, K = 100, 20, 8, 4, 2
    torch.manual_seed(0)
    rq, val = torch.randn(B, N, K * A, requires_grad=True), torch.randn(B, J, requires_grad=True)
    addr = torch.randn(B, J, A)
    q, k, v = (torch.randn(B, N, D, requires_grad=True) for D in (8, 8, 16))
    pk, pv = torch.randn(B, N, A, requires_grad=True), torch.randn(B, N, 1 + A, requires_grad=True)
    oa = torch.randn(B, 3, A)

    def route(fast):
        out = Attention.apply(q, k, v)[0] if fast else routing.route(plain, cfg.routing, q, k, v, None)[0]
        out.backward(torch.ones_like(out))

    def read(fast):
        if fast:
            out = Attention.apply(rq.reshape(B, N * K, A), addr, torch.cat([val[:, :, None], addr], -1))[0]
        else:
            out = membrane.sense(plain, rq, addr, val, None, 0, False)
        out.backward(torch.ones_like(out))

    def push(fast):
        if fast:
            mixed = Attention.apply(oa, pk, pv)[0]
            out = mixed[..., 0] + (mixed[..., 1:] * oa).sum(-1)
        else:
            out = membrane.push(plain, pk, pv, oa, None)[0]
        out.backward(torch.ones_like(out))

    for name, fn in (("route", route), ("read", read), ("push", push)):
        times = {False: [], True: []}
        for _ in range(5):
            for fast in (False, True):
                for _ in range(5):
                    fn(fast)
                t = time.thread_time()
                for _ in range(40):
                    fn(fast)
                times[fast].append((time.thread_time() - t) / 40 * 1e3)
        med = {f: sorted(t)[2] for f, t in times.items()}
        print(f"{name}: torch ops {med[False]:.3f} ms per step, compiled node {med[True]:.3f} ms (forward + backward)")


if __name__ == "__main__":
    main()

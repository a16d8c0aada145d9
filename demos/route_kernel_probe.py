#!/usr/bin/env python
"""Issue 16 probe: the sharded runtime's sparse routing of one tile (4,096 receivers, top-8 of 32 listed
senders, keys 8 wide, values 16) as numpy does it (``routing.route``: gather the candidates' keys, batched
dot products, argpartition, take_along_axis, softmax, gather the kept values, mix) against one fused
compiled loop per receiver (numba: the dot products, an insertion top-k, the softmax and the mix in
registers, no temporaries). Checks the two agree, then times them interleaved (CPU time, one thread)
with the senders' keys in cache (N = 1,000) and not (N = 100,000). numba is not a dependency of badger:

    pip install numba && python demos/route_kernel_probe.py
"""
import argparse
import math
import time

import numpy as np
from numba import njit

from badger_runtime import routing
from badger_runtime.config import RoutingConfig
from badger_runtime.xp import NumpyOps


@njit(nogil=True, fastmath=True, cache=False)
def fused_route(query, key, value, idx, k, out):
    """out[b, m] = sum over the k best-scoring listed senders j of softmax(q.k_j / sqrt(Dk)) value[b, j]."""
    B, M, Dk = query.shape
    C, Dm = idx.shape[2], value.shape[2]
    scale = np.float32(1.0 / math.sqrt(Dk))
    sc = np.empty(C, np.float32)
    keep = np.empty(k, np.int64)
    w = np.empty(k, np.float32)
    for b in range(B):
        for m in range(M):
            for c in range(C):
                j = idx[b, m, c]
                s = np.float32(0.0)
                for d in range(Dk):
                    s += key[b, j, d] * query[b, m, d]
                sc[c] = s * scale
            n = 0  # keep[:n]: the best so far, in descending order
            for c in range(C):
                v = sc[c]
                if n < k:
                    p = n
                    n += 1
                elif v > sc[keep[k - 1]]:
                    p = k - 1
                else:
                    continue
                while p > 0 and sc[keep[p - 1]] < v:
                    keep[p] = keep[p - 1]
                    p -= 1
                keep[p] = c
            z = np.float32(0.0)
            for t in range(k):
                w[t] = math.exp(sc[keep[t]] - sc[keep[0]])
                z += w[t]
            out[b, m, :] = 0.0
            for t in range(k):
                j = idx[b, m, keep[t]]
                for d in range(Dm):
                    out[b, m, d] += (w[t] / z) * value[b, j, d]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    ops, rng = NumpyOps(), np.random.default_rng(0)
    T, C, K, Dk, Dm = 4096, 32, 8, 8, 16
    cfg = RoutingConfig(kind="topk", k=K, candidates=C)
    for N in (1_000, 100_000):
        key = rng.standard_normal((1, N, Dk)).astype(np.float32)
        val = rng.standard_normal((1, N, Dm)).astype(np.float32)
        q = rng.standard_normal((1, T, Dk)).astype(np.float32)
        idx = np.stack([rng.choice(N, C, replace=False) for _ in range(T)])[None].astype(np.int64)
        out = np.empty((1, T, Dm), np.float32)
        ref, _ = routing.route(ops, cfg, q, key, val, routing.Neighbors(idx))
        fused_route(q, key, val, idx, K, out)  # compiles
        print(f"N = {N:,}: max difference {np.abs(out - ref).max():.1e}")
        for r in range(args.rounds):
            t0 = time.process_time()
            for _ in range(args.reps):
                routing.route(ops, cfg, q, key, val, routing.Neighbors(idx))
            t1 = time.process_time()
            for _ in range(args.reps):
                fused_route(q, key, val, idx, K, out)
            t2 = time.process_time()
            ms = [1e3 * (t1 - t0) / args.reps, 1e3 * (t2 - t1) / args.reps]
            print(f"  round {r}: numpy {ms[0]:.2f} ms, fused {ms[1]:.2f} ms per tile")


if __name__ == "__main__":
    main()

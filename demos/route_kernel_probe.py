#!/usr/bin/env python
"""Issue 16 probe: the sharded runtime's sparse routing (top-8 of 32 listed senders, keys 8 wide, values 16)
as numpy computes it (``routing.route`` in tiles of 4,096 receivers: gather the candidates' keys, batched dot
products, argpartition, take_along_axis, softmax, gather the kept values, mix) against the compiled kernel
(``routing.route_listed_compiled``, ``badger_runtime/routing_kernel.c``: one loop per receiver), with the
senders' keys and values on 64-byte boundaries (``native.zeros_aligned``, what ``ShardCore`` allocates) and
16 bytes off them (where numpy's own large arrays start). Checks they agree, then times them interleaved
(thread CPU time, one thread), streaming 32 MB through the caches before each pass as the policy calls
between two rounds do. Prints ms per 4,096 receivers.

    python demos/route_kernel_probe.py [--rounds 7] [--experts 1000,100000,1000000]
"""
import argparse
import time

import numpy as np

from badger_runtime import native, routing
from badger_runtime.config import RoutingConfig
from badger_runtime.xp import NumpyOps


def placed(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of ``a`` whose data starts ``offset`` bytes past a 64-byte boundary."""
    raw = np.zeros(a.nbytes + 128, np.uint8)
    start = -raw.ctypes.data % 64 + offset
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--experts", default="1000,100000,1000000")
    args = p.parse_args(argv)
    if routing.route_kernel() is None:
        raise SystemExit("no routing kernel: a C compiler is needed (and BADGER_KERNELS must not be 0)")
    ops, cfg = NumpyOps(), RoutingConfig(kind="topk", k=8, candidates=32)
    junk = np.ones(8 << 20, np.float32)
    for N in (int(x) for x in args.experts.split(",")):
        rng = np.random.default_rng(0)
        M = min(N, 65_536)  # receivers routed per pass (one shard's worth)
        q = rng.standard_normal((1, M, 66), dtype=np.float32)[..., :8]  # a strided view, as the query heads
        key0 = rng.standard_normal((1, N, 8), dtype=np.float32)
        val0 = rng.standard_normal((1, N, 16), dtype=np.float32)
        idx = routing._draw_senders(rng, 1, N, 32)[:, :M].copy()
        out = np.zeros((1, M, 16), np.float32)
        ways = {"numpy": (placed(key0, 0), placed(val0, 0)),
                "kernel, aligned": (native.zeros_aligned(key0.shape), native.zeros_aligned(val0.shape)),
                "kernel, 16 B off": (placed(key0, 16), placed(val0, 16))}
        ways["kernel, aligned"][0][...], ways["kernel, aligned"][1][...] = key0, val0
        ref = routing.route(ops, cfg, q, key0, val0, routing.Neighbors(idx))[0]
        routing.route_listed_compiled(cfg, q, *ways["kernel, aligned"], idx, out)
        print(f"N = {N:,} senders, {M:,} receivers: max difference kernel - numpy {np.abs(out - ref).max():.1e}")
        times = {w: [] for w in ways}
        for _ in range(args.rounds):
            for way, (key, val) in ways.items():
                junk += 1.0
                t0 = time.thread_time()
                if way == "numpy":
                    for a in range(0, M, 4096):
                        routing.route(ops, cfg, q[:, a:a + 4096], key, val, routing.Neighbors(idx[:, a:a + 4096]))
                else:
                    routing.route_listed_compiled(cfg, q, key, val, idx, out)
                times[way].append((time.thread_time() - t0) / M * 4096 * 1e3)
        for way, t in times.items():
            print(f"  {way:17s} median {np.median(t):.2f} ms  ({' '.join(f'{x:.2f}' for x in t)})")


if __name__ == "__main__":
    main()

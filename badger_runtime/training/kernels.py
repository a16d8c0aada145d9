"""Compiled CPU kernels for training (issue 16): ``kernels.c``, built at first use, called through ctypes.

The GRU cell's elementwise work (its gates, forward and backward) is ~30 small ops on tensors of a
few thousand rows, each bound by memory traffic and per-op overhead; ``kernels.c`` does it in one
loop per pass (``fused_gru``). The matmuls stay torch's (``fused_gru._lin``). (The same for the inner
step's small attentions was tried and was slower than torch's batched matmuls: docs/benchmarks.md.)

Built with the system's C compiler at first use and cached (``badger_runtime/native.py``). Where no
compiler is found (or the build fails, or ``BADGER_KERNELS=0``) training runs the same functions with
torch ops, slower. Only float32 tensors on the CPU take the kernels; the torch-free runtime never imports
this module.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from .. import native

#: the compiled library (ctypes), False once it could not be built; None before the first try
_KERNEL = None
SOURCE = Path(__file__).with_name("kernels.c")
_P, _N = ctypes.c_void_p, ctypes.c_long
SIGNATURES = {"gru_forward": ([_N, _N] + [_P] * 9, None), "gru_backward": ([_N, _N] + [_P] * 10, None)}


def kernel():
    """The compiled library, or None where it cannot be built (no C compiler, a failed build, or
    ``BADGER_KERNELS=0``); built once per process, cached on disk per source and CPU."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = native.load(SOURCE, SIGNATURES, "the training kernels", "training uses torch ops") or False
    return _KERNEL or None


def usable(*tensors) -> bool:
    """Whether these tensors can go to the kernels: float32 on the CPU, and the library is built."""
    import torch

    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and kernel() is not None

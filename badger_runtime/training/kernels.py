"""Compiled CPU kernels for training (issue 16): ``kernels.c``, built at first use, called through ctypes.

The GRU cell's elementwise work (its gates, forward and backward) is ~30 small ops on tensors of a
few thousand rows, each bound by memory traffic and per-op overhead; ``kernels.c`` does it in one
loop per pass (``fused_gru``). The matmuls stay torch's (``fused_gru._lin``). (The same for the inner
step's small attentions was tried and was slower than torch's batched matmuls: docs/benchmarks.md.)

Built with the system's C compiler (``$CC``, else ``cc`` or ``gcc``) as
``cc -O3 -march=native ... -shared`` into ``$XDG_CACHE_HOME/badger/kernels`` (``~/.cache``; where that
cannot be written, the temporary folder), keyed by the source, the flags and the CPU, so a second
process loads it at once; no Python headers, about a second to build. Where no compiler is found (or
the build fails, or ``BADGER_KERNELS=0``) training runs the same functions with torch ops, slower. Only
float32 tensors on the CPU take the kernels; the torch-free runtime never imports this module.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

#: the compiled library (ctypes), False once it could not be built; None before the first try
_KERNEL = None
#: no -ffast-math: NaN and inf keep their IEEE meaning (-fno-trapping-math only lets floorf vectorise)
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared")
SOURCE = Path(__file__).with_name("kernels.c")


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


def _build():
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc or not SOURCE.exists():
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, *FLAGS, platform.machine(), _cpu_identity()]).encode())
    name = f"kernels-{key.hexdigest()[:16]}.so"
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "badger" / "kernels"
    for cache in (home, Path(tempfile.gettempdir()) / f"badger-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"):
        so = cache / name
        if so.exists():
            break
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f"{so.stem}.{os.getpid()}.tmp"
            tmp.touch()
        except OSError:  # a read-only home: the temporary folder
            continue
        try:
            subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"], check=True, capture_output=True,
                           timeout=300)
            os.replace(tmp, so)  # atomic: processes that build at once each install a whole library
        finally:
            tmp.unlink(missing_ok=True)
        break
    else:
        return None
    lib = ctypes.CDLL(str(so))
    p, n = ctypes.c_void_p, ctypes.c_long
    lib.gru_forward.argtypes = [n, n] + [p] * 9
    lib.gru_backward.argtypes = [n, n] + [p] * 10
    for fn in (lib.gru_forward, lib.gru_backward):
        fn.restype = None
    return lib


def kernel():
    """The compiled library, or None where it cannot be built (no C compiler, a failed build, or
    ``BADGER_KERNELS=0``); built once per process, cached on disk per source and CPU."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = False
        if os.environ.get("BADGER_KERNELS", "1") != "0":
            try:
                _KERNEL = _build() or False
            except (OSError, subprocess.SubprocessError) as e:
                warnings.warn(f"badger: the training kernels could not be built ({e}); training uses torch ops",
                              stacklevel=2)
    return _KERNEL or None


def usable(*tensors) -> bool:
    """Whether these tensors can go to the kernels: float32 on the CPU, and the library is built."""
    import torch

    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and kernel() is not None

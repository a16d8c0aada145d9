"""Small C kernels, built at first use with the system's C compiler and called through ctypes.

Two libraries use it: the training kernels (``training/kernels.c``: the GRU step's gates, torch-only) and
the routing kernel of the deployment runtime (``routing_kernel.c``: sparse top-k routing, numpy only).
Neither needs Python headers or torch: a source is built as ``cc -O3 -march=native ... -shared`` into
``$XDG_CACHE_HOME/badger/kernels`` (``~/.cache``; where that cannot be written, the temporary folder),
keyed by the source, the compiler, the flags and the CPU, so a second process loads it at once (about a
second to build). Where no compiler is found (``$CC``, else ``cc`` or ``gcc``), the build fails (warned)
or ``BADGER_KERNELS=0`` is set, ``load`` returns None and the caller runs the same math in torch or numpy.
ctypes releases the GIL for the call, so a kernel runs in a worker thread alongside the event loop.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

#: no -ffast-math: NaN and inf keep their IEEE meaning (-fno-trapping-math only lets floorf vectorise)
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared")


def enabled() -> bool:
    """False where ``BADGER_KERNELS=0`` turns every compiled kernel off."""
    return os.environ.get("BADGER_KERNELS", "1") != "0"


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


_BUILDING = threading.Lock()  # one build at a time in this process (shards may ask from worker threads)
#: headers the kernels include (``#include "native_math.h"``): on the include path, and part of every build's key
HEADERS = (Path(__file__).with_name("native_math.h"),)


def _build(source: Path):
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc or not source.exists():
        return None
    texts = [source.read_text(), *(h.read_text() for h in HEADERS if h.exists())]
    key = hashlib.sha256("\0".join([*texts, cc, *FLAGS, platform.machine(), _cpu_identity()]).encode())
    name = f"{source.stem}-{key.hexdigest()[:16]}.so"
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
            subprocess.run([cc, *FLAGS, f"-I{HEADERS[0].parent}", str(source), "-o", str(tmp), "-lm"], check=True,
                           capture_output=True, timeout=300)
            os.replace(tmp, so)  # atomic: processes that build at once each install a whole library
        finally:
            tmp.unlink(missing_ok=True)
        break
    else:
        return None
    return ctypes.CDLL(str(so))


def load(source: Path, signatures: dict, what: str, fallback: str):
    """Build (or find in the cache) the library of ``source`` and declare its functions
    (``signatures``: name -> (argtypes, restype)); None where it cannot be had, with a warning naming
    ``what`` could not be built and the ``fallback`` that runs instead when a build failed."""
    if not enabled():
        return None
    try:
        with _BUILDING:
            lib = _build(source)
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"badger: {what} could not be built ({e}); {fallback}", stacklevel=3)
        return None
    if lib is None:
        return None
    for fname, (argtypes, restype) in signatures.items():
        fn = getattr(lib, fname)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def zeros_aligned(shape, dtype=np.float32, align: int = 64) -> np.ndarray:
    """``np.zeros(shape, dtype)`` whose data starts on an ``align``-byte boundary (a cache line). numpy's
    large arrays start 16 bytes into a page (the allocator's header), so rows of 32 or 64 bytes, such as the
    senders' keys and values the routing kernel reads at random, each straddle two cache lines: one read
    costs two misses (N = 10^6: 1.6 against 2.5 ms per 4,096 receivers, docs/benchmarks.md)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(size + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + size].view(dtype).reshape(shape)

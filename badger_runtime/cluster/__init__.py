"""Past one machine, on Ray (the optional extra ``cluster``: ``pip install 'badger-runtime[cluster]'``).

- ``numpy_policy``: the expert policy in numpy from a flat parameter vector (no torch, no ONNX);
- ``es``: evolution strategies, the second outer loop (``badger train --outer es``): the
  population is scored by the deploy engine, in this process or on Ray workers;
- ``ray_shards``: the sharded runtime's shards as Ray actors (``RayShardedAgent``), blocks moved
  through the object store;
- ``sessions``: served sessions held by Ray actors (``badger serve --ray``), restored from their
  checkpoints when an actor dies.

Ray is imported only when one of these needs it (``require_ray``); everything else in the
package, and ES in one process, works without it. ``connect()`` starts a local Ray instance by
default or joins an existing cluster by address (``--ray ADDRESS``, e.g. ``auto`` or
``HOST:6379``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

INSTALL_HINT = "pip install 'badger-runtime[cluster]'"


def have_ray() -> bool:
    """Is Ray installed (without importing it)?"""
    if "ray" in sys.modules:  # imported already, or blocked (None)
        return sys.modules["ray"] is not None
    return importlib.util.find_spec("ray") is not None


def require_ray():
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"this needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def runtime_env() -> dict:
    """What Ray workers started for this driver need: this ``badger_runtime`` first on their path
    (a source checkout runs its own code, not an installed copy) and single-threaded BLAS (each
    worker is one CPU of the cluster; a multi-threaded BLAS on shared cores stalls in its barriers)."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path}
    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = os.environ.get(k, "1")
    return {"env_vars": env}


def connect(address: str | None = None, *, num_cpus: int | None = None, object_store_memory: int | None = None,
            log=None):
    """Ray, initialised: an existing cluster at ``address`` (``auto``: the one ``ray start`` made on
    this machine), else a local instance (``num_cpus``, ``object_store_memory`` in bytes: its
    bounds). Reuses a connection this process already has. Returns the ``ray`` module."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    kw = {"runtime_env": runtime_env(), "logging_level": "warning", "log_to_driver": False}
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=False, **kw)
    if log is not None:
        res = ray.cluster_resources()
        log(f"ray: {'joined ' + address if address else 'started a local instance'}: "
            f"{len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPUs")
    return ray


def disconnect():
    """Leave Ray (a local instance ``connect`` started stops with it)."""
    if have_ray():
        import ray

        if ray.is_initialized():
            ray.shutdown()


_LAZY = {"RayShardedAgent": "ray_shards", "RayPlacement": "sessions", "train_es": "es", "NumpyPolicy": "numpy_policy"}


def __getattr__(name):  # the main classes, imported when first asked for
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["INSTALL_HINT", "NumpyPolicy", "RayPlacement", "RayShardedAgent", "connect", "disconnect", "have_ray",
           "require_ray", "runtime_env", "train_es"]

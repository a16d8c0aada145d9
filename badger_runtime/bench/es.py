"""`badger bench es`: evolution strategies against Ray workers, and both outer loops' memory against
the horizon.

- **Speed** (``bench_es``): full ES generations (score the centre and the population, the ES
  gradient, the Adam step: ``cluster.es.step_generation``) of a config, in this process
  (workers = 0) and on W Ray workers, each after ``warmup`` untimed generations.
  ``generations_per_s`` and ``candidate_episodes_per_s`` (candidates x episodes x generations / s).
- **Memory against the horizon** (``horizon_memory``): the peak RSS, above the process's own after
  imports (a fresh subprocess per row), of one ES generation and of one BPTT training batch (the
  torch engine, back-propagating through every inner step: ``train.tbptt = 0``) with episodes of
  T steps: BPTT keeps every step's activations for the backward pass, ES keeps nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np


def _initial_theta(cfg) -> np.ndarray:
    """The ES trainer's starting parameters (the torch initialisation, seeded), or without torch a
    small random vector of the same size (speed does not depend on the values)."""
    from ..cluster.numpy_policy import flatten, n_params

    try:
        import torch

        from ..training.model import ExpertPolicy
    except ImportError:
        return (0.1 * np.random.default_rng(0).standard_normal(n_params(cfg.agent.policy))).astype(np.float32)
    torch.manual_seed(cfg.train.seed)
    return flatten(ExpertPolicy(cfg.agent.policy).state_dict())


def bench_es(cfg, workers=(0, 1, 2), generations: int = 5, warmup: int = 1, ray_address: str | None = None,
             log=None) -> dict:
    """Generations per second of ``cfg`` (an ExperimentConfig) for each worker count (0: this process)."""
    from ..cluster import disconnect
    from ..cluster.es import Adam, make_pool, step_generation

    log = log or (lambda *a: None)
    es = cfg.train.es
    rows = []
    for w in workers:
        pool = make_pool(w, ray_address, log=log)
        theta = _initial_theta(cfg)
        adam = Adam(theta.size, es.lr)
        times = []
        try:
            for g in range(warmup + generations):
                t0 = time.perf_counter()
                theta, job, _, _ = step_generation(pool, cfg, g, theta, adam)
                if g >= warmup:
                    times.append(time.perf_counter() - t0)
        finally:
            pool.close()
        sec = float(np.mean(times))
        rows.append({"workers": w, "where": pool.where, "population": es.population, "episodes": job.episodes,
                     "steps": job.steps, "experts": job.experts, "generations": len(times),
                     "sec_per_generation": round(sec, 4), "generations_per_s": round(1 / sec, 4),
                     "candidate_episodes_per_s": round((es.population + 1) * job.episodes / sec, 1)})
        log(f"workers {w}: {sec:.3f} s per generation")
    disconnect()
    from .runtime import machine

    return {"bench": "es", "config": cfg.name, "parameters": int(_initial_theta(cfg).size),
            "machine": machine(), "rows": rows}


def horizon_memory(config: str | None, overrides: list[str], horizons=(100, 300, 1000), outers=("es", "bptt"),
                   log=None) -> dict:
    """Peak memory of one ES generation and one BPTT batch against the episode length (subprocesses)."""
    log = log or (lambda *a: None)
    rows = []
    for T in horizons:
        for outer in outers:
            log(f"T = {T}: {outer}")
            job = {"config": config, "overrides": overrides, "steps": T, "outer": outer}
            cmd = [sys.executable, "-m", "badger_runtime.bench.es", json.dumps(job)]
            p = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if p.returncode != 0:
                tail = (p.stderr or "").strip().splitlines()[-2:]
                rows.append({"steps": T, "outer": outer, "error": " | ".join(tail)})
            else:
                rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return {"bench": "es-horizon-memory", "config": config, "overrides": overrides, "rows": rows}


def _memory_worker(job: dict) -> dict:
    import resource
    import tempfile

    import torch  # noqa: F401  (both outer loops' imports before the baseline)

    from ..cluster import es as es_mod
    from ..config import load_experiment
    from ..training import train as train_mod

    T = int(job["steps"])
    cfg = load_experiment(job["config"], [*job["overrides"], f"task.steps={T}", "train.horizon=[0, 0]",
                                          "train.tbptt=0", "train.continue_prob=0.0", "train.grow_prob=0.0"])
    base = _reset_peak()
    t0 = time.perf_counter()
    if job["outer"] == "es":
        theta = _initial_theta(cfg)
        es_mod.step_generation(es_mod.LocalPool(), cfg, 0, theta, es_mod.Adam(theta.size, cfg.train.es.lr))
        what = {"population": cfg.train.es.population, "episodes": cfg.train.es.episodes or cfg.train.batch_size}
    else:
        cfg.train.batches = 1
        with tempfile.TemporaryDirectory() as d:
            train_mod.train(cfg, d, progress=False, final_eval=False, log=lambda *a: None)
        what = {"batch": cfg.train.batch_size}
    peak = _status_kib("VmHWM") if base is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base = base if base is not None else 0
    return {"steps": T, "outer": job["outer"], **what, "seconds": round(time.perf_counter() - t0, 2),
            "peak_mib": round((peak - base) / 1024, 1)}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _reset_peak() -> int | None:
    """Reset this process's peak RSS (Linux: ``clear_refs`` 5) so the imports' transient peak does not
    hide what follows; returns the RSS now (KiB), or None where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS")
    except (OSError, StopIteration):
        return None


if __name__ == "__main__":
    print(json.dumps(_memory_worker(json.loads(sys.argv[1]))))

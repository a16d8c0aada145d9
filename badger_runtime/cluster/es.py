"""Evolution strategies: the second outer loop (``badger train CONFIG --out DIR --outer es``).

OpenAI-ES (Salimans et al. 2017) on the policy's flat parameter vector theta (``numpy_policy``):

- each generation draws ``P`` = ``train.es.population`` candidates in antithetic pairs
  theta +- sigma eps_k (eps_k ~ N(0, I), regenerated anywhere from (seed, generation, k));
- every candidate is scored on the **same** seeded episodes (common random numbers) by the
  deploy engine (``engine.Agent`` with numpy ops, driven by ``episodes.Driver``): its loss is the
  task's training loss weighted over the inner steps by ``train.objective``, exactly what BPTT
  minimises, but computed as deployed (hard top-k routing, the quorum vote ending a stage, any
  discrete choice) and with memory that does not grow with the horizon (nothing is kept for a
  backward pass: a 1,000-step episode costs what a 10-step one does, per step);
- the losses become centered ranks in [-0.5, 0.5] (rank shaping: robust to outliers and to the
  loss's scale), the ES gradient is sum_k (r_k+ - r_k-) eps_k / (P sigma), and Adam steps on it
  (``train.es.lr``; ``train.es.weight_decay`` adds an L2 pull).

Why not a library: the pieces are ~40 lines of numpy (``centered_ranks``, ``Adam``,
``es_gradient``), and the part that matters here is how the population is scored: all
candidates of a worker in one batched engine run (``numpy_policy.PopulationPolicy``), with
episodes seeded per generation so that one process and any number of Ray workers give the same
result for the same seed. Libraries we considered (evotorch, nevergrad, pycma's CMA-ES) bring
their own evaluation loops and, for evotorch, torch on the workers; pycma's full covariance does
not scale to 10^4 parameters anyway.

The population runs in this process (``workers = 0``, or Ray not installed) or on ``workers``
Ray actors (``--workers W``; ``--ray ADDRESS`` joins a cluster), each scoring a contiguous slice
of the candidates. Configs, checkpoints (``checkpoint.pt``, the BPTT format with ``outer: es``),
``--resume``, ``metrics.jsonl``, ``summary.json`` and ``badger export`` are the BPTT trainer's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import AgentConfig, ConfigError, ExperimentConfig, TaskConfig, to_dict
from ..episodes import Change, Driver, drive, episode_rngs, objective_terms, objective_weights, sample_batches
from .numpy_policy import NumpyPolicy, PopulationPolicy, flatten, n_params, unflatten

CENTER = -1  # the member index of the unperturbed parameters


# ---- the maths ----------------------------------------------------------------------------------------

def centered_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of ``x`` scaled to [-0.5, 0.5] (the largest gets 0.5); NaN ranks lowest."""
    x = np.where(np.isfinite(x), x, -np.inf)
    ranks = np.empty(len(x), np.float64)
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    return (ranks / max(1, len(x) - 1) - 0.5).astype(np.float32)


def noise(seed: int, gen: int, pair: int, dim: int) -> np.ndarray:
    """eps of antithetic pair ``pair`` in generation ``gen``: N(0, I) [dim], from its seed alone."""
    return np.random.default_rng([seed, 13, gen, pair]).standard_normal(dim, dtype=np.float32)


def member_theta(center: np.ndarray, sigma: float, seed: int, gen: int, member: int, eps=None) -> np.ndarray:
    """Candidate ``member`` of a generation: 2k -> theta + sigma eps_k, 2k+1 -> theta - sigma eps_k,
    ``CENTER`` -> theta (``eps``: eps_k if already drawn)."""
    if member == CENTER:
        return center
    eps = noise(seed, gen, member // 2, center.size) if eps is None else eps
    return center + (sigma if member % 2 == 0 else -sigma) * eps


def member_thetas(center: np.ndarray, sigma: float, seed: int, gen: int, members) -> np.ndarray:
    """``member_theta`` of several members [len(members), dim], each antithetic pair's eps drawn once."""
    drawn: dict[int, np.ndarray] = {}
    out = []
    for m in members:
        if m != CENTER and m // 2 not in drawn:
            drawn[m // 2] = noise(seed, gen, m // 2, center.size)
        out.append(member_theta(center, sigma, seed, gen, m, drawn.get(m // 2)))
    return np.stack(out)


def es_gradient(fitness: np.ndarray, sigma: float, seed: int, gen: int, dim: int) -> np.ndarray:
    """The ES estimate of d fitness / d theta from the P candidates' fitness (higher is better),
    rank-shaped: sum_k (r_2k - r_2k+1) eps_k / (P sigma)."""
    r = centered_ranks(fitness)
    g = np.zeros(dim, np.float32)
    for k in range(len(r) // 2):
        g += (r[2 * k] - r[2 * k + 1]) * noise(seed, gen, k, dim)
    return g / (len(r) * sigma)


class Adam:
    """Adam (Kingma & Ba) on a flat vector, descending ``grad``."""

    def __init__(self, dim: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m = np.zeros(dim, np.float32)
        self.v = np.zeros(dim, np.float32)
        self.t = 0

    def step(self, theta: np.ndarray, grad: np.ndarray) -> np.ndarray:
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        mhat = self.m / (1 - b1 ** self.t)
        vhat = self.v / (1 - b2 ** self.t)
        return (theta - self.lr * mhat / (np.sqrt(vhat) + self.eps)).astype(np.float32)

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v, "t": self.t, "lr": self.lr, "betas": list(self.betas)}

    def load_state_dict(self, d: dict):
        m, v, t = np.asarray(d["m"], np.float32), np.asarray(d["v"], np.float32), d["t"]
        if m.shape != self.m.shape or v.shape != self.v.shape or type(t) is not int or t < 0:
            raise ValueError(f"Adam state of another size: m {m.shape}, v {v.shape}, t {t!r} (expected "
                             f"{self.m.shape} and an int step >= 0)")
        self.m, self.v, self.t = m, v, t


# ---- one generation's work -----------------------------------------------------------------------------

@dataclass
class Generation:
    """What scoring candidates of generation ``gen`` needs (picklable: sent to the workers once)."""

    gen: int
    agent: AgentConfig
    task: TaskConfig  # the curriculum's settings at this generation
    dims: int
    experts: int
    steps: int
    rounds: int
    episodes: int  # per candidate
    seed: int  # of the episodes and wiring (the same for every candidate)
    noise_seed: int
    sigma: float
    weights: np.ndarray  # [steps] the objective's weight of each inner step
    log_floor: float = 0.0  # train.log_floor: > 0 weighs log(error + floor) per step
    changes: tuple[Change, ...] = field(default_factory=tuple)
    same_newcomers: bool = True  # train.es.same_newcomers: every candidate's episodes grow the same newcomers


def generation(cfg: ExperimentConfig, gen: int) -> Generation:
    """Generation ``gen``'s draws: a pure function of (config, train.seed, gen), so a resumed run and
    any number of workers score the same candidates on the same episodes."""
    from ..curriculum import task_at

    tr, es = cfg.train, cfg.train.es
    task, _ = task_at(cfg, gen)
    rng = np.random.default_rng([tr.seed, 11, gen])
    d = int(rng.integers(task.dims[0], task.dims[1] + 1))
    n = int(rng.integers(task.experts[0], task.experts[1] + 1))
    rounds = int(rng.integers(tr.rounds[0], tr.rounds[1] + 1))
    lo, hi = tr.horizon
    steps = int(rng.integers(lo, hi + 1)) if hi else task.steps
    changes: tuple[Change, ...] = ()
    if tr.grow_prob and steps > 1 and rng.random() < tr.grow_prob:
        changes = (Change(int(rng.integers(1, steps)), "add", tr.newcomers(rng, n),
                          "clone" if tr.grows_clones(rng) else "fresh"),)
    return Generation(gen, cfg.agent, task, d, n, steps, rounds, es.episodes or tr.batch_size,
                      int(rng.integers(2**31)), tr.seed, es.sigma, objective_weights(tr.objective, steps),
                      tr.log_floor, changes, es.same_newcomers)


def evaluate_members(job: Generation, center: np.ndarray, members) -> np.ndarray:
    """Score candidates ``members`` of a generation in one batched engine run (torch-free).

    Returns [len(members), 2]: each candidate's objective loss (lower is better) and its loss at
    the last inner step, both means over the generation's episodes."""
    from ..engine import Agent
    from ..xp import NumpyOps

    members = [int(m) for m in members]
    P, E = len(members), job.episodes
    thetas = member_thetas(center, job.sigma, job.noise_seed, job.gen, members)
    policy = PopulationPolicy(job.agent.policy, thetas, E)
    rngs = episode_rngs(job.seed)
    _, ep, wiring = next(sample_batches(job.task, job.agent, dims=job.dims, experts=job.experts, episodes=E,
                                       seed=job.seed, steps=job.steps, chunk=E, rngs=rngs))
    idx = np.tile(np.arange(E), P)  # member m: episodes [m E, (m + 1) E), the same E episodes each
    ep, wiring = ep.select(idx), wiring.select(idx)
    ops = NumpyOps()
    # the P candidates' episodes are P copies of the same E: their newcomers too (common random numbers)
    copies = P if job.same_newcomers else 1
    agent = Agent(policy, job.agent, ops=ops, check_inputs=False).start(ep.interface, wiring, rng=rngs[1],
                                                                         copies=copies)
    traj = drive(agent, Driver(ops, ep, job.steps, rounds=job.rounds, changes=job.changes, with_metrics=False,
                               seed=job.seed))
    losses = np.asarray(traj.losses, np.float64).reshape(job.steps, P, E).mean(axis=2)  # [T, P]
    return np.stack([job.weights @ objective_terms(losses, job.log_floor), losses[-1]], axis=1)


class ESWorker:
    """Scores slices of the population (a Ray actor's class; ``LocalPool`` calls the function directly)."""

    def evaluate(self, job: Generation, center: np.ndarray, members) -> np.ndarray:
        return evaluate_members(job, center, members)

    def ping(self) -> bool:
        return True


# ---- where the population runs -----------------------------------------------------------------------

class LocalPool:
    """The whole population in this process."""

    workers = 0
    where = "this process"

    def evaluate(self, job: Generation, center: np.ndarray, members) -> np.ndarray:
        return evaluate_members(job, center, members)

    def close(self):
        pass


class RayPool:
    """``workers`` Ray actors, each scoring a contiguous slice of the candidates."""

    def __init__(self, workers: int, address: str | None = None, log=None):
        from . import connect

        ray = connect(address, log=log)
        self.ray, self.workers = ray, int(workers)
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        share = min(1.0, cpus / self.workers)  # more workers than CPUs: they share them
        cls = ray.remote(num_cpus=share)(ESWorker)
        self.actors = [cls.remote() for _ in range(self.workers)]
        ray.get([a.ping.remote() for a in self.actors])
        self.where = f"{self.workers} Ray worker(s) on {len(ray.nodes())} node(s)"

    def evaluate(self, job: Generation, center: np.ndarray, members) -> np.ndarray:
        ray = self.ray
        job_ref, center_ref = ray.put(job), ray.put(center)
        parts = [p for p in np.array_split(np.asarray(members), self.workers) if len(p)]
        futures = [a.evaluate.remote(job_ref, center_ref, p.tolist()) for a, p in zip(self.actors, parts)]
        return np.concatenate(ray.get(futures), axis=0)

    def close(self):
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []


def make_pool(workers: int, address: str | None = None, log=print):
    """Ray workers when asked for and Ray is installed; otherwise this process (``--ray`` without Ray
    is an error: the user named a cluster)."""
    from . import have_ray, require_ray

    if address is not None:
        require_ray()
        return RayPool(max(1, workers), address, log)
    if workers <= 0:
        return LocalPool()
    if not have_ray():
        log(f"ray is not installed: the population is scored in this process ({workers} workers asked for)")
        return LocalPool()
    return RayPool(workers, None, log)


# ---- the trainer ----------------------------------------------------------------------------------------

def step_generation(pool, cfg: ExperimentConfig, gen: int, theta: np.ndarray, adam: Adam):
    """One generation: score the centre and the population (``pool``), step Adam on the rank-shaped ES
    gradient. Returns (new theta, the generation, scores [1 + P, 2] (centre first), the gradient)."""
    es = cfg.train.es
    job = generation(cfg, gen)
    scores = pool.evaluate(job, theta, [CENTER, *range(es.population)])
    grad = es_gradient(-scores[1:, 0], job.sigma, job.noise_seed, job.gen, theta.size)  # fitness = -loss
    if es.weight_decay:
        grad = grad - es.weight_decay * theta
    return adam.step(theta, -grad), job, scores, grad  # descend the loss = ascend the fitness


# train settings only the BPTT outer loop reads (its loss terms, optimizer, truncation, carried agents): ES says
# which of them a run sets, rather than leave them silently unused (its own are under train.es; train.lr, which
# every config derived from a BPTT one sets, is named in train.es's docs instead)
BPTT_ONLY = ("adam_eps", "lr_decay", "clip", "vote_weight", "spread_weight", "tbptt", "continue_prob",
             "guard_weight", "guard_smoothing")


def train_es(cfg: ExperimentConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
             final_eval: bool = True, log=print, workers: int | None = None, ray_address: str | None = None) -> dict:
    """Train by evolution strategies; writes ``out_dir/{checkpoint.pt, metrics.jsonl, config.json,
    summary.json}`` as ``training.train.train`` does (see the module doc). ``workers`` and
    ``ray_address`` override ``train.es.workers`` (they do not change the result)."""
    import torch

    from ..training.train import (CHECKPOINT_FORMAT, _atomic_save, initial_policy, open_run, progress_bar,
                                  checkpoint_counters, checkpoint_entry)

    if workers is not None:
        cfg.train.es.workers = int(workers)
    cfg.validate().check_new_run()
    tr, es, spec = cfg.train, cfg.train.es, cfg.agent.policy
    if tr.trainable:
        raise ConfigError(f"train.trainable {tr.trainable} is for --outer bptt: ES perturbs every weight")
    default = type(tr)()
    ignored = [f"train.{k} = {getattr(tr, k)}" for k in BPTT_ONLY if getattr(tr, k) != getattr(default, k)]
    if ignored:  # BPTT's settings (a quorum config sets vote_weight): said once, not refused
        log(f"ES scores whole episodes by the task's loss and steps by train.es: {', '.join(ignored)} "
            "(BPTT's only) left out")
    out = Path(out_dir)
    ck_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    policy = initial_policy(cfg)  # the BPTT trainer's starting point: same seed, train.init or train.init_from
    theta = flatten(policy.state_dict())
    dim = n_params(spec)
    adam = Adam(dim, es.lr)
    first, wall = 0, 0.0
    ck = open_run(out, cfg, resume=resume, outer="es", ignore=("train.es.workers",), log=log)
    if ck is not None:
        with checkpoint_entry(ck_path, "theta"):
            theta = np.asarray(ck.get("theta"), np.float32)
            if theta.shape != (dim,) or not np.isfinite(theta).all():
                raise ValueError(f"expected {dim} finite numbers, got shape {theta.shape}")
        with checkpoint_entry(ck_path, "optimizer"):
            adam.load_state_dict(ck.get("optimizer"))
        first, wall = checkpoint_counters(ck, ck_path, cfg)
        log(f"resumed from {ck_path} at generation {first}")

    def save(gen: int):
        model = {name: torch.from_numpy(np.array(v)) for name, v in unflatten(spec, theta).items()}
        _atomic_save({"format": CHECKPOINT_FORMAT, "outer": "es", "config": to_dict(cfg), "model": model,
                      "theta": theta, "optimizer": adam.state_dict(), "batch": gen, "wall_seconds": wall}, ck_path)

    pool = make_pool(es.workers, ray_address, log)
    log(f"ES: {dim:,} parameters, population {es.population}, sigma {es.sigma}, lr {es.lr}; scored in {pool.where}")
    bar = progress_bar(cfg.name, tr.batches, first) if progress else None
    window, t_last = [], time.perf_counter()
    try:
        with open(metrics_path, "a") as mf:
            for g in range(first, tr.batches):
                t0 = time.perf_counter()
                theta, job, scores, grad = step_generation(pool, cfg, g, theta, adam)
                wall += time.perf_counter() - t0
                window.append((scores[0, 0], scores[0, 1], float(np.mean(scores[1:, 0])),
                               float(np.min(scores[1:, 0])), float(np.linalg.norm(grad)), job.steps, job.episodes))
                if (g + 1) % tr.log_every == 0 or g + 1 == tr.batches:
                    dt = time.perf_counter() - t_last
                    t_last = time.perf_counter()
                    w = np.asarray(window, np.float64)
                    row = {"batch": g + 1, "generation": g + 1, "loss": float(w[:, 0].mean()),
                           "final_loss": float(w[:, 1].mean()), "population_loss": float(w[:, 2].mean()),
                           "best_loss": float(w[:, 3].mean()), "grad_norm": float(w[:, 4].mean()),
                           "lr": es.lr, "sigma": es.sigma, "steps": int(w[:, 5].max()),
                           "sec_per_batch": dt / len(window), "generations_per_s": len(window) / dt,
                           "episodes_per_s": float(w[:, 6].sum()) * (es.population + 1) / dt,
                           "wall_seconds": round(wall, 1), "workers": pool.workers,
                           "addresses": job.task.addresses}
                    mf.write(json.dumps(row) + "\n")
                    mf.flush()
                    window = []
                    if bar is not None:
                        bar[0].update(bar[1], completed=g + 1,
                                      info=f"loss {row['loss']:.3f} final {row['final_loss']:.3f}")
                if (g + 1) % tr.ckpt_every == 0 or g + 1 == tr.batches:
                    save(g + 1)
        if tr.batches == 0:  # no generation: the starting point (train.init, train.init_from) is the checkpoint
            save(0)
    finally:
        if bar is not None:
            bar[0].stop()
        pool.close()
    trained = tr.batches - first
    summary = {"name": cfg.name, "outer": "es", "batches": tr.batches, "generations": tr.batches,
               "population": es.population, "workers": pool.workers, "wall_seconds": round(wall, 1),
               "sec_per_batch": round(wall / tr.batches, 4) if trained > 0 else None, "seed": tr.seed}
    if final_eval and cfg.train.eval_episodes:
        summary["eval"] = final_evaluation(cfg, theta)
        shown = {k: v for k, v in summary["eval"].items() if k.startswith("final_") and isinstance(v, float)}
        log("final eval: " + " ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def final_evaluation(cfg: ExperimentConfig, theta: np.ndarray) -> dict:
    """The BPTT trainer's final evaluation (same settings and seed), in the deploy engine."""
    from ..engine import numpy_ops
    from ..evaluation import evaluate
    from ..tasks import make_task

    task = make_task(cfg.task)
    d, n = task.default_dims(), task.default_experts()
    pol = NumpyPolicy(cfg.agent.policy, theta, cfg.agent, cfg.task, name=cfg.name)
    return evaluate(numpy_ops(), pol, cfg.agent, cfg.task, dims=d, experts=n, episodes=cfg.train.eval_episodes,
                    seed=10_000 + cfg.train.seed)


__all__ = ["Adam", "CENTER", "ESWorker", "Generation", "LocalPool", "RayPool", "centered_ranks", "es_gradient",
           "evaluate_members", "final_evaluation", "generation", "make_pool", "member_theta", "member_thetas", "noise",
           "step_generation", "train_es"]

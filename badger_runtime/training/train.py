"""The outer loop: learn the shared expert policy across many guessing-game tasks.

Adam on the inner-loop errors, back-propagated through every inner step and
communication round; gradient clipping; a curriculum of stages (the paper's
fixed addresses first, then random ones); JSONL metrics; atomic checkpoints with
resume; a seeded final evaluation.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, ExperimentConfig, Stage, TaskConfig, from_dict, to_dict
from ..evaluation import evaluate, fixed_address_table
from ..rollout import grow as grow_agents
from ..rollout import initial_state, rollout, sample_wiring
from ..tasks import guessing
from .model import ExpertPolicy, torch_ops

CHECKPOINT_FORMAT = "badger-checkpoint/1"
MAX_AGE = 5000  # continued agents (train.continue_prob) are reset past this many inner steps


def objective_weights(kind: str, steps: int) -> torch.Tensor:
    if kind == "last":
        w = torch.zeros(steps)
        w[-1] = 1.0
    elif kind == "mean":
        w = torch.ones(steps)
    else:  # weighted: later steps count more, every step counts
        w = torch.arange(1, steps + 1, dtype=torch.float32)
    return w / w.sum()


def stage_at(cfg: ExperimentConfig, batch: int) -> Stage | None:
    for s in cfg.train.stages:
        if batch < s.until:
            return s
    return None


def task_at(cfg: ExperimentConfig, batch: int) -> tuple[TaskConfig, Stage | None]:
    s = stage_at(cfg, batch)
    task = cfg.task
    if s is not None:
        task = replace(task, dims=s.dims or task.dims, experts=s.experts or task.experts,
                       addresses=s.addresses or task.addresses)
        if task.addresses == "fixed" and s.change_every:
            task = replace(task, address_seed=cfg.task.address_seed + 1000 + batch // s.change_every)
    return task, s


def lr_at(cfg: ExperimentConfig, batch: int) -> float:
    lr = cfg.train.lr
    for at, value in sorted(cfg.train.lr_decay):
        if batch >= at:
            lr = value
    return lr


def _episode_loss(cfg: ExperimentConfig, ops, policy, ep, wiring, steps: int, rounds: int, state=None, guess=None,
                  start: int = 0, grow=None):
    """Roll out one batch and back-propagate its loss (in chunks of ``tbptt`` steps if set).

    ``state``/``guess``/``start`` continue agents from an earlier batch (their state is
    detached: no gradient crosses batches). ``grow = (step, (n, sources), rng)`` adds n
    experts before that step (``sources`` None: fresh). Returns (error per step [T]
    detached, total loss, final state, final guess, final wiring, episode)."""
    chunk = cfg.train.tbptt or steps
    weights = objective_weights(cfg.train.objective, steps)
    cuts = set(range(chunk, steps, chunk))  # where the graph is cut (truncated BPTT)
    bounds = sorted(cuts | ({grow[0]} if grow else set()) | {steps})
    per_step, total, loss, t0 = [], 0.0, 0.0, 0
    for t1 in bounds:
        if grow and t0 == grow[0]:  # add experts to the running agents (no retraining in deployment)
            state = state or initial_state(ops, policy, wiring)
            wiring, state = grow_agents(ops, policy, cfg.agent, grow[2], wiring, state, grow[1][0], grow[1][1])
            ep = ep.with_experts(wiring.n_experts)
        res = rollout(ops, policy, cfg.agent, ep, wiring, steps=t1 - t0, rounds=rounds, state=state,
                      prev_guess=guess, t0=start + t0, with_vote_loss=bool(cfg.train.vote_weight))
        errs = res.errors.mean(dim=1)
        loss = loss + (weights[t0:t1] * errs).sum()
        if cfg.train.vote_weight:
            loss = loss + cfg.train.vote_weight * res.vote_loss * (t1 - t0) / steps
        per_step.append(errs.detach())
        state, guess = res.state, res.guesses[-1]
        if t1 in cuts or t1 == steps:
            loss.backward()
            total += float(loss.detach())
            loss = 0.0
            # cut the graph: the next chunk starts from the detached state
            state = type(res.state)(res.state.h.detach(), res.state.heads.detach())
            guess = guess.detach()
        t0 = t1
    return torch.cat(per_step), torch.tensor(total), state, guess, wiring, ep


def _atomic_save(obj, path: Path):
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """Load and check a checkpoint; raises ConfigError with the reason if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many kinds for a corrupt file
        raise ConfigError(f"{path} is not a readable checkpoint: {e}") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a badger checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return ck


def policy_from_checkpoint(ck: dict) -> tuple[ExpertPolicy, ExperimentConfig]:
    cfg = from_dict(ExperimentConfig, ck["config"]).validate()
    policy = ExpertPolicy(cfg.agent.policy)
    try:
        policy.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise ConfigError(f"checkpoint weights do not match its config: {e}") from None
    policy.eval()
    return policy, cfg


def train(cfg: ExperimentConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
          final_eval: bool = True, log=print) -> dict:
    """Train; writes ``out_dir/{checkpoint.pt, metrics.jsonl, config.json, summary.json}``."""
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ck_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    policy = ExpertPolicy(cfg.agent.policy)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.train.lr)
    start, wall = 0, 0.0
    if cfg.train.init_from:
        src_policy, _ = policy_from_checkpoint(load_checkpoint(cfg.train.init_from))
        try:
            policy.load_state_dict(src_policy.state_dict())
        except RuntimeError as e:
            raise ConfigError(f"train.init_from: {cfg.train.init_from} does not fit this policy: {e}") from None
    if resume and ck_path.exists():
        ck = load_checkpoint(ck_path)
        if ck["config"] != to_dict(cfg):
            raise ConfigError(f"cannot resume {ck_path}: it was trained with another config")
        policy.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        rng.bit_generator.state = ck["rng"]
        torch.set_rng_state(ck["torch_rng"])
        start, wall = ck["batch"], ck["wall_seconds"]
        log(f"resumed from {ck_path} at batch {start}")
    elif metrics_path.exists():
        metrics_path.unlink()
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    ops = torch_ops()
    spec = cfg.agent.policy

    def save(batch):
        _atomic_save({"format": CHECKPOINT_FORMAT, "config": to_dict(cfg), "model": policy.state_dict(),
                      "optimizer": opt.state_dict(), "rng": rng.bit_generator.state,
                      "torch_rng": torch.get_rng_state(), "batch": batch, "wall_seconds": wall}, ck_path)

    bar = None
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TextColumn("{task.fields[info]}"), TimeRemainingColumn())
        bar.start()
        tid = bar.add_task(cfg.name, total=cfg.train.batches, completed=start, info="")
    window, t_last, carry = [], time.perf_counter(), None
    with open(metrics_path, "a") as mf:
        for b in range(start, cfg.train.batches):
            t0 = time.perf_counter()
            task, _ = task_at(cfg, b)
            lo, hi = cfg.train.horizon
            steps = int(rng.integers(lo, hi + 1)) if hi else task.steps
            go_on = (carry is not None and carry[0] == task and carry[5] < MAX_AGE
                     and carry[7] <= 2 * task.experts[1] and rng.random() < cfg.train.continue_prob)
            if go_on:  # the same agents live on; a jumping task draws fresh targets (a jump)
                _, ep, wiring, state, guess, start, d, n, rounds = carry
                if task.jump_every[1]:  # new targets (indexed by absolute step), the same addresses
                    fresh = guessing.sample(rng, task, cfg.train.batch_size, d, n, spec.addr_dim,
                                            steps=start + steps, addresses=fixed_address_table(task, d, spec.addr_dim))
                    ep = replace(ep, targets=fresh.targets, jumps=fresh.jumps)
            else:
                d = int(rng.integers(task.dims[0], task.dims[1] + 1))
                n = int(rng.integers(task.experts[0], task.experts[1] + 1))
                rounds = int(rng.integers(cfg.train.rounds[0], cfg.train.rounds[1] + 1))
                ep = guessing.sample(rng, task, cfg.train.batch_size, d, n, spec.addr_dim, steps=steps,
                                     addresses=fixed_address_table(task, d, spec.addr_dim))
                wiring = sample_wiring(rng, cfg.agent, cfg.train.batch_size, n)
                state, guess, start = None, None, 0
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, b)
            opt.zero_grad(set_to_none=True)
            grow = None
            if cfg.train.grow_prob and steps > 1 and rng.random() < cfg.train.grow_prob:
                n_new = int(rng.integers(1, n + 1))
                sources = rng.integers(0, n, size=n_new) if rng.random() < 0.5 else None
                grow = (int(rng.integers(1, steps)), (n_new, sources), rng)
            per_step, loss, state, guess, wiring, ep = _episode_loss(cfg, ops, policy, ep, wiring, steps, rounds,
                                                                     state, guess, start, grow)
            n = wiring.n_experts
            carry = (task, ep, wiring, state, guess, start + steps, d, n, rounds) if cfg.train.continue_prob else None
            gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.train.clip)
            if not math.isfinite(float(gnorm)):
                log(f"batch {b}: non-finite gradient, step skipped")
                opt.zero_grad(set_to_none=True)
            else:
                opt.step()
            wall += time.perf_counter() - t0
            window.append((float(loss.detach()), float(per_step[-1].detach()), d, n))
            if (b + 1) % cfg.train.log_every == 0 or b + 1 == cfg.train.batches:
                dt = time.perf_counter() - t_last
                t_last = time.perf_counter()
                row = {"batch": b + 1, "loss": float(np.mean([w[0] for w in window])),
                       "final_mse": float(np.mean([w[1] for w in window])), "lr": lr_at(cfg, b),
                       "sec_per_batch": dt / len(window), "episodes_per_s": len(window) * cfg.train.batch_size / dt,
                       "wall_seconds": round(wall, 1), "addresses": task.addresses}
                mf.write(json.dumps(row) + "\n")
                mf.flush()
                window = []
                if bar is not None:
                    bar.update(tid, completed=b + 1, info=f"loss {row['loss']:.3f} final {row['final_mse']:.3f}")
            if (b + 1) % cfg.train.ckpt_every == 0 or b + 1 == cfg.train.batches:
                save(b + 1)
    if bar is not None:
        bar.stop()
    summary = {"name": cfg.name, "batches": cfg.train.batches, "wall_seconds": round(wall, 1),
               "sec_per_batch": wall / max(1, cfg.train.batches - start) if cfg.train.batches > start else None,
               "seed": cfg.train.seed}
    if final_eval:
        d = cfg.task.dims[1]
        n = cfg.task.experts[0] if cfg.task.experts[0] == cfg.task.experts[1] else 20
        with torch.no_grad():
            summary["eval"] = evaluate(ops, policy, cfg.agent, cfg.task, dims=d, experts=n,
                                       episodes=cfg.train.eval_episodes, seed=10_000 + cfg.train.seed)
        log(f"final eval (d={d}, N={n}): final_mse {summary['eval']['final_mse']:.4f}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

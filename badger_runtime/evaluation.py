"""Seeded evaluation of a policy on the guessing game, with baselines on the same episodes.

Works for any policy object the rollout accepts: a torch ``ExpertPolicy`` (with
torch ops) or an ONNX policy (numpy ops). Output errors are 3 x MSE, averaged over
episodes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from .config import AgentConfig, TaskConfig
from .rollout import rollout, sample_wiring
from .tasks import guessing


def episode_rngs(seed: int):
    """Separate streams for the task and for the agent's wiring, so the same seed gives
    the same episodes whatever the number of experts."""
    return np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])


def fixed_address_table(task: TaskConfig, d: int, addr_dim: int) -> np.ndarray | None:
    if task.addresses != "fixed":
        return None
    return guessing.fixed_addresses(task.address_seed, d, addr_dim)


@dataclass
class Episodes:
    errors: np.ndarray  # [T, E] 3 x MSE of each step's output
    guesses: np.ndarray  # [T, E, d]
    rounds: np.ndarray  # [T, E] communication rounds used
    targets: np.ndarray  # [E, d] (the first targets when they jump)
    traces: list  # [(episode, wiring, Rollout)] of the first chunk when recorded


def run_episodes(ops, policy, agent: AgentConfig, task: TaskConfig, *, dims: int, experts: int, episodes: int,
                 seed: int, steps: int | None = None, rounds: int | None = None, chunk: int = 250,
                 record: bool = False) -> Episodes:
    """Roll out ``episodes`` seeded episodes (in chunks) with the shared inner-loop math."""
    steps = steps or task.steps
    rng_task, rng_wire = episode_rngs(seed)
    addresses = fixed_address_table(task, dims, agent.policy.addr_dim)
    errs, guesses, used, tgts, traces = [], [], [], [], []
    done = 0
    while done < episodes:
        b = min(chunk, episodes - done)
        ep = guessing.sample(rng_task, task, b, dims, experts, agent.policy.addr_dim, steps=steps, addresses=addresses)
        wiring = sample_wiring(rng_wire, agent, b, experts)
        out = rollout(ops, policy, agent, ep, wiring, steps=steps, rounds=rounds, record=record)
        errs.append(ops.to_numpy(out.errors))
        guesses.append(ops.to_numpy(out.guesses))
        used.append(ops.to_numpy(out.rounds))
        tgts.append(ep.targets if ep.targets.ndim == 2 else ep.targets[0])
        if record and not traces:
            traces = [(ep, wiring, out)]
        done += b
    return Episodes(np.concatenate(errs, axis=1), np.concatenate(guesses, axis=1), np.concatenate(used, axis=1),
                    np.concatenate(tgts, axis=0), traces)


def evaluate(ops, policy, agent: AgentConfig, task: TaskConfig, *, dims: int, experts: int, episodes: int = 1000,
             seed: int = 0, steps: int | None = None, rounds: int | None = None, baselines: bool = True) -> dict:
    """The JSON report of ``badger eval``: the agent's errors by step and the baselines."""
    steps = steps or task.steps
    t0 = time.perf_counter()
    res = run_episodes(ops, policy, agent, task, dims=dims, experts=experts, episodes=episodes, seed=seed,
                       steps=steps, rounds=rounds)
    return make_report(agent, task, res.errors, res.rounds, res.targets, dims=dims, experts=experts, seed=seed,
                       seconds=time.perf_counter() - t0, baselines=baselines)


def make_report(agent: AgentConfig, task: TaskConfig, errs: np.ndarray, used: np.ndarray, targets: np.ndarray, *,
                dims: int, experts: int, seed: int, seconds: float, baselines: bool = True) -> dict:
    """The evaluation report from errors [T, E], rounds used [T, E] and the targets [E, d]
    (whichever runtime computed them), with the baselines on the same targets."""
    from .tasks import baselines as bl

    steps = errs.shape[0]
    report = {
        "task": dataclasses.asdict(task) | {"dims": dims, "experts": experts},
        "episodes": int(errs.shape[1]),
        "seed": seed,
        "steps": steps,
        "routing": agent.routing.kind,
        "agreement": agent.agreement.rule,
        "mse_by_step": errs.mean(axis=1).tolist(),
        "final_mse": float(errs[-1].mean()),
        "final_mse_sem": float(errs[-1].std() / np.sqrt(errs.shape[1])),
        "rounds_mean": float(used.mean()),
        "seconds": round(seconds, 3),
    }
    if baselines and task.jump_every[1] == 0:
        zero = bl.zero_guess(targets, steps)
        report["chance"] = float(zero[-1])
        report["random_guess"] = float(bl.random_guess(targets, steps, np.random.default_rng(seed))[-1])
        report["mean_solution"] = float(bl.mean_solution(targets, steps)[-1])
        report["optimizer"] = bl.tuned(task.feedback, targets, steps, seed=seed)
    return report

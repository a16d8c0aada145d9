"""Agents that run for ever: long-horizon stability and re-adaptation after target jumps.

- ``horizon_report``: error at steps 20, 100, 1000, 10000 of one long episode, and the
  largest state entry seen (the card's bound says every entry stays in (-1, 1)).
- ``jump_report``: the non-stationary guessing game (targets jump every U[a, b] steps, the
  agent is never reset). For each jump: the error just before it, and the recovery time
  (inner steps from the jump until the error is back under ``threshold``). Compared with
  the same agent reset at every jump, and the tuned classical optimizer restarted at every
  jump: both face a fresh episode after each jump, so their recovery time is that of a
  fresh episode, measured here on fresh episodes of the same targets distribution.

Torch-free: runs the shared rollout with numpy ops and an ONNX policy.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .engine import Agent
from .episodes import Driver, drive, episode_rngs
from .rollout import rollout, sample_wiring
from .tasks import baselines, guessing, make_task
from .xp import NumpyOps

OPS = NumpyOps()


@dataclasses.dataclass
class LongRun:
    """What ``long_rollout`` saw: the task's per-step metrics ({name: [T, E]}), where the task's
    targets jumped ([T, E] bool, or None), the largest |state| entry, the episode (the last
    chunk's when it was drawn chunk by chunk), and the d and N it ran at."""

    metrics: dict[str, np.ndarray]
    jumps: np.ndarray | None
    max_abs_state: float
    episode: object
    dims: int
    experts: int


def long_rollout(policy, *, steps: int, episodes: int, seed: int, dims: int | None = None,
                 experts: int | None = None, jump_every: tuple[int, int] = (0, 0), chunk_steps: int = 500,
                 task=None, upfront: bool | None = None, agent_config=None) -> LongRun:
    """Run ``episodes`` agents for ``steps`` inner steps without reset, on ``task`` (default: the
    policy's own; a guessing task gets ``jump_every``), with the task's default N and dims unless
    given. ``upfront`` (default: when the targets jump) draws the task for all steps at once;
    otherwise it goes on chunk by chunk (``Task.extend``). ``agent_config``: the agent's settings
    (default: the policy's own; e.g. another routing, as an ablation)."""
    task = task if task is not None else policy.task
    cfg = agent_config if agent_config is not None else policy.agent
    if hasattr(task, "jump_every"):
        task = dataclasses.replace(task, jump_every=tuple(jump_every))
    tk = make_task(task)
    d = dims or tk.default_dims()
    n = experts or tk.experts_for(d)
    if upfront is None:
        upfront = bool(getattr(task, "jump_every", (0, 0))[1])
    rng_task, rng_wire = episode_rngs(seed)
    ep = tk.sample(rng_task, episodes, dims=d, experts=n, steps=steps if upfront else min(chunk_steps, steps),
                   addr_dim=policy.spec.addr_dim)
    # the measurement of what happens past the horizon: asked for explicitly
    agent = Agent(policy, cfg, past_horizon=True).start(ep.interface, sample_wiring(rng_wire, cfg, episodes, n))
    out, vals, jumps, hmax = None, [], [], 0.0
    for t0 in range(0, steps, chunk_steps):
        k = min(chunk_steps, steps - t0)
        if t0 and not upfront:
            ep = tk.extend(rng_task, ep, t0 + k)
        traj = drive(agent, Driver(OPS, ep, k, t0=t0, prev_output=out, with_losses=False))
        out = traj.outputs[-1]
        hmax = max(hmax, float(np.abs(agent.state.h).max()))
        vals.append(traj.metrics)
        if getattr(ep, "jumps", None) is not None and not upfront:
            jumps.append(ep.jumps)
    jumps = getattr(ep, "jumps", None) if upfront else (np.concatenate(jumps, axis=0) if jumps else None)
    metrics = {m: np.concatenate([v[m] for v in vals], axis=0) for m in vals[0]}
    return LongRun(metrics, jumps, hmax, ep, d, n)


def horizon_report(policy, *, steps: int = 10_000, episodes: int = 100, seed: int = 0,
                   checkpoints=(20, 100, 1000, 10_000), dims: int | None = None, experts: int | None = None) -> dict:
    """The guessing game's error (any other task: the metric its loss follows) at the checkpoints,
    at ``dims`` outputs with ``experts`` experts (default: the task's, as ``long_rollout``)."""
    run = long_rollout(policy, steps=steps, episodes=episodes, seed=seed, dims=dims, experts=experts)
    errs, hmax = run.metrics[make_task(policy.task).loss_name], run.max_abs_state
    mean = errs.mean(axis=1)
    settled = float(mean[min(19, steps - 1)])
    return {
        "policy": policy.name, "steps": steps, "episodes": episodes, "seed": seed, "dims": run.dims,
        "experts": run.experts,
        "error_at": {str(s): float(mean[s - 1]) for s in checkpoints if s <= steps},
        "max_error_after_20": float(mean[20:].max()) if steps > 20 else settled,
        "max_abs_state": hmax,
        "finite": bool(np.isfinite(errs).all()),
    }


def recovery_times(errs: np.ndarray, jumps: np.ndarray, threshold: float):
    """Per jump: (error just before it, steps to get back under threshold or None if censored)."""
    T, E = errs.shape
    before, rec, censored = [], [], 0
    for e in range(E):
        js = np.flatnonzero(jumps[:, e])
        ends = list(js[1:]) + [T]
        for j, end in zip(js, ends):
            before.append(errs[j - 1, e])
            below = np.flatnonzero(errs[j:end, e] < threshold)
            if below.size:
                rec.append(int(below[0]))
            else:
                censored += 1
    return np.asarray(before), np.asarray(rec), censored


def fresh_recovery(errs: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
    """Recovery time of fresh episodes: first step under threshold (errs [T, E])."""
    rec, censored = [], 0
    for e in range(errs.shape[1]):
        below = np.flatnonzero(errs[:, e] < threshold)
        if below.size:
            rec.append(int(below[0]))
        else:
            censored += 1
    return np.asarray(rec), censored


def _summary(rec: np.ndarray, censored: int) -> dict:
    n = len(rec) + censored
    return {"mean": float(rec.mean()) if len(rec) else None, "median": float(np.median(rec)) if len(rec) else None,
            "p90": float(np.percentile(rec, 90)) if len(rec) else None, "recovered": len(rec), "jumps": n,
            "censored_fraction": censored / max(1, n)}


def jump_report(policy, *, steps: int = 1000, episodes: int = 200, seed: int = 0, jump_every=(20, 60),
                threshold: float = 0.05, fresh_steps: int = 60) -> dict:
    run = long_rollout(policy, steps=steps, episodes=episodes, seed=seed, jump_every=jump_every)
    errs, jumps, hmax = run.metrics["error"], run.jumps, run.max_abs_state
    before, rec, cens = recovery_times(errs, jumps, threshold)
    # the same agent, reset at every jump: a fresh episode after each jump
    fresh_task = dataclasses.replace(policy.task, jump_every=(0, 0))
    f_errs = long_rollout(dataclasses.replace(policy, task=fresh_task), steps=fresh_steps,
                          episodes=episodes * 4, seed=seed + 1).metrics["error"]
    f_rec, f_cens = fresh_recovery(f_errs, threshold)
    # the tuned optimizer restarted at every jump
    targets = np.random.default_rng([seed, 2]).uniform(-1, 1, size=(episodes * 4, policy.task.dims[1]))
    opt = baselines.tuned(policy.task.feedback, targets.astype(np.float32), fresh_steps, seed=seed)
    o_curve = np.asarray(opt["mse_by_step"])
    agent = _summary(rec, cens)
    reset = _summary(f_rec, f_cens)
    return {
        "policy": policy.name, "steps": steps, "episodes": episodes, "seed": seed, "jump_every": list(jump_every),
        "threshold": threshold,
        "error_before_jump": {"mean": float(before.mean()), "median": float(np.median(before))},
        "recovery_steps": {"agent_never_reset": agent, "agent_reset_at_jumps": reset,
                           "optimizer_restarted": {"name": opt["name"], "param": opt["param"],
                                                   "mean_curve_steps_to_threshold":
                                                       baselines.steps_to_reach(o_curve, threshold)}},
        "ratio_to_reset": (agent["mean"] / reset["mean"]) if agent["mean"] and reset["mean"] else None,
        "max_abs_state": hmax,
        "error_by_step_first_episode": [float(v) for v in errs[:, 0]],
        "mean_error_by_step": [float(v) for v in errs.mean(axis=1)],
    }


def jump_traces(policy, *, steps: int = 300, seed: int = 0, jump_every=(20, 60), episodes: int = 3) -> dict:
    """Error over time of a few never-reset agents across target jumps, with the same agent
    reset at every jump and the tuned optimizer restarted at every jump, on the same targets."""
    run = long_rollout(policy, steps=steps, episodes=episodes, seed=seed, jump_every=jump_every)
    errs, jumps = run.metrics["error"], run.jumps
    task = dataclasses.replace(policy.task, jump_every=tuple(jump_every))
    d, n = task.dims[1], make_task(task).default_experts()
    rng_task, rng_wire = episode_rngs(seed)
    ep = make_task(task).sample(rng_task, episodes, dims=d, experts=n, steps=steps,
                                addr_dim=policy.spec.addr_dim)  # the same draws
    fresh = np.random.default_rng([seed, 3])
    opt = baselines.tuned(policy.task.feedback, fresh.uniform(-1, 1, (256, d)).astype(np.float32), 20, seed=seed)
    lr = opt["param"].get("lr")
    out = {"steps": steps, "jump_every": list(jump_every), "optimizer": opt["name"], "optimizer_param": opt["param"],
           "episodes": []}
    for e in range(episodes):
        starts = [0] + list(np.flatnonzero(jumps[:, e]))
        reset, restarted = np.empty(steps), np.empty(steps)
        for a, b in zip(starts, starts[1:] + [steps]):
            seg = guessing.Episode(ep.feedback, ep.targets[a, e][None], ep.interface.select(slice(e, e + 1)))
            w = sample_wiring(fresh, policy.agent, 1, n)
            r = rollout(OPS, policy, policy.agent, seg, w, steps=b - a)
            reset[a:b] = r.losses[:, 0]
            if lr is not None:
                restarted[a:b] = baselines.adam(seg.targets, b - a, lr)
            else:
                restarted[a:b] = baselines.nelder_mead(seg.targets, b - a, opt["param"]["scale"])
        out["episodes"].append({"agent": errs[:, e].tolist(), "agent_reset_at_jumps": reset.tolist(),
                                "optimizer_restarted": restarted.tolist(), "jumps": starts[1:]})
    return out


def plot_jump_traces(traces: dict, path, title: str = ""):
    from .demo.figures import save_png, subplots

    eps = traces["episodes"]
    fig, axes = subplots(len(eps), 1, figsize=(11, 2.6 * len(eps)), sharex=True, squeeze=False)
    for ax, e in zip(axes[:, 0], eps):
        t = np.arange(len(e["agent"]))
        ax.plot(t, e["optimizer_restarted"], color="tab:gray", lw=1, label=f"{traces['optimizer']} restarted at jumps")
        ax.plot(t, e["agent_reset_at_jumps"], color="tab:orange", lw=1.2, label="agent reset at jumps")
        ax.plot(t, e["agent"], color="tab:blue", lw=1.6, label="agent never reset")
        for j in e["jumps"]:
            ax.axvline(j, color="k", lw=0.6, ls=":")
        ax.axhline(0.05, color="tab:red", lw=0.8, ls="--", label="recovered (0.05)")
        ax.set_yscale("log")
        ax.set_ylim(1e-4, 20)
        ax.set_ylabel("error (3 x MSE)")
    axes[0, 0].legend(loc="upper right", fontsize=8, ncol=4)
    axes[-1, 0].set_xlabel("inner step (dotted: the targets jump)")
    fig.suptitle(title or "Targets jump, the agent is never reset")
    fig.tight_layout()
    save_png(fig, path, dpi=120)

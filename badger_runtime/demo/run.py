"""The sub-demos of `badger demo`: the paper's experiments re-run with the shipped policies.

Each ``demo_*`` function takes ``DemoOptions``, rolls out seeded episodes with the shipped
ONNX policies (numpy + onnxruntime; torch is never imported), computes the baselines on
the same episodes (``tasks/baselines.py``), writes its figures into ``options.out`` and
returns a JSON-able dict: ``{"demo", "policy", "runtime", "figures", "numbers", "notes",
"seconds"}``; a demo whose policy is missing returns ``{"demo", "skipped": reason}``.

- ``main``: the default policy on its own task (paper Fig. 9 setting): loss by step vs
  tuned Adam and the mean solution, messages and rounds; Fig. 9 and a Fig. 8-style plot.
- ``guessing``: Fig. 6 (10 rollouts of the last-step policy) and Fig. 9 (the converge
  policy vs tuned Adam, log scale).
- ``dimensions``: Fig. 7 (final loss vs d = 1..10) with the dimension policy.
- ``growing``: final loss vs N = 5 .. 160 experts (beyond the trained range) and a hot-add
  of experts mid-episode with ``engine.Agent.add_experts``.
- ``communication``: Fig. 8 (routing attention among the 3 experts over the inner loop).
- ``fewshot``: the few-shot classification policy learning iris from scratch, one example per
  inner step (never trained on iris): one episode step by step, and the accuracy by examples
  seen against nearest class mean, 1-NN, online logistic regression and chance on the same
  episodes.

Episodes run through ``_run_guessing``: the one place that picks the actor runtime
(``actors/episodes.py``; the main demo's default) or the batched engine (the sub-demos, and
whatever needs attention weights recorded).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import routing
from ..engine import numpy_ops
from ..episodes import schedule
from ..evaluation import run_episodes
from ..policy_card import OnnxPolicy, PolicyError, load_policy, resolve_policy
from ..config import ConfigError
from ..tasks import baselines as bl
from ..tasks import make_task, task_class
from ..tasks.guessing import GuessingTask
from . import (DEFAULT_DIMS_POLICY, DEFAULT_FEWSHOT_POLICY, DEFAULT_GROW_POLICY, DEFAULT_ONE_EXPERT_POLICY,
               DEFAULT_POLICY, DEMOS, figures)

@dataclass
class DemoOptions:
    out: Path = Path("demo-output")
    quick: bool = False  # a few seconds per demo (tests): fewer episodes, lower resolution
    seed: int = 0
    policy: str = DEFAULT_POLICY
    one_expert_policy: str = DEFAULT_ONE_EXPERT_POLICY
    dims_policy: str = DEFAULT_DIMS_POLICY
    grow_policy: str = DEFAULT_GROW_POLICY
    fewshot_policy: str = DEFAULT_FEWSHOT_POLICY
    episodes: int | None = None  # override the number of evaluation episodes of every demo
    runtime: str = "actors"  # the main demo's runtime: 'actors' or 'engine' (sub-demos use the engine)
    dpi: int | None = None
    log: Callable[[str], None] = field(default=lambda msg: None)

    def n(self, full: int, quick: int) -> int:
        if self.episodes is not None:
            return self.episodes
        return quick if self.quick else full

    @property
    def figure_dpi(self) -> int:
        return self.dpi or (72 if self.quick else figures.DPI)


def find_policy(path: str | Path) -> Path | None:
    """The policy file at ``path``, or the shipped policy of that name (any folder); None if neither."""
    try:
        return resolve_policy(path)
    except PolicyError:
        return None


def _load(path: str | Path) -> OnnxPolicy:
    """The policy at ``path`` (or the shipped or retired one of that name), with a note on stderr if it is retired."""
    from ..cli.common import note_retired

    found = find_policy(path)
    pol = load_policy(found if found is not None else path)  # load_policy explains a missing file
    note_retired(pol)
    return pol


def _default_experts(task) -> int:
    """The paper's N = 20 where the policy was trained with it, else the nearest trained N (``Task.default_experts``,
    what `badger eval` runs)."""
    return make_task(task).default_experts()


# --- the switch: actor runtime or batched engine -------------------------------------------


@dataclass
class GuessingRun:
    errors: np.ndarray  # [T, E] 3 x MSE of each step's output
    guesses: np.ndarray  # [T, E, d]
    rounds: np.ndarray  # [T, E] communication rounds used per step
    targets: np.ndarray  # [E, d]
    messages: int  # expert -> expert messages: one per (sender, receiver that may hear it) per round
    runtime: str
    traces: list = field(default_factory=list)  # evaluation.Episodes.traces when recorded
    message_stats: dict = field(default_factory=dict)  # the actor runtime's counters (sent/delivered/dropped...)


ACTORS, ENGINE = "actors", "engine"


def _run_guessing(policy: OnnxPolicy, task, *, dims: int, experts: int, episodes: int, seed: int,
                  record: bool = False, runtime: str = ENGINE) -> GuessingRun:
    """Run seeded guessing-game episodes. THE SWITCH between the two runtimes lives here.

    ``runtime="actors"``: the actor runtime (every expert a trio task, messages as msgpack
    frames, policy calls micro-batched per round), which also counts the messages it sends,
    delivers and drops. ``runtime="engine"`` (or when something must be recorded): the batched
    engine (numpy + onnxruntime, one call per round for every expert of every episode), ~20x
    faster. Both are ``evaluation.run_episodes``: the same episodes and wiring from the seed,
    the same errors (to float rounding)."""
    if not issubclass(task_class(task.name), GuessingTask):  # (an AttributeError deep in the demo, before)
        raise ConfigError(f"badger demo draws the paper's guessing-game figures: {policy.name} is a {task.name!r} "
                          f"policy; evaluate it with `badger eval --policy {policy.path}` (`badger demo fewshot` "
                          "shows a few-shot policy)")
    which = ACTORS if runtime == ACTORS and not record else ENGINE
    res = run_episodes(numpy_ops(), policy, policy.agent, task, dims=dims, experts=experts, episodes=episodes,
                       seed=seed, record=record, runtime=which)
    targets = np.concatenate([ep.first_targets() for ep in res.episodes], axis=0)
    if which == ACTORS:
        stats = dict(res.runtime)
        return GuessingRun(res.errors, res.outputs, res.rounds, targets, int(stats["sent"]),
                           "actors (trio tasks, msgpack messages, micro-batched policy calls)", message_stats=stats)
    return GuessingRun(res.errors, res.outputs, res.rounds, targets, res.messages,
                       "engine (numpy + onnxruntime, batched)", res.traces)


# --- helpers ---------------------------------------------------------------------------------


def _baselines(task, targets: np.ndarray, steps: int, seed: int, quick: bool) -> dict:
    tune = None
    if quick:  # fewer tuning episodes: Nelder-Mead runs one Python generator per episode
        tune = np.random.default_rng(seed + 12345).uniform(-1, 1, size=(64, targets.shape[1])).astype(np.float32)
    return {
        "chance": float(bl.zero_guess(targets, steps)[-1]),
        "mean_solution": float(bl.mean_solution(targets, steps)[-1]),
        "optimizer": bl.tuned(task.feedback, targets, steps, seed=seed, tune_targets=tune),
    }


def _opt_label(opt: dict) -> str:
    (k, v), = opt["param"].items()
    name = {"adam": "Adam", "nelder_mead": "Nelder-Mead"}.get(opt["name"], opt["name"])
    return f"tuned {name} ({k}={v:.3g})"


def _stack_traces(run: GuessingRun):
    """(route [T, B, N, N], push [T, B, d, N], messages [T, B, N, Dm]) of the recorded chunk."""
    _, wiring, traj = run.traces[0]
    st = traj.infos
    route = np.stack([np.asarray(s.route_weights) for s in st])
    T, B, N, C = route.shape
    if C != N or isinstance(wiring.route_mask, routing.Neighbors):  # sparse: weights over listed senders
        dense = np.zeros((T, B, N, N), route.dtype)
        idx = np.broadcast_to(wiring.route_mask.idx[None], route.shape)
        t_, b_, r_ = np.meshgrid(np.arange(T), np.arange(B), np.arange(N), indexing="ij")
        np.add.at(dense, (t_[..., None], b_[..., None], r_[..., None], idx), route)
        route = dense
    return (route, np.stack([np.asarray(s.push_weights) for s in st]), np.stack([np.asarray(s.messages_sent) for s in st]))


def _sem(x: np.ndarray) -> float:
    return float(x.std() / np.sqrt(max(1, x.size)))


def _finish(name: str, t0: float, **kw) -> dict:
    return {"demo": name, **kw, "seconds": round(time.perf_counter() - t0, 2)}


def _setting(pol: OnnxPolicy, dims: int, experts: int, episodes: int, seed: int) -> str:
    fb = {"one_expert": "per-dim error to expert 0 only", "per_dim": "per-dim error", "scalar": "scalar error"}
    return (f"{pol.name}: N={experts} experts, d={dims}, {fb.get(pol.task.feedback, pol.task.feedback)}, "
            f"{episodes} episodes, seed {seed}")


def _communication_numbers(route: np.ndarray) -> dict:
    """route [T, B, N, N] -> per-step mean self weight and mean weight on expert 0 (the one
    that hears the error in the one-expert setting) from the other experts."""
    T, B, N, _ = route.shape
    self_w = np.einsum("tbii->tb", route) / N
    to0 = route[:, :, 1:, 0].mean(axis=(1, 2)) if N > 1 else np.zeros(T)
    return {"self_weight_by_step": [round(float(v), 4) for v in self_w.mean(axis=1)],
            "others_to_expert0_by_step": [round(float(v), 4) for v in to0]}


def _communication_figure(o: DemoOptions, pol: OnnxPolicy, run: GuessingRun, path: Path, setting: str,
                          what: str) -> tuple[Path, dict]:
    route, push, _ = _stack_traces(run)
    comm = _communication_numbers(route)
    to0 = comm["others_to_expert0_by_step"]
    fig = figures.fig8_communication(
        path, route=route[:, 0], route_mean=route.mean(axis=1), push_mean=push.mean(axis=1),
        title=f"Communication among experts over the inner loop ({what})",
        caption=("Paper Fig. 8 visualises the dynamics of communication among the three experts of the Fig. 6 "
                 "agent. Ours: the routing attention weights (softmax of query . key between experts, "
                 f"receiver x sender) at every inner step; {setting}. The weight the other experts give to expert "
                 f"0 (the one that hears the error) goes from {to0[0]:.2f} at step 0 to {to0[-1]:.2f} at step "
                 f"{len(to0) - 1}."),
        dpi=o.figure_dpi)
    return fig, comm


# --- main: the default policy on its own task ----------------------------------------------------


def demo_main(o: DemoOptions) -> dict:
    t0 = time.perf_counter()
    pol = _load(o.policy)
    task = pol.task
    dims, experts, T = task.dims[1], _default_experts(task), task.steps
    E = o.n(500, 20)
    o.log(f"main: {pol.name}, {E} episodes of the guessing game (N={experts}, d={dims}, {T} steps)")
    run = _run_guessing(pol, task, dims=dims, experts=experts, episodes=E, seed=o.seed, runtime=o.runtime)
    notes = []
    if o.runtime == ACTORS and not run.runtime.startswith(ACTORS):
        notes.append("the actor runtime (badger_runtime/actors/episodes.py) is not installed: ran the batched engine")
    base = _baselines(task, run.targets, T, o.seed, o.quick)
    agent = run.errors.mean(axis=1)
    opt = base["optimizer"]
    setting = _setting(pol, dims, experts, E, o.seed)
    figs = [figures.fig9_convergence(
        o.out / "main_convergence.png", agent=agent, agent_episodes=run.errors, optimizer=opt["mse_by_step"],
        optimizer_label=_opt_label(opt), mean_solution=base["mean_solution"], chance=base["chance"],
        title=f"Fast convergence: {pol.name} vs {_opt_label(opt)}",
        caption=("Paper Fig. 9: trained on the mean error over the inner loop, the agent converges on the target "
                 "as fast as possible and then stays there, instead of oscillating as in Fig. 6. "
                 f"Ours: {setting}, run by the {run.runtime.split(' (')[0]} runtime; Adam's learning rate tuned "
                 "on separate episodes."),
        dpi=o.figure_dpi)]
    rec = _run_guessing(pol, task, dims=dims, experts=experts, episodes=min(E, 200), seed=o.seed, record=True)
    fig8, comm = _communication_figure(o, pol, rec, o.out / "main_communication.png",
                                       _setting(pol, dims, experts, min(E, 200), o.seed), pol.name)
    figs.append(fig8)
    numbers = {
        "episodes": E, "dims": dims, "experts": experts, "steps": T,
        "agent_mse_by_step": [float(v) for v in agent],
        "agent_final": float(agent[-1]), "agent_final_sem": _sem(run.errors[-1]),
        "optimizer": {k: opt[k] for k in ("name", "param", "final_mse", "mse_by_step")},
        "mean_solution": base["mean_solution"], "chance": base["chance"],
        "messages_total": run.messages, "messages_per_episode": run.messages / E, "message_stats": run.message_stats,
        "rounds_total": int(run.rounds.sum()), "rounds_per_step": float(run.rounds.mean()),
        "communication": comm,
    }
    return _finish("main", t0, policy=str(pol.path), runtime=run.runtime, figures=[str(f) for f in figs],
                   numbers=numbers, notes=notes)


# --- guessing: Fig. 6 and Fig. 9 ----------------------------------------------------------------


def demo_guessing(o: DemoOptions) -> dict:
    t0 = time.perf_counter()
    one, conv = _load(o.one_expert_policy), _load(o.policy)
    figs, numbers = [], {}

    # Fig. 6: 10 rollouts of the last-step policy, with the messages between its experts.
    task = one.task
    dims, experts, T = task.dims[1], _default_experts(task), task.steps
    rec = _run_guessing(one, task, dims=dims, experts=experts, episodes=10, seed=o.seed, record=True)
    _, _, msgs = _stack_traces(rec)
    g, tg = rec.guesses, rec.targets
    inputs = np.concatenate([np.zeros_like(g[:1]), g[:-1] - tg[None]], axis=0)  # feedback seen at each step
    E = o.n(1000, 100)
    full_one = _run_guessing(one, task, dims=dims, experts=experts, episodes=E, seed=o.seed)
    one_curve = full_one.errors.mean(axis=1)
    figs.append(figures.fig6_rollouts(
        o.out / "fig6_rollouts.png", outputs=g, targets=tg, inputs=inputs, messages=msgs,
        title=f"10 rollouts of {one.name} on the guessing game (N={experts}, d={dims}, error to expert 0 only)",
        caption=("Paper Fig. 6: trained on the last-step error, the expert policy oscillates the agent's output "
                 f"until it hits the target at step {T} of the inner loop; only one expert receives the error, so "
                 "it must communicate it to the other two. Ours: orange = outputs, red = targets, green = the "
                 "feedback (output - target) expert 0 receives, one line style per dimension; blue dashed = each "
                 "expert's message projected on its first principal component. Mean final error over "
                 f"{E} episodes: {one_curve[-1]:.2g} (seed {o.seed})."),
        dpi=o.figure_dpi))
    numbers["fig6"] = {"policy": one.name, "episodes": E, "agent_mse_by_step": [float(v) for v in one_curve],
                       "agent_final": float(one_curve[-1]), "peak_mse": float(one_curve.max()),
                       "peak_step": int(one_curve.argmax())}

    # Fig. 9: the converge policy vs tuned Adam on the same episodes.
    task = conv.task
    dims, experts, T = task.dims[1], _default_experts(task), task.steps
    run = _run_guessing(conv, task, dims=dims, experts=experts, episodes=E, seed=o.seed)
    base = _baselines(task, run.targets, T, o.seed, o.quick)
    agent, opt = run.errors.mean(axis=1), base["optimizer"]
    same = one.task.dims == conv.task.dims and one.task.feedback == conv.task.feedback
    figs.append(figures.fig9_convergence(
        o.out / "fig9_convergence.png", agent=agent, agent_episodes=run.errors, optimizer=opt["mse_by_step"],
        optimizer_label=_opt_label(opt), mean_solution=base["mean_solution"], chance=base["chance"],
        other=one_curve if same else None, other_label=f"{one.name} (last-step trained, Fig. 6)",
        title=f"Fast convergence: {conv.name} vs {_opt_label(opt)}",
        caption=("Paper Fig. 9: in the Fig. 6 setting but trained to converge as fast as possible, the agent "
                 "finds a different strategy: rather than oscillating, it converges on the target and stays "
                 f"there. Ours: {_setting(conv, dims, experts, E, o.seed)}; the purple line is the Fig. 6 policy "
                 "on the same episodes."),
        dpi=o.figure_dpi))
    numbers["fig9"] = {"policy": conv.name, "episodes": E, "agent_mse_by_step": [float(v) for v in agent],
                       "agent_final": float(agent[-1]), "agent_final_sem": _sem(run.errors[-1]),
                       "optimizer": {k: opt[k] for k in ("name", "param", "final_mse", "mse_by_step")},
                       "mean_solution": base["mean_solution"], "chance": base["chance"],
                       "steps_to_beat_mean_solution": bl.steps_to_reach(agent, base["mean_solution"]),
                       "optimizer_steps_to_beat_mean_solution": bl.steps_to_reach(opt["mse_by_step"],
                                                                                   base["mean_solution"])}
    return _finish("guessing", t0, policy=[str(one.path), str(conv.path)], runtime=run.runtime,
                   figures=[str(f) for f in figs], numbers=numbers, notes=[])


# --- dimensions: Fig. 7 -----------------------------------------------------------------------------


def _missing_dims(o: DemoOptions) -> str:
    return (f"dimension policy {o.dims_policy} not found: the Fig. 7 policy (dimensions-v6, scalar feedback, "
            "trained d in [1, 6], N in [5, 40]) is not installed; pass --dims-policy PATH to use another")


def demo_dimensions(o: DemoOptions) -> dict:
    t0 = time.perf_counter()
    path = find_policy(o.dims_policy)
    if path is None:
        return _finish("dimensions", t0, skipped=_missing_dims(o))
    pol = _load(path)
    task = dataclasses.replace(pol.task, addresses="random")  # new addresses every episode
    experts = _default_experts(pol.task)
    T, E = task.steps, o.n(500, 48)
    ds = list(range(1, 11))
    rows = []
    runtime = ""
    for d in ds:
        run = _run_guessing(pol, task, dims=d, experts=experts, episodes=E, seed=o.seed)
        runtime = run.runtime
        base = _baselines(task, run.targets, T, o.seed, o.quick)
        fin = run.errors[-1]
        rows.append({"d": d, "agent_final": float(fin.mean()), "agent_final_sem": _sem(fin),
                     "chance": base["chance"], "mean_solution": base["mean_solution"],
                     "optimizer_final": base["optimizer"]["final_mse"], "optimizer": base["optimizer"]["name"],
                     "optimizer_param": base["optimizer"]["param"]})
        o.log(f"dimensions: d={d} agent {fin.mean():.3f}")
    col = lambda k: np.array([r[k] for r in rows])  # noqa: E731
    opt_name = {"adam": "Adam", "nelder_mead": "Nelder-Mead"}.get(rows[0]["optimizer"], rows[0]["optimizer"])
    lo, hi = pol.task.dims
    fig = figures.fig7_dimensions(
        o.out / "fig7_dimensions.png", dims=ds, agent=col("agent_final"), agent_sem=col("agent_final_sem"),
        mean_solution=col("mean_solution"), optimizer=col("optimizer_final"),
        optimizer_name=f"{opt_name} ({T} evaluations)", trained=(lo, hi),
        title=f"Generalisation over the number of dimensions: {pol.name} (N={experts}, {T} steps)",
        caption=("Paper Fig. 7: a policy trained on d in [3, 6] (random addresses, N in [5, 40]) generalises "
                 "well to lower d and up to d = 10, staying better than chance (solid black) and than the "
                 "solution that ignores the dimensions (dashed: all outputs set to the target mean). "
                 f"Ours: scalar error feedback, {E} episodes per d, seed {o.seed}; errors at the last inner step, "
                 "bars = standard error."),
        dpi=o.figure_dpi)
    return _finish("dimensions", t0, policy=str(pol.path), runtime=runtime, figures=[str(fig)],
                   numbers={"experts": experts, "episodes": E, "trained_dims": [lo, hi], "by_dims": rows}, notes=[])


# --- growing: more experts, and experts added mid-episode -----------------------------------------------


def demo_growing(o: DemoOptions) -> dict:
    t0 = time.perf_counter()
    notes = []
    pol = _load(o.grow_policy)
    from ..tasks import task_class

    task = task_class(pol.task.name).evaluation_config(pol.task)  # e.g. without the target jumps of training
    n_lo, n_hi = task.experts
    T = task.steps
    many = task.dims[1] > 10  # a policy of many outputs (the scale task)
    if not many:  # the paper's setting: N = 5 .. 160
        Ns = [5, 10, 20, 40, 80, 160] if n_lo >= 5 else [n_lo, 5, 10, 20, 40, 80, 160]
        # d >= 2: at d = 1 the mean-solution is exact, so no curve there says anything about growing
        dims_list = sorted({max(task.dims[0], 2), max(task.dims[1], 2)})
    else:  # a policy of many experts: from one expert to 10x the trained maximum, at its largest d
        Ns = sorted({1, max(1, n_lo), n_hi // 4 or 1, n_hi, 2 * n_hi, 4 * n_hi, 10 * n_hi})
        dims_list = [task.dims[1]]
    if o.quick:
        dims_list = dims_list[:1]
        Ns = Ns[:: max(1, len(Ns) // 4)]
    E = o.n(64 if many else 300, 4 if many else 16)
    curves, chance, mean_sol, rows = {}, {}, {}, []
    runtime = ""
    for d in dims_list:
        finals, sems = [], []
        for n in Ns:
            run = _run_guessing(pol, task, dims=d, experts=n, episodes=E, seed=o.seed)
            runtime = run.runtime
            fin = run.errors[-1]
            finals.append(float(fin.mean()))
            sems.append(_sem(fin))
            rows.append({"d": d, "experts": n, "agent_final": finals[-1], "agent_final_sem": sems[-1],
                         "messages_per_episode": run.messages / E})
            o.log(f"growing: d={d} N={n} agent {finals[-1]:.3f}")
        label = f"d={d}"
        curves[label] = (np.array(finals), np.array(sems))
        chance[label] = float(bl.zero_guess(run.targets, T)[-1])
        mean_sol[label] = float(bl.mean_solution(run.targets, T)[-1])

    # Hot-add: N0 experts for the first half of the episode, then more experts (no retraining).
    d = dims_list[0]
    n0 = n_lo
    n1 = 4 * n0 if n_lo >= 4 else 2 * n0
    add_at = T // 2
    Eh = o.n(300, 16)

    def errors(n, changes=()):  # one batch of Eh episodes: the draws of engine.Agent.reset(batch=Eh)
        return run_episodes(numpy_ops(), pol, pol.agent, task, dims=d, experts=n, episodes=Eh, seed=o.seed,
                            chunk=Eh, changes=changes).errors

    grow = dict(allow_harmful=True)  # a measurement: it shows what joining does, harm included
    hot = {
        f"N={n0} throughout": errors(n0),
        f"N={n0}, +{n1 - n0} cloned experts at step {add_at}": errors(n0, schedule(add_at, n1 - n0, "clone", **grow)),
        f"N={n0}, +{n1 - n0} fresh experts at step {add_at}": errors(n0, schedule(add_at, n1 - n0, "fresh", **grow)),
        f"N={n1} throughout": errors(n1),
    }
    hot_mean = {k: v.mean(axis=1) for k, v in hot.items()}
    hot_rows = [{"variant": k, "before_add": float(v[add_at - 1]), "final": float(v[-1]),
                 "final_sem": _sem(hot[k][-1])} for k, v in hot_mean.items()]
    lo_d, hi_d = task.dims
    trained_txt = (f"trained at N in [{n_lo}, {n_hi}], d in [{lo_d}, {hi_d}]" if (n_lo, lo_d) != (n_hi, hi_d)
                   else f"trained at N={n_lo}, d={lo_d}")
    fig = figures.growing(
        o.out / "growing_experts.png", experts=Ns, curves=curves, chance=chance, mean_solution=mean_sol,
        trained=(n_lo, n_hi), hot=hot_mean, add_step=add_at,
        hot_note=f"hot-add with engine.Agent.add_experts (d={d}, {Eh} episodes)",
        title=f"Growing without retraining: {pol.name} ({trained_txt})",
        caption=("Paper, Scalability and Growing: since all experts share one policy, an agent can be grown "
                 "without retraining by cloning or instantiating experts; the paper observes that on related "
                 "tasks the asymptotic performance scales with the number of experts even beyond those seen in "
                 f"training. Ours: left, the error at the last of {T} steps for N up to {max(Ns)} ({E} episodes each, "
                 f"seed {o.seed}); right, experts added at step {add_at} of a running episode, keeping every "
                 "other expert's state." + (" NOTE: " + notes[0] if notes else "")),
        dpi=o.figure_dpi)
    numbers = {"episodes": E, "by_experts": rows, "chance": chance, "mean_solution": mean_sol,
               "trained_experts": [n_lo, n_hi], "hot_add": {"dims": d, "episodes": Eh, "add_at": add_at,
                                                             "from": n0, "to": n1, "variants": hot_rows}}
    return _finish("growing", t0, policy=str(pol.path), runtime=runtime, figures=[str(fig)], numbers=numbers,
                   notes=notes)


# --- communication: Fig. 8 -----------------------------------------------------------------------------


def demo_communication(o: DemoOptions) -> dict:
    t0 = time.perf_counter()
    pol = _load(o.one_expert_policy)
    task = pol.task
    dims, experts = task.dims[1], _default_experts(task)
    E = min(o.n(200, 32), 250)
    run = _run_guessing(pol, task, dims=dims, experts=experts, episodes=E, seed=o.seed, record=True)
    fig, comm = _communication_figure(o, pol, run, o.out / "fig8_communication.png",
                                      _setting(pol, dims, experts, E, o.seed), pol.name)
    agent = run.errors.mean(axis=1)
    numbers = {"episodes": E, "dims": dims, "experts": experts, "agent_final": float(agent[-1]),
               "mean_solution": float(bl.mean_solution(run.targets, task.steps)[-1]), **comm}
    return _finish("communication", t0, policy=str(pol.path), runtime=run.runtime, figures=[str(fig)],
                   numbers=numbers, notes=[])


# --- fewshot: learning iris from scratch ------------------------------------------------------------


def demo_fewshot(o: DemoOptions) -> dict:
    """The few-shot policy on iris (never seen in training; features standardised online), one
    example per inner step, against the classical online learners on the same episodes."""
    t0 = time.perf_counter()
    path = find_policy(o.fewshot_policy)
    if path is None:
        return _finish("fewshot", t0, skipped=f"few-shot policy {o.fewshot_policy} not found; pass --policy PATH")
    from ..evaluation import evaluate
    from ..tasks import fewshot

    pol = _load(path)
    C, T = 3, 50
    task = dataclasses.replace(fewshot.FewShotTask.evaluation_config(pol.task), dataset="iris", steps=T,
                               baselines="fast" if o.quick else "all").validate()
    experts = fewshot.FewShotTask(task).default_experts()
    E = o.n(300, 16)
    # one episode, step by step (the first episode of the seeded evaluation below)
    one = run_episodes(numpy_ops(), pol, pol.agent, task, dims=C, experts=experts, episodes=1, seed=o.seed, steps=T)
    ep = one.episodes[0]
    scores, labels = one.outputs[:, 0], ep.ys[:, 0]
    steps = [{"step": t, "features": [round(float(v), 3) for v in ep.xs[t, 0]], "label": int(labels[t]),
              "scores": [round(float(v), 3) for v in scores[t]], "prediction": int(scores[t].argmax()),
              "correct": bool(scores[t].argmax() == labels[t])} for t in range(T)]
    rep = evaluate(numpy_ops(), pol, pol.agent, task, dims=C, experts=experts, episodes=E, seed=o.seed)
    curves = {"agent": rep["accuracy_by_step"], **rep["baselines"]}
    online = {"agent": rep["online_accuracy"], **rep["baselines_online"]}
    fig = figures.fewshot_learning(
        o.out / "fewshot_iris.png", curves=curves, agent_label="agent", scores=scores, labels=labels,
        smooth=1, title=f"Learning iris from scratch: {pol.name} (N={experts}, {C} classes, features standardised online)",
        caption=(f"The policy was meta-trained on digits 0-5 and never saw iris. Each inner step it sees one flower "
                 "(4 features) and the label of the previous one, and scores the 3 classes; its weights are "
                 "frozen, it learns only in its experts' states and messages. Left: accuracy of the prediction "
                 f"made before each label is given, mean over {E} episodes (seed {o.seed}), next to classical "
                 "online learners on the same episodes and example order. Right: one episode."),
        dpi=o.figure_dpi)
    numbers = {"episodes": E, "experts": experts, "classes": C, "steps": T, "dataset": "iris",
               "online_accuracy": online, "accuracy_by_step": curves, "logreg_lr": rep.get("logreg_lr"),
               "episode": steps, "episode_accuracy": float(np.mean([s["correct"] for s in steps]))}
    return _finish("fewshot", t0, policy=str(pol.path), runtime="engine (numpy + onnxruntime, batched)",
                   figures=[str(fig)], numbers=numbers, notes=[])


RUNNERS = {"main": demo_main, "guessing": demo_guessing, "dimensions": demo_dimensions, "growing": demo_growing,
           "communication": demo_communication, "fewshot": demo_fewshot}


def run_demo(name: str, options: DemoOptions) -> dict:
    if name not in RUNNERS:
        raise ValueError(f"unknown demo {name!r}; choose one of {', '.join(DEMOS)}")
    options.out = Path(options.out)
    options.out.mkdir(parents=True, exist_ok=True)
    return RUNNERS[name](options)

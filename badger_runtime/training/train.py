"""The outer loop: learn the shared expert policy across many episodes of a task family.

Adam on the task's inner-loop losses, back-propagated through every inner step and
communication round (the batched runtime, ``engine.Agent``, with torch ops, fed by the same
``episodes.Driver`` as every evaluation); gradient clipping; a curriculum of stages (the
paper's fixed addresses first, then random ones); JSONL metrics; atomic checkpoints with
resume; a seeded final evaluation.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import random
import time
from pathlib import Path

import numpy as np
import torch

from .. import episodes
from ..config import ConfigError, ExperimentConfig, flat_settings, from_dict, to_dict
from ..curriculum import task_at
from ..engine import Agent
from ..episodes import Driver, drive
from ..evaluation import evaluate
from ..rollout import AgentState, clone_sources, sample_wiring
from ..tasks import make_task, task_class
from .model import ExpertPolicy, torch_ops

CHECKPOINT_FORMAT = "badger-checkpoint/1"
MAX_AGE = 5000  # continued agents (train.continue_prob) are reset past this many inner steps
MAX_CARRY_BYTES = 64 << 20  # the carried agents are checkpointed up to this size, pickled (resume bit for bit)


def objective_weights(kind: str, steps: int) -> torch.Tensor:
    return torch.from_numpy(episodes.objective_weights(kind, steps))


def lr_at(cfg: ExperimentConfig, batch: int) -> float:
    lr = cfg.train.lr
    for at, value in sorted(cfg.train.lr_decay):
        if batch >= at:
            lr = value
    return lr


def guard_loss(losses: torch.Tensor, reference: torch.Tensor, groups: np.ndarray, smoothed: dict | None = None,
               smoothing: float = 0.0) -> torch.Tensor:
    """Sum over groups g of relu(d_g), d_g the mean over the predictions in g of (losses - reference):
    zero while the policy does at least as well as the reference in every group (``groups`` [T, B],
    -1: none). With ``smoothed`` (a dict it updates: group -> moving average of d_g over the calls, i.e. batches,
    or with ``train.tbptt`` the chunks of each batch; ``smoothing`` its decay per call) a group's d_g counts while
    its average is above 0: the batch's own noise no longer decides, so groups the policy does not lose stop
    pulling (a per-batch relu of a noisy mean is positive on average even where the policy loses nothing)."""
    diff, g = losses - reference, torch.from_numpy(np.asarray(groups))
    total = losses.new_zeros(())
    for k in map(int, np.unique(groups[groups >= 0])):
        d = diff[g == k].mean()
        if smoothed is None:
            total = total + torch.relu(d)
            continue
        smoothed[k] = smoothing * smoothed.get(k, 0.0) + (1 - smoothing) * float(d.detach())
        if smoothed[k] > 0:
            total = total + d
    return total


def _carry_record(carry: dict | None) -> bytes | None:
    """What the agents a run keeps alive between batches (``train.continue_prob``) need to go on after a resume,
    pickled once (its length is the size the checkpoint limits): without it a resumed run started fresh agents
    where the uninterrupted one continued, and every later draw of the generator shifted (the two runs parted)."""
    if carry is None:
        return None
    a = carry["agent"]
    return pickle.dumps({**{k: carry[k] for k in ("task", "ep", "t", "d", "rounds")}, "prev": carry["prev"].detach(),
                         "interface": a.interface, "wiring": a.wiring, "agent_t": a.t, "h": a.state.h.detach(),
                         "heads": a.state.heads.detach()}, protocol=pickle.HIGHEST_PROTOCOL)


def _carry_from(blob: bytes, policy, cfg: ExperimentConfig, ops, rng) -> dict:
    rec = pickle.loads(blob)
    agent = Agent(policy, cfg.agent, ops=ops, check_inputs=False).start(
        rec["interface"], rec["wiring"], state=AgentState(rec["h"], rec["heads"]), rng=rng, t=rec["agent_t"])
    agent.vote_loss = bool(cfg.train.vote_weight)
    agent.push_spread = bool(cfg.train.spread_weight)
    return {**{k: rec[k] for k in ("task", "ep", "prev", "t", "d", "rounds")}, "agent": agent}


def _episode_loss(cfg: ExperimentConfig, ops, agent: Agent, ep, steps: int, rounds: int, prev=None, start: int = 0,
                  grow=None, reference=None, smoothed=None):
    """Roll ``agent`` through one batch and back-propagate its loss (in chunks of ``tbptt`` steps).

    ``prev``/``start`` continue agents from an earlier batch (their state is detached: no
    gradient crosses batches). ``grow = (step, n, sources)`` adds n experts before that step
    (``sources`` None: fresh). ``reference`` [T, B]: the initial policy's losses on the same
    episodes, for ``train.guard_weight`` (``guard_loss`` over the task's ``loss_groups``; ``smoothed``
    its moving averages, with ``train.guard_smoothing``).
    Returns (loss per step [T] detached, total loss, last output, guard term summed over chunks)."""
    chunk = cfg.train.tbptt or steps
    weights = objective_weights(cfg.train.objective, steps)
    cuts = set(range(chunk, steps, chunk))  # where the graph is cut (truncated BPTT)
    bounds = sorted(cuts | ({grow[0]} if grow else set()) | {steps})
    per_step, total, loss, t0, guard = [], 0.0, 0.0, 0, 0.0
    with_votes = bool(cfg.train.vote_weight)
    spread = cfg.train.spread_weight
    for t1 in bounds:
        if grow and t0 == grow[0]:  # add experts to the running agents (no retraining in deployment)
            n, sources = grow[1], grow[2]
            agent.add_experts(n, init="fresh" if sources is None else "clone", sources=sources)
        traj = drive(agent, Driver(ops, ep, t1 - t0, t0=start + t0, prev_output=prev, rounds=rounds,
                                   with_vote_loss=with_votes, with_metrics=False, record=bool(spread)))
        errs = traj.losses.mean(dim=1)
        scored = errs + spread * torch.stack([i.push_spread for i in traj.infos]).mean(dim=1) if spread else errs
        loss = loss + (weights[t0:t1] * episodes.objective_terms(scored, cfg.train.log_floor)).sum()
        if with_votes:
            loss = loss + cfg.train.vote_weight * traj.vote_loss * (t1 - t0) / steps
        if reference is not None:
            groups = np.stack([ep.loss_groups(start + t) for t in range(t0, t1)])
            term = guard_loss(traj.losses, reference[t0:t1], groups, smoothed,
                              cfg.train.guard_smoothing) * (t1 - t0) / steps
            loss = loss + cfg.train.guard_weight * term
            guard += float(term.detach())
        extra = ep.trajectory_loss(ops, start + t0, traj.outputs)
        if extra is not None:
            loss = loss + extra * (t1 - t0) / steps
        per_step.append(errs.detach())
        prev = traj.outputs[-1]
        if t1 in cuts or t1 == steps:
            loss.backward()
            total += float(loss.detach())
            loss = 0.0
            # cut the graph: the next chunk starts from the detached state
            agent.state = type(agent.state)(agent.state.h.detach(), agent.state.heads.detach())
            prev = prev.detach()
        t0 = t1
    return torch.cat(per_step), torch.tensor(total), prev, guard


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
    if not isinstance(ck, dict) or not isinstance(ck.get("format"), str) or ck["format"] != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a badger checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return ck


def initial_policy(cfg: ExperimentConfig) -> ExpertPolicy:
    """The policy an outer loop (BPTT or ES) starts from: the default initialisation drawn with
    ``train.seed``, then the structured ``train.init`` or the weights ``train.init_from`` names; with
    both, ``train.init`` names a surgery (``inits.SURGERIES``) that makes the policy from those weights."""
    from .inits import SURGERIES, apply_init

    torch.manual_seed(cfg.train.seed)
    policy = ExpertPolicy(cfg.agent.policy)
    surgery = cfg.train.init in SURGERIES
    if surgery and not cfg.train.init_from:
        raise ConfigError(f"train.init = {cfg.train.init!r} changes a trained policy: set train.init_from too")
    if cfg.train.init_from and cfg.train.init and not surgery:
        raise ConfigError(f"train.init_from and train.init = {cfg.train.init!r} both set: only a surgery "
                          f"({sorted(SURGERIES)}) takes both")
    if surgery:
        SURGERIES[cfg.train.init](source_policy(cfg.train.init_from), policy)
    elif cfg.train.init_from:
        load_initial_weights(policy, cfg.train.init_from)
    elif cfg.train.init:
        apply_init(cfg.train.init, policy)
    return policy


def load_initial_weights(policy: ExpertPolicy, init_from: str):
    """Start ``policy`` from the weights ``train.init_from`` names (``source_policy``), of the same size."""
    try:
        policy.load_state_dict(source_policy(init_from).state_dict())
    except RuntimeError as e:
        raise ConfigError(f"train.init_from: {init_from} does not fit this policy: {e}") from None


def source_policy(init_from: str) -> ExpertPolicy:
    """The weights ``train.init_from`` names, as a torch policy of their own size: a checkpoint (``.pt``,
    either outer loop's), or a policy (a shipped policy's name or ``NAME.onnx``: its graph's
    initializers, named as the torch ``state_dict``, and its card's initial state)."""
    if str(init_from).endswith(".pt"):
        return policy_from_checkpoint(load_checkpoint(init_from))[0]
    import onnx
    from onnx import numpy_helper

    from ..policy_card import load_policy

    pol = load_policy(init_from)
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
               for i in onnx.load(str(pol.path)).graph.initializer}
    weights["h0"] = torch.from_numpy(np.array(pol.h0))
    policy = ExpertPolicy(pol.spec)
    try:
        policy.load_state_dict(weights)
    except RuntimeError as e:
        raise ConfigError(f"train.init_from: {init_from}'s graph does not match its card: {e}") from None
    return policy


def open_run(out: Path, cfg: ExperimentConfig, *, resume: bool, outer: str,
             ignore: tuple[str, ...] = (), log=print) -> dict | None:
    """A run folder, for either outer loop: the checkpoint to resume from (checked against ``cfg``
    by ``check_resumable``), or None for a fresh run (whose old metrics are removed); writes
    config.json (making the folder). A folder that holds a run is not overwritten without ``resume``."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot make the run folder {out}: {e.strerror or e}") from None
    ck_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    ck = None
    if not resume and ck_path.exists():
        raise ConfigError(f"{out} holds a run ({ck_path.name}): --resume continues it (a larger train.batches "
                          f"trains it longer); to start again, give another --out or delete {ck_path}")
    if resume and not ck_path.exists():
        log(f"--resume: no checkpoint in {out}: starting a new run")
    if resume and ck_path.exists():
        ck = load_checkpoint(ck_path)
        check_resumable(ck, ck_path, cfg, outer, ignore=ignore)
        _drop_rows_after(metrics_path, ck.get("batch"))
    elif metrics_path.exists():
        metrics_path.unlink()
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return ck


def _drop_rows_after(metrics_path: Path, batch):
    """Rows a run logged after its last checkpoint (it stopped in between): the resumed run logs those batches
    again, and kept they appeared twice."""
    if not metrics_path.exists() or type(batch) is not int:
        return
    kept = []
    for line in metrics_path.read_text().splitlines():
        try:
            row = json.loads(line)
            at = row.get("batch", row.get("generation"))
        except (ValueError, AttributeError):
            at = None
        if not isinstance(at, int) or at <= batch:
            kept.append(line)
    tmp = metrics_path.with_name(metrics_path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, metrics_path)


# Settings whose default is not what a run did before the setting existed: a checkpoint of the outer loop
# named that lacks one, and whose config makes the setting matter, was trained with the value here (the
# default applies only to runs started since). Session 41: each candidate of a grown ES generation had drawn
# its own newcomers.
BEFORE_IT_EXISTED = {"train.es.same_newcomers": ("es", lambda cfg: cfg.train.grow_prob > 0, False)}


def check_resumable(ck: dict, path, cfg: ExperimentConfig, outer: str, ignore: tuple[str, ...] = ()):
    """Refuse to resume a checkpoint of another outer loop or another config, naming the settings that
    differ (settings that older checkpoints lack count as their defaults, or as ``BEFORE_IT_EXISTED`` says;
    ``ignore``: train settings that do not change the run, e.g. ES's worker count)."""
    was = ck.get("outer", "bptt")
    if not isinstance(was, str) or was != outer:
        raise ConfigError(f"cannot resume {path} with --outer {outer}: it was trained by --outer {str(was)[:40]}")

    def norm(d, saved=False):
        c = from_dict(ExperimentConfig, d)
        flat = flat_settings(to_dict(c))
        if saved:
            given = flat_settings(d)
            flat.update({k: value for k, (loop, matters, value) in BEFORE_IT_EXISTED.items()
                         if k not in given and loop == outer and matters(c)})
        # ignore: e.g. "train.es.workers"; train.batches says where a run stops, not what it computes (a larger
        # value trains it longer; a smaller one than the checkpoint's count is refused by its batch check)
        return {k: v for k, v in flat.items() if k not in ignore and k != "train.batches"}

    then, now = norm(ck["config"], saved=True), norm(to_dict(cfg))
    if then != now:
        differ = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
        shown = ", ".join(f"{k} = {repr(then.get(k))[:80]} there, {repr(now.get(k))[:80]} here" for k in differ[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        legacy = [k for k in differ if k in BEFORE_IT_EXISTED]
        hint = " ".join(f"--set {k}={str(then.get(k)).lower()}" for k in legacy)
        raise ConfigError(f"cannot resume {path}: it was trained with another config: {shown}{more}"
                          + (f"; it predates {', '.join(legacy)}: resume it as it was trained with {hint}"
                             if legacy else ""))


def progress_bar(name: str, total: int, completed: int):
    """A rich progress bar (started) and its task id; ``bar.update(tid, completed=, info=)``."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    bar.start()
    return bar, bar.add_task(name, total=total, completed=completed, info="")


def policy_from_checkpoint(ck: dict) -> tuple[ExpertPolicy, ExperimentConfig]:
    """The policy a checkpoint holds and its config; ConfigError with the reason where they are damaged or do
    not match (weights of other shapes, entries that are not tensors, NaN or inf)."""
    cfg = from_dict(ExperimentConfig, ck.get("config")).validate()
    policy = ExpertPolicy(cfg.agent.policy)
    load_weights(policy, ck.get("model"), "the checkpoint")
    policy.eval()
    return policy, cfg


@contextlib.contextmanager
def checkpoint_entry(path, what: str):
    """Load entry ``what`` of the checkpoint at ``path`` (to resume a run, or to export it): whatever a damaged
    entry raises becomes a ConfigError naming it (a run stops before its first batch; the file is left as it is)."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 (torch, numpy and the generators raise many kinds for bad values)
        raise ConfigError(f"{path}: its {what} cannot be loaded ({type(e).__name__}: {str(e)[:200]})") from None


def load_weights(policy: torch.nn.Module, weights, path):
    """``policy.load_state_dict(weights)``, refusing non-finite weights (ConfigError)."""
    with checkpoint_entry(path, "model"):
        policy.load_state_dict(weights)
    if not all(torch.isfinite(v).all() for v in policy.state_dict().values() if v.is_floating_point()):
        raise ConfigError(f"{path}: its model holds NaN or inf weights")


def checkpoint_counters(ck: dict, path, cfg: ExperimentConfig) -> tuple[int, float]:
    """(batches done, wall seconds) of a checkpoint (to resume, or to export), checked against ``cfg``."""
    batch, wall = ck.get("batch"), ck.get("wall_seconds")
    if type(batch) is not int or not 0 <= batch <= cfg.train.batches:
        raise ConfigError(f"{path}: its batch count {str(batch)[:40]} is not an int in [0, {cfg.train.batches}]")
    if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not 0 <= wall < math.inf:
        raise ConfigError(f"{path}: its wall_seconds {str(wall)[:40]} is not a number >= 0")
    return batch, float(wall)


def trainable_parameters(policy: ExpertPolicy, names: list[str]) -> list[torch.nn.Parameter]:
    """The parameters ``train.trainable`` names (all of them for []), with the others frozen.

    An entry is a prefix of parameter names (``"heads."``, ``"cell.weight_hh"``) or ``"heads:NAME"``:
    the rows of the heads layer (weight and bias) that make the named head (``read_query``,
    ``push_value``, ...; ``PolicySpec.heads``), the rest of that layer frozen by a gradient mask
    (Adam without weight decay leaves a parameter whose gradient is always 0 where it was).
    """
    spec = policy.spec
    where = spec.head_slices
    prefixes, rows = [], torch.zeros(spec.heads_dim, dtype=torch.bool)
    for entry in names:
        if entry.startswith("heads:"):
            head = entry.split(":", 1)[1]
            if head not in where:
                raise ConfigError(f"train.trainable {entry!r}: no head {head!r}; heads: {list(where)}")
            rows[where[head]] = True
        else:
            prefixes.append(entry)
    params = []
    for n, p in policy.named_parameters():  # the others stay as they are (no gradient computed)
        whole = not names or (bool(prefixes) and n.startswith(tuple(prefixes)))
        part = bool(rows.any()) and n in ("heads.weight", "heads.bias") and not whole
        p.requires_grad_(whole or part)
        if part:
            mask = (rows[:, None] if p.dim() == 2 else rows).to(p.dtype)
            p.register_hook(lambda g, mask=mask: g * mask)
        if p.requires_grad:
            params.append(p)
    if not params:
        raise ConfigError(f"train.trainable {names} names no parameter of the policy "
                          f"({[n for n, _ in policy.named_parameters()]})")
    return params


def train(cfg: ExperimentConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
          final_eval: bool = True, log=print) -> dict:
    """Train; writes ``out_dir/{checkpoint.pt, metrics.jsonl, config.json, summary.json}``."""
    cfg.validate().check_new_run()
    if not task_class(cfg.task.name).differentiable:  # (backward() failed on a loss without a gradient)
        raise ConfigError(f"task {cfg.task.name!r} has no differentiable loss (the agent acts in an environment, a "
                          "black box to back-propagation): train it with --outer es")
    out = Path(out_dir)
    ck_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    torch.set_num_threads(cfg.train.threads)
    random.seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    policy = initial_policy(cfg)
    reference = None  # train.guard_weight: the initial policy, frozen, played on every batch's episodes
    smoothed = {} if cfg.train.guard_smoothing else None  # guard_loss's moving averages, by group
    if cfg.train.guard_weight:
        reference = copy.deepcopy(policy).requires_grad_(False)
    params = trainable_parameters(policy, cfg.train.trainable)
    opt = torch.optim.Adam(params, lr=cfg.train.lr, eps=cfg.train.adam_eps)
    first_batch, wall = 0, 0.0
    ck = open_run(out, cfg, resume=resume, outer="bptt", log=log)
    if ck is not None:
        load_weights(policy, ck.get("model"), ck_path)
        with checkpoint_entry(ck_path, "optimizer"):
            opt.load_state_dict(ck.get("optimizer"))
        with checkpoint_entry(ck_path, "rng"):
            rng.bit_generator.state = ck.get("rng")
        with checkpoint_entry(ck_path, "torch_rng"):
            torch.set_rng_state(ck.get("torch_rng"))
        first_batch, wall = checkpoint_counters(ck, ck_path, cfg)
        if smoothed is not None:
            with checkpoint_entry(ck_path, "guard_smoothed"):
                smoothed.update({int(k): float(v) for k, v in ck.get("guard_smoothed", {}).items()})
        log(f"resumed from {ck_path} at batch {first_batch}")
    ops = torch_ops()
    spec = cfg.agent.policy
    carry = None
    if ck is not None and ck.get("carry") is not None:  # the agents a continued run had alive (continue_prob)
        with checkpoint_entry(ck_path, "carry"):
            carry = _carry_from(ck["carry"], policy, cfg, ops, rng)

    said_carry = []

    def save(batch):
        kept = _carry_record(carry)
        if kept is not None and len(kept) > MAX_CARRY_BYTES:
            if not said_carry:  # (a long-lived agent's episode grows with its life: MAX_AGE steps of targets)
                log(f"the carried agents (their episode included) are over {MAX_CARRY_BYTES >> 20} MiB: not "
                    "checkpointed, so a resume starts fresh agents where this run continues them")
                said_carry.append(True)
            kept = None
        _atomic_save({"format": CHECKPOINT_FORMAT, "config": to_dict(cfg), "model": policy.state_dict(),
                      "optimizer": opt.state_dict(), "rng": rng.bit_generator.state,
                      "torch_rng": torch.get_rng_state(), "batch": batch, "wall_seconds": wall,
                      "guard_smoothed": dict(smoothed or {}), "carry": kept}, ck_path)

    bar = None
    if progress:
        bar, tid = progress_bar(cfg.name, cfg.train.batches, first_batch)
    window, t_last = [], time.perf_counter()
    with open(metrics_path, "a") as mf:
        for b in range(first_batch, cfg.train.batches):
            t0 = time.perf_counter()
            task_cfg, _ = task_at(cfg, b)
            task = make_task(task_cfg)
            lo, hi = cfg.train.horizon
            steps = int(rng.integers(lo, hi + 1)) if hi else task_cfg.steps
            go_on = (carry is not None and carry["task"] == task_cfg and carry["t"] < MAX_AGE
                     and carry["agent"].n_experts <= 2 * task_cfg.experts[1] and rng.random() < cfg.train.continue_prob)
            if go_on:  # the same agents live on (a jumping task draws fresh targets: a jump)
                agent, prev, ep_start, d, rounds = (carry[k] for k in ("agent", "prev", "t", "d", "rounds"))
                ep = task.extend(rng, carry["ep"], ep_start + steps)
            else:
                d = int(rng.integers(task_cfg.dims[0], task_cfg.dims[1] + 1))
                n = int(rng.integers(task_cfg.experts[0], task_cfg.experts[1] + 1))
                rounds = int(rng.integers(cfg.train.rounds[0], cfg.train.rounds[1] + 1))
                ep = task.sample(rng, cfg.train.batch_size, dims=d, experts=n, steps=steps, addr_dim=spec.addr_dim)
                wiring = sample_wiring(rng, cfg.agent, cfg.train.batch_size, n)
                agent = Agent(policy, cfg.agent, ops=ops, check_inputs=False).start(ep.interface, wiring, rng=rng)
                agent.vote_loss = bool(cfg.train.vote_weight)
                agent.push_spread = bool(cfg.train.spread_weight)
                prev, ep_start = None, 0
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, b)
            opt.zero_grad(set_to_none=True)
            grow = None
            n = agent.n_experts
            if cfg.train.grow_prob and steps > 1 and rng.random() < cfg.train.grow_prob:
                n_new = cfg.train.newcomers(rng, n)
                # clones: deployment's rule (the same draws as rng.integers(0, n, n_new) unless the
                # membrane deals its slots out to the experts, then an expert of the same part), one draw
                # for the batch or (train.clone_draw = "episode") one per episode, [B, n_new]
                per_episode = cfg.train.batch_size if cfg.train.clone_draw == "episode" else None
                sources = (clone_sources(rng, ep.interface, n, n_new, batch=per_episode)
                           if cfg.train.grows_clones(rng) else None)
                grow = (int(rng.integers(1, steps)), n_new, sources)
            ref_losses = None
            if reference is not None:
                if ep.loss_groups(ep_start) is None:
                    raise ConfigError(f"train.guard_weight: task {task_cfg.name!r} has no loss groups to guard")
                with torch.no_grad():
                    ref_agent = Agent(reference, cfg.agent, ops=ops, check_inputs=False).start(ep.interface, wiring)
                    ref_losses = drive(ref_agent, Driver(ops, ep, steps, rounds=rounds, with_metrics=False)).losses
            per_step, loss, prev, guard = _episode_loss(cfg, ops, agent, ep, steps, rounds, prev, ep_start, grow,
                                                        ref_losses, smoothed)
            if smoothed:  # what is reported: the smoothed differences the guard holds down
                guard = sum(max(v, 0.0) for v in smoothed.values())
            n = agent.n_experts
            carry = ({"task": task_cfg, "ep": ep, "agent": agent, "prev": prev, "t": ep_start + steps, "d": d,
                      "rounds": rounds} if cfg.train.continue_prob else None)  # (guard_weight refuses continue_prob)
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.train.clip)
            if not math.isfinite(float(gnorm)):
                log(f"batch {b}: non-finite gradient, step skipped")
                opt.zero_grad(set_to_none=True)
            else:
                opt.step()
            wall += time.perf_counter() - t0
            window.append((float(loss.detach()), float(per_step[-1].detach()), d, n, guard))
            if (b + 1) % cfg.train.log_every == 0 or b + 1 == cfg.train.batches:
                dt = time.perf_counter() - t_last
                t_last = time.perf_counter()
                row = {"batch": b + 1, "loss": float(np.mean([w[0] for w in window])),
                       "final_loss": float(np.mean([w[1] for w in window])), "lr": lr_at(cfg, b),
                       "sec_per_batch": dt / len(window), "episodes_per_s": len(window) * cfg.train.batch_size / dt,
                       "wall_seconds": round(wall, 1), "addresses": task_cfg.addresses}
                if reference is not None:
                    row["guard"] = float(np.mean([w[4] for w in window]))
                    if smoothed:
                        row["guard_by_group"] = {str(k): round(v, 5) for k, v in sorted(smoothed.items())}
                mf.write(json.dumps(row) + "\n")
                mf.flush()
                window = []
                if bar is not None:
                    bar.update(tid, completed=b + 1, info=f"loss {row['loss']:.3f} final {row['final_loss']:.3f}")
            if (b + 1) % cfg.train.ckpt_every == 0 or b + 1 == cfg.train.batches:
                save(b + 1)
    if cfg.train.batches == 0:  # no outer-loop step: the initial weights (train.init) are the checkpoint
        save(0)
    if bar is not None:
        bar.stop()
    trained = cfg.train.batches - first_batch  # in this call (a resumed run's wall time includes earlier calls)
    summary = {"name": cfg.name, "batches": cfg.train.batches, "wall_seconds": round(wall, 1),
               "sec_per_batch": round(wall / cfg.train.batches, 4) if trained > 0 else None,
               "seed": cfg.train.seed}
    if final_eval and cfg.train.eval_episodes:
        task = make_task(cfg.task)
        d, n = task.default_dims(), task.default_experts()
        with torch.no_grad():
            summary["eval"] = evaluate(ops, policy, cfg.agent, cfg.task, dims=d, experts=n,
                                       episodes=cfg.train.eval_episodes, seed=10_000 + cfg.train.seed)
        shown = {k: v for k, v in summary["eval"].items() if k.startswith("final_") and isinstance(v, float)}
        log(f"final eval (d={d}, N={n}): " + " ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

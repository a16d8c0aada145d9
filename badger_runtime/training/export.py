"""Export a trained expert policy to ONNX with its card, and check what was written."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import platform
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, to_dict
from ..policy_card import CARD_FORMAT, INPUTS, OUTPUTS, card_paths, sha256_file, signature, write_card
from .train import checkpoint_counters, load_checkpoint, policy_from_checkpoint

OPSET = 17
EXPORT_TOLERANCE = 1e-5
STATE_BOUND = ("every state entry stays in [-1, 1] (in exact arithmetic (-1, 1); float32 tanh can round to "
               "+-1, and the float32 convex mix of two such values can land one rounding step, 1.2e-7, past it): "
               "initial state tanh(h0 + noise), then GRU updates (a convex mix of the old state and a tanh)")


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def trained_horizon(cfg) -> int:
    """The card's horizon: the longest episode of the outer loop, train.horizon's upper end or the task's steps or a
    curriculum stage's own, and at least task.steps (the card's evaluations run them; a new run whose horizon is
    shorter is refused, ``ExperimentConfig.check_new_run``)."""
    stages = [int(st.settings["steps"]) for st in cfg.train.stages if "steps" in st.settings]
    return max([int(cfg.task.steps), int(cfg.train.horizon[1])] + ([] if cfg.train.horizon[1] else stages))


def export(checkpoint: str | Path, out: str | Path, *, name: str | None = None, extra: dict | None = None) -> dict:
    """Write ``out`` (.onnx) and its card; returns the card. Raises if the check fails."""
    import onnx
    import onnxruntime as ort

    ck = load_checkpoint(checkpoint)
    policy, cfg = policy_from_checkpoint(ck)
    batches, wall = checkpoint_counters(ck, checkpoint, cfg)
    outer = ck.get("outer", "bptt")
    if not isinstance(outer, str) or outer not in ("bptt", "es"):
        raise ConfigError(f"{checkpoint}: its outer loop {str(outer)[:40]} is not 'bptt' or 'es'")
    spec = cfg.agent.policy
    onnx_path, card_path = card_paths(out)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    # Example batch >= 2 (a batch-1 example can specialise the graph to batch 1).
    g = torch.Generator().manual_seed(0)
    ex = (torch.rand(4, spec.hidden, generator=g) * 2 - 1, torch.randn(4, spec.msg_dim, generator=g),
          torch.randn(4, spec.sensed_dim, generator=g))
    dyn = {n: {0: "batch"} for n in (*INPUTS, *OUTPUTS)}
    tmp = onnx_path.with_suffix(".onnx.tmp")
    with torch.no_grad():
        torch.onnx.export(policy, ex, str(tmp), input_names=list(INPUTS), output_names=list(OUTPUTS),
                          dynamic_axes=dyn, opset_version=OPSET, dynamo=False)
    model = onnx.load(str(tmp))
    onnx.checker.check_model(model, full_check=True)
    # numeric check against torch at several batch sizes
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    worst = 0.0
    for b in (1, 7, 64):
        x = (torch.rand(b, spec.hidden, generator=g) * 2 - 1, torch.randn(b, spec.msg_dim, generator=g) * 2,
             torch.randn(b, spec.sensed_dim, generator=g) * 2)
        with torch.no_grad():
            ref = policy(*x)
        got = sess.run(list(OUTPUTS), {n: v.numpy() for n, v in zip(INPUTS, x)})
        # relative to the output's size (a policy with large gains has outputs of tens: float32 rounding)
        worst = max(worst, *(float((np.abs(r.numpy() - o) / (1.0 + np.abs(r.numpy()))).max()) for r, o in zip(ref, got)))
    if worst > EXPORT_TOLERANCE:
        tmp.unlink()
        raise RuntimeError(f"exported graph differs from torch by {worst:.2e} (relative) > {EXPORT_TOLERANCE}")
    tmp.replace(onnx_path)
    card = {
        "format": CARD_FORMAT,
        "name": name or onnx_path.stem,
        "onnx": onnx_path.name,
        "sha256": sha256_file(onnx_path),
        "signature": signature(spec),
        "heads": [[n, s] for n, s in spec.heads],
        "initial_state": [float(v) for v in policy.h0.detach().numpy()],  # h0 = tanh(this + noise)
        "state_bound": STATE_BOUND,
        "config": to_dict(cfg),
        "training": {"outer": outer, "batches": batches, "wall_seconds": round(wall, 1),
                     "sec_per_batch": round(wall / max(1, batches), 4),
                     "checkpoint_sha256": hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()},
        "export": {"opset": OPSET, "exporter": "torch.onnx.export (TorchScript-based, dynamic batch axis)",
                   "max_rel_diff_vs_torch": worst},
        "lifetime": {"kind": "episodic", "horizon": trained_horizon(cfg),
                     "why": "its training horizon: not checked for long runs (badger export --continual EVIDENCE)"},
        "versions": {"torch": torch.__version__, "onnx": _version("onnx"), "onnxruntime": ort.__version__,
                     "numpy": np.__version__, "badger-runtime": _version("badger-runtime"),
                     "python": platform.python_version()},
    }
    if extra:
        card.update(extra)
    write_card(card, card_path)
    return card


def write_card_evaluation(onnx: str | Path, *, episodes: int = 1000, seed: int = 0) -> dict:
    """Evaluate an exported policy on its own task (torch-free, seeded; the settings its task names
    in ``Task.card_evaluations``) and record the numbers, with their commands, in its card; for a
    task measured by an error, also what fresh experts and clones joining mid-episode do to it (``growth``,
    see ``growth.measure_growth``)."""
    from ..engine import numpy_ops
    from ..evaluation import evaluate
    from ..growth import card_growth, measure_growth
    from ..policy_card import card_paths, load_policy
    from ..tasks import task_class

    pol = load_policy(onnx)
    cls = task_class(pol.task.name)
    task = cls.evaluation_config(pol.task)
    tk = cls(pol.task)
    card = dict(pol.card)
    card["evaluation"] = []
    for dims, experts, steps in tk.card_evaluations():
        t = type(task)(**{**task.__dict__, "steps": steps})
        r = evaluate(numpy_ops(), pol, pol.agent, t, dims=dims, experts=experts, episodes=episodes, seed=seed)
        flags = f" --task {task.name}" if task is not pol.task else ""
        row = {"command": f"badger eval --policy {onnx}{flags} --dims {dims} --experts {experts} --steps {steps} "
                          f"--episodes {episodes} --seed {seed} --json", "dims": dims, "experts": experts}
        row |= {k: v for k, v in r.items() if isinstance(v, float) and k not in ("seconds", "rounds_mean")}
        row |= {k: [round(x, 6) for x in v] for k, v in r.items() if k.endswith("_by_step")}
        if "optimizer" in r:
            row["optimizer"] = {k: r["optimizer"][k] for k in ("name", "param", "final_mse")}
        row |= tk.card_summary(r)  # reads the report only
        card["evaluation"].append(row)
    notes = tk.card_notes()
    if notes:
        card["task_notes"] = notes
    if pol.task.name == "guessing" and pol.task.jump_every[1]:
        from ..longrun import jump_report

        a, b = pol.task.jump_every
        r = jump_report(pol, steps=1000, episodes=200, seed=seed, jump_every=(a, b))
        card["evaluation_jumps"] = {k: v for k, v in r.items() if "by_step" not in k} | {
            "command": f"badger longrun --policy {onnx} --steps 1000 --episodes 200 --seed {seed} "
                       f"--jump-every {a} {b} --json"}
    card.update(tk.card_extras(pol, str(onnx), episodes=episodes, seed=seed))  # e.g. a task's long run
    measured = measure_growth(pol, name=str(onnx), episodes=min(episodes, 256), seed=seed)
    if measured is not None:  # what fresh experts do to it: engine.check_growth holds it to this
        card["growth"] = card_growth(measured)
    write_card(card, card_paths(onnx)[1])  # the .onnx is unchanged, so its sha256 still holds
    return card

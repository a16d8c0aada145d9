"""Agents that run for ever: bounded state far past the training horizon, recovery metrics."""

import json
from pathlib import Path

import numpy as np
import pytest

from badger_runtime.longrun import fresh_recovery, long_rollout, recovery_times
from badger_runtime.policy_card import load_policy
from badger_runtime.tasks import make_task

SHIPPED = sorted(Path(__file__).resolve().parents[1].joinpath("policies").rglob("*.onnx"))  # and policies/retired/


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_policies_stay_bounded_for_10000_steps(path):
    pol = load_policy(path)
    card = json.loads(path.with_suffix(".json").read_text())
    assert "[-1, 1]" in card["state_bound"]  # the bound the card states ...
    # its own task; 20 experts and at most 128 outputs (the bound holds expert by expert, whatever d is:
    # scale-v4's 512 outputs took ~110 s of CI for the same check)
    dims = min(make_task(pol.task).default_dims(), 128)
    run = long_rollout(pol, steps=10_000, episodes=2, seed=0, dims=dims, experts=20, chunk_steps=2000)
    assert all(np.isfinite(v).all() for v in run.metrics.values()) and len(run.metrics) >= 1
    # ... holds, up to float32 rounding: tanh rounds to +-1 and the GRU's convex mix (1 - z) n + z h of two such
    # values can land one rounding step past it (dimensions-v6 reaches 1 + 2^-23 in this run; nothing grows)
    assert run.max_abs_state <= 1.0 + 2 * float(np.finfo(np.float32).eps)


def test_there_are_shipped_policies():
    assert len(SHIPPED) >= 2


def test_recovery_times_count_steps_from_each_jump():
    errs = np.array([[1.0], [0.01], [0.01], [0.9], [0.5], [0.01], [0.8], [0.7]])
    jumps = np.zeros_like(errs, dtype=bool)
    jumps[3, 0] = jumps[6, 0] = True
    before, rec, censored = recovery_times(errs, jumps, 0.05)
    assert before.tolist() == [0.01, 0.01] and rec.tolist() == [2] and censored == 1
    rec2, c2 = fresh_recovery(errs[:3], 0.05)
    assert rec2.tolist() == [1] and c2 == 0


def test_longrun_cli_reports_recovery(capsys):
    from badger_runtime.cli import main

    p = str(next(q for q in SHIPPED  # a guessing policy (target jumps are the guessing task's)
                 if json.loads(q.with_suffix(".json").read_text())["config"]["task"]["name"] == "guessing"))
    assert main(["longrun", "--policy", p, "--steps", "200", "--episodes", "8", "--jump-every", "20", "40",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["recovery_steps"]["agent_reset_at_jumps"]["jumps"] > 0
    assert main(["longrun", "--policy", p, "--steps", "120", "--episodes", "4", "--json"]) == 0
    h = json.loads(capsys.readouterr().out)
    assert set(h["error_at"]) == {"20", "100"} and h["finite"]


def test_jump_traces_follow_each_agent_across_its_jumps_and_plot(tmp_path, capsys):
    """`badger longrun --jump-every A B --plot P`: per episode, the never-reset agent's error, the same agent reset
    at every jump and the tuned optimizer restarted at every jump, on the same targets, one value per step; the
    never-reset trace is the long run's own (the same draws); the figure is written."""
    from badger_runtime.cli import main
    from badger_runtime.longrun import jump_traces

    pol = load_policy("guessing-nonstationary-v2")
    tr = jump_traces(pol, steps=60, seed=1, jump_every=(15, 25), episodes=2)
    run = long_rollout(pol, steps=60, episodes=2, seed=1, jump_every=(15, 25))
    assert tr["steps"] == 60 and tr["optimizer"] and len(tr["episodes"]) == 2
    for e, ep in enumerate(tr["episodes"]):
        assert ep["jumps"] == np.flatnonzero(run.jumps[:, e]).tolist() and 0 < ep["jumps"][0] < 60
        for k in ("agent", "agent_reset_at_jumps", "optimizer_restarted"):
            assert len(ep[k]) == 60 and np.isfinite(ep[k]).all(), k
        np.testing.assert_allclose(ep["agent"], run.metrics["error"][:, e])
    png = tmp_path / "jumps.png"
    assert main(["longrun", "--policy", "guessing-nonstationary-v2", "--steps", "60", "--episodes", "2",
                 "--jump-every", "15", "25", "--plot", str(png), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_longrun_cli_runs_at_the_dims_and_experts_asked(capsys):
    """--dims / --experts reach the long run (they were once dropped on the way, silently)."""
    from badger_runtime.cli import main

    args = ["longrun", "--policy", "scale-v2", "--steps", "25", "--episodes", "2", "--json"]
    assert main(args) == 0
    own = json.loads(capsys.readouterr().out)
    assert (own["dims"], own["experts"]) == (128, 20)  # the task's defaults
    assert main([*args, "--dims", "16", "--experts", "5"]) == 0
    asked = json.loads(capsys.readouterr().out)
    assert (asked["dims"], asked["experts"]) == (16, 5) and asked["error_at"] != own["error_at"]
    assert main([*args, "--dims", "16", "--jump-every", "20", "40"]) == 2
    assert "drop --dims" in capsys.readouterr().err


CONTINUAL = [p for p in SHIPPED if json.loads(p.with_suffix(".json").read_text())["lifetime"]["kind"] == "continual"]


@pytest.mark.parametrize("path", CONTINUAL, ids=[p.stem for p in CONTINUAL])
def test_continual_policies_stay_sane_for_10000_steps(path):
    """A card that says 'continual' is held to it: the error at inner step 10,000 is within 1.5x of
    the error at the training horizon (and small), on agents never reset.

    The guessing games' 20 episodes (up to 64 outputs); wider policies fewer, 20 x 64 / d (scale-v1 / v2:
    10 at 128, scale-v3 5, scale-v4 2 at 512), the same number of outputs averaged. The cards' own figure
    is 20 episodes (their `lifetime.why`); scale-v4's 20 alone took 10 of CI's minutes."""
    from badger_runtime.longrun import horizon_report

    pol = load_policy(path)
    task = make_task(pol.task)
    own = task.continual_check  # a task's own check: arms or classes that change
    if own is not None:
        r = own(pol, episodes=10, seed=0)
        assert r["continual"] and r["finite"], {k: v for k, v in r.items() if not isinstance(v, (list, dict))}
        return
    r = horizon_report(pol, steps=10_000, episodes=max(1, 20 * 64 // max(task.default_dims(), 64)), seed=0)
    e = r["error_at"]
    assert r["finite"] and e["10000"] <= 1.5 * max(e[trained_horizon(path)], 1e-3), e


def trained_horizon(path) -> str:
    """The step (of horizon_report's 20, 100, 1,000) that stands for the policy's training horizon:
    its episodes' length, or for agents that lived on across batches in training (``continue_prob``
    p: never reset with probability p per batch of T steps) their mean life T / (1 - p)."""
    cfg = json.loads(Path(path).with_suffix(".json").read_text())["config"]
    steps, p = cfg["task"]["steps"], cfg["train"].get("continue_prob", 0.0)
    life = steps / (1 - p) if p < 1 else float("inf")
    return str(max(s for s in (20, 100, 1000) if s <= max(20, life)))


def test_the_trained_horizon_of_a_card():
    """Episodic training: its episode length (20 steps); never-reset training (40-step batches,
    p = 0.95, a mean life of 800 steps): the last checkpoint inside that life, 100."""
    policies = Path(__file__).resolve().parents[1] / "policies" / "retired"
    assert trained_horizon(policies / "guessing-converge-v1.onnx") == "20"
    assert trained_horizon(policies / "guessing-nonstationary-v1.onnx") == "100"

"""`badger demo`: every sub-demo in quick mode, in-process through the CLI.

Checks the PNGs (written, non-empty, PNG signature), the printed numbers (finite, and the
agent beats the mean solution at the final step where the policy is a trained one),
results.json, and that the demo never imports torch. The dimension policy
(policies/dimensions-v6) is used when it is shipped; otherwise the tests fall back to the
tiny test policy for the code paths (and check the skip message of the default).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from badger_runtime.cli import main
from badger_runtime.demo.run import DEFAULT_DIMS_POLICY, find_policy

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHIPPED_DIMS = find_policy(DEFAULT_DIMS_POLICY)


def run_demo(capsys, *argv) -> str:
    rc = main(["demo", *argv])
    out = capsys.readouterr().out
    assert rc == 0, out
    return out


def final_numbers(out: str) -> dict[str, float]:
    """The 'final step...: agent X | optimizer Y | mean-solution Z | chance W' line."""
    m = re.search(r"^final step[^:\n]*: (.*)$", out, re.M)
    assert m, out
    nums = {k: float(v) for k, v in re.findall(r"([a-z-]+) ([-+0-9.e]+|nan|inf)", m.group(1))}
    assert "agent" in nums, m.group(0)
    for k, v in nums.items():
        assert math.isfinite(v), (k, v)
    return nums


def check_pngs(folder: Path, names: list[str]):
    for name in names:
        p = folder / name
        assert p.is_file(), f"{p} not written"
        data = p.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000, p


def results(folder: Path, demo: str) -> dict:
    return json.loads((folder / "results.json").read_text())[demo]


@pytest.fixture(scope="module")
def dims_policy(request):
    """The shipped dimension policy, else the tiny test policy (code paths only)."""
    if SHIPPED_DIMS is not None:
        return str(SHIPPED_DIMS), True
    return str(request.getfixturevalue("tiny_policy")), False


def test_main_demo(tmp_path, capsys):
    out = run_demo(capsys, "--quick", "--out", str(tmp_path), "--seed", "3")
    check_pngs(tmp_path, ["main_convergence.png", "main_communication.png"])
    f = final_numbers(out)
    assert f["agent"] < f["optimizer"] < f["mean-solution"] < f["chance"]
    assert int(re.search(r"messages exchanged: (\d+)", out).group(1)) > 0
    assert "adam" in out and "rounds used" in out
    r = results(tmp_path, "main")
    n = r["numbers"]
    assert len(n["agent_mse_by_step"]) == n["steps"] == 20
    assert all(math.isfinite(v) for v in n["agent_mse_by_step"] + n["optimizer"]["mse_by_step"])
    assert n["agent_mse_by_step"][-1] < n["agent_mse_by_step"][0]
    assert r["figures"] and all(Path(p).is_file() for p in r["figures"])


def test_main_demo_runtimes_agree(tmp_path, capsys):
    """The actor runtime and the batched engine: same episodes, same errors, same message count."""
    nums = {}
    for rt in ("actors", "engine"):
        run_demo(capsys, "--quick", "--episodes", "8", "--runtime", rt, "--out", str(tmp_path / rt))
        r = results(tmp_path / rt, "main")
        assert r["runtime"].startswith(rt)
        nums[rt] = r["numbers"]
    a, e = nums["actors"], nums["engine"]
    assert a["agent_mse_by_step"] == pytest.approx(e["agent_mse_by_step"], rel=1e-4, abs=1e-6)
    assert a["messages_total"] == e["messages_total"] == a["message_stats"]["delivered"]
    assert a["message_stats"]["dropped"] == 0


def test_guessing_demo(tmp_path, capsys):
    out = run_demo(capsys, "guessing", "--quick", "--out", str(tmp_path))
    check_pngs(tmp_path, ["fig6_rollouts.png", "fig9_convergence.png"])
    f = final_numbers(out)
    assert f["agent"] < f["mean-solution"] < f["chance"]
    n = results(tmp_path, "guessing")["numbers"]
    # Fig. 6: the last-step policy wanders far from the target, then hits it at the end.
    assert n["fig6"]["peak_mse"] > 1.0 and n["fig6"]["agent_final"] < 0.1
    assert n["fig9"]["steps_to_beat_mean_solution"] is not None


def test_communication_demo(tmp_path, capsys):
    out = run_demo(capsys, "communication", "--quick", "--out", str(tmp_path))
    check_pngs(tmp_path, ["fig8_communication.png"])
    f = final_numbers(out)
    assert f["agent"] < f["mean-solution"]
    n = results(tmp_path, "communication")["numbers"]
    for key in ("self_weight_by_step", "others_to_expert0_by_step"):
        assert len(n[key]) == 20 and all(0.0 <= v <= 1.0 for v in n[key])


def test_dimensions_demo(tmp_path, capsys, dims_policy):
    path, trained = dims_policy
    out = run_demo(capsys, "dimensions", "--quick", "--out", str(tmp_path), "--dims-policy", path)
    check_pngs(tmp_path, ["fig7_dimensions.png"])
    f = final_numbers(out)
    rows = results(tmp_path, "dimensions")["numbers"]["by_dims"]
    assert [r["d"] for r in rows] == list(range(1, 11))
    assert all(math.isfinite(r[k]) for r in rows for k in ("agent_final", "mean_solution", "optimizer_final"))
    if trained:
        assert f["agent"] < f["mean-solution"] < f["chance"]


def test_dimensions_demo_skips_without_its_policy(tmp_path, capsys):
    out = run_demo(capsys, "dimensions", "--quick", "--out", str(tmp_path), "--dims-policy",
                   str(tmp_path / "nope.onnx"))
    assert "skipped" in out and "not found" in out
    assert not list(tmp_path.glob("*.png"))


def test_growing_demo(tmp_path, capsys, dims_policy):
    path, trained = dims_policy
    out = run_demo(capsys, "growing", "--quick", "--out", str(tmp_path), "--dims-policy", path, "--grow-policy", path)
    check_pngs(tmp_path, ["growing_experts.png"])
    f = final_numbers(out)
    n = results(tmp_path, "growing")["numbers"]
    ns = [r["experts"] for r in n["by_experts"]]
    assert max(ns) == 160 and all(math.isfinite(r["agent_final"]) for r in n["by_experts"])
    hot = n["hot_add"]
    assert len(hot["variants"]) == 4 and all(math.isfinite(v["final"]) for v in hot["variants"])
    # The stepwise engine.Agent and the batched run_episodes give the same episodes and errors.
    same = next(r for r in n["by_experts"] if r["experts"] == hot["from"] and r["d"] == hot["dims"])
    assert hot["variants"][0]["final"] == pytest.approx(same["agent_final"], rel=1e-4, abs=1e-6)
    if trained:
        assert f["agent"] < f["mean-solution"]


@pytest.mark.parametrize("argv, field", [
    (["growing", "--policy", "X"], "grow_policy"), (["growing", "--dims-policy", "X"], "grow_policy"),
    (["growing", "--grow-policy", "X", "--dims-policy", "Y"], "grow_policy"), (["dimensions", "--policy", "X"],
                                                                             "dims_policy"),
    (["--policy", "X"], "policy"), (["communication", "--policy", "X"], "one_expert_policy")])
def test_the_policy_flags_choose_the_demos_policy(argv, field):
    """`badger demo growing --policy P` (and the tutorial's `--dims-policy P`) ran scale-v2 whatever P was."""
    from badger_runtime.cli import build_parser
    from badger_runtime.demo.cli import options_from_args

    assert getattr(options_from_args(build_parser().parse_args(["demo", *argv])), field) == "X"


def test_a_policy_is_demoed_at_an_n_it_was_trained_with():
    import dataclasses

    from badger_runtime.demo.run import _default_experts
    from badger_runtime.policy_card import load_policy

    task = load_policy("guessing-converge-v2").task
    assert [_default_experts(dataclasses.replace(task, experts=e)) for e in ((3, 3), (5, 40), (4, 12), (30, 64))] \
        == [3, 20, 12, 30]  # (4, 12) ran at N = 20


def test_demo_rejects_bad_flags(tmp_path, capsys):
    assert main(["demo", "--episodes", "0", "--out", str(tmp_path)]) == 2
    assert main(["demo", "--policy", str(tmp_path / "missing.onnx"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_demo_never_imports_torch(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from badger_runtime.cli import main
        assert main(["demo", "communication", "--quick", "--out", {str(tmp_path)!r}]) == 0
        assert "torch" not in sys.modules, "the demo imported torch"
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr

"""Bad command lines and bad files get a clear error (exit 2), never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from badger_runtime.cli import main


def run(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("argv, says", [
    (["eval", "--policy", "guessing-converge-v1", "--seed", "-1"], "--seed"),
    (["eval", "--policy", "guessing-converge-v1", "--episodes", "0"], "--episodes"),
    (["eval", "--policy", "guessing-converge-v1", "--steps", "-2"], "--steps"),
    (["eval", "--policy", "guessing-converge-v1", "--rounds", "1000"], "--rounds"),
    (["eval", "--policy", "guessing-converge-v1", "--dims", "0"], "--dims"),
    (["eval", "--policy", "no-such-policy"], "shipped policies"),
    (["eval", "--policy", "guessing-converge-v2", "--routing", "topk", "--degree", "2"],
     "--degree: not read by 'topk' routing"),
    (["eval", "--policy", "guessing-converge-v2", "--degree", "2", "--k", "1"], "give --routing"),
    (["eval", "--policy", "guessing-converge-v2", "--routing", "random", "--candidates", "2"], "--candidates: not"),
    (["eval", "--policy", "guessing-converge-v9"], "did you mean guessing-converge-v2 or guessing-converge-v1 (retired)"),
    (["eval", "--policy", "guessing-converge-v1", "--task", "nope"], "registered tasks"),
    (["eval", "--policy", "guessing-converge-v1", "--add-at", "3"], "--add-at T and --add M"),
    (["longrun", "--policy", "guessing-converge-v1", "--seed", "-3"], "--seed"),
    (["longrun", "--policy", "guessing-converge-v1", "--jump-every", "5", "2"], "--jump-every"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--episodes", "0"], "--episodes"),
    (["train", "--out", "OUT", "--set", "train.seed=-1"], "train.seed"),
    (["train", "--out", "OUT", "--set", "task.name=nope"], "unknown task"),
    (["bench", "train", "--experts", "0"], "--experts"),
    (["bench", "runtime", "--experts", "-5"], "--experts"),
    (["run", "--policy", "guessing-converge-v1", "--concurrency", "0"], "--concurrency"),
    (["serve", "--policy", "guessing-converge-v1", "--state-dir", "FILE", "--listen", "127.0.0.1:0"], "--state-dir"),
    (["eval", "--checkpoint", "FILE"], "not a readable checkpoint"),
    (["eval", "--policy", "guessing-converge-v2", "--add-at", "20", "--add", "3"], "steps 0..19"),
    (["eval", "--policy", "guessing-converge-v2", "--remove-at", "50", "--remove", "1"], "--remove-at T needs"),
    (["train", "DIR", "--out", "OUT"], "cannot read config file"),
    (["train", "--out", "FILE/run"], "cannot make the run folder"),
])
def test_bad_command_lines_exit_2_with_a_reason(argv, says, tmp_path, capsys):
    (tmp_path / "FILE").write_text("not a folder, not a checkpoint")
    (tmp_path / "DIR").mkdir()
    argv = [str(tmp_path / a) if a.split("/")[0] in ("FILE", "OUT", "DIR") else a for a in argv]
    rc, err = run(capsys, *argv)
    assert rc == 2 and says in err and "Traceback" not in err, err


@pytest.mark.parametrize("change", ["initial_state_strings", "config_wrong_type", "lifetime_bad", "nested_config",
                                    "horizon_0", "horizon_negative", "horizon_bool", "continual_with_horizon"])
def test_malformed_cards_whose_hash_matches_are_refused(tmp_path, capsys, change):
    """The card is JSON the hash does not cover: whatever is in it, loading says what is wrong."""
    from badger_runtime.policy_card import shipped_dir

    src = shipped_dir() / "guessing-converge-v2"
    shutil.copy(src.with_suffix(".onnx"), tmp_path / "p.onnx")
    card = json.loads(src.with_suffix(".json").read_text())
    if change == "initial_state_strings":
        card["initial_state"] = ["x"] * len(card["initial_state"])
    elif change == "config_wrong_type":
        card["config"]["agent"]["policy"]["hidden"] = [64]
    elif change == "lifetime_bad":
        card["lifetime"] = {"kind": "episodic", "horizon": "twenty"}
    elif change.startswith("horizon_"):  # an episodic horizon is an int >= 1 (0 loaded, then refused every step)
        card["lifetime"] = {"kind": "episodic", "horizon": {"horizon_0": 0, "horizon_negative": -1,
                                                            "horizon_bool": True}[change]}
    elif change == "continual_with_horizon":
        card["lifetime"] = {"kind": "continual", "horizon": 20}
    else:
        card["config"] = {"task": {"name": {"nested": [[[]]]}}}
    (tmp_path / "p.json").write_text(json.dumps(card))
    rc, err = run(capsys, "eval", "--policy", str(tmp_path / "p.onnx"), "--episodes", "2")
    assert rc == 2 and "Traceback" not in err and "p.json" in err, err


def test_large_d_skips_the_quadratic_baseline_instead_of_exhausting_memory(capsys):
    rc = main(["eval", "--policy", "dimensions-v2", "--dims", "3000", "--experts", "2", "--episodes", "2",
               "--steps", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["optimizer"] is None and "skipped" in out["notes"][0]


@pytest.mark.parametrize("argv", [["train", "--out", "OUT"], ["eval", "--checkpoint", "OUT/checkpoint.pt"],
                                  ["bench", "train", "--repeats", "1"]])
def test_a_missing_extra_is_named_not_a_traceback(argv, tmp_path):
    """On the base install (no torch) the training commands ended in a ModuleNotFoundError traceback."""
    import subprocess
    import sys

    argv = [a.replace("OUT", str(tmp_path)) for a in argv]
    code = ("import sys; sys.modules['torch'] = None; from badger_runtime.cli import main; "
            f"sys.exit(main({argv!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "needs the 'train' extra" in r.stderr and "torch" in r.stderr


def test_eval_notes_a_d_or_n_outside_the_trained_ranges(capsys):
    assert main(["eval", "--policy", "guessing-converge-v2", "--dims", "5", "--episodes", "2", "--no-baselines",
                 "--json"]) == 0
    err = capsys.readouterr().err
    assert "d = 5 is outside the trained 3..3" in err and "N = " not in err


def test_longrun_says_when_it_runs_an_episodic_policy_past_its_horizon(capsys):
    assert main(["longrun", "--policy", "guessing-converge-v2", "--steps", "30", "--episodes", "2", "--json"]) == 0
    assert "episodic (horizon 20" in capsys.readouterr().err
    assert main(["longrun", "--policy", "guessing-converge-v2", "--steps", "20", "--episodes", "2", "--json"]) == 0
    assert "horizon" not in capsys.readouterr().err

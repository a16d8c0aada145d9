"""`badger policies`: the shipped policies as their cards describe them, read from the cards."""

from __future__ import annotations

import json
import shutil

import pytest

from badger_runtime.cli import main
from badger_runtime.policy_card import shipped_dir, shipped_policies

from .conftest import card_of


def cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def card(name: str) -> dict:
    return card_of(name)


def test_the_list_is_every_shipped_card_as_it_reads(capsys):
    rc, out, _ = cli(capsys, "policies", "--json")
    rows = json.loads(out)
    assert rc == 0 and [r["name"] for r in rows] == shipped_policies()
    for r in rows:
        c = card(r["name"])
        assert (r["task"], r["dims"], r["experts"]) == (c["config"]["task"]["name"], c["config"]["task"]["dims"],
                                                        c["config"]["task"]["experts"])
        assert (r["lifetime"], r["horizon"]) == (c["lifetime"]["kind"], c["lifetime"]["horizon"])
        assert (r["fresh"], r["clone"]) == (c["growth"].get("fresh"), c["growth"].get("clone"))
        first = c["evaluation"][0]
        metric = r["headline"]["metric"]
        assert r["headline"]["value"] == first[f"final_{metric}"] and r["headline"]["command"] == first["command"]
        hurts = "hurts" in (r["fresh"], r["clone"])
        # where a kind of newcomer hurts, the row says what to do instead: the other kind, or a shipped successor
        assert bool(r["instead"]) == hurts, r
        if hurts:
            for advice in r["instead"].split(", or "):
                assert advice in ("clones", "fresh") or advice in shipped_policies(), r
    by = {r["name"]: r for r in rows}
    assert by["guessing-converge-v2"]["instead"] == "fresh"
    assert {r["fresh"] for r in rows} == {"ok"} and not any(r["retired"] for r in rows)  # the product rule


def test_the_retired_policies_are_listed_apart_and_still_load_by_name(capsys):
    """policies/retired/ (superseded: fresh experts hurt them) is not in the shipped list; `--retired` lists it, each
    row naming a shipped successor; a retired policy still loads by name (the commands of docs/results.md), and
    the commands that run it say it is retired and what to use instead."""
    rc, out, _ = cli(capsys, "policies", "--retired", "--json")
    rows = json.loads(out)
    retired = shipped_policies(retired=True)
    assert rc == 0 and [r["name"] for r in rows] == retired and len(retired) == 10
    assert not set(retired) & set(shipped_policies()) and all(r["retired"] and r["fresh"] == "hurts" for r in rows)
    by = {r["name"]: r for r in rows}
    assert by["guessing-converge-v1"]["instead"] == "guessing-converge-v2"
    assert by["dimensions-v1"]["instead"] == "clones, or dimensions-v3"
    rc, out, _ = cli(capsys, "policies")
    assert rc == 0 and "guessing-converge-v1" not in out and "and 10 retired policies" in out
    rc, out, _ = cli(capsys, "policies", "--retired")
    assert rc == 0 and "retired policies" in out and all(name in out for name in retired)
    rc, out, _ = cli(capsys, "policies", "--retired", "--verify", "--json")
    assert rc == 0 and [(r["name"], r["verified"]) for r in json.loads(out)] == [(n, "ok") for n in retired]
    rc, out, _ = cli(capsys, "policies", "dimensions-v1")
    assert rc == 0 and out.splitlines()[0].endswith("[retired: superseded, kept in policies/retired/ for the results "
                                                    "it made]")
    rc, _, err = cli(capsys, "policies", "dimensions-v1", "--retired")
    assert rc == 2 and "not both" in err
    rc, out, err = cli(capsys, "eval", "--policy", "guessing-converge-v1", "--episodes", "4", "--json")
    assert rc == 0 and json.loads(out)["final_mse"] >= 0
    assert "guessing-converge-v1 is retired" in err and "Instead: use guessing-converge-v2" in err
    rc, _, err = cli(capsys, "eval", "--policy", "guessing-converge-v2", "--episodes", "4", "--json")
    assert rc == 0 and "retired" not in err
    from badger_runtime.policy_card import is_retired, load_policy, resolve_policy, retired_dir

    # the paths docs/results.md's commands use (`policies/NAME.onnx`, from a checkout's root or anywhere) find them
    for given in ("policies/dimensions-v1.onnx", "dimensions-v1.json", "dimensions-v1"):
        assert resolve_policy(given) == retired_dir() / "dimensions-v1.onnx" and is_retired(resolve_policy(given))
    assert load_policy("fewshot-v5").retired.startswith("fewshot-v5 is retired")
    assert load_policy("fewshot-v6").retired is None
    missed = pytest.raises(Exception, resolve_policy, "dimensions-v1x").value
    assert "did you mean dimensions-v1 (retired) or" in str(missed)


def test_the_table_and_one_card(capsys):
    rc, out, _ = cli(capsys, "policies")
    assert rc == 0 and all(name in out for name in shipped_policies())
    rc, out, _ = cli(capsys, "policies", "guessing-converge-v2", "scale-v4")
    c = card("guessing-converge-v2")
    assert rc == 0 and "lifetime: episodic, horizon 20" in out and c["evaluation"][0]["command"] in out
    assert c["growth"]["clone_instead"] in out and c["training_command"] in out
    assert "scale-v4  (task scale; trained d 16-512, N 4-128)" in out and "lifetime: continual" in out
    rc, out, _ = cli(capsys, "policies", "scale-v4", "--json")
    assert rc == 0 and json.loads(out) == [card("scale-v4")]


def test_only_one_task(capsys):
    rc, out, _ = cli(capsys, "policies", "--task", "scale", "--json")
    assert rc == 0 and [r["name"] for r in json.loads(out)] == ["scale-v1", "scale-v2", "scale-v3", "scale-v4"]
    rc, _, err = cli(capsys, "policies", "--task", "nope")
    assert rc == 2 and "no shipped policy of task 'nope'" in err and "scale" in err


def test_bad_names_and_damaged_cards(tmp_path, capsys, monkeypatch):
    """An unknown name or a card that cannot be read, asked for by name: exit 2 with the reason. In the list,
    a damaged card is a row that says so, and the others are listed."""
    rc, _, err = cli(capsys, "policies", "no-such-policy-v1")
    assert rc == 2 and "shipped policies" in err
    for name in ("scale-v1", "bandit-v2"):
        shutil.copy(shipped_dir() / f"{name}.onnx", tmp_path)
        shutil.copy(shipped_dir() / f"{name}.json", tmp_path)
    (tmp_path / "bandit-v2.json").write_text("{not json")
    rc, _, err = cli(capsys, "policies", str(tmp_path / "bandit-v2.onnx"))
    assert rc == 2 and "cannot read the card" in err and "Traceback" not in err
    (tmp_path / "bandit-v2.json").write_text("[1, 2]")
    rc, _, err = cli(capsys, "policies", str(tmp_path / "bandit-v2.onnx"))
    assert rc == 2 and "not a JSON object" in err
    damaged = card("scale-v1")
    damaged["growth"], damaged["evaluation"], damaged["config"] = "?", None, {"task": 3}
    (tmp_path / "scale-v1.json").write_text(json.dumps(damaged))
    monkeypatch.setattr("badger_runtime.policy_card.shipped_dir", lambda: tmp_path)
    rc, out, _ = cli(capsys, "policies", "--json")
    rows = json.loads(out)
    assert rc == 0 and [r["name"] for r in rows] == ["bandit-v2", "scale-v1"]
    assert "card unreadable" in rows[0]["error"]
    assert rows[1]["task"] is None and rows[1]["headline"] is None and rows[1]["fresh"] is None
    rc, out, _ = cli(capsys, "policies")
    assert rc == 0 and "card unreadable" in out
    damaged.update(lifetime="x", training=[1], evaluation={"a": 1}, training_command=None)
    (tmp_path / "scale-v1.json").write_text(json.dumps(damaged))
    rc, out, _ = cli(capsys, "policies", "scale-v1")
    assert rc == 0 and out.startswith("scale-v1  (task None; trained d ?, N ?)")


@pytest.mark.parametrize("argv", [["policies", "--json"], ["policies", "scale-v1"]])
def test_without_torch_or_onnxruntime(argv, tmp_path):
    """It reads the cards only: it runs where neither torch nor onnxruntime can be imported."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.modules['onnxruntime'] = None\n"
            "from badger_runtime.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "scale-v1" in r.stdout


def test_verify_loads_every_policy_and_names_the_ones_that_fail(tmp_path, capsys, monkeypatch):
    """--verify loads each policy as the runtimes do: every shipped one is ok; a file that is not the one its
    card describes, or a graph onnxruntime cannot load, is named with the reason, and the command exits 2."""
    rc, out, _ = cli(capsys, "policies", "--verify", "--json")
    assert rc == 0 and {r["verified"] for r in json.loads(out)} == {"ok"}
    for name in ("scale-v1", "bandit-v2", "fewshot-v2"):
        shutil.copy(shipped_dir() / f"{name}.onnx", tmp_path)
        shutil.copy(shipped_dir() / f"{name}.json", tmp_path)
    data = bytearray((tmp_path / "bandit-v2.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bandit-v2.onnx").write_bytes(bytes(data))
    (tmp_path / "fewshot-v2.onnx").write_bytes(b"not a graph")
    c = json.loads((tmp_path / "fewshot-v2.json").read_text())
    c["sha256"] = __import__("hashlib").sha256(b"not a graph").hexdigest()
    (tmp_path / "fewshot-v2.json").write_text(json.dumps(c))
    monkeypatch.setattr("badger_runtime.policy_card.shipped_dir", lambda: tmp_path)
    rc, out, err = cli(capsys, "policies", "--verify", "--json")
    rows = {r["name"]: r["verified"] for r in json.loads(out)}
    assert rc == 2 and "2 of 3 policies failed to load: bandit-v2, fewshot-v2" in err
    assert rows["scale-v1"] == "ok" and "sha256" in rows["bandit-v2"]
    assert "onnxruntime cannot load" in rows["fewshot-v2"]
    rc, out, _ = cli(capsys, "policies", "--verify")
    assert rc == 2 and "sha256" in out
    rc, out, _ = cli(capsys, "policies", "scale-v1", "--verify")
    assert rc == 0 and out.splitlines()[0].endswith("[verified: ok]")
    rc, out, _ = cli(capsys, "policies", "bandit-v2", "--verify")
    assert rc == 2 and "[verified: " in out.splitlines()[0] and "sha256" in out.splitlines()[0]

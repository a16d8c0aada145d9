"""Shared fixtures: a small untrained policy, its checkpoint and its ONNX export."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# Under pytest-xdist (`-n 2`, README's test command) each worker keeps to one thread: BLAS and torch
# would otherwise start a thread per core in every worker: on two cores the suite took 868 s so, 480 s with
# one thread per worker (the few-shot growth tests 100-120 s against 20-27 s). Set before numpy or torch is
# imported; a thread count set in the environment is kept.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_k, "1")


@pytest.fixture(autouse=True, scope="session")
def _own_secrets_file(tmp_path_factory):
    """`badger client open` keeps session secrets in the user's state folder: the tests' go to a folder of theirs
    (a test that wants to see the file sets BADGER_SECRETS_FILE itself)."""
    old = os.environ.get("BADGER_SECRETS_FILE")
    os.environ["BADGER_SECRETS_FILE"] = str(tmp_path_factory.mktemp("secrets") / "session-secrets.json")
    yield
    if old is None:
        os.environ.pop("BADGER_SECRETS_FILE", None)
    else:
        os.environ["BADGER_SECRETS_FILE"] = old


def card_of(name: str) -> dict:
    """A shipped or retired policy's card, by name."""
    import json

    from badger_runtime.policy_card import card_paths, resolve_policy

    return json.loads(card_paths(resolve_policy(name))[1].read_text())


def run_without_torch(code: str, tmp_path, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) in a fresh interpreter where ``import torch`` fails; asserts it exits 0."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = dict(os.environ, PYTHONPATH=f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr
    return res


def copy_policy(onnx, dest, name: str = "p", edit=None):
    """A copy of the policy ``onnx`` (its graph and its card) in folder ``dest`` as ``NAME.onnx``, its card
    changed in place by ``edit(card)`` first when given; returns the copy's path."""
    import json
    import shutil
    from pathlib import Path

    onnx, out = Path(onnx), Path(dest) / f"{name}.onnx"
    shutil.copy(onnx, out)
    card = json.loads(onnx.with_suffix(".json").read_text())
    if edit is not None:
        edit(card)
    out.with_suffix(".json").write_text(json.dumps(card))
    return out


def top_level_imports(path) -> set[str]:
    """The top-level packages a module imports (absolute imports only)."""
    import ast

    mods = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def damaged_value(real):
    """Strategies for what a damaged or hostile record may hold where ``real`` belongs."""
    import numpy as np
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    values = [st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=8),
              st.lists(st.integers(-3, 3), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
              hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.int8, bool]),
                         hnp.array_shapes(min_dims=0, max_dims=4, max_side=4))]
    if isinstance(real, np.ndarray) and real.ndim:
        def reshaped(args):  # the real array, one axis longer or shorter, or one entry NaN / out of range
            axis, delta, how = args
            a = real
            if how == "resize":
                size = max(0, a.shape[axis % a.ndim] + delta)
                a = np.resize(a, a.shape[:axis % a.ndim] + (size,) + a.shape[axis % a.ndim + 1:])
            else:
                a = a.copy()
                if a.size:
                    a.reshape(-1)[0] = (np.nan if a.dtype.kind == "f" else -1 if a.dtype.kind == "i"
                                        else np.iinfo(a.dtype).max if a.dtype.kind == "u" else a.flat[0])
            return a
        values.append(st.tuples(st.integers(0, 3), st.sampled_from([-1, 1, 5]),
                                st.sampled_from(["resize", "poison"])).map(reshaped))
    return st.one_of(values)


def damage_one_entry(data, root: dict, *, to_value=None, from_value=None) -> list:
    """Replace one entry of the nested map ``root``, in place, at any depth (a top-level field, a section, one
    setting) by a ``damaged_value`` drawn from ``data`` (hypothesis ``st.data()``); ``to_value`` turns the real
    entry into what the strategies know (a tensor into an array), ``from_value(real, value)`` the drawn value into
    what the map may hold. Returns the entry's path."""
    from hypothesis import strategies as st

    node, key = root, data.draw(st.sampled_from(sorted(root, key=str)), label="key")
    path = [key]
    while isinstance(node[key], dict) and node[key] and data.draw(st.booleans(), label="deeper"):
        node = node[key]
        key = data.draw(st.sampled_from(sorted(node, key=str)), label="inner")
        path.append(key)
    real = node[key]
    value = data.draw(damaged_value(to_value(real) if to_value else real), label="value")
    node[key] = from_value(real, value) if from_value else value
    return path


def tiny_experiment(competitive_heads: int = 0, read_moments: bool = False, **task):
    from badger_runtime.config import AgentConfig, ExperimentConfig, PolicySpec, TrainConfig
    from badger_runtime.tasks.guessing import GuessingConfig

    spec = PolicySpec(hidden=16, msg_dim=6, key_dim=4, addr_dim=6, read_heads=2, id_dim=2, init_noise=0.5,
                      competitive_heads=competitive_heads, read_moments=read_moments)
    t = GuessingConfig(**({"feedback": "per_dim", "dims": (2, 3), "experts": (3, 5), "steps": 6} | task))
    tr = TrainConfig(seed=0, batches=30, batch_size=16, lr=1e-2, log_every=10, ckpt_every=10, eval_episodes=32,
                     objective="mean")
    return ExperimentConfig(name="tiny", agent=AgentConfig(policy=spec), task=t, train=tr).validate()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 30-batch training run of a tiny policy: (run dir, summary)."""
    from badger_runtime.training.train import train

    out = tmp_path_factory.mktemp("tiny_run")
    summary = train(tiny_experiment(), out, progress=False, final_eval=False, log=lambda *a: None)
    return out, summary


@pytest.fixture(scope="session")
def tiny_policy(tiny_run, tmp_path_factory):
    """The tiny run exported to ONNX: path of the .onnx (card beside it)."""
    from badger_runtime.training.export import export

    import json

    out = tmp_path_factory.mktemp("tiny_policy") / "tiny.onnx"
    card = export(tiny_run[0] / "checkpoint.pt", out)
    # tests step it past its 6-step training horizon; tests/test_horizon.py covers episodic policies
    card["lifetime"] = {"kind": "continual", "horizon": None, "why": "a test fixture"}
    out.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return out


@pytest.fixture(scope="session")
def tiny_competitive_policy(tmp_path_factory):
    """A tiny policy whose first read head competes for the slots (membrane.compete) and whose reads
    return the value-weighted address too (read_moments), exported."""
    import json

    from badger_runtime.training.export import export
    from badger_runtime.training.train import train

    run = tmp_path_factory.mktemp("tiny_comp_run")
    cfg = tiny_experiment(competitive_heads=1, read_moments=True)
    cfg.train.batches = 10
    train(cfg, run, progress=False, final_eval=False, log=lambda *a: None)
    out = tmp_path_factory.mktemp("tiny_comp") / "comp.onnx"
    card = export(run / "checkpoint.pt", out)
    card["lifetime"] = {"kind": "continual", "horizon": None, "why": "a test fixture"}
    out.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return out

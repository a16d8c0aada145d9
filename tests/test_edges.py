"""Shared functions at their documented values, where comparing runtimes cannot see a change (every runtime calls
the same function) and no other test pins the edge: each case here was a one-line mutation that the rest of the
suite let through (session 44's mutation audits)."""

from __future__ import annotations

import stat

import numpy as np
import pytest

from badger_runtime.actors.supervisor import Supervision
from badger_runtime.codec import CodecError, pack_array, unpack_array
from badger_runtime.config import ConfigError, load_experiment
from badger_runtime.engine import numpy_ops
from badger_runtime.episodes import objective_weights
from badger_runtime.membrane import compete
from badger_runtime.tasks.fewshot import _labels

OPS = numpy_ops()


def test_competitive_reads_share_a_slot_among_the_experts_that_see_it():
    """compete normalises each slot over the experts (not over the slots), and only over those that see it."""
    A = 4
    q, addr, val = np.zeros((1, 3, A), np.float32), np.ones((1, 2, A), np.float32), np.ones((1, 2), np.float32)
    _, shares = compete(OPS, q, addr, val)
    assert np.allclose(shares[0, :, 0], [1 / 3] * 3, atol=1e-5)  # each of 2 slots split 3 ways
    visible = np.array([[[False, True], [True, True]]])  # expert 0 sees slot 1 only
    _, shares = compete(OPS, q[:, :2], addr, val, visible=visible)
    assert np.allclose(shares[0, :, 0], [0.25, 0.75], atol=1e-5)


def test_the_weighted_objective_counts_every_step_more_the_later():
    assert np.allclose(objective_weights("weighted", 3), [1 / 6, 2 / 6, 3 / 6])
    assert np.allclose(objective_weights("last", 3), [0, 0, 1]) and np.allclose(objective_weights("mean", 4), 0.25)


def test_array_codec_edges():
    with pytest.raises(CodecError):
        pack_array(np.zeros((1,) * 33, np.float32))  # more axes than MAX_NDIM
    a = np.arange(4, dtype=np.float32)
    assert np.array_equal(unpack_array(pack_array(a), max_bytes=16), a)  # exactly at the byte bound
    with pytest.raises(CodecError):
        unpack_array(pack_array(a), max_bytes=15)
    out = unpack_array({"dtype": "float32", "shape": [1], "data": bytearray(4)})
    assert not out.flags.writeable  # a read-only view, even of a writable buffer: no alias to write through


def test_a_shared_policy_call_failure_escalates_at_max_restarts():
    s = Supervision("restart", 2)
    assert [s.decide(r, False, shared=True) for r in range(4)] == ["restart", "restart", "escalate", "escalate"]


@pytest.mark.parametrize("setting", ["agent.agreement.quorum=0", "train.continue_prob=1",
                                     "agent.policy.competitive_heads=9"])
def test_config_bounds(setting):
    with pytest.raises(ConfigError):
        load_experiment(None, [setting])


def test_fewshot_label_orders_are_shuffled_by_the_seed():
    a, b = _labels(np.random.default_rng(0), 4, 8, 2), _labels(np.random.default_rng(1), 4, 8, 2)
    assert sorted(a.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert a.tolist() != [0, 0, 1, 1, 2, 2, 3, 3] and a.tolist() != b.tolist()


def test_the_client_secrets_file_keeps_its_folder_private_and_its_newest_entries(tmp_path, monkeypatch):
    from badger_runtime.serve import client_secrets as cs

    monkeypatch.setattr(cs, "MAX_ENTRIES", 2)
    f = cs.SecretsFile(tmp_path / "state" / "secrets.json")
    for i in range(3):
        f.put("127.0.0.1:1", f"s{i}", f"x{i}")
    assert f.get("127.0.0.1:1", "s0") is None and f.get("127.0.0.1:1", "s2") == "x2"
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    f.forget("127.0.0.1:1", "s2")
    assert f.get("127.0.0.1:1", "s2") is None


def test_the_bandit_reports_the_standard_error_of_its_episodes_final_regret():
    from badger_runtime.tasks import default_config, make_task

    task = make_task(default_config("bandit"))
    regret = np.array([[1.0, 0.0]] * 3)  # [T = 3, E = 2]: final regrets 3 and 0
    r = task.report({"regret": regret, "best": np.zeros((3, 2))}, [], steps=3, seed=0, baselines=False)
    assert r["final_regret"] == 1.5 and r["final_regret_sem"] == pytest.approx(1.5 / np.sqrt(2))


def test_the_client_forgets_a_session_secret_when_the_session_is_closed():
    from badger_runtime.serve.client import _Codec

    c = _Codec(None, 1 << 20)
    rid, _ = c.encode("open", "s", {})
    c.unwrap(rid, {"id": rid, "ok": True, "body": {"session": "s", "secret": "x"}})
    assert c.secrets == {"s": "x"}
    rid, _ = c.encode("close", "s", {})
    c.unwrap(rid, {"id": rid, "ok": True, "body": {"session": "s", "closed": True}})
    assert c.secrets == {}

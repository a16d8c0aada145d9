"""The served agent: SessionManager (sans-IO), checkpoints, and the trio server in-process."""

from __future__ import annotations

import copy
import shutil
import struct

import msgpack
import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from badger_runtime.policy_card import load_policy
from badger_runtime.serve import store as store_mod
from badger_runtime.serve.client import AsyncClient, ServerError
from badger_runtime.serve.protocol import FrameDecoder, encode_frame, validate_reply
from badger_runtime.serve.server import Server
from badger_runtime.serve.sessions import Limits, SessionManager, new_agent
from badger_runtime.serve.store import SessionStore, StoreError

from .conftest import copy_policy, damage_one_entry, damaged_value

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def policy(tiny_policy):
    return load_policy(tiny_policy)


def make(policy, path=None, **kw):
    m = SessionManager(policy, SessionStore(path, fsync=False) if path else None, **kw)
    m.restore_all()
    return m


_ids = iter(range(1, 1 << 62))


SECRETS: dict = {}  # session -> the secret its last open returned, sent like a client does


def call(m, kind, session=None, **body):
    if session is not None and session in SECRETS and kind != "health" and "secret" not in body:
        body["secret"] = SECRETS[session]
    r = m.handle({"id": next(_ids), "kind": kind, "session": session, "token": None, "body": body})
    if r["ok"] and kind == "open" and "secret" in r["body"]:
        SECRETS[r["body"]["session"]] = r["body"]["secret"]
    return r


def ok(m, kind, session=None, **body):
    r = call(m, kind, session, **body)
    assert r["ok"], r
    return r["body"]


def err(m, kind, session=None, **body):
    r = call(m, kind, session, **body)
    assert not r["ok"], r
    return r["error"]["code"]


def drive(rng, d, fb_size):
    return rng.uniform(-1, 1, d).astype(np.float32), rng.uniform(-1, 1, fb_size).astype(np.float32)


def ref_step(agent, obs, fb):
    out, info = agent.step(agent.observation({'observation': obs[None], 'feedback': fb[None]}))
    return out[0], int(info.rounds[0])


def state_of(m, name):
    """Everything that defines a session, for before/after comparisons."""
    rec = m.record(m.sessions[name])
    rec.pop("updated")
    return msgpack.packb(rec, default=lambda a: a.tobytes() if isinstance(a, np.ndarray) else str(a))


# ---- the manager: behaviour --------------------------------------------------------------

def test_steps_grow_shrink_match_a_reference_agent(policy, tmp_path):
    m = make(policy, tmp_path)
    info = ok(m, "open", "a", experts=5, dims=3, seed=7)
    assert (info["t"], info["experts"], info["dims"], info["feedback_size"]) == (0, 5, 3, 3)
    ref = new_agent(policy, 5, 3, 7)
    rng = np.random.default_rng(0)
    for t in range(12):
        if t == 4:
            assert ok(m, "add_experts", "a", n=3)["indices"] == [5, 6, 7]
            ref.add_experts(3)
        if t == 6:
            assert ok(m, "add_experts", "a", n=2, init="fresh")["experts"] == 10
            ref.add_experts(2, init="fresh")
        if t == 9:
            assert ok(m, "remove_experts", "a", indices=[0, 3])["experts"] == 8
            ref.remove_experts([0, 3])
        obs, fb = drive(rng, 3, 3)
        r = ok(m, "step", "a", observation=obs, feedback=fb, t=t)
        out, rounds = ref_step(ref, obs, fb)
        assert np.array_equal(r["outputs"], out)
        assert r["t"] == t + 1 and r["rounds"] == rounds
        n = ref.n_experts  # dense routing: every expert hears all N each round
        assert r["messages"] == {"sent": rounds * n * n, "delivered": rounds * n * n, "dropped": 0}
    # slots: the same step written as one vector
    obs, fb = drive(rng, 3, 3)
    r = ok(m, "step", "a", slots=np.concatenate([obs, fb]).tolist())
    assert np.array_equal(r["outputs"], ref_step(ref, obs, fb)[0])


def test_reset_starts_a_new_episode(policy):
    m = make(policy)
    ok(m, "open", "a", experts=4, dims=2, seed=3)
    ok(m, "step", "a", observation=[0, 0], feedback=[1, 1])
    info = ok(m, "reset", "a")
    assert (info["t"], info["episode"], info["seed"], info["last_outputs"]) == (0, 1, 3, None)
    info = ok(m, "reset", "a", seed=11, experts=6, dims=3)
    assert (info["episode"], info["experts"], info["dims"]) == (2, 6, 3)
    ref = new_agent(policy, 6, 3, 11)
    obs, fb = drive(np.random.default_rng(1), 3, 3)
    assert np.array_equal(ok(m, "step", "a", observation=obs, feedback=fb, episode=2)["outputs"],
                          ref_step(ref, obs, fb)[0])
    assert err(m, "step", "a", observation=obs, feedback=fb, episode=1) == "wrong_step"


def test_wrong_step_is_refused_and_names_where_the_session_is(policy):
    m = make(policy)
    ok(m, "open", "a", experts=3, dims=2)
    ok(m, "step", "a", observation=[0, 0], feedback=[1, 1], t=0)
    r = call(m, "step", "a", observation=[0, 0], feedback=[1, 1], t=0)  # a retry of the same step
    assert r["error"]["code"] == "wrong_step" and "t=1" in r["error"]["message"]
    assert ok(m, "stats", "a")["t"] == 1


GOOD = {"observation": [0.1, 0.2, 0.3], "feedback": [0.5, 0.5, 0.5]}
BAD_STEPS = [
    ({"observation": [0.1, 0.2], "feedback": [0.5] * 3}, "bad_input"),  # wrong shape
    ({"observation": [0.1, 0.2, 0.3], "feedback": [0.5]}, "bad_input"),  # feedback size (per_dim)
    ({"observation": [[0.1, 0.2, 0.3]], "feedback": [0.5] * 3}, "bad_input"),  # nested list
    ({"observation": np.zeros((1, 3), np.float32), "feedback": [0.5] * 3}, "bad_input"),  # 2-D array
    ({"observation": [0.1, float("nan"), 0.3], "feedback": [0.5] * 3}, "bad_input"),
    ({"observation": [0.1, 0.2, 0.3], "feedback": [0.5, float("inf"), 0.5]}, "bad_input"),
    ({"observation": np.array([0, np.nan, 0], np.float32), "feedback": [0.5] * 3}, "bad_input"),
    ({"observation": [0.1, 0.2, 5e3], "feedback": [0.5] * 3}, "bad_input"),  # out of range
    ({"observation": np.zeros(3, np.int32), "feedback": [0.5] * 3}, "bad_input"),  # dtype
    ({"observation": np.zeros(3, bool), "feedback": [0.5] * 3}, "bad_input"),
    ({"observation": [True, False, True], "feedback": [0.5] * 3}, "bad_input"),
    ({"observation": ["a", "b", "c"], "feedback": [0.5] * 3}, "bad_input"),
    ({"observation": "0.1,0.2,0.3", "feedback": [0.5] * 3}, "bad_input"),
    ({"observation": {"x": 1}, "feedback": [0.5] * 3}, "bad_input"),
    ({"observation": b"\x00" * 12, "feedback": [0.5] * 3}, "bad_input"),
    ({"observation": [0.1, 0.2, 0.3]}, "bad_request"),  # no feedback
    ({}, "bad_request"),
    ({"slots": [0.0] * 5}, "bad_input"),
    ({"slots": [0.0] * 6, "observation": [0.0] * 3}, "bad_request"),
    (GOOD | {"extra": 1}, "bad_request"),
    (GOOD | {"t": "0"}, "bad_request"),
    (GOOD | {"t": 5}, "wrong_step"),
    (GOOD | {"episode": 3}, "wrong_step"),
]


@pytest.mark.parametrize("body, code", BAD_STEPS)
def test_bad_steps_are_refused_and_change_nothing(policy, body, code):
    m = make(policy)
    ok(m, "open", "a", experts=4, dims=3, seed=1)
    ok(m, "step", "a", **GOOD)
    before = state_of(m, "a")
    assert err(m, "step", "a", **body) == code
    assert state_of(m, "a") == before
    ok(m, "step", "a", **GOOD)  # and the session goes on


BAD_OTHER = [
    ("open", "b", {}, "bad_request"),  # no dims
    # the code rule (docs/protocol.md, Errors): below the protocol's range -> bad_request, above a
    # limit of this server -> limit, refused by the session's state -> bad_input
    ("open", "b", {"dims": 0}, "bad_request"),
    ("open", "b", {"dims": 300}, "limit"),
    ("open", "b", {"dims": 3, "experts": 0}, "bad_request"),
    ("open", "b", {"dims": 3, "experts": 10_000}, "limit"),
    ("open", "b", {"dims": 3, "seed": -1}, "bad_request"),
    ("open", "b", {"dims": 3, "seed": 2**64 - 1}, "bad_request"),
    ("open", "b", {"dims": 3, "seed": 1.5}, "bad_request"),
    ("open", "b", {"dims": 3, "rounds": 0}, "bad_request"),
    ("open", "b", {"dims": 3, "rounds": 65}, "limit"),
    ("open", "b", {"dims": 3, "colour": "red"}, "bad_request"),
    ("open", "../etc", {"dims": 3}, "bad_request"),
    ("open", "a", {"dims": 3}, "session_exists"),
    ("open", "b", {"dims": 3, "resume": "yes"}, "bad_request"),
    ("open", "b", {"snapshot": {"agent": 1}}, "bad_input"),
    ("open", "b", {"snapshot": "x"}, "bad_input"),
    ("step", None, GOOD, "bad_request"),
    ("step", "nobody", GOOD, "no_session"),
    ("reset", "a", {"dims": 0}, "bad_request"),
    ("reset", "a", {"seed": "x"}, "bad_request"),
    ("add_experts", "a", {"n": 0}, "bad_request"),
    ("add_experts", "a", {"n": 2000}, "limit"),
    ("add_experts", "a", {"n": 1, "init": "weird"}, "bad_request"),
    ("add_experts", "a", {"n": 1, "source": -1}, "bad_request"),
    ("add_experts", "a", {"n": 1, "init": 3}, "bad_request"),
    ("add_experts", "a", {"n": 1, "source": 99}, "bad_input"),
    ("add_experts", "a", {"n": 1, "init": "fresh", "source": 1}, "bad_input"),  # a source was ignored
    ("remove_experts", "a", {"indices": []}, "bad_request"),
    ("remove_experts", "a", {"indices": [7]}, "bad_input"),
    ("remove_experts", "a", {"indices": [0, 1, 2, 3]}, "bad_input"),  # every expert
    ("remove_experts", "a", {"indices": [0.0]}, "bad_request"),
    ("remove_experts", "a", {}, "bad_request"),
    ("snapshot", "a", {"x": 1}, "bad_request"),
    ("close", "nobody", {}, "no_session"),
    ("stats", "nobody", {}, "no_session"),
]


@pytest.mark.parametrize("kind, session, body, code", BAD_OTHER)
def test_bad_requests_are_refused_and_change_nothing(policy, kind, session, body, code):
    m = make(policy)
    ok(m, "open", "a", experts=4, dims=3, seed=1)
    before = state_of(m, "a")
    assert err(m, kind, session, **body) == code
    assert state_of(m, "a") == before and list(m.sessions) == ["a"]


def test_limits(policy):
    m = make(policy, limits=Limits(max_sessions=2, max_experts=6))
    ok(m, "open", "a", dims=2, experts=5)
    ok(m, "open", None, dims=2, experts=1)
    assert err(m, "open", "c", dims=2) == "limit"
    assert err(m, "add_experts", "a", n=2) == "limit"
    ok(m, "add_experts", "a", n=1)


def test_a_session_queues_at_most_max_waiting_requests_and_checks_the_secret_before_any_wait(policy):
    """While a request of a session runs, at most ``Limits.max_waiting`` more wait for it (each holds one of the
    server's worker threads); the next gets ``busy`` at once, a request without the session's secret is refused at
    once instead of waiting, other sessions are not held up, and the waiting requests then run in turn."""
    import threading
    import time

    def in_thread(*args, **body):
        out = []
        t = threading.Thread(target=lambda: out.append(call(m, *args, **body)), daemon=True)
        t.start()
        return t, out

    m = make(policy, limits=Limits(max_waiting=2))
    obs, fb = drive(np.random.default_rng(0), 3, 3)
    for name in ("a", "b"):
        ok(m, "open", name, experts=4, dims=3)
    s = m.sessions["a"]
    s.lock.acquire()  # one of a's requests is running
    try:
        waiting = [in_thread("step", "a", observation=obs, feedback=fb) for _ in range(2)]
        deadline = time.monotonic() + 10
        while s.waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert s.waiting == 2
        for body, code in (({}, "busy"), ({"secret": "not-it"}, "forbidden")):
            t, out = in_thread("step", "a", observation=obs, feedback=fb, **body)
            t.join(5)
            assert out and out[0]["error"]["code"] == code, (code, out)
        ok(m, "step", "b", observation=obs, feedback=fb)
    finally:
        s.lock.release()
    for t, out in waiting:
        t.join(10)
        assert out and out[0]["ok"], out
    assert s.waiting == 0 and s.steps_total == 2 and m.metrics.to_dict()["counters"]["sessions.busy"] == 1


def test_a_request_that_waited_for_a_session_closed_meanwhile_finds_it_closed(policy, tmp_path):
    """A step waiting for its session while the request ahead of it closes the session gets ``no_session`` once it
    has the session: it never steps the closed agent, and no checkpoint of it reappears in the store."""
    import threading
    import time

    m = make(policy, tmp_path)
    obs, fb = drive(np.random.default_rng(0), 3, 3)
    ok(m, "open", "a", experts=4, dims=3)
    s = m.sessions["a"]
    out = []
    with s.lock:  # the close below runs here as `close` does, under the session's lock
        t = threading.Thread(target=lambda: out.append(call(m, "step", "a", observation=obs, feedback=fb)))
        t.start()
        deadline = time.monotonic() + 10
        while s.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert s.waiting == 1
        m.store.delete("a")
        s.closed = True
        m.sessions.pop("a")
    t.join(10)
    assert out and out[0]["error"]["code"] == "no_session" and "closed" in out[0]["error"]["message"]
    assert s.steps_total == 0 and s.agent.t == 0 and m.store.names() == []


def test_sessions_are_isolated(policy):
    """Session a's outputs are those of a lone agent, whatever happens to b meanwhile."""
    m = make(policy)
    ok(m, "open", "a", experts=4, dims=3, seed=5)
    ok(m, "open", "b", experts=4, dims=3, seed=5)  # the same seed: same start, separate state
    ref = new_agent(policy, 4, 3, 5)
    rng = np.random.default_rng(2)
    for t in range(8):
        obs, fb = drive(rng, 3, 3)
        assert np.array_equal(ok(m, "step", "a", observation=obs, feedback=fb)["outputs"],
                              ref_step(ref, obs, fb)[0])
        if t > 5:
            continue
        # b: steps with other inputs, bad inputs, growth, then closes
        ok(m, "step", "b", observation=-obs, feedback=fb * 0)
        err(m, "step", "b", observation=[np.nan] * 3, feedback=fb)
        if t == 3:
            ok(m, "add_experts", "b", n=4)
        if t == 5:
            ok(m, "close", "b")
    assert list(m.sessions) == ["a"]


def test_snapshot_open_from_it_and_restart_continue_identically(policy, tmp_path):
    m = make(policy, tmp_path / "one")
    ok(m, "open", "a", experts=4, dims=3, seed=9)
    rng = np.random.default_rng(3)
    for t in range(5):
        ok(m, "step", "a", **dict(zip(("observation", "feedback"), drive(rng, 3, 3))))
        if t == 2:
            ok(m, "add_experts", "a", n=3)
    rec = ok(m, "snapshot", "a")["record"]
    assert rec["format"] == store_mod.FORMAT and rec["version"] == store_mod.FORMAT_VERSION
    # the snapshot survives the wire (msgpack with arrays) and opens as a new session
    wire = FrameDecoder(allow_nonfinite=True)
    wire.feed(encode_frame({"record": rec}))
    twin = ok(m, "open", "twin", snapshot=next(wire.frames())["record"])
    assert (twin["t"], twin["experts"]) == (5, 7)
    # a new manager on a copy of the state dir restores the session
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    m2 = make(policy, tmp_path / "two")
    assert set(m2.sessions) == {"a", "twin"}
    assert ok(m2, "stats", "a")["t"] == 5
    for t in range(5, 9):
        obs, fb = drive(rng, 3, 3)
        outs = [ok(mm, "step", name, observation=obs, feedback=fb, t=t)["outputs"]
                for mm, name in ((m, "a"), (m, "twin"), (m2, "a"))]
        assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
        if t == 6:  # the generator state came along: the same clones are drawn
            assert [ok(mm, "add_experts", name, n=2)["indices"]
                    for mm, name in ((m, "a"), (m, "twin"), (m2, "a"))] == [[7, 8]] * 3


class FailingStore(SessionStore):
    fail = False

    def write(self, name, record):
        if self.fail:
            raise OSError(28, "No space left on device")
        return super().write(name, record)


def test_a_failed_checkpoint_undoes_the_change(policy, tmp_path):
    st_ = FailingStore(tmp_path, fsync=False)
    m = SessionManager(policy, st_)
    m.restore_all()
    ok(m, "open", "a", experts=4, dims=3, seed=1)
    ref = new_agent(policy, 4, 3, 1)
    obs, fb = drive(np.random.default_rng(4), 3, 3)
    ok(m, "step", "a", observation=obs, feedback=fb)
    ref_step(ref, obs, fb)
    before = state_of(m, "a")
    st_.fail = True
    for kind, body in (("step", {"observation": obs, "feedback": fb}), ("add_experts", {"n": 2}),
                       ("remove_experts", {"indices": [1]}), ("reset", {}), ("open", {"dims": 2})):
        assert err(m, kind, "a" if kind != "open" else "new", **body) == "storage"
        assert state_of(m, "a") == before and "new" not in m.sessions
    st_.fail = False
    out = ok(m, "step", "a", observation=obs, feedback=fb)["outputs"]
    assert np.array_equal(out, ref_step(ref, obs, fb)[0])
    assert m.metrics.to_dict()["counters"]["checkpoint.failed"] == 5


def test_checkpoint_every_k_and_at_shutdown(policy, tmp_path):
    m = make(policy, tmp_path, checkpoint_every=3)
    ok(m, "open", "a", experts=3, dims=2)
    for _ in range(4):
        ok(m, "step", "a", observation=[0, 0], feedback=[1, 1])
    assert store_mod.decode(m.store.path("a").read_bytes())["agent"]["t"] == 3
    assert ok(m, "stats", "a")["checkpoint"]["pending"] == 1
    assert m.checkpoint_all() == 1
    assert store_mod.decode(m.store.path("a").read_bytes())["agent"]["t"] == 4


def test_close_deletes_the_checkpoint(policy, tmp_path):
    m = make(policy, tmp_path)
    ok(m, "open", "a", experts=3, dims=2)
    assert m.store.path("a").exists()
    assert ok(m, "close", "a")["closed"]
    assert not m.store.path("a").exists() and err(m, "step", "a", **GOOD) == "no_session"


def test_restore_moves_unusable_checkpoints_aside(policy, tmp_path):
    m = make(policy, tmp_path)
    for name in "abcde":
        ok(m, "open", name, experts=3, dims=2)
    st_ = m.store
    data = bytearray(st_.path("b").read_bytes())
    data[-5] ^= 0xFF
    st_.path("b").write_bytes(bytes(data))  # a flipped bit: checksum
    raw = st_.path("c").read_bytes()
    st_.path("c").write_bytes(raw[:8] + struct.pack(">I", 99) + raw[12:])  # a future version
    rec = store_mod.decode(st_.path("d").read_bytes())
    rec["policy"]["sha256"] = "0" * 64  # another policy's session
    st_.write("d", rec)
    st_.path("e").write_bytes(b"garbage")
    (st_.dir / "f.ckpt.tmp").write_bytes(b"half a write")
    m2 = make(policy, tmp_path)
    assert list(m2.sessions) == ["a"]
    assert sorted(p.name for p in st_.rejected_dir.iterdir()) == ["b.ckpt", "c.ckpt", "e.ckpt"]
    assert not (st_.dir / "f.ckpt.tmp").exists()
    counters = m2.metrics.to_dict()["counters"]
    assert counters["restore.rejected"] == 3 and counters["restore.kept"] == 1
    # another policy's session is intact: left where it is, its name taken, restored by a server of that policy
    # (a restart with the wrong --policy moved every session to rejected/, where none was restored again)
    assert m2.kept == {"d": "policy sha256 0000000000000000..."} and st_.path("d").exists()
    assert err(m2, "open", "d", experts=3, dims=2) == "session_exists"
    rec["policy"]["sha256"] = policy.card["sha256"]
    st_.write("d", rec)
    assert sorted(make(policy, tmp_path).sessions) == ["a", "d"]
    with pytest.raises(StoreError, match="version 99"):
        store_mod.decode(raw[:8] + struct.pack(">I", 99) + raw[12:])


def test_stats_and_health(policy):
    m = make(policy)
    assert ok(m, "health") | {"uptime_s": 0} == {"status": "ok", "live": True, "ready": True, "sessions": 0,
                                                 "uptime_s": 0}
    ok(m, "open", "a", experts=3, dims=2)
    for _ in range(3):
        ok(m, "step", "a", observation=[0, 0], feedback=[1, 1])
    err(m, "step", "a", observation=[0], feedback=[1, 1])
    s = ok(m, "stats")
    assert s["sessions"] == 1 and s["counters"]["steps"] == 3 and s["counters"]["errors.bad_input"] == 1
    h = s["latency_ms"]["step"]
    assert h["count"] == 4 and sum(h["counts"]) == 4 and len(h["counts"]) == len(h["le_ms"]) + 1
    assert h["p50_ms"] is not None


# ---- the manager: fuzz -------------------------------------------------------------------

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**64 - 1), st.floats(), st.text(max_size=5),
                   st.binary(max_size=8), st.lists(st.floats(-2, 2), max_size=7),
                   st.lists(st.integers(-2, 9), max_size=4),
                   st.sampled_from([np.zeros(3, np.float32), np.full(3, np.nan, np.float32), np.zeros(6),
                                    np.arange(3), np.zeros((2, 3), np.float32)]))
FIELDS = st.sampled_from(["observation", "feedback", "slots", "t", "episode", "n", "init", "source", "indices",
                          "dims", "experts", "seed", "rounds", "resume", "snapshot", "x"])


@FUZZ
@given(ops=st.lists(st.tuples(st.sampled_from(["open", "reset", "step", "add_experts", "remove_experts",
                                               "snapshot", "stats", "close", "health"]),
                              st.sampled_from([None, "a", "b", "", "x" * 70]),
                              st.dictionaries(FIELDS, VALUES, max_size=4)), max_size=12))
def test_fuzz_requests_never_escape_and_errors_change_nothing(policy, ops):
    m = make(policy, limits=Limits(max_experts=64, max_dims=16))
    ok(m, "open", "a", experts=3, dims=3)
    for kind, session, body in ops:
        before = state_of(m, "a") if "a" in m.sessions else None
        r = call(m, kind, session, **body)
        validate_reply(r)
        encode_frame(r)  # every reply goes on the wire
        if not r["ok"]:
            assert r["error"]["code"] != "internal", r
            assert (state_of(m, "a") if "a" in m.sessions else None) == before


# ---- the command line ----------------------------------------------------------------------

def test_serve_refuses_a_policy_that_does_not_match_its_card(tiny_policy, tmp_path, capsys):
    from badger_runtime.cli import main

    p = copy_policy(tiny_policy, tmp_path, edit=lambda card: card.update(sha256="f" * 64))
    assert main(["serve", "--policy", str(p), "--state-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:0"]) == 2
    assert "sha256" in capsys.readouterr().err


def test_serve_refuses_a_public_address_without_a_token(tiny_policy, tmp_path, capsys, monkeypatch):
    from badger_runtime.cli import main

    monkeypatch.delenv("BADGER_TOKEN", raising=False)
    assert main(["serve", "--policy", str(tiny_policy), "--state-dir", str(tmp_path), "--listen", "0.0.0.0:0"]) == 2
    assert "token" in capsys.readouterr().err


# ---- the server, in-process (trio, loopback) ------------------------------------------------

def run_server(manager, test, **kw):
    """Run ``await test(port, server)`` against a live server; then shut it down gracefully."""
    async def main():
        server = Server(manager, **kw)
        async with trio.open_nursery() as n:
            addrs = await n.start(server.run, "127.0.0.1", 0)
            try:
                await test(addrs[0][1], server)
            finally:
                server.shutdown()
    trio.run(main)


async def raw(port):
    return await trio.open_tcp_stream("127.0.0.1", port)


async def read_replies(stream, timeout=5.0):
    """All reply frames until the server closes the connection."""
    dec, out = FrameDecoder(allow_nonfinite=True), []
    with trio.fail_after(timeout):
        while data := await stream.receive_some(1 << 16):
            dec.feed(data)
            out.extend(validate_reply(f) for f in dec.frames())
    return out


def req(kind, session=None, rid=1, **body):
    return encode_frame({"id": rid, "kind": kind, "session": session, "body": body})


BROKEN_STREAMS = [
    (struct.pack(">I", 2**31), "bad_frame"),  # oversized
    (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "bad_frame"),  # not msgpack
    (struct.pack(">I", 1) + b"\x01", "bad_frame"),  # not a map
    (req("health") + struct.pack(">I", 2) + b"\x92\x01", "bad_frame"),  # a good frame, then a list
]


def test_server_bad_frames_and_requests(policy):
    m = make(policy)

    async def test(port, server):
        c = await AsyncClient.connect(f"127.0.0.1:{port}")
        await c.open(dims=3, experts=3, session="a")
        for data, code in BROKEN_STREAMS:
            s = await raw(port)
            await s.send_all(data)
            replies = await read_replies(s)  # ends: the server closed the connection
            assert replies[-1]["ok"] is False and replies[-1]["error"]["code"] == code
        # a stream cut inside a frame, and one cut inside the header
        for data in (req("health")[:-2], b"\x00\x00"):
            s = await raw(port)
            await s.send_all(data)
            await s.aclose()
        # frames that are not valid requests: an error reply each, the connection goes on
        s = await raw(port)
        bodies = [{"id": 1, "kind": "dance", "body": {}}, {"kind": "health", "body": {}},
                  {"id": 2, "kind": "step", "body": []}, {"id": 3, "kind": "health", "body": {}, "x": 1}]
        await s.send_all(b"".join(encode_frame(b) for b in bodies) + req("health", rid=4))
        dec = FrameDecoder()
        got = []
        while len(got) < 5:
            dec.feed(await s.receive_some(1 << 16))
            got.extend(dec.frames())
        assert [g["ok"] for g in got] == [False, False, False, False, True]
        assert got[0]["error"]["code"] == "unknown_kind" and got[0]["id"] == 1
        await s.aclose()
        # the session and the server go on
        r = await c.step("a", [0, 0, 0], [1, 1, 1])
        assert r["t"] == 1
        stats = await c.stats()
        assert stats["counters"]["frames.bad"] >= 6 and stats["connections"] == 1
        await c.aclose()
    run_server(m, test)


def test_server_token(policy):
    m = make(policy)

    async def test(port, server):
        assert (await (await AsyncClient.connect(f"127.0.0.1:{port}")).health())["ready"]  # probes need none
        for token in (None, "wrong"):
            c = await AsyncClient.connect(f"127.0.0.1:{port}", token=token)
            with pytest.raises(ServerError, match="unauthorized"):
                await c.open(dims=2)
            with pytest.raises(ConnectionError):  # refused connections are closed
                await c.stats()
        c = await AsyncClient.connect(f"127.0.0.1:{port}", token="s3cret")
        assert (await c.open(dims=2, session="a"))["session"] == "a"
        assert (await c.stats())["counters"]["auth.refused"] == 2
    run_server(m, test, token="s3cret")


def test_vanishing_clients_leave_no_tasks(policy, tmp_path):
    m = make(policy, tmp_path)

    async def test(port, server):
        c = await AsyncClient.connect(f"127.0.0.1:{port}")
        secret = (await c.open(dims=3, experts=4, session="a"))["secret"]
        await trio.testing.wait_all_tasks_blocked(0.05)
        base = await c.stats()
        for i in range(30):
            s = await raw(port)
            if i % 3 == 1:
                await s.send_all(req("step", "a")[:7])  # half a frame
            if i % 3 == 2:  # a whole step, then gone before the reply
                await s.send_all(req("step", "a", observation=[0.0] * 3, feedback=[1.0] * 3, secret=secret))
            await s.aclose()
        with trio.fail_after(5):
            while True:
                now = await c.stats()
                if (now["counters"]["connections.accepted"] == base["counters"]["connections.accepted"] + 30
                        and now["connections"] == 1 and now["tasks"] == base["tasks"]
                        and now["counters"].get("requests.step") == 10):
                    break
                await trio.sleep(0.02)
        assert (await c.health())["ready"]
        assert (await c.stats("a"))["t"] == 10  # steps whose client vanished were still applied
    run_server(m, test)


def test_graceful_shutdown_finishes_the_step_in_flight(policy, tmp_path):
    import threading

    m = make(policy, tmp_path, checkpoint_every=0)  # steps are written only at shutdown
    slow = m.handle
    entered, release = threading.Event(), threading.Event()

    def handle(r):
        if r["kind"] == "step":  # hold the step in its worker thread until the shutdown began
            entered.set()
            release.wait(10)
        return slow(r)
    m.handle = handle
    seen = {}

    async def test(port, server):
        c = await AsyncClient.connect(f"127.0.0.1:{port}")
        await c.open(dims=3, experts=3, session="a")
        idle = await AsyncClient.connect(f"127.0.0.1:{port}")
        await idle.health()

        async def step():
            seen["reply"] = await c.step("a", [0, 0, 0], [1, 1, 1])
        async with trio.open_nursery() as n:
            n.start_soon(step)
            await trio.to_thread.run_sync(entered.wait, 10)
            server.shutdown()  # while the step is in its worker thread
            release.set()
        with pytest.raises(ConnectionError):  # idle connections are closed
            await idle.health()
    run_server(m, test)
    assert seen["reply"]["t"] == 1
    assert store_mod.decode(m.store.path("a").read_bytes())["agent"]["t"] == 1


def test_async_clients_step_sessions_side_by_side(policy):
    m = make(policy)
    outs = {}

    async def test(port, server):
        async def drive_one(i):
            async with await AsyncClient.connect(f"127.0.0.1:{port}") as c:
                await c.open(dims=2, experts=3, seed=i, session=f"s{i}")
                outs[i] = [(await c.step(f"s{i}", [0, 0], [1, 1], t=t))["outputs"] for t in range(5)]
        async with trio.open_nursery() as n:
            for i in range(4):
                n.start_soon(drive_one, i)
    run_server(m, test)
    for i in range(4):
        ref = new_agent(policy, 3, 2, i)
        for t in range(5):
            assert np.array_equal(outs[i][t], ref_step(ref, np.zeros(2, np.float32), np.ones(2, np.float32))[0])


@FUZZ
@given(chunks=st.lists(st.one_of(st.binary(max_size=40),
                                 st.sampled_from([req("health"), req("stats"), req("step", "a", t=0),
                                                  struct.pack(">I", 5), req("open", "a", dims=2)])),
                       max_size=8))
def test_fuzz_the_connection_handler(policy, chunks):
    """Any byte stream: the handler replies with valid frames, ends, and never raises."""
    m = make(policy)
    server = Server(m)

    async def main():
        client, server_side = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as n:
            n.start_soon(server._connection, server_side)
            try:
                for c in chunks:
                    await client.send_all(c)
                await client.send_eof()
            except trio.BrokenResourceError:
                pass  # the server closed a broken stream
            await read_replies(client)
    trio.run(main)
    assert not server._conns


@pytest.mark.parametrize("kind", ["random", "hardwired", "topk"])
def test_records_of_every_routing_kind_round_trip(policy, kind):
    import dataclasses

    cfg = dataclasses.replace(policy.agent, routing=dataclasses.replace(policy.agent.routing, kind=kind, k=2,
                                                                        degree=2))
    pol = dataclasses.replace(policy, agent=cfg)
    a = new_agent(pol, 6, 3, 4)
    a.add_experts(2)
    obs, fb = drive(np.random.default_rng(5), 3, 3)
    ref_step(a, obs, fb)
    wire = FrameDecoder()
    wire.feed(encode_frame({"agent": store_mod.agent_record(a)}))
    b = store_mod.restore_agent(pol, next(wire.frames())["agent"])
    for _ in range(3):
        assert np.array_equal(ref_step(a, obs, fb)[0], ref_step(b, obs, fb)[0])
    bad = store_mod.agent_record(a)
    if bad["route_neighbors"] is not None:
        bad["route_neighbors"] = bad["route_neighbors"] + 100
        with pytest.raises(StoreError, match="route_neighbors"):
            store_mod.restore_agent(pol, bad)


async def server_closed(client, silence: float):
    """Stay silent for ``silence`` seconds at a time until the server has closed this client's
    connection (a request after a silence fails); robust to a slow machine."""
    while True:
        await trio.sleep(silence)
        try:
            await client.health()
        except ConnectionError:
            return


def test_connection_limit_and_idle_timeout(policy):
    m = make(policy)

    async def test(port, server):
        first = await AsyncClient.connect(f"127.0.0.1:{port}")
        assert (await first.health())["ready"]
        second = await raw(port)
        replies = await read_replies(second)  # refused and closed
        assert [r["error"]["code"] for r in replies] == ["busy"]
        with trio.fail_after(10):  # first stays silent past the idle timeout: the server closes it
            await server_closed(first, 0.4)
        assert m.metrics.to_dict()["counters"]["connections.refused"] == 1
    run_server(m, test, max_connections=1, idle_timeout=0.2)


def test_sparse_sessions_hold_thousands_of_experts_and_grow(policy):
    """With top-k over C candidates (badger serve --candidates C) a session of 2,000 experts steps
    and hot-adds 1,000 more; the messages per step are N x (C + 1), not N^2."""
    import dataclasses

    routing = dataclasses.replace(policy.agent.routing, kind="topk", candidates=8, k=4)
    cfg = dataclasses.replace(policy.agent, routing=routing)
    m = SessionManager(policy, limits=Limits(max_experts=5000), agent_config=cfg)
    info = ok(m, "open", "big", experts=2000, dims=3, seed=1)
    slots = np.zeros(info["slots"], np.float32)
    r = ok(m, "step", "big", slots=slots)
    assert r["messages"]["sent"] == r["rounds"] * 2000 * 9
    assert ok(m, "add_experts", "big", n=1000, init="fresh")["experts"] == 3000
    r = ok(m, "step", "big", slots=slots)
    assert r["experts"] == 3000 and np.isfinite(r["outputs"]).all()


def test_a_restart_with_lower_limits_keeps_every_session(policy, tmp_path):
    """A session the server accepted is never lost by a restart: limits apply to new sessions."""
    m = make(policy, tmp_path)
    ok(m, "open", "a", experts=40, dims=3, seed=0)
    ok(m, "step", "a", slots=np.zeros(6, np.float32))
    m2 = SessionManager(policy, SessionStore(tmp_path), limits=Limits(max_experts=10))
    res = m2.restore_all()
    assert res["restored"] == ["a"] and not res["rejected"]
    assert m2.sessions["a"].agent.n_experts == 40


@pytest.mark.parametrize("corrupt", ["array_for_int", "nested", "negative_rng", "huge_counter"])
def test_malformed_records_are_rejected_not_crashed(policy, tmp_path, corrupt):
    """Checkpoints with a valid checksum but a malformed record go to rejected/ at start; the same
    record sent with open is refused with bad_input (never 'internal')."""
    import json as _json

    m = make(policy, tmp_path)
    ok(m, "open", "a", experts=3, dims=3, seed=0)
    rec = m.record(m.sessions["a"])
    if corrupt == "array_for_int":
        rec["agent"]["t"] = np.zeros(3, np.float32)
    elif corrupt == "nested":  # deeply nested JSON where the generator state belongs
        rec["agent"]["rng"] = "[" * 3000 + "]" * 3000
    elif corrupt == "negative_rng":
        st = _json.loads(rec["agent"]["rng"])
        st["state"]["state"] = -5
        rec["agent"]["rng"] = _json.dumps(st)
    else:
        rec["steps_total"] = 2**64 - 2
    SessionStore(tmp_path).write("a", rec)
    m2 = SessionManager(policy, SessionStore(tmp_path))
    res = m2.restore_all()
    assert res["rejected"] and res["rejected"][0]["session"] == "a" and not res["restored"]
    assert err(m2, "open", "b", snapshot=rec) == "bad_input"


@FUZZ
@given(data=st.data())
def test_any_field_of_an_agent_record_damaged_is_refused_or_restored_whole(policy, data):
    """A session checkpoint whose agent record has one field replaced (any key, by any value: wrong types,
    shapes and dtypes, NaN, out-of-range indices, a resized array) is refused with StoreError, or restored as an
    agent that steps and checkpoints again; nothing else (a crash at restore or at the next step) happens."""
    a = new_agent(policy, 5, 3, 2)
    a.step(np.zeros((1, a.slots), np.float32))
    rec = store_mod.agent_record(a)
    with pytest.raises(StoreError, match="visibility must be a map"):  # an array there raised IndexError
        store_mod.restore_agent(policy, {**rec, "visibility": np.zeros(2, np.float32)})
    for key, big in (("slot_addr", 3e38), ("out_addr", 1e4), ("h", 1.5)):  # a huge address made outputs NaN
        x = rec[key].copy()
        x.reshape(-1)[0] = big
        with pytest.raises(StoreError, match=f"{key} has values beyond"):
            store_mod.restore_agent(policy, {**rec, key: x})
    bad = copy.deepcopy(rec)
    if data.draw(st.booleans(), label="a pair of parts"):  # one name or size of the named input parts
        i, j = data.draw(st.integers(0, len(bad["parts"]) - 1)), data.draw(st.integers(0, 1))
        bad["parts"][i] = list(bad["parts"][i])
        bad["parts"][i][j] = data.draw(damaged_value(bad["parts"][i][j]), label="value")
    else:  # any field, or one entry of the visibility rule
        damage_one_entry(data, bad)
    try:
        b = store_mod.restore_agent(policy, bad)
    except StoreError:
        return
    out, _ = b.step(np.zeros((1, b.slots), np.float32))
    assert np.isfinite(out).all()
    store_mod.restore_agent(policy, store_mod.agent_record(b))


def test_sessions_belong_to_whoever_opened_them(policy, tmp_path):
    """open returns a secret; every request on the session but health must carry it (forbidden
    otherwise, and the session is untouched); the owner survives a restart (its hash is checkpointed)."""
    m = make(policy, tmp_path)
    secret = ok(m, "open", "mine", dims=3, experts=3)["secret"]
    before = state_of(m, "mine")

    def stranger(kind, **body):
        r = m.handle({"id": 1, "kind": kind, "session": "mine", "token": None, "body": body})
        return r["error"]["code"] if not r["ok"] else "ok"

    for kind, body in [("step", {"slots": [0.0] * 6}), ("snapshot", {}), ("reset", {}), ("close", {}),
                       ("add_experts", {"n": 1}), ("remove_experts", {"indices": [0]}), ("stats", {}),
                       ("open", {"resume": True})]:
        assert stranger(kind, **body) == "forbidden", kind
        assert stranger(kind, **body, secret="not-" + secret) == "forbidden", kind
    assert state_of(m, "mine") == before
    assert stranger("health") == "ok"
    assert ok(m, "step", "mine", slots=[0.0] * 6, secret=secret)["t"] == 1
    m2 = make(policy, tmp_path)  # a restart keeps the owner
    r = m2.handle({"id": 1, "kind": "stats", "session": "mine", "token": None, "body": {}})
    assert r["error"]["code"] == "forbidden"
    assert ok(m2, "stats", "mine", secret=secret)["t"] == 1


def test_every_session_the_server_accepts_survives_a_snapshot_and_a_restart(policy, tmp_path):
    """What open and step accept, the store restores: a seed up to 2^63 - 1 (restore asked < 2^62), a bandit
    step with a large feedback value (its pointer is the arm's address times 1 - 2 x the feedback, which the
    store refused as an address beyond +-1000), the counters of a snapshot opened near the bounds."""
    m = make(policy, tmp_path / "one")
    ok(m, "open", "bigseed", experts=3, dims=2, seed=(1 << 63) - 1)
    info = ok(m, "open", "bandit", experts=4, dims=3, task="bandit")
    assert info["pointer"] == "arm"
    ok(m, "step", "bandit", slots=np.full(info["slots"], 1000.0, np.float32), arm=0)
    for name in ("bigseed", "bandit"):
        ok(m, "open", name + "-twin", snapshot=ok(m, "snapshot", name)["record"])
    rec = ok(m, "snapshot", "bigseed")["record"]
    rec["agent"]["t"] = rec["episode"] = rec["steps_total"] = 1 << 62
    assert err(m, "open", "near", snapshot=rec) == "bad_input"  # beyond a snapshot's bound (2^62 steps of headroom)
    rec["agent"]["t"] = rec["episode"] = rec["steps_total"] = (1 << 62) - 1  # accepted, then stepped past it
    ok(m, "open", "near", snapshot=rec)
    ok(m, "step", "near", observation=[0, 0], feedback=[0, 0])
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    m2 = make(policy, tmp_path / "two")
    assert sorted(m2.sessions) == sorted(m.sessions) and not list(m2.store.rejected_dir.glob("*"))
    assert ok(m2, "stats", "near")["t"] == 1 << 62


def test_a_snapshot_with_extreme_heads_is_refused(policy):
    m = make(policy)
    ok(m, "open", "a", experts=3, dims=2)
    rec = ok(m, "snapshot", "a")["record"]
    rec["agent"]["heads"] = np.full_like(rec["agent"]["heads"], 1e30)
    assert err(m, "open", "b", snapshot=rec) == "bad_input"  # it opened, and the next step's outputs were NaN


def test_a_step_that_makes_the_agent_non_finite_is_refused_and_changes_nothing(policy, monkeypatch):
    m = make(policy)
    ok(m, "open", "a", experts=3, dims=2)
    ok(m, "step", "a", observation=[0.5, -0.5], feedback=[1, 1])
    before = state_of(m, "a")
    a = m.sessions["a"].agent
    real = a.step

    def poisoned(*args, **kw):  # as extreme inputs or state would
        out, info = real(*args, **kw)
        a.state.h[...] = np.nan
        return out, info

    monkeypatch.setattr(a, "step", poisoned)
    r = call(m, "step", "a", observation=[0.5, -0.5], feedback=[1, 1])
    assert r["error"]["code"] == "bad_input" and "NaN or inf" in r["error"]["message"]
    monkeypatch.undo()
    assert state_of(m, "a") == before and np.isfinite(ok(m, "step", "a", observation=[0, 0], feedback=[0, 0])
                                                     ["outputs"]).all()


@pytest.mark.parametrize("damage, says", [
    (lambda r: r.update(task="chess"), "registered task"),  # opened, then could never reset
    (lambda r: r["agent"].update(parts=[["observation", 2], ["observation", 2]]), "distinct"),
    (lambda r: r["agent"].update(parts=[["slots", 2], ["feedback", 2]]), "distinct and not"),
])
def test_a_snapshot_a_session_could_not_use_is_refused(policy, damage, says):
    m = make(policy)
    ok(m, "open", "a", experts=3, dims=2)
    rec = ok(m, "snapshot", "a")["record"]
    damage(rec)
    r = call(m, "open", "b", snapshot=rec)
    assert r["error"]["code"] == "bad_input" and says in r["error"]["message"], r


def test_a_nil_field_is_named_as_such(policy):
    m = make(policy)
    ok(m, "open", "a", experts=3, dims=2)
    r = call(m, "reset", "a", seed=None, dims=None)  # optional fields: nil is their default
    assert r["ok"]
    r = call(m, "open", "b", dims=None)
    assert r["error"]["code"] == "bad_request" and "got nil" in r["error"]["message"], r


def test_a_checkpoint_of_a_task_the_server_does_not_know_is_kept_in_place(policy, tmp_path):
    """A plugin task's session, restored by a server started without the plugin (BADGER_TASKS unset), went to
    rejected/ and was lost to the next start that had it."""
    m = make(policy, tmp_path)
    ok(m, "open", "p", experts=3, dims=2)
    rec = store_mod.decode(m.store.path("p").read_bytes())
    rec["task"] = "plugin_task"
    m.store.write("p", rec)
    m2 = make(policy, tmp_path)
    assert "p" not in m2.sessions and m2.kept == {"p": "task 'plugin_task': name its module in BADGER_TASKS"}
    assert m2.store.path("p").exists() and not list(m2.store.rejected_dir.glob("*"))


def test_the_client_secrets_file_keeps_every_concurrent_secret(tmp_path):
    """Two scripts opening sessions at once read, changed and wrote the file over each other: a secret was lost
    and the later commands on that session were refused."""
    import threading

    from badger_runtime.serve.client_secrets import SecretsFile

    f = SecretsFile(tmp_path / "s" / "secrets.json")

    def put(i):
        for j in range(25):
            SecretsFile(f.path).put("h:1", f"s{i}-{j}", f"x{i}{j}")

    threads = [threading.Thread(target=put, args=(i,)) for i in range(4)]
    [t.start() for t in threads], [t.join() for t in threads]
    assert all(f.get("h:1", f"s{i}-{j}") == f"x{i}{j}" for i in range(4) for j in range(25))
    assert f.path.stat().st_mode & 0o777 == 0o600

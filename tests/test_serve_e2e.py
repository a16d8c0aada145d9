"""The real server process: episodes over TCP, experts added mid-episode, kill -9, restart,
continue; SIGTERM drains and checkpoints; clients that vanish leave it healthy."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from badger_runtime.policy_card import load_policy
from badger_runtime.serve import store
from badger_runtime.serve.client import Client, ConnectionLost, ServerError
from badger_runtime.serve.protocol import encode_frame
from badger_runtime.serve.sessions import new_agent

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


class ServerProcess:
    started: list["ServerProcess"] = []

    def __init__(self, policy, state_dir, log_path, *extra):
        self.log_path = log_path
        self.log = open(log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BADGER_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "badger_runtime.cli", "serve", "--policy", str(policy), "--listen",
             "127.0.0.1:0", "--state-dir", str(state_dir), *extra],
            stdout=subprocess.PIPE, stderr=self.log, env=env)
        ServerProcess.started.append(self)
        line = self.proc.stdout.readline()  # the ready line (blocks until listening, or EOF if it died)
        if not line:
            self.proc.wait(10)
            raise AssertionError(f"server died: {log_path.read_text()[-2000:]}")
        self.ready = json.loads(line)
        assert self.ready["event"] == "ready"
        self.address = self.ready["listen"]

    def client(self, **kw) -> Client:
        return Client(self.address, timeout=10, **kw)

    def stop(self, sig) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(15)
        self.log.close()
        return rc


@pytest.fixture(autouse=True)
def _no_stray_servers():
    """A failing test must not leave its server running."""
    ServerProcess.started = []
    yield
    for srv in ServerProcess.started:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(10)


@pytest.fixture(scope="module")
def policy(tiny_policy):
    return load_policy(tiny_policy)


TARGETS = {"a": np.array([0.3, -0.5, 0.8], np.float32), "b": np.array([-0.2, 0.6], np.float32)}


class Driver:
    """The environment of the guessing game on one session, with a reference engine.Agent
    stepped identically: the server's outputs must equal the reference's, bit for bit."""

    def __init__(self, policy, name, experts, dims, seed):
        self.name, self.ref = name, new_agent(policy, experts, dims, seed)
        self.prev = np.zeros(dims, np.float32)
        self.target = TARGETS[name]

    def inputs(self):
        return self.prev, (self.prev - self.target).astype(np.float32)  # per-dim feedback

    def ref_step(self):
        obs, fb = self.inputs()
        out, info = self.ref.step(self.ref.observation({'observation': obs[None], 'feedback': fb[None]}))
        self.prev = out[0].astype(np.float32)
        return self.prev

    def step(self, c: Client):
        obs, fb = self.inputs()
        r = c.step(self.name, obs, fb, t=self.ref.t)
        expect = self.ref_step()
        assert np.array_equal(r["outputs"], expect), (self.name, self.ref.t, self.ref.n_experts, r["outputs"], expect)
        assert r["t"] == self.ref.t and r["messages"]["sent"] == r["rounds"] * self.ref.n_experts ** 2
        return r


def test_kill9_restart_continue_and_sigterm(policy, tiny_policy, tmp_path):
    state = tmp_path / "state"
    srv = ServerProcess(tiny_policy, state, tmp_path / "server1.log")
    a, b = Driver(policy, "a", 4, 3, 1), Driver(policy, "b", 3, 2, 2)
    with srv.client() as c:
        assert c.health()["ready"]
        for d in (a, b):
            info = c.open(dims=d.ref.dims, experts=d.ref.n_experts, seed=d.ref.seed, session=d.name)
            assert info["t"] == 0
        secrets = dict(c.secrets)  # the client's proof of ownership, kept across the restarts
        for t in range(6):
            a.step(c)
            b.step(c)
            if t == 2:  # grow while serving, mid-episode
                assert c.add_experts("a", 3)["experts"] == 7
                a.ref.add_experts(3)
            if t == 4:
                c.add_experts("b", 2, init="fresh")
                b.ref.add_experts(2, init="fresh")
                c.remove_experts("a", [0])
                a.ref.remove_experts([0])
        # bad input on b leaves a and b as they were
        with pytest.raises(ServerError, match="bad_input"):
            c.step("b", [np.nan, 0], [0, 0])
        b.step(c)
        # a step is in flight when the server is killed
        obs, fb = a.inputs()
        c.sock.sendall(encode_frame({"id": 999, "kind": "step", "session": "a", "body": {
            "observation": obs, "feedback": fb, "t": a.ref.t}}))
        time.sleep(0.3)
        srv.proc.kill()
        srv.proc.wait(10)
    srv.log.close()

    # restart on the same state dir: both sessions come back
    srv = ServerProcess(tiny_policy, state, tmp_path / "server2.log", "--checkpoint-every", "0")
    assert sorted(srv.ready["restored"]) == ["a", "b"] and srv.ready["rejected"] == []
    with srv.client() as c:
        with pytest.raises(ServerError, match="forbidden"):  # a session belongs to whoever opened it
            c.open(session="a", resume=True)
        info = c.open(session="a", resume=True, secret=secrets["a"])  # where is my session?
        c.secrets.update(secrets)
        assert info["resumed"] and info["experts"] == a.ref.n_experts
        # at most the step in flight is lost; the client is told which step the session is at
        assert info["t"] in (a.ref.t, a.ref.t + 1)
        if info["t"] == a.ref.t + 1:  # it was applied and checkpointed: its output is kept
            assert np.array_equal(info["last_outputs"], a.ref_step())
        with pytest.raises(ServerError, match="wrong_step"):  # a blind retry is not applied twice
            c.step("a", *a.inputs(), t=a.ref.t - 1)
        assert c.stats("b")["t"] == b.ref.t
        for t in range(4):
            a.step(c)
            b.step(c)
            if t == 1:  # grow after the restart too
                c.add_experts("a", 2)
                a.ref.add_experts(2)
        # clients that connect and vanish (some mid-frame) leave it healthy
        accepted = c.stats()["counters"]["connections.accepted"]
        for i in range(20):
            s = socket.create_connection(("127.0.0.1", int(srv.address.rsplit(":", 1)[1])))
            if i % 2:
                s.sendall(encode_frame({"id": 1, "kind": "stats", "session": "b", "body": {}})[:9])
            s.close()
        deadline = time.time() + 5
        while time.time() < deadline:
            stats = c.stats()
            if stats["counters"]["connections.accepted"] == accepted + 20 and stats["connections"] == 1:
                break
            time.sleep(0.05)
        assert stats["connections"] == 1 and c.health()["status"] == "ok"
        assert stats["counters"]["restore.sessions"] == 2

    # SIGTERM: drain, checkpoint (this server only writes steps at shutdown), exit 0
    assert srv.stop(signal.SIGTERM) == 0
    events = [json.loads(line)["event"] for line in (tmp_path / "server2.log").read_text().splitlines()]
    assert events[-3:] == ["signal", "draining", "stopped"]
    for d in (a, b):
        rec = store.decode((state / "sessions" / f"{d.name}.ckpt").read_bytes())
        assert rec["agent"]["t"] == d.ref.t and np.array_equal(rec["last_outputs"], d.prev)

    # and once more: the sessions continue from what SIGTERM wrote
    srv = ServerProcess(tiny_policy, state, tmp_path / "server3.log")
    with srv.client() as c:
        c.secrets.update(secrets)
        a.step(c)
        b.step(c)
        c.close_session("b")
        with pytest.raises(ServerError, match="no_session"):
            c.stats("b")
    assert srv.stop(signal.SIGINT) == 0
    assert not (state / "sessions" / "b.ckpt").exists() and (state / "sessions" / "a.ckpt").exists()


def test_token_over_the_real_process(tiny_policy, tmp_path):
    env_token = "tok-" + os.urandom(4).hex()
    srv = ServerProcess(tiny_policy, tmp_path / "s", tmp_path / "server.log", "--token", env_token)
    with srv.client() as c:
        assert c.health()["ready"]
        with pytest.raises(ServerError, match="unauthorized"):
            c.open(dims=2)
    with srv.client(token=env_token) as c:
        assert c.open(dims=2)["t"] == 0
    with pytest.raises((ConnectionLost, ServerError)):
        with srv.client(token="nope") as c:
            c.stats()
            c.stats()
    assert srv.stop(signal.SIGTERM) == 0
    assert '"auth_refused"' in (tmp_path / "server.log").read_text()


def test_client_commands(tiny_policy, tmp_path, capsys, monkeypatch):
    from badger_runtime.cli import main

    for k in [k for k in os.environ if k.startswith("BADGER_")]:
        monkeypatch.delenv(k)
    srv = ServerProcess(tiny_policy, tmp_path / "s", tmp_path / "server.log")
    monkeypatch.setenv("BADGER_CONNECT", srv.address)
    monkeypatch.setenv("BADGER_SECRETS_FILE", str(tmp_path / "state" / "secrets.json"))  # not the user's own

    def client(*argv, rc=None):
        with pytest.raises(SystemExit) if rc else contextlib.nullcontext():
            main(["client", *argv])
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert client("health")["ready"]
    opened = client("open", "--dims", "2", "--experts", "3", "--session", "c1")
    assert opened["t"] == 0
    monkeypatch.setenv("BADGER_SESSION_SECRET", opened["secret"])  # what a script does with it
    assert client("--secret", "wrong", "stats", "c1", rc=1)["error"]["code"] == "forbidden"
    r = client("step", "c1", "--observation", "0,0", "--feedback", "0.5,-0.5", "--expect-t", "0")
    assert r["t"] == 1 and len(r["outputs"]) == 2
    assert client("step", "c1", "--slots", "0,0,0.5,nan", rc=1)["error"]["code"] == "bad_input"
    assert client("step", "c1", "--slots", "0,0,1,1", "--expect-t", "0", rc=1)["error"]["code"] == "wrong_step"
    assert client("add", "c1", "--n", "2", "--init", "fresh")["experts"] == 5
    assert client("remove", "c1", "--indices", "0,4")["experts"] == 3
    assert client("reset", "c1", "--seed", "3")["episode"] == 1
    assert client("snapshot", "c1", "--out", str(tmp_path / "c1.ckpt"))["bytes"] > 0
    assert (tmp_path / "c1.ckpt").stat().st_mode & 0o777 == 0o600  # a session's state: private
    c2 = client("open", "--session", "c2", "--from-snapshot", str(tmp_path / "c1.ckpt"))
    assert c2["experts"] == 3 and c2["secret"] != opened["secret"]  # a new session, a new owner
    monkeypatch.setenv("BADGER_SESSION_SECRET", c2["secret"])
    assert client("stats", "c2")["episode"] == 1
    assert client("stats")["sessions"] == 2
    assert client("close", "c2")["closed"]
    # the walkthrough as the tutorial writes it: no secret passed by hand (the client kept it at open)
    monkeypatch.delenv("BADGER_SESSION_SECRET")
    assert client("open", "--session", "demo", "--dims", "2", "--experts", "3")["t"] == 0
    assert (tmp_path / "state" / "secrets.json").stat().st_mode & 0o777 == 0o600
    assert client("step", "demo", "--slots", "0,0,0,0")["t"] == 1
    assert client("add", "demo", "--n", "1")["experts"] == 4
    assert client("step", "demo", "--part", "observation=0,0", "--part", "feedback=0.5,-0.5")["t"] == 2  # by name
    assert client("open", "--session", "demo", "--resume")["resumed"]
    assert client("close", "demo")["closed"]
    assert "demo" not in (tmp_path / "state" / "secrets.json").read_text()  # forgotten at close
    assert client("open", "--session", "d2", "--dims", "2", "--no-keep-secret")["t"] == 0
    err = client("stats", "d2", rc=1)["error"]
    assert err["code"] == "forbidden" and "--secret" in err["message"]
    assert srv.stop(signal.SIGTERM) == 0

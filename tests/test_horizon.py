"""Episodic policies have a horizon, and every runtime refuses to step past it unless asked."""

from __future__ import annotations

import numpy as np
import pytest

from badger_runtime.engine import Agent, HorizonError, numpy_ops
from badger_runtime.evaluation import run_episodes
from badger_runtime.policy_card import every_policy, load_policy

from .conftest import card_of, copy_policy


@pytest.fixture(scope="module")
def episodic(tiny_policy, tmp_path_factory):
    """The tiny policy with a card that says: episodic, horizon 3."""
    life = {"kind": "episodic", "horizon": 3, "why": "a test"}
    return load_policy(copy_policy(tiny_policy, tmp_path_factory.mktemp("episodic"), "ep",
                                   lambda card: card.update(lifetime=life)))


def test_the_batched_engine_refuses_past_the_horizon(episodic):
    a = Agent(episodic).reset(1, 3, 2, seed=0)
    obs = np.zeros((1, a.slots), np.float32)
    for _ in range(3):
        a.step(obs)
    state = a.state.h.copy()
    with pytest.raises(HorizonError, match="horizon of 3"):
        a.step(obs)
    assert np.array_equal(a.state.h, state) and a.t == 3  # refused: nothing changed
    a.reset(1, 3, 2, seed=1)
    a.step(obs)  # a reset starts a new episode
    b = Agent(episodic, past_horizon=True).reset(1, 3, 2, seed=0)
    for _ in range(5):
        b.step(obs)  # asked for explicitly


@pytest.mark.parametrize("runtime", ["sharded", "actors"])
def test_the_actor_runtimes_refuse_past_the_horizon(episodic, runtime):
    with pytest.raises(Exception) as e:
        run_episodes(numpy_ops(), episodic, episodic.agent, episodic.task, dims=2, experts=3, episodes=1, seed=0,
                     steps=5, runtime=runtime)
    err = e.value
    while isinstance(err, BaseExceptionGroup):
        err = err.exceptions[0]
    assert isinstance(err, HorizonError)
    res = run_episodes(numpy_ops(), episodic, episodic.agent, episodic.task, dims=2, experts=3, episodes=1, seed=0,
                       steps=5, runtime=runtime, past_horizon=True)
    assert res.outputs.shape[0] == 5


def test_a_served_session_answers_horizon_until_reset(episodic):
    from badger_runtime.serve.protocol import validate_request
    from badger_runtime.serve.sessions import SessionManager

    m = SessionManager(episodic)

    secrets = {}

    def call(kind, session="s", **body):
        if session in secrets:
            body["secret"] = secrets[session]
        r = m.handle(validate_request({"id": 1, "kind": kind, "session": session, "body": body}))
        if kind == "open" and r["ok"]:
            secrets[session] = r["body"]["secret"]
        return r

    info = call("open", dims=2, experts=3)["body"]
    assert info["horizon"] == 3
    slots = [0.0] * info["slots"]
    for t in range(3):
        assert call("step", slots=slots, t=t)["ok"]
    r = call("step", slots=slots, t=3)
    assert not r["ok"] and r["error"]["code"] == "horizon" and "horizon of 3" in r["error"]["message"]
    assert call("reset")["ok"] and call("step", slots=slots, t=0)["ok"]
    assert call("open", "p", dims=2, experts=3, past_horizon=True)["body"]["horizon"] is None
    for t in range(5):
        assert call("step", "p", slots=slots, t=t)["ok"]
    assert m.record(m.sessions["p"])["past_horizon"] is True


def test_eval_cli_refuses_past_the_horizon_unless_asked(episodic, capsys):
    from badger_runtime.cli import main

    p = str(episodic.path)
    assert main(["eval", "--policy", p, "--dims", "2", "--steps", "5", "--episodes", "2"]) == 2
    assert "horizon of 3" in capsys.readouterr().err
    assert main(["eval", "--policy", p, "--dims", "2", "--steps", "5", "--episodes", "2", "--past-horizon",
                 "--json"]) == 0


def test_export_records_an_episodic_lifetime_by_default(tiny_run, tmp_path):
    from badger_runtime.training.export import export

    card = export(tiny_run[0] / "checkpoint.pt", tmp_path / "p.onnx")
    assert card["lifetime"]["kind"] == "episodic" and card["lifetime"]["horizon"] == 6
    assert load_policy(tmp_path / "p.onnx").horizon == 6


def test_export_cli_records_a_horizon_given(tiny_run, tmp_path, capsys):
    from badger_runtime.cli import main

    out = tmp_path / "h.onnx"
    assert main(["export", "--checkpoint", str(tiny_run[0] / "checkpoint.pt"), "--out", str(out), "--eval-episodes", "0",
                 "--horizon", "40", "--why", "tuned for 40 steps"]) == 0
    life = load_policy(out).card["lifetime"]
    assert life == {"kind": "episodic", "horizon": 40, "why": "tuned for 40 steps"} and load_policy(out).horizon == 40
    assert main(["export", "--checkpoint", str(tiny_run[0] / "checkpoint.pt"), "--out", str(out), "--eval-episodes", "0",
                 "--horizon", "40", "--continual", "a check"]) != 0
    assert "exclude each other" in capsys.readouterr().err


def test_shipped_cards_say_continual_or_episodic():
    for name in every_policy():
        life = card_of(name)["lifetime"]
        assert life["kind"] in ("continual", "episodic") and life["why"]
        assert (life["horizon"] is None) == (life["kind"] == "continual")


@pytest.mark.parametrize("name", ["guessing-converge-v2", "guessing-one-expert-v2", "guessing-nonstationary-v2"])
def test_fresh_experts_hot_added_do_not_hurt_the_v2_policies(name):
    """The product rule for the policy trained with experts added mid-episode: as many fresh experts
    again at mid-episode end no worse than the unchanged agent (by more than its noise), on the
    same seeded episodes."""
    from badger_runtime.episodes import schedule
    from badger_runtime.tasks import task_class

    pol = load_policy(name)
    task = task_class(pol.task.name).evaluation_config(pol.task)
    steps = min(pol.task.steps, 40)
    kw = dict(dims=3, experts=3, episodes=256, seed=0, steps=steps)
    base = run_episodes(numpy_ops(), pol, pol.agent, task, **kw).errors[-1]
    grown = run_episodes(numpy_ops(), pol, pol.agent, task, changes=schedule(steps // 2, 3, "fresh"), **kw).errors[-1]
    noise = 3 * base.std() / np.sqrt(base.size)
    assert grown.mean() <= base.mean() + noise, (grown.mean(), base.mean(), noise)

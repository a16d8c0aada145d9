"""A policy whose card says fresh experts make it worse (``growth``) is held to it: every runtime
refuses to add fresh experts to it unless asked, and leaves the agent unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from badger_runtime.engine import Agent, GrowthError, default_init, numpy_ops
from badger_runtime.episodes import schedule
from badger_runtime.evaluation import run_episodes
from badger_runtime.policy_card import PolicyError, every_policy, load_policy

from .conftest import card_of, copy_policy

HURTS = {"fresh": "hurts", "why": "a test: 0.1 -> 0.2", "instead": "add clones"}


def _with_growth(tiny_policy, d, growth):
    return copy_policy(tiny_policy, d, "g", lambda card: card.update(growth=growth))


@pytest.fixture(scope="module")
def harmed(tiny_policy, tmp_path_factory):
    """The tiny policy with a card that says: fresh experts hurt it."""
    return load_policy(_with_growth(tiny_policy, tmp_path_factory.mktemp("harmed"), HURTS))


def test_the_batched_engine_refuses_fresh_experts_and_changes_nothing(harmed):
    a = Agent(harmed).reset(1, 3, 2, seed=0)
    obs = np.zeros((1, a.slots), np.float32)
    a.step(obs)
    h, rng = a.state.h.copy(), a._rng.bit_generator.state
    with pytest.raises(GrowthError, match="a test: 0.1 -> 0.2.*Instead: add clones"):
        a.add_experts(2, init="fresh")
    assert a.n_experts == 3 and np.array_equal(a.state.h, h)
    assert a._rng.bit_generator.state == rng  # refused before any draw: the same agent goes on the same way
    assert a.add_experts(1, init="clone") == [3]  # clones are not refused
    assert a.add_experts(2, init="fresh", allow_harmful=True) == [4, 5]  # asked for explicitly
    a.step(obs)


def test_a_card_that_says_ok_or_nothing_refuses_nothing(tiny_policy, tmp_path):
    ok = load_policy(_with_growth(tiny_policy, tmp_path, {"fresh": "ok", "why": "a test"}))
    for pol in (ok, load_policy(tiny_policy)):
        assert Agent(pol).reset(1, 3, 2, seed=0).add_experts(2, init="fresh") == [3, 4]


@pytest.mark.parametrize("growth", [{"fresh": "maybe"}, {"fresh": "hurts", "why": 3}, "hurts",
                                    {"fresh": "hurts", "instead": ["clones"]}, {"fresh": "ok", "clone": "bad"},
                                    {"fresh": "ok", "clone": "hurts", "clone_why": 1}])
def test_a_card_with_a_bad_growth_is_refused(tiny_policy, tmp_path, growth):
    with pytest.raises(PolicyError, match="growth must be"):
        load_policy(_with_growth(tiny_policy, tmp_path, growth))


CLONES_HURT = {"fresh": "ok", "why": "a test", "clone": "hurts", "clone_why": "a test: 0.1 -> 0.4"}


def _actor_runtime_guards(pol, runtime, refused: str, taken: str, message: str):
    """An actor runtime of ``pol`` refuses 2 experts added as ``refused`` (``message``) and goes on;
    it takes one added as ``taken`` and one ``refused`` asked for explicitly."""
    import trio

    from badger_runtime.actors.runtime import ActorAgent
    from badger_runtime.actors.sharded import ShardedAgent

    eng = Agent(pol).reset(1, 3, 2, seed=0)
    obs = np.zeros((1, eng.slots), np.float32)
    a = (ShardedAgent if runtime == "sharded" else ActorAgent)(pol, pol.agent, eng.interface, eng.wiring)

    async def main():
        async with a.running():
            await a.step(obs)
            with pytest.raises(GrowthError, match=message):
                a.add_experts(2, init=refused)
            assert a.n_experts == 3
            a.add_experts(1, init=taken)
            a.add_experts(1, init=refused, allow_harmful=True)
            await a.step(obs)
            assert a.n_experts == 5

    trio.run(main)


@pytest.mark.parametrize("runtime", ["engine", "sharded", "actors"])
def test_a_card_that_says_clones_hurt_refuses_clones_and_takes_fresh_experts(tiny_policy, tmp_path, runtime):
    """The same guard for clones (``"clone": "hurts"``): refused before anything changes, with the card's
    evidence; fresh experts (which this card says are fine) join, and clones asked for explicitly."""
    pol = load_policy(_with_growth(tiny_policy, tmp_path, CLONES_HURT))
    if runtime != "engine":
        return _actor_runtime_guards(pol, runtime, "clone", "fresh", "clones make it worse")
    eng = Agent(pol).reset(1, 3, 2, seed=0)
    eng.step(np.zeros((1, eng.slots), np.float32))
    h = eng.state.h.copy()
    with pytest.raises(GrowthError, match="clones make it worse.*0.1 -> 0.4"):
        eng.add_experts(2, init="clone")
    assert eng.n_experts == 3 and np.array_equal(eng.state.h, h)
    assert eng.add_experts(1, init="fresh") == [3]
    assert eng.add_experts(1, init="clone", allow_harmful=True) == [4]


@pytest.mark.parametrize("runtime", ["sharded", "actors"])
def test_the_actor_runtimes_refuse_fresh_experts_and_go_on(harmed, runtime):
    _actor_runtime_guards(harmed, runtime, "fresh", "clone", "Instead: add clones")


@pytest.mark.parametrize("runtime", ["engine", "sharded", "actors"])
def test_an_evaluation_refuses_a_harmful_hot_add_before_it_runs(harmed, runtime):
    kw = dict(dims=2, experts=3, episodes=1, seed=0, steps=4, runtime=runtime)
    with pytest.raises(GrowthError):
        run_episodes(numpy_ops(), harmed, harmed.agent, harmed.task, changes=schedule(2, 2, "fresh"), **kw)
    allowed = run_episodes(numpy_ops(), harmed, harmed.agent, harmed.task,
                           changes=schedule(2, 2, "fresh", allow_harmful=True), **kw)
    cloned = run_episodes(numpy_ops(), harmed, harmed.agent, harmed.task, changes=schedule(2, 2, "clone"), **kw)
    assert allowed.outputs.shape[0] == cloned.outputs.shape[0] == 4


def test_a_served_session_answers_growth_and_is_unchanged(harmed):
    from badger_runtime.serve.protocol import validate_request
    from badger_runtime.serve.sessions import SessionManager

    m = SessionManager(harmed)
    secret = {}

    def call(kind, **body):
        body |= secret
        r = m.handle(validate_request({"id": 1, "kind": kind, "session": "s", "body": body}))
        if kind == "open":
            secret["secret"] = r["body"]["secret"]
        return r

    info = call("open", dims=2, experts=3)["body"]
    slots = [0.0] * info["slots"]
    assert call("step", slots=slots, t=0)["ok"]
    before = m.record(m.sessions["s"])
    r = call("add_experts", n=2, init="fresh")
    assert not r["ok"] and r["error"]["code"] == "growth" and "Instead: add clones" in r["error"]["message"]
    assert m.record(m.sessions["s"]) == before  # nothing changed
    r = call("add_experts", n=2, init="fresh", allow_harmful="yes")
    assert not r["ok"] and r["error"]["code"] == "bad_request"
    assert call("add_experts", n=2, init="fresh", allow_harmful=True)["body"]["experts"] == 5
    assert call("add_experts", n=1)["body"]["experts"] == 6  # a bare add: clones, which this card takes
    assert call("step", slots=slots, t=1)["ok"]


def test_a_served_session_refuses_clones_where_the_card_says_they_hurt(tiny_policy, tmp_path):
    from badger_runtime.serve.protocol import validate_request
    from badger_runtime.serve.sessions import SessionManager

    m = SessionManager(load_policy(_with_growth(tiny_policy, tmp_path, CLONES_HURT)))
    secret = {}

    def call(kind, **body):
        r = m.handle(validate_request({"id": 1, "kind": kind, "session": "s", "body": body | secret}))
        if kind == "open":
            secret["secret"] = r["body"]["secret"]
        return r

    call("open", dims=2, experts=3)
    before = m.record(m.sessions["s"])
    for body in ({"init": "clone"}, {"source": 0}):  # clones asked for, or a clone of a named expert
        r = call("add_experts", n=2, **body)
        assert not r["ok"] and r["error"]["code"] == "growth" and "clones make it worse" in r["error"]["message"]
        assert m.record(m.sessions["s"]) == before
    assert call("add_experts", n=2, init="fresh")["body"]["experts"] == 5
    assert call("add_experts", n=1)["body"]["experts"] == 6  # a bare add: fresh experts, which this card takes
    assert call("add_experts", n=1, init=None)["body"]["experts"] == 7


BOTH_HURT = CLONES_HURT | {"fresh": "hurts", "instead": "the successor"}


@pytest.mark.parametrize("runtime", ["engine", "sharded", "actors"])
def test_a_bare_add_takes_the_kind_the_card_does_not_refuse(tiny_policy, tmp_path, runtime):
    """``add_experts(n)`` without ``init`` adds clones (the paper's growing) unless the card says clones hurt
    and fresh experts do not; then fresh experts. Where both hurt, the clones are refused as asked for."""
    import trio

    from badger_runtime.actors.runtime import ActorAgent
    from badger_runtime.actors.sharded import ShardedAgent

    cards = {"clones": HURTS, "fresh": CLONES_HURT, "refused": BOTH_HURT, "nothing": None}
    for want, growth in cards.items():
        (tmp_path / want).mkdir(exist_ok=True)
        pol = load_policy(tiny_policy if growth is None else _with_growth(tiny_policy, tmp_path / want, growth))
        assert default_init(pol) == {"clones": "clone", "fresh": "fresh", "nothing": "clone"}.get(want, "clone")
        assert default_init(pol, source=1) == "clone" and default_init(pol, "fresh") == "fresh"
        eng = Agent(pol).reset(1, 3, 2, seed=0)
        obs = np.zeros((1, eng.slots), np.float32)
        eng.step(obs)
        if runtime == "engine":
            if want == "refused":
                with pytest.raises(GrowthError, match="clones make it worse"):
                    eng.add_experts(2)
                continue
            h = eng.state.h[0].copy()
            eng.add_experts(2)
            copies = [any(np.array_equal(eng.state.h[0, i], h[j]) for j in range(3)) for i in (3, 4)]
            assert copies == [want != "fresh"] * 2  # clones copy a living expert's state, fresh experts do not
            continue
        a = (ShardedAgent if runtime == "sharded" else ActorAgent)(pol, pol.agent, eng.interface, eng.wiring)

        async def main():
            async with a.running():
                await a.step(obs)
                if want == "refused":
                    with pytest.raises(GrowthError, match="clones make it worse"):
                        a.add_experts(2)
                    assert a.n_experts == 3
                else:
                    a.add_experts(2)
                    await a.step(obs)
                    assert a.n_experts == 5

        trio.run(main)


def test_eval_cli_refuses_fresh_experts_unless_asked(harmed, capsys):
    from badger_runtime.cli import main

    args = ["eval", "--policy", str(harmed.path), "--dims", "2", "--steps", "4", "--episodes", "2",
            "--add-at", "2", "--add", "2", "--init", "fresh"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "fresh experts make it worse" in err
    assert main([*args, "--allow-harmful-growth", "--json"]) == 0
    assert main([*args[:-1], "clone", "--json"]) == 0


def test_shipped_cards_say_what_fresh_experts_do():
    """Every shipped policy's card says it, with a command; where they hurt, what to do instead."""
    for name in every_policy():
        g = card_of(name)["growth"]
        assert g["fresh"] in ("ok", "hurts") and "--policy " in g["why"] and name in g["why"], name
        if g["fresh"] == "hurts":
            assert g["instead"] and "--allow-harmful-growth" in g["why"], name
        pol = load_policy(name)  # and the loader takes it
        # a bare add_experts is refused only where the card refuses both kinds (guessing-converge-v2: fresh)
        assert (g.get(default_init(pol)) == "hurts") == (g["fresh"] == g.get("clone") == "hurts"), name


def _shipped(error_measured: bool = True):
    """The shipped policies whose task is measured by an error (``growth.growth_metric``), or the others."""
    from badger_runtime.growth import growth_metric

    return [n for n in every_policy() if error_measured == (growth_metric(card_of(n)["config"]["task"]["name"])
                                                             is not None)]


@pytest.mark.parametrize("name", _shipped())
def test_every_cards_growth_verdict_is_what_its_measurement_gives(name):
    """The verdicts a shipped card states for fresh experts and for clones ("ok" / "hurts") are the ones the
    cards' rule gives today in the card's own setting (the episodes and seed of its command), and where the card quotes
    measure_growth's numbers they are today's to the digit: a change to the engine, the task or the rule
    that moved a verdict or a card's number would show."""
    from badger_runtime.growth import card_setting, measure_growth, requote
    card = card_of(name)["growth"]
    episodes, seed = card_setting(card)
    g = measure_growth(load_policy(name), episodes=episodes, seed=seed)
    for init, key in (("fresh", ""), ("clone", "clone_")):  # every error-measured card states both verdicts
        assert g[init] == card[init], (name, g[key + "why"], card[key + "why"])
    # every number it quotes in measure_growth's wording, as written (demos/refresh_growth.py rewrites them)
    requoted, changes = requote(card, g)
    assert requoted == card and not changes, changes


#: what a hand-written growth entry quotes ("<metric> X unchanged -> Y"), read off ``badger eval``'s report
OWN_METRICS = {"regret at T = 1,000": lambda r: r["regret_at"]["1000"],
               "accuracy over steps 31-40": lambda r: float(np.mean(r["accuracy_by_step"][30:40]))}


@pytest.mark.parametrize("name", _shipped(error_measured=False))
def test_a_hand_written_growth_entry_quotes_what_its_command_gives(name, capsys):
    """The bandit and few-shot cards' growth entries are written by hand (their own metric, their own setting), each
    beginning with the ``badger eval`` command of the grown agent and quoting "<metric> X unchanged -> Y": that
    command, and the same without the newcomers, give X and Y today to the digits written (as
    ``test_every_cards_growth_verdict_is_what_its_measurement_gives`` holds the error-measured cards)."""
    import re
    import shlex

    from badger_runtime.cli import main
    from badger_runtime.growth import agrees_as_written
    why = card_of(name)["growth"]["why"]
    args = shlex.split(why[:why.index(" --json") + len(" --json")])
    assert args[0] == "badger" and "--add" in args, why
    metric = next(m for m in OWN_METRICS if why.count(m) == 1)
    quoted = re.search(re.escape(metric) + r" ([\d.,]+) unchanged -> ([\d.,]+)", why).groups()
    unchanged = [a for i, a in enumerate(args) if a != "--allow-harmful-growth"
                 and not (a in ("--add-at", "--add", "--init") or args[i - 1] in ("--add-at", "--add", "--init"))]
    for text, argv in zip(quoted, (unchanged, args)):
        assert main([*argv[1:], "--no-baselines"]) == 0  # the agent's numbers are the same with the baselines
        value = OWN_METRICS[metric](json.loads(capsys.readouterr().out))
        assert agrees_as_written(text, value), (name, metric, text, value, argv)


def test_requote_rewrites_only_the_numbers_a_measurement_moved():
    """``growth.requote`` (what demos/refresh_growth.py writes): each verdict's quoted numbers and an ``instead``'s
    offered mean become the measurement's where they no longer agree as written; the rest of the text stays; a
    verdict the measurement no longer gives is reported and its entry left alone."""
    from badger_runtime.growth import agrees_as_written, requote

    card = {"fresh": "hurts", "why": "badger eval ... --episodes 256 --seed 0 --json: final error 0.1675 unchanged -> "
            "1.2831 (7.66x, SEM 0.01) when 5 fresh experts join 5; paired +0.1 +- 0.01",
            "instead": "add clones (init 'clone': 0.1688, within the noise), or use dimensions-v3",
            "clone": "ok", "clone_why": "...: final error 0.1675 unchanged -> 0.1687 (1.01x) when 5 clones join 5"}
    measured = {"fresh": "hurts", "clone": "ok", "unchanged": 0.16751, "fresh_final": 1.28314, "clone_final": 0.17013,
                "sem": 0.0103, "ratio": 7.6601, "clone_ratio": 1.0156}
    new, changes = requote(card, measured)
    assert new["why"] == card["why"]  # 0.1675, 1.2831, 7.66x and 0.01 are the measurement's as written
    assert new["clone_why"] == "...: final error 0.1675 unchanged -> 0.1701 (1.02x) when 5 clones join 5"
    assert new["instead"] == "add clones (init 'clone': 0.1701, within the noise), or use dimensions-v3"
    assert len(changes) == 2 and requote(new, measured) == (new, [])
    moved, changes = requote(card, measured | {"clone": "hurts"})
    assert moved["clone_why"] == card["clone_why"] and changes[0] == "clone: VERDICT ok -> hurts"
    assert agrees_as_written("2.2e-05", 2.24e-05) and not agrees_as_written("2.2e-05", 2.26e-05)
    assert agrees_as_written("1,000", 1000.4) and not agrees_as_written("0.912", 0.9126)


def test_refresh_growth_writes_what_the_measurement_gives(tiny_policy, tmp_path):
    """demos/refresh_growth.py: a card whose quoted numbers no longer agree with its measurement gets them back
    with --write (the rest of its text kept); a dry run changes nothing; a card that agrees has nothing to do."""
    import runpy

    from badger_runtime.growth import card_growth, measure_growth

    pol = load_policy(tiny_policy)
    right = card_growth(measure_growth(pol, name="p", episodes=8))
    stale = dict(right, why=right["why"].replace("final error ", "final error 9") + "; a note kept")
    path = _with_growth(tiny_policy, tmp_path, stale)
    refresh = runpy.run_path(str(Path(__file__).parents[1] / "demos" / "refresh_growth.py"))["refresh"]
    said = []
    assert refresh(str(path), write=False, log=said.append) and json.loads(path.with_suffix(".json").read_text())[
        "growth"] == stale
    refresh(str(path), write=True, log=said.append)
    kept = dict(right, why=right["why"] + "; a note kept")
    assert json.loads(path.with_suffix(".json").read_text())["growth"] == kept
    assert refresh(str(path), write=True, log=said.append) == []


def test_export_measures_what_fresh_experts_do(tiny_run, tmp_path):
    """`badger export --eval-episodes` writes the card's growth from growth.measure_growth, and the
    command it names gives the fresh arm's number."""
    from badger_runtime.growth import CARD_KEYS, growth_setting, measure_growth
    from badger_runtime.training.export import export, write_card_evaluation

    out = tmp_path / "p.onnx"
    export(tiny_run[0] / "checkpoint.pt", out)
    card = write_card_evaluation(out, episodes=16)
    pol = load_policy(out)
    g = measure_growth(pol, name=str(out), episodes=16)
    assert card["growth"] == {k: g[k] for k in CARD_KEYS if k in g} == pol.growth
    assert {"fresh", "why", "clone", "clone_why"} <= set(card["growth"])
    s = growth_setting(pol)
    assert f"--add-at {s.at} --add {s.experts} --init fresh" in g["why"] and s.at == s.steps // 2
    assert f"--add-at {s.at} --add {s.experts} --init clone" in g["clone_why"]
    for init, key in (("fresh", ""), ("clone", "clone_")):  # the cards' rule, for either kind of newcomer
        assert (g[init] == "hurts") == (g[f"{init}_final"] > g["unchanged"] + 3 * g["sem"])
        assert (key + "instead" in g) == (g[init] == "hurts")
    base = run_episodes(numpy_ops(), pol, pol.agent, s.task, dims=s.dims, experts=s.experts, episodes=16, seed=0,
                        steps=s.steps).errors[-1]
    assert abs(float(base.mean()) - g["unchanged"]) < 1e-9


def test_the_measured_command_carries_the_flag_the_card_asks_for(harmed):
    """Whatever a small measurement finds, its fresh-arm command runs where the card refuses fresh experts."""
    from badger_runtime.growth import measure_growth

    g = measure_growth(harmed, episodes=4)
    assert "--init fresh --allow-harmful-growth" in g["command"]


def test_every_shipped_policy_meets_the_product_rules_and_readme_counts_them():
    """The product rules hold for every shipped policy (policies/, not policies/retired/): its card says fresh
    experts do not hurt it, and it is continual or episodic (every runtime enforces an episodic horizon). README's
    product-rule paragraph counts them and lists them, as the cards say (the count was stale for a while)."""
    import re

    from badger_runtime.policy_card import card_paths, resolve_policy, shipped_policies

    ones = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
            "seventeen eighteen nineteen").split()
    tens = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty"}

    def words(n: int) -> str:
        return ones[n] if n < 20 else tens[n // 10] + (f"-{ones[n % 10]}" if n % 10 else "")

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    names = shipped_policies()
    cards = {n: json.loads(card_paths(resolve_policy(n))[1].read_text()) for n in names}
    assert {n: c["growth"]["fresh"] for n, c in cards.items() if c["growth"]["fresh"] != "ok"} == {}
    assert all(c["lifetime"]["kind"] in ("continual", "episodic") for c in cards.values())
    assert readme.count(f"**done for all {words(len(names))}**") == 2  # both rules
    assert f"`badger policies` lists all {words(len(names))} from their cards" in readme
    listed = re.search(r"\(((?:[a-z0-9-]+, )+[a-z0-9-]+(?:, [a-z0-9-]+)* and [a-z0-9-]+) meet it;", readme).group(1)
    assert set(re.split(r", | and ", listed)) == set(names)

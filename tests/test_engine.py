"""The torch-free engine: ONNX export, card checks, parity with the torch model, import hygiene."""

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from badger_runtime.config import AgentConfig
from badger_runtime.engine import Agent, InputError, numpy_ops
from badger_runtime.evaluation import run_episodes
from badger_runtime.policy_card import PolicyError, load_policy
from badger_runtime.routing import Neighbors
from badger_runtime.training.model import torch_ops
from badger_runtime.training.train import load_checkpoint, policy_from_checkpoint

from .conftest import copy_policy, damage_one_entry, damaged_value, run_without_torch

ROUTINGS = ["dense", "topk", "hardwired", "homogeneous", "random"]
RULES = ["fixed", "convergence", "quorum"]


@pytest.fixture(scope="module")
def pair(tiny_run, tiny_policy):
    tp, cfg = policy_from_checkpoint(load_checkpoint(tiny_run[0] / "checkpoint.pt"))
    return tp, load_policy(tiny_policy), cfg


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    routing=st.sampled_from(ROUTINGS),
    rule=st.sampled_from(RULES),
    rounds=st.integers(1, 3),
    n=st.integers(1, 24),
    d=st.integers(1, 9),
    feedback=st.sampled_from(["scalar", "per_dim", "one_expert"]),
    seed=st.integers(0, 2**16),
    k=st.integers(1, 6),
    candidates=st.sampled_from([0, 2, 5]),
)
def test_rollout_parity_with_torch(pair, routing, rule, rounds, n, d, feedback, seed, k, candidates):
    """Same seeds, episodes, N, d, rounds and routing: the ONNX engine equals torch to 1e-5 (relative to the
    outputs' size where they exceed 1: float32 rounding differences grow through 5 steps of the policy).

    N and d range past the tiny policy's training range (d in [2, 3], N in [3, 5])."""
    tp, op, cfg = pair
    agent = AgentConfig(policy=cfg.agent.policy, routing=type(cfg.agent.routing)(kind=routing, k=k, degree=k, candidates=candidates),
                        agreement=type(cfg.agent.agreement)(rule=rule, rounds=rounds, eps=1e-2))
    task = type(cfg.task)(**{**cfg.task.__dict__, "feedback": feedback})
    kw = dict(dims=d, experts=n, episodes=6, seed=seed, steps=5)
    a = run_episodes(numpy_ops(), op, agent, task, **kw)
    with torch.no_grad():
        b = run_episodes(torch_ops(), tp, agent, task, **kw)
    scale = max(1.0, float(np.abs(a.outputs).max()))
    assert np.abs(a.outputs - b.outputs).max() <= 1e-5 * scale  # the rollout's outputs
    assert np.allclose(a.errors, b.errors, rtol=1e-4, atol=1e-4)  # derived from the outputs (squared)
    assert np.array_equal(a.rounds, b.rounds)
    assert np.all(a.rounds <= rounds) and np.all(a.rounds >= 1)


def test_card_records_what_a_runtime_needs(tiny_policy):
    card = json.loads(tiny_policy.with_suffix(".json").read_text())
    for key in ("format", "sha256", "signature", "heads", "initial_state", "config", "training", "export", "versions"):
        assert key in card
    assert card["export"]["max_rel_diff_vs_torch"] <= 1e-5
    assert card["versions"]["onnxruntime"]


def _copy(policy, tmp_path):
    return copy_policy(policy, tmp_path)


def test_a_changed_onnx_file_is_refused(tiny_policy, tmp_path):
    p = _copy(tiny_policy, tmp_path)
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(PolicyError, match="sha256"):
        load_policy(p)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(format="badger-policy/99"), "card format"),
        (lambda c: c["config"]["agent"]["policy"].update(hidden=c["config"]["agent"]["policy"]["hidden"] + 1),
         "initial_state|shape"),
        (lambda c: c["config"]["agent"]["policy"].update(msg_dim=3), "shape"),
        (lambda c: c["config"]["agent"]["routing"].update(kind="star"), "bad config"),
        (lambda c: c.update(config=None), "bad config.*map of settings"),
        (lambda c: c.update(config=[1, 2]), "bad config.*map of settings"),
    ],
)
def test_a_card_that_does_not_match_is_refused(tiny_policy, tmp_path, edit, message):
    p = copy_policy(tiny_policy, tmp_path, edit=edit)
    with pytest.raises(PolicyError, match=message):
        load_policy(p)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_entry_of_a_card_damaged_is_refused_or_the_policy_runs(tiny_policy, tmp_path, data):
    """One entry of a policy card, at any depth (a top-level field, a config section, one setting), replaced by
    anything JSON can hold (wrong types, shapes, numbers out of range, NaN, null): ``load_policy`` raises
    PolicyError naming the reason, or the policy loads and steps an agent (an entry only a person reads); nothing
    else escapes (a card whose config was null raised AttributeError)."""
    card = json.loads(tiny_policy.with_suffix(".json").read_text())
    path = damage_one_entry(data, card, from_value=lambda real, v: v.tolist() if isinstance(v, np.ndarray) else v)
    try:
        json.dumps(card)
    except (TypeError, ValueError):  # not something a JSON card can hold
        return
    p = copy_policy(tiny_policy, tmp_path, name=f"fuzz{abs(hash(str(path))) % 1000}", edit=lambda c: c.update(card))
    try:
        pol = load_policy(p)
    except PolicyError:
        return
    a = Agent(pol).reset(batch=2, experts=3, dims=2, seed=0)
    try:
        out, _ = a.step(np.zeros((2, a.slots), np.float32))
    except InputError:  # a lifetime or growth rule the runtime holds it to, with its reason
        return
    assert np.isfinite(out).all()


def test_missing_card_or_file(tiny_policy, tmp_path):
    p = tmp_path / "lonely.onnx"
    shutil.copy(tiny_policy, p)
    with pytest.raises(PolicyError, match="card not found"):
        load_policy(p)
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "absent.onnx")
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"garbage")
    card = json.loads(tiny_policy.with_suffix(".json").read_text())
    import hashlib

    card["sha256"] = hashlib.sha256(b"garbage").hexdigest()
    bad.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(PolicyError, match="cannot load"):
        load_policy(bad)


def test_stepwise_agent_refuses_bad_observations_and_keeps_its_state(tiny_policy):
    agent = Agent(load_policy(tiny_policy)).reset(batch=2, experts=4, dims=3, seed=0)
    obs = np.zeros((2, agent.slots), np.float32)
    agent.step(obs)
    before = agent.state.h.copy()
    for bad in (np.full((2, agent.slots), np.nan), np.full((2, agent.slots), np.inf), np.zeros((2, 1)),
                np.full((2, agent.slots), 1e9), [["a"] * agent.slots] * 2):
        with pytest.raises(InputError):
            agent.step(bad)
        assert np.array_equal(agent.state.h, before) and agent.t == 1
    out, info = agent.step(obs)
    assert out.shape == (2, 3) and np.isfinite(out).all()


def test_engine_runs_with_torch_unimportable(tiny_policy, tmp_path):
    """The deploy path never imports torch: run it where `import torch` fails."""
    res = run_without_torch(f"""
        import sys, json
        import badger_runtime, badger_runtime.engine, badger_runtime.evaluation, badger_runtime.cli
        from badger_runtime.engine import numpy_ops
        from badger_runtime.evaluation import evaluate
        from badger_runtime.policy_card import load_policy
        p = load_policy({str(tiny_policy)!r})
        r = evaluate(numpy_ops(), p, p.agent, p.task, dims=3, experts=4, episodes=8, seed=0)
        assert 'torch' not in sys.modules
        print(json.dumps(r['final_mse']))
    """, tmp_path)
    assert np.isfinite(json.loads(res.stdout))


def test_eval_cli_same_json_for_checkpoint_and_policy(tiny_run, tiny_policy, capsys):
    from badger_runtime.cli import main

    flags = ["--dims", "3", "--experts", "4", "--episodes", "16", "--seed", "3", "--json"]
    assert main(["eval", "--policy", str(tiny_policy), *flags]) == 0
    a = json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(tiny_run[0] / "checkpoint.pt"), *flags]) == 0
    b = json.loads(capsys.readouterr().out)
    assert set(a) - {"policy", "seconds"} == set(b) - {"checkpoint", "seconds"}
    assert np.allclose(a["mse_by_step"], b["mse_by_step"], atol=1e-5)
    for key in ("chance", "mean_solution", "optimizer", "final_mse"):
        assert key in a
    assert a["optimizer"]["name"] == "adam"  # per-dim feedback: Adam baseline
    assert main(["eval", "--policy", str(tiny_policy), "--dims", "0"]) == 2
    assert main(["eval", "--policy", str(tiny_policy), *flags, "--no-baselines"]) == 0  # the agent's numbers only
    c = json.loads(capsys.readouterr().out)
    assert c["mse_by_step"] == a["mse_by_step"] and not {"chance", "mean_solution", "optimizer"} & set(c)


def test_numpy_softmax_in_place_is_the_composed_one_bit_for_bit():
    """NumpyOps.softmax (in place, one new array) computes softmax_composed's numbers exactly: masks that
    broadcast, all-masked rows (zero weights), NaN inside and outside the mask, either axis, float32 and float64
    scores alike; the scores are left as they were."""
    from badger_runtime import xp

    class Composed(xp.NumpyOps):
        softmax = None

    rng = np.random.default_rng(0)
    for last in (9, 8, 7, 4, 2, 1):  # below xp.SMALL_AXIS the last axis is reduced slice by slice
        scores = (rng.standard_normal((3, 5, 2, last)) * 4).astype(np.float32)
        scores[0, 0, 0, last // 2] = np.nan  # a NaN the mask hides (below) and one it shows
        scores[1, 2, 1, 0] = np.nan
        scores[2, 1, 0] = -0.0
        masks = [None, rng.random((3, 5, 2, last)) > 0.3, rng.random((3, 5, 1, last)) > 0.5]
        masks[2][0, 0, 0] = False  # every entry of a row masked: zero weights
        masks[2][0, 0, 0, last // 2] = False
        for dtype in (np.float32, np.float64):
            s = scores.astype(dtype)
            before = s.copy()
            for mask in masks:
                for axis in (-1, 3, 1):
                    fast = xp.softmax(xp.NumpyOps(), s, mask, axis=axis)
                    slow = xp.softmax(Composed(), s, mask, axis=axis)
                    assert fast.dtype == slow.dtype and np.array_equal(fast, slow, equal_nan=True), (dtype, axis)
            assert np.array_equal(s, before, equal_nan=True)
        assert not xp.softmax(xp.NumpyOps(), scores, masks[2])[0, 0].any()


def test_the_small_axis_reductions_are_numpys_bit_for_bit():
    """xp.sum_last / max_last (NumpyOps.softmax over a few entries): np.sum's and np.max's results to the bit,
    the sign of a zero sum, NaN and inf included; 8 or more entries (numpy sums those pairwise) are refused."""
    from badger_runtime.xp import max_last, sum_last

    rng = np.random.default_rng(1)
    for last in range(1, 8):
        for dtype in (np.float32, np.float64):
            x = (rng.standard_normal((40, 6, last)) * 10.0 ** rng.integers(-5, 6, (40, 6, last))).astype(dtype)
            x[0, 0, 0], x[1, 1], x[2, 2, 0], x[3, 3, -1] = -0.0, -0.0, np.nan, np.inf
            ref, got = np.sum(x, axis=-1, keepdims=True), sum_last(x)
            assert got.shape == ref.shape and np.array_equal(got, ref, equal_nan=True)
            assert np.array_equal(np.signbit(got), np.signbit(ref))
            assert np.array_equal(max_last(x), np.max(x, axis=-1, keepdims=True), equal_nan=True)
    with pytest.raises(ValueError, match="pairwise"):
        sum_last(np.zeros((2, 8), np.float32))


def test_random_routing_of_degree_zero_has_each_expert_hear_only_itself(tiny_policy):
    """routing.degree = 0 (``badger eval --routing random --degree 0``): every inbox is the expert's
    own message, the ablation that keeps each expert's messages to itself."""
    from badger_runtime.config import RoutingConfig
    from badger_runtime.routing import route, topology

    topo = topology(RoutingConfig(kind="random", degree=0), 5, 2, np.random.default_rng(0))
    assert np.array_equal(topo.idx, np.broadcast_to(np.arange(5)[None, :, None], (2, 5, 1)))
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, 5, d)).astype(np.float32) for d in (4, 4, 3))
    inbox, _ = route(numpy_ops(), RoutingConfig(kind="random", degree=0), q, k, v, topo)
    assert np.allclose(inbox, v)
    pol = load_policy(tiny_policy)
    cfg = AgentConfig(policy=pol.spec, routing=RoutingConfig(kind="random", degree=0), agreement=pol.agent.agreement)
    a = Agent(pol, cfg).reset(batch=2, experts=4, dims=3, seed=5)
    a.step(np.zeros((2, a.slots), np.float32))


def test_snapshot_restore_continues_exactly(tiny_policy):
    from badger_runtime.config import RoutingConfig

    pol = load_policy(tiny_policy)
    for routing in (RoutingConfig(kind="random", degree=2), RoutingConfig(kind="topk", k=2, candidates=3),
                    RoutingConfig(kind="hardwired")):
        cfg = AgentConfig(policy=pol.spec, routing=routing, agreement=pol.agent.agreement)
        a = Agent(pol, cfg).reset(batch=2, experts=7, dims=3, seed=5)
        obs = np.zeros((2, a.slots), np.float32)
        a.step(obs)
        a.add_experts(2, init="clone")
        snap = a.snapshot()
        b = Agent(pol, cfg).restore(snap)
        for _ in range(3):
            oa, _ = a.step(obs)
            ob, _ = b.step(obs)
            assert np.array_equal(oa, ob)
        assert a.n_experts == b.n_experts == 9


def test_growing_and_shrinking_keep_the_agent_running(tiny_policy):
    pol = load_policy(tiny_policy)
    a = Agent(pol).reset(batch=1, experts=4, dims=2, seed=0)
    obs = np.zeros((1, a.slots), np.float32)
    a.step(obs)
    h_before = a.state.h.copy()
    new = a.add_experts(3, init="clone", source=1)
    assert new == [4, 5, 6] and a.n_experts == 7
    assert np.array_equal(a.state.h[:, 4], h_before[:, 1])  # a clone starts as its source
    a.add_experts(1, init="fresh")
    assert a.remove_experts([0, 2]) == 6
    out, _ = a.step(obs)
    assert out.shape == (1, 2) and np.isfinite(out).all()
    with pytest.raises(InputError):
        a.remove_experts(range(6))
    with pytest.raises(InputError):
        a.add_experts(1, init="copy")
    with pytest.raises(InputError):
        a.remove_experts([99])
    assert a.n_experts == 6


def test_each_episode_of_a_batch_draws_whom_its_clones_copy(tiny_policy):
    """A batch of B episodes is B agents: clones added without a source copy, in each episode, an expert
    that episode drew (not one index for the whole batch), so a measurement over the batch averages over
    draws; ``sources`` [n] names the same experts in every episode, [B, n] each episode's own."""
    pol = load_policy(tiny_policy)
    a = Agent(pol).reset(batch=64, experts=3, dims=2, seed=0)
    obs = np.zeros((64, a.slots), np.float32)
    a.step(obs)
    h = a.state.h.copy()
    a.add_experts(2, init="clone")
    # which incumbent each newcomer copies, episode by episode (the states of one episode's experts differ)
    copied = np.array([[int(np.flatnonzero((h[b] == a.state.h[b, 3 + i]).all(axis=1))[0]) for i in range(2)]
                       for b in range(64)])
    assert set(np.unique(copied)) == {0, 1, 2}  # all three sources are drawn somewhere in the batch
    assert len({tuple(r) for r in copied}) > 1  # and episodes differ in whom they copy
    b = Agent(pol).reset(batch=64, experts=3, dims=2, seed=0)
    b.step(obs)
    named = np.tile([2, 0], (64, 1))
    named[::2] = [1, 1]
    b.add_experts(2, init="clone", sources=named)
    assert np.array_equal(b.state.h[np.arange(64)[:, None], [3, 4]], h[np.arange(64)[:, None], named])
    b.add_experts(1, init="clone", sources=np.array([4]))
    assert np.array_equal(b.state.h[:, 5], b.state.h[:, 4])
    for bad in (np.zeros((2, 1), np.int64), np.array([6]), np.array([0.5])):
        with pytest.raises(InputError, match="sources"):
            b.add_experts(1, init="clone", sources=bad)
    assert b.n_experts == 6


@pytest.mark.parametrize("routing", [{}, {"kind": "topk", "candidates": 2}, {"kind": "random", "degree": 2}])
def test_copies_of_the_same_episodes_grow_and_shrink_alike(tiny_policy, routing):
    """An agent started with ``copies`` = C (ES's candidates: C copies of the same B / C episodes) draws what
    growing and shrinking need once per episode and repeats it in every copy: fresh experts' noise, whom clones
    copy, a redrawn sparse topology; with copies = 1 the draws are those of before (one per episode)."""
    import dataclasses

    pol = load_policy(tiny_policy)
    cfg = dataclasses.replace(pol.agent, routing=dataclasses.replace(pol.agent.routing, **routing))
    one = Agent(pol, cfg).reset(batch=4, experts=5, dims=2, seed=3)
    idx = np.tile(np.arange(4), 3)
    a = Agent(pol, cfg).start(one.interface.select(idx), one.wiring.select(idx), rng=np.random.default_rng(7),
                              copies=3)
    b = Agent(pol, cfg).start(one.interface.select(idx), one.wiring.select(idx), rng=np.random.default_rng(7))
    obs = np.tile(np.random.default_rng(0).standard_normal((4, a.slots)).astype(np.float32), (3, 1))
    for ag in (a, b):
        ag.step(obs)
        ag.add_experts(3, init="fresh")
        ag.step(obs)
        ag.add_experts(4, init="clone")
        ag.step(obs)
        ag.remove_experts([0, 6])
        ag.step(obs)

    def per_copy(x):
        x = np.asarray(x.idx if isinstance(x, Neighbors) else x)
        return x.reshape(3, 4, *x.shape[1:])

    for x in (a.state.h, a.wiring.noise, *([a.wiring.route_mask] if a.wiring.route_mask is not None else [])):
        c = per_copy(x)
        assert np.array_equal(c[0], c[1]) and np.array_equal(c[0], c[2])
    c = per_copy(b.state.h)  # one copy each: their own newcomers
    assert not np.array_equal(c[0], c[1])
    with pytest.raises(ValueError, match="copies"):
        Agent(pol, cfg).start(one.interface, one.wiring, copies=3)


_INT = st.one_of(st.integers(-5, 10), st.integers(-2**70, 2**70))
_INTS = st.one_of(_INT, st.lists(_INT, max_size=4), damaged_value(np.zeros((2, 3), np.int64)),
                  damaged_value(np.zeros(3, np.int64)))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_refused_call_leaves_the_agent_as_it_was(tiny_policy, data):
    """The engine's calls with well-typed but damaged arguments (observations of other shapes, NaN, inf; counts
    of any sign and size, 10^21 experts, more than dense routing holds; sources and indices out of range, of other
    shapes, NaN): InputError, and the agent, its generator included, exactly as before (a huge count was a
    MemoryError, too many for dense routing a ConfigError after the newcomers' draws); otherwise it steps on."""
    pol = load_policy(tiny_policy)
    a = Agent(pol).reset(batch=2, experts=4, dims=2, seed=0)
    obs = np.zeros((2, a.slots), np.float32)
    a.step(obs)
    before = a.snapshot()
    what = data.draw(st.sampled_from(["step", "add", "remove"]), label="call")
    try:
        if what == "step":
            a.step(data.draw(st.one_of(damaged_value(obs), _INTS), label="observation"))
        elif what == "add":
            kw = {"init": data.draw(st.sampled_from(["fresh", "clone", None, "x"]), label="init")}
            if data.draw(st.booleans()):
                kw["sources"] = data.draw(_INTS, label="sources")
            elif data.draw(st.booleans()):
                kw["source"] = data.draw(_INT, label="source")
            a.add_experts(data.draw(_INT, label="n"), **kw)
        else:
            a.remove_experts(data.draw(_INTS, label="indices"))
    except InputError:
        after = a.snapshot()
        for k, v in before.items():
            assert (np.array_equal(v, after[k]) if isinstance(v, np.ndarray) else v == after[k]), k
        return
    out, _ = a.step(obs)
    assert np.isfinite(out).all()


def test_the_sharded_and_actor_runtimes_refuse_what_the_engine_refuses(tiny_policy):
    """The same growth and removal rules (``engine.check_add``, ``engine.expert_indices``) in the sharded runtime,
    and the same growth rule and integer ids in the per-expert actor runtime."""
    import dataclasses

    from badger_runtime.actors.sharded import ShardedAgent
    from badger_runtime.engine import MAX_EXPERTS

    pol = load_policy(tiny_policy)
    ref = Agent(pol).reset(batch=1, experts=4, dims=2, seed=0)
    dense = dataclasses.replace(pol.agent, routing=dataclasses.replace(pol.agent.routing, kind="dense"))
    a = ShardedAgent(pol, dense, ref.interface, ref.wiring, shards=2)
    for n in (0, -3, MAX_EXPERTS, 20_000):  # 20,000 dense experts would not fit
        with pytest.raises(InputError):
            a.add_experts(n, init="fresh")
    for ids in ([7], [-1], ["a"], [1.5], None, [[0, 1]]):
        with pytest.raises(InputError):
            a.remove_experts(ids)
    assert a.n_experts == 4 and a.remove_experts(np.array([0, 2])) == 2
    from badger_runtime.actors.runtime import ActorAgent

    act = ActorAgent(pol, dense, ref.interface, ref.wiring)  # per-expert actors, not started: the calls are sync
    for n in (0, -3, MAX_EXPERTS):
        with pytest.raises(InputError):
            act.add_experts(n, init="fresh")
    for ids in ([7], ["a"], [1.5], None):
        with pytest.raises(InputError):
            act.remove_experts(ids)
    assert len(act.live_ids()) == 4 and act.remove_experts(np.array([0])) == 3


def test_every_shipped_policy_runs_an_episode_without_torch(tmp_path):
    """A base install (no torch) loads each shipped policy and runs episodes of its own task with it
    (the stationary evaluation setting): better than chance (guessing) or uniform random (bandit)."""
    from pathlib import Path

    shipped = sorted(Path(__file__).resolve().parents[1].joinpath("policies").rglob("*.onnx"))  # the retired ones too
    assert shipped, "no shipped policies"
    res = run_without_torch(f"""
        import sys, json
        from badger_runtime.cli import main
        from badger_runtime.policy_card import load_policy
        for p in {[str(p) for p in shipped]!r}:
            task = load_policy(p).task.name
            assert main(["eval", "--policy", p, "--task", task, "--episodes", "4", "--seed", "1", "--json"]) == 0
        assert 'torch' not in sys.modules
    """, tmp_path, timeout=300)
    reports = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(reports) == len(shipped)
    for r in reports:
        if r["task"]["name"] == "bandit":
            assert np.isfinite(r["final_regret"]) and r["final_regret"] < r["baselines"]["uniform_random"][-1]
        elif "final_mse" in r:
            assert np.isfinite(r["final_mse"]) and r["final_mse"] < r["chance"]
        else:  # a classifier: better than chance
            assert r["mean_accuracy"] > 1.5 / r["classes"]


def test_large_random_graphs_draw_distinct_senders():
    from badger_runtime.routing import EXACT_DRAW_MAX_N, _draw_senders

    n = EXACT_DRAW_MAX_N + 500
    idx = _draw_senders(np.random.default_rng(0), 2, n, 64)
    assert idx.shape == (2, n, 64)
    assert not (idx[..., 1:] == idx[..., :-1]).any()  # ascending and distinct
    assert not (idx == np.arange(n)[None, :, None]).any()  # never the receiver itself


def test_message_ablations(tiny_policy):
    """routing.ablation (eval only): 'cut' empties every inbox, 'shuffle' hands each expert the next
    expert's inbox; both change the rollout, and the actor runtimes refuse the shuffle."""
    import dataclasses

    from badger_runtime import routing
    from badger_runtime.config import ConfigError, RoutingConfig

    ops = numpy_ops()
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 4, 3)).astype(np.float32) for _ in range(3))
    full, _ = routing.route(ops, RoutingConfig(), q, k, v)
    cut, _ = routing.route(ops, RoutingConfig(ablation="cut"), q, k, v)
    shuf, _ = routing.route(ops, RoutingConfig(ablation="shuffle"), q, k, v)
    assert not cut.any() and np.allclose(shuf, np.roll(full, -1, axis=1))
    pol = load_policy(tiny_policy)
    kw = dict(dims=3, experts=4, episodes=8, seed=0, steps=5)
    outs = {}
    for ab in ("none", "cut", "shuffle"):
        agent = dataclasses.replace(pol.agent, routing=dataclasses.replace(pol.agent.routing, ablation=ab))
        outs[ab] = run_episodes(ops, pol, agent, pol.task, **kw).outputs
    assert np.abs(outs["none"] - outs["cut"]).max() > 1e-3 and np.abs(outs["none"] - outs["shuffle"]).max() > 1e-4
    agent = dataclasses.replace(pol.agent, routing=dataclasses.replace(pol.agent.routing, ablation="shuffle"))
    with pytest.raises(ConfigError, match="batched engine only"):
        run_episodes(ops, pol, agent, pol.task, runtime="sharded", **kw)
    with pytest.raises(ConfigError):
        RoutingConfig(ablation="mute").validate()


def test_clones_copy_an_expert_that_senses_what_the_newcomer_will():
    """With a membrane that deals the slots out (grid: one (class, feature) cell per rank), a clone's
    source reads the same cell as the rank it joins at; with any other membrane (all slots, or only
    the first expert hearing the error) the sources are the plain draws, as before."""
    from badger_runtime.membrane import Interface, Visibility
    from badger_runtime.rollout import clone_candidates, clone_sources

    slots, out = np.zeros((1, 2 * 3 + 4, 8), np.float32), np.zeros((1, 4, 8), np.float32)
    grid = Interface(slots, out, Visibility("grid", 6, 10, period=3))  # 4 classes x 3 features: 12 cells
    cands = clone_candidates(grid, 12, 12)
    assert all(c.tolist() == [i] for i, c in enumerate(cands))  # rank 12 + i is cell i again
    assert clone_sources(np.random.default_rng(0), grid, 12, 24).tolist() == list(range(12)) * 2
    first = Interface(np.zeros((1, 4, 8), np.float32), out, Visibility("first", 3, 4))
    for itf in (first, Interface(slots, out)):
        assert clone_candidates(itf, 3, 2) is None
        a, b = np.random.default_rng(4), np.random.default_rng(4)
        assert clone_sources(a, itf, 5, 3).tolist() == b.integers(0, 5, size=3).tolist()

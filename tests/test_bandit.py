"""The K-armed bandit task (tasks/bandit.py): draws, the arm choice and its feedback, parity across
runtimes and with a served session, the eval/longrun commands, the shipped policy, torch-free."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from badger_runtime.engine import Agent, numpy_ops
from badger_runtime.episodes import Driver, drive, sample_batches
from badger_runtime.evaluation import run_episodes
from badger_runtime.membrane import KIND_FEEDBACK, KIND_OBSERVATION, N_KIND_FLAGS
from badger_runtime.policy_card import load_policy
from badger_runtime.tasks import default_config, make_task
from badger_runtime.tasks import bandit as bd
from badger_runtime.tasks.bandit_baselines import BASELINES

from .conftest import run_without_torch

OPS = numpy_ops()
SHIPPED = "bandit-v1"


@pytest.fixture(scope="module")
def pol():
    """A shipped policy trained on the guessing game only (any policy runs on bandits)."""
    return load_policy("guessing-converge-v1")


def episodes(batch=4, K=5, steps=30, seed=0, addr_dim=6, experts_n=3, **cfg):
    task = make_task(default_config("bandit", **cfg))
    return task.sample(np.random.default_rng(seed), batch, dims=K, experts=experts_n, steps=steps, addr_dim=addr_dim)


def test_draws_and_interface_shapes():
    ep = episodes(batch=4, K=5, steps=30)
    assert ep.batch == 4 and ep.dims == 5 and ep.slots == 7
    assert ep.rewards.shape == (30, 4, 5) and ep.uniforms.shape == (30, 4) and ep.means.shape == (30, 4, 5)
    assert set(np.unique(ep.rewards)) <= {0.0, 1.0} and ((ep.means >= 0) & (ep.means <= 1)).all()
    assert dict(ep.interface.parts) == {"observation": 5, "pulled": 1, "feedback": 1}
    # observation slots: the arm addresses with the observation flag
    obs = ep.interface.slot_addr[:, :5]
    assert (obs[..., KIND_OBSERVATION] == 1).all()
    assert np.array_equal(obs[..., N_KIND_FLAGS:], ep.interface.out_addr[..., N_KIND_FLAGS:])
    one = ep.select(slice(1, 2))
    assert one.batch == 1 and np.array_equal(one.rewards[:, 0], ep.rewards[:, 1])
    g = episodes(arm_dist="gaussian")
    assert g.rewards.dtype == np.float32 and not set(np.unique(g.rewards)) <= {0.0, 1.0}


@pytest.mark.parametrize("choice", ["sample", "argmax"])
def test_the_arm_and_its_feedback_come_from_the_outputs_as_documented(choice):
    ep = episodes(batch=6, K=4, steps=5, choice=choice, temperature=0.5)
    rng = np.random.default_rng(1)
    # t = 0: every slot 0, the pointer slots' addresses the bare kind flags
    assert not ep.observe(OPS, 0, np.zeros((6, 4), np.float32)).any()
    for slot, kind in ((-2, KIND_OBSERVATION), (-1, KIND_FEEDBACK)):
        bare = np.zeros(ep.interface.slot_addr.shape[-1], np.float32)
        bare[kind] = 1
        assert (ep.interface.slot_addr[:, slot] == bare).all()
    for t in range(1, 5):
        scores = rng.normal(size=(6, 4)).astype(np.float32)
        vals = ep.observe(OPS, t, scores)
        if choice == "argmax":
            arm = scores.argmax(axis=1)
        else:  # the arm whose softmax(scores / T) interval holds the pre-drawn uniform
            p = np.exp(scores / 0.5) / np.exp(scores / 0.5).sum(axis=1, keepdims=True)
            arm = (np.cumsum(p, axis=1) < ep.uniforms[t - 1][:, None]).sum(axis=1)
        rows = np.arange(6)
        assert np.array_equal(vals[:, :4], scores)  # the previous scores
        assert (vals[:, 4] == 1).all() and np.allclose(vals[:, 5], 1.0 - ep.rewards[t - 1, rows, arm])  # its loss
        arm_addr = ep.interface.out_addr[rows, arm, N_KIND_FLAGS:]
        pulled, fb = ep.interface.slot_addr[:, -2], ep.interface.slot_addr[:, -1]  # both point at the pulled arm
        assert (pulled[:, KIND_OBSERVATION] == 1).all() and (pulled[:, KIND_FEEDBACK] == 0).all()
        assert np.array_equal(pulled[:, N_KIND_FLAGS:], arm_addr)
        assert (fb[:, KIND_FEEDBACK] == 1).all() and (fb[:, KIND_OBSERVATION] == 0).all()
        sign = 2.0 * ep.rewards[t - 1, rows, arm] - 1.0  # the feedback pointer: along or against the arm
        assert np.allclose(fb[:, N_KIND_FLAGS:], sign[:, None] * arm_addr)
        m = ep.metrics(t - 1, scores)
        mu = ep.means[t - 1]
        assert np.allclose(m["regret"], mu.max(axis=1) - mu[rows, arm])


def test_cyclic_visibility_in_blocks_deals_each_arm_to_its_experts():
    from badger_runtime.membrane import Visibility

    v = Visibility("cyclic", 0, 6, blocks=2)  # 3 arms, two slots each (pulled 0-2, feedback 3-5)
    m = v.mask(5, 7)[0]  # slot 6 (outside) always read
    assert m.astype(int).tolist() == [[1, 0, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 0, 1], [0, 0, 1, 0, 0, 1, 1],
                                      [1, 0, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 0, 1]]
    assert Visibility.from_dict(v.to_dict()) == v
    old = {k: x for k, x in Visibility("cyclic", 0, 6).to_dict().items() if k != "blocks"}  # a card from before
    assert Visibility.from_dict(old) == Visibility("cyclic", 0, 6)
    for bad in ({"kind": "cyclic", "hi": 5, "blocks": 2}, {"kind": "grid", "lo": 2, "hi": 4, "period": 1, "blocks": 2},
                {"kind": "cyclic", "hi": 4, "blocks": 0}):
        with pytest.raises(ValueError):
            Visibility(**bad)


def test_the_arms_layout_gives_each_arm_its_own_two_slots():
    """layout = arms: 2K slots at the arm addresses (pulled: observation flag, feedback: feedback flag),
    values the pulled arm's one-hot and 2 x loss - 1 on it; expert e reads arm e mod K's slots only."""
    K, B = 4, 6
    ep = episodes(batch=B, K=K, steps=6, layout="arms", experts_n=K)
    itf = ep.interface
    assert dict(itf.parts) == {"pulled": K, "feedback": K} and ep.slots == 2 * K
    for block, kind in ((0, KIND_OBSERVATION), (1, KIND_FEEDBACK)):
        part = itf.slot_addr[:, block * K:(block + 1) * K]
        assert (part[..., kind] == 1).all() and (part[..., 1 - kind] == 0).all()
        assert np.array_equal(part[..., N_KIND_FLAGS:], itf.out_addr[..., N_KIND_FLAGS:])
    vis = itf.visible(2 * K)[0]
    for e in range(2 * K):
        assert np.flatnonzero(vis[e]).tolist() == [e % K, K + e % K]
    assert not ep.observe(OPS, 0, np.zeros((B, K), np.float32)).any()
    rng, rows = np.random.default_rng(2), np.arange(B)
    before = itf.slot_addr.copy()
    for t in range(1, 6):
        scores = rng.normal(size=(B, K)).astype(np.float32)
        vals = ep.observe(OPS, t, scores)
        arm = ep.actions(t - 1, scores)
        onehot = np.eye(K, dtype=np.float32)[arm]
        assert np.array_equal(vals[:, :K], onehot)
        assert np.array_equal(vals[:, K:], onehot * (1.0 - 2.0 * ep.rewards[t - 1, rows, arm])[:, None])
    assert np.array_equal(itf.slot_addr, before)  # no pointers: the addresses never move
    with pytest.raises(Exception, match="at least 5 experts"):
        make_task(default_config("bandit", layout="arms")).sample(np.random.default_rng(0), 2, dims=5, experts=4,
                                                                   steps=3, addr_dim=6)
    task = make_task(default_config("bandit", layout="arms", experts=(3, 6)))
    assert task.pointer_field is None and task.experts_for(50) == 50 and task.experts_for(4) == 6
    assert make_task(default_config("bandit")).pointer_field == "arm"


def test_the_arms_layout_relaxation_keeps_the_episode_and_reaches_the_choice():
    import torch

    from badger_runtime.training.model import torch_ops

    ops = torch_ops()
    ep = episodes(batch=5, K=3, steps=3, layout="arms", relax="straight_through", experts_n=3)
    out = torch.randn(5, 3, requires_grad=True)
    relaxed = ep.observe(ops, 1, out)
    hard = ep.observe(OPS, 1, out.detach().numpy())
    assert np.allclose(relaxed.detach().numpy(), hard, atol=1e-6)
    (g,) = torch.autograd.grad(relaxed[:, 3:].sum(), out)
    assert g.abs().sum() > 0


def test_sampled_choice_follows_the_softmax():
    scores = np.tile(np.array([[0.0, 0.5, 1.0]], np.float32), (20000, 1))
    u = np.random.default_rng(0).random(20000)
    freq = np.bincount(bd.choose(scores, u, "sample", 0.5), minlength=3) / 20000
    p = np.exp(scores[0] / 0.5) / np.exp(scores[0] / 0.5).sum()
    assert np.abs(freq - p).max() < 0.015


def test_losses_and_continued_episodes():
    import torch

    from badger_runtime.training.model import torch_ops

    ops = torch_ops()
    ep = episodes(batch=8, K=3, steps=12, sf_weight=1.0)
    out = torch.randn(12, 8, 3, requires_grad=True)
    dense = ep.loss(ops, 2, out[2])
    pi = torch.softmax(out[2] / ep.temperature, dim=-1).detach().numpy()
    assert np.allclose(dense.detach().numpy(), (pi * ep.gaps(2)).sum(-1), atol=1e-6)
    sf = ep.trajectory_loss(ops, 0, out)
    sf.backward()
    assert torch.isfinite(sf) and out.grad.abs().sum() > 0
    # a continued agent's next batch: the same arms and means, the last played step kept
    more = bd.extend(np.random.default_rng(1), default_config("bandit", sf_weight=1.0), ep, 30)
    assert more.t_off == 11 and more.end == 30 and np.array_equal(more.rewards[0], ep.rewards[11])
    assert np.array_equal(more.means[5], ep.means[0]) and more.interface is ep.interface


def test_the_straight_through_relaxation_changes_gradients_not_the_episode():
    """relax = straight_through: the same pulls, slot values and losses, and a later loss reaches an
    earlier step's outputs through what the agent heard (the pointer addresses and the feedback)."""
    import torch

    from badger_runtime.config import AgentConfig, PolicySpec
    from badger_runtime.rollout import sample_wiring
    from badger_runtime.training.model import ExpertPolicy, torch_ops

    ops, spec = torch_ops(), PolicySpec(hidden=16, msg_dim=4, key_dim=4, addr_dim=10, read_heads=2, id_dim=2)
    agent, grads, losses = AgentConfig(policy=spec), {}, {}
    torch.manual_seed(0)
    pol = ExpertPolicy(spec)
    for relax in ("none", "straight_through"):
        ep = episodes(batch=8, K=4, steps=6, addr_dim=10, relax=relax)
        runtime = Agent(pol, agent, ops=ops, check_inputs=False).start(
            ep.interface, sample_wiring(np.random.default_rng(1), agent, 8, 3))
        d = Driver(ops, ep, 6)
        traj = drive(runtime, d)
        losses[relax] = (traj.losses.detach().numpy(), traj.metrics["regret"])
        grads[relax] = float(torch.autograd.grad(traj.losses[-1].mean(), d._outputs[1])[0].abs().sum())
    assert np.allclose(losses["none"][0], losses["straight_through"][0], atol=1e-6)
    assert np.array_equal(losses["none"][1], losses["straight_through"][1])
    assert grads["straight_through"] > grads["none"]


def test_torch_tensors_never_alias_the_slot_addresses_a_task_updates():
    """Training saves each step's slot addresses for the backward pass; the bandit rewrites the
    feedback slot's address at every step, so TorchOps.asarray must copy."""
    import torch

    from badger_runtime.xp import TorchOps

    a = np.zeros((2, 3), np.float32)
    t = TorchOps(torch).asarray(a)
    a[0, 0] = 1.0
    assert float(t[0, 0]) == 0.0


def test_changing_means_redraw_every_a_to_b_steps():
    ep = episodes(batch=3, K=4, steps=400, change_every=(20, 40))
    for e in range(3):
        starts = [s for s, _ in bd._segments(ep.changes, e)]
        gaps = np.diff(starts)
        assert len(starts) > 5 and (gaps >= 20).all() and (gaps <= 40).all()
        for s in starts[1:]:
            assert not np.array_equal(ep.means[s - 1, e], ep.means[s, e])


@pytest.mark.parametrize("layout", ["pointer", "arms"])
@pytest.mark.parametrize("runtime", ["sharded", "actors"])
def test_runtimes_pull_the_same_arms_as_the_engine(pol, runtime, layout):
    task = default_config("bandit", steps=12, layout=layout)
    kw = {"dims": 5, "experts": 7, "episodes": 3, "seed": 7, "steps": 12}
    a = run_episodes(OPS, pol, pol.agent, task, **kw)
    b = run_episodes(OPS, pol, pol.agent, task, runtime=runtime, **kw)
    assert np.abs(a.outputs - b.outputs).max() <= 1e-5
    assert np.array_equal(a.metrics["regret"], b.metrics["regret"])


def engine_reference(pol, task, K: int, n: int, seed: int, T: int):
    """One seeded bandit episode (what a served session with this seed draws) and the engine's
    trajectory on it, for the served-session tests."""
    _, ep, wiring = next(sample_batches(task, pol.agent, dims=K, experts=n, episodes=1, seed=seed, steps=T))
    return ep, drive(Agent(pol).start(ep.interface, wiring), Driver(OPS, ep, T))


def test_a_served_session_on_the_bandit_matches_the_engine(pol):
    """A client opens a bandit session on a live server (any policy: here a guessing one), plays the
    environment itself (picks the arm from the outputs, sends its loss and the arm) and gets the
    engine's outputs on the same seeded draws."""
    from badger_runtime.serve.client import AsyncClient, ServerError
    from badger_runtime.serve.sessions import SessionManager

    from .test_serve import run_server

    K, n, seed, T = 6, 3, 11, 10
    ep, ref = engine_reference(pol, default_config("bandit"), K, n, seed, T)
    got = []

    async def play(port, server):
        async with await AsyncClient.connect(f"127.0.0.1:{port}") as c:
            info = await c.open(dims=K, experts=n, seed=seed, session="b", task="bandit")
            assert info["pointer"] == "arm" and info["slots"] == K + 2
            prev = np.zeros((1, K), np.float32)
            for t in range(T):
                vals = ep.observe(OPS, t, prev)  # the environment, on the client's side
                arm = int(ep.actions(t - 1, prev)[0]) if t else None
                r = await c.step("b", vals[0, :K], vals[0, K + 1:], t=t, arm=arm, parts={"pulled": vals[0, K:K + 1]})
                prev = np.asarray(r["outputs"], np.float32)[None]
                got.append(prev[0])
            with pytest.raises(ServerError) as e:
                await c.step("b", np.zeros(K), [0.0], arm=K, parts={"pulled": [1.0]})
            assert e.value.code == "bad_input"

    run_server(SessionManager(pol), play)
    assert np.abs(np.stack(got) - ref.outputs[:, 0]).max() <= 1e-5


def run_cli(capsys, *args):
    from badger_runtime.cli import main

    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("dist", ["bernoulli", "gaussian"])
def test_eval_contract_with_a_guessing_policy(capsys, dist):
    """Any policy runs on bandits: one JSON object with regret_by_step and every baseline on the same draws."""
    r = run_cli(capsys, "eval", "--policy", "guessing-converge-v1", "--task", "bandit", "--arms", "7",
                "--arm-dist", dist, "--experts", "3", "--steps", "40", "--episodes", "12", "--seed", "2", "--past-horizon",
                "--json")  # an episodic policy (horizon 20), run past its horizon on purpose
    assert len(r["regret_by_step"]) == 40 and set(r["baselines"]) == set(BASELINES)
    assert all(len(v) == 40 for v in r["baselines"].values())
    assert r["task"]["dims"] == 7 and r["task"]["arm_dist"] == dist and r["final_regret"] == r["regret_by_step"][-1]
    assert np.all(np.diff(r["regret_by_step"]) >= -1e-9)


def test_longrun_bandit_cli(capsys):
    r = run_cli(capsys, "longrun", "--policy", "guessing-converge-v1", "--task", "bandit", "--arms", "4",
                "--steps", "300", "--episodes", "3", "--change-every", "40", "80", "--window", "50", "--full", "--json")
    assert r["changes"] > 0 and len(r["agent"]["regret_per_step_by_window"]) == 6
    for k in ("agent", "thompson_restarted_at_changes", "thompson"):
        assert set(r[k]["best_after_change_first_half"]) == {f"{a}-{b}" for a, b in bd.AFTER_CHANGE}
    assert r["finite"] and r["max_abs_state"] <= 1.0
    assert r["task"]["change_every"] == [40, 80] and r["task"]["choice"] == "sample"


def test_longrun_bandit_cli_takes_task_options_and_trims_curves(capsys):
    """The bandit's long run goes through the same task resolution as any task's: --option reaches it."""
    args = ("longrun", "--policy", "bandit-v1", "--arms", "4", "--steps", "120", "--episodes", "3", "--change-every",
            "40", "80", "--seed", "1", "--json")
    sample = run_cli(capsys, *args)
    argmax = run_cli(capsys, *args, "--option", "choice=argmax")
    assert sample["task"]["choice"] == "sample" and argmax["task"]["choice"] == "argmax"
    assert sample["agent"] != argmax["agent"]  # the option changed the run
    assert "regret_per_step_by_window" not in sample["agent"]  # without --full: the summary only
    from badger_runtime.cli import main

    assert main([*args, "--option", "colour=blue"]) != 0
    assert "has no setting 'colour'" in capsys.readouterr().err


def test_the_shipped_bandit_policy_beats_uniform_random(capsys):
    pol = load_policy(SHIPPED)
    assert pol.task.name == "bandit" and "bandit" in json.dumps(pol.card.get("task_notes", ""))
    r = run_cli(capsys, "eval", "--policy", SHIPPED, "--arms", "10", "--steps", "200", "--episodes", "40",
                "--seed", "0", "--json")
    assert r["final_regret"] < 0.35 * r["baselines"]["uniform_random"][-1]
    assert r["final_regret"] < r["baselines"]["ucb1"][-1]


def test_bandit_runs_with_torch_unimportable(tmp_path):
    run_without_torch("""
        import sys
        from badger_runtime.engine import numpy_ops
        from badger_runtime.evaluation import evaluate
        from badger_runtime.policy_card import load_policy
        from badger_runtime.tasks import default_config
        from badger_runtime.tasks.bandit import longrun_report
        import dataclasses
        for name in ("bandit-v1", "bandit-v2", "bandit-v3", "bandit-v4", "bandit-v5"):
            p = load_policy(name)
            task = dataclasses.replace(p.task, steps=8, change_every=(0, 0))
            for rt in ("engine", "sharded", "actors"):
                r = evaluate(numpy_ops(), p, p.agent, task, dims=4, experts=5, episodes=2, seed=0, runtime=rt)
                assert len(r["regret_by_step"]) == 8 and "thompson" in r["baselines"]
        longrun_report(load_policy("bandit-v1"), steps=60, episodes=2, change_every=(10, 20), window=20)
        assert 'torch' not in sys.modules
    """, tmp_path)


def test_the_arm_routing_init_sends_each_expert_score_to_its_own_arm():
    """train.init = arm_routing (training/inits.py): from the first step each output mixes only the
    experts that read its arm's slots (push weight >= 0.9 on them), whatever K and N >= K."""
    import torch

    from badger_runtime.config import AgentConfig, PolicySpec
    from badger_runtime.rollout import rollout, sample_wiring
    from badger_runtime.training.inits import apply_init
    from badger_runtime.training.model import ExpertPolicy, torch_ops

    spec = PolicySpec(hidden=40, msg_dim=8, key_dim=4, addr_dim=24, read_heads=2, id_dim=4)
    torch.manual_seed(0)
    agent = AgentConfig(policy=spec)

    def own_mass(pol, K, N):
        ep = episodes(batch=4, K=K, steps=3, addr_dim=24, layout="arms", experts_n=N)
        with torch.no_grad():
            r = rollout(torch_ops(), pol, agent, ep, sample_wiring(np.random.default_rng(K), agent, 4, N), steps=3,
                        record=True)
        w = r.traces[-1].push_weights.numpy()  # [B, K, N]
        own = (np.arange(N)[None, :] % K) == np.arange(K)[:, None]  # [K, N]: expert e reads arm e mod K
        return (w * own[None]).sum(axis=-1)

    pol = apply_init("arm_routing", ExpertPolicy(spec))
    for K, N in ((3, 7), (10, 10)):
        assert own_mass(pol, K, N).min() >= 0.9
    assert own_mass(ExpertPolicy(spec), 10, 10).min() < 0.5  # the default init mixes every expert into every arm


def test_the_count_wiring_init_keeps_the_wiring_and_counter_and_leaves_the_rule_random():
    """train.init = "arm_count_wiring" (configs/bandit_rule.toml): the units of the arm's address (both copies)
    and of its pull counter (``seen`` and the thermometer) are the handcrafted cell's (arm_index), as are the
    read queries and the push key; the running mean's unit and the free units keep the same seed's default
    random rows; the push value is zero, so every arm scores 0 (a uniform choice) until the outer loop learns
    the rule; messages stay silent."""
    import os

    import torch

    from badger_runtime.config import load_experiment
    from badger_runtime.training.inits import _arm_layout
    from badger_runtime.training.train import initial_policy

    cfg = load_experiment(os.path.join(os.path.dirname(__file__), "..", "configs", "bandit_rule.toml"))
    assert cfg.train.init == "arm_count_wiring" and cfg.train.trainable == ["cell.", "h0", "heads:push_value"]
    wired = initial_policy(cfg)
    cfg.train.init = ""
    rand = initial_policy(cfg)
    cfg.train.init = "arm_index"
    hand = initial_policy(cfg)
    spec, H, lay = wired.spec, wired.spec.hidden, _arm_layout(wired.spec)
    kept = [lay["seen"]] + lay["counts"] + lay["addr"] + lay["joined"]
    learn = [u for u in range(H) if u not in kept]
    assert learn == [lay["m"]] + lay["free"] and len(lay["free"]) == H - 2 - 7 - 2 * (spec.addr_dim - N_KIND_FLAGS)
    for units, ref in ((kept, hand), (learn, rand)):
        rows = [g * H + u for g in range(3) for u in units]
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            torch.testing.assert_close(getattr(wired.cell, name)[rows], getattr(ref.cell, name)[rows])
        torch.testing.assert_close(wired.h0[units], ref.h0[units])
    where = spec.head_slices
    for head in ("read_query", "push_key", "query", "key", "value"):
        torch.testing.assert_close(wired.heads.weight[where[head]], hand.heads.weight[where[head]])
    assert not wired.heads.weight[where["push_value"]].any() and not wired.heads.bias[where["push_value"]].any()
    assert hand.heads.weight[where["push_value"]].abs().sum() > 0
    # every arm scores 0 at first: the outputs of a short rollout are all equal
    pol = load_policy("bandit-v2")  # any arms policy's task settings
    task = dataclasses.replace(pol.task, steps=5)
    from badger_runtime.training.model import torch_ops

    with torch.no_grad():
        r = run_episodes(torch_ops(), wired, cfg.agent, task, dims=4, experts=8, episodes=2, seed=0, steps=5)
    out = np.asarray(r.outputs)
    assert np.allclose(out, out[..., :1])


def test_the_routing_counts_init_counts_each_experts_pulls_as_the_index_cell_does():
    """train.init = "arm_routing_counts": arm_routing's reads and address, plus arm_index's pull counter in its
    first units. Stepped on the same pulls, its ``seen`` and count units equal the index cell's (a unit j at
    1 - 2 (1 - alpha_j)^n after n pulls of the expert's arm, unmoved by anything else), while its other units
    keep arm_routing's random rows."""
    import torch

    from badger_runtime.config import PolicySpec
    from badger_runtime.training.inits import ARM_RATES, _arm_layout, apply_init
    from badger_runtime.training.model import ExpertPolicy

    spec = PolicySpec(hidden=64, msg_dim=16, key_dim=8, addr_dim=24, read_heads=2, id_dim=8, init_noise=0.0)
    torch.manual_seed(3)
    counted = apply_init("arm_routing_counts", ExpertPolicy(spec))
    torch.manual_seed(3)
    routed = apply_init("arm_routing", ExpertPolicy(spec))
    hand = apply_init("arm_index", ExpertPolicy(spec))
    J, H = len(ARM_RATES), spec.hidden
    lay = _arm_layout(spec)
    mine, theirs = list(range(1 + J)), [lay["seen"]] + lay["counts"]
    others = [g * H + u for g in range(3) for u in range(1 + J, H)]
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        torch.testing.assert_close(getattr(counted.cell, name)[others], getattr(routed.cell, name)[others])
    rng = np.random.default_rng(0)
    with torch.no_grad():
        h_c, h_h = torch.tanh(counted.h0).expand(4, H).clone(), torch.tanh(hand.h0).expand(4, H).clone()
        pulls = np.zeros(4)
        for t in range(60):
            x = torch.as_tensor(rng.standard_normal((4, spec.sensed_dim)), dtype=torch.float32)
            p = torch.as_tensor(rng.random(4) < 0.3, dtype=torch.float32)
            x[:, 0] = p  # head 0's read value: 1 on a pull of the expert's arm
            pulls += p.numpy()
            inbox = torch.zeros(4, spec.msg_dim)
            h_c = counted.cell(torch.cat([inbox, x], 1), h_c)
            h_h = hand.cell(torch.cat([inbox, x], 1), h_h)
            torch.testing.assert_close(h_c[:, mine], h_h[:, theirs], atol=2e-5, rtol=0)
    expected = 1 - 2 * (1 - np.asarray(ARM_RATES))[None, :] ** pulls[:, None]
    assert np.abs(h_c[:, 1:1 + J].numpy() - expected).max() < 1e-3 and pulls.min() > 5


@pytest.mark.parametrize("name", ["bandit-v2", "bandit-v5"])
def test_a_served_session_on_the_arms_membrane_matches_the_engine(name):
    """bandit-v2 and v5 (layout = arms; v5's experts also exchange messages): a served step sends the
    two parts, K values each (no arm field), and gets the engine's outputs on the same seeded draws;
    a step naming an arm is refused."""
    from badger_runtime.serve.client import AsyncClient, ServerError
    from badger_runtime.serve.sessions import SessionManager

    from .test_serve import run_server

    pol = load_policy(name)
    K, n, seed, T = 5, 7, 3, 12
    ep, ref = engine_reference(pol, pol.task, K, n, seed, T)
    got = []

    async def play(port, server):
        async with await AsyncClient.connect(f"127.0.0.1:{port}") as c:
            info = await c.open(dims=K, experts=n, seed=seed, session="a", task="bandit")
            assert info["pointer"] is None and info["slots"] == 2 * K
            assert info["parts"] == [["pulled", K], ["feedback", K]]
            prev = np.zeros((1, K), np.float32)
            for t in range(T):
                vals = ep.observe(OPS, t, prev)[0]  # the environment, on the client's side
                r = await c.step("a", None, None, t=t, parts={"pulled": vals[:K], "feedback": vals[K:]})
                prev = np.asarray(r["outputs"], np.float32)[None]
                got.append(prev[0])
            with pytest.raises(ServerError) as e:
                await c.step("a", None, None, arm=1, parts={"pulled": np.zeros(K), "feedback": np.zeros(K)})
            assert e.value.code == "bad_request"

    run_server(SessionManager(pol), play)
    assert np.abs(np.stack(got) - ref.outputs[:, 0]).max() <= 1e-5


@pytest.mark.parametrize("name, lifetime", [("bandit-v2", "episodic"), ("bandit-v3", "continual"),
                                            ("bandit-v4", "episodic"), ("bandit-v5", "continual")])
def test_the_shipped_arms_policies_are_near_thompson_and_below_ucb1(capsys, name, lifetime):
    """bandit-v2/v3/v4/v5 (handcrafted per-arm index cells, tuned on training episodes): at a trained K, within
    1.2x of Thompson sampling's regret and below UCB1 on the same draws (seeded)."""
    pol = load_policy(name)
    assert pol.task.layout == "arms" and pol.card["lifetime"]["kind"] == lifetime
    r = run_cli(capsys, "eval", "--policy", name, "--arms", "10", "--steps", "500", "--episodes", "60",
                "--seed", "0", "--json")
    assert r["task"]["experts"] == 20
    assert r["final_regret"] < 1.2 * r["baselines"]["thompson"][-1]
    assert r["final_regret"] < r["baselines"]["ucb1"][-1]


@pytest.mark.parametrize("name", ["bandit-v2", "bandit-v3", "bandit-v4", "bandit-v5"])
def test_fresh_experts_hot_added_do_not_hurt_the_arms_policies(name):
    """The product rule for bandit-v2/v3/v4/v5: as many fresh experts again halfway through end no worse than
    the unchanged agent (paired over the same seeded episodes, within 3 standard errors). A fresh
    expert stays out of its arm's score until it has seen its arm pulled itself (the joined push key)."""
    from badger_runtime.episodes import schedule

    pol = load_policy(name)
    task = pol.task
    kw = dict(dims=6, experts=12, episodes=100, seed=0, steps=400)
    base = run_episodes(OPS, pol, pol.agent, task, **kw).metrics["regret"].sum(axis=0)
    grown = run_episodes(OPS, pol, pol.agent, task, changes=schedule(200, 12, "fresh"), **kw).metrics["regret"]
    d = grown.sum(axis=0) - base
    assert d.mean() <= 3 * d.std() / np.sqrt(d.size), (d.mean(), d.std() / np.sqrt(d.size))


@pytest.mark.parametrize("name", ["bandit-v4", "bandit-v5"])
def test_bandit_v4_and_v5_are_within_the_bound_at_two_arms(capsys, name):
    """Issue 15's hardest trained K: two arms, where bandit-v2 was 1.23x Thompson sampling's regret.
    bandit-v4 (the same cell, a sharper choice and a larger bonus) is within 1.2x at T = 1,000 on
    the same draws (seeded; 0.87x over 1,000 episodes of seed 0, docs/results.md), and so is
    bandit-v5 (v4's cell with the change alarm, which must not fire on stationary arms: 0.87x)."""
    r = run_cli(capsys, "eval", "--policy", name, "--arms", "2", "--steps", "1000", "--episodes", "300",
                "--seed", "0", "--json")
    assert r["final_regret"] < 1.2 * r["baselines"]["thompson"][-1]


def test_the_shared_alarm_is_what_makes_bandit_v5_continual():
    """bandit-v5 (train.init = arm_index_alarm): an expert that sees its arm's rewards change raises an
    alarm in a message, and every expert restarts its counts on hearing one. The same policy where
    each expert hears only itself (random routing of degree 0: its own alarm, nobody else's) finds
    the best arm again more slowly after the means change, since a change is seen on the arm being
    pulled and not on the arms that became better (seeded; the same draws)."""
    import dataclasses

    pol = load_policy("bandit-v5")
    task = dataclasses.replace(pol.task, change_every=(300, 600))
    alone = dataclasses.replace(pol.agent, routing=dataclasses.replace(pol.agent.routing, kind="random", degree=0))
    per_step = {}
    for name, agent in (("dense", pol.agent), ("alone", alone)):
        r = run_episodes(OPS, pol, agent, task, dims=10, experts=20, episodes=64, seed=0, steps=3000)
        per_step[name] = float(r.metrics["regret"].sum(axis=0).mean()) / 3000
    assert per_step["dense"] < 0.8 * per_step["alone"], per_step


def test_the_bandit_long_run_takes_another_routing_as_an_ablation(capsys):
    """`badger longrun --routing random --degree 0` runs the check with each expert hearing only
    itself and records the routing it used; other tasks' long runs refuse the flags."""
    from badger_runtime.cli import main

    args = ("longrun", "--policy", "bandit-v5", "--task", "bandit", "--steps", "2000", "--episodes", "4",
            "--change-every", "300", "500", "--json")
    dense = run_cli(capsys, *args)
    alone = run_cli(capsys, *args, "--routing", "random", "--degree", "0")
    assert dense["routing"]["kind"] == "dense" and alone["routing"] == {**dense["routing"], "kind": "random",
                                                                       "degree": 0}
    assert alone["agent"] != dense["agent"]  # the alarm no longer travels: another run
    sparse = run_cli(capsys, *args, "--routing", "topk", "--candidates", "8", "--k", "4")  # as `serve --candidates`
    assert sparse["routing"] == {**dense["routing"], "kind": "topk", "candidates": 8, "k": 4}
    assert sparse["agent"] != dense["agent"] and sparse["finite"]
    assert main(["longrun", "--policy", "guessing-converge-v1", "--steps", "30", "--episodes", "1",
                 "--routing", "random"]) == 2
    assert "only the bandit long run" in capsys.readouterr().err
    assert main(["longrun", "--policy", "guessing-converge-v1", "--steps", "30", "--episodes", "1",
                 "--candidates", "4"]) == 2

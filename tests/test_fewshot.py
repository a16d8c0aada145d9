"""Online few-shot classification (tasks/fewshot.py): episodes, the membrane's grid, the loss,
the runtimes' parity, the command-line contract, the shipped policy, long runs, the demo."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

from badger_runtime.cli import main  # noqa: E402
from badger_runtime.engine import numpy_ops  # noqa: E402
from badger_runtime.evaluation import evaluate, run_episodes  # noqa: E402
from badger_runtime.membrane import Visibility  # noqa: E402
from badger_runtime.policy_card import load_policy  # noqa: E402
from badger_runtime.tasks import classification_data as cd  # noqa: E402
from badger_runtime.tasks import fewshot as fs  # noqa: E402
from .conftest import run_without_torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "policies" / "retired" / "fewshot-v1.onnx"  # retired (session 44): the handcrafted cell's reference
OPS = numpy_ops()


@pytest.fixture(scope="module")
def pol():
    return load_policy(SHIPPED)


def cfg(**kw) -> fs.FewShotConfig:
    return fs.FewShotConfig(**kw).validate()


def test_grid_visibility_deals_cells_out():
    v = Visibility("grid", 4, 6, period=2)  # 2 features (x2 kinds), 2 classes
    m = v.mask(5, 7)[0]
    # expert e: label slot 4 + e % 2, feature (e // 2) % 2 of both examples, slot 6 (outside) always
    assert m.astype(int).tolist() == [[1, 0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 0, 1, 1], [0, 1, 0, 1, 1, 0, 1],
                                      [0, 1, 0, 1, 0, 1, 1], [1, 0, 1, 0, 1, 0, 1]]
    assert Visibility.from_dict(v.to_dict()) == v
    old = {k: x for k, x in Visibility("cyclic", 1, 3).to_dict().items() if k != "period"}  # a card from before period
    assert Visibility.from_dict(old) == Visibility("cyclic", 1, 3)
    with pytest.raises(ValueError):
        Visibility("grid", 2, 4)  # no period


def test_episode_layout_and_observations():
    ep = fs.sample(np.random.default_rng(0), cfg(), 3, 4, 16, 10)
    F = 64
    assert ep.xs.shape == (10, 3, F) and ep.ys.shape == (10, 3) and ep.ys.max() < 4
    itf = ep.interface
    assert itf.parts == (("features", F), ("example", F), ("label", 4))
    assert itf.slot_addr.shape == (3, 2 * F + 4, 16) and itf.out_addr.shape == (3, 4, 16)
    # feature and example slots share their addresses, labels sit at the class (output) addresses
    np.testing.assert_array_equal(itf.slot_addr[:, :F, 2:], itf.slot_addr[:, F:2 * F, 2:])
    np.testing.assert_array_equal(itf.slot_addr[:, 2 * F:, 2:], itf.out_addr[:, :, 2:])
    o0, o3 = ep.observe(OPS, 0, None), ep.observe(OPS, 3, None)
    np.testing.assert_array_equal(o0[:, :F], ep.xs[0])
    assert not o0[:, F:].any()  # nothing labelled before the first step
    np.testing.assert_array_equal(o3[:, F:2 * F], ep.xs[2])
    np.testing.assert_array_equal(o3[:, 2 * F:].argmax(1), ep.ys[2])
    assert o3[:, 2 * F:].sum() == 3
    assert 0.0 <= ep.xs.min() and ep.xs.max() <= 1.0  # digits / 16


def test_labels_are_shuffled_per_episode_and_seeded():
    a = fs.sample(np.random.default_rng(1), cfg(classes_pool="heldout", split="all"), 64, 4, 16, 5)
    b = fs.sample(np.random.default_rng(1), cfg(classes_pool="heldout", split="all"), 64, 4, 16, 5)
    np.testing.assert_array_equal(a.xs, b.xs)
    np.testing.assert_array_equal(a.interface.slot_addr, b.interface.slot_addr)
    perms = {tuple(r) for r in a.state.classes}
    assert len(perms) > 10 and all(sorted(p) == [6, 7, 8, 9] for p in perms)  # held-out digits, shuffled
    c = fs.sample(np.random.default_rng(2), cfg(classes_pool="heldout", split="all"), 64, 4, 16, 5)
    assert not np.array_equal(a.xs, c.xs)


def test_sources_keep_classes_and_splits_apart():
    train = fs.source("digits", "train", "train")
    test = fs.source("digits", "all", "test")
    assert set(train.pool) == set(cd.DIGITS_TRAIN_CLASSES) and set(np.unique(train.y)) <= set(train.pool)
    assert len(test.pool) == 10
    aug = fs.source("digits", "train", "train", transforms=True)
    assert len(aug.pool) == 48 and len(aug.X) == 8 * len(train.X)


def test_online_standardisation_matches_and_continues():
    raw = np.random.default_rng(0).normal(3.0, 2.0, (30, 4, 5))
    full, _ = cd.standardize_stream(raw, None)
    np.testing.assert_allclose(full, cd.online_standardize(raw), atol=1e-6)
    a, st = cd.standardize_stream(raw[:11], None)
    b, _ = cd.standardize_stream(raw[11:], st)
    np.testing.assert_allclose(np.concatenate([a, b]), full, atol=1e-5)


def test_loss_in_torch_equals_the_reported_loss():
    torch = pytest.importorskip("torch")
    from badger_runtime.training.model import torch_ops

    ep = fs.sample(np.random.default_rng(0), cfg(dataset="iris"), 8, 3, 16, 4)
    out = np.random.default_rng(1).normal(0, 3, (8, 3)).astype(np.float32)
    t = ep.loss(torch_ops(), 2, torch.as_tensor(out)).numpy()
    m = ep.metrics(2, out)
    np.testing.assert_allclose(t, m["loss"], rtol=1e-5, atol=1e-5)
    assert m["correct"].tolist() == (out.argmax(1) == ep.ys[2]).astype(np.float32).tolist()


def test_streams_go_on_and_classes_change():
    c = cfg(dataset="wine", change_every=(5, 8))
    rng = np.random.default_rng(0)
    ep = fs.sample(rng, c, 4, 3, 16, 20)
    gaps = np.diff(np.flatnonzero(ep.jumps[:, 0]))
    assert ep.jumps[:, 0].sum() >= 2 and gaps.min() >= 5 and gaps.max() <= 8
    nxt = fs.extend(rng, c, ep, 35)
    assert nxt.t0 == 20 and nxt.xs.shape[0] == 15
    o = nxt.observe(OPS, 20, None)
    F = ep.xs.shape[-1]
    np.testing.assert_array_equal(o[:, F:2 * F], ep.xs[-1])  # the last example comes back labelled
    np.testing.assert_array_equal(o[:, 2 * F:].argmax(1), ep.ys[-1])


def test_report_keys_and_baselines_on_the_same_episodes(pol):
    task = dataclasses.replace(fs.FewShotTask.evaluation_config(pol.task), dataset="iris", baselines="fast", shots=3)
    r = evaluate(OPS, pol, pol.agent, task, dims=3, experts=12, episodes=16, seed=0, steps=9)
    assert len(r["accuracy_by_step"]) == 9 and set(r["online_accuracy"]) == set()
    assert set(r["baselines"]) == {"chance", "nearest_class_mean", "one_nearest_neighbour"}
    assert len(r["accuracy_by_shot"]) == fs.MAX_SHOT + 1 and r["accuracy_by_shot"][3] is None
    assert set(r["paired_online"]) == {"nearest_class_mean", "one_nearest_neighbour"}
    assert r["paired_online"]["nearest_class_mean"] == {}  # 9 steps: shorter than the first 10 examples


def test_paired_online_accuracy_by_hand():
    agent = np.array([[1, 0, 1], [1, 1, 0]] + [[0, 0, 0]] * 8 + [[1, 1, 1]] * 15, float)  # [T = 25, B = 3]
    other = np.zeros_like(agent)
    other[:, 0] = 1.0
    r = fs.paired_online(agent, other)
    assert set(r) == {"10", "25"}
    d10 = np.array([2 - 10, 1, 1]) / 10  # episode 0: 2 right against 10; episodes 1, 2: 1 right against 0
    assert r["10"]["diff"] == pytest.approx(d10.mean())
    assert r["10"]["sem"] == pytest.approx(d10.std(ddof=1) / np.sqrt(3))
    assert r["25"]["diff"] == pytest.approx(np.mean(np.array([17 - 25, 16, 16]) / 25))


@pytest.mark.parametrize("runtime", ["sharded", "actors"])
def test_runtimes_agree_with_the_engine(pol, runtime):
    task = dataclasses.replace(fs.FewShotTask.evaluation_config(pol.task), dataset="iris")
    kw = dict(dims=3, experts=12, episodes=2, seed=3, steps=5)
    ref = run_episodes(OPS, pol, pol.agent, task, **kw)
    got = run_episodes(OPS, pol, pol.agent, task, runtime=runtime, **kw)
    np.testing.assert_allclose(got.outputs, ref.outputs, atol=1e-4)
    np.testing.assert_array_equal(got.metrics["correct"], ref.metrics["correct"])


def test_cli_contract(pol, capsys):
    assert main(["eval", "--policy", str(SHIPPED), "--task", "fewshot", "--dataset", "iris", "--classes", "3",
                 "--experts", "12", "--steps", "8", "--episodes", "6", "--seed", "0", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["accuracy_by_step"]) == 8 and r["task"]["dataset"] == "iris"
    assert set(r["baselines"]) == {"chance", "nearest_class_mean", "one_nearest_neighbour",
                                   "online_logistic_regression"}
    assert all(len(v) == 8 for v in r["baselines"].values())


def test_shipped_policy_learns_held_out_digits(pol):
    """A seeded check: 4 digit classes never trained on, 20 steps; well above chance (0.25)."""
    task = fs.FewShotTask.evaluation_config(pol.task)
    r = evaluate(OPS, pol, pol.agent, dataclasses.replace(task, baselines="none"), dims=4, experts=256,
                 episodes=24, seed=0, steps=20)
    assert np.mean(r["accuracy_by_step"][8:]) > 0.6
    card = pol.card
    assert card["config"]["task"]["name"] == "fewshot" and "continual" in card
    # the card's lifetime follows its own 10,000-step check: continual only if the check passed
    life, passed = card["lifetime"], card["continual"]["passes_10000_steps"]
    assert life["kind"] == ("continual" if passed else "episodic")
    assert (life["horizon"] is None) if passed else (type(life["horizon"]) is int and life["horizon"] >= 1)
    # the card says plainly that it is handcrafted, not learned by the outer loop
    assert card["training"]["batches"] == 0 and card["training_command"].startswith("HANDCRAFTED")


def test_shipped_policy_runs_without_torch(tmp_path):
    """With torch not importable (a module that raises ImportError shadows it; setting
    sys.modules["torch"] = None instead breaks scipy's own torch probe), the shipped policy
    still evaluates on a dataset it never saw, and nothing imports torch."""
    r = run_without_torch(f"""
        import sys
        from badger_runtime.cli import main
        assert main(["eval", "--policy", {str(SHIPPED)!r}, "--task", "fewshot", "--dataset", "wine",
                     "--experts", "39", "--steps", "6", "--episodes", "4", "--option", "baselines=none",
                     "--json"]) == 0
        assert "torch" not in sys.modules
    """, tmp_path)
    assert json.loads(r.stdout.strip().splitlines()[-1])["task"]["dataset"] == "wine"


def test_long_run_reports_changes(pol, capsys):
    assert main(["longrun", "--policy", str(SHIPPED), "--dataset", "iris", "--classes", "3", "--experts", "12",
                 "--steps", "150", "--episodes", "3", "--jump-every", "30", "50", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["changes"] > 0 and set(r["accuracy_at"]) == {"20", "100"} and r["finite"]
    assert set(r["after_change"]["mean"]) == {"agent_never_reset", "agent_reset_at_changes",
                                              "nearest_class_mean_restarted"}


def test_fewshot_demo(tmp_path, capsys):
    assert main(["demo", "fewshot", "--quick", "--out", str(tmp_path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["demo"] == "fewshot" and Path(res["figures"][0]).is_file()
    assert len(res["numbers"]["episode"]) == res["numbers"]["steps"]


def _both_steps(shipped, policy):
    """One step of a shipped (ONNX) policy and of a torch policy on the same random state, inbox and
    reads: (h, heads) of the shipped graph, then of the torch policy, as numpy arrays."""
    import torch

    rng = np.random.default_rng(0)
    sp = shipped.spec
    h = np.tanh(rng.standard_normal((16, sp.hidden))).astype(np.float32)
    inbox = rng.standard_normal((16, sp.msg_dim)).astype(np.float32)
    sensed = rng.standard_normal((16, sp.sensed_dim)).astype(np.float32)
    got_h, got_heads = shipped.step(h, inbox, sensed)
    with torch.no_grad():
        ref_h, ref_heads = policy.step(torch.from_numpy(h), torch.from_numpy(inbox), torch.from_numpy(sensed))
    return got_h, got_heads, ref_h.numpy(), ref_heads.numpy()


def test_the_shipped_policy_is_the_handcrafted_init(tmp_path):
    """`badger train configs/fewshot.toml` (train.batches = 0) writes the handcrafted weights the
    shipped policy was exported from; the card says so."""
    pytest.importorskip("torch")
    from badger_runtime.config import load_experiment
    from badger_runtime.training.train import load_checkpoint, policy_from_checkpoint, train

    cfg = load_experiment(str(ROOT / "configs" / "fewshot.toml"))
    assert cfg.train.batches == 0 and cfg.train.init == "prototypes"
    summary = train(cfg, tmp_path, progress=False, final_eval=False, log=lambda *a: None)
    policy, _ = policy_from_checkpoint(load_checkpoint(tmp_path / "checkpoint.pt"))
    assert summary["batches"] == 0
    shipped = load_policy(SHIPPED)
    np.testing.assert_allclose(shipped.h0, policy.h0.detach().numpy())
    # the same step function: the shipped graph computes the handcrafted weights' GRU step and heads
    got_h, got_heads, ref_h, ref_heads = _both_steps(shipped, policy)
    np.testing.assert_allclose(got_h, ref_h, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_heads, ref_heads, rtol=1e-4, atol=1e-3)
    assert shipped.card["training"]["batches"] == 0 and "handcrafted" in shipped.card["training_command"]


@pytest.mark.parametrize("name", ["fewshot-v2", "fewshot-v3", "fewshot-v4", "fewshot-v6"])
def test_fresh_experts_hot_added_do_not_hurt_the_joinable_cell(name):
    """The product rule for the joinable cell (fewshot-v2, and fewshot-v3 / v4: learned readouts; fewshot-v6:
    a learned rule behind the same gate): as
    many fresh experts again at step 20 of 40 (4-way held-out digits, one expert per cell, then two)
    leave the accuracy over steps 31-40 within noise of the unchanged agent's, and the step after the
    join does not collapse (fewshot-v1 fell to chance there: its fresh experts' "not seen yet" scores
    took half of every class's weight); the same init without the seen-gated keys is hurt."""
    from badger_runtime.episodes import schedule

    pol = load_policy(name)
    task = dataclasses.replace(fs.FewShotTask.evaluation_config(pol.task), steps=40, baselines="none")
    kw = dict(dims=4, experts=256, episodes=48, seed=0, steps=40)
    base = run_episodes(OPS, pol, pol.agent, task, **kw).metrics["correct"]
    grown = run_episodes(OPS, pol, pol.agent, task, changes=schedule(20, 256, "fresh"), **kw).metrics["correct"]
    late_b, late_g = base[30:40].mean(), grown[30:40].mean()
    noise = 3 * base[30:40].mean(axis=0).std() / np.sqrt(base.shape[1])
    assert late_g >= late_b - noise, (late_g, late_b, noise)
    assert grown[21].mean() >= base[21].mean() - 0.15  # no collapse right after the join
    cloned = run_episodes(OPS, pol, pol.agent, task, changes=schedule(20, 256, "clone"), **kw).metrics["correct"]
    assert cloned[30:40].mean() >= late_b - noise  # a clone copies an expert of its own cell
    if name != "fewshot-v2":
        return
    v1 = load_policy("fewshot-v1")
    grown1 = run_episodes(OPS, v1, v1.agent, task, changes=schedule(20, 256, "fresh", allow_harmful=True),
                          **kw).metrics["correct"]
    assert grown1[21].mean() < 0.5  # the seen-gated keys are what makes the difference


@pytest.mark.parametrize("name, config, init", [("fewshot-v3", "fewshot_learned.toml", "prototypes_joinable"),
                                                ("fewshot-v4", "fewshot_counts.toml", "prototypes_joinable_counts")])
def test_a_learned_readout_on_the_joinable_cell(name, config, init):
    """fewshot-v3 = configs/fewshot_learned.toml, fewshot-v4 = configs/fewshot_counts.toml: a
    handcrafted joinable cell (its GRU step and every head but push_value exactly) with a push-value
    row the outer loop trained (300 batches); the card says how it was made."""
    pytest.importorskip("torch")
    from badger_runtime.config import load_experiment
    from badger_runtime.training.train import initial_policy

    cfg = load_experiment(str(ROOT / "configs" / config))
    assert cfg.train.trainable == ["heads:push_value"] and cfg.train.init == init
    start = initial_policy(cfg)
    pol = load_policy(name)
    assert pol.card["training"]["batches"] == cfg.train.batches == 300
    assert config in pol.card["training_command"]
    got_h, got_heads, ref_h, ref_heads = _both_steps(pol, start)
    np.testing.assert_allclose(got_h, ref_h, rtol=1e-4, atol=1e-4)
    pv = pol.spec.head_slices["push_value"]
    lo = pv.start
    same = np.ones(got_heads.shape[1], bool)
    same[pv] = False
    np.testing.assert_allclose(got_heads[:, same], ref_heads[:, same], rtol=1e-4, atol=1e-3)
    assert np.abs(got_heads[:, lo] - ref_heads[:, lo]).max() > 1e-3  # the trained row differs


def test_fewshot_v4_learned_a_graded_prior_over_a_class_count():
    """What the outer loop learned on fewshot-v4's longer count (docs/results.md): the same expert
    state with its class seen k = 1 .. 8 times scores lower the more examples it has, by steps that
    shrink with k (a one-example prototype is the noisiest), where fewshot-v3's count stopped at 3;
    the handcrafted readout has no such prior."""
    pytest.importorskip("torch")
    from badger_runtime.cluster.numpy_policy import NumpyPolicy, flatten
    from badger_runtime.config import load_experiment
    from badger_runtime.training.inits import count_prior
    from badger_runtime.training.train import initial_policy

    steps = count_prior(load_policy("fewshot-v4"))  # what one more example costs a class's score
    assert np.all(steps[:5] > 0), steps
    assert steps[0] > steps[2] > steps[4], steps
    init = initial_policy(load_experiment(str(ROOT / "configs" / "fewshot_counts.toml")))
    handcrafted = NumpyPolicy(init.spec, flatten(init.state_dict()))
    np.testing.assert_allclose(count_prior(handcrafted), 0.0, atol=1e-5)


def test_the_learned_readout_lifts_one_shot_accuracy_on_held_out_digits():
    """What the outer loop learned (docs/results.md, fewshot-v3): on held-out digits 6-9 (balanced
    streams, one expert per cell) the prediction on an example whose class was seen once is right
    more often than with the handcrafted readout it started from (fewshot-v2), and the accuracy over
    the episode does not fall. Seed 1 and 64 episodes: not the documented evaluation's draw."""
    from badger_runtime.tasks.classification_baselines import accuracy_by_shot

    out = {}
    for name in ("fewshot-v2", "fewshot-v3"):
        pol = load_policy(name)
        task = dataclasses.replace(fs.FewShotTask.evaluation_config(pol.task), shots=11, baselines="none")
        run = run_episodes(OPS, pol, pol.agent, task, dims=4, experts=256, episodes=64, seed=1, steps=44)
        correct = run.metrics["correct"] > 0.5
        ys = np.concatenate([ep.ys for ep in run.episodes], axis=1)
        out[name] = (accuracy_by_shot(correct, ys)[1], correct.mean())
    (one2, mean2), (one3, mean3) = out["fewshot-v2"], out["fewshot-v3"]
    assert one3 > one2 + 0.03, (one3, one2)
    assert mean3 >= mean2 - 0.01, (mean3, mean2)


def test_the_count_units_go_on_counting_and_change_nothing_else():
    """train.init = "prototypes_joinable_counts" (fewshot-v4's cell): the thermometer of a class's
    examples goes on past "three seen" (units n4 .. n8 turn +1 at the 4th .. 8th example of the class,
    and stay), and every other unit and head is fewshot-v2's cell's, step for step."""
    torch = pytest.importorskip("torch")
    from badger_runtime.config import load_experiment
    from badger_runtime.training.inits import _layout, count_units
    from badger_runtime.training.train import initial_policy

    root = ROOT / "configs"
    counts = initial_policy(load_experiment(str(root / "fewshot_counts.toml")))
    joinable = initial_policy(load_experiment(str(root / "fewshot_joinable.toml")))
    sp = counts.spec
    lay = _layout(sp.addr_dim, sp.hidden, seen_addr=True, counts=8)
    extra = [lay[name][0] for name in count_units(8)[3:]]
    same = list(range(joinable.spec.hidden - 1))  # v2's units (its last one is a spare)
    assert extra == list(range(joinable.spec.hidden - 1, joinable.spec.hidden + 4))  # after them
    rng = np.random.default_rng(0)
    h_c, h_j = counts.h0.detach()[None].clone(), joinable.h0.detach()[None].clone()
    inbox = torch.zeros(1, sp.msg_dim)
    n = 0
    for t in range(20):  # nine examples of the class: every count unit turns +1
        sensed = torch.from_numpy(rng.standard_normal((1, sp.sensed_dim)).astype(np.float32))
        label = t > 0 and t % 2 == 0  # the label slot reads 1: the last example was of this cell's class
        sensed[0, 0] = float(label)
        with torch.no_grad():
            h_c, heads_c = counts.step(h_c, inbox, sensed)
            h_j, heads_j = joinable.step(h_j, inbox, sensed)
        n += label
        got = (h_c[0, extra] > 0).numpy()
        assert got.tolist() == [n >= k for k in range(4, 9)], (t, n, h_c[0, extra])
        np.testing.assert_allclose(h_c[0, same], h_j[0, same], atol=1e-5)
        np.testing.assert_allclose(heads_c, heads_j, atol=1e-4)
    assert n == 9 and bool((h_c[0, extra] > 0).all())


def test_loss_groups_are_the_shots_of_the_true_class_seen_before():
    """The few-shot episode's loss groups (``train.guard_weight``) are the report's shot counts:
    ``classification_baselines.shots_before``, capped at MAX_SHOT; -1 where no loss is counted."""
    from badger_runtime.tasks.classification_baselines import shots_before

    task = fs.FewShotTask(cfg(dataset="digits", steps=30, loss_unseen=False))
    ep = task.sample(np.random.default_rng(3), 5, dims=2, experts=8, steps=30, addr_dim=8)
    groups = np.stack([ep.loss_groups(t) for t in range(30)])
    want = np.minimum(shots_before(ep.ys), fs.MAX_SHOT)
    np.testing.assert_array_equal(groups, np.where(want == 0, -1, want))
    assert groups.max() == fs.MAX_SHOT and (groups == -1).sum() == 2 * 5  # two classes' first examples
    counted = dataclasses.replace(ep, loss_unseen=True)
    np.testing.assert_array_equal(np.stack([counted.loss_groups(t) for t in range(30)]), want)


def test_the_guard_starts_at_zero_and_holds_the_policy_to_the_initial_one_per_group(tmp_path):
    """``train.guard_weight``: each batch, the initial policy plays the same episodes; the guard term is
    zero on the first batch (the policy is still the initial one: same wiring, same losses), and the
    run logs it; growing agents are refused (test_model: tasks without loss groups)."""
    torch = pytest.importorskip("torch")
    from badger_runtime.config import ConfigError, load_experiment
    from badger_runtime.training.train import guard_loss, train

    # guard_loss: sum over groups of relu(mean difference); groups the policy wins cost nothing
    losses = torch.tensor([[1.0, 2.0], [3.0, 0.5]], requires_grad=True)
    ref = torch.tensor([[1.5, 1.0], [1.0, 1.0]])
    groups = np.array([[1, 2], [2, -1]])
    g = guard_loss(losses, ref, groups)  # group 1: -0.5 -> 0; group 2: mean(1.0, 2.0) = 1.5; -1: none
    assert float(g.detach()) == pytest.approx(1.5)
    g.backward()
    np.testing.assert_allclose(losses.grad.numpy(), [[0.0, 0.5], [0.5, 0.0]])
    # smoothed: a group counts (its plain mean difference, not a relu) while its moving average is > 0
    smoothed = {1: 1.0, 2: -9.0}
    g = guard_loss(losses, ref, groups, smoothed, 0.5)  # 1: 0.5 * 1 + 0.5 * -0.5 > 0; 2: 0.5 * -9 + 0.75 < 0
    assert smoothed == pytest.approx({1: 0.25, 2: -3.75}) and float(g.detach()) == pytest.approx(-0.5)
    assert float(guard_loss(losses, ref, groups, {1: -1.0, 2: -9.0}, 0.9).detach()) == 0.0

    c = load_experiment(str(ROOT / "configs" / "fewshot_counts.toml"))
    c.task.experts, c.task.steps, c.task.classes_pool = [16, 16], 12, "train"
    c.train.batches, c.train.batch_size, c.train.log_every, c.train.ckpt_every = 2, 4, 1, 2
    c.train.guard_weight, c.train.lr = 1.0, 3e-2
    for smoothing in (0.0, 0.9):
        c.train.guard_smoothing = smoothing
        train(c, tmp_path / str(smoothing), progress=False, final_eval=False, log=lambda *a: None)
        rows = [json.loads(line) for line in (tmp_path / str(smoothing) / "metrics.jsonl").read_text().splitlines()]
        assert rows[0]["guard"] == 0.0 and np.isfinite(rows[1]["guard"])
        assert ("guard_by_group" in rows[1]) == bool(smoothing)
    c.train.grow_prob = 0.5
    with pytest.raises(ConfigError, match="guard_weight"):
        c.validate()


def test_the_wiring_init_keeps_the_cells_wiring_and_leaves_its_rule_random():
    """train.init = "prototype_wiring" (configs/fewshot_rule.toml): the read queries, the class address
    in the state and the push key are the handcrafted cell's; the other units' GRU rows are the default
    random draw of the same seed, the push value and the message heads are zero, so every class scores
    0 at first (the loss at chance) and what the outer loop trains is the learning rule."""
    torch = pytest.importorskip("torch")
    from badger_runtime.config import load_experiment
    from badger_runtime.training.inits import _layout
    from badger_runtime.training.train import initial_policy

    cfg = load_experiment(str(ROOT / "configs" / "fewshot_rule.toml"))
    assert cfg.train.init == "prototype_wiring"
    wired = initial_policy(cfg)
    cfg.train.init = ""
    rand = initial_policy(cfg)  # the same seed's default draw
    cfg.train.init = "prototypes"
    hand = initial_policy(cfg)
    spec, H = wired.spec, wired.spec.hidden
    addr = _layout(spec.addr_dim, H)["addr"]
    rows = [g * H + u for g in range(3) for u in addr]
    others = [g * H + u for g in range(3) for u in range(H) if u not in addr]
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        w, r, h = (getattr(p.cell, name).detach() for p in (wired, rand, hand))
        torch.testing.assert_close(w[rows], h[rows])
        torch.testing.assert_close(w[others], r[others])
    where = spec.head_slices
    for head in ("read_query", "push_key"):
        torch.testing.assert_close(wired.heads.weight[where[head]], hand.heads.weight[where[head]])
        torch.testing.assert_close(wired.heads.bias[where[head]], hand.heads.bias[where[head]])
    for head in ("push_value", "query", "key", "value", "vote"):
        assert not wired.heads.weight[where[head]].any() and not wired.heads.bias[where[head]].any()
    assert hand.heads.weight[where["push_value"]].abs().sum() > 0  # the handcrafted rule scores; this one not yet


def test_the_seen_gate_surgery_keeps_the_rule_and_gates_the_push_key_on_two_examples():
    """train.init = "seen_gate" with train.init_from (configs/fewshot_rule_gated.toml): the source's units
    compute exactly what they computed (none reads the new ones), its heads are unchanged but for the push
    key, and the new units count the class's examples (the label slot head 0 reads) and add the class
    address x 8 to the push key from the step after the second example on: 0 before."""
    torch = pytest.importorskip("torch")
    import dataclasses

    from badger_runtime.config import ConfigError, load_experiment
    from badger_runtime.training.inits import seen_gate
    from badger_runtime.training.model import ExpertPolicy
    from badger_runtime.training.train import initial_policy

    cfg = load_experiment(str(ROOT / "configs" / "fewshot_rule.toml"))
    source = initial_policy(cfg)  # the wiring, its rule random: any weights on it will do
    src = source.spec
    with pytest.raises(ConfigError, match="hidden = 52 \\+ 17"):
        seen_gate(source, ExpertPolicy(dataclasses.replace(src, hidden=60)))
    gated = seen_gate(source, ExpertPolicy(dataclasses.replace(src, hidden=src.hidden + 17)))
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init="seen_gate"))
    with pytest.raises(ConfigError, match="set train.init_from too"):
        initial_policy(bad)
    bad.train.init, bad.train.init_from = "prototypes", "fewshot-v5"
    with pytest.raises(ConfigError, match="only a surgery"):
        initial_policy(bad)
    H0, A = src.hidden, src.addr_dim
    pk = src.head_slices["push_key"]
    g = torch.Generator().manual_seed(0)
    address = torch.randn(A - 2, generator=g)
    labels = [0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]  # l: the example before each step was of the class?
    h = torch.tanh(gated.h0)[None]
    with torch.no_grad():
        for t, l in enumerate(labels):
            inbox = torch.randn(1, src.msg_dim, generator=g)
            sensed = torch.randn(1, src.sensed_dim, generator=g)
            sensed[0, 0] = l  # head 0's read value
            sensed[0, 1 + 2:1 + A] = address  # head 0's read address, past its kind flags
            h_src, heads_src = source(h[:, :H0], inbox, sensed)
            h_new, heads = gated(h, inbox, sensed)
            torch.testing.assert_close(h_new[:, :H0], h_src)
            rest = [i for i in range(heads.shape[1]) if not pk.start <= i < pk.stop]
            torch.testing.assert_close(heads[:, rest], heads_src[:, rest])
            started, seen, n2 = h_new[0, H0:H0 + 3].tolist()
            copy = h_new[0, H0 + 3:]
            shown = sum(labels[1:t + 1])  # the first step's read is blind: not counted
            assert started == pytest.approx(1.0, abs=1e-4)
            assert seen == pytest.approx(1.0 if shown >= 1 else -1.0, abs=1e-4), t
            assert n2 == pytest.approx(1.0 if shown >= 2 else -1.0, abs=1e-4), t
            n2_before = bool(h[0, H0 + 2] > 0)
            torch.testing.assert_close(copy, torch.tanh(0.25 * address) if n2_before else torch.zeros_like(address),
                                       atol=1e-4, rtol=1e-3)
            torch.testing.assert_close(heads[0, pk.start + 2:pk.stop] - heads_src[0, pk.start + 2:pk.stop], 8.0 * copy)
            h = h_new


def test_fewshot_v5_is_the_wiring_with_a_learned_rule_and_beats_ncm_at_one_shot():
    """fewshot-v5 (configs/fewshot_rule.toml, then fewshot_rule_continual.toml): the outer loop trained
    the GRU from random weights on the handcrafted wiring (its read queries and push keys are the
    wiring's exactly; its recurrent weights are far from both the random draw and the handcrafted cell),
    and on held-out digits (features standardised online, as trained) the prediction on an example
    whose class was seen once is right more often than nearest class mean's on the same features.
    Seed 1 and 48 episodes: not the documented evaluation's draw."""
    torch = pytest.importorskip("torch")
    from badger_runtime.config import load_experiment
    from badger_runtime.tasks.classification_baselines import accuracy_by_shot, nearest_class_mean
    from badger_runtime.training.model import ExpertPolicy
    from badger_runtime.training.train import initial_policy, load_initial_weights

    pol = load_policy("fewshot-v5")
    assert "fewshot_rule.toml" in pol.card["training_command"]
    assert "fewshot_rule_continual.toml" in pol.card["training_command"]
    cfg = load_experiment(str(ROOT / "configs" / "fewshot_rule.toml"))
    wired = initial_policy(cfg)
    cfg.train.init = "prototypes"
    hand = initial_policy(cfg)
    shipped = ExpertPolicy(wired.spec)
    load_initial_weights(shipped, "fewshot-v5")
    where = wired.spec.head_slices
    for head in ("read_query", "push_key"):
        torch.testing.assert_close(shipped.heads.weight[where[head]], wired.heads.weight[where[head]])
    learned = shipped.cell.weight_hh.detach()
    for other in (wired, hand):
        assert (learned - other.cell.weight_hh.detach()).abs().mean() > 0.02
    task = dataclasses.replace(fs.FewShotTask.evaluation_config(pol.task), shots=11, baselines="none")
    assert task.scaling == "online"
    run = run_episodes(OPS, pol, pol.agent, task, dims=4, experts=256, episodes=48, seed=1, steps=44)
    correct = run.metrics["correct"] > 0.5
    xs = np.concatenate([ep.xs for ep in run.episodes], axis=1)
    ys = np.concatenate([ep.ys for ep in run.episodes], axis=1)
    ncm = nearest_class_mean(xs, ys, 4, 1)["correct"]
    one, one_ncm = accuracy_by_shot(correct, ys)[1], accuracy_by_shot(ncm, ys)[1]
    assert one > one_ncm + 0.05, (one, one_ncm)
    assert correct.mean() > ncm.mean(), (correct.mean(), ncm.mean())


def test_fewshot_v6_is_fewshot_v5_with_the_seen_gate():
    """fewshot-v6 = configs/fewshot_rule_gated.toml: no outer-loop step, the seen-gate surgery on the
    shipped fewshot-v5's weights, exactly; in an agent whose experts all started together it predicts
    what fewshot-v5 predicts (a class's experts count the same examples, so the gate weighs them alike;
    48 episodes of held-out digits, seed 1: at most 2 % of the predictions differ), and its card says
    fresh experts are welcome (the joinable-cell test above holds it to that)."""
    torch = pytest.importorskip("torch")
    from badger_runtime.config import load_experiment
    from badger_runtime.training.train import initial_policy, source_policy

    cfg = load_experiment(str(ROOT / "configs" / "fewshot_rule_gated.toml"))
    assert (cfg.train.init, cfg.train.init_from, cfg.train.batches) == ("seen_gate", "fewshot-v5", 0)
    made, shipped = initial_policy(cfg).state_dict(), source_policy("fewshot-v6").state_dict()
    for k in made:
        torch.testing.assert_close(shipped[k], made[k], rtol=0, atol=1e-6)
    v5, v6 = load_policy("fewshot-v5"), load_policy("fewshot-v6")
    assert v6.card["growth"]["fresh"] == "ok" and v5.card["growth"]["fresh"] == "hurts"
    task = dataclasses.replace(fs.FewShotTask.evaluation_config(v5.task), baselines="none")
    kw = dict(dims=4, experts=256, episodes=48, seed=1, steps=40)
    out5 = run_episodes(OPS, v5, v5.agent, task, **kw).outputs.argmax(-1)
    out6 = run_episodes(OPS, v6, v6.agent, task, **kw).outputs.argmax(-1)
    assert (out5 != out6).mean() <= 0.02, (out5 != out6).mean()


def test_the_long_run_probes_an_episodic_few_shot_policy(tmp_path):
    """`badger longrun` on a few-shot policy whose card is episodic (a fresh export, before its continual check
    decides): the long run and its reset comparison (``after`` = 40 steps, past a 30-step horizon) both run past
    the horizon as a probe, instead of the comparison stopping at it."""
    from .conftest import copy_policy

    episodic = {"kind": "episodic", "horizon": 30, "why": "a test"}
    pol = load_policy(copy_policy(SHIPPED, tmp_path, "episodic", lambda card: card.update(lifetime=episodic)))
    r = fs.longrun_report(pol, steps=120, episodes=2, seed=0, change_every=(40, 60), checkpoints=(20, 100), full=False)
    assert r["steps"] == 120 and r["changes"] >= 2
    assert 0.0 <= r["after_change"]["mean"]["agent_reset_at_changes"] <= 1.0

"""The torch model: shapes, invariances, gradients, a tiny training run, checkpoints."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from badger_runtime.config import ConfigError
from badger_runtime.rollout import Wiring, rollout, sample_wiring
from badger_runtime.tasks import guessing
from badger_runtime.training.model import ExpertPolicy, torch_ops
from badger_runtime.training.train import load_checkpoint, policy_from_checkpoint, train

from .conftest import tiny_experiment


def _episode(cfg, d, n, b=8, seed=0, feedback=None):
    rng = np.random.default_rng(seed)
    task = cfg.task if feedback is None else type(cfg.task)(**{**cfg.task.__dict__, "feedback": feedback})
    ep = guessing.sample(rng, task, b, d, cfg.agent.policy.addr_dim)
    return ep, sample_wiring(rng, cfg.agent, b, n)


@pytest.mark.parametrize("d, n", [(1, 1), (3, 5), (10, 2), (4, 40)])
@pytest.mark.parametrize("feedback", ["scalar", "per_dim", "one_expert"])
def test_any_number_of_experts_and_dims(d, n, feedback):
    cfg = tiny_experiment()
    pol = ExpertPolicy(cfg.agent.policy)
    ep, w = _episode(cfg, d, n, feedback=feedback)
    with torch.no_grad():
        out = rollout(torch_ops(), pol, cfg.agent, ep, w, steps=5)
    assert out.outputs.shape == (5, 8, d) and out.losses.shape == (5, 8)
    assert torch.isfinite(out.outputs).all()
    assert out.state.h.shape == (8, n, cfg.agent.policy.hidden)


@pytest.mark.parametrize("routing", ["dense", "topk", "homogeneous"])
def test_outputs_do_not_depend_on_expert_order(routing):
    cfg = tiny_experiment()
    cfg.agent.routing.kind = routing
    cfg.agent.routing.k = 3
    pol = ExpertPolicy(cfg.agent.policy)
    ep, w = _episode(cfg, 3, 6)
    perm = np.random.default_rng(1).permutation(6)
    w2 = Wiring(w.noise[:, perm], None, w.can_sense, w.can_push, w.ids[:, perm])
    with torch.no_grad():
        a = rollout(torch_ops(), pol, cfg.agent, ep, w, steps=6)
        b = rollout(torch_ops(), pol, cfg.agent, ep, w2, steps=6)
    assert torch.allclose(a.outputs, b.outputs, atol=1e-5)
    assert torch.allclose(a.state.h[:, perm], b.state.h, atol=1e-5)
    # and a different wiring does change the outcome (the test can fail)
    w3 = Wiring(w.noise[:, ::-1] * 0.3, None, w.can_sense, w.can_push, w.ids)
    with torch.no_grad():
        c = rollout(torch_ops(), pol, cfg.agent, ep, w3, steps=6)
    assert not torch.allclose(a.outputs, c.outputs, atol=1e-5)


def test_gradients_reach_every_shared_weight():
    cfg = tiny_experiment()
    cfg.agent.agreement.rounds = 2
    pol = ExpertPolicy(cfg.agent.policy)
    ep, w = _episode(cfg, 3, 4)
    out = rollout(torch_ops(), pol, cfg.agent, ep, w, steps=4)
    out.losses.mean().backward()
    for name, p in pol.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_state_stays_bounded_whatever_the_input():
    cfg = tiny_experiment()
    pol = ExpertPolicy(cfg.agent.policy)
    with torch.no_grad():
        for p in pol.parameters():
            p.mul_(50.0)  # a wild policy
        h = torch.rand(64, cfg.agent.policy.hidden) * 2 - 1
        for _ in range(50):
            h, _ = pol(h, torch.randn(64, cfg.agent.policy.msg_dim) * 1e4,
                       torch.randn(64, cfg.agent.policy.sensed_dim) * 1e4)
    assert torch.all(h.abs() <= 1.0)


def test_tiny_training_lowers_the_loss(tiny_run):
    out, summary = tiny_run
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in rows] == [10, 20, 30]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert summary["sec_per_batch"] > 0


def test_checkpoint_round_trip_and_resume(tiny_run, tmp_path):
    out, _ = tiny_run
    ck = load_checkpoint(out / "checkpoint.pt")
    pol, cfg = policy_from_checkpoint(ck)
    assert ck["batch"] == 30 and cfg.name == "tiny"
    ref = ExpertPolicy(cfg.agent.policy)
    ref.load_state_dict(ck["model"])
    x = (torch.zeros(2, cfg.agent.policy.hidden), torch.ones(2, cfg.agent.policy.msg_dim),
         torch.ones(2, cfg.agent.policy.sensed_dim))
    assert torch.equal(pol(*x)[1], ref(*x)[1])
    # resuming a finished run with more batches continues where it stopped
    import shutil

    run = tmp_path / "resume"
    shutil.copytree(out, run)
    cfg2 = tiny_experiment()
    with pytest.raises(ConfigError, match="another config"):
        cfg2.train.lr = 1.0
        train(cfg2, run, resume=True, progress=False, final_eval=False, log=lambda *a: None)


@pytest.mark.parametrize("continue_prob", [0.0, 0.9])
def test_resume_gives_the_same_weights_as_one_run(tmp_path, continue_prob):
    """Bit for bit, agents kept alive between batches included (with continue_prob the resumed run started fresh
    agents where the other went on, and every later draw shifted: 0.045 apart after 6 batches)."""
    cfg = tiny_experiment()
    cfg.train.batches, cfg.train.ckpt_every, cfg.train.log_every = 8, 4, 4
    cfg.train.continue_prob = continue_prob
    train(cfg, tmp_path / "one", progress=False, final_eval=False, log=lambda *a: None)
    cfg_half = tiny_experiment()
    cfg_half.train.batches, cfg_half.train.ckpt_every, cfg_half.train.log_every = 8, 4, 4
    cfg_half.train.continue_prob = continue_prob
    # stop after 4 batches by training a copy whose checkpoint we then resume
    import badger_runtime.training.train as T

    class Stop(Exception):
        pass

    orig = T._atomic_save

    def save_then_stop(obj, path):
        orig(obj, path)
        if obj["batch"] == 4:
            raise Stop

    T._atomic_save = save_then_stop
    try:
        with pytest.raises(Stop):
            train(cfg_half, tmp_path / "two", progress=False, final_eval=False, log=lambda *a: None)
    finally:
        T._atomic_save = orig
    with open(tmp_path / "two" / "metrics.jsonl", "a") as f:  # what a run that stopped at batch 6 had logged
        f.write('{"batch": 6, "loss": 0.5}\n')
    train(cfg_half, tmp_path / "two", resume=True, progress=False, final_eval=False, log=lambda *a: None)
    a = load_checkpoint(tmp_path / "one" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "two" / "checkpoint.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in rows] == [4, 8]  # the row logged after the checkpoint is not repeated


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(ConfigError, match="not a badger checkpoint"):
        load_checkpoint(other)


def test_training_with_growing_and_continued_agents(tmp_path):
    """Experts added mid-episode (fresh or cloned) and agents living across batches train without error,
    and the gradient flows through the growth."""
    cfg = tiny_experiment()
    cfg.train.batches, cfg.train.grow_prob, cfg.train.continue_prob, cfg.train.tbptt = 6, 1.0, 0.5, 3
    cfg.train.log_every = cfg.train.ckpt_every = 3
    train(cfg, tmp_path, progress=False, final_eval=False, log=lambda *a: None)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)


def test_clone_draw_per_episode_gives_each_episode_its_own_sources(tmp_path, monkeypatch):
    """``train.clone_draw = "episode"``: a grown batch's clones copy, in each episode, an expert that episode drew
    ([B, n] sources, as a deployed agent draws); the default "batch" draws one [n] for every episode (the shipped
    recipes); anything else is refused."""
    from badger_runtime.engine import Agent

    seen = []
    real = Agent.add_experts

    def spy(self, n, init=None, source=None, sources=None, **kw):
        seen.append(None if sources is None else np.asarray(sources))
        return real(self, n, init, source, sources, **kw)

    monkeypatch.setattr(Agent, "add_experts", spy)
    for draw in ("episode", "batch"):
        cfg = tiny_experiment()
        cfg.train.batches, cfg.train.grow_prob, cfg.train.grow_init, cfg.train.clone_draw = 3, 1.0, "clone", draw
        cfg.train.log_every = cfg.train.ckpt_every = 3
        seen.clear()
        train(cfg.validate(), tmp_path / draw, progress=False, final_eval=False, log=lambda *a: None)
        assert len(seen) == 3
        for s in seen:
            assert s.ndim == (2 if draw == "episode" else 1)
        if draw == "episode":
            assert seen[0].shape[0] == cfg.train.batch_size and len({tuple(r) for r in seen[0]}) > 1
    cfg.train.clone_draw = "agent"
    with pytest.raises(ConfigError, match="clone_draw"):
        cfg.validate()


def _handcrafted():
    """Shipped policies with no outer-loop step (``train.batches = 0``: a structured ``train.init`` is the policy)."""
    out = []
    for card in sorted(Path(__file__).resolve().parents[1].joinpath("policies").rglob("*.json")):  # the retired too
        c = json.loads(card.read_text())
        if c["config"]["train"].get("batches") == 0:
            out.append(card)
    return out


@pytest.mark.parametrize("card", _handcrafted(), ids=lambda p: p.stem)
def test_every_handcrafted_policy_is_remade_by_its_recorded_command(card, tmp_path):
    """The training command a handcrafted policy's card records (a config, its ``--set`` overrides, no outer-loop
    step) makes the shipped weights again, bit for bit: ``train.init`` (training/inits.py: prototypes, arm
    indices, the seen gate, ...) still writes what was shipped."""
    import re

    import onnx
    from onnx import numpy_helper

    from badger_runtime.config import load_experiment
    from badger_runtime.training.export import export

    command = json.loads(card.read_text())["training_command"]
    m = re.search(r"badger train (configs/\S+\.toml)((?: --\S+ \S+)*)", command)
    assert m, command
    sets = re.findall(r"--set (\S+)", m.group(2))
    cfg = load_experiment(str(Path(__file__).resolve().parents[1] / m.group(1)), sets)
    assert cfg.train.batches == 0
    train(cfg, tmp_path, progress=False, final_eval=False, log=lambda *a: None)
    export(tmp_path / "checkpoint.pt", tmp_path / "remade.onnx")

    def weights(path):
        return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}

    remade, shipped = weights(tmp_path / "remade.onnx"), weights(card.with_suffix(".onnx"))
    assert remade.keys() == shipped.keys()
    for k in shipped:
        assert np.array_equal(remade[k], shipped[k]), k


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_checkpoint_is_refused_or_used_whole(tiny_run, tmp_path_factory, data):
    """One entry of a training checkpoint, at any depth (its weights, optimizer state, generator states, counters,
    config), replaced by a damaged value: ``policy_from_checkpoint`` (``badger export``) and a resumed run raise
    ConfigError naming the entry, or go on as with the intact checkpoint; nothing else escapes (a null model
    raised TypeError, a damaged optimizer state or generator state whatever torch or numpy raise)."""
    import copy
    import shutil

    from badger_runtime.training.train import policy_from_checkpoint

    from .conftest import damage_one_entry, tiny_experiment

    ck = load_checkpoint(tiny_run[0] / "checkpoint.pt")
    ck = copy.deepcopy(ck)

    def as_stored(real, value):  # an array where a tensor was stored is sometimes a tensor itself
        if isinstance(real, torch.Tensor) and isinstance(value, np.ndarray) and data.draw(st.booleans()):
            return torch.from_numpy(np.ascontiguousarray(value))
        return value

    damage_one_entry(data, ck, to_value=lambda r: r.numpy() if isinstance(r, torch.Tensor) else r,
                     from_value=as_stored)
    try:
        policy_from_checkpoint(ck)
    except ConfigError:
        pass
    run = tmp_path_factory.mktemp("resume")
    shutil.copy(tiny_run[0] / "config.json", run / "config.json")
    torch.save(ck, run / "checkpoint.pt")
    try:
        train(tiny_experiment(), run, resume=True, progress=False, final_eval=False, log=lambda *a: None)
    except ConfigError:
        pass


@pytest.mark.parametrize("key, value, message", [
    ("model", None, "its model cannot be loaded"), ("batch", np.zeros(2), "batch count"),
    ("wall_seconds", float("nan"), "wall_seconds"), ("outer", "sgd", "outer loop"),
    ("format", np.zeros(2), "not a badger"), ("config", None, "map of settings")])
def test_badger_export_refuses_a_damaged_checkpoint_with_the_reason(tiny_run, tmp_path, key, value, message):
    from badger_runtime.training.export import export

    ck = load_checkpoint(tiny_run[0] / "checkpoint.pt")
    ck[key] = value
    torch.save(ck, tmp_path / "checkpoint.pt")
    with pytest.raises(ConfigError, match=message):
        export(tmp_path / "checkpoint.pt", tmp_path / "p.onnx")
    assert not (tmp_path / "p.onnx").exists() and not (tmp_path / "p.json").exists()


def test_no_final_evaluation_with_eval_episodes_0(tmp_path):
    cfg = tiny_experiment()
    cfg.train.batches, cfg.train.eval_episodes = 1, 0
    summary = train(cfg.validate(), tmp_path, progress=False, log=lambda *a: None)
    assert "eval" not in summary and (tmp_path / "checkpoint.pt").exists()


def test_log_floor_makes_the_objective_the_log_of_each_steps_error(tmp_path):
    """``train.log_floor``: the batch's objective is log(error + floor) at each step, weighed as before (here the
    last step only, so each batch's loss is log of its reported last-step error + floor); 0 keeps the error."""
    for floor in (1e-3, 0.0):
        cfg = tiny_experiment()
        cfg.train.batches, cfg.train.objective, cfg.train.log_floor = 3, "last", floor
        cfg.train.log_every = cfg.train.ckpt_every = 1
        train(cfg.validate(), tmp_path / str(floor), progress=False, final_eval=False, log=lambda *a: None)
        rows = [json.loads(l) for l in (tmp_path / str(floor) / "metrics.jsonl").read_text().splitlines()]
        want = [np.log(r["final_loss"] + floor) if floor else r["final_loss"] for r in rows]
        np.testing.assert_allclose([r["loss"] for r in rows], want, rtol=1e-5)


def test_trainable_heads_by_name_train_those_rows_only(tmp_path):
    """``train.trainable = ["heads:push_value"]`` changes the push-value rows of the heads layer and
    nothing else; a prefix entry still trains whole parameters; an unknown head is refused."""
    cfg = tiny_experiment()
    cfg.train.batches, cfg.train.trainable = 4, ["heads:push_value", "cell.bias_hh"]
    cfg.train.log_every = cfg.train.ckpt_every = 4
    from badger_runtime.training.train import initial_policy

    before = initial_policy(cfg).state_dict()
    train(cfg, tmp_path, progress=False, final_eval=False, log=lambda *a: None)
    after = load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    pv = cfg.agent.policy.head_slices["push_value"]
    lo, hi = pv.start, pv.stop
    for name in before:
        changed = (after[name] != before[name])
        if name in ("heads.weight", "heads.bias"):
            rows = changed.reshape(changed.shape[0], -1).any(dim=1)
            assert rows[lo:hi].any() and not rows[:lo].any() and not rows[hi:].any(), name
        elif name == "cell.bias_hh":
            assert changed.any()
        else:
            assert not changed.any(), name
    cfg.train.trainable = ["heads:no_such_head"]
    with pytest.raises(ConfigError, match="no head 'no_such_head'"):
        train(cfg, tmp_path / "bad", progress=False, final_eval=False, log=lambda *a: None)


def test_the_guard_needs_a_task_with_loss_groups(tmp_path):
    """``train.guard_weight`` on the guessing game (no loss groups) is refused with the reason."""
    cfg = tiny_experiment()
    cfg.train.batches, cfg.train.guard_weight = 1, 1.0
    with pytest.raises(ConfigError, match="no loss groups"):
        train(cfg, tmp_path, progress=False, final_eval=False, log=lambda *a: None)


def test_grow_adds_experts_to_running_agents():
    from badger_runtime.rollout import grow, initial_state

    cfg = tiny_experiment()
    pol = ExpertPolicy(cfg.agent.policy)
    ep, w = _episode(cfg, 3, 4)
    res = rollout(torch_ops(), pol, cfg.agent, ep, w, steps=3)
    rng = np.random.default_rng(0)
    w2, st2 = grow(torch_ops(), pol, cfg.agent, rng, w, res.state, 2, np.array([1, 1]))
    assert w2.n_experts == 6 and st2.h.shape[1] == 6
    assert torch.equal(st2.h[:, 4], res.state.h[:, 1]) and torch.equal(st2.h[:, 5], res.state.h[:, 1])
    w3, st3 = grow(torch_ops(), pol, cfg.agent, rng, w2, st2, 3, None)
    fresh = initial_state(torch_ops(), pol, w3)
    assert torch.allclose(st3.h[:, 6:], fresh.h[:, 6:]) and float(st3.heads[:, 6:].detach().abs().sum()) == 0
    out = rollout(torch_ops(), pol, cfg.agent, ep, w3, steps=2, state=st3, prev_output=res.outputs[-1],
                  t0=3)
    out.losses.mean().backward()
    assert pol.h0.grad is not None and float(pol.h0.grad.abs().sum()) > 0


def test_vote_training_teaches_votes_to_predict_settled_messages(tmp_path):
    """With train.vote_weight the 'done' votes learn their target (the expert's message settled)."""
    from badger_runtime import agreement

    cfg = tiny_experiment()
    cfg.agent.agreement.rounds, cfg.agent.agreement.eps = 3, 0.05
    cfg.train.rounds, cfg.train.vote_weight, cfg.train.batches = (3, 3), 20.0, 90
    cfg.train.log_every = cfg.train.ckpt_every = 30

    def vote_loss_of(policy):
        ep, w = _episode(cfg, 3, 4, b=32, seed=7)
        with torch.no_grad():
            out = rollout(torch_ops(), policy, cfg.agent, ep, w, steps=6, with_vote_loss=True)
        return float(out.vote_loss)

    before = vote_loss_of(ExpertPolicy(cfg.agent.policy))
    train(cfg, tmp_path, progress=False, final_eval=False, log=lambda *a: None)
    pol, _ = policy_from_checkpoint(load_checkpoint(tmp_path / "checkpoint.pt"))
    after = vote_loss_of(pol)
    assert after < 0.7 * before
    ops = torch_ops()
    change = agreement.message_change(ops, torch.zeros(1, 2, 3), torch.tensor([[[0.01] * 3, [0.2] * 3]]))
    y = agreement.vote_target(ops, cfg.agent.agreement, change)
    assert y.tolist() == [[1.0, 0.0]]


# ---- the torch namespace's fast paths equal the generic math ---------------------------------------

def test_torch_softmax_equals_the_generic_one():
    """TorchOps.softmax (torch's fused kernel) = xp.softmax's composition, masks and all-masked rows too."""
    from badger_runtime import xp

    ops = torch_ops()
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 20, 20, generator=g, requires_grad=True)  # fused (>= 16 entries) and composed (< 16)
    mask = torch.rand(3, 20, 20, generator=g) > 0.4
    mask[0, 2] = False  # a row with no allowed entry: zero weights
    class Generic(xp.TorchOps):
        softmax = None  # xp.softmax composes exp, sum and divisions

    slow = Generic(torch)
    grad = torch.randn(3, 20, 20, generator=g)
    for s, m, gr in ((scores, mask, grad), (scores[..., :7], mask[..., :7], grad[..., :7])):
        for m in (None, m):
            for axis in (-1, 1):
                fast_w = xp.softmax(ops, s, m, axis=axis)
                (dfast,) = torch.autograd.grad((fast_w * gr).sum(), scores)
                slow_w = xp.softmax(slow, s, m, axis=axis)
                (dslow,) = torch.autograd.grad((slow_w * gr).sum(), scores)
                assert torch.allclose(fast_w, slow_w, atol=1e-6) and torch.allclose(dfast, dslow, atol=1e-5)
    assert float(xp.softmax(ops, scores, mask)[0, 2].abs().sum()) == 0.0


def test_torch_sparse_routing_ops_equal_indexing():
    """gather_dot / gather_mix (one autograd node, no gathered copy kept) = advanced indexing + matmul,
    values and gradients, and agree with the numpy namespace."""
    from badger_runtime.xp import NumpyOps

    ops, g = torch_ops(), torch.Generator().manual_seed(1)
    B, N, M, C, D = 3, 11, 11, 4, 5
    idx = np.random.default_rng(0).integers(0, N, size=(B, M, C))
    x = torch.randn(B, N, D, generator=g, requires_grad=True)
    q = torch.randn(B, M, D, generator=g, requires_grad=True)
    w = torch.randn(B, M, C, generator=g, requires_grad=True)
    rows = x[torch.arange(B)[:, None, None], torch.as_tensor(idx)]  # [B, M, C, D]
    ref_dot, ref_mix = torch.matmul(rows, q[..., None])[..., 0], torch.matmul(w[..., None, :], rows)[..., 0, :]
    dot, mix = ops.gather_dot(x, idx, q), ops.gather_mix(x, idx, w)
    assert torch.allclose(dot, ref_dot, atol=1e-5) and torch.allclose(mix, ref_mix, atol=1e-5)
    gd, gm = torch.randn(B, M, C, generator=g), torch.randn(B, M, D, generator=g)
    want = torch.autograd.grad((ref_dot * gd).sum() + (ref_mix * gm).sum(), (x, q, w))
    got = torch.autograd.grad((dot * gd).sum() + (mix * gm).sum(), (x, q, w))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)
    npo = NumpyOps()
    assert np.allclose(npo.gather_dot(x.detach().numpy(), idx, q.detach().numpy()), dot.detach().numpy(), atol=1e-5)
    assert np.allclose(npo.gather_mix(x.detach().numpy(), idx, w.detach().numpy()), mix.detach().numpy(), atol=1e-5)


def test_split_and_matmul_parts_agree_across_namespaces():
    from badger_runtime.rollout import split_heads
    from badger_runtime.xp import NumpyOps

    spec = tiny_experiment().agent.policy
    hd = np.random.default_rng(2).standard_normal((2, 3, spec.heads_dim)).astype(np.float32)
    a, b = split_heads(spec, hd), split_heads(spec, torch.as_tensor(hd), torch_ops())
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k].numpy()) for k in a)
    w, p1, p2 = (np.random.default_rng(3).standard_normal(s).astype(np.float32) for s in ((2, 5, 4), (2, 4, 1), (2, 4, 3)))
    got = torch_ops().matmul_parts(torch.as_tensor(w), [torch.as_tensor(p1), torch.as_tensor(p2)]).numpy()
    assert np.allclose(NumpyOps().matmul_parts(w, [p1, p2]), got, atol=1e-6)


def test_the_push_gate_surgery_keeps_the_function_and_the_flag_reaches_every_output():
    """task.output_flag: every output address carries the observation flag (each output's address is its
    observation slot's). train.init = "push_gate" (configs/fig7_dims_push_gate.toml): the source's weights with
    the heads' push-side rows for that flag zeroed, so on the same episodes the new policy with the flag
    computes what the source computed without it; a push-key entry there then moves an expert's weight on
    every output at once (a gate)."""
    import dataclasses

    from badger_runtime.config import load_experiment
    from badger_runtime.membrane import KIND_OBSERVATION
    from badger_runtime.training.train import initial_policy, source_policy

    from pathlib import Path

    cfg = load_experiment(str(Path(__file__).resolve().parents[1] / "configs" / "fig7_dims_push_gate.toml"))
    assert cfg.task.output_flag and cfg.train.init == "push_gate"
    flagged, plain = cfg.task, dataclasses.replace(cfg.task, output_flag=False)
    A = cfg.agent.policy.addr_dim
    ep_f = guessing.sample(np.random.default_rng(3), flagged, 6, 4, A)
    ep_p = guessing.sample(np.random.default_rng(3), plain, 6, 4, A)
    assert (ep_f.out_addr[..., KIND_OBSERVATION] == 1).all() and (ep_p.out_addr[..., :2] == 0).all()
    assert np.array_equal(ep_f.out_addr, ep_f.slot_addr[:, :4])  # output j sits at observation slot j's address
    assert np.array_equal(ep_f.targets, ep_p.targets) and np.array_equal(ep_f.slot_addr, ep_p.slot_addr)
    source, gated = source_policy("dimensions-v5"), initial_policy(cfg)
    w = sample_wiring(np.random.default_rng(4), cfg.agent, 6, 5)
    with torch.no_grad():
        a = rollout(torch_ops(), source, cfg.agent, ep_p, w, steps=6).outputs
        b = rollout(torch_ops(), gated, cfg.agent, ep_f, w, steps=6).outputs
        c = rollout(torch_ops(), source, cfg.agent, ep_f, w, steps=6).outputs  # the flag without the surgery
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)  # the flag reaches the outputs: the surgery is what keeps them
    gate = gated.spec.head_slices["push_key"].start + KIND_OBSERVATION
    with torch.no_grad():
        gated.heads.bias[gate] = 5.0  # every expert's gate up by the same: the push attention does not move
        assert torch.allclose(rollout(torch_ops(), gated, cfg.agent, ep_f, w, steps=6).outputs, b, atol=1e-4)


def test_a_policy_trained_with_the_flag_gets_it_in_every_runtime():
    """dimensions-v6's card says task.output_flag: the batched engine and a served session build their
    interface from the card's task settings, so the flag reaches every output address there."""
    from badger_runtime.engine import Agent
    from badger_runtime.membrane import KIND_OBSERVATION
    from badger_runtime.policy_card import load_policy
    from badger_runtime.serve.protocol import validate_request
    from badger_runtime.serve.sessions import SessionManager

    pol = load_policy("dimensions-v6")
    assert pol.task.output_flag and not load_policy("dimensions-v5").task.output_flag
    a = Agent(pol).reset(2, 5, 4, seed=0)
    m = SessionManager(pol)
    opened = m.handle(validate_request({"id": 1, "kind": "open", "session": "s", "body": {"dims": 4, "experts": 5}}))
    assert opened["ok"]
    for out_addr in (a.interface.out_addr, m.sessions["s"].agent.interface.out_addr):
        assert out_addr.shape[-2] == 4 and (out_addr[..., KIND_OBSERVATION] == 1).all()
    assert (Agent(load_policy("dimensions-v5")).reset(2, 5, 4, seed=0).interface.out_addr[..., :2] == 0).all()


def test_average_checkpoints_means_the_weights_and_refuses_other_policies(tiny_run, tmp_path):
    """demos/average_checkpoints.py (how guessing-quorum-v4 was made): the output is a checkpoint whose policy
    weights are the (weighted) mean of the inputs', loadable as any other; a checkpoint of another policy shape is
    refused."""
    import runpy
    from pathlib import Path

    avg = runpy.run_path(str(Path(__file__).parents[1] / "demos" / "average_checkpoints.py"))
    run, _ = tiny_run
    a = load_checkpoint(run / "checkpoint.pt")
    b = dict(a, model={k: v + 1.0 for k, v in a["model"].items()})
    torch.save(b, tmp_path / "b.pt")
    out = tmp_path / "soup" / "checkpoint.pt"
    avg["main"]([str(run / "checkpoint.pt"), str(tmp_path / "b.pt"), "--weights", "3,1", "--out", str(out)])
    soup = load_checkpoint(out)
    for k, v in a["model"].items():
        torch.testing.assert_close(soup["model"][k], v + 0.25)
    assert soup["config"] == a["config"] and soup["averaged_from"][1] == str(tmp_path / "b.pt")
    policy_from_checkpoint(soup)  # what badger export reads
    wide = dict(a, model={k: torch.cat([v, v]) for k, v in a["model"].items()})
    torch.save(wide, tmp_path / "wide.pt")
    with pytest.raises(ConfigError, match="not the same policy"):
        avg["average"]([str(run / "checkpoint.pt"), str(tmp_path / "wide.pt")])


def test_push_spread_is_the_push_weighted_variance_of_the_experts_answers():
    """membrane.push_spread: zero when every expert gives the same answer, else sum_i w_i (answer_i - output)^2
    averaged over the outputs; training with train.spread_weight adds it to each step's error."""
    from badger_runtime import membrane
    from badger_runtime.engine import numpy_ops

    ops = numpy_ops()
    rng = np.random.default_rng(0)
    B, N, d, A = 2, 4, 3, 5
    key, val, addr = (rng.normal(size=s).astype(np.float32) for s in ((B, N, A), (B, N, 1 + A), (B, d, A)))
    out, w = membrane.push(ops, key, val, addr)
    ans = val[..., :1].transpose(0, 2, 1) + addr @ val[..., 1:].transpose(0, 2, 1)  # [B, d, N]
    want = (w * (ans - out[..., None]) ** 2).sum(-1).mean(-1)
    np.testing.assert_allclose(membrane.push_spread(ops, w, val, addr, out), want, rtol=1e-5)
    same = np.repeat(val[:, :1], N, axis=1)  # every expert pushes expert 0's value
    out2, w2 = membrane.push(ops, key, same, addr)
    np.testing.assert_allclose(membrane.push_spread(ops, w2, same, addr, out2), 0.0, atol=1e-10)


def test_spread_weight_adds_the_spread_to_each_steps_error(tmp_path):
    """With the last step's weight only and no log, a batch's loss is its last-step error plus spread_weight
    times the (positive) spread: above the error, by more with a larger weight."""
    gaps = []
    for weight in (0.0, 1.0, 4.0):
        cfg = tiny_experiment()
        cfg.train.batches, cfg.train.objective, cfg.train.spread_weight, cfg.train.lr = 1, "last", weight, 1e-9
        cfg.train.log_every = cfg.train.ckpt_every = 1
        train(cfg.validate(), tmp_path / str(weight), progress=False, final_eval=False, log=lambda *a: None)
        row = json.loads((tmp_path / str(weight) / "metrics.jsonl").read_text().splitlines()[0])
        gaps.append(row["loss"] - row["final_loss"])
    assert abs(gaps[0]) < 1e-6 and 0 < gaps[1] and gaps[2] == pytest.approx(4 * gaps[1], rel=1e-4)

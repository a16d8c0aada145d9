"""Past one machine (cluster/): the numpy policy, evolution strategies, and Ray.

Without Ray installed the Ray tests are skipped (the rest runs: ES in one process, the numpy
policy's parity, the fallbacks). With Ray, one local instance (2 CPUs, a 200 MB object store)
serves the whole module and is stopped at its end.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from badger_runtime.cluster import INSTALL_HINT, have_ray
from badger_runtime.cluster.es import (CENTER, LocalPool, centered_ranks, es_gradient, evaluate_members, generation,
                                       make_pool, train_es)
from badger_runtime.cluster.numpy_policy import NumpyPolicy, PopulationPolicy, flatten, n_params, offsets
from badger_runtime.config import ConfigError, Stage
from badger_runtime.engine import numpy_ops
from badger_runtime.episodes import Change
from badger_runtime.evaluation import run_episodes
from badger_runtime.policy_card import load_policy

from .conftest import tiny_experiment

needs_ray = pytest.mark.skipif(not have_ray(), reason=f"Ray is not installed ({INSTALL_HINT})")
#: one pytest-xdist worker runs this module (`--dist loadgroup`): one local Ray cluster at a time
pytestmark = pytest.mark.xdist_group("ray")


def es_experiment(generations=60, **es):
    """A small fixed-size guessing game for ES tests (d = 2, N = 3, 6 steps, per-dim feedback)."""
    cfg = tiny_experiment(dims=(2, 2), experts=(3, 3))
    cfg.train.batches, cfg.train.log_every, cfg.train.ckpt_every, cfg.train.eval_episodes = generations, 10, 10, 32
    cfg.train.es = dataclasses.replace(cfg.train.es, **({"population": 16, "episodes": 8, "sigma": 0.02,
                                                          "lr": 0.01} | es))
    return cfg.validate()


def held_out_loss(cfg, theta) -> float:
    """The objective loss of theta on a fixed set of 64 episodes no generation draws."""
    job = dataclasses.replace(generation(cfg, 0), seed=987_654, episodes=64)
    return float(evaluate_members(job, theta, [CENTER])[0, 0])


# ---- the numpy policy ------------------------------------------------------------------------------

def test_numpy_policy_matches_torch_and_onnx(tiny_run, tiny_policy):
    """The flat-vector numpy policy computes the torch model's step and the exported graph's (1e-5),
    and a population of them computes each member's rows."""
    import torch

    from badger_runtime.training.train import load_checkpoint, policy_from_checkpoint

    torch_pol, cfg = policy_from_checkpoint(load_checkpoint(tiny_run[0] / "checkpoint.pt"))
    spec = cfg.agent.policy
    theta = flatten(torch_pol.state_dict())
    assert theta.shape == (n_params(spec),)
    npol = NumpyPolicy(spec, theta)
    onnx = load_policy(tiny_policy)
    assert np.array_equal(npol.h0, onnx.h0)
    rng = np.random.default_rng(0)
    x = (rng.uniform(-1, 1, (9, spec.hidden)), 2 * rng.standard_normal((9, spec.msg_dim)),
         2 * rng.standard_normal((9, spec.sensed_dim)))
    x = tuple(a.astype(np.float32) for a in x)
    with torch.no_grad():
        ref = [t.numpy() for t in torch_pol(*map(torch.from_numpy, x))]
    for got in (npol.step(*x), onnx.step(*x)):
        assert max(float(np.abs(r - g).max()) for r, g in zip(ref, got)) < 1e-5
    other = theta + 0.1 * rng.standard_normal(theta.size).astype(np.float32)
    pop = PopulationPolicy(spec, np.stack([theta, other]), episodes=1)
    h2, hd = pop.step(*(np.concatenate([a, a]) for a in x))
    assert np.allclose(h2[:9], npol.step(*x)[0], atol=1e-6)
    assert np.allclose(hd[9:], NumpyPolicy(spec, other).step(*x)[1], atol=1e-6)
    # the deploy engine runs it: the same evaluation as the ONNX graph
    kw = {"dims": 3, "experts": 4, "episodes": 8, "seed": 3, "steps": 5}
    a = run_episodes(numpy_ops(), onnx, onnx.agent, onnx.task, **kw)
    b = run_episodes(numpy_ops(), npol, onnx.agent, onnx.task, **kw)
    assert np.abs(a.outputs - b.outputs).max() < 1e-4


# ---- evolution strategies in one process ----------------------------------------------------------

def test_es_scores_the_log_objective_with_log_floor():
    """ES weighs the same per-step terms as BPTT: with ``train.log_floor`` and the last step's weight only, a
    candidate's objective is log(its last-step loss + floor)."""
    cfg = es_experiment()
    cfg.train.objective, cfg.train.log_floor = "last", 1e-3
    job = generation(cfg.validate(), 0)
    assert job.log_floor == 1e-3
    theta = np.random.default_rng(0).normal(0, 0.3, n_params(cfg.agent.policy)).astype(np.float32)
    scores = evaluate_members(job, theta, [CENTER, 1, 2])
    np.testing.assert_allclose(scores[:, 0], np.log(scores[:, 1] + 1e-3), rtol=1e-6)
    plain = evaluate_members(dataclasses.replace(job, log_floor=0.0), theta, [CENTER, 1, 2])
    np.testing.assert_allclose(plain[:, 0], scores[:, 1], rtol=1e-6)


@pytest.mark.parametrize("init", ["fresh", "clone"])
def test_every_candidate_grows_the_same_newcomers(init):
    """The candidates of a grown generation are scored on the same episodes and, with ``train.es.same_newcomers``
    (the default), on the same newcomers, so an antithetic pair differs only by its perturbation: candidates with
    the same weights (sigma 0) score exactly alike. Off (every run before session 41), each candidate's episodes
    drew their own newcomers and equal weights scored differently."""
    cfg = es_experiment()
    cfg.train.grow_prob, cfg.train.grow_init = 1.0, init
    job = dataclasses.replace(generation(cfg.validate(), 0), sigma=0.0)
    assert job.same_newcomers and [c.init for c in job.changes] == [init]
    theta = np.random.default_rng(0).normal(0, 0.3, n_params(cfg.agent.policy)).astype(np.float32)
    same = evaluate_members(job, theta, [CENTER, 1, 2, 3])
    assert (same == same[0]).all()
    own = evaluate_members(dataclasses.replace(job, same_newcomers=False), theta, [CENTER, 1, 2, 3])
    assert len(np.unique(own[:, 0])) > 1


def test_es_says_which_bptt_terms_it_leaves_out(tmp_path):
    """``train.vote_weight`` and ``train.spread_weight`` are BPTT's terms: an ES run with them set says once that
    it leaves them out (a quorum config sets vote_weight, so it is not refused); without them it says nothing."""
    said = []
    cfg = es_experiment(generations=1)
    cfg.train.vote_weight, cfg.train.spread_weight = 0.1, 1.0
    train_es(cfg, tmp_path / "a", final_eval=False, progress=False, log=said.append)
    assert [m for m in said if "left out" in m] == [
        "ES scores whole episodes by the task's loss and steps by train.es: train.vote_weight = 0.1, "
        "train.spread_weight = 1.0 (BPTT's only) left out"]
    said.clear()
    train_es(es_experiment(generations=1), tmp_path / "b", final_eval=False, progress=False, log=said.append)
    assert not [m for m in said if "left out" in m]


def test_bench_es_reports_generations_per_second_and_memory_against_the_horizon():
    """`badger bench es` at a tiny size: whole generations timed in this process (workers 0), and the peak
    memory of one ES generation and one BPTT batch measured in fresh subprocesses, per horizon."""
    from badger_runtime.bench.es import bench_es, horizon_memory

    cfg = es_experiment(population=4, episodes=2)
    rep = bench_es(cfg, workers=(0,), generations=2, warmup=1)
    (row,) = rep["rows"]
    assert rep["bench"] == "es" and rep["parameters"] == n_params(cfg.agent.policy)
    assert row["workers"] == 0 and row["generations"] == 2 and row["population"] == 4 and row["episodes"] == 2
    assert row["generations_per_s"] > 0
    assert row["candidate_episodes_per_s"] == pytest.approx(5 * 2 * row["generations_per_s"], rel=0.01)
    mem = horizon_memory(None, ["train.es.population=2", "train.batch_size=2", "agent.policy.hidden=8"],
                         horizons=(4,), outers=("es", "bptt"))
    rows = {r["outer"]: r for r in mem["rows"]}
    assert set(rows) == {"es", "bptt"} and not any("error" in r for r in rows.values()), rows
    assert rows["es"]["population"] == 2 and rows["bptt"]["batch"] == 2
    assert all(r["steps"] == 4 and r["peak_mib"] >= 0 for r in rows.values())


def test_es_maths():
    r = centered_ranks(np.array([3.0, -1.0, np.nan, 10.0]))
    assert r.tolist() == [pytest.approx(1 / 6), pytest.approx(-1 / 6), -0.5, 0.5]
    # on a quadratic the ES gradient points uphill
    dim, sigma = 50, 0.1
    f = lambda th: -float(((th - 1.0) ** 2).sum())  # noqa: E731
    theta = np.zeros(dim, np.float32)
    from badger_runtime.cluster.es import member_theta

    fit = np.array([f(member_theta(theta, sigma, 0, 0, m)) for m in range(200)])
    g = es_gradient(fit, sigma, 0, 0, dim)
    assert np.dot(g, np.ones(dim)) / np.linalg.norm(g) / np.sqrt(dim) > 0.7


def test_es_trains_resumes_and_exports(tmp_path, monkeypatch):
    """ES in one process: a run stopped after its checkpoint at generation 10 and resumed ends with
    the parameters of the run done at once; the checkpoint is the BPTT trainer's format (BPTT refuses
    to resume it), exports to ONNX, and the exported graph is the numpy policy of the parameters."""
    import torch

    from badger_runtime.cluster import es
    from badger_runtime.training.export import export
    from badger_runtime.training.train import train

    quiet = {"progress": False, "log": lambda *a: None}
    train_es(es_experiment(generations=20), tmp_path / "once", final_eval=False, **quiet)
    real = es.generation

    def crash_at_15(cfg, g):
        if g == 15:
            raise KeyboardInterrupt
        return real(cfg, g)

    monkeypatch.setattr(es, "generation", crash_at_15)
    with pytest.raises(KeyboardInterrupt):
        train_es(es_experiment(generations=20), tmp_path / "twice", final_eval=False, **quiet)
    monkeypatch.setattr(es, "generation", real)
    other = es_experiment(generations=20)
    other.train.seed += 1
    with pytest.raises(ConfigError, match="another config"):  # another config: refused
        train_es(other, tmp_path / "twice", resume=True, **quiet)
    with pytest.raises(ConfigError, match="holds a run.*--resume"):  # nor is a run overwritten without --resume
        train_es(es_experiment(generations=20), tmp_path / "twice", **quiet)
    summary = train_es(es_experiment(generations=20), tmp_path / "twice", resume=True, workers=0, **quiet)
    a = torch.load(tmp_path / "once" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "twice" / "checkpoint.pt", weights_only=False)
    assert a["outer"] == "es" and a["batch"] == b["batch"] == 20
    assert np.array_equal(a["theta"], b["theta"])
    assert "final_mse" in summary["eval"] and summary["outer"] == "es"
    rows = [json.loads(line) for line in open(tmp_path / "twice" / "metrics.jsonl")]
    assert [r["generation"] for r in rows] == [10, 20]
    with pytest.raises(ConfigError, match="--outer es"):
        train(es_experiment(generations=20), tmp_path / "twice", resume=True, progress=False, final_eval=False,
              log=lambda *a: None)
    card = export(tmp_path / "twice" / "checkpoint.pt", tmp_path / "es.onnx")
    assert card["training"]["outer"] == "es"
    pol = load_policy(tmp_path / "es.onnx")
    x = (np.zeros((4, pol.spec.hidden), np.float32), np.ones((4, pol.spec.msg_dim), np.float32),
         np.ones((4, pol.spec.sensed_dim), np.float32))
    assert np.abs(pol.step(*x)[1] - NumpyPolicy(pol.spec, b["theta"]).step(*x)[1]).max() < 1e-5
    train_es(es_experiment(generations=22), tmp_path / "twice", resume=True, final_eval=False, **quiet)  # longer
    assert torch.load(tmp_path / "twice" / "checkpoint.pt", weights_only=False)["batch"] == 22


@pytest.mark.parametrize("grow_prob", [0.5, 0.0])
def test_es_resumes_a_checkpoint_from_before_same_newcomers_as_it_was_trained(tmp_path, grow_prob):
    """A grown ES run's checkpoint from before ``train.es.same_newcomers`` existed (its config lacks it) was
    trained with each candidate drawing its own newcomers: resuming it under today's default is refused,
    naming the setting and the flag that continues it as trained (which resumes it); without growth the
    setting changes nothing and it resumes as before. The refusal names the setting that differs."""
    import torch

    quiet = {"final_eval": False, "progress": False, "log": lambda *a: None}
    cfg = es_experiment(generations=2)
    cfg.train.grow_prob = grow_prob
    train_es(cfg, tmp_path, **quiet)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    del ck["config"]["train"]["es"]["same_newcomers"]  # as a checkpoint of session 40 was
    ck["batch"] = 1  # one generation left to run
    torch.save(ck, tmp_path / "checkpoint.pt")
    if grow_prob:
        with pytest.raises(ConfigError, match=r"train.es.same_newcomers = False there, True here.*"
                                              r"--set train.es.same_newcomers=false"):
            train_es(cfg, tmp_path, resume=True, **quiet)
        cfg.train.es = dataclasses.replace(cfg.train.es, same_newcomers=False)
    with pytest.raises(ConfigError, match=r"another config: train.lr = 0.01 there, 0.002 here$"):
        train_es(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.002)), tmp_path, resume=True,
                 **quiet)
    train_es(cfg, tmp_path, resume=True, **quiet)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["batch"] == 2


@pytest.mark.parametrize("entry, damage", [
    ("theta", lambda ck: ck.update(theta=ck["theta"][:-1])), ("theta", lambda ck: ck["theta"].__setitem__(0, np.nan)),
    ("optimizer", lambda ck: ck["optimizer"].update(m=np.zeros(3, np.float32))),
    ("optimizer", lambda ck: ck.update(optimizer=None)), ("batch", lambda ck: ck.update(batch=-1))])
def test_es_refuses_to_resume_a_damaged_checkpoint(tmp_path, entry, damage):
    """A resumed ES run whose checkpoint has a damaged entry stops with ConfigError naming it, before a
    generation runs, and leaves the checkpoint as it was."""
    import torch

    cfg = es_experiment(generations=2)
    train_es(cfg, tmp_path, final_eval=False, progress=False, log=lambda *a: None)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    damage(ck)
    torch.save(ck, tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError, match=entry):
        train_es(cfg, tmp_path, resume=True, final_eval=False, progress=False, log=lambda *a: None)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_es_starts_where_bptt_starts_a_structured_init(tmp_path):
    """train.init (a handcrafted policy) is the starting point of both outer loops: with no step
    taken, the ES checkpoint holds the weights the BPTT trainer starts from, not the default init."""
    import torch

    from badger_runtime.config import load_experiment
    from badger_runtime.training.train import train

    cfg = load_experiment(str(Path(__file__).resolve().parents[1] / "configs" / "fewshot.toml"))
    cfg.train.batches, cfg.train.eval_episodes = 0, 4
    quiet = {"progress": False, "log": lambda *a: None}
    train(cfg, tmp_path / "bptt", final_eval=False, **quiet)
    train_es(cfg, tmp_path / "es", final_eval=False, workers=0, **quiet)
    a = torch.load(tmp_path / "bptt" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "es" / "checkpoint.pt", weights_only=False)["model"]
    assert cfg.train.init == "prototypes" and set(a) == set(b)
    assert all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)
    cfg.train.init = ""
    train_es(cfg.validate(), tmp_path / "default", final_eval=False, workers=0, **quiet)
    c = torch.load(tmp_path / "default" / "checkpoint.pt", weights_only=False)["model"]
    assert not all(torch.equal(a[k], c[k].to(a[k].dtype)) for k in a)  # the init made a difference


def test_es_cli_and_fallbacks(tmp_path, monkeypatch, capsys):
    """`badger train --outer es` runs; --workers goes with --outer es; train.trainable is refused;
    workers without Ray fall back to this process; --ray without Ray says how to install it."""
    from badger_runtime import cluster
    from badger_runtime.cli import main

    toml = tmp_path / "es.toml"
    toml.write_text('[agent.policy]\nhidden = 8\n[task]\nfeedback = "per_dim"\ndims = [2, 2]\nexperts = [2, 2]\n'
                    'steps = 4\n[train]\nbatches = 3\nlog_every = 1\neval_episodes = 8\n'
                    '[train.es]\npopulation = 4\nepisodes = 2\n')
    assert main(["train", str(toml), "--out", str(tmp_path / "run"), "--outer", "es", "--quiet"]) == 0
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
    assert main(["train", str(toml), "--out", str(tmp_path / "run2"), "--workers", "2", "--quiet"]) == 2
    assert main(["train", str(toml), "--out", str(tmp_path / "r"), "--outer", "es", "--set",
                 "train.es.population=3"]) == 2  # odd: refused
    assert main(["train", str(toml), "--out", str(tmp_path / "r"), "--outer", "es", "--set",
                 "train.trainable=[\"heads:push_value\"]"]) == 2  # BPTT's setting: ES perturbs every weight
    assert "ES perturbs every weight" in capsys.readouterr().err
    monkeypatch.setattr(cluster, "have_ray", lambda: False)
    said = []
    assert isinstance(make_pool(2, log=said.append), LocalPool) and "not installed" in said[0]
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails
    with pytest.raises(ImportError, match=r"pip install 'badger-runtime\[cluster\]'"):
        make_pool(2, "auto")


# ---- on a local Ray cluster -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    pytest.importorskip("ray", reason=f"Ray is not installed ({INSTALL_HINT})")
    from badger_runtime.cluster import connect, disconnect

    ray = connect(num_cpus=2, object_store_memory=200 * 2**20)
    yield ray
    disconnect()


@needs_ray
def test_es_on_ray_workers_improves_fitness_and_equals_one_process(ray_local, tmp_path):
    """ES with the population scored by 2 Ray workers lowers the loss on held-out episodes, and gives
    exactly the parameters of the same run in one process."""
    import torch

    es = {"generations": 40, "population": 64, "sigma": 0.05, "lr": 0.02}
    cfg = es_experiment(**es)
    train_es(cfg, tmp_path / "ray", progress=False, final_eval=False, log=lambda *a: None, workers=2)
    local = es_experiment(**es)
    train_es(local, tmp_path / "local", progress=False, final_eval=False, log=lambda *a: None, workers=0)
    theta = torch.load(tmp_path / "ray" / "checkpoint.pt", weights_only=False)["theta"]
    assert np.allclose(theta, torch.load(tmp_path / "local" / "checkpoint.pt", weights_only=False)["theta"],
                       atol=1e-6)
    torch.manual_seed(cfg.train.seed)
    from badger_runtime.training.model import ExpertPolicy

    theta0 = flatten(ExpertPolicy(cfg.agent.policy).state_dict())
    before, after = held_out_loss(cfg, theta0), held_out_loss(cfg, theta)
    assert after < 0.9 * before, (before, after)  # 1.26 -> 1.07 (chance, guessing 0: 1.0)
    rows = [json.loads(line) for line in open(tmp_path / "ray" / "metrics.jsonl")]
    assert rows[0]["workers"] == 2


@needs_ray
@pytest.mark.parametrize("rule", ["fixed", "convergence"])
def test_ray_shards_equal_in_process_shards(ray_local, tiny_policy, rule):
    """The Ray-actor shards give the in-process shards' outputs (1e-5) over several steps, with
    experts hot-added and removed between steps (the evaluation path: run_episodes)."""
    pol = load_policy(tiny_policy)
    a = pol.agent
    agent = dataclasses.replace(a, routing=dataclasses.replace(a.routing, kind="topk", k=2, candidates=3),
                                agreement=dataclasses.replace(a.agreement, rule=rule, rounds=3, eps=0.2))
    kw = {"dims": 3, "experts": 7, "episodes": 3, "seed": 4, "steps": 6,
          "changes": (Change(2, "add", 3, "fresh"), Change(3, "add", 2, "clone"), Change(4, "remove", 4))}
    ref = run_episodes(numpy_ops(), pol, agent, pol.task, runtime="sharded", shards=2, **kw)
    got = run_episodes(numpy_ops(), pol, agent, pol.task, runtime="ray", shards=2, **kw)
    assert np.abs(ref.outputs - got.outputs).max() <= 1e-5
    assert np.array_equal(ref.rounds, got.rounds)
    assert got.runtime["shards"] == 2 and got.runtime["blocks"] > 0


@needs_ray
def test_served_session_on_a_ray_actor_survives_its_actor_being_killed(ray_local, tiny_policy, tmp_path):
    """A session whose agent lives in a Ray actor answers like a local one; SIGKILL its actor
    mid-session and the next request restores it from the session's last state: the outputs go on
    exactly as the local session's. Bad input comes back as bad_input."""
    from badger_runtime.cluster.sessions import RayPlacement
    from badger_runtime.serve.sessions import SessionManager
    from badger_runtime.serve.store import SessionStore

    pol = load_policy(tiny_policy)
    managers = {"ray": SessionManager(pol, SessionStore(tmp_path / "ray", fsync=False),
                                      placement=RayPlacement(pol)),
                "local": SessionManager(pol, SessionStore(tmp_path / "local", fsync=False))}
    ids = iter(range(1000))
    secrets = {}  # manager -> the secret its open returned (sent on every later request, as a client does)

    def req(m, kind, **body):
        if id(m) in secrets:
            body["secret"] = secrets[id(m)]
        r = m.handle({"kind": kind, "id": next(ids), "session": "s", "body": body})
        if kind == "open" and r["ok"]:
            secrets[id(m)] = r["body"]["secret"]
        return r

    target = np.array([0.4, -0.3, 0.1])
    outs = {}
    for where, m in managers.items():
        assert req(m, "open", experts=4, dims=3, seed=2)["ok"]
        out, outs[where] = np.zeros(3), []
        for t in range(7):
            if t == 2:
                assert req(m, "add_experts", n=2, init="fresh")["ok"]
            if t == 4:
                assert req(m, "remove_experts", indices=[1, 3])["ok"]
            if where == "ray" and t in (3, 5):
                hosted = m.sessions["s"].agent
                os.kill(ray_local.get(hosted.actor.pid.remote()), signal.SIGKILL)
            r = req(m, "step", observation=out.tolist(), feedback=(out - target).tolist())
            assert r["ok"], r
            out = np.asarray(r["body"]["outputs"], np.float64)
            outs[where].append(out)
    hosted = managers["ray"].sessions["s"].agent
    assert hosted.restarts == 2
    assert np.abs(np.array(outs["ray"]) - np.array(outs["local"])).max() <= 1e-6
    bad = req(managers["ray"], "step", slots=[float("nan")] * hosted.slots)
    assert bad["error"]["code"] == "bad_input"
    stats = managers["ray"].handle({"kind": "stats", "id": 999, "session": None, "body": {}})
    assert stats["body"]["placement"]["actor_restarts"] == 2
    del managers, hosted
    gc.collect()  # the host actors go with their handles


@needs_ray
def test_a_bandit_session_on_a_ray_actor_points_at_the_pulled_arm(ray_local, tiny_policy, tmp_path):
    """A step's ``arm`` changes the agent's interface (the feedback slot points at that arm): on a
    Ray actor it must reach the actor, so the outputs equal a local session's step for step."""
    from badger_runtime.cluster.sessions import RayPlacement
    from badger_runtime.serve.sessions import SessionManager

    pol = load_policy(tiny_policy)
    outs = {}
    for where, placement in (("ray", RayPlacement(pol)), ("local", None), ("no arm", None)):
        m = SessionManager(pol, placement=placement)
        r = m.handle({"kind": "open", "id": 0, "session": "b", "body": {"dims": 4, "experts": 3, "seed": 5,
                                                                          "task": "bandit"}})
        secret, out, outs[where] = r["body"]["secret"], np.zeros(4), []
        for t in range(6):
            body = {"observation": out.tolist(), "feedback": [0.0 if t % 2 else 1.0], "pulled": [1.0],
                    "secret": secret} | ({"arm": t % 4} if t and where != "no arm" else {})
            r = m.handle({"kind": "step", "id": t + 1, "session": "b", "body": body})
            assert r["ok"], r
            out = np.asarray(r["body"]["outputs"], np.float64)
            outs[where].append(out)
    assert np.abs(np.array(outs["ray"]) - np.array(outs["local"])).max() <= 1e-6
    # and the arm matters: the same steps pointing at no arm give other outputs
    assert np.abs(np.array(outs["no arm"]) - np.array(outs["local"])).max() > 1e-4


@pytest.mark.parametrize("part", ["hard top-1 routing", "quorum vote"])
def test_es_trains_what_backprop_cannot_see(part):
    """Parts that are not differentiable as deployed: with top-1 routing each receiver hears its
    best-scoring sender with weight exactly 1, and the quorum's stop decision is a threshold on the
    votes. BPTT's task-loss gradient for the heads that drive them (query and key; the vote) is
    exactly zero, while moving only those heads changes the loss ES measures in the deploy engine."""
    import torch

    from badger_runtime.rollout import rollout, sample_wiring
    from badger_runtime.tasks import make_task
    from badger_runtime.training.model import ExpertPolicy, torch_ops

    cfg = es_experiment(generations=1)
    spec = cfg.agent.policy
    if part == "hard top-1 routing":
        cfg.agent.routing = dataclasses.replace(cfg.agent.routing, kind="topk", k=1)
        rows = np.arange(0, 2 * spec.key_dim)  # query, key
    else:
        cfg.agent.agreement = dataclasses.replace(cfg.agent.agreement, rule="quorum", rounds=4, quorum=0.5)
        cfg.train.rounds = (4, 4)
        rows = np.array([2 * spec.key_dim + spec.msg_dim])  # vote
    torch.manual_seed(0)
    policy = ExpertPolicy(spec)
    rng = np.random.default_rng(0)
    ep = make_task(cfg.task).sample(rng, 16, dims=2, experts=3, steps=6, addr_dim=spec.addr_dim)
    out = rollout(torch_ops(), policy, cfg.agent, ep, sample_wiring(rng, cfg.agent, 16, 3), steps=6, rounds=4)
    out.losses.mean().backward()
    grad = policy.heads.weight.grad
    assert float(grad.abs().sum()) > 0 and float(grad[rows].abs().max()) == 0.0  # BPTT: nothing to follow
    theta = flatten(policy.state_dict())
    start = offsets(spec)["heads.weight"]  # [heads_dim, H], then heads.bias [heads_dim]
    moved = theta.copy()
    flat_rows = (start + rows[:, None] * spec.hidden + np.arange(spec.hidden)[None]).ravel()
    moved[flat_rows] += 1.0 * np.random.default_rng(1).standard_normal(flat_rows.size).astype(np.float32)
    if part == "quorum vote":  # and the vote's bias: every expert votes 'done' at once
        moved[offsets(spec)["heads.bias"] + rows] += 10.0
    job = generation(cfg, 0)
    a, b = evaluate_members(job, theta, [CENTER])[0, 0], evaluate_members(job, moved, [CENTER])[0, 0]
    assert abs(a - b) > 1e-3, (a, b)  # ES: the deployed loss moves


def test_init_from_a_checkpoint_or_a_policy(tiny_run, tiny_policy):
    """train.init_from takes a checkpoint or an exported policy (its graph's weights and its card's
    initial state): both give the trained weights (how ES fine-tunes a shipped BPTT policy)."""
    import torch

    from badger_runtime.training.model import ExpertPolicy
    from badger_runtime.training.train import load_checkpoint, load_initial_weights, policy_from_checkpoint

    ref, cfg = policy_from_checkpoint(load_checkpoint(tiny_run[0] / "checkpoint.pt"))
    for source in (str(tiny_run[0] / "checkpoint.pt"), str(tiny_policy)):
        policy = ExpertPolicy(cfg.agent.policy)
        load_initial_weights(policy, source)
        for (k, a), b in zip(policy.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(a, b), (source, k)
    with pytest.raises(ConfigError, match="does not fit"):
        load_initial_weights(ExpertPolicy(dataclasses.replace(cfg.agent.policy, hidden=8)), str(tiny_policy))


@needs_ray
def test_bench_runtime_has_ray_rows(ray_local):
    """`badger bench runtime --engines batched,ray`: rows with "engine": "ray" and the other engines'
    fields, the batched engine's outputs, and the Ray overhead per round."""
    from badger_runtime.bench.runtime import RuntimeBench, time_engines

    spec = RuntimeBench(experts=[12], engines=["batched", "ray"], steps=2, warmup=0, memory=False, isolate=False,
                        shards=2)
    rows = {r["engine"]: r for r in time_engines(spec, 12)}
    ray_row = rows["ray"]
    for key in ("seconds_per_step", "expert_steps_per_s", "messages_per_s", "max_diff_vs_batched", "shards"):
        assert key in ray_row, key
    assert ray_row["max_diff_vs_batched"] <= 1e-5 and ray_row["shards"] == 2
    # the shards timed their own compute, and the blocks went through Ray (what the overhead is measured from)
    assert ray_row["shard_compute_s_per_step"] > 0 and ray_row["shard_blocks"] > 0


def test_es_names_every_bptt_setting_it_leaves_out(tmp_path):
    """lr_decay, tbptt, guard_weight and the like were ignored by ES without a word."""
    cfg = es_experiment(generations=1)
    cfg.train.lr_decay, cfg.train.tbptt = [(1, 1e-9)], 2
    said = []
    train_es(cfg, tmp_path / "run", final_eval=False, progress=False, log=said.append)
    left_out = next(line for line in said if "left out" in line)
    assert "train.lr_decay" in left_out and "train.tbptt = 2" in left_out and "train.clip" not in left_out


def test_the_card_says_the_horizon_training_ran():
    from badger_runtime.training.export import trained_horizon

    cfg = es_experiment(generations=1)
    cfg.task.steps, cfg.train.horizon = 6, (2, 8)
    assert trained_horizon(cfg) == 8
    cfg.train.horizon = (0, 0)
    assert trained_horizon(cfg) == 6
    cfg.train.stages = [Stage(until=1, settings={"steps": 9})]
    assert trained_horizon(cfg) == 9  # a stage's longer episodes

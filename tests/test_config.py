import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from badger_runtime.config import (ConfigError, ExperimentConfig, apply_overrides, flat_settings, from_dict,
                                   load_experiment, to_dict)


def test_defaults_round_trip():
    cfg = ExperimentConfig().validate()
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg


def test_toml_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "x"\n[task]\nfeedback = "per_dim"\ndims = [2, 4]\n[[train.stages]]\nuntil = 5\ndims = [1, 1]\n')
    cfg = load_experiment(str(p), ["train.lr=3e-4", "agent.routing.kind=topk", "agent.routing.k=3"])
    assert cfg.name == "x" and cfg.task.dims == (2, 4) and cfg.task.feedback == "per_dim"
    assert cfg.train.lr == 3e-4 and cfg.agent.routing.kind == "topk" and cfg.agent.routing.k == 3
    assert cfg.train.stages[0].until == 5 and cfg.train.stages[0].dims == (1, 1)


@pytest.mark.parametrize(
    "override, message",
    [
        ("agent.routing.kind=star", "routing.kind"),
        ("task.dims=[4, 2]", "task.dims"),
        ("train.lr=-1", "train.lr"),
        ("task.colour=1", "unknown setting"),
        ("train.batches=1.5", "integer"),
        ("agent.agreement.rule=vote", "agreement.rule"),
        ("task.feedback=loud", "task.feedback"),
        ("nonsense", "section.key=value"),
        ("train.grow_init=cloned", "train.grow_init"),
        ("train.grow_most=0", "train.grow_most"),
        ("train.log_floor=-1e-6", "train.log_floor"),
        ("train.log_floor=inf", "train.log_floor"),
        ("train.spread_weight=-1", "train.spread_weight"),
    ],
)
def test_bad_settings_are_refused_clearly(override, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(None, [override])


def test_grow_init_chooses_what_grown_batches_add_and_draws_one_number_whatever_it_is():
    import numpy as np

    picks = {}
    for kind in ("mixed", "fresh", "clone"):
        tr = load_experiment(None, [f"train.grow_init={kind}"]).train
        rng = np.random.default_rng(0)
        picks[kind] = [tr.grows_clones(rng) for _ in range(400)]
        assert rng.random() == np.random.default_rng(0).random(401)[-1]  # one draw per call
    assert not any(picks["fresh"]) and all(picks["clone"])
    assert 150 < sum(picks["mixed"]) < 250
    # mixed is the old rule, so the recipes trained before the setting draw what they drew
    rng, again = np.random.default_rng(7), np.random.default_rng(7)
    tr = ExperimentConfig().train
    assert [tr.grows_clones(rng) for _ in range(50)] == list(again.random(50) < 0.5)


def test_grow_most_sets_how_many_join_and_keeps_the_old_draws_by_default():
    import numpy as np

    n = 5
    old, rng = np.random.default_rng(3), np.random.default_rng(3)
    tr = ExperimentConfig().train
    assert [tr.newcomers(rng, n) for _ in range(200)] == [int(old.integers(1, n + 1)) for _ in range(200)]
    tr = load_experiment(None, ["train.grow_most=3"]).train
    rng = np.random.default_rng(0)
    draws = [tr.newcomers(rng, n) for _ in range(400)]
    assert min(draws) == 1 and max(draws) == 3 * n  # 1..3N, both ends reached
    assert load_experiment(None, ["train.grow_most=0.1"]).train.newcomers(rng, n) == 1  # at least one joins


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_experiment(str(bad))


def test_override_values_parse_as_toml():
    d = apply_overrides({}, ["a.b=1", "a.c=[1, 2]", "a.d=word", "a.e=true"])
    assert d == {"a": {"b": 1, "c": [1, 2], "d": "word", "e": True}}


def test_retired_settings_in_old_configs_are_dropped_only_when_neutral():
    old = to_dict(ExperimentConfig())
    old["train"]["ponder_cost"] = 0.0  # what cards written before its removal hold
    assert from_dict(ExperimentConfig, old) == ExperimentConfig()
    old["train"]["ponder_cost"] = 0.5  # a setting that did something: refuse rather than ignore
    with pytest.raises(ConfigError, match="ponder_cost"):
        from_dict(ExperimentConfig, old)


def test_curriculum_stages_override_the_task_until_their_batch():
    """``train.stages`` (both outer loops read them through ``curriculum.task_at``): each stage's ranges,
    addresses and settings hold until its ``until`` batch, then the next stage's, then the task's own; fixed
    addresses are redrawn every ``change_every`` batches of a stage; a stage's settings are checked against the
    task's types, and a setting the task does not have (or its name) is refused."""
    from badger_runtime.config import Stage
    from badger_runtime.curriculum import stage_at, task_at

    from .conftest import tiny_experiment

    cfg = tiny_experiment()
    cfg.task = dataclasses.replace(cfg.task, addresses="fixed", address_seed=7)
    cfg.train.stages = [Stage(until=3, dims=(1, 1), experts=(2, 2), change_every=2, settings={"steps": 4}),
                        Stage(until=5, addresses="random")]
    seen = [task_at(cfg, b) for b in range(7)]
    assert [s.until if s else None for _, s in seen] == [3, 3, 3, 5, 5, None, None]
    assert [t.dims for t, _ in seen] == [(1, 1)] * 3 + [cfg.task.dims] * 4
    assert [t.experts for t, _ in seen[:3]] == [(2, 2)] * 3 and seen[3][0].experts == cfg.task.experts
    assert [t.steps for t, _ in seen] == [4] * 3 + [cfg.task.steps] * 4
    assert [t.address_seed for t, _ in seen[:3]] == [7 + 1000, 7 + 1000, 7 + 1001]  # redrawn every 2 batches
    assert [t.addresses for t, _ in seen] == ["fixed"] * 3 + ["random"] * 2 + ["fixed"] * 2
    assert seen[5][0] == cfg.task and stage_at(cfg, 99) is None
    for bad in ({"no_such_setting": 1}, {"name": "bandit"}):
        cfg.train.stages = [Stage(until=3, settings=bad)]
        with pytest.raises(ConfigError, match="has no settings"):
            task_at(cfg, 0)
    cfg.train.stages = [Stage(until=3, settings={"steps": "many"})]
    with pytest.raises(ConfigError, match="steps"):
        task_at(cfg, 0)


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", [None, "configs/bandit_index.toml", "configs/fewshot.toml", "configs/scale.toml"])
def test_no_setting_takes_nan_or_infinity(config):
    """Every number setting of every task's config refuses NaN and +-inf with a ConfigError naming it (a NaN
    learning rate or sigma was accepted and trained on), and the ones that are scales or bounds refuse
    negatives (a negative train.clip flipped the gradient)."""
    path = None if config is None else str(ROOT / config)
    names = [k for k, v in flat_settings(to_dict(load_experiment(path, []))).items() if isinstance(v, float)]
    assert {"train.lr", "train.clip", "agent.agreement.eps"} <= set(names)
    for name in names:
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(ConfigError, match=name.split(".")[-1]):
                load_experiment(path, [f"{name}={bad}"])
    for name in ("train.clip", "train.vote_weight", "agent.agreement.eps", "train.lr", "agent.policy.init_noise"):
        with pytest.raises(ConfigError, match=name.split(".")[-1]):
            load_experiment(path, [f"{name}=-1.0"])


@pytest.mark.parametrize("setting", ["train.log_every=0", "train.ckpt_every=0", "train.threads=0",
                                     "train.eval_episodes=-1", "agent.policy.hidden=1000000000",
                                     "agent.policy.id_dim=1e9"])
def test_counts_and_sizes_out_of_range_are_refused(setting):
    """A zero logging or checkpoint interval (a modulo by zero in the training loop) and a policy of absurd size
    (a failed allocation of terabytes) are ConfigErrors naming the setting."""
    with pytest.raises(ConfigError, match=setting.split("=")[0].split(".")[-1]):
        load_experiment(None, [setting])


_CONFIGS = [None, "configs/bandit_index.toml", "configs/fewshot.toml", "configs/scale.toml", "configs/fig9_quorum.toml"]


def _keys(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _keys(v, prefix + k + ".")
        yield prefix + k


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_set_override_is_refused_or_gives_a_valid_config(data):
    """``badger train CONFIG --set key=value``, any known key of five tasks' configs (a section too) set to any
    TOML value (numbers of every sign and size, NaN, inf, strings, lists, tables): a ConfigError naming what is
    wrong, or a config that validates again after a round trip through its dict."""
    config = data.draw(st.sampled_from(_CONFIGS))
    path = None if config is None else str(ROOT / config)
    keys = sorted(set(_keys(to_dict(load_experiment(path, [])))))
    value = data.draw(st.sampled_from(["0", "1", "-1", "3", "1e9", "0.5", "-0.5", "nan", "inf", "true", '"x"',
                                       '"fixed"', "[1, 2]", "[2, 1]", "[0, 0]", "[-1, 3]", "[]", "{}", "[1, 2, 3]",
                                       '"sample"', '"quorum"', '"topk"', '"clone"', '"bandit"', "1000000"]))
    sets = [f"{data.draw(st.sampled_from(keys))}={value}"]
    try:
        cfg = load_experiment(path, sets)
    except ConfigError:
        return
    assert from_dict(ExperimentConfig, to_dict(cfg)).validate() == cfg


def test_a_policy_is_never_deployed_with_rounds_it_was_not_trained_with():
    """agreement.rounds = 3 with train.rounds at its default [1, 1] trained one round and exported a card that
    runs three."""
    data = {"agent": {"agreement": {"rule": "fixed", "rounds": 3}}}
    cfg = from_dict(ExperimentConfig, data).validate()  # a card or checkpoint made so still loads
    with pytest.raises(ConfigError, match=r"agreement.rounds = 3 is outside train.rounds = \[1, 1\]"):
        cfg.check_new_run()  # a new run does not start
    data["train"] = {"rounds": [1, 3]}
    assert from_dict(ExperimentConfig, data).validate().check_new_run().train.rounds == (1, 3)
    data["train"] = {"rounds": [1, 100]}  # it started and failed at its first batch (a step's bound is 64)
    with pytest.raises(ConfigError, match="at most 64"):
        from_dict(ExperimentConfig, data).validate().check_new_run()


def test_a_new_run_reaches_the_steps_its_card_evaluates():
    cfg = from_dict(ExperimentConfig, {"task": {"steps": 6}, "train": {"horizon": [2, 3]}}).validate()
    with pytest.raises(ConfigError, match="shorter than task.steps"):
        cfg.check_new_run()

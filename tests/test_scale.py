"""Issue 13's claims about the shipped scale policies, on small seeded evaluations (numpy engine):
the error falls as experts are added, beyond the trained N; cutting the messages costs accuracy;
fresh experts hot-added mid-episode help. (docs/results.md has the full tables.)"""

from __future__ import annotations

import dataclasses

import pytest

from badger_runtime.engine import numpy_ops
from badger_runtime.episodes import schedule
from badger_runtime.evaluation import run_episodes
from badger_runtime.policy_card import load_policy
from badger_runtime.tasks import task_class


def final_error(pol, *, experts, episodes=16, seed=0, agent=None, changes=()):
    """The final-step error of 20-step episodes at the trained maximum d (``badger eval --task scale --steps 20``)."""
    task = task_class(pol.task.name).evaluation_config(pol.task)
    res = run_episodes(numpy_ops(), pol, agent or pol.agent, task, dims=pol.task.dims[1], experts=experts,
                       episodes=episodes, seed=seed, steps=20, changes=changes)
    return float(res.errors[-1].mean())


@pytest.fixture(scope="module", params=["scale-v1", "scale-v2", "scale-v3", "scale-v4"])
def scale_policy(request):
    return load_policy(request.param)


def test_the_error_falls_with_the_number_of_experts_beyond_the_trained_n(scale_policy):
    n_hi = scale_policy.task.experts[1]
    one, trained, beyond = (final_error(scale_policy, experts=n) for n in (1, n_hi, 4 * n_hi))
    assert one > 5 * trained, (one, trained)
    assert beyond < trained, (trained, beyond)


def test_cutting_the_messages_costs_accuracy(scale_policy):
    n = scale_policy.task.experts[1]
    cut = dataclasses.replace(scale_policy.agent, routing=dataclasses.replace(scale_policy.agent.routing,
                                                                             ablation="cut"))
    assert final_error(scale_policy, experts=n, agent=cut) > 2 * final_error(scale_policy, experts=n)


def test_fresh_experts_hot_added_help(scale_policy):
    n = 8
    base = final_error(scale_policy, experts=n)
    grown = final_error(scale_policy, experts=n, changes=schedule(10, n, "fresh"))
    assert grown < base, (base, grown)

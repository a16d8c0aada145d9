"""The agreement rules (agreement.still_talking) at their thresholds: every runtime compares against the others,
and all of them share this function, so only its own tests see an edge moved."""

from __future__ import annotations

import numpy as np
import pytest

from badger_runtime.agreement import still_talking
from badger_runtime.config import AgreementConfig
from badger_runtime.engine import numpy_ops

OPS = numpy_ops()
ACTIVE = np.array([True, True, True])


def talking(rule, rounds_done=1, change=(0.0, 0.0, 0.0), vote=((0.0,) * 4,) * 3, **kw):
    cfg = AgreementConfig(rule=rule, rounds=4, **kw)
    cfg.validate()
    return still_talking(OPS, cfg, rounds_done, ACTIVE, np.array(change), np.array(vote)).tolist()


def test_a_quorum_ends_the_stage_once_at_least_that_fraction_votes_done():
    # quorum 0.5 of 4 experts: 2 votes over 0.5 end it, 1 does not; a vote of exactly 0.5 is not a 'done'
    votes = ((0.9, 0.9, 0.1, 0.1), (0.9, 0.1, 0.1, 0.1), (0.9, 0.5, 0.5, 0.1))
    assert talking("quorum", vote=votes, quorum=0.5) == [False, True, True]
    assert talking("quorum", vote=votes, quorum=0.25) == [False, False, False]
    assert talking("quorum", vote=((0.9,) * 4, (0.9, 0.9, 0.9, 0.1), (0.1,) * 4), quorum=1.0) == [False, True, True]


def test_convergence_ends_the_stage_when_the_largest_change_is_below_eps():
    assert talking("convergence", change=(1e-3, 0.999e-3, 0.5), eps=1e-3) == [True, False, True]


@pytest.mark.parametrize("rule", ["fixed", "convergence", "quorum"])
def test_no_rule_talks_past_its_rounds(rule):
    assert talking(rule, rounds_done=3, change=(1.0,) * 3) == [True, True, True]  # (no quorum of votes either)
    assert talking(rule, rounds_done=4, change=(1.0,) * 3) == [False, False, False]
    assert talking(rule, rounds_done=5, change=(1.0,) * 3) == [False, False, False]

"""Seats (membrane.Visibility): every expert keeps the part of the input it reads through removals,
newcomers fill the lowest free seats, and a removal that leaves parts of a partitioned membrane
unread moves the fewest experts there (rollout.rebalance_plan), the same in every runtime."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from badger_runtime.engine import Agent, InputError, numpy_ops
from badger_runtime.episodes import schedule
from badger_runtime.evaluation import run_episodes
from badger_runtime.membrane import Interface, Visibility, normal_seats, seats_after_add, seats_after_removal
from badger_runtime.policy_card import load_policy
from badger_runtime.rollout import rebalance_plan
from badger_runtime.serve.protocol import FrameDecoder, encode_frame
from badger_runtime.serve.store import StoreError, agent_record, restore_agent

OPS = numpy_ops()


def cyclic(C: int, blocks: int = 1, before: int = 0, period: int = 0) -> Interface:
    """An interface of ``before`` shared slots and then C parts (x ``blocks``) dealt out cyclically;
    with ``period`` a grid instead (the ``before`` slots dealt out by rows of ``period`` cells)."""
    J = before + C * blocks
    vis = Visibility("grid", before, J, period=period) if period else Visibility("cyclic", before, J, blocks=blocks)
    return Interface(np.zeros((1, J, 8), np.float32), np.zeros((1, C, 8), np.float32), vis)


def parts_of(itf: Interface, seats) -> list[bytes]:
    seats = np.asarray(seats)
    rows = itf.visibility.mask(len(seats), itf.slots, seats)[0]
    return sorted(r.tobytes() for r in np.packbits(rows, axis=1))


def test_newcomers_take_the_lowest_free_seats():
    assert seats_after_add(None, 4, 2) is None  # 0 .. 5
    assert seats_after_add(np.array([1, 3, 4]), 3, 3).tolist() == [1, 3, 4, 0, 2, 5]
    assert seats_after_add(np.array([2, 0]), 2, 1).tolist() == [2, 0, 1]
    assert seats_after_removal(None, 5, np.array([0, 1, 2])) is None
    assert seats_after_removal(None, 5, np.array([1, 3])).tolist() == [1, 3]
    assert normal_seats(np.arange(4)) is None and normal_seats(np.array([1, 0])).tolist() == [1, 0]


def test_a_survivor_reads_what_it_read_before_a_removal():
    """By seat, not by rank: removing expert 1 of a cyclic membrane leaves expert 2 on its own part
    (by rank it would move onto expert 1's); the 'fraction' hash and 'first' follow the seat too."""
    itf = cyclic(4)
    full = itf.visible(8)[0]
    keep = np.array([0, 2, 3, 4, 5, 6, 7])
    seats = seats_after_removal(None, 8, keep)
    assert np.array_equal(itf.visible(7, seats)[0], full[keep])
    assert not np.array_equal(itf.visible(7)[0], full[keep])  # what ranks did
    frac = Interface(itf.slot_addr, itf.out_addr, Visibility("fraction", 0, 4, fraction=0.5, seed=3))
    assert np.array_equal(frac.visible(7, seats)[0], frac.visible(8)[0][keep])
    first = Interface(itf.slot_addr, itf.out_addr, Visibility("first", 2, 4))
    v = first.visible(3, np.array([5, 2, 7]))[0]
    assert v[1, 2:].all() and not v[[0, 2], 2:].any() and v[:, :2].all()  # the lowest seat hears


def test_a_newcomer_after_a_removal_reads_the_part_left_unread():
    itf = cyclic(3)
    a = Agent(load_policy("bandit-v2")).start(itf, _wiring(6))
    a.remove_experts([1, 4])  # part 1 has no reader left; 4 experts for 3 parts: part 1 gets one back
    assert a.wiring.seats.tolist() == [0, 2, 3, 1]  # expert 5 (seat 5, part 2's second) moved to seat 1
    assert parts_of(itf, a.wiring.seats) == parts_of(itf, np.arange(4))
    a.add_experts(2, init="fresh")
    assert a.wiring.seats.tolist() == [0, 2, 3, 1, 4, 5]


def _wiring(n: int):
    from badger_runtime.rollout import sample_wiring

    return sample_wiring(np.random.default_rng(0), load_policy("bandit-v2").agent, 1, n)


@settings(max_examples=200, deadline=None)
@given(C=st.integers(1, 6), blocks=st.integers(1, 3), before=st.integers(0, 4), grid=st.booleans(),
       n0=st.integers(1, 24), data=st.data())
def test_rebalancing_restores_the_smaller_agents_parts_with_the_fewest_moves(C, blocks, before, grid, n0, data):
    """After any removal (then possibly more), in a cyclic or a grid membrane: the n survivors read
    the parts an agent of n experts reads, the experts that moved are exactly as many as the parts'
    shortfall, nobody else changes seat, and every moved expert copies a reader of its new part
    when one stayed."""
    itf = cyclic(C, 1, max(before, 1), period=max(before, 1)) if grid else cyclic(C, blocks, before)
    seats = None
    n = n0
    for _ in range(data.draw(st.integers(1, 3))):
        if n == 1:
            break
        keep = np.sort(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n - 1, unique=True)))
        seats = seats_after_removal(seats, n, keep)
        n = keep.size
        before_moves = np.arange(n) if seats is None else seats
        new, moves = rebalance_plan(itf, seats, n)
        after = np.arange(n) if new is None else new
        assert len(set(after.tolist())) == n and after.min() >= 0
        assert parts_of(itf, after) == parts_of(itf, np.arange(n))
        moved = {i for i, _ in moves}
        assert all(after[i] == before_moves[i] for i in range(n) if i not in moved)
        # as few as possible: one per missing reader of a part
        have, want = parts_of(itf, before_moves), parts_of(itf, np.arange(n))
        shortfall = sum(max(0, want.count(k) - have.count(k)) for k in set(want))
        assert len(moves) == shortfall
        stayed = set(parts_of(itf, before_moves[[j for j in range(n) if j not in moved]]))
        for i, src in moves:
            if src >= 0:
                assert src not in moved and parts_of(itf, [after[src]]) == parts_of(itf, [after[i]])
            else:  # a fresh start: no one that stayed reads the new part
                assert parts_of(itf, [after[i]])[0] not in stayed
        seats = new


def test_membranes_that_do_not_deal_out_parts_move_no_one():
    for vis in (Visibility(), Visibility("first", 1, 2), Visibility("fraction", 0, 2, fraction=0.5)):
        itf = Interface(np.zeros((1, 2, 8), np.float32), np.zeros((1, 2, 8), np.float32), vis)
        new, moves = rebalance_plan(itf, np.array([3, 5]), 2)
        assert moves == [] and new.tolist() == [3, 5]


RUNTIMES = ("sharded", "actors")  # ray shares the sharded runtime's remove_experts (ShardedMembrane)


def test_every_runtime_rebalances_the_same_way():
    """bandit-v2 (arms membrane, cyclic over K = 5 arms) loses 4 of 9 experts mid-episode: the engine,
    the sharded runtime and the per-expert actors re-seat the same experts the same way (the moved
    ones restart fresh or as clones) and compute the same outputs (the policy's initial state has
    no noise, so a fresh expert is the same everywhere). The actors drive one episode at a time
    (each its own draw of who is removed): the engine does too here (chunk 1)."""
    pol = load_policy("bandit-v2")
    kw = dict(dims=5, experts=9, episodes=3, seed=1, steps=40, chunk=1, changes=schedule(remove_at=20, remove=4))
    ref = run_episodes(OPS, pol, pol.agent, pol.task, **kw)
    same = run_episodes(OPS, pol, pol.agent, pol.task, **{**kw, "changes": ()})
    assert not np.array_equal(ref.outputs[20:], same.outputs[20:])  # the removal did something
    for runtime in RUNTIMES:
        other = run_episodes(OPS, pol, pol.agent, pol.task, runtime=runtime, **kw)
        assert np.abs(ref.outputs - other.outputs).max() <= 1e-5, runtime


def test_removing_half_the_experts_of_bandit_v2_costs_little():
    """Issue 13's removal check on the arms membrane: half of K = 10 x 2 experts go at mid-episode;
    the regret ends within 1.25x of the agent that had the smaller size from the start (seeded,
    the same episodes). Before seats (visibility by rank) it was 2.4x (42.3 vs 17.5)."""
    pol = load_policy("bandit-v2")
    kw = dict(dims=10, episodes=60, seed=0, steps=600)
    small = run_episodes(OPS, pol, pol.agent, pol.task, experts=10, **kw).metrics["regret"].sum(axis=0).mean()
    cut = run_episodes(OPS, pol, pol.agent, pol.task, experts=20, changes=schedule(remove_at=300, remove=10),
                       **kw).metrics["regret"].sum(axis=0).mean()
    assert cut <= 1.25 * small, (cut, small)


def test_seats_survive_a_snapshot_and_the_stores_checks(tmp_path):
    """An engine snapshot carries the seats; the served store's record round-trips them through the
    wire and continues identically; malformed seats are refused with a clear error."""
    pol = load_policy("bandit-v2")
    a = Agent(pol).reset(1, 8, 4, seed=3)
    rng = np.random.default_rng(0)
    for _ in range(3):
        a.step(rng.random((1, a.slots)).astype(np.float32))
    a.remove_experts([0, 5])
    wire = FrameDecoder(allow_nonfinite=True)
    wire.feed(encode_frame({"record": agent_record(a)}))
    rec = next(wire.frames())["record"]
    b = restore_agent(pol, rec)
    assert np.array_equal(b.wiring.seats, a.wiring.seats) and a.wiring.seats is not None
    for _ in range(3):
        x = rng.random((1, a.slots)).astype(np.float32)
        assert np.array_equal(a.step(x)[0], b.step(x)[0])
    assert a.add_experts(1, init="fresh") == b.add_experts(1, init="fresh")
    assert np.array_equal(a.wiring.seats, b.wiring.seats)
    for bad in (np.array([0, 0, 1, 2, 3, 4]), np.array([-1, 1, 2, 3, 4, 5]), np.array([1, 2, 3])):
        with pytest.raises(StoreError, match="seats"):
            restore_agent(pol, {**rec, "seats": bad})
    high = np.array(rec["seats"], np.int64)
    high[-1] = (1 << 40) - 1  # the store's bound on a seat: below 2^40
    restore_agent(pol, {**rec, "seats": high})
    high[-1] = 1 << 40
    with pytest.raises(StoreError, match="2\\^40"):
        restore_agent(pol, {**rec, "seats": high})
    with pytest.raises(InputError, match="seats"):
        Agent(pol).restore({**a.snapshot(), "seats": np.array([0, 1])})


def test_a_served_removal_says_which_experts_restarted(tmp_path):
    """`remove_experts` on a served session of a partitioned membrane answers which experts (indices
    after the removal) were moved to a part left short and restarted; the checkpoint keeps the
    seats, so a restarted server continues identically."""
    import shutil

    from badger_runtime.serve.sessions import SessionManager
    from badger_runtime.serve.store import SessionStore

    from .test_serve import ok

    pol = load_policy("bandit-v2")
    m = SessionManager(pol, SessionStore(tmp_path / "a", fsync=False))
    m.restore_all()
    ok(m, "open", "s", experts=6, dims=3, seed=1)
    assert ok(m, "remove_experts", "s", indices=[1, 4]) == {"experts": 4, "t": 0, "episode": 0, "restarted": [3]}
    assert ok(m, "remove_experts", "s", indices=[0])["restarted"] == []  # arm 0 keeps a reader: nobody moves
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    m2 = SessionManager(pol, SessionStore(tmp_path / "b", fsync=False))
    m2.restore_all()
    assert np.array_equal(m2.sessions["s"].agent.wiring.seats, m.sessions["s"].agent.wiring.seats)
    rng = np.random.default_rng(0)
    for _ in range(3):
        pulled = np.eye(3, dtype=np.float32)[rng.integers(3)]
        fb = pulled * rng.choice([-1.0, 1.0])
        outs = [ok(mm, "step", "s", pulled=pulled, feedback=fb)["outputs"] for mm in (m, m2)]
        assert np.array_equal(outs[0], outs[1])


def test_far_seats_cost_no_more_than_near_ones():
    """A snapshot may carry seats up to 2^40 (the store's bound): removing from such an agent looks
    only at the seats that exist and those below its size, never allocates a row per seat number."""
    pol = load_policy("bandit-v2")
    a = Agent(pol).reset(1, 4, 3, seed=0)
    snap = a.snapshot()
    b = Agent(pol).restore({**snap, "seats": np.array([0, 5, 2**39, 2**40 - 1])})
    assert b.remove_experts([0]) == 3
    # K = 3 parts: seats 5 and 2^39 both read part 2, 2^40 - 1 reads part 0, part 1 has no reader:
    # the higher of part 2's two moves to seat 1
    assert b.wiring.seats.tolist() == [5, 1, 2**40 - 1]
    b.step(np.zeros((1, b.slots), np.float32))

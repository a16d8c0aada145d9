"""Structured initial weights of the expert policy (``train.init``), set before the outer loop.

The paper names two ways to an expert policy: the outer loop's search, and "Manual/Handcrafted
Expert Policy: ... just program it ... any progress in it can lead to adding more useful
constraints to the outer loop search". ``train.init`` joins them: a handcrafted policy, written
as the weights of the same GRU cell and heads, is where the outer loop starts; training then
changes every weight. Trained from the default init, the few-shot classifier stayed at chance
for thousands of batches (docs/results.md, "What did not work").

- ``prototypes``: an online nearest-class-mean cell for the slots of ``tasks/fewshot.py`` (see
  ``prototypes``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..config import ConfigError
from ..membrane import KIND_FEEDBACK, KIND_OBSERVATION, N_KIND_FLAGS


def _offset(spec, head: str) -> int:
    return spec.head_slices[head].start


def count_units(counts: int = 3) -> list[str]:
    """The names, in ``_layout``, of the thermometer of a class's examples: unit k - 1 of the list is
    +1 once the class has k examples (``seen``, ``n2``, ``n3``, then ``n4`` .. ``n{counts}``)."""
    return ["seen", "n2", "n3", *(f"n{k}" for k in range(4, counts + 1))]


def count_prior(policy, counts: int = 8) -> np.ndarray:
    """What one more example of its class costs an expert's score, for a policy on the joinable
    prototypes cell with ``counts`` count units (a loaded or ONNX policy: anything with ``spec`` and a
    numpy ``step``): entry k - 1 is score(k examples) - score(k + 1), k = 1 .. counts - 1, the same
    expert state (seeded) otherwise, in a step that shows no example of the class (the count is kept).
    With the handcrafted readout it is 0; a learned readout's count weights w give 2 (w_k - w_(k+1))."""
    sp = policy.spec
    lay = _layout(sp.addr_dim, sp.hidden, seen_addr=True, counts=counts)
    chain = [lay[name][0] for name in count_units(counts)]
    rng = np.random.default_rng(0)
    h = np.tanh(rng.standard_normal((1, sp.hidden))).astype(np.float32)
    h[0, lay["started"][0]] = 1.0
    sensed = rng.standard_normal((1, sp.sensed_dim)).astype(np.float32)
    sensed[0, 0] = 0.0  # the label slot reads 0: no example of the class this step
    states = np.repeat(h, counts, axis=0)
    for k in range(1, counts + 1):
        states[k - 1, chain] = [1.0 if i < k else -1.0 for i in range(counts)]
    new_h, heads = policy.step(states, np.zeros((counts, sp.msg_dim), np.float32), np.repeat(sensed, counts, axis=0))
    if np.abs(new_h[:, chain] - states[:, chain]).max() > 1e-3:
        raise ValueError(f"{getattr(policy, 'name', 'this policy')} does not keep its count: not the prototypes cell")
    return -np.diff(heads[:, sp.head_slices["push_value"].start])


def _layout(A: int, H: int, seen_addr: bool = False, counts: int = 3) -> dict:
    """Which hidden units ``prototypes`` uses for what (the count units past n3 last, so that the
    others keep their places whatever ``counts`` is)."""
    lay, i = {}, 0
    for name, size in (("m", 1), ("seen", 1), ("n2", 1), ("n3", 1), ("started", 1),
                       *((f"{b[0]}_{e}", 1) for b in BUMPS for e in "+-"), ("addr", A - N_KIND_FLAGS),
                       *((("addr_seen", A - N_KIND_FLAGS),) if seen_addr else ()),
                       *((name, 1) for name in count_units(counts)[3:])):
        lay[name] = list(range(i, i + size))
        i += size
    if i > H:
        need = "19 + 2 (addr_dim - 2)" if seen_addr else "19 + addr_dim - 2"
        need += f" + {counts - 3}" if counts > 3 else ""
        raise ConfigError(f"this train.init needs policy.hidden >= {i} ({need}), got {H}")
    lay["free"] = list(range(i, H))
    return lay


#: The prototype m of a class is the mean of its first examples, then a running average that gives
#: each new example a weight of 1/4 (it forgets, so a stream whose classes change is followed; at
#: shots 1-5 this costs nothing measurable, see docs/results.md): with n examples of the class so
#: far (a thermometer: seen = n >= 1, n2 = n >= 2, n3 = n >= 3, each -1 or +1), the next one is
#: taken with weight r(n) = 1, 1/2, 1/3, 1/4, 1/4, ...
RATES = (1.0, 1 / 2, 1 / 3, 1 / 4)

#: The score's bumps: (name, r, when the last example was of the class (l = 1 or 0), the thermometer
#: unit that must be +1 (or -1 for 'first'), weight in the score). A bump compares the current
#: example with the prototype as it is once the last example is in it: m' = (1 - r) m + r x1.
BUMPS = (("old", 0.0, 0, ("seen", 1), 1.0),  # the last example was not of this class: m' = m
         ("first", 1.0, 1, ("seen", -1), 1.0),  # it was its first: m' = x1
         ("r2", 1 / 2, 1, ("seen", 1), 1.0),  # its second: m' = (m + x1) / 2 ...
         ("r2_", 1 / 2, 1, ("n2", 1), -1.0),  # ... unless it was its third or later
         ("r3", 1 / 3, 1, ("n2", 1), 1.0),
         ("r3_", 1 / 3, 1, ("n3", 1), -1.0),
         ("r4", 1 / 4, 1, ("n3", 1), 1.0))


def _count_chain(policy, chain: list[int], ell: int, gate: float):
    """A thermometer of a class's examples on the hidden units ``chain``: ``chain[0]`` (``started``) is -1,
    then +1 from the first step on (whose reads are blind: the heads start at zero); each next unit is -1
    and becomes +1 (candidate 1) when head 0's label read (input ``ell``) is 1 and the one before is +1:
    update-gate pre-activation 2G - G prev - 2G l, G (keep) unless l = 1 and prev = +1."""
    G, H = gate, policy.spec.hidden
    Z, N = H, 2 * H
    cell = policy.cell
    policy.h0[chain[0]], cell.bias_ih[N + chain[0]] = -G, G
    for unit, prev in zip(chain[1:], chain[:-1]):
        policy.h0[unit], cell.bias_ih[N + unit] = -G, G
        cell.bias_ih[Z + unit], cell.weight_hh[Z + unit, prev], cell.weight_ih[Z + unit, ell] = 2 * G, -G, -2 * G


def _seen_address(policy, units: list[int], after: int, ell: int, gain: float, gate: float):
    """On the hidden units ``units``: the class address head 0 reads (past its value ``ell`` and kind flags),
    x 0.25, taken once unit ``after`` is +1 (0 before), and ``gain`` x it added to the push key."""
    H = policy.spec.hidden
    Z, N = H, 2 * H
    cell, pk = policy.cell, _offset(policy.spec, "push_key")
    for i, u in enumerate(units):
        cell.weight_ih[N + u, ell + 1 + N_KIND_FLAGS + i] = 0.25
        cell.bias_ih[Z + u], cell.weight_hh[Z + u, after] = 0.0, -gate
        policy.heads.weight[pk + N_KIND_FLAGS + i, u] = gain


def prototypes(policy, *, scale: float = 0.2, width: float = 3.0, kappa: float = 0.5, gate: float = 12.0,
               kind_bias: float = 24.0, both_bias: float = 32.0, key_gain: float = 16.0, score_gain: float = 20.0,
               novelty: float = 0.3, seen_key_gain: float = 0.0, seen_after: str = "seen", counts: int = 3):
    """A handcrafted expert of online nearest-class-mean classification, for the slots of
    ``tasks/fewshot.py``, where expert e sees the label slot of one class c and one feature j of
    the current and of the labelled example (a grid cell (c, j); the policy itself never knows c
    or j). Needs ``policy.read_heads == 3`` and ``hidden >= addr_dim + 19``.

    - Head 0 reads the label slot (both kind flags): its value l is 1 when the last example was
      of class c, its address is class c's address. Heads 1 and 2 read feature j of the current
      example (x) and of the labelled one (x1) (observation / feedback flag).
    - State: the prototype m = scale x (mean of feature j over the examples of class c, see
      ``RATES``); a thermometer of how many examples of c came (seen, n2, n3); the class address
      (copied from head 0 each step); ``started`` (the first step, whose reads are blind, is ignored).
    - Score: a bump tanh(w u + kappa) - tanh(w u - kappa) of u = scale x (x - m'), m' the prototype
      with the labelled example in it (``BUMPS``): ~ 2 tanh(kappa) - c u^2 near u = 0, a negative
      squared distance that saturates for outliers; minus the bump's peak, so a perfect match
      scores 0 and a mismatch below 0 (x ``score_gain``). A class not seen yet scores
      -``novelty`` x score_gain: an example unlike every class seen so far goes to a new class.
    - Push key = ``key_gain`` x the class address: each output is the mean over the experts of
      its class, i.e. the mean over features of the per-feature scores (a nearest class mean).
    - Messages start silent.
    - ``seen_key_gain`` > 0 (``prototypes_joinable``): a second copy of the class address, which an
      expert writes only once its thermometer unit ``seen_after`` is +1 ("seen": one example of its
      class, "n2": two, "n3": three), adds ``seen_key_gain`` x the address to its push key. Experts
      of a class that have seen it that often then outweigh those that have not, by about
      e^(0.86 seen_key_gain) with addresses of norm sqrt(addr_dim - 2) = sqrt(14) (the push scores
      are scaled by 1 / sqrt(addr_dim)): a fresh expert hot-added to a running agent stays out of
      its class's score ("not seen yet", then a one-example prototype) until it has seen the class
      that often. Within an agent whose experts all started together nothing changes (the experts
      of a class see it at the same steps). Needs ``hidden >= 19 + 2 (addr_dim - 2)``.
    - ``counts`` > 3: the thermometer goes on past n3 (units n4 .. n{counts}: "four seen", ...), one
      more hidden unit each. They change nothing the cell computes (the prototype's rate and the bumps
      read seen, n2 and n3 only) and their score weights start at 0: they are there for a learned
      readout, so that it can tell a class seen three times from one seen ten times (the prototype of
      three examples is noisier, so its distances run larger).
    """
    spec = policy.spec
    K, A, H, Dm = spec.read_heads, spec.addr_dim, spec.hidden, spec.msg_dim
    if K != 3:
        raise ConfigError(f"train.init = 'prototypes' needs policy.read_heads = 3, got {K}")
    if counts < 3:
        raise ConfigError(f"prototypes: counts must be >= 3, got {counts}")
    lay = _layout(A, H, seen_addr=seen_key_gain > 0, counts=counts)
    if seen_after not in ("seen", "n2", "n3"):
        raise ConfigError(f"prototypes: seen_after must be 'seen', 'n2' or 'n3', got {seen_after!r}")
    obs, fb = KIND_OBSERVATION, KIND_FEEDBACK
    val = [Dm + k * spec.read_width for k in range(K)]  # input index of head k's read value
    ell, x, xl = val

    cell = policy.cell
    Wi, Wh, bi, bh = cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh
    R, Z, N = 0, H, 2 * H  # gate row offsets of torch's GRUCell: reset, update, candidate
    (m,), (seen,), (n2,), (n3,), (started,) = (lay[k] for k in ("m", "seen", "n2", "n3", "started"))
    w = width * scale
    G = gate
    with torch.no_grad():
        for t in (Wi, Wh, bi, bh, policy.heads.weight, policy.heads.bias, policy.h0):
            t.zero_()
        bi[R:R + H] = G  # r = 1: every candidate sees the whole state
        bi[Z:Z + H] = -G  # by default a unit takes its candidate every step
        for u in lay["free"]:  # spare units keep their initial state
            bi[Z + u] = G
        # started, then the thermometer seen, n2, n3 (, n4, ...): seen needs the agent to have started (before
        # its first step an expert's read queries are zero: its label head reads a mix of its slots)
        _count_chain(policy, [started] + [lay[name][0] for name in count_units(counts)], ell, G)
        # m: kept unless l = 1, then taken with weight r(n) (update gate 1 - r(n)): pre-activation
        # 2G (1 - l) + c + d1 seen + d2 n2 + d3 n3 = logit(1 - r(n)) for n = 0 (-G), 1, 2, >= 3
        logit = [float(torch.logit(torch.tensor(1 - r))) for r in RATES[1:]]
        d2 = (logit[1] - logit[0]) / 2
        d3 = (logit[2] - logit[1]) / 2
        d1 = G / 2
        c = logit[0] - d1 + d2 + d3
        bi[Z + m], Wi[Z + m, ell] = 2 * G + c, -2 * G
        Wh[Z + m, seen], Wh[Z + m, n2], Wh[Z + m, n3] = d1, d2, d3
        Wi[N + m, xl] = scale
        # bumps tanh(w u +- kappa), u = scale x (x - m'), m' = (1 - r) m + r x1; off (both tanh at -1)
        # unless their conditions on l and the thermometer hold
        for name, r, when_l, (unit, sign_unit), _ in BUMPS:
            for e, sign in (("+", 1.0), ("-", -1.0)):
                (u,) = lay[f"{name}_{e}"]
                Wi[N + u, x], Wi[N + u, xl], bi[N + u] = w, -w * r, sign * kappa
                Wh[N + u, m] = -width * (1 - r)
                Wi[N + u, ell] = 2 * G if when_l else -2 * G
                bi[N + u] -= 2 * G if when_l else 0.0
                Wh[N + u, lay[unit][0]], bh[N + u] = G * sign_unit, -G
        for i, u in enumerate(lay["addr"]):  # class c's address, read by head 0
            Wi[N + u, val[0] + 1 + N_KIND_FLAGS + i] = 0.25
        # the same, taken once the unit seen_after is +1 (0 before), x seen_key_gain in the push key
        _seen_address(policy, lay.get("addr_seen", []), lay[seen_after][0], ell, seen_key_gain, G)

        W, b = policy.heads.weight, policy.heads.bias
        rq = _offset(spec, "read_query")
        b[rq + obs] = b[rq + fb] = both_bias  # head 0: the label slot
        b[rq + A + obs], b[rq + A + fb] = kind_bias, -kind_bias  # head 1: the feature
        b[rq + 2 * A + obs], b[rq + 2 * A + fb] = -kind_bias, kind_bias  # head 2: the labelled example's
        pk = _offset(spec, "push_key")
        for i, u in enumerate(lay["addr"]):
            W[pk + N_KIND_FLAGS + i, u] = key_gain
        pv = _offset(spec, "push_value")
        for name, *_, weight in BUMPS:
            W[pv, lay[f"{name}_+"][0]], W[pv, lay[f"{name}_-"][0]] = weight * score_gain, -weight * score_gain
        peak = 2 * float(torch.tanh(torch.tensor(kappa)))
        # seen: - peak x score_gain (a perfect match scores 0); not seen: - novelty x score_gain
        W[pv, seen] = score_gain * (novelty - peak) / 2
        b[pv] = -score_gain * (novelty + peak) / 2
    return policy


def prototype_wiring(policy, **kw):
    """``prototypes``' wiring with its learning rule left to the outer loop: who reads what (the read
    queries of the label slot, the current and the labelled example), the class address copied into
    the state (``addr``) and the push key made of it are the handcrafted cell's; every other hidden
    unit's GRU rows and initial state keep the default random initialisation (the draw ``train.seed``
    made), the push value starts at zero (every score 0: the loss at chance) and messages are silent
    (their heads zero). So an outer loop that trains ``cell.``, ``h0`` and ``heads:push_value`` has to
    find the running class mean and the distance to it, the learning rule itself, from random weights,
    each expert on its own (class, feature) cell."""
    spec = policy.spec
    H = spec.hidden
    with torch.no_grad():
        random = {n: p.detach().clone() for n, p in policy.named_parameters()}
    prototypes(policy, **kw)
    lay = _layout(spec.addr_dim, H, seen_addr=kw.get("seen_key_gain", 0.0) > 0, counts=kw.get("counts", 3))
    keep = set(lay["addr"]) | set(lay.get("addr_seen", ()))  # the wiring's own units
    _restore_rows(policy, random, [u for u in range(H) if u not in keep])
    where = spec.head_slices
    with torch.no_grad():
        pv = where["push_value"]  # zero: every score 0, the loss at chance; its gradient reaches the GRU at once
        policy.heads.weight[pv] = 0.0
        policy.heads.bias[pv] = 0.0
        for head in ("query", "key", "value", "vote"):  # silent messages (zero values), no vote
            policy.heads.weight[where[head]] = 0.0
            policy.heads.bias[where[head]] = 0.0
    return policy


def seen_gate(source, policy, *, seen_key_gain: float = 8.0, seen_after: str = "n2", gate: float = 12.0):
    """``source`` (a policy on the prototype cell's wiring, its rule learned: ``prototype_wiring``) made
    safe to grow. ``policy`` is ``source`` with hidden units appended that none of the source's units
    reads: a thermometer of the class's examples (``started``, ``seen``, then ``n2`` ... up to
    ``seen_after``: -1, and +1 from the step after head 0's read of the label slot says the example was
    of the class, the one before being +1) and a copy of the class address (``addr_seen``) taken once
    ``seen_after`` is +1, added x ``seen_key_gain`` to the push key (as ``prototypes``'
    ``seen_key_gain``). A fresh expert hot-added to a running agent then stays out of its class's score
    until it has seen its class ``seen_after`` times; in an agent whose experts all started together
    little changes (a class's experts count the same examples; only on the outputs of classes not seen
    that often yet do other classes' experts weigh more). The new units are wiring: who counts what and
    what the key says. ``policy.hidden`` must be ``source``'s + the new units (2 + the thermometer past
    ``seen`` + addr_dim - 2); its other sizes ``source``'s."""
    src, spec = source.spec, policy.spec
    chain_names = ["started"] + count_units(3)
    if seen_after not in chain_names[1:]:
        raise ConfigError(f"seen_gate: seen_after must be one of {chain_names[1:]}, got {seen_after!r}")
    chain_names = chain_names[:chain_names.index(seen_after) + 1]
    H0, A = src.hidden, spec.addr_dim
    new = len(chain_names) + A - N_KIND_FLAGS
    if spec != dataclasses.replace(src, hidden=H0 + new):
        raise ConfigError(f"train.init = 'seen_gate' needs agent.policy = the source's with hidden = {H0} + {new} "
                          f"= {H0 + new}, got {spec} (source {src})")
    H, G = spec.hidden, gate
    chain = list(range(H0, H0 + len(chain_names)))
    addr_seen = list(range(H0 + len(chain_names), H))
    ell = spec.msg_dim  # head 0's read value: the label slot's (1: the example was of this class)
    R, Z = 0, H
    w = source.state_dict()
    old = torch.tensor([g * H + u for g in range(3) for u in range(H0)])  # source's rows in the new layout
    with torch.no_grad():
        cell = policy.cell
        for t in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, policy.heads.weight, policy.h0):
            t.zero_()
        cell.weight_ih[old] = w["cell.weight_ih"]
        cell.weight_hh[old, :H0] = w["cell.weight_hh"]
        cell.bias_ih[old] = w["cell.bias_ih"]
        cell.bias_hh[old] = w["cell.bias_hh"]
        policy.h0[:H0] = w["h0"]
        policy.heads.weight[:, :H0] = w["heads.weight"]
        policy.heads.bias[:] = w["heads.bias"]
        for u in chain + addr_seen:  # r = 1; by default a unit takes its candidate every step
            cell.bias_ih[R + u], cell.bias_ih[Z + u] = G, -G
        _count_chain(policy, chain, ell, G)
        _seen_address(policy, addr_seen, chain[-1], ell, seen_key_gain, G)
    return policy


def push_gate(source, policy):
    """``source``'s weights, made ready for output addresses that carry the observation flag (the guessing
    game's ``task.output_flag``): the heads' rows that read that flag on the push side (the push key's entry,
    which becomes a gate on the push attention, and the push value's, which would add a constant to every
    output) are zeroed, so the policy computes what ``source`` computed, flag or not, and training can then
    learn the gate (an expert that has seen little can keep out of every output at once)."""
    policy.load_state_dict(source.state_dict())
    sl = policy.spec.head_slices
    rows = [sl["push_key"].start + KIND_OBSERVATION, sl["push_value"].start + 1 + KIND_OBSERVATION]
    with torch.no_grad():
        policy.heads.weight[rows] = 0.0
        policy.heads.bias[rows] = 0.0
    return policy


#: Surgeries (``train.init`` with ``train.init_from``): a new policy made from trained weights.
#: "seen_gate" (fewshot-v6 from fewshot-v5, docs/results.md): gate after two examples, gain 8, as fewshot-v2's.
#: Measured on v5 (256 fresh experts join 256 at step 20 of 40, 4-way held-out digits, 300 episodes, seed 0;
#: unchanged 0.930 at the join step, 0.910 over steps 31-40; iris / wine at 25 examples, 300 episodes:
#: v5 0.774 / 0.831): gain 8: grown 0.873 / 0.904, unchanged iris / wine 0.773 / 0.830; gain 16: 0.910 / 0.904,
#: 0.770 / 0.824; gain 24: 0.927 / 0.904, 0.764 / 0.817. A larger gain keeps a fresh expert's first key out
#: at the join (the trained address units start long) but lets a class seen twice outweigh, on the outputs of
#: classes not seen twice yet, their own experts (its key is longer): the unchanged agent loses on the datasets.
#: Gated after three examples (gain 16) 0.893 / 0.904; v5's push key x 2 and gain 16 0.840 / 0.899; v5's address
#: units starting at 0 (gain 8) 0.857 / 0.903.
#: "push_gate" (dimensions-v6's start from dimensions-v5, docs/results.md): the push side's flag rows zeroed.
SURGERIES = {"seen_gate": seen_gate, "push_gate": push_gate}


def _route_to_arm(policy, a_units: list[int], *, key_gain: float, kind_bias: float, gate: float):
    """The part of a cell on the ``arms`` membrane that says *which* arm an expert holds: read head 0
    on the ``pulled`` slot (observation flag), head 1 on the ``feedback`` slot (feedback flag), the
    units ``a_units`` taking 0.25 x head 0's read address (the arm's address) at every step, and the
    push key = ``key_gain`` x that copy (each output mixes the experts of its arm). Sets only these
    weights; the caller clears what they must not mix with."""
    spec = policy.spec
    A, H = spec.addr_dim, spec.hidden
    a_in = spec.msg_dim + 1 + N_KIND_FLAGS  # head 0's read address, past its kind flags
    cell = policy.cell
    Z, N = H, 2 * H
    with torch.no_grad():
        for i, u in enumerate(a_units):
            cell.bias_ih[Z + u] = -gate  # take the candidate every step
            cell.weight_ih[N + u, a_in + i] = 0.25
        b = policy.heads.bias
        rq = _offset(spec, "read_query")
        b[rq + KIND_OBSERVATION], b[rq + KIND_FEEDBACK] = kind_bias, -kind_bias
        b[rq + A + KIND_OBSERVATION], b[rq + A + KIND_FEEDBACK] = -kind_bias, kind_bias
        pk = _offset(spec, "push_key")
        for i, u in enumerate(a_units):
            policy.heads.weight[pk + N_KIND_FLAGS + i, u] = key_gain


def arm_routing(policy, *, key_gain: float = 16.0, kind_bias: float = 8.0, gate: float = 12.0):
    """A scaffold for the bandit's ``arms`` membrane (``tasks/bandit.py``, ``arms_interface``), where
    expert e reads the two slots of one arm (``pulled`` and ``feedback``, both at the arm's address):
    only the part of the cell that says *which* arm is set by hand, every other weight keeps its
    default (random) init for the outer loop to learn the statistics.

    - Read head 0 reads the ``pulled`` slot (observation flag), head 1 the ``feedback`` slot
      (feedback flag): their values are first-order inputs of the cell.
    - The last ``addr_dim - 2`` hidden units copy the arm's address (read by head 0) at every step.
    - Push key = ``key_gain`` x that copy: each output is then the mean of the push values of the
      experts of its arm, so an expert's score reaches its own arm from the first batch.

    Found necessary: from the default init the arms policy stayed at chance for 200 batches (it
    must learn to route its score to its arm and what to score at once; docs/results.md)."""
    spec = policy.spec
    A, H = spec.addr_dim, spec.hidden
    if spec.read_heads < 2 or spec.competitive_heads:
        raise ConfigError("train.init = 'arm_routing' needs policy.read_heads >= 2 and no competitive heads")
    a_units = list(range(H - (A - N_KIND_FLAGS), H))
    if a_units[0] < 4:
        raise ConfigError(f"train.init = 'arm_routing' needs policy.hidden >= addr_dim + 2, got {H}")
    cell = policy.cell
    with torch.no_grad():  # clear the address units, the read queries and the push key, then route
        for g in (0, H, 2 * H):
            for u in a_units:
                cell.weight_ih[g + u].zero_()
                cell.weight_hh[g + u].zero_()
                cell.bias_ih[g + u] = cell.bias_hh[g + u] = 0.0
        cell.weight_hh[:, a_units] = 0.0  # the address copy does not feed the other units (they may learn to)
        policy.h0[a_units] = 0.0
        W, b = policy.heads.weight, policy.heads.bias
        for head, size in (("read_query", 2 * A), ("push_key", A)):
            o = _offset(spec, head)
            W[o:o + size] = 0.0
            b[o:o + size] = 0.0
    _route_to_arm(policy, a_units, key_gain=key_gain, kind_bias=kind_bias, gate=gate)
    return policy


#: The pull-count units of ``arm_index``: unit j moves from -1 towards +1 by a fraction alpha_j of
#: the way at each pull of the arm, c_j(n) = 1 - 2 (1 - alpha_j)^n after n pulls (a geometric
#: thermometer whose rates span 1 to ~2,000 pulls); functions of n are read from them linearly.
ARM_RATES = (0.5, 0.25, 0.1, 0.04, 0.015, 0.005, 0.002)
ARM_FIT_N = 3000  # the counts the linear read-outs are fitted on (n = 1 .. ARM_FIT_N)
ALARM_GATE = (3, 0.8)  # arm_index's shared alarm: the count unit that opens it, and around which level


def _count_codes(n: np.ndarray) -> np.ndarray:
    """[len(n), len(ARM_RATES) + 2]: the count units c_j(n), ``seen`` (n >= 1: +1, else -1) and 1."""
    c = 1.0 - 2.0 * (1.0 - np.asarray(ARM_RATES))[None, :] ** np.asarray(n, np.float64)[:, None]
    return np.concatenate([c, np.where(n >= 1, 1.0, -1.0)[:, None], np.ones((len(n), 1))], axis=1)


def count_readout(target, *, first: float) -> np.ndarray:
    """Weights w (over the count units, ``seen`` and a bias) with codes(n) . w ~ target(n) for
    n = 1 .. ARM_FIT_N (least squares) and = ``first`` at n = 0."""
    n = np.arange(1, ARM_FIT_N + 1)
    X, y = _count_codes(n), np.asarray(target(n), np.float64)
    X = np.concatenate([X[:, :-2], X[:, -1:]], axis=1)  # seen = +1 for every n >= 1: folded into the bias
    w = np.linalg.lstsq(X, y, rcond=None)[0]
    cw, bias = w[:-1], w[-1]
    at0 = -cw.sum() + bias  # what the fit says at n = 0 (c_j = -1), before the seen term
    ws = (at0 - first) / 2.0  # seen: +ws for n >= 1, -ws at n = 0, the bias moved by -ws
    return np.concatenate([cw, [ws, bias - ws]])


def _arm_layout(spec) -> dict:
    """``arm_index``'s hidden units: ``seen`` and ``m`` (the running mean) one each, the count units
    (``ARM_RATES``), the arm's address and its joined copy (``addr_dim - 2`` each), then the free units
    (``join_more``'s copies first, then units that keep their state)."""
    J, Aa = len(ARM_RATES), spec.addr_dim - N_KIND_FLAGS
    return {"seen": 0, "m": 1, "counts": list(range(2, 2 + J)), "addr": list(range(2 + J, 2 + J + Aa)),
            "joined": list(range(2 + J + Aa, 2 + J + 2 * Aa)), "free": list(range(2 + J + 2 * Aa, spec.hidden))}


def _restore_rows(policy, random: dict, units: list[int]):
    """Give ``units`` back the GRU rows (reset, update, candidate) and initial state of ``random`` (the
    parameters as the seed drew them, before a handcrafted init wrote them)."""
    H = policy.spec.hidden
    rows = torch.tensor([g * H + u for g in range(3) for u in units])
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(policy.cell, name)[rows] = random[f"cell.{name}"][rows]
        policy.h0[units] = random["h0"][units]


def _write_pull_counter(policy, seen: int, counts: list[int], p_in: int, G: float):
    """``seen`` and the count units (``ARM_RATES``), written over whatever their GRU rows held (reading nothing
    but input ``p_in``, 1 on a pull of the expert's arm): each goes -1 -> +1, ``seen`` at the first pull, count
    unit j by a fraction alpha_j of the way at each pull, and keeps its value off a pull."""
    H, Wi, bi = policy.spec.hidden, policy.cell.weight_ih, policy.cell.bias_ih
    R, Z, N = 0, H, 2 * H
    units = [seen] + counts
    rows = [g * H + u for g in range(3) for u in units]
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(policy.cell, name)[rows] = 0.0
        for u in units:
            bi[R + u] = bi[Z + u] = G  # reset gate open; update gate shut (the state kept) but on a pull
        for u in units:  # -1 -> +1: candidate +1, taken at rate alpha on a pull
            policy.h0[u], bi[N + u] = -G, G
        bi[Z + seen], Wi[Z + seen, p_in] = G, -2 * G  # p = 1: z = sigma(-G), takes +1 at once
        for u, a in zip(counts, ARM_RATES):
            lg = float(np.log((1 - a) / a))
            bi[Z + u], Wi[Z + u, p_in] = lg + 2 * G, -2 * G


def arm_index(policy, *, beta: float = 12.0, kappa: float = 0.5, n_cap: int | None = 100, w: float = 0.5,
              key_gain: float = 16.0, join_gain: float = 8.0, join_after: int = 5, kind_bias: float = 8.0,
              gate: float = 12.0, join_more: tuple[tuple[int, float], ...] = (),
              detect: tuple[int, float] | None = None, share_alarm: bool = False):
    """A handcrafted index cell for the bandit's ``arms`` membrane (``tasks/bandit.py``): expert e
    reads arm e mod K's ``pulled`` slot (head 0: value p, 1 on a pull of its arm) and ``feedback`` slot
    (head 1: value x = 2 x loss - 1, -1 a win, +1 a loss) and keeps its arm's statistics:

    - ``seen`` (-1 -> +1 at the first pull) and the count units c_j (``ARM_RATES``), updated on a pull
      only (the counts never forget);
    - m, the running mean of tanh(-w x) over the pulls (tanh(w) (2 mu - 1) for a Bernoulli arm of
      mean mu): a pull after n earlier ones enters with weight 1 / (n + 1), the GRU's update gate
      at logit ln n, read linearly from the count units (``count_readout``); with ``n_cap`` the
      weight stops falling at 1 / n_cap (an exponential average over the last ~n_cap pulls: it
      follows an arm whose mean moved). 100 (bandit-v2) measured better than no cap on stationary
      arms too; 25 (bandit-v3) re-finds the best arm after the means change (continual);
    - the arm's address (head 0's read address) copied every step, and a second copy written once
      the arm was pulled ``join_after`` times, both in the push key (``key_gain``, ``join_gain``):
      an expert that joined late (hot-added) stays out of its arm's score until it has seen that
      many pulls itself, by a factor ~exp(join_gain) in the push weights. ``join_more`` =
      ((pulls, gain), ...) writes further copies at further counts, so that among the experts of an
      arm the more experienced outweigh the newer at every level (a newcomer's young running mean
      is not averaged with a long one); each needs ``addr_dim - 2`` more hidden units;
    - ``detect = (fast_cap, threshold)``: a change detector. A second running mean of the same
      rewards with its rate capped at 1 / fast_cap (the last ~fast_cap pulls) beside m; two units
      that turn +1 when the fast mean is more than ``threshold`` above or below m (in m's units,
      tanh(w) (2 mu - 1)); while one of them is +1 the count units are reset to "never pulled".
      The arm's next pull then weighs fully in both means (their rates read the counts) and its
      bonus is a fresh arm's: a long memory on stationary arms, a short one after a change.
      ``share_alarm``: an alarm unit (+1 while up or down is) is broadcast in a message, and every
      expert resets its counts when its inbox says some expert raised one: a change seen on one arm
      restarts the exploration of all of them (the arms that were not being pulled are the ones
      whose change nobody can see). The alarm's key outweighs the silent experts' by ~45 logits, so
      the inbox is the alarm whatever the number of experts (a soft "any"). The alarm is armed once
      the arm was pulled ~30 times since its counts last restarted (``ALARM_GATE``); silent experts
      send 0, so one that has not stepped yet (no heads) is silent too.

    Push value (the arm's score) = beta x (m / tanh(w) + kappa / sqrt(n + 1)) (an estimate of
    2 mu - 1 plus an exploration bonus that falls with the pulls, read linearly from the count
    units); the environment then samples the arm from softmax(scores / temperature). Messages are
    off (zero weights) unless ``share_alarm``: each expert keeps its own arm's statistics, the choice
    between arms is the membrane's. Needs ``read_heads = 2`` and ``hidden >= 2 (addr_dim - 2) +
    len(ARM_RATES) + 2`` (+ ``addr_dim - 2`` per ``join_more`` level, + 3 with ``detect``, + 1 with
    ``share_alarm``)."""
    spec = policy.spec
    A, H, Dm = spec.addr_dim, spec.hidden, spec.msg_dim
    if spec.read_heads != 2 or spec.competitive_heads or spec.read_moments:
        raise ConfigError("train.init = 'arm_index' needs policy.read_heads = 2 (no competitive heads or moments)")
    J, Aa = len(ARM_RATES), A - N_KIND_FLAGS
    need = 2 * Aa + J + 2 + len(join_more) * Aa + (3 if detect else 0) + (1 if share_alarm else 0)
    if share_alarm and not detect:
        raise ConfigError("arm_index: share_alarm needs detect")
    if H < need:
        raise ConfigError(f"train.init = 'arm_index' needs policy.hidden >= {need}, got {H}")
    lay = _arm_layout(spec)
    seen, m, counts, addr, joined, free = (lay[k] for k in ("seen", "m", "counts", "addr", "joined", "free"))
    p_in, x_in = Dm, Dm + spec.read_width  # input index of head 0's and head 1's read values
    a_in = Dm + 1 + N_KIND_FLAGS  # head 0's read address (past its kind flags)
    G = gate
    cap = float(n_cap) if n_cap else np.inf
    rate_logit = count_readout(lambda n: np.log(np.clip(n, 1.0, cap)), first=-G)  # z logit of m: ln n
    bonus = count_readout(lambda n: 1.0 / np.sqrt(n + 1.0), first=1.0)
    jth = 1.0 - 2.0 * (1.0 - ARM_RATES[2]) ** (join_after - 0.5)  # c_2 between join_after - 1 and join_after pulls
    cell = policy.cell
    Wi, Wh, bi, bh = cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh
    R, Z, N = 0, H, 2 * H
    t = lambda a: torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
    with torch.no_grad():
        for x in (Wi, Wh, bi, bh, policy.heads.weight, policy.heads.bias, policy.h0):
            x.zero_()
        bi[R:R + H] = G  # r = 1
        bi[Z:Z + H] = G  # by default a unit keeps its state (free units, and everything off a pull)
        _write_pull_counter(policy, seen, counts, p_in, G)
        def running_mean(u: int, logit: np.ndarray):
            """Unit u: candidate tanh(-w x); on a pull z = sigma(logit(n)) (ln n: 1 / (n + 1) of the
            new value, a running mean), off a pull z = sigma(2G + ...) ~ 1."""
            Wi[N + u, x_in] = -w
            Wh[Z + u, counts] = t(logit[:J])
            Wh[Z + u, seen] = float(logit[J])
            bi[Z + u], Wi[Z + u, p_in] = float(logit[J + 1]) + 2 * G, -2 * G

        running_mean(m, rate_logit)
        # address copies in the push key, each written once a count unit passes its threshold: the
        # first (c_2, gain 40: v2's) after join_after pulls, then join_more's, each on the count unit
        # steepest at its count, ~4 logits per pull there
        copies = [(joined, counts[2], jth, 40.0, join_gain)]
        for pulls, g in join_more:
            rate = max(ARM_RATES, key=lambda a: (1 - a) ** pulls * -np.log(1 - a))
            units, free = free[:Aa], free[Aa:]
            copies.append((units, counts[ARM_RATES.index(rate)], 1.0 - 2.0 * (1.0 - rate) ** (pulls - 0.5),
                           4.0 / (2.0 * (1.0 - rate) ** pulls * -np.log(1 - rate)), g))
        for units, u, th, steep, _ in copies:
            for i, v in enumerate(units):
                Wi[N + v, a_in + i] = 0.25
                bi[Z + v], Wh[Z + v, u] = steep * th, -steep
        if detect:
            fast_cap, threshold = detect
            (f, up, down), free = free[:3], free[3:]
            # the fast mean: m's, its rate capped at 1 / fast_cap
            running_mean(f, count_readout(lambda n: np.log(np.clip(n, 1.0, float(fast_cap))), first=-G))
            steep = 4.0 * G / threshold  # +-1 within ~threshold / 4 of the threshold
            for u, sign in ((up, 1.0), (down, -1.0)):  # +1 while sign (fast - m) > threshold; taken every step
                policy.h0[u], bi[Z + u] = -G, -G
                Wh[N + u, f], Wh[N + u, m], bi[N + u] = sign * steep, -sign * steep, -steep * threshold
            if share_alarm:  # the alarm: +1 while up or down is, once the arm was pulled ~30 times since
                # its counts last restarted (count unit c_3, rate 0.04, past ~0.4: early on the two means'
                # rates are read-outs fitted over all counts, and they differ by more than their noise);
                # sent in the message (value 0: 1 raised, 0 not) with a loud key
                (alarm,), free = free[:1], free[1:]
                policy.h0[alarm], bi[Z + alarm] = -G, -G
                gate = G / (2 * (1 - ALARM_GATE[1]))  # +G/2 when c_3 = 1, below -G when c_3 < 2 c0 - 1
                Wh[N + alarm, up] = Wh[N + alarm, down] = G
                Wh[N + alarm, counts[ALARM_GATE[0]]] = gate
                bi[N + alarm] = G - gate * ALARM_GATE[1]
            for u in counts:  # a change: candidate -1, taken at once
                if share_alarm:  # inbox value 0: ~1 when some expert's alarm is up, else ~0
                    Wi[N + u, 0] = -2 * G
                    Wi[Z + u, 0] = -3 * G
                else:  # this expert's own up or down
                    bi[N + u] -= 2 * G
                    Wh[N + u, up] = Wh[N + u, down] = -G
                    bi[Z + u] -= 3 * G
                    Wh[Z + u, up] = Wh[Z + u, down] = -1.5 * G
        for u in free:
            bi[Z + u] = G
        W, b = policy.heads.weight, policy.heads.bias
        if share_alarm:
            qo, ko, vo = _offset(spec, "query"), _offset(spec, "key"), _offset(spec, "value")
            b[qo] = 8.0
            W[ko, alarm], b[ko] = 8.0, 8.0  # key 0 or 16: score 0 or 8 x 16 / sqrt(key_dim)
            W[vo, alarm], b[vo] = 0.5, 0.5  # 1 raised, 0 not: an expert that has not stepped yet (no heads) is silent
        pk = _offset(spec, "push_key")
        for units, _, _, _, g in copies:
            for i, v in enumerate(units):
                W[pk + N_KIND_FLAGS + i, v] = g
        pv = _offset(spec, "push_value")
        W[pv, m] = beta / float(np.tanh(w))
        W[pv, counts] = t(beta * kappa * bonus[:J])
        W[pv, seen] = beta * kappa * float(bonus[J])
        b[pv] = beta * kappa * float(bonus[J + 1])
    _route_to_arm(policy, addr, key_gain=key_gain, kind_bias=kind_bias, gate=G)
    return policy


def arm_count_wiring(policy, **kw):
    """``arm_index``'s wiring and its pull counter, with its learning rule left to the outer loop (what
    ``prototype_wiring`` is to the few-shot cell): who reads what (head 0 the arm's ``pulled`` slot, head 1
    its ``feedback`` slot), the arm's address copied into the state and the push key made of it (both
    copies: the graded join), and the ``seen`` and count units (a thermometer of the arm's pulls, rates
    ``ARM_RATES``) are the handcrafted cell's; the running mean's unit and every free unit keep the default
    random rows and initial state (the draw ``train.seed`` made), the push value starts at zero (every arm
    scores 0: the choice uniform) and messages are silent. An outer loop that trains ``cell.``, ``h0`` and
    ``heads:push_value`` has to find what to remember of the rewards, how to update it on a pull and how to
    score an arm from it and the counts: the rule the hand-written cell writes as a 1 / n running mean and
    beta (mean + kappa / sqrt(n + 1))."""
    spec = policy.spec
    with torch.no_grad():
        random = {n: p.detach().clone() for n, p in policy.named_parameters()}
    arm_index(policy, **kw)
    lay = _arm_layout(spec)
    _restore_rows(policy, random, [lay["m"]] + lay["free"])  # the running mean's unit and the free units
    with torch.no_grad():
        pv = spec.head_slices["push_value"]
        policy.heads.weight[pv] = 0.0
        policy.heads.bias[pv] = 0.0
    return policy


def arm_routing_counts(policy, *, gate: float = 12.0):
    """``arm_routing`` (the arm's reads and address by hand, every other weight random and learned) with
    ``arm_index``'s pull counter written into its first units (``seen`` and the seven count units): the
    random units can read how often their arm was pulled, up to ~2,000 pulls, which the outer loop's gradients
    over truncated lives never showed them how to count."""
    arm_routing(policy, gate=gate)
    # its first units (arm_routing's address units are the last ones); head 0's read value is input msg_dim
    _write_pull_counter(policy, 0, list(range(1, 1 + len(ARM_RATES))), policy.spec.msg_dim, gate)
    return policy


#: bandit-v4's settings of ``arm_index`` (bandit-v5 adds its change alarm to them)
ARM_INDEX_SHARP = dict(beta=48.0, kappa=0.8, n_cap=400, join_after=2, join_more=((20, 8.0), (100, 8.0)))

INITS = {"prototypes": prototypes,
         # the wiring of the prototype cell (reads, class address, push key); its learning rule random, to be learned
         "prototype_wiring": prototype_wiring,
         "arm_index": arm_index,
         # bandit-v3: a shorter memory for the running mean (the last ~25 pulls): it passes the 10,000-step
         # check with changing means, at a small cost on stationary arms (docs/results.md)
         "arm_index_continual": lambda policy: arm_index(policy, n_cap=25),
         # bandit-v4: bandit-v2's cell with a sharper choice and a larger bonus (beta 48, kappa 0.8) and a longer
         # memory (cap 400), tuned on 1,000 training-distribution episodes: K = 2 within 1.2x of Thompson; the
         # push key graded by experience (copies at 2, 20 and 100 pulls; hidden 128) so that fresh experts do not
         # hurt it (docs/results.md)
         "arm_index_sharp": lambda policy: arm_index(policy, **ARM_INDEX_SHARP),
         # bandit-v5: bandit-v4's cell with a change detector (a fast mean over ~20 pulls against the long one;
         # an alarm past 0.16) whose alarm every expert hears in a message and answers by restarting its counts:
         # one policy for stationary arms (K = 2 within 1.2x of Thompson) and changing ones (the 10,000-step check)
         "arm_index_alarm": lambda policy: arm_index(policy, **ARM_INDEX_SHARP, detect=(20, 0.16), share_alarm=True),
         "arm_routing": arm_routing,
         # arm_index's wiring and pull counter; the running mean, its update and the score to be learned
         "arm_count_wiring": arm_count_wiring,
         # arm_routing with arm_index's pull counter in its first units
         "arm_routing_counts": arm_routing_counts,
         # measured (docs/results.md, fewshot-v2): gain 8 after two examples keeps a hot-add of as many
         # fresh experts again within 0.005 of the unchanged agent; gated after one example, 0.016 below
         "prototypes_joinable": lambda policy: prototypes(policy, seen_key_gain=8.0, seen_after="n2"),
         # fewshot-v4: the same cell with its count of a class's examples going on to 8 (units n4 .. n8, score
         # weights 0), for a learned readout (fewshot-v3's prior could only tell 1, 2 and >= 3 examples apart)
         "prototypes_joinable_counts": lambda policy: prototypes(policy, seen_key_gain=8.0, seen_after="n2",
                                                                 counts=8)}


def apply_init(name: str, policy):
    if name not in INITS:
        raise ConfigError(f"train.init must be '' or one of {sorted(INITS)} (or, with train.init_from, "
                          f"{sorted(SURGERIES)}), got {name!r}")
    return INITS[name](policy)

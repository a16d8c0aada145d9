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

import torch

from ..config import ConfigError
from ..membrane import KIND_FEEDBACK, KIND_OBSERVATION, N_KIND_FLAGS


def _offset(spec, head: str) -> int:
    i = 0
    for name, size in spec.heads:
        if name == head:
            return i
        i += size
    raise KeyError(head)


def _layout(A: int, H: int) -> dict:
    """Which hidden units ``prototypes`` uses for what."""
    lay, i = {}, 0
    for name, size in (("m", 1), ("count", 1), ("seen", 1), *((f"{b}_{e}", 1) for b, *_ in BUMPS for e in "+-"),
                       ("addr", A - N_KIND_FLAGS)):
        lay[name] = list(range(i, i + size))
        i += size
    if i > H:
        raise ConfigError(f"train.init = 'prototypes' needs policy.hidden >= {i} (11 + addr_dim - 2), got {H}")
    lay["free"] = list(range(i, H))
    return lay


#: The update gate of the prototype for the n-th example of its class (n >= 2) is
#: sigmoid(COUNT_BIAS + COUNT_GAIN x count), count = 1 - 2 x COUNT_RATE^(n - 1): close to 1 - 1/n
#: (0.50, 0.66, 0.75, 0.81, 0.84 for n = 2..6), so the prototype is close to the mean of the
#: examples (least-squares fit of log(n - 1), n = 2..9).
COUNT_RATE, COUNT_BIAS, COUNT_GAIN = 0.7, 0.622, 1.563

#: The score's bumps: (name, against the prototype 'm' or the labelled example 'x1', when the last
#: example was of the class (l = 1 or 0), when the class was seen before (seen = 1 or -1), weight).
BUMPS = (("old", "m", 0, 1, 1.0),  # a class seen before, the last example not of it
         ("same", "m", 1, 1, 0.5),  # ... the last example of it (not yet in m): half m, ...
         ("again", "x1", 1, 1, 0.5),  # ... half the labelled example
         ("first", "x1", 1, -1, 1.0))  # the first example of the class was the last one


def prototypes(policy, *, scale: float = 0.2, width: float = 3.0, kappa: float = 0.5, gate: float = 12.0,
               kind_bias: float = 6.0, both_bias: float = 8.0, key_gain: float = 16.0, score_gain: float = 20.0,
               novelty: float = 0.0):
    """A handcrafted expert of online nearest-class-mean classification, for the slots of
    ``tasks/fewshot.py``, where expert e sees the label slot of one class c and one feature j of
    the current and of the labelled example (a grid cell (c, j); the policy itself never knows c
    or j). Needs ``policy.read_heads == 3`` and ``hidden >= addr_dim + 7``.

    - Head 0 reads the label slot (both kind flags): its value l is 1 when the last example was
      of class c, its address is class c's address. Heads 1 and 2 read feature j of the current
      example (x) and of the labelled one (x') (observation / feedback flag).
    - State: the prototype m = scale x (mean of feature j over the examples of class c so far:
      replaced by the first, then updated with gate ~ 1 - 1/n, n from a count unit); ``seen`` (-1
      until the first example of c, then +1); the class address (copied from head 0 each step).
    - Score: a bump tanh(w u + kappa) - tanh(w u - kappa) of u = scale x (x - m) ~ 2 tanh(kappa) -
      c u^2 near u = 0 (a negative squared distance that saturates for outliers) while c was seen
      and the last example was not of c; the mean of that bump and the bump against x' when the
      last example was of c (the prototype in the state does not hold x' yet); the bump against
      x' alone for the first example of c. ``novelty`` is the score of a class not seen yet.
    - Push key = ``key_gain`` x the class address: each output is the mean over the experts of
      its class, i.e. the mean over features of the per-feature scores (one nearest class mean).
    - Messages start silent.
    """
    spec = policy.spec
    K, A, H, Dm = spec.read_heads, spec.addr_dim, spec.hidden, spec.msg_dim
    if K != 3:
        raise ConfigError(f"train.init = 'prototypes' needs policy.read_heads = 3, got {K}")
    lay = _layout(A, H)
    obs, fb = KIND_OBSERVATION, KIND_FEEDBACK
    val = [Dm + k * (1 + A) for k in range(K)]  # input index of head k's read value
    ell, x, xl = val

    cell = policy.cell
    Wi, Wh, bi, bh = cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh
    R, Z, N = 0, H, 2 * H  # gate row offsets of torch's GRUCell: reset, update, candidate
    (m,), (cnt,), (seen,) = lay["m"], lay["count"], lay["seen"]
    w = width * scale
    with torch.no_grad():
        for t in (Wi, Wh, bi, bh, policy.heads.weight, policy.heads.bias, policy.h0):
            t.zero_()
        bi[R:R + H] = gate  # r = 1: every candidate sees the whole state
        bi[Z:Z + H] = -gate  # by default a unit takes its candidate every step
        for u in lay["free"]:  # spare units keep their initial state
            bi[Z + u] = gate
        # seen: -1 at first (h0), +1 from the first label of the class on
        policy.h0[seen] = -6.0
        bi[Z + seen], Wi[Z + seen, ell], bi[N + seen] = gate, -2 * gate, gate
        # count: -1 at first, then 1 - 2 COUNT_RATE^n after n labels of the class
        policy.h0[cnt] = -6.0
        rate_logit = float(torch.log(torch.tensor(COUNT_RATE / (1 - COUNT_RATE))))
        bi[Z + cnt], Wi[Z + cnt, ell], bi[N + cnt] = gate + rate_logit, -gate, gate
        # m: kept unless l = 1; replaced by the first example (seen = -1), then gate ~ 1 - 1/n:
        # pre-activation gate (1 - l) + gate (seen - 1) / 2 + COUNT_BIAS + COUNT_GAIN x count
        bi[Z + m], Wi[Z + m, ell] = gate / 2 + COUNT_BIAS, -gate
        Wh[Z + m, seen], Wh[Z + m, cnt] = gate / 2, COUNT_GAIN
        Wi[N + m, xl] = scale
        # bumps tanh(w u +- kappa), u = scale x (x - m or x - x1), off (both tanh at -1) unless their
        # conditions on l and seen hold
        for name, against, when_l, when_seen, _ in BUMPS:
            for e, sign in (("+", 1.0), ("-", -1.0)):
                (u,) = lay[f"{name}_{e}"]
                Wi[N + u, x], bi[N + u] = w, sign * kappa
                if against == "m":
                    Wh[N + u, m] = -width
                else:
                    Wi[N + u, xl] = -w
                Wi[N + u, ell] = 2 * gate if when_l else -2 * gate
                bi[N + u] -= 2 * gate if when_l else 0.0
                Wh[N + u, seen], bh[N + u] = gate * when_seen, -gate
        for i, u in enumerate(lay["addr"]):  # class c's address, read by head 0
            Wi[N + u, val[0] + 1 + N_KIND_FLAGS + i] = 0.25

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
        W[pv, seen], b[pv] = -novelty / 2, novelty / 2
    return policy


INITS = {"prototypes": prototypes}


def apply_init(name: str, policy):
    if name not in INITS:
        raise ConfigError(f"train.init must be '' or one of {sorted(INITS)}, got {name!r}")
    return INITS[name](policy)

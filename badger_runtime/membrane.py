"""The membrane: the agent's skin between the environment and its experts.

Inputs come as *slots*: each has an address (a vector; its first two entries flag
the slot's kind: observation or feedback) and a scalar value. Every expert reads
the slots through ``read_heads`` attention heads (its read queries against the
slot addresses), so the number of inputs may change between episodes.

Outputs: each output dimension i has an address b_i. Every expert pushes a key
k_e and a value (c_e, u_e); dimension i takes the attention-weighted mix over
experts of c_e + u_e . b_i. So d outputs can be 1 or 100 with the same policy,
and one expert can still drive several dimensions with different values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .xp import scaled_dot, softmax

KIND_OBSERVATION = 0
KIND_FEEDBACK = 1
N_KIND_FLAGS = 2


def sense(ops, read_query, slot_addr, slot_val, visible=None, competitive: int = 0, moments: bool = False):
    """Read the input slots.

    read_query: [B, N, K*A]; slot_addr: [B, J, A]; slot_val: [B, J];
    visible: [B or 1, N, J] bool (which expert may see which slot) or None.
    Returns sensed [B, N, K*W + competitive]: per head (read value, read address[, value-weighted
    address]: W = 1 + A, or 1 + 2A with ``moments``), then one share per competitive head
    (``assemble``). The value-weighted address (sum_j w_j v_j a_j) says in which direction of the
    address space the read values grow: what an expert fitting its outputs' errors needs.

    The first ``competitive`` heads compete for the slots (``compete``); the others are the usual
    attention over the slots (normalised over the slots, ``read``).
    """
    A = slot_addr.shape[-1]
    comp = compete(ops, read_query[..., :competitive * A], slot_addr, slot_val, visible, moments) \
        if competitive else None
    std = read(ops, read_query[..., competitive * A:], slot_addr, slot_val, visible, moments) \
        if read_query.shape[-1] > competitive * A else None
    return assemble(ops, comp, std)


def read(ops, read_query, slot_addr, slot_val, visible=None, moments: bool = False):
    """Heads that attend over the slots (softmax over the slots): [B, N, K*(1+A)]."""
    B, N, KA = read_query.shape
    A = slot_addr.shape[-1]
    scores = scaled_dot(ops, read_query.reshape(B, N * (KA // A), A), slot_addr).reshape(B, N, KA // A, -1)
    mask = None if visible is None else visible[:, :, None, :]
    return _read(ops, softmax(ops, scores, mask, axis=-1), slot_addr, slot_val, moments)


def compete(ops, read_query, slot_addr, slot_val, visible=None, moments: bool = False):
    """Heads that compete for the slots, as slot attention does: a slot's attention is normalised
    over the experts, so each slot is read mostly by the experts whose queries match it best. An
    expert reads the weighted mean of the slots it wins and senses its share of them (the fraction
    of the J slots it won): with more experts each wins fewer, and the agent can divide its inputs
    among its experts. A global normalisation per slot: in the actor runtimes the membrane computes
    it (it holds every expert's competitive read query). Returns (reads [B, N, Kc*(1+A)],
    shares [B, N, Kc])."""
    B, N, KA = read_query.shape
    A = slot_addr.shape[-1]
    Kc, J = KA // A, slot_addr.shape[1]
    scores = scaled_dot(ops, read_query.reshape(B, N * Kc, A), slot_addr).reshape(B, N, Kc, J)
    mask = None if visible is None else visible[:, :, None, :]
    c = softmax(ops, scores, mask, axis=1)  # over the experts: [B, N, Kc, J]
    mass = ops.sum(c, axis=-1, keepdims=True)  # [B, N, Kc, 1]
    return _read(ops, c / (mass + 1e-6), slot_addr, slot_val, moments), (mass * (1.0 / J)).reshape(B, N, Kc)


def assemble(ops, competed, standard):
    """The sensed vector's layout: competitive reads, standard reads, then the competitive shares.
    ``competed`` is ``compete``'s (reads, shares) or None; ``standard`` is ``read``'s or None."""
    if competed is None:
        return standard
    reads, shares = competed
    return ops.concat([reads, shares] if standard is None else [reads, standard, shares], axis=-1)


def _read(ops, w, slot_addr, slot_val, moments: bool = False):
    """Weighted reads w [B, N, K, J] of the slots -> [B, N, K*W]: per head the value and the address
    (W = 1 + A), and with ``moments`` the value-weighted address (W = 1 + 2A)."""
    B, N, K, J = w.shape
    A = slot_addr.shape[-1]
    w2 = w.reshape(B, N * K, J)
    parts = [slot_val[:, :, None], slot_addr]
    if moments:
        parts.append(slot_addr * slot_val[:, :, None])
    W = 1 + A * (len(parts) - 1)
    return ops.matmul_parts(w2, parts).reshape(B, N, K * W)


def push(ops, push_key, push_value, out_addr, can_push=None):
    """Collect the outputs.

    push_key: [B, N, A]; push_value: [B, N, 1+A]; out_addr: [B, d, A];
    can_push: [B or 1, N] bool or None.
    Returns (outputs [B, d], weights [B, d, N]).
    """
    scores = scaled_dot(ops, out_addr, push_key)  # [B, d, N]
    mask = None if can_push is None else can_push[:, None, :]
    w = softmax(ops, scores, mask, axis=-1)
    return ops.sum(w * answers(ops, push_value, out_addr), axis=-1), w


def answers(ops, push_value, out_addr):
    """Each expert's own answer for each output, [B, d, N]: c + <u, address> of its push value [B, N, 1+A]
    (the output is their mix by the push weights)."""
    c = push_value[..., :1]  # [B, N, 1]
    u = push_value[..., 1:]  # [B, N, A]
    return ops.swap(c) + ops.matmul(out_addr, ops.swap(u))


def push_spread(ops, weights, push_value, out_addr, outputs):
    """How far the experts' own answers sit from the agent's outputs: the push-weighted variance
    sum_i w_i (answer_i - output)^2, averaged over the outputs, [B]. Zero when every pushing expert
    gives the same answer; then reweighting the experts (a clone doubling one of them) moves no output.
    (``push``'s weights [B, d, N] and outputs [B, d]; ``train.spread_weight`` trains it down.)"""
    dev = answers(ops, push_value, out_addr) - outputs[..., None]
    return ops.mean(ops.sum(weights * dev * dev, axis=-1), axis=-1)


# ---- the membrane's view of a batch of episodes ------------------------------------------------

@dataclass(frozen=True)
class Visibility:
    """Which expert may read which input slot: a rule of (expert seat, slot index), so it holds
    for any number of experts (an agent that grows or shrinks keeps it).

    An expert's *seat* is a number it keeps for life: the N experts an agent starts with sit at
    0 .. N - 1, an expert added later takes the lowest free seat (``seats_after_add``), and a
    removal frees its experts' seats and moves no one else. So a survivor goes on reading the
    slots its state is about, and newcomers first fill the parts that removals left unread.
    Below, e is the seat.

    - ``all``: every expert reads every slot;
    - ``first``: only the expert at the lowest seat reads slots [lo, hi) (paper Fig. 6/9: the
      error goes to one expert, the others must learn it through messages);
    - ``fraction``: expert e reads slot j of [lo, hi) when a hash of (seed, e, j) falls below
      ``fraction`` (each expert hears a random part of the feedback; what the others heard
      reaches it only in messages);
    - ``cyclic``: expert e reads slot lo + (e mod (hi - lo)) of [lo, hi) and no other there (the
      slots are dealt out to the experts in turn: with N >= hi - lo every slot has a reader). With
      ``blocks`` = m > 1, [lo, hi) is m blocks of C = (hi - lo) / m slots (say one per arm, the
      same C arms in each block) and expert e reads slot e mod C of every block;
    - ``grid``: ``cyclic`` on [lo, hi) (C = hi - lo slots, say one per class), and of the slots
      before lo expert e reads those whose index i has i mod ``period`` = (e div C) mod
      ``period`` (say one feature of an example, and the same feature of another): the experts
      are a grid of C x ``period`` cells, and N = C x period experts fill it once.

    Slots outside [lo, hi) are read by every expert (``grid``: slots from hi on).
    """

    kind: str = "all"
    lo: int = 0
    hi: int = 0
    fraction: float = 1.0
    seed: int = 0
    period: int = 0  # grid: the cells per row (the slots before lo repeat with this period)
    blocks: int = 1  # cyclic: [lo, hi) is this many blocks of the same (hi - lo) / blocks parts

    KINDS = ("all", "first", "fraction", "cyclic", "grid")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"visibility kind must be one of {self.KINDS}, got {self.kind!r}")
        if not 0 <= self.lo <= self.hi or not 0.0 <= self.fraction <= 1.0:
            raise ValueError("visibility needs 0 <= lo <= hi and fraction in [0, 1]")
        if self.kind == "grid" and (self.period < 1 or self.hi <= self.lo):
            raise ValueError("a grid visibility needs period >= 1 and lo < hi")
        if self.blocks < 1 or (self.blocks > 1 and (self.kind != "cyclic" or (self.hi - self.lo) % self.blocks)):
            raise ValueError("visibility blocks > 1 is for 'cyclic' over a range [lo, hi) that they divide")

    def mask(self, n: int, slots: int, seats: np.ndarray | None = None) -> np.ndarray | None:
        """[1, n, slots] bool (True: may read) for n experts at ``seats`` [n] (default 0 .. n - 1),
        or None when every expert reads every slot."""
        if self.kind == "all" or self.hi <= self.lo:
            return None
        e = seat_array(seats, n)
        rows = np.arange(n)
        vis = np.ones((1, n, slots), dtype=bool)
        lo, hi = self.lo, min(self.hi, slots)
        if self.kind == "first":
            vis[:, :, lo:hi] = False
            if n:
                vis[0, int(np.argmin(e)), lo:hi] = True
        elif self.kind in ("cyclic", "grid"):
            vis[:, :, lo:hi] = False
            C = (self.hi - self.lo) // self.blocks
            for m in range(self.blocks):
                j = self.lo + m * C + e % C
                vis[0, rows[j < hi], j[j < hi]] = True
            if self.kind == "grid":
                cell = (e // (self.hi - self.lo)) % self.period
                before = np.arange(min(self.lo, slots))
                vis[0, :, before] = (before[:, None] % self.period == cell[None, :])
        else:
            j = np.arange(lo, hi, dtype=np.uint64)[None, :]
            vis[0, :, lo:hi] = _unit_hash(self.seed, e.astype(np.uint64)[:, None], j) < self.fraction
        return vis

    def to_dict(self) -> dict:
        return {"kind": self.kind, "lo": self.lo, "hi": self.hi, "fraction": self.fraction, "seed": self.seed,
                "period": self.period, "blocks": self.blocks}

    @classmethod
    def from_dict(cls, d: dict) -> "Visibility":
        return cls(str(d["kind"]), int(d["lo"]), int(d["hi"]), float(d["fraction"]), int(d["seed"]),
                   int(d.get("period", 0)), int(d.get("blocks", 1)))


def seats_after_add(seats: np.ndarray | None, n_old: int, n: int) -> np.ndarray | None:
    """The seats [n_old + n] of an agent of n_old experts at ``seats`` (None: 0 .. n_old - 1) after
    n join: the newcomers take the lowest free seats, in order (every runtime's rule). None when
    the result is 0 .. n_old + n - 1."""
    if seats is None:
        return None
    seats = np.asarray(seats, np.int64)
    taken = np.zeros(n_old + n, bool)
    taken[seats[seats < n_old + n]] = True
    new = np.flatnonzero(~taken)[:n]  # n_old + n candidates, n_old taken at most: n are free
    return normal_seats(np.concatenate([seats, new]))


def seats_after_removal(seats: np.ndarray | None, n_old: int, keep: np.ndarray) -> np.ndarray | None:
    """The seats of the experts ``keep`` (indices) of an agent of n_old at ``seats`` (None: 0 ..
    n_old - 1): theirs, unchanged (None when they are 0 .. len(keep) - 1)."""
    return normal_seats(seat_array(seats, n_old)[np.asarray(keep, np.int64)])


def seat_array(seats: np.ndarray | None, n: int) -> np.ndarray:
    """The seats [n] (int64) of n experts: ``seats``, or 0 .. n - 1 for None (``normal_seats``' inverse)."""
    return np.arange(n, dtype=np.int64) if seats is None else np.asarray(seats, np.int64).reshape(n)


def normal_seats(seats: np.ndarray) -> np.ndarray | None:
    """None for seats 0 .. n - 1 in order (the common case every cache keys by n alone), else them."""
    seats = np.asarray(seats, np.int64)
    return None if np.array_equal(seats, np.arange(seats.size)) else seats


def _unit_hash(seed: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A deterministic uniform number in [0, 1) per (seed, a, b) (splitmix64 of a mixed key)."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed & (2**64 - 1)) * np.uint64(0x9E3779B97F4A7C15) + a * np.uint64(0xBF58476D1CE4E5B9)
             + b * np.uint64(0x94D049BB133111EB))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


@dataclass
class Interface:
    """What the agent's skin knows about a batch of B episodes; all a runtime ever sees of a task.

    ``slot_addr`` [B, J, A]: the input slots' addresses (entries 0-1 flag the slot's kind);
    ``out_addr`` [B, d, A]: the output dimensions' addresses; ``visibility``: which expert reads
    which slot; ``parts``: the named groups of input slots, in order (e.g. ``observation`` d
    slots, then ``feedback`` 1), so a client can send them by name (``join``).
    """

    slot_addr: np.ndarray
    out_addr: np.ndarray
    visibility: Visibility = field(default_factory=Visibility)
    parts: tuple[tuple[str, int], ...] = ()
    _masks: dict = field(default_factory=dict, repr=False, compare=False)  # n -> visible(n)

    def __post_init__(self):
        if self.slot_addr.ndim != 3 or self.out_addr.ndim != 3 or self.slot_addr.shape[0] != self.out_addr.shape[0]:
            raise ValueError(f"interface: slot_addr {self.slot_addr.shape} / out_addr {self.out_addr.shape} must be "
                             f"[B, J, A] / [B, d, A]")
        self.parts = tuple((str(p), int(n)) for p, n in self.parts) or (("slots", self.slots),)
        if sum(n for _, n in self.parts) != self.slots:
            raise ValueError(f"interface parts {self.parts} do not add up to {self.slots} slots")

    @property
    def batch(self) -> int:
        return self.out_addr.shape[0]

    @property
    def dims(self) -> int:
        """d, the number of outputs."""
        return self.out_addr.shape[1]

    @property
    def slots(self) -> int:
        """J, the number of input slots."""
        return self.slot_addr.shape[1]

    def visible(self, n: int, seats: np.ndarray | None = None) -> np.ndarray | None:
        """[1, n, J] bool for an agent of n experts at ``seats`` [n] (None: seats 0 .. n - 1; see
        ``Visibility``), or None (every expert reads every slot)."""
        key = n if seats is None else (n, np.asarray(seats, np.int64).tobytes())
        if key not in self._masks:
            if len(self._masks) > 8:
                self._masks.clear()
            self._masks[key] = self.visibility.mask(n, self.slots, seats)
        return self._masks[key]

    def select(self, idx) -> "Interface":
        """The interface of some of the episodes (``idx``: a slice or indices on the batch axis)."""
        return Interface(self.slot_addr[idx], self.out_addr[idx], self.visibility, self.parts)

    def join(self, values: dict) -> np.ndarray:
        """Slot values [B, J] from named parts {name: [B, size]} (every part, in order)."""
        missing = [p for p, _ in self.parts if p not in values]
        if missing:
            raise KeyError(f"missing input parts {missing} (this interface takes {[p for p, _ in self.parts]})")
        return np.concatenate([np.asarray(values[p], np.float32).reshape(self.batch, n) for p, n in self.parts],
                              axis=-1)

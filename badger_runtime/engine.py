"""The batched runtime: the shared inner-loop math over B agents at once.

``Agent`` runs ``rollout.agent_step`` for B agents of N experts, one inner step per call.
With numpy ops and the policy's ONNX graph (the default) it is the deploy engine: one
onnxruntime call per communication round for all experts of all agents, the speed limit
the actor runtimes are measured against and the reference they must agree with. With torch
ops and the torch policy it is what training differentiates through (``rollout.rollout``).

Every runtime (this one, ``actors.ActorAgent``, ``actors.ShardedAgent``, a served session)
has the same interface, which ``episodes.drive`` relies on:

    interface                            the membrane's view of the episodes (membrane.Interface)
    n_experts, expert_ids()              who is there
    step(slot_values [B, J], rounds=None) -> (outputs [B, d], rollout.StepInfo)   (async for actors)
    add_experts(n, init=None|"clone"|"fresh", source=None) -> new ids   (None: engine.default_init)
    remove_experts(ids) -> experts left

It never sees a task: a task's episode hands it an ``Interface`` and the driver hands it slot
values. Bad inputs raise ``InputError`` and leave the agent as it was.
"""

from __future__ import annotations

import operator

import numpy as np

from .config import MAX_SEED, AgentConfig, ConfigError, TaskConfig
from .membrane import KIND_FEEDBACK, KIND_OBSERVATION, Interface, Visibility, normal_seats
from .rollout import (AgentState, StepInfo, Wiring, agent_step, clone_sources, episodes_per_copy, grow, initial_state,
                      rebalance, repeated, sample_wiring, shrink)
from .routing import Neighbors, check_size, membrane_masks
from .xp import NumpyOps

OPS = NumpyOps()


def numpy_ops() -> NumpyOps:
    return OPS


#: the most experts one agent holds (the batched engine and the sharded runtime): a larger growth is refused
MAX_EXPERTS = 1 << 24
#: the most communication rounds of one inner step a caller may ask (the CLI's and the server's bound too): 10^5
#: rounds blocked an actor agent's event loop for seconds and then left it unable to step
MAX_ROUNDS = 64


def check_rounds(rounds) -> int | None:
    """A step's ``rounds``: None (the agent's own) or an int in 1..MAX_ROUNDS; InputError otherwise (the runtimes
    truncated 2.9 to 2 and parsed '2')."""
    if rounds is None:
        return None
    return int_arg(rounds, "rounds", 1, MAX_ROUNDS)


def int_arg(value, what: str, lo: int = 0, hi: int | None = None) -> int:
    """An int argument (not a bool, a float or a str) in [lo, hi]; InputError otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < lo or (
            hi is not None and value > hi):
        bound = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise InputError(f"{what} must be an int {bound}, got {str(value)[:40]}")
    return int(value)


class InputError(ValueError):
    """An observation the agent refuses (wrong shape, NaN/inf, out of range); the agent is unchanged."""


def check_add(cfg: AgentConfig, N: int, n: int, batch: int):
    """Refuse adding ``n`` experts to agents of ``N`` (InputError) before anything is drawn, so a refused growth
    leaves the agent and its generator as they were: n >= 1, at most ``MAX_EXPERTS`` in all, and routing that
    scores every pair still fitting (``routing.check_size``)."""
    if int_arg(n, "the number of experts to add") < 1:
        raise InputError("add at least one expert")
    if N + n > MAX_EXPERTS:
        raise InputError(f"an agent holds at most {MAX_EXPERTS:,} experts; it has {N:,}, asked to add {n:,}")
    try:
        check_size(cfg.routing, N + n, batch)
    except ConfigError as e:
        raise InputError(str(e)) from None


def integers(values, what: str = "expert indices") -> list[int]:
    """Sorted distinct integers from any iterable of them (an array too); InputError otherwise."""
    try:
        if isinstance(values, (dict, str, bytes)) or (isinstance(values, np.ndarray) and values.dtype == bool):
            raise TypeError  # a boolean mask removed experts 0 and 1 (True and False as indices), a dict its keys
        items = values.reshape(-1).tolist() if isinstance(values, np.ndarray) else list(values)
        if any(isinstance(i, (bool, np.bool_)) for i in items):
            raise TypeError
        return sorted(set(operator.index(i) for i in items))
    except (TypeError, ValueError):
        raise InputError(f"{what} must be integers, got {str(values)[:80]}") from None


def expert_indices(indices, N: int) -> list[int]:
    """Sorted distinct indices in [0, N) from any iterable of integers (an array too); InputError otherwise."""
    idx = integers(indices)
    if any(i < 0 or i >= N for i in idx):
        raise InputError(f"expert indices must be in [0, {N}), got {idx[:20]}")
    return idx


class HorizonError(InputError):
    """A step past an episodic policy's horizon without a reset (the agent is unchanged)."""


def check_horizon(policy, t: int, past_horizon: bool):
    """Refuse step ``t`` of an episodic policy (card ``lifetime``) at or past its horizon, unless the
    caller asked to go past it (``past_horizon``): such a policy was never shown to stay sane there."""
    horizon = getattr(policy, "horizon", None)
    if horizon is not None and t >= horizon and not past_horizon:
        raise HorizonError(f"policy {getattr(policy, 'name', '?')} is episodic with a horizon of {horizon} inner "
                           f"steps (its card's lifetime): reset the agent, or ask to go past the horizon "
                           f"explicitly (past_horizon=True; --past-horizon; open with past_horizon: true)")


class GrowthError(InputError):
    """Fresh experts (or clones) refused: the policy's card says they make it worse (the agent is unchanged)."""


def growth_hurts(policy, init: str) -> bool:
    """Whether the policy's card (``growth``) measured that experts added as ``init`` ('fresh' or
    'clone') make it worse (a policy without a card, e.g. a torch checkpoint, says nothing)."""
    return (getattr(policy, "growth", None) or {}).get(init) == "hurts"


def fresh_hurts(policy) -> bool:
    """Whether the policy's card (``growth``) measured that fresh experts make it worse."""
    return growth_hurts(policy, "fresh")


def default_init(policy, init: str | None = None, source=None) -> str:
    """The kind of experts an ``add_experts`` without ``init`` adds: clones (the paper's growing), unless
    the policy's card measured that clones make it worse and fresh experts do not, then fresh experts.
    An explicit ``init`` is returned as given; a named ``source`` (an expert, or one per newcomer) asks for
    clones. Where the card says both hurt, clones are asked for and ``check_growth`` refuses them, naming
    the successor."""
    if init is not None:
        return init
    if source is None and growth_hurts(policy, "clone") and not growth_hurts(policy, "fresh"):
        return "fresh"
    return "clone"


def growth_init(policy, init: str | None, source, allow_harmful: bool) -> str:
    """What every runtime's ``add_experts`` does before it adds anything: the kind of newcomer
    (``default_init``), checked to be 'clone' or 'fresh' (``InputError``) and allowed by the card
    (``check_growth``: ``GrowthError``)."""
    if source is not None and not isinstance(source, (np.ndarray, list, tuple)):  # (1.9 cloned expert 1; lists:
        int_arg(source, "source (the expert a clone copies)", 0)                  # Agent's `sources`, checked there)
    init = default_init(policy, init, source)
    if init not in ("clone", "fresh"):
        raise InputError(f"init must be 'clone' or 'fresh', got {init!r}")
    if init == "fresh" and source is not None:  # it was ignored: the caller meant a clone, or nothing
        raise InputError(f"source names the expert a clone copies; fresh experts copy none (source={source})")
    check_growth(policy, init, allow_harmful)
    return init


def check_growth(policy, init: str, allow_harmful: bool):
    """Refuse to add ``fresh`` experts to a policy whose card (``growth``) measured that they make it
    worse than the unchanged agent, unless the caller asked for it (``allow_harmful``): the product
    rule is that hot-adding fresh experts never makes a shipped policy worse, and a policy that
    breaks it is held to it here, as an episodic policy is held to its horizon. Clones likewise,
    where the card says ``"clone": "hurts"`` (its ``clone_why``, ``clone_instead``): a policy made safe
    for newcomers may have lost it for copies."""
    if init not in ("fresh", "clone") or not growth_hurts(policy, init) or allow_harmful:
        return
    growth = policy.growth
    key = "" if init == "fresh" else "clone_"
    what = "fresh experts" if init == "fresh" else "clones"
    instead = f" Instead: {growth[key + 'instead']}." if growth.get(key + "instead") else ""
    raise GrowthError(f"policy {getattr(policy, 'name', '?')}: {what} make it worse (its card's growth: "
                      f"{growth.get(key + 'why', 'measured')}).{instead} To add them anyway, ask explicitly "
                      f"(allow_harmful=True; --allow-harmful-growth; add_experts with allow_harmful: true)")


# Observations larger than this (in absolute value) are refused: the policy was trained on
# values of order 1, and a huge value would saturate every gate it touches.
MAX_ABS_INPUT = 1e3


def check_values(name: str, x, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` as float32 of ``shape``, or InputError: real numbers (ints or floats), finite, within
    ``MAX_ABS_INPUT``. Complex numbers, booleans and strings are refused, not cast (numpy would drop an imaginary
    part with a warning, read True as 1 and parse '1.5')."""
    try:
        a = np.asarray(x)
        kind = a.dtype.kind
        if kind in "fiuO":
            a = np.asarray(a, dtype=np.float32)  # an object array: Python numbers, or a TypeError
    except (TypeError, ValueError):
        raise InputError(f"{name} must be numbers, got {type(x).__name__}") from None
    if kind not in "fiuO":
        raise InputError(f"{name} must be real numbers (ints or floats), got {a.dtype} values")
    if a.shape != shape:
        raise InputError(f"{name} must have shape {shape}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name} contains NaN or inf; refused (the agent's state is unchanged)")
    if np.any(np.abs(a) > MAX_ABS_INPUT):
        raise InputError(f"{name} has values beyond +-{MAX_ABS_INPUT:g}; refused (scale your inputs)")
    return a


def draw_interface(policy, task: TaskConfig | None, batch: int, experts: int, dims: int, seed: int) -> Interface:
    """The interface of ``batch`` fresh episodes of ``task`` (default: the policy's own), drawn from
    the task stream of ``seed`` (``episodes.episode_rngs``): the same addresses an evaluation
    with this seed gives its first episodes."""
    from .tasks import make_task

    task = task if task is not None else policy.task
    rng_task = np.random.default_rng([seed, 0])
    return make_task(task).sample(rng_task, batch, dims=dims, experts=experts, steps=1,
                                  addr_dim=policy.spec.addr_dim).interface


class Agent:
    """B agents of N experts, stepped one inner step at a time (the batched runtime).

    ``start(interface, wiring)`` sets it up for given episodes and wiring; ``reset(batch,
    experts, dims, seed)`` draws both (the interface from the policy's task). Experts can be
    added (``clone`` copies a living expert's state, ``fresh`` starts from the policy's initial
    state) or removed between steps; nothing else changes.
    """

    def __init__(self, policy, agent: AgentConfig | None = None, *, ops=None, check_inputs: bool = True,
                 past_horizon: bool = False):
        self.policy = policy
        self.past_horizon = past_horizon  # step an episodic policy past its horizon (asked for explicitly)
        spec = getattr(policy, "spec", None)
        if agent is not None and spec is not None and agent.policy != spec:  # (it ran, then failed in a step)
            raise ConfigError("the agent config's policy settings (agent.policy) are not this policy's: take them "
                              "from the policy (dataclasses.replace(policy.agent, ...)) and change the routing or "
                              "the agreement only")
        self.cfg = agent or policy.agent
        self.ops = ops or OPS
        self.check_inputs = check_inputs
        self.record = False  # keep each step's attention weights and messages in its StepInfo
        self.vote_loss = False  # training: report the 'done' votes' loss in each StepInfo
        self.push_spread = False  # training: report membrane.push_spread in each StepInfo
        self.state: AgentState | None = None
        self.wiring: Wiring | None = None
        self.interface: Interface | None = None
        self.seed = 0
        self.t = 0
        self._rng = np.random.default_rng([0, 1])
        self.copies = 1  # the batch is this many copies of the same episodes (``start``)
        self._indeg: np.ndarray | None = None

    # -- lifecycle ------------------------------------------------------------------
    def start(self, interface: Interface, wiring: Wiring, *, state: AgentState | None = None,
              rng: np.random.Generator | None = None, t: int = 0, copies: int = 1) -> "Agent":
        """Run on the episodes of ``interface`` with ``wiring`` (and ``state``, default: each expert's
        initial state). ``rng`` draws what growing needs (new experts, a new topology). ``copies``: the
        batch is that many copies of the same B / copies episodes (ES scores its candidates so): growing
        and shrinking draw for one copy and give every copy the same (``rollout.repeated``)."""
        if interface.batch != wiring.batch:
            raise ValueError(f"interface batch {interface.batch} != wiring batch {wiring.batch}")
        episodes_per_copy(wiring.batch, copies)
        self.copies = copies
        self.interface, self.wiring, self.t = interface, wiring, t
        self.state = state if state is not None else initial_state(self.ops, self.policy, wiring)
        if rng is not None:
            self._rng = rng
        self._indeg = None
        return self

    def reset(self, batch: int, experts: int, dims: int, seed: int, *, task: TaskConfig | None = None) -> "Agent":
        """Fresh agents on fresh episodes of ``task`` (default: the policy's own task), seeded:
        the interface from the task stream of ``seed``, the wiring from its agent stream."""
        batch, dims, seed = int_arg(batch, "batch", 1), int_arg(dims, "dims", 1), int_arg(seed, "seed", 0, MAX_SEED)
        experts = int_arg(experts, "experts", 1, MAX_EXPERTS)
        interface = draw_interface(self.policy, task, batch, experts, dims, seed)
        rng = np.random.default_rng([seed, 1])
        self.seed = seed
        return self.start(interface, sample_wiring(rng, self.cfg, batch, experts), rng=rng)

    def _started(self):
        if self.wiring is None:
            raise RuntimeError("start() or reset() the agent first")

    @property
    def n_experts(self) -> int:
        self._started()
        return self.wiring.n_experts

    @property
    def batch(self) -> int:
        return self.interface.batch

    @property
    def slots(self) -> int:
        return self.interface.slots

    @property
    def dims(self) -> int:
        return self.interface.dims

    def expert_ids(self) -> list[int]:
        return list(range(self.n_experts))

    def observation(self, parts: dict) -> np.ndarray:
        """Slot values [B, J] from the interface's named parts {name: [B, size]} (checked)."""
        self._started()
        if not isinstance(parts, dict):
            raise InputError(f"the input parts are a dict {{name: values}}, got {type(parts).__name__}")
        unknown = set(parts) - {p for p, _ in self.interface.parts}
        if unknown:
            raise InputError(f"unknown input parts {sorted(unknown)}; this agent takes "
                             f"{[p for p, _ in self.interface.parts]}")
        checked = {}
        for name, size in self.interface.parts:
            if name not in parts:
                raise InputError(f"input part {name!r} ({size} values) is missing")
            checked[name] = check_values(name, parts[name], (self.batch, size))
        return self.interface.join(checked)

    def step(self, slot_values, rounds: int | None = None, record: bool | None = None):
        """Advance one inner step. slot_values: [B, J] (see ``interface.parts``) -> (outputs [B, d], StepInfo)."""
        if self.state is None:
            raise RuntimeError("start() or reset() the agent before stepping it")
        check_horizon(self.policy, self.t, self.past_horizon)
        rounds = check_rounds(rounds)  # (also unchecked runs: rounds=0 evaluated an agent that never ran its policy)
        if self.check_inputs:
            slot_values = check_values("observation", slot_values, (self.batch, self.slots))
        self.state, out, info = agent_step(self.ops, self.policy, self.cfg, self.wiring, self.state, self.interface,
                                           slot_values, rounds=rounds,
                                           record=self.record if record is None else record,
                                           vote_loss=0.0 if self.vote_loss else None, spread=self.push_spread)
        if self.ops is OPS:
            if self._indeg is None:
                self._indeg = self.wiring.in_degrees().sum(axis=1)
            info.messages = int((np.asarray(info.rounds) * self._indeg).sum())
        self.t += 1
        return out, info

    # -- growing and shrinking ----------------------------------------------------------
    def add_experts(self, n: int, init: str | None = None, source: int | None = None,
                    sources: np.ndarray | None = None, *, allow_harmful: bool = False) -> list[int]:
        """Add n experts; returns their indices. ``clone`` copies expert ``source`` (default: a
        living expert per new one, drawn in each episode on its own, ``rollout.clone_sources``;
        ``sources`` [n] names one per new expert for every episode, [B, n] one per episode),
        ``fresh`` draws a new initial state (refused where the card says it hurts, see
        ``check_growth``); None: the kind the card does not refuse (``default_init``, checked by
        ``growth_init``)."""
        N = self.n_experts
        check_add(self.cfg, N, n, self.batch)
        if source is not None and sources is not None:
            raise InputError("give source (one expert every newcomer copies) or sources (one per newcomer), not both")
        init = growth_init(self.policy, init, sources if source is None else source, allow_harmful)
        if init == "clone":
            if source is not None and not 0 <= source < N:
                raise InputError(f"no expert {source} to clone (the agent has {N})")
            if sources is None:
                sources = (np.full(n, source) if source is not None
                           else repeated(clone_sources(self._rng, self.interface, N, n, self.wiring.seats,
                                                       batch=self.batch // self.copies), self.copies))
            else:
                sources = np.asarray(sources)
                if sources.shape not in ((n,), (self.batch, n)) or sources.dtype.kind not in "iu":
                    raise InputError(f"sources must be {n} or [{self.batch}, {n}] expert indices, got "
                                     f"{sources.dtype} {list(sources.shape)}")
                if sources.size and not (0 <= sources.min() and sources.max() < N):
                    raise InputError(f"sources must be expert indices in [0, {N})")
        else:
            sources = None
        self.wiring, self.state = grow(self.ops, self.policy, self.cfg, self._rng, self.wiring, self.state, n, sources,
                                       copies=self.copies)
        self._indeg = None
        return list(range(N, N + n))

    def remove_experts(self, indices) -> int:
        """Remove experts by index; returns how many remain (at least one must)."""
        N = self.n_experts
        idx = expert_indices(indices, N)
        gone = set(idx)
        keep = np.array([i for i in range(N) if i not in gone], dtype=np.int64)
        if keep.size == 0:
            raise InputError("cannot remove every expert: an agent needs at least one")
        self.wiring, self.state = shrink(self.cfg, self._rng, self.wiring, self.state, keep, copies=self.copies)
        self.wiring, self.state = rebalance(self.ops, self.policy, self.interface, self._rng, self.wiring, self.state,
                                            copies=self.copies)
        self._indeg = None
        return int(keep.size)

    def state_is_finite(self) -> bool:
        """Whether every expert's state (h and heads) is finite (a served step refuses one that is not)."""
        st = self.state
        return st is None or bool(np.isfinite(np.asarray(st.h)).all() and np.isfinite(np.asarray(st.heads)).all())

    # -- snapshots --------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Everything needed to continue this agent exactly (numpy arrays + small metadata)."""
        self._started()
        w, st, itf = self.wiring, self.state, self.interface
        return {"t": self.t, "seed": self.seed, "h": np.asarray(st.h), "heads": np.asarray(st.heads),
                "noise": w.noise, "ids": w.ids, "seats": w.seats,
                "route_mask": w.route_mask if isinstance(w.route_mask, np.ndarray) else None,
                "route_neighbors": w.route_mask.idx if isinstance(w.route_mask, Neighbors) else None,
                "out_addr": itf.out_addr, "slot_addr": itf.slot_addr, "visibility": itf.visibility.to_dict(),
                "parts": [[p, n] for p, n in itf.parts], "rng": self._rng.bit_generator.state}

    def restore(self, snap: dict) -> "Agent":
        """Continue the agent a ``snapshot()`` describes. Everything is checked first (shapes against the policy and
        each other, finite values, the counters, the generator's state), so a refused snapshot (InputError) leaves
        this agent as it was: a snapshot missing ``heads`` left it half restored and unable to step, one with NaN
        in its state stepped to NaN outputs."""
        spec = self.cfg.policy
        if not isinstance(snap, dict):
            raise InputError(f"a snapshot is a dict (Agent.snapshot()), got {type(snap).__name__}")
        try:
            h, heads, noise = (np.asarray(snap[k], np.float32) for k in ("h", "heads", "noise"))
            if h.ndim != 3 or h.shape[2] != spec.hidden:
                raise InputError(f"snapshot state has shape {h.shape}; this policy's experts hold {spec.hidden} values")
            B, N, _ = h.shape
            for name, a, shape in (("heads", heads, (B, N, spec.heads_dim)), ("noise", noise, (B, N, spec.hidden))):
                if a.shape != shape:
                    raise InputError(f"snapshot {name} has shape {a.shape}, expected {shape}")
            ids = None if snap.get("ids") is None else np.asarray(snap["ids"], np.float32)
            if (ids is None) != (not spec.id_dim) or (ids is not None and ids.shape != (B, N, spec.id_dim)):
                raise InputError(f"snapshot ids must be [{B}, {N}, {spec.id_dim}]" if spec.id_dim else
                                 "snapshot ids must be None for this policy")
            slot_addr, out_addr = (np.asarray(snap[k], np.float32) for k in ("slot_addr", "out_addr"))
            for name, a in (("slot_addr", slot_addr), ("out_addr", out_addr)):
                if a.ndim != 3 or a.shape[0] != B or a.shape[2] != spec.addr_dim:
                    raise InputError(f"snapshot {name} has shape {a.shape}, expected [{B}, *, {spec.addr_dim}]")
            for name, a in (("h", h), ("heads", heads), ("noise", noise), ("ids", ids), ("slot_addr", slot_addr),
                            ("out_addr", out_addr)):
                if a is not None and not np.isfinite(a).all():
                    raise InputError(f"snapshot {name} contains NaN or inf")
            t, seed = int_arg(snap["t"], "snapshot t", 0), int_arg(snap["seed"], "snapshot seed", 0, MAX_SEED)
            route = snap.get("route_mask")
            if snap.get("route_neighbors") is not None:
                idx = np.asarray(snap["route_neighbors"])
                if idx.dtype.kind not in "iu" or idx.ndim != 3 or idx.shape[:2] != (B, N) or (
                        idx.size and (idx.min() < 0 or idx.max() >= N)):
                    raise InputError(f"snapshot route_neighbors must be indices [{B}, {N}, C] in 0..{N - 1}")
                route = Neighbors(idx.astype(np.int64))
            elif route is not None:
                route = np.asarray(route)
                if route.dtype != bool or route.shape != (B, N, N):
                    raise InputError(f"snapshot route_mask must be bool [{B}, {N}, {N}]")
            seats = snap.get("seats")  # snapshots before seats: 0 .. N - 1
            if seats is not None:
                seats = np.asarray(seats, np.int64).reshape(-1)
                if seats.shape != (N,) or seats.min() < 0 or len(np.unique(seats)) != N:
                    raise InputError(f"snapshot seats must be {N} distinct numbers >= 0")
                seats = normal_seats(seats)
            interface = Interface(slot_addr, out_addr, Visibility.from_dict(snap["visibility"]),
                                  tuple((str(p), int(n)) for p, n in snap["parts"]))
            if sum(n for _, n in interface.parts) != slot_addr.shape[1]:
                raise InputError(f"snapshot parts {list(interface.parts)} do not add up to its {slot_addr.shape[1]} "
                                 "slots")
            rng = np.random.default_rng()
            rng.bit_generator.state = snap["rng"]
        except InputError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a field missing or of another kind
            raise InputError(f"not a snapshot of this policy's agents: {type(e).__name__}: {str(e)[:160]}") from None
        can_sense, can_push = membrane_masks(self.cfg.routing, N)
        self.seed, self.t, self._rng, self.copies = seed, t, rng, 1  # (copies live only inside an ES generation)
        self.wiring = Wiring(noise, route, can_sense, can_push, ids, seats)
        self.interface = interface
        self.state = AgentState(h, heads)
        self._indeg = None
        return self

__all__ = ["Agent", "GrowthError", "HorizonError", "InputError", "MAX_EXPERTS", "StepInfo", "check_add",
           "check_growth", "check_horizon", "check_values", "default_init", "expert_indices", "fresh_hurts", "integers",
           "growth_init", "draw_interface", "numpy_ops", "KIND_FEEDBACK", "KIND_OBSERVATION"]

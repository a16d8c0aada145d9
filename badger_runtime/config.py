"""Typed settings: the expert policy's sizes, routing, agreement, task and training.

Every setting has a default; a TOML file and ``section.key=value`` overrides
change them. Unknown keys and bad values are refused with a clear message.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field, fields
from typing import Any

ROUTINGS = ("dense", "topk", "hardwired", "homogeneous", "random")
ABLATIONS = ("none", "cut", "shuffle")
AGREEMENTS = ("fixed", "convergence", "quorum")
OBJECTIVES = ("last", "mean", "weighted")
GROW_INITS = ("mixed", "fresh", "clone")  # train.grow_init
MAX_POLICY_WIDTH = 4096  # the largest policy.* size (hidden, message, key, address widths, heads)
CLONE_DRAWS = ("batch", "episode")  # train.clone_draw
MAX_SEED = 2**63 - 1  # the largest seed anywhere (an int64: numpy's generators, msgpack, the server)


class ConfigError(ValueError):
    """A setting that cannot be used, with the reason."""


@dataclass
class PolicySpec:
    """Sizes of the one expert policy all experts share (and of its message heads)."""

    hidden: int = 64  # GRU state per expert
    msg_dim: int = 16  # message value size
    key_dim: int = 8  # routing query/key size
    addr_dim: int = 8  # address size (first 2 entries: slot kind flags)
    read_heads: int = 2  # attention heads reading the input slots
    competitive_heads: int = 0  # of the read heads, how many compete for the slots (membrane.sense)
    read_moments: bool = False  # each read also returns the value-weighted address (membrane.sense)
    id_dim: int = 0  # random identity features per expert (0 = none)
    init_noise: float = 1.0  # std of the random part of each expert's initial state

    def validate(self):
        for name in ("hidden", "msg_dim", "key_dim", "addr_dim", "read_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"policy.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("hidden", "msg_dim", "key_dim", "addr_dim", "read_heads", "id_dim", "competitive_heads"):
            if getattr(self, name) > MAX_POLICY_WIDTH:  # a typo's 1e9 is a clear error, not a failed allocation
                raise ConfigError(f"policy.{name} must be <= {MAX_POLICY_WIDTH}, got {getattr(self, name)}")
        if self.addr_dim < 3:
            raise ConfigError("policy.addr_dim must be >= 3 (2 kind flags + an address)")
        if self.id_dim < 0 or self.init_noise < 0:
            raise ConfigError("policy.id_dim and policy.init_noise must be >= 0")
        if not 0 <= self.competitive_heads <= self.read_heads:
            raise ConfigError("policy.competitive_heads must be in [0, read_heads]")

    @property
    def sensed_dim(self) -> int:
        return self.read_heads * self.read_width + self.competitive_heads + self.id_dim

    @property
    def read_width(self) -> int:
        """What one read head senses: the value, the address (and the value-weighted address)."""
        return 1 + self.addr_dim * (2 if self.read_moments else 1)

    @property
    def heads(self) -> list[tuple[str, int]]:
        """Layout of the policy's 'heads' output, in order."""
        return [
            ("query", self.key_dim),
            ("key", self.key_dim),
            ("value", self.msg_dim),
            ("vote", 1),
            ("read_query", self.read_heads * self.addr_dim),
            ("push_key", self.addr_dim),
            ("push_value", 1 + self.addr_dim),
        ]

    @property
    def heads_dim(self) -> int:
        return sum(n for _, n in self.heads)

    @property
    def head_slices(self) -> dict[str, slice]:
        """Where each named head lies in the heads vector (``heads``' order)."""
        out, i = {}, 0
        for name, size in self.heads:
            out[name] = slice(i, i + size)
            i += size
        return out


@dataclass
class RoutingConfig:
    """Who hears whom in a communication round."""

    kind: str = "dense"
    k: int = 8  # top-k: senders kept per receiver
    candidates: int = 0  # top-k: senders each receiver scores (0 = all: exact, O(N^2); C > 0: O(N C))
    degree: int = 4  # random graph: senders per receiver
    self_loops: bool = True  # may an expert hear its own last message
    ablation: str = "none"  # evaluation only: "cut" (every inbox empty) or "shuffle" (each expert gets another's)

    def validate(self):
        if self.kind not in ROUTINGS:
            raise ConfigError(f"routing.kind must be one of {ROUTINGS}, got {self.kind!r}")
        if self.ablation not in ABLATIONS:
            raise ConfigError(f"routing.ablation must be one of {ABLATIONS}, got {self.ablation!r}")
        if self.k < 1 or self.degree < 0 or self.candidates < 0:
            raise ConfigError("routing.k must be >= 1, routing.degree (0: each expert hears only itself) and "
                              "routing.candidates >= 0")


@dataclass
class AgreementConfig:
    """When a communication stage ends."""

    rule: str = "fixed"
    rounds: int = 1  # fixed: exactly this many; others: at most this many
    eps: float = 1e-3  # convergence: max message change below which the stage ends
    quorum: float = 0.5  # quorum: fraction of experts voting 'done'

    def validate(self):
        if self.rule not in AGREEMENTS:
            raise ConfigError(f"agreement.rule must be one of {AGREEMENTS}, got {self.rule!r}")
        if self.rounds < 1:
            raise ConfigError(f"agreement.rounds must be >= 1, got {self.rounds}")
        if not 0 < self.quorum <= 1:
            raise ConfigError("agreement.quorum must be in (0, 1]")
        if not self.eps >= 0:
            raise ConfigError(f"agreement.eps must be >= 0 (a message change below it ends the stage), got {self.eps}")


@dataclass
class AgentConfig:
    policy: PolicySpec = field(default_factory=PolicySpec)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    agreement: AgreementConfig = field(default_factory=AgreementConfig)

    def validate(self):
        self.policy.validate()
        self.routing.validate()
        self.agreement.validate()
        return self


@dataclass
class TaskConfig:
    """A task family and the ranges its episodes are drawn from: the settings every task has.

    Each registered task (``badger_runtime.tasks``) has its own subclass with its own settings
    (``name`` picks it when a config is read); ``dims`` is the range of d, the number of outputs
    (the guessing game's dimensions, a classifier's classes, a bandit's arms).
    """

    name: str = "guessing"
    dims: tuple[int, int] = (3, 3)  # inclusive range of d (the number of outputs)
    experts: tuple[int, int] = (20, 20)  # inclusive range of N
    steps: int = 20  # inner steps per episode
    addresses: str = "random"  # output addresses: 'random' per episode, or 'fixed' (a table per d)
    address_seed: int = 0  # seed of the fixed addresses

    def validate(self):
        from .tasks import task_names

        if self.name not in task_names():
            raise ConfigError(f"task.name must be one of {task_names()}, got {self.name!r}")
        if type(self) is TaskConfig:
            raise ConfigError(f"task {self.name!r} needs its own settings class (tasks.config_class)")
        if self.addresses not in ("random", "fixed"):
            raise ConfigError("task.addresses must be 'random' or 'fixed'")
        for name in ("dims", "experts"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ConfigError(f"task.{name} must be a range [lo, hi] with 1 <= lo <= hi, got {[lo, hi]}")
        if self.steps < 1:
            raise ConfigError("task.steps must be >= 1")
        return self


@dataclass
class Stage:
    """One curriculum stage: overrides of the task settings until batch ``until``."""

    until: int
    dims: tuple[int, int] | None = None
    experts: tuple[int, int] | None = None
    addresses: str | None = None
    change_every: int = 0  # fixed addresses: redraw them every this many batches (0 = never)
    settings: dict = field(default_factory=dict)  # other task settings of this stage (validated by the task)


@dataclass
class ESConfig:
    """Evolution strategies, the second outer loop (``badger train --outer es``; ``cluster/es.py``).

    Each generation scores ``population`` antithetic perturbations (theta +- sigma eps) of the flat
    parameter vector on the same seeded episodes (``episodes`` each, default ``train.batch_size``),
    in the torch-free deploy engine; centered ranks of their losses give the ES gradient, and Adam
    (``lr``) steps on it. ``train.batches`` counts generations; ``train.seed``, ``objective``,
    ``horizon``, ``rounds``, ``stages``, ``grow_prob``, ``grow_init``, ``grow_most``, ``log_floor``, ``init_from`` and
    the logging settings mean what they mean for BPTT; ``lr`` and those in ``cluster.es.BPTT_ONLY`` (``tbptt``,
    ``continue_prob``, ``clip``, ``lr_decay``, ``adam_eps``, ``vote_weight``, ``spread_weight``, ``guard_weight``,
    ``guard_smoothing``) are BPTT's only (ES scores whole episodes as deployed; a run names the ones its config
    sets). One difference in growing: ES's episodes are the deploy engine's, so each draws whom
    its clones copy, where a BPTT batch draws once for all its episodes (the shipped recipes drew so) unless
    ``train.clone_draw = "episode"``.

    ``same_newcomers``: the experts a grown generation adds (a fresh one's noise, whom a clone copies, the
    redrawn topology) are drawn once per episode and are the same for every candidate, as the episodes are,
    so that an antithetic pair differs only by its perturbation (common random numbers). False: each
    candidate's episodes draw their own, as every run before session 41 did (guessing-nonstationary-es-v2,
    trained with fresh experts joining, reproduces only so)."""

    population: int = 32  # perturbed candidates per generation (antithetic pairs: even)
    sigma: float = 0.02  # std of each parameter's perturbation
    lr: float = 0.01  # Adam's step on the ES gradient
    weight_decay: float = 0.0  # L2 pull of the parameters towards 0 (added to the ES gradient)
    episodes: int = 0  # episodes each candidate is scored on per generation (0: train.batch_size)
    workers: int = 0  # Ray workers that score the population (0: this process; `--workers W`)
    same_newcomers: bool = True  # every candidate's episodes grow the same newcomers (False: before session 41)

    def validate(self):
        if self.population < 2 or self.population % 2:
            raise ConfigError(f"train.es.population must be even and >= 2 (antithetic pairs), got {self.population}")
        if self.sigma <= 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("train.es.sigma and train.es.lr must be > 0, train.es.weight_decay >= 0")
        if self.episodes < 0 or self.workers < 0:
            raise ConfigError("train.es.episodes and train.es.workers must be >= 0")
        return self


@dataclass
class TrainConfig:
    seed: int = 0
    batches: int = 2000  # 0: no outer-loop step; the checkpoint holds the initial weights (train.init)
    batch_size: int = 64
    lr: float = 1e-3
    adam_eps: float = 1e-8  # Adam's epsilon: larger keeps weights with tiny gradients (a handcrafted init's zeros) still
    lr_decay: list[tuple[int, float]] = field(default_factory=list)  # [(at_batch, lr), ...]
    clip: float = 1.0
    objective: str = "weighted"
    # > 0: the objective weighs log(error + log_floor) per inner step instead of the error itself (scale-free: a
    # step whose error is 1e-4 counts by its ratio, not its size, so the late steps of a converged agent still pull)
    log_floor: float = 0.0
    # > 0: each step's error in the objective gets + spread_weight x membrane.push_spread (how far the experts' own
    # answers sit from the output): an agent whose experts agree is indifferent to which of them is copied (BPTT only)
    spread_weight: float = 0.0
    rounds: tuple[int, int] = (1, 1)  # rounds per batch, drawn from [lo, hi] (the maximum for convergence/quorum)
    vote_weight: float = 0.0  # weight of the 'done'-vote loss: a vote predicts that the expert's message has settled
    horizon: tuple[int, int] = (0, 0)  # episode length drawn per batch from [lo, hi] (0 = task.steps)
    tbptt: int = 0  # back-propagate through at most this many inner steps (0 = the whole episode)
    init_from: str = ""  # start from these weights (fine-tuning): a checkpoint (.pt) or a policy (name or .onnx)
    init: str = ""  # structured initial weights (training/inits.py: 'prototypes'); '' = the default init
    trainable: list[str] = field(default_factory=list)  # train only these: name prefixes or 'heads:NAME' ([]: all)
    continue_prob: float = 0.0  # chance that a batch continues the last batch's agents (never reset)
    grow_prob: float = 0.0  # chance that a batch adds 1..N experts (fresh or cloned) at a random inner step
    grow_init: str = "mixed"  # what those experts are: 'mixed' (fresh or cloned, even odds), 'fresh' or 'clone'
    grow_most: float = 1.0  # a grown batch adds 1..round(grow_most x N) experts (1.0: up to as many again)
    # whom clones copy in a grown batch: 'batch' (one draw for all its episodes, every shipped recipe) or
    # 'episode' (each episode its own, as a deployed agent draws); ES's episodes always draw their own
    clone_draw: str = "batch"
    # weight of the guard: sum over the task's loss groups (few-shot: shots of the true class seen before) of
    # relu(mean loss in the group - the initial policy's, on the same predictions): learn, but lose no group
    guard_weight: float = 0.0
    guard_smoothing: float = 0.0  # 0: each batch's relu; b in (0, 1): a group counts while its moving average (over
    # the loss computations: batches, or with tbptt each chunk of a batch) is > 0
    stages: list[Stage] = field(default_factory=list)
    es: ESConfig = field(default_factory=ESConfig)  # `badger train --outer es` (evolution strategies)
    threads: int = 1
    log_every: int = 50
    ckpt_every: int = 500
    eval_episodes: int = 500  # the final evaluation's episodes (0: none)

    def validate(self):
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"train.seed must be in [0, 2^63), got {self.seed}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"train.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not 0 <= self.log_floor < math.inf:
            raise ConfigError(f"train.log_floor must be a finite number >= 0 (0: the error itself), "
                              f"got {self.log_floor}")
        if not 0 <= self.spread_weight < math.inf:
            raise ConfigError(f"train.spread_weight must be a finite number >= 0, got {self.spread_weight}")
        if not self.clip > 0 or not self.vote_weight >= 0:
            raise ConfigError(f"train.clip must be > 0 (the gradient norm's bound) and train.vote_weight >= 0, got "
                              f"{self.clip} and {self.vote_weight}")
        if self.batches < 0 or self.batch_size < 1 or self.lr <= 0 or self.adam_eps <= 0:
            raise ConfigError("train.batch_size, train.lr and train.adam_eps must be positive and train.batches >= 0 "
                              "(0: the initial weights, e.g. a handcrafted train.init, become the checkpoint)")
        lo, hi = self.rounds
        if not 1 <= lo <= hi:
            raise ConfigError("train.rounds must be a range [lo, hi] with 1 <= lo <= hi")
        lo, hi = self.horizon
        if not (lo == hi == 0 or 1 <= lo <= hi):
            raise ConfigError("train.horizon must be [0, 0] (the task's steps) or [lo, hi] with 1 <= lo <= hi")
        if self.log_every < 1 or self.ckpt_every < 1 or self.threads < 1 or self.eval_episodes < 0:
            raise ConfigError("train.log_every, train.ckpt_every and train.threads must be >= 1 and "
                              "train.eval_episodes >= 0 (0: no final evaluation)")
        if self.tbptt < 0:
            raise ConfigError("train.tbptt must be >= 0")
        if not 0 <= self.continue_prob < 1:
            raise ConfigError("train.continue_prob must be in [0, 1)")
        if not 0 <= self.grow_prob <= 1:
            raise ConfigError("train.grow_prob must be in [0, 1]")
        if not self.grow_most > 0:
            raise ConfigError("train.grow_most must be > 0 (a grown batch adds 1..round(grow_most x N) experts)")
        if self.grow_init not in GROW_INITS:
            raise ConfigError(f"train.grow_init must be one of {GROW_INITS}, got {self.grow_init!r}")
        if self.clone_draw not in CLONE_DRAWS:
            raise ConfigError(f"train.clone_draw must be one of {CLONE_DRAWS}, got {self.clone_draw!r}")
        if not 0 <= self.guard_weight < math.inf:
            raise ConfigError(f"train.guard_weight must be a finite number >= 0, got {self.guard_weight}")
        if not 0 <= self.guard_smoothing < 1:
            raise ConfigError(f"train.guard_smoothing must be in [0, 1), got {self.guard_smoothing}")
        if self.guard_weight and (self.grow_prob or self.continue_prob):
            raise ConfigError("train.guard_weight compares each batch with the initial policy on the same episodes "
                              "from their first step: it cannot be used with train.grow_prob or train.continue_prob")
        self.es.validate()
        return self

    def newcomers(self, rng, n: int) -> int:
        """How many experts a grown batch of ``n`` adds: 1..round(grow_most x n), one draw (with the default
        1.0 the draw ``rng.integers(1, n + 1)`` of every earlier recipe)."""
        return int(rng.integers(1, max(1, round(self.grow_most * n)) + 1))

    def grows_clones(self, rng) -> bool:
        """Whether a grown batch adds clones (else fresh experts), by ``grow_init``. Draws one number
        whatever the setting, so the rest of the batch's draws do not depend on it."""
        r = rng.random()
        return r < 0.5 if self.grow_init == "mixed" else self.grow_init == "clone"


@dataclass
class ExperimentConfig:
    """Everything a training run needs; saved in checkpoints and policy cards."""

    name: str = "experiment"
    agent: AgentConfig = field(default_factory=AgentConfig)
    task: TaskConfig = field(default_factory=lambda: task_config_class("guessing")())
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self):
        self.agent.validate()
        self.task.validate()
        self.train.validate()
        for st in self.train.stages:  # every stage's task settings must be valid for this task
            fields_ = {f.name for f in fields(self.task)}
            bad = set(st.settings) - fields_ | ({"name"} & set(st.settings))
            if bad:
                raise ConfigError(f"train.stages: task {self.task.name!r} has no settings {sorted(bad)}")
        return self

    def check_new_run(self):
        """What a new training run must hold beyond ``validate`` (a card or checkpoint made before these rules still
        loads): the rounds it trains with are the rounds its card deploys, within the runtimes' bound, and its
        episodes reach the task's steps (the card's evaluations run them)."""
        from .engine import MAX_ROUNDS

        r, (lo, hi) = self.agent.agreement.rounds, self.train.rounds
        if not lo <= r <= hi:  # training draws its rounds from train.rounds; the card deploys agreement.rounds
            raise ConfigError(f"agent.agreement.rounds = {r} is outside train.rounds = [{lo}, {hi}]: the policy would "
                              f"be trained with {lo}..{hi} rounds and deployed with {r}; set train.rounds = [{r}, {r}] "
                              "(or a range that holds it)")
        if max(r, hi) > MAX_ROUNDS:
            raise ConfigError(f"agent.agreement.rounds and train.rounds must be at most {MAX_ROUNDS} (a step's bound in "
                              "every runtime)")
        h = self.train.horizon[1]
        if h and h < self.task.steps:  # (the card then claimed task.steps, and its evaluations run them)
            raise ConfigError(f"train.horizon's longest episode ({h} steps) is shorter than task.steps "
                              f"({self.task.steps}), which the card's evaluations run: set task.steps <= {h}")
        return self


# --- dict / TOML round trip -------------------------------------------------------------


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _coerce(tp, value, where):
    """Convert a TOML/JSON value to the annotated type (tuples, nested dataclasses, lists)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        if isinstance(tp, type) and issubclass(tp, TaskConfig):
            tp = task_config_class(value.get("name", "guessing"), where)
        return _build(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)}, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arg,) = args
        return [_coerce(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if type(None) in args:  # X | None
        if value is None:
            return None
        (arg,) = [a for a in args if a is not type(None)]
        return _coerce(arg, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # no setting means anything at NaN or infinity
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def task_config_class(name, where: str = "task") -> type:
    """The settings class of the registered task ``name`` (a ConfigError names the known ones)."""
    from .tasks import config_class, task_names, unknown_task

    if not isinstance(name, str) or name not in task_names():
        raise ConfigError(f"{where}.name: {unknown_task(name)}")
    return config_class(name)


def _hints(cls):
    return typing.get_type_hints(cls)


def _build(cls, data: dict, where: str = ""):
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown setting(s) {sorted(unknown)} in [{where or cls.__name__}]; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"[{where or cls.__name__}]: {e}") from None


# Settings that older configs (checkpoints, policy cards) may still hold, and the value at
# which dropping them changes nothing. Anything else unknown is still refused.
RETIRED = {("train", "ponder_cost"): 0.0}


def migrate(data: dict) -> dict:
    """Drop retired settings that hold their neutral value (a copy; the input is unchanged)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for (section, key), neutral in RETIRED.items():
        if isinstance(data.get(section), dict) and data[section].get(key, neutral) == neutral:
            data[section].pop(key, None)
    return data


def flat_settings(data: dict, prefix: str = "") -> dict:
    """A nested map of settings as ``{"section.key": value}`` (the names ``--set`` takes); lists stay values."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flat_settings(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def from_dict(cls, data: dict):
    if not isinstance(data, dict):
        raise ConfigError(f"a {cls.__name__} is a map of settings, got {type(data).__name__}")
    if cls is ExperimentConfig:
        data = migrate(data)
    return _build(cls, data)


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (TOML values) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        path, text = item.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a table")
        node[keys[-1]] = _parse_value(text.strip())
    return data


def load_experiment(path: str | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as e:  # a folder, a file it may not read
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
    apply_overrides(data, overrides or [])
    return from_dict(ExperimentConfig, data).validate()

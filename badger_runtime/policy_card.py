"""A shipped policy: an ONNX graph of the expert step plus its card (JSON).

``NAME.onnx`` holds the expert policy's step ``(state, inbox, sensed) -> (state_out,
heads)`` with a dynamic batch axis; ``NAME.json`` (the card) holds everything else a
runtime needs: sizes, the heads layout, the learned initial state, routing and
agreement settings, the training task and command, evaluation numbers, versions,
and the sha256 of the .onnx file. Loading checks the hash, the format version and
the graph's signature against the card, and refuses a mismatch with a clear error.

No torch here: this is the deploy path.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import AgentConfig, ExperimentConfig, PolicySpec, TaskConfig, from_dict

CARD_FORMAT = "badger-policy/1"
INPUTS = ("state", "inbox", "sensed")
OUTPUTS = ("state_out", "heads")


class PolicyError(ValueError):
    """A policy file or card that cannot be used, with the reason."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def signature(spec: PolicySpec) -> dict:
    """Names, shapes ('batch' = dynamic) and dtypes of the graph's inputs and outputs."""
    b = "batch"
    return {
        "inputs": {"state": [b, spec.hidden], "inbox": [b, spec.msg_dim], "sensed": [b, spec.sensed_dim]},
        "outputs": {"state_out": [b, spec.hidden], "heads": [b, spec.heads_dim]},
        "dtype": "float32",
    }


def shipped_dir() -> Path | None:
    """The folder of the policies shipped with the package (``policies/`` of the source tree,
    installed as ``badger_runtime.policies``), or None if it is not there."""
    here = Path(__file__).resolve().parent
    for d in (here / "policies", here.parent / "policies"):  # installed; a source checkout
        if d.is_dir() and any(d.glob("*.onnx")):
            return d
    return None


#: the subfolder of the shipped folder that holds the retired policies: superseded ones that break a product
#: rule (fresh experts hurt them), kept for the results they made (docs/policies.md, "Retired policies")
RETIRED = "retired"


def retired_dir() -> Path | None:
    """The folder of the retired policies (``policies/retired/``), or None if it is not there."""
    d = shipped_dir()
    return d / RETIRED if d is not None and (d / RETIRED).is_dir() else None


def shipped_policies(retired: bool = False) -> list[str]:
    """Names of the shipped policies (``badger eval --policy NAME`` finds them from any folder); with
    ``retired``, the names of the retired ones instead (found by name too, never listed as shipped)."""
    d = retired_dir() if retired else shipped_dir()
    return sorted(p.stem for p in d.glob("*.onnx")) if d else []


def every_policy() -> list[str]:
    """The names of every policy the package carries: the shipped ones, then the retired ones (which still load by
    name, and whose cards' numbers still stand)."""
    return shipped_policies() + shipped_policies(retired=True)


def is_retired(path: str | Path) -> bool:
    """Whether a policy file (its .onnx or its card) is one of the retired policies (it lies in ``retired_dir()``)."""
    r = retired_dir()
    return r is not None and Path(path).resolve().parent == r.resolve()


def retired_note(card: dict) -> str:
    """What the commands say of a retired policy: why, and what to use instead (its card's growth advice)."""
    growth = card.get("growth") if isinstance(card.get("growth"), dict) else {}
    instead = growth.get("instead")
    return (f"{card.get('name', '?')} is retired: fresh experts hurt it, which breaks a product rule; it is kept in "
            f"policies/retired/ for the results it made" + (f". Instead: {instead}" if instead else ""))


def resolve_policy(path: str | Path) -> Path:
    """A policy file from a path (``policies/NAME.onnx``, ``NAME.json``) or a shipped policy's name
    (``dimensions-v6``). A path that exists wins; then a shipped policy of that name (or file name); then a
    retired one (``policies/retired/``), so the commands that made their results still run."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise PolicyError(f"a policy is a path or a shipped policy's name (`badger policies`), got {str(path)[:40]!r}")
    p = Path(path)
    onnx = p if p.suffix == ".onnx" else (p.with_suffix(".onnx") if p.suffix == ".json" else Path(f"{p}.onnx"))
    if onnx.is_file():
        return onnx
    for d in (shipped_dir(), retired_dir()):
        if d is not None and (d / onnx.name).is_file():
            return d / onnx.name
    names, retired = shipped_policies(), set(shipped_policies(retired=True))
    close = [f"{n} (retired)" if n in retired else n
             for n in difflib.get_close_matches(onnx.stem, names + sorted(retired), n=3, cutoff=0.6)]
    if close:
        raise PolicyError(f"policy file not found: {onnx}; did you mean {' or '.join(close)}? "
                          "(`badger policies` lists the shipped ones)")
    known = ", ".join(names) or "none installed"
    raise PolicyError(f"policy file not found: {onnx} (shipped policies, usable by name: {known})")


def card_paths(path: str | Path) -> tuple[Path, Path]:
    """(onnx, card) paths from either file's path."""
    p = Path(path)
    if p.suffix == ".json":
        return p.with_suffix(".onnx"), p
    return p, p.with_suffix(".json")


@dataclass
class OnnxPolicy:
    """The expert policy run by onnxruntime; the object the numpy rollout and the actors call."""

    spec: PolicySpec
    h0: np.ndarray
    agent: AgentConfig
    task: TaskConfig
    card: dict
    path: Path
    session: object
    from_retired: bool = False  # loaded from ``retired_dir()`` (decided at load: ``path`` may be relative)

    def step(self, h, inbox, sensed):
        feeds = {"state": np.ascontiguousarray(h, np.float32), "inbox": np.ascontiguousarray(inbox, np.float32),
                 "sensed": np.ascontiguousarray(sensed, np.float32)}
        state_out, heads = self.session.run(OUTPUTS, feeds)
        return state_out, heads

    @property
    def name(self) -> str:
        return self.card.get("name", self.path.stem)

    @property
    def lifetime(self) -> dict:
        """{"kind": "continual" | "episodic", "horizon": int | None, "why": str} from the card. A card
        without one is episodic at its training horizon (never checked for long runs)."""
        life = self.card.get("lifetime")
        if isinstance(life, dict) and life.get("kind") in ("continual", "episodic"):
            return life
        t = self.task
        return {"kind": "episodic", "horizon": int(t.steps), "why": "the card does not say: its training horizon"}

    @property
    def horizon(self) -> int | None:
        """Inner steps an agent of this policy may take without a reset (None: continual)."""
        life = self.lifetime
        return None if life["kind"] == "continual" else int(life["horizon"])

    @property
    def growth(self) -> dict:
        """{"fresh": "ok" | "hurts", "why": str, "instead": str (optional), and optionally "clone",
        "clone_why", "clone_instead" alike} from the card: what adding fresh experts (clones) to a running
        agent was measured to do. A card without one says nothing (nothing is refused; ``engine.check_growth``)."""
        return self.card.get("growth") or {}

    @property
    def retired(self) -> str | None:
        """None for a policy that is not retired; for a retired one (``policies/retired/``), the note the
        commands print: why, and what to use instead (its card's growth advice)."""
        return retired_note({"name": self.name, "growth": self.growth}) if self.from_retired else None


def _check_graph(session, spec: PolicySpec, path: Path):
    sig = signature(spec)
    got_in = {i.name: i for i in session.get_inputs()}
    got_out = {o.name: o for o in session.get_outputs()}
    if set(got_in) != set(INPUTS) or set(got_out) != set(OUTPUTS):
        raise PolicyError(f"{path}: graph inputs {sorted(got_in)} / outputs {sorted(got_out)} do not match the card's "
                          f"{list(INPUTS)} / {list(OUTPUTS)}")
    for group, got in (("inputs", got_in), ("outputs", got_out)):
        for name, shape in sig[group].items():
            g = got[name]
            if g.type != "tensor(float)":
                raise PolicyError(f"{path}: {name} has type {g.type}, the card says float32")
            if len(g.shape) != 2 or g.shape[1] != shape[1]:
                raise PolicyError(f"{path}: {name} has shape {g.shape}, the card says {shape}")
            if isinstance(g.shape[0], int):
                raise PolicyError(f"{path}: {name} has a fixed batch axis {g.shape[0]}; a dynamic one is required")


def load_policy(path: str | Path, threads: int = 1) -> OnnxPolicy:
    """Load ``NAME.onnx`` + ``NAME.json`` (a path, or a shipped policy's name); raise PolicyError
    if anything does not match."""
    onnx_path, card_path = card_paths(resolve_policy(path))
    if not card_path.is_file():
        raise PolicyError(f"policy card not found: {card_path} (every .onnx policy ships with its card)")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # (a 100k-deep card: RecursionError)
        raise PolicyError(f"{card_path} is not valid JSON: {type(e).__name__}: {str(e)[:160]}") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        got = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise PolicyError(f"{card_path}: card format {got!r} is not {CARD_FORMAT!r}")
    digest = sha256_file(onnx_path)
    if digest != card.get("sha256"):
        raise PolicyError(f"{onnx_path}: sha256 {digest[:16]}... does not match the card's "
                          f"{str(card.get('sha256'))[:16]}...: the file is not the one the card describes")
    try:
        exp = from_dict(ExperimentConfig, card["config"]).validate()
    except (KeyError, TypeError, ValueError, RecursionError) as e:  # ConfigError is a ValueError
        raise PolicyError(f"{card_path}: bad config in card: {type(e).__name__}: {str(e)[:300]}") from None
    spec = exp.agent.policy
    try:
        h0 = np.asarray(card.get("initial_state", []), np.float32)
    except (TypeError, ValueError) as e:
        raise PolicyError(f"{card_path}: initial_state must be a list of {spec.hidden} numbers ({e})") from None
    if h0.shape != (spec.hidden,) or not np.isfinite(h0).all():
        raise PolicyError(f"{card_path}: initial_state has shape {h0.shape}, expected ({spec.hidden},) finite numbers")
    life = card.get("lifetime")
    if life is not None and not (isinstance(life, dict) and (
            (life.get("kind") == "continual" and life.get("horizon") is None)
            or (life.get("kind") == "episodic" and type(life.get("horizon")) is int and life["horizon"] >= 1))):
        raise PolicyError(f"{card_path}: lifetime must be {{'kind': 'continual', 'horizon': null}} or "
                          f"{{'kind': 'episodic', 'horizon': int >= 1}}, got {str(life)[:200]}")
    growth = card.get("growth")
    if growth is not None and not (isinstance(growth, dict) and growth.get("fresh") in ("ok", "hurts")
                                   and growth.get("clone", "ok") in ("ok", "hurts")
                                   and all(isinstance(growth.get(k, ""), str)
                                           for k in ("why", "instead", "clone_why", "clone_instead"))):
        raise PolicyError(f"{card_path}: growth must be {{'fresh': 'ok' | 'hurts', 'why': str, 'instead': str[, "
                          f"'clone': 'ok' | 'hurts', 'clone_why': str, 'clone_instead': str]}}, "
                          f"got {str(growth)[:200]}")
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad graphs
        raise PolicyError(f"{onnx_path}: onnxruntime cannot load it: {e}") from None
    _check_graph(session, spec, onnx_path)
    return OnnxPolicy(spec, h0, exp.agent, exp.task, card, onnx_path, session, is_retired(onnx_path))


def write_card(card: dict, card_path: Path):
    tmp = card_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, card_path)

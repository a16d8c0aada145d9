"""Session checkpoints: one versioned file per session, written atomically.

A checkpoint file is::

    magic   8 bytes  b"BADGERSS"
    version 4 bytes  big-endian unsigned (FORMAT_VERSION)
    crc32   4 bytes  big-endian unsigned, of the body
    body    msgpack map: the session record (arrays as the shared codec's array maps)

The record (``session_record``) holds the session's metadata and its agent's snapshot
(``engine.Agent.snapshot``: expert states, wiring, addresses, the random generator's
state), so a restored session continues bit for bit. The same record is what the
``snapshot`` request returns and what ``open`` accepts to restore a session from.

Writes go to ``NAME.ckpt.tmp``, are fsynced, renamed over ``NAME.ckpt``, and the folder is
fsynced: a reader sees the old file or the new one, never a torn one, and with
``fsync=True`` the new one survives a power cut once ``write`` returns. Without fsync the
file still survives the process being killed (the kernel holds the data).

A session's state is private: the state folder and its subfolders are created 0700 (and
``sessions/``, ``rejected/`` are set to 0700 if they exist looser), checkpoint files 0600,
whatever the umask.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..codec import CodecError, packb, unpackb
from ..config import MAX_SEED
from ..engine import MAX_ABS_INPUT, Agent

MAGIC = b"BADGERSS"
FORMAT = "badger-serve-session"
FORMAT_VERSION = 2  # 2: the agent record holds its interface (addresses, visibility, input parts)
READABLE_VERSIONS = (1, 2)  # version 1 records (guessing-game agents) are read and migrated
_HEADER = struct.Struct(">8sII")
SUFFIX = ".ckpt"
DIR_MODE = 0o700
FILE_MODE = 0o600
FEEDBACKS = ("scalar", "per_dim", "one_expert")


class StoreError(ValueError):
    """A checkpoint that cannot be read or used (bad magic, version, checksum, contents)."""


class NotServedHere(StoreError):
    """An intact record this server cannot serve: another policy's, or a task its process does not know (a plugin's
    module not named in BADGER_TASKS). A restart with the wrong ``--policy`` or environment must not lose it:
    ``why`` says which."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


# What a served agent can hold, so that the store accepts every record the server writes and refuses
# absurd ones (an address of 3e38 made the outputs NaN): inputs within +-MAX_ABS_INPUT; a bandit's feedback
# slot points at the pulled arm's address times 1 - 2 x the step's feedback (tasks.bandit.pointer_scale), up to
# (1 + 2 MAX_ABS_INPUT) times an address; heads are linear in h (|h| <= 1), far below MAX_ABS_HEADS for any
# trained or handcrafted policy, where heads of 1e30 made the next step NaN.
MAX_ABS_SLOT_ADDR = (1 + 2 * MAX_ABS_INPUT) * MAX_ABS_INPUT
MAX_ABS_HEADS = 1e6
MAX_COUNT = 1 << 62  # a step count, episode or seed opened from a snapshot: 2^62 steps of headroom below 2^63


# ---- records ----------------------------------------------------------------------------------

def agent_record(agent: Agent) -> dict:
    """The agent's snapshot as msgpack-ready values (the generator state as a JSON string:
    its integers are 128-bit)."""
    snap = agent.snapshot()
    snap["rng"] = json.dumps(snap["rng"])
    return snap


def _array(rec: dict, key: str, shape: tuple, dtype=np.float32, optional: bool = False,
           bound: float | None = MAX_ABS_INPUT) -> np.ndarray | None:
    """Entry ``key``: an array of ``shape`` and ``dtype``, finite and (``bound``) within +-bound where it holds
    numbers: an address of 3e38 made the agent's outputs NaN."""
    a = rec.get(key)
    if a is None and optional:
        return None
    if not isinstance(a, np.ndarray):
        raise StoreError(f"agent.{key} must be an array, got {type(a).__name__}")
    if a.dtype.name != np.dtype(dtype).name:
        raise StoreError(f"agent.{key} must be {np.dtype(dtype).name}, got {a.dtype.name}")
    if a.shape != shape:
        raise StoreError(f"agent.{key} has shape {a.shape}, expected {shape}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise StoreError(f"agent.{key} contains NaN or inf")
    if bound is not None and a.dtype.kind == "f" and a.size and np.abs(a).max() > bound:
        raise StoreError(f"agent.{key} has values beyond +-{bound:g}")
    return np.array(a, dtype=dtype)  # a writable copy of its own


# The wire format's own rules for the integer arrays; their shapes and ranges against the agent are
# ``Agent.restore``'s (it checks every snapshot, a record's included)
def _neighbors(rec: dict) -> np.ndarray | None:
    """Sparse routing's sender lists [1, N, C] (int64 indices of other experts), or None."""
    idx = rec.get("route_neighbors")
    if idx is None:
        return None
    if not isinstance(idx, np.ndarray) or idx.dtype.name != "int64":
        raise StoreError("agent.route_neighbors must be an int64 array [1, N, C]")
    return np.array(idx)


def _seats(rec: dict) -> np.ndarray | None:
    """Each expert's seat (``membrane.Visibility``): N distinct int64 below 2^40, or None (0 .. N - 1)."""
    seats = rec.get("seats")
    if seats is None:
        return None
    if not isinstance(seats, np.ndarray) or seats.dtype.name != "int64" or seats.ndim != 1 or (
            seats.size and seats.max() >= 1 << 40):
        raise StoreError("agent.seats must be an int64 array [N] of seats below 2^40")
    return np.array(seats)


def restore_agent(policy, rec: Any, *, max_experts: int = 1 << 20, max_dims: int = 1 << 16,
                  agent_config=None, max_count: int = MAX_COUNT) -> Agent:
    """An ``engine.Agent`` (batch 1) continued from ``agent_record`` output; everything is
    checked against the policy first, so a bad record raises StoreError, never a crash later.
    ``max_count``: the step count's bound (a checkpoint the server wrote may have stepped past a
    snapshot's ``MAX_COUNT``)."""
    if not isinstance(rec, dict):
        raise StoreError(f"agent record must be a map, got {type(rec).__name__}")
    spec = policy.spec
    h = rec.get("h")
    if not isinstance(h, np.ndarray) or h.ndim != 3 or h.shape[0] != 1 or h.shape[2] != spec.hidden:
        raise StoreError(f"agent.h must be an array [1, N, {spec.hidden}] for this policy, got "
                         f"{getattr(h, 'shape', type(h).__name__)}")
    n = h.shape[1]
    if not 1 <= n <= max_experts:
        raise StoreError(f"agent has {n} experts; allowed 1..{max_experts}")
    if "visibility" not in rec:  # a record of format version 1 (the guessing game's agent)
        rec = _from_v1(rec)
    out = rec.get("out_addr")
    d = out.shape[1] if isinstance(out, np.ndarray) and out.ndim == 3 else -1
    if not 1 <= d <= max_dims:
        raise StoreError(f"agent.out_addr must be an array [1, d, A] with 1 <= d <= {max_dims}")
    parts = _parts(rec.get("parts"))
    slots = sum(size for _, size in parts)
    visibility = _visibility(rec.get("visibility"), slots)
    A = spec.addr_dim
    t, seed = rec.get("t"), rec.get("seed")
    if type(t) is not int or not 0 <= t < max_count or type(seed) is not int or not 0 <= seed <= MAX_SEED:
        raise StoreError(f"agent.t and agent.seed must be non-negative ints (below {max_count:,} / 2^63)")
    snap = {
        "t": t, "seed": seed,
        "h": _array(rec, "h", (1, n, spec.hidden), bound=1.001),  # the card's state bound, [-1, 1], and rounding
        "heads": _array(rec, "heads", (1, n, spec.heads_dim), bound=MAX_ABS_HEADS),
        "noise": _array(rec, "noise", (1, n, spec.hidden)),
        "ids": _array(rec, "ids", (1, n, spec.id_dim)) if spec.id_dim else None,
        "route_mask": _array(rec, "route_mask", (1, n, n), bool, optional=True),
        "route_neighbors": _neighbors(rec),
        "seats": _seats(rec),
        "out_addr": _array(rec, "out_addr", (1, d, A)),
        "slot_addr": _array(rec, "slot_addr", (1, slots, A), bound=MAX_ABS_SLOT_ADDR),
        "visibility": visibility, "parts": parts,
    }
    rng = rec.get("rng")
    if not isinstance(rng, str) or len(rng) > 4096:
        raise StoreError("agent.rng must be the generator state as a short JSON string")
    try:
        snap["rng"] = json.loads(rng)
        agent = Agent(policy, agent_config).restore(snap)
    except Exception as e:  # noqa: BLE001 (a malformed record of any shape is refused, never a crash)
        raise StoreError(f"agent record cannot be restored: {type(e).__name__}: {str(e)[:200]}") from None
    return agent


def _from_v1(rec: dict) -> dict:
    """A version-1 agent record (guessing game: ``feedback`` and ``targets``) in today's terms."""
    feedback = rec.get("feedback")
    if feedback not in FEEDBACKS:
        raise StoreError(f"agent.feedback must be one of {FEEDBACKS}, got {feedback!r}")
    targets = rec.get("targets")
    d = targets.shape[-1] if isinstance(targets, np.ndarray) and targets.ndim == 2 else -1
    if d < 1:
        raise StoreError("agent.targets must be an array [1, d]")
    fb = 1 if feedback == "scalar" else d
    vis = {"kind": "first", "lo": d, "hi": 2 * d, "fraction": 1.0, "seed": 0} if feedback == "one_expert" else \
        {"kind": "all", "lo": 0, "hi": 0, "fraction": 1.0, "seed": 0}
    return {**rec, "parts": [["observation", d], ["feedback", fb]], "visibility": vis}


def _parts(parts) -> list[tuple[str, int]]:
    """The interface's named input parts: a non-empty list of [name, size] with sizes >= 1."""
    ok = isinstance(parts, (list, tuple)) and 0 < len(parts) <= 64 and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and 0 < len(p[0]) <= 64
        and type(p[1]) is int and 1 <= p[1] <= 1 << 20 for p in parts)
    if not ok:
        raise StoreError("agent.parts must be a list of [name, size] pairs (names of 1-64 characters, sizes >= 1)")
    names = [p[0] for p in parts]
    taken = set(names) & RESERVED_PART_NAMES
    if len(set(names)) != len(names) or taken:  # a step names its parts beside these fields
        raise StoreError(f"agent.parts names must be distinct and not {sorted(RESERVED_PART_NAMES)}: {names[:8]}")
    return [(p[0], p[1]) for p in parts]


STEP_FIELDS = frozenset({"slots", "t", "episode", "secret"})  # a step request's fields beside its input parts
RESERVED_PART_NAMES = STEP_FIELDS | {"arm"}  # ... and a pointer task's field (tasks.Task.pointer_field)


def _visibility(vis, slots: int) -> dict:
    from ..membrane import Visibility

    if not isinstance(vis, dict):
        raise StoreError(f"agent.visibility must be a map, got {type(vis).__name__}")
    try:
        v = Visibility.from_dict(vis)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise StoreError(f"agent.visibility is not a visibility rule: {type(e).__name__}: {e}") from None
    if v.hi > slots:
        raise StoreError(f"agent.visibility covers slots up to {v.hi}, the agent has {slots}")
    return v.to_dict()


# ---- files ----------------------------------------------------------------------------------

def encode(record: dict) -> bytes:
    body = packb(record)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(body)) + body


def decode(data: bytes) -> dict:
    if len(data) < _HEADER.size:
        raise StoreError(f"checkpoint of {len(data)} bytes is shorter than its header")
    magic, version, crc = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise StoreError(f"not a session checkpoint (magic {magic!r})")
    if version not in READABLE_VERSIONS:
        raise StoreError(f"checkpoint format version {version}; this server reads versions {READABLE_VERSIONS}")
    body = data[_HEADER.size:]
    if zlib.crc32(body) != crc:
        raise StoreError("checkpoint checksum mismatch (the file is corrupt)")
    try:
        record = unpackb(body, arrays=True, copy=True)
    except CodecError as e:
        raise StoreError(f"checkpoint body: {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") not in READABLE_VERSIONS:
        raise StoreError("checkpoint body is not a session record of this version")
    return record


def _private_dir(path: Path):
    """Create ``path`` 0700 (or tighten it to 0700: it holds session state)."""
    path.mkdir(mode=DIR_MODE, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, DIR_MODE)


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SessionStore:
    """The ``--state-dir``: ``sessions/NAME.ckpt`` per session, ``rejected/`` for files that
    could not be restored (kept for a human, never deleted)."""

    def __init__(self, root: str | Path, *, fsync: bool = True):
        self.root = Path(root)
        self.dir = self.root / "sessions"
        self.rejected_dir = self.root / "rejected"
        self.fsync = fsync
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        _private_dir(self.dir)
        if fsync:
            _fsync_dir(self.root)

    def path(self, name: str) -> Path:
        return self.dir / (name + SUFFIX)

    def write(self, name: str, record: dict) -> int:
        """Atomically replace NAME's checkpoint; returns the bytes written. Raises OSError."""
        data = encode(record)
        final = self.path(name)
        tmp = final.with_name(final.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # POSIX: a leftover .tmp would keep its mode through O_CREAT
                os.fchmod(f.fileno(), FILE_MODE)
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)
        if self.fsync:
            _fsync_dir(self.dir)
        return len(data)

    def delete(self, name: str):
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            return
        if self.fsync:
            _fsync_dir(self.dir)

    def names(self) -> list[str]:
        return sorted(p.name[: -len(SUFFIX)] for p in self.dir.glob("*" + SUFFIX))

    def load_all(self) -> Iterator[tuple[str, dict | StoreError]]:
        """(name, record) for every checkpoint, or (name, StoreError) for one that cannot be read.
        Leftover ``.tmp`` files (a write cut short) are removed: their rename never happened."""
        for tmp in self.dir.glob("*" + SUFFIX + ".tmp"):
            tmp.unlink(missing_ok=True)
        for name in self.names():
            try:
                yield name, decode(self.path(name).read_bytes())
            except StoreError as e:
                yield name, e
            except OSError as e:
                yield name, StoreError(f"cannot read: {e}")

    def reject(self, name: str) -> Path:
        """Move NAME's checkpoint aside to ``rejected/`` (with a unique suffix); returns where."""
        _private_dir(self.rejected_dir)
        dst = self.rejected_dir / (name + SUFFIX)
        i = 1
        while dst.exists():
            dst = self.rejected_dir / f"{name}{SUFFIX}.{i}"
            i += 1
        os.replace(self.path(name), dst)
        return dst

"""The versioned wire schema for messages between expert actors (sans-IO).

One message is one msgpack map::

    {"version": 1, "kind": "msg", "sender": 3, "receivers": [0, 5],
     "episode": 12, "step": 4, "round": 1,
     "payload": {"key": <array>, "query": <array>, "value": <array>, ...}}

with exactly these eight fields. Arrays use the shared codec (``badger_runtime.codec``):
``{"dtype", "shape", "data": raw little-endian bytes}``; allowed dtypes float32, float64,
int32, int64, bool. Payload values are arrays, ints (int64 range), floats or strs.

``encode`` and ``decode`` apply the same checks, so whatever ``encode`` accepts,
``decode`` (with the same ``allow_nonfinite``) gives back exactly (bitwise for arrays).
``decode`` never raises anything but ``MessageError`` (a ``ValueError``) on bad input.

Decoded arrays are *read-only views* on the bytes msgpack produced (no copy: fast for
the many small vectors the actors exchange); pass ``copy=True`` to ``decode`` for
writable arrays.

Kinds (``KINDS``) and the payload fields each one requires (``PAYLOAD_RULES``):

- ``msg``: an expert's (or a shard's) routed message; float32 arrays ``key``, ``query``, ``value``.
- ``observe``: membrane -> expert (or shard): float32 arrays ``slot_addr``, ``slot_val`` (the
  slots it may read) and an int ``rounds`` >= 1 (the stage's round limit).
- ``push``: expert -> membrane; float32 arrays ``key``, ``value``.
- ``vote``: one of the forms in ``PAYLOAD_FORMS``: an expert's ``vote`` and message ``change``
  after a round; the membrane's ``decision`` (stop / continue); an expert's ``done`` (rounds
  run, when it may not push); the sharded membrane's ``active`` episodes.
- ``control``: ``op`` a str in ``CONTROL_OPS`` (add / remove).

To add a kind, add it to ``KINDS`` and give it an entry in ``PAYLOAD_RULES`` (and, if its
payload has alternative forms, in ``PAYLOAD_FORMS``); fields not named in a rule are free (any
allowed payload value). Changing the meaning of an existing
field or the top-level layout means bumping ``SCHEMA_VERSION``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import msgpack
import numpy as np

from ..codec import MAX_ARRAY_BYTES, MiB, CodecError, pack_array, unpack_array

__all__ = [
    "SCHEMA_VERSION", "KINDS", "CONTROL_OPS", "PAYLOAD_RULES", "PAYLOAD_FORMS", "MAX_FRAME", "MAX_ARRAY_BYTES",
    "MAX_RECEIVERS", "MAX_PAYLOAD_FIELDS", "MAX_STR_BYTES", "MAX_INT",
    "MessageError", "Message", "encode", "decode", "validate",
]

SCHEMA_VERSION = 1

KINDS: tuple[str, ...] = ("msg", "observe", "push", "vote", "control")
CONTROL_OPS: tuple[str, ...] = ("add", "remove")

MAX_FRAME = 64 * MiB            # a whole encoded message
MAX_RECEIVERS = 1 << 16
MAX_PAYLOAD_FIELDS = 1024
MAX_KEY_CHARS = 256              # a payload field name
MAX_STR_BYTES = 1 * MiB          # a payload str value (UTF-8 bytes)
MAX_INT = (1 << 63) - 1          # ids, counters and payload ints fit an int64
MIN_INT = -(1 << 63)

FIELDS: tuple[str, ...] = ("version", "kind", "sender", "receivers", "episode", "step", "round", "payload")
_FIELD_SET = frozenset(FIELDS)

PayloadValue = Union[np.ndarray, int, float, str]


class MessageError(ValueError):
    """A message that does not follow the schema (the text names the offending field)."""


# ---- per-kind payload rules ---------------------------------------------------------------------

_F32 = np.dtype(np.float32)


def _float32_array(name: str, v: Any) -> None:
    if not isinstance(v, np.ndarray) or v.dtype != _F32:
        got = f"{v.dtype} array" if isinstance(v, np.ndarray) else type(v).__name__
        raise MessageError(f"payload[{name!r}]: must be a float32 array, got {got}")


def _one_of(options: tuple[str, ...]) -> Callable[[str, Any], None]:
    def check(name: str, v: Any) -> None:
        if not isinstance(v, str) or v not in options:
            raise MessageError(f"payload[{name!r}]: must be one of {list(options)}, got {_short(v)}")
    return check


# kind -> {required field: check(name, value) raising MessageError}
def _rounds(name: str, v: Any) -> None:
    if type(v) is not int or v < 1:
        raise MessageError(f"payload[{name!r}]: must be an int >= 1, got {_short(v)}")


PAYLOAD_RULES: dict[str, dict[str, Callable[[str, Any], None]]] = {
    "msg": {"key": _float32_array, "query": _float32_array, "value": _float32_array},
    "observe": {"slot_addr": _float32_array, "slot_val": _float32_array, "rounds": _rounds},
    "push": {"key": _float32_array, "value": _float32_array},
    "vote": {},
    "control": {"op": _one_of(CONTROL_OPS)},
}
assert set(PAYLOAD_RULES) == set(KINDS), "every kind needs a PAYLOAD_RULES entry"

# kind -> alternative sets of required fields (a payload must hold every field of one of them)
PAYLOAD_FORMS: dict[str, tuple[tuple[str, ...], ...]] = {
    "vote": (("vote", "change"), ("decision",), ("done",), ("active",)),
}


# ---- the message -------------------------------------------------------------------------------

@dataclass(eq=False)
class Message:
    """One actor message. ``receivers`` is a tuple of distinct expert ids (may be empty)."""

    kind: str
    sender: int
    receivers: tuple[int, ...]
    episode: int
    step: int
    round: int
    payload: dict[str, PayloadValue] = field(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        """Field-wise equality; arrays compare by dtype, shape and exact bytes (so NaN == NaN)."""
        if not isinstance(other, Message):
            return NotImplemented
        if (self.kind, self.sender, tuple(self.receivers), self.episode, self.step, self.round) != (
                other.kind, other.sender, tuple(other.receivers), other.episode, other.step, other.round):
            return False
        if self.payload.keys() != other.payload.keys():
            return False
        for k, a in self.payload.items():
            if not _value_equal(a, other.payload[k]):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]


def _value_equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if type(a) is not type(b) and not (isinstance(a, float) and isinstance(b, float)):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


# ---- field checks (shared by encode and decode) -------------------------------------------------

def _int_field(name: str, v: Any, lo: int = 0) -> int:
    if type(v) is not int:
        if isinstance(v, np.integer):
            v = int(v)
        else:
            raise MessageError(f"{name}: must be an int, got {type(v).__name__}")
    if not lo <= v <= MAX_INT:
        raise MessageError(f"{name}: {v} out of range [{lo}, {MAX_INT}]")
    return v


def _header(kind: Any, sender: Any, receivers: Any, episode: Any, step: Any, rnd: Any) -> tuple:
    if not isinstance(kind, str):
        raise MessageError(f"kind: must be a str, got {type(kind).__name__}")
    if kind not in PAYLOAD_RULES:
        raise MessageError(f"kind: unknown kind {_short(kind)} (known: {', '.join(KINDS)})")
    sender = _int_field("sender", sender)
    if not isinstance(receivers, (list, tuple)):
        raise MessageError(f"receivers: must be a list of ints, got {type(receivers).__name__}")
    if len(receivers) > MAX_RECEIVERS:
        raise MessageError(f"receivers: {len(receivers)} receivers, at most {MAX_RECEIVERS}")
    recv = tuple(receivers)
    for r in recv:  # fast path; on anything unusual redo it with per-entry names and conversions
        if type(r) is not int or not 0 <= r <= MAX_INT:
            recv = tuple(_int_field(f"receivers[{i}]", r) for i, r in enumerate(receivers))
            break
    if len(set(recv)) != len(recv):
        raise MessageError("receivers: duplicate receiver ids")
    return (kind, sender, recv, _int_field("episode", episode), _int_field("step", step),
            _int_field("round", rnd))


def _scalar(name: str, v: Any, allow_nonfinite: bool) -> Any:
    """Check a payload scalar; returns it as a plain Python int/float/str."""
    t = type(v)
    if t is not int and t is not float and t is not str:
        # encode side only: numpy scalars and int/float subclasses (np.float64) go as Python scalars
        if isinstance(v, (np.integer, np.floating)):
            v = v.item()
        elif isinstance(v, float):
            v = float(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            v = int(v)
        else:
            raise MessageError(f"payload[{name!r}]: must be an array, int, float or str, got {t.__name__}")
        t = type(v)
    if t is int:
        if not MIN_INT <= v <= MAX_INT:
            raise MessageError(f"payload[{name!r}]: int {v} outside the int64 range")
    elif t is float:
        if not allow_nonfinite and not math.isfinite(v):
            raise MessageError(f"payload[{name!r}]: float is NaN or inf")
    elif len(v) > MAX_STR_BYTES // 4:  # str: only long ones can exceed the byte limit
        try:
            nbytes = len(v.encode("utf-8"))
        except UnicodeEncodeError:
            raise MessageError(f"payload[{name!r}]: str is not valid unicode") from None
        if nbytes > MAX_STR_BYTES:
            raise MessageError(f"payload[{name!r}]: str longer than {MAX_STR_BYTES} bytes")
    return v


def _key(k: Any) -> None:
    if not isinstance(k, str):
        raise MessageError(f"payload: field names must be str, got {type(k).__name__}")
    if not 0 < len(k) <= MAX_KEY_CHARS:
        raise MessageError(f"payload: field name length must be 1..{MAX_KEY_CHARS}, got {len(k)}")


def _apply_rules(kind: str, payload: dict) -> None:
    for name, check in PAYLOAD_RULES[kind].items():
        if name not in payload:
            raise MessageError(f"payload: kind {kind!r} requires field {name!r}")
        check(name, payload[name])
    forms = PAYLOAD_FORMS.get(kind)
    if forms and not any(all(f in payload for f in form) for form in forms):
        raise MessageError(f"payload: kind {kind!r} needs the fields of one of {[list(f) for f in forms]}")


# ---- encode / decode --------------------------------------------------------------------------

def validate(msg: Message, *, allow_nonfinite: bool = False) -> None:
    """Raise MessageError unless ``msg`` can be encoded (the checks ``decode`` applies)."""
    encode(msg, allow_nonfinite=allow_nonfinite)


def encode(msg: Message, *, allow_nonfinite: bool = False) -> bytes:
    """Validate ``msg`` and encode it as msgpack bytes (raises MessageError when invalid).

    numpy integer/float scalars in the payload are sent as Python int/float.
    """
    if not isinstance(msg, Message):
        raise MessageError(f"expected a Message, got {type(msg).__name__}")
    kind, sender, recv, episode, step, rnd = _header(msg.kind, msg.sender, msg.receivers,
                                                    msg.episode, msg.step, msg.round)
    payload = msg.payload
    if not isinstance(payload, dict):
        raise MessageError(f"payload: must be a dict, got {type(payload).__name__}")
    if len(payload) > MAX_PAYLOAD_FIELDS:
        raise MessageError(f"payload: {len(payload)} fields, at most {MAX_PAYLOAD_FIELDS}")
    _apply_rules(kind, payload)
    wire: dict[str, Any] = {}
    for k, v in payload.items():
        _key(k)
        if isinstance(v, np.ndarray):
            try:
                wire[k] = pack_array(v, allow_nonfinite=allow_nonfinite, max_bytes=MAX_ARRAY_BYTES,
                                     field=f"payload[{k!r}]")
            except CodecError as e:
                raise MessageError(str(e)) from None
        else:
            wire[k] = _scalar(k, v, allow_nonfinite)
    try:
        out = msgpack.packb({"version": SCHEMA_VERSION, "kind": kind, "sender": sender,
                             "receivers": list(recv), "episode": episode, "step": step, "round": rnd,
                             "payload": wire}, use_bin_type=True)
    except Exception as e:  # e.g. UnicodeEncodeError for a str holding lone surrogates
        raise MessageError(f"cannot encode message: {type(e).__name__}: {str(e)[:200]}") from None
    if len(out) > MAX_FRAME:
        raise MessageError(f"message of {len(out)} bytes exceeds the limit of {MAX_FRAME}")
    return out


def _reject_ext(code: int, data: bytes) -> Any:
    raise MessageError(f"msgpack ext type {code} not allowed")


def decode(data: bytes | bytearray | memoryview, *, allow_nonfinite: bool = False,
           copy: bool = False) -> Message:
    """Decode and fully validate one message; raises MessageError (only) on any problem.

    Arrays come back as read-only views on the decoded buffer unless ``copy=True``.
    Float arrays and floats must be finite unless ``allow_nonfinite=True``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"expected bytes, got {type(data).__name__}")
    n = data.nbytes if isinstance(data, memoryview) else len(data)
    if n > MAX_FRAME:
        raise MessageError(f"message of {n} bytes exceeds the limit of {MAX_FRAME}")
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True,
                              ext_hook=_reject_ext, timestamp=1)
    except MessageError:
        raise
    except Exception as e:  # ExtraData, FormatError, StackError, OutOfData, UnicodeDecodeError, BufferError...
        raise MessageError(f"malformed msgpack: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise MessageError(f"message must be a msgpack map, got {type(obj).__name__}")
    if obj.keys() != _FIELD_SET:
        missing = sorted(_FIELD_SET - obj.keys())
        extra = sorted(map(_short, obj.keys() - _FIELD_SET))
        raise MessageError(f"message fields: missing {missing}, unexpected {extra}")
    version = obj["version"]
    if type(version) is not int:
        raise MessageError(f"version: must be an int, got {type(version).__name__}")
    if version != SCHEMA_VERSION:
        raise MessageError(f"version: unsupported schema version {version} (expected {SCHEMA_VERSION})")
    kind, sender, recv, episode, step, rnd = _header(obj["kind"], obj["sender"], obj["receivers"],
                                                    obj["episode"], obj["step"], obj["round"])
    raw = obj["payload"]
    if not isinstance(raw, dict):
        raise MessageError(f"payload: must be a map, got {type(raw).__name__}")
    if len(raw) > MAX_PAYLOAD_FIELDS:
        raise MessageError(f"payload: {len(raw)} fields, at most {MAX_PAYLOAD_FIELDS}")
    payload: dict[str, PayloadValue] = {}
    for k, v in raw.items():
        _key(k)
        if isinstance(v, dict):
            try:
                payload[k] = unpack_array(v, allow_nonfinite=allow_nonfinite, max_bytes=MAX_ARRAY_BYTES,
                                          copy=copy, field=f"payload[{k!r}]")
            except CodecError as e:
                raise MessageError(str(e)) from None
        else:
            payload[k] = _scalar(k, v, allow_nonfinite)
    _apply_rules(kind, payload)
    return Message(kind, sender, recv, episode, step, rnd, payload)

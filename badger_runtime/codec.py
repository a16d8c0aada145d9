"""The numpy-array codec shared by the actor messages and the serve protocol.

An array travels inside msgpack as a plain map::

    {"dtype": "float32", "shape": [3, 4], "data": <bin: raw little-endian bytes, C order>}

never as nested lists. Only the dtypes in ``ALLOWED_DTYPES`` are accepted; bool is one
byte per element and must be 0 or 1. ``unpack_array`` checks everything a peer could get
wrong (types, dtype, shape, byte count, size cap, finiteness) and raises ``CodecError``,
a ``ValueError``; callers re-raise it as their own error type (``MessageError``,
``ProtocolError``).

Decoded arrays are read-only views on the bytes object msgpack produced for the ``bin``
field (no copy); pass ``copy=True`` for a writable array of its own.

Pure functions, no IO. numpy and msgpack only.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

MiB = 1 << 20

MAX_ARRAY_BYTES = 16 * MiB  # default cap on one array's data
MAX_NDIM = 32

# wire name -> the exact dtype of the bytes on the wire (explicitly little-endian)
_WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "bool": np.dtype("?"),
}
ALLOWED_DTYPES: tuple[str, ...] = tuple(_WIRE_DTYPES)
# dtype -> wire name, both byte orders (a dict lookup is ~20x faster than dtype.name)
_NAME_BY_DTYPE: dict[np.dtype, str] = {}
for _name, _wire in _WIRE_DTYPES.items():
    _NAME_BY_DTYPE[_wire.newbyteorder("<")] = _name
    _NAME_BY_DTYPE[_wire.newbyteorder(">")] = _name
FLOAT_DTYPES = frozenset({"float32", "float64"})
ARRAY_KEYS = frozenset({"dtype", "shape", "data"})


class CodecError(ValueError):
    """An array (or a msgpack body) that cannot be encoded or decoded."""


def _where(field: str) -> str:
    return f"{field}: " if field else ""


def pack_array(a: np.ndarray, *, allow_nonfinite: bool = True, max_bytes: int = MAX_ARRAY_BYTES,
               field: str = "") -> dict[str, Any]:
    """Encode a numpy array as ``{"dtype", "shape", "data"}`` (data: raw bytes, little-endian, C order).

    Raises CodecError for a dtype outside ``ALLOWED_DTYPES``, more than ``MAX_NDIM`` axes,
    data over ``max_bytes``, or (with ``allow_nonfinite=False``) a NaN/inf in a float array.
    """
    if not isinstance(a, np.ndarray):
        raise CodecError(f"{_where(field)}expected a numpy array, got {type(a).__name__}")
    name = _NAME_BY_DTYPE.get(a.dtype)
    if name is None:
        if a.dtype.kind not in "fib" or a.dtype.name not in _WIRE_DTYPES:
            raise CodecError(f"{_where(field)}dtype {a.dtype} not allowed (allowed: {', '.join(ALLOWED_DTYPES)})")
        name = a.dtype.name
    wire = _WIRE_DTYPES[name]
    if a.ndim > MAX_NDIM:
        raise CodecError(f"{_where(field)}{a.ndim} dimensions, at most {MAX_NDIM} allowed")
    if a.nbytes > max_bytes:
        raise CodecError(f"{_where(field)}array of {a.nbytes} bytes exceeds the limit of {max_bytes}")
    if not allow_nonfinite and name in FLOAT_DTYPES and not np.isfinite(a).all():
        raise CodecError(f"{_where(field)}float array contains NaN or inf")
    if a.dtype != wire:  # a big-endian array: send little-endian bytes
        a = a.astype(wire)
    return {"dtype": name, "shape": list(a.shape), "data": a.tobytes(order="C")}


def unpack_array(obj: Any, *, allow_nonfinite: bool = False, max_bytes: int = MAX_ARRAY_BYTES,
                 copy: bool = False, field: str = "") -> np.ndarray:
    """Decode and validate an array map produced by ``pack_array``.

    Checks: a map with exactly the keys dtype/shape/data; dtype a str in ``ALLOWED_DTYPES``;
    shape a list of at most ``MAX_NDIM`` non-negative ints; data bytes whose length is
    ``prod(shape) * itemsize`` and at most ``max_bytes``; bool bytes 0 or 1; float values
    finite unless ``allow_nonfinite``. Raises CodecError naming ``field``.

    Returns a read-only view on ``data`` (no copy), or a writable copy with ``copy=True``.
    """
    w = _where(field)
    if not isinstance(obj, dict):
        raise CodecError(f"{w}expected an array map, got {type(obj).__name__}")
    if len(obj) != 3 or obj.keys() != ARRAY_KEYS:
        raise CodecError(f"{w}array map must have exactly the keys dtype, shape, data; "
                         f"got {sorted(map(repr, obj))}")
    name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(name, str):
        raise CodecError(f"{w}dtype must be a str, got {type(name).__name__}")
    wire = _WIRE_DTYPES.get(name)
    if wire is None:
        raise CodecError(f"{w}dtype {name[:40]!r} not allowed (allowed: {', '.join(ALLOWED_DTYPES)})")
    if not isinstance(shape, (list, tuple)):
        raise CodecError(f"{w}shape must be a list, got {type(shape).__name__}")
    if len(shape) > MAX_NDIM:
        raise CodecError(f"{w}shape has {len(shape)} dimensions, at most {MAX_NDIM} allowed")
    count = 1
    for d in shape:
        if type(d) is not int:
            raise CodecError(f"{w}shape entries must be ints, got {type(d).__name__}")
        if d < 0:
            raise CodecError(f"{w}shape entries must be non-negative, got {d}")
        count *= d
    if not isinstance(data, (bytes, bytearray)):
        raise CodecError(f"{w}data must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise CodecError(f"{w}array of {len(data)} bytes exceeds the limit of {max_bytes}")
    if count * wire.itemsize != len(data):
        raise CodecError(f"{w}shape {list(shape)} of {name} needs {count * wire.itemsize} bytes, "
                         f"data has {len(data)}")
    if name == "bool":
        if data and max(data) > 1:
            raise CodecError(f"{w}bool array bytes must be 0 or 1")
    arr = np.frombuffer(data, dtype=wire).reshape(shape)
    if not allow_nonfinite and name in FLOAT_DTYPES and not np.isfinite(arr).all():
        raise CodecError(f"{w}float array contains NaN or inf")
    if copy:
        arr = arr.astype(wire.newbyteorder("="), copy=True)
    elif type(data) is not bytes:  # a bytearray: do not hand out a writable alias of it
        arr.flags.writeable = False
    return arr


# ---- msgpack with arrays ---------------------------------------------------------------------

def _default_hook(allow_nonfinite: bool, max_array_bytes: int):
    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return pack_array(obj, allow_nonfinite=allow_nonfinite, max_bytes=max_array_bytes)
        if isinstance(obj, (np.integer, np.floating, np.bool_)):
            return obj.item()
        raise TypeError(f"cannot encode {type(obj).__name__}")
    return default


def packb(obj: Any, *, allow_nonfinite: bool = True, max_array_bytes: int = MAX_ARRAY_BYTES) -> bytes:
    """msgpack-encode ``obj``; numpy arrays anywhere inside become array maps, numpy scalars
    become Python scalars. Raises CodecError for anything msgpack cannot encode."""
    try:
        return msgpack.packb(obj, use_bin_type=True,
                             default=_default_hook(allow_nonfinite, max_array_bytes))
    except CodecError:
        raise
    except Exception as e:  # TypeError, OverflowError, ValueError (depth) ...
        raise CodecError(f"cannot encode: {e}") from None


def unpackb(data: Any, *, arrays: bool = False, allow_nonfinite: bool = False,
            max_array_bytes: int = MAX_ARRAY_BYTES, copy: bool = False) -> Any:
    """msgpack-decode one object from ``data`` (strings as str, lists as lists).

    With ``arrays=True`` every map whose keys are exactly dtype/shape/data is decoded
    (and validated) with ``unpack_array``. Raises CodecError for malformed msgpack,
    trailing bytes, ext types, invalid UTF-8, non-str/bytes map keys, or a bad array.
    (msgpack's built-in timestamp ext, code -1, is the one ext let through: it decodes to a
    float of seconds, so no foreign object type ever comes out.)
    """
    hook = None
    if arrays:
        def hook(m: dict) -> Any:
            if len(m) == 3 and m.keys() == ARRAY_KEYS:
                return unpack_array(m, allow_nonfinite=allow_nonfinite, max_bytes=max_array_bytes,
                                    copy=copy, field="array")
            return m
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True,
                               object_hook=hook, ext_hook=_reject_ext, timestamp=1)
    except CodecError:
        raise
    except RecursionError:
        raise CodecError("malformed msgpack: nested too deeply") from None
    except Exception as e:  # msgpack's ExtraData/FormatError/StackError/OutOfData, UnicodeDecodeError, ...
        raise CodecError(f"malformed msgpack: {type(e).__name__}: {str(e)[:200]}") from None


def _reject_ext(code: int, data: bytes) -> Any:
    raise CodecError(f"msgpack ext type {code} not allowed")

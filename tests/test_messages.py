"""Tests for the actor message schema (badger_runtime.actors.messages) and the array codec."""

from __future__ import annotations

import ast
import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from badger_runtime import codec
from badger_runtime.actors import messages as m
from badger_runtime.actors.messages import Message, MessageError, decode, encode

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
IDS = st.integers(min_value=0, max_value=2**63 - 1)
SMALL_IDS = st.integers(min_value=0, max_value=1000)
DTYPES = st.sampled_from(["float32", "float64", "int32", "int64", "bool"])
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


def arrays(dtype=DTYPES, finite=True):
    def build(dt):
        d = np.dtype(dt)
        if d.kind == "f":
            el = st.floats(width=d.itemsize * 8, allow_nan=not finite, allow_infinity=not finite)
            return hnp.arrays(d, SHAPES, elements=el)
        return hnp.arrays(d, SHAPES)
    return (dtype if isinstance(dtype, st.SearchStrategy) else st.just(dtype)).flatmap(build)


def f32_vectors():
    return hnp.arrays(np.float32, st.integers(0, 70), elements=st.floats(width=32, allow_nan=False,
                                                                           allow_infinity=False))


SCALARS = st.one_of(INT64, st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
KEYS = st.text(min_size=1, max_size=12)


@st.composite
def messages(draw, finite=True):
    kind = draw(st.sampled_from(m.KINDS))
    payload = draw(st.dictionaries(KEYS, st.one_of(SCALARS, arrays(finite=finite)), max_size=5))
    if kind == "msg":
        for k in ("key", "query", "value"):
            payload[k] = draw(f32_vectors())
    elif kind == "push":
        for k in ("key", "value"):
            payload[k] = draw(f32_vectors())
    elif kind == "control":
        payload["op"] = draw(st.sampled_from(m.CONTROL_OPS))
    elif kind == "observe":
        payload.update(slot_addr=draw(f32_vectors()), slot_val=draw(f32_vectors()), rounds=draw(st.integers(1, 64)))
    elif kind == "vote":
        form = draw(st.sampled_from(m.PAYLOAD_FORMS["vote"]))
        payload.update({f: draw(SCALARS) for f in form if f not in payload})
    receivers = tuple(draw(st.lists(IDS, max_size=6, unique=True)))
    return Message(kind, draw(IDS), receivers, draw(IDS), draw(IDS), draw(IDS), payload)


def valid_msg(**over) -> Message:
    fields = dict(kind="msg", sender=3, receivers=(0, 5), episode=1, step=2, round=0,
                  payload={"key": np.ones(4, np.float32), "query": np.zeros(4, np.float32),
                           "value": np.arange(64, dtype=np.float32), "hops": 1, "w": 0.5, "tag": "x"})
    fields.update(over)
    return Message(**fields)


def observe_payload(**extra) -> dict:
    return {"slot_addr": np.zeros((2, 4), np.float32), "slot_val": np.zeros(2, np.float32), "rounds": 1, **extra}


def raw(msg: Message) -> dict:
    """The msgpack map of a valid message, for hand-made corruptions."""
    return msgpack.unpackb(encode(msg), raw=False)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def assert_bitwise_equal(a: Message, b: Message) -> None:
    assert a == b
    assert isinstance(b.receivers, tuple)
    for k, v in a.payload.items():
        w = b.payload[k]
        if isinstance(v, np.ndarray):
            assert isinstance(w, np.ndarray) and w.dtype == v.dtype and w.shape == v.shape
            assert w.tobytes() == np.ascontiguousarray(v).tobytes()
        else:
            assert type(w) is type(v) and (w == v or (isinstance(v, float) and math.isnan(v)))


# ---- round trips ----------------------------------------------------------------------------

@FAST
@given(messages())
def test_round_trip(msg):
    assert_bitwise_equal(msg, decode(encode(msg)))


@FAST
@given(messages(finite=False))
def test_round_trip_nonfinite_allowed(msg):
    assert_bitwise_equal(msg, decode(encode(msg, allow_nonfinite=True), allow_nonfinite=True))


@FAST
@given(arrays(finite=False), st.sampled_from(["<", ">"]))
def test_array_codec_bitwise(a, order):
    a = a.astype(a.dtype.newbyteorder(order)) if a.dtype.itemsize > 1 else a
    enc = codec.pack_array(a)
    assert isinstance(enc["data"], bytes) and enc["dtype"] == a.dtype.name and enc["shape"] == list(a.shape)
    b = codec.unpack_array(msgpack.unpackb(pack(enc), raw=False), allow_nonfinite=True)
    assert b.shape == a.shape and b.dtype.name == a.dtype.name
    assert b.astype(b.dtype.newbyteorder("<")).tobytes() == a.astype(a.dtype.newbyteorder("<")).tobytes()


def test_noncontiguous_array_round_trips():
    a = np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2].T
    msg = valid_msg(kind="observe", payload=observe_payload(**{"x": a}))
    out = decode(encode(msg)).payload["x"]
    assert np.array_equal(out, a) and out.shape == a.shape


def test_negative_zero_and_subnormal_exact():
    a = np.array([-0.0, 1e-45, np.finfo(np.float32).max], dtype=np.float32)
    out = decode(encode(valid_msg(kind="observe", payload=observe_payload(**{"x": a, "z": -0.0})))).payload
    assert out["x"].tobytes() == a.tobytes() and math.copysign(1, out["z"]) == -1


def test_decoded_arrays_read_only_unless_copy():
    data = encode(valid_msg())
    v = decode(data).payload["value"]
    assert not v.flags.writeable
    with pytest.raises(ValueError):
        v[0] = 1
    w = decode(data, copy=True).payload["value"]
    assert w.flags.writeable
    w[0] = 7
    assert decode(data).payload["value"][0] == 0


def test_numpy_scalars_and_ids_are_accepted_on_encode():
    msg = valid_msg(sender=np.int64(3), receivers=[np.int32(1)], payload={
        **valid_msg().payload, "a": np.float32(0.5), "b": np.int64(-4), "c": np.float64(2.5)})
    out = decode(encode(msg))
    assert out.sender == 3 and out.receivers == (1,)
    assert out.payload["a"] == 0.5 and type(out.payload["a"]) is float
    assert out.payload["b"] == -4 and type(out.payload["b"]) is int


def test_message_equality():
    a, b = valid_msg(), valid_msg()
    assert a == b
    b.payload["value"] = b.payload["value"].copy()
    b.payload["value"][3] = -1
    assert a != b
    assert valid_msg(step=9) != a
    assert valid_msg(payload={**a.payload, "value": a.payload["value"].astype(np.float64)}) != a


def test_kinds_and_rules_consistent():
    assert m.KINDS == ("msg", "observe", "push", "vote", "control")
    assert set(m.PAYLOAD_RULES) == set(m.KINDS)
    assert m.SCHEMA_VERSION == 1


# ---- fuzzing: decode raises MessageError or succeeds, nothing else ---------------------------

def _decode_or_message_error(data: bytes) -> None:
    try:
        out = decode(data)
    except MessageError:
        return
    assert isinstance(out, Message)
    assert decode(encode(out)) == out  # whatever decodes re-encodes


@FAST
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data):
    _decode_or_message_error(data)


@FAST
@given(messages(), st.data())
def test_fuzz_mutated_valid_messages(msg, data):
    buf = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        i = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and buf:
            del buf[i]
        elif op == "truncate":
            del buf[i:]
    _decode_or_message_error(bytes(buf))


MSGPACK_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), st.text(max_size=8),
              st.binary(max_size=16)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=10)


@FAST
@given(messages(), st.data())
def test_fuzz_structural_corruption(msg, data):
    obj = raw(msg)
    target = data.draw(st.sampled_from(["top", "payload", "array"]))
    value = data.draw(MSGPACK_VALUES)
    if target == "top":
        obj[data.draw(st.sampled_from(list(m.FIELDS) + ["extra"]))] = value
    elif target == "payload":
        obj["payload"][data.draw(st.sampled_from(list(obj["payload"]) + ["new"]))] = value
    else:
        arrs = [v for v in obj["payload"].values() if isinstance(v, dict)]
        if not arrs:
            return
        arr = data.draw(st.sampled_from(arrs))
        arr[data.draw(st.sampled_from(["dtype", "shape", "data", "extra"]))] = value
    try:
        encoded = pack(obj)
    except (OverflowError, ValueError):  # ints beyond msgpack's range
        return
    _decode_or_message_error(encoded)


# ---- specific rejections ----------------------------------------------------------------------

def rejects(obj_or_bytes, match: str, **kw):
    data = obj_or_bytes if isinstance(obj_or_bytes, (bytes, bytearray)) else pack(obj_or_bytes)
    with pytest.raises(MessageError, match=match):
        decode(data, **kw)


def test_nan_and_inf_rejected_unless_allowed():
    for bad in (np.nan, np.inf, -np.inf):
        a = np.array([0.0, bad], dtype=np.float32)
        with pytest.raises(MessageError, match=r"payload\['x'\].*NaN"):
            encode(valid_msg(kind="observe", payload=observe_payload(x=a)))
        data = encode(valid_msg(kind="observe", payload=observe_payload(x=a)), allow_nonfinite=True)
        rejects(data, r"payload\['x'\].*NaN or inf")
        assert decode(data, allow_nonfinite=True).payload["x"].tobytes() == a.tobytes()
        with pytest.raises(MessageError, match=r"payload\['vote'\]: float"):
            encode(valid_msg(kind="vote", payload={"vote": float(bad), "change": 0.0}))
        rejects(encode(valid_msg(kind="vote", payload={"vote": float(bad), "change": 0.0}), allow_nonfinite=True),
                r"payload\['vote'\]")


def test_nan_in_required_vector_rejected():
    msg = valid_msg()
    obj = raw(msg)
    v = np.frombuffer(obj["payload"]["value"]["data"], np.float32).copy()
    v[10] = np.nan
    obj["payload"]["value"]["data"] = v.tobytes()
    rejects(obj, r"payload\['value'\]: float array contains NaN")


def test_oversize_array_and_frame_rejected():
    big = {"dtype": "int64", "shape": [m.MAX_ARRAY_BYTES // 8 + 1], "data": bytes(m.MAX_ARRAY_BYTES + 8)}
    obj = raw(valid_msg(kind="observe", payload=observe_payload()))
    obj["payload"]["x"] = big
    rejects(obj, r"payload\['x'\].*exceeds the limit")
    with pytest.raises(MessageError, match="exceeds the limit"):
        encode(valid_msg(kind="observe", payload=observe_payload(**{"x": np.zeros(m.MAX_ARRAY_BYTES // 8 + 1, np.int64)})))
    rejects(bytes(m.MAX_FRAME + 1), "exceeds the limit")


def test_wrong_version_and_unknown_kind():
    obj = raw(valid_msg())
    rejects({**obj, "version": 2}, "version: unsupported schema version 2")
    rejects({**obj, "version": "1"}, "version: must be an int")
    rejects({**obj, "kind": "gossip"}, "kind: unknown kind 'gossip'")
    rejects({**obj, "kind": 3}, "kind: must be a str")
    with pytest.raises(MessageError, match="unknown kind"):
        encode(valid_msg(kind="gossip"))


def test_missing_and_extra_fields():
    obj = raw(valid_msg())
    for f in m.FIELDS:
        rejects({k: v for k, v in obj.items() if k != f}, f"missing \\['{f}'\\]")
    rejects({**obj, "extra": 1}, "unexpected")
    rejects(pack([1, 2]), "must be a msgpack map")


def test_int_fields_checked():
    obj = raw(valid_msg())
    rejects({**obj, "sender": -1}, r"sender: -1 out of range")
    rejects({**obj, "sender": True}, "sender: must be an int, got bool")
    rejects({**obj, "sender": 1.0}, "sender: must be an int")
    rejects({**obj, "episode": 2**64 - 1}, "episode: .* out of range")
    rejects({**obj, "step": None}, "step: must be an int")
    rejects({**obj, "round": -3}, "round: -3 out of range")
    rejects({**obj, "receivers": 4}, "receivers: must be a list")
    rejects({**obj, "receivers": [1, "2"]}, r"receivers\[1\]: must be an int")
    rejects({**obj, "receivers": [1, -2]}, r"receivers\[1\]: -2 out of range")
    rejects({**obj, "receivers": [1, 1]}, "receivers: duplicate")
    with pytest.raises(MessageError, match="sender: must be an int, got bool"):
        encode(valid_msg(sender=False))


def test_payload_values_checked():
    obj = raw(valid_msg(kind="observe", payload=observe_payload()))
    for val, match in [(True, "got bool"), (None, "got NoneType"), ([1.0], "got list"), (b"xy", "got bytes"),
                       (2**64 - 1, "outside the int64 range")]:
        rejects({**obj, "payload": {"x": val}}, rf"payload\['x'\].*{match}")
    rejects({**obj, "payload": {"": 1}}, "field name length")
    rejects({**obj, "payload": {b"k": 1}}, "field names must be str")
    rejects({**obj, "payload": [1]}, "payload: must be a map")
    rejects({**obj, "payload": {"slot_addr": obj["payload"]["slot_addr"]}}, "requires field 'slot_val'")
    vote = raw(valid_msg(kind="vote", payload={"decision": "stop"}))
    rejects({**vote, "payload": {"verdict": "stop"}}, "needs the fields of one of")
    with pytest.raises(MessageError, match=r"payload\['x'\]"):
        encode(valid_msg(kind="observe", payload=observe_payload(x=[1, 2])))
    with pytest.raises(MessageError, match="payload: must be a dict"):
        encode(valid_msg(kind="observe", payload=[("x", 1)]))


def test_array_maps_checked():
    good = codec.pack_array(np.arange(6, dtype=np.int32).reshape(2, 3))
    obj = raw(valid_msg(kind="observe", payload=observe_payload()))

    def bad(arr, match):
        rejects({**obj, "payload": {**obj["payload"], "a": arr}}, rf"payload\['a'\]: .*{match}")

    bad({**good, "dtype": "float16"}, "dtype 'float16' not allowed")
    bad({**good, "dtype": "object"}, "not allowed")
    bad({**good, "dtype": 5}, "dtype must be a str")
    bad({**good, "shape": [3, 3]}, "needs 36 bytes, data has 24")
    bad({**good, "shape": [-2, -3]}, "non-negative")
    bad({**good, "shape": [2, 3.0]}, "shape entries must be ints")
    bad({**good, "shape": [2, True, 3]}, "shape entries must be ints")
    bad({**good, "shape": "2,3"}, "shape must be a list")
    bad({**good, "shape": [1] * 40}, "at most 32")
    bad({**good, "shape": [2**62, 2**62, 0, 1]}, "needs 0 bytes")
    bad({**good, "data": "abc"}, "data must be bytes")
    bad({**good, "data": good["data"][:-1]}, "data has 23")
    bad({"dtype": "int32", "shape": [6]}, "exactly the keys")
    bad({**good, "extra": 1}, "exactly the keys")
    bad({"dtype": "bool", "shape": [3], "data": b"\x00\x01\x02"}, "bool array bytes must be 0 or 1")
    assert decode(pack({**obj, "payload": {**obj["payload"], "a": {"dtype": "bool", "shape": [2],
                                                                    "data": b"\x00\x01"}}})
                  ).payload["a"].tolist() == [False, True]


def test_encode_rejects_bad_arrays():
    for a, match in [(np.zeros(3, np.float16), "float16 not allowed"),
                     (np.array([1, "a"], dtype=object), "not allowed"),
                     (np.zeros(3, np.complex64), "not allowed"),
                     (np.zeros(3, np.uint8), "not allowed")]:
        with pytest.raises(MessageError, match=match):
            encode(valid_msg(kind="observe", payload=observe_payload(**{"a": a})))
    with pytest.raises(MessageError, match="expected a Message"):
        encode({"kind": "msg"})


def test_kind_rules():
    base = valid_msg()
    for missing in ("key", "query", "value"):
        p = {k: v for k, v in base.payload.items() if k != missing}
        with pytest.raises(MessageError, match=f"requires field '{missing}'"):
            encode(valid_msg(payload=p))
        obj = raw(base)
        del obj["payload"][missing]
        rejects(obj, f"kind 'msg' requires field '{missing}'")
    with pytest.raises(MessageError, match=r"payload\['value'\]: must be a float32 array, got float64"):
        encode(valid_msg(payload={**base.payload, "value": np.zeros(3)}))
    with pytest.raises(MessageError, match=r"payload\['key'\]: must be a float32 array, got int"):
        encode(valid_msg(kind="push", payload={"key": 1, "value": np.zeros(3, np.float32)}))
    for op in m.CONTROL_OPS:
        assert decode(encode(valid_msg(kind="control", payload={"op": op, "n": 2}))).payload["op"] == op
    with pytest.raises(MessageError, match=r"payload\['op'\]: must be one of"):
        encode(valid_msg(kind="control", payload={"op": "explode"}))
    obj = raw(valid_msg(kind="control", payload={"op": "remove"}))
    obj["payload"]["op"] = "explode"
    rejects(obj, r"payload\['op'\]: must be one of")


def test_malformed_msgpack():
    data = encode(valid_msg())
    rejects(data + b"\x00", "malformed msgpack")                # trailing bytes
    rejects(data[:-1], "malformed msgpack")                     # truncated
    rejects(b"", "malformed msgpack")
    rejects(b"\xc1", "malformed msgpack")                       # reserved byte
    rejects(b"\x91" * 5000, "malformed msgpack")                # nested too deep
    rejects(pack({**raw(valid_msg()), "kind": msgpack.ExtType(5, b"x")}), "ext type 5")
    rejects(b"\x81\x01\x02", "malformed msgpack")               # int map key
    rejects(b"\xa2\xff\xfe", "malformed msgpack")               # invalid utf-8
    with pytest.raises(MessageError, match="expected bytes"):
        decode("not bytes")  # type: ignore[arg-type]
    assert decode(bytearray(data)) == decode(memoryview(data)) == valid_msg()


def test_no_torch_import():
    for mod in (m, codec):
        tree = ast.parse(open(mod.__file__).read())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
        assert "torch" not in names

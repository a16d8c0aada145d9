"""Tests for the length-prefixed msgpack frame protocol (badger_runtime.serve.protocol)."""

from __future__ import annotations

import ast
import gc
import struct
import weakref

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from badger_runtime import codec
from badger_runtime.serve import protocol as p
from badger_runtime.serve.protocol import (FrameDecoder, ProtocolError, encode_frame, reply_error, reply_ok,
                                           validate_reply, validate_request)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


@st.composite
def arrays(draw):
    d = np.dtype(draw(st.sampled_from(["float32", "float64", "int32", "int64", "bool"])))
    if d.kind == "f":
        return draw(hnp.arrays(d, SHAPES, elements=st.floats(width=d.itemsize * 8, allow_nan=False,
                                                            allow_infinity=False)))
    return draw(hnp.arrays(d, SHAPES))


KEYS = st.text(max_size=8).filter(lambda k: k not in codec.ARRAY_KEYS)
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                   st.floats(allow_nan=False), st.text(max_size=10), st.binary(max_size=10), arrays())
VALUES = st.recursive(LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(KEYS, inner, max_size=4)),
                      max_leaves=12)
OBJS = st.dictionaries(KEYS, VALUES, max_size=5)


def deep_equal(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype.name == b.dtype.name and a.shape == b.shape
                and a.tobytes() == b.tobytes())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def request(**over):
    r = {"id": 7, "kind": "step", "session": "s1", "token": "t", "body": {"obs": np.zeros(3, np.float32)}}
    r.update(over)
    return r


# ---- frames ----------------------------------------------------------------------------------

@FAST
@given(OBJS)
def test_frame_round_trip(obj):
    data = encode_frame(obj)
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    dec = FrameDecoder()
    dec.feed(data)
    out = list(dec.frames())
    assert len(out) == 1 and deep_equal(obj, out[0])
    assert dec.buffered == 0 and dec.next_frame() is None


@FAST
@given(st.lists(OBJS, min_size=1, max_size=6), st.data())
def test_random_splits_and_many_frames_per_chunk(objs, data):
    stream = b"".join(encode_frame(o) for o in objs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    pieces = [stream[i:j] for i, j in zip([0] + cuts, cuts + [len(stream)])]
    dec = FrameDecoder()
    got = []
    for piece in pieces:
        dec.feed(piece)
        got.extend(dec.frames())
    dec.feed_eof()
    assert len(got) == len(objs) and all(deep_equal(a, b) for a, b in zip(objs, got))


def test_byte_at_a_time():
    objs = [{"i": i, "v": np.arange(i, dtype=np.float64)} for i in range(5)]
    stream = b"".join(encode_frame(o) for o in objs)
    dec = FrameDecoder()
    got = []
    for i in range(len(stream)):
        dec.feed(stream[i:i + 1])
        got.extend(dec.frames())
    assert [g["i"] for g in got] == list(range(5))
    assert all(np.array_equal(g["v"], o["v"]) for g, o in zip(got, objs))


def test_arrays_read_only_unless_copy():
    data = encode_frame({"a": np.arange(4, dtype=np.int64)})
    dec = FrameDecoder()
    dec.feed(data)
    assert not dec.next_frame()["a"].flags.writeable
    dec = FrameDecoder(copy_arrays=True)
    dec.feed(data)
    assert dec.next_frame()["a"].flags.writeable


def _assert_failed(dec: FrameDecoder, match: str) -> None:
    err = dec.error
    assert isinstance(err, ProtocolError)
    for call in (lambda: dec.feed(b"\x00\x00\x00\x02\x80\x80"), dec.next_frame, dec.feed_eof):
        with pytest.raises(ProtocolError, match=match) as info:
            call()
        assert str(info.value) == str(err) and info.value.code == err.code


def test_failed_decoder_is_freed_without_a_garbage_collection():
    """The decoder keeps no traceback of its error: a traceback holds the frames that called it
    (a server frame holds the frame body, up to 16 MiB), so keeping one would tie the decoder and
    those bodies in a reference cycle that only a garbage collection frees."""
    gc.collect()
    gc.disable()
    try:
        for data in (struct.pack(">I", 101), frame_of(b"\x91\x01")):  # a bad length; a body that is not a map
            dec = FrameDecoder(max_frame_bytes=100)
            with pytest.raises(ProtocolError):
                dec.feed(data)
                dec.next_frame()
            assert isinstance(dec.error, ProtocolError) and dec.error.__traceback__ is None
            ref = weakref.ref(dec)
            del dec
            assert ref() is None, "the failed decoder is in a reference cycle"
    finally:
        gc.enable()


def test_bad_length_puts_decoder_in_error_state():
    dec = FrameDecoder(max_frame_bytes=100)
    dec.feed(frame_of(msgpack.packb({"a": 1})))
    assert dec.next_frame() == {"a": 1}
    with pytest.raises(ProtocolError, match="frame length 101 exceeds the limit of 100"):
        dec.feed(struct.pack(">I", 101))  # rejected as soon as the header is complete
    _assert_failed(dec, "frame length 101")
    assert dec.buffered == 0
    # behind an undrained frame the bad header is found when draining reaches it
    dec = FrameDecoder(max_frame_bytes=100)
    dec.feed(frame_of(msgpack.packb({"a": 1})) + struct.pack(">I", 2**32 - 1))
    got = []
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        for f in dec.frames():
            got.append(f)
    assert got == [{"a": 1}]
    _assert_failed(dec, "exceeds the limit")


def test_bad_length_split_and_after_good_frames():
    dec = FrameDecoder()
    good = encode_frame({"x": 1})
    dec.feed(good + good + b"\xff\xff")
    assert dec.next_frame() == {"x": 1}
    dec.feed(b"\xff")
    assert dec.next_frame() == {"x": 1}
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        dec.feed(b"\xff")
    _assert_failed(dec, "exceeds the limit")


def test_default_max_frame_is_16_mib():
    assert p.MAX_FRAME_BYTES == 16 * 2**20
    dec = FrameDecoder()
    dec.feed(struct.pack(">I", p.MAX_FRAME_BYTES))  # exactly the max is fine
    assert dec.next_frame() is None
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">I", p.MAX_FRAME_BYTES + 1))


@pytest.mark.parametrize("body,match", [
    (msgpack.packb(5), "must be a msgpack map, got int"),
    (msgpack.packb([1, {}]), "must be a msgpack map, got list"),
    (b"", "bad frame body"),
    (b"\x81\xa1a", "bad frame body"),                    # truncated map inside a complete frame
    (msgpack.packb({"a": 1}) + b"\x01", "bad frame body"),  # trailing bytes inside the frame
    (b"\xc1", "bad frame body"),
    (b"\x81\x01\x02", "bad frame body"),                 # int key
    (msgpack.packb({"a": msgpack.ExtType(1, b"")}), "ext type 1"),
    (msgpack.packb({"a": {"dtype": "float16", "shape": [1], "data": b"\x00\x00"}}), "float16"),
    (msgpack.packb({"a": {"dtype": "float32", "shape": [2], "data": b"\x00" * 4}}), "needs 8 bytes"),
    (msgpack.packb({"a": {"dtype": "float64", "shape": [1], "data": np.array([np.nan]).tobytes()}},
                   use_bin_type=True), "NaN"),
])
def test_bad_body_puts_decoder_in_error_state(body, match):
    dec = FrameDecoder()
    dec.feed(frame_of(body) + encode_frame({"later": 1}))
    with pytest.raises(ProtocolError, match=match):
        list(dec.frames())
    _assert_failed(dec, match)


def test_nonfinite_arrays_allowed_when_configured():
    a = np.array([np.nan, np.inf, -np.inf, 1.0])
    with pytest.raises(ProtocolError, match="NaN"):
        encode_frame({"a": a}, allow_nonfinite=False)
    data = encode_frame({"a": a})
    dec = FrameDecoder(allow_nonfinite=True)
    dec.feed(data)
    assert dec.next_frame()["a"].tobytes() == a.tobytes()
    dec = FrameDecoder()
    dec.feed(data)
    with pytest.raises(ProtocolError, match="NaN or inf"):
        dec.next_frame()


def test_buffer_cap():
    dec = FrameDecoder(max_frame_bytes=100, max_buffer_bytes=300)
    dec.feed(b"".join(encode_frame({"i": i}) for i in range(20)))  # ~160 bytes: fine
    assert len(list(dec.frames())) == 20
    with pytest.raises(ProtocolError, match="buffered"):
        dec.feed(encode_frame({"i": 1}) * 40)
    _assert_failed(dec, "buffered")
    assert FrameDecoder(max_frame_bytes=1000).max_buffer_bytes >= 1004


def test_eof_inside_frame():
    dec = FrameDecoder()
    data = encode_frame({"a": 1})
    dec.feed(data + data[:3])
    assert list(dec.frames()) == [{"a": 1}]
    with pytest.raises(ProtocolError, match="stream ended inside a frame"):
        dec.feed_eof()
    dec = FrameDecoder()
    dec.feed(data)
    list(dec.frames())
    dec.feed_eof()  # clean end
    with pytest.raises(ProtocolError, match="after end of stream"):
        dec.feed(data)


def test_encode_frame_rejects():
    with pytest.raises(ProtocolError, match="must be a dict"):
        encode_frame([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="cannot encode"):
        encode_frame({"a": {1, 2}})
    with pytest.raises(ProtocolError, match="float16 not allowed"):
        encode_frame({"a": np.zeros(2, np.float16)})
    with pytest.raises(ProtocolError, match="exceeds the limit of 100"):
        encode_frame({"a": b"x" * 200}, max_frame_bytes=100)
    out = encode_frame({"t": (1, 2), "s": np.float32(1.5), "i": np.int64(3)})
    dec = FrameDecoder()
    dec.feed(out)
    assert dec.next_frame() == {"t": [1, 2], "s": 1.5, "i": 3}


def test_big_endian_array_sent_little_endian():
    a = np.arange(5, dtype=">i4")
    dec = FrameDecoder()
    dec.feed(encode_frame({"a": a}))
    b = dec.next_frame()["a"]
    assert b.dtype.name == "int32" and b.tolist() == a.tolist()


# ---- fuzzing: only ProtocolError, never another exception ---------------------------------------

def _feed_all(dec: FrameDecoder, pieces) -> None:
    try:
        for piece in pieces:
            dec.feed(piece)
            for f in dec.frames():
                assert isinstance(f, dict)
        dec.feed_eof()
    except ProtocolError:
        assert dec.error is not None


@FAST
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_fuzz_arbitrary_stream(pieces):
    _feed_all(FrameDecoder(max_frame_bytes=4096), pieces)


@FAST
@given(st.lists(OBJS, min_size=1, max_size=3), st.data())
def test_fuzz_mutated_frames(objs, data):
    buf = bytearray(b"".join(encode_frame(o) for o in objs))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if op == "flip":
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        elif len(buf) > 1:
            del buf[i]
    cut = data.draw(st.integers(0, len(buf)))
    _feed_all(FrameDecoder(), [bytes(buf[:cut]), bytes(buf[cut:])])


@FAST
@given(st.one_of(OBJS, st.dictionaries(st.sampled_from(["id", "kind", "session", "token", "body", "x"]),
                                       st.one_of(VALUES, st.sampled_from(p.REQUEST_KINDS)), max_size=6),
                 VALUES))
def test_fuzz_validate_request(obj):
    try:
        r = validate_request(obj)
    except ProtocolError as e:
        assert e.code in ("bad_request", "unknown_kind")
        return
    assert r.keys() == {"id", "kind", "session", "token", "body"} and r["kind"] in p.REQUEST_KINDS


# ---- requests / replies ---------------------------------------------------------------------

def test_validate_request_ok_and_normalized():
    r = validate_request(request())
    assert r["id"] == 7 and r["kind"] == "step" and r["session"] == "s1" and r["token"] == "t"
    r = validate_request({"id": 0, "kind": "health", "body": {}})
    assert r == {"id": 0, "kind": "health", "session": None, "token": None, "body": {}}
    assert validate_request(request(session=None, token=None))["session"] is None
    for kind in p.REQUEST_KINDS:
        assert validate_request(request(kind=kind))["kind"] == kind


@pytest.mark.parametrize("obj,match,code,rid", [
    ([1], "request must be a map", "bad_request", None),
    ({"kind": "step", "body": {}}, "missing field 'id'", "bad_request", None),
    (request(id="7"), "'id' must be an int, got str", "bad_request", None),
    (request(id=True), "'id' must be an int, got bool", "bad_request", None),
    (request(id=-1), "out of range", "bad_request", None),
    (request(kind="teleport"), "unknown kind 'teleport'", "unknown_kind", 7),
    (request(kind=3), "'kind' must be a str", "bad_request", 7),
    ({"id": 7, "body": {}}, "missing field 'kind'", "bad_request", 7),
    ({"id": 7, "kind": "step"}, "missing field 'body'", "bad_request", 7),
    (request(body=[1]), "'body' must be a map, got list", "bad_request", 7),
    (request(session=5), "'session' must be a str", "bad_request", 7),
    (request(session=""), "'session' length", "bad_request", 7),
    (request(token=b"t"), "'token' must be a str, got bytes", "bad_request", 7),
    (request(extra=1), "unexpected fields", "bad_request", 7),
])
def test_validate_request_errors(obj, match, code, rid):
    with pytest.raises(ProtocolError, match=match) as info:
        validate_request(obj)
    assert info.value.code == code and info.value.request_id == rid


def test_replies():
    ok = reply_ok(3, {"x": np.ones(2, np.float32)})
    assert ok["id"] == 3 and ok["ok"] is True and set(ok) == {"id", "ok", "body"}
    assert reply_ok(4) == {"id": 4, "ok": True, "body": {}}
    err = reply_error(5, "unknown_kind", "no such kind")
    assert err == {"id": 5, "ok": False, "error": {"code": "unknown_kind", "message": "no such kind"}}
    assert reply_error(None, "bad_frame", "x")["id"] is None
    with pytest.raises(TypeError):
        reply_ok(1, [1])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        reply_error(1, 5, "x")  # type: ignore[arg-type]
    dec = FrameDecoder()
    dec.feed(encode_frame(ok) + encode_frame(err))
    a, b = (validate_reply(f) for f in dec.frames())
    assert a["body"]["x"].tolist() == [1.0, 1.0] and b == err
    for bad in ({"id": 1, "ok": 1, "body": {}}, {"id": 1, "ok": True}, {"id": "1", "ok": True, "body": {}},
                {"id": 1, "ok": False, "error": {"code": "x"}}, [1]):
        with pytest.raises(ProtocolError):
            validate_reply(bad)


def test_request_through_frames():
    dec = FrameDecoder()
    dec.feed(encode_frame(request()))
    r = validate_request(dec.next_frame())
    assert r["body"]["obs"].dtype == np.float32 and r["body"]["obs"].shape == (3,)


def test_no_torch_import():
    tree = ast.parse(open(p.__file__).read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in names

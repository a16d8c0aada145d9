"""Length-prefixed msgpack frames for the client/server protocol (sans-IO, h11 style).

A frame is a 4-byte big-endian unsigned length N, then N bytes of msgpack that encode a
map. numpy arrays anywhere inside a frame travel as the shared codec's array maps
(``{"dtype", "shape", "data"}``, see ``badger_runtime.codec``); on decode every map whose
keys are exactly dtype/shape/data is turned back into a (validated, read-only) array, so
that key set is reserved. Float arrays must be finite unless the decoder is built with
``allow_nonfinite=True`` (plain float scalars are not checked).

No sockets here: the connection owner calls ``FrameDecoder.feed`` with whatever bytes
arrived and drains ``frames()``; it writes ``encode_frame(reply)`` to the stream. Any
framing violation raises ``ProtocolError`` and leaves the decoder permanently failed; the
server then replies with an error (if it can) and closes the connection.

Requests: ``{"id": int, "kind": one of REQUEST_KINDS, "session": str (optional),
"token": str (optional), "body": map}``; check with ``validate_request``.
Replies: ``reply_ok(id, body)`` -> ``{"id", "ok": True, "body"}``;
``reply_error(id, code, message)`` -> ``{"id", "ok": False, "error": {"code", "message"}}``.
"""

from __future__ import annotations

import struct
from typing import Any, Iterator

from ..codec import MAX_ARRAY_BYTES, MiB, CodecError, packb, unpackb

__all__ = [
    "MAX_FRAME_BYTES", "HEADER_BYTES", "REQUEST_KINDS", "ProtocolError", "FrameDecoder",
    "encode_frame", "decode_frame_body", "validate_request", "validate_reply", "reply_ok", "reply_error",
]

MAX_FRAME_BYTES = 16 * MiB       # default cap on one frame's body (N)
HEADER_BYTES = 4
_HEADER = struct.Struct(">I")

REQUEST_KINDS: tuple[str, ...] = ("open", "reset", "step", "add_experts", "remove_experts",
                                  "snapshot", "stats", "close", "health")

MAX_ID = (1 << 63) - 1
MAX_SESSION_CHARS = 256
MAX_TOKEN_CHARS = 4096
_REQUEST_FIELDS = frozenset({"id", "kind", "session", "token", "body"})

# error codes the server uses in reply_error (free-form strings; these are the common ones)
E_BAD_FRAME = "bad_frame"          # framing / msgpack violation: the connection is closed
E_BAD_REQUEST = "bad_request"      # a frame that is not a valid request
E_UNKNOWN_KIND = "unknown_kind"


class ProtocolError(ValueError):
    """A violation of the framing or request schema.

    ``code`` is a reply_error code for it; ``request_id`` is the offending request's id
    when it could be read (so the server can still answer that request), else None.
    """

    def __init__(self, message: str, *, code: str = E_BAD_FRAME, request_id: int | None = None):
        super().__init__(message)
        self.code = code
        self.request_id = request_id


# ---- frames --------------------------------------------------------------------------------

def encode_frame(obj: dict, *, max_frame_bytes: int = MAX_FRAME_BYTES, allow_nonfinite: bool = True,
                 max_array_bytes: int = MAX_ARRAY_BYTES) -> bytes:
    """Encode a dict as one frame (length prefix + msgpack). numpy arrays inside become array
    maps, numpy scalars Python scalars. Raises ProtocolError if ``obj`` is not a dict, holds
    something msgpack cannot encode, an array is not allowed (dtype, size; NaN/inf with
    ``allow_nonfinite=False``), or the body exceeds ``max_frame_bytes``."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"a frame must be a dict, got {type(obj).__name__}")
    try:
        body = packb(obj, allow_nonfinite=allow_nonfinite, max_array_bytes=max_array_bytes)
    except CodecError as e:
        raise ProtocolError(str(e)) from None
    if len(body) > max_frame_bytes:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the limit of {max_frame_bytes}")
    return _HEADER.pack(len(body)) + body


def decode_frame_body(body: bytes | bytearray, *, allow_nonfinite: bool = False, copy: bool = False,
                      max_array_bytes: int = MAX_ARRAY_BYTES) -> dict:
    """Decode one frame body (without its length prefix) to a dict; raises ProtocolError."""
    try:
        obj = unpackb(body, arrays=True, allow_nonfinite=allow_nonfinite, copy=copy,
                      max_array_bytes=max_array_bytes)
    except CodecError as e:
        raise ProtocolError(f"bad frame body: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame body must be a msgpack map, got {type(obj).__name__}")
    return obj


class FrameDecoder:
    """Incremental frame decoder for one connection.

    ``feed(data)`` appends received bytes (any split); ``next_frame()`` returns the next
    complete frame's dict or None; ``frames()`` yields all complete frames. A length over
    ``max_frame_bytes``, a body that is not a msgpack map, or more than ``max_buffer_bytes``
    buffered (drain frames between feeds) raises ``ProtocolError``; the decoder then stays
    failed and every later ``feed``/``next_frame`` raises the same error. ``feed_eof()``
    reports a truncated frame at end of stream.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES, *, max_buffer_bytes: int | None = None,
                 allow_nonfinite: bool = False, copy_arrays: bool = False,
                 max_array_bytes: int = MAX_ARRAY_BYTES):
        if not 0 < max_frame_bytes <= 0xFFFFFFFF:
            raise ValueError("max_frame_bytes must be in 1..2**32-1")
        self.max_frame_bytes = max_frame_bytes
        # default: one full frame plus its header plus a 64 KiB read's worth of the next
        self.max_buffer_bytes = (max_frame_bytes + HEADER_BYTES + 64 * 1024 if max_buffer_bytes is None
                                 else max_buffer_bytes)
        self.allow_nonfinite = allow_nonfinite
        self.copy_arrays = copy_arrays
        self.max_array_bytes = max_array_bytes
        self._buf = bytearray()
        self._error: ProtocolError | None = None
        self._eof = False

    @property
    def error(self) -> ProtocolError | None:
        """The error that failed this decoder, or None."""
        return self._error

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf)

    def _fail(self, err: ProtocolError) -> ProtocolError:
        self._error = err
        self._buf = bytearray()
        return err

    def _check_header(self) -> int | None:
        """Length of the pending frame's body, or None while the header is incomplete."""
        if len(self._buf) < HEADER_BYTES:
            return None
        (n,) = _HEADER.unpack_from(self._buf, 0)
        if n > self.max_frame_bytes:
            raise self._fail(ProtocolError(f"frame length {n} exceeds the limit of {self.max_frame_bytes}"))
        return n

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if self._eof:
            raise self._fail(ProtocolError("data fed after end of stream"))
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if len(self._buf) + n > self.max_buffer_bytes:
            raise self._fail(ProtocolError(
                f"{len(self._buf) + n} bytes buffered, more than the limit of {self.max_buffer_bytes}"))
        self._buf += data
        self._check_header()  # reject a bad length as soon as it arrives

    def feed_eof(self) -> None:
        """The peer closed the stream: raises ProtocolError if a partial frame is buffered
        (call after draining ``frames()``)."""
        if self._error is not None:
            raise self._error
        self._eof = True
        if self._buf:
            raise self._fail(ProtocolError(f"stream ended inside a frame ({len(self._buf)} bytes pending)"))

    def next_frame(self) -> dict | None:
        if self._error is not None:
            raise self._error
        n = self._check_header()
        if n is None or len(self._buf) < HEADER_BYTES + n:
            return None
        end = HEADER_BYTES + n
        body = self._buf[HEADER_BYTES:end]
        del self._buf[:end]
        try:
            return decode_frame_body(body, allow_nonfinite=self.allow_nonfinite, copy=self.copy_arrays,
                                     max_array_bytes=self.max_array_bytes)
        except ProtocolError as e:
            raise self._fail(e) from None

    def frames(self) -> Iterator[dict]:
        while (f := self.next_frame()) is not None:
            yield f


# ---- requests and replies ---------------------------------------------------------------------

def validate_request(obj: Any) -> dict:
    """Check a decoded frame is a request; returns a normalized copy with ``session`` and
    ``token`` present (None when absent). Raises ProtocolError (code ``bad_request`` or
    ``unknown_kind``, ``request_id`` set once the id is known) naming the problem."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"request must be a map, got {type(obj).__name__}", code=E_BAD_REQUEST)
    rid = obj.get("id")
    if "id" not in obj:
        raise ProtocolError("request: missing field 'id'", code=E_BAD_REQUEST)
    if type(rid) is not int:
        raise ProtocolError(f"request: 'id' must be an int, got {type(rid).__name__}", code=E_BAD_REQUEST)
    if not 0 <= rid <= MAX_ID:
        raise ProtocolError(f"request: 'id' {rid} out of range [0, {MAX_ID}]", code=E_BAD_REQUEST)

    def bad(msg: str, code: str = E_BAD_REQUEST) -> ProtocolError:
        return ProtocolError(f"request {rid}: {msg}", code=code, request_id=rid)

    extra = obj.keys() - _REQUEST_FIELDS
    if extra:
        raise bad(f"unexpected fields {sorted(repr(k)[:40] for k in extra)}")
    if "kind" not in obj:
        raise bad("missing field 'kind'")
    kind = obj["kind"]
    if not isinstance(kind, str):
        raise bad(f"'kind' must be a str, got {type(kind).__name__}")
    if kind not in REQUEST_KINDS:
        raise bad(f"unknown kind {kind[:40]!r} (known: {', '.join(REQUEST_KINDS)})", E_UNKNOWN_KIND)
    if "body" not in obj:
        raise bad("missing field 'body'")
    body = obj["body"]
    if not isinstance(body, dict):
        raise bad(f"'body' must be a map, got {type(body).__name__}")
    session = obj.get("session")
    if session is not None:
        if not isinstance(session, str):
            raise bad(f"'session' must be a str, got {type(session).__name__}")
        if not 0 < len(session) <= MAX_SESSION_CHARS:
            raise bad(f"'session' length must be 1..{MAX_SESSION_CHARS}")
    token = obj.get("token")
    if token is not None:
        if not isinstance(token, str):
            raise bad(f"'token' must be a str, got {type(token).__name__}")
        if len(token) > MAX_TOKEN_CHARS:
            raise bad(f"'token' longer than {MAX_TOKEN_CHARS} chars")
    return {"id": rid, "kind": kind, "session": session, "token": token, "body": body}


def reply_ok(id: int | None, body: dict | None = None) -> dict:
    """A success reply to request ``id``."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise TypeError(f"reply body must be a dict, got {type(body).__name__}")
    return {"id": id, "ok": True, "body": body}


def reply_error(id: int | None, code: str, message: str) -> dict:
    """An error reply to request ``id`` (None when the request's id could not be read)."""
    if not isinstance(code, str) or not isinstance(message, str):
        raise TypeError("reply_error: code and message must be str")
    return {"id": id, "ok": False, "error": {"code": code, "message": message}}


def validate_reply(obj: Any) -> dict:
    """Client side: check a decoded frame is a reply built by reply_ok / reply_error."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"reply must be a map, got {type(obj).__name__}", code=E_BAD_FRAME)
    rid, ok = obj.get("id"), obj.get("ok")
    if rid is not None and type(rid) is not int:
        raise ProtocolError(f"reply: 'id' must be an int or nil, got {type(rid).__name__}")
    if type(ok) is not bool:
        raise ProtocolError("reply: 'ok' must be a bool")
    if ok:
        if obj.keys() != {"id", "ok", "body"} or not isinstance(obj["body"], dict):
            raise ProtocolError("reply: an ok reply has exactly id, ok and a map 'body'", request_id=rid)
    else:
        err = obj.get("error")
        if (obj.keys() != {"id", "ok", "error"} or not isinstance(err, dict) or err.keys() != {"code", "message"}
                or not isinstance(err["code"], str) or not isinstance(err["message"], str)):
            raise ProtocolError("reply: an error reply has exactly id, ok and error {code, message}",
                                request_id=rid)
    return obj

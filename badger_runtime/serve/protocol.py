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

Limits checked here (the server only does the IO and the clocks):

- a frame's length (``max_frame_bytes``), checked as soon as its 4-byte header arrives;
- the bytes one connection buffers (``max_buffer_bytes``) and, across all connections, the
  bytes of large frames (``BufferBudget``: a frame over ``SMALL_FRAME_BYTES`` must reserve its
  whole length from the server-wide budget when its header arrives, else it is refused with
  ``busy``; the reservation lasts until the caller is done with that frame);
- msgpack container sizes while decoding (``DecodeLimits``: per string, bin, array and map,
  and the elements of all arrays and maps of one frame together), so a decode bomb (millions
  of empty maps in a few MiB) is refused after a bounded amount of work and memory.

Requests: ``{"id": int, "kind": one of REQUEST_KINDS, "session": str (optional),
"token": str (optional), "body": map}``; check with ``validate_request``.
Replies: ``reply_ok(id, body)`` -> ``{"id", "ok": True, "body"}``;
``reply_error(id, code, message)`` -> ``{"id", "ok": False, "error": {"code", "message"}}``;
a message is cut to ``MAX_ERROR_CHARS`` and every echo of client input in one goes through
``clip`` / ``some_names`` (bounded whatever the input).

Error codes (docs/protocol.md has the table): ``bad_frame`` (the frame cannot or will not be
read: the connection closes), ``bad_request`` (malformed: missing, unknown, wrong type, or a
value outside the range the protocol defines for the field), ``limit`` (a value beyond a limit
of this server), ``bad_input`` (a well-formed value the session refuses), ``busy`` (the server
is at a capacity limit right now: try again later).
"""

from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import msgpack

from ..codec import ARRAY_KEYS, MAX_ARRAY_BYTES, MiB, CodecError, packb, unpack_array
from .limits import BUFFER_BUDGET, MAX_FRAME_BYTES, SMALL_FRAME_BYTES

__all__ = [
    "MAX_FRAME_BYTES", "HEADER_BYTES", "SMALL_FRAME_BYTES", "REQUEST_KINDS", "ProtocolError", "FrameDecoder",
    "DecodeLimits", "BufferBudget", "encode_frame", "decode_frame_body", "validate_request", "validate_reply",
    "reply_ok", "reply_error", "clip", "some_names",
]

# MAX_FRAME_BYTES: the default cap on one frame's body (N), 16 MiB. SMALL_FRAME_BYTES: frames
# up to this size need no reservation from the server-wide BufferBudget (every request but an
# open from a snapshot fits: a step of d = 256 is ~2 KiB).
DEFAULT_BUFFER_BUDGET = BUFFER_BUDGET
HEADER_BYTES = 4
_HEADER = struct.Struct(">I")

REQUEST_KINDS: tuple[str, ...] = ("open", "reset", "step", "add_experts", "remove_experts",
                                  "snapshot", "stats", "close", "health")

MAX_ID = (1 << 63) - 1
MAX_SESSION_CHARS = 256
MAX_TOKEN_CHARS = 4096
_REQUEST_FIELDS = frozenset({"id", "kind", "session", "token", "body"})

# error codes the server uses in reply_error (free-form strings; these are the common ones)
E_BAD_FRAME = "bad_frame"          # framing / msgpack violation or a frame over a limit: the connection is closed
E_BAD_REQUEST = "bad_request"      # malformed: missing/unknown field, wrong type, outside the protocol's range
E_UNKNOWN_KIND = "unknown_kind"
E_LIMIT = "limit"                  # a value beyond a limit of this server
E_BAD_INPUT = "bad_input"          # a well-formed value the session refuses
E_BUSY = "busy"                    # at a capacity limit now (connections, buffer budget): try again later
E_UNAUTHORIZED = "unauthorized"    # a missing or wrong token (or a large frame before it): the connection is closed

MAX_ERROR_CHARS = 1024   # an error message is cut to this many characters
ECHO_CHARS = 200         # one echoed string (a field name, a value) is cut to this many
ECHO_NAMES = 5           # an echoed list shows this many entries, then how many more


def clip(value: Any, n: int = ECHO_CHARS) -> str:
    """``repr``-like text of a client-supplied value for an error message, at most ~n chars
    (long text ends with how long it was)."""
    if isinstance(value, str):
        text = repr(value[: n + 1])
        full = len(value)
    elif isinstance(value, (bytes, bytearray)):
        text, full = f"<{len(value)} bytes>", 0
    elif isinstance(value, (list, tuple, dict)):
        text = f"<{type(value).__name__} of {len(value)}>"
        full = 0
    else:
        text = repr(value)
        full = len(text)
    if len(text) > n:
        return text[:n] + f"...({full} chars)"
    return text


def some_names(names: Iterable[Any], k: int = ECHO_NAMES, n: int = 40) -> str:
    """The first ``k`` names (sorted, each clipped to ``n`` chars) and how many more: bounded
    text for 'unknown fields' errors however many there are."""
    names = list(names)
    first = heapq.nsmallest(k, names, key=lambda x: x[:n] if isinstance(x, str) else str(x)[:n])
    more = len(names) - len(first)
    return "[" + ", ".join(clip(x, n) for x in first) + (f", ... and {more} more" if more > 0 else "") + "]"


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


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what decoding one frame body may build (msgpack's ``max_*_len`` plus a
    total): a body over any of them is refused as ``bad_frame`` after at most about
    ``max_items + max_array_len`` objects were built. The defaults hold every request of
    docs/protocol.md with room to spare; longer lists (``remove_experts`` of over 65,536
    experts) travel as arrays (``bin``, limited by bytes, not elements)."""

    max_str_len: int = 64 * 1024       # one str (tokens are <= 4096, session names <= 256)
    max_bin_len: int = MAX_FRAME_BYTES  # one bin (array data; arrays are also capped by max_array_bytes)
    max_array_len: int = 65536         # one msgpack array (list)
    max_map_len: int = 1024            # one msgpack map (keys)
    max_ext_len: int = 16              # the timestamp ext (4, 8 or 12 bytes) is the only ext allowed
    max_items: int = 1 << 17           # elements of all arrays and maps of one frame together
    #: arrays and maps of one frame (a request has tens: an open with a 1,000-expert snapshot fits in 64, a test
    #: holds). Each costs a Python call while decoding, on the event loop for a small frame: 64 KiB of empty lists
    #: (65,500 of them) took ~14 ms
    max_containers: int = 4096

    def to_dict(self) -> dict:
        return dict(self.__dict__)


DEFAULT_LIMITS = DecodeLimits()
# what a client accepts from its server (trusted, but still bounded)
CLIENT_LIMITS = DecodeLimits(max_str_len=16 * MiB, max_array_len=1 << 24, max_map_len=1 << 20, max_items=1 << 26,
                             max_containers=1 << 22)


def _reject_ext(code: int, data: bytes) -> Any:
    raise CodecError(f"msgpack ext type {code} not allowed")


def decode_frame_body(body: bytes | bytearray, *, allow_nonfinite: bool = False, copy: bool = False,
                      max_array_bytes: int = MAX_ARRAY_BYTES, limits: DecodeLimits = DEFAULT_LIMITS) -> dict:
    """Decode one frame body (without its length prefix) to a dict; raises ProtocolError.

    Array maps become validated numpy arrays (``codec.unpack_array``); ``limits`` bounds the
    containers (see ``DecodeLimits``)."""
    items, containers = limits.max_items, limits.max_containers

    def count(n: int):
        nonlocal items, containers
        items -= n
        containers -= 1
        if items < 0:
            raise CodecError(f"more than {limits.max_items} elements in the frame's arrays and maps")
        if containers < 0:
            raise CodecError(f"more than {limits.max_containers} arrays and maps in the frame")

    def list_hook(x: list) -> list:
        count(len(x) + 1)
        return x

    def object_hook(m: dict) -> Any:
        count(len(m) + 1)
        if any(type(k) is not str for k in m):  # (strict_map_key lets a bin key through as bytes)
            raise CodecError("map keys must be msgpack strings (str), not bin")
        if len(m) == 3 and m.keys() == ARRAY_KEYS:
            return unpack_array(m, allow_nonfinite=allow_nonfinite, max_bytes=max_array_bytes, copy=copy,
                                field="array")
        return m

    try:
        obj = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True, object_hook=object_hook,
                              list_hook=list_hook, ext_hook=_reject_ext, timestamp=1,
                              max_str_len=limits.max_str_len, max_bin_len=limits.max_bin_len,
                              max_array_len=limits.max_array_len, max_map_len=limits.max_map_len,
                              max_ext_len=limits.max_ext_len)
    except CodecError as e:
        raise ProtocolError(f"bad frame body: {str(e)[:ECHO_CHARS]}") from None
    except RecursionError:
        raise ProtocolError("bad frame body: malformed msgpack: nested too deeply") from None
    except Exception as e:  # ExtraData/FormatError/StackError/OutOfData, a max_*_len, invalid UTF-8, ...
        raise ProtocolError(f"bad frame body: malformed msgpack: {type(e).__name__}: {str(e)[:ECHO_CHARS]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame body must be a msgpack map, got {type(obj).__name__}")
    return obj


class BufferBudget:
    """Server-wide budget for the bytes of large frames (those over ``small``).

    A connection's decoder reserves a large frame's whole length when its header arrives and
    gives it back when the caller is done with that frame (or the connection ends). Frames up
    to ``small`` need no reservation: each connection may buffer about ``small`` bytes on its
    own (a 64 KiB read), so the server's buffers are bounded by ``total`` plus
    ``small`` per connection. One ``owner`` (a peer's address) may hold at most ``share`` of
    ``total`` (its first large frame is always let in, within ``total``): sixteen connections of
    one address that sent only 4-byte headers of 16 MiB frames held the whole budget for the
    frame timeout, refusing everyone else's large frames. Not thread-safe: one event loop owns it
    (reading the numbers from another thread is fine)."""

    def __init__(self, total: int = DEFAULT_BUFFER_BUDGET, small: int = SMALL_FRAME_BYTES, share: float = 0.25):
        if total < 0 or small < 0 or not 0 < share <= 1:
            raise ValueError("budget sizes must be >= 0 and the share in (0, 1]")
        self.total = total
        self.small = small
        self.share = share
        self.in_use = 0
        self.refused = 0
        self.by_owner: dict = {}

    def reserve(self, n: int, owner=None) -> str | None:
        """Reserve n bytes for ``owner``: None if reserved, else why not: ``"share"`` (the owner already holds
        its share: its own doing) or ``"total"`` (the budget is full: the server's state)."""
        held = self.by_owner.get(owner, 0) if owner is not None else 0
        why = ("share" if held and held + n > self.share * self.total else
               "total" if self.in_use + n > self.total else None)
        if why is not None:
            self.refused += 1
            return why
        self.in_use += n
        if owner is not None:
            self.by_owner[owner] = held + n
        return None

    def release(self, n: int, owner=None):
        self.in_use -= n
        assert self.in_use >= 0, "released more than was reserved"
        if owner is not None:
            left = self.by_owner.pop(owner) - n
            if left:
                self.by_owner[owner] = left


class FrameDecoder:
    """Incremental frame decoder for one connection.

    ``feed(data)`` appends received bytes (any split); ``next_frame()`` returns the next
    complete frame's dict or None; ``frames()`` yields all complete frames. A length over
    ``max_frame_bytes``, a body that is not a msgpack map or breaks ``limits``, or more than
    ``max_buffer_bytes`` buffered (drain frames between feeds) raises ``ProtocolError``
    (``bad_frame``); a large frame the ``budget`` cannot hold raises it with code ``busy``.
    The decoder then stays failed and every later ``feed``/``next_frame`` raises the same
    error. ``feed_eof()`` reports a truncated frame at end of stream; ``close()`` gives back
    any reservation (call it when the connection ends).

    With a ``budget``, a frame over ``budget.small`` reserves its length when its header
    arrives; the reservation is held while the caller processes the frame and given back at
    the next ``feed``/``next_frame``/``close``.

    ``untrusted_limit`` (None: off) is a lower limit for a peer that has not shown the server's
    token yet: a header announcing more is refused with code ``unauthorized`` before its body is
    read. The server sets it on a connection of a server with a token and lifts it (``trust()``)
    after a request carrying the token, so decoding a large frame (the only costly part) is
    spent on token holders only.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES, *, max_buffer_bytes: int | None = None,
                 allow_nonfinite: bool = False, copy_arrays: bool = False,
                 max_array_bytes: int = MAX_ARRAY_BYTES, limits: DecodeLimits = DEFAULT_LIMITS,
                 budget: BufferBudget | None = None, untrusted_limit: int | None = None, owner=None):
        if not 0 < max_frame_bytes <= 0xFFFFFFFF:
            raise ValueError("max_frame_bytes must be in 1..2**32-1")
        self.max_frame_bytes = max_frame_bytes
        # default: one full frame plus its header plus a 64 KiB read's worth of the next
        self.max_buffer_bytes = (max_frame_bytes + HEADER_BYTES + 64 * 1024 if max_buffer_bytes is None
                                 else max_buffer_bytes)
        self.allow_nonfinite = allow_nonfinite
        self.copy_arrays = copy_arrays
        self.max_array_bytes = max_array_bytes
        self.limits = limits
        self.budget = budget
        self.owner = owner  # whose share of the budget this connection's large frames count against
        self.untrusted_limit = untrusted_limit
        self._buf = bytearray()
        self._error: ProtocolError | None = None
        self._eof = False
        self._pending_reserved = 0  # the frame being received
        self._held_reserved = 0     # the frame last returned (the caller is processing it)

    @property
    def error(self) -> ProtocolError | None:
        """The error that failed this decoder, or None."""
        return self._error

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames (> 0: a frame is in progress)."""
        return len(self._buf)

    @property
    def reserved(self) -> int:
        """Bytes this decoder holds of its budget."""
        return self._pending_reserved + self._held_reserved

    def trust(self):
        """The peer showed the server's token: frames up to ``max_frame_bytes`` from now on."""
        self.untrusted_limit = None

    def _release_held(self):
        if self._held_reserved:
            self.budget.release(self._held_reserved, self.owner)
            self._held_reserved = 0

    def close(self):
        """Give back every reservation (the connection ended). Idempotent."""
        self._release_held()
        if self._pending_reserved:
            self.budget.release(self._pending_reserved, self.owner)
            self._pending_reserved = 0
        self._buf = bytearray()

    def _fail(self, err: ProtocolError) -> ProtocolError:
        # Keep a copy without a traceback: the raised error's traceback holds the frames that
        # called the decoder (and their locals: a frame body of up to 16 MiB), and storing it here
        # would make a reference cycle through the decoder, freed only by a garbage collection.
        self._error = ProtocolError(str(err), code=err.code, request_id=err.request_id)
        self.close()
        return err

    def _failed(self) -> ProtocolError:
        """A fresh copy of the error that failed this decoder (raised again on each later call)."""
        e = self._error
        return ProtocolError(str(e), code=e.code, request_id=e.request_id)

    def _check_header(self) -> int | None:
        """Length of the pending frame's body, or None while the header is incomplete."""
        if len(self._buf) < HEADER_BYTES:
            return None
        (n,) = _HEADER.unpack_from(self._buf, 0)
        if n > self.max_frame_bytes:
            raise self._fail(ProtocolError(f"frame length {n} exceeds the limit of {self.max_frame_bytes}"))
        if self.untrusted_limit is not None and n > self.untrusted_limit:
            raise self._fail(ProtocolError(
                f"a frame of {n} bytes before this connection showed the server's token: frames over "
                f"{self.untrusted_limit} bytes need a request with the token first (e.g. health)",
                code=E_UNAUTHORIZED))
        b = self.budget
        if b is not None and n > b.small and not self._pending_reserved:
            why = b.reserve(n, self.owner)
            if why == "share":
                raise self._fail(ProtocolError(
                    f"a frame of {n} bytes: this address already holds {b.by_owner[self.owner]} bytes of large "
                    f"frames, its share of the server's buffer budget is {int(b.share * b.total)}; send large "
                    "frames one after another", code=E_BUSY))
            if why is not None:
                raise self._fail(ProtocolError(
                    f"a frame of {n} bytes does not fit the server's buffer budget now "
                    f"({b.in_use} of {b.total} bytes held by other large frames); try again later",
                    code=E_BUSY))
            self._pending_reserved = n
        return n

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._failed()
        if self._eof:
            raise self._fail(ProtocolError("data fed after end of stream"))
        self._release_held()
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if len(self._buf) + n > self.max_buffer_bytes:
            raise self._fail(ProtocolError(
                f"{len(self._buf) + n} bytes buffered, more than the limit of {self.max_buffer_bytes}"))
        self._buf += data
        self._check_header()  # reject a bad length (or reserve a large frame) as soon as it arrives

    def feed_eof(self) -> None:
        """The peer closed the stream: raises ProtocolError if a partial frame is buffered
        (call after draining ``frames()``)."""
        if self._error is not None:
            raise self._failed()
        self._eof = True
        if self._buf:
            raise self._fail(ProtocolError(f"stream ended inside a frame ({len(self._buf)} bytes pending)"))

    def next_body(self) -> bytes | bytearray | memoryview | None:
        """The next complete frame's body, undecoded (None while incomplete): for a caller that
        decodes large bodies elsewhere (``decode_body`` in a worker thread; on a ProtocolError
        from it, call ``fail``). The frame's reservation is held as for ``next_frame``."""
        if self._error is not None:
            raise self._failed()
        self._release_held()
        n = self._check_header()
        if n is None or len(self._buf) < HEADER_BYTES + n:
            return None
        end = HEADER_BYTES + n
        if n > SMALL_FRAME_BYTES:  # hand over the buffer itself rather than copy a large body
            buf, self._buf = self._buf, bytearray(self._buf[end:])
            body = memoryview(buf)[HEADER_BYTES:end]
        else:
            body = self._buf[HEADER_BYTES:end]
            del self._buf[:end]
        self._held_reserved, self._pending_reserved = self._pending_reserved, 0
        return body

    def decode_body(self, body: bytes | bytearray | memoryview) -> dict:
        """Decode a body from ``next_body`` with this decoder's settings. Touches no state of
        the decoder: safe to run in another thread."""
        return decode_frame_body(body, allow_nonfinite=self.allow_nonfinite, copy=self.copy_arrays,
                                 max_array_bytes=self.max_array_bytes, limits=self.limits)

    def fail(self, err: ProtocolError) -> ProtocolError:
        """Put the decoder in the failed state with ``err`` (a ``decode_body`` error); returns it."""
        return self._fail(err)

    def next_frame(self) -> dict | None:
        body = self.next_body()
        if body is None:
            return None
        try:
            return self.decode_body(body)
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
        raise ProtocolError(f"request: 'id' {clip(rid, 40)} out of range [0, {MAX_ID}]", code=E_BAD_REQUEST)

    def bad(msg: str, code: str = E_BAD_REQUEST) -> ProtocolError:
        return ProtocolError(f"request {rid}: {msg}", code=code, request_id=rid)

    extra = obj.keys() - _REQUEST_FIELDS
    if extra:
        raise bad(f"unexpected fields {some_names(extra)} (allowed: {', '.join(sorted(_REQUEST_FIELDS))})")
    if "kind" not in obj:
        raise bad("missing field 'kind'")
    kind = obj["kind"]
    if not isinstance(kind, str):
        raise bad(f"'kind' must be a str, got {type(kind).__name__}")
    if kind not in REQUEST_KINDS:
        raise bad(f"unknown kind {clip(kind, 40)} (known: {', '.join(REQUEST_KINDS)})", E_UNKNOWN_KIND)
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
    """An error reply to request ``id`` (None when the request's id could not be read). A
    message over ``MAX_ERROR_CHARS`` is cut (it may echo client input)."""
    if not isinstance(code, str) or not isinstance(message, str):
        raise TypeError("reply_error: code and message must be str")
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 40] + f"... (cut; {len(message)} chars)"
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

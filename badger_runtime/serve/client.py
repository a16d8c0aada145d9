"""Python clients for ``badger serve``: ``Client`` (blocking sockets) and ``AsyncClient`` (trio).

Both have the same methods; the async ones are awaited::

    with Client("127.0.0.1:7878") as c:
        s = c.open(dims=3, experts=20, seed=0)["session"]
        out = c.step(s, observation=[0, 0, 0], feedback=[1, 1, 1])["outputs"]

    async with await AsyncClient.connect("127.0.0.1:7878") as c:
        info = await c.open(dims=3)

A request that the server refuses raises ``ServerError`` (``.code``, ``.message``); a
connection that breaks before the reply raises ``ConnectionLost`` (an OSError): the request
may or may not have been applied; ask ``stats(session)`` where the session is (or send steps
with ``t=`` so a repeat is refused with ``wrong_step`` rather than applied twice). One
request is in flight per client; use one client per concurrent caller.

A request that does not complete (cancelled, timed out, the connection lost) leaves its
connection out of step (a half-written request, or a reply still on its way), so the client
marks it broken: the next request opens a new connection first (a client built on a bare
stream, without an address, raises ``ConnectionLost`` instead). The abandoned request may
still be applied by the server, as with a lost connection.
"""

from __future__ import annotations

import itertools
import socket
from typing import Any

import numpy as np
import trio

from .protocol import (CLIENT_LIMITS, E_BUSY, HEADER_BYTES, MAX_FRAME_BYTES, SMALL_FRAME_BYTES, FrameDecoder,
                       ProtocolError, encode_frame, validate_reply)

DEFAULT_ADDRESS = "127.0.0.1:7878"


class ServerError(Exception):
    """The server answered the request with an error."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(ConnectionError):
    """The connection closed or broke before the reply arrived."""


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _floats(x: Any) -> Any:
    if x is None or isinstance(x, (int, float)):
        return x
    return np.asarray(x, dtype=np.float32)


class _Requests:
    """The request kinds as methods over ``self.request`` (sync or async alike)."""

    def request(self, kind: str, session: str | None = None, body: dict | None = None):  # pragma: no cover
        raise NotImplementedError

    def health(self):
        return self.request("health")

    def stats(self, session: str | None = None):
        return self.request("stats", session)

    def open(self, dims: int | None = None, experts: int | None = None, seed: int | None = None, *,
             session: str | None = None, rounds: int | None = None, resume: bool = False,
             snapshot: dict | None = None, task: str | None = None, past_horizon: bool = False,
             secret: str | None = None):
        """Open a session; the reply's ``secret`` is kept and sent with this session's requests
        (``resume`` an existing session by giving its ``secret``)."""
        body = {"dims": dims, "experts": experts, "seed": seed, "rounds": rounds, "snapshot": snapshot, "task": task,
                "secret": secret}
        body = {k: v for k, v in body.items() if v is not None}
        if resume:
            body["resume"] = True
        if past_horizon:
            body["past_horizon"] = True
        return self.request("open", session, body)

    def reset(self, session: str, *, seed: int | None = None, experts: int | None = None, dims: int | None = None):
        body = {k: v for k, v in {"seed": seed, "experts": experts, "dims": dims}.items() if v is not None}
        return self.request("reset", session, body)

    def step(self, session: str, observation=None, feedback=None, *, slots=None, t: int | None = None,
             episode: int | None = None, arm: int | None = None, parts: dict | None = None, **more):
        """One inner step: the named input parts (the guessing game's ``observation`` and ``feedback``,
        any other task's parts by name in ``parts`` or as keywords, e.g. a bandit's ``pulled``) or all
        ``slots``; ``arm``: the output the feedback is about (bandit)."""
        body = {"observation": _floats(observation), "feedback": _floats(feedback), "slots": _floats(slots),
                "t": t, "episode": episode, "arm": arm} | {k: _floats(v) for k, v in ((parts or {}) | more).items()}
        return self.request("step", session, {k: v for k, v in body.items() if v is not None})

    def add_experts(self, session: str, n: int = 1, init: str | None = None, source: int | None = None,
                    allow_harmful: bool = False):
        body = ({"n": n} | ({} if init is None else {"init": init}) | ({} if source is None else {"source": source})
                | ({"allow_harmful": True} if allow_harmful else {}))
        return self.request("add_experts", session, body)

    def remove_experts(self, session: str, indices):
        return self.request("remove_experts", session, {"indices": [int(i) for i in indices]})

    def snapshot(self, session: str):
        return self.request("snapshot", session)

    def close_session(self, session: str):
        return self.request("close", session)


class _Codec:
    def __init__(self, token: str | None, max_frame_bytes: int):
        self.token = token
        self.max_frame_bytes = max_frame_bytes
        self.ids = itertools.count(1)
        self.secrets: dict[str, str] = {}  # session -> the secret `open` returned (sent with its requests)
        self._asked: dict[int, tuple] = {}  # request id -> (kind, session, the secret it carried)
        self.new_decoder()

    def new_decoder(self):
        """A fresh decoder (for a new connection)."""
        self.decoder = FrameDecoder(self.max_frame_bytes, allow_nonfinite=True, limits=CLIENT_LIMITS)
        self.answered = False  # a request on this connection was answered (so it carried the token)

    def needs_token_first(self, frame: bytes) -> bool:
        """A server with a token refuses a frame over 64 KiB on a connection where no request has
        carried the token yet: send a ``health`` (which carries it) before such a frame."""
        return self.token is not None and not self.answered and len(frame) - HEADER_BYTES > SMALL_FRAME_BYTES

    def encode(self, kind: str, session: str | None, body: dict | None) -> tuple[int, bytes]:
        rid = next(self.ids)
        body = dict(body or {})
        if session is not None and session in self.secrets and "secret" not in body and kind != "health":
            body["secret"] = self.secrets[session]
        req = {"id": rid, "kind": kind, "body": body}
        self._asked = {rid: (kind, session, body.get("secret"))}  # one request in flight per connection
        if session is not None:
            req["session"] = session
        if self.token is not None:
            req["token"] = self.token
        return rid, encode_frame(req)

    @staticmethod
    def closes(frame: dict) -> bool:
        """Whether this reply is ``busy``, after which the server closes the connection and the documented remedy
        is to try again later: the next request goes out on a new connection. (After ``bad_frame`` or
        ``unauthorized`` the connection is closed too, and the next request fails: those are not fixed by
        trying again.)"""
        err = frame.get("error") if isinstance(frame, dict) and frame.get("ok") is False else None
        return isinstance(err, dict) and err.get("code") == E_BUSY

    def unwrap(self, rid: int, frame: dict) -> dict:
        reply = validate_reply(frame)
        if reply["id"] is not None and reply["id"] != rid:
            raise ProtocolError(f"reply to request {reply['id']} while waiting for {rid}")
        self.answered = True
        if reply["ok"]:
            body = reply["body"]
            kind, session, sent = self._asked.get(rid, (None, None, None))
            secret = body.get("secret", sent) if isinstance(body, dict) else None
            if kind == "open" and isinstance(secret, str):
                self.secrets[body["session"]] = secret  # this client owns the session now
            elif kind == "close" and session is not None:
                self.secrets.pop(session, None)
            return body
        raise ServerError(reply["error"]["code"], reply["error"]["message"])


class Client(_Requests):
    """Blocking client over one TCP connection."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, token: str | None = None, timeout: float | None = 30.0,
                 max_frame_bytes: int = MAX_FRAME_BYTES):
        self.address = address
        self.timeout = timeout
        self._codec = _Codec(token, max_frame_bytes)
        self.secrets = self._codec.secrets  # session -> the secret `open` returned (sent with its requests)
        self._broken = False
        self.sock = self._connect()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(parse_address(self.address), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _reconnect(self):
        self.sock.close()
        self._codec.new_decoder()
        self.sock = self._connect()
        self._broken = False

    def request(self, kind: str, session: str | None = None, body: dict | None = None) -> dict:
        if self._broken:
            self._reconnect()
        rid, data = self._codec.encode(kind, session, body)
        if self._codec.needs_token_first(data):
            self._exchange(*self._codec.encode("health", None, None), "health")
            rid, data = self._codec.encode(kind, session, body)  # the codec tracks one request at a time
        return self._exchange(rid, data, kind)

    def _exchange(self, rid: int, data: bytes, kind: str) -> dict:
        dec = self._codec.decoder
        done = False
        try:
            self.sock.sendall(data)
            while (frame := dec.next_frame()) is None:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise ConnectionLost(f"{self.address} closed the connection before replying to {kind}")
                dec.feed(chunk)
            done = not self._codec.closes(frame)  # busy: the server closed the connection after it
        except (ConnectionResetError, BrokenPipeError) as e:
            raise ConnectionLost(f"{self.address}: {e}") from None
        finally:
            if not done:  # timed out, interrupted, lost: this connection is out of step
                self._broken = True
        return self._codec.unwrap(rid, frame)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient(_Requests):
    """trio client over one TCP connection; ``await AsyncClient.connect(address)``."""

    def __init__(self, stream: trio.abc.Stream, *, token: str | None = None, address: str = "",
                 max_frame_bytes: int = MAX_FRAME_BYTES, reconnect: bool | None = None):
        self.stream = stream
        self.address = address
        self._codec = _Codec(token, max_frame_bytes)
        self.secrets = self._codec.secrets  # session -> the secret `open` returned (sent with its requests)
        self._lock = trio.Lock()
        self._broken = False
        # reconnect after a broken request: by default when built by connect() (it has an address)
        self._reconnect_ok = bool(address) if reconnect is None else reconnect
        self.reconnects = 0

    @staticmethod
    async def _open(address: str) -> trio.abc.Stream:
        host, port = parse_address(address)
        stream = await trio.open_tcp_stream(host, port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return stream

    @classmethod
    async def connect(cls, address: str = DEFAULT_ADDRESS, *, token: str | None = None,
                      max_frame_bytes: int = MAX_FRAME_BYTES) -> "AsyncClient":
        return cls(await cls._open(address), token=token, address=address, max_frame_bytes=max_frame_bytes)

    async def _reconnect(self):
        if not self._reconnect_ok:
            raise ConnectionLost("the connection was left out of step by a request that did not complete "
                                 "(cancelled or lost) and this client has no address to reconnect to")
        await trio.aclose_forcefully(self.stream)
        self._codec.new_decoder()
        self.stream = await self._open(self.address)
        self._broken = False
        self.reconnects += 1

    async def request(self, kind: str, session: str | None = None, body: dict | None = None) -> dict:
        async with self._lock:
            if self._broken:
                await self._reconnect()
            rid, data = self._codec.encode(kind, session, body)
            if self._codec.needs_token_first(data):
                await self._exchange(*self._codec.encode("health", None, None), "health")
                rid, data = self._codec.encode(kind, session, body)  # the codec tracks one request at a time
            return await self._exchange(rid, data, kind)

    async def _exchange(self, rid: int, data: bytes, kind: str) -> dict:
        dec = self._codec.decoder
        done = False
        try:
            await self.stream.send_all(data)
            while (frame := dec.next_frame()) is None:
                chunk = await self.stream.receive_some(1 << 16)
                if not chunk:
                    raise ConnectionLost(f"{self.address} closed the connection before replying to {kind}")
                dec.feed(chunk)
            done = not self._codec.closes(frame)  # busy: the server closed the connection after it
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise ConnectionLost(f"{self.address}: {e}") from None
        finally:
            if not done:  # cancelled mid-way, lost, or a bad reply: never reuse this stream
                self._broken = True
        return self._codec.unwrap(rid, frame)

    async def aclose(self):
        await self.stream.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

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
"""

from __future__ import annotations

import itertools
import socket
from typing import Any

import numpy as np
import trio

from .protocol import MAX_FRAME_BYTES, FrameDecoder, ProtocolError, encode_frame, validate_reply

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
             snapshot: dict | None = None, task: str | None = None):
        body = {"dims": dims, "experts": experts, "seed": seed, "rounds": rounds, "snapshot": snapshot, "task": task}
        body = {k: v for k, v in body.items() if v is not None}
        if resume:
            body["resume"] = True
        return self.request("open", session, body)

    def reset(self, session: str, *, seed: int | None = None, experts: int | None = None, dims: int | None = None):
        body = {k: v for k, v in {"seed": seed, "experts": experts, "dims": dims}.items() if v is not None}
        return self.request("reset", session, body)

    def step(self, session: str, observation=None, feedback=None, *, slots=None, t: int | None = None,
             episode: int | None = None, arm: int | None = None, parts: dict | None = None):
        """One inner step: the named input parts (``observation``, ``feedback``, any other in ``parts``,
        e.g. a bandit's ``pulled``) or all ``slots``; ``arm``: the output the feedback is about (bandit)."""
        body = {"observation": _floats(observation), "feedback": _floats(feedback), "slots": _floats(slots),
                "t": t, "episode": episode, "arm": arm} | {k: _floats(v) for k, v in (parts or {}).items()}
        return self.request("step", session, {k: v for k, v in body.items() if v is not None})

    def add_experts(self, session: str, n: int = 1, init: str = "clone", source: int | None = None):
        body = {"n": n, "init": init} | ({} if source is None else {"source": source})
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
        self.ids = itertools.count(1)
        self.decoder = FrameDecoder(max_frame_bytes, allow_nonfinite=True)

    def encode(self, kind: str, session: str | None, body: dict | None) -> tuple[int, bytes]:
        rid = next(self.ids)
        req = {"id": rid, "kind": kind, "body": body or {}}
        if session is not None:
            req["session"] = session
        if self.token is not None:
            req["token"] = self.token
        return rid, encode_frame(req)

    @staticmethod
    def unwrap(rid: int, frame: dict) -> dict:
        reply = validate_reply(frame)
        if reply["ok"]:
            if reply["id"] != rid:
                raise ProtocolError(f"reply to request {reply['id']} while waiting for {rid}")
            return reply["body"]
        raise ServerError(reply["error"]["code"], reply["error"]["message"])


class Client(_Requests):
    """Blocking client over one TCP connection."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, token: str | None = None, timeout: float | None = 30.0,
                 max_frame_bytes: int = MAX_FRAME_BYTES):
        self.address = address
        self._codec = _Codec(token, max_frame_bytes)
        self.sock = socket.create_connection(parse_address(address), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def request(self, kind: str, session: str | None = None, body: dict | None = None) -> dict:
        rid, data = self._codec.encode(kind, session, body)
        dec = self._codec.decoder
        try:
            self.sock.sendall(data)
            while (frame := dec.next_frame()) is None:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise ConnectionLost(f"{self.address} closed the connection before replying to {kind}")
                dec.feed(chunk)
        except (ConnectionResetError, BrokenPipeError) as e:
            raise ConnectionLost(f"{self.address}: {e}") from None
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
                 max_frame_bytes: int = MAX_FRAME_BYTES):
        self.stream = stream
        self.address = address
        self._codec = _Codec(token, max_frame_bytes)
        self._lock = trio.Lock()

    @classmethod
    async def connect(cls, address: str = DEFAULT_ADDRESS, *, token: str | None = None,
                      max_frame_bytes: int = MAX_FRAME_BYTES) -> "AsyncClient":
        host, port = parse_address(address)
        stream = await trio.open_tcp_stream(host, port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(stream, token=token, address=address, max_frame_bytes=max_frame_bytes)

    async def request(self, kind: str, session: str | None = None, body: dict | None = None) -> dict:
        async with self._lock:
            rid, data = self._codec.encode(kind, session, body)
            dec = self._codec.decoder
            try:
                await self.stream.send_all(data)
                while (frame := dec.next_frame()) is None:
                    chunk = await self.stream.receive_some(1 << 16)
                    if not chunk:
                        raise ConnectionLost(f"{self.address} closed the connection before replying to {kind}")
                    dec.feed(chunk)
            except trio.BrokenResourceError as e:
                raise ConnectionLost(f"{self.address}: {e}") from None
        return self._codec.unwrap(rid, frame)

    async def aclose(self):
        await self.stream.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

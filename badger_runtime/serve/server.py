"""The TCP server: trio, one task per connection, the SessionManager doing the work.

Each connection reads bytes into a ``FrameDecoder``, answers its requests in order, and
writes one reply frame per request. Steps (and every other request that touches a
session) run in worker threads (``trio.to_thread``; numpy and onnxruntime release the GIL),
so sessions step side by side while the event loop keeps accepting, reading and answering
``health``; the manager's per-session lock serialises the requests of one session.

Failure handling, per connection:

- a frame stream that is broken (bad length, oversized, not msgpack, truncated): one error
  reply (``bad_frame``, best effort), then the connection is closed;
- a frame that is not a valid request (unknown kind, missing fields): an error reply, and the
  connection goes on;
- a missing or wrong token (when the server has one): ``unauthorized``, logged, connection
  closed (``health`` needs no token, so probes work without it);
- a peer that vanishes mid-request: the request still completes (its step is applied and
  checkpointed), the reply is dropped, the task ends; idle connections time out.

Shutdown (``shutdown()``, or SIGTERM/SIGINT when ``handle_signals``): stop accepting, cancel
connections that wait for input, let requests already being processed finish and reply (up
to ``drain_timeout``), checkpoint sessions with pending steps, return.
"""

from __future__ import annotations

import hmac
import signal
from dataclasses import dataclass

import trio

from .protocol import MAX_FRAME_BYTES, FrameDecoder, ProtocolError, encode_frame, reply_error, validate_request
from .sessions import SessionManager
from .telemetry import no_log

RECV_BYTES = 64 * 1024
E_UNAUTHORIZED = "unauthorized"
E_BUSY = "busy"


def count_tasks() -> int:
    """Live trio tasks in this run (the root task and everything below it)."""
    n, stack = 0, [trio.lowlevel.current_root_task()]
    while stack:
        t = stack.pop()
        n += 1
        for nursery in t.child_nurseries:
            stack.extend(nursery.child_tasks)
    return n


@dataclass(eq=False)
class _Conn:
    peer: str
    read_scope: trio.CancelScope | None = None


def _peer(stream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (AttributeError, OSError, ValueError):
        return "local"


class Server:
    def __init__(self, manager: SessionManager, *, token: str | None = None, idle_timeout: float = 300.0,
                 drain_timeout: float = 20.0, max_frame_bytes: int = MAX_FRAME_BYTES, max_connections: int = 1024,
                 log=no_log):
        self.manager = manager
        self.metrics = manager.metrics
        self.token = token.encode() if token else None
        self.idle_timeout = idle_timeout
        self.drain_timeout = drain_timeout
        self.max_frame_bytes = max_frame_bytes
        self.max_connections = max_connections
        self.log = log
        self.draining = False
        self._conns: set[_Conn] = set()
        self._stop = trio.Event()
        self._conn_nursery: trio.Nursery | None = None
        manager.status_hook = self.status

    def status(self) -> dict:
        """The server's part of ``stats`` and ``health`` (call on the trio thread)."""
        return {"draining": self.draining, "connections": len(self._conns), "tasks": count_tasks()}

    def shutdown(self):
        """Begin a graceful stop (from the trio thread)."""
        self._stop.set()

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self, host: str, port: int, *, handle_signals: bool = False,
                  task_status=trio.TASK_STATUS_IGNORED):
        """Serve until ``shutdown()`` (or a signal). ``task_status.started`` gets the bound
        (host, port) pairs, once the listeners accept connections."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        addresses = [lst.socket.getsockname()[:2] for lst in listeners]
        async with trio.open_nursery() as root:
            if handle_signals:
                root.start_soon(self._signals)
            async with trio.open_nursery() as conns:
                self._conn_nursery = conns
                accept = trio.CancelScope()

                async def serve(task_status=trio.TASK_STATUS_IGNORED):
                    with accept:
                        await trio.serve_listeners(self._connection, listeners, handler_nursery=conns,
                                                   task_status=task_status)
                await conns.start(serve)
                self.log("info", "listening", addresses=[f"{h}:{p}" for h, p in addresses],
                         sessions=len(self.manager.sessions), token=self.token is not None)
                task_status.started(addresses)
                await self._stop.wait()
                # drain: no new connections; idle readers stop; in-flight requests finish
                self.draining = True
                accept.cancel()
                self.log("info", "draining", connections=len(self._conns))
                for c in list(self._conns):
                    if c.read_scope is not None:
                        c.read_scope.cancel()
                conns.cancel_scope.deadline = trio.current_time() + self.drain_timeout
            if conns.cancel_scope.cancelled_caught:
                self.log("warning", "drain_timeout", seconds=self.drain_timeout)
            written = await trio.to_thread.run_sync(self.manager.checkpoint_all)
            self.log("info", "stopped", sessions=len(self.manager.sessions), checkpointed=written)
            root.cancel_scope.cancel()

    async def _signals(self):
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self._stop.is_set():
                    self.log("info", "signal", signal=name, action="drain and stop")
                    self.shutdown()
                elif self._conn_nursery is not None:
                    self.log("warning", "signal", signal=name, action="stop now (in-flight replies dropped)")
                    self._conn_nursery.cancel_scope.cancel()

    # -- connections --------------------------------------------------------------------------
    async def _connection(self, stream):
        conn = _Conn(_peer(stream))
        self.metrics.inc("connections.accepted")
        if len(self._conns) >= self.max_connections:
            self.metrics.inc("connections.refused")
            self.log("warning", "connection_refused", peer=conn.peer, reason="max_connections")
            await self._send_quietly(stream, reply_error(None, E_BUSY, "too many connections; try again later"))
            return
        self._conns.add(conn)
        self.log("debug", "connection_open", peer=conn.peer)
        decoder = FrameDecoder(self.max_frame_bytes, allow_nonfinite=True)
        reason = "closed"
        try:
            while not self.draining:
                data = None
                with trio.CancelScope(deadline=trio.current_time() + self.idle_timeout) as conn.read_scope:
                    data = await stream.receive_some(RECV_BYTES)
                conn.read_scope = None
                if data is None:  # cancelled: idle timeout or drain
                    reason = "draining" if self.draining else "idle_timeout"
                    break
                if not data:
                    decoder.feed_eof()  # raises ProtocolError if it stopped inside a frame
                    break
                decoder.feed(data)
                for frame in decoder.frames():
                    reply, close = await self._dispatch(frame, conn)
                    await stream.send_all(self._encode(reply))
                    if close:
                        reason = "refused"
                        return
                    if self.draining:
                        reason = "draining"
                        return
        except ProtocolError as e:
            reason = "bad_frame"
            self.metrics.inc("frames.bad")
            self.log("warning", "bad_frame", peer=conn.peer, error=str(e))
            await self._send_quietly(stream, reply_error(e.request_id, e.code, str(e)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reason = "broken"
            self.metrics.inc("connections.broken")
        finally:
            self._conns.discard(conn)
            await trio.aclose_forcefully(stream)
            self.log("debug", "connection_closed", peer=conn.peer, reason=reason)

    async def _send_quietly(self, stream, reply: dict):
        with trio.move_on_after(1.0):
            try:
                await stream.send_all(self._encode(reply))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def _encode(self, reply: dict) -> bytes:
        try:
            return encode_frame(reply, max_frame_bytes=self.max_frame_bytes)
        except ProtocolError as e:
            self.log("error", "reply_not_encodable", error=str(e))
            return encode_frame(reply_error(reply.get("id"), "internal", f"the reply could not be encoded: {e}"))

    async def _dispatch(self, frame: dict, conn: _Conn) -> tuple[dict, bool]:
        """(reply, close the connection after it)."""
        try:
            req = validate_request(frame)
        except ProtocolError as e:
            self.metrics.inc(f"errors.{e.code}")
            return reply_error(e.request_id, e.code, str(e)), False
        if self.token is not None and req["kind"] != "health":
            got = req["token"]
            if got is None or not hmac.compare_digest(got.encode(), self.token):
                self.metrics.inc("auth.refused")
                self.log("warning", "auth_refused", peer=conn.peer, kind=req["kind"],
                         reason="missing token" if got is None else "wrong token")
                return reply_error(req["id"], E_UNAUTHORIZED, "missing or wrong token"), True
        if req["kind"] == "health" or (req["kind"] == "stats" and req["session"] is None):
            return self.manager.handle(req), False  # cheap; answered even when every worker is busy
        return await trio.to_thread.run_sync(self.manager.handle, req), False

"""The TCP server: trio, one task per connection, the SessionManager doing the work.

Each connection reads bytes into a ``FrameDecoder``, answers its requests in order, and
writes one reply frame per request. Steps (and every other request that touches a
session) run in worker threads (``trio.to_thread``; numpy and onnxruntime release the GIL),
so sessions step side by side while the event loop keeps accepting, reading and answering
``health``; the manager's per-session lock serialises the requests of one session.

Failure handling, per connection:

- a frame stream that is broken (bad length, oversized, not msgpack, over a container
  limit, truncated): one error reply (``bad_frame``, best effort), then the connection is
  closed;
- a frame that is not a valid request (unknown kind, missing fields): an error reply, and the
  connection goes on;
- a missing or wrong token (when the server has one): ``unauthorized``, logged, connection
  closed (``health`` needs no token, so probes work without it); a frame over 64 KiB on a
  connection where no request has carried the token yet is refused the same way at its
  header, before its body is read or decoded (a ``health`` with the token lifts that);
- a peer that vanishes mid-request: the request still completes (its step is applied and
  checkpointed), the reply is dropped, the task ends.

Bounds against hostile or broken peers (docs/protocol.md, "Limits"; the frame and decode
limits themselves are checked in the sans-IO ``protocol``; this module owns the clocks):

- ``max_connections`` served connections; a peer address (IP) holds at most
  ``max_connections_per_peer`` of them (0: no per-peer cap);
- at the cap, up to ``probe_slots`` extra connections are admitted as *probes*: each may send
  one frame within ``probe_timeout``; ``health`` is answered, anything else gets ``busy``;
  either way it is closed. Past those, a connection gets ``busy`` at once and is closed, so
  a full server never holds a refused connection and health probes keep answering;
- ``idle_timeout``: a connection waiting for the first byte of its next frame is closed after
  this long; ``frame_timeout``: once a frame's first byte arrived, the whole frame must arrive
  within this long (not reset by each byte: a byte-a-minute sender is closed);
- ``send_timeout``: a reply that cannot be written within this long (the peer does not read)
  drops the connection;
- ``buffer_budget``: the bytes of large frames (over 64 KiB) buffered over all connections;
  a large frame that does not fit gets ``busy`` and its connection is closed;
- ``abuse_limit`` / ``abuse_window`` / ``abuse_cooldown``: a peer address whose connections
  were refused or closed for abuse (per-peer cap, buffer budget, bad frames, frame or send
  timeout, wrong token) more than ``abuse_limit`` times within ``abuse_window`` seconds is
  blocked for ``abuse_cooldown`` seconds: its new connections are reset right at accept,
  before a task, a read or a reply (the accept loop is ours for that, not
  ``trio.serve_listeners``);
- ``peer_request_rate`` / ``peer_request_burst``: the requests of one peer address, over all
  its connections, are paced by a leaky bucket (``ratelimit.RequestPacer``); a request
  beyond it waits for its turn before it is answered, and its connection is not read
  meanwhile (TCP backpressure), so a flood from some peers cannot starve the others. A
  request with the server's token is not paced (the token is the trust boundary).

Shutdown (``shutdown()``, or SIGTERM/SIGINT when ``handle_signals``): stop accepting, cancel
connections that wait for input, let requests already being processed finish and reply (up
to ``drain_timeout``), checkpoint sessions with pending steps, return.
"""

from __future__ import annotations

import errno
import gc
import hmac
import signal
import socket
import struct
import time
from dataclasses import dataclass

import trio

from .limits import (ABUSE_COOLDOWN, ABUSE_LIMIT, ABUSE_WINDOW, BUFFER_BUDGET, DRAIN_TIMEOUT, FRAME_TIMEOUT,
                     IDLE_TIMEOUT, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER, PEER_REQUEST_BURST, PEER_REQUEST_RATE,
                     PROBE_SLOTS, PROBE_TIMEOUT, SEND_TIMEOUT)
from .protocol import (E_BAD_FRAME, E_BUSY, E_UNAUTHORIZED, MAX_FRAME_BYTES, SMALL_FRAME_BYTES, BufferBudget,
                       DecodeLimits, FrameDecoder, ProtocolError, encode_frame, reply_error, validate_request)
from .ratelimit import AbuseTracker, RequestPacer
from .sessions import SessionManager
from .telemetry import no_log

RECV_BYTES = 64 * 1024

REFUSE_SEND_TIMEOUT = 0.2  # writing `busy` to a refused connection (a fresh socket: never blocks in practice)
DECODE_THREADS = 2  # worker threads that decode large frames (apart from the steps' threads)
LOG_LINES_PER_S = 10  # per kind of per-peer warning (refusals, timeouts, bad frames, auth)
HEARTBEAT_S = 0.5  # the event loop notes the time this often (liveness, loop lag)
PRUNE_EVERY_S = 10.0  # forget per-peer rate state that no longer matters this often
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}  # as trio.serve_listeners
ACCEPT_RETRY_S = 0.1
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset, no TIME_WAIT


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
    host: str
    peer: str
    decoder: FrameDecoder | None = None
    read_scope: trio.CancelScope | None = None


def _peer(stream) -> tuple[str, str]:
    """(host, "host:port") of the stream's peer; ("local", "local") for a stream without a socket."""
    try:
        host, port = stream.socket.getpeername()[:2]
        return str(host), f"{host}:{port}"
    except (AttributeError, OSError, ValueError):
        return "local", "local"


class _SendTimeout(Exception):
    pass


class Server:
    def __init__(self, manager: SessionManager, *, token: str | None = None, idle_timeout: float = IDLE_TIMEOUT,
                 drain_timeout: float = DRAIN_TIMEOUT, max_frame_bytes: int = MAX_FRAME_BYTES,
                 max_connections: int = MAX_CONNECTIONS, max_connections_per_peer: int = MAX_CONNECTIONS_PER_PEER,
                 probe_slots: int = PROBE_SLOTS, frame_timeout: float = FRAME_TIMEOUT,
                 send_timeout: float = SEND_TIMEOUT, probe_timeout: float = PROBE_TIMEOUT,
                 buffer_budget: int = BUFFER_BUDGET, decode_limits: DecodeLimits | None = None,
                 abuse_limit: int = ABUSE_LIMIT, abuse_window: float = ABUSE_WINDOW,
                 abuse_cooldown: float = ABUSE_COOLDOWN, peer_request_rate: float = PEER_REQUEST_RATE,
                 peer_request_burst: int = PEER_REQUEST_BURST, log=no_log):
        if max_connections < 1 or max_connections_per_peer < 0 or probe_slots < 0:
            raise ValueError("max_connections must be >= 1, max_connections_per_peer and probe_slots >= 0")
        for name, v in (("idle_timeout", idle_timeout), ("frame_timeout", frame_timeout),
                        ("send_timeout", send_timeout), ("probe_timeout", probe_timeout)):
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        if not drain_timeout >= 0:
            raise ValueError(f"drain_timeout must be >= 0, got {drain_timeout}")
        if max_frame_bytes > SMALL_FRAME_BYTES and buffer_budget < max_frame_bytes:
            raise ValueError(f"buffer_budget ({buffer_budget}) must hold one frame of max_frame_bytes "
                             f"({max_frame_bytes})")
        self.abuse = AbuseTracker(abuse_limit, abuse_window, abuse_cooldown)  # ValueError on bad settings
        self.pacer = RequestPacer(peer_request_rate, peer_request_burst)
        self.manager = manager
        self.metrics = manager.metrics
        self.token = token.encode() if token else None
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.send_timeout = send_timeout
        self.probe_timeout = probe_timeout
        self.drain_timeout = drain_timeout
        self.max_frame_bytes = max_frame_bytes
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.probe_slots = probe_slots
        self.budget = BufferBudget(buffer_budget)
        self.decode_limits = decode_limits or DecodeLimits(max_bin_len=max_frame_bytes)
        self.log = log
        self.draining = False
        self._conns: set[_Conn] = set()
        self._probes: set[_Conn] = set()
        self._per_peer: dict[str, int] = {}
        self._stop = trio.Event()
        self._conn_nursery: trio.Nursery | None = None
        self.heartbeat: float | None = None  # time.monotonic() of the event loop's last beat
        self._decode_limiter: trio.CapacityLimiter | None = None  # threads decoding large frames
        self._log_window: dict[str, list] = {}  # event -> [window start, lines in it, suppressed]
        self.loop_lag_s = 0.0  # how late that beat ran
        self._clock_seen = 0.0  # trio.current_time() at the last beat (for gauges() from another thread)
        manager.status_hook = self.status

    def limits(self) -> dict:
        return {"max_connections": self.max_connections, "max_connections_per_peer": self.max_connections_per_peer,
                "probe_slots": self.probe_slots, "idle_timeout_s": self.idle_timeout,
                "frame_timeout_s": self.frame_timeout, "send_timeout_s": self.send_timeout,
                "probe_timeout_s": self.probe_timeout, "max_frame_bytes": self.max_frame_bytes,
                "buffer_budget_bytes": self.budget.total, "small_frame_bytes": self.budget.small,
                "abuse_limit": self.abuse.limit, "abuse_window_s": self.abuse.window,
                "abuse_cooldown_s": self.abuse.cooldown, "peer_request_rate": self.pacer.rate,
                "peer_request_burst": self.pacer.burst, "decode": self.decode_limits.to_dict(),
                "gc_gen0": gc.get_threshold()[0],  # the process's (badger serve --gc-gen0)
                "max_waiting_per_session": self.manager.limits.max_waiting}

    def gauges(self) -> dict:
        """Plain numbers about connections and buffers; safe to call from another thread (the
        metrics endpoint)."""
        conns = list(self._conns)  # one C-level copy: safe against the event loop changing the set
        return {"connections": len(conns), "probes": len(self._probes),
                "buffered_bytes": sum(c.decoder.buffered for c in conns if c.decoder is not None),
                "buffer_reserved_bytes": self.budget.in_use, "buffer_budget_bytes": self.budget.total,
                "loop_lag_s": round(self.loop_lag_s, 6), "draining": self.draining,
                "peers_blocked": self.abuse.blocked_count(self._now()), "peers_paced": len(self.pacer)}

    def _now(self) -> float:
        try:
            return trio.current_time()
        except RuntimeError:  # another thread (the metrics endpoint): the clock the loop last noted
            return self._clock_seen

    def status(self) -> dict:
        """The server's part of ``stats`` and ``health`` (call on the trio thread). O(1): every
        health probe calls it; ``stats`` adds ``gauges()``, the task count and the limits
        (``_dispatch``)."""
        return {"draining": self.draining, "connections": len(self._conns)}

    def shutdown(self):
        """Begin a graceful stop (from the trio thread)."""
        self._stop.set()

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self, host: str, port: int, *, handle_signals: bool = False,
                  task_status=trio.TASK_STATUS_IGNORED):
        """Serve until ``shutdown()`` (or a signal). ``task_status.started`` gets the bound
        (host, port) pairs, once the listeners accept connections."""
        listeners = await trio.open_tcp_listeners(port, host=host)  # backlog: the system's maximum
        addresses = [lst.socket.getsockname()[:2] for lst in listeners]
        async with trio.open_nursery() as root:
            if handle_signals:
                root.start_soon(self._signals)
            root.start_soon(self._heartbeat)
            async with trio.open_nursery() as conns:
                self._conn_nursery = conns
                accept = trio.CancelScope()

                async def serve(task_status=trio.TASK_STATUS_IGNORED):
                    with accept:
                        async with trio.open_nursery() as accepting:
                            for lst in listeners:
                                accepting.start_soon(self._accept_loop, lst, conns)
                            task_status.started()
                await conns.start(serve)
                self.log("info", "listening", addresses=[f"{h}:{p}" for h, p in addresses],
                         sessions=len(self.manager.sessions), token=self.token is not None,
                         limits=self.limits())
                task_status.started(addresses)
                await self._stop.wait()
                # drain: no new connections; idle readers stop; in-flight requests finish
                self.draining = True
                accept.cancel()
                self.log("info", "draining", connections=len(self._conns))
                for c in list(self._conns) + list(self._probes):
                    if c.read_scope is not None:
                        c.read_scope.cancel()
                conns.cancel_scope.deadline = trio.current_time() + self.drain_timeout
            if conns.cancel_scope.cancelled_caught:
                self.log("warning", "drain_timeout", seconds=self.drain_timeout)
            written = await trio.to_thread.run_sync(self.manager.checkpoint_all)
            self.log("info", "stopped", sessions=len(self.manager.sessions), checkpointed=written)
            root.cancel_scope.cancel()

    async def _heartbeat(self):
        next_prune = trio.current_time() + PRUNE_EVERY_S
        while True:
            t0 = time.monotonic()
            self.heartbeat = t0
            self._clock_seen = now = trio.current_time()
            if now >= next_prune:
                self.abuse.prune(now)
                self.pacer.prune(now)
                next_prune = now + PRUNE_EVERY_S
            await trio.sleep(HEARTBEAT_S)
            self.loop_lag_s = max(0.0, time.monotonic() - t0 - HEARTBEAT_S)

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

    def _log_peer(self, event: str, **fields):
        """A warning about one peer, at most LOG_LINES_PER_S lines a second per event: under
        attack the log must not become the next thing to fill up (the metrics count every one).
        The first line after a suppressed stretch says how many were left out."""
        now = time.monotonic()
        w = self._log_window.setdefault(event, [now, 0, 0])
        if now - w[0] >= 1.0:
            w[0], w[1] = now, 0
        if w[1] >= LOG_LINES_PER_S:
            w[2] += 1
            return
        w[1] += 1
        if w[2]:
            fields["suppressed_before"], w[2] = w[2], 0
        self.log("warning", event, **fields)

    # -- admission -----------------------------------------------------------------------------
    async def _accept_loop(self, listener: trio.SocketListener, handlers: trio.Nursery):
        """``trio.serve_listeners``, plus the cheapest refusal there is: a blocked peer's
        connection is reset right here, on the raw socket (no stream, no task, no read)."""
        async with listener:
            while True:
                try:
                    sock, addr = await listener.socket.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    self._log_peer("accept_failed", error=errno.errorcode.get(exc.errno, str(exc.errno)))
                    await trio.sleep(ACCEPT_RETRY_S)
                    continue
                host = str(addr[0]) if isinstance(addr, tuple) and addr else "local"
                if self.abuse.blocked(host, trio.current_time()):
                    self._drop_blocked(sock, host)
                    continue
                handlers.start_soon(self._connection_task, trio.SocketStream(sock))

    def _drop_blocked(self, sock, host: str):
        self.metrics.inc("connections.blocked")
        self._log_peer("connection_blocked", peer=host)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
        sock.close()

    async def _connection_task(self, stream):
        try:
            await self._connection(stream)
        finally:
            await trio.aclose_forcefully(stream)

    def _abused(self, host: str, reason: str):
        """A connection of ``host`` was refused or closed for ``reason`` (its own doing)."""
        if self.abuse.note(host, trio.current_time()):
            self.metrics.inc("peers.blocked")
            self._log_peer("peer_blocked", peer=host, reason=reason, abuse_limit=self.abuse.limit,
                           window_s=self.abuse.window, cooldown_s=self.abuse.cooldown)

    async def _connection(self, stream):
        host, peer = _peer(stream)
        conn = _Conn(host, peer)
        self.metrics.inc("connections.accepted")
        if self.draining:
            await trio.aclose_forcefully(stream)
            return
        if self.max_connections_per_peer and self._per_peer.get(host, 0) >= self.max_connections_per_peer:
            self._abused(host, "max_connections_per_peer")
            await self._refuse(stream, conn, "max_connections_per_peer",
                               f"this address holds {self.max_connections_per_peer} connections, the "
                               f"per-peer limit; try again later")
            return
        self._per_peer[host] = self._per_peer.get(host, 0) + 1
        try:
            if len(self._conns) < self.max_connections:
                await self._serve(stream, conn)
            elif len(self._probes) < self.probe_slots:
                await self._probe(stream, conn)
            else:
                await self._refuse(stream, conn, "max_connections", "too many connections; try again later")
        finally:
            left = self._per_peer[host] - 1
            if left:
                self._per_peer[host] = left
            else:
                del self._per_peer[host]

    async def _refuse(self, stream, conn: _Conn, reason: str, message: str):
        """``busy``, then close: a refused connection never holds a slot."""
        self.metrics.inc("connections.refused")
        self.metrics.inc(f"connections.refused.{reason}")
        self._log_peer("connection_refused", peer=conn.peer, reason=reason)
        with trio.move_on_after(REFUSE_SEND_TIMEOUT):
            try:
                await stream.send_all(encode_frame(reply_error(None, E_BUSY, message)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.aclose_forcefully(stream)

    async def _probe(self, stream, conn: _Conn):
        """At the connection cap: answer one ``health`` request (no token needed), refuse
        anything else with ``busy``; close either way."""
        self._probes.add(conn)
        self.metrics.inc("connections.probes")
        decoder = conn.decoder = FrameDecoder(SMALL_FRAME_BYTES, allow_nonfinite=True, limits=self.decode_limits)
        frame = None
        try:
            with trio.move_on_after(self.probe_timeout) as conn.read_scope:
                while frame is None and not self.draining:
                    data = await stream.receive_some(RECV_BYTES)
                    if not data:
                        break
                    decoder.feed(data)
                    frame = decoder.next_frame()
            conn.read_scope = None
            req = None
            if frame is not None:
                try:
                    req = validate_request(frame)
                except ProtocolError:
                    pass
            if req is not None and req["kind"] == "health":
                reply = self.manager.handle(req)
            else:
                self.metrics.inc("connections.refused")
                self.metrics.inc("connections.refused.max_connections")
                reply = reply_error(req["id"] if req else None, E_BUSY,
                                    "too many connections (this one may only ask for health); try again later")
            with trio.move_on_after(min(self.send_timeout, self.probe_timeout)):
                await stream.send_all(self._encode(reply))
        except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._probes.discard(conn)
            decoder.close()
            await trio.aclose_forcefully(stream)

    # -- a served connection ---------------------------------------------------------------------
    async def _send(self, stream, reply: dict):
        with trio.move_on_after(self.send_timeout):
            await stream.send_all(self._encode(reply))
            return
        raise _SendTimeout

    async def _serve(self, stream, conn: _Conn):
        self._conns.add(conn)
        self.log("debug", "connection_open", peer=conn.peer)
        # With a token, frames over 64 KiB wait until a request on this connection carried it:
        # a peer without it never gets a large frame decoded (the costly part of a frame).
        decoder = conn.decoder = FrameDecoder(self.max_frame_bytes, allow_nonfinite=True,
                                              limits=self.decode_limits, budget=self.budget,
                                              untrusted_limit=SMALL_FRAME_BYTES if self.token else None,
                                              owner=conn.host)
        reason = "closed"
        frame_deadline = None  # set while a frame is in progress: when it must be complete
        try:
            while not self.draining:
                deadline = frame_deadline if decoder.buffered else trio.current_time() + self.idle_timeout
                data = None
                with trio.CancelScope(deadline=deadline) as conn.read_scope:
                    data = await stream.receive_some(RECV_BYTES)
                conn.read_scope = None
                if data is None:  # cancelled: a timeout or drain
                    if self.draining:
                        reason = "draining"
                    elif decoder.buffered:
                        reason = "frame_timeout"
                        self.metrics.inc("connections.frame_timeout")
                        self._abused(conn.host, reason)
                        self._log_peer("frame_timeout", peer=conn.peer, buffered=decoder.buffered)
                        await self._send_quietly(stream, reply_error(
                            None, E_BAD_FRAME, f"frame not complete within {self.frame_timeout:g} s"))
                    else:
                        reason = "idle_timeout"
                        self.metrics.inc("connections.idle_timeout")
                    break
                if not data:
                    decoder.feed_eof()  # raises ProtocolError if it stopped inside a frame
                    break
                if not decoder.buffered:
                    frame_deadline = trio.current_time() + self.frame_timeout  # its first byte arrived
                decoder.feed(data)
                del data  # the decoder holds a copy: keep one buffer per connection, not two
                handled = False
                while (body := decoder.next_body()) is not None:
                    handled = True
                    frame = await self._decode(decoder, body)
                    del body
                    reply, close = await self._dispatch(frame, conn)
                    await self._send(stream, reply)
                    if close:
                        reason = "refused"
                        return
                    if self.draining:
                        reason = "draining"
                        return
                if handled and decoder.buffered:  # the next frame began in the data just handled
                    frame_deadline = trio.current_time() + self.frame_timeout
        except ProtocolError as e:
            reason, counter = {E_BUSY: ("buffer_budget", "frames.refused_budget"),
                               E_UNAUTHORIZED: ("large_frame_unauthorized", "frames.refused_unauthorized")
                               }.get(e.code, ("bad_frame", "frames.bad"))
            self.metrics.inc(counter)
            self.metrics.inc(f"errors.{e.code}")
            if e.code != E_BUSY:  # the budget, or an address's share of it (many clients behind one NAT): not abuse
                self._abused(conn.host, reason)
            self._log_peer(reason, peer=conn.peer, error=str(e)[:300])
            await self._send_quietly(stream, reply_error(e.request_id, e.code, str(e)))
        except _SendTimeout:
            reason = "send_timeout"
            self.metrics.inc("connections.send_timeout")
            self._abused(conn.host, reason)
            self._log_peer("send_timeout", peer=conn.peer, seconds=self.send_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reason = "broken"
            self.metrics.inc("connections.broken")
        except Exception as e:  # a bug: never let one connection take the server down
            reason = "internal"
            self.metrics.inc("errors.internal")
            self.log("error", "internal_error", peer=conn.peer, error=f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            self._conns.discard(conn)
            decoder.close()
            await trio.aclose_forcefully(stream)
            self.log("debug", "connection_closed", peer=conn.peer, reason=reason)

    def _trusted(self, frame) -> bool:
        """The request carries the server's token (compared once per request, in constant time).
        It is then not paced (the token is the trust boundary; pacing is for clients without it,
        and for every client of a server without one) and passes the token check."""
        if self.token is None or not isinstance(frame, dict):
            return False
        got = frame.get("token")
        return isinstance(got, str) and hmac.compare_digest(got.encode(), self.token)

    async def _pace(self, conn: _Conn):
        """Wait for this peer's next turn (``peer_request_rate``). The connection is not read
        meanwhile; a drain ends the wait (the request is then answered)."""
        wait = self.pacer.reserve(conn.host, trio.current_time())
        if wait <= 0:
            return
        self.metrics.inc("requests.delayed")
        with trio.move_on_after(wait) as conn.read_scope:
            if not self.draining:
                await trio.sleep_forever()
        conn.read_scope = None

    async def _decode(self, decoder: FrameDecoder, body) -> dict:
        """Small bodies on the event loop (microseconds); large ones (a snapshot, or something
        hostile) in one of two worker threads, so a slow decode never stalls other connections."""
        try:
            if len(body) <= SMALL_FRAME_BYTES:
                return decoder.decode_body(body)
            if self._decode_limiter is None:
                self._decode_limiter = trio.CapacityLimiter(DECODE_THREADS)
            return await trio.to_thread.run_sync(decoder.decode_body, body, limiter=self._decode_limiter)
        except ProtocolError as e:
            raise decoder.fail(e) from None

    async def _send_quietly(self, stream, reply: dict):
        with trio.move_on_after(min(1.0, self.send_timeout)):
            try:
                await stream.send_all(self._encode(reply))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def _encode(self, reply: dict) -> bytes:
        try:
            return encode_frame(reply, max_frame_bytes=self.max_frame_bytes)
        except ProtocolError as e:
            self.log("error", "reply_not_encodable", error=str(e)[:300])
            return encode_frame(reply_error(reply.get("id"), "internal", f"the reply could not be encoded: {e}"))

    async def _dispatch(self, frame: dict, conn: _Conn) -> tuple[dict, bool]:
        """(reply, close the connection after it)."""
        trusted = self._trusted(frame)
        if trusted:
            if conn.decoder is not None:
                conn.decoder.trust()
        else:
            await self._pace(conn)
        try:
            req = validate_request(frame)
        except ProtocolError as e:
            self.metrics.inc(f"errors.{e.code}")
            return reply_error(e.request_id, e.code, str(e)), False
        if self.token is not None and req["kind"] != "health":
            got = req["token"]
            if not trusted:
                self.metrics.inc("auth.refused")
                self._abused(conn.host, "auth_refused")
                self.metrics.inc(f"errors.{E_UNAUTHORIZED}")
                self._log_peer("auth_refused", peer=conn.peer, kind=req["kind"],
                         reason="missing token" if got is None else "wrong token")
                return reply_error(req["id"], E_UNAUTHORIZED, "missing or wrong token"), True
        if req["kind"] == "health":
            return self.manager.handle(req), False  # cheap; answered even when every worker is busy
        if req["kind"] == "stats" and req["session"] is None:
            reply = self.manager.handle(req)
            if reply["ok"]:
                reply["body"] |= self.gauges() | {"tasks": count_tasks(), "limits": self.limits()}
            return reply, False
        reply = await trio.to_thread.run_sync(self.manager.handle, req)
        # busy (requests already waiting for that session): closed after it, as every busy is (the clients reconnect)
        return reply, not reply["ok"] and reply["error"]["code"] == E_BUSY

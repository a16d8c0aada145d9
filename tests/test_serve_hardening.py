"""`badger serve` against hostile peers and in operation: every bound of docs/protocol.md
"Limits" has a test here that fails without it.

Timeouts are tested on in-memory streams under trio's MockClock (virtual time: exact, no
sleeps); caps and budgets on real loopback sockets, bounded in count (tens of connections)
and waiting on conditions, not on guessed durations.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
import warnings

import msgpack
import numpy as np
import pytest
import trio
import trio.testing

from badger_runtime.policy_card import load_policy
from badger_runtime.serve.client import AsyncClient, Client, ConnectionLost, ServerError
from badger_runtime.serve.protocol import (MAX_ERROR_CHARS, BufferBudget, DecodeLimits, FrameDecoder, ProtocolError,
                                           decode_frame_body, encode_frame, reply_error, validate_reply,
                                           validate_request)
from badger_runtime.serve.server import Server
from badger_runtime.serve.telemetry import JsonLog, route_python_logs

from .test_serve import make, run_server

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(scope="module")
def policy(tiny_policy):
    return load_policy(tiny_policy)


def req(kind, session=None, rid=1, **body):
    return encode_frame({"id": rid, "kind": kind, "session": session, "body": body})


def header(n: int) -> bytes:
    return struct.pack(">I", n)


async def read_replies(stream, timeout=10.0):
    """Every reply frame until the server closes the connection."""
    dec, out = FrameDecoder(allow_nonfinite=True), []
    with trio.fail_after(timeout):
        try:
            while data := await stream.receive_some(1 << 16):
                dec.feed(data)
                out.extend(validate_reply(f) for f in dec.frames())
        except trio.BrokenResourceError:  # a reset after the server closed
            pass
    return out


async def wait_for(cond, timeout=10.0):
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


def counters(m):
    return m.metrics.to_dict()["counters"]


# ---- 1. availability: time bounds (virtual time) -----------------------------------------------

def test_frame_deadline_closes_a_slowloris_not_reset_by_each_byte(policy):
    """One byte per second of a 60-byte frame: closed at the 10 s frame deadline although the
    idle timeout (100 s) is never reached between bytes."""
    m = make(policy)
    server = Server(m, idle_timeout=100, frame_timeout=10)
    seen = {}

    async def main():
        client, server_side = trio.testing.memory_stream_pair()
        frame = encode_frame({"id": 1, "kind": "health", "body": {}, "session": "x" * 30})
        assert len(frame) > 40
        async with trio.open_nursery() as n:
            n.start_soon(server._connection, server_side)
            t0 = trio.current_time()
            sent = 0
            try:
                for b in frame[:-1]:
                    await client.send_all(bytes([b]))
                    sent += 1
                    await trio.sleep(1.0)
            except trio.BrokenResourceError:
                pass
            seen["replies"] = await read_replies(client)
            seen["closed_after"] = trio.current_time() - t0
            seen["sent"] = sent
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert 10 <= seen["closed_after"] <= 12 and seen["sent"] < 40
    assert [r["error"]["code"] for r in seen["replies"]] == ["bad_frame"]
    assert "not complete within 10 s" in seen["replies"][0]["error"]["message"]
    assert counters(m)["connections.frame_timeout"] == 1 and not server._conns


def test_idle_timeout_between_frames_and_slow_but_complete_frames_are_fine(policy):
    """Frames that each complete within the frame deadline keep a connection open past it; a
    connection silent between frames closes at the idle timeout."""
    m = make(policy)
    server = Server(m, idle_timeout=30, frame_timeout=5)
    seen = {}

    async def main():
        client, server_side = trio.testing.memory_stream_pair()
        dec = FrameDecoder()
        async with trio.open_nursery() as n:
            n.start_soon(server._connection, server_side)
            t0 = trio.current_time()
            for i in range(6):  # 6 frames of ~44 bytes, 4 bytes every 0.3 s: ~3.3 s per frame
                data = req("health", rid=i)
                for j in range(0, len(data), 4):
                    await client.send_all(data[j:j + 4])
                    await trio.sleep(0.3)
                while (f := dec.next_frame()) is None:
                    dec.feed(await client.receive_some(1 << 16))
                assert f["ok"] and f["id"] == i
            seen["alive_after"] = trio.current_time() - t0
            t1 = trio.current_time()
            seen["replies"] = await read_replies(client, timeout=100)  # now silent
            seen["idle_closed_after"] = trio.current_time() - t1
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen["alive_after"] > 10  # longer than the frame deadline, in complete frames
    assert seen["replies"] == [] and 29 <= seen["idle_closed_after"] <= 30.5
    assert counters(m)["connections.idle_timeout"] == 1


def test_a_client_that_never_reads_is_dropped_at_the_send_timeout(policy):
    """lockstep stream: a write completes only when the peer reads. The client pipelines
    requests and reads nothing: the server's reply cannot be written; after send_timeout it
    drops the connection (and the task ends)."""
    m = make(policy)
    server = Server(m, send_timeout=3)
    seen = {}

    async def main():
        client, server_side = trio.testing.lockstep_stream_pair()
        async with trio.open_nursery() as n:
            t0 = trio.current_time()
            done = trio.Event()

            async def conn():
                await server._connection(server_side)
                seen["dropped_after"] = trio.current_time() - t0
                done.set()
            n.start_soon(conn)
            await client.send_all(req("health", rid=1) + req("health", rid=2))
            await done.wait()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert 3 <= seen["dropped_after"] <= 3.5
    assert counters(m)["connections.send_timeout"] == 1 and not server._conns


def test_a_non_reading_client_on_a_real_socket_is_dropped(policy):
    m = make(policy)

    async def test(port, server):
        good = await AsyncClient.connect(f"127.0.0.1:{port}")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        batch = req("stats") * 200  # ~40 KB of requests; each reply is a few KB
        sent = 0
        with trio.fail_after(20):
            while counters(m).get("connections.send_timeout", 0) == 0:
                try:
                    sent += sock.send(batch)
                except (BlockingIOError, ConnectionError):
                    pass
                await trio.sleep(0.01)
        await wait_for(lambda: len(server._conns) == 1)
        assert (await good.health())["ready"]  # the server and other connections are fine
        sock.close()
    run_server(m, test, send_timeout=0.5)


# ---- 1. availability: caps ---------------------------------------------------------------------

def test_connection_cap_probes_still_get_health_and_refusals_hold_no_slot(policy):
    m = make(policy)

    async def test(port, server):
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(8)]
        await wait_for(lambda: len(server._conns) == 8)
        # at the cap: a probe connection gets health (then is closed)
        for _ in range(3):
            c = await AsyncClient.connect(f"127.0.0.1:{port}")
            h = await c.health()
            assert h["live"] and h["ready"]
            with pytest.raises(ConnectionLost):
                await c.stats()  # the probe connection was closed after its one reply
            await c.aclose()
        # anything but health on a probe: busy
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(req("open", "x", dims=2))
        assert [r["error"]["code"] for r in await read_replies(s)] == ["busy"]
        # probe slots taken by silent connections: the next one gets busy at once
        probes = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        await wait_for(lambda: len(server._probes) == 2)
        t0 = trio.current_time()
        s = await trio.open_tcp_stream("127.0.0.1", port)
        replies = await read_replies(s)
        assert [r["error"]["code"] for r in replies] == ["busy"] and trio.current_time() - t0 < 2
        assert len(server._conns) == 8  # nothing refused was ever served
        c = counters(m)
        assert c["connections.refused.max_connections"] >= 2 and c["connections.probes"] >= 5
        for x in held + probes:
            await x.aclose()
        await wait_for(lambda: not server._conns and not server._probes and not server._per_peer)
    run_server(m, test, max_connections=8, probe_slots=2, probe_timeout=30, max_connections_per_peer=0)


def test_per_peer_cap(policy):
    m = make(policy)

    async def test(port, server):
        mine = [await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.1") for _ in range(3)]
        await wait_for(lambda: len(server._conns) == 3)
        s = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.1")
        replies = await read_replies(s)
        assert [r["error"]["code"] for r in replies] == ["busy"]
        assert "per-peer" in replies[0]["error"]["message"]
        try:  # another address (Linux routes all of 127/8 to loopback) is not affected
            other = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
        except OSError:
            other = None
        if other is not None:
            c = AsyncClient(other, address="")
            assert (await c.health())["ready"]
            assert server._per_peer == {"127.0.0.1": 3, "127.0.0.2": 1}
            await c.aclose()
        assert counters(m)["connections.refused.max_connections_per_peer"] == 1
        for x in mine:
            await x.aclose()
    run_server(m, test, max_connections=100, max_connections_per_peer=3)


def test_buffer_budget_refuses_large_frames_over_it_and_gives_it_back(policy):
    m = make(policy)

    async def test(port, server):
        a = await trio.open_tcp_stream("127.0.0.1", port)
        await a.send_all(header(800 * KiB) + b"\x80" * 1000)  # a large frame, arriving slowly
        await wait_for(lambda: server.budget.in_use == 800 * KiB)
        b = await trio.open_tcp_stream("127.0.0.1", port)
        await b.send_all(header(300 * KiB) + b"\x80" * 1000)
        replies = await read_replies(b)  # refused and closed
        assert [r["error"]["code"] for r in replies] == ["busy"]
        assert "buffer budget" in replies[0]["error"]["message"]
        c = await AsyncClient.connect(f"127.0.0.1:{port}")  # small frames need no budget
        assert (await c.health())["ready"]
        await a.aclose()
        await wait_for(lambda: server.budget.in_use == 0)
        # now a 300 KiB frame fits: it is read (and answered: an unknown field here)
        b = await trio.open_tcp_stream("127.0.0.1", port)
        await b.send_all(encode_frame({"id": 5, "kind": "health", "body": {}, "pad": b"x" * (300 * KiB)}))
        dec = FrameDecoder()
        while (f := dec.next_frame()) is None:
            dec.feed(await b.receive_some(1 << 16))
        assert f["id"] == 5 and f["error"]["code"] == "bad_request"
        await b.aclose()
        await wait_for(lambda: server.budget.in_use == 0)
        assert counters(m)["frames.refused_budget"] == 1
    run_server(m, test, max_frame_bytes=1 * MiB, buffer_budget=1 * MiB)


def test_budget_reservation_lifecycle_in_the_decoder():
    budget = BufferBudget(total=100 * KiB, small=1 * KiB)
    dec = FrameDecoder(max_frame_bytes=100 * KiB, budget=budget)
    big = encode_frame({"x": b"y" * (70 * KiB)})
    dec.feed(big[:10])
    assert budget.in_use == len(big) - 4  # reserved at the header
    other = FrameDecoder(max_frame_bytes=100 * KiB, budget=budget)
    with pytest.raises(ProtocolError) as e:
        other.feed(big[:10])
    assert e.value.code == "busy" and budget.refused == 1 and other.reserved == 0
    small = FrameDecoder(max_frame_bytes=100 * KiB, budget=budget)
    small.feed(req("health"))  # small frames need none
    assert next(small.frames())["kind"] == "health"
    dec.feed(big[10:] + req("health"))
    frames = dec.frames()
    assert len(next(frames)["x"]) == 70 * KiB
    assert budget.in_use == len(big) - 4  # held while the caller processes the frame
    assert next(frames)["kind"] == "health"
    assert budget.in_use == 0  # given back at the next next_frame
    dec.feed(big[:10])
    dec.close()
    dec.close()
    assert budget.in_use == 0


def test_one_address_holds_at_most_its_share_of_the_budget():
    """Sixteen header-only connections of one address held the whole budget for the frame timeout, and
    every other peer's large frame was refused (and counted against that peer)."""
    budget = BufferBudget(total=1 * MiB, small=1 * KiB)  # share: a quarter
    frame = lambda n: encode_frame({"x": b"y" * n})[:10]  # noqa: E731 (a header and a few bytes)
    a1, a2, b = (FrameDecoder(max_frame_bytes=1 * MiB, budget=budget, owner=o) for o in ("A", "A", "B"))
    a1.feed(frame(200 * KiB))  # its first large frame is let in
    with pytest.raises(ProtocolError) as e:
        a2.feed(frame(100 * KiB))  # 300 KiB would be over A's share of 256 KiB
    assert e.value.code == "busy" and "share" in str(e.value)
    b.feed(frame(700 * KiB))  # another address is not held back by A
    with pytest.raises(ProtocolError) as e:
        FrameDecoder(max_frame_bytes=1 * MiB, budget=budget, owner="C").feed(frame(200 * KiB))
    assert e.value.code == "busy" and "does not fit" in str(e.value)  # the budget is full
    a1.close(), b.close()
    assert budget.in_use == 0 and budget.by_owner == {}


def test_a_full_budget_is_not_counted_against_the_peer_it_refuses(policy):
    m = make(policy)

    async def test(port, server):
        try:
            victim = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
        except OSError:
            pytest.skip("this machine does not route 127.0.0.2 to loopback")
        a = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.1")
        await a.send_all(header(900 * KiB) + b"\x80" * 100)  # holds the budget (its first large frame)
        await wait_for(lambda: server.budget.in_use == 900 * KiB)
        await victim.send_all(header(300 * KiB) + b"\x80" * 100)
        assert [r["error"]["code"] for r in await read_replies(victim)] == ["busy"]
        assert "127.0.0.2" not in server.abuse._events
        a2 = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.1")
        await a2.send_all(header(300 * KiB) + b"\x80" * 100)  # over its own share: refused, and the share is the
        assert [r["error"]["code"] for r in await read_replies(a2)] == ["busy"]  # bound (not counted: behind a NAT
        assert "127.0.0.1" not in server.abuse._events  # an address is many honest clients)
        await a.aclose()
    run_server(m, test, max_frame_bytes=1 * MiB, buffer_budget=1 * MiB)


def test_the_client_takes_a_busy_reply_as_the_end_of_its_connection():
    """After busy the server closes the connection (docs/protocol.md): the next request went out on the closed
    one and failed with ConnectionLost; the client now opens a new connection for it, as after a lost reply."""
    from trio.testing import memory_stream_pair

    async def main():
        mine, theirs = memory_stream_pair()
        c = AsyncClient(mine, reconnect=True, address="unused")
        opened = []

        async def reopen(address):  # the new connection, answered ok
            a, b = memory_stream_pair()
            opened.append(b)
            return a

        c._open = reopen

        async def server():
            dec = FrameDecoder()
            while (f := dec.next_frame()) is None:
                dec.feed(await theirs.receive_some(1 << 16))
            await theirs.send_all(encode_frame(reply_error(f["id"], "busy", "at capacity: try again later")))
            await theirs.aclose()

        async with trio.open_nursery() as n:
            n.start_soon(server)
            with pytest.raises(ServerError, match="busy"):
                await c.health()
        assert c._broken  # so the next request reconnects

        async def answer():
            while not opened:
                await trio.sleep(0)
            dec = FrameDecoder()
            while (f := dec.next_frame()) is None:
                dec.feed(await opened[0].receive_some(1 << 16))
            await opened[0].send_all(encode_frame({"id": f["id"], "ok": True, "body": {"ready": True}}))

        async with trio.open_nursery() as n:
            n.start_soon(answer)
            assert (await c.health())["ready"] and c.reconnects == 1

    trio.run(main)


# ---- 1. availability: decode bombs ---------------------------------------------------------------

def _bombs():
    n = 8 * MiB
    flat = b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n  # one array of 8 M empty maps
    inner = b"\xdd" + (65536).to_bytes(4, "big") + b"\x80" * 65536
    nested = b"\xdc" + (128).to_bytes(2, "big") + inner * 128  # 128 arrays of 64 Ki empty maps
    strings = b"\xdc" + (1000).to_bytes(2, "big") + (b"\xdd" + (4000).to_bytes(4, "big") + b"\xa2ab" * 4000) * 1000
    wide_map = b"\xdf" + (1 << 20).to_bytes(4, "big") + b"".join(
        msgpack.packb(f"k{i}") + b"\xc0" for i in range(1 << 20))
    big_str = b"\xdb" + (4 * MiB).to_bytes(4, "big") + b"a" * (4 * MiB)
    return {"flat": flat, "nested": nested, "strings": strings, "wide_map": wide_map, "big_str": big_str}


@pytest.mark.parametrize("name", ["flat", "nested", "strings", "wide_map", "big_str"])
def test_a_decode_bomb_is_refused_cheaply(name):
    body = _bombs()[name]
    # without limits each of these builds ~10^6..10^7 objects (hundreds of MB, ~1 s)
    t0 = time.perf_counter()
    with pytest.raises(ProtocolError, match="max_|elements|arrays and maps"):
        decode_frame_body(body)
    elapsed = time.perf_counter() - t0
    tracemalloc.start()  # (slows decoding ~20x: measured apart from the time)
    with pytest.raises(ProtocolError):
        decode_frame_body(body)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 0.25 and peak < 32 * MiB, (elapsed, peak)


def test_decode_limits_leave_real_requests_alone():
    rec = {"id": 1, "kind": "remove_experts", "session": "a", "body": {"indices": list(range(65536))}}
    assert decode_frame_body(msgpack.packb(rec))["body"]["indices"][-1] == 65535
    obj = {"id": 1, "kind": "open", "session": "a", "body": {"snapshot": {"agent": {
        "h": np.zeros((1, 1024, 64), np.float32), "route_mask": np.ones((1, 1024, 1024), bool)}}}}
    out = decode_frame_body(encode_frame(obj)[4:])
    assert out["body"]["snapshot"]["agent"]["route_mask"].shape == (1, 1024, 1024)
    with pytest.raises(ProtocolError, match="elements"):
        decode_frame_body(msgpack.packb([list(range(10))] * 100), limits=DecodeLimits(max_items=500))


def test_map_keys_are_strings():
    """A bin map key (bytes) was decoded, then refused as an unknown field named b'...'; the frame is refused as
    what it is, wherever the map is."""
    for obj in ({b"id": 1, "kind": "health", "body": {}}, {"id": 1, "kind": "step", "body": {b"observation": [0.0]}}):
        with pytest.raises(ProtocolError, match="map keys must be msgpack strings"):
            decode_frame_body(msgpack.packb(obj, use_bin_type=True))


def test_real_requests_hold_tens_of_containers(policy):
    """The container bound's margin: an `open` carrying the snapshot of a 1,000-expert session (the largest request)
    decodes within 64 lists and maps, against the bound of 4,096."""
    m = make(policy)
    secret = m.handle({"id": 1, "kind": "open", "session": "a", "token": None,
                       "body": {"experts": 1000, "dims": 3}})["body"]["secret"]
    snap = m.handle({"id": 2, "kind": "snapshot", "session": "a", "token": None, "body": {"secret": secret}})["body"]
    body = encode_frame({"id": 3, "kind": "open", "session": "b", "body": {"snapshot": snap}})[4:]
    assert decode_frame_body(body, limits=DecodeLimits(max_containers=64))["kind"] == "open"


def test_a_small_frame_of_many_empty_containers_is_refused_early():
    """64 KiB of empty lists (65,500 containers, within every length and element limit) cost a Python call each to
    decode, ~14 ms on the event loop; a frame holds at most ``max_containers`` arrays and maps (a request has tens),
    so decoding stops after 4,096 of them."""
    body = msgpack.packb({"id": 1, "kind": "health", "body": {"x": [[]] * 65000}})
    assert len(body) < 65536
    real = DecodeLimits()
    with pytest.raises(ProtocolError, match="more than 4096 arrays and maps"):
        decode_frame_body(body, limits=real)
    assert real.max_containers == 4096
    # at the bound: the frame's own map, its body map and the list x are 3 of the 4,096; empty maps count alike
    for empty in ([], {}):
        at = msgpack.packb({"id": 1, "kind": "health", "body": {"x": [empty] * 4093}})
        assert len(decode_frame_body(at)["body"]["x"]) == 4093
        with pytest.raises(ProtocolError, match="more than 4096 arrays and maps"):
            decode_frame_body(msgpack.packb({"id": 1, "kind": "health", "body": {"x": [empty] * 4094}}))
    with pytest.raises(ProtocolError, match="more than 4096 arrays and maps"):
        decode_frame_body(msgpack.packb({"id": 1, "kind": "health", "body": {"x": [{"a": {}}] * 20000}}))


def test_a_decode_bomb_does_not_stall_other_connections(policy):
    m = make(policy)

    async def test(port, server):
        c = await AsyncClient.connect(f"127.0.0.1:{port}")
        await c.health()
        bomb = _bombs()["nested"]
        worst = 0.0
        for _ in range(3):
            s = await trio.open_tcp_stream("127.0.0.1", port)
            async with trio.open_nursery() as n:
                n.start_soon(s.send_all, header(len(bomb)) + bomb)
                for _ in range(20):
                    t0 = time.perf_counter()
                    await c.health()
                    worst = max(worst, time.perf_counter() - t0)
            replies = await read_replies(s)
            assert [r["error"]["code"] for r in replies] == ["bad_frame"]
        assert worst < 0.5, worst  # unbounded decoding stalled the loop ~1 s per bomb
        assert (await c.stats())["counters"]["frames.bad"] == 3
    run_server(m, test)


def test_untrusted_decoder_refuses_large_frames_at_the_header_until_trusted():
    big = encode_frame({"x": b"y" * (70 * KiB)})
    dec = FrameDecoder(max_frame_bytes=1 * MiB, untrusted_limit=64 * KiB)
    dec.feed(req("health") + req("stats", rid=2))  # small frames pass
    assert [f["kind"] for f in dec.frames()] == ["health", "stats"]
    with pytest.raises(ProtocolError) as e:
        dec.feed(big[:4])  # refused at its header: the body is never read
    assert e.value.code == "unauthorized" and "token" in str(e.value)
    dec = FrameDecoder(max_frame_bytes=1 * MiB, untrusted_limit=64 * KiB)
    dec.feed(req("health") + big)  # pipelined: only the frame at the front is checked
    assert next(dec.frames())["kind"] == "health"
    dec.trust()  # (the server does this after a request that carried its token)
    assert len(next(dec.frames())["x"]) == 70 * KiB


TOKEN = "s3cret-token-0123456789"


def test_with_a_token_large_frames_and_bombs_need_the_token_first(policy):
    """A peer without the token never gets a large frame read or decoded (so a decode bomb
    costs the server a header); a token holder sends ``health`` with the token, then anything."""
    m = make(policy)
    bomb = _bombs()["nested"]

    async def test(port, server):
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(req("health") + header(len(bomb)) + bomb[:64 * KiB])
        replies = await read_replies(s)
        assert [r["ok"] for r in replies] == [True, False]
        assert replies[1]["error"]["code"] == "unauthorized" and "65536" in replies[1]["error"]["message"]
        assert server._decode_limiter is None and server.budget.in_use == 0  # never decoded, nothing reserved
        c = counters(m)
        assert c["frames.refused_unauthorized"] == 1 and "frames.bad" not in c
        # the token holder: health with the token, then a large frame on the same connection
        s = await trio.open_tcp_stream("127.0.0.1", port)
        pad = {"id": 2, "kind": "health", "token": TOKEN, "body": {}, "pad": b"x" * (300 * KiB)}
        await s.send_all(encode_frame({"id": 1, "kind": "health", "token": TOKEN, "body": {}}) + encode_frame(pad))
        dec = FrameDecoder()
        got = []
        while len(got) < 2:
            dec.feed(await s.receive_some(1 << 16))
            got.extend(dec.frames())
        assert got[0]["ok"] and got[1]["id"] == 2 and got[1]["error"]["code"] == "bad_request"  # read and decoded
        await s.aclose()
        # the client library does that by itself when its first frame is large
        c = await AsyncClient.connect(f"127.0.0.1:{port}", token=TOKEN)
        await c.open(dims=2, experts=1000, session="big")
        rec = (await c.snapshot("big"))["record"]
        c2 = await AsyncClient.connect(f"127.0.0.1:{port}", token=TOKEN)
        assert (await c2.open(session="copy", snapshot=rec))["experts"] == 1000  # its first request: > 64 KiB
        assert counters(m)["frames.refused_unauthorized"] == 1
    run_server(m, test, token=TOKEN)


def test_the_blocking_client_shows_the_token_before_a_large_first_frame(policy):
    m = make(policy)

    async def test(port, server):
        def use():
            with Client(f"127.0.0.1:{port}", token=TOKEN) as a, Client(f"127.0.0.1:{port}", token=TOKEN) as b:
                a.open(dims=2, experts=1000, session="big")
                return b.open(session="copy", snapshot=a.snapshot("big")["record"])
        assert (await trio.to_thread.run_sync(use))["experts"] == 1000
        assert "frames.refused_unauthorized" not in counters(m)
    run_server(m, test, token=TOKEN)


# ---- 3. errors -------------------------------------------------------------------------------------

def test_error_replies_never_echo_unbounded_input(policy):
    m = make(policy)
    huge = "z" * (10 * MiB)
    many = {f"field{i:07d}": 1 for i in range(1_000_000)}
    # the sans-IO parts directly (a frame could not even hold these past the decode limits)
    with pytest.raises(ProtocolError) as e:
        validate_request({"id": 1, "kind": "health", "body": {}} | many)
    assert len(str(e.value)) < 600 and "and 999995 more" in str(e.value)
    with pytest.raises(ProtocolError) as e:
        validate_request({"id": 1, "kind": huge, "body": {}})
    assert len(str(e.value)) < 600
    assert len(reply_error(1, "x", huge)["error"]["message"]) <= MAX_ERROR_CHARS

    def call(kind, session=None, **body):
        r = m.handle({"id": 1, "kind": kind, "session": session, "token": None, "body": body})
        assert not r["ok"]
        assert len(encode_frame(r)) < 2 * MAX_ERROR_CHARS, (kind, len(encode_frame(r)))
        return r["error"]

    m.handle({"id": 1, "kind": "open", "session": "a", "token": None, "body": {"dims": 2, "experts": 3}})
    assert "and 999995 more" in call("open", "b", dims=2, **many)["message"]
    call("open", "b", dims=2, **{huge: 1})
    call("add_experts", "a", init=huge)
    call("remove_experts", "a", indices=list(range(10, 60000)))  # the engine names the indices
    call("step", "a", observation=[0.0] * 100_000, feedback=[0.0] * 2)
    call("open", huge, dims=2)
    call("stats", huge)
    call("open", "c", snapshot={"agent": {"h": huge}, "seed": huge, "format": huge})


def test_error_echo_bounded_over_the_wire(policy):
    m = make(policy)

    async def test(port, server):
        s = await trio.open_tcp_stream("127.0.0.1", port)
        long = 60 * KiB  # strings up to the decode limit (64 KiB); past it the frame is refused
        frames = [encode_frame({"id": 1, "kind": "x" * long, "body": {}}),
                  encode_frame({"id": 2, "kind": "health", "body": {f"f{i}" * 400: 0 for i in range(1000)}}),
                  encode_frame({"id": 3, "kind": "open", "session": "a", "body": {"dims": 2, "init": "y" * long}}),
                  encode_frame({"id": 4, "kind": "health", "body": {}, "z" * long: 1})]
        await s.send_all(b"".join(frames))
        dec, got = FrameDecoder(), []
        with trio.fail_after(10):
            while len(got) < 4:
                data = await s.receive_some(1 << 16)
                dec.feed(data)
                got.extend(dec.frames())
        assert [g["error"]["code"] for g in got] == ["unknown_kind", "bad_request", "bad_request", "bad_request"]
        assert all(len(encode_frame(g)) < 2 * MAX_ERROR_CHARS for g in got)
    run_server(m, test)


@pytest.mark.parametrize("rid, echoed", [(2**53 + 1, 2**53 + 1), (2**63 - 1, 2**63 - 1), (2**63, None),
                                         (2**64 - 1, None)])
def test_ids_beyond_2_53_are_echoed_exactly(policy, rid, echoed):
    m = make(policy)

    async def test(port, server):
        s = await trio.open_tcp_stream("127.0.0.1", port)
        body = msgpack.packb({"id": rid, "kind": "health", "body": {}})
        await s.send_all(header(len(body)) + body)
        dec = FrameDecoder()
        while (f := dec.next_frame()) is None:
            dec.feed(await s.receive_some(1 << 16))
        assert f["id"] == echoed and f["ok"] == (echoed is not None)
        if echoed is None:
            assert f["error"]["code"] == "bad_request"
    run_server(m, test)


def test_python_warnings_and_logging_become_json_lines(monkeypatch):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    out = io.StringIO()
    route_python_logs(JsonLog(out, "info"))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with np.errstate(over="warn"):
            np.float32(3e38) * np.float32(10)  # RuntimeWarning: overflow
        warnings.warn("plain\ntext", UserWarning)
    logging.getLogger("some.library").error("it broke: %s", "badly")
    t = threading.Thread(target=lambda: 1 / 0)
    t.start()
    t.join()
    lines = out.getvalue().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert [e["event"] for e in events] == ["python_warning", "python_warning", "python_log", "thread_exception"]
    assert events[0]["category"] == "RuntimeWarning" and "overflow" in events[0]["message"]
    assert events[2]["logger"] == "some.library" and events[3]["error"].startswith("ZeroDivisionError")


# ---- 3. the async client and cancellation ---------------------------------------------------------

def _blocking_steps(m):
    """Make step requests wait for ``release`` (a threading.Event) in their worker thread."""
    release = threading.Event()
    handle = m.handle

    def slow(r):
        if r["kind"] == "step":
            release.wait(10)
        return handle(r)
    m.handle = slow
    return release


def test_a_cancelled_request_does_not_poison_the_connection(policy):
    m = make(policy)
    release = _blocking_steps(m)

    async def test(port, server):
        c = await AsyncClient.connect(f"127.0.0.1:{port}")
        await c.open(dims=2, experts=3, session="a")
        with trio.move_on_after(0.2) as scope:
            await c.step("a", [0, 0], [1, 1], t=0)  # blocked in the server until released
        assert scope.cancelled_caught
        release.set()  # the server completes the step and writes its reply to the old connection
        h = await c.health()  # the next request gets its own reply, not the step's
        assert h["live"] and c.reconnects == 1
        await wait_for(lambda: counters(m).get("steps") == 1)
        r = await c.step("a", [0, 0], [1, 1], t=1)  # the abandoned step was applied: t = 1
        assert r["t"] == 2
        # a client on a bare stream (no address) cannot reconnect: it says so
        bare = AsyncClient(await trio.open_tcp_stream("127.0.0.1", port))
        release.clear()
        with trio.move_on_after(0.2):
            await bare.step("a", [0, 0], [1, 1], t=2)
        release.set()
        with pytest.raises(ConnectionLost, match="out of step"):
            await bare.health()
        await c.aclose()
    run_server(m, test)


def test_a_timed_out_sync_request_does_not_poison_the_connection(policy):
    m = make(policy)
    release = _blocking_steps(m)

    async def test(port, server):
        def sync_part():
            c = Client(f"127.0.0.1:{port}", timeout=0.3)
            c.open(dims=2, experts=3, session="a")
            with pytest.raises(TimeoutError):
                c.step("a", [0, 0], [1, 1], t=0)
            release.set()
            assert c.health()["live"]  # reconnected: its own reply
            assert c.stats("a")["session"] == "a"
            c.close()
        await trio.to_thread.run_sync(sync_part)
    run_server(m, test)


# ---- 2. configuration ------------------------------------------------------------------------------

def test_a_bad_flag_exits_2_with_a_clear_message_in_a_real_process(tmp_path):
    p = subprocess.run([sys.executable, "-m", "badger_runtime.cli", "serve", "--policy", "x.onnx", "--state-dir",
                        str(tmp_path), "--max-frame-mib", "0"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "argument --max-frame-mib: must be a number in [0.0625, 1024], got 0" in p.stderr


@pytest.mark.parametrize("argv, says", [
    (["--max-frame-mib", "-1"], "--max-frame-mib"), (["--max-frame-mib", "5000"], "--max-frame-mib"),
    (["--idle-timeout", "nan"], "finite"), (["--idle-timeout", "-1"], "--idle-timeout"),
    (["--idle-timeout", "0"], "--idle-timeout"), (["--drain-timeout", "-5"], "--drain-timeout"),
    (["--frame-timeout", "inf"], "finite"), (["--send-timeout", "0"], "--send-timeout"),
    (["--max-connections", "0"], "--max-connections"), (["--max-connections-per-peer", "-1"], "per-peer"),
    (["--max-sessions", "-3"], "--max-sessions"), (["--max-experts", "0"], "--max-experts"),
    (["--experts", "0"], "--experts"), (["--checkpoint-every", "-1"], "--checkpoint-every"),
    (["--threads", "0"], "--threads"), (["--buffer-budget-mib", "0"], "--buffer-budget-mib"),
    (["--metrics-port", "70000"], "--metrics-port"), (["--listen", "nohost"], "HOST:PORT"),
    (["--log-level", "loud"], "--log-level"), (["--max-sessions", "1.5"], "integer"),
    (["--abuse-limit", "-1"], "--abuse-limit"), (["--abuse-limit", "2.5"], "integer"),
    (["--abuse-window", "0"], "--abuse-window"), (["--abuse-cooldown", "nan"], "finite"),
    (["--abuse-cooldown", "-3"], "--abuse-cooldown"), (["--peer-request-rate", "-1"], "--peer-request-rate"),
    (["--peer-request-rate", "inf"], "finite"), (["--peer-request-burst", "0"], "--peer-request-burst"),
    (["--gc-gen0", "0"], "--gc-gen0"), (["--gc-gen0", "1e3"], "integer"),
])
def test_bad_flags_are_usage_errors(argv, says, tmp_path, capsys):
    from badger_runtime.cli import main

    assert main(["serve", "--policy", "x.onnx", "--state-dir", str(tmp_path), *argv]) == 2  # argparse's usage error
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--listen", "0.0.0.0:0", "--token", "x"], "at least 16 characters"),
    (["--listen", "0.0.0.0:0"], "needs a token"),
    (["--max-frame-mib", "64", "--buffer-budget-mib", "32"], "at least --max-frame-mib"),
    (["--experts", "50", "--max-experts", "10"], "--max-experts"),
])
def test_inconsistent_settings_exit_2(argv, says, tiny_policy, tmp_path, capsys, monkeypatch):
    from badger_runtime.cli import main

    monkeypatch.delenv("BADGER_TOKEN", raising=False)
    assert main(["serve", "--policy", str(tiny_policy), "--state-dir", str(tmp_path), *argv]) == 2
    assert says in capsys.readouterr().err


def test_a_bad_environment_value_is_a_usage_error(tmp_path, capsys, monkeypatch):
    from badger_runtime.cli import main

    monkeypatch.setenv("BADGER_CHECKPOINT_EVERY", "-2")
    assert main(["serve", "--policy", "x.onnx", "--state-dir", str(tmp_path)]) == 2
    assert "--checkpoint-every" in capsys.readouterr().err


def test_state_files_are_private(policy, tmp_path):
    old = os.umask(0o022)
    try:
        root = tmp_path / "state"
        m = make(policy, root)
        m.handle({"id": 1, "kind": "open", "session": "a", "token": None, "body": {"dims": 2, "experts": 3}})
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert stat.S_IMODE((root / "sessions").stat().st_mode) == 0o700
        assert stat.S_IMODE((root / "sessions" / "a.ckpt").stat().st_mode) == 0o600
        # a leftover world-readable tmp file and folder are tightened on the next write/start
        tmp = root / "sessions" / "b.ckpt.tmp"
        tmp.write_bytes(b"x")
        os.chmod(tmp, 0o644)
        os.chmod(root / "sessions", 0o755)
        m2 = make(policy, root)
        m2.store.write("b", m2.record(m2.sessions["a"]))
        assert stat.S_IMODE((root / "sessions").stat().st_mode) == 0o700
        assert stat.S_IMODE((root / "sessions" / "b.ckpt").stat().st_mode) == 0o600
        (root / "sessions" / "bad.ckpt").write_bytes(b"garbage")
        make(policy, root)  # rejects it to rejected/
        assert stat.S_IMODE((root / "rejected").stat().st_mode) == 0o700
    finally:
        os.umask(old)


# ---- 4. operation: Prometheus metrics ---------------------------------------------------------------

def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_endpoint_serves_the_prometheus_text_format(policy):
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from badger_runtime.serve.telemetry import PrometheusEndpoint

    m = make(policy)
    seen = {}

    async def test(port, server):
        ep = PrometheusEndpoint(m, server, "127.0.0.1", 0)
        try:
            c = await AsyncClient.connect(f"127.0.0.1:{port}")
            await c.open(dims=2, experts=3, session="a")
            for t in range(3):
                await c.step("a", [0, 0], [1, 1], t=t)
            with pytest.raises(ServerError):
                await c.open(dims=0, session="b")
            await wait_for(lambda: server.heartbeat is not None)
            seen["metrics"] = await trio.to_thread.run_sync(_get, f"http://{ep.address}/metrics")
            seen["healthz"] = await trio.to_thread.run_sync(_get, f"http://{ep.address}/healthz")
            seen["readyz"] = await trio.to_thread.run_sync(_get, f"http://{ep.address}/readyz")
            server.draining = True  # readiness and liveness are separate
            seen["readyz_draining"] = await trio.to_thread.run_sync(_get, f"http://{ep.address}/readyz")
            seen["healthz_draining"] = await trio.to_thread.run_sync(_get, f"http://{ep.address}/healthz")
            server.draining = False
            await c.aclose()
        finally:
            ep.close()
    run_server(m, test)
    status, text = seen["metrics"]
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(text)}

    def value(name, **labels):
        for fam in fams.values():
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        raise KeyError(name, labels)

    assert value("badger_sessions") == 1 and value("badger_steps_total") == 3
    assert value("badger_errors_total", code="bad_request") == 1
    assert value("badger_requests_total", kind="step") == 3
    assert value("badger_request_duration_seconds_count", kind="step") == 3
    assert value("badger_request_duration_seconds_bucket", kind="step", le="+Inf") == 3
    assert value("badger_connections_open") == 1 and value("badger_connections_accepted_total") >= 1
    assert value("badger_buffered_bytes") == 0 and value("badger_buffer_budget_bytes") == 256 * MiB
    assert value("badger_ready") == 1 and value("process_resident_memory_bytes") > 0
    assert "badger_connections_refused" in fams
    assert seen["healthz"][0] == 200 and seen["readyz"][0] == 200
    assert seen["readyz_draining"][0] == 503 and seen["healthz_draining"][0] == 200


def test_metrics_flag_without_prometheus_client_is_a_clear_error(tiny_policy, tmp_path, capsys, monkeypatch):
    from badger_runtime.cli import main

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    assert main(["serve", "--policy", str(tiny_policy), "--state-dir", str(tmp_path), "--metrics-port", "0"]) == 2
    assert "prometheus_client" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_the_real_process_logs_only_json_and_serves_metrics(tiny_policy, tmp_path):
    pytest.importorskip("prometheus_client")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BADGER_")}
    err_path = tmp_path / "stderr.log"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-W", "always", "-m", "badger_runtime.cli", "serve", "--policy",
                                 str(tiny_policy), "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "s"),
                                 "--metrics-port", "0", "--max-connections", "4", "--log-level", "debug",
                                 "--gc-gen0", "1234"],
                                stdout=subprocess.PIPE, stderr=err, env=env)
        try:
            ready = json.loads(proc.stdout.readline())
            status, text = _get(f"http://{ready['metrics']}/metrics")
            assert status == 200 and "badger_sessions 0.0" in text
            with Client(ready["listen"], timeout=10) as c:
                assert c.health()["ready"]
                assert c.stats()["limits"]["gc_gen0"] == 1234  # the collector's threshold in the server process
                c.open(dims=2, experts=3, session="a")
                with pytest.raises(ServerError):
                    c.step("a", [0, 0], [1, 1e9])  # refused; logged nowhere as plain text
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    lines = err_path.read_text().splitlines()
    events = [json.loads(line)["event"] for line in lines]  # each line is JSON
    assert "metrics_listening" in events and "stopped" in events
    assert stat.S_IMODE((tmp_path / "s" / "sessions" / "a.ckpt").stat().st_mode) == 0o600


def test_large_frames_are_decoded_off_the_event_loop_and_work(policy):
    """A snapshot of a 1000-expert session is a frame over 64 KiB: reserved from the budget,
    decoded in a worker thread, and restored like any other."""
    m = make(policy)

    async def test(port, server):
        c = await AsyncClient.connect(f"127.0.0.1:{port}")
        await c.open(dims=2, experts=1000, session="big")
        await c.step("big", [0, 0], [1, 1], t=0)
        rec = (await c.snapshot("big"))["record"]
        assert len(encode_frame({"id": 1, "kind": "open", "body": {"snapshot": rec}})) > 64 * KiB
        info = await c.open(session="copy", snapshot=rec)
        assert info["experts"] == 1000 and info["t"] == 1
        a = await c.step("big", [0, 0], [1, 1], t=1)
        b = await c.step("copy", [0, 0], [1, 1], t=1)
        assert np.array_equal(a["outputs"], b["outputs"])
        assert server.budget.in_use == 0 and server._decode_limiter is not None
    run_server(m, test)


# ---- per-peer rate limits: abuse cool-down at accept, request pacing ------------------------------

from badger_runtime.serve.ratelimit import AbuseTracker, RequestPacer  # noqa: E402


def test_abuse_tracker_sliding_window_and_cooldown():
    a = AbuseTracker(limit=3, window=10, cooldown=60)
    assert not any(a.note("p", t) for t in (0, 1, 2))  # 3 events: at the limit, not over it
    assert not a.blocked("p", 2.5) and not a.blocked("q", 2.5)
    assert a.note("p", 3)  # the 4th within 10 s: blocked from now ...
    assert a.blocked("p", 3) and a.blocked("p", 62.9) and a.blocked_count(10) == 1
    assert not a.note("p", 4)  # events while blocked neither extend nor restart it
    assert not a.blocked("q", 10)  # ... only that peer
    assert not a.blocked("p", 63)  # ... until the cool-down ends
    assert a.blocked_count(63) == 0
    # events spread wider than the window never add up
    b = AbuseTracker(limit=2, window=10, cooldown=5)
    assert not any(b.note("p", t) for t in range(0, 200, 6))  # at most 2 in any 10 s
    assert b.note("p", 205) is False and b.note("p", 206) is True  # 198, 205, 206: 3 in 10 s
    # off: never blocks
    off = AbuseTracker(limit=0, window=10, cooldown=5)
    assert not off.enabled and not any(off.note("p", 0) for _ in range(100)) and not off.blocked("p", 0)


def test_abuse_tracker_state_is_bounded_and_pruned():
    a = AbuseTracker(limit=1, window=10, cooldown=60, max_peers=100)
    for i in range(1000):
        a.note(f"10.0.{i // 256}.{i % 256}", 0)
    assert len(a._events) <= 100
    a.prune(100)
    assert not a._events and not a._blocked


@pytest.mark.parametrize("kw, says", [
    (dict(limit=-1, window=1, cooldown=1), "abuse_limit"), (dict(limit=1.5, window=1, cooldown=1), "abuse_limit"),
    (dict(limit=1, window=0, cooldown=1), "abuse_window"), (dict(limit=1, window=1, cooldown=float("nan")),
                                                           "abuse_cooldown"),
    (dict(limit=1, window=float("inf"), cooldown=1), "abuse_window"),
])
def test_abuse_tracker_refuses_bad_settings(kw, says):
    with pytest.raises(ValueError, match=says):
        AbuseTracker(**kw)


def test_request_pacer_is_a_leaky_bucket_per_peer():
    p = RequestPacer(rate=10, burst=3)
    assert [p.reserve("a", 0) for _ in range(3)] == [0, 0, 0]  # the burst: at once
    assert [round(p.reserve("a", 0), 6) for _ in range(3)] == [0.1, 0.2, 0.3]  # then one per 1/rate
    assert p.reserve("b", 0) == 0  # another peer has its own bucket
    assert round(p.reserve("a", 0.25), 6) == 0.15  # a's turns are booked up to 0.4 s
    assert p.reserve("a", 10) == 0  # the bucket refilled
    p.prune(100)
    assert len(p) == 0
    assert all(RequestPacer(rate=0, burst=1).reserve("a", 0) == 0 for _ in range(1000))  # off
    for kw, says in ((dict(rate=-1, burst=1), "peer_request_rate"), (dict(rate=float("inf"), burst=1), "rate"),
                     (dict(rate=1, burst=0), "peer_request_burst")):
        with pytest.raises(ValueError, match=says):
            RequestPacer(**kw)


def test_server_refuses_bad_rate_limit_settings(policy):
    m = make(policy)
    for kw in (dict(abuse_limit=-1), dict(abuse_window=0), dict(abuse_cooldown=float("inf")),
               dict(peer_request_rate=-5), dict(peer_request_burst=0)):
        with pytest.raises(ValueError):
            Server(m, **kw)


def test_a_peer_refused_for_abuse_too_often_is_reset_at_accept(policy):
    """Three bad frames from 127.0.0.2 (limit 2): its next connection is reset at accept with
    nothing read or written, counted and logged once; another address is still served; after
    the cool-down it is served again."""
    m = make(policy)
    lines = []

    def log(level, event, **fields):
        lines.append((level, event, fields))

    async def test(port, server):
        async def bad_frame_from(src):
            s = await trio.open_tcp_stream("127.0.0.1", port, local_address=src)
            await s.send_all(header(3) + b"\xc1\xc1\xc1")  # not msgpack: bad_frame, closed
            return [r["error"]["code"] for r in await read_replies(s)]

        try:
            await (await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")).aclose()
        except OSError:
            pytest.skip("no 127.0.0.2 on this machine")
        for _ in range(3):
            assert await bad_frame_from("127.0.0.2") == ["bad_frame"]
        assert server.abuse.blocked("127.0.0.2", trio.current_time())
        accepted = counters(m)["connections.accepted"]
        try:  # the reset may come before connect() returns, or before or after the send
            s = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
            try:
                await s.send_all(req("health"))
            except trio.BrokenResourceError:
                pass
            assert await read_replies(s) == []  # reset or EOF, not one byte of reply
        except OSError:
            pass
        await wait_for(lambda: counters(m).get("connections.blocked") == 1)
        c = counters(m)
        assert c["connections.accepted"] == accepted and c["peers.blocked"] == 1  # no task was started for it
        assert [e for _, e, _ in lines].count("peer_blocked") == 1
        assert [f for _, e, f in lines if e == "peer_blocked"][0]["peer"] == "127.0.0.2"
        # another address is not affected
        async with await AsyncClient.connect(f"127.0.0.1:{port}") as c1:
            assert (await c1.health())["ready"]
            st = await c1.stats()
        assert st["peers_blocked"] == 1 and st["limits"]["abuse_limit"] == 2
        # the cool-down over (the clock moved past it): served again
        server.abuse.prune(trio.current_time() + server.abuse.cooldown + 1)
        s = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
        c2 = AsyncClient(s, address="")
        assert (await c2.health())["live"]
        await c2.aclose()
        # a server-wide refusal (not this peer's doing) never counts: checked by the reasons noted
        assert set(server.abuse._events) <= {"127.0.0.2"}
    run_server(m, test, abuse_limit=2, abuse_window=3600, abuse_cooldown=3600, log=log)


def test_abuse_off_never_blocks(policy):
    m = make(policy)

    async def test(port, server):
        for _ in range(6):
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await s.send_all(header(3) + b"\xc1\xc1\xc1")
            assert [r["error"]["code"] for r in await read_replies(s)] == ["bad_frame"]
        assert "connections.blocked" not in counters(m)
    run_server(m, test, abuse_limit=0)


class _FromHost:
    """A memory stream that reports a peer address (as a socket stream does)."""
    def __init__(self, stream, host):
        self._s, self.socket, self.host = stream, self, host

    def getpeername(self):
        return (self.host, 40000)

    def __getattr__(self, name):
        return getattr(self._s, name)


@pytest.mark.parametrize("rate", [0, 10])
def test_a_request_flood_is_paced_per_peer_and_others_are_not_starved(policy, rate):
    """Peer A pipelines 100 health requests on two connections; peer B asks for health at
    t = 0 and t = 2 (virtual time). Paced (10/s, burst 5): A's replies come one per 0.1 s after
    its burst, B's at once, and A is delayed 95 times. Unpaced (0): all at once, no delay."""
    m = make(policy)
    server = Server(m, peer_request_rate=rate, peer_request_burst=5, idle_timeout=1000)
    seen = {"a": [], "b": []}

    async def main():
        async def reader(stream, key, n):
            dec = FrameDecoder(allow_nonfinite=True)
            while len(seen[key]) < n:
                dec.feed(await stream.receive_some(1 << 16))
                for f in dec.frames():
                    assert validate_reply(f)["ok"]
                    seen[key].append(trio.current_time())

        async with trio.open_nursery() as n:
            a_clients = []
            for _ in range(2):
                client, server_side = trio.testing.memory_stream_pair()
                n.start_soon(server._connection, _FromHost(server_side, "10.0.0.1"))
                a_clients.append(client)
            b_client, b_server = trio.testing.memory_stream_pair()
            n.start_soon(server._connection, _FromHost(b_server, "10.0.0.2"))
            t0 = trio.current_time()
            for c in a_clients:
                await c.send_all(b"".join(req("health", rid=i) for i in range(50)))
            await b_client.send_all(req("health"))
            async with trio.open_nursery() as r:
                for c in a_clients:
                    r.start_soon(reader, c, "a", 100)
                r.start_soon(reader, b_client, "b", 2)
                await trio.sleep(2)
                await b_client.send_all(req("health", rid=2))
            seen["a"] = [t - t0 for t in seen["a"]]
            seen["b"] = [t - t0 for t in seen["b"]]
            for c in a_clients + [b_client]:
                await c.aclose()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(seen["a"]) == 100 and seen["b"][0] == 0 and seen["b"][1] == 2  # B is never kept waiting
    delayed = counters(m).get("requests.delayed", 0)
    if rate:
        assert delayed == 95
        assert max(seen["a"]) == pytest.approx(9.5) and sum(t == 0 for t in seen["a"]) == 5
    else:
        assert delayed == 0 and max(seen["a"]) == 0


def test_a_paced_request_is_still_answered_when_the_server_drains(policy):
    """A request waiting for its turn is answered at shutdown (not dropped, not waited for)."""
    m = make(policy)

    async def test(port, server):
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(b"".join(req("health", rid=i) for i in range(3)))  # burst 1, 1 a minute: 2 wait
        await wait_for(lambda: counters(m).get("requests.delayed") == 1)
        server.shutdown()
        replies = await read_replies(s)
        assert [r["id"] for r in replies] == [0, 1] and all(r["ok"] for r in replies)
    run_server(m, test, peer_request_rate=1 / 60, peer_request_burst=1)


def test_requests_with_the_token_are_not_paced(policy):
    """With a server token, a request that carries it is trusted and never delayed; the same
    peer's requests without it (health needs none) are paced: burst 1, then one a second."""
    m = make(policy)
    token = "s3cret-token-0123456789"
    server = Server(m, token=token, peer_request_rate=1, peer_request_burst=1, idle_timeout=1000)
    times = []

    async def main():
        client, server_side = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as n:
            n.start_soon(server._connection, _FromHost(server_side, "10.0.0.1"))
            t0 = trio.current_time()
            trusted = b"".join(encode_frame({"id": i, "kind": "health", "token": token, "body": {}})
                               for i in range(20))
            await client.send_all(trusted + b"".join(req("health", rid=100 + i) for i in range(3)))
            dec = FrameDecoder(allow_nonfinite=True)
            while len(times) < 23:
                dec.feed(await client.receive_some(1 << 16))
                times.extend((validate_reply(f)["id"], trio.current_time() - t0) for f in dec.frames())
            await client.aclose()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [t for i, t in times if i < 100] == [0] * 20
    assert [t for i, t in times if i >= 100] == [0, 1, 2]
    assert counters(m)["requests.delayed"] == 2

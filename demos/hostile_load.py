"""`badger serve` under hostile load: a legitimate client's latency with and without N hostile
connections, and the server's memory (docs/benchmarks.md, "Serve under hostile load").

Starts a server process, then measures for --seconds each:

1. *unloaded*: one legitimate client steps its session at a steady pace (--step-every, like
   an environment) and a health probe opens a new connection every --probe-every (like a
   load balancer's probe);
2. *hostile*: the same while a second process holds N hostile connections (from 127.0.0.2..9,
   so the per-peer cap does not stop them: this measures the server-wide bounds), each of one
   kind, reconnecting whenever the server closes or refuses it:

   - idle: connects and sends nothing;
   - slow: sends a frame one byte per second (slowloris);
   - nonreading: sends 64 stats requests (replies of a few KB) and never reads a reply;
   - flood: pipelines 8,000 health requests (~250 KB) and never reads a reply (not in the
     default mix: a request flood, measured on its own);
   - bigframe: announces a 16 MiB frame, sends 64 KiB, then 1 KiB a second;
   - bomb: sends an 8 MiB decode bomb (128 arrays of 65,536 empty maps) every 2 s.

With ``--token`` the server has a token that the legitimate client holds and the hostile
connections do not (the issue's attacker): their frames over 64 KiB are refused at the header.

Reports client-side p50/p99 of steps and probes (ms), probe failures, and the server's RSS
(VmRSS sampled every 0.25 s: max; VmHWM at the end), plus the server's refusal counters.

    python demos/hostile_load.py --policy policies/guessing-converge-v2.onnx --hostile 1024 --seconds 15
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

ROOT = Path(__file__).resolve().parents[1]  # this checkout's badger_runtime, not an installed one
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from badger_runtime.serve.client import AsyncClient  # noqa: E402

MiB = 1 << 20
SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]


def rss_kib(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


# ---- the hostile worker (a separate process) ------------------------------------------------------

def _bomb() -> bytes:
    inner = b"\xdd" + (65536).to_bytes(4, "big") + b"\x80" * 65536
    body = b"\xdc" + (128).to_bytes(2, "big") + inner * 128
    return len(body).to_bytes(4, "big") + body


def _health_frame(pad: int = 0) -> bytes:
    import msgpack

    body = msgpack.packb({"id": 1, "kind": "health", "body": {}, **({"session": "x" * pad} if pad else {})})
    return len(body).to_bytes(4, "big") + body


def _stats_frame() -> bytes:
    import msgpack

    body = msgpack.packb({"id": 1, "kind": "stats", "body": {}})
    return len(body).to_bytes(4, "big") + body


async def _wait_closed_unread(stream, until: float):
    """Without reading: poke one byte of a frame every second until a write fails (the server
    dropped the connection)."""
    while trio.current_time() < until:
        await trio.sleep(1.0)
        await stream.send_all(b"\x00")


async def _open(host: str, port: int, src: str, rcvbuf: int | None = None) -> trio.SocketStream:
    sock = trio.socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.bind((src, 0))
    await sock.connect((host, port))
    return trio.SocketStream(sock)


async def _wait_closed(stream, timeout: float) -> bool:
    """True once the server closed (EOF/reset), False after ``timeout`` with it still open."""
    with trio.move_on_after(timeout):
        try:
            while await stream.receive_some(1 << 16):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


async def _hostile_one(kind: str, i: int, host: str, port: int, until: float, tally: dict, pause: float,
                       bomb: bytes):
    src = SOURCES[i % len(SOURCES)]
    await trio.sleep((i % 100) * 0.01)  # spread the connects over a second
    while trio.current_time() < until:
        try:
            s = await _open(host, port, src, rcvbuf=4096 if kind == "nonreading" else None)
        except OSError:
            tally["connect_failed"] += 1
            await trio.sleep(0.5)
            continue
        tally["connects"] += 1
        try:
            if kind == "idle":
                await _wait_closed(s, until - trio.current_time())
            elif kind == "slow":
                frame = _health_frame(pad=64)
                for b in frame:
                    await s.send_all(bytes([b]))
                    if await _wait_closed(s, 1.0):
                        break
            elif kind == "nonreading":  # requests with large replies (stats), never read: the server's
                await s.send_all(_stats_frame() * 64)  # writes block after ~10 of them
                await _wait_closed_unread(s, until)
            elif kind == "flood":  # ~250 KB of pipelined health requests, never read
                await s.send_all(_health_frame() * 8000)
                await _wait_closed_unread(s, until)
            elif kind == "bigframe":
                await s.send_all((16 * MiB).to_bytes(4, "big") + b"\x00" * 65536)
                while not await _wait_closed(s, 1.0):
                    await s.send_all(b"\x00" * 1024)
            elif kind == "bomb":
                await s.send_all(bomb[:65536])
                if not await _wait_closed(s, 0.1):  # not refused (busy) at its header: send the rest
                    await s.send_all(bomb[65536:])
                    await _wait_closed(s, 30)
                    tally["bombs_sent"] += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            tally["closed"] += 1
            await trio.aclose_forcefully(s)
        await trio.sleep(pause)  # then reconnect


def hostile_worker(host: str, port: int, mix: dict, seconds: float, pause: float):
    """Until SIGTERM (or ``seconds``): hold the hostile connections; then print a tally and
    this process's CPU time as one JSON line."""
    import resource

    tally = {"connects": 0, "closed": 0, "connect_failed": 0, "bombs_sent": 0}
    bomb = _bomb()

    async def main():
        until = trio.current_time() + seconds
        with trio.open_signal_receiver(signal.SIGTERM) as sigs:
            async with trio.open_nursery() as n:
                i = 0
                for kind, count in mix.items():
                    for _ in range(count):
                        n.start_soon(_hostile_one, kind, i, host, port, until, tally, pause, bomb)
                        i += 1
                with trio.move_on_after(seconds):
                    async for _ in sigs:
                        break
                n.cancel_scope.cancel()
    t0 = time.monotonic()
    trio.run(main)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    tally["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 2)
    tally["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(tally), flush=True)


# ---- the legitimate client and the report --------------------------------------------------------

def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(address: str, client: AsyncClient, session: str, seconds: float, step_every: float,
                  probe_every: float, pid: int, until=None) -> dict:
    """The legitimate client's view for ``seconds`` (or until ``await until()`` returns)."""
    steps, probes, probe_fail, rss = [], [], 0, []
    t_info = await client.stats(session)
    t = t_info["t"]
    prev = np.zeros(3, np.float32)
    target = np.array([0.3, -0.5, 0.8], np.float32)
    end = trio.current_time() + seconds
    t0_wall, t0_cpu = trio.current_time(), cpu_s(pid)

    async def stopper():
        nonlocal end
        if until is not None:
            await until()
            end = trio.current_time()

    async def stepper():
        nonlocal t, prev
        while trio.current_time() < end:
            nxt = trio.current_time() + step_every
            t0 = time.perf_counter()
            r = await client.step(session, prev, prev - target, t=t)
            steps.append(time.perf_counter() - t0)
            t, prev = r["t"], np.asarray(r["outputs"], np.float32)
            await trio.sleep_until(nxt)

    async def prober():
        nonlocal probe_fail
        while trio.current_time() < end:
            nxt = trio.current_time() + probe_every
            t0 = time.perf_counter()
            try:
                with trio.fail_after(5):
                    async with await AsyncClient.connect(address) as c:
                        ok = (await c.health())["live"]
                probes.append(time.perf_counter() - t0)
                probe_fail += not ok
            except Exception:
                probe_fail += 1
            await trio.sleep_until(nxt)

    async def sampler():
        while trio.current_time() < end:
            rss.append(rss_kib(pid)["VmRSS"])
            await trio.sleep(0.25)

    async with trio.open_nursery() as n:
        n.start_soon(stepper)
        n.start_soon(prober)
        n.start_soon(sampler)
        if until is not None:
            n.start_soon(stopper)
    s, p = np.array(steps) * 1e3, np.array(probes) * 1e3
    wall = trio.current_time() - t0_wall
    return {"wall_s": round(wall, 1), "server_cpu_pct": round(100 * (cpu_s(pid) - t0_cpu) / wall, 1),
            "steps": len(s), "step_p50_ms": round(float(np.percentile(s, 50)), 2),
            "step_p99_ms": round(float(np.percentile(s, 99)), 2), "step_max_ms": round(float(s.max()), 1),
            "probes": len(p) + probe_fail, "probe_failures": probe_fail,
            "probe_p50_ms": round(float(np.percentile(p, 50)), 2) if len(p) else None,
            "probe_p99_ms": round(float(np.percentile(p, 99)), 2) if len(p) else None,
            "rss_max_mib": round(max(rss) / 1024, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default=str(ROOT / "policies" / "guessing-converge-v2.onnx"))
    p.add_argument("--hostile", type=int, default=1024, help="hostile connections in all")
    p.add_argument("--mix", default="idle=0.4,slow=0.25,nonreading=0.15,bigframe=0.15,bomb=0.05",
                   help="fractions of the hostile connections per kind")
    p.add_argument("--seconds", type=float, default=15.0, help="measuring time per phase")
    p.add_argument("--step-every", type=float, default=0.02, help="the legitimate client's step pace (s)")
    p.add_argument("--probe-every", type=float, default=0.2, help="a health probe on a new connection (s)")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--server-flag", action="append", default=[], help="extra flag for badger serve (repeat)")
    p.add_argument("--reconnect-after", type=float, default=2.0,
                   help="a hostile connection that was closed or refused reconnects after this (s)")
    p.add_argument("--token", action="store_true",
                   help="the server has a token: the legitimate client holds it, the hostile ones do not "
                        "(the health probes send none, like a load balancer's)")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # HOST:PORT:SECONDS:PAUSE:MIXJSON
    args = p.parse_args(argv)

    if args.worker:
        host, port, seconds, pause, mix = args.worker.split(":", 4)
        hostile_worker(host, int(port), json.loads(mix), float(seconds), float(pause))
        return

    fractions = {k: float(v) for k, v in (kv.split("=") for kv in args.mix.split(","))}
    mix = {k: int(round(f * args.hostile)) for k, f in fractions.items()}
    mix[max(mix, key=mix.get)] += args.hostile - sum(mix.values())
    state = tempfile.mkdtemp(prefix="badger-hostile-")
    log_path = os.path.join(state, "server.log")
    flags = ["--no-fsync", "--log-level", "warning", *args.server_flag]
    token = "hostile-load-legitimate-token" if args.token else None
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "badger_runtime.cli", "serve", "--policy", args.policy,
                                 "--listen", "127.0.0.1:0", "--state-dir", os.path.join(state, "s"), *flags],
                                stdout=subprocess.PIPE, stderr=log, cwd=ROOT,
                                env=os.environ | {"PYTHONPATH": str(ROOT)} | ({"BADGER_TOKEN": token} if token else {}))
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"the server did not start: {open(log_path).read()[-2000:]}")
    address = json.loads(line)["listen"]
    host, port = address.rsplit(":", 1)
    result = {"hostile": args.hostile, "mix": mix, "seconds": args.seconds, "server_flags": flags,
              "token": args.token, "reconnect_after_s": args.reconnect_after}

    async def run():
        async with await AsyncClient.connect(address, token=token) as c:
            info = await c.open(dims=3, experts=args.experts, seed=0, session="legit",
                                past_horizon=True)  # a long run on an episodic policy: steps past its horizon
            await c.step("legit", [0, 0, 0], [0.1, 0.1, 0.1], t=0)
            result["rss_idle_mib"] = round(rss_kib(proc.pid)["VmRSS"] / 1024, 1)
            result["unloaded"] = await measure(address, c, info["session"], args.seconds, args.step_every,
                                               args.probe_every, proc.pid)
            worker = await trio.lowlevel.open_process(
                [sys.executable, __file__, "--worker",
                 f"{host}:{port}:{args.seconds + 90}:{args.reconnect_after}:"
                 f"{json.dumps(mix, separators=(',', ':'))}"],
                stdout=subprocess.PIPE)
            async def settled():  # the hostile connections are in: their count stopped growing
                with trio.move_on_after(60):
                    seen = []
                    async with await AsyncClient.connect(address, token=token) as probe_c:
                        while True:
                            await trio.sleep(0.5)
                            seen.append((await probe_c.stats())["connections"])
                            if len(seen) > 6 and seen[-1] <= max(seen[-7:-1]):  # no growth for 3 s
                                return

            result["ramp"] = await measure(address, c, info["session"], 60, args.step_every, args.probe_every,
                                           proc.pid, until=settled)
            st = await c.stats()
            result["connections_at_start"] = st["connections"]
            result["hostile_phase"] = await measure(address, c, info["session"], args.seconds, args.step_every,
                                                    args.probe_every, proc.pid)
            st = await c.stats()
            result["connections_at_end"] = st["connections"]
            keep = ("connections.", "frames.", "errors.", "peers.", "requests.delayed")
            result["server_counters"] = {k: v for k, v in st["counters"].items() if k.startswith(keep)}
            result["buffer_reserved_mib"] = round(st["buffer_reserved_bytes"] / MiB, 1)
            result["server_loop_lag_ms"] = round(st["loop_lag_s"] * 1e3, 1)
            worker.send_signal(signal.SIGTERM)
            out = b""
            with trio.fail_after(30):
                while chunk := await worker.stdout.receive_some(1 << 16):
                    out += chunk
                await worker.wait()
            result["hostile_worker"] = json.loads(out.decode().strip().splitlines()[-1])
    try:
        trio.run(run)
        result["server_vmhwm_mib"] = round(rss_kib(proc.pid)["VmHWM"] / 1024, 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    print(json.dumps(result, indent=1))
    if args.markdown:
        u, h = result["unloaded"], result["hostile_phase"]
        print("| phase | hostile conns | s | step p50 ms | step p99 ms | probe p50 ms | probe p99 ms | probe failures "
              "| server RSS max MiB | server CPU % |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, r, n in (("unloaded", u, 0), ("ramp (connecting)", result["ramp"], args.hostile),
                           ("hostile, steady", h, args.hostile)):
            print(f"| {name} | {n} | {r['wall_s']} | {r['step_p50_ms']} | {r['step_p99_ms']} | {r['probe_p50_ms']} | "
                  f"{r['probe_p99_ms']} | {r['probe_failures']}/{r['probes']} | {r['rss_max_mib']} | "
                  f"{r['server_cpu_pct']} |")


if __name__ == "__main__":
    main()

"""Load test for `badger serve`: C concurrent clients x S steps on loopback.

Starts a server process (unless --connect is given), opens one session per client, and has
every client step its session S times as fast as the server answers (the guessing game:
observation = the previous outputs, feedback = their error against a fixed target). Reports
throughput (steps/s over all clients) and client-side step latency (p50/p99, ms), plus the
server's own step and checkpoint histograms.

    python -m badger_runtime.serve.load --policy guessing-converge-v2 --clients 4 --steps 500 \\
        --experts 32 --dims 3 --rounds 4     (or: python demos/load.py ...)

Options --no-fsync and --checkpoint-every K are passed to the server (to measure what
durability costs). --markdown prints a row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import trio

from badger_runtime.serve.client import AsyncClient


def start_server(policy: str, state_dir: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "badger_runtime.cli", "serve", "--policy", policy, "--listen",
                             "127.0.0.1:0", "--state-dir", state_dir, "--log-level", "warning",
                             "--peer-request-rate", "0",  # a throughput test from one address: no pacing
                             *extra],
                            stdout=subprocess.PIPE)
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"the server did not start (exit {proc.wait()})")
    return proc, json.loads(line)["listen"]


async def one_client(address: str, token: str | None, i: int, args, lat: list[float]):
    async with await AsyncClient.connect(address, token=token) as c:
        info = await c.open(dims=args.dims, experts=args.experts, seed=i, rounds=args.rounds)
        name, fb_size = info["session"], info["feedback_size"]
        target = np.random.default_rng(i).uniform(-1, 1, args.dims).astype(np.float32)
        prev = np.zeros(args.dims, np.float32)
        for t in range(args.steps):
            err = prev - target
            fb = err if fb_size == args.dims else np.array([3 * np.mean(err**2)], np.float32)
            t0 = time.perf_counter()
            r = await c.step(name, prev, fb, t=t)
            lat.append(time.perf_counter() - t0)
            prev = np.asarray(r["outputs"], np.float32)
        await c.close_session(name)


async def run(address: str, token: str | None, args) -> dict:
    lat: list[float] = []
    t0 = time.perf_counter()
    async with trio.open_nursery() as n:
        for i in range(args.clients):
            n.start_soon(one_client, address, token, i, args, lat)
    wall = time.perf_counter() - t0
    async with await AsyncClient.connect(address, token=token) as c:
        stats = await c.stats()
    ms = np.array(lat) * 1e3
    srv = stats["latency_ms"]
    return {"clients": args.clients, "steps": args.steps, "experts": args.experts, "dims": args.dims,
            "rounds": args.rounds, "wall_s": round(wall, 2), "steps_per_s": round(len(lat) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "server_step_p50_ms": srv["step"]["p50_ms"], "server_step_p99_ms": srv["step"]["p99_ms"],
            "checkpoint_mean_ms": round(srv["checkpoint"]["sum_ms"] / srv["checkpoint"]["count"], 2)
            if "checkpoint" in srv else None,
            "checkpoint_every": stats["checkpoint_every"], "fsync": stats["fsync"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default=None, help="policies/NAME.onnx (default: the first in policies/)")
    p.add_argument("--connect", default=None, help="an already running server (else one is started)")
    p.add_argument("--token", default=os.environ.get("BADGER_TOKEN"))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--dims", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--no-fsync", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=1)
    p.add_argument("--markdown", action="store_true", help="also print a markdown table row")
    args = p.parse_args(argv)

    proc = None
    address = args.connect
    with tempfile.TemporaryDirectory(prefix="badger-load-") as state:
        if address is None:
            policy = args.policy
            if policy is None:
                found = sorted(f for f in os.listdir("policies") if f.endswith(".onnx")) if os.path.isdir(
                    "policies") else []
                if not found:
                    raise SystemExit("no --policy and no policies/*.onnx")
                policy = os.path.join("policies", found[0])
            extra = ["--checkpoint-every", str(args.checkpoint_every)] + (["--no-fsync"] if args.no_fsync else [])
            proc, address = start_server(policy, state, extra)
        try:
            report = trio.run(run, address, args.token, args)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    report["policy"] = args.policy or (os.path.basename(policy) if proc else None)
    print(json.dumps(report))
    if args.markdown:
        dur = ("fsync" if report["fsync"] else "no fsync") + f", every {report['checkpoint_every']} step(s)"
        print(f"| {args.clients} x {args.steps} | {args.experts} | {args.dims} | {args.rounds} | {dur} | "
              f"{report['steps_per_s']} | {report['p50_ms']} | {report['p99_ms']} | "
              f"{report['server_step_p50_ms']} | {report['checkpoint_mean_ms']} |")


if __name__ == "__main__":
    main()

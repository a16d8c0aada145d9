"""Soak test for `badger serve`: one server process served for a long time, on loopback.

Starts the real server as a subprocess (``demos/load.py``'s ``start_server``: loopback,
port 0, the state dir in a temporary folder), checkpointing every 100 steps
(``--checkpoint-every 100``, fsync on), then drives it in two phases:

1. one session for ``--steps`` steps;
2. ``--sessions`` sessions at once (one connection each), ``--steps / --sessions`` steps each.

Every session plays the non-stationary guessing game: its targets jump to fresh values in
[-1, 1]^d every U[20, 60] steps, the observation is the previous outputs, and the feedback is
computed by the client from them (per-dimension error ``outputs - target``; the scalar
``3 * mean(error^2)`` for a scalar-feedback policy). Every ``--window`` steps (all sessions
together; default steps / 20) it records the server process's resident memory (VmRSS from
/proc/PID/status, with its thread and file descriptor counts), the client-side step latency
p50/p99 of the window (request sent -> reply decoded), the mean squared error of the window's
outputs, the encoded size of the server's ``stats`` reply, the checkpoint files in the state
dir and the server's log lines.

At the end it stops the server with SIGTERM and checks:

- the server exits 0, and the state dir holds exactly one checkpoint per session (no temp
  files, nothing rejected), each at the session's last step;
- resident memory growth after warm-up (RSS at the end minus RSS once the first 10 % of all
  steps are done) is below ``--max-growth-mib``;
- the server keeps no per-step data: its ``stats`` reply has the same structure (keys, list
  lengths) after 1,000 steps and after all of them, and its encoded size differs by at most
  ``STATS_SLACK_BYTES`` (msgpack integers widen as counters grow); stepping adds no log lines;
- every output is finite.

Prints one JSON object (``"ok"``: every check passed; exit 1 otherwise). ``--max-seconds``
bounds the whole run (the phases stop early, ``"stopped_early": true``).

    python demos/soak.py --plot docs/figures/soak.png --markdown

(defaults: policies/guessing-nonstationary-v2.onnx, 1 x 100,000 steps then 4 x 25,000.)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

from badger_runtime.serve import store
from badger_runtime.serve.load import start_server
from badger_runtime.serve.client import AsyncClient
from badger_runtime.serve.protocol import encode_frame

DEFAULT_POLICY = "policies/guessing-nonstationary-v2.onnx"
CHECKPOINT_EVERY = 100
JUMP_EVERY = (20, 60)
WARMUP_FRACTION = 0.10
EARLY_STATS_STEPS = 1000
STATS_SLACK_BYTES = 256  # a per-step history would add >= 1 byte per step: thousands


# ---- the server process, seen from outside -------------------------------------------------------

def proc_status(pid: int) -> dict:
    """VmRSS (MiB), VmHWM (MiB), threads and open file descriptors of a live process."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0]) / 1024  # kB -> MiB
            elif key == "Threads":
                out["threads"] = int(val)
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss_mib": round(out["VmRSS"], 2), "hwm_mib": round(out["VmHWM"], 2), "threads": out["threads"],
            "fds": out["fds"]}


def state_files(state_dir: Path) -> dict:
    """What the state dir holds: checkpoint files, their bytes, and anything else."""
    files = [p for p in state_dir.rglob("*") if p.is_file()]
    ckpts = [p for p in files if p.parent.name == "sessions" and p.name.endswith(store.SUFFIX)]
    return {"checkpoints": len(ckpts), "checkpoint_bytes": sum(p.stat().st_size for p in ckpts),
            "other_files": sorted(str(p.relative_to(state_dir)) for p in files if p not in ckpts)}


def shape_of(x):
    """The structure of a reply: map keys and list lengths, recursively (values dropped)."""
    if isinstance(x, dict):
        return {k: shape_of(v) for k, v in sorted(x.items())}
    if isinstance(x, (list, tuple)):
        return [len(x)] + [shape_of(v) for v in x if isinstance(v, (dict, list, tuple))]
    return type(x).__name__ if x is None else "scalar"


# ---- the soak ---------------------------------------------------------------------------------

class Soak:
    """Steps of all sessions, windowed: latency and error kept only for the current window."""

    def __init__(self, args, pid: int, address: str, state_dir: Path, log_path: Path):
        self.args, self.pid, self.address = args, pid, address
        self.state_dir, self.log_path = state_dir, log_path
        self.deadline = time.monotonic() + args.max_seconds
        self.t0 = time.perf_counter()
        self.steps = 0
        self.lat: list[float] = []
        self.sq_err: list[float] = []
        self.nonfinite = 0
        self.rows: list[dict] = []
        self.stats_early: dict | None = None
        self.sessions: dict[str, int] = {}  # name -> steps taken
        self.stopped_early = False

    def log_lines(self) -> int:
        with open(self.log_path, "rb") as f:
            return sum(1 for _ in f)

    async def stats(self) -> dict:
        async with await AsyncClient.connect(self.address, token=self.args.token) as c:
            return await c.stats()

    async def sample(self, phase: int):
        """Close the current window (synchronously, before any await) and record a row."""
        lat, self.lat = np.array(self.lat) * 1e3, []
        err, self.sq_err = np.array(self.sq_err), []
        row = {"steps": self.steps, "phase": phase, "wall_s": round(time.perf_counter() - self.t0, 1),
               **proc_status(self.pid),
               "p50_ms": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
               "p99_ms": round(float(np.percentile(lat, 99)), 3) if len(lat) else None,
               "max_ms": round(float(lat.max()), 3) if len(lat) else None,
               "mse": round(float(err.mean()), 5) if len(err) else None}
        stats = await self.stats()
        row["stats_bytes"] = len(encode_frame(stats))
        row["server_tasks"] = stats["tasks"]
        row |= state_files(self.state_dir)
        row["log_lines"] = self.log_lines()
        del row["other_files"]
        self.rows.append(row)
        return stats

    async def early_stats(self):
        stats = await self.stats()
        self.stats_early = {"steps": self.steps, "bytes": len(encode_frame(stats)), "shape": shape_of(stats)}

    async def drive(self, name: str, steps: int, seed: int, phase: int):
        """One session: open it, step it ``steps`` times through the guessing game."""
        rng = np.random.default_rng(seed)
        async with await AsyncClient.connect(self.address, token=self.args.token) as c:
            info = await c.open(dims=self.args.dims, experts=self.args.experts, seed=seed, session=name)
            d, fb_size = info["dims"], info["feedback_size"]
            self.sessions[name] = 0
            target = rng.uniform(-1, 1, d).astype(np.float32)
            next_jump = rng.integers(JUMP_EVERY[0], JUMP_EVERY[1] + 1)
            prev = np.zeros(d, np.float32)
            for t in range(steps):
                if time.monotonic() > self.deadline:
                    self.stopped_early = True
                    return
                if t == next_jump:
                    target = rng.uniform(-1, 1, d).astype(np.float32)
                    next_jump = t + rng.integers(JUMP_EVERY[0], JUMP_EVERY[1] + 1)
                err = prev - target
                fb = err if fb_size == d else np.array([3 * np.mean(err**2)], np.float32)
                t0 = time.perf_counter()
                r = await c.step(name, prev, fb, t=t)
                self.lat.append(time.perf_counter() - t0)
                prev = np.asarray(r["outputs"], np.float32)
                if not np.isfinite(prev).all():
                    self.nonfinite += 1
                    prev = np.nan_to_num(prev, nan=0.0, posinf=1.0, neginf=-1.0)
                self.sq_err.append(float(np.mean((prev - target) ** 2)))
                self.steps += 1
                self.sessions[name] = t + 1
                if self.steps == EARLY_STATS_STEPS:
                    await self.early_stats()
                if self.steps % self.args.window == 0:
                    await self.sample(phase)

    async def phase(self, phase: int, n_sessions: int, steps_each: int) -> dict:
        start_steps, t0 = self.steps, time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(n_sessions):
                nursery.start_soon(self.drive, f"soak{phase}-{i}", steps_each, 1000 * phase + i, phase)
        wall = time.perf_counter() - t0
        if not self.rows or self.rows[-1]["steps"] != self.steps:
            await self.sample(phase)
        done = self.steps - start_steps
        return {"phase": phase, "sessions": n_sessions, "steps_per_session": steps_each, "steps": done,
                "end_steps": self.steps, "wall_s": round(wall, 1), "steps_per_s": round(done / wall, 1)}

    async def run(self) -> dict:
        a = self.args
        await self.sample(0)  # before any session: the idle server
        phases = [await self.phase(1, 1, a.steps)]
        if a.sessions > 0 and not self.stopped_early:
            phases.append(await self.phase(2, a.sessions, a.steps // a.sessions))
        if self.stats_early is None:  # fewer steps than EARLY_STATS_STEPS
            await self.early_stats()
        final = await self.stats()
        return {"phases": phases, "stats_final": final}


def growth(rows: list[dict], start_steps: int, end_steps: int) -> dict:
    """RSS at the end minus RSS after warm-up (the first sample at or past 10 % of the steps)."""
    span = [r for r in rows if start_steps <= r["steps"] <= end_steps]
    warm_at = start_steps + WARMUP_FRACTION * (end_steps - start_steps)
    warm = next((r for r in span if r["steps"] >= warm_at), span[-1])
    end = span[-1]
    mid = next(r for r in span if r["steps"] >= (start_steps + end_steps) / 2)
    g = end["rss_mib"] - warm["rss_mib"]
    n = end["steps"] - warm["steps"]
    return {"warmup_steps": warm["steps"], "end_steps": end["steps"], "rss_warmup_mib": warm["rss_mib"],
            "rss_end_mib": end["rss_mib"], "growth_mib": round(g, 2),
            "growth_mib_per_1000_steps": round(1000 * g / n, 4) if n else None,
            "growth_second_half_mib": round(end["rss_mib"] - mid["rss_mib"], 2),
            "rss_min_mib": min(r["rss_mib"] for r in span if r["steps"] >= warm["steps"]),
            "rss_max_mib": max(r["rss_mib"] for r in span if r["steps"] >= warm["steps"])}


def plot(report: dict, path: str):
    from badger_runtime.demo.figures import save_png, subplots

    rows = [r for r in report["windows"] if r["steps"] > 0]
    x = np.array([r["steps"] for r in rows]) / 1000
    fig, (ax1, ax2) = subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(x, [r["rss_mib"] for r in rows], "o-", ms=3, color="tab:blue")
    ax1.axhline(report["windows"][0]["rss_mib"], color="gray", lw=0.8, ls=":", label="idle server (0 steps)")
    ax1.set_ylabel("server RSS (MiB)")
    ax1.legend(loc="lower right", fontsize=8)
    ax2.plot(x, [r["p50_ms"] for r in rows], "o-", ms=3, label="p50")
    ax2.plot(x, [r["p99_ms"] for r in rows], "s-", ms=3, label="p99")
    ax2.set_ylabel("step latency per window (ms)")
    ax2.set_xlabel("steps served (thousands, all sessions)")
    ax2.set_ylim(bottom=0)
    ax2.legend(loc="upper left", fontsize=8)
    for ax in (ax1, ax2):
        ax.axvline(report["growth"]["warmup_steps"] / 1000, color="gray", ls="--", lw=0.8)
        for p in report["phases"][1:]:
            ax.axvline((p["end_steps"] - p["steps"]) / 1000, color="k", lw=0.8)
        ax.grid(alpha=0.3)
    for p in report["phases"]:
        ax1.text((p["end_steps"] - p["steps"] / 2) / 1000, 0.45, f"{p['sessions']} session{'s' * (p['sessions'] > 1)}",
                 ha="center", fontsize=9, transform=ax1.get_xaxis_transform())
    ax1.text(report["growth"]["warmup_steps"] / 1000, 0.25, " end of warm-up", fontsize=8, color="gray",
             transform=ax1.get_xaxis_transform())
    labels = ", then ".join(f"{p['sessions']} x {p['steps_per_session']:,}" for p in report["phases"])
    ax1.set_title(f"badger serve soak: {labels} steps (sessions x steps), checkpoint every "
                  f"{report['checkpoint_every']}", fontsize=10)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def markdown(report: dict) -> str:
    lines = ["| steps | sessions | RSS MiB | p50 ms | p99 ms | max ms | MSE | threads | fds | stats reply bytes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    sessions = {0: 0} | {p["phase"]: p["sessions"] for p in report["phases"]}
    def f(v):
        return "-" if v is None else f"{v:.2f}"

    for r in report["windows"]:
        lines.append(f"| {r['steps']:,} | {sessions[r['phase']]} | {r['rss_mib']:.2f} | "
                     f"{f(r['p50_ms'])} | {f(r['p99_ms'])} | {f(r['max_ms'])} | "
                     f"{'-' if r['mse'] is None else format(r['mse'], '.4f')} | {r['threads']} | {r['fds']} | "
                     f"{r['stats_bytes']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default=DEFAULT_POLICY)
    p.add_argument("--steps", type=int, default=100_000,
                   help="steps of phase 1 (one session), and of phase 2 in all (split over --sessions)")
    p.add_argument("--sessions", type=int, default=4, help="concurrent sessions of phase 2 (0: no phase 2)")
    p.add_argument("--window", type=int, default=None, help="steps per sample (default: steps / 20)")
    p.add_argument("--max-seconds", type=float, default=900.0, help="stop stepping after this long")
    p.add_argument("--max-growth-mib", type=float, default=20.0, help="RSS growth after warm-up allowed")
    p.add_argument("--experts", type=int, default=None, help="default: the server's (the policy's N)")
    p.add_argument("--dims", type=int, default=3)
    p.add_argument("--token", default=os.environ.get("BADGER_TOKEN"))
    p.add_argument("--plot", default=None, metavar="PNG", help="RSS and p50/p99 latency against steps")
    p.add_argument("--markdown", action="store_true", help="also print the windows as a markdown table")
    args = p.parse_args(argv)
    if args.steps < 1 or args.sessions < 0 or (args.sessions and args.steps < args.sessions):
        p.error("--steps must be >= 1 and >= --sessions, --sessions >= 0")
    args.window = args.window or max(1, args.steps // 20)

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="badger-soak-") as tmp:
        state_dir, log_path = Path(tmp) / "state", Path(tmp) / "server.log"
        extra = ["--checkpoint-every", str(CHECKPOINT_EVERY), "--log-level", "info"]
        with open(log_path, "wb") as log, _stderr_to(log):  # the server inherits it: its JSON log lines
            proc, address = start_server(args.policy, str(state_dir), extra)
        try:
            soak = Soak(args, proc.pid, address, state_dir, log_path)
            out = trio.run(soak.run)
            log_before_stop = soak.log_lines()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        files = state_files(state_dir)
        ckpts = store.SessionStore(state_dir, fsync=False)
        at = {name: store.decode(ckpts.path(name).read_bytes())["agent"]["t"] for name in ckpts.names()}
        log_events = [json.loads(line)["event"] for line in log_path.read_text().splitlines() if line.startswith("{")]

    rows = soak.rows
    phases = out["phases"]
    final = out["stats_final"]
    early = soak.stats_early
    final_bytes = len(encode_frame(final))
    # log lines: only events that happen once per session or per run, none per step
    opened_rows = {p["phase"]: [r for r in rows if r["phase"] == p["phase"]] for p in phases}
    step_logs = sum(rs[-1]["log_lines"] - rs[0]["log_lines"] for rs in opened_rows.values() if rs)
    report = {
        "policy": args.policy, "checkpoint_every": CHECKPOINT_EVERY, "fsync": final["fsync"],
        "window": args.window, "max_seconds": args.max_seconds, "stopped_early": soak.stopped_early,
        "phases": phases, "steps": soak.steps, "wall_s": round(time.perf_counter() - t_start, 1),
        "growth": growth(rows, 0, soak.steps),
        "growth_by_phase": {str(p["phase"]): growth(rows, p["end_steps"] - p["steps"], p["end_steps"])
                            for p in phases if p["steps"]},
        "stats_reply_bytes": {"after_steps": early["steps"], "early": early["bytes"], "end": final_bytes,
                              "same_structure": early["shape"] == shape_of(final),
                              "min_window": min(r["stats_bytes"] for r in rows[1:] or rows),
                              "max_window": max(r["stats_bytes"] for r in rows[1:] or rows)},
        "server": {"exit_code": rc, "counters": final["counters"], "tasks": final["tasks"],
                   "step_latency_ms": {k: final["latency_ms"]["step"][k] for k in ("count", "p50_ms", "p99_ms",
                                                                                    "max_ms")},
                   "checkpoint_writes": final["counters"].get("checkpoint.writes"),
                   "log_lines": len(log_events), "log_lines_before_sigterm": log_before_stop,
                   "log_lines_added_while_stepping": step_logs,
                   "log_events": {e: log_events.count(e) for e in sorted(set(log_events))}},
        "state_dir": {**files, "sessions": len(soak.sessions),
                      "checkpoint_bytes_first_window": next(r["checkpoint_bytes"] for r in rows if r["steps"]),
                      "checkpoint_t_matches": at == soak.sessions, "max_checkpoints_seen": max(
                          r["checkpoints"] for r in rows)},
        "nonfinite_outputs": soak.nonfinite,
        "windows": rows,
    }
    checks = {
        "server_exit_0": rc == 0,
        "rss_growth_below_limit": report["growth"]["growth_mib"] < args.max_growth_mib,
        "stats_reply_constant": report["stats_reply_bytes"]["same_structure"]
        and abs(final_bytes - early["bytes"]) <= STATS_SLACK_BYTES,
        "no_log_lines_per_step": step_logs == 0,
        "one_checkpoint_per_session": files["checkpoints"] == len(soak.sessions) and not files["other_files"]
        and all(r["checkpoints"] <= len(soak.sessions) for r in rows),
        "checkpoints_at_last_step": report["state_dir"]["checkpoint_t_matches"],
        "finite_outputs": soak.nonfinite == 0,
        "all_steps_done": not soak.stopped_early,
    }
    report["checks"] = checks
    report["ok"] = all(checks.values())
    print(json.dumps(report))
    if args.markdown:
        print(markdown(report))
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(report, args.plot)
    return report


class _stderr_to:
    """Point this process's fd 2 at ``f`` while the server is started (it inherits the fd and
    keeps it), then restore it. ``start_server`` leaves the child's stderr as ours."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        os.dup2(self.f.fileno(), 2)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)

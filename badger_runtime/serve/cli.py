"""``badger serve`` and ``badger client ...``.

Flags fall back to the environment: BADGER_POLICY, BADGER_LISTEN, BADGER_STATE_DIR,
BADGER_TOKEN (prefer it to --token: a command line is visible to every local user),
BADGER_CONNECT (the client's address; else BADGER_LISTEN).

``badger serve`` prints one JSON line to stdout when it accepts connections
(``{"event": "ready", "listen": "HOST:PORT", ...}``), logs JSON lines to stderr, and exits 0
after SIGTERM/SIGINT once in-flight requests finished and sessions are checkpointed.
``badger client`` prints each reply body as JSON; a refused request prints
``{"ok": false, "error": {...}}`` and exits 1, an unreachable server exits 3.

Every flag is checked when the command line is parsed (the argparse ``type`` functions
below): a bad value (``--max-frame-mib 0``, ``--idle-timeout nan``, a negative limit) is a
usage error (exit 2, one line naming the flag), never a server that starts and then dies.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import math
import os
import sys
from functools import partial
from pathlib import Path

from ..config import ConfigError

DEFAULT_LISTEN = "127.0.0.1:7878"
MIN_PUBLIC_TOKEN_CHARS = 16  # a token guards a non-loopback listen: at least this long
MiB = 1 << 20


def _env(name: str, default=None):
    v = os.environ.get(name)
    return v if v else default


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- flag types: parse-time checks (argparse turns a ValueError/ArgumentTypeError into exit 2) ----

def _number(text: str, kind=float) -> float:
    try:
        v = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def int_range(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi] (hi None: no upper bound)."""
    def parse(text: str) -> int:
        v = _number(text, int)
        if v < lo or (hi is not None and v > hi):
            span = f"[{lo}, inf)" if hi is None else f"[{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be an integer in {span}, got {v}")
        return v
    parse.__name__ = "integer"
    return parse


def float_range(lo: float, hi: float | None = None, *, lo_open: bool = False):
    """An argparse type: a finite number in [lo, hi] (or (lo, hi] with ``lo_open``)."""
    def parse(text: str) -> float:
        v = _number(text, float)
        if (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
            left = "(" if lo_open else "["
            raise argparse.ArgumentTypeError(f"must be a number in {left}{lo:g}, "
                                             f"{'inf)' if hi is None else f'{hi:g}]'}, got {text}")
        return v
    parse.__name__ = "number"
    return parse


def log_level(text: str) -> str:
    from .telemetry import LEVELS

    if text not in LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LEVELS)}, got {text!r}")
    return text


def listen_address(text: str) -> str:
    from .client import parse_address

    try:
        parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


positive_seconds = float_range(0, 7 * 86400, lo_open=True)
port_number = int_range(0, 65535)


def register(sub):
    from .limits import (ABUSE_COOLDOWN, ABUSE_LIMIT, ABUSE_WINDOW, BUFFER_BUDGET, DRAIN_TIMEOUT, FRAME_TIMEOUT,
                         GC_GEN0_THRESHOLD, IDLE_TIMEOUT, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER, PEER_REQUEST_BURST,
                         PEER_REQUEST_RATE, SEND_TIMEOUT)

    s = sub.add_parser("serve", help="serve agent sessions over TCP (length-prefixed msgpack, docs/protocol.md)")
    s.add_argument("--policy", default=_env("BADGER_POLICY"), help="policies/NAME.onnx (env BADGER_POLICY)")
    s.add_argument("--listen", type=listen_address, default=_env("BADGER_LISTEN", DEFAULT_LISTEN),
                   help="HOST:PORT (env BADGER_LISTEN; default %(default)s; port 0 picks a free one). "
                        f"A non-loopback host needs a token of at least {MIN_PUBLIC_TOKEN_CHARS} characters")
    s.add_argument("--state-dir", default=_env("BADGER_STATE_DIR"),
                   help="session checkpoints; restored at start (env BADGER_STATE_DIR); created 0700, files 0600")
    s.add_argument("--experts", type=int_range(1), default=None, help="experts of a session opened without 'experts'")
    s.add_argument("--token", default=_env("BADGER_TOKEN"),
                   help="clients must send it (env BADGER_TOKEN, preferred: argv is public)")
    s.add_argument("--checkpoint-every", type=int_range(0), default=_env("BADGER_CHECKPOINT_EVERY", "1"),
                   help="checkpoint a session every K steps (1: every step, the kill -9 guarantee; "
                        "0: only on other changes and at shutdown; env BADGER_CHECKPOINT_EVERY)")
    s.add_argument("--no-fsync", action="store_true",
                   help="rename without fsync: survives kill -9 (the kernel has the data), not a power cut")
    s.add_argument("--max-sessions", type=int_range(1, 1 << 20), default=1024)
    s.add_argument("--max-experts", type=int_range(1, 1 << 20), default=1024, help="per session")
    s.add_argument("--max-dims", type=int_range(1, 1 << 16), default=256, help="outputs per session")
    s.add_argument("--candidates", type=int_range(1, 1 << 16), default=None,
                   help="sessions route by top-k over C candidate senders per expert (O(N C), the sharded "
                        "runtime's sparse routing): how a session holds and hot-adds thousands of experts "
                        "(default: the policy's routing; dense routing scores N^2 pairs)")
    s.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="hold each session's agent in its own Ray actor (the 'cluster' extra): a local Ray instance "
                        "(--ray), or the cluster at ADDRESS (e.g. auto, HOST:6379); a killed actor is restarted from "
                        "the session's last state")
    s.add_argument("--k", type=int_range(1, 1 << 16), default=None,
                   help="with --candidates: senders kept per expert (default: the policy's k)")
    s.add_argument("--max-frame-mib", type=float_range(1 / 16, 1024), default=16.0,
                   help="largest frame in MiB, 1/16..1024 (default %(default)s)")
    s.add_argument("--max-connections", type=int_range(1, 1 << 16), default=MAX_CONNECTIONS,
                   help="connections served at once (default %(default)s); past it a few probe slots "
                        "still answer health, the rest get busy")
    s.add_argument("--max-connections-per-peer", type=int_range(0, 1 << 16), default=MAX_CONNECTIONS_PER_PEER,
                   help="connections one peer IP may hold (default %(default)s; 0: no cap; behind a "
                        "proxy every client has the proxy's address)")
    s.add_argument("--idle-timeout", type=positive_seconds, default=IDLE_TIMEOUT,
                   help="close a connection that sends no frame for this long (seconds, default %(default)s)")
    s.add_argument("--frame-timeout", type=positive_seconds, default=FRAME_TIMEOUT,
                   help="a frame must be complete this long after its first byte (seconds, default %(default)s)")
    s.add_argument("--send-timeout", type=positive_seconds, default=SEND_TIMEOUT,
                   help="drop a connection whose reply cannot be written for this long (a peer that does "
                        "not read; seconds, default %(default)s)")
    s.add_argument("--buffer-budget-mib", type=float_range(1 / 16, 1 << 16), default=BUFFER_BUDGET / MiB,
                   help="bytes of large frames (over 64 KiB) buffered over all connections, MiB "
                        "(default %(default)s); at least --max-frame-mib")
    s.add_argument("--abuse-limit", type=int_range(0, 1 << 20), default=ABUSE_LIMIT,
                   help="a peer IP whose connections were refused or closed for abuse (per-peer cap, buffer "
                        "budget, bad frames, frame/send timeout, wrong token) more than this many times within "
                        "--abuse-window is blocked for --abuse-cooldown: its new connections are reset at "
                        "accept (default %(default)s; 0: off)")
    s.add_argument("--abuse-window", type=positive_seconds, default=ABUSE_WINDOW,
                   help="the sliding window of --abuse-limit (seconds, default %(default)s)")
    s.add_argument("--abuse-cooldown", type=positive_seconds, default=ABUSE_COOLDOWN,
                   help="how long a blocked peer IP stays blocked (seconds, default %(default)s)")
    s.add_argument("--peer-request-rate", type=float_range(0, 1e7), default=PEER_REQUEST_RATE,
                   help="requests a second of one peer IP over all its connections; beyond it (and the burst) "
                        "its requests wait for their turn, and its connections are not read meanwhile "
                        "(default %(default)s; 0: off)")
    s.add_argument("--peer-request-burst", type=int_range(1, 1 << 20), default=PEER_REQUEST_BURST,
                   help="requests of one peer IP answered at once before --peer-request-rate applies "
                        "(default %(default)s)")
    s.add_argument("--drain-timeout", type=float_range(0, 86400), default=DRAIN_TIMEOUT,
                   help="on SIGTERM, wait this long for in-flight requests (seconds, default %(default)s)")
    s.add_argument("--threads", type=int_range(1, 1024), default=1, help="onnxruntime intra-op threads")
    s.add_argument("--gc-gen0", type=int_range(1, 1 << 24), default=GC_GEN0_THRESHOLD,
                   help="the garbage collector's first threshold in the server process (gc.set_threshold; "
                        "Python's default is 700; default %(default)s: a collection every 700 net allocations "
                        "put a 3 ms pause in 1 of ~100 steps under load, docs/benchmarks.md)")
    s.add_argument("--metrics-port", type=port_number, default=None,
                   help="serve Prometheus metrics (and /healthz, /readyz) over HTTP on this port (off by "
                        "default; 0 picks a free one; needs the prometheus_client package)")
    s.add_argument("--metrics-host", default="127.0.0.1",
                   help="address of the metrics endpoint (default %(default)s: loopback only)")
    s.add_argument("--log-level", type=log_level, default=_env("BADGER_LOG_LEVEL", "info"),
                   help="debug, info, warning or error (env BADGER_LOG_LEVEL)")
    s.set_defaults(fn=cmd_serve)

    c = sub.add_parser("client", help="send one request to a running `badger serve`; prints JSON")
    c.add_argument("--connect", default=_env("BADGER_CONNECT", _env("BADGER_LISTEN", DEFAULT_LISTEN)),
                   help="HOST:PORT (env BADGER_CONNECT or BADGER_LISTEN)")
    c.add_argument("--token", default=_env("BADGER_TOKEN"))
    c.add_argument("--secret", default=_env("BADGER_SESSION_SECRET"),
                   help="the session's secret (printed by `client open`; env BADGER_SESSION_SECRET): every "
                        "request on a session but health must carry it. Default: the one `client open` kept for "
                        "this server and session (in BADGER_SECRETS_FILE, or ~/.local/state/badger/"
                        "session-secrets.json, 0600)")
    c.add_argument("--timeout", type=positive_seconds, default=30.0)
    cs = c.add_subparsers(dest="op", required=True)
    o = cs.add_parser("open", help="open a session")
    o.add_argument("--dims", type=int, default=None)
    o.add_argument("--experts", type=int, default=None)
    o.add_argument("--seed", type=int, default=None)
    o.add_argument("--rounds", type=int, default=None)
    o.add_argument("--session", default=None, help="a name (default: the server picks one)")
    o.add_argument("--resume", action="store_true", help="attach to the session if it exists")
    o.add_argument("--from-snapshot", default=None, help="a file written by `client snapshot --out`")
    o.add_argument("--task", default=None, help="the task whose interface the session gets (default: the policy's)")
    o.add_argument("--no-keep-secret", action="store_true",
                   help="do not keep the new session's secret in the secrets file (it is printed either way)")
    o.add_argument("--past-horizon", action="store_true",
                   help="let the session step an episodic policy past its horizon (the card's lifetime)")
    r = cs.add_parser("reset", help="start a new episode")
    r.add_argument("session")
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--experts", type=int, default=None)
    r.add_argument("--dims", type=int, default=None)
    st = cs.add_parser("step", help="one inner step")
    st.add_argument("session")
    st.add_argument("--observation", default=None, help="comma-separated: the previous outputs")
    st.add_argument("--feedback", default=None, help="comma-separated: 1 or d values")
    st.add_argument("--slots", default=None, help="comma-separated: observation and feedback in one")
    st.add_argument("--expect-t", type=int, default=None, help="refuse unless the session is at this step t")
    st.add_argument("--arm", type=int, default=None, help="bandit sessions: the arm the feedback is about")
    st.add_argument("--part", action="append", default=[], metavar="NAME=V1,V2,...",
                    help="an input part by its name (the session's `parts`: e.g. a bandit's pulled=..., a task of "
                         "your own's); repeat for each")
    a = cs.add_parser("add", help="add experts")
    a.add_argument("session")
    a.add_argument("--n", type=int, default=1)
    a.add_argument("--init", default=None, choices=["clone", "fresh"],
                   help="default: clones, or fresh experts where the policy's card says clones hurt and they do not")
    a.add_argument("--allow-harmful-growth", action="store_true",
                   help="fresh experts even for a policy whose card says they make it worse")
    a.add_argument("--source", type=int, default=None)
    rm = cs.add_parser("remove", help="remove experts")
    rm.add_argument("session")
    rm.add_argument("--indices", required=True, help="comma-separated expert indices")
    sn = cs.add_parser("snapshot", help="the session's record (checkpoint contents)")
    sn.add_argument("session")
    sn.add_argument("--out", default=None, help="write it as a checkpoint file instead of printing it")
    s2 = cs.add_parser("stats", help="server stats, or one session's")
    s2.add_argument("session", nargs="?", default=None)
    cl = cs.add_parser("close", help="close a session (deletes its checkpoint)")
    cl.add_argument("session")
    cs.add_parser("health", help="liveness and readiness")
    c.set_defaults(fn=cmd_client)


# ---- serve -------------------------------------------------------------------------------

def _raise_open_files_limit(needed: int, log) -> None:
    """Each connection is a file descriptor: lift the soft RLIMIT_NOFILE towards the hard one
    so --max-connections can be reached (logged when it cannot)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target < needed:
        log("warning", "open_files_limit", soft=target, needed=needed,
            hint="raise `ulimit -n`: connections past it are refused by the kernel")


def cmd_serve(args):
    from .client import parse_address

    if not args.policy:
        raise ConfigError("--policy (or BADGER_POLICY) is required")
    if not args.state_dir:
        raise ConfigError("--state-dir (or BADGER_STATE_DIR) is required")
    try:
        host, port = parse_address(args.listen)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not is_loopback(host):
        if not args.token:
            raise ConfigError(f"listening on {host} (not loopback) needs a token: set BADGER_TOKEN or --token")
        if len(args.token) < MIN_PUBLIC_TOKEN_CHARS:
            raise ConfigError(f"listening on {host} (not loopback) needs a token of at least "
                              f"{MIN_PUBLIC_TOKEN_CHARS} characters (got {len(args.token)}); e.g. "
                              f"python -c 'import secrets; print(secrets.token_urlsafe(24))'")
    if args.token is not None and len(args.token) > 4096:
        raise ConfigError("--token is longer than 4096 characters (the protocol's limit)")
    if args.experts is not None and args.experts > args.max_experts:
        raise ConfigError(f"--experts {args.experts} is more than --max-experts {args.max_experts}")
    if args.buffer_budget_mib < args.max_frame_mib:
        raise ConfigError(f"--buffer-budget-mib {args.buffer_budget_mib:g} must be at least --max-frame-mib "
                          f"{args.max_frame_mib:g} (one frame of the largest size must fit)")
    exporter_cls = None
    if args.metrics_port is not None:
        from .telemetry import MetricsUnavailable, PrometheusEndpoint

        try:
            PrometheusEndpoint.check_available()
        except MetricsUnavailable as e:
            raise ConfigError(str(e)) from None
        exporter_cls = PrometheusEndpoint

    import trio

    from ..policy_card import load_policy
    from .protocol import DecodeLimits
    from .server import PROBE_SLOTS, Server
    from .sessions import Limits, SessionManager
    from .store import SessionStore
    from .telemetry import JsonLog, route_python_logs

    log = JsonLog(sys.stderr, args.log_level)
    route_python_logs(log)  # numpy warnings and library logging become JSON lines too
    _raise_open_files_limit(args.max_connections + PROBE_SLOTS + 64, log)
    policy = load_policy(args.policy, threads=args.threads)  # PolicyError: exit 2 with the reason
    if policy.retired:
        log("warning", "policy_retired", policy=policy.name, note=policy.retired)
    agent_config = policy.agent
    if args.candidates is not None:
        import dataclasses

        routing = dataclasses.replace(policy.agent.routing, kind="topk", candidates=args.candidates,
                                      k=args.k or policy.agent.routing.k)
        agent_config = dataclasses.replace(policy.agent, routing=routing).validate()
    elif args.k is not None:
        raise ConfigError("--k goes with --candidates")
    try:
        store = SessionStore(args.state_dir, fsync=not args.no_fsync)
    except OSError as e:  # a file where the folder should be, no permission, ...
        raise ConfigError(f"--state-dir {args.state_dir}: cannot use it as the state folder: {e}") from None
    placement = None
    if args.ray is not None:
        from ..cluster.sessions import RayPlacement

        placement = RayPlacement(policy, agent_config, address=None if args.ray == "local" else args.ray, log=log)
        log("info", "ray_placement", **placement.describe())
    manager = SessionManager(policy, store, limits=Limits(max_sessions=args.max_sessions,
                                                          max_experts=args.max_experts, max_dims=args.max_dims),
                             default_experts=args.experts, checkpoint_every=args.checkpoint_every, log=log,
                             agent_config=agent_config, placement=placement)
    restored = manager.restore_all()
    max_frame = int(args.max_frame_mib * MiB)
    server = Server(manager, token=args.token, idle_timeout=args.idle_timeout, drain_timeout=args.drain_timeout,
                    max_frame_bytes=max_frame, max_connections=args.max_connections,
                    max_connections_per_peer=args.max_connections_per_peer, frame_timeout=args.frame_timeout,
                    send_timeout=args.send_timeout, buffer_budget=int(args.buffer_budget_mib * MiB),
                    abuse_limit=args.abuse_limit, abuse_window=args.abuse_window,
                    abuse_cooldown=args.abuse_cooldown, peer_request_rate=args.peer_request_rate,
                    peer_request_burst=args.peer_request_burst,
                    decode_limits=DecodeLimits(max_bin_len=max_frame, max_array_len=max(65536, args.max_experts),
                                               max_items=max(1 << 17, 2 * args.max_experts + 1024)), log=log)
    endpoint = None
    if exporter_cls is not None:
        try:
            endpoint = exporter_cls(manager, server, args.metrics_host, args.metrics_port)
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {e}") from None
        log("info", "metrics_listening", address=endpoint.address)

    async def main():
        async with trio.open_nursery() as nursery:
            try:
                addrs = await nursery.start(partial(server.run, host, port, handle_signals=True))
            except OSError as e:  # the address is in use, not ours, ...
                raise ConfigError(f"cannot listen on {args.listen}: {e}") from None
            h, p = addrs[0]
            ready = {"event": "ready", "listen": f"[{h}]:{p}" if ":" in h else f"{h}:{p}",
                     "pid": os.getpid(), "policy": policy.name, "state_dir": str(args.state_dir),
                     "sessions": len(manager.sessions), "restored": restored["restored"],
                     "rejected": [r["session"] for r in restored["rejected"]],
                     "kept": [r["session"] for r in restored["kept"]]}
            if endpoint is not None:
                ready["metrics"] = endpoint.address
            print(json.dumps(ready), flush=True)

    try:
        gc.set_threshold(args.gc_gen0, *gc.get_threshold()[1:])
        trio.run(main)
    finally:
        if endpoint is not None:
            endpoint.close()


# ---- client ------------------------------------------------------------------------------

def _floats(text: str | None):
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None


def _jsonable(x):
    import numpy as np

    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (bytes, bytearray)):
        return x.hex()
    return str(x)


def _parts(items: list[str]) -> dict:
    """--part NAME=V1,V2,... (repeated) as {NAME: [floats]}."""
    from ..config import ConfigError

    out = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--part {item!r} is not of the form NAME=V1,V2,...")
        out[name] = _floats(values)
    return out


def _keep(kept, address: str, session: str, secret: str):
    try:
        kept.put(address, session, secret)
    except OSError as e:  # the session is open either way: its secret is in the printed reply
        print(f"badger: warning: could not keep the session's secret in {kept.path}: {e}; pass it with --secret",
              file=sys.stderr)


def cmd_client(args):
    from .client import Client, ServerError
    from .client_secrets import SecretsFile
    from .store import StoreError, decode, encode

    try:
        client = Client(args.connect, token=args.token, timeout=args.timeout)
    except (OSError, ValueError) as e:
        print(f"badger: error: cannot connect to {args.connect}: {e}", file=sys.stderr)
        raise SystemExit(3)
    op = args.op
    session = getattr(args, "session", None)
    kept = SecretsFile()
    secret = args.secret or (kept.get(args.connect, session) if session and (op != "open" or args.resume) else None)
    if secret and session:
        client.secrets[session] = secret
    try:
        with client:
            if op == "open":
                snap = None
                if args.from_snapshot:
                    try:
                        snap = decode(Path(args.from_snapshot).read_bytes())
                    except (StoreError, OSError) as e:
                        print(f"badger: error: --from-snapshot {args.from_snapshot}: {e}", file=sys.stderr)
                        raise SystemExit(2) from None
                out = client.open(args.dims, args.experts, args.seed, session=args.session, rounds=args.rounds,
                                  resume=args.resume, snapshot=snap, task=args.task, past_horizon=args.past_horizon,
                                  secret=secret if args.resume else None)
                if out.get("secret") and not args.no_keep_secret:
                    _keep(kept, args.connect, out["session"], out["secret"])
            elif op == "reset":
                out = client.reset(args.session, seed=args.seed, experts=args.experts, dims=args.dims)
            elif op == "step":
                out = client.step(args.session, _floats(args.observation), _floats(args.feedback),
                                  slots=_floats(args.slots), t=args.expect_t, arm=args.arm, parts=_parts(args.part))
            elif op == "add":
                out = client.add_experts(args.session, args.n, args.init, args.source, args.allow_harmful_growth)
            elif op == "remove":
                out = client.remove_experts(args.session, [int(float(i)) for i in _floats(args.indices)])
            elif op == "snapshot":
                out = client.snapshot(args.session)
                if args.out:
                    data = encode(out["record"])
                    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # a session's state
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                    out = {"session": args.session, "t": out["record"]["agent"]["t"], "out": args.out,
                           "bytes": len(data)}
            elif op == "stats":
                out = client.stats(args.session)
            elif op == "close":
                out = client.close_session(args.session)
                kept.forget(args.connect, args.session)
            else:
                out = client.health()
    except ServerError as e:
        print(json.dumps({"ok": False, "error": {"code": e.code, "message": e.message}}))
        raise SystemExit(1)
    except OSError as e:
        print(f"badger: error: {args.connect}: {e}", file=sys.stderr)
        raise SystemExit(3)
    print(json.dumps(out, default=_jsonable))

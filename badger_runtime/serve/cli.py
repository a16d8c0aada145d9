"""``badger serve`` and ``badger client ...``.

Flags fall back to the environment: BADGER_POLICY, BADGER_LISTEN, BADGER_STATE_DIR,
BADGER_TOKEN (prefer it to --token: a command line is visible to every local user),
BADGER_CONNECT (the client's address; else BADGER_LISTEN).

``badger serve`` prints one JSON line to stdout when it accepts connections
(``{"event": "ready", "listen": "HOST:PORT", ...}``), logs JSON lines to stderr, and exits 0
after SIGTERM/SIGINT once in-flight requests finished and sessions are checkpointed.
``badger client`` prints each reply body as JSON; a refused request prints
``{"ok": false, "error": {...}}`` and exits 1, an unreachable server exits 3.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from functools import partial
from pathlib import Path

from ..config import ConfigError

DEFAULT_LISTEN = "127.0.0.1:7878"


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


def register(sub):
    s = sub.add_parser("serve", help="serve agent sessions over TCP (length-prefixed msgpack, docs/protocol.md)")
    s.add_argument("--policy", default=_env("BADGER_POLICY"), help="policies/NAME.onnx (env BADGER_POLICY)")
    s.add_argument("--listen", default=_env("BADGER_LISTEN", DEFAULT_LISTEN),
                   help="HOST:PORT (env BADGER_LISTEN; default %(default)s; port 0 picks a free one). "
                        "A non-loopback host needs a token")
    s.add_argument("--state-dir", default=_env("BADGER_STATE_DIR"),
                   help="session checkpoints; restored at start (env BADGER_STATE_DIR)")
    s.add_argument("--experts", type=int, default=None, help="experts of a session opened without 'experts'")
    s.add_argument("--token", default=_env("BADGER_TOKEN"),
                   help="clients must send it (env BADGER_TOKEN, preferred: argv is public)")
    s.add_argument("--checkpoint-every", type=int, default=int(_env("BADGER_CHECKPOINT_EVERY", "1")),
                   help="checkpoint a session every K steps (1: every step, the kill -9 guarantee; "
                        "0: only on other changes and at shutdown)")
    s.add_argument("--no-fsync", action="store_true",
                   help="rename without fsync: survives kill -9 (the kernel has the data), not a power cut")
    s.add_argument("--max-sessions", type=int, default=1024)
    s.add_argument("--max-experts", type=int, default=1024, help="per session")
    s.add_argument("--max-frame-mib", type=float, default=16.0)
    s.add_argument("--idle-timeout", type=float, default=300.0, help="close a silent connection after this")
    s.add_argument("--drain-timeout", type=float, default=20.0, help="on SIGTERM, wait this long for in-flight")
    s.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    s.add_argument("--log-level", default=_env("BADGER_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    s.set_defaults(fn=cmd_serve)

    c = sub.add_parser("client", help="send one request to a running `badger serve`; prints JSON")
    c.add_argument("--connect", default=_env("BADGER_CONNECT", _env("BADGER_LISTEN", DEFAULT_LISTEN)),
                   help="HOST:PORT (env BADGER_CONNECT or BADGER_LISTEN)")
    c.add_argument("--token", default=_env("BADGER_TOKEN"))
    c.add_argument("--timeout", type=float, default=30.0)
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
    a = cs.add_parser("add", help="add experts")
    a.add_argument("session")
    a.add_argument("--n", type=int, default=1)
    a.add_argument("--init", default="clone", choices=["clone", "fresh"])
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
    if not is_loopback(host) and not args.token:
        raise ConfigError(f"listening on {host} (not loopback) needs a token: set BADGER_TOKEN or --token")
    if args.checkpoint_every < 0 or args.max_sessions < 1 or args.max_experts < 1:
        raise ConfigError("--checkpoint-every must be >= 0, --max-sessions and --max-experts >= 1")

    import trio

    from ..policy_card import load_policy
    from .server import Server
    from .sessions import Limits, SessionManager
    from .store import SessionStore
    from .telemetry import JsonLog

    log = JsonLog(sys.stderr, args.log_level)
    policy = load_policy(args.policy, threads=args.threads)  # PolicyError: exit 2 with the reason
    store = SessionStore(args.state_dir, fsync=not args.no_fsync)
    manager = SessionManager(policy, store, limits=Limits(max_sessions=args.max_sessions,
                                                          max_experts=args.max_experts),
                             default_experts=args.experts, checkpoint_every=args.checkpoint_every, log=log)
    restored = manager.restore_all()
    server = Server(manager, token=args.token, idle_timeout=args.idle_timeout, drain_timeout=args.drain_timeout,
                    max_frame_bytes=int(args.max_frame_mib * (1 << 20)), log=log)

    async def main():
        async with trio.open_nursery() as nursery:
            try:
                addrs = await nursery.start(partial(server.run, host, port, handle_signals=True))
            except OSError as e:  # the address is in use, not ours, ...
                raise ConfigError(f"cannot listen on {args.listen}: {e}") from None
            h, p = addrs[0]
            print(json.dumps({"event": "ready", "listen": f"[{h}]:{p}" if ":" in h else f"{h}:{p}",
                              "pid": os.getpid(), "policy": policy.name, "state_dir": str(args.state_dir),
                              "sessions": len(manager.sessions), "restored": restored["restored"],
                              "rejected": [r["session"] for r in restored["rejected"]]}), flush=True)

    trio.run(main)


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


def cmd_client(args):
    from .client import Client, ServerError
    from .store import decode, encode

    try:
        client = Client(args.connect, token=args.token, timeout=args.timeout)
    except (OSError, ValueError) as e:
        print(f"badger: error: cannot connect to {args.connect}: {e}", file=sys.stderr)
        raise SystemExit(3)
    op = args.op
    try:
        with client:
            if op == "open":
                snap = decode(Path(args.from_snapshot).read_bytes()) if args.from_snapshot else None
                out = client.open(args.dims, args.experts, args.seed, session=args.session, rounds=args.rounds,
                                  resume=args.resume, snapshot=snap, task=args.task)
            elif op == "reset":
                out = client.reset(args.session, seed=args.seed, experts=args.experts, dims=args.dims)
            elif op == "step":
                out = client.step(args.session, _floats(args.observation), _floats(args.feedback),
                                  slots=_floats(args.slots), t=args.expect_t, arm=args.arm)
            elif op == "add":
                out = client.add_experts(args.session, args.n, args.init, args.source)
            elif op == "remove":
                out = client.remove_experts(args.session, [int(float(i)) for i in _floats(args.indices)])
            elif op == "snapshot":
                out = client.snapshot(args.session)
                if args.out:
                    data = encode(out["record"])
                    Path(args.out).write_bytes(data)
                    out = {"session": args.session, "t": out["record"]["agent"]["t"], "out": args.out,
                           "bytes": len(data)}
            elif op == "stats":
                out = client.stats(args.session)
            elif op == "close":
                out = client.close_session(args.session)
            else:
                out = client.health()
    except ServerError as e:
        print(json.dumps({"ok": False, "error": {"code": e.code, "message": e.message}}))
        raise SystemExit(1)
    except OSError as e:
        print(f"badger: error: {args.connect}: {e}", file=sys.stderr)
        raise SystemExit(3)
    print(json.dumps(out, default=_jsonable))

"""`badger bench ...`: speed and memory benchmarks (results are printed as JSON; docs/benchmarks.md
records them with the command that produced them)."""

from __future__ import annotations

import json
import sys

from ..cli.common import note_retired


def _ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.replace("_", "").split(",") if v]


def cmd_bench_train(args):
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
    else:
        from ..config import ConfigError
        from .train import bench_train

        if min(_ints(args.experts) + _ints(args.steps) + [args.batch, args.repeats]) < 1:
            raise ConfigError("--experts, --steps, --batch and --repeats must be >= 1")
        report = bench_train(experts=_ints(args.experts), steps=_ints(args.steps), batch=args.batch,
                             repeats=args.repeats, threads=args.threads, seed=args.seed, routing=args.routing,
                             k=args.k, candidates=args.candidates, reference=not args.no_reference)
    if args.plot:
        plot_train(report, args.plot)
    print(json.dumps(report))


def plot_train(report: dict, path):
    """Training throughput against N, one line per inner-step count."""
    from ..demo.figures import subplots

    fig, axes = subplots(1, 2, figsize=(10, 4))
    for T in sorted({r["steps"] for r in report["rows"]}):
        rs = sorted((r for r in report["rows"] if r["steps"] == T), key=lambda r: r["experts"])
        n = [r["experts"] for r in rs]
        axes[0].plot(n, [r["expert_steps_per_s"] for r in rs], "o-", label=f"T = {T} inner steps")
        axes[1].plot(n, [r["sec_per_batch"] for r in rs], "o-", label=f"T = {T} inner steps")
    axes[0].set_ylabel("expert-steps / s (episodes x N x T / s)")
    axes[1].set_ylabel("seconds per training batch")
    for ax in axes:
        ax.legend(fontsize=8)
    rows = report["rows"]
    b = rows[0]["batch"] if rows else "?"
    c = max((r.get("candidates", 0) for r in rows), default=0)
    route = (f"top-{rows[0].get('k')} of C = {c} candidate senders (O(N C))" if c else
             f"{rows[0].get('routing', 'dense') if rows else 'dense'} routing (O(N^2))")
    _save_loglog(fig, axes, path, "experts N",
                 f"badger bench train: batch {b}, {route}, torch {report.get('torch')}, {report.get('threads')} thread(s)")


def _save_loglog(fig, axes, path, xlabel: str, title: str):
    """Log-log axes, grid, title, and the PNG written to ``path`` (the bench figures' common end)."""
    from ..demo.figures import save_png

    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


# ---- bench runtime ------------------------------------------------------------------------------------

def cmd_bench_runtime(args):
    from .runtime import (
        RuntimeBench,
        bench_runtime,
        growth,
        markdown_table,
        plot_runtime,
    )

    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        report.setdefault("growth", growth(report["rows"]))
    else:
        note_retired(args.policy)
        spec = RuntimeBench(
            policy=args.policy, experts=_ints(args.experts), engines=[e for e in args.engines.split(",") if e],
            routing=args.routing, k=args.k, candidates=args.candidates, candidates_above=args.candidates_above,
            degree=args.degree, rounds=args.rounds, dims=args.dims, steps=args.steps, warmup=args.warmup,
            seed=args.seed, threads=args.threads, blas_threads=args.blas_threads, shards=args.shards, tile=args.tile,
            policy_chunk=args.policy_chunk, encode=args.encode,
            route_threads={"auto": None, "on": True, "off": False}[args.route_threads],
            route_kernel={"auto": None, "on": True, "off": False}[args.route_kernel],
            actor_encode=not args.actor_no_encode,
            actor_max_n=args.actor_max_n, max_seconds=args.max_seconds, memory=not args.no_memory,
            isolate=not args.in_process, ray_nodes=args.ray_nodes, ray_address=args.ray,
            ray_object_store_mib=args.ray_object_store_mib)
        log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        report = bench_runtime(spec, log=log)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot_runtime(report, args.plot)
    print(markdown_table(report) if args.markdown else json.dumps(report))


def _add_runtime(bsub):
    from ..config import ROUTINGS
    from .runtime import DEFAULT_ENGINES, DEFAULT_POLICY, ENGINES

    r = bsub.add_parser("runtime", help="expert-steps/s, messages/s and memory vs N: batched engine, sharded "
                                        "actor runtime (fast path), per-expert actors, side by side")
    r.add_argument("--experts", default="10,100,1000,10000,100000", help="comma-separated N values")
    r.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                   help=f"comma-separated, of {', '.join(ENGINES)} (ray: the 'cluster' extra)")
    r.add_argument("--routing", default="topk", choices=ROUTINGS)
    r.add_argument("--k", type=int, default=8, help="top-k: senders kept per receiver")
    r.add_argument("--candidates", type=int, default=32, help="top-k: senders scored per receiver when N > "
                                                              "--candidates-above (O(N C) instead of O(N^2))")
    r.add_argument("--candidates-above", type=int, default=1000)
    r.add_argument("--degree", type=int, default=4, help="random graph: senders per receiver")
    r.add_argument("--rounds", type=int, default=4, help="communication rounds per inner step (fixed rule)")
    r.add_argument("--dims", type=int, default=3)
    r.add_argument("--steps", type=int, default=3, help="timed inner steps per engine and N")
    r.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--policy", default=DEFAULT_POLICY)
    r.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    r.add_argument("--blas-threads", type=int, default=1, help="OPENBLAS/OMP/MKL_NUM_THREADS of the measuring "
                                                               "processes")
    r.add_argument("--shards", type=int, default=None, help="sharded: shard actors (default: one per core)")
    r.add_argument("--tile", type=int, default=4096, help="sharded: receivers routed at once")
    r.add_argument("--policy-chunk", type=int, default=4096, help="sharded: rows per onnxruntime call (0: one call)")
    r.add_argument("--encode", action="store_true", help="sharded: msgpack-encode the shard messages")
    r.add_argument("--route-threads", choices=("auto", "on", "off"), default="auto",
                   help="sharded: route each shard in a worker thread (auto: when a shard holds >= 16,384 rows)")
    r.add_argument("--route-kernel", choices=("auto", "on", "off"), default="auto",
                   help="sharded: route listed senders with the compiled kernel (auto: when a shard holds >= 16,384 "
                        "experts and a C compiler is found)")
    r.add_argument("--actor-no-encode", action="store_true", help="per-expert actors: pass Message objects")
    r.add_argument("--actor-max-n", type=int, default=1000, help="per-expert actors only up to this N")
    r.add_argument("--max-seconds", type=float, default=60.0, help="per engine and N: stop timing after this")
    r.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    r.add_argument("--in-process", action="store_true", help="time in this process (no subprocess per N)")
    r.add_argument("--ray-nodes", type=int, default=1, help="ray: local Ray nodes started side by side (each with "
                                                            "cores / K CPUs; shards spread over them)")
    r.add_argument("--ray", default=None, metavar="ADDRESS", help="ray: join this cluster instead (e.g. auto)")
    r.add_argument("--ray-object-store-mib", type=int, default=0, help="ray: each local node's object store "
                                                                       "(0: Ray's default)")
    r.add_argument("--out", default=None, help="also write the JSON report here")
    r.add_argument("--plot", default=None, help="write the figure (PNG) here")
    r.add_argument("--from-json", default=None, help="re-plot / re-tabulate a saved report instead of running")
    r.add_argument("--markdown", action="store_true", help="print a markdown table instead of JSON")
    r.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    r.add_argument("--json", action="store_true", help="(output is JSON unless --markdown)")
    r.set_defaults(fn=cmd_bench_runtime)


# ---- bench serve ------------------------------------------------------------------------------------

def bench_serve(policy: str, experts: list[int], clients: int = 4, steps: int = 200, dims: int = 3, rounds: int = 4,
                checkpoint_every: int = 1, fsync: bool = True, threads: int = 1, blas_threads: int | None = 1,
                log=None) -> dict:
    """Step latency (p50/p99, client side) and throughput of `badger serve` for each N: a fresh
    server per N (``serve.load.start_server``), C clients x S steps (its ``run``). The server
    runs with ``OPENBLAS_NUM_THREADS`` etc. = ``blas_threads`` (None: as inherited): on 2 shared
    cores a 2-thread BLAS made N = 1000 steps ~3x slower."""
    import os

    from ..config import ConfigError
    from ..policy_card import resolve_policy
    from ..serve import load
    from .runtime import machine

    if clients < 1 or steps < 1 or any(n < 1 for n in experts):
        raise ConfigError("--clients, --steps and every N must be >= 1")
    log = log or (lambda *a: None)
    policy = str(resolve_policy(policy))
    rows = []
    blas_keys = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in blas_keys}
    if blas_threads is not None:  # the server process inherits them
        os.environ.update({k: str(blas_threads) for k in blas_keys})
    try:
        for n in experts:
            log(f"N = {n:,}: {clients} clients x {steps} steps")
            rows.append(_serve_one(load, policy, n, clients, steps, dims, rounds, checkpoint_every, fsync, threads))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"bench": "serve", "policy": policy, "machine": machine(), "blas_threads": blas_threads, "rows": rows}


def _serve_one(load, policy, n, clients, steps, dims, rounds, checkpoint_every, fsync, threads) -> dict:
    """One fresh server (load.start_server) and load.run's clients against it."""
    import argparse
    import os
    import tempfile

    import trio

    extra = ["--checkpoint-every", str(checkpoint_every), "--max-experts", str(max(n, 1)),
             "--threads", str(threads)] + ([] if fsync else ["--no-fsync"])
    with tempfile.TemporaryDirectory(prefix="badger-bench-serve-") as state:
        proc, address = load.start_server(policy, state, extra)
        try:
            args = argparse.Namespace(clients=clients, steps=steps, experts=n, dims=dims, rounds=rounds)
            return trio.run(load.run, address, os.environ.get("BADGER_TOKEN"), args)
        finally:
            proc.terminate()
            proc.wait(30)


def plot_serve(report: dict, path):
    from ..demo.figures import subplots

    rows = sorted(report["rows"], key=lambda r: r["experts"])
    n = [r["experts"] for r in rows]
    fig, axes = subplots(1, 2, figsize=(10, 4))
    axes[0].plot(n, [r["p50_ms"] for r in rows], "o-", label="p50")
    axes[0].plot(n, [r["p99_ms"] for r in rows], "s-", label="p99")
    axes[0].set_ylabel("step latency, client side (ms)")
    axes[1].plot(n, [r["steps_per_s"] for r in rows], "o-", color="tab:green")
    axes[1].set_ylabel("steps / s (all clients)")
    axes[0].legend()
    r0 = rows[0] if rows else {}
    _save_loglog(fig, axes, path, "experts N per session",
                 f"badger bench serve: {r0.get('clients')} clients, {r0.get('rounds')} rounds, d = {r0.get('dims')}")


def cmd_bench_serve(args):
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
    else:
        log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        note_retired(args.policy)
        report = bench_serve(args.policy, _ints(args.experts), clients=args.clients, steps=args.steps, dims=args.dims,
                             rounds=args.rounds, checkpoint_every=args.checkpoint_every, fsync=not args.no_fsync,
                             threads=args.threads, blas_threads=args.blas_threads, log=log)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot_serve(report, args.plot)
    if args.markdown:
        print("| N | clients x steps | rounds | steps/s | p50 ms | p99 ms | server step p50 ms | server step p99 ms |")
        print("|---|---|---|---|---|---|---|---|")
        for r in report["rows"]:
            print(f"| {r['experts']:,} | {r['clients']} x {r['steps']} | {r['rounds']} | {r['steps_per_s']} | "
                  f"{r['p50_ms']} | {r['p99_ms']} | {r['server_step_p50_ms']} | {r['server_step_p99_ms']} |")
    else:
        print(json.dumps(report))


def _add_serve(bsub):
    from .runtime import DEFAULT_POLICY

    s = bsub.add_parser("serve", help="step latency p50/p99 and throughput through `badger serve` vs N "
                                      "(wraps demos/load.py: a fresh server per N)")
    s.add_argument("--policy", default=DEFAULT_POLICY)
    s.add_argument("--experts", default="10,100,1000", help="comma-separated N values (the policy's own routing)")
    s.add_argument("--clients", type=int, default=4)
    s.add_argument("--steps", type=int, default=200, help="steps per client")
    s.add_argument("--dims", type=int, default=3)
    s.add_argument("--rounds", type=int, default=4)
    s.add_argument("--checkpoint-every", type=int, default=1, help="passed to the server (0: only at shutdown)")
    s.add_argument("--no-fsync", action="store_true", help="passed to the server")
    s.add_argument("--threads", type=int, default=1, help="the server's onnxruntime threads")
    s.add_argument("--blas-threads", type=int, default=1, help="the server's OPENBLAS/OMP/MKL_NUM_THREADS")
    s.add_argument("--out", default=None)
    s.add_argument("--plot", default=None)
    s.add_argument("--from-json", default=None)
    s.add_argument("--markdown", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--json", action="store_true", help="(output is JSON unless --markdown)")
    s.set_defaults(fn=cmd_bench_serve)


# ---- bench es ---------------------------------------------------------------------------------------

def cmd_bench_es(args):
    from ..config import load_experiment
    from .es import bench_es, horizon_memory

    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    report = {}
    if not args.memory_only:
        cfg = load_experiment(args.config, args.set)
        report = bench_es(cfg, workers=_ints(args.workers), generations=args.generations, warmup=args.warmup,
                          ray_address=args.ray, log=log)
    if args.horizons:
        report["horizon_memory"] = horizon_memory(args.config, args.set, horizons=_ints(args.horizons), log=log)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report))


def _add_es(bsub):
    e = bsub.add_parser("es", help="evolution strategies: generations/s against Ray workers; ES and BPTT memory "
                                   "against the horizon")
    e.add_argument("config", nargs="?", default=None, help="TOML config (the [train.es] settings; see configs/)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (0: this process)")
    e.add_argument("--generations", type=int, default=5, help="timed generations per worker count")
    e.add_argument("--warmup", type=int, default=1)
    e.add_argument("--ray", default=None, metavar="ADDRESS", help="join this Ray cluster (default: a local one)")
    e.add_argument("--horizons", default="", help="also: peak memory of one ES generation and one BPTT batch at "
                                                  "these episode lengths (comma-separated)")
    e.add_argument("--memory-only", action="store_true", help="only the --horizons memory rows")
    e.add_argument("--out", default=None)
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--json", action="store_true", help="(output is always JSON)")
    e.set_defaults(fn=cmd_bench_es)


def register(sub):
    b = sub.add_parser("bench", help="benchmarks: train, runtime, serve, es")
    bsub = b.add_subparsers(dest="bench", required=True)
    t = bsub.add_parser("train", help="training samples/s vs number of experts and inner steps (needs torch)")
    t.add_argument("--experts", default="5,20,40,80", help="comma-separated N values")
    t.add_argument("--steps", default="10,20,40", help="comma-separated inner-step counts")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--routing", default="dense", choices=("dense", "topk"),
                   help="dense attention (O(N^2)) or top-k (with --candidates C: O(N C), the runtimes' sparse math)")
    t.add_argument("--k", type=int, default=8, help="top-k: senders kept per receiver")
    t.add_argument("--candidates", type=int, default=0, help="top-k: senders scored per receiver (0: all N)")
    t.add_argument("--no-reference", action="store_true", help="skip the 2019 setting's row (and fraction_of_limit)")
    t.add_argument("--plot", default=None, help="write the figure (PNG) here")
    t.add_argument("--from-json", default=None, help="re-plot a saved report instead of running")
    t.add_argument("--json", action="store_true", help="(output is always JSON)")
    t.set_defaults(fn=cmd_bench_train)
    _add_runtime(bsub)
    _add_serve(bsub)
    _add_es(bsub)
    return bsub

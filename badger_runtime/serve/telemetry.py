"""Counters, latency histograms with fixed buckets, and structured (JSON lines) logs.

Both are thread-safe: the server updates them from the trio thread and from the worker
threads that run steps. No dependencies beyond the standard library.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from typing import Any, TextIO

# Upper bounds of the latency buckets in milliseconds (the last bucket is everything above).
BUCKETS_MS: tuple[float, ...] = (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class Histogram:
    """Counts of observations per fixed bucket (``counts[i]``: ``le_ms[i-1] < x <= le_ms[i]``;
    the last count is everything above the last bound), with their count and sum."""

    __slots__ = ("counts", "count", "sum_ms", "max_ms")

    def __init__(self):
        self.counts = [0] * (len(BUCKETS_MS) + 1)
        self.count = 0
        self.sum_ms = 0.0
        self.max_ms = 0.0

    def observe(self, ms: float):
        i = 0
        while i < len(BUCKETS_MS) and ms > BUCKETS_MS[i]:
            i += 1
        self.counts[i] += 1
        self.count += 1
        self.sum_ms += ms
        self.max_ms = max(self.max_ms, ms)

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile (the max for the overflow bucket)."""
        if not self.count:
            return None
        rank, seen = q * self.count, 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return BUCKETS_MS[i] if i < len(BUCKETS_MS) else self.max_ms
        return self.max_ms

    def to_dict(self) -> dict:
        return {"le_ms": list(BUCKETS_MS), "counts": list(self.counts), "count": self.count,
                "sum_ms": round(self.sum_ms, 3), "max_ms": round(self.max_ms, 3),
                "p50_ms": self.quantile(0.5), "p99_ms": self.quantile(0.99)}


class Metrics:
    """Named counters and per-name latency histograms."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self.histograms: dict[str, Histogram] = {}

    def inc(self, name: str, n: int = 1):
        with self._lock:
            self.counters[name] += n

    def observe(self, name: str, seconds: float):
        with self._lock:
            h = self.histograms.get(name)
            if h is None:
                h = self.histograms[name] = Histogram()
            h.observe(seconds * 1e3)

    def to_dict(self) -> dict:
        with self._lock:
            return {"counters": dict(sorted(self.counters.items())),
                    "latency_ms": {k: h.to_dict() for k, h in sorted(self.histograms.items())}}


LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class JsonLog:
    """``log(level, event, **fields)`` writes one JSON object per line:
    ``{"ts": unix seconds, "level", "event", ...fields}``. Values JSON cannot hold are
    written with ``str``."""

    def __init__(self, stream: TextIO | None = None, level: str = "info"):
        if level not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}")
        self.stream = stream
        self.min_level = LEVELS[level]
        self._lock = threading.Lock()

    def __call__(self, level: str, event: str, **fields: Any):
        if LEVELS[level] < self.min_level:
            return
        line = json.dumps({"ts": round(time.time(), 6), "level": level, "event": event, **fields}, default=str)
        with self._lock:
            stream = self.stream or sys.stderr
            try:
                stream.write(line + "\n")
                stream.flush()
            except (OSError, ValueError):  # a closed stderr must not take the server down
                pass


def no_log(level: str, event: str, **fields: Any):
    """A logger that drops everything (the default for library use and tests)."""


# ---- Python's own warnings and logging, as JSON lines ------------------------------------------

def route_python_logs(log: JsonLog) -> None:
    """Send what Python or a library would print as plain text to ``log`` instead, so the
    server's stderr stays valid JSON lines: ``warnings`` (numpy's RuntimeWarnings, ...) become
    ``python_warning`` events, records of the ``logging`` module ``python_log`` events, and an
    exception escaping a thread a ``thread_exception`` event."""
    import logging
    import traceback
    import warnings

    def showwarning(message, category, filename, lineno, file=None, line=None):
        log("warning", "python_warning", category=category.__name__, message=str(message)[:2000],
            where=f"{filename}:{lineno}")

    warnings.showwarning = showwarning

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord):
            try:
                level = record.levelname.lower()
                level = level if level in LEVELS else ("error" if record.levelno >= 40 else "warning")
                fields = {"logger": record.name, "message": record.getMessage()[:2000]}
                if record.exc_info:
                    fields["exception"] = "".join(traceback.format_exception(*record.exc_info))[-4000:]
                log(level, "python_log", **fields)
            except Exception:  # pragma: no cover - logging must never raise
                self.handleError(record)

    root = logging.getLogger()
    root.handlers[:] = [_Handler()]
    root.setLevel(logging.DEBUG if getattr(log, "min_level", 20) <= LEVELS["debug"] else logging.WARNING)

    def excepthook(args):
        log("error", "thread_exception", thread=getattr(args.thread, "name", None),
            error=f"{args.exc_type.__name__}: {str(args.exc_value)[:2000]}",
            traceback="".join(traceback.format_exception(args.exc_type, args.exc_value,
                                                         args.exc_traceback))[-4000:])

    threading.excepthook = excepthook


# ---- Prometheus ------------------------------------------------------------------------------------

class MetricsUnavailable(RuntimeError):
    """--metrics-port was given but prometheus_client is not installed."""


# counters whose suffix after the prefix becomes a label: prefix -> (metric name, label)
_LABELLED = (("requests.", "badger_requests", "kind"), ("errors.", "badger_errors", "code"),
             ("connections.refused.", "badger_connections_refused", "reason"))
_SKIP = frozenset({"connections.refused"})  # the sum of badger_connections_refused_total{reason}


class PrometheusEndpoint:
    """``/metrics`` in the Prometheus text format (via ``prometheus_client``, imported only
    here), plus ``/healthz`` (200 while the event loop is alive) and ``/readyz`` (200 once
    sessions are restored and until a drain begins, else 503), on its own HTTP port, served
    from a daemon thread. Values are read from the server's ``Metrics`` and gauges at scrape
    time: nothing is counted twice.

    Metrics: ``badger_sessions``, ``badger_ready``, ``badger_connections_open``,
    ``badger_connections_probes``, ``badger_buffered_bytes``, ``badger_buffer_reserved_bytes``,
    ``badger_buffer_budget_bytes``, ``badger_event_loop_lag_seconds``, ``badger_peers_blocked``, ``badger_peers_paced``,
    ``badger_requests_total{kind}``, ``badger_errors_total{code}``,
    ``badger_connections_refused_total{reason}``, ``badger_steps_total``, every other counter
    of ``stats`` as ``badger_<name>_total`` (dots as underscores),
    ``badger_request_duration_seconds{kind}`` and ``badger_checkpoint_duration_seconds``
    histograms, and the process collector's ``process_*`` (RSS, CPU, open fds)."""

    @staticmethod
    def check_available():
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise MetricsUnavailable(
                "--metrics-port needs the prometheus_client package (the `serve` extra: "
                "pip install 'badger-runtime[serve]', or pip install prometheus-client)") from None

    def __init__(self, manager, server, host: str = "127.0.0.1", port: int = 0):
        self.check_available()
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
        import socket
        import socketserver

        from prometheus_client import CollectorRegistry, make_wsgi_app
        from prometheus_client.process_collector import ProcessCollector

        self.manager, self.server = manager, server
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(manager, server))
        ProcessCollector(registry=self.registry)
        metrics_app = make_wsgi_app(self.registry)

        def app(environ, start_response):
            path = environ.get("PATH_INFO", "/")
            if path in ("/healthz", "/readyz"):
                ok = self.live() if path == "/healthz" else self.ready()
                start_response("200 OK" if ok else "503 Service Unavailable",
                               [("Content-Type", "text/plain; charset=utf-8")])
                return [(("ok" if path == "/healthz" else "ready") if ok else "not " +
                         ("live" if path == "/healthz" else "ready")).encode() + b"\n"]
            return metrics_app(environ, start_response)

        class Quiet(WSGIRequestHandler):
            def log_message(self, *args):  # the default prints plain text to stderr
                pass

        class Threading(socketserver.ThreadingMixIn, WSGIServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.httpd = make_server(host, port, app, server_class=Threading, handler_class=Quiet)
        h, p = self.httpd.server_address[:2]
        self.address = f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
        self.port = p
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)
        self.thread.start()

    def live(self) -> bool:
        beat = getattr(self.server, "heartbeat", None)
        return beat is None or time.monotonic() - beat < 10.0

    def ready(self) -> bool:
        return bool(self.manager.ready) and not self.server.draining

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Collector:
    def __init__(self, manager, server):
        self.manager, self.server = manager, server

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        m, s = self.manager, self.server
        g = s.gauges()

        def gauge(name, doc, value):
            return GaugeMetricFamily(name, doc, value=float(value))

        yield gauge("badger_sessions", "Sessions open.", len(m.sessions))
        yield gauge("badger_ready", "1 when restored and not draining (readiness).", m.ready and not g["draining"])
        yield gauge("badger_uptime_seconds", "Seconds since the server started.", time.time() - m.started)
        yield gauge("badger_connections_open", "Connections being served.", g["connections"])
        yield gauge("badger_connections_probes", "Health-only connections admitted at the connection cap.",
                    g["probes"])
        yield gauge("badger_buffered_bytes", "Bytes received and not yet decoded, over all connections.",
                    g["buffered_bytes"])
        yield gauge("badger_buffer_reserved_bytes", "Bytes of the buffer budget reserved by large frames.",
                    g["buffer_reserved_bytes"])
        yield gauge("badger_buffer_budget_bytes", "The buffer budget for large frames.", g["buffer_budget_bytes"])
        yield gauge("badger_event_loop_lag_seconds", "How late the event loop's last heartbeat ran.",
                    g.get("loop_lag_s", 0.0))
        yield gauge("badger_peers_blocked", "Peer addresses in their abuse cool-down (reset at accept).",
                    g.get("peers_blocked", 0))
        yield gauge("badger_peers_paced", "Peer addresses whose request bucket is not full.", g.get("peers_paced", 0))

        snap = m.metrics.to_dict()
        labelled = {name: CounterMetricFamily(name, f"{name[7:].replace('_', ' ').capitalize()} by {label}.",
                                              labels=[label]) for _, name, label in _LABELLED}
        for key, value in snap["counters"].items():
            if key in _SKIP:
                continue
            for prefix, name, _label in _LABELLED:
                if key.startswith(prefix):
                    labelled[name].add_metric([key[len(prefix):]], value)
                    break
            else:
                name = "badger_" + "".join(ch if ch.isalnum() else "_" for ch in key)
                yield CounterMetricFamily(name, f"Counter {key} of the stats request.", value=value)
        yield from labelled.values()

        req = HistogramMetricFamily("badger_request_duration_seconds",
                                    "Time in the server per request kind (checkpoint included).", labels=["kind"])
        for name, h in snap["latency_ms"].items():
            buckets, total = [], 0
            for le, c in zip(h["le_ms"], h["counts"]):
                total += c
                buckets.append((repr(le / 1e3), total))
            buckets.append(("+Inf", h["count"]))
            if name == "checkpoint":
                ck = HistogramMetricFamily("badger_checkpoint_duration_seconds", "One checkpoint write.",
                                           buckets=buckets, sum_value=h["sum_ms"] / 1e3)
                yield ck
            else:
                req.add_metric([name], buckets, sum_value=h["sum_ms"] / 1e3)
        yield req

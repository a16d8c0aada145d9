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

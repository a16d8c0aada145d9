"""Per-peer rate limits, sans-IO (every method takes ``now``; the server passes trio's clock).

- ``AbuseTracker``: a peer address whose connections were refused or closed for abuse more
  than ``limit`` times within a sliding ``window`` is *blocked* for ``cooldown`` seconds: the
  server then closes its new connections at accept, before reading or answering anything
  (fail2ban's findtime / maxretry / bantime, inside the server).
- ``RequestPacer``: requests per peer address as a leaky bucket (GCRA, the algorithm of
  nginx ``limit_req`` with ``burst`` and ``delay``): ``rate`` requests a second, ``burst``
  at once; a request beyond it is *delayed* (the server stops reading that connection until
  its turn), never refused, so a pipelining client is slowed down, not broken.

Both keep O(1) state per peer and at most ``max_peers`` peers (the oldest entries go first
past that; ``prune`` forgets the ones that no longer matter).
"""

from __future__ import annotations

from collections import deque

MAX_TRACKED_PEERS = 65536


class AbuseTracker:
    def __init__(self, limit: int, window: float, cooldown: float, max_peers: int = MAX_TRACKED_PEERS):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"abuse_limit must be an integer >= 0 (0: off), got {limit!r}")
        for name, v in (("abuse_window", window), ("abuse_cooldown", cooldown)):
            if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {v!r}")
        if max_peers < 1:
            raise ValueError("max_peers must be >= 1")
        self.limit, self.window, self.cooldown, self.max_peers = limit, float(window), float(cooldown), max_peers
        self._events: dict[str, deque] = {}  # host -> times of its recent abuse events (at most limit + 1)
        self._blocked: dict[str, float] = {}  # host -> blocked until

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def blocked(self, host: str, now: float) -> bool:
        """Is ``host`` in its cool-down? (The accept path: one dict lookup when it is not.)"""
        until = self._blocked.get(host)
        if until is None:
            return False
        if now < until:
            return True
        del self._blocked[host]
        return False

    def note(self, host: str, now: float) -> bool:
        """One abuse event of ``host``; True when it starts ``host``'s cool-down."""
        if not self.limit or self.blocked(host, now):
            return False
        q = self._events.get(host)
        if q is None:
            if len(self._events) >= self.max_peers:
                self.prune(now)
                while len(self._events) >= self.max_peers:
                    del self._events[next(iter(self._events))]
            q = self._events[host] = deque(maxlen=self.limit + 1)
        q.append(now)
        while q and q[0] <= now - self.window:
            q.popleft()
        if len(q) <= self.limit:
            return False
        del self._events[host]
        if len(self._blocked) >= self.max_peers:
            self.prune(now)
            while len(self._blocked) >= self.max_peers:
                del self._blocked[next(iter(self._blocked))]
        self._blocked[host] = now + self.cooldown
        return True

    def blocked_count(self, now: float) -> int:
        return sum(1 for until in list(self._blocked.values()) if until > now)

    def prune(self, now: float):
        """Forget cool-downs that ended and events that left the window."""
        for host, until in list(self._blocked.items()):
            if until <= now:
                del self._blocked[host]
        for host, q in list(self._events.items()):
            if not q or q[-1] <= now - self.window:
                del self._events[host]


class RequestPacer:
    def __init__(self, rate: float, burst: int, max_peers: int = MAX_TRACKED_PEERS):
        if not (isinstance(rate, (int, float)) and 0 <= rate < float("inf")):
            raise ValueError(f"peer_request_rate must be a finite number >= 0 (0: off), got {rate!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"peer_request_burst must be an integer >= 1, got {burst!r}")
        self.rate, self.burst, self.max_peers = float(rate), burst, max_peers
        self._tat: dict[str, float] = {}  # host -> theoretical arrival time of its next request

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def reserve(self, host: str, now: float) -> float:
        """Take ``host``'s next turn: how long (s, >= 0) the request must wait for it."""
        if not self.rate:
            return 0.0
        interval = 1.0 / self.rate
        tat = self._tat.get(host)
        if tat is None and len(self._tat) >= self.max_peers:
            self.prune(now)
            while len(self._tat) >= self.max_peers:
                del self._tat[next(iter(self._tat))]
        tat = max(tat or now, now) + interval
        self._tat[host] = tat
        return max(0.0, tat - now - self.burst * interval)

    def prune(self, now: float):
        """Forget peers whose bucket is full again (they would get no delay anyway)."""
        for host, tat in list(self._tat.items()):
            if tat <= now:
                del self._tat[host]

    def __len__(self) -> int:
        return len(self._tat)

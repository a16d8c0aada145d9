"""Defaults of the server's bounds, in one place (no imports: the CLI reads them when it
builds its parser, the server uses them as its defaults, docs/protocol.md "Limits" lists them).
"""

MiB = 1 << 20

MAX_CONNECTIONS = 1024           # connections served at once (--max-connections)
MAX_CONNECTIONS_PER_PEER = 128   # of them from one IP address (--max-connections-per-peer; 0: no cap)
PROBE_SLOTS = 16                 # extra connections at the cap that may ask for health only
PROBE_TIMEOUT = 1.0              # s: a probe connection's one frame must arrive within this
IDLE_TIMEOUT = 300.0             # s without the first byte of a next frame (--idle-timeout)
FRAME_TIMEOUT = 30.0             # s from a frame's first byte to its last (--frame-timeout)
SEND_TIMEOUT = 30.0              # s to write one reply (--send-timeout)
DRAIN_TIMEOUT = 20.0             # s for in-flight requests on SIGTERM (--drain-timeout)
MAX_FRAME_BYTES = 16 * MiB       # one frame's body (--max-frame-mib)
SMALL_FRAME_BYTES = 64 * 1024    # frames up to this need no share of the buffer budget
BUFFER_BUDGET = 256 * MiB        # large frames' bytes over all connections (--buffer-budget-mib)
ABUSE_LIMIT = 16                 # abuse closes of one IP within the window before it is blocked (--abuse-limit; 0: off)
ABUSE_WINDOW = 10.0              # s: the sliding window of those closes (--abuse-window)
ABUSE_COOLDOWN = 60.0            # s: a blocked IP's new connections are closed at accept (--abuse-cooldown)
PEER_REQUEST_RATE = 200.0        # requests/s of one IP over all its connections (--peer-request-rate; 0: off)
PEER_REQUEST_BURST = 400         # of them at once, before the next ones are delayed (--peer-request-burst)
GC_GEN0_THRESHOLD = 10_000       # the garbage collector's first threshold in the server (--gc-gen0; Python's: 700)

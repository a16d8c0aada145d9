"""Serving agents over TCP (`badger serve`; the wire format is in docs/protocol.md).

protocol.py (frames, sans-IO) -> sessions.py (SessionManager: requests to replies, sans-IO)
-> store.py (versioned checkpoints) ; server.py (trio TCP server) ; client.py (sync and trio
clients) ; cli.py (`badger serve`, `badger client ...`) ; telemetry.py (metrics, JSON logs).
No torch here.
"""

"""Where ``badger client`` keeps the secrets of the sessions it opened, so that a shell walkthrough
(``open``, then ``step``, ``add``, ``close`` as separate commands) works without passing the secret
by hand: a JSON map ``{"HOST:PORT/SESSION": secret}`` in one private file (0600, in a 0700 folder),
as ssh keeps its known hosts. ``--secret`` / ``BADGER_SESSION_SECRET`` still win; ``close`` forgets
the entry. The file: ``BADGER_SECRETS_FILE``, else ``$XDG_STATE_HOME/badger/session-secrets.json``
(``~/.local/state`` when XDG_STATE_HOME is unset)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: changes are not serialised between processes
    fcntl = None

MAX_ENTRIES = 4096  # the oldest entries go first past this (sessions a script opened and never closed)


def default_path() -> Path:
    if os.environ.get("BADGER_SECRETS_FILE"):
        return Path(os.environ["BADGER_SECRETS_FILE"])
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "badger" / "session-secrets.json"


class SecretsFile:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_path()

    @staticmethod
    def key(address: str, session: str) -> str:
        return f"{address}/{session}"

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: the secret then has to be given
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} \
            if isinstance(data, dict) else {}

    def _write(self, data: dict):
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def _locked(self):
        """One change at a time across processes (two scripts opening sessions at once lost one's secret)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # (releases the lock)

    def get(self, address: str, session: str) -> str | None:
        return self._read().get(self.key(address, session))

    def put(self, address: str, session: str, secret: str):
        with self._locked():
            data = self._read()
            data.pop(self.key(address, session), None)
            data[self.key(address, session)] = secret  # the newest last
            while len(data) > MAX_ENTRIES:
                del data[next(iter(data))]
            self._write(data)

    def forget(self, address: str, session: str):
        with self._locked():
            data = self._read()
            if data.pop(self.key(address, session), None) is not None:
                self._write(data)

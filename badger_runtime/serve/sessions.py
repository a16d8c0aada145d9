"""The served agent without any IO: validated request dicts in, reply dicts out.

``SessionManager.handle(request)`` takes a request checked by ``protocol.validate_request``
and returns ``protocol.reply_ok`` / ``reply_error``. It owns one ``engine.Agent`` (batch 1)
per session (held here, or with a ``placement`` in a Ray actor each: ``cluster.sessions``),
checkpoints every change to the ``SessionStore`` before it replies, and restores every session
from the store at start. Nothing a client sends can raise out of
``handle``: bad input is an error reply and leaves the session as it was.

Thread-safety: the server calls ``handle`` from worker threads. The session table and the
metrics have their own locks; each session has a lock held for a whole request, so the
requests of one session are serialised and different sessions run side by side.

Reply bodies and error codes are documented in docs/protocol.md.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..config import MAX_SEED, ConfigError
from ..engine import MAX_ROUNDS, Agent, GrowthError, HorizonError, InputError
from ..membrane import seat_array, seats_after_removal
from .protocol import E_BUSY, reply_error, reply_ok, some_names
from .store import (FORMAT, FORMAT_VERSION, MAX_COUNT, READABLE_VERSIONS, STEP_FIELDS, NotServedHere, SessionStore,
                    StoreError, agent_record, restore_agent)
from .telemetry import Metrics, no_log

# error codes (besides protocol's bad_frame / bad_request / unknown_kind)
E_BAD_REQUEST = "bad_request"  # a body field missing, unknown or of the wrong type
E_BAD_INPUT = "bad_input"  # values the agent refuses: shapes, dtypes, NaN/inf, ranges
E_NO_SESSION = "no_session"
E_SESSION_EXISTS = "session_exists"
E_LIMIT = "limit"  # too many sessions / experts / dims / rounds
E_WRONG_STEP = "wrong_step"  # the request's "t" (or "episode") is not where the session is
E_STORAGE = "storage"  # the checkpoint could not be written; the change was undone
E_INTERNAL = "internal"
E_HORIZON = "horizon"  # a step past an episodic policy's horizon in a session not opened with past_horizon
E_GROWTH = "growth"  # fresh experts (or clones) for a policy whose card says they hurt it, without allow_harmful
E_FORBIDDEN = "forbidden"  # the session belongs to another client (its secret is missing or wrong)

SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


class ServeError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Limits:
    max_sessions: int = 1024
    max_experts: int = 1024  # per session (dense routing scores N^2 pairs)
    max_dims: int = 256
    max_rounds: int = MAX_ROUNDS
    #: requests that may wait for one session while another of its requests runs; past it, ``busy``. Requests run
    #: in the server's worker threads (trio's 40), and a request waiting for its session holds one: without the
    #: bound, one client stepping one session over many connections held them all, and every other session
    #: waited behind it
    max_waiting: int = 4


@dataclass
class Session:
    name: str
    agent: Agent
    seed: int  # the open request's seed; episode k's default seed is seed + k
    rounds: int | None  # communication rounds per step (None: the policy's)
    created: float
    updated: float
    task: str = ""  # the task whose interface the session's agent has (default: the policy's)
    owner: str | None = None  # sha256 (hex) of the secret `open` returned; None: anyone (an older record)
    episode: int = 0
    steps_total: int = 0  # over all episodes
    last_outputs: np.ndarray | None = None  # the latest step's outputs [d]
    pending: int = 0  # steps since the last checkpoint
    writes: int = 0
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    waiting: int = 0  # requests waiting for ``lock`` (under the manager's lock)

    @property
    def dims(self) -> int:
        return self.agent.dims

    @property
    def parts(self) -> dict[str, int]:
        """The named input parts a step takes (e.g. observation: d, feedback: 1 or d)."""
        return dict(self.agent.interface.parts)

    # the fields a failed checkpoint write must put back, besides the agent's
    _UNDO = ("agent", "seed", "rounds", "updated", "episode", "steps_total", "last_outputs", "pending", "task")


# ---- body field checks -------------------------------------------------------------------------

def _check_keys(body: dict, allowed: set[str]):
    extra = body.keys() - allowed
    if extra:  # bounded: the first few names and how many more
        raise ServeError(E_BAD_REQUEST, f"unknown body fields {some_names(extra)} "
                                        f"(allowed: {', '.join(sorted(allowed)) or 'none'})")


def _int(body: dict, key: str, default: Any = ..., lo: int = 0, hi: int = MAX_SEED, code: str = E_BAD_REQUEST):
    """An int body field. Below ``lo`` (the protocol's minimum) is ``bad_request``; above
    ``hi`` is ``code``: ``limit`` where ``hi`` is a limit of this server, else ``bad_request``."""
    if key not in body or body[key] is None:
        if default is ...:
            raise ServeError(E_BAD_REQUEST, f"body field {key!r} is required" if key not in body else
                             f"body field {key!r} must be an int, got nil")
        return default
    v = body[key]
    if type(v) is not int:
        raise ServeError(E_BAD_REQUEST, f"body field {key!r} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ServeError(E_BAD_REQUEST if v < lo else code, f"body field {key!r} must be in [{lo}, {hi}], got {v}")
    return v


def _vector(name: str, x: Any, size: int) -> np.ndarray:
    """A float vector of ``size`` values from a float32/float64 array, a list of numbers, or
    (size 1) a bare number. Shape, dtype and type errors are InputError."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise InputError(f"{name} must be float32 or float64, got {x.dtype.name}")
        a = x
    elif isinstance(x, list):
        if not all(type(v) in (int, float) for v in x):
            bad = next(type(v).__name__ for v in x if type(v) not in (int, float))
            raise InputError(f"{name} must be a list of numbers, found a {bad}")
        a = np.asarray(x, dtype=np.float64) if x else np.zeros(0)
    elif type(x) in (int, float) and size == 1:
        a = np.asarray([x], dtype=np.float64)
    else:
        raise InputError(f"{name} must be an array or a list of {size} numbers, got {type(x).__name__}")
    if a.shape != (size,):
        raise InputError(f"{name} must have shape [{size}], got {list(a.shape)}")
    return a


def new_agent(policy, experts: int, dims: int, seed: int, task=None, past_horizon: bool = False,
              agent_config=None) -> Agent:
    """A served session's agent: batch 1, seeded, with the interface of ``task`` (default: the
    policy's own task, its address scheme and feedback); ``past_horizon``: the client asked to
    step an episodic policy past its horizon; ``agent_config``: routing etc. (default: the policy's)."""
    return Agent(policy, agent_config, past_horizon=past_horizon).reset(1, experts, dims, seed, task=task)


# ---- the manager -----------------------------------------------------------------------------------

class SessionManager:
    """Sessions of one policy, keyed by name; see the module docstring."""

    def __init__(self, policy, store: SessionStore | None = None, *, limits: Limits | None = None,
                 default_experts: int | None = None, checkpoint_every: int = 1,
                 log: Callable[..., None] = no_log, metrics: Metrics | None = None, agent_config=None,
                 placement=None):
        self.policy = policy
        # where sessions' agents live: here (None), or e.g. one Ray actor each (cluster.sessions.RayPlacement)
        self.placement = placement
        # every session's agent config: the policy's, or with sparse routing for large agents
        self.agent_config = agent_config or policy.agent
        self.store = store
        self.limits = limits or Limits()
        self.default_experts = default_experts  # None: the task's own default for the session's d (open)
        if checkpoint_every < 0:
            raise ValueError("checkpoint_every must be >= 0")
        self.checkpoint_every = checkpoint_every
        self.log = log
        self.metrics = metrics or Metrics()
        self._tasks: dict = {}  # task name -> its Task (settings as _task_config gives them), built once
        self.sessions: dict[str, Session] = {}
        self.kept: dict[str, str] = {}  # intact checkpoints this server cannot serve, left in place: name -> why
        self._lock = threading.Lock()
        self.started = time.time()
        self.ready = store is None  # a store-backed manager is ready once restore_all() ran
        # the server adds its view here (connections, draining, tasks); called on stats/health
        self.status_hook: Callable[[], dict] = dict

    # -- dispatch ------------------------------------------------------------------------------
    def handle(self, req: dict) -> dict:
        kind, rid = req["kind"], req["id"]
        t0 = time.perf_counter()
        try:
            fn = getattr(self, "_k_" + kind, None)
            if fn is None:
                raise ServeError("unknown_kind", f"request kind {kind!r} is not served")
            reply = reply_ok(rid, fn(req["session"], req["body"]))
        except ServeError as e:
            reply = reply_error(rid, e.code, str(e))
        except HorizonError as e:
            reply = reply_error(rid, E_HORIZON, str(e))
        except GrowthError as e:
            reply = reply_error(rid, E_GROWTH, str(e))
        except (InputError, ConfigError) as e:
            reply = reply_error(rid, E_BAD_INPUT, str(e))
        except Exception as e:  # a bug: answer it, log it, keep serving
            self.log("error", "internal_error", kind=kind, session=req.get("session"),
                     error=f"{type(e).__name__}: {e}")
            reply = reply_error(rid, E_INTERNAL, f"internal error: {type(e).__name__}: {e}")
        self.metrics.inc(f"requests.{kind}")
        if not reply["ok"]:
            self.metrics.inc(f"errors.{reply['error']['code']}")
        self.metrics.observe(kind, time.perf_counter() - t0)
        return reply

    def _get(self, name: str | None) -> Session:
        if name is None:
            raise ServeError(E_BAD_REQUEST, "this request needs a 'session'")
        with self._lock:
            s = self.sessions.get(name)
        if s is None:
            raise ServeError(E_NO_SESSION, f"no session {name[:80]!r}")
        return s

    def _locked(self, name: str | None, fn: Callable[[Session], dict], body: dict) -> dict:
        """Run ``fn`` on the session under its lock, if the request proves it owns it (its body's
        ``secret``, the one ``open`` returned). The proof is checked before the request waits for the session
        (``owner`` never changes once the session is listed), and at most ``Limits.max_waiting`` requests wait
        for one session: past that, ``busy``."""
        s = self._get(name)
        if s.owner is not None:
            secret = body.get("secret")
            given = hashlib.sha256(secret.encode()).hexdigest() if isinstance(secret, str) else ""
            if not hmac.compare_digest(given, s.owner):
                self.metrics.inc("sessions.forbidden")
                raise ServeError(E_FORBIDDEN, f"session {name[:80]!r} belongs to the client that opened it: "
                                              "send its 'secret' (from the open reply; `badger client` keeps "
                                              "the secrets of the sessions it opened, or takes --secret or "
                                              "BADGER_SESSION_SECRET)")
        if not s.lock.acquire(blocking=False):
            with self._lock:
                if s.waiting >= self.limits.max_waiting:
                    self.metrics.inc("sessions.busy")
                    raise ServeError(E_BUSY, f"session {name[:80]!r} has {s.waiting} requests waiting for it "
                                             "already: try again later")
                s.waiting += 1
            try:
                s.lock.acquire()
            finally:
                with self._lock:
                    s.waiting -= 1
        try:
            if s.closed:
                raise ServeError(E_NO_SESSION, f"no session {name[:80]!r} (closed)")
            return fn(s)
        finally:
            s.lock.release()

    # -- checkpoints -----------------------------------------------------------------------------
    def record(self, s: Session) -> dict:
        """The session's record: what its checkpoint holds and ``snapshot`` returns."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "session": s.name,
                "policy": {"name": self.policy.name, "sha256": self.policy.card.get("sha256")},
                "created": s.created, "updated": s.updated, "seed": s.seed, "rounds": s.rounds, "task": s.task,
                "past_horizon": s.agent.past_horizon, "owner": s.owner,
                "episode": s.episode, "steps_total": s.steps_total, "last_outputs": s.last_outputs,
                "agent": agent_record(s.agent)}

    def _write(self, s: Session):
        if self.store is None:
            s.pending = 0
            return
        t0 = time.perf_counter()
        try:
            self.store.write(s.name, self.record(s))
        except Exception as e:
            self.metrics.inc("checkpoint.failed")
            self.log("error", "checkpoint_failed", session=s.name, error=f"{type(e).__name__}: {e}")
            raise ServeError(E_STORAGE, f"checkpoint failed ({type(e).__name__}: {e}); the change was undone")
        self.metrics.observe("checkpoint", time.perf_counter() - t0)
        self.metrics.inc("checkpoint.writes")
        s.pending = 0
        s.writes += 1

    def _commit(self, s: Session, change: Callable[[], Any], *, step: bool = False):
        """Apply ``change`` to the session, then checkpoint it (steps: every ``checkpoint_every``).
        If the change raises or the write fails, everything is put back (agent, its generator,
        the session's fields) and the error propagates (a failed write as ``storage``)."""
        agent = s.agent
        saved_agent = agent.snapshot()  # references (a step replaces arrays, never writes into them)
        saved = {k: getattr(s, k) for k in Session._UNDO}
        try:
            out = change()
            s.updated = time.time()
            if step:
                s.pending += 1
                if not self.checkpoint_every or s.pending < self.checkpoint_every:
                    return out
            self._write(s)
            return out
        except BaseException:
            for k, v in saved.items():
                setattr(s, k, v)
            s.agent.restore(saved_agent)
            raise

    def checkpoint_all(self) -> int:
        """Write every session with steps not yet checkpointed (at shutdown); returns how many."""
        n = 0
        with self._lock:
            sessions = list(self.sessions.values())
        for s in sessions:
            with s.lock:
                if not s.closed and s.pending:
                    try:
                        self._write(s)
                        n += 1
                    except ServeError:
                        pass  # logged by _write
        return n

    def restore_all(self) -> dict:
        """Load every checkpoint in the store. A file that cannot be used (corrupt, another
        version) is moved to ``rejected/`` and logged; an intact one of another policy is left where
        it is (a restart with the wrong ``--policy`` loses nothing: the right one restores it) and its
        name stays taken; the rest are served."""
        restored, rejected, skipped = [], [], []
        if self.store is not None:
            for name, rec in self.store.load_all():
                try:
                    if isinstance(rec, StoreError):
                        raise rec
                    s = self._session_from_record(name, rec, restoring=True)
                except NotServedHere as e:
                    self.kept[name] = e.why
                    self.log("warning", "restore_kept_in_place", session=name, error=str(e))
                    self.metrics.inc("restore.kept")
                    skipped.append({"session": name, "why": e.why})
                    continue
                except StoreError as e:
                    where = self.store.reject(name)
                    self.log("error", "restore_rejected", session=name, error=str(e), moved_to=str(where))
                    self.metrics.inc("restore.rejected")
                    rejected.append({"session": name, "error": str(e)})
                    continue
                self.sessions[name] = s
                self.metrics.inc("restore.sessions")
                self.log("info", "session_restored", session=name, t=s.agent.t, episode=s.episode,
                         experts=s.agent.n_experts, dims=s.dims)
                restored.append(name)
        self.ready = True
        return {"restored": restored, "rejected": rejected, "kept": skipped}

    def _session_from_record(self, name: str, rec: Any, restoring: bool = False) -> Session:
        """A session from a record (a checkpoint at start, or ``open`` with a snapshot). Any problem
        is a StoreError. A checkpoint this server wrote is restored even above today's limits (a
        restart with lower ``--max-experts`` must not lose sessions it accepted); a snapshot sent
        with ``open`` is held to the limits."""
        try:
            return self._checked_session(name, rec, restoring)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 (malformed records of any shape: refused, never a crash)
            raise StoreError(f"malformed record: {type(e).__name__}: {str(e)[:200]}") from None

    def _checked_session(self, name: str, rec: Any, restoring: bool) -> Session:
        if not isinstance(rec, dict):
            raise StoreError("a session record must be a map")
        if rec.get("format") != FORMAT or rec.get("version") not in READABLE_VERSIONS:
            raise StoreError(f"record format {str(rec.get('format'))[:40]!r} version {str(rec.get('version'))[:20]}; "
                             f"expected {FORMAT!r} version {FORMAT_VERSION}")
        pol = rec.get("policy")
        sha = self.policy.card.get("sha256")
        if not isinstance(pol, dict) or pol.get("sha256") != sha:
            got = pol.get("sha256") if isinstance(pol, dict) else None
            msg = f"record was made with policy sha256 {str(got)[:16]}..., this server runs {str(sha)[:16]}..."
            if isinstance(got, str) and len(got) == 64:
                raise NotServedHere(msg, f"policy sha256 {got[:16]}...")
            raise StoreError(msg)
        # a snapshot opened anew is held to today's limits and leaves 2^62 steps of headroom; a checkpoint this
        # server wrote is restored as it is (it may have been opened at the bounds and stepped since)
        lim = (1 << 20, 1 << 16, 1 << 63) if restoring else (self.limits.max_experts, self.limits.max_dims, MAX_COUNT)
        agent = restore_agent(self.policy, rec.get("agent"), max_experts=lim[0], max_dims=lim[1],
                              agent_config=self.agent_config, max_count=lim[2])
        ints = {k: rec.get(k) for k in ("episode", "steps_total")}
        if any(type(v) is not int or not 0 <= v < lim[2] for v in ints.values()):
            raise StoreError(f"record fields episode, steps_total must be ints in [0, {lim[2]:,}): "
                             f"{str(ints)[:200]}")
        if type(rec.get("seed")) is not int or not 0 <= rec["seed"] <= MAX_SEED:
            raise StoreError(f"record field seed must be an int in [0, 2^63): {str(rec.get('seed'))[:40]}")
        rounds = rec.get("rounds")
        if rounds is not None and (type(rounds) is not int or not 1 <= rounds <= self.limits.max_rounds):
            raise StoreError(f"record field rounds must be nil or in [1, {self.limits.max_rounds}]")
        last = rec.get("last_outputs")
        if last is not None and (not isinstance(last, np.ndarray) or last.shape != (agent.dims,)
                                 or not np.isfinite(last).all()):
            raise StoreError("record field last_outputs must be nil or a finite array [d]")
        now = time.time()
        times = [rec.get(k) if type(rec.get(k)) in (int, float) else now for k in ("created", "updated")]
        task = rec.get("task", self.policy.task.name)
        from ..tasks import task_names

        if not isinstance(task, str) or len(task) > 64:
            raise StoreError("record field task must be a task name")
        if task not in task_names():  # a session of 'chess' could never reset; a plugin's, with its module loaded, can
            if restoring:
                raise NotServedHere(f"record of task {task!r}, which this server's process does not know",
                                    f"task {task!r}: name its module in BADGER_TASKS")
            raise StoreError(f"record field task must be a registered task ({', '.join(task_names())}), got {task!r}")
        past = rec.get("past_horizon", False)
        if type(past) is not bool:
            raise StoreError("record field past_horizon must be a bool")
        agent.past_horizon = past
        owner = rec.get("owner") if restoring else None  # a snapshot opened anew gets a new owner
        if owner is not None and (not isinstance(owner, str) or len(owner) != 64):
            raise StoreError("record field owner must be nil or a sha256 hex digest")
        return Session(name, self._place(agent), rec["seed"], rounds, float(times[0]), float(times[1]), task, owner,
                       episode=ints["episode"], steps_total=ints["steps_total"],
                       last_outputs=None if last is None else np.array(last, np.float32))

    def _place(self, agent: Agent):
        """A new session agent, where the manager keeps them (in this process, or moved by the placement)."""
        return agent if self.placement is None else self.placement.place(agent)

    def _task_config(self, name: str):
        """The settings of task ``name`` for a new session: the policy's own, or that task's defaults."""
        from ..tasks import default_config, task_names, unknown_task

        if name == self.policy.task.name:
            return self.policy.task
        if name not in task_names():  # (a task of your own: registered in the server's process)
            raise ServeError(E_BAD_INPUT, unknown_task(name) + "; the server's process must know it")
        return default_config(name)

    def _task(self, name: str):
        """The Task of a session's task name (built once per name)."""
        from ..tasks import make_task

        if name not in self._tasks:
            self._tasks[name] = make_task(self._task_config(name))
        return self._tasks[name]

    def _pointer(self, s: Session) -> str | None:
        """The step field that names the output the feedback is about (the bandit's ``arm``), if any."""
        from ..tasks import REGISTRY

        return self._task(s.task).pointer_field if s.task in REGISTRY else None

    # -- request kinds ---------------------------------------------------------------------------
    def info(self, s: Session) -> dict:
        a = s.agent
        parts = s.parts
        return {"session": s.name, "t": a.t, "episode": s.episode, "experts": a.n_experts, "dims": s.dims,
                "task": s.task, "parts": [[k, v] for k, v in parts.items()], "pointer": self._pointer(s),
                "feedback_size": parts.get("feedback"), "slots": a.slots,
                "horizon": None if a.past_horizon else getattr(self.policy, "horizon", None),
                "rounds": s.rounds or self.policy.agent.agreement.rounds, "seed": s.seed,
                "steps_total": s.steps_total, "last_outputs": s.last_outputs}

    def _k_open(self, name: str | None, body: dict) -> dict:
        _check_keys(body, {"experts", "dims", "seed", "rounds", "resume", "snapshot", "task", "past_horizon", "secret"})
        L = self.limits
        resume = body.get("resume", False)
        past_horizon = body.get("past_horizon", False)
        if type(resume) is not bool or type(past_horizon) is not bool:
            raise ServeError(E_BAD_REQUEST, "body fields 'resume' and 'past_horizon' must be bools")
        if name is None:
            name = "s-" + secrets.token_hex(6)
        elif not SESSION_NAME.fullmatch(name):
            raise ServeError(E_BAD_REQUEST, "session names are 1-64 characters of A-Z a-z 0-9 _ . - "
                                            "starting with a letter or digit")
        if resume:
            with self._lock:
                s = self.sessions.get(name)
            if s is not None:
                return self._locked(name, lambda s: self.info(s) | {"resumed": True}, body)
        now = time.time()
        if "snapshot" in body:
            if body.keys() & {"experts", "dims", "seed", "rounds", "task"}:
                raise ServeError(E_BAD_REQUEST, "give either a snapshot or experts/dims/seed/rounds/task, not both")
            try:
                s = self._session_from_record(name, body["snapshot"])
            except StoreError as e:
                raise ServeError(E_BAD_INPUT, f"snapshot refused: {e}") from None
            s.created = s.updated = now
            s.agent.past_horizon = s.agent.past_horizon or past_horizon
        else:
            dims = _int(body, "dims", ..., 1, L.max_dims, E_LIMIT)
            task = body.get("task", self.policy.task.name)
            if not isinstance(task, str):
                raise ServeError(E_BAD_REQUEST, "body field 'task' must be a task name (str)")
            experts = _int(body, "experts", None, 1, L.max_experts, E_LIMIT)
            if experts is None:  # --experts, else what `badger eval` runs at this d (20 within the trained range)
                experts = self.default_experts or min(self._task(task).experts_for(dims), L.max_experts)
            seed = _int(body, "seed", 0)
            rounds = _int(body, "rounds", None, 1, L.max_rounds, E_LIMIT)
            agent = self._place(new_agent(self.policy, experts, dims, seed, self._task_config(task), past_horizon,
                                          self.agent_config))
            s = Session(name, agent, seed, rounds, now, now, task)
        secret = secrets.token_urlsafe(24)  # the caller's proof of ownership, for every later request
        s.owner = hashlib.sha256(secret.encode()).hexdigest()
        with s.lock:
            with self._lock:
                if name in self.sessions:
                    raise ServeError(E_SESSION_EXISTS, f"session {name!r} exists (open with resume=true to attach)")
                if name in self.kept:
                    raise ServeError(E_SESSION_EXISTS, f"session {name!r} is a checkpoint kept in the state dir for "
                                                       f"another server ({self.kept[name]}): serve it there, or pick "
                                                       "another name")
                if len(self.sessions) >= L.max_sessions:
                    raise ServeError(E_LIMIT, f"the server holds its limit of {L.max_sessions} sessions")
                self.sessions[name] = s
            try:
                self._write(s)
            except ServeError:
                with self._lock:
                    del self.sessions[name]
                raise
        self.metrics.inc("sessions.opened")
        self.log("info", "session_opened", session=name, experts=s.agent.n_experts, dims=s.dims, seed=s.seed,
                 from_snapshot="snapshot" in body)
        return self.info(s) | {"resumed": False, "secret": secret}

    def _k_reset(self, name: str | None, body: dict) -> dict:
        _check_keys(body, {"seed", "experts", "dims", "secret"})

        def reset(s: Session) -> dict:
            experts = _int(body, "experts", s.agent.n_experts, 1, self.limits.max_experts, E_LIMIT)
            dims = _int(body, "dims", s.dims, 1, self.limits.max_dims, E_LIMIT)
            seed = _int(body, "seed", (s.seed + s.episode + 1) % (MAX_SEED + 1))
            agent = self._place(new_agent(self.policy, experts, dims, seed, self._task_config(s.task),
                                          s.agent.past_horizon, self.agent_config))

            def change():
                s.agent, s.episode, s.last_outputs, s.pending = agent, s.episode + 1, None, 0
            self._commit(s, change)
            return self.info(s)
        return self._locked(name, reset, body)

    def _k_step(self, name: str | None, body: dict) -> dict:
        def step(s: Session) -> dict:
            a = s.agent
            parts = s.parts
            pointer = self._pointer(s)  # e.g. the bandit's "arm"
            _check_keys(body, set(parts) | STEP_FIELDS | ({pointer} if pointer else set()))
            if "t" in body and _int(body, "t", code=E_BAD_REQUEST) != a.t:
                raise ServeError(E_WRONG_STEP, f"session {s.name!r} is at step t={a.t} of episode {s.episode}; "
                                               f"this request is for t={body['t']}")
            if "episode" in body and _int(body, "episode", code=E_BAD_REQUEST) != s.episode:
                raise ServeError(E_WRONG_STEP, f"session {s.name!r} is in episode {s.episode} at t={a.t}; "
                                               f"this request is for episode {body['episode']}")
            names = " + ".join(parts)
            if "slots" in body:
                if body.keys() & set(parts):
                    raise ServeError(E_BAD_REQUEST, f"give either slots or {names}, not both")
                vals = _vector("slots", body["slots"], a.slots)[None]
            else:
                if not set(parts) <= body.keys():
                    raise ServeError(E_BAD_REQUEST, f"a step needs {names} (or slots)")
                vals = a.observation({k: _vector(k, body[k], n)[None] for k, n in parts.items()})

            index = _int(body, pointer, None, 0, a.dims - 1, code=E_BAD_INPUT) if pointer else None  # no such output

            def change():
                if pointer:  # the feedback slot points at output `index` (none when the field is left out)
                    a.interface = self._task(s.task).point(a.interface, index, vals)
                out, info = a.step(vals, rounds=s.rounds)
                if not (np.isfinite(out).all() and a.state_is_finite()):
                    raise ServeError(E_BAD_INPUT, f"step {a.t - 1} made the agent's outputs or state NaN or inf "
                                                  "(extreme inputs or state, e.g. from a snapshot): refused, the "
                                                  "session is as it was")
                s.last_outputs = np.asarray(out[0], np.float32)
                s.steps_total += 1
                return info
            info = self._commit(s, change, step=True)
            self.metrics.inc("steps")
            return {"outputs": s.last_outputs, "t": a.t, "episode": s.episode, "rounds": int(info.rounds[0]),
                    "messages": {"sent": int(info.messages), "delivered": int(info.messages), "dropped": 0},
                    "experts": a.n_experts}
        return self._locked(name, step, body)

    def _k_add_experts(self, name: str | None, body: dict) -> dict:
        _check_keys(body, {"n", "init", "source", "allow_harmful", "secret"})

        def add(s: Session) -> dict:
            n = _int(body, "n", 1, 1, self.limits.max_experts, E_LIMIT)
            if s.agent.n_experts + n > self.limits.max_experts:
                raise ServeError(E_LIMIT, f"{s.agent.n_experts} + {n} experts exceeds the limit of "
                                          f"{self.limits.max_experts}")
            init = body.get("init")  # None: the kind the policy's card does not refuse (engine.default_init)
            if init is not None and init not in ("clone", "fresh"):
                raise ServeError(E_BAD_REQUEST, "body field 'init' must be 'clone' or 'fresh'")
            source = _int(body, "source", None, 0, MAX_SEED)
            harmful = body.get("allow_harmful", False)
            if type(harmful) is not bool:
                raise ServeError(E_BAD_REQUEST, "body field 'allow_harmful' must be a bool")
            idx = self._commit(s, lambda: s.agent.add_experts(n, init=init, source=source, allow_harmful=harmful))
            self.metrics.inc("experts.added", n)
            return {"indices": idx, "experts": s.agent.n_experts, "t": s.agent.t, "episode": s.episode}
        return self._locked(name, add, body)

    def _k_remove_experts(self, name: str | None, body: dict) -> dict:
        _check_keys(body, {"indices", "secret"})

        def remove(s: Session) -> dict:
            idx = body.get("indices")
            if isinstance(idx, np.ndarray) and idx.dtype.kind == "i" and idx.ndim == 1:
                idx = idx.tolist()
            if not isinstance(idx, list) or not idx or not all(type(i) is int for i in idx):
                raise ServeError(E_BAD_REQUEST, "body field 'indices' must be a non-empty list of ints")
            w = s.agent.wiring
            n_before, before = w.n_experts, w.seats
            left = self._commit(s, lambda: s.agent.remove_experts(idx))
            self.metrics.inc("experts.removed", len(set(idx)))
            kept = seat_array(seats_after_removal(before, n_before, np.setdiff1d(np.arange(n_before), idx)), left)
            # re-seated: moved to a part left short of readers (and restarted there)
            restarted = np.flatnonzero(kept != seat_array(s.agent.wiring.seats, left)).tolist()
            return {"experts": left, "t": s.agent.t, "episode": s.episode, "restarted": restarted}
        return self._locked(name, remove, body)

    def _k_snapshot(self, name: str | None, body: dict) -> dict:
        _check_keys(body, {"secret"})

        def snap(s: Session) -> dict:
            if s.pending:
                self._write(s)
            return {"record": self.record(s)}
        return self._locked(name, snap, body)

    def _k_close(self, name: str | None, body: dict) -> dict:
        _check_keys(body, {"secret"})

        def close(s: Session) -> dict:
            if self.store is not None:
                try:
                    self.store.delete(s.name)
                except OSError as e:
                    raise ServeError(E_STORAGE, f"cannot delete the checkpoint: {e}") from None
            s.closed = True
            with self._lock:
                self.sessions.pop(s.name, None)
            self.metrics.inc("sessions.closed")
            self.log("info", "session_closed", session=s.name, t=s.agent.t, steps_total=s.steps_total)
            return {"session": s.name, "closed": True, "t": s.agent.t, "episode": s.episode,
                    "steps_total": s.steps_total}
        return self._locked(name, close, body)

    def _k_stats(self, name: str | None, body: dict) -> dict:
        _check_keys(body, {"secret"})
        if name is not None:
            return self._locked(name, lambda s: self.info(s) | {
                "checkpoint": {"writes": s.writes, "pending": s.pending}, "created": s.created,
                "updated": s.updated}, body)
        with self._lock:
            n = len(self.sessions)
        return {"sessions": n, "uptime_s": round(time.time() - self.started, 3),
                "policy": {"name": self.policy.name, "sha256": self.policy.card.get("sha256")},
                "checkpoint_every": self.checkpoint_every,
                **({"placement": self.placement.describe()} if self.placement is not None else {}),
                "fsync": bool(self.store and self.store.fsync)} | self.metrics.to_dict() | self.status_hook()

    def _k_health(self, name: str | None, body: dict) -> dict:
        _check_keys(body, set())
        extra = self.status_hook()
        ready = self.ready and not extra.get("draining", False)
        with self._lock:
            n = len(self.sessions)
        return {"status": "ok" if ready else ("draining" if extra.get("draining") else "starting"),
                "live": True, "ready": ready, "sessions": n, "uptime_s": round(time.time() - self.started, 3)}

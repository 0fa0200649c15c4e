"""A knob study that several workers share and any of them may die in: the storage, its lock,
the owners of trials, dead trials and the record of the search space.

:func:`~nvformer.tuning.search.tune` works on an Optuna study through :class:`SharedStudy`:

* **One writer at a time.** Every storage access of a ``tune`` call except the heartbeat
  (creating the tables and the study, failing dead trials, enqueueing, asking, telling) happens
  under :class:`StudyLock`, an inter-process mutex: an ``flock`` on ``<file>.nvformer-lock``
  beside an SQLite file, an advisory lock of the database for PostgreSQL and MySQL URLs, and a
  lock within the process for other storages (in memory, journal, ...). The objective runs
  outside it. Workers starting together on a fresh file so never race on creating the tables or
  the study, the identity corner is enqueued once, and a trial starts only while the study has
  fewer than ``n_trials`` evaluated or running trials.
* **Owners.** A trial records its worker (``host``, ``machine``: boot id and PID namespace,
  ``pid``, process ``start`` time) in the system attr ``nvformer:owner`` as it starts. A RUNNING
  trial of this machine whose process is gone (or whose PID now names a younger process) is dead
  at once. A trial of another machine is dead when its Optuna heartbeat (recorded every
  ``heartbeat_interval`` seconds while the objective runs, for RDB URLs; or the storage object's
  own setting) is older than the grace period (:func:`optuna.storages.fail_stale_trials`). A
  RUNNING trial with no owner (its worker died between creating it and recording the owner) is
  dead once it is older than the grace period.
* **Dead trials** are marked FAIL (reason in ``nvformer:died``) and their point is re-run once,
  as a new trial with user attr ``retry_of``. A trial whose objective raised is FAIL with
  ``nvformer:error`` and is not re-run (the error is the user's).
* **No point twice.** A resumed call seeds its sampler from ``seed`` and the study's number of
  trials (:func:`run_seed`), so it does not replay earlier draws; a trial that still lands on a
  point that is evaluated, running or queued (two workers with one seed) is FAIL with
  ``nvformer:duplicate``, not evaluated, and the sampler is reseeded.
* **Stopping together.** A worker with nothing to start waits (polling every ``POLL_SECONDS``)
  while a trial of another worker runs whose death it could detect (same machine, or a
  heartbeat), so every worker returns the finished study.
* **The search space** (every trial parameter and its range) is recorded in the study's user
  attr ``nvformer:space``; opening the study with another space is an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

__all__ = ["GRACE_SECONDS", "HEARTBEAT_SECONDS", "SharedStudy", "StudyLock", "Trials", "owner_alive", "this_owner"]

HEARTBEAT_SECONDS = 30  # heartbeat interval of the RDB storages tune() builds from a URL
GRACE_SECONDS = 120  # a trial whose last heartbeat (or, without owner, whose start) is older is dead
POLL_SECONDS = 0.5  # how often a worker with nothing to start looks at the other workers' trials

OWNER, DIED, ERROR, DUPLICATE, NOTE = "nvformer:owner", "nvformer:died", "nvformer:error", "nvformer:duplicate", "nvformer:note"
SPACE = "nvformer:space"
RETRY_OF = "retry_of"


# ---------------------------------------------------------------------------------------------- owners


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int | str) -> tuple[str, int] | None:
    """``(state letter, start time in clock ticks since boot)`` of a Linux process, or None."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
    return fields[0], int(fields[19])


def _machine() -> str:
    """This machine and PID namespace: Linux boot id and ``/proc/self/ns/pid`` (the host name elsewhere).

    Two processes with equal ``_machine()`` see each other's PIDs; containers and reboots differ."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = None
    return f"{boot}/{ns}" if boot and ns else socket.gethostname()


_ACTIVE: set[str] = set()  # the ``call`` tokens of the tune() calls running in this process


def this_owner(call: str) -> dict[str, Any]:
    """The owner record of a trial run by this process for the ``tune`` call ``call``: ``host``,
    ``machine``, ``pid``, ``start`` (process start time), ``call``."""
    stat = _proc_stat("self")
    return {"host": socket.gethostname(), "machine": _machine(), "pid": os.getpid(), "start": None if stat is None else stat[1],
            "call": call}


def owner_alive(owner: dict[str, Any] | None) -> bool | None:
    """Whether the process of an owner record still runs: True / False, or None when this process
    cannot tell (another machine, no record, or no ``/proc`` and no POSIX ``kill``)."""
    if not owner or owner.get("machine") != _machine() or owner.get("host") != socket.gethostname():
        return None
    pid = int(owner["pid"])
    if pid == os.getpid():
        return owner.get("call") in _ACTIVE  # else a call of this process that was interrupted
    stat = _proc_stat(pid)
    if stat is not None:
        return stat[0] not in ("Z", "X") and (owner.get("start") is None or stat[1] == owner["start"])
    if os.path.isdir("/proc"):
        return False  # Linux, and no such process
    if os.name != "posix":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------- the lock


class StudyLock:
    """An inter-process mutex for every ``tune`` call on one storage (``with lock: ...``).

    Args:
        url: the storage's RDB URL, or None (a lock within this process only). SQLite files are
            locked with ``flock`` on ``<file>.nvformer-lock`` (released by the kernel when a worker
            dies; the file stays); PostgreSQL and MySQL with an advisory lock of the database
            (released when the worker's connection closes); other URLs within the process only.
    """

    _local = threading.Lock()

    def __init__(self, url: str | None) -> None:
        self.kind, self.path, self.url, self._engine = "process", None, url, None
        self._held: Any = None
        if url is None:
            return
        import sqlalchemy

        u = sqlalchemy.engine.make_url(url)
        backend = u.get_backend_name()
        if backend == "sqlite" and u.database not in (None, "", ":memory:"):
            try:
                import fcntl  # noqa: F401
            except ImportError:
                return
            self.kind, self.path = "file", Path(u.database).with_name(Path(u.database).name + ".nvformer-lock")
        elif backend in ("postgresql", "mysql", "mariadb"):
            self.kind = "postgresql" if backend == "postgresql" else "mysql"
            digest = hashlib.blake2b(f"nvformer.tune/{u.database}".encode(), digest_size=8).digest()
            self.key = int.from_bytes(digest, "big", signed=True)  # PostgreSQL: a bigint
            self.name = f"nvformer.tune/{u.database}"[:64]  # MySQL: a name of at most 64 characters

    def __enter__(self) -> StudyLock:
        if self.kind == "process":
            self._local.acquire()
        elif self.kind == "file":
            import fcntl

            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            except BaseException:
                f.close()
                raise
            self._held = f
        else:
            import sqlalchemy

            if self._engine is None:
                self._engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
            conn = self._engine.connect()
            sql = "SELECT pg_advisory_lock(:key)" if self.kind == "postgresql" else "SELECT GET_LOCK(:name, -1)"
            try:
                conn.execute(sqlalchemy.text(sql), {"key": self.key, "name": self.name})
                conn.commit()
            except BaseException:
                conn.close()
                raise
            self._held = conn
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "process":
            self._local.release()
        elif self.kind == "file":
            import fcntl

            fcntl.flock(self._held.fileno(), fcntl.LOCK_UN)
            self._held.close()
        else:
            import sqlalchemy

            sql = "SELECT pg_advisory_unlock(:key)" if self.kind == "postgresql" else "SELECT RELEASE_LOCK(:name)"
            try:
                self._held.execute(sqlalchemy.text(sql), {"key": self.key, "name": self.name})
                self._held.commit()
            finally:
                self._held.close()  # closing the session releases the lock in any case
        self._held = None

    def close(self) -> None:
        """Dispose of the advisory lock's engine (if any)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


# ---------------------------------------------------------------------------------------------- trials


def key(params: dict[str, float]) -> tuple:
    """A parameter point as a hashable key (sorted ``(name, value)`` pairs)."""
    return tuple(sorted((k, float(v)) for k, v in params.items()))


def point(trial) -> tuple:
    """A ``FrozenTrial``'s point: its parameters, or a queued trial's fixed ones."""
    return key(trial.params or trial.system_attrs.get("fixed_params") or {})


@dataclass
class Trials:
    """The trials of a study, as :meth:`SharedStudy.maintain` left them (under the lock).

    ``frozen``: every trial (Optuna ``FrozenTrial``, by number); ``evaluated``: COMPLETE and
    PRUNED ones (the objective ran; ``n_trials`` counts these); ``running``; ``taken``: the points
    of evaluated, running and queued trials, with their numbers (no trial may start at one of them);
    ``identity_done``: a COMPLETE or PRUNED trial at the identity point exists.
    """

    frozen: list
    evaluated: int
    running: list
    taken: dict[tuple, list[int]]
    identity_done: bool


class SharedStudy:
    """An Optuna study opened by one ``tune`` call (see the module docstring).

    Use :meth:`open`; then under ``with self.lock``: :meth:`maintain`, :meth:`start`,
    :meth:`finish`; :meth:`heartbeat` around the objective.
    """

    def __init__(self, study, storage, lock: StudyLock, storage_name: str) -> None:
        self.study, self.storage, self.lock, self.storage_name = study, storage, lock, storage_name
        self.study_id = storage.get_study_id_from_name(study.study_name)
        interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        self.heartbeat_interval: int | None = interval
        self.n_at_open = 0
        self.call = uuid.uuid4().hex
        _ACTIVE.add(self.call)

    # -------------------------------------------------------------------------------------- open

    @classmethod
    def open(cls, storage: Any, out_dir: Path | None, study_name: str, direction: str, record: dict[str, Any]) -> SharedStudy:
        """Create or load the study ``study_name`` (under the lock), check ``direction`` and the
        search-space ``record`` (``{"params": {name: [low, high, log]}, "space": str}``) against
        what the study recorded, and record them on a new study.

        ``storage``: None (SQLite ``out_dir/study.db``, or in memory without ``out_dir``), an RDB
        URL (opened with a heartbeat) or an Optuna storage object."""
        import optuna

        url, name = None, None
        if storage is None and out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            storage = f"sqlite:///{(out_dir / 'study.db').resolve()}"
        if storage is None:
            backend, name = optuna.storages.InMemoryStorage(), "in-memory"
        elif isinstance(storage, str):
            url = name = storage
        else:
            backend, name = storage, type(storage).__name__
            url = storage.url if isinstance(storage, optuna.storages.RDBStorage) else None
        lock = StudyLock(url)
        with lock:
            if isinstance(storage, str):
                kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    backend = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
                                                         grace_period=GRACE_SECONDS)
            study = optuna.create_study(study_name=study_name, storage=backend, direction=direction, load_if_exists=True,
                                        sampler=optuna.samplers.RandomSampler())
            shared = cls(study, backend, lock, name)
            try:
                shared._check_direction(direction)
                shared._check_space(record)
            except BaseException:
                shared.close()
                raise
            shared.n_at_open = len(study.get_trials(deepcopy=False))
        return shared

    def _where(self) -> str:
        return f"study {self.study.study_name!r} in {self.storage_name}"

    def _check_direction(self, direction: str) -> None:
        have = self.study.direction.name.lower()
        if have != direction:
            raise ValueError(f"tune: `direction` is {direction!r} but {self._where()} {have}s; pass a new `study_name` (or out_dir)")

    def _check_space(self, record: dict[str, Any]) -> None:
        have = self.study.user_attrs.get(SPACE)
        if have is None:  # a new study, or one made before spaces were recorded: read its trials' ranges
            dists: dict[str, Any] = {}
            for t in self.study.get_trials(deepcopy=False):
                dists.update({k: [d.low, d.high, d.log] for k, d in t.distributions.items()})
            if dists:
                have = {"params": dists, "space": "the trial parameters " + ", ".join(dists)}
        if have is not None and json.loads(json.dumps(have["params"])) != json.loads(json.dumps(record["params"])):
            raise ValueError(f"tune: `space` is {record['space']} but {self._where()} searched {have['space']}; "
                             "pass the same `space`, or a new `study_name` (or out_dir) for a new study")
        if SPACE not in self.study.user_attrs:
            self.study.set_user_attr(SPACE, record)

    # -------------------------------------------------------------------------------------- trials

    def _trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def _fail(self, number: int, key: str, reason: str) -> None:
        import optuna

        trial_id = self._trial_id(number)
        try:
            self.storage.set_trial_system_attr(trial_id, key, reason)
            self.storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # finished meanwhile by its worker or another storage client

    def _dead(self, t) -> str | None:
        """Why the RUNNING trial ``t`` is dead, or None (alive, or this process cannot tell)."""
        owner = t.system_attrs.get(OWNER)
        if owner_alive(owner) is False:
            return f"its worker (pid {owner['pid']} on {owner['host']}) is gone"
        if owner is None and t.datetime_start is not None and datetime.now() - t.datetime_start > timedelta(seconds=GRACE_SECONDS):
            return f"no worker recorded itself in {GRACE_SECONDS} s"
        return None

    def maintain(self, identity: dict[str, float]) -> Trials:
        """Fail dead RUNNING trials, then read the study (call under the lock)."""
        import optuna

        S = optuna.trial.TrialState
        for t in self.study.get_trials(deepcopy=False, states=(S.RUNNING,)):
            why = self._dead(t)
            if why is not None:
                self._fail(t.number, DIED, why)
        if self.heartbeat_interval is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
        frozen = self.study.get_trials(deepcopy=False)
        taken: dict[tuple, list[int]] = {}
        for t in frozen:
            if t.state in (S.COMPLETE, S.PRUNED, S.RUNNING, S.WAITING):
                taken.setdefault(point(t), []).append(t.number)
        ident = key(identity)
        return Trials(frozen=frozen, evaluated=sum(t.state in (S.COMPLETE, S.PRUNED) for t in frozen),
                      running=[t for t in frozen if t.state == S.RUNNING], taken=taken,
                      identity_done=any(t.state in (S.COMPLETE, S.PRUNED) and point(t) == ident for t in frozen))

    def retry_point(self, trials: Trials, names: list[str]) -> tuple[dict[str, float], int] | None:
        """The point of the first dead trial to re-run, and its number: every parameter in
        ``names``, not taken, and dead only once (a point that killed two workers is dropped)."""
        died = [t for t in trials.frozen if t.state.name == "FAIL" and ERROR not in t.system_attrs and DUPLICATE not in t.system_attrs]
        deaths = Counter(point(t) for t in died)
        for t in died:
            p = point(t)
            if p not in trials.taken and deaths[p] == 1 and sorted(k for k, _ in p) == sorted(names):
                return dict(p), t.number
        return None

    def start(self, trials: Trials, n_trials: int, identity: dict[str, float], distributions: dict[str, Any]):
        """Start the next trial if the study needs one (call under the lock): the identity first
        if it has not been evaluated, then dead trials' points, else a sampled point. Returns the
        Optuna ``Trial`` (parameters suggested, owner recorded) or None: ``n_trials`` trials are
        evaluated or running (the identity also runs past ``n_trials`` if it never ran)."""
        ident = key(identity)
        need_identity = not trials.identity_done and ident not in trials.taken
        if trials.evaluated + len(trials.running) >= n_trials and not need_identity:
            return None
        if not any(t.state.name == "WAITING" for t in trials.frozen):
            if need_identity:
                self.study.enqueue_trial(identity)
            else:
                retry = self.retry_point(trials, list(distributions))
                if retry is not None:
                    self.study.enqueue_trial(retry[0], user_attrs={RETRY_OF: retry[1]})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = self.study.ask(distributions)
        trial_id = self._trial_id(trial.number)
        self.storage.set_trial_system_attr(trial_id, OWNER, this_owner(self.call))
        if self.heartbeat_interval is not None:
            self.storage.record_heartbeat(trial_id)
        return trial

    def duplicate_of(self, trial, trials: Trials) -> int | None:
        """The number of another trial already at ``trial``'s point (evaluated, running or queued), or None."""
        others = [n for n in trials.taken.get(key(trial.params), []) if n != trial.number]
        return others[0] if others else None

    def skip(self, trial, other: int) -> None:
        """Mark ``trial`` FAIL without evaluating it: its point is that of trial ``other``."""
        self._fail(trial.number, DUPLICATE, f"the point of trial {other}")

    def finish(self, trial, value: float | None = None, *, pruned: str | None = None, died: str | None = None,
               error: str | None = None) -> bool:
        """Tell the study how ``trial`` ended (call under the lock): ``value`` (COMPLETE), or
        ``pruned`` / ``died`` / ``error`` (the reason). Returns False if the trial had already
        been finished by another worker that took it for dead."""
        import optuna

        S = optuna.trial.TrialState
        trial_id = self._trial_id(trial.number)
        if self.storage.get_trial(trial_id).state.is_finished():
            return False
        for attr, text in ((NOTE, pruned), (DIED, died), (ERROR, error)):
            if text is not None:
                self.storage.set_trial_system_attr(trial_id, attr, text)
        if value is not None:
            self.study.tell(trial, value)
        else:
            self.study.tell(trial, state=S.PRUNED if pruned is not None else S.FAIL)
        return True

    @contextlib.contextmanager
    def heartbeat(self, trial) -> Iterator[None]:
        """Record the trial's heartbeat every ``heartbeat_interval`` seconds in a thread (if the storage has one)."""
        if self.heartbeat_interval is None:
            yield
            return
        trial_id, stop = self._trial_id(trial.number), threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_interval):
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:  # a busy database: the next beat tries again
                    pass

        thread = threading.Thread(target=beat, name=f"nvformer-heartbeat-{trial.number}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def waits_for(self, trials: Trials) -> bool:
        """Whether a running trial of another worker may still finish or be found dead: its
        process is alive on this machine, or the storage has a heartbeat."""
        return any(owner_alive(t.system_attrs.get(OWNER)) or (self.heartbeat_interval is not None and OWNER in t.system_attrs)
                   for t in trials.running)

    def close(self) -> None:
        """End this call's use of the study: its trials no longer count as running in this process."""
        _ACTIVE.discard(self.call)
        self.lock.close()


def run_seed(seed: int, n_existing: int) -> int:
    """The sampler seed of a ``tune`` call: ``seed`` on a new study, else a hash of ``seed`` and the
    number of trials the study had, so a resumed worker never replays its earlier draws."""
    if n_existing == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}/{n_existing}".encode(), digest_size=4).digest(), "big")


def sleep_poll() -> None:
    time.sleep(POLL_SECONDS)

"""Worker processes: spawn, watch, restart, recycle.

``cuebx worker --processes N`` runs N worker processes under one supervisor. Each worker
process is a child started with multiprocessing's *spawn* method (a fresh interpreter, never a
fork of a process that holds connections and threads): it imports the app, opens its own
connection and registers its own consumers, so RabbitMQ spreads messages over the children by
itself and puts a dead child's unacked messages back in their queues. The supervisor opens no
broker connection and hands no message around; it starts the children, watches them, restarts
one that crashed (with backoff, giving up on a crash loop), replaces one that reached
``max_tasks_per_child`` or ``max_memory_per_child`` (the replacement first), and stops them
all on SIGTERM or SIGINT::

    supervisor (no broker connection)
      ├── worker-1   app, connection, consumers
      ├── worker-2   app, connection, consumers
      └── ...

The supervisor and each child talk over one duplex pipe (`multiprocessing.Pipe`):

- child → supervisor: `Status` messages: ``started`` (app imported), ``ready`` (consumers
  registered), ``heartbeat`` (every `HEARTBEAT_INTERVAL` seconds, with the tasks run so far
  and the resident memory), ``recycle`` (a limit was reached: start my replacement),
  ``stopping`` (its worker began to stop);
- supervisor → child: ``"stop"`` (finish or requeue running tasks within the shutdown
  timeout, then exit 0) and ``"stop-now"`` (requeue at once).

End of file on the pipe tells either side that the other is gone: a child whose supervisor
died stops gracefully instead of running on unsupervised. What the supervisor knows of every
child is `Supervisor.health`, and each change of a child's state is one log line on
``cuebx.supervisor``.

Signals: the supervisor relays SIGTERM and SIGINT to its children over the pipes rather than
as signals. Ctrl-C sends SIGINT to the whole process group, and systemd's default stop sends
SIGTERM to every process of the service: a relayed signal on top would count as the "second
signal" that stops a worker at once. So children ignore SIGINT, treat one SIGTERM sent to them
directly as a graceful stop (a second one as an immediate stop), and a ``"stop"`` that comes
on top of either changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import multiprocessing
import os
import pickle
import re
import resource
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from cuebx.app import Cuebx
from cuebx.errors import ConfigurationError, CuebxError
from cuebx.middleware import Middleware, Outcome, Received
from cuebx.settings import check_count
from cuebx.worker import Worker

__all__ = [
    "CHILD_LOG_FORMAT",
    "HEARTBEAT_INTERVAL",
    "Command",
    "GiveUp",
    "Restart",
    "RestartPolicy",
    "Status",
    "Supervisor",
    "TaskCounter",
    "WorkerSpec",
    "cpu_count",
    "describe_exit",
    "parse_processes",
    "parse_size",
    "resident_memory",
]

logger = logging.getLogger("cuebx.supervisor")

#: Seconds between two heartbeats of a worker process.
HEARTBEAT_INTERVAL = 1.0
#: Heartbeats a worker process may miss before the supervisor calls it stale.
STALE_AFTER = 3
#: How worker processes format their log records: the process name says which child wrote it.
CHILD_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"

Command = Literal["stop", "stop-now"]
StatusKind = Literal["started", "ready", "heartbeat", "recycle", "stopping"]
ChildState = Literal["spawned", "started", "ready", "recycling", "stopping", "exited"]


# -- values and pure decisions ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status:
    """One message from a worker process to its supervisor.

    Attributes:
        kind: what happened: ``started``, ``ready``, ``heartbeat``, ``recycle``, ``stopping``.
        pid: the worker process's id.
        tasks: handler runs so far, when the process counts them (with a task limit).
        rss: its resident memory in bytes, when known.
        reason: why it asks to be replaced (``recycle`` only).
    """

    kind: StatusKind
    pid: int
    tasks: int | None = None
    rss: int | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Restart:
    """Start the slot's worker process again after `delay` seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop supervising: the crashes say restarting does not help. `reason` says which."""

    reason: str


class RestartPolicy:
    """When to restart a crashed worker process, and when to give up.

    A crashed process is restarted after a backoff that doubles with each crash of its slot
    within `window` seconds (`backoff`, twice that, ... up to `max_backoff`). The supervisor
    gives up, stopping everything with a non-zero exit, when processes crashed more than
    `max_restarts` times within `window` seconds, or when one slot's process exited before it
    was ready (its consumers registered) `max_start_failures` times in a row: an app that
    cannot be imported or a broker that cannot be reached will not get better by restarting.

    The default of 20 restarts a minute leaves room for a message that kills every worker
    it reaches: RabbitMQ (quorum queues) or cuebx (classic ones) dead-letters it after the
    app's ``delivery_limit`` deliveries, 10 by default.
    """

    def __init__(
        self,
        *,
        max_restarts: int = 20,
        window: float = 60.0,
        max_start_failures: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
    ) -> None:
        self.max_restarts = check_count(max_restarts, "RestartPolicy", "max_restarts", low=0)
        self.max_start_failures = check_count(
            max_start_failures, "RestartPolicy", "max_start_failures"
        )
        self.window = window
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._crashes: deque[float] = deque()
        self._by_slot: dict[int, deque[float]] = {}
        self._start_failures: dict[int, int] = {}

    def ready(self, slot: int) -> None:
        """A process of `slot` registered its consumers: its start-failure streak ends."""
        self._start_failures.pop(slot, None)

    def crashed(self, slot: int, now: float, *, was_ready: bool) -> Restart | GiveUp:
        """Decide about a process of `slot` that died at `now` (monotonic seconds)."""
        _prune(self._crashes, now - self.window)
        self._crashes.append(now)
        mine = self._by_slot.setdefault(slot, deque())
        _prune(mine, now - self.window)
        mine.append(now)
        if not was_ready:
            failures = self._start_failures[slot] = self._start_failures.get(slot, 0) + 1
            if failures >= self.max_start_failures:
                return GiveUp(f"worker-{slot} exited before it was ready {failures} times in a row")
        if len(self._crashes) > self.max_restarts:
            return GiveUp(
                f"{len(self._crashes)} crashes within {self.window:g}s "
                f"(at most {self.max_restarts} restarts)"
            )
        return Restart(min(self.max_backoff, self.backoff * 2 ** (len(mine) - 1)))


def _prune(times: deque[float], before: float) -> None:
    while times and times[0] < before:
        times.popleft()


def describe_exit(code: int | None) -> str:
    """Say how a process ended from its exit code (negative: the signal that killed it)."""
    if code is None:
        return "is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
}


def parse_size(value: str | int, what: str = "size") -> int:
    """Read a memory size in bytes: ``512MiB``, ``2GB``, ``300M``, ``1048576``.

    ``KiB``/``MiB``/``GiB`` and the bare ``K``/``M``/``G`` (as Docker and ``ps`` count) are
    powers of 1024; ``KB``/``MB``/``GB`` are powers of 1000. Case does not matter.

    Raises:
        ConfigurationError: `value` is not a size above zero; the message names `what`.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.match(str(value))
        unit = match[2].lower() if match else None
        if match is None or unit not in _UNITS:
            raise ConfigurationError(
                f"{what}: expected a size such as 512MiB, 2GB or a number of bytes, got {value!r}"
            )
        size = int(float(match[1]) * _UNITS[unit])
    if size <= 0:
        raise ConfigurationError(f"{what}: must be above zero, got {value!r}")
    return size


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def parse_processes(value: str | int, what: str = "processes") -> int:
    """Read ``--processes``: a whole number above zero, or ``auto`` for one per CPU.

    Raises:
        ConfigurationError: anything else; the message names `what`.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return cpu_count()
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigurationError(
            f"{what}: expected a whole number above zero or 'auto', got {value!r}"
        )
    return number


def resident_memory() -> int | None:
    """This process's resident memory in bytes, or None where it cannot be read.

    Linux's ``/proc/self/status`` (VmRSS) gives the current figure in one small read, with no
    dependency. Elsewhere the peak from ``getrusage`` stands in: it only grows, which is what
    a leak does too.
    """
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if not peak:
        return None
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS


def _size(nbytes: int) -> str:
    return f"{nbytes / 1024**2:.0f}MiB"


def _processes(count: int) -> str:
    return f"{count} worker process" if count == 1 else f"{count} worker processes"


# -- the worker process -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What every worker process runs; pickled to each spawned child.

    Attributes:
        app: a picklable callable that returns the app, imported afresh in each child: a
            module-level function, or `functools.partial` over one (``cuebx worker`` uses
            ``partial(load_app, "module:attribute")``).
        queues: the queues to consume (all of the app's when None).
        prefetch: prefetch for every queue, else each queue's own.
        shutdown_timeout: seconds running handlers may finish on a graceful stop.
        max_tasks: replace the process after this many handler runs.
        max_memory: replace the process once its resident memory is above this many bytes.
        log_level: the level of the child's log records (they go to stderr).
        backend_options: anyio's backend options for the child's event loop (uvloop).
        heartbeat_interval: seconds between heartbeats.
    """

    app: Callable[[], Cuebx]
    queues: tuple[str, ...] | None = None
    prefetch: int | None = None
    shutdown_timeout: float | None = None
    max_tasks: int | None = None
    max_memory: int | None = None
    log_level: str = "INFO"
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    heartbeat_interval: float = HEARTBEAT_INTERVAL


class TaskCounter(Middleware):
    """Count handler runs; call `on_limit` once when the count reaches `limit`.

    The supervisor installs it in a worker process given ``max_tasks_per_child``: counting
    through the extension seam leaves the worker itself unaware of process limits.
    """

    def __init__(self, limit: int, on_limit: Callable[[int], None]) -> None:
        self.limit = limit
        self.count = 0
        self._on_limit = on_limit

    async def after_handler(self, received: Received, outcome: Outcome) -> None:
        self.count += 1
        if self.count == self.limit:
            self._on_limit(self.count)


class _Reporter:
    """The child's end of the pipe: sends `Status` messages, never raises for a lost parent."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pid = os.getpid()
        self.counter: TaskCounter | None = None

    def send(self, kind: StatusKind, *, rss: int | None = None, reason: str = "") -> None:
        tasks = None if self.counter is None else self.counter.count
        try:
            self.conn.send(Status(kind, self.pid, tasks, rss, reason))
        except OSError:
            pass  # the supervisor is gone: the command reader sees that and stops the worker


class _Ready:
    """The worker's task_status: report ``ready`` and start heartbeats once consuming."""

    def __init__(self, reporter: _Reporter, group: TaskGroup, spec: WorkerSpec) -> None:
        self._reporter = reporter
        self._group = group
        self._spec = spec

    def started(self, value: None = None) -> None:
        self._reporter.send("ready", rss=resident_memory())
        self._group.start_soon(_heartbeats, self._reporter, self._spec)


def _child_main(spec: WorkerSpec, slot: int, conn: Connection) -> None:
    """The body of a spawned worker process."""
    # Ctrl-C reaches every process of the group: the supervisor alone decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level, format=CHILD_LOG_FORMAT, stream=sys.stderr)
    reporter = _Reporter(conn)
    try:
        app = spec.app()
    except Exception:
        logger.exception("worker-%d could not load the app", slot)
        raise SystemExit(1) from None
    reporter.send("started", rss=resident_memory())
    options = dict(spec.backend_options)
    raise SystemExit(anyio.run(_serve, app, spec, reporter, backend_options=options))


async def _serve(app: Cuebx, spec: WorkerSpec, reporter: _Reporter) -> int:
    """Run one worker until it is told to stop; the exit code of the process."""
    if spec.max_tasks is not None:
        reporter.counter = TaskCounter(spec.max_tasks, functools.partial(_task_limit, reporter))
        app.add_middleware(reporter.counter)
    worker = app.worker(
        queues=spec.queues, prefetch=spec.prefetch, shutdown_timeout=spec.shutdown_timeout
    )
    failed: list[str] = []
    try:
        await app.connect()
        async with anyio.create_task_group() as group:
            group.start_soon(_obey, reporter, worker)
            group.start_soon(_on_sigterm, reporter, worker)
            await worker.run(task_status=_Ready(reporter, group, spec))
            group.cancel_scope.cancel()
    except* CuebxError as errors:
        # What the broker refused (a topology clash, a queue that cannot be consumed): the
        # message names it; a traceback adds nothing.
        failed.extend(dict.fromkeys(str(e) for e in errors.exceptions))
    finally:
        with anyio.CancelScope(shield=True):
            await app.close()
    if failed:
        logger.error("%s", "; ".join(failed))
        return 1
    return 0


def _task_limit(reporter: _Reporter, count: int) -> None:
    reporter.send("recycle", rss=resident_memory(), reason=f"ran {count} tasks")


async def _heartbeats(reporter: _Reporter, spec: WorkerSpec) -> None:
    limit = spec.max_memory
    while True:
        rss = resident_memory()
        reporter.send("heartbeat", rss=rss)
        if limit is not None and rss is not None and rss > limit:
            reason = f"uses {_size(rss)} of memory, over {_size(limit)}"
            reporter.send("recycle", rss=rss, reason=reason)
            limit = None  # asked once; the supervisor stops this process when its successor is up
        await anyio.sleep(spec.heartbeat_interval)


async def _obey(reporter: _Reporter, worker: Worker) -> None:
    """Carry out the supervisor's commands; stop when the supervisor is gone."""
    conn = reporter.conn
    while True:
        await anyio.wait_readable(conn.fileno())
        try:
            command = conn.recv()
        except (EOFError, OSError):
            if not worker.stopping:
                logger.warning("the supervisor is gone: stopping")
                _stop(reporter, worker)
            return
        if command == "stop-now":
            _stop(reporter, worker, immediate=True)
        elif command == "stop" and not worker.stopping:
            _stop(reporter, worker)


async def _on_sigterm(reporter: _Reporter, worker: Worker) -> None:
    """SIGTERM sent to this process itself: graceful, then immediate on a second one.

    Only this process's own SIGTERMs count: one from systemd's stop (sent to every process
    of the service) and the supervisor's ``"stop"`` together are still one graceful stop.
    """
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        received = 0
        async for _ in signals:
            received += 1
            if received > 1:
                logger.warning("SIGTERM again: stopping now, requeueing running tasks")
            _stop(reporter, worker, immediate=received > 1)


def _stop(reporter: _Reporter, worker: Worker, *, immediate: bool = False) -> None:
    if not worker.stopping:
        reporter.send("stopping")
    worker.request_stop(immediate=immediate)


# -- the supervisor ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Child:
    """What the supervisor knows of one worker process."""

    slot: int
    process: BaseProcess
    conn: Connection
    state: ChildState = "spawned"
    spawned_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    heartbeat_at: float | None = None  # time.time() of the last heartbeat
    heartbeat_seen: float | None = None  # time.monotonic() of the same
    tasks: int | None = None
    rss: int | None = None
    stale: bool = False
    told_to_stop: bool = False
    exit_code: int | None = None

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    @property
    def label(self) -> str:
        return f"worker-{self.slot} (pid {self.pid})"

    def tell(self, command: Command) -> None:
        with contextlib.suppress(OSError):  # it died: its exit is on its way
            self.conn.send(command)

    def view(self, now: float) -> dict[str, Any]:
        seen = self.heartbeat_seen
        return {
            "slot": self.slot,
            "name": f"worker-{self.slot}",
            "pid": self.pid,
            "state": self.state,
            "spawned_at": self.spawned_at,
            "ready_at": self.ready_at,
            "last_heartbeat": self.heartbeat_at,
            "heartbeat_age": None if seen is None else round(now - seen, 3),
            "stale": self.stale,
            "tasks": self.tasks,
            "rss": self.rss,
            "exit_code": self.exit_code,
        }


class Supervisor:
    """Run worker processes of an app, restart the ones that crash, recycle, stop them all.

    Args:
        app: a picklable callable returning the app, run in each worker process (see
            `WorkerSpec.app`).
        processes: how many worker processes to keep running.
        queues: queues to consume (all when None).
        prefetch: prefetch for every queue.
        shutdown_timeout: seconds running handlers may finish on a graceful stop.
        stop_grace: seconds a stopping process gets on top of `shutdown_timeout` (to move
            messages to retry or dead-letter queues and close) before it is killed.
        max_tasks_per_child: replace a process after it ran this many tasks.
        max_memory_per_child: replace a process whose resident memory is above this size
            (bytes, or a string for `parse_size`).
        log_level: the worker processes' log level.
        backend_options: anyio backend options for the worker processes' event loops.
        restarts: when to restart and when to give up (`RestartPolicy()` by default).
        heartbeat_interval: seconds between a worker process's heartbeats.

    Raises:
        ConfigurationError: an option is invalid, or `app` cannot be pickled.
    """

    def __init__(
        self,
        app: Callable[[], Cuebx],
        *,
        processes: int = 1,
        queues: Sequence[str] | None = None,
        prefetch: int | None = None,
        shutdown_timeout: float = 30.0,
        stop_grace: float = 40.0,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | str | None = None,
        log_level: str = "INFO",
        backend_options: Mapping[str, Any] | None = None,
        restarts: RestartPolicy | None = None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
    ) -> None:
        where = "Supervisor"
        self.processes = check_count(processes, where, "processes")
        if max_tasks_per_child is not None:
            check_count(max_tasks_per_child, where, "max_tasks_per_child")
        memory = (
            None
            if max_memory_per_child is None
            else parse_size(max_memory_per_child, f"{where}: max_memory_per_child")
        )
        try:
            pickle.dumps(app)
        except Exception as exc:
            raise ConfigurationError(
                f"{where}: app {app!r} cannot be pickled ({exc}); worker processes are "
                "spawned and import it by name: pass a module-level function, or "
                "functools.partial over one"
            ) from None
        self.spec = WorkerSpec(
            app=app,
            queues=None if queues is None else tuple(queues),
            prefetch=prefetch,
            shutdown_timeout=shutdown_timeout,
            max_tasks=max_tasks_per_child,
            max_memory=memory,
            log_level=log_level,
            backend_options=dict(backend_options or {}),
            heartbeat_interval=heartbeat_interval,
        )
        self.restarts = restarts or RestartPolicy()
        self.stop_deadline = shutdown_timeout + stop_grace
        self._context = multiprocessing.get_context("spawn")
        self._children: dict[int, _Child] = {}  # live processes by pid
        self._slots: dict[int, _Child | None] = dict.fromkeys(range(1, self.processes + 1))
        self._restart_at: dict[int, float] = {}  # slot -> monotonic time of its restart
        self._status: Literal["starting", "running", "stopping", "stopped"] = "starting"
        self._all_ready_once = False
        self._restart_count = 0
        self._failure: str | None = None  # why the exit code is not 0
        self._mailbox: MemoryObjectSendStream[Callable[[], None]] | None = None
        self._group: TaskGroup | None = None

    # -- what the outside sees --------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True once a stop began (a signal, `request_stop`, or giving up)."""
        return self._status in ("stopping", "stopped")

    def health(self) -> dict[str, Any]:
        """Every worker process as the supervisor knows it, for health and readiness checks.

        ``ready`` is true while every slot has a process whose consumers are registered and
        nothing is stopping; ``stale`` names processes that missed `STALE_AFTER` heartbeats
        (a blocked event loop). Each child's entry has its ``slot``, ``name``, ``pid``,
        ``state`` (``spawned``, ``started``, ``ready``, ``recycling``, ``stopping``),
        timestamps (``spawned_at``, ``ready_at``, ``last_heartbeat``: `time.time` values),
        ``heartbeat_age`` in seconds, ``tasks`` (counted with a task limit) and ``rss`` in
        bytes. A slot whose process is waiting to be restarted is listed with state
        ``restarting`` and ``restart_in`` seconds. Safe to call from another thread.
        """
        now = time.monotonic()
        live = list(self._children.values())
        children = [c.view(now) for c in live]
        for slot, at in sorted(dict(self._restart_at).items()):
            waiting = {"slot": slot, "name": f"worker-{slot}", "pid": None}
            waiting.update(state="restarting", restart_in=round(max(0.0, at - now), 3))
            children.append(waiting)
        children.sort(key=lambda c: (c["slot"], c["pid"] or 0))
        # A process being replaced still consumes until its replacement is ready.
        consuming = {c.slot for c in live if c.state in ("ready", "recycling")}
        return {
            "status": self._status,
            "ready": not self.stopping and len(consuming) == self.processes,
            "processes": self.processes,
            "restarts": self._restart_count,
            "stale": [c["name"] for c in children if c.get("stale")],
            "children": children,
        }

    # -- running ----------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = True) -> int:
        """Start the worker processes and supervise them until they have all stopped.

        With `handle_signals`, SIGTERM and SIGINT stop the processes gracefully, and a second
        one stops them at once (their running tasks are requeued).

        Returns:
            The exit code for the command line: 0 when every process stopped cleanly;
            1 after giving up on a crash loop, or when a process died abnormally while
            stopping.
        """
        send, receive = anyio.create_memory_object_stream[Callable[[], None]](math.inf)
        self._mailbox = send
        async with send, receive, anyio.create_task_group() as group:
            self._group = group
            if handle_signals:
                group.start_soon(self._relay_signals)
            group.start_soon(self._watch_heartbeats)
            logger.info("starting %s", _processes(self.processes))
            for slot in self._slots:
                self._spawn(slot)
            if self.stopping:  # asked before it ran
                self._stop_all(immediate=False)
            async for action in receive:
                action()
                if self.stopping and not self._children:
                    break
            group.cancel_scope.cancel()
        self._status = "stopped"
        if self._failure:
            logger.error("worker processes stopped: %s; exit code 1", self._failure)
            return 1
        logger.info("all worker processes stopped")
        return 0

    def request_stop(self, *, immediate: bool = False) -> None:
        """Stop every worker process: gracefully, or `immediate` (running tasks requeued)."""
        if self._group is None:  # not running yet: `run` stops what it starts
            self._status = "stopping"
            return
        self._stop_all(immediate=immediate)

    def _stop_all(self, *, immediate: bool) -> None:
        self._status = "stopping"
        self._restart_at.clear()  # pending restarts see `stopping` and do nothing
        for child in list(self._children.values()):
            if not child.told_to_stop:
                self._stop(child)
            if immediate:
                child.tell("stop-now")

    def _post(self, action: Callable[[], None]) -> None:
        assert self._mailbox is not None
        self._mailbox.send_nowait(action)

    def _spawn(self, slot: int) -> None:
        assert self._group is not None
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_child_main, args=(self.spec, slot, theirs), name=f"worker-{slot}"
        )
        process.start()
        theirs.close()  # the child's end lives in the child: its death closes the pipe
        child = _Child(slot, process, ours)
        self._children[child.pid] = child
        self._slots[slot] = child
        logger.info("%s started", child.label)
        self._group.start_soon(self._watch, child)

    async def _watch(self, child: _Child) -> None:
        """Read a child's messages until its pipe closes, then wait for it to exit."""
        conn = child.conn
        try:
            while True:
                await anyio.wait_readable(conn.fileno())
                while conn.poll():
                    message = conn.recv()
                    self._post(functools.partial(self._on_status, child, message))
        except (EOFError, OSError):
            pass
        await anyio.wait_readable(child.process.sentinel)
        child.process.join()
        self._post(functools.partial(self._on_exit, child, child.process.exitcode))

    # -- what children say ------------------------------------------------------------------

    def _on_status(self, child: _Child, status: Any) -> None:
        if not isinstance(status, Status):
            logger.warning("%s sent %r, which is not a status; ignored", child.label, status)
            return
        child.tasks = status.tasks if status.tasks is not None else child.tasks
        child.rss = status.rss if status.rss is not None else child.rss
        if status.kind == "heartbeat":
            self._on_heartbeat(child)
        elif status.kind == "ready":
            self._on_ready(child)
        elif status.kind == "recycle":
            self._on_recycle(child, status.reason)
        elif status.kind == "started" and child.state == "spawned":
            child.state = "started"
            logger.debug("%s imported the app; connecting", child.label)
        elif status.kind == "stopping" and child.state != "stopping":
            child.state = "stopping"
            logger.info("%s is stopping", child.label)

    def _on_heartbeat(self, child: _Child) -> None:
        child.heartbeat_at = time.time()
        child.heartbeat_seen = time.monotonic()
        if child.stale:
            child.stale = False
            logger.info("%s sends heartbeats again", child.label)

    def _on_ready(self, child: _Child) -> None:
        child.ready_at = time.time()
        self._on_heartbeat(child)
        self.restarts.ready(child.slot)
        if child.state in ("stopping", "exited"):
            return
        child.state = "ready"
        logger.info("%s ready: consumers registered", child.label)
        for other in list(self._children.values()):
            if other.slot == child.slot and other is not child and other.state == "recycling":
                logger.info("%s replaces %s: stopping it", child.label, other.label)
                self._stop(other)
        if not self._all_ready_once and all(
            c is not None and c.state == "ready" for c in self._slots.values()
        ):
            self._all_ready_once = True
            self._status = "running"
            logger.info("all %s ready", _processes(self.processes))

    def _on_recycle(self, child: _Child, reason: str) -> None:
        if self.stopping or child.state != "ready" or self._slots[child.slot] is not child:
            return
        child.state = "recycling"
        logger.info("%s %s: starting its replacement", child.label, reason)
        self._spawn(child.slot)

    def _on_exit(self, child: _Child, code: int | None) -> None:
        child.exit_code = code
        child.state = "exited"
        self._children.pop(child.pid, None)
        child.conn.close()
        current = self._slots.get(child.slot) is child
        if current:
            self._slots[child.slot] = None
        if code == 0 and child.told_to_stop:
            logger.info("%s stopped", child.label)
            return
        what = f"{child.label} {describe_exit(code)}"
        if self.stopping:
            logger.error("%s while stopping", what)
            self._failure = self._failure or f"{what} while stopping"
            return
        if child.told_to_stop:  # replaced, and its own stop went wrong
            logger.error("%s while stopping (it was replaced)", what)
            return
        decision = self.restarts.crashed(
            child.slot, time.monotonic(), was_ready=child.ready_at is not None
        )
        if isinstance(decision, GiveUp):
            logger.error(
                "%s; %s: giving up, stopping the other worker processes", what, decision.reason
            )
            self._failure = f"gave up after {what}: {decision.reason}"
            self._stop_all(immediate=False)
        elif not current:
            logger.error("%s while its replacement was starting", what)
        else:
            logger.error("%s; restarting it in %gs", what, decision.delay)
            self._restart_later(child.slot, decision.delay)

    # -- timers -----------------------------------------------------------------------------

    def _restart_later(self, slot: int, delay: float) -> None:
        assert self._group is not None
        self._restart_at[slot] = time.monotonic() + delay
        self._restart_count += 1

        async def later() -> None:
            await anyio.sleep(delay)
            self._post(functools.partial(self._restart, slot))

        self._group.start_soon(later)

    def _restart(self, slot: int) -> None:
        self._restart_at.pop(slot, None)
        if not self.stopping and self._slots.get(slot) is None:
            self._spawn(slot)

    def _stop(self, child: _Child) -> None:
        """Tell `child` to stop; kill it if it has not exited by the stop deadline."""
        assert self._group is not None
        child.told_to_stop = True
        child.state = "stopping"
        child.tell("stop")
        deadline = self.stop_deadline

        async def kill_late() -> None:
            await anyio.sleep(deadline)
            self._post(functools.partial(self._kill, child))

        self._group.start_soon(kill_late)

    def _kill(self, child: _Child) -> None:
        if child.pid not in self._children:
            return
        logger.error(
            "%s did not stop within %gs of being told to: killing it",
            child.label,
            self.stop_deadline,
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)

    async def _watch_heartbeats(self) -> None:
        limit = STALE_AFTER * self.spec.heartbeat_interval
        while True:
            await anyio.sleep(self.spec.heartbeat_interval)
            now = time.monotonic()
            for child in list(self._children.values()):
                seen = child.heartbeat_seen
                if seen is not None and not child.stale and now - seen > limit:
                    child.stale = True
                    logger.warning(
                        "%s sent no heartbeat for %.0fs (is its event loop blocked?)",
                        child.label,
                        now - seen,
                    )

    async def _relay_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.stopping:
                    logger.warning(
                        "%s again: stopping the worker processes now, requeueing running tasks",
                        name,
                    )
                    self._stop_all(immediate=True)
                else:
                    logger.info(
                        "%s: stopping %s; they finish running tasks (send it again to stop now)",
                        name,
                        _processes(len(self._children)),
                    )
                    self._stop_all(immediate=False)

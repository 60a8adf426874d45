"""`Scheduler`: an app's periodic jobs, and the service that fires them in every worker.

The scheduler is a middleware whose only hook is ``serve``: beside each worker's consumers it
runs one `JobLeader` per job, and the broker elects, per job, the one worker that fires it.
So no separate beat process exists, and any number of workers can carry the scheduler.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from cuebx.brokers.base import Broker
from cuebx.durations import Duration
from cuebx.errors import ConfigurationError
from cuebx.middleware import Middleware, WorkerView
from cuebx.scheduling.job import Job, Overlap
from cuebx.scheduling.leader import RETRY, JobLeader, read_status
from cuebx.scheduling.misfire import Misfire
from cuebx.scheduling.overlap import OverlapGuard
from cuebx.scheduling.state import status_queue_name, topology
from cuebx.settings import Settings, check_seconds
from cuebx.task import Task
from cuebx.topology import Topology

__all__ = ["JobReport", "Scheduler"]

logger = logging.getLogger("cuebx.scheduler")


class _App(Protocol):
    """What the scheduler needs of its app (a `cuebx.Cuebx`)."""

    settings: Settings

    @property
    def broker(self) -> Broker: ...
    @property
    def connected(self) -> bool: ...
    async def connect(self) -> None: ...
    def add_middleware(self, middleware: Middleware) -> None: ...


@dataclass(frozen=True, slots=True)
class JobReport:
    """One line of ``cuebx schedule``.

    Attributes:
        job: the job's name.
        task: the task it publishes.
        queue: the task's queue.
        schedule: the schedule in words.
        last: the last slot fired, as the active scheduler last reported it.
        next: the next slot, from now.
        leader: the active scheduler, or None when none reported lately.
        reported: seconds since a scheduler last reported on the job, or None if none ever did.
        previous_leader: the last scheduler that reported, even long ago.
    """

    job: str
    task: str
    queue: str
    schedule: str
    last: int | None
    next: int | None
    leader: str | None
    reported: float | None
    previous_leader: str | None


class Scheduler(Middleware):
    """The periodic jobs of an app, fired by whichever worker the broker elects.

    Reached as ``app.scheduler``; jobs are added by ``@app.periodic`` and `Cuebx.schedule`.

    Attributes:
        jobs: the jobs by name.
        enabled: False keeps this process from running the scheduler (``cuebx worker
            --no-scheduler``; set it before `Cuebx.start_consumers` for the same there).
            Its workers still run the tasks the jobs publish.
        refresh: the longest time, in seconds, between two state messages of an active
            scheduler (60 by default). Keep it well under RabbitMQ's ``consumer_timeout``.
    """

    def __init__(self, app: _App) -> None:
        self._app = app
        self.jobs: dict[str, Job] = {}
        self.enabled = True
        self.refresh = 60.0
        self._guard: OverlapGuard | None = None
        self._serving = False
        self._leaders: dict[str, JobLeader] = {}

    def __repr__(self) -> str:
        return f"<Scheduler jobs={list(self.jobs)} enabled={self.enabled}>"

    @property
    def leading(self) -> frozenset[str]:
        """The jobs this process is the active scheduler of, now."""
        return frozenset(name for name, leader in self._leaders.items() if leader.leading)

    def configure(self, *, enabled: bool | None = None, refresh: Duration | None = None) -> None:
        """Change `enabled` or `refresh` (a duration such as ``"30s"``).

        Raises:
            ConfigurationError: `refresh` is not a duration of at least one second.
        """
        if enabled is not None:
            self.enabled = bool(enabled)
        if refresh is not None:
            seconds = check_seconds(refresh, "scheduler", "refresh", positive=True)
            if seconds < 1:
                raise ConfigurationError(f"scheduler: refresh must be at least 1s, got {refresh!r}")
            self.refresh = seconds

    def add(
        self,
        task: Task[Any, Any],
        *,
        cron: str | None = None,
        every: Duration | None = None,
        tz: str | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        misfire: Misfire = "once",
        overlap: Overlap = "allow",
        overlap_timeout: Duration = "1h",
        name: str | None = None,
    ) -> Job:
        """Schedule `task` (see `Cuebx.schedule`).

        Raises:
            ConfigurationError: an option is wrong, or a job of that name exists.
        """
        job = Job.build(
            task,
            codec=self._app.settings.codec,
            cron=cron,
            every=every,
            tz=tz,
            args=args,
            kwargs=kwargs,
            misfire=misfire,
            overlap=overlap,
            overlap_timeout=overlap_timeout,
            name=name,
        )
        other = self.jobs.get(job.name)
        if other is not None:
            raise ConfigurationError(
                f"job {job.name!r} is already scheduled (task {other.task.name!r}, "
                f"{other.schedule.describe()}); pass name= to tell the jobs apart"
            )
        self.jobs[job.name] = job
        if job.overlap == "skip":
            self._overlap_guard().jobs.add(job.name)
        return job

    def _overlap_guard(self) -> OverlapGuard:
        if self._guard is None:
            app = self._app
            self._guard = OverlapGuard(app.settings.exchange, lambda: app.broker)
            app.add_middleware(self._guard)
        return self._guard

    def topology(self) -> Topology:
        """The queues the jobs keep on the broker (see `cuebx.scheduling.state`)."""
        s = self._app.settings
        return topology(
            s.exchange, ((j.name, j.overlap == "skip") for j in self.jobs.values()), s.queue_type
        )

    # -- the service ------------------------------------------------------------------------

    async def serve(self, worker: WorkerView) -> None:
        """Take part in every job's election beside the worker's consumers, until the stop.

        One scheduler per process: a second worker of the same app does not start another.
        """
        if not (self.enabled and self.jobs) or self._serving:
            return
        self._serving = True
        try:
            broker = worker.broker
            await broker.declare(self.topology())
            identity = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
            logger.info(
                "scheduler %s: in the election of %d job(s): %s",
                identity,
                len(self.jobs),
                ", ".join(self.jobs),
            )
            async with anyio.create_task_group() as group:
                for job in self.jobs.values():
                    group.start_soon(self._elect, job, broker, identity)
        finally:
            self._serving = False

    async def _elect(self, job: Job, broker: Broker, identity: str) -> None:
        """Run the job's side of the election; start it again after an unexpected error."""
        try:
            while True:
                leader = self._leaders[job.name] = JobLeader(
                    job,
                    broker,
                    exchange=self._app.settings.exchange,
                    identity=identity,
                    refresh=self.refresh,
                )
                try:
                    await leader.run()
                except Exception:
                    logger.exception(
                        "job %s: the scheduler failed; starting it again in %gs", job.name, RETRY
                    )
                    await broker.clock.sleep(RETRY)
        finally:
            self._leaders.pop(job.name, None)

    # -- what cuebx schedule shows ----------------------------------------------------------

    async def report(self) -> list[JobReport]:
        """Read each job's last status from the broker, without touching its election.

        The status comes from the job's last-value queue (a basic.get put back at once); the
        state message held by the active scheduler is never taken.
        """
        app = self._app
        if not app.connected:
            await app.connect()
        broker = app.broker
        now = broker.clock.time()
        reports = []
        for job in self.jobs.values():
            status = await read_status(broker, status_queue_name(app.settings.exchange, job.name))
            fresh = status is not None and now - status.written < 3 * status.refresh
            reports.append(
                JobReport(
                    job=job.name,
                    task=job.task.name,
                    queue=job.task.queue,
                    schedule=job.schedule.describe(),
                    last=None if status is None else status.fired,
                    next=job.schedule.next_after(int(now)),
                    leader=status.leader if status is not None and fresh else None,
                    reported=None if status is None else max(0.0, now - status.written),
                    previous_leader=None if status is None else status.leader,
                )
            )
        return reports

"""`Job`: a task, its arguments and its schedule, checked once at registration."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cuebx.durations import Duration
from cuebx.errors import ArgumentsError, ConfigurationError
from cuebx.message import Codec
from cuebx.scheduling.misfire import Misfire
from cuebx.scheduling.schedules import Schedule, build_schedule, slot_text
from cuebx.settings import check_seconds
from cuebx.task import Task

__all__ = ["Job", "Overlap"]

Overlap = Literal["allow", "skip"]

#: Job names end up in queue names and message ids (``cron:<job>:<slot>``).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}")


@dataclass(frozen=True, slots=True)
class Job:
    """A periodic job: which task to publish, with which arguments, on which schedule.

    Built by `Cuebx.periodic` and `Cuebx.schedule`, which check every option.

    Attributes:
        name: unique among the jobs of an exchange; names the job's queues.
        task: the task each fire publishes a message for.
        schedule: when the slots fall.
        args: positional arguments of each message.
        kwargs: keyword arguments of each message.
        misfire: ``"once"`` (one catch-up run for missed slots) or ``"skip"``.
        overlap: ``"allow"`` (fire even while a run is going) or ``"skip"``.
        overlap_timeout: seconds after which a run that never reported its end stops
            holding back the job (``overlap="skip"``).
    """

    name: str
    task: Task[Any, Any]
    schedule: Schedule
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    misfire: Misfire = "once"
    overlap: Overlap = "allow"
    overlap_timeout: float = 3600.0

    @classmethod
    def build(
        cls,
        task: Task[Any, Any],
        *,
        codec: Codec,
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
        """Check the options of one job.

        Raises:
            ConfigurationError: an option is wrong; the message names the job and the option.
        """
        job_name = task.name if name is None else name
        where = f"job {job_name!r}"
        if not isinstance(job_name, str) or not _NAME.fullmatch(job_name):
            raise ConfigurationError(
                f"{where}: a job name is 1 to 200 letters, digits and _ . : - (it names the "
                "job's queues and message ids); pass name="
            )
        if misfire not in ("once", "skip"):
            raise ConfigurationError(f"{where}: misfire must be 'once' or 'skip', got {misfire!r}")
        if overlap not in ("allow", "skip"):
            raise ConfigurationError(f"{where}: overlap must be 'allow' or 'skip', got {overlap!r}")
        if isinstance(args, str | bytes) or not isinstance(args, Sequence):
            raise ConfigurationError(f"{where}: args must be a tuple or list, got {args!r}")
        job = cls(
            name=job_name,
            task=task,
            schedule=build_schedule(where, cron=cron, every=every, tz=tz),
            args=tuple(args),
            kwargs=dict(kwargs or {}),
            misfire=misfire,
            overlap=overlap,
            overlap_timeout=check_seconds(overlap_timeout, where, "overlap_timeout", positive=True),
        )
        try:
            task.encode(codec, job.args, job.kwargs)
        except ArgumentsError as exc:
            raise ConfigurationError(
                f"{where}: args/kwargs do not fit task {task.name!r}: {exc}"
            ) from None
        return job

    @property
    def fingerprint(self) -> str:
        return self.schedule.fingerprint

    def message_id(self, slot: int) -> str:
        """The id of the message fired for `slot`: ``cron:<job>:<slot>``, the same however
        often the slot is fired, so a repeat is recognisable."""
        return f"cron:{self.name}:{slot_text(slot)}"

"""What the scheduler keeps on the broker: the queues per job and the messages in them.

For a job ``J`` of an app on exchange ``X`` (``cuebx`` by default):

- ``X.scheduler.J`` (``x-single-active-consumer``): the job's state message, held unacked
  by the active scheduler;
- ``X.scheduler-status.J`` (``x-max-length: 1``): the last status the active scheduler
  published, for ``cuebx schedule``;
- ``X.scheduler-running.J`` (``x-max-length: 1``), with ``overlap="skip"`` only: whether a
  run is going.

Every worker that runs the scheduler consumes ``X.scheduler.J``; RabbitMQ delivers to one of
them only, the active consumer, which is the job's active scheduler. The queues are not
bound to the exchange: the scheduler publishes to them through the default exchange. None of
them is deleted when a job leaves the app (delete them yourself, as any queue).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from cuebx.message import OutgoingMessage, new_message_id
from cuebx.topology import QueueSpec, QueueType, Topology

if TYPE_CHECKING:
    from cuebx.brokers.base import Broker

__all__ = [
    "HEADER_JOB",
    "HEADER_SLOT",
    "JobState",
    "JobStatus",
    "RunMarker",
    "decode",
    "encode",
    "read_latest",
    "rank",
    "running_queue_name",
    "state_queue_name",
    "status_queue_name",
    "topology",
    "wins_over",
]

#: Headers of a fired task message: the job and its slot (UTC ISO 8601).
HEADER_JOB = "x-cuebx-job"
HEADER_SLOT = "x-cuebx-slot"

_CONTENT_TYPE = "application/json"


def state_queue_name(exchange: str, job: str) -> str:
    """The job's election queue: ``cuebx.scheduler.cleanup``."""
    return f"{exchange}.scheduler.{job}"


def status_queue_name(exchange: str, job: str) -> str:
    """The job's last-value status queue: ``cuebx.scheduler-status.cleanup``."""
    return f"{exchange}.scheduler-status.{job}"


def running_queue_name(exchange: str, job: str) -> str:
    """The job's run marker queue (``overlap="skip"``): ``cuebx.scheduler-running.cleanup``."""
    return f"{exchange}.scheduler-running.{job}"


def topology(
    exchange: str, jobs: Iterable[tuple[str, bool]], queue_type: QueueType = "classic"
) -> Topology:
    """The queues of some jobs, given as (name, whether it needs a run marker).

    They follow the app's queue type: on quorum queues the state of the schedules survives
    the loss of a node as the tasks' queues do.
    """
    base: dict[str, Any] = {"x-queue-type": "quorum"} if queue_type == "quorum" else {}
    queues: list[QueueSpec] = []
    for job, marker in jobs:
        queues.append(
            QueueSpec(
                state_queue_name(exchange, job),
                "scheduler",
                {**base, "x-single-active-consumer": True},
                queue_type,
            )
        )
        last_value = {**base, "x-max-length": 1}
        queues.append(
            QueueSpec(status_queue_name(exchange, job), "scheduler", last_value, queue_type)
        )
        if marker:
            queues.append(
                QueueSpec(running_queue_name(exchange, job), "scheduler", last_value, queue_type)
            )
    return Topology(exchange, tuple(queues))


class JobState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The state message of a job: what a new active scheduler resumes from.

    A *seed* (no `cursor`) is what any scheduler publishes when it starts: it only makes sure
    the queue is never empty, and loses against any real state.

    Attributes:
        job: the job's name.
        fingerprint: the schedule the cursor belongs to (see `Schedule.fingerprint`).
        cursor: the last slot the job is done with, epoch seconds; None for a seed.
        fired: the last slot published, for ``cuebx schedule``.
        seq: raised by one with each state published: the newest state has the highest.
        leader: who published it (host, process, scheduler).
        written: when, on the publisher's broker clock.
    """

    job: str
    fingerprint: str = ""
    cursor: int | None = None
    fired: int | None = None
    seq: int = 0
    leader: str = ""
    written: float = 0.0

    @property
    def seed(self) -> bool:
        return self.cursor is None


def wins_over(a: JobState, b: JobState) -> bool:
    """Tell whether state `a` is newer than `b`: real over seed, then seq, then cursor."""
    return rank(a) > rank(b)


def rank(state: JobState) -> tuple[bool, int, int]:
    """Order states by how new they are (see `wins_over`)."""
    return (state.cursor is not None, state.seq, state.cursor or 0)


class JobStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the active scheduler says about a job, read by ``cuebx schedule``.

    Attributes:
        job: the job's name.
        schedule: the schedule in words.
        leader: the active scheduler.
        fired: the last slot published (epoch seconds).
        next: the next slot.
        written: when this was published (broker clock, epoch seconds).
        refresh: how often the active scheduler publishes it at least (seconds).
    """

    job: str
    schedule: str = ""
    leader: str = ""
    fired: int | None = None
    next: int | None = None
    written: float = 0.0
    refresh: float = 60.0


class RunMarker(msgspec.Struct, kw_only=True):
    """Whether the run of a slot is going (``overlap="skip"``).

    Attributes:
        slot: the slot whose run it is about.
        running: True from the fire until the run succeeds or is dead-lettered.
        until: after this time (epoch seconds) a running marker no longer counts: the run
            died without saying so (its message purged, say).
    """

    slot: int
    running: bool
    until: float = 0.0


_encoder = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {
    kind: msgspec.json.Decoder(kind) for kind in (JobState, JobStatus, RunMarker)
}


def encode(value: JobState | JobStatus | RunMarker, kind: str) -> OutgoingMessage:
    """A persistent message carrying `value`, with a message id saying what it is."""
    message_id = f"{kind}:{new_message_id()}"
    return OutgoingMessage(
        body=_encoder.encode(value),
        message_id=message_id,
        correlation_id=message_id,
        content_type=_CONTENT_TYPE,
        headers={},
        timestamp=datetime.now(UTC),
    )


T = TypeVar("T", JobState, JobStatus, RunMarker)


def decode(kind: type[T], body: bytes) -> T:
    """Decode a body into `kind`.

    Raises:
        msgspec.DecodeError: it is not one (a message someone else put in the queue).
    """
    value: T = _decoders[kind].decode(body)
    return value


async def read_latest(broker: Broker, queue: str, kind: type[T]) -> T | None:
    """Read the message at the head of a one-message state queue without taking it.

    None when the queue does not exist, is empty, or holds something that is not a `kind`
    (the next write replaces it).
    """
    try:
        found = await broker.peek(queue, 1)
    except LookupError:
        return None
    if not found:
        return None
    try:
        return decode(kind, found[0].body)
    except msgspec.MsgspecError:
        return None

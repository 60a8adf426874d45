"""``overlap="skip"``: at most one run of a job at a time, known on the broker.

Without a results store, the scheduler learns that a run is going from a marker in the job's
last-value queue ``<exchange>.scheduler-running.<job>`` (``x-max-length: 1``, so a new
marker replaces the old one):

1. before it fires a slot, the active scheduler reads the marker; a running marker of another
   slot, not yet past its ``until``, means the previous run is going: the slot is skipped.
   Otherwise it publishes a running marker for the slot, then the task message;
2. the worker that ends the run (the handler succeeded, or the message was dead-lettered)
   replaces the marker by a finished one, through `OverlapGuard`. A failure that will be
   retried ends nothing: the run goes on in its next attempt;
3. a run that ends without saying so (its message purged, dropped by a quorum queue's
   delivery limit) holds the job back until ``overlap_timeout`` after its fire, no longer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from cuebx.brokers.base import Broker
from cuebx.message import DeadLetterReason
from cuebx.middleware import Middleware, Outcome, Received, Skip
from cuebx.scheduling.job import Job
from cuebx.scheduling.state import (
    HEADER_JOB,
    HEADER_SLOT,
    RunMarker,
    encode,
    read_latest,
    running_queue_name,
)

__all__ = ["OverlapGuard", "claim", "read_marker", "release"]

logger = logging.getLogger("cuebx.scheduler")


async def read_marker(broker: Broker, queue: str) -> RunMarker | None:
    """Read a job's run marker without taking it (None: no run ever marked)."""
    return await read_latest(broker, queue, RunMarker)


async def claim(broker: Broker, exchange: str, job: Job, slot: int, now: float) -> int | None:
    """Mark the run of `slot` as going, unless the run of another slot still is.

    Returns:
        None once the slot is claimed; else the slot whose run holds the job back.
    """
    queue = running_queue_name(exchange, job.name)
    marker = await read_marker(broker, queue)
    if marker is not None and marker.running and marker.slot != slot and marker.until > now:
        return marker.slot
    running = RunMarker(slot=slot, running=True, until=now + job.overlap_timeout)
    await broker.publish("", queue, encode(running, "run"))
    return None


async def release(broker: Broker, exchange: str, job: str, slot: int) -> None:
    """Say that the run of `slot` ended, unless the marker is about another run by now."""
    queue = running_queue_name(exchange, job)
    marker = await read_marker(broker, queue)
    if marker is None or not marker.running or marker.slot != slot:
        return
    await broker.publish("", queue, encode(RunMarker(slot=slot, running=False), "run"))


class OverlapGuard(Middleware):
    """Reports the end of each run of an ``overlap="skip"`` job, in whichever worker runs it.

    Installed by the app only when a job asks for ``overlap="skip"``, so other apps pay
    nothing per message. It runs in every worker, with or without the scheduler.

    Args:
        exchange: the app's exchange, which names the marker queues.
        broker: returns the app's broker.
    """

    def __init__(self, exchange: str, broker: Callable[[], Broker]) -> None:
        self.exchange = exchange
        self.broker = broker
        self.jobs: set[str] = set()

    async def after_handler(self, received: Received, outcome: Outcome) -> None:
        """A run ends when its handler succeeds (or a middleware skipped it)."""
        if outcome.error is None or isinstance(outcome.error, Skip):
            await self._release(received.context.headers)

    async def on_dead_letter(
        self, received: Received, reason: DeadLetterReason, error: BaseException | str
    ) -> None:
        """A run also ends when its message is dead-lettered: no attempt follows."""
        await self._release(received.context.headers)

    async def _release(self, headers: Any) -> None:
        job = headers.get(HEADER_JOB)
        if job not in self.jobs:
            return
        try:
            slot = _slot(headers.get(HEADER_SLOT))
        except (TypeError, ValueError):
            logger.warning("job %s: message without a readable %s header", job, HEADER_SLOT)
            return
        await release(self.broker(), self.exchange, job, slot)


def _slot(text: Any) -> int:
    moment = datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return int(moment.timestamp())

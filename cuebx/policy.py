"""Pure decisions: what the worker does with a message, before and after its handler.

Before: `admit` sorts a delivery into one to run (`Run`), one to count as a classic queue's
redelivery (`CountRedelivery`), one that came before its ``x-cuebx-eta`` (`NotDue`), or
poison to dead-letter at once (`DeadLetter`). After a failure: `RetryPolicy.on_failure`
answers `RetryThrough` (a tier), `RetryAfter` (the delay ladder) or `DeadLetter`. The worker
asks and carries out the answer; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from cuebx.durations import to_ms
from cuebx.errors import ConfigurationError, Reject, Retry
from cuebx.message import (
    HEADER_REDELIVERIES,
    HEADER_TASK,
    Codec,
    DeadLetterReason,
    codec_for_content_type,
    eta_of,
    header_count,
)

__all__ = [
    "Admission",
    "CountRedelivery",
    "DELAYED_RETRY_LIMIT",
    "DeadLetter",
    "Decision",
    "Decodes",
    "NotDue",
    "RetryAfter",
    "RetryPolicy",
    "RetryThrough",
    "RetrySpec",
    "Run",
    "admit",
    "retry_delays",
]

RetrySpec = Retry | Sequence[str | int | float | timedelta] | None

#: How many times a task without a ``retries=`` list may ``raise Retry(delay=...)``: its
#: attempt 10 (the 11th) that raises it again is dead-lettered as ``exhausted``. A task with
#: a list has as many retries as the list is long, whichever way they are asked for.
DELAYED_RETRY_LIMIT = 10

#: An eta within a microsecond of the clock is due: epoch seconds as floats are exact to
#: about a quarter of one, and `cuebx.delays` counts whole microseconds.
_SLOP_MS = 0.001


@dataclass(frozen=True, slots=True)
class RetryThrough:
    """Publish a copy to the retry tier `queue` with ``x-retry-attempt = attempt``, then ack.

    `delay_ms` is the tier's TTL: when the next attempt is due.
    """

    queue: str
    attempt: int
    delay_ms: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Publish a stamped copy to the dead-letter queue (or drop it if there is none), then ack.

    Attributes:
        reason: the ``x-cuebx-reason`` it is stamped with.
        detail: why, when the decision knows better than the handler's error (poison input).
    """

    reason: DeadLetterReason
    detail: BaseException | str = ""


@dataclass(frozen=True, slots=True)
class RetryAfter:
    """Send a copy down the delay ladder with ``x-retry-attempt = attempt``, then ack.

    `delay_ms` is when the next attempt is due, from now (``Retry(delay=)``).
    """

    attempt: int
    delay_ms: int


Decision = RetryThrough | RetryAfter | DeadLetter

T = TypeVar("T", bound="Decodes")


class Decodes(Protocol):
    """A task, as far as admitting its messages goes."""

    @property
    def name(self) -> str: ...
    def decode(self, codec: Codec, body: bytes) -> msgspec.Struct: ...


class Run(msgspec.Struct, Generic[T], frozen=True):
    """Run `task`'s handler with the decoded, validated `arguments`."""

    task: T
    arguments: msgspec.Struct


@dataclass(frozen=True, slots=True)
class CountRedelivery:
    """Move the message to the back of its queue with ``x-cuebx-redeliveries = count``."""

    count: int


@dataclass(frozen=True, slots=True)
class NotDue:
    """The message came before its ``x-cuebx-eta`` (the worker's clock is behind the one
    that set it): send it back down the delay ladder, due at `eta_ms`, then ack. It is
    neither run early nor held by the worker."""

    eta_ms: int


Admission = Run[T] | CountRedelivery | NotDue | DeadLetter


def admit(
    *,
    queue: str,
    headers: Mapping[str, Any],
    body: bytes,
    content_type: str | None,
    redelivered: bool,
    tasks: Mapping[str, T],
    max_size: int,
    redelivery_limit: int | None = None,
    now: float | None = None,
    subscriber: str | None = None,
) -> Admission[T]:
    """Decide what to do with a delivery before any handler sees it.

    Args:
        queue: the queue it came from (named in the reasons).
        headers: its headers; ``x-cuebx-task`` names the task.
        body: its body, to be decoded into the task's arguments.
        content_type: its content type (none means JSON).
        redelivered: RabbitMQ's flag: an earlier delivery ended without a settle.
        tasks: the queue's tasks by name; a message without ``x-cuebx-task`` on a queue with
            exactly one task is that task's (plain publishers keep working).
        max_size: bodies larger than this are ``too-large``.
        redelivery_limit: on a classic queue, the deliveries after which a message that
            keeps ending unsettled (it kills workers) is dead-lettered; None when the broker
            counts (quorum queues) or there is no limit.
        now: the worker's broker clock (epoch seconds): a message whose ``x-cuebx-eta``
            is later is `NotDue`, whatever else it holds. None: etas are not looked at.
        subscriber: the queue's subscriber (``@app.on``), which takes the messages that
            name no task: an event reaches every subscriber's queue, so it cannot name
            one. None: such a message is the queue's only task's, if it has one task.
    """
    if redelivered and redelivery_limit is not None:
        count = header_count(headers.get(HEADER_REDELIVERIES)) + 1
        if count >= redelivery_limit:
            why = f"delivered {count} times without finishing (the limit is {redelivery_limit})"
            return DeadLetter("delivery-limit", why)
        return CountRedelivery(count)
    if now is not None:
        eta = eta_of(headers)
        if eta is not None and eta > now * 1000 + _SLOP_MS:
            return NotDue(eta)
    task = _find_task(queue, headers, tasks, subscriber)
    if isinstance(task, DeadLetter):
        return task
    if len(body) > max_size:
        return DeadLetter(
            "too-large", f"body of {len(body)} bytes is over the limit of {max_size} bytes"
        )
    codec = codec_for_content_type(content_type)
    if codec is None:
        return DeadLetter("undecodable", f"unknown content type {content_type!r}")
    try:
        return Run(task, task.decode(codec, body))
    except msgspec.ValidationError as exc:
        return DeadLetter("invalid-arguments", exc)
    except msgspec.DecodeError as exc:
        return DeadLetter("undecodable", exc)


def _find_task(
    queue: str, headers: Mapping[str, Any], tasks: Mapping[str, T], subscriber: str | None
) -> T | DeadLetter:
    name = headers.get(HEADER_TASK)
    if name is None and subscriber is not None:
        task = tasks.get(subscriber)
    elif name is None:
        task = next(iter(tasks.values())) if len(tasks) == 1 else None
    else:
        task = tasks.get(name) if isinstance(name, str) else None
    if task is not None:
        return task
    known = ", ".join(map(repr, tasks))
    why = (
        f"no task named {name!r} on queue {queue!r} (tasks: {known})"
        if name is not None
        else f"no {HEADER_TASK} header and queue {queue!r} has tasks {known}"
    )
    return DeadLetter("unknown-task", why)


def retry_delays(retries: RetrySpec, *, task: str) -> tuple[int, ...]:
    """Turn a ``retries=`` option into one delay in ms per retry.

    ``["30s", "5m"]`` gives ``(30000, 300000)``; ``Retry(every="1m", times=3)`` gives
    ``(60000, 60000, 60000)``; ``None`` or ``[]`` gives ``()``.
    """
    what = f"retries of task {task!r}"
    if retries is None:
        return ()
    if isinstance(retries, Retry):
        if retries.delay is not None:
            raise ConfigurationError(
                f"{what}: Retry(delay=) is raised in a handler; as retries= give a list of "
                "delays or Retry(every=, times=)"
            )
        if retries.every is None or retries.times is None:
            raise ConfigurationError(f"{what}: Retry() needs both every= and times=")
        if isinstance(retries.times, bool) or not isinstance(retries.times, int):
            raise ConfigurationError(f"{what}: times={retries.times!r} is not an integer")
        if retries.times < 0:
            raise ConfigurationError(f"{what}: times={retries.times} is negative")
        return (_delay(retries.every, what),) * retries.times
    if isinstance(retries, str | bytes) or not isinstance(retries, Sequence):
        raise ConfigurationError(
            f"{what}: expected a list of delays such as ['30s', '5m'] or Retry(every=, times=),"
            f" got {retries!r}"
        )
    return tuple(_delay(d, what) for d in retries)


def _delay(value: str | int | float | timedelta, what: str) -> int:
    try:
        ms = to_ms(value, what=what)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if ms == 0:
        raise ConfigurationError(f"{what}: a retry delay must be above zero, got {value!r}")
    return ms


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A task's retry ladder and which exceptions climb it.

    Attributes:
        tiers: the retry queue for each retry, in order: a failure on attempt ``n`` goes
            through ``tiers[n]``; once ``n == len(tiers)`` the message is exhausted.
        delays_ms: each tier's delay, in the same order.
        retry_on: only these exception types are retried.
        dont_retry_on: these are never retried, even when `retry_on` matches.
    """

    tiers: tuple[str, ...] = ()
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    dont_retry_on: tuple[type[BaseException], ...] = ()
    delays_ms: tuple[int, ...] = ()

    def on_failure(self, attempt: int, error: BaseException) -> Decision:
        """Decide what to do after attempt number `attempt` (0-based) raised `error`.

        ``Retry(delay=)`` asks for the next attempt after that delay, through the delay
        ladder; it counts against the retries like any other retry (`DELAYED_RETRY_LIMIT`
        for a task without a ``retries=`` list).
        """
        if isinstance(error, Reject):
            return DeadLetter("rejected")
        if isinstance(error, Retry) and error.delay_ms is not None:
            limit = len(self.tiers) if self.tiers else DELAYED_RETRY_LIMIT
            if 0 <= attempt < limit:
                return RetryAfter(attempt + 1, error.delay_ms)
            return DeadLetter("exhausted")
        if not isinstance(error, Retry) and (
            isinstance(error, self.dont_retry_on) or not isinstance(error, self.retry_on)
        ):
            return DeadLetter("failed")
        if 0 <= attempt < len(self.tiers):
            delay = self.delays_ms[attempt] if attempt < len(self.delays_ms) else 0
            return RetryThrough(self.tiers[attempt], attempt + 1, delay)
        return DeadLetter("exhausted")

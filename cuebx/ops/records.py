"""Dead letters as an operator reads them: which task, why, when, with which arguments.

Pure values and functions, no I/O: a message read from a dead-letter queue becomes a
`DeadLetterEntry`; a `Selection` picks entries by id, task, reason and age; a `Summary`
groups them by task and reason; `entry_record` turns one into the plain data of ``--json``
and of an export line.

A message dead-lettered by a cuebx worker carries its stamps (``x-cuebx-reason``,
``x-cuebx-error``, ``x-cuebx-failed-at``, ``x-cuebx-origin-queue``...). One that RabbitMQ
dead-lettered itself (a quorum queue's delivery limit, a message rejected by another
consumer) only has RabbitMQ's ``x-death`` and ``x-first-death-*`` headers: the entry reads
the same facts from those.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from cuebx.brokers.base import Delivery
from cuebx.durations import to_seconds
from cuebx.message import (
    HEADER_ATTEMPT,
    HEADER_DELAY_TO,
    HEADER_ERROR,
    HEADER_ERROR_TYPE,
    HEADER_FAILED_AT,
    HEADER_ORIGIN_QUEUE,
    HEADER_REASON,
    HEADER_REPLAYED,
    HEADER_TASK,
    codec_for_content_type,
    header_count,
)

__all__ = [
    "DeadLetterEntry",
    "Group",
    "Selection",
    "Summary",
    "decode_body",
    "encode_json",
    "entry_record",
    "group_record",
    "read_since",
]


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """One message in a dead-letter queue.

    Attributes:
        queue: the dead-letter queue it lies in.
        message_id: its id (the task id), or None when its publisher gave none.
        correlation_id: its correlation id, if any.
        task: the task it was for (``x-cuebx-task``), if it says.
        reason: why it is there: a cuebx reason (``exhausted``, ``rejected``,
            ``invalid-arguments``...), RabbitMQ's (``delivery-limit``, ``expired``,
            ``maxlen``) for a message RabbitMQ dead-lettered itself, or ``unknown``.
        error_type: the exception type of the last attempt ("" when none).
        error: its message, bounded ("" when none).
        failed_at: when it was dead-lettered, if known.
        origin_queue: the queue it failed on, if known.
        attempt: its last attempt (0-based).
        replayed: how often it was replayed before (``x-cuebx-replayed``).
        published_at: its timestamp property: when it was first published.
        content_type: its content type.
        priority: its priority, if any.
        headers: every header, as read.
        body: the body, untouched.
    """

    queue: str
    message_id: str | None
    correlation_id: str | None
    task: str | None
    reason: str
    error_type: str
    error: str
    failed_at: datetime | None
    origin_queue: str | None
    attempt: int
    replayed: int
    published_at: datetime | None
    content_type: str | None
    priority: int | None
    headers: Mapping[str, Any] = field(repr=False)
    body: bytes = field(repr=False)

    @classmethod
    def from_delivery(cls, queue: str, delivery: Delivery) -> DeadLetterEntry:
        """Read a message taken from dead-letter queue `queue`."""
        headers = delivery.headers
        deaths = headers.get("x-death")
        first_death = deaths[0] if isinstance(deaths, list | tuple) and deaths else {}
        rabbit_reason = headers.get("x-first-death-reason")
        task = headers.get(HEADER_TASK)
        # A message the delay ladder could not deliver names its destination itself; its
        # first death is a ladder level, which would only drop a replay.
        origin = (
            headers.get(HEADER_ORIGIN_QUEUE)
            or headers.get(HEADER_DELAY_TO)
            or headers.get("x-first-death-queue")
        )
        return cls(
            queue=queue,
            message_id=delivery.message_id or None,
            correlation_id=delivery.correlation_id or None,
            task=_text(task),
            reason=_text(headers.get(HEADER_REASON))
            or (_text(rabbit_reason) or "unknown").replace("_", "-"),
            error_type=_text(headers.get(HEADER_ERROR_TYPE)) or "",
            error=_text(headers.get(HEADER_ERROR)) or "",
            failed_at=_failed_at(headers.get(HEADER_FAILED_AT), first_death),
            origin_queue=_text(origin),
            attempt=header_count(headers.get(HEADER_ATTEMPT)),
            replayed=header_count(headers.get(HEADER_REPLAYED)),
            published_at=_aware(delivery.timestamp),
            content_type=delivery.content_type,
            priority=delivery.priority,
            headers=dict(headers),
            body=delivery.body,
        )

    @property
    def when(self) -> datetime | None:
        """When it failed, else when it was published: the time filters and summaries use."""
        return self.failed_at or self.published_at


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def _aware(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _failed_at(stamp: Any, first_death: Any) -> datetime | None:
    """cuebx's ISO 8601 stamp, else the time in RabbitMQ's newest ``x-death`` entry."""
    text = _text(stamp)
    if text is not None:
        try:
            return _aware(datetime.fromisoformat(text))
        except ValueError:
            pass
    if isinstance(first_death, Mapping):
        return _aware(first_death.get("time"))
    return None


def decode_body(content_type: str | None, body: bytes) -> tuple[Any, str | None]:
    """Decode a body as plain data (no task needed): ``(value, None)`` or ``(None, why)``."""
    codec = codec_for_content_type(content_type)
    if codec is None:
        return None, f"unknown content type {content_type!r}"
    try:
        if codec.name == "json":
            return msgspec.json.decode(body), None
        return msgspec.msgpack.decode(body), None
    except msgspec.DecodeError as exc:
        return None, f"not valid {codec.name}: {exc}"


def read_since(
    value: datetime | timedelta | str | float | None, *, now: datetime
) -> datetime | None:
    """Read a ``since`` filter: a moment, or a duration back from `now` (``"1h"``, ``90``).

    Raises:
        ValueError: neither a duration nor an ISO 8601 time; the message says so.
    """
    if value is None or isinstance(value, datetime):
        return _aware(value)
    if isinstance(value, str):
        try:
            return _aware(datetime.fromisoformat(value))
        except ValueError:
            pass
    try:
        return now - timedelta(seconds=to_seconds(value, what="since"))
    except ValueError:
        raise ValueError(
            f"since: expected a duration such as '1h' or '30m', or an ISO 8601 time such as "
            f"'2026-01-31T09:00:00+00:00', got {value!r}"
        ) from None


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters an operation is about; an empty selection matches every one.

    Attributes:
        ids: message ids; any of them matches.
        task: the task name.
        reason: the dead-letter reason.
        since: dead-lettered at or after this moment (a message with no known time does
            not match).
    """

    ids: frozenset[str] = frozenset()
    task: str | None = None
    reason: str | None = None
    since: datetime | None = None

    @property
    def everything(self) -> bool:
        """True when nothing narrows it down."""
        return not (self.ids or self.task or self.reason or self.since)

    def matches(self, entry: DeadLetterEntry) -> bool:
        """Tell whether `entry` is selected."""
        if self.ids and entry.message_id not in self.ids:
            return False
        if self.task is not None and entry.task != self.task:
            return False
        if self.reason is not None and entry.reason != self.reason:
            return False
        if self.since is not None:
            when = entry.when
            return when is not None and when >= self.since
        return True

    def describe(self) -> str:
        """Say what is selected, for messages: ``task 'send', reason 'exhausted'``."""
        parts = []
        if self.ids:
            parts.append(f"id {', '.join(sorted(self.ids))}")
        if self.task is not None:
            parts.append(f"task {self.task!r}")
        if self.reason is not None:
            parts.append(f"reason {self.reason!r}")
        if self.since is not None:
            parts.append(f"since {self.since.isoformat(timespec='seconds')}")
        return ", ".join(parts) or "every message"


@dataclass(slots=True)
class Group:
    """The dead letters of one queue, task and reason: how many, oldest and newest."""

    queue: str
    task: str | None
    reason: str
    count: int = 0
    oldest: datetime | None = None
    newest: datetime | None = None

    def add(self, entry: DeadLetterEntry) -> None:
        self.count += 1
        when = entry.when
        if when is not None:
            self.oldest = when if self.oldest is None else min(self.oldest, when)
            self.newest = when if self.newest is None else max(self.newest, when)


@dataclass(slots=True)
class Summary:
    """Dead letters counted by queue, task and reason as they are read (none is kept)."""

    _groups: dict[tuple[str, str | None, str], Group] = field(default_factory=dict)

    def add(self, entry: DeadLetterEntry) -> None:
        key = (entry.queue, entry.task, entry.reason)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = Group(*key)
        group.add(entry)

    def groups(self) -> list[Group]:
        """The groups, by queue, then the largest first."""
        return sorted(self._groups.values(), key=lambda g: (g.queue, -g.count, g.task or ""))


def entry_record(entry: DeadLetterEntry, *, body: bool = True) -> dict[str, Any]:
    """The plain data of an entry, for JSON: an export line, ``--json`` output.

    The body is kept as text when it is UTF-8 (``body_encoding: "utf-8"``), else in
    base64 (``"base64"``), so an export holds every byte of it. `body` False leaves it out.
    """
    record: dict[str, Any] = {
        "queue": entry.queue,
        "message_id": entry.message_id,
        "correlation_id": entry.correlation_id,
        "task": entry.task,
        "reason": entry.reason,
        "error_type": entry.error_type,
        "error": entry.error,
        "failed_at": entry.failed_at,
        "origin_queue": entry.origin_queue,
        "attempt": entry.attempt,
        "replayed": entry.replayed,
        "published_at": entry.published_at,
        "content_type": entry.content_type,
        "priority": entry.priority,
        "headers": dict(entry.headers),
    }
    if body:
        try:
            record["body"] = entry.body.decode("utf-8")
            record["body_encoding"] = "utf-8"
        except UnicodeDecodeError:
            record["body"] = base64.b64encode(entry.body).decode("ascii")
            record["body_encoding"] = "base64"
    return record


def _plain(value: Any) -> Any:
    """msgspec's ``enc_hook`` for header values JSON has no form for."""
    return str(value)


_ENCODER = msgspec.json.Encoder(enc_hook=_plain)


def encode_json(value: Any) -> bytes:
    """Encode plain data (records, reports) as JSON; datetimes as ISO 8601, bytes as base64."""
    return _ENCODER.encode(value)


def group_record(group: Group) -> dict[str, Any]:
    """The plain data of a summary group."""
    return {
        "queue": group.queue,
        "task": group.task,
        "reason": group.reason,
        "count": group.count,
        "oldest": group.oldest,
        "newest": group.newest,
    }

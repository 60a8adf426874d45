"""Task states and the status record: pure values, encoded for a `cuebx.stores.Store`.

A task's states, in the order it moves through them::

    pending ─▶ started ─▶ succeeded
                  │   └──▶ failed          (its handler raised, for good)
                  │   └──▶ dead-lettered   (never handled: poison input, delivery limit)
                  │   └──▶ skipped         (an idempotency key that already completed)
                  └─▶ retrying ─▶ started ─▶ ... (one more attempt each time)

``unknown`` is what a read says when the store has no record: an id that never existed,
a record that expired, or a task published with ``track=False``.

Every record has a *position* ``(generation, rank)`` and a store only lets a write through
when its position is higher (`cuebx.stores.base`). `rank` orders the states so that nothing
goes backwards: a later attempt outranks an earlier one, ``retrying`` toward attempt *n*
sits between attempt *n - 1*'s ``started`` and attempt *n*'s, and every final state outranks
every other state, the first one written staying. The generation counts dead-letter replays
(`generation`), so a replayed task starts over.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from cuebx.message import header_count

__all__ = [
    "FINAL_STATES",
    "HEADER_REPLAYED",
    "TaskState",
    "TaskStatus",
    "decode_record",
    "encode_record",
    "final_state",
    "generation",
    "rank",
]

TaskState = Literal[
    "unknown",
    "pending",
    "started",
    "retrying",
    "succeeded",
    "failed",
    "dead-lettered",
    "skipped",
]

FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "dead-lettered", "skipped"})

#: Stamped on a dead-letter replay (``cuebx dlq replay``): a count of replays, or the time of
#: the replay as epoch milliseconds or ISO 8601. Either way a later replay reads higher.
HEADER_REPLAYED = "x-cuebx-replayed"

_FINAL_RANK = 1 << 40
_PHASE = {"pending": 0, "retrying": 1, "started": 2}


def rank(state: TaskState, attempt: int) -> int:
    """Order the states of one run of a task: a write lands only above the stored rank."""
    if state in FINAL_STATES:
        return _FINAL_RANK
    return attempt * 4 + _PHASE[state]


#: Dead-letter reasons of a handler that ran and failed for good; the others mean the
#: message never got to a handler run that could decide (poison input, the delivery limit).
_HANDLER_FAILURES = frozenset({"exhausted", "rejected", "failed"})


def final_state(reason: str) -> TaskState:
    """``failed`` when the handler ran and failed for good, else ``dead-lettered``."""
    return "failed" if reason in _HANDLER_FAILURES else "dead-lettered"


def generation(headers: Mapping[str, Any]) -> int:
    """The run of a message: 0, or higher for each dead-letter replay of it."""
    value = headers.get(HEADER_REPLAYED)
    if value is None or value is False:
        return 0
    if isinstance(value, str) and not value.isdigit():
        try:
            stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return 1
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return int(stamp.timestamp() * 1000)
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return header_count(value) or 1


class TaskStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Where a task is, as the store last heard.

    Attributes:
        id: the task id (its message id).
        state: see `TaskState`; ``unknown`` when the store has no record of it.
        task: the task name (empty when unknown).
        attempt: 0-based; for ``retrying``, the attempt that comes next.
        updated_at: when this state was written (UTC), None when unknown.
        next_attempt_at: for ``retrying``, when the next attempt is due.
        error_type: for ``failed``/``dead-lettered``: the exception's qualified name.
        error: its message (bounded in length).
        reason: the dead-letter reason for ``failed``/``dead-lettered``, why it was
            skipped for ``skipped``.
    """

    id: str
    state: TaskState
    task: str = ""
    attempt: int = 0
    updated_at: datetime | None = None
    next_attempt_at: datetime | None = None
    error_type: str = ""
    error: str = ""
    reason: str | None = None

    @property
    def done(self) -> bool:
        """True in a final state: the task will not change on its own any more."""
        return self.state in FINAL_STATES


class _Record(msgspec.Struct, array_like=True, omit_defaults=True):
    """What the store keeps per task (compact: array-like, defaults left out)."""

    state: str
    task: str
    attempt: int
    updated_at: float
    next_attempt_at: float | None = None
    error_type: str = ""
    error: str = ""
    reason: str | None = None
    value: msgspec.Raw = msgspec.Raw(b"null")


_NULL = msgspec.Raw(b"null")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Record).decode


def encode_record(
    state: TaskState,
    *,
    task: str,
    attempt: int,
    at: float,
    next_attempt_at: float | None = None,
    error_type: str = "",
    error: str = "",
    reason: str | None = None,
    value: bytes | None = None,
) -> bytes:
    """Encode one status record (`value` is the JSON of the handler's return value)."""
    return _encode(
        _Record(
            state,
            task,
            attempt,
            at,
            next_attempt_at,
            error_type,
            error,
            reason,
            _NULL if value is None else msgspec.Raw(value),
        )
    )


def decode_record(task_id: str, data: bytes | None) -> tuple[TaskStatus, bytes | None]:
    """Decode a stored record into a `TaskStatus` and the JSON of its value (if any)."""
    if data is None:
        return TaskStatus(id=task_id, state="unknown"), None
    record = _decode(data)
    status = TaskStatus(
        id=task_id,
        state=record.state,  # type: ignore[arg-type]
        task=record.task,
        attempt=record.attempt,
        updated_at=datetime.fromtimestamp(record.updated_at, UTC),
        next_attempt_at=(
            None
            if record.next_attempt_at is None
            else datetime.fromtimestamp(record.next_attempt_at, UTC)
        ),
        error_type=record.error_type,
        error=record.error,
        reason=record.reason,
    )
    value = bytes(record.value)
    return status, None if value == b"null" else value

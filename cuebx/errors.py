"""Every exception cuebx raises, and the signals a handler raises to steer its message.

The tree::

    CuebxError
    ├── ConfigurationError          a task or app option is wrong (also a ValueError)
    │   ├── DuplicateTaskError      two tasks registered under one name
    │   └── AppNotFoundError        ``-A module:attribute`` does not lead to an app
    ├── ArgumentsError              .delay() arguments that do not fit the task's signature
    ├── DelayError                  a countdown or eta the delay ladder cannot hold
    ├── TopologyError               the broker refused a declaration
    │   └── TopologyConflictError   a queue exists with other arguments
    ├── BrokerError                 talking to the broker failed
    │   ├── BrokerUnavailableError  cannot connect, or not connected
    │   └── PublishError            a publish was not confirmed
    │       ├── UnroutableError     returned by the broker (mandatory flag): no queue bound
    │       ├── PublishTimeoutError no confirm within the publish timeout
    │       └── BatchPublishError   some messages of a `Task.map` batch were not confirmed
    ├── StoreError                  talking to the result store failed
    │   └── StoreUnavailableError   cannot connect, or an operation timed out
    ├── TaskFailed                  `result()` or `call()` of a task that failed for good
    ├── ResultTimeoutError          `result()` waited its timeout for a final state
    ├── CallTimeoutError            `call()` waited its timeout for the reply
    └── CallInterruptedError        `call()` lost its connection before the reply came

    TaskSignal                      raised by a handler, never by cuebx itself
    ├── Retry                       retry this message: through the next tier, or after delay=
    └── Reject                      dead-letter this message now, without retries

`TaskSignal` does not derive from `CuebxError`, so a handler that catches `CuebxError`
around its own calls to cuebx cannot swallow a `Retry` or `Reject` by mistake.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from cuebx.durations import to_ms

__all__ = [
    "AppNotFoundError",
    "ArgumentsError",
    "BatchPublishError",
    "BrokerError",
    "BrokerUnavailableError",
    "CallInterruptedError",
    "CallTimeoutError",
    "ConfigurationError",
    "CuebxError",
    "DelayError",
    "DuplicateTaskError",
    "PublishError",
    "PublishTimeoutError",
    "Reject",
    "ResultTimeoutError",
    "Retry",
    "StoreError",
    "StoreUnavailableError",
    "TaskFailed",
    "TaskSignal",
    "TopologyConflictError",
    "TopologyError",
    "UnroutableError",
]


class CuebxError(Exception):
    """Base of every error cuebx raises."""


class ConfigurationError(CuebxError, ValueError):
    """An option given to `Cuebx` or `@app.task` is invalid."""


class DuplicateTaskError(ConfigurationError):
    """Two tasks were registered under the same name."""


class AppNotFoundError(ConfigurationError):
    """An app path (``cuebx -A module:attribute``) does not lead to a `Cuebx` app."""


class ArgumentsError(CuebxError, TypeError):
    """Arguments given to `.delay()`, `.apply_async()` or `.map()` do not fit the task.

    Missing, extra or mistyped arguments, or arguments that encode to more than the app's
    ``max_message_size``: nothing was published.
    """


class DelayError(CuebxError, ValueError):
    """A countdown or eta that the delay ladder cannot hold; nothing was published.

    Negative, both given at once, an eta without a time zone, or a delay longer than the
    ladder's span (``2^delay_levels - 1`` units; the message names it).
    """


class TopologyError(CuebxError):
    """The broker refused to declare part of the topology."""


class TopologyConflictError(TopologyError):
    """A queue already exists on the broker with arguments other than the ones cuebx wants.

    RabbitMQ never changes the arguments of an existing queue: it closes the channel with
    PRECONDITION_FAILED. Delete the queue (losing its messages) or align the task options.

    Attributes:
        queue: the queue's name.
        detail: what differs, e.g. "argument 'x-message-ttl': cuebx wants 1000, the
            broker has 2000".
        wanted: the arguments cuebx declares the queue with.
    """

    def __init__(self, queue: str, detail: str, wanted: Mapping[str, Any]) -> None:
        self.queue = queue
        self.detail = detail
        self.wanted = dict(wanted)
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(self.wanted.items())) or "none"
        super().__init__(
            f"queue {queue!r} already exists with other arguments: {detail}; "
            f"cuebx wants arguments: {shown}"
        )


class BrokerError(CuebxError):
    """Talking to the broker failed."""


class BrokerUnavailableError(BrokerError, ConnectionError):
    """The broker cannot be reached (the URL in the message has its password masked)."""


class PublishError(BrokerError):
    """A message was not confirmed by the broker, so it may not have been stored."""


class UnroutableError(PublishError):
    """The broker returned a mandatory message: no queue is bound for its routing key."""


class PublishTimeoutError(PublishError, TimeoutError):
    """No publisher confirm arrived within the publish timeout."""


class BatchPublishError(PublishError):
    """Some messages of a batch were not confirmed.

    Attributes:
        handles: one entry per item, in order: the handle when confirmed, else None.
        errors: ``{index: error}`` for every item that was not confirmed.
    """

    def __init__(self, handles: Sequence[Any], errors: Mapping[int, BaseException]) -> None:
        self.handles = list(handles)
        self.errors = dict(errors)
        index, first = next(iter(self.errors.items()))
        super().__init__(
            f"{len(self.errors)} of {len(self.handles)} messages were not confirmed "
            f"(item {index}: {first})"
        )


class StoreError(CuebxError):
    """Reading or writing the result store failed."""


class StoreUnavailableError(StoreError, ConnectionError):
    """The store cannot be reached, or did not answer in time (its URL's password masked)."""


class TaskFailed(CuebxError):
    """The task ended without a value: its handler failed for good, or it was dead-lettered.

    Raised by `TaskHandle.result` and `Task.call`, in the caller, for what happened in a
    worker: the handler's exception itself is not re-raised (it may not even be importable
    here), its type and message are.

    Attributes:
        task_id: the task's id (its message id).
        state: ``"failed"``, ``"dead-lettered"``, or ``"skipped"`` (an idempotency key that
            had completed already).
        error_type: the exception's qualified name (``"builtins.ValueError"``), or ``""``
            when it was not an exception (undecodable input, say).
        error: the exception's message, bounded in length.
        reason: the dead-letter reason (``"exhausted"``, ``"rejected"``, ...), or None.
    """

    def __init__(
        self,
        task_id: str,
        *,
        state: str,
        error_type: str = "",
        error: str = "",
        reason: str | None = None,
    ) -> None:
        self.task_id = task_id
        self.state = state
        self.error_type = error_type
        self.error = error
        self.reason = reason
        why = f" ({reason})" if reason else ""
        what = f"{error_type}: {error}" if error_type else error or state
        super().__init__(f"task {task_id} {state}{why}: {what}")


class ResultTimeoutError(CuebxError, TimeoutError):
    """`TaskHandle.result` saw no final state within its timeout (the task may still run)."""


class CallTimeoutError(CuebxError, TimeoutError):
    """`Task.call` got no reply within its timeout (the task may still run, or have run)."""


class CallInterruptedError(CuebxError, ConnectionError):
    """`Task.call`'s connection was lost before the reply came: RabbitMQ's direct reply-to
    does not keep a reply for a caller that reconnects, so it can never arrive."""


class TaskSignal(Exception):
    """Base of the exceptions a handler raises on purpose to steer its message."""


class Retry(TaskSignal):
    """Retry: raise it in a handler to retry the message, or pass it as `retries=`.

    As a retries spec, `Retry(every="1m", times=3)` means three retries through one
    `Q.retry.1m` tier. Raised from a handler, `raise Retry("rate limited")` retries the
    message through the next tier even when `retry_on=` would not match the cause, and
    `raise Retry(delay="90s")` retries it in 90 seconds, held by the broker's delay ladder
    (`cuebx.delays`): an attempt like any other, counted against the task's `retries=`
    list, or against 10 retries for a task without one. `every` and `times` only mean
    something in ``retries=``; a raised `Retry` that sets them is retried as usual and the
    worker logs a warning that they were ignored.

    Raises:
        ValueError: `delay` is not a duration (so the handler fails with it, naming it).
    """

    def __init__(
        self,
        reason: str = "",
        *,
        every: str | float | timedelta | None = None,
        times: int | None = None,
        delay: str | float | timedelta | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.every = every
        self.times = times
        self.delay = delay
        #: `delay` in milliseconds, read once here.
        self.delay_ms = None if delay is None else to_ms(delay, what="Retry(delay=)")


class Reject(TaskSignal):
    """Dead-letter the message at once with reason `rejected`, skipping any retries."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason

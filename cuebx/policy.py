"""Pure decisions: what the worker does with a message whose handler did not succeed.

The worker asks `RetryPolicy.on_failure` and carries out the answer; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from cuebx.durations import to_ms
from cuebx.errors import ConfigurationError, Reject, Retry
from cuebx.message import DeadLetterReason

__all__ = [
    "DeadLetter",
    "Decision",
    "RetryPolicy",
    "RetryThrough",
    "RetrySpec",
    "retry_delays",
]

RetrySpec = Retry | Sequence[str | int | float | timedelta] | None


@dataclass(frozen=True, slots=True)
class RetryThrough:
    """Publish a copy to the retry tier `queue` with ``x-retry-attempt = attempt``, then ack."""

    queue: str
    attempt: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Publish a stamped copy to the dead-letter queue (or drop it if there is none), then ack."""

    reason: DeadLetterReason


Decision = RetryThrough | DeadLetter


def retry_delays(retries: RetrySpec, *, task: str) -> tuple[int, ...]:
    """Turn a ``retries=`` option into one delay in ms per retry.

    ``["30s", "5m"]`` gives ``(30000, 300000)``; ``Retry(every="1m", times=3)`` gives
    ``(60000, 60000, 60000)``; ``None`` or ``[]`` gives ``()``.
    """
    what = f"retries of task {task!r}"
    if retries is None:
        return ()
    if isinstance(retries, Retry):
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
        retry_on: only these exception types are retried.
        dont_retry_on: these are never retried, even when `retry_on` matches.
    """

    tiers: tuple[str, ...] = ()
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    dont_retry_on: tuple[type[BaseException], ...] = ()

    def on_failure(self, attempt: int, error: BaseException) -> Decision:
        """Decide what to do after attempt number `attempt` (0-based) raised `error`."""
        if isinstance(error, Reject):
            return DeadLetter("rejected")
        if not isinstance(error, Retry) and (
            isinstance(error, self.dont_retry_on) or not isinstance(error, self.retry_on)
        ):
            return DeadLetter("failed")
        if 0 <= attempt < len(self.tiers):
            return RetryThrough(self.tiers[attempt], attempt + 1)
        return DeadLetter("exhausted")

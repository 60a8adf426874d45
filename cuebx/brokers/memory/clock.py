"""The memory broker's time: a virtual clock, in whole nanoseconds."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Final

from anyio.lowlevel import checkpoint

__all__ = ["NS_PER_MS", "NS_PER_S", "Clock"]

NS_PER_S: Final = 1_000_000_000
NS_PER_MS: Final = 1_000_000


class Clock:
    """The broker's time, in whole nanoseconds so that TTL arithmetic is exact.

    It starts at 0 and stands still until `advance` moves it, so a test decides to the
    millisecond when a retry tier's TTL runs out. With ``real_time=True`` it also follows
    the monotonic clock, and `advance` jumps ahead of it.
    """

    def __init__(self, *, real_time: bool = False) -> None:
        self.real_time = real_time
        self._origin_ns = time.monotonic_ns()
        self._skipped_ns = 0
        self._started_at = datetime.now(UTC)
        self._next_due: Callable[[], int | None] = lambda: None
        self._on_moved: Callable[[], None] = lambda: None

    def _bind(self, next_due: Callable[[], int | None], on_moved: Callable[[], None]) -> None:
        self._next_due = next_due
        self._on_moved = on_moved

    def now(self) -> float:
        """Return the time in seconds since the broker was created."""
        return self.now_ns() / NS_PER_S

    def now_ns(self) -> int:
        """Return the time in nanoseconds since the broker was created."""
        elapsed = time.monotonic_ns() - self._origin_ns if self.real_time else 0
        return elapsed + self._skipped_ns

    def wall(self) -> datetime:
        """Return the time as a UTC datetime (the broker's creation plus `now`)."""
        return self._started_at + timedelta(microseconds=self.now_ns() // 1000)

    async def advance(self, seconds: float) -> None:
        """Move time forward, expiring messages whose TTL runs out on the way, in time order.

        Time stops at each expiry so that a message dead-lettered into a queue with its own
        TTL expires from there at the right moment, as with RabbitMQ's own timers.

        Raises:
            ValueError: `seconds` is negative or not finite: time only moves forward.
        """
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"cannot advance the clock by {seconds!r}s: time only moves forward")
        target = self.now_ns() + round(seconds * NS_PER_S)
        while (due := self._next_due()) is not None and due <= target:
            self._move_to(due)
            self._on_moved()
            await checkpoint()
        self._move_to(target)
        self._on_moved()
        await checkpoint()

    def _move_to(self, ns: int) -> None:
        self._skipped_ns += max(0, ns - self.now_ns())

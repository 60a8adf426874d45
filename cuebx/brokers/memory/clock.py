"""The memory broker's time: a virtual clock, in whole nanoseconds, in one of three modes.

- ``auto`` (the default) jumps ahead by itself, Trio's autojump clock being the model: once the
  broker has had nothing to do for a few event-loop turns in a row (no handler call running, no
  ready message on a consumed queue, nobody publishing or settling), time moves at once to the
  next thing due, a TTL expiry or a `Clock.sleep`. A retry ladder of hours runs to its end on
  its own, in no wall time, and never under a handler still at work.
- ``manual`` stands still until `Clock.advance` moves it, so a test can look at a message
  waiting in a retry tier, then decide to the millisecond when its TTL runs out.
- ``real`` follows the monotonic clock, as RabbitMQ does; `Clock.advance` jumps ahead of it.

asyncio cannot tell whether any task could still run without reading private attributes
of its event loop, so ``auto`` asks the broker instead: a handler call still running is
still at work, and any publish, delivery or settlement starts the count of quiet turns again.
What the broker cannot see is a task waiting on something else (a socket, a thread, an
``anyio.sleep``) that will touch the broker afterwards: time may jump meanwhile, as
Trio's autojump clock jumps while a task waits on I/O. A handler doing so is still running,
so time never jumps under a handler; by the same rule, a handler that
awaits `Clock.sleep` itself waits for `Clock.advance` (cuebx never waits inside a handler:
delays are held by the broker, as TTLs).

The timers of ``auto`` and ``real`` run in the broker's own task group, between its
``connect`` and ``close``; without them (a closed broker) only `Clock.advance` moves time.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Final, Literal, get_args

import anyio
from anyio.lowlevel import checkpoint

__all__ = ["CLOCK_MODES", "NS_PER_MS", "NS_PER_S", "Clock", "ClockMode"]

NS_PER_S: Final = 1_000_000_000
NS_PER_MS: Final = 1_000_000

ClockMode = Literal["auto", "manual", "real"]
"""How a memory broker's time moves: see the module docstring."""

CLOCK_MODES: Final[tuple[str, ...]] = get_args(ClockMode)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

#: Event-loop turns in a row the broker must stay quiet before an ``auto`` clock jumps. One
#: turn lets a task woken by another run; a few more cover a short chain of such hand-offs
#: (a handler's task starting, a worker's publish after its handler returned). Each jump
#: costs this many turns of a few microseconds, so a margin is cheap.
_QUIET_TURNS: Final = 8


class _Sleeper:
    """A task waiting in `Clock.sleep_until` for the clock to reach `due_ns`."""

    __slots__ = ("due_ns", "woken")

    def __init__(self, due_ns: int) -> None:
        self.due_ns = due_ns
        self.woken = anyio.Event()


class Clock:
    """The broker's time, in whole nanoseconds since the broker was created.

    Nanoseconds keep TTL arithmetic exact. `now` is the broker's own time, starting at 0;
    `time` and `wall` add it to the wall clock at the broker's creation, so messages and
    schedules see dates that move with the broker's time.

    Args:
        mode: ``"auto"`` (the default), ``"manual"`` or ``"real"``; see the module docstring.

    Raises:
        ValueError: an unknown `mode`.
    """

    def __init__(self, mode: ClockMode = "auto") -> None:
        if mode not in CLOCK_MODES:
            raise ValueError(
                f"unknown clock mode {mode!r}: use 'auto' (the default), 'manual' or 'real'"
            )
        self._mode: ClockMode = mode
        self._origin_ns = time.monotonic_ns()
        self._epoch_ns = time.time_ns()
        self._skipped_ns = 0
        self._sleepers: list[tuple[int, int, _Sleeper]] = []
        self._sleeper_numbers = itertools.count()
        # Set to wake the timer of an auto or real clock; None while no timer runs.
        self._wakeup: anyio.Event | None = None
        # Whether the broker's activity concerns the timer now: only while an auto clock
        # has something due and waits for the broker to be quiet.
        self._watching = False
        # What the clock needs to know from its broker (see `_bind`).
        self._next_expiry: Callable[[], int | None] = lambda: None
        self._expire: Callable[[], None] = lambda: None
        self._is_idle: Callable[[], bool] = lambda: True

    @property
    def mode(self) -> ClockMode:
        """``"auto"``, ``"manual"`` or ``"real"``."""
        return self._mode

    # -- reading ----------------------------------------------------------------------------

    def now(self) -> float:
        """Return the time in seconds since the broker was created."""
        return self.now_ns() / NS_PER_S

    def now_ns(self) -> int:
        """Return the time in nanoseconds since the broker was created."""
        elapsed = time.monotonic_ns() - self._origin_ns if self._mode == "real" else 0
        return elapsed + self._skipped_ns

    def time(self) -> float:
        """Return the broker's wall clock in seconds since the epoch (UTC), like `time.time`.

        It is the wall clock when the broker was created plus `now`, so it moves with
        `advance` and autojumps.
        """
        return (self._epoch_ns + self.now_ns()) / NS_PER_S

    def wall(self) -> datetime:
        """Return `time` as a UTC datetime."""
        return _EPOCH + timedelta(microseconds=(self._epoch_ns + self.now_ns()) // 1000)

    # -- moving -----------------------------------------------------------------------------

    async def advance(self, seconds: float) -> None:
        """Move time forward, expiring messages and waking sleepers on the way, in time order.

        Time stops at each expiry so that a message dead-lettered into a queue with its own
        TTL expires from there at the right moment, as with RabbitMQ's own timers. It works
        in every mode; an ``auto`` clock may jump further by itself afterwards.

        Raises:
            ValueError: `seconds` is negative or not finite: time only moves forward.
        """
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"cannot advance the clock by {seconds!r}s: time only moves forward")
        target = self.now_ns() + round(seconds * NS_PER_S)
        while (due := self._next_due_ns()) is not None and due <= target:
            self._reach(due)
            await checkpoint()
        self._reach(target)
        await checkpoint()

    # -- waiting ----------------------------------------------------------------------------

    async def sleep(self, seconds: float) -> None:
        """Wait until the clock has moved `seconds` forward (never less).

        Like a TTL, the wait ends when `advance` or an autojump passes its end, or, on a
        ``real`` clock, when that much real time has gone by. Zero or less only yields to
        other tasks; ``math.inf`` waits until cancelled.

        Raises:
            ValueError: `seconds` is NaN.
        """
        if math.isnan(seconds):
            raise ValueError("cannot sleep for NaN seconds")
        if seconds == math.inf:
            await anyio.sleep_forever()
        elif seconds <= 0:
            await checkpoint()
        else:
            await self._sleep_until_ns(self.now_ns() + math.ceil(Fraction(seconds) * NS_PER_S))

    async def sleep_until(self, epoch_seconds: float) -> None:
        """Wait until `time` reaches `epoch_seconds` (never earlier); a past time only yields.

        Raises:
            ValueError: `epoch_seconds` is not finite.
        """
        if not math.isfinite(epoch_seconds):
            raise ValueError(f"cannot sleep until {epoch_seconds!r}: not a time")
        await self._sleep_until_ns(_first_ns_showing(epoch_seconds) - self._epoch_ns)

    async def _sleep_until_ns(self, due_ns: int) -> None:
        if due_ns <= self.now_ns():
            await checkpoint()
            return
        sleeper = _Sleeper(due_ns)
        heapq.heappush(self._sleepers, (due_ns, next(self._sleeper_numbers), sleeper))
        self._scheduled()
        try:
            while self.now_ns() < due_ns:
                # A real clock reaches the due time without the timer's help.
                wait = (due_ns - self.now_ns()) / NS_PER_S if self._mode == "real" else math.inf
                with anyio.move_on_after(wait):
                    await sleeper.woken.wait()
        finally:
            # A cancelled sleeper stays in the heap until its time, skipped from now on.
            sleeper.due_ns = -1

    # -- for the broker of this package -----------------------------------------------------

    def _bind(
        self,
        next_expiry: Callable[[], int | None],
        expire: Callable[[], None],
        is_idle: Callable[[], bool],
    ) -> None:
        """Connect the clock to its broker.

        Args:
            next_expiry: the clock time (ns) of the broker's next TTL expiry, or None.
            expire: expire what is due now (called each time the clock moved).
            is_idle: whether nothing happens in the broker until time moves.
        """
        self._next_expiry = next_expiry
        self._expire = expire
        self._is_idle = is_idle

    def _scheduled(self) -> None:
        """Tell the timer that something may now be due earlier than it thought."""
        if self._wakeup is not None:
            self._wakeup.set()

    def _touched(self) -> None:
        """Tell an ``auto`` clock that the broker did something: the quiet count restarts."""
        if self._watching and self._wakeup is not None:
            self._wakeup.set()

    async def _run(self) -> None:
        """Run the timer of an ``auto`` or ``real`` clock until cancelled (``manual`` has none)."""
        try:
            if self._mode == "auto":
                await self._jump_when_idle()
            elif self._mode == "real":
                await self._follow_real_time()
        finally:
            self._wakeup, self._watching = None, False

    async def _jump_when_idle(self) -> None:
        """Move to the next due time whenever the broker stays idle for a few turns.

        It sleeps on an event while nothing is due or the broker works, so an idle program
        costs no CPU; the broker wakes it when it works or something new falls due.
        """
        while True:
            wakeup = self._wakeup = anyio.Event()
            # With nothing due, only something new falling due matters (`_scheduled`).
            self._watching = self._next_due_ns() is not None
            if not self._watching or not self._is_idle():
                await wakeup.wait()
            elif await self._stays_quiet(wakeup):
                due = self._next_due_ns()  # again: the quiet turns may have changed it
                if due is not None:
                    self._reach(due)

    async def _stays_quiet(self, wakeup: anyio.Event) -> bool:
        for _ in range(_QUIET_TURNS):
            await checkpoint()
            if wakeup.is_set() or not self._is_idle():
                return False
        return True

    async def _follow_real_time(self) -> None:
        """Sleep in real time until the next due time, or until an earlier one is scheduled."""
        while True:
            wakeup = self._wakeup = anyio.Event()
            due = self._next_due_ns()
            delay = math.inf if due is None else max(0, due - self.now_ns()) / NS_PER_S
            with anyio.move_on_after(delay):
                await wakeup.wait()
            self._reach(self.now_ns())

    def _next_due_ns(self) -> int | None:
        """The clock time of the next TTL expiry or sleeper's end, whichever comes first."""
        heap = self._sleepers
        while heap and heap[0][2].due_ns < 0:
            heapq.heappop(heap)  # cancelled
        expiry = self._next_expiry()
        if not heap:
            return expiry
        return heap[0][0] if expiry is None else min(expiry, heap[0][0])

    def _reach(self, ns: int) -> None:
        """Move time forward to `ns` (if it is ahead), then expire and wake what is due."""
        self._skipped_ns += max(0, ns - self.now_ns())
        now = self.now_ns()
        heap = self._sleepers
        while heap and heap[0][0] <= now:
            heapq.heappop(heap)[2].woken.set()
        self._expire()


def _first_ns_showing(epoch_seconds: float) -> int:
    """Return the first epoch time in nanoseconds at which `Clock.time` shows `epoch_seconds`.

    `Clock.time` rounds nanoseconds to the nearest float, which at today's dates is a step of
    about 240 ns, so it shows a time up to half a step before the exact nanosecond: waking
    then is not early by `time`'s own account, and ``sleep_until(clock.time())`` returns at
    once instead of waiting for the clock to move.
    """
    exact = math.ceil(Fraction(epoch_seconds) * NS_PER_S)
    step = math.ceil(math.ulp(epoch_seconds) * NS_PER_S)
    candidates = range(exact - step, exact + 1)
    first = bisect.bisect_left(candidates, True, key=lambda ns: ns / NS_PER_S >= epoch_seconds)
    return candidates[first]

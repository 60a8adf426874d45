"""Schedules: when a job's slots fall, as pure functions of time.

A slot is a scheduled time in whole seconds since the epoch (UTC). Two kinds of schedule:

- `Every`: slots at whole multiples of an interval counted from the epoch, so ``every="1h"``
  fires on the hour and ``every="30s"`` at :00 and :30, whichever worker computes them;
- `Cron`: a cron expression in a time zone, evaluated by cronsim (the ``cuebx[cron]`` extra),
  which follows Debian's cron across daylight saving time: a slot in the hour skipped in
  spring runs when the clocks have moved on, a slot in the hour repeated in autumn runs once
  (jobs that run every hour or more often keep running on real time).

A schedule's `fingerprint` names its slot sequence: a deploy that changes it makes the next
scheduler start the job afresh instead of catching up slots of the old schedule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import ModuleType
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cuebx.durations import Duration, label, to_ms
from cuebx.errors import ConfigurationError

__all__ = ["Cron", "Every", "Schedule", "build_schedule", "slot_text"]

#: ``@daily`` and friends: cronsim reads only the fields.
_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


class Schedule(Protocol):
    """When a job's slots fall."""

    @property
    def fingerprint(self) -> str:
        """A text that changes whenever the slots change (kind, expression, time zone)."""
        ...

    def next_after(self, t: int) -> int | None:
        """Return the first slot strictly after `t` (epoch seconds), or None if none comes."""
        ...

    def latest_at_or_before(self, t: int) -> int | None:
        """Return the last slot at or before `t`, or None if there is none."""
        ...

    def describe(self) -> str:
        """Say the schedule in a few words, for logs and ``cuebx schedule``."""
        ...


def slot_text(slot: int) -> str:
    """Write a slot in UTC ISO 8601, the form message ids use: ``2025-03-30T01:00:00Z``."""
    return datetime.fromtimestamp(slot, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Every:
    """A slot every `seconds`, at whole multiples of it since the epoch (UTC)."""

    seconds: int

    @property
    def fingerprint(self) -> str:
        return f"every {label(self.seconds * 1000)}"

    def next_after(self, t: int) -> int:
        return (t // self.seconds + 1) * self.seconds

    def latest_at_or_before(self, t: int) -> int:
        return (t // self.seconds) * self.seconds

    def describe(self) -> str:
        return self.fingerprint


@dataclass(frozen=True, slots=True)
class Cron:
    """A cron expression (five fields, or six with seconds first) in an IANA time zone."""

    expression: str
    tz: str = "UTC"
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)
    _cronsim: ModuleType = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Checked by build_schedule, which names the job: here only resolved.
        object.__setattr__(self, "_zone", ZoneInfo(self.tz))
        module = _load_cronsim()
        if module is None:
            raise ImportError("cron= needs cronsim: pip install 'cuebx[cron]'")
        object.__setattr__(self, "_cronsim", module)

    @property
    def _sim(self) -> Any:
        return self._cronsim.CronSim

    @property
    def fingerprint(self) -> str:
        return f"cron {self.expression} {self.tz}"

    def next_after(self, t: int) -> int | None:
        start = datetime.fromtimestamp(t, self._zone)
        try:
            return int(next(self._sim(self._fields, start)).timestamp())
        except StopIteration:  # cronsim looks 50 years ahead
            return None

    def latest_at_or_before(self, t: int) -> int | None:
        # cronsim's reverse iteration yields times strictly before its start.
        start = datetime.fromtimestamp(t + 1, self._zone)
        try:
            return int(next(self._sim(self._fields, start, reverse=True)).timestamp())
        except StopIteration:
            return None

    @property
    def _fields(self) -> str:
        return _ALIASES.get(self.expression.lower(), self.expression)

    def describe(self) -> str:
        return f"cron {self.expression!r}" + ("" if self.tz == "UTC" else f" {self.tz}")


def _load_cronsim() -> ModuleType | None:
    """cronsim, imported only by apps that use cron= (the ``cuebx[cron]`` extra); None
    when it is not installed."""
    try:
        import cronsim
    except ImportError:
        return None
    return cronsim


_SPACES = re.compile(r"\s+")


def build_schedule(
    where: str, *, cron: str | None = None, every: Duration | None = None, tz: str | None = None
) -> Schedule:
    """Check a job's schedule options and build its schedule.

    Args:
        where: names the job in errors (``"job 'cleanup'"``).
        cron: a cron expression; exactly one of `cron` and `every`.
        every: an interval, a whole number of seconds, at least one.
        tz: the IANA time zone `cron` is read in (UTC by default); not for `every`.

    Raises:
        ConfigurationError: the options are missing, clash or do not read; the message names
            the job and the option.
    """
    if (cron is None) == (every is None):
        raise ConfigurationError(f"{where}: give exactly one of cron= and every=")
    if every is not None:
        if tz is not None:
            raise ConfigurationError(
                f"{where}: tz= applies to cron= only; every= counts from the epoch in UTC "
                "(use cron= for times of day in a time zone)"
            )
        return _every(where, every)
    assert cron is not None
    return _cron(where, cron, tz or "UTC")


def _every(where: str, every: Duration) -> Every:
    try:
        ms = to_ms(every, what=f"{where}: every")
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if ms < 1000 or ms % 1000:
        raise ConfigurationError(
            f"{where}: every= must be a whole number of seconds, at least 1s, got {every!r}"
        )
    return Every(ms // 1000)


def _cron(where: str, expression: str, tz: str) -> Cron:
    if not isinstance(expression, str) or not expression.strip():
        raise ConfigurationError(f"{where}: cron= must be a cron expression, got {expression!r}")
    expression = _SPACES.sub(" ", expression.strip())
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ConfigurationError(
            f"{where}: tz={tz!r} is not a time zone (use an IANA name such as 'Europe/Paris')"
        ) from None
    try:
        schedule = Cron(expression, tz)
    except ImportError:
        raise ConfigurationError(
            f"{where}: cron= needs the cron extra: pip install 'cuebx[cron]' "
            "(every= works without it)"
        ) from None
    _check_expression(where, schedule)
    return schedule


def _check_expression(where: str, schedule: Cron) -> None:
    now = int(datetime.now(UTC).timestamp())
    try:
        following = schedule.next_after(now)
    except schedule._cronsim.CronSimError as exc:
        raise ConfigurationError(
            f"{where}: cron={schedule.expression!r} does not read: {exc} (five fields, "
            "minute hour day-of-month month day-of-week, or six with seconds first)"
        ) from None
    if following is None:
        raise ConfigurationError(
            f"{where}: cron={schedule.expression!r} never fires in the next 50 years"
        )

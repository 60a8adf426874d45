"""Durations: ``"250ms"``, ``"1h30m"``, numbers of seconds, ``timedelta`` → milliseconds.

Every delay in cuebx (retry tiers, timeouts, countdowns) goes through `to_ms`, and every
tier name through `label`, so one duration has exactly one queue name.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta

__all__ = ["Duration", "label", "to_ms", "to_seconds"]

Duration = str | int | float | timedelta

_UNITS_MS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1_000, "ms": 1}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|d|h|m|s))+")


def to_ms(value: Duration, *, what: str = "duration") -> int:
    """Convert a duration to whole milliseconds.

    Args:
        value: ``"250ms"``, ``"30s"``, ``"5m"``, ``"1h30m"``, ``"1d"``; an int or float of
            seconds; or a ``timedelta``.
        what: named in the error message, e.g. ``"retries of task 'send'"``.

    Raises:
        ValueError: the value is negative, not finite, or a string cuebx cannot read.
    """
    if isinstance(value, timedelta):
        ms = value / timedelta(milliseconds=1)
    elif isinstance(value, bool):
        raise ValueError(f"{what}: {value!r} is not a duration")
    elif isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{what}: {value!r} is not a finite number of seconds")
        ms = value * 1000
    elif isinstance(value, str):
        ms = _parse(value.strip().lower(), original=value, what=what)
    else:
        raise ValueError(f"{what}: {value!r} is not a duration (use '30s', 5, or a timedelta)")
    if ms < 0:
        raise ValueError(f"{what}: {value!r} is negative")
    return round(ms)


def to_seconds(value: Duration, *, what: str = "duration") -> float:
    """Convert a duration to seconds (a float), through `to_ms`."""
    return to_ms(value, what=what) / 1000


def _parse(text: str, *, original: str, what: str) -> float:
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text) * 1000
    if not _WHOLE.fullmatch(text):
        raise ValueError(
            f"{what}: cannot read duration {original!r}; "
            "use a number of seconds or units d, h, m, s, ms, such as '250ms', '30s', '1h30m'"
        )
    return sum(float(n) * _UNITS_MS[unit] for n, unit in _PART.findall(text))


def label(ms: int) -> str:
    """Give the canonical short form of a duration: non-zero units, largest first.

    ``label(250) == "250ms"``, ``label(90_000) == "1m30s"``, ``label(0) == "0s"``.
    """
    if ms < 0:
        raise ValueError(f"duration of {ms} ms is negative")
    if ms == 0:
        return "0s"
    parts = []
    for unit, size in _UNITS_MS.items():
        count, ms = divmod(ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)

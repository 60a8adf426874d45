"""Rates and limiters, the pure part of rate limiting (see `cuebx.limits`).

A `Rate` is N starts per window; a `Limiter` is a named rate with its queue on the
broker. Nothing here talks to a broker: `cuebx.limits.Limits` is the plug-in that asks a
limiter's queue for permits. The names are re-exported from `cuebx.limits`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cuebx.durations import label, to_ms
from cuebx.errors import ConfigurationError
from cuebx.topology import QueueSpec

__all__ = ["Limiter", "Rate", "hold_back_ms", "limiter_queue_name", "parse_rate"]

_RATE = re.compile(r"\s*(\d+)\s*/\s*(\S+)\s*")
#: ``/s``, ``/m``, ``/h``, ``/d``: one of that unit.
_PER = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
#: RabbitMQ's largest ``x-message-ttl``: 2^32 - 1 ms, about 49 days.
_MAX_TTL_MS = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Rate:
    """At most `count` starts in any window of `window_ms` milliseconds."""

    count: int
    window_ms: int

    def __str__(self) -> str:
        per = next((unit for unit, ms in _PER.items() if ms == self.window_ms), None)
        return f"{self.count}/{per or label(self.window_ms)}"

    @property
    def per_second(self) -> float:
        """The long-run rate, in starts per second."""
        return self.count * 1000 / self.window_ms


def parse_rate(spec: str, where: str) -> Rate:
    """Read ``"100/s"``, ``"10/m"``, ``"1000/h"``, ``"5/10s"`` or ``"3/1m30s"``.

    Raises:
        ConfigurationError: it is not a count over a window; the message names `where`.
    """
    match = _RATE.fullmatch(spec) if isinstance(spec, str) else None
    hint = "write it as a count per window: '100/s', '10/m', '1000/h' or '5/10s'"
    if match is None:
        raise ConfigurationError(f"{where}: cannot read rate {spec!r}; {hint}")
    count, per = int(match[1]), match[2].lower()
    if count < 1:
        raise ConfigurationError(f"{where}: rate {spec!r} allows no start at all; {hint}")
    window_ms = _PER.get(per)
    if window_ms is None:
        try:
            window_ms = to_ms(per, what=f"{where}: the window of rate {spec!r}")
        except ValueError as exc:
            raise ConfigurationError(f"{exc}; {hint}") from None
    if not 1 <= window_ms <= _MAX_TTL_MS:
        raise ConfigurationError(
            f"{where}: rate {spec!r} has a window of {window_ms} ms; it must be from 1 ms to "
            f"{_MAX_TTL_MS} ms (RabbitMQ's longest TTL, about 49 days)"
        )
    return Rate(count, window_ms)


def limiter_queue_name(exchange: str, name: str) -> str:
    """Name a limiter's queue: ``cuebx.limit.stripe``."""
    return f"{exchange}.limit.{name}"


@dataclass(frozen=True, slots=True)
class Limiter:
    """A rate limit shared by every task that names it, and its queue on the broker.

    Attributes:
        name: ``app.limiter``'s name, or the task's for a task's own ``rate_limit="N/s"``.
        rate: the limit.
        queue: the limiter's queue: ``<exchange>.limit.<name>``.
    """

    name: str
    rate: Rate
    queue: str

    def spec(self) -> QueueSpec:
        """The limiter's queue: N places, each held for one window by a permit."""
        arguments: dict[str, Any] = {
            "x-max-length": self.rate.count,
            "x-overflow": "reject-publish",
            "x-message-ttl": self.rate.window_ms,
        }
        return QueueSpec(self.queue, "limit", arguments)


def hold_back_ms(rate: Rate, draw: float) -> int:
    """How long a denied message waits before its next try, for a `draw` in [0, 1).

    The limiter's spacing (window / N), plus a random part of one window: every place in
    the limiter frees within one window of the denial, at a moment no worker knows, so the
    denied messages come back spread over that window instead of all at once.
    """
    return max(1, round(rate.window_ms / rate.count + draw * rate.window_ms))

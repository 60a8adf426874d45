"""`Settings`: an app's options, checked once, and the checks shared with task options.

Every option of `cuebx.Cuebx` and every per-queue knob a task or a worker can override
(prefetch, queue type) is validated by one function here, so that each is refused with the
same words wherever it is given and nothing downstream checks it again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from cuebx.brokers.base import BROKER_SCHEMES, mask_url
from cuebx.durations import Duration, label, to_ms, to_seconds
from cuebx.errors import ConfigurationError
from cuebx.message import Codec, codec_for
from cuebx.topology import QueueType

__all__ = [
    "DEFAULT_URL",
    "URL_ENV",
    "Settings",
    "check_count",
    "check_delay_ladder",
    "check_prefetch",
    "check_queue_type",
    "check_seconds",
    "split_urls",
]

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
URL_ENV = "CUEBX_BROKER_URL"

_QUEUE_TYPES = ("classic", "quorum")

# A comma starts the next URL only where a scheme follows it: a password may hold a comma.
_URL_SEPARATOR = re.compile(r"\s*,\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_urls(value: str | Sequence[str]) -> tuple[str, ...]:
    """Read one URL, several joined by commas (``CUEBX_BROKER_URL``'s form), or a sequence.

    A comma splits only where another ``scheme://`` follows it, so a password that holds a
    comma stays whole.
    """
    if isinstance(value, str):
        return tuple(_URL_SEPARATOR.split(value.strip()))
    return tuple(value)


def _check_urls(value: str | Sequence[str] | None, where: str) -> tuple[str, ...]:
    """The broker URLs of `value`, else of ``CUEBX_BROKER_URL``, else the default, checked."""
    if value is None or value == "":
        value = os.environ.get(URL_ENV) or DEFAULT_URL
    urls = split_urls(value)
    if not urls:
        raise ConfigurationError(f"{where}: the list of broker URLs is empty; give at least one")
    schemes = []
    for url in urls:
        if not isinstance(url, str) or not url:
            raise ConfigurationError(
                f"{where}: a broker URL must be a non-empty string, got {url!r}"
            )
        scheme = urlsplit(url).scheme
        if scheme not in BROKER_SCHEMES:
            raise ConfigurationError(
                f"{where}: broker URL {mask_url(url)!r} has scheme {scheme!r}; use one of: "
                f"{', '.join(sorted(BROKER_SCHEMES))}"
            )
        schemes.append(scheme)
    if "memory" in schemes and len(urls) > 1:
        shown = ", ".join(repr(mask_url(u)) for u in urls)
        raise ConfigurationError(
            f"{where}: broker URLs {shown}: memory:// runs in process and takes no other URL; "
            "several URLs name the nodes of one RabbitMQ cluster (amqp:// or amqps://)"
        )
    return urls


def check_queue_type(value: Any, where: str) -> QueueType:
    """Return `value` as a queue type, or refuse it naming `where`."""
    if value not in _QUEUE_TYPES:
        raise ConfigurationError(
            f"{where}: queue_type must be 'classic' or 'quorum', got {value!r}"
        )
    return cast(QueueType, value)


def check_count(
    value: Any, where: str, option: str, *, low: int = 1, high: int | None = None
) -> int:
    """Return `value` if it is an integer in ``low..high`` (bools refused), else refuse it."""
    in_range = (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value <= high)
    )
    if not in_range:
        bounds = f">= {low}" if high is None else f"{low}..{high}"
        raise ConfigurationError(f"{where}: {option} must be an integer {bounds}, got {value!r}")
    return cast(int, value)


def check_prefetch(value: Any, where: str) -> int:
    """A prefetch is a whole number of unacked messages, at least one."""
    return check_count(value, where, "prefetch")


def check_seconds(value: Duration, where: str, option: str, *, positive: bool = False) -> float:
    """Read a duration option in seconds; `positive` refuses zero too."""
    try:
        seconds = to_seconds(value, what=f"{where}: {option}")
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if positive and seconds <= 0:
        raise ConfigurationError(f"{where}: {option} must be above zero, got {value!r}")
    return seconds


#: The largest value of an AMQP long-long-int, the widest type an ``x-message-ttl`` can have.
_AMQP_INT_MAX = 2**63 - 1
#: Even at 1 ms, 64 levels span more than any lifetime; their routing key (a digit per level
#: and the dots between) takes 127 of the 255 bytes AMQP allows.
_MAX_LEVELS = 64


def check_delay_ladder(unit: Duration, levels: Any, where: str) -> tuple[int, int]:
    """Return ``(unit in ms, levels)`` for a delay ladder, or refuse them naming `where`.

    The unit is at least a millisecond (RabbitMQ's TTLs count whole ones); the top level's
    TTL, ``unit · 2^(levels-1)``, must fit in an AMQP integer.
    """
    try:
        unit_ms = to_ms(unit, what=f"{where}: delay_unit")
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if unit_ms < 1:
        raise ConfigurationError(
            f"{where}: delay_unit must be at least 1ms (RabbitMQ TTLs are whole "
            f"milliseconds), got {unit!r}"
        )
    levels = check_count(levels, where, "delay_levels", high=_MAX_LEVELS)
    if unit_ms << (levels - 1) > _AMQP_INT_MAX:
        raise ConfigurationError(
            f"{where}: delay_levels={levels} at delay_unit={label(unit_ms)} gives the top "
            f"level a TTL of {unit_ms << (levels - 1)} ms, beyond what an AMQP integer holds; "
            "use fewer levels or a smaller unit"
        )
    return unit_ms, levels


@dataclass(frozen=True, slots=True)
class Settings:
    """The app's settings, resolved once: argument, then environment, then default.

    Build them with `Settings.build`, which checks every value; the attributes are then
    trusted everywhere. Durations are in seconds, except the delay ladder's unit (``_ms``).
    """

    url: str
    exchange: str
    queue_type: QueueType
    codec: Codec
    delivery_limit: int | None
    max_priority: int | None
    prefetch: int
    max_message_size: int
    publish_timeout: float
    connect_timeout: float
    shutdown_timeout: float
    thread_limit: int
    connection_name: str | None
    #: Every broker URL, `url` first: the nodes of a RabbitMQ cluster, tried in turn.
    urls: tuple[str, ...] = ()
    delay_unit_ms: int = 100
    delay_levels: int = 32

    @classmethod
    def build(
        cls,
        url: str | Sequence[str] | None = None,
        *,
        exchange: str = "cuebx",
        queue_type: QueueType = "classic",
        serializer: str = "json",
        delivery_limit: int | None = 10,
        max_priority: int | None = None,
        prefetch: int = 10,
        max_message_size: int = 1024 * 1024,
        publish_timeout: Duration = "30s",
        connect_timeout: Duration = "10s",
        shutdown_timeout: Duration = "30s",
        thread_limit: int = 40,
        connection_name: str | None = None,
        delay_unit: Duration = "100ms",
        delay_levels: int = 32,
    ) -> Settings:
        """Check and resolve the options of `cuebx.Cuebx` (see there for their meaning).

        Raises:
            ConfigurationError: an option is invalid; the message names it.
        """
        where = "Cuebx"
        if not isinstance(exchange, str) or not exchange or exchange.startswith("amq."):
            raise ConfigurationError(
                f"{where}: exchange must be a non-empty name not starting with 'amq.' "
                f"(RabbitMQ reserves those and the default exchange), got {exchange!r}"
            )
        try:
            codec = codec_for(serializer)
        except ValueError as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
        urls = _check_urls(url, where)
        delay_unit_ms, delay_levels = check_delay_ladder(delay_unit, delay_levels, where)
        return cls(
            url=urls[0],
            urls=urls,
            exchange=exchange,
            queue_type=check_queue_type(queue_type, where),
            codec=codec,
            delivery_limit=(
                None
                if delivery_limit is None
                else check_count(delivery_limit, where, "delivery_limit")
            ),
            max_priority=(
                None
                if max_priority is None
                else check_count(max_priority, where, "max_priority", high=255)
            ),
            prefetch=check_prefetch(prefetch, where),
            max_message_size=check_count(max_message_size, where, "max_message_size"),
            publish_timeout=check_seconds(publish_timeout, where, "publish_timeout", positive=True),
            connect_timeout=check_seconds(connect_timeout, where, "connect_timeout", positive=True),
            shutdown_timeout=check_seconds(shutdown_timeout, where, "shutdown_timeout"),
            thread_limit=check_count(thread_limit, where, "thread_limit"),
            connection_name=connection_name,
            delay_unit_ms=delay_unit_ms,
            delay_levels=delay_levels,
        )

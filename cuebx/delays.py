"""The delay ladder: countdowns, etas and ad-hoc retry delays, held by the broker.

A delayed message is never held by a sleeping publisher or by a worker: it waits in
ordinary durable queues whose TTLs add up to its delay. For an app exchange ``E``, with
``delay_levels`` L and ``delay_unit`` u, level k (0 ≤ k < L) is a topic exchange and a queue,
both named ``E.delay.<k>``; the queue's TTL is ``u·2^k`` and it dead-letters to exchange k-1
(level 0 to the deliver exchange). A message delayed by d units has d in binary, L digits,
most significant first, as its routing key (L=4, d=5: ``0.1.0.1``), and the header
``cuebx-delay-to: Q``. It is published to the entry, a headers exchange that sends it to the
level of its highest 1 by its ``cuebx-delay-level`` header. From there, exchange k looks at
digits k..0: it sends the message straight to the queue of the highest 1 among them, or to
the deliver exchange when they are all 0::

    publish 0.1.0.1 ─▶ exchange E.delay.enter ─▶ queue E.delay.2 (TTL 4u) ─▶ exchange E.delay.1
        ─▶ queue E.delay.0 (TTL 1u) ─▶ exchange E.delay.deliver (headers) ─▶ queue Q
                                          │ no queue matches (Q was deleted)
                                          ▼ alternate exchange E.delay.unroutable (fanout)
                                       queue E.delay.unroutable

So ``0.1.0.1`` waits 4u in level 2, then 1u in level 0: five units, in two hops, each through
one exchange; a delay of ten minutes at 100 ms has at most 13 hops. Each level queue holds
messages of one TTL only, so they expire in the order they came, and RabbitMQ, which expires
from the head of a queue only, never holds a short delay behind a long one.

This module has the pure part (`Ladder`: names, arguments, routing keys, the topology) and
the publish side (`Delays`: the ladder declared once per broker, then routed into), used by
the publisher (``countdown=``, ``eta=``) and the worker (``Retry(delay=)``, `Postpone`, and
messages that arrive before their ``x-cuebx-eta``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import anyio

from cuebx.brokers.base import Broker, Clock
from cuebx.durations import Duration, label, to_ms
from cuebx.errors import DelayError
from cuebx.message import (
    BROKER_HEADERS,
    HEADER_DELAY_LEVEL,
    HEADER_DELAY_TO,
    HEADER_ETA,
    HEADER_REDELIVERIES,
    OutgoingMessage,
    eta_of,
)
from cuebx.settings import Settings
from cuebx.topology import Binding, ExchangeSpec, QueueSpec, QueueType, Topology

__all__ = [
    "Delays",
    "Ladder",
    "LadderStatus",
    "LevelStatus",
    "due_us",
    "ladder_status",
    "now_us",
]

_LEFT_BEHIND = BROKER_HEADERS | {HEADER_REDELIVERIES}


@dataclass(frozen=True, slots=True)
class Ladder:
    """The delay ladder of one exchange: its names, arguments and routing, as values.

    Attributes:
        exchange: the app's exchange; the ladder's objects are named after it.
        unit_ms: the TTL of level 0; level k's is ``unit_ms · 2^k``.
        levels: how many levels: the longest delay is ``2^levels - 1`` units.
        queue_type: the levels' queue type: quorum levels dead-letter at-least-once.
    """

    exchange: str
    unit_ms: int = 100
    levels: int = 32
    queue_type: QueueType = "classic"

    @classmethod
    def of(cls, settings: Settings) -> Ladder:
        """The ladder an app's settings ask for."""
        return cls(
            settings.exchange, settings.delay_unit_ms, settings.delay_levels, settings.queue_type
        )

    # -- names ------------------------------------------------------------------------------

    def level(self, k: int) -> str:
        """Name level `k`'s queue and topic exchange (AMQP keeps their names apart)."""
        return f"{self.exchange}.delay.{k}"

    @property
    def entry(self) -> str:
        """The headers exchange delayed messages are published to.

        It sends each one straight to the first level it waits in, by its
        ``cuebx-delay-level`` header: matching a header costs RabbitMQ a fraction of
        matching a routing key of `levels` words in a topic exchange, and this match is on
        the publisher's path.
        """
        return f"{self.exchange}.delay.enter"

    @property
    def deliver(self) -> str:
        """The headers exchange that routes a message leaving the ladder to its queue."""
        return f"{self.exchange}.delay.deliver"

    @property
    def unroutable(self) -> str:
        """The fanout exchange and the queue where a message for a deleted queue ends."""
        return f"{self.exchange}.delay.unroutable"

    def ttl_ms(self, k: int) -> int:
        """Level `k`'s TTL: ``unit_ms · 2^k``."""
        return self.unit_ms << k

    @property
    def max_units(self) -> int:
        """The longest delay, in units."""
        return (1 << self.levels) - 1

    @property
    def max_delay_ms(self) -> int:
        """The longest delay, in milliseconds."""
        return self.max_units * self.unit_ms

    # -- routing ----------------------------------------------------------------------------

    def units(self, due_us: int, now_us: int) -> int:
        """Count the units to wait from `now_us` so as to arrive at `due_us`, rounded up.

        Times are whole epoch microseconds, so the count is exact: rounded up, a message is
        never early, and float noise never costs it a whole extra unit. Zero when it is due.
        """
        remaining = due_us - now_us
        return 0 if remaining <= 0 else -(-remaining // (self.unit_ms * 1000))

    def routing_key(self, units: int) -> str:
        """The routing key of a delay: its `levels` binary digits, most significant first."""
        if not 0 <= units <= self.max_units:
            raise ValueError(f"a delay of {units} units is outside 0..{self.max_units}")
        return ".".join(format(units, f"0{self.levels}b"))

    def hops(self, units: int) -> tuple[int, ...]:
        """The levels a delay of `units` waits in, in the order it passes them."""
        return tuple(k for k in reversed(range(self.levels)) if units >> k & 1)

    def check(self, units: int, where: str) -> None:
        """Refuse a delay beyond the ladder's span, naming the maximum.

        Raises:
            DelayError: `units` is more than `max_units`.
        """
        if units > self.max_units:
            raise DelayError(
                f"{where}: a delay of {label(units * self.unit_ms)} is longer than the delay "
                f"ladder holds: at most {label(self.max_delay_ms)} "
                f"(2^{self.levels} - 1 units of {label(self.unit_ms)}; raise delay_levels "
                "or delay_unit on every app of the exchange)"
            )

    def prepare(
        self, message: OutgoingMessage, destination: str, *, due_us: int, now_us: int
    ) -> tuple[str, str, OutgoingMessage]:
        """Route a message to `destination` through the ladder: (exchange, key, message).

        The message is stamped with ``x-cuebx-eta`` (the due time, in whole epoch ms),
        ``cuebx-delay-to`` and ``cuebx-delay-level`` (its first level); headers RabbitMQ
        added (``x-death``...) and a redelivery count are left behind, since each would grow
        or trip RabbitMQ's dead-letter cycle detection. A delay beyond the ladder's span
        goes down it for the longest delay: the worker that gets it early sends it down
        again (see `cuebx.policy.admit`). Nothing to wait for: straight to `destination`
        through the default exchange.
        """
        units = min(self.units(due_us, now_us), self.max_units)
        if units == 0:
            return "", destination, message
        stamped = self.stamp(message, destination, due_us, units)
        return self.entry, self.routing_key(units), stamped

    @staticmethod
    def stamp(
        message: OutgoingMessage, destination: str, due_us: int, units: int
    ) -> OutgoingMessage:
        """Copy `message` with its delay headers, leaving broker-added headers behind."""
        headers = {k: v for k, v in message.headers.items() if k not in _LEFT_BEHIND}
        # In whole ms, floored: the eta never lies after the moment the ladder delivers it.
        headers[HEADER_ETA] = due_us // 1000
        headers[HEADER_DELAY_TO] = destination
        headers[HEADER_DELAY_LEVEL] = units.bit_length() - 1
        return replace(message, headers=headers)

    # -- topology ---------------------------------------------------------------------------

    def topology(self, destinations: Iterable[str] = ()) -> Topology:
        """Everything the ladder declares, with a deliver binding for each destination queue.

        Level k's exchange takes what leaves level k+1, so the top level has a queue but no
        exchange: messages enter the ladder through `entry`.
        """
        exchanges = [
            ExchangeSpec(self.unroutable, "fanout"),
            ExchangeSpec(self.deliver, "headers", {"alternate-exchange": self.unroutable}),
            *(ExchangeSpec(self.level(k), "topic") for k in range(self.levels - 1)),
            ExchangeSpec(self.entry, "headers"),
        ]
        queues = [
            QueueSpec(self.unroutable, "unroutable", self._type_arguments(), self.queue_type),
            *(
                QueueSpec(self.level(k), "delay", self._level_arguments(k), self.queue_type)
                for k in range(self.levels)
            ),
        ]
        bindings = [Binding(self.unroutable, self.unroutable)]
        for k in range(self.levels - 1):
            bindings += self._level_bindings(k)
        bindings += [
            Binding(self.entry, self.level(k), arguments={"x-match": "all", HEADER_DELAY_LEVEL: k})
            for k in range(self.levels)
        ]
        return Topology(
            self.exchange,
            tuple(queues),
            exchanges=tuple(exchanges),
            bindings=(*bindings, *self.deliver_bindings(destinations)),
        )

    def deliver_bindings(self, destinations: Iterable[str]) -> tuple[Binding, ...]:
        """Bind each destination queue to the deliver exchange by an exact header match.

        An exact match on ``cuebx-delay-to`` works for any queue name, where a topic
        binding ``#.<queue>`` would also take the messages of ``x.<queue>``.
        """
        return tuple(
            Binding(self.deliver, queue, arguments={"x-match": "all", HEADER_DELAY_TO: queue})
            for queue in destinations
        )

    def _level_bindings(self, k: int) -> list[Binding]:
        """Bind exchange k straight to the queue of the highest 1 among digits k..0.

        A message comes to exchange k dead-lettered from level k+1, with the digits above k
        spent. One topic match sends it to the next level it waits in, or, when digits k..0
        are all 0, to the deliver exchange. So each hop passes one exchange, never a chain
        of exchange-to-exchange bindings through the zeros: RabbitMQ routes each exchange of
        such a chain in turn, which made a delayed publish about 15 times slower than a
        plain one on RabbitMQ 3.10.
        """
        bindings = [
            Binding(self.level(k), self.level(j), self._pattern(k, j)) for j in range(k, -1, -1)
        ]
        bindings.append(
            Binding(
                self.level(k), self.deliver, self._pattern(k, None), destination_type="exchange"
            )
        )
        return bindings

    def _next(self, k: int) -> str:
        return self.level(k - 1) if k else self.deliver

    def _pattern(self, k: int, j: int | None) -> str:
        # Digits count from the right: digits k..j+1 are 0 and digit j is 1 (None: all of
        # k..0 are 0); '*' is exactly one word, so keys of ladders with another number of
        # levels (apps that share the exchange) never match.
        words = ["*"] * self.levels
        low = -1 if j is None else j
        for digit in range(k, low, -1):
            words[self.levels - 1 - digit] = "0"
        if j is not None:
            words[self.levels - 1 - j] = "1"
        return ".".join(words)

    def _type_arguments(self) -> dict[str, Any]:
        return {"x-queue-type": "quorum"} if self.queue_type == "quorum" else {}

    def _level_arguments(self, k: int) -> dict[str, Any]:
        args = self._type_arguments()
        args["x-message-ttl"] = self.ttl_ms(k)
        # No x-dead-letter-routing-key: the message keeps its key, its binary delay.
        args["x-dead-letter-exchange"] = self._next(k)
        if self.queue_type == "quorum":
            # A classic queue's dead-letter hop is not confirmed: in a cluster it can drop
            # the message. A quorum queue keeps it until the next level confirmed it.
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
        return args


def now_us(clock: Clock) -> int:
    """Read a broker clock in whole epoch microseconds (floored: never ahead of it)."""
    return math.floor(clock.time() * 1_000_000)


def due_us(
    *,
    countdown: Duration | None,
    eta: datetime | None,
    now: int,
    task: str,
) -> int | None:
    """When a task's message is due, in epoch microseconds; None when it has no delay.

    Args:
        countdown: seconds (a number, counted to the microsecond), a duration string
            (``"10m"``) or a `timedelta`.
        eta: an aware `datetime`.
        now: the broker's clock, epoch microseconds (`now_us`).
        task: the task's name, for the errors.

    Raises:
        DelayError: both are given, the countdown is negative or not a duration, or the eta
            is naive (cuebx cannot tell which time zone it means).
    """
    where = f"task {task!r}"
    if countdown is not None and eta is not None:
        raise DelayError(f"{where}: give countdown= or eta=, not both")
    if eta is not None:
        if not isinstance(eta, datetime):
            raise DelayError(f"{where}: eta must be a datetime, got {eta!r}")
        if eta.utcoffset() is None:
            raise DelayError(
                f"{where}: eta={eta.isoformat()} has no time zone, so cuebx cannot tell when "
                "it is; pass an aware datetime, such as datetime(2027, 1, 1, 9, tzinfo=UTC)"
            )
        return (eta - _EPOCH) // timedelta(microseconds=1)
    if countdown is None:
        return None
    return now + _countdown_us(countdown, where)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _countdown_us(countdown: Duration, where: str) -> int:
    if isinstance(countdown, timedelta):
        us: float = countdown // timedelta(microseconds=1)
    elif isinstance(countdown, int | float) and not isinstance(countdown, bool):
        us = countdown * 1_000_000
    else:
        try:
            us = to_ms(countdown, what=f"{where}: countdown") * 1000
        except ValueError as exc:
            raise DelayError(str(exc)) from None
    if not math.isfinite(us) or us < 0:
        raise DelayError(
            f"{where}: countdown must be a duration of zero or more, got {countdown!r}"
        )
    # Rounded to the microsecond: 0.6 s is 600000 us, not 600000.0000000001.
    return round(us)


class Delays:
    """An app's delay ladder on its broker: declared on first use, then published into.

    The ladder is declared the first time the app delays a message on a broker, not when
    it connects, so that an app that never delays pays nothing for it and apps on one
    exchange that never delay need not agree on it. The deliver bindings of the app's
    queues (`destinations`) are declared with it, and any other queue when first used.

    Args:
        ladder: the ladder's shape.
        destinations: the queues delayed messages may go to (the app's main queues).
    """

    def __init__(self, ladder: Ladder, destinations: Callable[[], Iterable[str]] = tuple) -> None:
        self.ladder = ladder
        self._destinations = destinations
        self._broker: Broker | None = None
        self._bound: frozenset[str] = frozenset()
        self._lock = anyio.Lock()

    def declared_on(self, broker: Broker) -> bool:
        """Tell whether the ladder was declared on `broker` by this object."""
        return broker is self._broker

    def topology(self) -> Topology:
        """The ladder with the deliver bindings of the app's queues."""
        return self.ladder.topology(self._destinations())

    async def declare(self, broker: Broker, *queues: str) -> None:
        """Declare the ladder on `broker` once, and the deliver binding of each of `queues`.

        The first time on a broker, the app's `destinations` are bound too; a queue of a
        task registered afterwards is bound the first time it is given here.

        Raises:
            TopologyConflictError: a level exists with another TTL or queue type: apps
                that share an exchange must agree on ``delay_unit`` and ``queue_type``.
            TopologyError: the broker refused another part of the ladder.
        """
        if broker is self._broker and all(queue in self._bound for queue in queues):
            return  # the path of every delayed publish: keep it cheap
        wanted = frozenset((*self._destinations(), *queues))
        async with self._lock:
            if broker is not self._broker:
                await broker.declare(self.ladder.topology(sorted(wanted)))
                self._broker, self._bound = broker, wanted
                return
            missing = sorted(wanted - self._bound)
            if missing:
                bindings = self.ladder.deliver_bindings(missing)
                await broker.declare(Topology(self.ladder.exchange, (), bindings=bindings))
                self._bound |= wanted

    def forget(self) -> None:
        """Declare again on next use (a publish into the ladder failed: was it deleted?)."""
        self._broker, self._bound = None, frozenset()


# -- status -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LevelStatus:
    """One queue of the ladder, as the broker has it now.

    Attributes:
        queue: its name.
        ttl_ms: how long a message waits in it (None for the unroutable queue).
        messages: messages ready in it; None when it does not exist (never declared).
        head_eta: when the message at its head (the next to leave) is due, if it says.
        head_destination: the queue that message goes to.
    """

    queue: str
    ttl_ms: int | None
    messages: int | None
    head_eta: datetime | None = None
    head_destination: str | None = None


@dataclass(frozen=True, slots=True)
class LadderStatus:
    """The delay ladder of an exchange, level by level, and its unroutable queue."""

    exchange: str
    unit_ms: int
    levels: tuple[LevelStatus, ...]
    unroutable: LevelStatus

    @property
    def declared(self) -> bool:
        """Whether the ladder exists on the broker."""
        return all(level.messages is not None for level in self.levels)

    @property
    def waiting(self) -> int:
        """Messages waiting in the ladder (the unroutable queue not counted)."""
        return sum(level.messages or 0 for level in self.levels)


class _App(Protocol):
    @property
    def broker(self) -> Broker: ...
    @property
    def delays(self) -> Delays: ...


async def ladder_status(app: _App) -> LadderStatus:
    """Look at an app's delay ladder: per level, messages waiting and when the next is due.

    It connects the broker but declares nothing. The head of each level is peeked, which
    on RabbitMQ is a ``basic.get`` put back at once: nobody consumes a level, so that
    changes nothing but its redelivered flag (on a quorum level, it counts one return;
    levels have no delivery limit).
    """
    broker = app.broker
    await broker.connect()
    ladder = app.delays.ladder
    levels = [
        await _level_status(broker, ladder.level(k), ladder.ttl_ms(k)) for k in range(ladder.levels)
    ]
    unroutable = await _level_status(broker, ladder.unroutable, None)
    return LadderStatus(ladder.exchange, ladder.unit_ms, tuple(levels), unroutable)


async def _level_status(broker: Broker, queue: str, ttl_ms: int | None) -> LevelStatus:
    try:
        count = await broker.queue_length(queue)
    except LookupError:
        return LevelStatus(queue, ttl_ms, None)
    if not count:
        return LevelStatus(queue, ttl_ms, 0)
    head = await broker.peek(queue, 1)
    if not head:
        return LevelStatus(queue, ttl_ms, count)
    eta = eta_of(head[0].headers)
    destination = head[0].headers.get(HEADER_DELAY_TO)
    return LevelStatus(
        queue,
        ttl_ms,
        count,
        None if eta is None else datetime.fromtimestamp(eta / 1000, UTC),
        destination if isinstance(destination, str) else None,
    )

"""The broker protocol: queues and bytes, never tasks.

A broker declares a `Topology`, publishes `OutgoingMessage` values with confirms, and hands
each delivery of a consumed queue to a handler of the worker, in a task of its own. Two
implementations stand behind it: `cuebx.brokers.amqp` (RabbitMQ through aio-pika) and
`cuebx.brokers.memory` (in process).
Brokers are chosen by URL scheme and imported lazily, so ``memory://`` never loads aio-pika.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeAlias, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import anyio
from anyio.lowlevel import checkpoint

from cuebx.message import OutgoingMessage
from cuebx.topology import Topology

__all__ = [
    "Broker",
    "Clock",
    "Delivery",
    "DeliveryHandler",
    "LostHandler",
    "QueueState",
    "ReplyHandler",
    "Subscription",
    "BROKER_SCHEMES",
    "SystemClock",
    "UNREADABLE",
    "broker_for_url",
    "mask_url",
]


@runtime_checkable
class Delivery(Protocol):
    """One message received from a queue, to be acked or rejected exactly once."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, Any]: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def priority(self) -> int | None: ...
    @property
    def timestamp(self) -> datetime | None: ...
    @property
    def redelivered(self) -> bool: ...
    @property
    def channel_open(self) -> bool:
        """False once the channel that delivered it closed: the broker put the message back
        in its queue, and settling it does nothing. Lets code that holds a delivery for long
        (a scheduler's state message) learn that it no longer holds it."""
        ...

    @property
    def reply_to(self) -> str | None:
        """Where the publisher waits for a reply (direct reply-to), if anywhere."""

    async def ack(self) -> None:
        """Acknowledge: the broker forgets the message. A lost channel is not an error:
        the broker redelivers what was not acked."""

    async def reject(self, *, requeue: bool) -> None:
        """Reject: requeue it, or let the broker dead-letter (or drop) it."""


ReplyHandler: TypeAlias = Callable[[str | None, Mapping[str, Any], bytes], None]
"""Called by a broker for each reply: ``(correlation_id, headers, body)``, in its reader."""

LostHandler: TypeAlias = Callable[[BaseException | None], None]
"""Called by a broker when the channel its replies came on is gone, with why."""

DeliveryHandler: TypeAlias = Callable[[Delivery], Coroutine[Any, Any, None]]
"""Called by a broker once per delivery, each call in its own task; it settles the delivery."""


class Subscription(Protocol):
    """A running consumer of one queue."""

    @property
    def consuming(self) -> bool:
        """True while the broker delivers to it: not cancelled by us, nor by the broker (its
        queue was deleted), nor lost with a channel that could not consume again."""

    async def cancel(self) -> None:
        """Stop new deliveries (basic.cancel); delivered ones can still be acked."""

    async def close(self) -> None:
        """Cancel, then close the consumer's channel: unacked deliveries are requeued."""


class Clock(Protocol):
    """The broker's time, for code that waits on it (schedules, delays).

    RabbitMQ runs on the wall clock (`SystemClock`); the memory broker's clock can jump ahead,
    so code that reads and waits through ``broker.clock`` runs the same on both, in no wall
    time on ``memory://``.
    """

    def time(self) -> float:
        """Return the time in seconds since the epoch, UTC, like `time.time`."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's time (never less)."""

    async def sleep_until(self, epoch_seconds: float) -> None:
        """Wait until `time` reaches `epoch_seconds` (never earlier)."""


class SystemClock:
    """The wall clock, for brokers that run in real time."""

    def time(self) -> float:
        """Return `time.time`."""
        return time.time()

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of real time (``anyio.sleep``)."""
        await anyio.sleep(seconds)

    async def sleep_until(self, epoch_seconds: float) -> None:
        """Wait until the wall clock reaches `epoch_seconds`; a past time only yields.

        It sleeps on the monotonic clock and looks at the wall clock again when it wakes,
        so a wall clock set back meanwhile (NTP) makes it sleep on instead of waking early.
        """
        remaining = epoch_seconds - time.time()
        if remaining <= 0:
            await checkpoint()
            return
        await anyio.sleep(remaining)
        await self.sleep_until(epoch_seconds)


class _Unreadable:
    def __repr__(self) -> str:
        return "<not readable: RabbitMQ cut its reply short>"


UNREADABLE: Any = _Unreadable()
"""A queue argument's value a broker could not read back (see `Broker.compare_queue`)."""


@dataclass(frozen=True, slots=True)
class QueueState:
    """What a broker tells about one queue without taking anything from it.

    Attributes:
        name: the queue.
        ready: messages ready for delivery.
        consumers: consumers registered on it.
        unacked: messages delivered and not yet settled, when the broker says
            (``memory://`` does; RabbitMQ's ``queue.declare-ok`` carries ready and consumers
            only, so over AMQP it is None).
    """

    name: str
    ready: int
    consumers: int
    unacked: int | None = None


class Broker(Protocol):
    """What cuebx needs from a broker."""

    url: str

    @property
    def connected(self) -> bool:
        """True while the connection is open (False before `connect`, after `close`, and
        while a lost connection is being restored)."""
        ...

    @property
    def clock(self) -> Clock:
        """The broker's time: `SystemClock` on RabbitMQ, a virtual clock in memory."""
        ...

    async def connect(self) -> None:
        """Open the connection (idempotent)."""

    async def close(self) -> None:
        """Close everything; unacked deliveries go back to their queues.

        Handler calls still running are cancelled: a worker closing its app has already
        waited for them, so what is left ignored that.
        """

    async def declare(self, topology: Topology) -> None:
        """Declare the exchange, queues and bindings.

        Raises:
            TopologyConflictError: a queue exists with other arguments.
        """

    async def delete(self, topology: Topology) -> None:
        """Delete the queues of `topology` (not the exchange, which others may share)."""

    async def publish(self, exchange: str, routing_key: str, message: OutgoingMessage) -> None:
        """Publish one persistent, mandatory message and wait for its confirm.

        Raises:
            UnroutableError: no queue is bound for the routing key.
            PublishError: the broker nacked it, or the connection failed.
            PublishTimeoutError: no confirm within the broker's publish timeout.
        """

    async def publish_many(
        self, exchange: str, items: Sequence[tuple[str, OutgoingMessage]], *, window: int
    ) -> list[BaseException | None]:
        """Publish many messages, at most `window` unconfirmed at once.

        Returns:
            One entry per item, in order: None when confirmed, else the error.
        """

    async def offer(self, queue: str, message: OutgoingMessage) -> bool:
        """Publish a transient message straight to `queue`; tell whether the queue took it.

        For a queue bounded with ``x-overflow: reject-publish`` (a rate limiter's): the
        broker nacks a message that finds it full, and that is an answer, False, not an
        error. On a channel of its own with publisher confirms, so that such nacks never
        touch the channel task messages are published on. Mandatory, like `publish`.

        Returns:
            True when confirmed, False when nacked (the queue is full).

        Raises:
            UnroutableError: the queue does not exist.
            PublishError: the connection failed.
            PublishTimeoutError: no answer within the broker's publish timeout.
        """

    async def consume(self, queue: str, prefetch: int, handler: DeliveryHandler) -> Subscription:
        """Start consuming `queue` with at most `prefetch` unsettled deliveries (0: no limit).

        The broker calls ``handler(delivery)`` for each delivery, each call in a task of its
        own that starts in a copy of the caller's context variables, so at most `prefetch`
        calls run at once. Nothing is buffered between the broker and the handler.
        `handler` should settle the delivery and not raise: an exception is logged and
        leaves the delivery unsettled until its consumer closes. Closing the subscription
        (or losing the connection) does not cancel running calls: their unsettled
        deliveries go back to the queue, and settling them later does nothing. Returns once
        the consumer is registered.
        """

    async def queue_length(self, queue: str) -> int:
        """Return how many messages are ready in `queue` (not counting unacked ones)."""

    async def consume_replies(self, on_reply: ReplyHandler, on_lost: LostHandler) -> str:
        """Receive replies on the channel `publish` uses; return the address to reply to.

        RabbitMQ's direct reply-to: a ``basic.consume`` of ``amq.rabbitmq.reply-to`` in
        no-ack mode, on the same channel that publishes the requests (RabbitMQ ties the
        replies to it). Idempotent while that channel lives. When the channel or connection
        is lost, `on_lost` is called once: replies on their way are dropped by RabbitMQ, and
        the next call registers a new consumer.
        """

    async def reply(self, reply_to: str, message: OutgoingMessage) -> None:
        """Send a reply through the default exchange to `reply_to`, with a confirm.

        Not mandatory: a caller that has gone is not an error (RabbitMQ drops the reply).

        Raises:
            PublishError: the broker did not confirm it.
        """

    async def peek(self, queue: str, limit: int = 1000) -> list[OutgoingMessage]:
        """Return up to `limit` ready messages of `queue`, in order, leaving them there."""

    async def get(self, queue: str) -> Delivery | None:
        """Take the next ready message of `queue` (``basic.get``), or None when there is none.

        The delivery is settled like a consumed one: ack it, or reject it. Until then it is
        unacked, and closing the broker (or losing the connection) puts it back.

        Raises:
            LookupError: the queue does not exist.
        """

    async def queue_state(self, queue: str) -> QueueState | None:
        """Describe `queue` (a passive ``queue.declare``), or return None if it does not exist."""

    async def compare_queue(
        self, queue: str, arguments: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Tell how `queue` differs from a declaration with `arguments` (durable), changing nothing.

        Returns:
            None when the queue does not exist; else, for every argument a declaration would
            be refused over, the queue's own value (None when the queue does not set it,
            `UNREADABLE` when it could not be read back); ``durable`` is named like an
            argument. Empty when the declaration would succeed.
        """

    async def compare_exchange(self, exchange: str, kind: str) -> dict[str, Any] | None:
        """Tell how `exchange` differs from a durable exchange of type `kind`, changing nothing.

        Returns:
            None when it does not exist; else ``{"type": ...}`` and/or ``{"durable": ...}``
            with the exchange's own values where they differ; empty when they match.
        """


BROKER_SCHEMES = {
    "amqp": "cuebx.brokers.amqp:AmqpBroker",
    "amqps": "cuebx.brokers.amqp:AmqpBroker",
    "memory": "cuebx.brokers.memory:MemoryBroker",
}


def broker_for_url(url: str, **options: Any) -> Broker:
    """Build the broker for a URL by its scheme, importing its module only now."""
    scheme = urlsplit(url).scheme
    try:
        module_name, _, attr = BROKER_SCHEMES[scheme].partition(":")
    except KeyError:
        raise ValueError(
            f"broker URL {mask_url(url)!r} has scheme {scheme!r}; "
            f"use one of: {', '.join(sorted(BROKER_SCHEMES))}"
        ) from None
    factory = getattr(importlib.import_module(module_name), attr)
    broker: Broker = factory(url, **options)
    return broker


def mask_url(url: str) -> str:
    """Hide the password of a URL, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))

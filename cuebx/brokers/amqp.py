"""RabbitMQ through aio-pika: the only module of cuebx that imports aio-pika or aiormq.

One robust connection per broker (aio-pika reconnects it and reopens its channels), one
channel with publisher confirms shared by every publisher in the process, and one channel
per consumed queue with its own ``basic.qos`` prefetch. Publishing and consuming go
straight to the aiormq channel under aio-pika's robust one: aio-pika's message objects
cost more per message than everything else cuebx does. aio-pika and aiormq exceptions are
translated into cuebx's at this boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import anyio
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aio_pika.connection import make_url
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from cuebx.brokers.base import (
    UNREADABLE,
    DeliveryHandler,
    LostHandler,
    QueueState,
    ReplyHandler,
    SystemClock,
    mask_url,
)
from cuebx.errors import (
    BrokerUnavailableError,
    PublishError,
    PublishTimeoutError,
    TopologyConflictError,
    TopologyError,
    UnroutableError,
)
from cuebx.message import HEADER_ATTEMPT, HEADER_TASK, OutgoingMessage, header_count
from cuebx.topology import (
    ArgumentDifference,
    Binding,
    ExchangeSpec,
    Topology,
    describe_differences,
)

__all__ = ["AmqpBroker"]

logger = logging.getLogger("cuebx.amqp")


def _not_a_refused_connection(record: logging.LogRecord) -> bool:
    """aiormq logs each refused connection attempt as an error of its own; cuebx reports
    the failure once, with the (masked) URL, and aio-pika logs its reconnection attempts."""
    return record.msg != "error when creating transport: %r"


logging.getLogger("aiormq.connection").addFilter(_not_a_refused_connection)


def _not_a_channel_restored_too_early(record: logging.LogRecord) -> bool:
    """When a connection is lost, each robust channel's close callback tries to reopen it on
    the connection that is gone, fails, and aio-pika logs that as an error; the connection
    reopens every channel once it is back, and cuebx reports the loss itself."""
    args = record.args
    return not (
        record.msg == "Callback %r error: %s: %s"
        and isinstance(args, tuple)
        and len(args) == 3
        and args[1] == "RuntimeError"
        and "RobustChannel._on_close" in repr(args[0])
        and str(args[2]).endswith(" closed")
    )


logging.getLogger("aio_pika.tools").addFilter(_not_a_channel_restored_too_early)

_PERSISTENT = 2
_TRANSIENT = 1
#: RabbitMQ's pseudo-queue for direct reply-to (no declaration, consumed in no-ack mode).
_DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
_LOST_CHANNEL = (
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    RuntimeError,
)
#: How a publish can end without a confirm (see `AmqpBroker._unconfirmed`).
_UNCONFIRMED = (TimeoutError, asyncio.CancelledError, *_LOST_CHANNEL)


class _Acks:
    """The acks of one aiormq channel, sent in batches by one sender at a time.

    A handler's ack joins the current batch; the channel's sender task sends a batch once
    the event-loop turn that filled it is over: a single ``basic.ack(multiple=True)`` for
    every acked delivery below the lowest one still unsettled, and a plain ``basic.ack``
    for each acked delivery above it (a slow handler never holds back the acks of the
    others). Every caller of `ack` returns once the frame covering its delivery is
    written, as with one frame per ack; the broker sees a fraction of the frames.

    A delivery left unsettled on purpose (a stopping worker leaves late ones to go back
    when the channel closes) is never covered by a multiple ack: the floor stops below it.
    Neither is one being rejected: it counts as settled only once its reject frame is
    written, so no multiple ack can overtake the reject on the wire.
    """

    __slots__ = ("_batch", "_floor", "_pending", "_sender", "_settled", "channel")

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        # Every delivery tag up to `_floor` is settled; `_settled` holds those above it.
        self._floor = 0
        self._settled: set[int] = set()
        self._pending: list[int] = []
        self._batch: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None

    def rejected(self, tag: int) -> None:
        """Note a delivery whose reject frame has been written."""
        self._settled.add(tag)

    async def ack(self, tag: int) -> None:
        """Ack `tag` with the next batch; return once that batch is written."""
        self._pending.append(tag)
        batch = self._batch
        if batch is None:
            batch = self._batch = asyncio.get_running_loop().create_future()
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_batches())
        # Shielded: a cancelled handler's ack still goes out with its batch.
        await asyncio.shield(batch)

    async def _send_batches(self) -> None:
        try:
            while self._batch is not None:
                batch, pending = self._batch, sorted(self._pending)
                self._batch, self._pending = None, []
                try:
                    await self._send(pending)
                except BaseException as exc:
                    # Every caller waits on this batch: it must end, whatever ended the send.
                    # aiormq fails a frame of a connection it closed (a missed heartbeat)
                    # with the reader's CancelledError: that is a lost channel, not a
                    # cancellation of this task.
                    cancelled = _cancelling()
                    lost = exc if isinstance(exc, Exception) or cancelled else None
                    batch.set_exception(lost or ConnectionError(f"channel lost: {exc!r}"))
                    batch.exception()  # retrieved here: the acks' callers may all be gone
                    if cancelled:
                        raise
                else:
                    batch.set_result(None)
        finally:
            self._sender = None

    async def _send(self, pending: list[int]) -> None:
        settled = self._settled
        settled.update(pending)
        floor = self._floor
        while floor + 1 in settled:
            floor += 1
            settled.discard(floor)
        self._floor = floor
        below = [t for t in pending if t <= floor]
        if below:
            await self.channel.basic_ack(below[-1], multiple=len(below) > 1)
        for tag in pending[len(below) :]:
            await self.channel.basic_ack(tag)


class _AmqpDelivery:
    """A received message: aiormq's frame and properties, read lazily, acked on its channel."""

    __slots__ = ("_acks", "_channel", "_props", "_tag", "body", "redelivered")

    def __init__(self, message: DeliveredMessage, acks: _Acks) -> None:
        delivery = message.delivery
        assert isinstance(delivery, spec.Basic.Deliver | spec.Basic.GetOk)
        self._channel = message.channel
        self._acks = acks
        self._props = message.header.properties
        self._tag: int = delivery.delivery_tag or 0
        self.body = message.body
        self.redelivered = bool(delivery.redelivered)

    @property
    def headers(self) -> Mapping[str, Any]:
        return self._props.headers or {}

    @property
    def message_id(self) -> str | None:
        return self._props.message_id

    @property
    def correlation_id(self) -> str | None:
        return self._props.correlation_id

    @property
    def content_type(self) -> str | None:
        return self._props.content_type

    @property
    def priority(self) -> int | None:
        return self._props.priority

    @property
    def timestamp(self) -> datetime | None:
        return self._props.timestamp

    @property
    def channel_open(self) -> bool:
        # aio-pika reopens a lost channel as a new aiormq channel: this one stays closed.
        return not self._channel.is_closed

    @property
    def reply_to(self) -> str | None:
        return self._props.reply_to

    async def ack(self) -> None:
        try:
            await self._acks.ack(self._tag)
        except _LOST_CHANNEL as exc:
            # The channel that delivered it is gone, so RabbitMQ has already put the
            # message back in its queue: it will be delivered again.
            logger.warning(
                "could not ack message %s, it will be redelivered: %s",
                self.message_id,
                exc,
                extra=self.log_extra(),
            )

    async def reject(self, *, requeue: bool) -> None:
        try:
            await self._channel.basic_reject(self._tag, requeue=requeue)
            self._acks.rejected(self._tag)
        except _LOST_CHANNEL as exc:
            logger.warning(
                "could not reject message %s, it will be redelivered: %s",
                self.message_id,
                exc,
                extra=self.log_extra(),
            )

    def log_extra(self) -> dict[str, Any]:
        """The extras of a log record about this message: task, message_id, attempt."""
        headers = self.headers
        return {
            "task": headers.get(HEADER_TASK),
            "message_id": self.message_id,
            "attempt": header_count(headers.get(HEADER_ATTEMPT)),
        }


class _Subscription:
    """One queue's consumer on its own robust channel.

    Each delivery's handler runs in an asyncio task of its own, in a copy of the context
    of whoever called `consume` (not that of aiormq's reader, which after a reconnection
    is whatever task connected), and outside aiormq's tasks: closing the channel or losing
    the connection does not cancel a running handler. Its ack then fails, and RabbitMQ
    redelivers the message. Whenever aio-pika reopens the channel (after a reconnection,
    or after RabbitMQ closed just this channel), the consumer is registered again.
    """

    def __init__(
        self,
        channel: AbstractRobustChannel,
        queue: str,
        handler: DeliveryHandler,
        *,
        cancel_timeout: float,
        on_closed: Callable[[_Subscription], None],
    ) -> None:
        self.channel = channel
        self._on_closed = on_closed
        self.queue = queue
        self.handler = handler
        self.cancel_timeout = cancel_timeout
        self.consumer_tag: str | None = None
        self.active = True
        # The broker has this consumer registered (False once it cancelled it).
        self._registered = False
        self._context = contextvars.copy_context()
        self._running: set[asyncio.Task[None]] = set()
        self._acks: _Acks | None = None

    async def _on_message(self, message: DeliveredMessage) -> None:
        acks = self._acks
        if acks is None or acks.channel is not message.channel:
            # Delivery tags are per channel: a reopened channel starts a new count.
            acks = self._acks = _Acks(message.channel)
        delivery = _AmqpDelivery(message, acks)
        # A copy per task: tasks sharing one context would see each other's variables.
        task = asyncio.get_running_loop().create_task(
            self.handler(delivery), context=self._context.copy()
        )
        self._running.add(task)
        task.add_done_callback(functools.partial(self._finished, delivery))

    def _finished(self, delivery: _AmqpDelivery, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error(
                "the handler of message %s from %r failed; the message stays unacked until "
                "the channel closes",
                delivery.message_id,
                self.queue,
                exc_info=error,
                extra=delivery.log_extra(),
            )

    @property
    def consuming(self) -> bool:
        """True while RabbitMQ delivers to this consumer (see `Subscription.consuming`)."""
        return self.active and self._registered

    def _on_cancelled(self, frame: spec.Basic.Cancel) -> None:
        if frame.consumer_tag == self.consumer_tag and self.active:
            self._registered = False
            logger.error(
                "RabbitMQ cancelled the consumer of queue %r (was the queue deleted?): no "
                "more messages come from it until its channel is reopened or the worker "
                "restarts",
                self.queue,
            )

    async def start(self) -> None:
        underlay = await self.channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_cancelled)
        self._registered = False
        ok = await underlay.basic_consume(self.queue, self._on_message, no_ack=False)
        self.consumer_tag = ok.consumer_tag
        self._registered = True

    async def begin(self) -> None:
        """Consume for the first time; from then on, again whenever the channel reopens."""
        await self.start()
        self.channel.reopen_callbacks.add(self._on_reopen)

    async def _on_reopen(self, *_: Any) -> None:
        if not self.active:
            return
        try:
            await self.start()
        except Exception as exc:
            # aio-pika would swallow this: say it, the queue is not consumed any more.
            logger.error(
                "channel reopened but consuming %r again failed: %s; no more messages come "
                "from it until the worker restarts",
                self.queue,
                _reply_text(exc),
            )
            return
        logger.info("channel reopened: consuming %r again", self.queue)

    async def cancel(self) -> None:
        self.active = False
        if self.consumer_tag is None or self.channel.is_closed:
            return
        try:
            underlay = await self.channel.get_underlay_channel()
            await underlay.basic_cancel(self.consumer_tag, timeout=self.cancel_timeout)
        except (TimeoutError, *_LOST_CHANNEL) as exc:
            logger.debug("basic.cancel on %r failed: %s", self.queue, exc)

    def abandon(self) -> None:
        """Cancel the handlers still running: the broker is closing under them."""
        if self._running:
            logger.warning(
                "closing with %d handler(s) of %r still running: cancelling them; their "
                "messages were requeued with the channel",
                len(self._running),
                self.queue,
            )
        for task in list(self._running):
            task.cancel()

    async def close(self) -> None:
        await self.cancel()
        self._on_closed(self)
        self.channel.reopen_callbacks.discard(self._on_reopen)
        try:
            # Also when closed: a robust channel closed by a lost connection would
            # otherwise be reopened once the connection is back.
            await self.channel.close()
        except _LOST_CHANNEL as exc:
            logger.debug("closing the channel of %r failed: %s", self.queue, exc)


class _FailoverConnection(aio_pika.RobustConnection):
    """A robust connection that moves to the next node of a cluster when it loses one.

    aio-pika reconnects a robust connection to its `url`, which each attempt reads anew.
    Every lost connection and every failed attempt goes through `_on_connection_close`
    (aio-pika hands a failed attempt a closing future that holds its error), so pointing
    `url` at the next node there sends the next attempt to it: round robin, starting from
    the node after the one lost. aio-pika then restores the channels (consumers, the
    publisher) on whichever node answered. With a single URL this is aio-pika's robust
    connection as it is.

    Log lines, aio-pika's too (through `__str__`), name the node they are about, with its
    password masked: the node connected to, or the one whose attempt just failed.
    """

    def __init__(self, urls: Sequence[str], index: int, **kwargs: Any) -> None:
        self.nodes = tuple(urls)
        #: The node connected to, or tried last; `_next` is the one the next attempt uses.
        self.node = self._next = index
        self._up = False
        super().__init__(make_url(urls[index]), **kwargs)

    @property
    def node_url(self) -> str:
        return self.nodes[self.node]

    def __str__(self) -> str:
        return mask_url(self.node_url)

    async def _on_connected(self) -> None:
        self.node = self._next
        await super()._on_connected()
        self._up = True
        if self.connection_attempt > 1:  # aio-pika has counted this attempt already
            logger.info("reconnected to RabbitMQ at %s", mask_url(self.node_url))

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        # Not before the first connection: `AmqpBroker._open` tries the nodes and reports.
        if self.connection_attempt and not (self._close_called or self.is_closed):
            self._move_on(closing)
        self._up = False
        await super()._on_connection_close(closing)

    def _move_on(self, closing: asyncio.Future[Any]) -> None:
        """Point the next attempt at the next node, and say what happened to this one."""
        self.node = self._next
        # Log the URL as a string: the connection's own text changes with the next attempt.
        here = mask_url(self.node_url)
        if len(self.nodes) == 1:
            if self._up:  # a failed attempt: aio-pika's own warning says so
                logger.warning(
                    "lost the connection to RabbitMQ at %s (%s): reconnecting",
                    here,
                    _closing_reason(closing),
                )
            return
        self._next = (self.node + 1) % len(self.nodes)
        self.url = make_url(self.nodes[self._next])
        logger.warning(
            "%s RabbitMQ at %s (%s): trying %s next",
            "lost the connection to" if self._up else "cannot connect to",
            here,
            _closing_reason(closing),
            mask_url(self.nodes[self._next]),
        )


def _closing_reason(closing: asyncio.Future[Any]) -> str:
    """Why a connection closed, in a few words."""
    if closing.cancelled():
        return "cancelled"
    exc = closing.exception()
    if exc is None:
        return "closed"
    return str(exc) or type(exc).__name__


def _failed(failures: Sequence[tuple[str, BaseException]]) -> str:
    """``"<masked url>: <error>; ..."``, for the nodes that could not be reached."""
    return "; ".join(f"{mask_url(url)}: {exc or type(exc).__name__}" for url, exc in failures)


class AmqpBroker:
    """The `Broker` protocol on RabbitMQ.

    Args:
        url: ``amqp://user:password@host:port/vhost``.
        publish_timeout: seconds to wait for a publisher confirm, including any time spent
            waiting for a lost connection to come back.
        connect_timeout: seconds to wait for the first connection.
        connection_name: shown in the management UI and ``rabbitmqctl list_connections``.
        reconnect_interval: seconds between attempts to get a lost connection back.
        urls: every node of a RabbitMQ cluster, `url` first; a lost connection moves to
            the next one that answers (see `_FailoverConnection`). Just `url` when empty.
    """

    def __init__(
        self,
        url: str,
        *,
        urls: Sequence[str] = (),
        publish_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        connection_name: str | None = None,
        reconnect_interval: float = 1.0,
    ) -> None:
        self.url = url
        self.clock = SystemClock()
        self.urls = tuple(urls) or (url,)
        self.reconnect_interval = reconnect_interval
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.connection_name = connection_name or "cuebx"
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._publisher_underlay: aiormq.abc.AbstractChannel | None = None
        self._publisher_reopen_after = 0.0
        # Publisher channels replaced after a nack, closed once their confirms are in.
        self._retiring: set[asyncio.Task[None]] = set()
        self._subscriptions: set[_Subscription] = set()
        self._lock = anyio.Lock()
        # The channel of `get`, with the acks of what it fetched.
        self._getter: AbstractRobustChannel | None = None
        self._getter_acks: _Acks | None = None
        # The channel the direct reply-to consumer runs on (the publisher's, at the time).
        self._replies_on: aiormq.abc.AbstractChannel | None = None
        # The channel of `offer`: its nacks are answers, and must not reopen the publisher's.
        self._offerer: AbstractRobustChannel | None = None
        self._offer_underlay: aiormq.abc.AbstractChannel | None = None
        self._offer_lock = anyio.Lock()

    # -- connection -------------------------------------------------------------------------

    async def connect(self) -> None:
        async with self._lock:
            if self._connection is not None and not self._connection.is_closed:
                return
            connection = await self._open()
            self._publisher = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            self._connection = connection

    @property
    def connected(self) -> bool:
        """True while the connection is up; False while aio-pika restores a lost one."""
        connection = self._connection
        return (
            connection is not None
            and not connection.is_closed
            and connection.connected.is_set()
            and connection.transport is not None
            and not connection.transport.connection.is_closed
        )

    async def _open(self) -> _FailoverConnection:
        """Connect to the first node that answers, trying the URLs in order.

        Each node gets an equal share of the connect timeout, for this attempt and for every
        reconnection attempt later, so a node that swallows packets cannot use up the time
        the others need.
        """
        share = self.connect_timeout / len(self.urls)
        failures: list[tuple[str, BaseException]] = []
        with anyio.move_on_after(self.connect_timeout + 1):
            for index, url in enumerate(self.urls):
                connection = _FailoverConnection(
                    self.urls,
                    index,
                    client_properties={"connection_name": self.connection_name},
                    reconnect_interval=self.reconnect_interval,
                )
                try:
                    await connection.connect(timeout=share)
                except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
                    await connection.close()
                    failures.append((url, exc))
                    continue
                if failures:
                    logger.warning(
                        "connected to RabbitMQ at %s; %s", mask_url(url), _failed(failures)
                    )
                return connection
        if len(failures) < len(self.urls):  # the overall deadline struck mid-attempt
            failures.append((self.urls[len(failures)], TimeoutError("timed out")))
        if len(self.urls) == 1:
            where = f"RabbitMQ at {_failed(failures)}"
        else:
            where = f"any of {len(self.urls)} RabbitMQ nodes: {_failed(failures)}"
        raise BrokerUnavailableError(f"cannot connect to {where}") from failures[-1][1]

    @property
    def node_url(self) -> str:
        """The URL of the node the connection is on or tries next; before connecting, the first."""
        connection = self._connection
        if isinstance(connection, _FailoverConnection):
            return connection.node_url
        return self.url

    def _require(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise BrokerUnavailableError(
                f"not connected to {mask_url(self.node_url)}: call `await app.connect()` first"
            )
        return self._connection

    async def close(self) -> None:
        async with self._lock:
            connection, self._connection = self._connection, None
            subscriptions, self._subscriptions = list(self._subscriptions), set()
            self._getter = self._getter_acks = None
            self._offerer = self._offer_underlay = None
            for retire in self._retiring:
                retire.cancel()
            if connection is None:
                return
            for subscription in subscriptions:
                await subscription.close()
                subscription.abandon()
            await connection.close()

    # -- topology ---------------------------------------------------------------------------

    @asynccontextmanager
    async def _scratch_channel(self, queue: str | None = None) -> AsyncIterator[Any]:
        """Open a short-lived channel: an operation the broker refuses closes only it.

        A missing `queue` is reported as a `LookupError` naming it.
        """
        channel = await self._require().channel(publisher_confirms=False)
        try:
            yield await channel.get_underlay_channel()
        except aiormq.exceptions.ChannelNotFoundEntity:
            if queue is None:
                raise
            raise LookupError(f"queue {queue!r} does not exist") from None
        finally:
            if not channel.is_closed:
                await channel.close()

    async def declare(self, topology: Topology) -> None:
        async with self._scratch_channel() as channel:
            await _declare_exchange(channel, ExchangeSpec(topology.exchange))
            for exchange in topology.exchanges:
                await _declare_exchange(channel, exchange)
            for queue in topology.queues:
                try:
                    await channel.queue_declare(
                        queue.name, durable=True, arguments=dict(queue.arguments)
                    )
                except aiormq.exceptions.ChannelPreconditionFailed as exc:
                    raise TopologyConflictError(
                        queue.name, _precondition_detail(exc), queue.arguments
                    ) from None
                except aiormq.exceptions.AMQPError as exc:
                    raise TopologyError(
                        f"cannot declare queue {queue.name!r}: {_reply_text(exc)}"
                    ) from None
                for key in queue.routing_keys:
                    await _bind(channel, Binding(topology.exchange, queue.name, key))
            await _bind_all(channel, topology.bindings)

    async def delete(self, topology: Topology) -> None:
        async with self._scratch_channel() as channel:
            for queue in reversed(topology.queues):
                await channel.queue_delete(queue.name)
            for exchange in reversed(topology.exchanges):
                await channel.exchange_delete(exchange.name)

    async def queue_length(self, queue: str) -> int:
        async with self._scratch_channel(queue) as channel:
            ok = await channel.queue_declare(queue, passive=True)
            return int(ok.message_count or 0)

    async def peek(self, queue: str, limit: int = 1000) -> list[OutgoingMessage]:
        """Read up to `limit` ready messages of `queue` without taking them.

        Each is fetched with basic.get and left unacked; closing the channel afterwards
        puts them all back where they were, marked redelivered. So peek at queues no
        worker consumes (dead-letter queues): a worker counts redeliveries on classic
        queues, and a quorum queue counts them against its delivery limit.
        """
        found: list[OutgoingMessage] = []
        async with self._scratch_channel(queue) as channel:
            while len(found) < limit:
                message = await channel.basic_get(queue, no_ack=False)
                if not isinstance(message.delivery, spec.Basic.GetOk):
                    break
                found.append(_as_outgoing(message))
        return found

    async def get(self, queue: str) -> _AmqpDelivery | None:
        """``basic.get`` on the broker's channel for gets; settle the delivery on it.

        The channel stays open between calls, so a delivery fetched here stays unacked (and
        invisible to consumers) until it is settled, the broker is closed or the connection
        is lost; then RabbitMQ puts it back.

        Raises:
            LookupError: the queue does not exist.
        """
        underlay = await self._get_channel()
        try:
            message = await underlay.basic_get(queue, no_ack=False)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise LookupError(f"queue {queue!r} does not exist") from None
        if not isinstance(message.delivery, spec.Basic.GetOk):
            return None
        acks = self._getter_acks
        if acks is None or acks.channel is not underlay:
            acks = self._getter_acks = _Acks(underlay)
        return _AmqpDelivery(message, acks)

    async def _get_channel(self) -> aiormq.abc.AbstractChannel:
        """The open aiormq channel of `get`; a fresh one after a channel error closed it."""
        channel = self._getter
        if channel is not None and not channel.is_closed:
            underlay = await channel.get_underlay_channel()
            if not underlay.is_closed:
                return underlay
            await channel.close()
        channel = self._getter = await self._require().channel(publisher_confirms=False)
        return await channel.get_underlay_channel()

    async def queue_state(self, queue: str) -> QueueState | None:
        try:
            async with self._scratch_channel(queue) as channel:
                ok = await channel.queue_declare(queue, passive=True)
        except LookupError:
            return None
        return QueueState(queue, int(ok.message_count or 0), int(ok.consumer_count or 0))

    async def compare_queue(
        self, queue: str, arguments: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Learn how `queue` differs by declaring it again on scratch channels.

        RabbitMQ names one inequivalent argument per refusal, with both values; the broker's
        value is put into the next declaration until one succeeds, so each argument is
        found in turn. A passive declaration first: nothing missing is ever created (a queue
        deleted between the two would be, by the declaration that follows).
        """
        if await self.queue_state(queue) is None:
            return None
        probe = _Probe(dict(arguments))
        for _ in range(2 * len(arguments) + 8):
            try:
                async with self._scratch_channel(queue) as channel:
                    await channel.queue_declare(queue, arguments=probe.trial, **probe.flags)
                return probe.found
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                text = _reply_text(exc)
                if not probe.learn(text):
                    return probe.found
            except (LookupError, aiormq.exceptions.AMQPError) as exc:
                raise TopologyError(f"cannot compare queue {queue!r}: {_reply_text(exc)}") from None
        raise TopologyError(f"cannot compare queue {queue!r}: RabbitMQ kept refusing ({text})")

    async def compare_exchange(self, exchange: str, kind: str) -> dict[str, Any] | None:
        """Learn how `exchange` differs, by a passive declaration, then declarations again."""
        try:
            async with self._scratch_channel() as channel:
                await channel.exchange_declare(exchange, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        flags: dict[str, Any] = {"exchange_type": kind, "durable": True}
        found: dict[str, Any] = {}
        for _ in range(4):
            try:
                async with self._scratch_channel() as channel:
                    await channel.exchange_declare(exchange, **flags)
                return found
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                current = _current_value(
                    _reply_text(exc), {"type": kind, "durable": flags["durable"]}
                )
                if current is None:
                    raise TopologyError(
                        f"cannot compare exchange {exchange!r}: {_reply_text(exc)}"
                    ) from None
            argument, value = current
            found[argument] = value
            flags["exchange_type" if argument == "type" else argument] = value
        raise TopologyError(f"cannot compare exchange {exchange!r}: RabbitMQ kept refusing")

    # -- publishing -------------------------------------------------------------------------

    async def _publish_channel(self) -> aiormq.abc.AbstractChannel:
        """Wait (within the publish timeout) for the aiormq channel under the publisher.

        Publishing uses that channel directly while it is open; after a reconnection the
        robust channel has a new one, fetched here.
        """
        self._require()  # closed: say so now, not after the publish timeout
        publisher = self._publisher
        assert publisher is not None
        with anyio.fail_after(self.publish_timeout):
            while True:
                # aio-pika reports the connection ready before it has reopened its channels,
                # and the channel may still be the closed one of the lost connection.
                await publisher.ready()
                underlay = await publisher.get_underlay_channel()
                if not underlay.is_closed:
                    break
                await anyio.sleep(0.05)
        self._publisher_underlay = underlay
        return underlay

    async def publish(self, exchange: str, routing_key: str, message: OutgoingMessage) -> None:
        headers = message.headers
        properties = spec.Basic.Properties(
            content_type=message.content_type,
            delivery_mode=_PERSISTENT,
            priority=message.priority,
            correlation_id=message.correlation_id,
            message_id=message.message_id,
            timestamp=message.timestamp,
            headers=headers if type(headers) is dict else dict(headers),
            reply_to=message.reply_to,
        )
        timeout = self.publish_timeout
        try:
            underlay = self._publisher_underlay
            if underlay is None or underlay.is_closed:
                started = time.monotonic()
                underlay = await self._publish_channel()
                timeout = max(0.0, timeout - (time.monotonic() - started))
            # aiormq bounds the write and the wait for the confirm by `timeout`.
            confirm = await underlay.basic_publish(
                message.body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=True,
                timeout=timeout,
            )
        except aiormq.exceptions.PublishError:
            raise UnroutableError(
                f"message {message.message_id} to {_target(exchange, routing_key)} was "
                "returned: no queue is bound for that routing key (declare the topology first)"
            ) from None
        except aiormq.exceptions.DeliveryError:
            confirm = None
        except _UNCONFIRMED as exc:
            raise self._unconfirmed(
                exc, f"message {message.message_id} to {_target(exchange, routing_key)}"
            ) from exc
        if not isinstance(confirm, spec.Basic.Ack):
            await self._nacked(underlay)
            raise PublishError(
                f"message {message.message_id} to {_target(exchange, routing_key)} was "
                "nacked by the broker"
            )

    def _unconfirmed(self, exc: BaseException, what: str) -> PublishError:
        """The error for a publish of `what` that got no confirm, from how it failed.

        The publish paths catch `_UNCONFIRMED` and raise what this returns, from `exc`. A
        cancellation of the running task itself is no failure of the publish: it goes on.
        """
        if isinstance(exc, asyncio.CancelledError):
            if _cancelling():
                raise exc
            # Not a cancellation of this publish: aiormq fails the frames of a connection it
            # closed (a missed heartbeat) with its reader's CancelledError.
            return PublishError(f"{what} was not confirmed: the connection was lost")
        if isinstance(exc, TimeoutError):
            return PublishTimeoutError(
                f"no confirm from {mask_url(self.node_url)} within {self.publish_timeout:g}s for "
                f"{what}; it may or may not have been stored"
            )
        return PublishError(f"{what} was not confirmed: {exc or type(exc).__name__}")

    async def consume_replies(self, on_reply: ReplyHandler, on_lost: LostHandler) -> str:
        underlay = self._publisher_underlay
        if underlay is None or underlay.is_closed:
            underlay = await self._publish_channel()
        if self._replies_on is underlay and not underlay.is_closed:
            return _DIRECT_REPLY_TO
        self._replies_on = underlay

        def deliver(message: DeliveredMessage) -> None:
            props = message.header.properties
            on_reply(props.correlation_id, props.headers or {}, message.body)

        async def on_message(message: DeliveredMessage) -> None:
            deliver(message)

        def closed(closing: asyncio.Future[Any]) -> None:
            if self._replies_on is underlay:
                self._replies_on = None
            error = None if closing.cancelled() else closing.exception()
            on_lost(error)

        try:
            await underlay.basic_consume(_DIRECT_REPLY_TO, on_message, no_ack=True)
        except BaseException:
            self._replies_on = None
            raise
        underlay.closing.add_done_callback(closed)
        return _DIRECT_REPLY_TO

    async def reply(self, reply_to: str, message: OutgoingMessage) -> None:
        properties = spec.Basic.Properties(
            content_type=message.content_type,
            correlation_id=message.correlation_id,
            message_id=message.message_id,
            timestamp=message.timestamp,
            headers=dict(message.headers),
        )
        try:
            underlay = self._publisher_underlay
            if underlay is None or underlay.is_closed:
                underlay = await self._publish_channel()
            # Not mandatory: on RabbitMQ before 4.x a mandatory publish to a reply-to
            # address is returned even when it is delivered, and a caller that has gone
            # is no error of the worker's: RabbitMQ drops the reply.
            confirm = await underlay.basic_publish(
                message.body,
                exchange="",
                routing_key=reply_to,
                properties=properties,
                timeout=self.publish_timeout,
            )
        except _UNCONFIRMED as exc:
            raise self._unconfirmed(exc, f"the reply to {reply_to!r}") from exc
        if not isinstance(confirm, spec.Basic.Ack):
            raise PublishError(f"the reply to {reply_to!r} was nacked by the broker")

    async def _nacked(self, underlay: aiormq.abc.AbstractChannel | None) -> None:
        """Publish on a fresh channel after a nack, at most once a second.

        A channel whose first publish to a quorum queue reaches RabbitMQ while the queue
        elects a new leader (its node was lost) can go on nacking every later publish to
        that queue, while a channel opened after the election publishes normally (seen on
        RabbitMQ 3.10). New publishes go to a new channel at once; the old one is closed
        only after the publish timeout, so the confirms it still waits for, and the replies
        of calls made on it, arrive instead of failing with it.
        """
        now = time.monotonic()
        publisher, connection = self._publisher, self._connection
        if underlay is None or underlay is not self._publisher_underlay or publisher is None:
            return  # another nacked publish moved on already
        if now < self._publisher_reopen_after or connection is None:
            return
        self._publisher_reopen_after = now + 1.0
        logger.info("a publish was nacked: publishing on a new channel from now on")
        try:
            self._publisher = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
        except _LOST_CHANNEL as exc:
            logger.warning("could not open a new publisher channel: %s", exc)
            return
        self._publisher_underlay = None
        retire = asyncio.get_running_loop().create_task(self._close_later(publisher))
        self._retiring.add(retire)
        retire.add_done_callback(self._retiring.discard)

    async def _close_later(self, channel: AbstractRobustChannel) -> None:
        await anyio.sleep(self.publish_timeout)
        with anyio.move_on_after(self.connect_timeout), contextlib.suppress(*_LOST_CHANNEL):
            await channel.close()

    async def offer(self, queue: str, message: OutgoingMessage) -> bool:
        """Publish a transient message to `queue` on the offer channel: False when nacked.

        A full ``reject-publish`` queue nacks, and for a rate limiter's queue that is the
        everyday answer. On the publisher channel, each nack would move task publishes to a
        new channel (`_nacked`, at most once a second, the old one closed a publish timeout
        later): a limiter that is full most of the time would keep dozens of channels open
        and churn them. The offer channel never moves: a nack here is an answer, not a fault.
        """
        properties = spec.Basic.Properties(
            delivery_mode=_TRANSIENT,
            message_id=message.message_id,
            timestamp=message.timestamp,
            headers=dict(message.headers) or None,
        )
        target = f"queue {queue!r}"
        try:
            underlay = self._offer_underlay
            if underlay is None or underlay.is_closed:
                underlay = await self._offer_channel()
            confirm = await underlay.basic_publish(
                message.body,
                exchange="",
                routing_key=queue,
                properties=properties,
                mandatory=True,
                timeout=self.publish_timeout,
            )
        except aiormq.exceptions.PublishError:
            raise UnroutableError(
                f"message {message.message_id} to {target} was returned: the queue does not "
                "exist (declare the topology first)"
            ) from None
        except aiormq.exceptions.DeliveryError:
            return False  # nacked: the queue is full
        except _UNCONFIRMED as exc:
            raise self._unconfirmed(exc, f"message {message.message_id} to {target}") from exc
        return isinstance(confirm, spec.Basic.Ack)

    async def _offer_channel(self) -> aiormq.abc.AbstractChannel:
        """The aiormq channel under the offer channel: opened on first use, and fetched
        again after aio-pika reopened it (a reconnection)."""
        connection = self._require()
        async with self._offer_lock:
            channel = self._offerer
            if channel is None or channel.is_closed:
                channel = self._offerer = await connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
        with anyio.fail_after(self.publish_timeout):
            await channel.ready()
        underlay = self._offer_underlay = await channel.get_underlay_channel()
        return underlay

    async def publish_many(
        self, exchange: str, items: Sequence[tuple[str, OutgoingMessage]], *, window: int
    ) -> list[BaseException | None]:
        results: list[BaseException | None] = [None] * len(items)
        cursor = iter(range(len(items)))

        async def lane() -> None:
            for index in cursor:
                routing_key, message = items[index]
                try:
                    await self.publish(exchange, routing_key, message)
                except PublishError as exc:
                    results[index] = exc

        async with anyio.create_task_group() as group:
            for _ in range(max(1, min(window, len(items)))):
                group.start_soon(lane)
        return results

    # -- consuming --------------------------------------------------------------------------

    async def consume(self, queue: str, prefetch: int, handler: DeliveryHandler) -> _Subscription:
        connection = self._require()
        channel = await connection.channel(publisher_confirms=False)
        # set_qos through aio-pika so that the robust channel restores it on reconnect.
        await channel.set_qos(prefetch_count=prefetch)
        subscription = _Subscription(
            channel,
            queue,
            handler,
            cancel_timeout=self.connect_timeout,
            on_closed=self._subscriptions.discard,
        )
        try:
            await subscription.begin()
        except BaseException as exc:
            # Close the channel, or aio-pika would reopen it after a reconnection.
            with anyio.CancelScope(shield=True):
                await subscription.close()
            if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
                raise TopologyError(f"cannot consume queue {queue!r}: it does not exist") from None
            if isinstance(exc, aiormq.exceptions.ChannelClosed):
                # RabbitMQ refused basic.consume: another connection's exclusive consumer
                # (ACCESS_REFUSED), an exclusive queue (RESOURCE_LOCKED), permissions.
                raise TopologyError(f"cannot consume queue {queue!r}: {_reply_text(exc)}") from None
            raise
        self._subscriptions.add(subscription)
        return subscription


#: RabbitMQ quotes the values bare when both sides have one ("received '2000' but current
#: is '1000'"), and with their type when one side has none.
_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)'.*?"
    r"received (?:none|the value '(?P<received>.*?)' of type '\w+'|'(?P<received_bare>.*?)')"
    r" but current is (?:none|the value '(?P<current>.*?)' of type '\w+'|'(?P<current_bare>.*)')"
)


async def _declare_exchange(channel: aiormq.abc.AbstractChannel, exchange: ExchangeSpec) -> None:
    try:
        await channel.exchange_declare(
            exchange.name,
            exchange_type=exchange.type,
            durable=True,
            arguments=dict(exchange.arguments) or None,
        )
    except aiormq.exceptions.AMQPError as exc:
        shown = "".join(f", {k}={v!r}" for k, v in exchange.arguments.items())
        raise TopologyError(
            f"cannot declare exchange {exchange.name!r} (cuebx wants a durable "
            f"{exchange.type} exchange{shown}; one of that name with another type, "
            f"durability or alternate-exchange cannot be redeclared): {_reply_text(exc)}"
        ) from None


async def _bind(
    channel: aiormq.abc.AbstractChannel, binding: Binding, *, nowait: bool = False
) -> None:
    arguments = dict(binding.arguments) or None
    # Both take (destination, source, routing key).
    bind = channel.exchange_bind if binding.destination_type == "exchange" else channel.queue_bind
    where = (binding.destination, binding.source, binding.routing_key)
    try:
        if nowait:
            await bind(*where, nowait=True, arguments=arguments)
        else:
            await bind(*where, arguments=arguments)
    except aiormq.exceptions.AMQPError as exc:
        how = f"routing key {binding.routing_key!r}"
        if binding.arguments:
            how += f" and arguments {dict(binding.arguments)!r}"
        raise TopologyError(
            f"cannot bind {binding.destination_type} {binding.destination!r} to exchange "
            f"{binding.source!r} with {how}: {_reply_text(exc)}"
        ) from None


async def _bind_all(channel: aiormq.abc.AbstractChannel, bindings: Sequence[Binding]) -> None:
    """Make many bindings in one round trip: all but the last without waiting (nowait).

    RabbitMQ handles a channel's methods in order, so the last binding's reply comes after
    every other one was made; one that failed closes the channel, and the error (its reply
    text names the exchange or queue) is raised at the last binding. The delay ladder has
    hundreds of bindings: one round trip each took seconds on a busy broker.
    """
    if not bindings:
        return
    *first, last = bindings
    try:
        for binding in first:
            await _bind(channel, binding, nowait=True)
        await _bind(channel, last)
    except TopologyError as exc:
        if not first:
            raise
        raise TopologyError(
            f"cannot make the {len(bindings)} bindings of exchanges "
            f"{', '.join(sorted({b.source for b in bindings})[:3])}...: {exc}"
        ) from None


#: The broker's side of a PRECONDITION_FAILED reply: "... but current is none", "... but
#: current is the value '1000' of type 'short'", or "... but current is '1000'" (bare when
#: both sides have a value).
_CURRENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)'.* but current is "
    r"(?:none|the value '(?P<typed>.*)' of type '(?P<type>\w+)'|'(?P<bare>.*)')$"
)
_INTEGER_TYPES = frozenset(
    {"byte", "short", "signedint", "long", "unsignedbyte", "unsignedshort", "unsignedint"}
)


class _Probe:
    """What `AmqpBroker.compare_queue` declares next, and what it learnt so far."""

    def __init__(self, trial: dict[str, Any]) -> None:
        self.trial = trial
        self.flags: dict[str, Any] = {"durable": True, "auto_delete": False}
        self.found: dict[str, Any] = {}
        self._blind: set[str] = set()

    def learn(self, text: str) -> bool:
        """Put the queue's value named in `text` into the next trial; False to stop.

        RabbitMQ cuts its reply text at 255 bytes, which long names overrun: when the
        queue's value is cut off, the argument is left out of the next trial, so the reply
        names it again without our value ("received none but current is ..."), shorter.
        If that is cut too, the value is `UNREADABLE` and the probe stops there.

        Raises:
            TopologyError: `text` is not an inequivalent-argument refusal.
        """
        current = _current_value(text, {**self.trial, **self.flags})
        if current is None:
            named = _NAMED.search(text)
            if named is None:
                raise TopologyError(f"cannot compare: {text}")
            argument = named["arg"]
            if argument in self.trial and argument not in self._blind:
                self._blind.add(argument)
                self.trial.pop(argument)
                return True
            self.found[argument] = UNREADABLE
            return False
        argument, value = current
        self.found[argument] = value
        if argument in self.flags:
            self.flags[argument] = bool(value)
        elif value is None:
            self.trial.pop(argument, None)
        else:
            self.trial[argument] = value
        return True


_NAMED = re.compile(r"inequivalent arg '(?P<arg>[^']+)'")


def _current_value(text: str, declared: Mapping[str, Any]) -> tuple[str, Any] | None:
    """Read the argument RabbitMQ refused and the queue's own value of it from `text`.

    A typed value is read as its AMQP type says; a bare one like the value `declared` for
    it, unless that reads the same as ours: then only the types differ, and the queue's is
    the other kind (a string where we sent a number, or the reverse).
    """
    match = _CURRENT.search(text)
    if match is None:
        return None
    argument = match["arg"]
    if match["typed"] is not None:
        return argument, _typed_value(match["typed"], match["type"])
    if match["bare"] is None:
        return argument, None
    ours = declared.get(argument)
    value = _value_like(match["bare"], ours)
    if type(value) is type(ours) and value == ours:
        value = match["bare"] if not isinstance(ours, str) else _reply_value(match["bare"])
    return argument, value


def _typed_value(text: str, kind: str) -> Any:
    if kind in _INTEGER_TYPES:
        return int(text)
    if kind == "bool":
        return text == "true"
    if kind in ("float", "double"):
        return float(text)
    return text


def _value_like(text: str, ours: Any) -> Any:
    try:
        if isinstance(ours, bool):
            return text == "true"
        if isinstance(ours, int):
            return int(text)
        if isinstance(ours, float):
            return float(text)
    except ValueError:
        pass
    return text


def _cancelling() -> bool:
    """True when the running task itself is being cancelled (not a CancelledError that
    aiormq passed on from a connection it closed)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _reply_text(exc: BaseException) -> str:
    """RabbitMQ's reply text of a channel error, such as "PRECONDITION_FAILED - ..."."""
    return str(exc.args[0] if exc.args else exc) or type(exc).__name__


def _precondition_detail(exc: BaseException) -> str:
    """Describe RabbitMQ's PRECONDITION_FAILED text as `cuebx.topology.diff` results read.

    RabbitMQ names one inequivalent argument and quotes both values as text; an integer is
    shown as one, so the detail reads as the memory broker's does. Any other reply text is
    returned as it is.
    """
    text = _reply_text(exc)
    match = _INEQUIVALENT.search(text)
    if match is None:
        return text
    difference = ArgumentDifference(
        match["arg"],
        _reply_value(_either(match["received"], match["received_bare"])),
        _reply_value(_either(match["current"], match["current_bare"])),
    )
    return describe_differences([difference])


def _either(typed: str | None, bare: str | None) -> str | None:
    # An empty value ('') is a value: only a side that matched no quote is none.
    return typed if typed is not None else bare


def _reply_value(text: str | None) -> Any:
    """A value quoted in RabbitMQ's reply text: an integer when it reads as one."""
    if text is None:
        return None
    try:
        number = int(text)
    except ValueError:
        return text
    return number if str(number) == text else text


def _as_outgoing(message: DeliveredMessage) -> OutgoingMessage:
    props = message.header.properties
    return OutgoingMessage(
        body=message.body,
        message_id=props.message_id or "",
        correlation_id=props.correlation_id or "",
        content_type=props.content_type,
        headers=dict(props.headers or {}),
        timestamp=props.timestamp or datetime.fromtimestamp(0, UTC),
        priority=props.priority,
        reply_to=props.reply_to,
    )


def _target(exchange: str, routing_key: str) -> str:
    return f"exchange {exchange!r} routing key {routing_key!r}"

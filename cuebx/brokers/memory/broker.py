"""MemoryBroker: routing, settling, TTL expiry and dead-lettering (see the package docstring)."""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, Final, Literal, cast
from urllib.parse import parse_qs, urlsplit

from anyio.lowlevel import checkpoint

from cuebx.brokers.base import Delivery, DeliveryHandler, LostHandler, QueueState, ReplyHandler
from cuebx.brokers.memory.clock import CLOCK_MODES, NS_PER_S, Clock, ClockMode
from cuebx.brokers.memory.exchanges import Exchange, Route
from cuebx.brokers.memory.host import TaskHost
from cuebx.brokers.memory.queues import Consumer, Entry, MemoryDelivery, Outcome, Queue
from cuebx.errors import (
    BrokerError,
    BrokerUnavailableError,
    PublishError,
    TopologyConflictError,
    TopologyError,
    UnroutableError,
)
from cuebx.message import OutgoingMessage
from cuebx.topology import Binding, ExchangeSpec, Topology, describe_differences, diff

__all__ = ["MemoryBroker"]

logger = logging.getLogger("cuebx.memory")

DeathReason = Literal["expired", "rejected", "delivery_limit", "maxlen"]

#: RabbitMQ's direct reply-to pseudo-queue, and the prefix of the addresses it hands out.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class _Nacked(PublishError):
    """The broker nacked a publish: a queue it was routed to is full (reject-publish)."""


class _MemorySubscription:
    """A running consumer of a `MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, consumer: Consumer) -> None:
        self._broker = broker
        self._consumer = consumer

    @property
    def consumer_tag(self) -> str:
        return self._consumer.tag

    @property
    def consuming(self) -> bool:
        return self._consumer.active

    async def cancel(self) -> None:
        """Stop new deliveries (``basic.cancel``); running handlers go on and can settle."""
        await checkpoint()
        self._broker._cancel(self._consumer)

    async def close(self) -> None:
        """Cancel and close the consumer's channel: its unacked deliveries are requeued.

        Running handlers go on, as with RabbitMQ; settling their deliveries does nothing.
        """
        await checkpoint()
        self._broker._close_consumer(self._consumer)


class MemoryBroker:
    """The `Broker` protocol in process, faithful to RabbitMQ, on a `Clock`.

    Queues survive `close` and a new `connect`, as durable queues survive a client's
    reconnection. The inspection helpers (`messages`, `is_idle`, `next_expiry`) work
    whether connected or not, for a testing kit to look at the broker between steps.

    Args:
        url: ``memory://`` or ``memory://name`` (the name only shows in messages);
            ``?clock=auto|manual|real`` is another spelling of `clock`.
        clock: how time moves (`cuebx.brokers.memory.clock`): ``"auto"`` (the default)
            jumps to the next TTL expiry or `Clock.sleep` whenever the broker is idle,
            ``"manual"`` only through `Clock.advance`, ``"real"`` in real time as well.
        real_time: the same as ``clock="real"``.
        **options: accepted and ignored (``publish_timeout``, ``connection_name``...), so
            that an app configured for RabbitMQ runs unchanged on ``memory://``.

    Raises:
        ValueError: not a ``memory://`` URL, an unknown clock mode, or two different ones.
    """

    def __init__(
        self,
        url: str = "memory://",
        *,
        clock: ClockMode | None = None,
        real_time: bool = False,
        **options: Any,
    ) -> None:
        if urlsplit(url).scheme != "memory":
            raise ValueError(f"MemoryBroker needs a memory:// URL, not {url!r}")
        self.url = url
        self.clock = Clock(_clock_mode(url, clock, real_time=real_time))
        self.clock._bind(self._next_expiry_ns, self._fire_due, self.is_idle)
        self._connected = False
        self._host = TaskHost()
        self._queues: dict[str, Queue] = {}
        self._exchanges: dict[str, Exchange] = {}
        self._consumers: list[Consumer] = []
        # (expiry, seq, push, entry) over all queues; entries that left are skipped.
        self._expiries: list[tuple[int, int, int, Entry]] = []
        self._seq = itertools.count()
        self._pushes = itertools.count()
        self._tags = itertools.count(1)
        # Handler calls started or about to start: while any runs, the broker is not idle.
        self._calls = 0
        # Direct reply-to: this connection's reply consumer, as (address, handlers).
        self._replies: tuple[str, ReplyHandler, LostHandler] | None = None
        self._reply_addresses = itertools.count(1)

    # -- connection -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection (idempotent) and start the timer of an auto or real clock."""
        if self._connected:
            return
        self._connected = True
        try:
            await self._host.start()
        except BaseException:
            self._connected = False
            raise
        if self.clock.mode != "manual":
            self._host.start_soon(self.clock._run)

    async def close(self) -> None:
        """Close every consumer's channel, requeueing what is unacked, and stop the timer.

        As when RabbitMQ loses a channel, unacked messages go back to their place in their
        queue marked redelivered (and count against a quorum queue's delivery limit).
        """
        if not self._connected:
            return
        self._connected = False
        self._lose_replies()
        consumers, self._consumers = self._consumers, []
        # Stop every consumer before requeueing anything, so that nothing requeued is
        # handed to a consumer about to be closed too.
        for consumer in consumers:
            self._detach(consumer)
        for consumer in consumers:
            self._return_unacked(consumer)
        self._fire_due()
        await self._host.stop()

    @property
    def connected(self) -> bool:
        """True between `connect` and `close`."""
        return self._connected

    def _require_connected(self) -> None:
        if not self._connected:
            raise BrokerUnavailableError(
                f"not connected to {self.url}: call `await app.connect()` first"
            )

    # -- topology ---------------------------------------------------------------------------

    async def declare(self, topology: Topology) -> None:
        """Declare the direct exchange, the other exchanges, the queues, then the bindings.

        Raises:
            TopologyConflictError: a queue exists with other arguments (RabbitMQ answers
                PRECONDITION_FAILED and changes nothing).
            TopologyError: an exchange is the default or an ``amq.`` one, or exists with
                another type or alternate exchange; an argument has a value RabbitMQ
                refuses; a binding names an exchange or queue that does not exist.
        """
        await checkpoint()
        self._require_connected()
        main = self._declare_exchange(ExchangeSpec(topology.exchange))
        for exchange in topology.exchanges:
            self._declare_exchange(exchange)
        for spec in topology.queues:
            queue = self._declare_queue(spec.name, spec.arguments)
            for key in spec.routing_keys:
                main.bind(Route(queue.name, "queue", key, ()))
        for binding in topology.bindings:
            self._bind(binding)

    def _declare_exchange(self, spec: ExchangeSpec) -> Exchange:
        name = spec.name
        if name == "" or name.startswith("amq."):
            raise TopologyError(
                f"cannot declare exchange {name!r}: the default and amq.* exchanges are "
                "reserved (RabbitMQ answers ACCESS_REFUSED)"
            )
        existing = self._exchanges.get(name)
        if existing is None:
            exchange = self._exchanges[name] = Exchange(name, spec.type, dict(spec.arguments))
            return exchange
        # RabbitMQ compares the type and, of the arguments, only alternate-exchange.
        wanted = Exchange(name, spec.type, dict(spec.arguments))
        if existing.type != spec.type or existing.alternate != wanted.alternate:
            raise TopologyError(
                f"cannot declare exchange {name!r} as a durable {spec.type} exchange with "
                f"alternate-exchange {wanted.alternate!r}: it exists as a {existing.type} "
                f"exchange with alternate-exchange {existing.alternate!r} (RabbitMQ answers "
                "PRECONDITION_FAILED)"
            )
        return existing

    def _bind(self, binding: Binding) -> None:
        source = self._exchanges.get(binding.source)
        to_exchange = binding.destination_type == "exchange"
        found = (self._exchanges if to_exchange else self._queues).get(binding.destination)
        if source is None or found is None:
            missing = (
                f"exchange {binding.source!r}"
                if source is None
                else f"{binding.destination_type} {binding.destination!r}"
            )
            raise TopologyError(
                f"cannot bind {binding.destination_type} {binding.destination!r} to exchange "
                f"{binding.source!r}: {missing} does not exist (RabbitMQ answers NOT_FOUND)"
            )
        source.bind(Route.of(binding))

    def _declare_queue(self, name: str, arguments: Mapping[str, Any]) -> Queue:
        existing = self._queues.get(name)
        if existing is not None:
            differences = diff(arguments, existing.arguments)
            if differences:
                raise TopologyConflictError(name, describe_differences(differences), arguments)
            return existing
        _check_arguments(name, arguments)
        queue = self._queues[name] = Queue(name, arguments)
        return queue

    async def delete(self, topology: Topology) -> None:
        """Delete the queues of `topology`, their messages and bindings, then its `exchanges`.

        The direct `Topology.exchange` stays: other apps may share it. Consumers of a
        deleted queue get no more deliveries, and settling what they hold does nothing, as
        on RabbitMQ. Deleting an exchange removes the bindings from and to it.
        """
        await checkpoint()
        self._require_connected()
        for spec in reversed(topology.queues):
            self._delete_queue(spec.name)
        for exchange in reversed(topology.exchanges):
            if self._exchanges.pop(exchange.name, None) is not None:
                for other in self._exchanges.values():
                    other.unbind(exchange.name, "exchange")

    def _delete_queue(self, name: str) -> None:
        queue = self._queues.pop(name, None)
        if queue is None:
            return
        queue.deleted = True
        queue.clear()
        self.clock._touched()
        for consumer in list(queue.consumers):
            self._stop_consumer(consumer)
        for exchange in self._exchanges.values():
            exchange.unbind(name, "queue")

    # -- publishing -------------------------------------------------------------------------

    async def publish(self, exchange: str, routing_key: str, message: OutgoingMessage) -> None:
        """Publish one mandatory message; it is confirmed once this returns.

        ``""`` is the default exchange, which routes to the queue named by the routing key.

        Raises:
            UnroutableError: no queue is bound for the routing key.
            PublishError: the exchange does not exist.
        """
        await checkpoint()
        self._require_connected()
        self._publish_now(exchange, routing_key, message)

    async def publish_many(
        self, exchange: str, items: Sequence[tuple[str, OutgoingMessage]], *, window: int
    ) -> list[BaseException | None]:
        """Publish many messages; `window` only sets how often other tasks get to run.

        Returns:
            One entry per item, in order: None when confirmed, else the `PublishError`.
        """
        window = max(1, window)
        await checkpoint()
        self._require_connected()
        results: list[BaseException | None] = []
        for index, (routing_key, message) in enumerate(items):
            if index and index % window == 0:
                await checkpoint()
            try:
                self._publish_now(exchange, routing_key, message)
            except PublishError as exc:
                results.append(exc)
            else:
                results.append(None)
        return results

    async def offer(self, queue: str, message: OutgoingMessage) -> bool:
        """Publish straight to `queue`; False when it is full (``reject-publish``).

        Raises:
            UnroutableError: the queue does not exist.
        """
        await checkpoint()
        self._require_connected()
        try:
            self._publish_now("", queue, message)
        except _Nacked:
            return False
        return True

    # -- direct reply-to --------------------------------------------------------------------

    async def consume_replies(self, on_reply: ReplyHandler, on_lost: LostHandler) -> str:
        """Receive replies on this connection; the address is what requests carry."""
        await checkpoint()
        self._require_connected()
        if self._replies is None:
            address = f"{DIRECT_REPLY_TO}.memory-{next(self._reply_addresses)}"
            self._replies = (address, on_reply, on_lost)
        return DIRECT_REPLY_TO

    def lose_replies(self) -> None:
        """Drop the reply consumer as a lost channel would (for tests of lost connections)."""
        self._lose_replies()

    def _lose_replies(self, error: BaseException | None = None) -> None:
        replies, self._replies = self._replies, None
        if replies is not None:
            replies[2](error)

    async def reply(self, reply_to: str, message: OutgoingMessage) -> None:
        """Hand a reply to the caller's reply consumer; a caller that has gone is no error."""
        await checkpoint()
        self._require_connected()
        replies = self._replies
        if replies is None or replies[0] != reply_to:
            logger.debug("reply to %r dropped: no such caller (it has gone)", reply_to)
            return
        replies[1](message.correlation_id, dict(message.headers), message.body)

    def _publish_now(self, exchange: str, routing_key: str, message: OutgoingMessage) -> None:
        self._require_connected()
        if message.reply_to == DIRECT_REPLY_TO:
            if self._replies is None:
                raise PublishError(
                    f"message {message.message_id} asks for a direct reply but nothing "
                    "consumes amq.rabbitmq.reply-to on this channel (RabbitMQ closes the "
                    "channel: PRECONDITION_FAILED - fast reply consumer does not exist)"
                )
            # RabbitMQ rewrites the address into one naming this channel.
            message = replace(message, reply_to=self._replies[0])
        targets = self._route(exchange, routing_key, message.headers)
        where = f"exchange {exchange!r} routing key {routing_key!r}"
        if targets is None:
            raise PublishError(
                f"message {message.message_id} to {where} was not confirmed: exchange "
                f"{exchange!r} does not exist (RabbitMQ closes the channel with NOT_FOUND)"
            )
        if not targets:
            raise UnroutableError(
                f"message {message.message_id} to {where} was returned: no queue is bound "
                "for that routing key (declare the topology first)"
            )
        # A publish copies the message onto the wire: later changes to the caller's
        # headers dict must not reach the stored copy.
        stored = replace(message, headers=dict(message.headers))
        self._fire_due()  # what expired by now frees its place in a bounded queue
        full = [queue.name for queue in targets if queue.full]
        for queue in targets:
            if queue.name not in full:
                self._enqueue(queue, stored, exchange, routing_key)
        self._fire_due()
        self.clock._touched()
        if full:
            # RabbitMQ stores it in the other queues and nacks the publish.
            raise _Nacked(
                f"message {message.message_id} to {where} was nacked by the broker: queue "
                f"{full[0]!r} is full (x-max-length with x-overflow reject-publish)"
            )

    def _route(
        self, exchange: str, routing_key: str, headers: Mapping[str, Any]
    ) -> list[Queue] | None:
        """Return the queues a message goes to, or None when the exchange does not exist.

        As RabbitMQ does: exchange-to-exchange bindings are followed (each exchange once),
        an exchange whose own bindings match nothing passes the message to its
        ``alternate-exchange``, and a queue reached twice gets one copy.
        """
        if exchange == "":
            queue = self._queues.get(routing_key)
            return [] if queue is None else [queue]
        start = self._exchanges.get(exchange)
        if start is None:
            return None
        queues: dict[str, Queue] = {}
        seen: set[str] = set()
        pending = [start]
        while pending:
            current = pending.pop(0)
            if current.name in seen:
                continue
            seen.add(current.name)
            routes = current.match(routing_key, headers)
            if not routes and current.alternate in self._exchanges:
                pending.append(self._exchanges[current.alternate])
            for route in routes:
                if route.destination_type == "exchange":
                    if route.destination in self._exchanges:
                        pending.append(self._exchanges[route.destination])
                elif route.destination in self._queues:
                    queues.setdefault(route.destination, self._queues[route.destination])
        return list(queues.values())

    def _enqueue(
        self, queue: Queue, message: OutgoingMessage, exchange: str, routing_key: str
    ) -> None:
        if queue.full:
            return  # a dead letter to a full reject-publish queue is dropped, as by RabbitMQ
        expires = None if queue.ttl_ns is None else self.clock.now_ns() + queue.ttl_ns
        entry = Entry(
            message,
            queue,
            exchange,
            routing_key,
            seq=next(self._seq),
            priority=queue.priority_of(message),
            expires_ns=expires,
        )
        self._make_ready(entry)
        self._dispatch(queue)

    def _make_ready(self, entry: Entry) -> None:
        """Put an entry in its queue, keeping its original place and expiry time.

        Past ``x-max-length`` the oldest ready message is dropped (dead-lettered as
        ``maxlen`` when the queue has a dead-letter exchange), as RabbitMQ's drop-head does.
        """
        queue = entry.queue
        if queue.deleted:
            return
        queue.push(entry)
        while queue.max_length is not None and queue.ready > queue.max_length:
            head = queue.pop()
            if head is None:
                break
            self._dead_letter(head, "maxlen")
        if not entry.ready:
            return  # it was the head dropped just now
        if entry.expires_ns is None:
            return
        earliest = self._next_expiry_ns()
        heapq.heappush(self._expiries, (entry.expires_ns, entry.seq, next(self._pushes), entry))
        if earliest is None or entry.expires_ns < earliest:
            self.clock._scheduled()

    # -- consuming --------------------------------------------------------------------------

    async def consume(
        self, queue: str, prefetch: int, handler: DeliveryHandler
    ) -> _MemorySubscription:
        """Start consuming `queue`: ``handler(delivery)`` runs for each delivery, in a task.

        Each call runs in a task of the broker's own, started in a copy of the caller's
        context variables; at most `prefetch` deliveries are unsettled at once (0: no
        limit), so at most that many calls run. A call that raises is logged on
        ``cuebx.memory`` and leaves its delivery unsettled until the consumer's channel
        closes, as with RabbitMQ. Closing the subscription requeues the unsettled deliveries
        and lets running calls go on; closing the broker cancels them. Ready messages are
        handed over when this returns; their calls start at the next checkpoint.

        Raises:
            TopologyError: the queue does not exist.
        """
        await checkpoint()
        self._require_connected()
        if prefetch < 0:
            raise ValueError(f"prefetch must be 0 (no limit) or more, not {prefetch}")
        target = self._queues.get(queue)
        if target is None:
            raise TopologyError(f"cannot consume queue {queue!r}: it does not exist")
        tag = f"memory.ctag-{next(self._tags)}"
        consumer = Consumer(tag, target, prefetch, handler, self._settle)
        target.consumers.append(consumer)
        self._consumers.append(consumer)
        self._dispatch(target)
        self._fire_due()
        self.clock._touched()
        return _MemorySubscription(self, consumer)

    def _dispatch(self, queue: Queue) -> None:
        while queue.ready and (consumer := queue.next_consumer()) is not None:
            entry = queue.pop()
            if entry is None:
                return
            self._deliver(consumer, entry)

    def _deliver(self, consumer: Consumer, entry: Entry) -> None:
        delivery = MemoryDelivery(consumer, entry, next(self._tags))
        consumer.unacked[delivery.delivery_tag] = delivery
        self._calls += 1
        self._host.start_soon(self._handle, consumer, delivery, context=consumer.context)

    async def _handle(self, consumer: Consumer, delivery: MemoryDelivery) -> None:
        """Run the consumer's handler for one delivery."""
        try:
            if delivery.outcome is None:  # else its channel closed before this task started
                await consumer.handler(delivery)
        except Exception:
            logger.exception(
                "the handler of consumer %s raised on delivery %s of message %s from "
                "queue %r; the delivery stays unacked until the consumer is closed",
                consumer.tag,
                delivery.delivery_tag,
                delivery.message_id,
                delivery.queue,
            )
        finally:
            self._calls -= 1
            # A handler may return holding its delivery (a scheduler's state message):
            # the broker can be idle again, which an auto clock waits for.
            self.clock._touched()

    def _cancel(self, consumer: Consumer) -> None:
        self._stop_consumer(consumer)
        # On a single-active-consumer queue the next consumer takes over at once.
        self._dispatch(consumer.queue)

    def _close_consumer(self, consumer: Consumer) -> None:
        self._detach(consumer)
        self._return_unacked(consumer)
        if consumer in self._consumers:
            self._consumers.remove(consumer)
        self._dispatch(consumer.queue)
        self._fire_due()

    def _stop_consumer(self, consumer: Consumer) -> None:
        consumer.active = False
        if consumer in consumer.queue.consumers:
            consumer.queue.consumers.remove(consumer)
        self._forget_if_done(consumer)
        self.clock._touched()  # its queue's ready messages no longer wait for it

    def _forget_if_done(self, consumer: Consumer) -> None:
        """Drop a stopped consumer once it holds nothing, so that none piles up."""
        if not consumer.active and not consumer.unacked and consumer in self._consumers:
            self._consumers.remove(consumer)

    def _detach(self, consumer: Consumer) -> None:
        """Stop a consumer: its channel closes."""
        consumer.closed = True
        self._stop_consumer(consumer)

    def _return_unacked(self, consumer: Consumer) -> None:
        """Requeue what a closed channel held, as RabbitMQ does: redelivered, in place."""
        deliveries = list(consumer.unacked.values())
        consumer.unacked.clear()
        for delivery in deliveries:
            delivery.outcome = "returned"
            self._return(delivery.entry)
        self.clock._touched()

    # -- settling ---------------------------------------------------------------------------

    def _settle(self, delivery: MemoryDelivery, outcome: Outcome, requeue: bool) -> None:
        if delivery.outcome == "returned":
            return  # its channel closed, so the message is back in its queue already
        if delivery.outcome is not None:
            tag = delivery.delivery_tag
            raise BrokerError(
                f"delivery {tag} of message {delivery.message_id} from queue "
                f"{delivery.queue!r} was already {delivery.outcome}; RabbitMQ would close "
                f"the channel (PRECONDITION_FAILED - unknown delivery tag {tag})"
            )
        delivery.outcome = outcome
        consumer = delivery.consumer
        consumer.unacked.pop(delivery.delivery_tag, None)
        self._forget_if_done(consumer)
        entry = delivery.entry
        if outcome == "rejected" and requeue:
            self._return(entry)
        elif outcome == "rejected" and not entry.queue.deleted:
            self._dead_letter(entry, "rejected")
        self._dispatch(consumer.queue)
        self._fire_due()
        self.clock._touched()

    def _return(self, entry: Entry) -> None:
        """Requeue a delivered entry, or dead-letter it past a quorum delivery limit."""
        if entry.queue.deleted:
            return  # a deleted queue's messages are gone
        again = replace(entry, returns=entry.returns + 1, ready=False)
        limit = entry.queue.delivery_limit
        if limit is not None and again.returns > limit:
            self._dead_letter(again, "delivery_limit")
        else:
            self._make_ready(again)

    # -- expiry and dead-lettering ----------------------------------------------------------

    def _next_expiry_ns(self) -> int | None:
        heap = self._expiries
        while heap and not heap[0][3].ready:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _fire_due(self) -> None:
        """Expire every ready message whose TTL ran out, earliest first."""
        now = self.clock.now_ns()
        heap = self._expiries
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)[3]
            if entry.ready:
                entry.queue.remove(entry)
                self._dead_letter(entry, "expired")

    def _dead_letter(self, entry: Entry, reason: DeathReason) -> None:
        """Republish to the queue's dead-letter exchange with an ``x-death`` entry, or drop.

        Like RabbitMQ, this is not a mandatory publish: a dead letter nobody is bound for is
        dropped, and so is one that would go round a cycle of queues without a rejection.
        """
        queue = entry.queue
        exchange = queue.arguments.get("x-dead-letter-exchange")
        if exchange is None:
            return
        routing_key = queue.arguments.get("x-dead-letter-routing-key", entry.routing_key)
        message = _with_death(entry, reason, self.clock.wall())
        deaths = message.headers["x-death"]
        for target in self._route(str(exchange), str(routing_key), message.headers) or ():
            if reason == "rejected" or not _is_cycle(target.name, deaths):
                self._enqueue(target, message, str(exchange), str(routing_key))

    # -- inspection -------------------------------------------------------------------------

    async def queue_length(self, queue: str) -> int:
        """Return how many messages are ready in `queue` (not counting unacked ones).

        Raises:
            LookupError: the queue does not exist.
        """
        await checkpoint()
        self._require_connected()
        self._fire_due()
        return self._queue(queue).ready

    async def peek(self, queue: str, limit: int = 1000) -> list[OutgoingMessage]:
        """Return up to `limit` ready messages of `queue` in delivery order, leaving them there.

        Unlike a ``basic.get`` followed by a requeue, this marks nothing redelivered.

        Raises:
            LookupError: the queue does not exist.
        """
        await checkpoint()
        self._require_connected()
        return self.messages(queue)[: max(0, limit)]

    async def purge(self, queue: str) -> int:
        """Drop the ready messages of `queue` (``queue.purge``) and return how many.

        Raises:
            LookupError: the queue does not exist.
        """
        await checkpoint()
        self._require_connected()
        purged = self._queue(queue).clear()
        self.clock._touched()
        return purged

    async def get(self, queue: str) -> MemoryDelivery | None:
        """Take the next ready message of `queue` (``basic.get``), or None when it has none.

        The delivery belongs to a channel of its own: ack or reject it; `close` puts it back
        (marked redelivered, counted on a quorum queue) if it is still unsettled.

        Raises:
            LookupError: the queue does not exist.
        """
        await checkpoint()
        self._require_connected()
        self._fire_due()
        target = self._queue(queue)
        entry = target.pop()
        if entry is None:
            return None
        getter = Consumer(f"memory.get-{next(self._tags)}", target, 0, _not_consuming, self._settle)
        getter.active = False  # never handed deliveries: it only holds this one
        self._consumers.append(getter)
        delivery = MemoryDelivery(getter, entry, next(self._tags))
        getter.unacked[delivery.delivery_tag] = delivery
        self.clock._touched()
        return delivery

    async def queue_state(self, queue: str) -> QueueState | None:
        """Describe `queue`: ready, consumers and unacked, or None if it does not exist."""
        await checkpoint()
        self._require_connected()
        self._fire_due()
        target = self._queues.get(queue)
        if target is None:
            return None
        unacked = sum(
            1
            for consumer in self._consumers
            for delivery in consumer.unacked.values()
            if delivery.entry.queue is target
        )
        return QueueState(queue, target.ready, len(target.consumers), unacked)

    async def compare_queue(
        self, queue: str, arguments: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """The queue's own values of the arguments a declaration would be refused over.

        Memory queues are all durable, so ``durable`` never differs.
        """
        await checkpoint()
        self._require_connected()
        existing = self._queues.get(queue)
        if existing is None:
            return None
        return {d.argument: d.current for d in diff(arguments, existing.arguments)}

    async def compare_exchange(self, exchange: str, kind: str) -> dict[str, Any] | None:
        """Memory exchanges are durable: only their type can differ from `kind`."""
        await checkpoint()
        self._require_connected()
        found = self._exchanges.get(exchange)
        if found is None:
            return None
        return {} if kind == found.type else {"type": found.type}

    def messages(self, queue: str) -> list[OutgoingMessage]:
        """Return the ready messages of `queue` in delivery order, as stored.

        Raises:
            LookupError: the queue does not exist.
        """
        self._fire_due()
        return [entry.message for entry in self._queue(queue).snapshot()]

    def is_idle(self) -> bool:
        """Tell whether nothing happens until time moves or someone publishes.

        True when no handler call runs or waits to start and no consumed queue has ready
        messages. Messages waiting out a TTL, or sitting in a queue
        nobody consumes (a dead-letter queue), do not count: see `next_expiry` for the
        former. Neither does a delivery whose handler returned without settling it (a
        scheduler holds its state message so while it leads): nothing happens to it until
        time moves.
        """
        self._fire_due()
        if self._calls:
            return False
        return not any(queue.ready and queue.consumers for queue in self._queues.values())

    def next_expiry(self) -> float | None:
        """Return the clock time (seconds) of the next TTL expiry, or None.

        Only TTLs count: a task waiting in `Clock.sleep` (a schedule) is not work to drain.
        """
        due = self._next_expiry_ns()
        return None if due is None else due / NS_PER_S

    def _queue(self, name: str) -> Queue:
        try:
            return self._queues[name]
        except KeyError:
            raise LookupError(f"queue {name!r} does not exist") from None


async def _not_consuming(delivery: Delivery) -> None:
    """The handler of a `MemoryBroker.get` channel, which consumes nothing."""
    raise AssertionError("a basic.get channel has no consumer")  # pragma: no cover


def _clock_mode(url: str, clock: str | None, *, real_time: bool) -> ClockMode:
    """Resolve the clock mode from the argument, ``real_time`` and the URL's ``?clock=``.

    Raises:
        ValueError: an unknown mode, or two spellings asking for different ones.
    """
    asked: dict[str, str] = {}
    for value in parse_qs(urlsplit(url).query).get("clock", []):
        asked[f"?clock={value} in the URL"] = value
    if clock is not None:
        asked[f"clock={clock!r}"] = clock
    if real_time:
        asked["real_time=True"] = "real"
    modes = set(asked.values())
    if len(modes) > 1:
        raise ValueError(f"MemoryBroker got two clock modes: {', '.join(asked)}")
    mode = modes.pop() if modes else "auto"
    if mode not in CLOCK_MODES:
        raise ValueError(
            f"unknown clock mode {mode!r} for {url}: use 'auto' (the default), 'manual' or 'real'"
        )
    return cast(ClockMode, mode)


def _with_death(entry: Entry, reason: DeathReason, at: datetime) -> OutgoingMessage:
    """Copy the message with RabbitMQ's ``x-death`` (newest first) and first/last-death headers.

    An existing entry for the same queue and reason has its count raised and moves first.
    """
    headers = dict(entry.message.headers)
    deaths = [dict(d) for d in headers.get("x-death", ()) if isinstance(d, Mapping)]
    queue = entry.queue.name
    previous = next(
        (d for d in deaths if d.get("queue") == queue and d.get("reason") == reason), None
    )
    if previous is not None:
        deaths.remove(previous)
        previous["count"] = int(previous.get("count", 0)) + 1
        death = previous
    else:
        death = {
            "count": 1,
            "reason": reason,
            "queue": queue,
            "time": at,
            "exchange": entry.exchange,
            "routing-keys": [entry.routing_key],
        }
    headers["x-death"] = [death, *deaths]
    last = {"queue": queue, "reason": reason, "exchange": entry.exchange}
    for key, value in last.items():
        headers.setdefault(f"x-first-death-{key}", value)
        headers[f"x-last-death-{key}"] = value
    return replace(entry.message, headers=headers)


def _is_cycle(target: str, deaths: Sequence[Mapping[str, Any]]) -> bool:
    """RabbitMQ drops a dead letter that reaches a queue it already died in, unless a
    consumer rejected it somewhere on the way (newest death first)."""
    for death in deaths:
        if death.get("reason") == "rejected":
            return False
        if death.get("queue") == target:
            return True
    return False


def _is_count(value: Any, *, low: int = 0, high: int | None = None) -> bool:
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return value >= low and (high is None or value <= high)


_VALID: Final[Mapping[str, Callable[[Any], bool]]] = {
    "x-message-ttl": _is_count,
    "x-delivery-limit": _is_count,
    "x-max-priority": lambda v: _is_count(v, high=255),
    "x-dead-letter-exchange": lambda v: isinstance(v, str),
    "x-dead-letter-routing-key": lambda v: isinstance(v, str),
    "x-queue-type": lambda v: v in ("classic", "quorum"),
    "x-max-length": _is_count,
    "x-overflow": lambda v: v in ("drop-head", "reject-publish", "reject-publish-dlx"),
    "x-single-active-consumer": lambda v: isinstance(v, bool),
}


def _check_arguments(queue: str, arguments: Mapping[str, Any]) -> None:
    """Refuse what RabbitMQ refuses at declaration, before the queue exists."""
    for key, valid in _VALID.items():
        if key in arguments and not valid(arguments[key]):
            raise TopologyError(
                f"cannot declare queue {queue!r}: invalid arg {key!r}: {arguments[key]!r}"
            )
    if arguments.get("x-queue-type") == "quorum" and "x-max-priority" in arguments:
        raise TopologyError(
            f"cannot declare queue {queue!r}: quorum queues refuse 'x-max-priority'"
        )
    if "x-dead-letter-routing-key" in arguments and "x-dead-letter-exchange" not in arguments:
        raise TopologyError(
            f"cannot declare queue {queue!r}: 'x-dead-letter-routing-key' needs "
            "'x-dead-letter-exchange'"
        )

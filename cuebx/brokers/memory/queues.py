"""What the memory broker holds: queues of message entries, consumers and their deliveries.

These are the broker's data, with no routing or time of their own: `MemoryBroker` moves
entries between queues and settles deliveries, through the callback each consumer carries.
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeAlias

from anyio.lowlevel import checkpoint

from cuebx.brokers.base import DeliveryHandler
from cuebx.brokers.memory.clock import NS_PER_MS
from cuebx.message import OutgoingMessage

__all__ = ["Consumer", "Entry", "MemoryDelivery", "Outcome", "Queue", "Settle"]

Outcome = Literal["acked", "rejected", "returned"]
Settle: TypeAlias = Callable[["MemoryDelivery", Outcome, bool], None]
"""Settle a delivery on its broker: ``settle(delivery, outcome, requeue)``."""


@dataclass(slots=True, eq=False)
class Entry:
    """One copy of a message in one queue; a requeue makes a new entry in the same place."""

    message: OutgoingMessage
    queue: Queue
    exchange: str
    routing_key: str
    seq: int
    priority: int
    expires_ns: int | None
    returns: int = 0
    ready: bool = False


class Queue:
    """A queue: ready entries in delivery order, and its consumers in round-robin order."""

    def __init__(self, name: str, arguments: Mapping[str, Any]) -> None:
        self.name = name
        self.arguments: dict[str, Any] = dict(arguments)
        ttl = arguments.get("x-message-ttl")
        self.ttl_ns: int | None = None if ttl is None else int(ttl) * NS_PER_MS
        self.max_priority: int | None = arguments.get("x-max-priority")
        self.quorum = arguments.get("x-queue-type") == "quorum"
        # Classic queues ignore x-delivery-limit; only quorum queues count redeliveries.
        self.delivery_limit: int | None = arguments.get("x-delivery-limit") if self.quorum else None
        # Only the first consumer still registered gets deliveries; the next takes over when
        # it is cancelled or its channel closes (x-single-active-consumer).
        self.single_active = arguments.get("x-single-active-consumer") is True
        # Ready messages beyond this drop from the head (the default x-overflow, drop-head);
        # with reject-publish, a publish that finds the queue full is nacked instead.
        overflow = arguments.get("x-overflow", "drop-head")
        length = arguments.get("x-max-length")
        self.max_length: int | None = length if overflow == "drop-head" else None
        self.reject_at: int | None = length if overflow.startswith("reject-publish") else None
        self.consumers: deque[Consumer] = deque()
        self.ready = 0
        self.deleted = False
        # Highest priority first, then first in first out; entries that left are skipped.
        self._heap: list[tuple[int, int, int, Entry]] = []
        self._pushes = itertools.count()

    @property
    def full(self) -> bool:
        """True when a publish would be refused (``x-overflow: reject-publish``)."""
        return self.reject_at is not None and self.ready >= self.reject_at

    def priority_of(self, message: OutgoingMessage) -> int:
        """RabbitMQ treats priorities above ``x-max-priority`` as the maximum."""
        if self.max_priority is None:
            return 0
        return min(max(message.priority or 0, 0), self.max_priority)

    def push(self, entry: Entry) -> None:
        entry.ready = True
        self.ready += 1
        heapq.heappush(self._heap, (-entry.priority, entry.seq, next(self._pushes), entry))

    def pop(self) -> Entry | None:
        while self._heap:
            entry = heapq.heappop(self._heap)[3]
            if entry.ready:
                self.remove(entry)
                return entry
        return None

    def remove(self, entry: Entry) -> None:
        entry.ready = False
        self.ready -= 1

    def snapshot(self) -> list[Entry]:
        return [item[3] for item in sorted(self._heap) if item[3].ready]

    def clear(self) -> int:
        count = self.ready
        for item in self._heap:
            item[3].ready = False
        self._heap.clear()
        self.ready = 0
        return count

    def next_consumer(self) -> Consumer | None:
        """Pick the next consumer with room, rotating so that consumers take turns.

        A single-active-consumer queue never rotates: its first consumer is the active one.
        """
        if self.single_active:
            active = self.consumers[0] if self.consumers else None
            return active if active is not None and active.has_room() else None
        for _ in range(len(self.consumers)):
            consumer = self.consumers[0]
            self.consumers.rotate(-1)
            if consumer.has_room():
                return consumer
        return None


class Consumer:
    """One ``basic.consume``: its handler, the context its calls start in, and the
    deliveries it has not settled."""

    def __init__(
        self, tag: str, queue: Queue, prefetch: int, handler: DeliveryHandler, settle: Settle
    ) -> None:
        self.tag = tag
        self.queue = queue
        self.prefetch = prefetch
        self.handler = handler
        self.settle = settle
        # The context of whoever called consume(), as with the AMQP broker.
        self.context = contextvars.copy_context()
        self.active = True
        # Set when the consumer's channel closes: its deliveries went back to the queue.
        self.closed = False
        self.unacked: dict[int, MemoryDelivery] = {}

    def has_room(self) -> bool:
        # prefetch 0 means no limit, as with basic.qos.
        return self.active and (self.prefetch == 0 or len(self.unacked) < self.prefetch)


class MemoryDelivery:
    """A delivered message; settling it goes back to the broker, exactly once."""

    __slots__ = ("consumer", "delivery_tag", "entry", "headers", "outcome")

    def __init__(self, consumer: Consumer, entry: Entry, tag: int) -> None:
        self.consumer = consumer
        self.entry = entry
        self.delivery_tag = tag
        self.outcome: Outcome | None = None
        headers = dict(entry.message.headers)
        if entry.queue.quorum and entry.returns:
            # Quorum queues tell consumers how often a message came back.
            headers["x-delivery-count"] = entry.returns
        self.headers: Mapping[str, Any] = headers

    @property
    def message(self) -> OutgoingMessage:
        """The message as stored in the queue (dead-letter headers included)."""
        return self.entry.message

    @property
    def queue(self) -> str:
        return self.entry.queue.name

    @property
    def exchange(self) -> str:
        return self.entry.exchange

    @property
    def routing_key(self) -> str:
        return self.entry.routing_key

    @property
    def body(self) -> bytes:
        return self.entry.message.body

    @property
    def message_id(self) -> str | None:
        return self.entry.message.message_id

    @property
    def correlation_id(self) -> str | None:
        return self.entry.message.correlation_id

    @property
    def content_type(self) -> str | None:
        return self.entry.message.content_type

    @property
    def priority(self) -> int | None:
        return self.entry.message.priority

    @property
    def timestamp(self) -> datetime | None:
        return self.entry.message.timestamp

    @property
    def redelivered(self) -> bool:
        return self.entry.returns > 0

    @property
    def channel_open(self) -> bool:
        """False once the consumer's channel closed (the message went back to its queue)."""
        return not self.consumer.closed

    @property
    def reply_to(self) -> str | None:
        return self.entry.message.reply_to

    async def ack(self) -> None:
        """Acknowledge; a no-op once the channel closed (the message is back in its queue).

        Raises:
            BrokerError: the delivery was already acked or rejected.
        """
        # Settled before the checkpoint: a cancel arriving there cannot undo the ack.
        self.consumer.settle(self, "acked", False)
        await checkpoint()

    async def reject(self, *, requeue: bool) -> None:
        """Requeue, or dead-letter per the queue's arguments (reason ``rejected``) or drop.

        Raises:
            BrokerError: the delivery was already acked or rejected.
        """
        self.consumer.settle(self, "rejected", requeue)
        await checkpoint()

"""MemoryBroker: RabbitMQ's semantics in process, on a clock the tests move by hand."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

from cuebx.brokers.base import Broker, Delivery, Subscription
from cuebx.brokers.memory import MemoryBroker
from cuebx.errors import (
    BrokerError,
    BrokerUnavailableError,
    PublishError,
    TopologyConflictError,
    TopologyError,
    UnroutableError,
)
from cuebx.message import OutgoingMessage
from cuebx.topology import QueueRoute, QueueSpec, Topology, plan

pytestmark = pytest.mark.anyio

SENT_AT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
_ids = itertools.count()

#: ``emails.dlq``, ``emails.retry.5s`` and ``emails``, bound as ``emails`` and ``welcome``.
EMAILS = plan([QueueRoute("send", "emails", retry_delays_ms=(5_000,), routing_keys=("welcome",))])


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def broker() -> AsyncIterator[MemoryBroker]:
    # The manual clock: these tests decide when TTLs run out.
    broker = MemoryBroker(
        "memory://test", clock="manual", publish_timeout=5.0, connection_name="test"
    )
    _: Broker = broker  # mypy: MemoryBroker implements the protocol
    await broker.connect()
    await broker.declare(EMAILS)
    try:
        yield broker
    finally:
        await broker.close()


def message(
    body: bytes = b"{}", *, priority: int | None = None, headers: dict[str, Any] | None = None
) -> OutgoingMessage:
    n = next(_ids)
    return OutgoingMessage(
        body=body,
        message_id=f"m{n}",
        correlation_id=f"m{n}",
        content_type="application/json",
        headers={"x-cuebx-task": "send"} if headers is None else headers,
        timestamp=SENT_AT,
        priority=priority,
    )


def as_message(delivery: Delivery) -> OutgoingMessage:
    """What a worker republishes: the delivery's body, properties and headers."""
    return OutgoingMessage(
        body=delivery.body,
        message_id=delivery.message_id or "",
        correlation_id=delivery.correlation_id or "",
        content_type=delivery.content_type or "",
        headers=dict(delivery.headers),
        timestamp=delivery.timestamp or SENT_AT,
        priority=delivery.priority,
    )


class Consumer:
    """One consume() call whose handler passes each delivery, unsettled, to the test."""

    def __init__(
        self, subscription: Subscription, receive: MemoryObjectReceiveStream[Delivery]
    ) -> None:
        self.subscription = subscription
        self.receive = receive

    async def next(self, within: float = 1.0) -> Delivery:
        with anyio.fail_after(within):
            return await self.receive.receive()

    async def nothing_more(self) -> bool:
        """Once every task is blocked, no handler call is on its way: is none waiting?"""
        await all_blocked()
        try:
            self.receive.receive_nowait()
        except anyio.WouldBlock:
            return True
        return False


@asynccontextmanager
async def consuming(
    broker: MemoryBroker, queue: str, *, prefetch: int = 10
) -> AsyncIterator[Consumer]:
    """Consume `queue`, cancelling the consumer at the end (its unacked deliveries stay)."""
    send, receive = anyio.create_memory_object_stream[Delivery](math.inf)

    async def handler(delivery: Delivery) -> None:
        # A call that starts after the test closed its end leaves the delivery unacked.
        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            send.send_nowait(delivery)

    with send, receive:
        subscription = await broker.consume(queue, prefetch, handler)
        try:
            yield Consumer(subscription, receive)
        finally:
            await subscription.cancel()


class Holding:
    """A handler that records each call and holds it until the test releases its message.

    A released call acks its delivery; `running` and `most` count the calls holding an
    unsettled delivery (a call that has acked may still be returning when the next starts).
    """

    def __init__(self) -> None:
        self.started: list[Delivery] = []
        self.acked: list[bytes] = []
        self.cancelled: list[bytes] = []
        self.running = 0
        self.most = 0
        self._release: dict[bytes, anyio.Event] = {}

    def release(self, body: bytes) -> None:
        self._release.setdefault(body, anyio.Event()).set()

    async def __call__(self, delivery: Delivery) -> None:
        self.started.append(delivery)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self._release.setdefault(delivery.body, anyio.Event()).wait()
        except anyio.get_cancelled_exc_class():
            self.running -= 1
            self.cancelled.append(delivery.body)
            raise
        self.running -= 1
        await delivery.ack()
        self.acked.append(delivery.body)

    def bodies(self) -> list[bytes]:
        return [delivery.body for delivery in self.started]


async def until(condition: Callable[[], bool], within: float = 1.0) -> None:
    """Wait for `condition`, failing the test after `within` seconds."""
    with anyio.fail_after(within):
        while not condition():
            await anyio.sleep(0.001)


async def all_blocked() -> None:
    """Wait until every other task (the broker's handler calls too) waits on something."""
    with anyio.fail_after(1):
        await anyio.wait_all_tasks_blocked()


def death(delivery_or_message: Delivery | OutgoingMessage, index: int = 0) -> dict[str, Any]:
    """One ``x-death`` entry without its time, which depends on when the test ran."""
    entry = dict(delivery_or_message.headers["x-death"][index])
    assert isinstance(entry.pop("time"), datetime)
    return entry


# -- routing ----------------------------------------------------------------------------------


async def test_publish_on_the_exchange_routes_by_binding_key(broker: MemoryBroker) -> None:
    first, second = message(b"1"), message(b"2")

    await broker.publish("cuebx", "emails", first)
    await broker.publish("cuebx", "welcome", second)

    assert broker.messages("emails") == [first, second]
    assert await broker.queue_length("emails") == 2
    assert await broker.queue_length("emails.dlq") == 0


async def test_default_exchange_routes_to_the_queue_named_by_the_routing_key(
    broker: MemoryBroker,
) -> None:
    sent = message()

    await broker.publish("", "emails.dlq", sent)

    assert broker.messages("emails.dlq") == [sent]
    assert broker.messages("emails") == []


async def test_unroutable_publish_raises_naming_exchange_and_routing_key(
    broker: MemoryBroker,
) -> None:
    with pytest.raises(UnroutableError, match="exchange 'cuebx' routing key 'nobody'"):
        await broker.publish("cuebx", "nobody", message())
    with pytest.raises(UnroutableError, match="exchange '' routing key 'no-such-queue'"):
        await broker.publish("", "no-such-queue", message())

    assert [await broker.queue_length(q.name) for q in EMAILS.queues] == [0, 0, 0]


async def test_publish_to_a_missing_exchange_is_a_publish_error(broker: MemoryBroker) -> None:
    with pytest.raises(PublishError, match="exchange 'elsewhere' does not exist"):
        await broker.publish("elsewhere", "emails", message())


async def test_publish_many_reports_each_item(broker: MemoryBroker) -> None:
    items = [("emails", message()), ("nobody", message()), ("welcome", message())]

    results = await broker.publish_many("cuebx", items, window=2)

    assert results[0] is None
    assert isinstance(results[1], UnroutableError)
    assert results[2] is None
    assert await broker.queue_length("emails") == 2


async def test_published_headers_are_copied_as_on_the_wire(broker: MemoryBroker) -> None:
    headers = {"x-cuebx-task": "send"}
    await broker.publish("cuebx", "emails", message(headers=headers))

    headers["x-cuebx-task"] = "changed"

    assert broker.messages("emails")[0].headers == {"x-cuebx-task": "send"}


async def test_operations_before_connect_raise_broker_unavailable() -> None:
    broker = MemoryBroker("memory://")

    with pytest.raises(BrokerUnavailableError, match="not connected to memory://"):
        await broker.declare(EMAILS)
    with pytest.raises(BrokerUnavailableError):
        await broker.publish("cuebx", "emails", message())


# -- consuming --------------------------------------------------------------------------------


async def test_prefetch_bounds_the_unacked_deliveries(broker: MemoryBroker) -> None:
    for n in range(5):
        await broker.publish("cuebx", "emails", message(str(n).encode()))

    async with consuming(broker, "emails", prefetch=2) as consumer:
        first = await consumer.next()
        second = await consumer.next()
        assert [first.body, second.body] == [b"0", b"1"]
        assert await consumer.nothing_more()
        assert await broker.queue_length("emails") == 3

        await first.ack()

        assert (await consumer.next()).body == b"2"
        assert await consumer.nothing_more()
        assert await broker.queue_length("emails") == 2


async def test_at_most_prefetch_handler_calls_run_and_a_settled_one_makes_room(
    broker: MemoryBroker,
) -> None:
    for n in range(5):
        await broker.publish("cuebx", "emails", message(str(n).encode()))
    handler = Holding()

    subscription = await broker.consume("emails", 2, handler)
    try:
        await until(lambda: handler.running == 2)
        await all_blocked()
        assert handler.bodies() == [b"0", b"1"]
        assert await broker.queue_length("emails") == 3

        handler.release(b"1")

        await until(lambda: len(handler.started) == 3)
        await all_blocked()
        assert handler.acked == [b"1"]
        assert handler.bodies() == [b"0", b"1", b"2"]
        assert handler.running == 2

        for body in (b"0", b"2", b"3", b"4"):
            handler.release(body)
        await until(lambda: len(handler.acked) == 5)
    finally:
        await subscription.close()

    assert handler.most == 2
    assert handler.bodies() == [b"0", b"1", b"2", b"3", b"4"]
    assert await broker.queue_length("emails") == 0
    assert broker.is_idle()


async def test_prefetch_zero_runs_every_delivery_at_once(broker: MemoryBroker) -> None:
    bodies = [str(n).encode() for n in range(20)]
    for body in bodies:
        await broker.publish("cuebx", "emails", message(body))
    handler = Holding()

    subscription = await broker.consume("emails", 0, handler)
    try:
        await until(lambda: handler.running == 20)
        assert await broker.queue_length("emails") == 0

        await broker.publish("cuebx", "emails", message(b"late"))

        await until(lambda: handler.running == 21)
        for body in [*bodies, b"late"]:
            handler.release(body)
        await until(lambda: len(handler.acked) == 21)
    finally:
        await subscription.close()

    assert handler.most == 21
    assert broker.is_idle()


async def test_a_handler_that_raises_is_logged_and_leaves_its_delivery_unacked(
    broker: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    await broker.publish("cuebx", "emails", message(b"bad"))
    await broker.publish("cuebx", "emails", message(b"next"))
    calls: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        calls.append(delivery)
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="cuebx.memory"):
        subscription = await broker.consume("emails", 1, handler)
        await until(lambda: any(r.name == "cuebx.memory" for r in caplog.records))
        await all_blocked()

    [record] = [r for r in caplog.records if r.name == "cuebx.memory"]
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    assert str(calls[0].message_id) in record.getMessage()
    # Unsettled, "bad" holds the only prefetch slot: "next" waits in the queue.
    assert [d.body for d in calls] == [b"bad"]
    assert await broker.queue_length("emails") == 1
    assert broker.is_idle() is False

    await subscription.close()

    assert [m.body for m in broker.messages("emails")] == [b"bad", b"next"]
    async with consuming(broker, "emails", prefetch=1) as consumer:
        again = await consumer.next()
        assert (again.body, again.redelivered) == (b"bad", True)
        await again.ack()


async def test_closing_a_subscription_requeues_and_lets_running_handlers_go_on(
    broker: MemoryBroker,
) -> None:
    await broker.publish("cuebx", "emails", message(b"slow"))
    handler = Holding()
    subscription = await broker.consume("emails", 1, handler)
    await until(lambda: handler.running == 1)

    await subscription.close()
    assert [m.body for m in broker.messages("emails")] == [b"slow"]  # back at once

    handler.release(b"slow")
    await until(lambda: handler.acked == [b"slow"])
    assert handler.cancelled == []
    # The handler's ack after the close did nothing: the message is back, redelivered.
    assert [m.body for m in broker.messages("emails")] == [b"slow"]
    async with consuming(broker, "emails") as consumer:
        again = await consumer.next()
        assert (again.body, again.redelivered) == (b"slow", True)
        await again.ack()


async def test_closing_the_broker_cancels_running_handlers_before_it_returns(
    broker: MemoryBroker,
) -> None:
    await broker.publish("cuebx", "emails", message(b"slow"))
    handler = Holding()
    await broker.consume("emails", 1, handler)
    await until(lambda: handler.running == 1)

    await broker.close()

    assert handler.cancelled == [b"slow"]
    assert handler.running == 0
    await broker.connect()
    async with consuming(broker, "emails") as consumer:
        again = await consumer.next()
        assert (again.body, again.redelivered) == (b"slow", True)
        await again.ack()


async def test_cancel_lets_a_running_handler_finish_and_ack(broker: MemoryBroker) -> None:
    await broker.publish("cuebx", "emails", message(b"held"))
    handler = Holding()
    subscription = await broker.consume("emails", 1, handler)
    await until(lambda: handler.running == 1)

    await subscription.cancel()
    await broker.publish("cuebx", "emails", message(b"later"))
    handler.release(b"held")

    await until(lambda: handler.running == 0)
    await all_blocked()
    assert (handler.acked, handler.cancelled) == ([b"held"], [])
    assert handler.bodies() == [b"held"]  # "later" went to no cancelled consumer
    assert [m.body for m in broker.messages("emails")] == [b"later"]
    assert broker.is_idle()

    await subscription.close()

    assert [m.body for m in broker.messages("emails")] == [b"later"]  # nothing to requeue


REQUEST: ContextVar[str] = ContextVar("REQUEST", default="unset")


async def test_handlers_start_in_the_consumer_s_context_not_the_publisher_s(
    broker: MemoryBroker,
) -> None:
    seen: list[str] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(REQUEST.get())
        REQUEST.set("changed by a handler")  # its own copy: the next call does not see it
        await delivery.ack()

    token = REQUEST.set("consumer")
    try:
        subscription = await broker.consume("emails", 1, handler)
    finally:
        REQUEST.reset(token)
    token = REQUEST.set("publisher")
    try:
        await broker.publish("cuebx", "emails", message())  # delivered right away
        await broker.publish("cuebx", "emails", message())
    finally:
        REQUEST.reset(token)

    await until(lambda: len(seen) == 2)
    assert seen == ["consumer", "consumer"]
    await subscription.close()


async def test_consumers_of_one_queue_take_turns(broker: MemoryBroker) -> None:
    async with (
        consuming(broker, "emails") as one,
        consuming(broker, "emails") as two,
    ):
        for n in range(4):
            await broker.publish("cuebx", "emails", message(str(n).encode()))

        assert [(await one.next()).body, (await one.next()).body] == [b"0", b"2"]
        assert [(await two.next()).body, (await two.next()).body] == [b"1", b"3"]


async def test_delivery_carries_the_message_properties(broker: MemoryBroker) -> None:
    sent = message(b'{"a": 1}', priority=3)
    await broker.publish("cuebx", "emails", sent)

    async with consuming(broker, "emails") as consumer:
        delivery = await consumer.next()

    assert isinstance(delivery, Delivery)
    assert delivery.body == b'{"a": 1}'
    assert delivery.headers == {"x-cuebx-task": "send"}
    assert (delivery.message_id, delivery.correlation_id) == (sent.message_id, sent.message_id)
    assert delivery.content_type == "application/json"
    assert (delivery.priority, delivery.timestamp) == (3, SENT_AT)
    assert delivery.redelivered is False


async def test_reject_with_requeue_redelivers_with_the_redelivered_flag(
    broker: MemoryBroker,
) -> None:
    await broker.publish("cuebx", "emails", message())

    async with consuming(broker, "emails", prefetch=1) as consumer:
        first = await consumer.next()
        assert first.redelivered is False
        await first.reject(requeue=True)

        again = await consumer.next()
        assert again.message_id == first.message_id
        assert again.redelivered is True
        assert "x-delivery-count" not in again.headers  # classic queues do not count
        await again.ack()

    assert await broker.queue_length("emails") == 0
    assert broker.is_idle()


async def test_reject_without_requeue_dead_letters_with_an_x_death_entry(
    broker: MemoryBroker,
) -> None:
    await broker.publish("cuebx", "emails", message())

    async with consuming(broker, "emails") as consumer:
        await (await consumer.next()).reject(requeue=False)

    [dead] = broker.messages("emails.dlq")
    assert dead.headers["x-cuebx-task"] == "send"
    assert death(dead) == {
        "count": 1,
        "reason": "rejected",
        "queue": "emails",
        "exchange": "cuebx",
        "routing-keys": ["emails"],
    }
    assert dead.headers["x-first-death-reason"] == "rejected"
    assert dead.headers["x-first-death-queue"] == "emails"


async def test_settling_a_delivery_twice_is_an_error(broker: MemoryBroker) -> None:
    await broker.publish("cuebx", "emails", message())

    async with consuming(broker, "emails") as consumer:
        delivery = await consumer.next()
        await delivery.ack()

        with pytest.raises(BrokerError, match=r"already acked.*unknown delivery tag"):
            await delivery.ack()
        with pytest.raises(BrokerError, match="already acked"):
            await delivery.reject(requeue=True)

    assert await broker.queue_length("emails") == 0


async def test_cancel_stops_new_deliveries_and_keeps_unacked_ones(broker: MemoryBroker) -> None:
    await broker.publish("cuebx", "emails", message(b"held"))

    async with consuming(broker, "emails", prefetch=1) as consumer:
        held = await consumer.next()
        await consumer.subscription.cancel()
        await broker.publish("cuebx", "emails", message(b"later"))
        await held.ack()

        assert await consumer.nothing_more()
        assert await broker.queue_length("emails") == 1
        assert broker.is_idle()  # "later" waits for a consumer: nothing is in progress
    assert [m.body for m in broker.messages("emails")] == [b"later"]


async def test_closing_a_subscription_requeues_its_unacked_deliveries(
    broker: MemoryBroker,
) -> None:
    await broker.publish("cuebx", "emails", message())

    async with consuming(broker, "emails") as consumer:
        delivery = await consumer.next()
        await consumer.subscription.close()

        assert await broker.queue_length("emails") == 1
        await delivery.ack()  # its channel is gone: nothing happens

    assert await broker.queue_length("emails") == 1


async def test_close_requeues_unacked_deliveries_as_redelivered(broker: MemoryBroker) -> None:
    await broker.publish("cuebx", "emails", message())
    async with consuming(broker, "emails") as consumer:
        delivery = await consumer.next()
        await broker.close()

        await delivery.ack()  # the channel is gone: the message stays in its queue

    await broker.connect()
    assert await broker.queue_length("emails") == 1
    async with consuming(broker, "emails") as consumer:
        again = await consumer.next()
        assert again.message_id == delivery.message_id
        assert again.redelivered is True


async def test_consuming_an_unknown_queue_is_a_topology_error(broker: MemoryBroker) -> None:
    with pytest.raises(TopologyError, match="cannot consume queue 'nope'"):
        async with consuming(broker, "nope"):
            pass


# -- TTL, dead-lettering, priorities, delivery limit -----------------------------------------


async def test_ttl_expiry_dead_letters_back_to_the_main_queue_only_when_the_clock_advances(
    broker: MemoryBroker,
) -> None:
    async with consuming(broker, "emails") as consumer:
        await broker.publish("", "emails.retry.5s", message())
        assert broker.next_expiry() == 5.0
        assert broker.is_idle()  # waiting out a TTL is not work

        await broker.clock.advance(4.999)

        assert await consumer.nothing_more()
        assert await broker.queue_length("emails.retry.5s") == 1

        await broker.clock.advance(0.001)

        delivery = await consumer.next()
        assert broker.clock.now() == 5.0
        assert await broker.queue_length("emails.retry.5s") == 0
        assert broker.next_expiry() is None
        assert death(delivery) == {
            "count": 1,
            "reason": "expired",
            "queue": "emails.retry.5s",
            "exchange": "",
            "routing-keys": ["emails.retry.5s"],
        }
        await delivery.ack()


async def test_x_death_counts_repeated_expiries_through_one_tier(broker: MemoryBroker) -> None:
    await broker.publish("", "emails.retry.5s", message())
    async with consuming(broker, "emails") as consumer:
        await broker.clock.advance(5)
        first = await consumer.next()
        await broker.publish("", "emails.retry.5s", as_message(first))
        await first.ack()

        await broker.clock.advance(5)

        second = await consumer.next()
        assert len(second.headers["x-death"]) == 1
        assert death(second)["count"] == 2
        await second.ack()


async def test_expiries_happen_in_time_order_within_one_advance(broker: MemoryBroker) -> None:
    chain = Topology(
        "cuebx",
        (
            QueueSpec("end", "dead-letter", {}),
            QueueSpec("hop2", "retry", _ttl_to(2_000, "end")),
            QueueSpec("hop1", "retry", _ttl_to(1_000, "hop2")),
            QueueSpec("slow", "retry", _ttl_to(4_000, "end")),
        ),
    )
    await broker.declare(chain)
    await broker.publish("", "slow", message(b"slow"))
    await broker.publish("", "hop1", message(b"chained"))

    await broker.clock.advance(10)

    # hop1 expires at 1s into hop2, which expires at 3s: before slow at 4s.
    assert [m.body for m in broker.messages("end")] == [b"chained", b"slow"]
    assert [d["queue"] for d in broker.messages("end")[0].headers["x-death"]] == ["hop2", "hop1"]


async def test_a_dead_letter_cycle_without_rejection_is_dropped(broker: MemoryBroker) -> None:
    await broker.declare(Topology("cuebx", (QueueSpec("loop", "retry", _ttl_to(1_000, "loop")),)))
    await broker.publish("", "loop", message())

    await broker.clock.advance(1)

    assert await broker.queue_length("loop") == 0
    assert broker.next_expiry() is None


async def test_a_rejection_breaks_a_dead_letter_cycle(broker: MemoryBroker) -> None:
    work = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "hold"}
    await broker.declare(
        Topology(
            "cuebx",
            (QueueSpec("work", "main", work), QueueSpec("hold", "retry", _ttl_to(1_000, "work"))),
        )
    )
    await broker.publish("", "work", message())
    async with consuming(broker, "work") as consumer:
        await (await consumer.next()).reject(requeue=False)

        await broker.clock.advance(1)

        back = await consumer.next()
        assert [(d["queue"], d["reason"]) for d in back.headers["x-death"]] == [
            ("hold", "expired"),
            ("work", "rejected"),
        ]
        assert back.headers["x-last-death-queue"] == "hold"
        assert back.headers["x-first-death-queue"] == "work"
        await back.ack()


async def test_reject_without_a_dead_letter_exchange_drops_the_message(
    broker: MemoryBroker,
) -> None:
    await broker.publish("", "emails.dlq", message())
    async with consuming(broker, "emails.dlq") as consumer:
        await (await consumer.next()).reject(requeue=False)

    assert [await broker.queue_length(q.name) for q in EMAILS.queues] == [0, 0, 0]
    assert broker.is_idle()


async def test_priorities_deliver_highest_first_then_in_publish_order(
    broker: MemoryBroker,
) -> None:
    await broker.declare(plan([QueueRoute("t", "ranked")], exchange="ranked", max_priority=10))
    for body, priority in [(b"1", 1), (b"5a", 5), (b"none", None), (b"5b", 5), (b"99", 99)]:
        await broker.publish("ranked", "ranked", message(body, priority=priority))

    async with consuming(broker, "ranked") as consumer:
        bodies = [(await consumer.next()).body for _ in range(5)]

    assert bodies == [b"99", b"5a", b"5b", b"1", b"none"]


async def test_priorities_are_ignored_without_x_max_priority(broker: MemoryBroker) -> None:
    await broker.publish("cuebx", "emails", message(b"low", priority=1))
    await broker.publish("cuebx", "emails", message(b"high", priority=9))

    assert [m.body for m in broker.messages("emails")] == [b"low", b"high"]


async def test_a_quorum_queue_dead_letters_past_its_delivery_limit(broker: MemoryBroker) -> None:
    topology = plan([QueueRoute("t", "orders")], queue_type="quorum", delivery_limit=2)
    await broker.declare(topology)
    await broker.publish("cuebx", "orders", message())

    counts = []
    async with consuming(broker, "orders", prefetch=1) as consumer:
        for _ in range(3):
            delivery = await consumer.next()
            counts.append(delivery.headers.get("x-delivery-count"))
            await delivery.reject(requeue=True)
        assert await consumer.nothing_more()

    assert counts == [None, 1, 2]
    assert await broker.queue_length("orders") == 0
    [dead] = broker.messages("orders.dlq")
    assert death(dead)["reason"] == "delivery_limit"


async def test_close_counts_against_the_delivery_limit(broker: MemoryBroker) -> None:
    topology = plan([QueueRoute("t", "orders")], queue_type="quorum", delivery_limit=0)
    await broker.declare(topology)
    await broker.publish("cuebx", "orders", message())
    async with consuming(broker, "orders") as consumer:
        await consumer.next()
        await broker.close()  # a worker that crashes mid-task

    assert broker.messages("orders") == []
    assert death(broker.messages("orders.dlq")[0])["reason"] == "delivery_limit"


async def test_real_time_clock_expires_ttls_without_advance_and_leaves_no_task() -> None:
    broker = MemoryBroker("memory://", real_time=True)
    tasks_before = len(asyncio.all_tasks())
    await broker.connect()
    await broker.declare(
        Topology("x", (QueueSpec("q", "main", {}), QueueSpec("wait", "retry", _ttl_to(50, "q"))))
    )
    try:
        async with consuming(broker, "q") as consumer:
            await broker.publish("", "wait", message())
            assert broker.messages("q") == []

            delivery = await consumer.next(within=2.0)

            assert death(delivery)["reason"] == "expired"
            assert broker.clock.now() >= 0.05
    finally:
        await broker.close()
    assert len(asyncio.all_tasks()) == tasks_before


async def test_the_clock_only_moves_forward(broker: MemoryBroker) -> None:
    with pytest.raises(ValueError, match="time only moves forward"):
        await broker.clock.advance(-1)


# -- topology ---------------------------------------------------------------------------------


async def test_redeclaring_a_queue_with_other_arguments_is_a_topology_conflict(
    broker: MemoryBroker,
) -> None:
    await broker.declare(Topology("cuebx", (QueueSpec("ttl", "retry", {"x-message-ttl": 3000}),)))

    with pytest.raises(TopologyConflictError) as caught:
        await broker.declare(
            Topology("cuebx", (QueueSpec("ttl", "retry", {"x-message-ttl": 5000}),))
        )

    assert caught.value.queue == "ttl"
    assert caught.value.detail == "argument 'x-message-ttl': cuebx wants 5000, the broker has 3000"
    assert caught.value.wanted == {"x-message-ttl": 5000}


async def test_a_conflict_names_every_differing_argument(broker: MemoryBroker) -> None:
    quorum = plan([QueueRoute("send", "emails")], queue_type="quorum", delivery_limit=3)

    with pytest.raises(TopologyConflictError, match="queue 'emails' already exists") as caught:
        await broker.declare(Topology("cuebx", (quorum.queue("emails"),)))

    # A classic queue's x-dead-letter-strategy and x-delivery-limit are not compared.
    assert caught.value.detail.split("; ") == [
        "argument 'x-overflow': cuebx wants 'reject-publish', the broker has none",
        "argument 'x-queue-type': cuebx wants 'quorum', the broker has 'classic'",
    ]


async def test_a_quorum_queue_compares_its_delivery_limit(broker: MemoryBroker) -> None:
    await broker.declare(plan([QueueRoute("t", "orders")], queue_type="quorum", delivery_limit=2))

    with pytest.raises(TopologyConflictError) as caught:
        await broker.declare(
            plan([QueueRoute("t", "orders")], queue_type="quorum", delivery_limit=5)
        )

    assert caught.value.queue == "orders"
    assert caught.value.detail == "argument 'x-delivery-limit': cuebx wants 5, the broker has 2"


async def test_redeclaring_with_the_same_arguments_keeps_the_messages(
    broker: MemoryBroker,
) -> None:
    await broker.publish("cuebx", "emails", message())

    await broker.declare(EMAILS)

    assert await broker.queue_length("emails") == 1


async def test_arguments_rabbitmq_refuses_are_a_topology_error(broker: MemoryBroker) -> None:
    refused = {"x-queue-type": "quorum", "x-max-priority": 5}
    with pytest.raises(TopologyError, match="quorum queues refuse 'x-max-priority'"):
        await broker.declare(Topology("cuebx", (QueueSpec("bad", "main", refused),)))
    with pytest.raises(TopologyError, match="invalid arg 'x-message-ttl'"):
        await broker.declare(Topology("cuebx", (QueueSpec("bad", "retry", {"x-message-ttl": -1}),)))


async def test_delete_removes_the_queues_and_their_bindings(broker: MemoryBroker) -> None:
    await broker.publish("cuebx", "emails", message())

    await broker.delete(EMAILS)

    with pytest.raises(LookupError, match="queue 'emails' does not exist"):
        await broker.queue_length("emails")
    with pytest.raises(UnroutableError):
        await broker.publish("cuebx", "emails", message())


async def test_settling_deliveries_of_a_deleted_queue_does_nothing(
    broker: MemoryBroker,
) -> None:
    await broker.publish("cuebx", "emails", message())
    await broker.publish("cuebx", "emails", message())
    async with consuming(broker, "emails") as consumer:
        requeued, rejected = await consumer.next(), await consumer.next()
        await broker.delete(EMAILS)

        await requeued.reject(requeue=True)
        await rejected.reject(requeue=False)

    await broker.declare(EMAILS)
    assert [await broker.queue_length(q.name) for q in EMAILS.queues] == [0, 0, 0]


async def test_only_memory_urls_and_own_exchanges_are_accepted(broker: MemoryBroker) -> None:
    with pytest.raises(ValueError, match="needs a memory:// URL"):
        MemoryBroker("amqp://localhost/")
    with pytest.raises(TopologyError, match="reserved"):
        await broker.declare(plan([QueueRoute("t", "q")], exchange="amq.direct"))


async def test_peek_reads_ready_messages_and_leaves_them(broker: MemoryBroker) -> None:
    sent = [message(str(n).encode()) for n in range(3)]
    for one in sent:
        await broker.publish("cuebx", "emails", one)

    assert await broker.peek("emails", limit=2) == sent[:2]
    assert await broker.peek("emails") == sent
    async with consuming(broker, "emails") as consumer:
        assert (await consumer.next()).redelivered is False
    with pytest.raises(LookupError, match="queue 'nope'"):
        await broker.peek("nope")


async def test_purge_drops_the_ready_messages(broker: MemoryBroker) -> None:
    await broker.publish("cuebx", "emails", message())
    await broker.publish("cuebx", "emails", message())

    assert await broker.purge("emails") == 2
    assert await broker.queue_length("emails") == 0


def test_memory_urls_never_import_aio_pika() -> None:
    code = (
        "import sys\n"
        "from cuebx.brokers.base import broker_for_url\n"
        "broker = broker_for_url('memory://named', publish_timeout=1.0)\n"
        "assert type(broker).__name__ == 'MemoryBroker', broker\n"
        "assert 'aio_pika' not in sys.modules and 'aiormq' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _ttl_to(ms: int, queue: str) -> dict[str, Any]:
    return {"x-message-ttl": ms, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue}


# -- single active consumer, x-max-length --------------------------------------------------

ELECTION = Topology(
    "cuebx",
    (
        QueueSpec("election", "scheduler", {"x-single-active-consumer": True}),
        QueueSpec("latest", "scheduler", {"x-max-length": 1}),
    ),
)


async def test_a_single_active_consumer_queue_delivers_to_its_first_consumer_only(
    broker: MemoryBroker,
) -> None:
    await broker.declare(ELECTION)
    async with consuming(broker, "election") as first, consuming(broker, "election") as second:
        for body in (b"a", b"b", b"c"):
            await broker.publish("", "election", message(body))
        got = [await first.next() for _ in range(3)]
        assert [d.body for d in got] == [b"a", b"b", b"c"]
        assert await second.nothing_more()


async def test_the_next_consumer_takes_over_with_what_the_active_one_held_when_its_channel_closes(
    broker: MemoryBroker,
) -> None:
    await broker.declare(ELECTION)
    await broker.publish("", "election", message(b"state"))
    async with consuming(broker, "election") as first, consuming(broker, "election") as second:
        held = await first.next()
        assert held.channel_open is True
        assert await second.nothing_more()

        await first.subscription.close()

        again = await second.next()
        assert (again.body, again.redelivered) == (b"state", True)
        assert held.channel_open is False
        await held.ack()  # does nothing: the message is back in its queue
        assert again.channel_open is True


async def test_a_cancelled_active_consumer_hands_new_messages_to_the_next(
    broker: MemoryBroker,
) -> None:
    await broker.declare(ELECTION)
    async with consuming(broker, "election") as first, consuming(broker, "election") as second:
        await first.subscription.cancel()
        await broker.publish("", "election", message(b"after"))
        assert (await second.next()).body == b"after"


async def test_x_max_length_drops_the_oldest_ready_message(broker: MemoryBroker) -> None:
    await broker.declare(ELECTION)
    for body in (b"old", b"older-news", b"newest"):
        await broker.publish("", "latest", message(body))
    assert [m.body for m in broker.messages("latest")] == [b"newest"]


async def test_a_delivery_its_handler_holds_after_returning_leaves_the_broker_idle(
    broker: MemoryBroker,
) -> None:
    """A scheduler holds its state message for as long as it leads: time must still move."""
    await broker.declare(ELECTION)
    async with consuming(broker, "election") as consumer:
        await broker.publish("", "election", message(b"state"))
        held = await consumer.next()
        await all_blocked()
        assert broker.is_idle() is True
        await held.ack()

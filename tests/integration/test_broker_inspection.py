"""What operations read through the broker protocol: get, queue state, comparisons, connected.

Each test runs on RabbitMQ and on ``memory://``, so ``cuebx.ops`` can rely on both alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from cuebx.brokers.base import Broker
from cuebx.message import OutgoingMessage
from cuebx.topology import QueueSpec, Topology
from tests.conftest import AppFactory

pytestmark = pytest.mark.anyio


def _message(n: int) -> OutgoingMessage:
    return OutgoingMessage(
        body=b'{"n": %d}' % n,
        message_id=f"m{n}",
        correlation_id=f"m{n}",
        content_type="application/json",
        headers={"x-cuebx-task": "job"},
        timestamp=datetime.now(UTC),
    )


@pytest.fixture
async def broker(make_app: AppFactory) -> Broker:
    """The test's connected broker, with the default exchange ``cuebx`` that every test shares."""
    app = make_app()
    await app.broker.connect()
    await app.broker.declare(Topology("cuebx", ()))
    return app.broker


async def _queue(broker: Broker, name: str, arguments: Mapping[str, Any]) -> Topology:
    topology = Topology("cuebx", (QueueSpec(name, "main", arguments),))
    await broker.declare(topology)
    return topology


async def test_get_takes_messages_in_order_and_settles_them_like_consumed_ones(
    broker: Broker, prefix: str
) -> None:
    topology = await _queue(broker, f"{prefix}.q", {})
    try:
        for n in range(3):
            await broker.publish("", f"{prefix}.q", _message(n))
        first = await broker.get(f"{prefix}.q")
        second = await broker.get(f"{prefix}.q")
        assert first is not None
        assert second is not None
        assert (first.message_id, second.message_id) == ("m0", "m1")
        assert first.body == b'{"n": 0}'
        assert first.headers["x-cuebx-task"] == "job"
        await first.ack()
        await second.reject(requeue=True)
        state = await broker.queue_state(f"{prefix}.q")
        assert state is not None
        assert state.ready == 2
        taken = [await broker.get(f"{prefix}.q") for _ in range(2)]
        assert sorted(d.message_id for d in taken if d is not None) == ["m1", "m2"]
        for delivery in taken:
            assert delivery is not None
            await delivery.ack()
        assert await broker.get(f"{prefix}.q") is None
    finally:
        await broker.delete(topology)


async def test_get_on_a_missing_queue_names_it(broker: Broker, prefix: str) -> None:
    with pytest.raises(LookupError, match=f"{prefix}.nope"):
        await broker.get(f"{prefix}.nope")
    # The broker's channel for gets survives the refusal.
    topology = await _queue(broker, f"{prefix}.q", {})
    try:
        await broker.publish("", f"{prefix}.q", _message(1))
        delivery = await broker.get(f"{prefix}.q")
        assert delivery is not None
        await delivery.ack()
    finally:
        await broker.delete(topology)


async def test_queue_state_counts_ready_messages_and_consumers_and_misses_nothing(
    broker: Broker, prefix: str
) -> None:
    assert await broker.queue_state(f"{prefix}.nope") is None
    topology = await _queue(broker, f"{prefix}.q", {})
    try:
        for n in range(2):
            await broker.publish("", f"{prefix}.q", _message(n))

        async def hold(delivery: Any) -> None: ...

        subscription = await broker.consume(f"{prefix}.q", 1, hold)
        try:
            state = await broker.queue_state(f"{prefix}.q")
            assert state is not None
            assert (state.name, state.consumers) == (f"{prefix}.q", 1)
            assert state.ready in (1, 2)  # RabbitMQ may not have delivered the first yet
            assert state.unacked in (None, 1)  # AMQP cannot tell; memory can
        finally:
            await subscription.close()
    finally:
        await broker.delete(topology)


async def test_compare_queue_finds_every_differing_argument_and_creates_nothing(
    broker: Broker, prefix: str
) -> None:
    assert await broker.compare_queue(f"{prefix}.nope", {"x-message-ttl": 1}) is None
    assert await broker.queue_state(f"{prefix}.nope") is None
    existing = {
        "x-message-ttl": 1000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "a",
    }
    topology = await _queue(broker, f"{prefix}.q", existing)
    try:
        assert await broker.compare_queue(f"{prefix}.q", existing) == {}
        wanted = {"x-message-ttl": 2000, "x-dead-letter-routing-key": "b", "x-max-priority": 5}
        assert await broker.compare_queue(f"{prefix}.q", wanted) == {
            "x-message-ttl": 1000,
            "x-dead-letter-routing-key": "a",
            "x-dead-letter-exchange": "",
            "x-max-priority": None,
        }
    finally:
        await broker.delete(topology)


async def test_compare_exchange_tells_a_missing_exchange_from_another_type(
    broker: Broker, prefix: str
) -> None:
    assert await broker.compare_exchange(f"{prefix}.nope", "direct") is None
    assert await broker.compare_exchange("cuebx", "direct") == {}
    assert await broker.compare_exchange("cuebx", "topic") == {"type": "direct"}


async def test_connected_follows_connect_and_close(make_app: AppFactory) -> None:
    app = make_app()
    assert not app.broker.connected
    await app.broker.connect()
    assert app.broker.connected
    await app.broker.close()
    assert not app.broker.connected

"""The topology as RabbitMQ reports it: names, arguments, quorum queues, clashes."""

from __future__ import annotations

import aio_pika
import pytest

from cuebx import Retry, TopologyError
from tests.conftest import AppFactory, Raw, broker_queues

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]


async def test_retry_lists_declare_one_tier_per_distinct_delay_with_ttl_and_dead_lettering(
    make_rabbit_app: AppFactory, prefix: str
) -> None:
    app = make_rabbit_app()
    emails, reports, plain = f"{prefix}.emails", f"{prefix}.reports", f"{prefix}.plain"

    @app.task(queue=emails, retries=["30s", "5m", "1h30m"])
    async def send(address: str) -> None: ...

    @app.task(queue=emails, retries=["250ms", "30s"])
    async def bounce(address: str) -> None: ...

    @app.task(queue=reports, retries=Retry(every="1m", times=3))
    async def report(day: str) -> None: ...

    @app.task(queue=plain)
    async def noop() -> None: ...

    await app.connect()
    queues = broker_queues(prefix)

    assert set(queues) == {
        emails,
        f"{emails}.retry.250ms",
        f"{emails}.retry.30s",
        f"{emails}.retry.5m",
        f"{emails}.retry.1h30m",
        f"{emails}.dlq",
        reports,
        f"{reports}.retry.1m",
        f"{reports}.dlq",
        plain,
        f"{plain}.dlq",
    }
    assert queues[emails] == {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": f"{emails}.dlq",
    }
    assert queues[f"{emails}.retry.1h30m"] == {
        "x-message-ttl": 5_400_000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": emails,
    }
    assert queues[f"{emails}.retry.250ms"]["x-message-ttl"] == 250
    assert queues[f"{reports}.retry.1m"]["x-message-ttl"] == 60_000
    assert queues[f"{emails}.dlq"] == {}


async def test_main_queue_is_bound_to_the_exchange_by_its_name_and_extra_routing_keys(
    make_rabbit_app: AppFactory, prefix: str, amqp: Raw
) -> None:
    app = make_rabbit_app(exchange=f"{prefix}.exchange")
    queue = f"{prefix}.events"

    @app.task(queue=queue, routing_keys=[f"{prefix}.legacy"])
    async def handle(event: str) -> None: ...

    await app.connect()
    exchange = await amqp.channel.get_exchange(f"{prefix}.exchange")
    try:
        import aio_pika

        for key in (queue, f"{prefix}.legacy"):
            await exchange.publish(aio_pika.Message(b'{"event": "x"}'), routing_key=key)
        assert await amqp.count(queue) == 2
    finally:
        await app.broker.delete(app.topology())
        await exchange.delete()


async def test_quorum_queues_get_at_least_once_dead_lettering_and_a_delivery_limit(
    make_rabbit_app: AppFactory, prefix: str
) -> None:
    app = make_rabbit_app(queue_type="quorum", delivery_limit=5)
    queue = f"{prefix}.orders"

    @app.task(queue=queue, retries=["1s"])
    async def place(order_id: int) -> None: ...

    await app.connect()
    queues = broker_queues(prefix)

    assert queues[queue] == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": f"{queue}.dlq",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": 5,
    }
    assert queues[f"{queue}.retry.1s"] == {
        "x-queue-type": "quorum",
        "x-message-ttl": 1000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert queues[f"{queue}.dlq"] == {"x-queue-type": "quorum"}


async def test_an_exchange_of_another_type_is_reported_as_a_topology_error(
    make_rabbit_app: AppFactory, amqp: Raw, prefix: str
) -> None:
    name = f"{prefix}.fanout"
    await amqp.channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, auto_delete=True)
    try:
        app = make_rabbit_app(exchange=name)

        @app.task(queue=f"{prefix}.jobs")
        async def job(n: int) -> None: ...

        with pytest.raises(TopologyError) as caught:
            await app.connect()
        message = str(caught.value)
        assert f"exchange {name!r}" in message
        assert "durable direct exchange" in message
        assert "PRECONDITION_FAILED" in message
    finally:
        await amqp.channel.exchange_delete(name)

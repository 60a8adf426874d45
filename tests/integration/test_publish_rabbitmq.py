"""Facts about publishing only RabbitMQ itself can show."""

from __future__ import annotations

import subprocess

import anyio
import pytest

from cuebx import PublishError
from tests.conftest import AppFactory, Raw

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]


async def test_messages_are_persistent_on_the_broker(
    make_rabbit_app: AppFactory, prefix: str, amqp: Raw
) -> None:
    app = make_rabbit_app()
    queue = f"{prefix}.q"

    @app.task(queue=queue)
    async def work(n: int) -> None: ...

    await work.delay(1)
    message = await amqp.get(queue)
    assert message.delivery_mode == 2


async def test_many_concurrent_delays_share_one_connection_and_are_all_confirmed(
    make_rabbit_app: AppFactory, prefix: str, amqp: Raw, request: pytest.FixtureRequest
) -> None:
    name = f"{prefix}-conn"
    app = make_rabbit_app(connection_name=name)
    queue = f"{prefix}.q"

    @app.task(queue=queue)
    async def work(n: int) -> None: ...

    handles = []

    async def publish(n: int) -> None:
        handles.append(await work.delay(n))

    async with anyio.create_task_group() as group:
        for n in range(300):
            group.start_soon(publish, n)

    assert len({h.id for h in handles}) == 300
    assert await amqp.count(queue) == 300
    listed = subprocess.run(
        ["rabbitmqctl", "list_connections", "-q", "client_properties"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert listed.count(name) == 1


async def test_publishing_on_a_closed_broker_fails_at_once_and_says_why(
    make_rabbit_app: AppFactory, prefix: str
) -> None:
    app = make_rabbit_app(publish_timeout="30s")

    @app.task(queue=f"{prefix}.closed")
    async def job() -> None: ...

    await job.delay()
    broker = app.broker
    await app.close()
    message = app.publisher.message(job, (), {})
    with anyio.fail_after(2), pytest.raises(PublishError, match="not connected"):
        await broker.publish(app.settings.exchange, job.queue, message)

"""Several broker URLs: the first that answers, the next one on a loss, masked everywhere.

Each "node" here is a TCP proxy in front of the shared RabbitMQ, which a test can make refuse
connections and cut: the order in which the URLs are tried is the same as with a cluster, and
no node has to die (test_cluster.py kills a real one).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from urllib.parse import urlsplit

import anyio
import pytest

from cuebx import BrokerUnavailableError, Cuebx, PublishError
from cuebx.brokers.amqp import AmqpBroker
from cuebx.message import OutgoingMessage
from tests.conftest import AppFactory, Raw, wait_for
from tests.proxy import Proxy, running_proxy

pytestmark = [pytest.mark.anyio]


def _through(url: str, proxy: Proxy) -> str:
    """`url`, through `proxy`."""
    target = urlsplit(url)
    return url.replace(f"{target.hostname}:{target.port or 5672}", f"127.0.0.1:{proxy.port}")


@pytest.fixture
async def proxies(rabbitmq_url: str) -> AsyncIterator[list[Proxy]]:
    target = urlsplit(rabbitmq_url)
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                running_proxy(target.hostname or "127.0.0.1", target.port or 5672)
            )
            for _ in range(3)
        ]


async def test_the_first_url_that_answers_is_used(
    rabbitmq_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = Cuebx(["amqp://guest:secret@127.0.0.1:1/", rabbitmq_url], connect_timeout="4s")
    try:
        await app.connect()
        assert isinstance(app.broker, AmqpBroker)
        assert app.broker.node_url == rabbitmq_url
    finally:
        await app.close()
    [record] = [r for r in caplog.records if r.name == "cuebx.amqp"]
    assert record.getMessage().startswith(
        f"connected to RabbitMQ at {rabbitmq_url.replace('guest:guest', 'guest:***')}; "
        "amqp://guest:***@127.0.0.1:1/: "
    )


async def test_when_no_url_answers_the_error_names_each_one_masked() -> None:
    app = Cuebx(
        "amqp://guest:secret@127.0.0.1:1/,amqp://guest:secret@127.0.0.1:2/",
        connect_timeout="2s",
    )
    with pytest.raises(BrokerUnavailableError) as info:
        await app.connect()
    message = str(info.value)
    assert message.startswith("cannot connect to any of 2 RabbitMQ nodes: ")
    assert "amqp://guest:***@127.0.0.1:1/: " in message
    assert "; amqp://guest:***@127.0.0.1:2/: " in message
    assert "secret" not in message


async def test_a_lost_connection_moves_to_the_next_url_round_robin(
    proxies: list[Proxy],
    rabbitmq_url: str,
    make_rabbit_app: AppFactory,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner = make_rabbit_app()  # declares the queue on the broker and deletes it afterwards
    # At least once: an ack lost with a connection brings its message back a second time.
    handled: list[int] = []

    @owner.task(queue=f"{prefix}.q")
    async def job(n: int) -> None:
        handled.append(n)

    await owner.declare()
    urls = [_through(rabbitmq_url, p) for p in proxies]
    app = Cuebx(urls, connection_name=f"{prefix}-failover")
    app.task(queue=f"{prefix}.q", name="job")(job.fn)
    caplog.set_level(logging.INFO, logger="cuebx")
    worker = await app.start_consumers()
    broker = app.broker
    assert isinstance(broker, AmqpBroker)
    try:
        assert broker.node_url == urls[0]
        await app.tasks["job"].delay(0)
        await wait_for(lambda: handled == [0], what="a task through node 1")

        # Node 1 goes away: the connection moves to node 2, consumer and publisher with it.
        proxies[0].accepting = False
        proxies[0].cut()
        await wait_for(lambda: broker.node_url == urls[1], what="a connection to node 2")
        await app.tasks["job"].delay(1)
        await wait_for(lambda: 1 in handled, what="a task through node 2")

        # Node 2 goes too, node 3 refuses, node 1 is back: 3 is tried before 1.
        proxies[0].accepting = True
        proxies[2].accepting = False
        proxies[1].accepting = False
        proxies[1].cut()
        await wait_for(lambda: broker.node_url == urls[0], timeout=15, what="back to node 1")
        await app.tasks["job"].delay(2)
        await wait_for(lambda: 2 in handled, what="a task through node 1 again")
    finally:
        await worker.stop()
        await app.close()
    # One line per node left, naming it and the next one, passwords masked.
    moves = [r.getMessage() for r in caplog.records if r.getMessage().endswith(" next")]
    node = [_masked(url) for url in urls]
    said = [m.split(" RabbitMQ at ") for m in moves]
    assert [(what, rest.split()[0], rest.split()[-2]) for what, rest in said] == [
        ("lost the connection to", node[0], node[1]),
        ("lost the connection to", node[1], node[2]),
        ("cannot connect to", node[2], node[0]),
    ]
    assert all("guest:guest@" not in r.getMessage() for r in caplog.records)


def _masked(url: str) -> str:
    return url.replace("guest:guest@", "guest:***@")


async def test_a_nacked_publish_raises_and_the_next_one_goes_through_a_new_channel(
    make_rabbit_app: AppFactory, amqp: Raw, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_rabbit_app()

    @app.task(queue=f"{prefix}.ok")
    async def ok() -> None: ...

    await app.connect()
    # A queue that refuses every message: RabbitMQ nacks what is published to it.
    full = f"{prefix}.full"
    arguments = {"x-max-length": 0, "x-overflow": "reject-publish"}
    await amqp.channel.declare_queue(full, auto_delete=True, arguments=arguments)
    caplog.set_level(logging.INFO, logger="cuebx.amqp")
    message = OutgoingMessage(
        body=b"{}",
        message_id="m1",
        correlation_id="m1",
        content_type=None,
        headers={},
        timestamp=datetime.now(UTC),
    )
    for _ in range(2):
        with pytest.raises(PublishError, match="was nacked by the broker"):
            await app.broker.publish("", full, message)
    # Reopened once: a queue that keeps nacking costs one new channel a second, not one each.
    assert caplog.text.count("a publish was nacked: publishing on a new channel from now on") == 1
    with anyio.fail_after(10):
        await ok.delay()
    assert await amqp.count(f"{prefix}.ok") == 1
    await amqp.channel.queue_delete(full)


async def test_a_nacked_publish_fails_alone_while_other_publishes_are_in_flight(
    make_rabbit_app: AppFactory, amqp: Raw, prefix: str
) -> None:
    app = make_rabbit_app()

    @app.task(queue=f"{prefix}.ok")
    async def ok(n: int) -> None: ...

    await app.connect()
    full = f"{prefix}.full"
    await amqp.channel.declare_queue(
        full, auto_delete=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    refused = OutgoingMessage(
        body=b"{}",
        message_id="refused",
        correlation_id="refused",
        content_type=None,
        headers={},
        timestamp=datetime.now(UTC),
    )
    outcomes: list[str] = []
    nacks_done = anyio.Event()

    async def lane() -> None:
        # Publishes in flight all the while the nacks come and go.
        while not nacks_done.is_set():
            await ok.delay(len(outcomes))
            outcomes.append("ok")

    async def nacker() -> None:
        for _ in range(3):
            await anyio.sleep(0.4)
            with pytest.raises(PublishError, match="nacked"):
                await app.broker.publish("", full, refused)
            outcomes.append("nacked")
        nacks_done.set()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            for _ in range(20):
                group.start_soon(lane)
            group.start_soon(nacker)
    assert outcomes.count("nacked") == 3
    # No lane failed: a PublishError would have ended the task group with it.
    assert await amqp.count(f"{prefix}.ok") == outcomes.count("ok")
    await amqp.channel.queue_delete(full)

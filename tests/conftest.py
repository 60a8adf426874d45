"""Shared fixtures: the real RabbitMQ, per-test names, apps that clean up after themselves."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import anyio
import pytest

from cuebx import Cuebx
from cuebx.brokers.base import Broker, Delivery
from cuebx.message import OutgoingMessage
from cuebx.testing import take

RABBITMQ_URL = os.environ.get("CUEBX_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """The broker URL; fails (never skips) with one line when RabbitMQ does not answer."""
    parts = urlsplit(RABBITMQ_URL)
    try:
        socket.create_connection((parts.hostname, parts.port or 5672), timeout=3).close()
    except OSError as exc:
        pytest.fail(
            f"RabbitMQ does not answer at {parts.hostname}:{parts.port or 5672} ({exc}): start it "
            "with `rabbitmq-server -detached` or set CUEBX_BROKER_URL",
            pytrace=False,
        )
    return RABBITMQ_URL


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A unique queue-name prefix for this test: ``t.<test name>.<random>``."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:40].strip("-")
    made = f"t.{name}.{uuid.uuid4().hex[:6]}"
    _SESSION_PREFIXES.add(made)
    return made


#: Every prefix this session handed out: what the end-of-session sweep may delete.
_SESSION_PREFIXES: set[str] = set()


AppFactory = Callable[..., Cuebx]

MEMORY_URL = "memory://?clock=real"  # TTLs expire in real time, as on RabbitMQ


@pytest.fixture(params=["rabbitmq", "memory"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """The behaviour suite runs every test on RabbitMQ and on the in-memory broker."""
    if request.param == "memory":
        return MEMORY_URL
    url: str = request.getfixturevalue("rabbitmq_url")
    return url


class AppMaker:
    """Makes apps for one test and remembers them, to clean up and to probe their broker."""

    def __init__(self, url: str, request: pytest.FixtureRequest) -> None:
        self.url = url
        self.request = request
        self.apps: list[Cuebx] = []

    def __call__(self, **options: Any) -> Cuebx:
        options.setdefault("connection_name", self.request.node.nodeid)
        # The test's own exchange: what the app declares later (a delay ladder, a scheduler,
        # events, limits) is named after it, so nothing is shared with other tests.
        options.setdefault("exchange", self.request.getfixturevalue("prefix"))
        url = options.pop("url", self.url)
        if self.apps and url.startswith("memory:"):
            # One in-memory broker per test, shared like one RabbitMQ server would be.
            options.setdefault("broker", self.apps[0].broker)
        app = Cuebx(url, **options)
        self.apps.append(app)
        return app

    async def cleanup(self) -> None:
        for app in reversed(self.apps):
            try:
                await app.broker.connect()
                await app.broker.delete(app.topology())
            finally:
                await app.close()


async def _factory(url: str, request: pytest.FixtureRequest) -> AsyncIterator[AppMaker]:
    maker = AppMaker(url, request)
    try:
        yield maker
    finally:
        await maker.cleanup()


@pytest.fixture
async def make_app(broker_url: str, request: pytest.FixtureRequest) -> AsyncIterator[AppMaker]:
    """Build apps on the test's broker; afterwards delete exactly the queues they planned."""
    async for factory in _factory(broker_url, request):
        yield factory


@pytest.fixture
async def make_rabbit_app(
    rabbitmq_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[AppMaker]:
    """Like `make_app`, for facts only RabbitMQ can show."""
    async for factory in _factory(rabbitmq_url, request):
        yield factory


@pytest.fixture
def probe(make_app: AppMaker) -> Probe:
    """Look into the queues of the test's apps through their own broker."""
    return Probe(make_app)


class Probe:
    """Look into queues through the app's own broker, on either broker."""

    def __init__(self, maker: AppMaker) -> None:
        self.maker = maker

    @property
    def app(self) -> Cuebx:
        return self.maker.apps[0]

    async def _broker(self) -> Broker:
        await self.app.broker.connect()  # idempotent; the test may have closed its app
        return self.app.broker

    async def take(self, queue: str, *, timeout: float = 5.0) -> Delivery:
        await self._broker()
        return await take(self.app, queue, timeout=timeout)

    async def count(self, queue: str) -> int:
        return await (await self._broker()).queue_length(queue)

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None = None,
        content_type: str | None = "application/json",
        message_id: str = "",
    ) -> None:
        """Publish as a plain, non-cuebx publisher would: straight to the queue."""
        await (await self._broker()).publish(
            "",
            queue,
            OutgoingMessage(
                body=body,
                message_id=message_id,
                correlation_id="",
                content_type=content_type,
                headers=headers or {},
                timestamp=datetime.now(UTC),
            ),
        )


@pytest.fixture
async def amqp(rabbitmq_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Raw]:
    """A bare aio-pika connection, to publish and read raw messages as other systems would."""
    connection = await aio_pika.connect(
        rabbitmq_url, client_properties={"connection_name": f"raw {request.node.nodeid}"}
    )
    try:
        channel = await connection.channel()
        yield Raw(channel)
    finally:
        await connection.close()


class Raw:
    """Plain AMQP operations for tests."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel) -> None:
        self.channel = channel

    async def get(
        self, queue: str, *, timeout: float = 5.0
    ) -> aio_pika.abc.AbstractIncomingMessage:
        """Take one message off `queue` (basic.get, acked), waiting up to `timeout`."""
        q = await self.channel.get_queue(queue, ensure=False)
        with anyio.fail_after(timeout):
            while True:
                message = await q.get(no_ack=True, fail=False)
                if message is not None:
                    return message
                await anyio.sleep(0.02)

    async def drain(self, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take every message that is ready in `queue` now."""
        q = await self.channel.get_queue(queue, ensure=False)
        out = []
        while (message := await q.get(no_ack=True, fail=False)) is not None:
            out.append(message)
        return out

    async def count(self, queue: str) -> int:
        q = await self.channel.declare_queue(queue, passive=True)
        return int(q.declaration_result.message_count or 0)

    async def publish(self, queue: str, body: bytes, **properties: Any) -> None:
        """Publish through the default exchange straight to `queue`."""
        await self.channel.default_exchange.publish(
            aio_pika.Message(body, **properties), routing_key=queue
        )


def broker_queues(prefix: str) -> dict[str, dict[str, Any]]:
    """Queues the broker reports (rabbitmqctl), name -> arguments, for names under `prefix`."""
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--formatter", "json", "name", "arguments", "durable"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    rows = json.loads(out or "[]")
    found = {}
    for row in rows:
        if row["name"].startswith(prefix):
            assert row["durable"] is True, f"queue {row['name']} is not durable"
            found[row["name"]] = _arguments(row["arguments"])
    return found


def _arguments(raw: Any) -> dict[str, Any]:
    # rabbitmqctl prints arguments as a list of [name, type, value] or as a mapping.
    if isinstance(raw, dict):
        return raw
    return {item[0]: item[-1] for item in raw}


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], *, timeout: float = 10.0, what: str = ""
) -> None:
    """Wait until `condition()` is true, failing after `timeout` seconds."""
    try:
        with anyio.fail_after(timeout):
            while True:
                result = condition()
                if not isinstance(result, bool):
                    result = await result
                if result:
                    return
                await anyio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that talks to RabbitMQ ``rabbitmq``: ``-m "not rabbitmq"`` runs the rest.

    A test needs RabbitMQ when its fixture closure holds `rabbitmq_url` (directly or through
    `make_rabbit_app`, `amqp`, ...), or when it is the RabbitMQ case of the `broker_url`
    suite, which asks for `rabbitmq_url` only at run time. Tests that need the broker some
    other way (a subprocess given its URL without the fixture) carry the mark themselves.
    """
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_rabbitmq = callspec is not None and callspec.params.get("broker_url") == "rabbitmq"
        if on_rabbitmq or "rabbitmq_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.rabbitmq)


def _broker_names(kind: str) -> set[str] | None:
    """Queue or exchange names on the local RabbitMQ (rabbitmqctl), or None if it cannot say."""
    try:
        out = subprocess.run(
            ["rabbitmqctl", f"list_{kind}", "-q", "name"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {line.strip() for line in out.splitlines() if line.strip()}


def _ours(name: str) -> bool:
    # Names under a prefix this session handed out (see `prefix`): never another suite's
    # running on the same broker at the same time.
    return any(name == p or name.startswith(f"{p}.") for p in _SESSION_PREFIXES)


@pytest.fixture(scope="session", autouse=True)
def _remove_what_tests_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the session, delete the queues and exchanges tests made and did not delete.

    Each test cleans up its queues; this is the net under that for what an app declares on
    first use (a delay ladder, scheduler queues, event and limit objects, all named after
    the test's exchange), for exchanges, and for what a subprocess or a test that failed
    half-way left. Only names that did not exist before the session and start with a prefix
    this session handed out are touched: a developer's own queues, and those of another test
    run on the same broker, are safe.
    """
    if not any(item.get_closest_marker("rabbitmq") for item in request.session.items):
        yield  # a run without RabbitMQ: nothing to look at
        return
    before = {kind: _broker_names(kind) for kind in ("queues", "exchanges")}
    yield
    if before["queues"] is None or before["exchanges"] is None:
        return
    after = {kind: _broker_names(kind) or set() for kind in ("queues", "exchanges")}
    queues = {n for n in after["queues"] - before["queues"] if _ours(n)}
    exchanges = {n for n in after["exchanges"] - before["exchanges"] if _ours(n)}
    if queues or exchanges:
        try:
            anyio.run(_delete_names, queues, exchanges)
        except (OSError, aio_pika.exceptions.AMQPError):
            pass  # the broker went away: nothing to clean now


async def _delete_names(queues: set[str], exchanges: set[str]) -> None:
    connection = await aio_pika.connect(
        RABBITMQ_URL, client_properties={"connection_name": "tests: cleanup"}
    )
    try:
        for names, delete in ((queues, "queue_delete"), (exchanges, "exchange_delete")):
            for name in sorted(names):
                channel = await connection.channel()
                underlay = await channel.get_underlay_channel()
                try:
                    await getattr(underlay, delete)(name)
                except aio_pika.exceptions.AMQPError:
                    pass  # gone already, or in use by a test node: nothing to clean
                if not channel.is_closed:
                    await channel.close()
    finally:
        await connection.close()

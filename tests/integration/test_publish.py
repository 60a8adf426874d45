"""Publishing on the real broker: the message as it lies in the queue, confirms, returns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import msgspec
import pytest

from cuebx import ArgumentsError, TaskContext, UnroutableError
from tests.conftest import AppFactory, Probe

pytestmark = pytest.mark.anyio


async def test_delay_publishes_the_arguments_by_name_with_the_documented_properties(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    app = make_app(max_priority=5)
    queue = f"{prefix}.emails"

    @app.task(queue=queue, retries=["30s"], priority=3)
    async def send_welcome(ctx: TaskContext, email: str, name: str = "there") -> None: ...

    before = datetime.now(UTC) - timedelta(seconds=2)
    handle = await send_welcome.delay("a@example.com", name="Ann")
    message = await probe.take(queue)

    assert msgspec.json.decode(message.body) == {"email": "a@example.com", "name": "Ann"}
    assert message.content_type == "application/json"
    assert message.message_id == handle.id
    assert message.correlation_id == handle.id
    assert message.priority == 3
    assert message.timestamp is not None
    assert message.timestamp >= before.replace(microsecond=0)
    assert message.headers == {"x-cuebx-task": "send_welcome", "x-retry-attempt": 0}


async def test_apply_async_sets_priority_headers_and_correlation_id(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    app = make_app(max_priority=9)
    queue = f"{prefix}.q"

    @app.task(queue=queue)
    async def work(n: int) -> None: ...

    handle = await work.apply_async(
        args=(1,), priority=7, headers={"tenant": "acme"}, correlation_id="req-42"
    )
    message = await probe.take(queue)

    assert handle.correlation_id == "req-42"
    assert message.correlation_id == "req-42"
    assert message.priority == 7
    assert message.headers["tenant"] == "acme"
    assert message.headers["x-cuebx-task"] == "work"


async def test_msgpack_serializer_publishes_msgpack_and_the_worker_reads_it(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    app = make_app(serializer="msgpack")
    queue = f"{prefix}.q"
    got: list[tuple[str, list[int]]] = []

    @app.task(queue=queue)
    async def store(key: str, values: list[int]) -> None:
        got.append((key, values))

    await store.delay("k", [1, 2, 3])
    raw = await probe.take(queue)
    assert raw.content_type == "application/msgpack"
    assert msgspec.msgpack.decode(raw.body) == {"key": "k", "values": [1, 2, 3]}

    await store.delay("k2", [4])
    worker = await app.start_consumers()
    with anyio.fail_after(10):
        while not got:
            await anyio.sleep(0.01)
    await worker.stop()
    assert got == [("k2", [4])]


async def test_invalid_arguments_raise_before_anything_is_published(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    app = make_app()
    queue = f"{prefix}.q"

    @app.task(queue=queue)
    async def charge(amount: int, currency: str = "EUR") -> None: ...

    await app.connect()
    with pytest.raises(ArgumentsError, match="charge"):
        await charge.delay("ten")  # type: ignore[arg-type]
    with pytest.raises(ArgumentsError, match="charge"):
        await charge.apply_async(kwargs={"currency": "USD"})
    assert await probe.count(queue) == 0


async def test_a_publish_nobody_can_receive_raises_instead_of_vanishing(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    app = make_app()
    queue = f"{prefix}.q"

    @app.task(queue=queue)
    async def work() -> None: ...

    await app.connect()
    await app.broker.delete(app.topology())
    with pytest.raises(UnroutableError, match=queue):
        await work.delay()


async def test_a_message_over_max_message_size_is_refused_before_it_is_published(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    app = make_app(max_message_size=100)
    queue = f"{prefix}.big"

    @app.task(queue=queue)
    async def upload(data: str) -> None: ...

    await app.connect()
    with pytest.raises(ArgumentsError, match=r"task 'upload': the encoded arguments are 211 bytes"):
        await upload.delay("x" * 200)
    await upload.delay("x" * 80)
    assert await probe.count(queue) == 1

"""The testing kit users test their own tasks with: cuebx.testing and the pytest plugin."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import pytest

from cuebx import Cuebx, Reject, TaskContext, Worker
from cuebx.brokers.memory import MemoryBroker
from cuebx.testing import dead_letters, drain, messages, running, settle, use_memory_broker
from tests.conftest import AppFactory

pytestmark = pytest.mark.anyio


async def test_drain_follows_an_hours_long_retry_ladder_in_milliseconds_on_memory(
    cuebx_memory: Callable[[Cuebx], MemoryBroker],
    cuebx_worker: Callable[..., Awaitable[Worker]],
) -> None:
    app = Cuebx("amqp://guest:guest@127.0.0.1:1/")  # never contacted: the test uses memory
    attempts: list[int] = []

    @app.task(queue="emails", retries=["1h", "1d"])
    async def send(ctx: TaskContext, email: str) -> None:
        attempts.append(ctx.attempt)
        raise ConnectionError("smtp down")

    broker = cuebx_memory(app)
    await cuebx_worker(app)
    started = time.monotonic()
    await send.delay("ann@example.com")
    await drain(app)

    assert time.monotonic() - started < 2
    assert attempts == [0, 1, 2]
    assert broker.clock.now() >= 3600 + 86400
    [dead] = await dead_letters(app, "emails")
    assert dead.reason == "exhausted"
    assert dead.error_type == "builtins.ConnectionError"
    assert dead.arguments == {"email": "ann@example.com"}
    assert dead.attempt == 2
    assert dead.task == "send"


async def test_drain_and_dead_letters_work_the_same_on_both_brokers(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app()
    queue = f"{prefix}.kit"
    handled: list[int] = []

    @app.task(queue=queue, retries=["100ms"])
    async def work(n: int) -> None:
        if n < 0:
            raise Reject("negative")
        if n == 0:
            raise ValueError("zero")
        handled.append(n)

    async with running(app):
        for n in (1, 0, -1, 2):
            await work.delay(n)
        await drain(app)
        assert sorted(handled) == [1, 2]
        dead = await dead_letters(app, queue)
    assert sorted((d.arguments["n"], d.reason) for d in dead) == [
        (-1, "rejected"),
        (0, "exhausted"),
    ]
    assert await messages(app, queue) == []


async def test_drain_without_running_consumers_says_how_to_start_them(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app()

    @app.task(queue=f"{prefix}.q")
    async def work() -> None: ...

    with pytest.raises(RuntimeError, match=r"cuebx\.testing\.running"):
        await drain(app)


async def test_dead_letters_of_a_queue_without_one_is_a_clear_error(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app()

    @app.task(queue=f"{prefix}.q", dead_letter=False)
    async def work() -> None: ...

    with pytest.raises(LookupError, match="no dead-letter queue"):
        await dead_letters(app, f"{prefix}.q")


async def test_settle_runs_what_is_ready_and_leaves_a_manual_clock_to_the_test() -> None:
    app = Cuebx("amqp://guest:guest@127.0.0.1:1/")  # never contacted: the test uses memory
    attempts: list[int] = []

    @app.task(queue="signups", retries=["30s"])
    async def send_welcome(ctx: TaskContext, email: str) -> None:
        attempts.append(ctx.attempt)
        raise ConnectionError("smtp down")

    # The default clock would jump to the tier's expiry by itself: this test moves it.
    with use_memory_broker(app, clock="manual") as broker:
        async with running(app):
            await send_welcome.delay("ann@example.com")
            await settle(app)  # the first attempt failed; its copy waits in the tier
            assert attempts == [0]
            assert len(broker.messages("signups.retry.30s")) == 1
            await broker.clock.advance(29)
            assert len(broker.messages("signups.retry.30s")) == 1
            await broker.clock.advance(1)
            await settle(app)
            assert attempts == [0, 1]
            [dead] = await dead_letters(app, "signups")
            assert dead.reason == "exhausted"


async def test_the_memory_fixture_takes_a_clock_mode(
    cuebx_memory: Callable[..., MemoryBroker],
) -> None:
    app = Cuebx("amqp://guest:guest@nowhere.invalid:5672/")
    broker = cuebx_memory(app, clock="manual")
    assert broker.clock.mode == "manual"
    assert app.broker is broker

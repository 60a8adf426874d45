"""memory://'s clock runs on its own: retries happen without drain() or moving time by hand."""

from __future__ import annotations

import time

import anyio
import pytest

from cuebx import Cuebx, TaskContext
from cuebx.brokers.memory import MemoryBroker
from cuebx.testing import dead_letters, drain, running, settle

pytestmark = pytest.mark.anyio


async def test_a_failing_task_reaches_the_dead_letter_queue_in_four_attempts_on_its_own() -> None:
    app = Cuebx("memory://")
    attempts: list[int] = []

    @app.task(queue="emails", retries=["30s", "5m", "1h"])
    async def send(ctx: TaskContext, email: str) -> None:
        attempts.append(ctx.attempt)
        raise ConnectionError("smtp down")

    started, broker_started = time.monotonic(), app.broker.clock.time()
    await app.start_consumers()
    try:
        await send.delay("ann@example.com")
        with anyio.fail_after(5):
            while await app.broker.queue_length("emails.dlq") == 0:
                await anyio.sleep(0.001)
        wall = time.monotonic() - started
        [dead] = await app.broker.peek("emails.dlq")
    finally:
        await app.close()

    assert attempts == [0, 1, 2, 3]
    assert wall < 1
    assert app.broker.clock.time() - broker_started == pytest.approx(30 + 300 + 3600, abs=1)
    assert dead.headers["x-cuebx-reason"] == "exhausted"


async def test_a_manual_clock_keeps_a_retry_in_its_tier_until_the_test_moves_it() -> None:
    app = Cuebx("memory://?clock=manual")
    attempts: list[int] = []

    @app.task(queue="signups", retries=["30s"])
    async def welcome(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt)
        raise ConnectionError("smtp down")

    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    async with running(app):
        await welcome.delay()
        await settle(app)
        with anyio.fail_after(1):
            await anyio.wait_all_tasks_blocked()
        assert (attempts, len(broker.messages("signups.retry.30s"))) == ([0], 1)

        await broker.clock.advance(30)
        await settle(app)

        assert attempts == [0, 1]


@pytest.mark.parametrize("clock", ["auto", "manual", "real"])
async def test_drain_follows_the_retry_tiers_in_every_clock_mode(clock: str) -> None:
    app = Cuebx(f"memory://?clock={clock}")
    attempts: list[int] = []

    @app.task(queue="jobs", retries=["20ms", "50ms"])
    async def job(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt)
        raise ValueError("no")

    async with running(app):
        await job.delay()
        await drain(app)
        [dead] = await dead_letters(app, "jobs")

    assert attempts == [0, 1, 2]
    assert dead.reason == "exhausted"

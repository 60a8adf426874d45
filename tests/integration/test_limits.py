"""Rate limits and concurrency across workers, on RabbitMQ and on ``memory://``.

On memory the rate-limit test runs on the ``auto`` clock, which jumps over the permits' and
the delay ladder's TTLs, so it takes no wall time; on RabbitMQ it takes the ten seconds that
fifty starts at five a second need. Times are read from the broker's clock.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from cuebx import Cuebx, TaskContext, TopologyConflictError
from cuebx.brokers.memory import MemoryBroker
from cuebx.message import OutgoingMessage
from cuebx.ops.diff import diff_topology, migration
from cuebx.testing import settle
from cuebx.topology import ExchangeSpec, Topology
from tests.conftest import AppFactory, wait_for

pytestmark = pytest.mark.anyio

LimitApp = Callable[..., Cuebx]


@pytest.fixture
async def limit_app(make_app: AppFactory, broker_url: str, prefix: str) -> AsyncIterator[LimitApp]:
    """Apps on the test's own exchange, with a small delay ladder; on memory, an auto
    clock. The ladder and the exchange are deleted afterwards (`make_app` deletes the
    queues, limiters included)."""
    made: list[Cuebx] = []

    def build(**options: Any) -> Cuebx:
        options.setdefault("exchange", f"{prefix}.x")
        options.setdefault("delay_levels", 8)  # 25.5 s at 100 ms: more than a hold-back
        if broker_url.startswith("memory"):
            options.setdefault("url", "memory://")
        app = make_app(**options)
        made.append(app)
        return app

    yield build
    if made:
        app = made[0]
        await app.broker.connect()
        ladder = app.delays.topology()
        main = ExchangeSpec(app.settings.exchange)
        await app.broker.delete(Topology(ladder.exchange, ladder.queues, (*ladder.exchanges, main)))


def most_in_a_window(times: Sequence[float], window: float) -> int:
    """The most starts in any window of `window` seconds (each window opens at a start)."""
    ordered = sorted(times)
    return max(
        sum(1 for later in ordered[i:] if later < start + window) for i, start in enumerate(ordered)
    )


async def test_a_rate_limit_holds_in_every_window_across_two_workers_and_spends_no_retry(
    limit_app: LimitApp, prefix: str
) -> None:
    apps = [limit_app(), limit_app()]
    runs: list[tuple[int, int, float]] = []
    queue = f"{prefix}.stripe"

    def register(app: Cuebx) -> Any:
        clock = app.broker.clock

        @app.task(queue=queue, name="charge", rate_limit="5/s")
        async def charge(ctx: TaskContext, n: int) -> None:
            runs.append((n, ctx.attempt, clock.time()))

        return charge

    tasks = [register(app) for app in apps]
    for app in apps:
        await app.start_consumers()
    await tasks[0].map([(n,) for n in range(50)])
    await wait_for(lambda: len(runs) >= 50, timeout=40, what="fifty rate-limited runs")
    for app in apps:
        await settle(app)  # nothing left to run twice

    assert sorted(n for n, _, _ in runs) == list(range(50))
    assert {attempt for _, attempt, _ in runs} == {0}  # a denial spends no attempt
    exact = isinstance(apps[0].broker, MemoryBroker)
    times = [at for _, _, at in runs]
    assert most_in_a_window(times, 1.0) <= (5 if exact else 6)
    assert max(times) - min(times) >= 9.0 - (0 if exact else 0.2)  # fifty at five a second
    denied = sum(app.limits.counts["charge"].denied for app in apps if app.limits)
    assert denied > 0


async def test_a_shared_limiter_limits_several_tasks_together(
    limit_app: LimitApp, prefix: str
) -> None:
    app = limit_app()
    stripe = app.limiter("stripe", "2/s")
    clock = app.broker.clock
    starts: list[float] = []

    @app.task(queue=f"{prefix}.charges", rate_limit=stripe)
    async def charge() -> None:
        starts.append(clock.time())

    @app.task(queue=f"{prefix}.refunds", rate_limit="stripe")
    async def refund() -> None:
        starts.append(clock.time())

    await app.start_consumers()
    for _ in range(3):
        await charge.delay()
        await refund.delay()
    await wait_for(lambda: len(starts) == 6, timeout=20, what="six starts")
    assert most_in_a_window(starts, 1.0) <= (2 if isinstance(app.broker, MemoryBroker) else 3)
    assert app.topology().queue(f"{prefix}.x.limit.stripe").role == "limit"


async def test_concurrency_never_exceeds_its_limit_across_three_workers(
    limit_app: LimitApp, prefix: str
) -> None:
    apps = [limit_app() for _ in range(3)]
    running: list[int] = [0]
    peak: list[int] = [0]
    ran_by: list[int] = []
    queue = f"{prefix}.exports"

    def register(app: Cuebx, index: int) -> Any:
        @app.task(queue=queue, name="export", concurrency=2)
        async def export(n: int) -> None:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            ran_by.append(index)
            await anyio.sleep(0.05)
            running[0] -= 1

        return export

    tasks = [register(app, index) for index, app in enumerate(apps)]
    workers = [await app.start_consumers(prefetch=50) for app in apps]
    await tasks[0].map([(n,) for n in range(8)])
    await wait_for(lambda: len(ran_by) == 8, what="eight exports")
    assert peak[0] == 2
    assert set(ran_by) == {0}  # one active consumer: the first worker's

    await workers[0].stop()  # the next consumer takes over
    await tasks[1].map([(n,) for n in range(4)])
    await wait_for(lambda: len(ran_by) == 12, what="four more, on another worker")
    assert peak[0] == 2
    [taker] = set(ran_by[8:])
    assert taker in (1, 2)


# -- RabbitMQ only ----------------------------------------------------------------------------


async def test_a_full_limiter_nacks_permits_without_disturbing_task_publishes(
    make_rabbit_app: AppFactory, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_rabbit_app(exchange=f"{prefix}.x")
    limiter = app.limiter("api", "3/1m")

    @app.task(queue=f"{prefix}.q", rate_limit="api")
    async def call() -> None: ...

    await app.connect()
    broker = app.broker
    answers: list[bool] = []

    async def ask() -> None:
        for _ in range(20):
            permit = OutgoingMessage(b"", "p", "p", None, {}, datetime.now(UTC))
            answers.append(await broker.offer(limiter.queue, permit))

    with caplog.at_level(logging.INFO, logger="cuebx.amqp"):
        async with anyio.create_task_group() as group:
            group.start_soon(ask)
            handles = await call.map([() for _ in range(300)], window=64)  # raises if any failed
    assert len(handles) == 300
    assert "nacked" not in caplog.text  # the publisher channel never took a permit's nack
    assert answers == [True] * 3 + [False] * 17
    assert await broker.queue_length(limiter.queue) == 3


async def test_a_queue_that_gains_concurrency_or_a_limiter_another_rate_is_a_clear_conflict(
    make_rabbit_app: AppFactory, prefix: str
) -> None:
    queue = f"{prefix}.reports"
    before = make_rabbit_app(exchange=f"{prefix}.x")
    before.limiter("pdf", "10/s")

    @before.task(queue=queue, rate_limit="pdf")
    async def render() -> None: ...

    await before.connect()
    await render.delay()

    after = make_rabbit_app(exchange=f"{prefix}.x")
    after.limiter("pdf", "20/s")

    @after.task(queue=queue, concurrency=4, rate_limit="pdf")
    async def render_again() -> None: ...

    with pytest.raises(TopologyConflictError, match=r"x-max-length.*20.*10"):
        await after.connect()
    found = await diff_topology(after.broker, after.topology())
    [main] = [q for q in found.queues if q.name == queue]
    assert [(d.argument, d.wanted, d.current) for d in main.differences] == [
        ("x-single-active-consumer", True, None)
    ]
    assert any("shovel" in step for step in migration(main))  # it holds a message
    [limit] = [q for q in found.queues if q.role == "limit"]
    assert [d.argument for d in limit.differences] == ["x-max-length"]
    assert any("only permits" in step for step in migration(limit))


def test_the_rate_limits_example_never_starts_more_than_its_limits_in_a_second() -> None:
    examples = Path(__file__).parents[2] / "examples"
    result = subprocess.run(
        [sys.executable, "rate_limits.py"], cwd=examples, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    seconds = [
        [int(n) for n in re.findall(r"\d+", line)[1:]] for line in result.stdout.splitlines()
    ]
    assert len(seconds) == 4
    for stripe, charges, refunds, geocodes in seconds:
        assert stripe == charges + refunds <= 5
        assert geocodes <= 2
    assert [sum(column) for column in zip(*seconds, strict=True)][1:] == [12, 3, 4]

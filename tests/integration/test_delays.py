"""Delayed delivery end to end, on RabbitMQ (classic and quorum) and on ``memory://``.

Every test gets an exchange of its own, so a ladder of its own, deleted afterwards. On
memory the broker's clock jumps over TTLs (or is moved by the test), so these run in no
wall time there; on RabbitMQ they wait real time, with a 50 ms unit to keep that short.
Times are read from the broker's clock (`Broker.clock`), the one the ladder runs on.
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from cuebx import (
    Cuebx,
    Middleware,
    Outcome,
    Postpone,
    Publish,
    PublishError,
    Received,
    Retry,
    TaskContext,
    TopologyConflictError,
)
from cuebx.brokers.memory import MemoryBroker
from cuebx.delays import ladder_status
from cuebx.message import HEADER_DELAY_TO, HEADER_ETA
from cuebx.policy import DELAYED_RETRY_LIMIT
from cuebx.testing import dead_letters, drain, running
from cuebx.topology import ExchangeSpec, Topology
from tests.conftest import AppFactory, Probe, wait_for

pytestmark = pytest.mark.anyio

UNIT = 0.05  # seconds: the tests' delay_unit


def slack(app: Cuebx) -> float:
    """How late a task may start past one unit: none in memory, whose clock is exact; on
    RabbitMQ, a few TTL hops and the worker on a machine other test runs share. Lateness
    itself is measured by benchmarks/delays.py; this catches gross errors (a message held,
    or sent round the ladder twice)."""
    return 0.0 if isinstance(app.broker, MemoryBroker) else 1.0


#: Epoch seconds as floats are exact to about a quarter of a microsecond: "no earlier than
#: due" is checked to the microsecond.
EPS = 1e-6
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

DelayApp = Callable[..., Cuebx]


@pytest.fixture(params=["classic", "quorum"])
def queue_type(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def delay_app(
    make_app: AppFactory, broker_url: str, prefix: str, queue_type: str
) -> AsyncIterator[DelayApp]:
    """Build apps on an exchange of the test's own; delete its ladder and exchange after.

    On memory the clock is ``auto`` (it jumps over TTLs), or ``manual`` with
    ``clock="manual"``, where the test moves it with `pass_time`.
    """
    made: list[Cuebx] = []

    def build(*, clock: str = "auto", **options: Any) -> Cuebx:
        options.setdefault("exchange", f"{prefix}.x")
        options.setdefault("queue_type", queue_type)
        options.setdefault("delay_unit", f"{UNIT}s")
        options.setdefault("delay_levels", 12)  # 2^12 - 1 units: more than three minutes
        if broker_url.startswith("memory"):
            options.setdefault("url", f"memory://?clock={clock}")
        app = make_app(**options)
        made.append(app)
        return app

    yield build
    failed: list[BaseException] = []
    for app in made:  # each app's ladder, even when deleting another's failed
        try:
            broker = app.broker
            await broker.connect()
            ladder = app.delays.topology()
            main = ExchangeSpec(app.settings.exchange)
            await broker.delete(Topology(ladder.exchange, ladder.queues, (*ladder.exchanges, main)))
        except Exception as exc:
            failed.append(exc)
    if failed:
        raise failed[0]


async def pass_time(app: Cuebx, until: float) -> None:
    """Let the broker's clock reach `until`: a manual memory clock is moved, others waited on."""
    clock = app.broker.clock
    if isinstance(app.broker, MemoryBroker) and app.broker.clock.mode == "manual":
        await app.broker.clock.advance(max(0.0, until - clock.time()))
    else:
        await clock.sleep_until(until)


async def test_countdown_and_eta_start_no_earlier_than_due_and_within_a_unit_after(
    delay_app: DelayApp, prefix: str
) -> None:
    app = delay_app()
    queue = f"{prefix}.reminders"
    clock = app.broker.clock
    started: dict[str, tuple[float, TaskContext]] = {}

    @app.task(queue=queue)
    async def remind(ctx: TaskContext, user: str) -> None:
        started[user] = (clock.time(), ctx)

    async with running(app):
        before = clock.time()
        ann = await remind.apply_async(
            args=("ann",), countdown=0.6, headers={"traceparent": TRACE, "tracestate": "v=1"}
        )
        after = clock.time()
        eta = datetime.fromtimestamp(clock.time() + 0.8, UTC)
        bob = await remind.apply_async(kwargs={"user": "bob"}, eta=eta)
        await drain(app, timeout=15)

    at, ctx = started["ann"]
    assert ctx.headers[HEADER_ETA] >= int((before + 0.6) * 1000)
    assert at >= ctx.headers[HEADER_ETA] / 1000 - EPS  # never early
    assert at >= before + 0.6 - EPS
    assert at <= after + 0.6 + UNIT + slack(app)
    # The message kept its id, attempt and trace headers through every hop.
    assert (ctx.message_id, ctx.attempt, ctx.task_name) == (ann.id, 0, "remind")
    assert (ctx.headers["traceparent"], ctx.headers["tracestate"]) == (TRACE, "v=1")
    assert ctx.headers[HEADER_DELAY_TO] == queue

    at, ctx = started["bob"]
    assert eta.timestamp() - EPS <= at <= eta.timestamp() + UNIT + slack(app)
    assert ctx.message_id == bob.id


async def test_a_hundred_random_delays_start_in_the_order_they_are_due(
    delay_app: DelayApp, prefix: str
) -> None:
    app = delay_app()
    queue = f"{prefix}.ticks"
    clock = app.broker.clock
    rng = random.Random(20261201)
    starts: list[tuple[int, float]] = []

    @app.task(queue=queue, prefetch=1)  # one at a time: the start order is the arrival order
    async def tick(n: int) -> None:
        starts.append((n, clock.time()))

    due: dict[int, float] = {}
    async with running(app):
        for n in range(100):
            countdown = rng.uniform(0.05, 1.5)
            before = clock.time()
            await tick.apply_async(args=(n,), countdown=countdown)
            due[n] = before + countdown
        await wait_for(lambda: len(starts) == 100, timeout=20, what="100 delayed ticks")

    lateness = sorted(at - due[n] for n, at in starts)
    assert lateness[0] >= -EPS, "a tick started before it was due"
    assert lateness[-1] <= UNIT + slack(app), f"lateness (s): {lateness[-5:]}"
    # Nothing started after a tick due more than a unit (and the slack) later than it.
    latest_due_so_far = 0.0
    for n, _ in starts:
        assert due[n] >= latest_due_so_far - UNIT - slack(app)
        latest_due_so_far = max(latest_due_so_far, due[n])
    assert sorted(n for n, _ in starts) == list(range(100))


async def test_a_delayed_message_waits_on_the_broker_and_a_worker_started_later_runs_it_once(
    delay_app: DelayApp, prefix: str, probe: Probe
) -> None:
    app = delay_app(clock="manual")
    queue = f"{prefix}.later"
    runs: list[int] = []

    @app.task(queue=queue)
    async def remind(n: int) -> None:
        runs.append(n)

    worker = await app.start_consumers()
    before = app.broker.clock.time()
    await remind.apply_async(args=(1,), countdown=0.8)

    status = await ladder_status(app)
    assert status.waiting == 1
    [level] = [level for level in status.levels if level.messages]
    assert level.head_destination == queue
    assert level.head_eta is not None
    assert level.head_eta.timestamp() >= before + 0.8 - 0.001
    assert worker.idle
    assert await probe.count(queue) == 0

    await worker.stop()  # stopped during the delay
    await pass_time(app, before + 0.8 + UNIT)

    async def left_the_ladder() -> bool:
        return await probe.count(queue) == 1

    await wait_for(left_the_ladder, what="the message in its queue, due and unconsumed")
    assert runs == []
    worker = await app.start_consumers()
    await wait_for(lambda: runs == [1], what="the new worker to run it")
    await worker.stop()
    assert runs == [1]
    assert await probe.count(queue) == 0
    assert (await ladder_status(app)).waiting == 0


async def test_retry_with_a_delay_counts_attempts_and_ends_in_the_dead_letter_queue(
    delay_app: DelayApp, prefix: str
) -> None:
    app = delay_app()
    clock = app.broker.clock
    listed, unlisted = f"{prefix}.listed", f"{prefix}.unlisted"
    attempts: list[tuple[int, float]] = []
    polls: list[int] = []

    @app.task(queue=listed, retries=["1m", "1m"])  # two retries; their tier is not used here
    async def sync(ctx: TaskContext) -> None:
        attempts.append((ctx.attempt, clock.time()))
        raise Retry("busy", delay="200ms")

    @app.task(queue=unlisted)  # no list: DELAYED_RETRY_LIMIT retries
    async def poll(ctx: TaskContext) -> None:
        polls.append(ctx.attempt)
        raise Retry("not ready", delay=UNIT)

    async with running(app):
        await sync.delay()
        await poll.delay()

        async def both_dead() -> bool:
            found = [await dead_letters(app, q) for q in (listed, unlisted)]
            return all(found)

        await wait_for(both_dead, timeout=20, what="both tasks dead-lettered")

    assert [attempt for attempt, _ in attempts] == [0, 1, 2]
    assert all(b - a >= 0.2 - EPS for (_, a), (_, b) in itertools.pairwise(attempts))
    [dead] = await dead_letters(app, listed)
    assert (dead.reason, dead.attempt, dead.error) == ("exhausted", 2, "busy")
    assert polls == list(range(DELAYED_RETRY_LIMIT + 1))
    [dead] = await dead_letters(app, unlisted)
    assert (dead.reason, dead.attempt) == ("exhausted", DELAYED_RETRY_LIMIT)
    assert HEADER_ETA not in dead.headers or dead.headers[HEADER_ETA] <= clock.time() * 1000


async def test_a_message_that_arrives_before_its_eta_is_sent_back_down_the_ladder_not_run(
    delay_app: DelayApp, prefix: str, probe: Probe
) -> None:
    app = delay_app()
    queue = f"{prefix}.skewed"
    clock = app.broker.clock
    ran: list[tuple[float, TaskContext]] = []

    @app.task(queue=queue)
    async def remind(ctx: TaskContext, n: int) -> None:
        ran.append((clock.time(), ctx))

    async with running(app):
        eta = clock.time() + 0.7
        # A publisher whose clock runs ahead: the message is in the queue before its eta.
        await probe.publish(
            queue,
            b'{"n": 1}',
            headers={"x-cuebx-task": "remind", HEADER_ETA: int(eta * 1000), "x-retry-attempt": 0},
            message_id="early-1",
        )
        await wait_for(lambda: bool(ran), what="the early message, once due")
        await drain(app)

    [(at, ctx)] = ran
    assert at >= int(eta * 1000) / 1000 - EPS  # the eta in its header, in whole ms
    assert (ctx.message_id, ctx.attempt) == ("early-1", 0)
    # It went down the ladder: RabbitMQ (and memory) stamped the levels it expired from.
    assert any(d["queue"].startswith(f"{prefix}.x.delay.") for d in ctx.headers["x-death"])


async def test_a_deleted_queue_does_not_wedge_a_level_its_messages_go_to_the_unroutable_queue(
    delay_app: DelayApp, prefix: str
) -> None:
    app = delay_app()
    gone, kept = f"{prefix}.gone", f"{prefix}.kept"
    got: list[int] = []

    @app.task(queue=gone)
    async def lost(n: int) -> None: ...

    @app.task(queue=kept)
    async def found(n: int) -> None:
        got.append(n)

    await found.apply_async(args=(1,), countdown=0.3)  # the ladder is declared, gone bound
    await app.broker.delete(Topology(app.settings.exchange, (app.topology().queue(gone),)))
    await lost.apply_async(args=(2,), countdown=0.3)
    await found.apply_async(args=(3,), countdown=0.3)  # the same levels, right behind it
    worker = await app.start_consumers(queues=[kept])
    await wait_for(lambda: sorted(got) == [1, 3], what="the message behind the unroutable one")

    async def unroutable() -> bool:
        return (await ladder_status(app)).unroutable.messages == 1

    await wait_for(unroutable, what="the message for the deleted queue, kept visible")
    await worker.stop()
    [message] = await app.broker.peek(app.delays.ladder.unroutable)
    assert message.headers[HEADER_DELAY_TO] == gone
    assert (await ladder_status(app)).waiting == 0


async def test_apps_that_share_an_exchange_must_agree_on_the_ladder(
    delay_app: DelayApp, prefix: str, queue_type: str
) -> None:
    first = delay_app()
    slower = delay_app(delay_unit="100ms")
    other_type = delay_app(queue_type="classic" if queue_type == "quorum" else "quorum")

    @first.task(queue=f"{prefix}.a")
    async def a() -> None: ...

    @slower.task(queue=f"{prefix}.b")
    async def b() -> None: ...

    @other_type.task(queue=f"{prefix}.c")
    async def c() -> None: ...

    await a.apply_async(countdown=1)
    with pytest.raises(
        TopologyConflictError, match=rf"queue '{prefix}\.x\.delay\.0'.*x-message-ttl"
    ):
        await b.apply_async(countdown=1)
    with pytest.raises(TopologyConflictError, match=rf"'{prefix}\.x\.delay\.unroutable'"):
        await c.apply_async(countdown=1)


async def test_a_middleware_postpones_a_message_without_spending_an_attempt(
    delay_app: DelayApp, prefix: str
) -> None:
    outcomes: list[str | None] = []
    held: set[str] = set()

    class HoldOnce(Middleware):
        async def before_handler(self, received: Received) -> None:
            if received.context.message_id not in held:
                held.add(received.context.message_id)
                raise Postpone("300ms", "the rate limit is full")

        async def after_handler(self, received: Received, outcome: Outcome) -> None:
            outcomes.append(None if outcome.error is None else type(outcome.error).__name__)

    app = delay_app(middleware=[HoldOnce()])
    clock = app.broker.clock
    runs: list[tuple[int, float]] = []

    @app.task(queue=f"{prefix}.limited")
    async def call_api(ctx: TaskContext) -> None:
        runs.append((ctx.attempt, clock.time()))

    async with running(app):
        before = clock.time()
        await call_api.delay()
        await wait_for(lambda: bool(runs), what="the postponed message, run later")
        await drain(app)

    [(attempt, at)] = runs
    assert attempt == 0
    assert at >= before + 0.3 - EPS
    assert outcomes == ["Postpone", None]


# -- memory only: the clock that jumps ---------------------------------------------------


async def test_a_24_hour_countdown_runs_on_time_in_milliseconds_on_memory() -> None:
    app = Cuebx("memory://")
    ran: list[float] = []

    @app.task(queue="reminders")
    async def remind(n: int) -> None:
        ran.append(app.broker.clock.time())

    started = anyio.current_time()
    async with running(app):
        due = app.broker.clock.time() + 86_400
        await remind.apply_async(args=(1,), countdown="24h")
        with anyio.fail_after(2):
            while not ran:
                await anyio.lowlevel.checkpoint()
    assert due - EPS <= ran[0] <= due + 0.1
    assert anyio.current_time() - started < 2


async def test_drain_follows_delays_on_a_manual_clock() -> None:
    app = Cuebx("memory://?clock=manual")
    ran: list[int] = []

    @app.task(queue="reminders")
    async def remind(n: int) -> None:
        ran.append(n)

    async with running(app):
        await remind.apply_async(args=(1,), countdown="1h")
        await remind.apply_async(args=(2,), countdown="3d")
        await drain(app)
        assert ran == [1, 2]
        assert app.broker.clock.now() >= 3 * 86_400


def test_the_delays_example_runs_on_its_own_in_next_to_no_time() -> None:
    examples = Path(__file__).parents[2] / "examples"
    result = subprocess.run(
        [sys.executable, "delays.py"], cwd=examples, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = [line.split(" ", 2)[2] for line in result.stdout.splitlines()]
    assert lines == [
        "scheduling",
        "called https://example.com/hook on attempt 1",  # 90 s later
        "reminder for user 42: in ten minutes",
        "reminder for user 42: your trial ends tomorrow",
        "reminder for user 42: good morning",
    ]


async def test_a_ladder_deleted_under_a_running_app_is_declared_again_on_next_use() -> None:
    app = Cuebx("memory://", delay_levels=8)
    ran: list[tuple[int, int]] = []

    @app.task(queue="reminders")
    async def remind(ctx: TaskContext, n: int) -> None:
        ran.append((n, ctx.attempt))
        if n == 3 and len(ran) < 5:
            raise Retry("again", delay="1s")

    async with running(app):
        await remind.apply_async(args=(1,), countdown=1)
        await drain(app)
        await app.broker.delete(app.delays.topology())  # an operator deleted it
        # Its first level is gone: RabbitMQ returns the message, nothing is lost silently.
        with pytest.raises(PublishError, match=r"'cuebx\.delay\.3' was returned"):
            await remind.apply_async(args=(2,), countdown=1)
        await remind.apply_async(args=(2,), countdown=1)  # declared again
        await drain(app)
        await app.broker.delete(app.delays.topology())
        # The worker's Retry(delay=) cannot move the message into the deleted ladder: the
        # message is requeued, not lost, and the next Retry(delay=) declares it again.
        await remind.delay(3)
        await drain(app)
    assert ran == [(1, 0), (2, 0), (3, 0), (3, 0), (3, 1)]


async def test_a_worker_that_cannot_declare_the_ladder_requeues_the_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Cuebx("memory://", delivery_limit=3)
    other = Cuebx("memory://", delay_unit="1s", broker=app.broker)  # same exchange, other unit

    @other.task(queue="elsewhere")
    async def elsewhere() -> None: ...

    attempts: list[int] = []

    @app.task(queue="reminders")
    async def remind(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt)
        raise Retry("later", delay="1s")

    await elsewhere.apply_async(countdown=5)  # the ladder exists, with 1 s levels
    async with running(app):
        await remind.delay()
        await drain(app)
    [dead] = await dead_letters(app, "reminders")
    # Never lost: requeued each time, until the redelivery limit dead-letters it.
    assert dead.reason == "delivery-limit"
    assert attempts == [0, 0, 0]
    assert "cannot declare the delay ladder to move message" in caplog.text
    await other.close()


async def test_publish_hooks_see_the_ladder_and_their_headers_reach_the_handler() -> None:
    seen: list[tuple[str, str]] = []

    class Trace(Middleware):
        async def before_publish(self, publish: Publish) -> None:
            seen.append((publish.exchange, publish.routing_key))
            publish.headers["traceparent"] = TRACE

    app = Cuebx("memory://", delay_levels=4, middleware=[Trace()])
    got: list[str] = []

    @app.task(queue="reminders")
    async def remind(ctx: TaskContext) -> None:
        got.append(ctx.headers["traceparent"])

    async with running(app):
        await remind.apply_async(countdown=0.5)
        await drain(app)
    # Five units: straight to level 2 (then level 0) through the default exchange.
    assert seen == [("", "cuebx.delay.2")]
    assert got == [TRACE]

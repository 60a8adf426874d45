"""Rate limits and concurrency without RabbitMQ: specs, limiters, permits on memory://."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from cuebx import ConfigurationError, Cuebx, Middleware, Postpone, PublishError, TaskContext
from cuebx.brokers.memory import MemoryBroker
from cuebx.errors import UnroutableError
from cuebx.limits import Limiter, Limits, Rate, hold_back_ms, parse_rate
from cuebx.message import OutgoingMessage
from cuebx.middleware import Received
from cuebx.topology import QueueSpec, Topology


@pytest.mark.parametrize(
    ("spec", "count", "window_ms", "shown"),
    [
        ("100/s", 100, 1_000, "100/s"),
        ("10/m", 10, 60_000, "10/m"),
        ("1000/h", 1000, 3_600_000, "1000/h"),
        ("1/d", 1, 86_400_000, "1/d"),
        ("5/10s", 5, 10_000, "5/10s"),
        ("3/1m30s", 3, 90_000, "3/1m30s"),
        ("10/100ms", 10, 100, "10/100ms"),
        (" 7 / S ", 7, 1_000, "7/s"),
        ("2/1s", 2, 1_000, "2/s"),
    ],
)
def test_a_rate_is_a_count_over_a_window(spec: str, count: int, window_ms: int, shown: str) -> None:
    rate = parse_rate(spec, "task 't'")
    assert (rate.count, rate.window_ms, str(rate)) == (count, window_ms, shown)


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("100", "cannot read rate '100'"),
        ("100 per second", "cannot read rate"),
        ("0/s", "allows no start at all"),
        ("-1/s", "cannot read rate"),
        ("100/x", "cannot read duration 'x'"),
        ("100/0s", "a window of 0 ms"),
        ("1/60d", "about 49 days"),
        (100, "cannot read rate 100"),
    ],
)
def test_a_bad_rate_is_a_configuration_error_naming_where(spec: Any, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"^task 't'.*{complaint}"):
        parse_rate(spec, "task 't'")


@pytest.mark.parametrize(
    ("rate", "draw", "ms"),
    [
        (Rate(5, 1_000), 0.0, 200),  # the spacing, at least
        (Rate(5, 1_000), 0.5, 700),
        (Rate(5, 1_000), 0.999_999, 1_200),  # at most one window more
        (Rate(1000, 1_000), 0.0, 1),
        (Rate(3, 60_000), 0.25, 35_000),
    ],
)
def test_a_denied_message_waits_the_spacing_and_part_of_a_window(
    rate: Rate, draw: float, ms: int
) -> None:
    assert hold_back_ms(rate, draw) == ms


# -- limiters and the tasks that name them -------------------------------------------------


def test_a_limited_task_gets_a_limiter_queue_and_the_limits_middleware_goes_first() -> None:
    class Mine(Middleware):
        async def before_handler(self, received: Received) -> None: ...

    app = Cuebx("memory://", exchange="shop", middleware=[Mine()])

    @app.task(queue="payments", rate_limit="100/s")
    async def charge() -> None: ...

    spec = app.topology().queue("shop.limit.charge")
    assert spec == QueueSpec(
        "shop.limit.charge",
        "limit",
        {"x-max-length": 100, "x-overflow": "reject-publish", "x-message-ttl": 1000},
    )
    assert app.limits is not None
    assert app.limits.tasks == {"charge": Limiter("charge", Rate(100, 1000), spec.name)}
    assert isinstance(app.middleware.middleware[0], Limits)


def test_an_app_without_limits_installs_nothing() -> None:
    app = Cuebx("memory://")

    @app.task
    async def free() -> None: ...

    assert app.limits is None
    assert not any(isinstance(m, Limits) for m in app.middleware.middleware)


def test_tasks_sharing_a_limiter_by_name_or_object_share_its_queue() -> None:
    app = Cuebx("memory://")
    stripe = app.limiter("stripe", "100/s")
    assert app.limiter("stripe", "100/s") == stripe  # the same again is the same limiter

    @app.task(queue="a", rate_limit="stripe")
    async def charge() -> None: ...

    @app.task(queue="b", rate_limit=stripe)
    async def refund() -> None: ...

    limits = [q.name for q in app.topology().queues if q.role == "limit"]
    assert limits == ["cuebx.limit.stripe"]
    assert app.limits is not None
    assert app.limits.tasks == {"charge": stripe, "refund": stripe}


@pytest.mark.parametrize(
    ("setup", "complaint"),
    [
        (
            lambda app: app.task(rate_limit="strpe")(lambda: None),
            "rate_limit='strpe' is neither a rate such as '100/s' nor the name of a limiter "
            "of this app \\(limiters: 'stripe'\\)",
        ),
        (lambda app: app.task(rate_limit="5/fortnight")(lambda: None), "cannot read duration"),
        (lambda app: app.task(rate_limit=5)(lambda: None), "must be a rate such as"),
        (
            lambda app: app.task(rate_limit=Cuebx("memory://").limiter("x", "1/s"))(lambda: None),
            "is not a limiter of this app",
        ),
        (
            lambda app: app.task(name="stripe", rate_limit="5/s")(lambda: None),
            "would use the queue of limiter 'stripe'",
        ),
        (lambda app: app.limiter("stripe", "200/s"), "exists already with rate 100/s"),
        (lambda app: app.limiter(" x", "1/s"), "non-empty string without spaces"),
        (lambda app: app.limiter("x" * 250, "1/s"), "longer than AMQP's 255 bytes"),
    ],
)
def test_a_bad_rate_limit_is_refused_at_registration(setup: Any, complaint: str) -> None:
    app = Cuebx("memory://")
    app.limiter("stripe", "100/s")
    with pytest.raises(ConfigurationError, match=complaint):
        setup(app)
    assert set(app.tasks) == set()


# -- concurrency ---------------------------------------------------------------------------


def test_concurrency_makes_a_single_active_consumer_no_worker_prefetch_can_raise() -> None:
    app = Cuebx("memory://")

    @app.task(queue="exports", concurrency=2)
    async def export() -> None: ...

    spec = app.topology().queue("exports")
    assert spec.arguments["x-single-active-consumer"] is True
    assert (spec.prefetch, spec.concurrency) == (2, 2)
    [queue] = app.worker(prefetch=50).queues
    assert queue.prefetch == 2


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"concurrency": 2, "prefetch": 5}, "concurrency=2 is also the queue's prefetch"),
        ({"concurrency": True}, "concurrency must be an integer >= 1"),
    ],
)
def test_a_concurrency_that_contradicts_itself_is_refused(
    options: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        Cuebx("memory://").task(**options)(lambda: None)


def test_tasks_on_one_queue_must_agree_on_its_concurrency() -> None:
    app = Cuebx("memory://")

    @app.task(queue="q", concurrency=2)
    async def a() -> None: ...

    with pytest.raises(ConfigurationError, match=r"tasks on queue 'q' disagree.*concurrency"):

        @app.task(queue="q", concurrency=3)
        async def b() -> None: ...


# -- permits on memory:// ------------------------------------------------------------------


def permit() -> OutgoingMessage:
    return OutgoingMessage(b"", "p", "p", None, {}, datetime.now(UTC))


@pytest.mark.anyio
async def test_a_full_reject_publish_queue_refuses_until_its_oldest_permit_expires() -> None:
    broker = MemoryBroker("memory://", clock="manual")
    limiter = Limiter("api", Rate(2, 1000), "x.limit.api")
    await broker.connect()
    try:
        await broker.declare(Topology("x", (limiter.spec(),)))
        assert [await broker.offer(limiter.queue, permit()) for _ in range(3)] == [
            True,
            True,
            False,
        ]
        with pytest.raises(PublishError, match=r"nacked.*'x\.limit\.api' is full"):
            await broker.publish("", limiter.queue, permit())
        await broker.clock.advance(0.999)
        assert not await broker.offer(limiter.queue, permit())
        await broker.clock.advance(0.001)
        assert await broker.offer(limiter.queue, permit())
        with pytest.raises(UnroutableError):
            await broker.offer("x.limit.gone", permit())
    finally:
        await broker.close()


@pytest.mark.anyio
async def test_the_limiter_postpones_a_denied_start_and_holds_back_when_it_cannot_ask() -> None:
    app = Cuebx("memory://?clock=manual")

    @app.task(rate_limit="1/s")
    async def call(ctx: TaskContext) -> None: ...

    limits = app.limits
    assert limits is not None
    await app.connect()
    received = Received(call.local_context(), call, None)
    await limits.before_handler(received)
    with pytest.raises(Postpone) as denied:
        await limits.before_handler(received)
    assert 1000 <= denied.value.delay_ms <= 2000
    assert "rate limit 'call' (1/s) is full" in denied.value.reason

    await app.broker.delete(Topology("cuebx", (app.topology().queue("cuebx.limit.call"),)))
    await limits.before_handler(received)  # the limiter queue is declared again
    await app.close()
    with pytest.raises(Postpone):  # the broker is gone: held back, never run unchecked
        await limits.before_handler(received)
    assert (limits.counts["call"].granted, limits.counts["call"].denied) == (2, 2)

"""Events end to end, on RabbitMQ and on ``memory://``: fan-out, wildcards, failures, no subscriber.

Every test's apps share an exchange of the test's own, so an events exchange of its own
(``<prefix>.x.events``), deleted afterwards with the queues the apps planned.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pydantic
import pytest

from cuebx import (
    Cuebx,
    Middleware,
    Publish,
    Reject,
    TaskContext,
    UnroutableError,
)
from cuebx.message import HEADER_EVENT, HEADER_TASK
from cuebx.testing import dead_letters, messages, settle
from cuebx.topology import ExchangeSpec, Topology
from tests.conftest import AppFactory, wait_for

pytestmark = pytest.mark.anyio

EventApp = Callable[..., Cuebx]


@pytest.fixture
async def event_app(make_app: AppFactory, prefix: str) -> AsyncIterator[EventApp]:
    """Apps on the test's own exchange; its events exchange and itself deleted afterwards
    (`make_app` deletes the queues and the events exchange each app planned)."""
    made: list[Cuebx] = []

    def build(**options: Any) -> Cuebx:
        options.setdefault("exchange", f"{prefix}.x")
        app = make_app(**options)
        made.append(app)
        return app

    yield build
    if made:
        app = made[0]
        await app.broker.connect()
        events = app.events.topology()
        main = ExchangeSpec(app.settings.exchange)
        await app.broker.delete(Topology(events.exchange, events.queues, (*events.exchanges, main)))


class OrderCreated(msgspec.Struct):
    id: int
    total: float
    customer: str


async def test_two_subscribers_each_get_an_event_once(event_app: EventApp, prefix: str) -> None:
    app = event_app()
    got: dict[str, list[tuple[str, OrderCreated]]] = {"inventory": [], "shipping": []}

    @app.on("order.created", queue=f"{prefix}.inventory")
    async def reserve(ctx: TaskContext, order: OrderCreated) -> None:
        got["inventory"].append((ctx.message_id, order))

    @app.on("order.created", queue=f"{prefix}.shipping")
    async def prepare(ctx: TaskContext, order: OrderCreated) -> None:
        got["shipping"].append((ctx.message_id, order))

    await app.start_consumers()
    order = OrderCreated(7, 12.5, "ann")
    emitted = await app.emit("order.created", order)
    await wait_for(lambda: all(got.values()), what="both subscribers")
    await settle(app)
    assert emitted.routed
    assert got == {"inventory": [(emitted.id, order)], "shipping": [(emitted.id, order)]}


async def test_a_wildcard_subscriber_gets_the_matching_keys_only(
    event_app: EventApp, prefix: str
) -> None:
    app = event_app()
    keys: dict[str, list[str]] = {"one": [], "any": []}

    @app.on("order.*", queue=f"{prefix}.one-word")
    async def one_word(ctx: TaskContext, payload: int) -> None:
        keys["one"].append(ctx.headers[HEADER_EVENT])

    @app.on("order.#", queue=f"{prefix}.any-words")
    async def any_words(ctx: TaskContext, payload: int) -> None:
        keys["any"].append(ctx.headers[HEADER_EVENT])

    await app.start_consumers()
    for key in ("order.created", "order.item.added", "user.created", "order", "orders.x"):
        await app.emit(key, 1)
    await wait_for(lambda: len(keys["any"]) == 3, what="the '#' subscriber's three events")
    await settle(app)
    assert keys["one"] == ["order.created"]
    assert sorted(keys["any"]) == ["order", "order.created", "order.item.added"]


async def test_a_failing_subscriber_retries_and_dead_letters_alone(
    event_app: EventApp, prefix: str
) -> None:
    app = event_app()
    attempts: list[int] = []
    fine: list[int] = []

    @app.on("invoice.due", queue=f"{prefix}.flaky", retries=["100ms"])
    async def flaky(ctx: TaskContext, invoice: int) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError("the mail server is down")

    @app.on("invoice.due", queue=f"{prefix}.ledger")
    async def ledger(invoice: int) -> None:
        fine.append(invoice)

    await app.start_consumers()
    emitted = await app.emit("invoice.due", 42)
    await wait_for(lambda: len(attempts) == 2 and fine == [42], what="one retry, one success")
    await settle(app)

    [dead] = await dead_letters(app, f"{prefix}.flaky")
    assert (dead.reason, dead.message_id, dead.arguments) == ("exhausted", emitted.id, 42)
    assert dead.headers[HEADER_TASK] == "flaky"  # the copy names the subscriber that failed
    assert dead.headers[HEADER_EVENT] == "invoice.due"
    assert attempts == [0, 1]
    assert fine == [42]
    assert await dead_letters(app, f"{prefix}.ledger") == []


async def test_an_event_without_subscribers_is_kept_counted_and_logged_or_refused_on_demand(
    event_app: EventApp, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = event_app()

    @app.on("order.created", queue=f"{prefix}.inventory")
    async def reserve(order: int) -> None: ...

    with caplog.at_level(logging.WARNING, logger="cuebx.events"):
        emitted = await app.emit("order.refunded", {"id": 1})
    assert not emitted.routed
    assert app.events.unrouted == 1
    assert "event 'order.refunded'" in caplog.text
    assert "has no subscriber" in caplog.text
    [kept] = await messages(app, app.events.unrouted_queue)
    assert (kept.message_id, kept.headers[HEADER_EVENT]) == (emitted.id, "order.refunded")

    with pytest.raises(UnroutableError, match=r"event 'order\.refunded'.*has no subscriber"):
        await app.emit("order.refunded", {"id": 2}, mandatory=True)
    assert app.events.unrouted == 1  # refused, so neither counted nor kept
    assert len(await messages(app, app.events.unrouted_queue)) == 1
    assert (await app.emit("order.created", 3, mandatory=True)).routed


async def test_an_app_that_only_emits_declares_the_events_exchange_itself(
    event_app: EventApp, prefix: str
) -> None:
    worker_app = event_app()
    got: list[int] = []

    @worker_app.on("user.#", queue=f"{prefix}.audit")
    async def audit(n: int) -> None:
        got.append(n)

    await worker_app.start_consumers()
    web_app = event_app()  # no subscriber, no task: it only emits
    assert (await web_app.emit("user.signed-up", 5)).routed
    await wait_for(lambda: got == [5], what="the subscriber of the other app")


@dataclasses.dataclass
class OrderV2:
    id: int
    total: float
    customer: str
    coupon: str


class OrderModel(pydantic.BaseModel):
    id: int
    total: float
    customer: str
    coupon: str


class JustTheId(msgspec.Struct):
    id: int


class NeedsAddress(msgspec.Struct):
    id: int
    address: str


@pytest.mark.parametrize(
    "payload",
    [OrderV2(1, 9.5, "ann", "X"), OrderModel(id=1, total=9.5, customer="ann", coupon="X")],
    ids=["dataclass", "pydantic"],
)
async def test_subscribers_read_the_fields_they_declare_and_ignore_the_rest(
    event_app: EventApp, prefix: str, payload: Any
) -> None:
    app = event_app()
    ids: list[int] = []

    @app.on("order.created", queue=f"{prefix}.analytics")
    async def count(order: JustTheId) -> None:
        ids.append(order.id)

    @app.on("order.created", queue=f"{prefix}.shipping")
    async def ship(order: NeedsAddress) -> None:
        raise AssertionError("an order without an address must not reach the handler")

    await app.start_consumers()
    await app.emit("order.created", payload)
    await wait_for(lambda: ids == [1], what="the subscriber that reads fewer fields")
    await wait_for(lambda: _dead(app, f"{prefix}.shipping"), what="the subscriber missing a field")
    [dead] = await dead_letters(app, f"{prefix}.shipping")
    assert dead.reason == "invalid-arguments"
    assert "address" in dead.error


async def _dead(app: Cuebx, queue: str) -> bool:
    return bool(await dead_letters(app, queue))


async def test_middleware_sees_an_emit_as_a_publish_and_its_headers_reach_subscribers(
    event_app: EventApp, prefix: str
) -> None:
    seen: list[tuple[str, str, bool, str]] = []

    class Stamp(Middleware):
        async def before_publish(self, publish: Publish) -> None:
            publish.headers["x-origin"] = "checkout"

        async def after_publish(self, publish: Publish, error: BaseException | None) -> None:
            seen.append((publish.exchange, publish.routing_key, publish.event, repr(error)))

    app = event_app(middleware=[Stamp()])
    origins: list[str] = []

    @app.on("cart.*", queue=f"{prefix}.carts")
    async def cart(ctx: TaskContext, n: int) -> None:
        origins.append(ctx.headers["x-origin"])

    await app.start_consumers()
    await app.emit("cart.emptied", 1)
    with pytest.raises(UnroutableError):
        await app.emit("cart.lost.forever", 2, mandatory=True)
    await wait_for(lambda: origins == ["checkout"], what="the stamped event")
    exchange = app.events.exchange
    assert seen == [
        (exchange, "cart.emptied", True, "None"),
        (exchange, "cart.lost.forever", True, seen[1][3]),
    ]
    assert seen[1][3].startswith("UnroutableError")


async def test_a_subscriber_shares_its_queue_with_tasks_and_rejects_alone(
    event_app: EventApp, prefix: str
) -> None:
    app = event_app()
    ran: list[str] = []
    queue = f"{prefix}.mixed"

    @app.on("thing.happened", queue=queue)
    async def react(n: int) -> None:
        ran.append(f"react {n}")
        if n < 0:
            raise Reject("negative")

    @app.task(queue=queue)
    async def chore(n: int) -> None:
        ran.append(f"chore {n}")

    await app.start_consumers()
    await chore.delay(1)
    await app.emit("thing.happened", 2)
    await react.delay(3)  # straight to the subscriber, as a task
    await app.emit("thing.happened", -1)
    await wait_for(lambda: len(ran) == 4, what="four runs")
    await settle(app)
    assert sorted(ran) == ["chore 1", "react -1", "react 2", "react 3"]
    [dead] = await dead_letters(app, queue)
    assert (dead.reason, dead.headers[HEADER_TASK]) == ("rejected", "react")


def test_the_events_example_runs_on_its_own_and_each_subscriber_gets_its_copy() -> None:
    examples = Path(__file__).parents[2] / "examples"
    result = subprocess.run(
        [sys.executable, "events.py"], cwd=examples, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == [
        "analytics: order.cancelled 1000 (0.00)",
        "analytics: order.created 1001 (59.90)",
        "email: confirmation for order 1001 sent (attempt 1)",
        "inventory: reserved tea, cups for order 1001",
        "shipping: label printed for order 1001",
        "unrouted: 1 (kept: True)",
    ]
    assert "retrying through email.retry.30s" in result.stderr
    assert "event 'user.deleted'" in result.stderr

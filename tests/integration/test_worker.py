"""The worker on the real broker: dispatch, context, concurrency, plain publishers."""

from __future__ import annotations

import contextvars
import functools

import anyio
import pydantic
import pytest

from cuebx import TaskContext, current_context
from cuebx.topology import Topology
from tests.conftest import AppFactory, Probe, wait_for

pytestmark = pytest.mark.anyio


async def test_start_consumers_runs_delayed_tasks_and_stop_ends_them(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    app = make_app()
    queue = f"{prefix}.emails"
    done: list[tuple[str, str]] = []

    @app.task(queue=queue)
    async def send_welcome(email: str, name: str) -> None:
        done.append((email, name))

    async with app:
        worker = await app.start_consumers()
        await send_welcome.delay("a@example.com", "Ann")
        await send_welcome.delay(email="b@example.com", name="Bob")
        await wait_for(lambda: len(done) == 2, what="two tasks handled")
        await worker.stop()

    assert sorted(done) == [("a@example.com", "Ann"), ("b@example.com", "Bob")]
    assert await probe.count(queue) == 0


async def test_tasks_sharing_a_queue_are_dispatched_by_their_task_header(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app()
    queue = f"{prefix}.mixed"
    calls: list[str] = []

    @app.task(queue=queue)
    async def first(n: int) -> None:
        calls.append(f"first {n}")

    @app.task(queue=queue, name="second-task")
    def second(n: int) -> None:
        calls.append(f"second {n}")

    worker = await app.start_consumers()
    await first.delay(1)
    await second.delay(2)
    await wait_for(lambda: len(calls) == 2, what="both tasks")
    await worker.stop()
    assert sorted(calls) == ["first 1", "second 2"]


async def test_the_handler_sees_its_task_context_in_async_and_sync_handlers(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app()
    queue = f"{prefix}.ctx"
    seen: list[tuple[str, str, int, str, str, str]] = []

    @app.task(queue=queue)
    async def with_ctx(ctx: TaskContext, n: int) -> None:
        assert current_context() is ctx
        seen.append(
            (
                ctx.message_id,
                ctx.correlation_id,
                ctx.attempt,
                ctx.task_name,
                ctx.queue,
                ctx.headers["tenant"],
            )
        )

    @app.task(queue=queue)
    def sync_ctx(n: int) -> None:
        ctx = current_context()
        seen.append(
            (
                ctx.message_id,
                ctx.correlation_id,
                ctx.attempt,
                ctx.task_name,
                ctx.queue,
                ctx.headers["tenant"],
            )
        )

    worker = await app.start_consumers()
    a = await with_ctx.apply_async(args=(1,), headers={"tenant": "a"}, correlation_id="c-1")
    b = await sync_ctx.apply_async(args=(2,), headers={"tenant": "b"})
    await wait_for(lambda: len(seen) == 2, what="two handlers")
    await worker.stop()

    assert sorted(seen) == sorted(
        [
            (a.id, "c-1", 0, "with_ctx", queue, "a"),
            (b.id, b.id, 0, "sync_ctx", queue, "b"),
        ]
    )


async def test_a_plain_publishers_json_message_is_handled_by_the_queues_only_task(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    app = make_app()
    queue = f"{prefix}.legacy"
    got: list[dict[str, object]] = []

    @app.task(queue=queue)
    async def import_order(order_id: int, lines: list[str]) -> None:
        got.append({"order_id": order_id, "lines": lines, "id": current_context().message_id})

    await app.connect()
    await probe.publish(queue, b'{"order_id": 7, "lines": ["a", "b"]}')  # no headers at all
    worker = await app.start_consumers()
    await wait_for(lambda: len(got) == 1, what="the plain message")
    await worker.stop()
    assert got[0]["order_id"] == 7
    assert got[0]["lines"] == ["a", "b"]
    assert isinstance(got[0]["id"], str)
    assert len(got[0]["id"]) == 32


async def test_concurrent_handlers_never_exceed_the_queue_prefetch(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app()
    queue = f"{prefix}.bounded"
    running = 0
    peak = 0
    finished = 0

    @app.task(queue=queue, prefetch=3)
    async def slow(n: int) -> None:
        nonlocal running, peak, finished
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.05)
        running -= 1
        finished += 1

    await app.connect()
    await slow.map([(n,) for n in range(30)])
    worker = await app.start_consumers()
    await wait_for(lambda: finished == 30, what="30 tasks", timeout=20)
    await worker.stop()
    assert peak == 3


async def test_a_prefetch_override_applies_to_every_consumed_queue(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app()

    @app.task(queue=f"{prefix}.a", prefetch=50)
    async def a() -> None: ...

    @app.task(queue=f"{prefix}.b")
    async def b() -> None: ...

    worker = app.worker(prefetch=2)
    assert [(q.name, q.prefetch) for q in worker.queues] == [(f"{prefix}.a", 2), (f"{prefix}.b", 2)]
    only_b = app.worker(queues=[f"{prefix}.b"])
    assert [q.name for q in only_b.queues] == [f"{prefix}.b"]
    with pytest.raises(LookupError, match="nope"):
        app.worker(queues=["nope"])


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_handler_interrupted_by_a_stop_runs_again_marked_redelivered(
    make_app: AppFactory, prefix: str, queue_type: str
) -> None:
    app = make_app(queue_type=queue_type)
    queue = f"{prefix}.redelivered"
    seen: list[tuple[str, int, bool]] = []
    started = anyio.Event()

    @app.task(queue=queue, retries=["100ms"])
    async def charge(ctx: TaskContext, n: int) -> None:
        seen.append((ctx.message_id, ctx.attempt, ctx.redelivered))
        if len(seen) == 1:
            started.set()
            await anyio.sleep(60)  # interrupted by the immediate stop
        if len(seen) == 2:
            raise RuntimeError("fail once more, to see a retry")

    handle = await charge.delay(1)
    first = await app.start_consumers()
    with anyio.fail_after(10):
        await started.wait()
    first.request_stop(immediate=True)
    await first.stop()

    second = await app.start_consumers()
    await wait_for(lambda: len(seen) == 3, what="the redelivery and the retry")
    await second.stop()
    assert seen == [(handle.id, 0, False), (handle.id, 0, True), (handle.id, 1, False)]


async def test_a_worker_with_no_queues_stops_at_once(make_app: AppFactory) -> None:
    app = make_app(shutdown_timeout="30s")
    worker = await app.start_consumers()
    with anyio.fail_after(5):  # not the 30 s shutdown timeout
        await worker.stop()


async def test_cancelling_a_kept_alive_worker_requeues_running_messages_once(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    app = make_app()
    queue = f"{prefix}.kept"
    started: list[int] = []

    @app.task(queue=queue, prefetch=2)
    async def slow(n: int) -> None:
        started.append(n)
        await anyio.sleep(60)

    await app.tasks["slow"].map([(n,) for n in range(10)])
    async with anyio.create_task_group() as group:
        group.start_soon(functools.partial(app.start_consumers, keep_alive=True))
        await wait_for(lambda: len(started) == 2, what="two handlers running")
        group.cancel_scope.cancel()

    assert await probe.count(queue) == 10  # each message once: no copy beside the original
    assert len(started) == 2  # nothing new started while stopping


async def test_a_graceful_stop_returns_late_deliveries_once_not_in_a_loop(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    # Quorum queues count every return of a message against the delivery limit, so a
    # worker bouncing late deliveries while it stops would dead-letter work that never ran.
    app = make_app(queue_type="quorum", delivery_limit=3)
    names = [f"{prefix}.q{i}" for i in range(8)]
    handled: set[tuple[str, int]] = set()
    returns: list[int] = []

    async def work(ctx: TaskContext, n: int) -> None:
        returns.append(int(ctx.headers.get("x-delivery-count", 0)))
        await anyio.sleep(0.02)
        handled.add((ctx.queue, n))

    for name in names:
        app.task(queue=name, name=f"work-{name}", prefetch=5)(work)
    for name in names:
        await app.tasks[f"work-{name}"].map([(n,) for n in range(30)])

    first = await app.start_consumers()
    await wait_for(lambda: len(handled) >= 40, what="some work done")
    await first.stop()
    second = await app.start_consumers()
    await wait_for(lambda: len(handled) == 240, timeout=30, what="every message handled")
    await second.stop()

    assert max(returns) <= 1
    for name in names:
        assert await probe.count(f"{name}.dlq") == 0


REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")


async def test_handlers_start_in_the_worker_s_context_not_a_publisher_s(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app()
    seen: list[str] = []

    @app.task(queue=f"{prefix}.ctxvars", prefetch=1)
    async def job(n: int) -> None:
        seen.append(REQUEST.get())
        REQUEST.set(f"set by handler {n}")  # in its own copy: the next one must not see it

    token = REQUEST.set("worker")
    try:
        worker = await app.start_consumers()
    finally:
        REQUEST.reset(token)
    token = REQUEST.set("web request")
    try:
        await job.delay(1)
        await job.delay(2)
    finally:
        REQUEST.reset(token)
    await wait_for(lambda: len(seen) == 2, what="both handled")
    await worker.stop()
    assert seen == ["worker", "worker"]


async def test_closing_the_app_stops_a_kept_alive_worker_gracefully(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    app = make_app()
    queue = f"{prefix}.kept-closed"
    done: list[int] = []

    @app.task(queue=queue)
    async def job(n: int) -> None:
        done.append(n)

    with anyio.fail_after(10):  # the kept-alive call ends once close() stopped its worker
        async with anyio.create_task_group() as group:
            group.start_soon(functools.partial(app.start_consumers, keep_alive=True))
            await job.delay(1)
            await wait_for(lambda: done == [1], what="the task")
            await app.close()
    assert await probe.count(queue) == 0


class Order(pydantic.BaseModel):
    order_id: int
    items: list[str]


async def test_a_pydantic_model_argument_reaches_the_handler_as_the_model(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app()
    got: list[Order] = []

    @app.task(queue=f"{prefix}.orders")
    async def ship(order: Order) -> None:
        got.append(order)

    worker = await app.start_consumers()
    await ship.delay(Order(order_id=7, items=["book"]))
    await wait_for(lambda: len(got) == 1, what="the order")
    await worker.stop()
    assert got == [Order(order_id=7, items=["book"])]


async def test_a_worker_whose_queue_was_deleted_under_it_no_longer_says_it_consumes(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app()
    queue = f"{prefix}.doomed"

    @app.task(queue=queue)
    async def job() -> None: ...

    worker = await app.start_consumers()
    assert worker.consuming
    main = app.topology().queue(queue)
    await app.broker.delete(Topology(app.topology().exchange, (main,)))
    # RabbitMQ cancels the consumer of a deleted queue: health checks must see it.
    await wait_for(lambda: not worker.consuming, what="the worker to notice")
    await worker.stop()

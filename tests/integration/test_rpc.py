"""Request/reply with `Task.call` on both brokers: concurrency, timeouts, failures, lost links."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import anyio
import pytest

from cuebx import CallInterruptedError, CallTimeoutError, Cuebx, Middleware, Publish, TaskFailed
from cuebx.brokers.memory import MemoryBroker
from tests.conftest import AppFactory, wait_for
from tests.proxy import running_proxy

pytestmark = pytest.mark.anyio


async def test_a_hundred_concurrent_calls_share_one_reply_consumer_and_get_their_own_values(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app()

    @app.task(queue=f"{prefix}.q", prefetch=50)
    async def square(n: int) -> int:
        await anyio.sleep(0.01)
        return n * n

    worker = await app.start_consumers()
    results: dict[int, int] = {}

    async def one(n: int) -> None:
        results[n] = await square.call(n)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            for n in range(100):
                group.start_soon(one, n)
    assert results == {n: n * n for n in range(100)}
    assert app.publisher.caller.pending == 0
    await worker.stop()


async def test_a_call_nobody_answers_times_out_and_is_forgotten(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app()

    @app.task(queue=f"{prefix}.q")
    async def slow() -> int:
        return 1

    await app.connect()  # no worker consumes the queue
    with anyio.fail_after(5), pytest.raises(CallTimeoutError, match=r"'slow'.*0\.3s"):
        await slow.call_within(0.3)
    assert app.publisher.caller.pending == 0


async def test_a_task_that_fails_for_good_replies_task_failed_after_its_retries(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app()
    attempts: list[int] = []

    @app.task(queue=f"{prefix}.q", retries=["100ms"])
    async def flaky(n: int) -> int:
        attempts.append(n)
        raise ValueError("still broken")

    worker = await app.start_consumers()
    with anyio.fail_after(10), pytest.raises(TaskFailed) as failed:
        await flaky.call(3)
    assert attempts == [3, 3]  # the reply waited for the last attempt
    assert (failed.value.state, failed.value.reason) == ("failed", "exhausted")
    assert failed.value.error_type == "builtins.ValueError"
    await worker.stop()


async def test_a_lost_connection_fails_pending_calls_at_once(
    make_rabbit_app: AppFactory, rabbitmq_url: str, prefix: str
) -> None:
    parts = urlsplit(rabbitmq_url)
    worker_app = make_rabbit_app()
    started = anyio.Event()

    @worker_app.task(queue=f"{prefix}.q", name="hang")
    async def hang() -> int:
        started.set()
        await anyio.sleep(30)
        return 1

    confirmed = Confirmed()
    worker = await worker_app.start_consumers()
    async with running_proxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:
        url = rabbitmq_url.replace(f":{parts.port or 5672}", f":{proxy.port}")
        caller_app = Cuebx(url, connection_name=f"{prefix}-caller", middleware=[confirmed])
        caller = caller_app.task(queue=f"{prefix}.q", name="hang")(hang.fn)
        try:
            with anyio.fail_after(5):
                async with anyio.create_task_group() as group:

                    async def cut_once_running() -> None:
                        await started.wait()
                        await confirmed.event.wait()
                        proxy.cut()

                    group.start_soon(cut_once_running)
                    with pytest.raises(CallInterruptedError, match="lost"):
                        await caller.call()
        finally:
            proxy.accepting = False
            await caller_app.close()
    worker.request_stop(immediate=True)
    await worker.stop()


class Confirmed(Middleware):
    """Sets `event` once a publish of its app was confirmed."""

    def __init__(self) -> None:
        self.event = anyio.Event()

    async def after_publish(self, publish: Publish, error: BaseException | None) -> None:
        if error is None:
            self.event.set()


async def test_memory_broker_fails_pending_calls_when_its_reply_channel_is_lost(
    prefix: str,
) -> None:
    app = Cuebx("memory://?clock=real")

    @app.task(queue=f"{prefix}.q")
    async def hang() -> int:
        await anyio.sleep(30)
        return 1

    worker = await app.start_consumers()
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:

            async def lose() -> None:
                while not app.publisher.caller.pending:
                    await anyio.sleep(0.01)
                broker.lose_replies()

            group.start_soon(lose)
            with pytest.raises(CallInterruptedError):
                await hang.call()
    # A new call registers a new reply consumer.
    with pytest.raises(CallTimeoutError):
        await hang.call_within(0.1)
    worker.request_stop(immediate=True)
    await app.close()


async def test_a_caller_that_has_gone_is_not_an_error_in_the_worker(
    make_rabbit_app: AppFactory, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    worker_app, caller_app = make_rabbit_app(), make_rabbit_app()
    replied = anyio.Event()
    for app in (worker_app, caller_app):

        @app.task(queue=f"{prefix}.q", name="late")
        async def late() -> int:
            await anyio.sleep(0.5)
            replied.set()
            return 1

    worker = await worker_app.start_consumers()
    with caplog.at_level(logging.DEBUG, logger="cuebx"):
        with pytest.raises(CallTimeoutError):
            await caller_app.tasks["late"].call_within(0.1)
        await caller_app.close()  # the caller is gone before the reply is sent
        with anyio.fail_after(5):
            await replied.wait()
        # The reply to the gone caller is published (and dropped by RabbitMQ) before the
        # message is acked: once no handler runs, whatever would be logged has been.
        await wait_for(lambda: worker.idle, what="the handler to finish")
        await worker.stop()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []

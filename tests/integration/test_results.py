"""Task status and results on RabbitMQ with each store: every state, values, failures, expiry."""

from __future__ import annotations

import logging

import anyio
import pytest

from cuebx import (
    ConfigurationError,
    Reject,
    ResultTimeoutError,
    StoreUnavailableError,
    TaskFailed,
    TaskStatus,
)
from cuebx.message import HEADER_TASK
from tests.conftest import AppFactory, Raw, wait_for
from tests.proxy import running_proxy
from tests.stores import REDIS_URL, forget_redis_prefix, namespace

pytestmark = pytest.mark.anyio


async def test_a_task_goes_pending_started_succeeded_and_result_returns_its_typed_value(
    make_rabbit_app: AppFactory, prefix: str, any_store: str
) -> None:
    app = make_rabbit_app(store=any_store)
    release = anyio.Event()

    @app.task(queue=f"{prefix}.q")
    async def add(a: int, b: int) -> dict[str, int]:
        await release.wait()
        return {"sum": a + b}

    await app.connect()
    handle = await add.delay(2, 3)
    pending = await handle.status()
    assert (pending.state, pending.task, pending.attempt) == ("pending", "add", 0)
    worker = await app.start_consumers()
    await wait_for(lambda: _state_is(handle.status(), "started"), what="started")
    release.set()
    assert await handle.result(timeout=10) == {"sum": 5}
    done = await handle.status()
    assert done.state == "succeeded"
    assert done.done
    assert done.updated_at is not None
    assert pending.updated_at is not None
    assert done.updated_at >= pending.updated_at
    # A handle rebuilt from the id alone, by the app or by the task, reads the same.
    assert (await app.status(handle.id)).state == "succeeded"
    assert await app.handle(handle.id).result(timeout=1) == {"sum": 5}
    assert await add.handle(handle.id).result(timeout=1) == {"sum": 5}
    await worker.stop()


async def _state_is(status: object, state: str) -> bool:
    found: TaskStatus = await status  # type: ignore[misc]
    return found.state == state


async def test_a_failing_task_is_retrying_then_failed_and_result_raises_task_failed(
    make_rabbit_app: AppFactory, prefix: str, any_store: str
) -> None:
    app = make_rabbit_app(store=any_store)
    second_attempt = anyio.Event()
    go_on = anyio.Event()

    @app.task(queue=f"{prefix}.q", retries=["300ms"])
    async def charge(order: int) -> int:
        if charge_attempts.append(order) or len(charge_attempts) == 2:
            second_attempt.set()
            await go_on.wait()
        raise ValueError(f"card declined for order {order}")

    charge_attempts: list[int] = []
    worker = await app.start_consumers()
    handle = await charge.delay(7)
    await wait_for(lambda: _state_is(handle.status(), "retrying"), what="retrying")
    retrying = await handle.status()
    assert retrying.attempt == 1  # the attempt that comes next
    assert retrying.next_attempt_at is not None
    assert retrying.updated_at is not None
    assert 0.2 < (retrying.next_attempt_at - retrying.updated_at).total_seconds() < 1
    assert retrying.error_type == "builtins.ValueError"
    await second_attempt.wait()
    await wait_for(lambda: _state_is(handle.status(), "started"), what="attempt 1 started")
    assert (await handle.status()).attempt == 1
    go_on.set()
    with pytest.raises(TaskFailed) as failed:
        await handle.result(timeout=10)
    assert failed.value.state == "failed"
    assert failed.value.reason == "exhausted"
    assert failed.value.error_type == "builtins.ValueError"
    assert failed.value.error == "card declined for order 7"
    await worker.stop()


async def test_rejected_and_poison_messages_end_failed_and_dead_lettered_with_their_reason(
    make_rabbit_app: AppFactory, prefix: str, amqp: Raw
) -> None:
    app = make_rabbit_app(store="memory://")
    queue = f"{prefix}.q"

    @app.task(queue=queue, retries=["1h"])
    async def refuse(n: int) -> None:
        raise Reject("not today")

    worker = await app.start_consumers()
    rejected = await refuse.delay(1)
    await amqp.publish(queue, b'{"n": "x"}', message_id="poison-1", headers={HEADER_TASK: "refuse"})
    await wait_for(lambda: _state_is(app.status("poison-1"), "dead-lettered"), what="poison")
    poison = await app.status("poison-1")
    assert poison.reason == "invalid-arguments"
    with pytest.raises(TaskFailed, match="rejected") as failed:
        await rejected.result(timeout=10)
    assert (failed.value.state, failed.value.error) == ("failed", "not today")
    await worker.stop()


async def test_an_unknown_id_is_unknown_not_pending_and_result_says_so(
    make_rabbit_app: AppFactory, prefix: str, real_store: str
) -> None:
    app = make_rabbit_app(store=real_store)
    await app.connect()
    status = await app.status("no-such-task")
    assert (status.state, status.updated_at, status.done) == ("unknown", None, False)
    with pytest.raises(ResultTimeoutError, match=r"unknown.*no record of it"):
        await app.handle("no-such-task").result(timeout=0.2)


async def test_states_and_results_expire_after_result_ttl(
    make_rabbit_app: AppFactory, prefix: str, real_store: str
) -> None:
    app = make_rabbit_app(store=real_store, result_ttl="500ms")

    @app.task(queue=f"{prefix}.q")
    async def quick() -> int:
        return 1

    worker = await app.start_consumers()
    handle = await quick.delay()
    assert await handle.result(timeout=10) == 1
    await wait_for(lambda: _state_is(handle.status(), "unknown"), timeout=10, what="expiry")
    await worker.stop()


async def test_a_task_with_track_false_leaves_no_status(
    make_rabbit_app: AppFactory, prefix: str
) -> None:
    app = make_rabbit_app(store="memory://")
    ran = anyio.Event()

    @app.task(queue=f"{prefix}.q", track=False)
    async def untracked() -> None:
        ran.set()

    worker = await app.start_consumers()
    handle = await untracked.delay()
    await ran.wait()
    await worker.stop()
    assert (await handle.status()).state == "unknown"
    with pytest.raises(ConfigurationError, match="track=False"):
        await handle.result(timeout=1)


async def test_a_return_value_that_does_not_fit_its_annotation_fails_the_task(
    make_rabbit_app: AppFactory, prefix: str
) -> None:
    app = make_rabbit_app(store="memory://")

    @app.task(queue=f"{prefix}.q")
    async def wrong() -> int:
        return "forty-two"  # type: ignore[return-value]

    worker = await app.start_consumers()
    with pytest.raises(TaskFailed, match="invalid-result") as failed:
        await (await wrong.delay()).result(timeout=10)
    assert "does not fit the return annotation" in failed.value.error
    await worker.stop()


async def test_without_a_store_status_says_which_option_is_missing(
    make_rabbit_app: AppFactory, prefix: str
) -> None:
    app = make_rabbit_app()

    @app.task(queue=f"{prefix}.q")
    async def job() -> None: ...

    with pytest.raises(ConfigurationError, match="store="):
        await app.status("x")
    handle = job.handle("x")
    with pytest.raises(ConfigurationError, match="need a store"):
        await handle.status()


async def test_a_store_outage_loses_no_message_and_the_status_catches_up(
    make_rabbit_app: AppFactory, prefix: str, amqp: Raw, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = REDIS_URL.split("//")[1].split("/")[0].split(":")
    async with running_proxy(host, int(port)) as proxy:
        store = f"redis://127.0.0.1:{proxy.port}/0?prefix={namespace(prefix)}"
        app = make_rabbit_app(store=store)
        queue = f"{prefix}.q"
        done: list[int] = []

        @app.task(queue=queue)
        async def job(n: int) -> int:
            done.append(n)
            return n

        worker = await app.start_consumers()
        first = await job.delay(0)
        assert await first.result(timeout=10) == 0
        # Down: nothing answers on the store's address.
        proxy.accepting = False
        proxy.cut()
        with caplog.at_level(logging.WARNING, logger="cuebx.results"):
            handles = [await job.delay(n) for n in range(1, 21)]
            await wait_for(lambda: len(done) == 21, what="every task to run")
            await wait_for(lambda: _empty(amqp, queue), what="every message acked")
        assert "could not write" in caplog.text
        with pytest.raises(StoreUnavailableError):
            await handles[0].status()
        # Back: the records kept in memory are written, so the status catches up.
        proxy.accepting = True
        for n, handle in enumerate(handles, 1):
            assert await handle.result(timeout=10) == n
        await worker.stop()
        assert app.results is not None
        assert not app.results.writer.backlog
        forget_redis_prefix(namespace(prefix))


async def _empty(amqp: Raw, queue: str) -> bool:
    return await amqp.count(queue) == 0


async def test_map_leaves_every_message_pending_and_each_result_is_its_own(
    make_rabbit_app: AppFactory, prefix: str, real_store: str
) -> None:
    app = make_rabbit_app(store=real_store)

    @app.task(queue=f"{prefix}.q")
    async def double(n: int) -> int:
        return 2 * n

    handles = await double.map([(n,) for n in range(50)], window=16)
    states = {(await h.status()).state for h in handles}
    assert states == {"pending"}
    worker = await app.start_consumers()
    assert [await h.result(timeout=10) for h in handles] == [2 * n for n in range(50)]
    await worker.stop()

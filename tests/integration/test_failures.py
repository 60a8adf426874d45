"""Failure paths on the real broker: retry tiers, dead letters, poison input, time limits."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import anyio
import msgspec
import pytest

from cuebx import Cuebx, Reject, Retry, TaskContext
from cuebx.brokers.memory import MemoryBroker
from cuebx.message import OutgoingMessage
from tests.conftest import AppFactory, Probe, wait_for

pytestmark = pytest.mark.anyio


async def test_a_failing_task_climbs_the_retry_tiers_then_lands_in_the_dead_letter_queue(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    app = make_app()
    queue = f"{prefix}.flaky"
    attempts: list[tuple[int, str, str, float]] = []

    @app.task(queue=queue, retries=["300ms", "600ms"])
    async def always_fails(ctx: TaskContext, n: int) -> None:
        attempts.append((ctx.attempt, ctx.message_id, ctx.correlation_id, time.monotonic()))
        raise ValueError(f"boom {n}")

    worker = await app.start_consumers()
    handle = await always_fails.apply_async(args=(7,), correlation_id="corr-7")
    dead = await probe.take(f"{queue}.dlq", timeout=15)
    await worker.stop()

    assert [a[0] for a in attempts] == [0, 1, 2]
    assert {a[1] for a in attempts} == {handle.id}
    assert {a[2] for a in attempts} == {"corr-7"}
    gaps = [later[3] - earlier[3] for earlier, later in itertools.pairwise(attempts)]
    assert 0.3 <= gaps[0] < 0.3 + 0.4, gaps
    assert 0.6 <= gaps[1] < 0.6 + 0.4, gaps

    assert msgspec.json.decode(dead.body) == {"n": 7}
    assert dead.message_id == handle.id
    assert dead.correlation_id == "corr-7"
    assert dead.content_type == "application/json"
    headers = dead.headers
    assert headers["x-cuebx-reason"] == "exhausted"
    assert headers["x-cuebx-error-type"] == "builtins.ValueError"
    assert headers["x-cuebx-error"] == "boom 7"
    assert headers["x-cuebx-origin-queue"] == queue
    assert headers["x-cuebx-task"] == "always_fails"
    assert headers["x-retry-attempt"] == 2
    assert str(headers["x-cuebx-failed-at"]).startswith("20")
    assert await probe.count(queue) == 0


async def test_a_task_that_succeeds_on_a_later_attempt_is_acked_and_not_dead_lettered(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    app = make_app()
    queue = f"{prefix}.later"
    attempts: list[int] = []

    @app.task(queue=queue, retries=Retry(every="200ms", times=5))
    async def third_time_lucky(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt < 2:
            raise ConnectionError("try again")

    worker = await app.start_consumers()
    await third_time_lucky.delay()
    await wait_for(lambda: attempts == [0, 1, 2], timeout=10, what="three attempts")
    await worker.stop()
    for name in (queue, f"{queue}.retry.200ms", f"{queue}.dlq"):
        assert await probe.count(name) == 0, name


async def test_retry_every_times_uses_one_tier_for_every_retry(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    app = make_app()
    queue = f"{prefix}.every"
    attempts: list[int] = []

    @app.task(queue=queue, retries=Retry(every="100ms", times=3))
    async def fails(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError("no")

    worker = await app.start_consumers()
    await fails.delay()
    dead = await probe.take(f"{queue}.dlq", timeout=10)
    await worker.stop()
    assert attempts == [0, 1, 2, 3]
    assert dead.headers["x-cuebx-reason"] == "exhausted"
    assert [q.name for q in app.topology().queues if q.role == "retry"] == [f"{queue}.retry.100ms"]


async def test_retry_on_and_dont_retry_on_choose_which_errors_climb_the_ladder(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    app = make_app()
    queue = f"{prefix}.choosy"
    attempts: list[tuple[str, int]] = []

    @app.task(queue=queue, retries=["100ms", "100ms"], retry_on=ConnectionError)
    async def only_connection_errors(ctx: TaskContext, kind: str) -> None:
        attempts.append((kind, ctx.attempt))
        raise ConnectionError() if kind == "conn" else KeyError(kind)

    @app.task(queue=queue, retries=["100ms"], dont_retry_on=[PermissionError])
    async def not_permission_errors(ctx: TaskContext, kind: str) -> None:
        attempts.append((kind, ctx.attempt))
        raise PermissionError(kind)

    worker = await app.start_consumers()
    await only_connection_errors.delay("key")
    await not_permission_errors.delay("perm")
    await only_connection_errors.delay("conn")
    dead = [await probe.take(f"{queue}.dlq", timeout=10) for _ in range(3)]
    await worker.stop()

    reasons = {msgspec.json.decode(d.body)["kind"]: d.headers["x-cuebx-reason"] for d in dead}
    assert reasons == {"key": "failed", "perm": "failed", "conn": "exhausted"}
    assert sorted(attempts) == [("conn", 0), ("conn", 1), ("conn", 2), ("key", 0), ("perm", 0)]


async def test_reject_dead_letters_at_once_and_a_raised_retry_retries(
    make_app: AppFactory, prefix: str, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    queue = f"{prefix}.signals"
    attempts: list[tuple[str, int]] = []

    @app.task(queue=queue, retries=["100ms", "100ms"], retry_on=())
    async def steer(ctx: TaskContext, what: str) -> None:
        attempts.append((what, ctx.attempt))
        if what == "reject":
            raise Reject("customer deleted")
        if ctx.attempt == 0:
            raise Retry("rate limited", every="1h")  # the tier decides: every= is ignored

    worker = await app.start_consumers()
    await steer.delay("reject")
    await steer.delay("retry")
    dead = await probe.take(f"{queue}.dlq", timeout=10)
    await wait_for(lambda: ("retry", 1) in attempts, what="the retried attempt")
    await worker.stop()

    assert dead.headers["x-cuebx-reason"] == "rejected"
    assert dead.headers["x-cuebx-error"] == "customer deleted"
    assert dead.headers["x-cuebx-error-type"] == "cuebx.errors.Reject"
    assert sorted(attempts) == [("reject", 0), ("retry", 0), ("retry", 1)]
    assert "every= and times= only apply in retries=" in caplog.text


async def test_every_kind_of_poison_goes_to_the_dead_letter_queue_and_work_goes_on(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    app = make_app(max_message_size=1000)
    queue = f"{prefix}.poison"
    handled: list[int] = []

    @app.task(queue=queue, retries=["100ms"])
    async def count(n: int) -> None:
        handled.append(n)

    @app.task(queue=queue)
    async def other(n: int) -> None:
        handled.append(-n)

    await app.connect()
    poison: list[tuple[str, bytes, dict[str, Any]]] = [
        ("undecodable", b"{not json", {"x-cuebx-task": "count"}),
        ("undecodable", b"{}", {"x-cuebx-task": "count", "content_type": "text/x-weird"}),
        ("unknown-task", b'{"n": 1}', {"x-cuebx-task": "nobody"}),
        ("unknown-task", b'{"n": 1}', {}),  # two tasks on the queue: no default
        ("invalid-arguments", b"[1, 2]", {"x-cuebx-task": "count"}),
        ("invalid-arguments", b'{"n": "one"}', {"x-cuebx-task": "count"}),
        ("invalid-arguments", b"{}", {"x-cuebx-task": "count"}),
        ("too-large", b'{"n": 1, "pad": "' + b"x" * 2000 + b'"}', {"x-cuebx-task": "count"}),
    ]
    for index, (_, body, headers) in enumerate(poison):
        content_type = headers.pop("content_type", "application/json")
        await probe.publish(
            queue, body, headers=headers, content_type=content_type, message_id=f"poison-{index}"
        )
    await count.delay(42)

    worker = await app.start_consumers()
    await wait_for(lambda: handled == [42], what="the valid message after the poison")
    dead = [await probe.take(f"{queue}.dlq") for _ in poison]
    await worker.stop()

    by_id = {d.message_id: d for d in dead}
    for index, (reason, body, _) in enumerate(poison):
        message = by_id[f"poison-{index}"]
        assert message.headers["x-cuebx-reason"] == reason, (index, message.headers)
        assert message.body == body
        assert message.headers["x-cuebx-error"]
    assert await probe.count(f"{queue}.retry.100ms") == 0


async def test_a_queue_without_dead_letter_queue_drops_poison_with_an_error_log(
    make_app: AppFactory, prefix: str, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    queue = f"{prefix}.nodlq"
    handled: list[int] = []

    @app.task(queue=queue, dead_letter=False)
    async def count(n: int) -> None:
        handled.append(n)

    await app.connect()
    await probe.publish(queue, b"garbage", message_id="bad-one")
    await count.delay(1)
    worker = await app.start_consumers()
    await wait_for(lambda: handled == [1], what="the valid message")
    await worker.stop()
    assert await probe.count(queue) == 0
    assert any("bad-one" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)
    assert f"{queue}.dlq" not in {q.name for q in app.topology().queues}


async def test_a_shared_dead_letter_queue_collects_from_several_queues(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    app = make_app()
    shared = f"{prefix}.all-dead"

    @app.task(queue=f"{prefix}.a", dead_letter=shared)
    async def a() -> None:
        raise Reject("a")

    @app.task(queue=f"{prefix}.b", dead_letter=shared)
    async def b() -> None:
        raise Reject("b")

    worker = await app.start_consumers()
    await a.delay()
    await b.delay()
    dead = [await probe.take(shared) for _ in range(2)]
    await worker.stop()
    assert sorted(d.headers["x-cuebx-origin-queue"] for d in dead) == [f"{prefix}.a", f"{prefix}.b"]


async def test_a_timeout_cancels_an_async_handler_and_counts_as_a_failure(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    app = make_app()
    queue = f"{prefix}.slow"
    finished: list[int] = []

    @app.task(queue=queue, timeout="200ms", retries=["100ms"])
    async def too_slow(ctx: TaskContext) -> None:
        await anyio.sleep(5)
        finished.append(ctx.attempt)

    worker = await app.start_consumers()
    started = time.monotonic()
    await too_slow.delay()
    dead = await probe.take(f"{queue}.dlq", timeout=10)
    await worker.stop()
    assert time.monotonic() - started < 3
    assert finished == []
    assert dead.headers["x-cuebx-error-type"] == "builtins.TimeoutError"
    assert dead.headers["x-cuebx-error"] == "task 'too_slow' ran over its timeout of 0.2s"
    assert dead.headers["x-retry-attempt"] == 1


async def test_a_sync_handler_over_its_timeout_is_reported_and_dead_lettered(
    make_app: AppFactory, prefix: str, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    queue = f"{prefix}.sync-slow"
    release = anyio.Event()

    @app.task(queue=queue, timeout="200ms")
    def blocking() -> None:
        anyio.from_thread.run(release.wait)

    worker = await app.start_consumers()
    await blocking.delay()
    dead = await probe.take(f"{queue}.dlq", timeout=10)
    release.set()
    await worker.stop()
    assert dead.headers["x-cuebx-error-type"] == "builtins.TimeoutError"
    assert any("abandoned in its thread" in r.getMessage() for r in caplog.records)


async def test_every_log_record_about_a_message_names_its_task_id_and_attempt(
    make_app: AppFactory, prefix: str, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    queue = f"{prefix}.logged"

    @app.task(queue=queue, retries=["100ms"])
    async def flaky(n: int) -> None:
        raise RuntimeError("down")

    await app.connect()
    await probe.publish(queue, b'{"n": "x"}', headers={"x-retry-attempt": 3}, message_id="bad")
    handle = await flaky.delay(1)
    caplog.set_level(logging.INFO, logger="cuebx")
    worker = await app.start_consumers()
    await probe.take(f"{queue}.dlq")
    await probe.take(f"{queue}.dlq")
    await worker.stop()

    about = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "cuebx.worker"]
    seen = {(vars(r)["task"], vars(r)["message_id"], vars(r)["attempt"]) for r in about}
    assert seen == {("flaky", "bad", 3), ("flaky", handle.id, 0), ("flaky", handle.id, 1)}


async def test_an_unknown_task_is_logged_with_no_task_and_its_name_in_the_message(
    make_app: AppFactory, prefix: str, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    queue = f"{prefix}.unknown"

    @app.task(queue=queue)
    async def known(n: int) -> None: ...

    await app.connect()
    caplog.set_level(logging.INFO, logger="cuebx")
    headers = {"x-cuebx-task": "ghost", "x-retry-attempt": 2}
    await probe.publish(queue, b'{"n": 1}', headers=headers, message_id="who")
    worker = await app.start_consumers()
    await probe.take(f"{queue}.dlq")
    await worker.stop()
    [record] = [r for r in caplog.records if "dead-lettered (unknown-task)" in r.getMessage()]
    assert "no task named 'ghost'" in record.getMessage()
    assert (vars(record)["task"], vars(record)["message_id"], vars(record)["attempt"]) == (
        None,
        "who",
        2,
    )


class _FailingTiers(MemoryBroker):
    """A memory broker whose retry tiers fail with an error cuebx does not expect."""

    async def publish(self, exchange: str, routing_key: str, message: OutgoingMessage) -> None:
        if ".retry." in routing_key:
            raise RuntimeError("the disk is on fire")
        await super().publish(exchange, routing_key, message)


async def test_an_internal_error_is_logged_with_the_message_and_requeues_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Cuebx("memory://", broker=_FailingTiers())
    attempts: list[int] = []

    @app.task(queue="internal", retries=["1s"])
    async def flaky(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt)
        raise ValueError("down")

    caplog.set_level(logging.ERROR, logger="cuebx.worker")
    worker = await app.start_consumers()
    handle = await flaky.delay()
    await wait_for(lambda: any("internal error" in r.getMessage() for r in caplog.records))
    await worker.stop()
    [record, *_] = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert (vars(record)["task"], vars(record)["message_id"], vars(record)["attempt"]) == (
        "flaky",
        handle.id,
        0,
    )
    assert record.exc_info is not None
    assert "disk is on fire" in str(record.exc_info[1])
    # Requeued, not lost: back in its queue, or once the same error kept coming back, in
    # the dead-letter queue as a message that exceeded the redelivery limit.
    broker = app.broker
    assert await broker.queue_length("internal") + await broker.queue_length("internal.dlq") == 1
    await app.close()

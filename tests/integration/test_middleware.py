"""The extension seam on both brokers: a user's own plug-ins, hook order, skips, failures."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio
import pytest

from cuebx import (
    Middleware,
    Outcome,
    Publish,
    PublishError,
    Received,
    Reject,
    Skip,
    TaskContext,
)
from cuebx.middleware import WorkerView
from cuebx.testing import dead_letters
from examples.middleware import Origin, Timing
from tests.conftest import AppFactory, Probe, wait_for

pytestmark = pytest.mark.anyio


class Recorder(Middleware):
    """Writes every hook call into a shared journal, tagged with its own name."""

    def __init__(self, name: str, journal: list[str]) -> None:
        self.name = name
        self.journal = journal

    def note(self, event: str) -> None:
        self.journal.append(f"{self.name}:{event}")

    async def before_publish(self, publish: Publish) -> None:
        self.note(f"before_publish {publish.task_name}")

    async def after_publish(self, publish: Publish, error: BaseException | None) -> None:
        self.note(f"after_publish {'ok' if error is None else type(error).__name__}")

    async def on_worker_start(self, worker: WorkerView) -> None:
        self.note(f"worker_start {','.join(worker.queue_names)}")

    async def on_worker_stop(self, worker: WorkerView) -> None:
        self.note("worker_stop")

    async def before_handler(self, received: Received) -> None:
        self.note(f"before_handler {received.context.attempt}")

    async def after_handler(self, received: Received, outcome: Outcome) -> None:
        result = "ok" if outcome.succeeded else type(outcome.error).__name__
        self.note(f"after_handler {result}")

    async def on_retry(
        self, received: Received, error: BaseException, *, attempt: int, delay: float
    ) -> None:
        self.note(f"on_retry {attempt} {delay:g}")

    async def on_dead_letter(
        self, received: Received, reason: str, error: BaseException | str
    ) -> None:
        task = received.task.name if received.task is not None else None
        self.note(f"on_dead_letter {reason} {task}")


async def test_a_plug_in_written_against_the_public_protocol_times_tasks_and_adds_a_header(
    make_app: AppFactory, prefix: str
) -> None:
    timing = Timing()
    app = make_app(middleware=[timing, Origin("billing")])
    seen: list[str] = []

    @app.task(queue=f"{prefix}.invoices")
    async def render(ctx: TaskContext, n: int) -> None:
        seen.append(ctx.headers["x-origin"])

    worker = await app.start_consumers()
    await render.delay(1)
    await render.delay(2)
    await wait_for(lambda: len(timing.durations.get("render", ())) == 2, what="two timings")
    await worker.stop()
    assert seen == ["billing", "billing"]
    assert all(0 <= seconds < 5 for seconds in timing.durations["render"])


async def test_before_hooks_run_in_order_and_after_hooks_in_reverse(
    make_app: AppFactory, prefix: str
) -> None:
    journal: list[str] = []
    app = make_app(middleware=[Recorder("outer", journal)])
    app.add_middleware(Recorder("inner", journal))
    queue = f"{prefix}.order"

    @app.task(queue=queue)
    async def job() -> str:
        journal.append("handler")
        return "done"

    worker = await app.start_consumers()
    await job.delay()
    await wait_for(lambda: "outer:after_handler ok" in journal, what="the last hook")
    await worker.stop()
    # The handler may start before the publisher has its confirm: compare each side alone.
    publishing = [e for e in journal if "publish" in e]
    assert publishing == [
        "outer:before_publish job",
        "inner:before_publish job",
        "inner:after_publish ok",
        "outer:after_publish ok",
    ]
    assert [e for e in journal if "publish" not in e] == [
        f"outer:worker_start {queue}",
        f"inner:worker_start {queue}",
        "outer:before_handler 0",
        "inner:before_handler 0",
        "handler",
        "inner:after_handler ok",
        "outer:after_handler ok",
        "inner:worker_stop",
        "outer:worker_stop",
    ]
    assert journal.index("outer:before_publish job") < journal.index("outer:before_handler 0")


async def test_retry_and_dead_letter_hooks_see_the_attempt_delay_and_reason(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    journal: list[str] = []
    app = make_app(middleware=[Recorder("r", journal)])
    queue = f"{prefix}.flaky"

    @app.task(queue=queue, retries=["100ms"])
    async def flaky() -> None:
        raise RuntimeError("down")

    worker = await app.start_consumers()
    await flaky.delay()
    await wait_for(lambda: "r:on_dead_letter exhausted flaky" in journal, what="the dead letter")
    await worker.stop()
    handled = [e for e in journal if "handler" in e or "on_" in e]
    assert handled == [
        "r:before_handler 0",
        "r:after_handler RuntimeError",
        "r:on_retry 1 0.1",
        "r:before_handler 1",
        "r:after_handler RuntimeError",
        "r:on_dead_letter exhausted flaky",
    ]
    assert await probe.count(f"{queue}.dlq") == 1


async def test_poison_input_reaches_on_dead_letter_without_a_task(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    journal: list[str] = []
    app = make_app(middleware=[Recorder("r", journal)])
    queue = f"{prefix}.poison"

    @app.task(queue=queue)
    async def job(n: int) -> None: ...

    @app.task(queue=queue)
    async def other(n: int) -> None: ...

    worker = await app.start_consumers()
    await probe.publish(queue, b'{"n": 1}', headers={"x-cuebx-task": "nobody"})
    await probe.publish(queue, b"not json", headers={"x-cuebx-task": "job"})
    await wait_for(lambda: len([e for e in journal if "on_dead_letter" in e]) == 2)
    await worker.stop()
    dead = sorted(e for e in journal if "on_dead_letter" in e)
    assert dead == ["r:on_dead_letter undecodable job", "r:on_dead_letter unknown-task None"]
    assert not [e for e in journal if "before_handler" in e]


async def test_a_skip_from_before_handler_acks_without_running_the_handler(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    outcomes: list[Outcome] = []

    class Dedupe(Middleware):
        async def before_handler(self, received: Received) -> None:
            if received.context.headers.get("x-duplicate"):
                raise Skip("seen before")

        async def after_handler(self, received: Received, outcome: Outcome) -> None:
            outcomes.append(outcome)

    app = make_app(middleware=[Dedupe()])
    queue = f"{prefix}.dedupe"
    ran: list[int] = []

    @app.task(queue=queue)
    async def job(n: int) -> None:
        ran.append(n)

    worker = await app.start_consumers()
    await job.apply_async((1,), headers={"x-duplicate": True})
    await job.delay(2)
    await wait_for(lambda: len(outcomes) == 2, what="both messages settled")
    await worker.stop()
    assert ran == [2]
    skipped = [o for o in outcomes if isinstance(o.error, Skip)]
    assert len(skipped) == 1
    assert skipped[0].error is not None
    assert str(skipped[0].error) == "seen before"
    assert await probe.count(queue) == 0


async def test_a_failing_hook_is_logged_and_the_message_still_runs(
    make_app: AppFactory, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Middleware):
        async def before_handler(self, received: Received) -> None:
            raise ConnectionError("store is down")

        async def after_handler(self, received: Received, outcome: Outcome) -> None:
            raise ConnectionError("store is still down")

    app = make_app(middleware=[Broken()])
    ran: list[int] = []

    @app.task(queue=f"{prefix}.robust")
    async def job(n: int) -> None:
        ran.append(n)

    caplog.set_level(logging.ERROR, logger="cuebx.middleware")
    worker = await app.start_consumers()
    handle = await job.delay(7)
    await wait_for(lambda: ran == [7], what="the handler")
    await wait_for(lambda: len(caplog.records) == 2, what="both hook failures logged")
    await worker.stop()
    for record in caplog.records:
        assert "middleware Broken failed" in record.getMessage()
        assert record.message_id == handle.id  # type: ignore[attr-defined]
        assert record.task == "job"  # type: ignore[attr-defined]


async def test_a_before_publish_hook_that_raises_fails_the_publish_and_publishes_nothing(
    make_app: AppFactory, prefix: str, probe: Probe
) -> None:
    class Refuse(Middleware):
        async def before_publish(self, publish: Publish) -> None:
            raise PublishError(f"refusing {publish.task_name}")

    app = make_app(middleware=[Refuse()])
    queue = f"{prefix}.refused"

    @app.task(queue=queue)
    async def job() -> None: ...

    with pytest.raises(PublishError, match="refusing job"):
        await job.delay()
    assert await probe.count(queue) == 0


async def test_a_rejected_message_reaches_on_dead_letter_as_rejected(
    make_app: AppFactory, prefix: str
) -> None:
    journal: list[str] = []
    app = make_app(middleware=[Recorder("r", journal)])
    queue = f"{prefix}.reject"

    @app.task(queue=queue)
    async def job() -> None:
        raise Reject("bad order")

    worker = await app.start_consumers()
    await job.delay()
    await wait_for(lambda: "r:on_dead_letter rejected job" in journal)
    await worker.stop()
    [dead] = await dead_letters(app, queue)
    assert dead.reason == "rejected"


async def test_serve_runs_beside_the_consumers_until_the_stop_begins(
    make_app: AppFactory, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    journal: list[str] = []

    class Service(Middleware):
        async def serve(self, worker: WorkerView) -> None:
            journal.append(f"serving {','.join(worker.queue_names)}")
            try:
                await anyio.sleep_forever()
            finally:
                journal.append("service cancelled")

    class Broken(Middleware):
        async def serve(self, worker: WorkerView) -> None:
            raise RuntimeError("the service fell over")

    app = make_app(middleware=[Service(), Broken()])
    queue = f"{prefix}.served"
    ran: list[int] = []

    @app.task(queue=queue)
    async def job(n: int) -> None:
        journal.append("handler")
        ran.append(n)

    worker = await app.start_consumers()
    await wait_for(lambda: f"serving {queue}" in journal, what="the service to start")
    await job.delay(1)
    await wait_for(lambda: ran == [1], what="the task, beside a failed service")
    await worker.stop()
    assert journal == [f"serving {queue}", "handler", "service cancelled"]
    assert any("Broken: its serve() failed" in r.getMessage() for r in caplog.records)


async def test_map_calls_after_publish_per_message_or_after_publish_many_once(
    make_app: AppFactory, prefix: str
) -> None:
    singles: list[str] = []
    batches: list[int] = []

    class PerMessage(Middleware):
        async def after_publish(self, publish: Publish, error: BaseException | None) -> None:
            singles.append(publish.message.message_id)

    class PerBatch(Middleware):
        async def after_publish_many(
            self, publishes: Sequence[Publish], errors: Sequence[BaseException | None]
        ) -> None:
            batches.append(len(publishes))

    app = make_app(middleware=[PerMessage(), PerBatch()])

    @app.task(queue=f"{prefix}.batched")
    async def job(n: int) -> None: ...

    handles = await job.map([(n,) for n in range(5)])
    assert singles == [h.id for h in handles]
    assert batches == [5]

"""The metrics and tracing middleware called hook by hook, for the paths a happy run misses:
skipped and interrupted handlers, refused publishes, poison dead letters, a broker away."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry

from cuebx import Outcome, Postpone, Publish, Received, Skip, TaskContext
from cuebx.brokers.memory import MemoryBroker
from cuebx.errors import PublishError
from cuebx.message import OutgoingMessage
from cuebx.metrics import PrometheusMetrics, _waited_since
from cuebx.ops import commands
from cuebx.ops.records import DeadLetterEntry
from cuebx.ops.status import QueueGroup, QueueStatus, Status
from cuebx.topology import plan
from cuebx.tracing import OpenTelemetryTracing
from tests.unit.test_ops import FakeDelivery

pytestmark = pytest.mark.anyio


def _received(attempt: int = 0, headers: dict[str, object] | None = None) -> Received:
    context = TaskContext(
        "m1", "m1", attempt, headers or {}, "job", "jobs", published_at=datetime.now(UTC)
    )
    return Received(context, None)


def _publish() -> Publish:
    message = OutgoingMessage(b"{}", "m1", "m1", "application/json", {}, datetime.now(UTC))
    return Publish("cuebx", "jobs", message, "job")


async def test_metrics_tell_skipped_interrupted_and_refused_apart() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)

    def count(outcome: str) -> float:
        labels = {"queue": "jobs", "task": "job", "outcome": outcome}
        return registry.get_sample_value("cuebx_tasks_total", labels) or 0.0

    skipped = _received()
    await metrics.before_handler(skipped)
    await metrics.after_handler(skipped, Outcome(error=Skip("duplicate")))
    await metrics.after_handler(_received(), Outcome(error=Skip("before ours ran")))
    interrupted = _received()
    await metrics.before_handler(interrupted)
    await metrics.after_handler(interrupted, Outcome(error=anyio.get_cancelled_exc_class()()))
    assert (count("skipped"), count("interrupted")) == (2, 1)
    await metrics.after_handler(_received(), Outcome(error=Postpone(1, "rate limit")))
    postponed = _received()
    await metrics.before_handler(postponed)
    await metrics.after_handler(postponed, Outcome(error=Postpone(1, "after ours ran")))
    assert (count("postponed"), count("skipped"), count("failed")) == (2, 2, 0)

    refused = _publish()
    await metrics.before_publish(refused)
    await metrics.after_publish(refused, PublishError("nacked"))
    labels = {"queue": "jobs", "task": "job", "result": "failed"}
    assert registry.get_sample_value("cuebx_published_total", labels) == 1


async def test_queue_depths_are_not_read_from_a_broker_that_is_away() -> None:
    metrics = PrometheusMetrics(CollectorRegistry(), depth_interval=0)
    broker = MemoryBroker()
    route = metrics.route(broker, plan([]))
    code, kind, body = await route()
    assert (code, kind.split(";")[0]) == (200, "text/plain")
    assert b"cuebx_queue_messages_ready{" not in body


def test_a_delayed_message_waits_from_its_eta() -> None:
    published = datetime(2026, 1, 1, tzinfo=UTC)
    eta = published + timedelta(minutes=10)
    assert _waited_since(published, int(eta.timestamp() * 1000)) == eta.timestamp()
    assert _waited_since(None, 5000) == 5.0
    assert _waited_since(published.replace(tzinfo=None), None) == published.timestamp()
    assert _waited_since(None, None) is None


async def test_tracing_marks_skips_interruptions_refusals_and_poison() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = OpenTelemetryTracing(provider)

    refused = _publish()
    await tracing.before_publish(refused)
    assert "traceparent" in refused.headers
    await tracing.after_publish(refused, PublishError("nacked"))
    await tracing.after_publish(_publish(), None)  # never started: nothing to end

    skipped = _received(headers=dict(refused.headers))
    await tracing.before_handler(skipped)
    await tracing.after_handler(skipped, Outcome(error=Skip("duplicate")))
    interrupted = _received(headers={"x-cuebx-replayed": 2})
    await tracing.before_handler(interrupted)
    await tracing.after_handler(interrupted, Outcome(error=anyio.get_cancelled_exc_class()()))
    await tracing.after_handler(_received(), Outcome())  # before_handler never ran
    poison = _received(headers=dict(refused.headers))
    await tracing.on_dead_letter(poison, "undecodable", "not JSON")

    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["publish jobs"].status.status_code == StatusCode.ERROR
    process = [s for s in exporter.get_finished_spans() if s.name == "process jobs"]
    assert dict(process[0].attributes or {})["cuebx.skipped"] == "duplicate"
    assert dict(process[1].attributes or {})["cuebx.interrupted"] is True
    assert dict(process[1].attributes or {})["cuebx.replayed"] == 2
    dead = spans["dead-letter jobs"]
    assert dead.parent is not None
    assert dead.parent.span_id == spans["publish jobs"].context.span_id
    assert dict(dead.attributes or {})["error.type"] == "not JSON"


def test_show_prints_facts_arguments_and_headers(capsys: pytest.CaptureFixture[str]) -> None:
    headers = {"x-cuebx-task": "job", "x-cuebx-reason": "rejected", "x-cuebx-error": "no"}
    entry = DeadLetterEntry.from_delivery("jobs.dlq", FakeDelivery(headers=headers))
    commands._show_entry(entry, {"n": 1}, None)
    commands._show_entry(entry, None, "not valid json")
    out = capsys.readouterr().out
    assert "rejected" in out
    assert "{'n': 1}" in out
    assert "not valid json" in out
    assert "x-cuebx-task" in out


async def test_watch_refreshes_until_stopped(capsys: pytest.CaptureFixture[str]) -> None:
    reads = 0

    async def read() -> Status:
        nonlocal reads
        reads += 1
        main = QueueStatus("jobs", "main", True, reads, 0, 1)
        return Status("cuebx", (QueueGroup(main, (), None),), (), "broker", datetime.now(UTC))

    with anyio.move_on_after(0.3):
        await commands._watch(read, 0.05)
    assert reads >= 3
    assert "jobs" in capsys.readouterr().out

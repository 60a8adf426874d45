"""OpenTelemetry spans: one trace from publish through retries, a dead letter and a replay."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from cuebx import TaskContext
from cuebx.tracing import OpenTelemetryTracing
from tests.conftest import AppFactory, wait_for

pytestmark = pytest.mark.anyio


def _named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_one_trace_runs_from_publish_through_a_retry_a_dead_letter_and_a_replay(
    make_app: AppFactory, prefix: str
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    app = make_app(middleware=[OpenTelemetryTracing(provider)])
    queue = f"{prefix}.jobs"
    runs = 0

    @app.task(queue=queue, retries=["200ms"])
    async def flaky(ctx: TaskContext, n: int) -> None:
        nonlocal runs
        runs += 1
        with tracer.start_as_current_span("inside the handler"):
            if runs <= 2:
                raise ConnectionError(f"run {runs} failed")

    worker = await app.start_consumers()
    try:
        with tracer.start_as_current_span("request"):
            handle = await flaky.delay(7)
        await wait_for(lambda: runs == 2, timeout=10, what="two failed attempts")
        await wait_for(
            lambda: bool(_named(exporter.get_finished_spans(), f"dead-letter {queue}")),
            what="the dead letter",
        )
        report = await app.dlq.replay(all=True)
        assert report.done == 1
        await wait_for(lambda: runs == 3, timeout=10, what="the replayed run")
        await wait_for(
            lambda: len(_named(exporter.get_finished_spans(), f"process {queue}")) == 3,
            what="three attempt spans",
        )
    finally:
        await worker.stop()

    spans = list(exporter.get_finished_spans())
    [request] = _named(spans, "request")
    [publish] = _named(spans, f"publish {queue}")
    attempts = sorted(_named(spans, f"process {queue}"), key=lambda s: s.start_time or 0)
    [retry] = _named(spans, f"retry {queue}.retry.200ms")
    [dead] = _named(spans, f"dead-letter {queue}")
    assert {s.context.trace_id for s in spans if s.context} == {request.context.trace_id}

    def parent(span: ReadableSpan) -> int | None:
        return span.parent.span_id if span.parent else None

    assert publish.kind == SpanKind.PRODUCER
    assert parent(publish) == request.context.span_id
    assert publish.attributes is not None
    assert publish.attributes["messaging.system"] == "rabbitmq"
    assert publish.attributes["messaging.rabbitmq.destination.routing_key"] == queue
    assert publish.attributes["messaging.message.id"] == handle.id
    # Every attempt hangs under the publish: the message keeps its producer's traceparent.
    assert [parent(a) for a in attempts] == [publish.context.span_id] * 3
    assert [a.kind for a in attempts] == [SpanKind.CONSUMER] * 3
    assert [dict(a.attributes or {}).get("cuebx.task.attempt") for a in attempts] == [0, 1, 0]
    assert [dict(a.attributes or {}).get("cuebx.replayed") for a in attempts] == [None, None, 1]
    assert [a.status.status_code for a in attempts] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert parent(retry) == attempts[0].context.span_id
    assert parent(dead) == attempts[1].context.span_id
    assert dict(dead.attributes or {})["cuebx.dead_letter.reason"] == "exhausted"
    inside = sorted(_named(spans, "inside the handler"), key=lambda s: s.start_time or 0)
    assert [parent(s) for s in inside] == [a.context.span_id for a in attempts]


async def test_without_a_configured_sdk_tracing_costs_nothing_and_breaks_nothing(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app(middleware=[OpenTelemetryTracing(trace.NoOpTracerProvider())])
    done: list[int] = []

    @app.task(queue=f"{prefix}.jobs")
    async def job(n: int) -> None:
        done.append(n)

    worker = await app.start_consumers()
    try:
        await job.delay(1)
        await wait_for(lambda: done == [1], what="the task run")
    finally:
        await worker.stop()

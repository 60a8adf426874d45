"""OpenTelemetry tracing: a producer span per publish, a consumer span per attempt.

Needs the ``otel`` extra: ``pip install 'cuebx[otel]'`` (the API only; your application
configures the SDK and an exporter, as for any other instrumentation)::

    app = Cuebx(middleware=[OpenTelemetryTracing()])

cuebx talks to RabbitMQ through aiormq directly, so aio-pika's instrumentation never sees
its messages: this middleware makes the spans itself, after OpenTelemetry's messaging
semantic conventions (``messaging.system`` ``rabbitmq``, ``messaging.operation.type`` ``send``
or ``process``, ``messaging.destination.name``, ``messaging.message.id``...), plus
``cuebx.task.name``, ``cuebx.task.attempt`` and ``cuebx.replayed``.

The trace context travels in the message headers (W3C ``traceparent`` and ``tracestate``,
through the globally configured propagator), and cuebx keeps every header across retries,
dead letters, replays and delays, so one trace holds them all::

    publish emails                      (producer; inside your request's span, if any)
    ├── process emails   attempt 0      (consumer; the handler's own spans below it)
    │   └── retry emails.retry.30s      (the worker moved it to a retry tier)
    ├── process emails   attempt 1
    │   └── dead-letter emails          (reason exhausted)
    └── process emails   attempt 0      (after `cuebx dlq replay`: cuebx.replayed = 1)

Every attempt is a child of the publish span: the headers of a retried message are those
its producer sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.propagators.textmap import Getter
    from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, StatusCode
    from opentelemetry.util.types import AttributeValue
except ImportError as exc:  # pragma: no cover - the test environment has the extra
    raise ImportError("cuebx.tracing needs opentelemetry-api: pip install 'cuebx[otel]'") from exc

import anyio

from cuebx import __version__
from cuebx.message import HEADER_REPLAYED, DeadLetterReason
from cuebx.middleware import Middleware, Outcome, Publish, Received, Skip

__all__ = ["OpenTelemetryTracing"]

_SPAN = "cuebx.tracing.span"
_TOKEN = "cuebx.tracing.token"
_SYSTEM = "rabbitmq"


class _Headers(Getter[Mapping[str, Any]]):
    """Read a propagator's fields from AMQP headers, whose strings may arrive as bytes."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


_GETTER = _Headers()


class OpenTelemetryTracing(Middleware):
    """Emit messaging spans for cuebx's publishes and handler attempts.

    Args:
        tracer_provider: the provider to get the tracer from; the global one if None.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self.tracer = trace.get_tracer("cuebx", __version__, tracer_provider=tracer_provider)
        self._publishing: dict[int, Span] = {}

    async def before_publish(self, publish: Publish) -> None:
        message = publish.message
        span = self.tracer.start_span(
            f"publish {publish.routing_key}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.destination.name": publish.exchange,
                "messaging.rabbitmq.destination.routing_key": publish.routing_key,
                "messaging.message.id": message.message_id,
                "messaging.message.conversation_id": message.correlation_id,
                "messaging.message.body.size": len(message.body),
                "cuebx.task.name": publish.task_name,
            },
        )
        propagate.inject(publish.headers, context=trace.set_span_in_context(span))
        if len(self._publishing) > 100_000:  # publishes whose after_publish never came
            self._publishing.clear()
        self._publishing[id(publish)] = span

    async def after_publish(self, publish: Publish, error: BaseException | None) -> None:
        span = self._publishing.pop(id(publish), None)
        if span is None:
            return
        if error is not None:
            _failed(span, error)
        span.end()

    async def before_handler(self, received: Received) -> None:
        context = received.context
        parent = propagate.extract(context.headers, getter=_GETTER)
        attributes: dict[str, AttributeValue] = {
            "messaging.system": _SYSTEM,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": context.queue,
            "messaging.message.id": context.message_id,
            "messaging.message.conversation_id": context.correlation_id,
            "cuebx.task.name": context.task_name,
            "cuebx.task.attempt": context.attempt,
        }
        replayed = context.headers.get(HEADER_REPLAYED)
        if isinstance(replayed, int):
            attributes["cuebx.replayed"] = replayed
        span = self.tracer.start_span(
            f"process {context.queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        received.state[_SPAN] = span
        # The handler runs in this task: its own spans become children of this one.
        received.state[_TOKEN] = otel_context.attach(trace.set_span_in_context(span))

    async def after_handler(self, received: Received, outcome: Outcome) -> None:
        token = received.state.pop(_TOKEN, None)
        span = received.state.get(_SPAN)
        if token is None or not isinstance(span, Span):
            return
        otel_context.detach(token)
        error = outcome.error
        if isinstance(error, Skip):
            span.set_attribute("cuebx.skipped", error.reason or True)
        elif isinstance(error, anyio.get_cancelled_exc_class()):
            span.set_attribute("cuebx.interrupted", True)
        elif error is not None:
            _failed(span, error)
        span.end()

    async def on_retry(
        self, received: Received, error: BaseException, *, attempt: int, delay: float
    ) -> None:
        task = received.task
        tiers = () if task is None else task.retry_policy.tiers
        queue = tiers[attempt - 1] if 0 < attempt <= len(tiers) else received.context.queue
        self._mark(
            received,
            f"retry {queue}",
            {"cuebx.retry.attempt": attempt, "cuebx.retry.delay_s": delay},
        )

    async def on_dead_letter(
        self, received: Received, reason: DeadLetterReason, error: BaseException | str
    ) -> None:
        text = str(error) if not isinstance(error, BaseException) else type(error).__name__
        self._mark(
            received,
            f"dead-letter {received.context.queue}",
            {"cuebx.dead_letter.reason": reason, "error.type": text},
        )

    def _mark(
        self, received: Received, name: str, attributes: Mapping[str, AttributeValue]
    ) -> None:
        """A short span under the attempt's (or, for poison, under the producer's)."""
        span = received.state.get(_SPAN)
        if isinstance(span, Span):
            parent = trace.set_span_in_context(NonRecordingSpan(_context_of(span)))
        else:
            parent = propagate.extract(received.context.headers, getter=_GETTER)
        mark = self.tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.operation.type": "send",
                "messaging.operation.name": name.split(" ", 1)[0],
                "messaging.message.id": received.context.message_id,
                "cuebx.task.name": received.context.task_name,
                **attributes,
            },
        )
        mark.end()


def _context_of(span: Span) -> SpanContext:
    return span.get_span_context()


def _failed(span: Span, error: BaseException) -> None:
    span.record_exception(error)
    span.set_attribute("error.type", type(error).__qualname__)
    span.set_status(StatusCode.ERROR, str(error) or type(error).__name__)

"""Exchange types and bindings on both brokers: the memory broker routes as RabbitMQ does."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cuebx.errors import UnroutableError
from cuebx.message import OutgoingMessage
from cuebx.topology import Binding, ExchangeSpec, QueueSpec, Topology
from tests.conftest import AppFactory
from tests.unit.test_memory_exchanges import TOPIC_TABLE

pytestmark = pytest.mark.anyio


def _message(body: bytes, headers: dict[str, str] | None = None) -> OutgoingMessage:
    return OutgoingMessage(
        body=body,
        message_id=body.decode(),
        correlation_id="",
        content_type="text/plain",
        headers=headers or {},
        timestamp=datetime.now(UTC),
    )


async def test_topic_bindings_route_every_row_of_the_table_the_same_on_both_brokers(
    make_app: AppFactory, prefix: str
) -> None:
    broker = make_app().broker
    exchange = f"{prefix}.topic"
    queues = tuple(QueueSpec(f"{prefix}.{i}", "main", {}) for i in range(len(TOPIC_TABLE)))
    topology = Topology(
        "cuebx",
        queues,
        exchanges=(ExchangeSpec(exchange, "topic"),),
        bindings=tuple(
            Binding(exchange, q.name, pattern)
            for q, (pattern, _, _) in zip(queues, TOPIC_TABLE, strict=True)
        ),
    )
    await broker.connect()
    await broker.declare(topology)
    try:
        for i, (_, key, _) in enumerate(TOPIC_TABLE):
            try:
                await broker.publish(exchange, key, _message(str(i).encode()))
            except UnroutableError:
                pass  # no pattern of the table matches it
        routed = []
        for i, q in enumerate(queues):
            bodies = {m.body for m in await broker.peek(q.name)}
            routed.append(str(i).encode() in bodies)
        assert routed == [expected for _, _, expected in TOPIC_TABLE]
    finally:
        await broker.delete(topology)


async def test_headers_exchange_matches_a_non_x_header_exactly_and_hands_the_rest_on(
    make_app: AppFactory, prefix: str
) -> None:
    broker = make_app().broker
    by_header, lost = f"{prefix}.headers", f"{prefix}.lost"
    a, xa, rest = f"{prefix}.a", f"x.{prefix}.a", f"{prefix}.rest"
    topology = Topology(
        "cuebx",
        tuple(QueueSpec(name, "main", {}) for name in (a, xa, rest)),
        exchanges=(
            ExchangeSpec(lost, "fanout"),
            ExchangeSpec(by_header, "headers", {"alternate-exchange": lost}),
        ),
        bindings=(
            Binding(lost, rest),
            Binding(by_header, a, arguments={"x-match": "all", "to": a}),
            Binding(by_header, xa, arguments={"x-match": "all", "to": xa}),
        ),
    )
    await broker.connect()
    await broker.declare(topology)
    try:
        await broker.publish(by_header, "", _message(b"1", {"to": a}))
        await broker.publish(by_header, "", _message(b"2", {"to": xa}))
        await broker.publish(by_header, "", _message(b"3", {"to": "nobody"}))
        # RabbitMQ leaves x- headers out of the match: x-to alone matches no binding.
        await broker.publish(by_header, "", _message(b"4", {"x-to": a}))
        found = {q: [m.body for m in await broker.peek(q)] for q in (a, xa, rest)}
        assert found == {a: [b"1"], xa: [b"2"], rest: [b"3", b"4"]}
    finally:
        await broker.delete(topology)

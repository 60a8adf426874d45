"""The memory broker's exchanges: RabbitMQ's routing rules from tables, then end to end.

`TOPIC_TABLE` is also checked against RabbitMQ itself, in
tests/integration/test_exchanges.py, so the two brokers agree on every row.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from cuebx.brokers.memory import MemoryBroker
from cuebx.brokers.memory.exchanges import headers_match, topic_matches
from cuebx.errors import TopologyError, UnroutableError
from cuebx.message import OutgoingMessage
from cuebx.topology import Binding, ExchangeSpec, QueueSpec, Topology

#: (pattern, routing key, matches): ``*`` is exactly one word, ``#`` zero or more, an empty
#: key has no words, and an empty word between dots is a word.
TOPIC_TABLE: list[tuple[str, str, bool]] = [
    ("a", "a", True),
    ("a", "b", False),
    ("a", "a.b", False),
    ("a.b", "a.b", True),
    ("*", "a", True),
    ("*", "a.b", False),
    ("*", "", False),
    ("#", "", True),
    ("#", "a", True),
    ("#", "a.b.c", True),
    ("a.*", "a.b", True),
    ("a.*", "a", False),
    ("a.*", "a.b.c", False),
    ("a.#", "a", True),
    ("a.#", "a.b.c", True),
    ("a.#", "b.a", False),
    ("#.a", "a", True),
    ("#.a", "x.y.a", True),
    ("#.a", "a.x", False),
    ("a.#.b", "a.b", True),
    ("a.#.b", "a.x.y.b", True),
    ("a.#.b", "a.x.y.c", False),
    ("#.a.#", "x.a.y", True),
    ("*.#.*", "a", False),
    ("*.#.*", "a.b", True),
    ("#.#", "", True),
    ("*.*", "a.", True),
    ("a", "a.", False),
    ("a.*.#.b", "a.b", False),
    ("*.1.*", "0.1.0", True),
    ("*.1.*", "0.0.1", False),
    ("*.*.1", "0.0.1", True),
    ("*.*.1", "0.0.0.1", False),
]


@pytest.mark.parametrize(("pattern", "key", "expected"), TOPIC_TABLE)
def test_topic_patterns_match_as_rabbitmq_matches_them(
    pattern: str, key: str, expected: bool
) -> None:
    assert topic_matches(pattern, key) is expected


@pytest.mark.parametrize(
    ("arguments", "headers", "expected"),
    [
        ({"x-match": "all", "to": "q"}, {"to": "q"}, True),
        ({"x-match": "all", "to": "q"}, {"to": "q", "other": 1}, True),
        ({"x-match": "all", "to": "q"}, {"to": "x.q"}, False),
        ({"x-match": "all", "to": "q"}, {}, False),
        ({"to": "q", "kind": "a"}, {"to": "q"}, False),  # all is the default
        ({"x-match": "any", "to": "q", "kind": "a"}, {"kind": "a"}, True),
        ({"x-match": "any", "to": "q"}, {"kind": "a"}, False),
        ({"x-match": "all"}, {"anything": 1}, True),  # nothing to compare: all hold
        ({"x-match": "any"}, {"anything": 1}, False),
        # x- headers take no part, on either side, unless the mode says -with-x.
        ({"x-match": "all", "x-to": "q"}, {}, True),
        ({"x-match": "any", "to": "q"}, {"x-to": "q"}, False),
        ({"x-match": "all-with-x", "x-to": "q"}, {"x-to": "q"}, True),
        ({"x-match": "any-with-x", "x-to": "q"}, {"x-to": "p"}, False),
        # Values compare as AMQP does: true is not 1.
        ({"flag": True}, {"flag": 1}, False),
        ({"n": 1}, {"n": 1}, True),
    ],
)
def test_headers_bindings_match_on_all_or_any_of_their_non_x_arguments(
    arguments: dict[str, Any], headers: dict[str, Any], expected: bool
) -> None:
    assert headers_match(arguments, headers) is expected


def message(headers: dict[str, Any] | None = None) -> OutgoingMessage:
    return OutgoingMessage(
        body=b"{}",
        message_id="m1",
        correlation_id="m1",
        content_type="application/json",
        headers=headers or {},
        timestamp=datetime(2024, 5, 1, tzinfo=UTC),
    )


def queue(name: str, **arguments: Any) -> QueueSpec:
    return QueueSpec(name, "main", arguments)


@pytest.fixture
async def broker() -> AsyncIterator[MemoryBroker]:
    broker = MemoryBroker("memory://exchanges", clock="manual")
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.close()


ROUTING = Topology(
    "main",
    (queue("q.a"), queue("q.b"), queue("q.lost")),
    exchanges=(
        ExchangeSpec("lost", "fanout"),
        ExchangeSpec("by-header", "headers", {"alternate-exchange": "lost"}),
        ExchangeSpec("by-topic", "topic"),
    ),
    bindings=(
        Binding("lost", "q.lost"),
        Binding("by-header", "q.a", arguments={"x-match": "all", "to": "q.a"}),
        Binding("by-header", "q.b", arguments={"x-match": "all", "to": "q.b"}),
        Binding("by-topic", "q.a", "*.x"),
        Binding("by-topic", "by-header", "h.#", destination_type="exchange"),
    ),
)


@pytest.mark.anyio
async def test_messages_follow_exchange_to_exchange_bindings_and_alternate_exchanges(
    broker: MemoryBroker,
) -> None:
    await broker.declare(ROUTING)
    # h.x matches *.x (q.a) and h.# (on to by-header, which finds q.b by the header).
    await broker.publish("by-topic", "h.x", message({"to": "q.b"}))
    # A queue reached by two paths gets one copy.
    await broker.publish("by-topic", "h.x", message({"to": "q.a"}))
    # The headers exchange matches nothing: its alternate exchange, a fanout, takes it.
    await broker.publish("by-header", "", message({"to": "nowhere"}))

    assert [await broker.queue_length(q) for q in ("q.a", "q.b", "q.lost")] == [2, 1, 1]


@pytest.mark.anyio
async def test_a_publish_nothing_routes_and_no_alternate_takes_is_returned(
    broker: MemoryBroker,
) -> None:
    await broker.declare(ROUTING)
    with pytest.raises(UnroutableError):
        await broker.publish("by-topic", "nothing", message())
    # Routed on to by-header, which matches nothing: its alternate exchange takes it.
    await broker.publish("by-topic", "h.y", message({"to": "nobody"}))
    assert await broker.queue_length("q.lost") == 1
    with pytest.raises(UnroutableError):
        await broker.publish("main", "no-such-queue", message())


@pytest.mark.anyio
async def test_dead_letters_are_routed_through_exchanges_with_their_original_key(
    broker: MemoryBroker,
) -> None:
    waiting = Topology(
        "main",
        (queue("wait", **{"x-message-ttl": 1000, "x-dead-letter-exchange": "by-header"}),),
        exchanges=(ExchangeSpec("delayer", "topic"),),
        bindings=(Binding("delayer", "wait", "slow.#"),),
    )
    await broker.declare(ROUTING)
    await broker.declare(waiting)
    await broker.publish("delayer", "slow.x", message({"to": "q.b"}))
    await broker.publish("delayer", "slow.y", message({"to": "gone"}))
    assert await broker.queue_length("wait") == 2
    await broker.clock.advance(1)

    assert [await broker.queue_length(q) for q in ("wait", "q.b", "q.lost")] == [0, 1, 1]
    [dead] = broker.messages("q.b")
    assert dead.headers["x-death"][0]["routing-keys"] == ["slow.x"]


@pytest.mark.anyio
async def test_deleting_a_topology_deletes_its_exchanges_and_their_bindings(
    broker: MemoryBroker,
) -> None:
    await broker.declare(ROUTING)
    await broker.delete(ROUTING)
    await broker.declare(Topology("main", (queue("q.a"),)))
    with pytest.raises(Exception, match="does not exist"):
        await broker.publish("by-topic", "h.x", message())
    # The main exchange stays (other apps share it); the queue's bindings went with it.
    with pytest.raises(UnroutableError):
        await broker.publish("main", "q.b", message())


@pytest.mark.anyio
async def test_an_exchange_redeclared_with_another_type_or_alternate_is_refused(
    broker: MemoryBroker,
) -> None:
    await broker.declare(ROUTING)
    for clash in (ExchangeSpec("by-topic", "direct"), ExchangeSpec("by-header", "headers")):
        with pytest.raises(TopologyError, match=f"exchange {clash.name!r}"):
            await broker.declare(Topology("main", (), exchanges=(clash,)))
    # The same declaration again is fine.
    await broker.declare(ROUTING)


@pytest.mark.anyio
async def test_a_binding_to_something_missing_is_refused_naming_it(
    broker: MemoryBroker,
) -> None:
    with pytest.raises(TopologyError, match="exchange 'nope' does not exist"):
        await broker.declare(Topology("main", (queue("q"),), bindings=(Binding("nope", "q"),)))
    missing = Binding("main", "nope", destination_type="exchange")
    with pytest.raises(TopologyError, match="exchange 'nope' does not exist"):
        await broker.declare(Topology("main", (), bindings=(missing,)))
    with pytest.raises(TopologyError, match="reserved"):
        await broker.declare(Topology("main", (), exchanges=(ExchangeSpec("amq.x", "topic"),)))

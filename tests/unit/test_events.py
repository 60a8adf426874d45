"""Events without a broker: patterns and keys, subscriber selection, payload bodies, the plan."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
import pydantic
import pytest
from click.testing import CliRunner

from cuebx import ArgumentsError, ConfigurationError, Cuebx, TaskContext
from cuebx.cli import main
from cuebx.events import Subscriber, check_pattern, check_routing_key
from cuebx.message import HEADER_ATTEMPT, HEADER_EVENT, codec_for
from cuebx.policy import DeadLetter, Run, admit

JSON = codec_for("json")


@pytest.mark.parametrize(
    "pattern", ["order.created", "order.*", "order.#", "#", "*", "a.*.b", "a.#.b", "ünï.côdé"]
)
def test_a_topic_pattern_of_whole_words_is_accepted(pattern: str) -> None:
    assert check_pattern(pattern, "here") == pattern


@pytest.mark.parametrize(
    ("pattern", "complaint"),
    [
        ("", "non-empty string"),
        (None, "non-empty string"),
        ("order..created", "empty word"),
        (".order", "empty word"),
        ("order.", "empty word"),
        ("order*", "'order\\*': '\\*' and '#' are whole words"),
        ("or#der.x", "'or#der'"),
        ("a" * 256, "longer than AMQP's 255 bytes"),
    ],
)
def test_a_bad_topic_pattern_is_refused_naming_what_is_wrong(pattern: Any, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"^here: .*{complaint}"):
        check_pattern(pattern, "here")


@pytest.mark.parametrize(
    ("key", "complaint"),
    [
        ("order.*", "wildcard"),
        ("#", "wildcard"),
        ("order.cre*ted", "wildcard"),
        ("", "non-empty"),
        ("order..created", "empty word"),
    ],
)
def test_an_emitted_routing_key_is_concrete(key: str, complaint: str) -> None:
    assert check_routing_key("order.created", "emit()") == "order.created"
    with pytest.raises(ArgumentsError, match=complaint):
        check_routing_key(key, "emit()")


# -- subscriber selection ------------------------------------------------------------------

selection = Cuebx("memory://")


@selection.on("thing.done", queue="mixed")
async def react(n: int) -> None: ...


@selection.task(queue="mixed")
async def chore(n: int) -> None: ...


@selection.task(queue="alone")
async def solo(n: int) -> None: ...


MIXED = {"react": react, "chore": chore}


@pytest.mark.parametrize(
    ("case", "headers", "tasks", "subscriber", "chosen"),
    [
        ("an event on a queue with a subscriber", {HEADER_EVENT: "x"}, MIXED, "react", "react"),
        ("no header at all: the subscriber", {}, MIXED, "react", "react"),
        (
            "a task named on a subscriber's queue",
            {"x-cuebx-task": "chore"},
            MIXED,
            "react",
            "chore",
        ),
        ("the subscriber named, as a retry is", {"x-cuebx-task": "react"}, MIXED, "react", "react"),
        ("no subscriber, one task", {}, {"solo": solo}, None, "solo"),
        ("no subscriber, two tasks", {HEADER_EVENT: "x"}, MIXED, None, "unknown-task"),
        ("an unknown name", {"x-cuebx-task": "gone"}, MIXED, "react", "unknown-task"),
    ],
)
def test_the_worker_hands_a_message_naming_no_task_to_its_queues_subscriber(
    case: str, headers: dict[str, Any], tasks: dict[str, Any], subscriber: str | None, chosen: str
) -> None:
    decision = admit(
        queue="mixed",
        headers=headers,
        body=b"1" if chosen == "react" else b'{"n": 1}',  # a payload, or named arguments
        content_type="application/json",
        redelivered=False,
        tasks=tasks,
        max_size=1000,
        subscriber=subscriber,
    )
    if isinstance(decision, Run):
        assert decision.task.name == chosen, case
    else:
        assert isinstance(decision, DeadLetter)
        assert decision.reason == chosen, case


def test_the_plan_names_each_queues_subscriber_and_binds_its_patterns() -> None:
    topology = selection.topology()
    assert topology.queue("mixed").subscriber == "react"
    assert topology.queue("alone").subscriber is None
    [exchange] = topology.exchanges
    assert (exchange.name, exchange.type) == ("cuebx.events", "topic")
    [binding] = topology.bindings
    assert (binding.source, binding.destination, binding.routing_key) == (
        "cuebx.events",
        "mixed",
        "thing.done",
    )
    unrouted = topology.queue("cuebx.events.unrouted")
    assert (unrouted.role, dict(unrouted.arguments)) == ("events", {"x-max-length": 10_000})


def test_an_app_without_subscribers_plans_no_events_exchange() -> None:
    app = Cuebx("memory://")

    @app.task
    async def plain() -> None: ...

    assert app.topology().exchanges == ()
    assert app.topology().bindings == ()


# -- registration --------------------------------------------------------------------------


def test_a_subscriber_gets_a_queue_named_after_it_and_every_pattern_once() -> None:
    app = Cuebx("memory://", exchange="shop")

    @app.on("order.created", "order.updated", "order.created")
    async def audit(payload: Any) -> None: ...

    assert isinstance(audit, Subscriber)
    assert audit.queue == "audit"
    assert audit.options.subscribes == ("order.created", "order.updated")
    assert not audit.options.track  # an event's id is shared by its subscribers
    keys = [b.routing_key for b in app.topology().bindings if b.source == "shop.events"]
    assert keys == ["order.created", "order.updated"]


@pytest.mark.parametrize(
    ("register", "complaint"),
    [
        (lambda app: app.on()(lambda: None), "at least one routing pattern"),
        (lambda app: app.on("a.b*"), "'\\*' and '#' are whole words"),
        (lambda app: app.on("x", name="two")(lambda a, b: None), "takes 2 parameters \\(a, b\\)"),
        (lambda app: app.on("x", concurrency=0)(lambda: None), "concurrency must be"),
    ],
)
def test_a_bad_subscriber_is_refused_at_registration(register: Any, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        register(Cuebx("memory://"))


def test_two_subscribers_on_one_queue_are_refused_naming_both() -> None:
    app = Cuebx("memory://")

    @app.on("a", queue="shared")
    async def first(n: int) -> None: ...

    with pytest.raises(ConfigurationError, match="subscribers 'first', 'second' share queue"):

        @app.on("b", queue="shared")
        async def second(n: int) -> None: ...

    assert list(app.tasks) == ["first"]


# -- payload bodies ------------------------------------------------------------------------


class Order(msgspec.Struct):
    id: int
    total: float


class JustTheId(msgspec.Struct):
    id: int


@dataclasses.dataclass
class OrderRecord:
    id: int
    total: float
    note: str = ""


class OrderModel(pydantic.BaseModel):
    id: int
    total: float


payloads = Cuebx("memory://")


@payloads.on("order.created")
async def by_struct(ctx: TaskContext, order: JustTheId) -> int:
    return order.id


@payloads.on("order.created")
def by_model(order: OrderModel) -> float:
    return order.total


@payloads.on("order.created")
async def by_nothing() -> None: ...


@pytest.mark.parametrize(
    "emitted",
    [
        Order(7, 9.5),
        OrderRecord(7, 9.5, "extra"),
        OrderModel(id=7, total=9.5),
        {"id": 7, "total": 9.5},
    ],
    ids=["struct", "dataclass", "pydantic", "dict"],
)
def test_each_subscriber_reads_the_payload_as_its_own_annotation(emitted: Any) -> None:
    body = payloads.events.message("order.created", emitted).body
    assert by_struct.decode(JSON, body) == by_struct.args_type(order=JustTheId(7))
    model = by_model.decode(JSON, body)
    assert model == by_model.args_type(order=OrderModel(id=7, total=9.5))
    assert by_nothing.decode(JSON, body) == by_nothing.args_type()


def test_a_payload_missing_a_field_does_not_validate() -> None:
    with pytest.raises(msgspec.ValidationError, match="total"):
        by_model.decode(JSON, b'{"id": 7}')  # pydantic's words
    with pytest.raises(msgspec.ValidationError, match="missing required field `id`"):
        by_struct.decode(JSON, b'{"total": 7}')


def test_a_subscriber_delayed_directly_gets_the_payload_as_its_body() -> None:
    body = by_struct.encode(JSON, (JustTheId(3),), {})
    assert msgspec.json.decode(body) == {"id": 3}
    assert by_struct.encode(JSON, (), {"order": JustTheId(4)}) == b'{"id":4}'
    with pytest.raises(ArgumentsError, match="subscriber 'by_struct': invalid payload"):
        by_struct.encode(JSON, (JustTheId(3), 4), {})
    assert by_nothing.encode(JSON, (), {}) == b"null"


# -- emitted messages ----------------------------------------------------------------------


def test_an_emitted_message_names_its_event_and_no_task() -> None:
    message = payloads.events.message(
        "order.created", Order(1, 2.0), headers={"x-origin": "web"}, priority=3
    )
    assert message.headers == {"x-origin": "web", HEADER_EVENT: "order.created", HEADER_ATTEMPT: 0}
    assert message.correlation_id == message.message_id
    assert (message.priority, message.content_type) == (3, "application/json")


@pytest.mark.parametrize(
    ("key", "payload", "options", "complaint"),
    [
        ("order.*", 1, {}, "wildcard"),
        ("order.created", object(), {}, "the payload cannot be encoded"),
        ("order.created", "x" * 2000, {}, "over max_message_size"),
        ("order.created", 1, {"priority": 256}, "priority must be an integer 0..255"),
    ],
)
def test_an_event_that_cannot_be_emitted_is_refused_before_publishing(
    key: str, payload: Any, options: dict[str, Any], complaint: str
) -> None:
    app = Cuebx("memory://", max_message_size=1000)
    with pytest.raises(ArgumentsError, match=complaint):
        app.events.message(key, payload, **options)


def test_cuebx_topology_prints_the_subscribers_bindings() -> None:
    result = CliRunner().invoke(main, ["topology", "-A", "tests.unit.test_events:selection"])
    assert result.exit_code == 0, result.output
    [row] = [line for line in result.output.splitlines() if "thing.done" in line]
    assert row.replace("│", " ").split() == ["cuebx.events", "topic", "thing.done", "mixed"]

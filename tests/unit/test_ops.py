"""Pure parts of operations: reading dead letters, filters, replay copies, migrations,
RabbitMQ's refusal texts, JSON log lines."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cuebx.brokers.amqp import _current_value, _Probe
from cuebx.brokers.base import UNREADABLE
from cuebx.errors import TopologyError
from cuebx.message import OutgoingMessage, dead_letter_copy, replay_copy
from cuebx.ops.diff import QueueDifference, migration
from cuebx.ops.logs import JsonFormatter
from cuebx.ops.records import DeadLetterEntry, Selection, Summary, decode_body, read_since
from cuebx.topology import ArgumentDifference

NOW = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)


def R(argument: str, received: str, current: str) -> str:
    """RabbitMQ's refusal of a redeclaration, as it words it."""
    return (
        f"PRECONDITION_FAILED - inequivalent arg '{argument}' for queue 'q' in vhost '/': "
        f"received {received} but current is {current}"
    )


@dataclass
class FakeDelivery:
    body: bytes = b'{"n": 1}'
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = "m1"
    correlation_id: str | None = "c1"
    content_type: str | None = "application/json"
    priority: int | None = None
    timestamp: datetime | None = NOW
    redelivered: bool = False

    async def ack(self) -> None: ...

    async def reject(self, *, requeue: bool) -> None: ...


def test_a_worker_dead_letter_is_read_from_cuebx_stamps() -> None:
    message = OutgoingMessage(
        b"{}", "m1", "c1", "application/json", {"x-cuebx-task": "send", "x-retry-attempt": 2}, NOW
    )
    stamped = dead_letter_copy(
        message, reason="exhausted", queue="emails", error=KeyError("k"), now=NOW
    )
    entry = DeadLetterEntry.from_delivery("emails.dlq", FakeDelivery(headers=dict(stamped.headers)))
    assert (entry.task, entry.reason, entry.error_type, entry.attempt) == (
        "send",
        "exhausted",
        "builtins.KeyError",
        2,
    )
    assert (entry.origin_queue, entry.failed_at, entry.when) == ("emails", NOW, NOW)


def test_a_dead_letter_rabbitmq_made_is_read_from_x_death() -> None:
    died = NOW - timedelta(hours=1)
    headers = {
        "x-death": [
            {"queue": "emails", "reason": "delivery_limit", "time": died.replace(tzinfo=None)}
        ],
        "x-first-death-reason": b"delivery_limit",
        "x-first-death-queue": "emails",
    }
    entry = DeadLetterEntry.from_delivery(
        "emails.dlq", FakeDelivery(headers=headers, message_id="")
    )
    assert (entry.reason, entry.origin_queue, entry.failed_at) == ("delivery-limit", "emails", died)
    assert (entry.message_id, entry.task, entry.error) == (None, None, "")


def test_nothing_known_reads_as_unknown_with_the_publish_time() -> None:
    entry = DeadLetterEntry.from_delivery(
        "q", FakeDelivery(headers={"x-cuebx-failed-at": "garbage"})
    )
    assert (entry.reason, entry.failed_at, entry.when) == ("unknown", None, NOW)


def test_selections_match_on_every_criterion_given() -> None:
    entry = DeadLetterEntry.from_delivery(
        "q", FakeDelivery(headers={"x-cuebx-task": "a", "x-cuebx-reason": "rejected"})
    )
    assert Selection().everything
    assert Selection().matches(entry)
    assert Selection(task="a", reason="rejected", ids=frozenset({"m1"})).matches(entry)
    assert not Selection(task="b").matches(entry)
    assert not Selection(reason="exhausted").matches(entry)
    assert not Selection(ids=frozenset({"m2"})).matches(entry)
    assert Selection(since=NOW).matches(entry)
    assert not Selection(since=NOW + timedelta(seconds=1)).matches(entry)
    assert Selection(task="a", since=NOW).describe() == "task 'a', since 2026-01-31T12:00:00+00:00"


def test_since_reads_durations_and_moments() -> None:
    assert read_since("1h", now=NOW) == NOW - timedelta(hours=1)
    assert read_since(90, now=NOW) == NOW - timedelta(seconds=90)
    assert read_since("2026-01-30T08:00:00+00:00", now=NOW) == datetime(2026, 1, 30, 8, tzinfo=UTC)
    assert read_since(datetime(2026, 1, 30), now=NOW) == datetime(2026, 1, 30, tzinfo=UTC)
    assert read_since(None, now=NOW) is None
    with pytest.raises(ValueError, match="expected a duration such as '1h'"):
        read_since("yesterday", now=NOW)


def test_a_summary_counts_and_spans_each_group() -> None:
    summary = Summary()
    for hours, task in ((3, "a"), (1, "a"), (2, "b")):
        stamp = (NOW - timedelta(hours=hours)).isoformat()
        headers = {"x-cuebx-task": task, "x-cuebx-reason": "exhausted", "x-cuebx-failed-at": stamp}
        summary.add(DeadLetterEntry.from_delivery("q", FakeDelivery(headers=headers)))
    first, second = summary.groups()
    assert (first.task, first.count, first.oldest, first.newest) == (
        "a",
        2,
        NOW - timedelta(hours=3),
        NOW - timedelta(hours=1),
    )
    assert (second.task, second.count) == ("b", 1)


def test_bodies_decode_as_plain_data_or_say_why_not() -> None:
    assert decode_body("application/json", b'{"a": 1}') == ({"a": 1}, None)
    assert decode_body("application/msgpack", b"\x81\xa1a\x01") == ({"a": 1}, None)
    assert decode_body("text/x-weird", b"x")[1] == "unknown content type 'text/x-weird'"
    assert decode_body(None, b"{nope")[1].startswith("not valid json")


def test_a_replay_copy_starts_over_and_keeps_what_identifies_it() -> None:
    headers = {
        "x-cuebx-task": "send",
        "x-retry-attempt": 3,
        "x-cuebx-redeliveries": 2,
        "x-death": [{"queue": "q"}],
        "x-cuebx-replayed": 1,
        "traceparent": "00-abc-def-01",
    }
    message = OutgoingMessage(b"{}", "m1", "c1", "application/json", headers, NOW)
    stamped = dead_letter_copy(message, reason="rejected", queue="q", error="no", now=NOW)
    copy = replay_copy(stamped)
    assert (copy.message_id, copy.correlation_id, copy.body, copy.timestamp) == (
        "m1",
        "c1",
        b"{}",
        NOW,
    )
    assert dict(copy.headers) == {
        "x-cuebx-task": "send",
        "x-retry-attempt": 0,
        "x-cuebx-replayed": 2,
        "traceparent": "00-abc-def-01",
    }


def test_an_empty_queue_migrates_by_deletion_a_busy_one_through_a_shovel() -> None:
    difference = ArgumentDifference("x-queue-type", "quorum", "classic")
    empty = QueueDifference("q", "main", "different", (difference,), ready=0, consumers=0)
    [step] = migration(empty)
    assert "rabbitmqctl delete_queue q" in step
    busy = QueueDifference("q", "main", "different", (difference,), ready=5, consumers=1)
    steps = migration(busy)
    assert "shovel" in steps[3]
    assert "queue='q.v2'" in steps[-1]
    tier = QueueDifference("q.retry.1m", "retry", "different", (difference,), ready=5)
    assert not any("v2" in step for step in migration(tier))
    assert migration(QueueDifference("q", "main", "missing")) == ()
    assert QueueDifference("q", "main", "different", durable=False).describe() == (
        "the broker's queue is not durable; cuebx's are"
    )


@pytest.mark.parametrize(
    ("text", "declared", "expected"),
    [
        (
            R("x-message-ttl", "'2000'", "'1000'"),
            {"x-message-ttl": 2000},
            ("x-message-ttl", 1000),
        ),
        (
            R("x-max-priority", "the value '5' of type 'byte'", "none"),
            {},
            ("x-max-priority", None),
        ),
        (
            R("x-message-ttl", "none", "the value '1000' of type 'short'"),
            {},
            ("x-message-ttl", 1000),
        ),
        (
            R("x-single-active-consumer", "none", "the value 'true' of type 'bool'"),
            {},
            ("x-single-active-consumer", True),
        ),
        (
            R("x-ratio", "none", "the value '0.5' of type 'double'"),
            {},
            ("x-ratio", 0.5),
        ),
        (
            R("durable", "'true'", "'false'"),
            {"durable": True},
            ("durable", False),
        ),
        # Only the types differ: the same text on both sides.
        (
            R("x-message-ttl", "'1000'", "'1000'"),
            {"x-message-ttl": 1000},
            ("x-message-ttl", "1000"),
        ),
        (
            R("x-message-ttl", "'1000'", "'1000'"),
            {"x-message-ttl": "1000"},
            ("x-message-ttl", 1000),
        ),
        ("NOT_FOUND - no queue 'q'", {}, None),
    ],
)
def test_rabbitmq_s_refusals_are_read_back_with_the_queue_s_value_and_type(
    text: str, declared: dict[str, Any], expected: tuple[str, Any] | None
) -> None:
    found = _current_value(text, declared)
    assert found == expected
    if expected is not None and found is not None:
        assert type(found[1]) is type(expected[1])


def test_a_probe_cut_short_asks_again_without_its_value_then_gives_up() -> None:
    probe = _Probe({"x-dead-letter-routing-key": "very-long", "x-message-ttl": 5})
    cut = R("x-dead-letter-routing-key", "'very-long'", "'other-lo")
    assert probe.learn(cut)
    assert "x-dead-letter-routing-key" not in probe.trial
    assert not probe.learn(cut)
    assert probe.found == {"x-dead-letter-routing-key": UNREADABLE}
    with pytest.raises(TopologyError, match="cannot compare"):
        _Probe({}).learn("ACCESS_REFUSED - no")


def test_json_log_lines_carry_the_message_fields_and_the_traceback() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord(
        "cuebx.worker", logging.ERROR, __file__, 1, "task %s failed", ("send",), None
    )
    record.task, record.message_id, record.attempt = "send", "m1", 2
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = json.loads(formatter.format(record))
    assert line["message"] == "task send failed"
    assert (line["level"], line["logger"], line["task"], line["message_id"], line["attempt"]) == (
        "ERROR",
        "cuebx.worker",
        "send",
        "m1",
        2,
    )
    assert "ValueError: boom" in line["exception"]
    assert line["time"].endswith("+00:00")
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", (), None)
    assert set(json.loads(formatter.format(plain))) == {"time", "level", "logger", "message"}

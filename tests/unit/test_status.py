"""Pure parts of status, results and idempotency: state order, records, keys, options."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from cuebx import ConfigurationError, Cuebx, Received, TaskContext
from cuebx.idempotency import key_for
from cuebx.rpc import HEADER_REPLY, error_fields, failure_from_reply
from cuebx.status import (
    FINAL_STATES,
    HEADER_REPLAYED,
    decode_record,
    encode_record,
    final_state,
    generation,
    rank,
)
from cuebx.stores import StatusWrite, store_for_url
from cuebx.stores.base import latest_writes


def test_states_of_one_task_rank_in_the_order_it_moves_through_them() -> None:
    order = [
        rank("pending", 0),
        rank("started", 0),
        rank("retrying", 1),
        rank("started", 1),
        rank("retrying", 2),
        rank("started", 2),
        rank("succeeded", 2),
    ]
    assert order == sorted(order)
    assert len(set(order)) == len(order)


def test_every_final_state_outranks_any_attempt_and_ties_with_the_others() -> None:
    finals = {rank(state, 0) for state in FINAL_STATES}  # type: ignore[arg-type]
    assert len(finals) == 1  # so the first final state written stays
    assert finals.pop() > rank("started", 10_000)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, 0),
        (3, 3),
        ("2", 2),
        ("2026-12-01T10:00:00Z", 1_796_119_200_000),
        ("2026-12-01T10:00:00", 1_796_119_200_000),
        (datetime(2026, 12, 1, 10, tzinfo=UTC), 1_796_119_200_000),
        ("garbage", 1),
        (True, 1),
    ],
)
def test_a_replay_stamp_reads_as_a_generation(value: Any, expected: int) -> None:
    headers = {} if value is None else {HEADER_REPLAYED: value}
    assert generation(headers) == expected


def test_handler_failures_are_failed_and_poison_is_dead_lettered() -> None:
    assert [final_state(r) for r in ("exhausted", "rejected", "failed")] == ["failed"] * 3
    assert final_state("invalid-arguments") == final_state("delivery-limit") == "dead-lettered"


def test_a_record_keeps_every_field_and_the_value_as_json() -> None:
    data = encode_record(
        "retrying",
        task="charge",
        attempt=2,
        at=1_700_000_000.5,
        next_attempt_at=1_700_000_030.5,
        error_type="builtins.ValueError",
        error="declined",
        value=b'{"a":1}',
    )
    status, value = decode_record("t1", data)
    assert (status.id, status.state, status.task, status.attempt) == ("t1", "retrying", "charge", 2)
    assert status.next_attempt_at is not None
    assert status.updated_at is not None
    assert (status.next_attempt_at - status.updated_at).total_seconds() == 30
    assert (status.error_type, status.error) == ("builtins.ValueError", "declined")
    assert value == b'{"a":1}'
    assert decode_record("t2", None)[0].state == "unknown"
    assert decode_record("t3", encode_record("pending", task="x", attempt=0, at=0))[1] is None


def test_a_batch_keeps_only_the_highest_write_of_each_task() -> None:
    writes = [
        StatusWrite("a", 0, 2, b"started", 1),
        StatusWrite("a", 0, 1 << 40, b"succeeded", 1),
        StatusWrite("b", 0, 0, b"pending", 1),
        StatusWrite("a", 0, 0, b"pending", 1),
    ]
    kept = {w.task_id: w.data for w in latest_writes(writes)}
    assert kept == {"a": b"succeeded", "b": b"pending"}


def test_errors_are_kept_as_their_qualified_type_and_a_bounded_message() -> None:
    assert error_fields(KeyError("x")) == ("builtins.KeyError", "'x'")
    kind, text = error_fields(RuntimeError("y" * 5000))
    assert kind == "builtins.RuntimeError"
    assert len(text) == 1024
    assert text.endswith("…")
    assert error_fields("why") == ("", "why")


def test_a_reply_is_a_value_or_the_failure_it_carries() -> None:
    assert failure_from_reply("t", {HEADER_REPLY: "ok"}) is None
    failure = failure_from_reply(
        "t",
        {
            HEADER_REPLY: "dead-lettered",
            "x-cuebx-reason": "invalid-arguments",
            "x-cuebx-error": "n: expected int",
        },
    )
    assert failure is not None
    assert (failure.state, failure.reason) == ("dead-lettered", "invalid-arguments")
    assert "t dead-lettered (invalid-arguments): n: expected int" in str(failure)


def _received(app: Cuebx, name: str, **arguments: Any) -> Received:
    task = app.tasks[name]
    context = TaskContext("m1", "m1", 0, {}, name, task.queue)
    return Received(context, task, task.args_type(**arguments))


def test_idempotency_keys_come_from_the_message_id_or_the_arguments_by_name() -> None:
    app = Cuebx("memory://", store="memory://")

    @app.task(idempotent=True)
    async def by_id(n: int) -> None: ...

    @app.task(idempotency_key=lambda order_id, **_: f"order:{order_id}")
    async def by_key(ctx: TaskContext, order_id: int, amount: int) -> None: ...

    @app.task
    async def plain(n: int) -> None: ...

    assert key_for(app.tasks["by_id"], "m1", _received(app, "by_id", n=1)) == "by_id:m1"
    received = _received(app, "by_key", order_id=7, amount=3)
    assert key_for(app.tasks["by_key"], "m1", received) == "order:7"
    assert key_for(app.tasks["plain"], "m1", _received(app, "plain", n=1)) is None


def test_a_key_function_must_return_a_string() -> None:
    app = Cuebx("memory://", store="memory://")

    @app.task(idempotency_key=lambda n: n)
    async def bad(n: int) -> None: ...

    with pytest.raises(TypeError, match="returned 3, not a string"):
        key_for(app.tasks["bad"], "m1", _received(app, "bad", n=3))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"track": "yes"}, "track must be True or False"),
        ({"idempotent": 1}, "idempotent must be True or False"),
        ({"idempotency_key": "order"}, "idempotency_key must be a function"),
    ],
)
def test_bad_task_options_are_refused_naming_the_option(
    options: dict[str, Any], message: str
) -> None:
    app = Cuebx("memory://", store="memory://")
    with pytest.raises(ConfigurationError, match=message):
        app.task(**options)(lambda: None)


class Opaque:
    """A class msgspec knows nothing of."""


class Point(msgspec.Struct):
    x: int


def test_a_return_type_msgspec_cannot_encode_is_refused_at_registration() -> None:
    app = Cuebx("memory://")
    with pytest.raises(ConfigurationError, match="return type Opaque cannot be encoded"):

        @app.task
        async def bad() -> Opaque:
            return Opaque()


def test_return_values_are_checked_against_the_annotation_and_decoded_as_it() -> None:
    app = Cuebx("memory://")

    @app.task
    async def where() -> Point:
        return Point(1)

    @app.task
    async def anything():  # type: ignore[no-untyped-def]
        return {"a": 1}

    task = app.tasks["where"]
    assert task.decode_result(task.encode_result(Point(2))) == Point(2)
    with pytest.raises(msgspec.ValidationError):
        task.encode_result({"x": "no"})
    assert app.tasks["anything"].decode_result(b'{"a":1}') == {"a": 1}


def test_a_store_whose_extra_is_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import cuebx.stores.base as base

    monkeypatch.setitem(base.STORE_SCHEMES, "redis", ("cuebx_missing_module:X", "redis"))
    with pytest.raises(ConfigurationError, match=r"pip install 'cuebx\[redis\]'"):
        store_for_url("redis://localhost")
    with pytest.raises(ConfigurationError, match=r"cuebx\[redis\]"):
        Cuebx("memory://", store="redis://localhost")


@pytest.mark.parametrize("option", ["result_ttl", "call_timeout"])
def test_store_and_call_durations_are_checked(option: str) -> None:
    with pytest.raises(ConfigurationError, match=option):
        Cuebx("memory://", store="memory://", **{option: "-1s"})

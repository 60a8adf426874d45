"""`admit`: every way a delivery is sorted before a handler sees it, from one table."""

from __future__ import annotations

from typing import Any

import pytest

from cuebx import Cuebx
from cuebx.policy import CountRedelivery, DeadLetter, Run, admit

app = Cuebx("memory://")


@app.task(queue="orders")
async def place(order_id: int) -> None: ...


@app.task(queue="orders")
async def cancel(order_id: int) -> None: ...


@app.task(queue="alone")
async def solo(n: int) -> None: ...


ORDERS = {"place": place, "cancel": cancel}
ALONE = {"solo": solo}
GOOD = b'{"order_id": 7}'


def sort(
    body: bytes = GOOD,
    headers: dict[str, Any] | None = None,
    *,
    tasks: dict[str, Any] = ORDERS,
    content_type: str | None = "application/json",
    redelivered: bool = False,
    limit: int | None = None,
    max_size: int = 1000,
) -> Any:
    return admit(
        queue="orders",
        headers={"x-cuebx-task": "place"} if headers is None else headers,
        body=body,
        content_type=content_type,
        redelivered=redelivered,
        tasks=tasks,
        max_size=max_size,
        redelivery_limit=limit,
    )


@pytest.mark.parametrize(
    ("case", "decision", "reason", "detail"),
    [
        ("a named task with valid arguments", sort(), None, None),
        ("one task on the queue and no header", sort(b'{"n": 1}', {}, tasks=ALONE), None, None),
        (
            "an unknown task name",
            sort(headers={"x-cuebx-task": "refund"}),
            "unknown-task",
            "no task named 'refund' on queue 'orders' (tasks: 'place', 'cancel')",
        ),
        (
            "no header on a queue of two tasks",
            sort(headers={}),
            "unknown-task",
            "no x-cuebx-task header and queue 'orders' has tasks 'place', 'cancel'",
        ),
        (
            "a task header that is not a string",
            sort(headers={"x-cuebx-task": ["place"]}),
            "unknown-task",
            "no task named ['place']",
        ),
        (
            "a body over the size limit",
            sort(max_size=5),
            "too-large",
            "body of 15 bytes is over the limit of 5 bytes",
        ),
        (
            "an unknown content type",
            sort(content_type="text/csv"),
            "undecodable",
            "unknown content type 'text/csv'",
        ),
        ("a body that is not JSON", sort(b"{oops"), "undecodable", "JSON"),
        (
            "an argument of the wrong type",
            sort(b'{"order_id": "x"}'),
            "invalid-arguments",
            "Expected `int`, got `str` - at `$.order_id`",
        ),
        ("a missing argument", sort(b"{}"), "invalid-arguments", "missing required field"),
        ("JSON that is not an object", sort(b"[1]"), "invalid-arguments", "Expected `object`"),
        ("a first redelivery on a classic queue", sort(redelivered=True, limit=3), None, None),
        (
            "a redelivery at the limit",
            sort(
                headers={"x-cuebx-task": "place", "x-cuebx-redeliveries": 2},
                redelivered=True,
                limit=3,
            ),
            "delivery-limit",
            "delivered 3 times without finishing (the limit is 3)",
        ),
        ("a redelivery where the broker counts (no limit)", sort(redelivered=True), None, None),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_admit_sorts_each_delivery(
    case: str, decision: Any, reason: str | None, detail: str | None
) -> None:
    if reason is None:
        assert isinstance(decision, Run | CountRedelivery), case
        return
    assert isinstance(decision, DeadLetter), case
    assert decision.reason == reason
    assert detail is not None
    assert detail in str(decision.detail)


def test_a_runnable_delivery_carries_its_task_and_decoded_arguments() -> None:
    decision = sort()
    assert isinstance(decision, Run)
    assert decision.task is place
    assert decision.arguments.order_id == 7  # type: ignore[attr-defined]


def test_a_redelivery_below_the_limit_is_counted_one_up() -> None:
    headers = {"x-cuebx-task": "place", "x-cuebx-redeliveries": "1"}
    assert sort(headers=headers, redelivered=True, limit=5) == CountRedelivery(2)


def test_the_redelivery_check_comes_before_decoding() -> None:
    # A message that kills workers is counted even when its body would not decode.
    assert sort(b"{oops", redelivered=True, limit=5) == CountRedelivery(1)

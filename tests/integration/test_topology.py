"""Declaring the topology, on both brokers."""

from __future__ import annotations

import pytest

from cuebx import TopologyConflictError
from tests.conftest import AppFactory

pytestmark = pytest.mark.anyio


async def test_a_clashing_declaration_names_the_queue_the_argument_and_what_cuebx_wanted(
    make_app: AppFactory, prefix: str
) -> None:
    queue = f"{prefix}.jobs"
    first = make_app()

    @first.task(queue=queue, retries=["5s"])
    async def job(n: int) -> None: ...

    await first.connect()

    second = make_app()

    @second.task(queue=queue, retries=["5s"], dead_letter=f"{prefix}.other-dlq")
    async def job2(n: int) -> None: ...

    with pytest.raises(TopologyConflictError) as caught:
        await second.connect()

    message = str(caught.value)
    assert caught.value.queue == queue
    assert f"queue {queue!r}" in message
    assert "x-dead-letter-routing-key" in message
    assert f"{prefix}.other-dlq" in message


async def test_both_brokers_describe_a_clash_in_the_same_words(
    make_app: AppFactory, prefix: str
) -> None:
    queue = f"{prefix}.ranked"
    first = make_app(max_priority=5)

    @first.task(queue=queue)
    async def job() -> None: ...

    await first.connect()
    second = make_app(max_priority=10)

    @second.task(queue=queue)
    async def job2() -> None: ...

    with pytest.raises(TopologyConflictError) as caught:
        await second.connect()

    assert caught.value.detail == "argument 'x-max-priority': cuebx wants 10, the broker has 5"

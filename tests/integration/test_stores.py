"""The store contract on memory://, Redis and PostgreSQL: conditional writes, expiry, leases."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import anyio
import anyio.lowlevel
import pytest

from cuebx import ConfigurationError, StoreUnavailableError
from cuebx.status import rank
from cuebx.stores import StatusWrite, Store, store_for_url
from tests.conftest import wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(any_store: str) -> AsyncIterator[Store]:
    opened = store_for_url(any_store)
    await opened.connect()
    try:
        yield opened
    finally:
        await opened.close()


def write(
    task_id: str, state: str, attempt: int = 0, *, gen: int = 0, ttl: int = 60_000
) -> StatusWrite:
    return StatusWrite(task_id, gen, rank(state, attempt), state.encode(), ttl)


async def test_a_pending_written_after_started_does_not_move_the_task_back(store: Store) -> None:
    # The worker was faster than the publisher's confirm.
    await store.put_status([write("t1", "started")])
    await store.put_status([write("t1", "pending")])
    assert await store.get_status("t1") == b"started"


async def test_a_batch_keeps_the_highest_write_of_each_task_whatever_its_order(
    store: Store,
) -> None:
    await store.put_status(
        [write("t1", "succeeded"), write("t1", "started"), write("t2", "retrying", 1)]
    )
    await store.put_status([write("t2", "started", 0), write("t1", "failed")])
    assert await store.get_status("t1") == b"succeeded"  # the first final state stays
    assert await store.get_status("t2") == b"retrying"


async def test_a_replay_generation_starts_a_dead_lettered_task_over(store: Store) -> None:
    await store.put_status([write("t1", "dead-lettered")])
    await store.put_status([write("t1", "started", gen=1)])
    assert await store.get_status("t1") == b"started"


async def test_records_expire_and_then_read_as_absent(store: Store) -> None:
    await store.put_status([write("t1", "succeeded", ttl=200)])
    assert await store.get_status("t1") == b"succeeded"
    await wait_for(lambda: _absent(store, "t1"), timeout=5, what="the record to expire")
    assert await store.get_status("never-written") is None
    # An expired record does not block a new one of lower rank.
    await store.put_status([write("t1", "pending")])
    assert await store.get_status("t1") == b"pending"


async def _absent(store: Store, task_id: str) -> bool:
    return await store.get_status(task_id) is None


async def test_a_key_is_held_by_one_owner_until_released_then_done_for_good(
    store: Store,
) -> None:
    assert await store.acquire("k", "a", 10_000) == ("acquired", 10_000)
    state, left = await store.acquire("k", "b", 10_000)
    assert state == "held"
    assert 0 < left <= 10_000
    assert await store.acquire("k", "a", 10_000) == ("acquired", 10_000)  # its own: renewed
    assert await store.renew("k", "a", 10_000) is True
    assert await store.renew("k", "b", 10_000) is False
    await store.release("k", "b")  # not its key: nothing happens
    assert (await store.acquire("k", "b", 10_000))[0] == "held"
    await store.release("k", "a")
    assert (await store.acquire("k", "b", 10_000))[0] == "acquired"
    await store.complete("k", "b", 60_000)
    assert (await store.acquire("k", "c", 10_000))[0] == "done"
    assert await store.renew("k", "b", 10_000) is False


async def test_a_lease_that_is_not_renewed_ends_and_frees_the_key(store: Store) -> None:
    assert (await store.acquire("k", "dead-worker", 200))[0] == "acquired"
    with anyio.fail_after(5):
        while (await store.acquire("k", "other", 10_000))[0] != "acquired":
            await anyio.sleep(0.05)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "postgresql://postgres@127.0.0.1:1/test"])
async def test_a_store_nobody_listens_on_fails_fast_with_a_clear_error(url: str) -> None:
    store = store_for_url(url, timeout=0.5)
    try:
        with anyio.fail_after(5), pytest.raises(StoreUnavailableError, match=r"127\.0\.0\.1"):
            await store.get_status("t1")
    finally:
        await store.close()


def test_an_unknown_store_scheme_names_the_schemes() -> None:
    with pytest.raises(ConfigurationError, match=r"scheme 'mongodb'.*redis"):
        store_for_url("mongodb://localhost")


def test_a_postgres_schema_must_be_a_plain_identifier() -> None:
    with pytest.raises(ConfigurationError, match="schema must be a plain identifier"):
        store_for_url("postgresql://localhost/db?schema=x;drop")


async def test_writes_that_come_while_a_batch_is_on_its_way_go_together_as_the_next(
    store: Store,
) -> None:
    """Group commit: one batch in flight; the writes that come meanwhile wait and go as one."""
    from cuebx.results import _Writer

    batches: list[list[str]] = []
    gate = anyio.Event()
    put = store.put_status

    async def counted(writes: Sequence[StatusWrite]) -> None:
        batches.append([w.task_id for w in writes])
        if len(batches) == 1:
            await gate.wait()  # the first batch is on its way while the others come
        await put(writes)

    store.put_status = counted  # type: ignore[method-assign]
    writer = _Writer(store, backlog=100)
    async with anyio.create_task_group() as group:
        group.start_soon(writer.write, write("first", "succeeded"))
        await wait_for(lambda: len(batches) == 1, what="the first batch on its way")
        for i in range(20):  # one at a time, a loop turn apart
            group.start_soon(writer.write, write(f"later{i}", "succeeded"))
            await anyio.lowlevel.checkpoint()
        gate.set()
    assert batches == [["first"], [f"later{i}" for i in range(20)]]
    assert await store.get_status("later19") == b"succeeded"

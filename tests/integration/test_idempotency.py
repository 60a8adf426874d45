"""Idempotent tasks on RabbitMQ: duplicate deliveries and keys skipped, leases, failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from cuebx import Cuebx, Idempotency, TaskContext
from tests.conftest import AppFactory, wait_for
from tests.stores import store_url

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parents[2]


def _idempotency(app: Cuebx) -> Idempotency:
    found = app.middleware.find(Idempotency)
    assert found is not None
    return found


async def test_a_duplicate_delivery_of_a_completed_message_is_acked_without_running(
    make_rabbit_app: AppFactory, prefix: str, any_store: str
) -> None:
    app = make_rabbit_app(store=any_store)
    runs: list[str] = []

    @app.task(queue=f"{prefix}.q", idempotent=True)
    async def ship(ctx: TaskContext, parcel: str) -> None:
        runs.append(ctx.message_id)

    worker = await app.start_consumers()
    first = await ship.apply_async(args=("p1",), message_id="ship-1")
    await first.result(timeout=10)
    await ship.apply_async(args=("p1",), message_id="ship-1")  # a duplicate publish
    await wait_for(lambda: _idempotency(app).skipped == 1, what="the duplicate skipped")
    await worker.stop()
    assert runs == ["ship-1"]
    assert (await first.status()).state == "succeeded"  # the skip did not overwrite it


async def test_a_second_message_with_a_completed_key_is_skipped_and_says_so(
    make_rabbit_app: AppFactory, prefix: str
) -> None:
    app = make_rabbit_app(store="memory://")
    charged: list[int] = []

    @app.task(queue=f"{prefix}.q", idempotency_key=lambda order_id, **_: f"order:{order_id}")
    async def charge(order_id: int, amount: int) -> int:
        charged.append(order_id)
        return amount

    worker = await app.start_consumers()
    assert await (await charge.delay(5, 100)).result(timeout=10) == 100
    again = await charge.delay(order_id=5, amount=100)
    await wait_for(lambda: _state(again, "skipped"), what="the second one skipped")
    status = await again.status()
    assert status.reason is not None
    assert "order:5" in status.reason
    assert await (await charge.delay(6, 1)).result(timeout=10) == 1
    await worker.stop()
    assert charged == [5, 6]


async def _state(handle: object, state: str) -> bool:
    return (await handle.status()).state == state  # type: ignore[attr-defined]


async def test_a_failed_run_releases_its_key_so_the_retry_runs(
    make_rabbit_app: AppFactory, prefix: str
) -> None:
    app = make_rabbit_app(store="memory://")
    attempts: list[int] = []

    @app.task(queue=f"{prefix}.q", retries=["100ms"], idempotency_key=lambda n: f"n:{n}")
    async def flaky(ctx: TaskContext, n: int) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt == 0:
            raise RuntimeError("first try fails")
        return n

    worker = await app.start_consumers()
    assert await (await flaky.delay(1)).result(timeout=10) == 1
    await worker.stop()
    assert attempts == [0, 1]


async def test_a_key_held_by_a_running_handler_holds_back_the_other_without_a_retry(
    make_rabbit_app: AppFactory, prefix: str
) -> None:
    app = make_rabbit_app(store="memory://")
    release = anyio.Event()
    runs: list[int] = []

    @app.task(queue=f"{prefix}.q", retries=["1h"], idempotency_key=lambda n: f"n:{n}")
    async def slow(ctx: TaskContext, n: int) -> None:
        runs.append(ctx.attempt)
        await release.wait()

    worker = await app.start_consumers()
    first = await slow.delay(1)
    await wait_for(lambda: runs == [0], what="the first run")
    second = await slow.delay(1)
    await wait_for(lambda: _idempotency(app).postponed >= 1, what="the second one held back")
    assert (await second.status()).state in ("pending", "started")
    assert _idempotency(app).held == {"n:1": next(iter(_idempotency(app).held.values()))}
    release.set()
    await wait_for(lambda: _state(second, "skipped"), what="the second one skipped")
    assert (await second.status()).attempt == 0  # no retry spent
    assert (await first.status()).state == "succeeded"
    await worker.stop()
    assert runs == [0]


def test_an_idempotent_task_without_a_store_is_refused_at_registration() -> None:
    app = Cuebx("memory://")
    with pytest.raises(Exception, match="need a store"):

        @app.task(idempotent=True)
        async def once() -> None: ...


@pytest.mark.timeout(60)
async def test_a_key_held_by_a_sigkilled_worker_frees_itself_when_its_lease_ends(
    make_rabbit_app: AppFactory, rabbitmq_url: str, prefix: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.txt"
    async for store in store_url("redis", prefix):
        env = {
            **os.environ,
            "CUEBX_BROKER_URL": rabbitmq_url,
            "TEST_STORE": store,
            "TEST_LEASE": "1s",
            "TEST_QUEUE": f"{prefix}.q",
            "TEST_EXCHANGE": prefix,  # the producer's (make_rabbit_app names it so)
            "TEST_LEDGER": str(ledger),
            "PYTHONPATH": str(ROOT),
        }
        producer = make_rabbit_app(store=store)
        from tests.integration import idempotency_app

        charge = producer.task(
            queue=f"{prefix}.q", name="charge", idempotency_key=lambda order: f"order:{order}"
        )(idempotency_app.charge.fn)
        processes = [_worker(env, tmp_path, "a")]
        try:
            handle = await charge.delay(42)
            await wait_for(lambda: _starts(ledger) == 1, timeout=20, what="the first run")
            processes[0].send_signal(signal.SIGKILL)
            processes[0].wait(10)
            processes.append(_worker(env, tmp_path, "b"))
            # RabbitMQ redelivers at once; the key is free only once the 1 s lease ends.
            assert await handle.result(timeout=30) == "charged 42"
            assert _starts(ledger) == 2
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait(10)


def _worker(env: dict[str, str], tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    with (tmp_path / f"worker-{name}.log").open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "cuebx", "worker", "-A", "tests.integration.idempotency_app"],
            cwd=ROOT,
            stdout=log,
            stderr=log,
            env={**env, "TEST_CONNECTION": f"idempotency-{name}"},
        )


def _starts(ledger: Path) -> int:
    if not ledger.exists():
        return 0
    return sum(1 for line in ledger.read_text().splitlines() if line.startswith("start"))


async def test_a_long_handler_keeps_its_key_by_renewing_the_lease(
    make_rabbit_app: AppFactory, prefix: str
) -> None:
    lease = Idempotency(lease="300ms")
    app = make_rabbit_app(store="memory://", middleware=[lease])
    runs: list[int] = []

    @app.task(queue=f"{prefix}.q", idempotency_key=lambda n: f"n:{n}")
    async def long(n: int) -> None:
        runs.append(n)
        await anyio.sleep(1.2)  # four leases long

    worker = await app.start_consumers()
    first = await long.delay(1)
    await wait_for(lambda: runs == [1], what="the first run")
    second = await long.delay(1)
    await wait_for(lambda: lease.postponed >= 1, what="the second one held back")
    await first.result(timeout=10)
    await wait_for(lambda: _state(second, "skipped"), what="the second one skipped")
    await worker.stop()
    assert runs == [1]  # the lease never ended while the first one ran
    assert lease.held == {}


async def test_a_handler_finishing_during_a_graceful_stop_keeps_its_key(
    make_rabbit_app: AppFactory, prefix: str
) -> None:
    lease = Idempotency(lease="300ms")
    app = make_rabbit_app(store="memory://", middleware=[lease])
    running_now = anyio.Event()

    @app.task(queue=f"{prefix}.q", idempotency_key=lambda n: f"n:{n}")
    async def long(n: int) -> None:
        running_now.set()
        await anyio.sleep(1.2)  # four leases long, most of it after the stop began

    worker = await app.start_consumers()
    await long.delay(1)
    await running_now.wait()
    worker.request_stop()  # a deploy: SIGTERM, running handlers drain
    await anyio.sleep(0.8)  # well past one lease: only renewals keep the key
    assert lease.store is not None
    state, _ = await lease.store.acquire("n:1", "another-worker", 300)
    await worker.stop()
    assert state == "held"

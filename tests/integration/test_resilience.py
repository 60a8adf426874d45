"""Nothing lost: signals, kills, two workers, a cut connection, an unreachable broker."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest

from cuebx import BrokerUnavailableError, Cuebx, PublishError, TopologyError
from cuebx.brokers.amqp import AmqpBroker
from cuebx.brokers.base import Delivery
from tests.conftest import AppFactory, Raw, wait_for
from tests.integration import resilience_app
from tests.proxy import Proxy, running_proxy

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]

ROOT = Path(__file__).parents[2]


class Workers:
    """``cuebx worker`` subprocesses on the resilience app, and the ledger they write."""

    def __init__(self, tmp_path: Path, prefix: str, url: str) -> None:
        self.tmp_path = tmp_path
        self.ledger = tmp_path / "ledger.txt"
        self.env = {
            **os.environ,
            "CUEBX_BROKER_URL": url,
            "TEST_QUEUE": f"{prefix}.work",
            "TEST_LEDGER": str(self.ledger),
            "PYTHONPATH": str(ROOT),
        }
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, name: str = "w", **env: str) -> subprocess.Popen[bytes]:
        log = (self.tmp_path / f"worker-{name}-{len(self.processes)}.log").open("w")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cuebx",
                "worker",
                "-A",
                "tests.integration.resilience_app",
                *args,
            ],
            cwd=ROOT,
            stdout=log,
            stderr=log,
            env={**self.env, "TEST_WORKER": name, "TEST_CONNECTION": f"worker-{name}", **env},
        )
        log.close()
        self.processes.append(process)
        return process

    def lines(self, kind: str) -> list[list[str]]:
        if not self.ledger.exists():
            return []
        rows = [line.split() for line in self.ledger.read_text().splitlines()]
        return [row for row in rows if row and row[0] == kind]

    def done_ids(self) -> set[str]:
        return {row[2] for row in self.lines("done")}

    async def wait_exit(self, process: subprocess.Popen[bytes], timeout: float) -> int:
        await wait_for(lambda: process.poll() is not None, timeout=timeout, what="worker exit")
        return process.returncode

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.tmp_path.glob("worker-*.log")))

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.fixture
def workers(tmp_path: Path, prefix: str, rabbitmq_url: str) -> Iterator[Workers]:
    group = Workers(tmp_path, prefix, rabbitmq_url)
    try:
        yield group
    finally:
        group.stop_all()


@pytest.fixture
def producer(make_rabbit_app: AppFactory, prefix: str) -> Cuebx:
    """An app with the resilience app's tasks on this test's queue."""
    app = make_rabbit_app()
    for task in resilience_app.app.tasks.values():
        app.task(queue=f"{prefix}.work", name=task.name)(task.fn)
    return app


async def test_sigterm_lets_running_tasks_finish_and_requeues_the_rest(
    workers: Workers, producer: Cuebx, amqp: Raw, prefix: str
) -> None:
    await producer.tasks["ledger"].map([(n, 0.5) for n in range(20)])
    process = workers.start("--prefetch", "5", "--shutdown-timeout", "20s")
    await wait_for(lambda: len(workers.lines("start")) >= 5, what="5 tasks started")
    process.send_signal(signal.SIGTERM)
    assert await workers.wait_exit(process, 30) == 0, workers.logs()

    started = {row[2] for row in workers.lines("start")}
    completed = workers.done_ids()
    assert started == completed  # every task that started, finished
    assert len(completed) + await amqp.count(f"{prefix}.work") == 20


async def test_sigterm_past_the_shutdown_timeout_requeues_running_tasks(
    workers: Workers, producer: Cuebx, amqp: Raw, prefix: str
) -> None:
    await producer.tasks["ledger"].map([(n, 30.0) for n in range(6)])
    process = workers.start("--prefetch", "3", "--shutdown-timeout", "300ms")
    await wait_for(lambda: len(workers.lines("start")) == 3, what="3 tasks started")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert await workers.wait_exit(process, 20) == 0, workers.logs()
    assert time.monotonic() - started < 10
    assert workers.done_ids() == set()
    await wait_for(lambda: _holds(amqp, f"{prefix}.work", 6), what="all 6 back in the queue")


async def test_a_second_signal_stops_at_once_and_requeues(
    workers: Workers, producer: Cuebx, amqp: Raw, prefix: str
) -> None:
    await producer.tasks["ledger"].map([(n, 30.0) for n in range(4)])
    process = workers.start("--prefetch", "2", "--shutdown-timeout", "60s")
    await wait_for(lambda: len(workers.lines("start")) == 2, what="2 tasks started")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    await wait_for(lambda: "finishing running tasks" in workers.logs(), what="first signal seen")
    process.send_signal(signal.SIGINT)
    assert await workers.wait_exit(process, 20) == 0, workers.logs()
    assert time.monotonic() - started < 10
    await wait_for(lambda: _holds(amqp, f"{prefix}.work", 4), what="all 4 back in the queue")


async def test_a_sigkilled_worker_loses_nothing_a_new_worker_runs_every_task(
    workers: Workers, producer: Cuebx, prefix: str
) -> None:
    handles = await producer.tasks["ledger"].map([(n, 0.002) for n in range(400)])
    first = workers.start("--prefetch", "20", name="a")
    await wait_for(lambda: len(workers.done_ids()) >= 100, timeout=30, what="100 done")
    first.kill()
    first.wait(10)
    assert len(workers.done_ids()) < 400, "the kill came too late to test anything"
    second = workers.start("--prefetch", "20", name="b")
    expected = {h.id for h in handles}
    await wait_for(lambda: workers.done_ids() >= expected, timeout=60, what="every task done")
    second.send_signal(signal.SIGTERM)
    assert await workers.wait_exit(second, 30) == 0
    assert workers.done_ids() == expected


async def test_two_workers_on_one_queue_share_the_work(
    workers: Workers, producer: Cuebx, prefix: str
) -> None:
    handles = await producer.tasks["ledger"].map([(n, 0.02) for n in range(200)])
    a = workers.start("--prefetch", "5", name="a")
    b = workers.start("--prefetch", "5", name="b")
    await wait_for(lambda: len(workers.done_ids()) == 200, timeout=60, what="200 done")
    for process in (a, b):
        process.send_signal(signal.SIGTERM)
    for process in (a, b):
        assert await workers.wait_exit(process, 30) == 0
    by_worker = {name: {r[2] for r in workers.lines("done") if r[1] == name} for name in "ab"}
    assert by_worker["a"]
    assert by_worker["b"]
    assert by_worker["a"] | by_worker["b"] == {h.id for h in handles}


async def test_a_cut_connection_is_restored_and_the_worker_resumes_with_nothing_lost(
    workers: Workers, producer: Cuebx, rabbitmq_url: str, prefix: str
) -> None:
    handles = await producer.tasks["ledger"].map([(n, 0.005) for n in range(300)])
    async with running_proxy(*_host_port(rabbitmq_url)) as proxy:
        url = _proxied(rabbitmq_url, proxy)
        process = workers.start("--prefetch", "10", name="p", CUEBX_BROKER_URL=url)
        await wait_for(lambda: len(workers.done_ids()) >= 50, timeout=30, what="50 done")
        proxy.cut()
        expected = {h.id for h in handles}
        await wait_for(
            lambda: workers.done_ids() >= expected, timeout=60, what="every task done after the cut"
        )
        assert proxy.connections >= 2  # it did reconnect
        process.send_signal(signal.SIGTERM)
        assert await workers.wait_exit(process, 30) == 0, workers.logs()
    assert "consuming" in workers.logs()


async def test_a_message_that_kills_every_worker_ends_in_the_dead_letter_queue_classic(
    workers: Workers, producer: Cuebx, amqp: Raw, prefix: str
) -> None:
    await producer.tasks["crash"].delay()
    for _ in range(6):
        process = workers.start(TEST_DELIVERY_LIMIT="3")
        if not await _exits(process):  # it survived: the poison message is gone
            process.send_signal(signal.SIGTERM)
            assert await workers.wait_exit(process, 30) == 0
            break
    dead = await amqp.get(f"{prefix}.work.dlq", timeout=10)
    assert dead.headers["x-cuebx-reason"] == "delivery-limit"
    assert len(workers.lines("crash")) == 3


async def test_a_message_that_kills_every_worker_ends_in_the_dead_letter_queue_quorum(
    workers: Workers, make_rabbit_app: AppFactory, amqp: Raw, prefix: str
) -> None:
    app = make_rabbit_app(queue_type="quorum", delivery_limit=2)
    app.task(queue=f"{prefix}.work", name="crash")(resilience_app.crash.fn)
    await app.tasks["crash"].delay()
    for _ in range(6):
        process = workers.start(TEST_QUORUM="1", TEST_DELIVERY_LIMIT="2")
        if not await _exits(process):
            process.send_signal(signal.SIGTERM)
            assert await workers.wait_exit(process, 30) == 0
            break
    dead = await amqp.get(f"{prefix}.work.dlq", timeout=10)
    assert [d["reason"] for d in dead.headers["x-death"]] == ["delivery_limit"]
    assert len(workers.lines("crash")) == 3


async def _exits(process: subprocess.Popen[bytes]) -> bool:
    """True if the worker process dies within 5 s (it ran the crashing task)."""
    with anyio.move_on_after(5):
        while process.poll() is None:
            await anyio.sleep(0.05)
        return True
    return False


async def test_delay_against_an_unreachable_broker_fails_within_the_connect_timeout() -> None:
    app = Cuebx("amqp://guest:guest@127.0.0.1:1/", connect_timeout="2s")

    @app.task(queue="never")
    async def never() -> None: ...

    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match=r"127\.0\.0\.1:1"):
        await never.delay()
    assert time.monotonic() - started < 3


async def test_delay_while_the_broker_is_away_fails_within_the_publish_timeout(
    make_rabbit_app: AppFactory, rabbitmq_url: str, prefix: str
) -> None:
    queue = f"{prefix}.q"
    owner = make_rabbit_app()  # declares and, at teardown, deletes the queues on the real broker

    @owner.task(queue=queue)
    async def work() -> None: ...

    await owner.connect()
    async with running_proxy(*_host_port(rabbitmq_url)) as proxy:
        url = _proxied(rabbitmq_url, proxy)
        app = Cuebx(url, publish_timeout="1s", connection_name=f"{prefix}-away")
        app.task(queue=queue, name="work")(work.fn)
        try:
            await app.tasks["work"].delay()
            proxy.accepting = False
            proxy.cut()
            for _ in range(2):  # while the loss is noticed, then while reconnecting
                started = time.monotonic()
                with pytest.raises(PublishError, match="confirm"):
                    await app.tasks["work"].delay()
                assert time.monotonic() - started < 2.5
        finally:
            proxy.accepting = True
            await app.close()


async def _holds(amqp: Raw, queue: str, expected: int) -> bool:
    return await amqp.count(queue) == expected


async def test_delay_during_a_reconnection_waits_for_it_and_succeeds(
    make_rabbit_app: AppFactory, rabbitmq_url: str, prefix: str, amqp: Raw
) -> None:
    queue = f"{prefix}.q"
    owner = make_rabbit_app()

    @owner.task(queue=queue)
    async def work(n: int) -> None: ...

    await owner.connect()
    async with running_proxy(*_host_port(rabbitmq_url)) as proxy:
        url = _proxied(rabbitmq_url, proxy)
        app = Cuebx(url, publish_timeout="10s", connection_name=f"{prefix}-reconnecting")
        app.task(queue=queue, name="work")(work.fn)
        try:
            await app.tasks["work"].delay(0)
            proxy.cut()
            # The client noticed and is connecting again: publish into that window.
            await wait_for(lambda: proxy.connections >= 2, what="a new connection")
            for n in range(1, 21):
                await app.tasks["work"].delay(n)
        finally:
            await app.close()
    assert await amqp.count(queue) == 21


async def test_a_consumer_channel_closed_by_the_broker_is_reopened_and_consumes_again(
    make_rabbit_app: AppFactory, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_rabbit_app()
    done: list[int] = []

    @app.task(queue=f"{prefix}.reopened")
    async def job(n: int) -> None:
        done.append(n)

    caplog.set_level(logging.INFO, logger="cuebx")
    worker = await app.start_consumers()
    await job.delay(1)
    await wait_for(lambda: done == [1], what="the first message")
    # What RabbitMQ does on a consumer_timeout or a double ack: close just that channel.
    # Here an ack of a delivery tag it never sent makes it close the channel.
    assert isinstance(app.broker, AmqpBroker)
    [subscription] = app.broker._subscriptions
    channel = await subscription.channel.get_underlay_channel()
    await channel.basic_ack(999_999)
    await wait_for(lambda: "channel reopened: consuming" in caplog.text, what="the reopen")
    await job.delay(2)
    await wait_for(lambda: done == [1, 2], what="a message after the channel came back")
    await worker.stop()


def _proxied(rabbitmq_url: str, proxy: Proxy) -> str:
    target = urlsplit(rabbitmq_url)
    return rabbitmq_url.replace(
        f"{target.hostname}:{target.port or 5672}", f"127.0.0.1:{proxy.port}"
    )


async def _reconnected(app: Cuebx) -> anyio.Event:
    """An event set once the app's connection has come back with all its channels."""
    assert isinstance(app.broker, AmqpBroker)
    connection = app.broker._connection
    assert connection is not None
    done = anyio.Event()
    connection.reconnect_callbacks.add(lambda *_: done.set())
    return done


async def test_prefetch_bounds_running_handlers_across_a_reconnection(
    make_rabbit_app: AppFactory, rabbitmq_url: str, prefix: str, amqp: Raw
) -> None:
    # Quorum: the redelivery goes straight to a handler (no classic redelivery count).
    owner = make_rabbit_app(queue_type="quorum")
    queue = f"{prefix}.bounded"
    running: list[int] = []
    most = 0
    release = anyio.Event()

    async def slow(n: int) -> None:
        nonlocal most
        running.append(n)
        most = max(most, len(running))
        try:
            await release.wait()
        finally:
            running.remove(n)

    owner.task(queue=queue, name="slow", prefetch=1)(slow)
    await owner.connect()
    async with running_proxy(*_host_port(rabbitmq_url)) as proxy:
        app = Cuebx(
            _proxied(rabbitmq_url, proxy),
            queue_type="quorum",
            connection_name=f"{prefix}-bounded",
        )
        app.task(queue=queue, name="slow", prefetch=1)(slow)
        try:
            worker = await app.start_consumers()
            await app.tasks["slow"].delay(1)
            await wait_for(lambda: running == [1], what="the first handler")
            back = await _reconnected(app)
            proxy.cut()  # RabbitMQ requeues message 1; the handler runs on
            with anyio.fail_after(10):
                await back.wait()
            # Redelivered to the new channel, which has a fresh prefetch window of 1: its
            # handler must wait for the one still running (without the bound, it would run).
            [consumed] = worker.queues
            await wait_for(
                lambda: consumed.slots._freed is not None or len(running) > 1,
                what="the redelivery waiting for a slot",
            )
            release.set()
            await worker.stop()
        finally:
            await app.close()
    assert most == 1


async def test_a_consume_that_failed_leaves_no_consumer_behind_after_a_reconnection(
    make_rabbit_app: AppFactory, rabbitmq_url: str, prefix: str, amqp: Raw
) -> None:
    queue = f"{prefix}.late"
    async with running_proxy(*_host_port(rabbitmq_url)) as proxy:
        app = Cuebx(_proxied(rabbitmq_url, proxy), connection_name=f"{prefix}-ghost")
        try:
            await app.broker.connect()

            async def handler(delivery: Delivery) -> None: ...

            with pytest.raises(TopologyError, match="does not exist"):
                await app.broker.consume(queue, 1, handler)
            owner = make_rabbit_app()
            owner.task(queue=queue, name="late")(_noop)
            await owner.connect()  # the queue exists now
            back = await _reconnected(app)
            proxy.cut()
            with anyio.fail_after(10):
                await back.wait()  # every channel of the connection was restored
            declared = await amqp.channel.declare_queue(queue, passive=True)
            assert declared.declaration_result.consumer_count == 0
        finally:
            await app.close()


async def _noop() -> None: ...


def _host_port(url: str) -> tuple[str, int]:
    target = urlsplit(url)
    return target.hostname or "127.0.0.1", target.port or 5672


async def test_a_refused_connection_is_reported_once_by_cuebx_not_by_aiormq(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    app = Cuebx("amqp://guest:secret@127.0.0.1:1/", connect_timeout="2s")
    with pytest.raises(BrokerUnavailableError, match=r"guest:\*\*\*@127\.0\.0\.1:1"):
        await app.connect()
    assert not [
        r for r in caplog.records if r.name.startswith("aiormq") and r.levelno >= logging.WARNING
    ]

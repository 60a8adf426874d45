"""Periodic tasks on RabbitMQ: on time, never doubled by several workers, handed over when the
active scheduler's worker is killed, within a consumer timeout; and ``cuebx schedule``."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path

import aio_pika
import anyio
import pytest

from cuebx import Cuebx, current_context
from tests.conftest import AppMaker, wait_for
from tests.nodes import RabbitNode

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]

ROOT = Path(__file__).parents[2]


def seconds(slot: str) -> int:
    return int(datetime.fromisoformat(slot).timestamp())


def contiguous(slots: list[int]) -> bool:
    return sorted(set(slots)) == list(range(min(slots), max(slots) + 1))


async def cleanup(app: Cuebx) -> None:
    """Delete the scheduler's queues (the app's own go with `make_rabbit_app`)."""
    await app.broker.connect()
    await app.broker.delete(app.scheduler.topology())


@pytest.fixture
async def schedulers(make_rabbit_app: AppMaker, prefix: str) -> AsyncIterator[list[Cuebx]]:
    apps: list[Cuebx] = []
    yield apps
    if apps:
        await cleanup(apps[0])


@pytest.mark.parametrize("workers", [2, 3])
async def test_every_second_fires_each_slot_once_and_on_time_with_several_workers(
    make_rabbit_app: AppMaker, prefix: str, schedulers: list[Cuebx], workers: int
) -> None:
    runs: list[tuple[int, float, str]] = []
    for n in range(workers):
        app = make_rabbit_app(exchange=prefix, connection_name=f"{prefix} worker {n}")

        @app.task(queue=f"{prefix}.q", name="tick")
        async def tick() -> None:
            context = current_context()
            runs.append((seconds(context.headers["x-cuebx-slot"]), time.time(), context.message_id))

        app.schedule(tick, every="1s")
        schedulers.append(app)
    started = [await app.start_consumers() for app in schedulers]
    try:
        await wait_for(lambda: len(runs) >= 4, timeout=10, what="four fires")
    finally:
        for worker in started:
            await worker.stop()
    slots = [slot for slot, _, _ in runs]
    assert Counter(slots).most_common(1)[0][1] == 1, f"a slot fired twice: {sorted(slots)}"
    assert contiguous(slots)
    late = [ran - slot for slot, ran, _ in runs]
    assert max(late) < 1.0, f"fired late: {late}"
    assert all(mid.startswith("cron:tick:") for _, _, mid in runs)


class Workers:
    """``cuebx worker`` subprocesses on periodic_app, with their logs."""

    def __init__(self, tmp_path: Path, prefix: str, url: str) -> None:
        self.tmp_path = tmp_path
        self.prefix = prefix
        self.env = {
            **os.environ,
            "CUEBX_BROKER_URL": url,
            "TEST_PREFIX": prefix,
            "PYTHONPATH": str(ROOT),
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> subprocess.Popen[bytes]:
        log = (self.tmp_path / f"{name}.log").open("w")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cuebx",
                "worker",
                "-A",
                "tests.integration.periodic_app",
                "-Q",
                f"{self.prefix}.idle",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=log,
            env={**self.env, "TEST_CONNECTION": f"periodic {name}"},
        )
        log.close()
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text()

    def leads(self, name: str) -> bool:
        return "is now the active scheduler" in self.log(name)

    def fires(self, name: str) -> int:
        return self.log(name).count("fired slot")

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.fixture
def cli_workers(tmp_path: Path, prefix: str, rabbitmq_url: str) -> Iterator[Workers]:
    group = Workers(tmp_path, prefix, rabbitmq_url)
    try:
        yield group
    finally:
        group.stop_all()


async def test_a_sigkilled_active_scheduler_hands_over_without_skipping_or_doubling_a_slot(
    cli_workers: Workers, make_rabbit_app: AppMaker, prefix: str, rabbitmq_url: str
) -> None:
    # The test's own view of periodic_app: same exchange and queues, to read and clean up.
    probe = make_rabbit_app(exchange=prefix)

    @probe.task(queue=f"{prefix}.ticks")
    async def tick() -> None: ...

    @probe.task(queue=f"{prefix}.idle")
    async def idle() -> None: ...

    probe.schedule(tick, every="1s")
    await probe.connect()
    try:
        cli_workers.start("a")
        cli_workers.start("b")
        await wait_for(
            lambda: cli_workers.fires("a") + cli_workers.fires("b") >= 2,
            timeout=20,
            what="two fires",
        )
        leader, other = ("a", "b") if cli_workers.leads("a") else ("b", "a")
        assert not cli_workers.leads(other)
        killed = time.monotonic()
        cli_workers.processes[leader].send_signal(signal.SIGKILL)
        await wait_for(lambda: cli_workers.leads(other), timeout=10, what="the other taking over")
        handover = time.monotonic() - killed
        await wait_for(lambda: cli_workers.fires(other) >= 2, timeout=10, what="its fires")
        # cuebx schedule shows the new active scheduler, worker b.
        shown = subprocess.run(
            [sys.executable, "-m", "cuebx", "schedule", "-A", "tests.integration.periodic_app"],
            cwd=ROOT,
            env={**cli_workers.env, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        cli_workers.processes[other].send_signal(signal.SIGTERM)
        await wait_for(lambda: cli_workers.processes[other].poll() is not None, timeout=15)
        fired = await probe.broker.peek(f"{prefix}.ticks", 1000)
    finally:
        cli_workers.stop_all()
        await cleanup(probe)
    assert handover < 10
    slots = [seconds(m.headers["x-cuebx-slot"]) for m in fired]
    assert contiguous(slots), f"a slot was skipped: {slots}"
    doubled = [slot for slot, n in Counter(slots).items() if n > 1]
    assert len(doubled) <= 1, f"more than the slot in flight fired twice: {doubled}"
    ids = {m.message_id for m in fired}
    assert len(ids) == len(set(slots))  # a repeat keeps its message id
    assert "every 1s" in shown
    assert f":{cli_workers.processes[other].pid}:" in shown, shown


async def test_the_active_scheduler_keeps_its_channel_under_a_short_consumer_timeout(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RabbitMQ closes the channel of a consumer that holds a delivery unacked past
    consumer_timeout: the leader re-publishes its state well within it."""
    # Not under tmp_path: the node runs as the rabbitmq user, who cannot enter pytest's
    # private temporary directories.
    node = RabbitNode.start(
        "cuebx-consumer-timeout",
        port=5721,
        base=Path(tempfile.mkdtemp(prefix="cuebx-consumer-timeout-")),
        config="consumer_timeout = 2500\n",
        advanced="[{rabbit, [{channel_tick_interval, 200}]}].\n",
    )
    try:
        # The node closes a channel that holds a delivery for over 2 s.
        connection = await aio_pika.connect(node.url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(f"{prefix}.held")
            await channel.default_exchange.publish(aio_pika.Message(b"x"), queue.name)
            async with queue.iterator() as messages:
                async for _ in messages:
                    break
            await wait_for(lambda: channel.is_closed, timeout=10, what="the consumer timeout")

        app = Cuebx(node.url, exchange=prefix, connection_name=f"{prefix} leader")
        runs: list[int] = []

        @app.task(queue=f"{prefix}.q")
        async def tick() -> None:
            runs.append(seconds(current_context().headers["x-cuebx-slot"]))

        app.schedule(tick, every="3s")
        app.scheduler.configure(refresh="1s")
        with caplog.at_level(logging.INFO, logger="cuebx.scheduler"):
            worker = await app.start_consumers()
            try:
                await anyio.sleep(7)
                assert app.scheduler.leading == {"tick"}
                changes = [r.message for r in caplog.records if "active scheduler" in r.message]
            finally:
                await worker.stop()
                await app.close()
        # Became active once and never lost its channel (a timed-out channel steps it down).
        assert len(changes) == 1, changes
        assert len(runs) >= 2
        assert contiguous([r // 3 for r in runs])
        assert len(set(runs)) == len(runs)
    finally:
        node.remove()

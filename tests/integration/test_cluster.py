"""A worker on a three-node RabbitMQ cluster with quorum queues loses its node and carries on.

The cluster is tests/nodes.py's (ports 5701-5703, never the shared node on 5672), started once
for this module. The worker is ``cuebx worker --processes 2`` given the three URLs, and a
producer in the test publishes all along, each publish bounded by a deadline.
"""

from __future__ import annotations

import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from cuebx import Cuebx, PublishError
from tests.conftest import wait_for
from tests.integration import scaleout_app
from tests.integration.scaleout import WorkerRun
from tests.nodes import RabbitCluster

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]

PUBLISH_TIMEOUT = 5.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    # Not under pytest's tmp_path: the nodes run as the rabbitmq user, which cannot enter it.
    base = Path(tempfile.mkdtemp(prefix="cuebx-test-cluster-"))
    base.chmod(0o755)
    started = RabbitCluster.start("cuebx-t15", ports=(5701, 5702, 5703), base=base)
    try:
        yield started
    finally:
        started.remove()
        shutil.rmtree(base, ignore_errors=True)


class Producer:
    """Publish one task after another until told to stop; sort every publish by how it ended."""

    def __init__(self, app: Cuebx) -> None:
        self.app = app
        self.confirmed: list[str] = []
        self.confirmed_after_kill: set[str] = set()
        self.failed: list[str] = []
        self.hung = 0
        self.killed = False
        self.stop = anyio.Event()

    async def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            # Started after the kill: it cannot have gone to the killed node.
            after_kill = self.killed
            try:
                # Publish timeout plus a margin: a publish that outlives it has hung.
                with anyio.fail_after(PUBLISH_TIMEOUT + 3):
                    handle = await self.app.tasks["ledger"].delay(n, 0.005)
            except PublishError as exc:
                self.failed.append(str(exc))
            except TimeoutError:
                self.hung += 1
            else:
                self.confirmed.append(handle.id)
                if after_kill:
                    self.confirmed_after_kill.add(handle.id)
            await anyio.sleep(0.005)


async def test_killing_the_node_a_worker_uses_loses_no_confirmed_task(
    cluster: RabbitCluster, tmp_path: Path, prefix: str
) -> None:
    queue = f"{prefix}.work"
    app = Cuebx(
        cluster.urls,
        queue_type="quorum",
        publish_timeout=PUBLISH_TIMEOUT,
        connection_name=f"{prefix}-producer",
    )
    for task in scaleout_app.app.tasks.values():
        app.task(queue=queue, name=task.name)(task.fn)
    # Declared through node 1: its member of each quorum queue leads, and node 1 is killed.
    await app.connect()
    producer = Producer(app)
    run = WorkerRun(tmp_path, queue, cluster.url)
    worker = run.start("--processes", "2", "--prefetch", "10", TEST_QUORUM="1")
    try:
        await run.wait_ready(2)
        async with anyio.create_task_group() as group:
            group.start_soon(producer.run)
            await wait_for(lambda: len(run.done()) >= 200, timeout=30, what="200 tasks done")
            cluster.nodes[0].kill()
            killed_at = time.monotonic()
            producer.killed = True
            await wait_for(
                lambda: bool(run.done() & producer.confirmed_after_kill),
                timeout=10,
                what="a task published after the kill handled within 10 s",
            )
            resumed_after = time.monotonic() - killed_at
            assert not cluster.nodes[0].answers()  # it resumed while the node is still down
            await wait_for(
                lambda: len(run.done() & producer.confirmed_after_kill) >= 200,
                timeout=30,
                what="200 tasks published after the kill handled",
            )
            producer.stop.set()
        await wait_for(
            lambda: run.done() >= set(producer.confirmed),
            timeout=60,
            what="every confirmed task handled",
        )
        assert producer.hung == 0
        assert all("nacked" in e or "not confirmed" in e for e in producer.failed)
        worker.send_signal(signal.SIGTERM)
        assert await run.exit_code(30) == 0, run.text()
    finally:
        run.kill()
        await app.close()
    text = run.text()
    print(
        f"resumed {resumed_after:.2f}s after the kill; confirmed {len(producer.confirmed)}, "
        f"failed {len(producer.failed)}, handled {len(run.done())}"
    )
    # Both worker processes moved to a node that is up, and no log line shows a password.
    moved = re.findall(
        r"reconnected to RabbitMQ at amqp://guest:\*\*\*@127\.0\.0\.1:570[23]/", text
    )
    assert len(moved) == 2, text
    assert "guest:guest@" not in text

"""The delay ladder as only RabbitMQ can show it: what it reports, and a restart mid-delay."""

from __future__ import annotations

import json
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from cuebx import Cuebx, TaskContext
from cuebx.delays import ladder_status
from cuebx.testing import running
from cuebx.topology import ExchangeSpec, Topology
from tests.conftest import AppFactory, broker_queues
from tests.nodes import RabbitNode

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]


def _rabbitmqctl(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["rabbitmqctl", *args, "-q", "--formatter", "json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    rows: list[dict[str, Any]] = json.loads(out or "[]")
    return rows


async def _delete_ladder(app: Cuebx) -> None:
    ladder = app.delays.topology()
    main = ExchangeSpec(app.settings.exchange)
    await app.broker.connect()
    await app.broker.delete(Topology(ladder.exchange, ladder.queues, (*ladder.exchanges, main)))


async def test_the_ladder_is_declared_as_designed_classic_with_32_levels_and_quorum(
    make_rabbit_app: AppFactory, prefix: str
) -> None:
    classic = make_rabbit_app(exchange=f"{prefix}.c")
    quorum = make_rabbit_app(exchange=f"{prefix}.q", queue_type="quorum", delay_levels=4)

    @classic.task(queue=f"{prefix}.emails")
    async def send() -> None: ...

    @quorum.task(queue=f"{prefix}.orders")
    async def place() -> None: ...

    try:
        await send.apply_async(countdown="10m")
        await place.apply_async(countdown="1s")
        queues = broker_queues(prefix)
        exchanges = {
            row["name"]: row for row in _rabbitmqctl("list_exchanges", "name", "type", "durable")
        }
        bindings = _rabbitmqctl(
            "list_bindings",
            "source_name",
            "destination_name",
            "destination_kind",
            "routing_key",
            "arguments",
        )
    finally:
        await _delete_ladder(classic)
        await _delete_ladder(quorum)

    c = f"{prefix}.c.delay"
    assert {n for n in queues if n.startswith(c)} == {f"{c}.{k}" for k in range(32)} | {
        f"{c}.unroutable"
    }
    assert queues[f"{c}.0"] == {"x-message-ttl": 100, "x-dead-letter-exchange": f"{c}.deliver"}
    assert queues[f"{c}.31"] == {
        "x-message-ttl": 100 * 2**31,  # RabbitMQ takes TTLs beyond 2^32 ms (a timer of its own)
        "x-dead-letter-exchange": f"{c}.30",
    }
    assert queues[f"{c}.unroutable"] == {}
    q = f"{prefix}.q.delay"
    assert queues[f"{q}.3"] == {
        "x-queue-type": "quorum",
        "x-message-ttl": 800,
        "x-dead-letter-exchange": f"{q}.2",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert queues[f"{q}.unroutable"] == {"x-queue-type": "quorum"}

    assert exchanges[f"{c}.5"]["type"] == "headers"
    assert exchanges[f"{c}.deliver"]["type"] == "headers"
    assert exchanges[f"{c}.unroutable"]["type"] == "fanout"
    assert all(exchanges[n]["durable"] for n in exchanges if n.startswith(c))

    def bound(source: str, destination: str) -> list[dict[str, Any]]:
        return [
            b
            for b in bindings
            if b["source_name"] == source and b["destination_name"] == destination
        ]

    def arguments_of(binding: dict[str, Any]) -> dict[str, Any]:
        found = binding["arguments"]
        return {a[0]: a[-1] for a in found} if isinstance(found, list) else dict(found)

    # Exchange 5 takes what leaves level 6, by its header cuebx-delay-after-6: straight to
    # the next level it waits in (5 down to 0), or out of the ladder (-1).
    for level in range(6):
        [down] = bound(f"{c}.5", f"{c}.{level}")
        assert down["destination_kind"] == "queue"
        assert arguments_of(down) == {"x-match": "all", "cuebx-delay-after-6": level}
    [out] = bound(f"{c}.5", f"{c}.deliver")
    assert out["destination_kind"] == "exchange"
    assert arguments_of(out) == {"x-match": "all", "cuebx-delay-after-6": -1}
    assert len([b for b in bindings if b["source_name"] == f"{c}.5"]) == 7
    # Messages go straight to their first level through the default exchange: the top
    # level has no exchange, and there is no entry exchange.
    assert f"{c}.31" not in exchanges
    assert f"{c}.enter" not in exchanges
    [deliver] = bound(f"{c}.deliver", f"{prefix}.emails")
    assert arguments_of(deliver) == {"x-match": "all", "cuebx-delay-to": f"{prefix}.emails"}


class QuickRetryNode(RabbitNode):
    """A throwaway node whose quorum queues retry a dead-letter hop after 1 s, not 3 min.

    A quorum level whose message expires while the node starts may find the next level not
    up yet: at-least-once dead-lettering keeps the message and retries the hop after
    RabbitMQ's ``dead_letter_worker_publisher_confirm_timeout`` (3 minutes by default).
    Nothing is lost either way; this only keeps the test short.
    """

    def environment(self) -> dict[str, str]:
        # Written each time the node is started: whatever else wrote one, this one counts.
        advanced = self.base / "advanced.config"
        advanced.write_text("[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 1000}]}].\n")
        advanced.chmod(0o644)
        return {**super().environment(), "RABBITMQ_ADVANCED_CONFIG_FILE": str(advanced)}


@pytest.mark.timeout(150)
async def test_a_broker_restart_during_a_delay_loses_nothing_classic_and_quorum(
    prefix: str,
) -> None:
    # Not under pytest's tmp_path: the node runs as the rabbitmq user, who cannot enter it.
    base = Path(tempfile.mkdtemp(prefix="cuebx-delays-node-"))
    node = QuickRetryNode.start(f"cuebx-delays-{uuid.uuid4().hex[:6]}", port=5690, base=base)
    try:
        apps = {
            queue_type: Cuebx(
                node.url,
                exchange=f"{prefix}.{queue_type}",
                queue_type=queue_type,
                connection_name=f"{prefix} {queue_type}",
            )
            for queue_type in ("classic", "quorum")
        }
        runs: list[tuple[str, int, float, float]] = []
        for queue_type, app in apps.items():

            @app.task(queue=f"{prefix}.{queue_type}.q", name=f"remind_{queue_type}")
            async def remind(ctx: TaskContext, n: int, queue_type: str = queue_type) -> None:
                runs.append((queue_type, n, anyio.current_time(), ctx.headers["x-cuebx-eta"]))

        due: dict[tuple[str, int], float] = {}
        for queue_type, app in apps.items():
            task = app.tasks[f"remind_{queue_type}"]
            # One due while the node is down, one (most likely) after it is back.
            for n, countdown in ((1, 4.0), (2, 15.0)):
                await task.apply_async(args=(n,), countdown=countdown)
                due[(queue_type, n)] = anyio.current_time() + countdown
            assert (await ladder_status(app)).waiting == 2
            await app.close()

        node.restart()

        async with anyio.create_task_group() as group:
            for app in apps.values():
                group.start_soon(_run_until, app, runs, 4)
        assert sorted((queue_type, n) for queue_type, n, _, _ in runs) == sorted(due)
        for queue_type, n, at, _ in runs:
            assert at >= due[(queue_type, n)] - 0.05  # anyio's clock is read after the publish
        for app in apps.values():
            assert (await ladder_status(app)).waiting == 0
            await app.close()
    finally:
        node.remove()


async def _run_until(app: Cuebx, runs: list[Any], count: int) -> None:
    async with running(app):
        with anyio.fail_after(60):
            while len(runs) < count:
                await anyio.sleep(0.05)

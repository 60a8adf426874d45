"""Edges of operations, in process on ``memory://``: sweeps that cannot publish or are
interrupted, where unacked counts come from, and what the commands print for missing queues."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner
from rich.console import Console

from cuebx import Cuebx
from cuebx.brokers.base import Delivery
from cuebx.errors import PublishError
from cuebx.message import OutgoingMessage
from cuebx.ops import commands
from cuebx.ops.http import serve
from cuebx.ops.status import (
    ManagementApi,
    QueueGroup,
    QueueStatus,
    Rabbitmqctl,
    Section,
    Status,
    unacked_source,
)
from cuebx.ops.sweep import Keep, Move, Plan, sweep

pytestmark = pytest.mark.anyio


def _message(n: int) -> OutgoingMessage:
    return OutgoingMessage(b"{}", f"m{n}", f"m{n}", "application/json", {}, datetime.now(UTC))


async def _app_with(count: int) -> Cuebx:
    app = Cuebx("memory://")
    app.task(queue="jobs", name="job")(_job)
    await app.connect()
    for n in range(count):
        await app.broker.publish("", "jobs.dlq", _message(n))
    return app


async def _job() -> None: ...


async def _ids(app: Cuebx, queue: str) -> list[str]:
    state = await app.broker.queue_state(queue)
    assert state is not None
    return [m.message_id for m in await app.broker.peek(queue)]


async def test_a_copy_that_is_not_confirmed_leaves_its_message_and_stops_the_sweep() -> None:
    app = await _app_with(3)

    async def elsewhere(delivery: Delivery) -> Plan:
        return Move("nowhere", _message(9)) if delivery.message_id == "m1" else Keep()

    with pytest.raises(PublishError, match=r"1 of 3 copies from 'jobs\.dlq' were not confirmed"):
        await sweep(app.broker, "jobs.dlq", elsewhere)
    assert sorted(await _ids(app, "jobs.dlq")) == ["m0", "m1", "m2"]
    await app.close()


async def test_an_interrupted_sweep_puts_its_batch_back() -> None:
    app = await _app_with(3)

    async def fail(delivery: Delivery) -> Plan:
        raise RuntimeError("decide broke")

    with pytest.raises(RuntimeError, match="decide broke"):
        await sweep(app.broker, "jobs.dlq", fail)
    assert sorted(await _ids(app, "jobs.dlq")) == ["m0", "m1", "m2"]
    with pytest.raises(LookupError, match="queue 'nope' does not exist"):
        await sweep(app.broker, "nope", fail)
    await app.close()


async def test_a_rated_sweep_keeps_to_its_rate() -> None:
    app = await _app_with(6)
    await app.broker.declare(app.topology())

    async def move(delivery: Delivery) -> Plan:
        return Move("jobs", _message(0))

    started = anyio.current_time()
    assert await sweep(app.broker, "jobs.dlq", move, rate=20) == 6
    assert anyio.current_time() - started >= 0.25  # 6 moves at 20/s: at least 0.3 s less a batch
    await app.close()


def test_unacked_counts_come_from_the_management_api_rabbitmqctl_or_nowhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CUEBX_MANAGEMENT_URL", raising=False)
    assert unacked_source("memory://") is None
    api = unacked_source("amqp://h/prod", "http://u:p@h:15672")
    assert isinstance(api, ManagementApi)
    assert api.vhost == "prod"
    monkeypatch.setattr("shutil.which", lambda name: "/usr/sbin/rabbitmqctl")
    local = unacked_source("amqp://guest:guest@127.0.0.1:5672/")
    assert isinstance(local, Rabbitmqctl)
    assert local.vhost == "/"
    assert unacked_source("amqp://rabbit.internal/") is None
    monkeypatch.setenv("CUEBX_MANAGEMENT_URL", "http://h:15672")
    assert isinstance(unacked_source("amqp://rabbit.internal/"), ManagementApi)


async def test_the_management_api_is_read_for_the_queues_asked_for() -> None:
    rows = b'[{"name": "jobs", "messages_unacknowledged": 4}, {"name": "other"}]'

    async def queues() -> tuple[int, str, bytes]:
        return 200, "application/json", rows

    async with anyio.create_task_group() as group:
        port = await group.start(serve, {"/api/queues/%2F": queues}, "127.0.0.1", 0)
        api = ManagementApi(f"http://guest:guest@127.0.0.1:{port}/")
        assert await api.counts(["jobs"]) == {"jobs": 4}
        missing = ManagementApi(f"http://127.0.0.1:{port}", vhost="nope")
        assert await missing.counts(["jobs"]) is None  # a 404 is no answer
        group.cancel_scope.cancel()
    assert await ManagementApi("http://127.0.0.1:1").counts(["jobs"]) is None


def test_the_status_table_shows_missing_queues_sections_and_unknown_counts() -> None:
    main = QueueStatus("jobs", "main", True, 3, None, 1)
    dead = QueueStatus("jobs.dlq", "dead-letter", True, 2, None, 0)
    tier = QueueStatus("jobs.retry.1m", "retry", False)
    ladder = Section("delay", (QueueStatus("cuebx.delay.0", "delay", True, 0, None, 0),))
    found = Status("cuebx", (QueueGroup(main, (tier,), dead),), (ladder,), "n/a", datetime.now(UTC))
    console = Console(record=True, width=120)
    console.print(commands._status_table(found))
    text = console.export_text()
    assert "missing" in text
    assert "n/a" in text
    assert "cuebx.delay.0" in text
    assert found.missing == ("jobs.retry.1m",)
    assert found.to_dict()["sections"][0]["title"] == "delay"


def test_times_read_with_how_long_ago() -> None:
    now = datetime.now(UTC)
    assert commands._when(None) == "-"
    assert commands._when(now - timedelta(hours=3, minutes=5)).endswith("(3h ago)")
    assert commands._when(now - timedelta(seconds=5)).endswith("s ago)")


@pytest.fixture
def memory_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "memapp.py").write_text(
        textwrap.dedent(
            """
            from cuebx import Cuebx

            app = Cuebx("memory://")


            @app.task(queue="jobs")
            async def job(n: int) -> None: ...
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "memapp"
    sys.modules.pop("memapp", None)


def test_commands_on_an_undeclared_app_say_what_is_missing(memory_app: str) -> None:
    from cuebx.cli import main

    runner = CliRunner()
    listing = runner.invoke(main, ["dlq", "ls", "-A", memory_app])
    assert listing.exit_code == 0, listing.output
    assert "jobs.dlq does not exist on the broker" in listing.output
    named = runner.invoke(main, ["dlq", "ls", "-A", memory_app, "jobs"])
    assert named.exit_code == 1
    assert "queue 'jobs.dlq' does not exist" in named.output
    refused = runner.invoke(main, ["dlq", "replay", "-A", memory_app])
    assert refused.exit_code == 1
    assert "say which messages" in refused.output
    status = runner.invoke(main, ["status", "-A", memory_app, "--json"])
    assert status.exit_code == 0, status.output
    assert '"missing":["jobs","jobs.dlq"]' in status.output
    diff = runner.invoke(main, ["topology", "diff", "-A", memory_app])
    assert diff.exit_code == 1
    assert "missing" in diff.output
    plan = runner.invoke(main, ["topology"])
    assert plan.exit_code == 2
    assert "Missing option '-A'" in plan.output

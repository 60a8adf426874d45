"""``cuebx worker --processes N``: real worker processes on the real broker, nothing mocked.

Each test starts ``cuebx worker`` as a subprocess on `scaleout_app` (see `WorkerRun`), whose
handlers write a ledger line per start and end with their process id. The supervisor's log
lines say which worker process is which (``worker-1 (pid 1234) ready``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from cuebx import Cuebx
from cuebx.supervisor import Supervisor
from tests.conftest import AppFactory, Raw, wait_for
from tests.integration import scaleout_app
from tests.integration.scaleout import ROOT, WorkerRun

pytestmark = [pytest.mark.anyio]


@pytest.fixture
def run(tmp_path: Path, prefix: str, rabbitmq_url: str) -> Iterator[WorkerRun]:
    started = WorkerRun(tmp_path, f"{prefix}.work", rabbitmq_url)
    try:
        yield started
    finally:
        started.kill()


@pytest.fixture
def producer(make_rabbit_app: AppFactory, prefix: str) -> Cuebx:
    """An app with the scale-out app's tasks on this test's queue; deletes it afterwards."""
    app = make_rabbit_app()
    for task in scaleout_app.app.tasks.values():
        app.task(queue=f"{prefix}.work", name=task.name)(task.fn)
    return app


async def test_two_processes_share_a_thousand_tasks_between_both_children(
    run: WorkerRun, producer: Cuebx
) -> None:
    process = run.start("--processes", "2", "--prefetch", "20")
    await run.wait_ready(2)
    handles = await producer.tasks["ledger"].map([(n,) for n in range(1000)])
    expected = {h.id for h in handles}
    await wait_for(lambda: run.done() >= expected, timeout=60, what="1,000 tasks done")

    by_pid = Counter(row[1] for row in run.rows("done"))
    children = {str(pids[0]) for pids in run.ready().values()}
    assert set(by_pid) == children, run.text()  # every task ran in a child, none elsewhere
    assert str(process.pid) not in by_pid
    assert len(children) == 2
    assert min(by_pid.values()) >= 100, by_pid  # both took a real share
    process.send_signal(signal.SIGTERM)
    assert await run.exit_code(30) == 0, run.text()


async def test_a_sigkilled_child_loses_nothing_and_is_restarted(
    run: WorkerRun, producer: Cuebx
) -> None:
    run.start("--processes", "2", "--prefetch", "5")
    await run.wait_ready(2)
    # 0.2 s per task, 5 at a time per process: each always has tasks in hand for a few seconds.
    handles = await producer.tasks["ledger"].map([(n, 0.2) for n in range(200)])
    await wait_for(lambda: len(run.done()) >= 20, timeout=30, what="20 tasks done")
    slot, [victim] = next(iter(run.ready().items()))
    os.kill(victim, signal.SIGKILL)
    running = {r[2] for r in run.rows("start") if r[1] == str(victim)} - {
        r[2] for r in run.rows("done") if r[1] == str(victim)
    }
    assert running, "the child had no task in hand when it was killed"

    await wait_for(lambda: len(run.ready()[slot]) == 2, timeout=30, what=f"worker-{slot} restarted")
    assert f"worker-{slot} (pid {victim}) was killed by SIGKILL; restarting it in" in run.text()
    expected = {h.id for h in handles}
    await wait_for(lambda: run.done() >= expected, timeout=60, what="every task done")
    assert running <= {r[2] for r in run.rows("done") if r[1] != str(victim)}
    assert run.process is not None
    run.process.send_signal(signal.SIGTERM)
    assert await run.exit_code(30) == 0, run.text()


async def test_sigterm_drains_both_children_and_exits_zero_within_the_timeout(
    run: WorkerRun, producer: Cuebx, amqp: Raw, prefix: str
) -> None:
    process = run.start("--processes", "2", "--prefetch", "2", "--shutdown-timeout", "10s")
    await run.wait_ready(2)
    await producer.tasks["ledger"].map([(n, 1.0) for n in range(20)])
    await wait_for(lambda: len(run.rows("start")) == 4, what="4 tasks running")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert await run.exit_code(20) == 0, run.text()
    assert time.monotonic() - started < 10
    began = {r[2] for r in run.rows("start")}
    assert began == run.done()  # every task that started, finished
    assert len(run.done()) + await amqp.count(f"{prefix}.work") == 20
    assert len({r[1] for r in run.rows("done")}) == 2  # in both children


async def test_a_second_signal_stops_every_child_at_once_and_requeues(
    run: WorkerRun, producer: Cuebx, amqp: Raw, prefix: str
) -> None:
    process = run.start("--processes", "2", "--prefetch", "2", "--shutdown-timeout", "60s")
    await run.wait_ready(2)
    await producer.tasks["ledger"].map([(n, 60.0) for n in range(6)])
    await wait_for(lambda: len(run.rows("start")) == 4, what="4 tasks running")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    await wait_for(lambda: "SIGTERM: stopping 2 worker processes" in run.text(), what="stop")
    process.send_signal(signal.SIGINT)
    assert await run.exit_code(20) == 0, run.text()
    assert time.monotonic() - started < 10
    assert run.done() == set()

    async def all_back() -> bool:
        return await amqp.count(f"{prefix}.work") == 6

    await wait_for(all_back, what="all 6 messages back in the queue")


async def test_a_child_over_max_tasks_per_child_is_replaced_without_losing_a_task(
    run: WorkerRun, producer: Cuebx
) -> None:
    process = run.start("--processes", "1", "--prefetch", "2", "--max-tasks-per-child", "20")
    await run.wait_ready(1)
    handles = await producer.tasks["ledger"].map([(n, 0.05) for n in range(150)])
    expected = {h.id for h in handles}
    await wait_for(lambda: run.done() >= expected, timeout=60, what="every task done")

    text = run.text()
    first, second = run.ready()[1][:2]
    assert f"worker-1 (pid {first}) ran 20 tasks: starting its replacement" in text
    # The replacement registered its consumers before the first one was told to stop.
    replaced = f"worker-1 (pid {second}) replaces worker-1 (pid {first}): stopping it"
    assert text.index(f"worker-1 (pid {second}) ready") < text.index(replaced)
    assert text.index(replaced) < text.index(f"worker-1 (pid {first}) stopped")
    done = [row[2] for row in run.rows("done")]
    assert len(done) == len(set(done)) == 150  # nothing lost, nothing run twice
    assert {row[1] for row in run.rows("done")} >= {str(first), str(second)}
    process.send_signal(signal.SIGTERM)
    assert await run.exit_code(30) == 0, text


async def test_a_child_over_max_memory_per_child_is_replaced(
    run: WorkerRun, producer: Cuebx
) -> None:
    process = run.start("--max-memory-per-child", "200MiB")
    await run.wait_ready(1)
    await producer.tasks["hog"].delay(250)
    await wait_for(lambda: len(run.ready().get(1, [])) == 2, timeout=30, what="a replacement")
    first, second = run.ready()[1]
    assert re.search(rf"worker-1 \(pid {first}\) uses \d+MiB of memory, over 200MiB", run.text())
    await wait_for(lambda: f"worker-1 (pid {first}) stopped" in run.text(), what="old one stops")
    assert f"worker-1 (pid {second}) replaces worker-1 (pid {first})" in run.text()
    process.send_signal(signal.SIGTERM)
    assert await run.exit_code(30) == 0, run.text()


async def test_a_crash_loop_ends_in_a_non_zero_exit_that_names_the_exit_code(
    run: WorkerRun,
) -> None:
    run.start("--processes", "2", TEST_CRASH_ON_IMPORT="1")
    assert await run.exit_code(45) == 1, run.text()
    text = run.text()
    assert "TEST_CRASH_ON_IMPORT: this worker process cannot import the app" in text
    assert re.search(
        r"worker-\d \(pid \d+\) exited with code 1; worker-\d exited before it was ready 3 "
        r"times in a row: giving up",
        text,
    ), text


async def test_the_supervisor_reports_the_health_of_every_child(
    producer: Cuebx, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rabbitmq_url: str
) -> None:
    ledger = tmp_path / "ledger.txt"
    # Spawned children inherit the environment: it configures their copy of the app.
    for name, value in {
        "CUEBX_BROKER_URL": rabbitmq_url,
        "TEST_QUEUE": f"{prefix}.work",
        "TEST_LEDGER": str(ledger),
    }.items():
        monkeypatch.setenv(name, value)
    supervisor = Supervisor(
        scaleout_app.make_app,
        processes=2,
        max_tasks_per_child=1000,
        shutdown_timeout=5,
        heartbeat_interval=0.2,
    )
    assert supervisor.health()["ready"] is False
    codes: list[int] = []

    async def supervise() -> None:
        codes.append(await supervisor.run(handle_signals=False))

    async with anyio.create_task_group() as group:
        group.start_soon(supervise)
        await wait_for(lambda: supervisor.health()["ready"], timeout=30, what="ready")
        await producer.tasks["ledger"].map([(n,) for n in range(10)])

        def counted() -> bool:
            return sum(c["tasks"] or 0 for c in supervisor.health()["children"]) == 10

        await wait_for(counted, timeout=10, what="10 tasks counted")
        health = supervisor.health()
        assert health["status"] == "running"
        assert [c["slot"] for c in health["children"]] == [1, 2]
        for child in health["children"]:
            assert child["state"] == "ready"
            assert child["pid"] != os.getpid()
            assert child["heartbeat_age"] < 1.0
            assert child["rss"] > 10 * 1024 * 1024
            assert child["ready_at"] >= child["spawned_at"]
        assert health["stale"] == []
        supervisor.request_stop()
    assert codes == [0]
    assert supervisor.health() == {
        "status": "stopped",
        "ready": False,
        "processes": 2,
        "restarts": 0,
        "stale": [],
        "children": [],
    }


async def test_worker_processes_whose_supervisor_was_killed_stop_by_themselves(
    run: WorkerRun,
    producer: Cuebx,  # deletes the queues the worker declared
) -> None:
    process = run.start("--processes", "2")
    await run.wait_ready(2)
    children = [pids[0] for pids in run.ready().values()]
    process.kill()  # SIGKILL: the supervisor cannot tell anyone anything
    process.wait(10)

    def gone(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return True
        return "State:\tZ" in state  # exited, waiting to be reaped by init

    await wait_for(lambda: all(gone(pid) for pid in children), timeout=15, what="children gone")
    assert run.text().count("the supervisor is gone: stopping") == 2


async def test_sigterm_to_every_process_at_once_is_still_one_graceful_stop(
    run: WorkerRun, producer: Cuebx, amqp: Raw, prefix: str
) -> None:
    # What systemd's default KillMode does: SIGTERM to the supervisor and to each child.
    process = run.start("--processes", "2", "--prefetch", "1", "--shutdown-timeout", "20s")
    await run.wait_ready(2)
    await producer.tasks["ledger"].map([(n, 1.5) for n in range(4)])
    await wait_for(lambda: len(run.rows("start")) == 2, what="2 tasks running")
    for pid in [process.pid, *(pids[0] for pids in run.ready().values())]:
        os.kill(pid, signal.SIGTERM)
    assert await run.exit_code(30) == 0, run.text()
    assert len(run.done()) == 2  # both running tasks finished: nobody stopped "now"
    assert "again: stopping" not in run.text()
    assert await amqp.count(f"{prefix}.work") == 2


async def test_an_unreachable_broker_ends_in_a_non_zero_exit_naming_the_url(
    run: WorkerRun,
) -> None:
    # One process with a limit still runs under a supervisor.
    url = "amqp://guest:secret@127.0.0.1:1/"
    run.start("--max-tasks-per-child", "10", CUEBX_BROKER_URL=url)
    assert await run.exit_code(45) == 1, run.text()
    text = run.text()
    assert "cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1/" in text
    assert "worker-1 exited before it was ready 3 times in a row: giving up" in text
    assert "secret" not in text


async def test_a_worker_process_that_does_not_stop_in_time_is_killed_and_the_exit_is_1(
    producer: Cuebx,
    prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    rabbitmq_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("CUEBX_BROKER_URL", rabbitmq_url)
    monkeypatch.setenv("TEST_QUEUE", f"{prefix}.work")
    monkeypatch.setenv("TEST_LEDGER", str(tmp_path / "ledger.txt"))
    supervisor = Supervisor(
        scaleout_app.make_app,
        shutdown_timeout=0.5,
        stop_grace=0.5,
        heartbeat_interval=0.2,
    )
    codes: list[int] = []

    async def supervise() -> None:
        codes.append(await supervisor.run(handle_signals=False))

    async with anyio.create_task_group() as group:
        group.start_soon(supervise)
        await wait_for(lambda: supervisor.health()["ready"], timeout=30, what="ready")
        await producer.tasks["block"].delay(30.0)
        await wait_for(
            lambda: supervisor.health()["stale"] == ["worker-1"], timeout=10, what="stale"
        )
        supervisor.request_stop()
    assert codes == [1]
    assert "worker-1 (pid" in caplog.text
    assert "sent no heartbeat for" in caplog.text
    assert "did not stop within 1s of being told to: killing it" in caplog.text
    assert "was killed by SIGKILL while stopping" in caplog.text


async def test_the_supervised_example_runs_and_stops_cleanly(
    tmp_path: Path, prefix: str, rabbitmq_url: str
) -> None:
    log = tmp_path / "example.log"
    env = {**os.environ, "CUEBX_BROKER_URL": rabbitmq_url, "EXAMPLE_QUEUE": f"{prefix}.thumbs"}
    with log.open("w") as out:
        example = subprocess.Popen(
            [sys.executable, "supervised.py"], cwd=ROOT / "examples", stderr=out, env=env
        )
    try:
        await wait_for(
            lambda: "all 2 worker processes ready" in log.read_text(), timeout=30, what="ready"
        )
        example.send_signal(signal.SIGTERM)
        await wait_for(lambda: example.poll() is not None, timeout=30, what="exit")
        assert example.returncode == 0, log.read_text()
    finally:
        if example.poll() is None:
            example.kill()
        cleanup = Cuebx(rabbitmq_url)
        cleanup.task(queue=f"{prefix}.thumbs", name="make_thumbnail")(_nothing)
        await cleanup.broker.connect()
        await cleanup.broker.delete(cleanup.topology())
        await cleanup.close()


def _nothing(image_id: int) -> None: ...

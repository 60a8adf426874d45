"""The ``cuebx`` command as a user runs it: a real subprocess against the real broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from tests.conftest import AppFactory, wait_for

CUEBX = [sys.executable, "-m", "cuebx"]

APP_MODULE = textwrap.dedent(
    """
    import os
    import pathlib

    import anyio

    from cuebx import Cuebx

    app = Cuebx(connection_name=os.environ.get("TEST_CONNECTION", "cli-test"))
    OUT = pathlib.Path(os.environ.get("TEST_OUT", "out.txt"))


    @app.task(queue=os.environ.get("TEST_QUEUE", "cli.q"), retries=["5s", "1m"])
    async def record(n: int, pause: float = 0.0) -> None:
        OUT.open("a").write(f"start {n}\\n")
        await anyio.sleep(pause)
        OUT.open("a").write(f"done {n}\\n")
    """
)


@pytest.fixture
def project(tmp_path: Path, prefix: str, rabbitmq_url: str) -> dict[str, str]:
    (tmp_path / "cliapp.py").write_text(APP_MODULE)
    (tmp_path / "emptyapp.py").write_text("from cuebx import Cuebx\n\napp = Cuebx()\n")
    (tmp_path / "badoption.py").write_text(
        "from cuebx import Cuebx\n\napp = Cuebx()\n\n\n"
        "@app.task(queue='q', retries=['soon'])\nasync def job() -> None: ...\n"
    )
    return {
        **os.environ,
        "CUEBX_BROKER_URL": rabbitmq_url,
        "TEST_OUT": str(tmp_path / "out.txt"),
        "TEST_QUEUE": f"{prefix}.cli",
        "TEST_CONNECTION": f"{prefix}-worker",
        "PYTHONPATH": str(Path.cwd()),
    }


def _cuebx(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a ``cuebx`` command to its end, as a user would in a shell."""
    return subprocess.run(
        [*CUEBX, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.anyio
async def test_cuebx_worker_runs_published_tasks_and_exits_zero_on_sigterm(
    make_rabbit_app: AppFactory, prefix: str, project: dict[str, str], tmp_path: Path
) -> None:
    producer = make_rabbit_app()

    @producer.task(queue=f"{prefix}.cli", retries=["5s", "1m"])
    async def record(n: int, pause: float = 0.0) -> None: ...

    await producer.connect()
    for n in range(5):
        await record.delay(n)
    log = tmp_path / "worker.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [*CUEBX, "worker", "-A", "cliapp", "--prefetch", "4"],
            cwd=tmp_path,
            env=project,
            stderr=stderr,
            stdout=stderr,
        )
    try:
        out = tmp_path / "out.txt"
        await wait_for(
            lambda: len([x for x in _lines(out) if x.startswith("done")]) == 5,
            timeout=20,
            what="5 tasks done by the worker process",
        )
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(20):
            while process.poll() is None:
                await anyio.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert process.returncode == 0, text
    assert f"queue {prefix}.cli: tasks record" in text
    assert sorted(_lines(tmp_path / "out.txt")) == sorted(
        [f"start {n}" for n in range(5)] + [f"done {n}" for n in range(5)]
    )


def test_cuebx_topology_prints_the_declarations_without_a_broker(
    project: dict[str, str], tmp_path: Path, prefix: str
) -> None:
    env = {**project, "CUEBX_BROKER_URL": "amqp://guest:guest@127.0.0.1:1/"}
    result = _cuebx("topology", "-A", "cliapp:app", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    for name in (
        f"{prefix}.cli",
        f"{prefix}.cli.retry.5s",
        f"{prefix}.cli.retry.1m",
        f"{prefix}.cli.dlq",
        "x-message-ttl",
    ):
        assert name in result.stdout


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("no_such_module", "no module named 'no_such_module'"),
        ("cliapp:missing", "module 'cliapp' has no 'missing'"),
        ("cliapp:OUT", "'OUT' is a PosixPath, not a Cuebx app"),
        ("os", "expected exactly one Cuebx app in 'os', found none"),
        ("emptyapp", "-A 'emptyapp': the app has no tasks"),
        (
            "badoption",
            "-A 'badoption': ConfigurationError: retries of task 'job': cannot read",
        ),
    ],
)
def test_a_bad_app_path_gives_one_clear_line_and_a_nonzero_exit(
    project: dict[str, str], tmp_path: Path, target: str, expected: str
) -> None:
    result = _cuebx("worker", "-A", target, cwd=tmp_path, env=project)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]


def test_an_unreachable_broker_gives_one_line_with_the_url_and_no_password(
    project: dict[str, str], tmp_path: Path
) -> None:
    env = {**project, "CUEBX_BROKER_URL": "amqp://guest:s3cret@127.0.0.1:1/"}
    result = _cuebx("worker", "-A", "cliapp", "--log-level", "ERROR", cwd=tmp_path, env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "127.0.0.1:1" in lines[0]
    assert "s3cret" not in result.stderr


def test_an_unknown_queue_is_named_with_the_queues_that_exist(
    project: dict[str, str], tmp_path: Path, prefix: str
) -> None:
    result = _cuebx("worker", "-A", "cliapp", "-Q", "nope", cwd=tmp_path, env=project)
    assert result.returncode != 0
    assert result.stderr.strip() == (
        f"Error: no task is registered on queue(s) 'nope'; queues with tasks: '{prefix}.cli'"
    )


@pytest.mark.anyio
async def test_a_topology_clash_gives_one_line_naming_the_queue(
    make_rabbit_app: AppFactory, project: dict[str, str], tmp_path: Path, prefix: str
) -> None:
    owner = make_rabbit_app(queue_type="quorum")
    owner.task(queue=f"{prefix}.cli", retries=["5s", "1m"], name="record")(_record)
    await owner.connect()
    result = _cuebx("worker", "-A", "cliapp", "--log-level", "ERROR", cwd=tmp_path, env=project)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"queue '{prefix}.cli" in lines[0]
    assert "x-queue-type" in lines[0]


async def _record(n: int, pause: float = 0.0) -> None: ...

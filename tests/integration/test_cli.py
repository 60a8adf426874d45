"""The ``cuebx`` command as a user runs it: a real subprocess, against the real broker where
the command needs one (those tests take `broker_env`, so they are marked ``rabbitmq``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest
from aio_pika.abc import AbstractIncomingMessage

import cuebx
from tests.conftest import AppFactory, Raw, wait_for

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


# Nothing answers on port 1: a command that should not need a broker fails if it tries one.
NO_BROKER_URL = "amqp://guest:guest@127.0.0.1:1/"


@pytest.fixture
def project(tmp_path: Path, prefix: str) -> dict[str, str]:
    """App modules in `tmp_path` and the environment to run ``cuebx`` there, without a broker."""
    (tmp_path / "cliapp.py").write_text(APP_MODULE)
    (tmp_path / "emptyapp.py").write_text("from cuebx import Cuebx\n\napp = Cuebx()\n")
    (tmp_path / "badoption.py").write_text(
        "from cuebx import Cuebx\n\napp = Cuebx()\n\n\n"
        "@app.task(queue='q', retries=['soon'])\nasync def job() -> None: ...\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CUEBX_APP"}
    return {
        **env,
        "CUEBX_BROKER_URL": NO_BROKER_URL,
        "TEST_OUT": str(tmp_path / "out.txt"),
        "TEST_QUEUE": f"{prefix}.cli",
        "TEST_CONNECTION": f"{prefix}-worker",
        "PYTHONPATH": str(Path.cwd()),
    }


@pytest.fixture
def broker_env(project: dict[str, str], rabbitmq_url: str) -> dict[str, str]:
    """The `project` environment with the real broker's URL."""
    return {**project, "CUEBX_BROKER_URL": rabbitmq_url}


def _cuebx(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a ``cuebx`` command to its end, as a user would in a shell."""
    return subprocess.run(
        [*CUEBX, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.anyio
async def test_cuebx_worker_runs_published_tasks_and_exits_zero_on_sigterm(
    make_rabbit_app: AppFactory, prefix: str, broker_env: dict[str, str], tmp_path: Path
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
            env=broker_env,
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
    result = _cuebx("topology", "-A", "cliapp:app", cwd=tmp_path, env=project)
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
    make_rabbit_app: AppFactory, broker_env: dict[str, str], tmp_path: Path, prefix: str
) -> None:
    owner = make_rabbit_app(queue_type="quorum")
    owner.task(queue=f"{prefix}.cli", retries=["5s", "1m"], name="record")(_record)
    await owner.connect()
    result = _cuebx("worker", "-A", "cliapp", "--log-level", "ERROR", cwd=tmp_path, env=broker_env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"queue '{prefix}.cli" in lines[0]
    assert "x-queue-type" in lines[0]


@pytest.mark.anyio
async def test_a_queue_the_broker_refuses_to_consume_gives_one_error_line_not_a_traceback(
    make_rabbit_app: AppFactory, amqp: Raw, broker_env: dict[str, str], tmp_path: Path, prefix: str
) -> None:
    # The topology declares fine (same arguments), but another connection holds an exclusive
    # consumer on the main queue, so the worker's basic.consume is refused (ACCESS_REFUSED)
    # inside its task group: the error reaches the CLI wrapped in an exception group.
    owner = make_rabbit_app()
    owner.task(queue=f"{prefix}.cli", retries=["5s", "1m"], name="record")(_record)
    await owner.connect()
    queue = await amqp.channel.get_queue(f"{prefix}.cli", ensure=False)
    await queue.consume(_ignore, exclusive=True)
    result = _cuebx("worker", "-A", "cliapp", cwd=tmp_path, env=broker_env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        f"Error: cannot consume queue '{prefix}.cli': ACCESS_REFUSED - queue '{prefix}.cli' in "
        "vhost '/' in exclusive use"
    ], result.stderr


def test_version_is_the_package_s_version(project: dict[str, str], tmp_path: Path) -> None:
    result = _cuebx("--version", cwd=tmp_path, env=project)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cuebx, version {cuebx.__version__}"


def test_cuebx_app_stands_for_a_and_loglevel_spellings_are_accepted(
    project: dict[str, str], tmp_path: Path
) -> None:
    env = {**project, "CUEBX_APP": "emptyapp"}
    for spelling in ("--log-level", "--loglevel", "-l"):
        result = _cuebx("worker", spelling, "debug", cwd=tmp_path, env=env)
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().startswith("Error: -A 'emptyapp': the app has no tasks")


async def _record(n: int, pause: float = 0.0) -> None: ...


async def _ignore(message: AbstractIncomingMessage) -> None: ...

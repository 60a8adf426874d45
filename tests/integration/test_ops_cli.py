"""``cuebx dlq``, ``cuebx status`` and ``cuebx topology diff`` as an operator runs them: real
subprocesses against the real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from cuebx import Cuebx
from tests.conftest import AppFactory, wait_for
from tests.integration.test_dlq import fill, ready, stamped

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]

CUEBX = [sys.executable, "-m", "cuebx"]

OPS_APP = textwrap.dedent(
    """
    import os

    from cuebx import Cuebx

    app = Cuebx(
        queue_type=os.environ.get("TEST_QUEUE_TYPE", "classic"),
        connection_name=os.environ.get("TEST_CONNECTION", "ops-cli-test"),
    )


    @app.task(queue=os.environ["TEST_QUEUE"], retries=["1m"])
    async def job(n: int) -> None: ...
    """
)


@pytest.fixture
def shell(tmp_path: Path, prefix: str, rabbitmq_url: str) -> dict[str, str]:
    (tmp_path / "opsapp.py").write_text(OPS_APP)
    env = {k: v for k, v in os.environ.items() if k != "CUEBX_APP"}
    return {
        **env,
        "CUEBX_BROKER_URL": rabbitmq_url,
        "CUEBX_APP": "opsapp",
        "TEST_QUEUE": f"{prefix}.jobs",
        "TEST_CONNECTION": f"{prefix}-cli",
        "PYTHONPATH": str(Path.cwd()),
    }


def _cuebx(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CUEBX, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def _app(make_rabbit_app: AppFactory, prefix: str, **options: Any) -> Cuebx:
    app = make_rabbit_app(**options)
    app.task(queue=f"{prefix}.jobs", retries=["1m"], name="job")(_job)
    return app


async def _job(n: int) -> None: ...


async def test_dlq_commands_list_show_replay_purge_and_export_from_the_shell(
    make_rabbit_app: AppFactory, prefix: str, shell: dict[str, str], tmp_path: Path
) -> None:
    app = _app(make_rabbit_app, prefix)
    queue, dlq = f"{prefix}.jobs", f"{prefix}.jobs.dlq"
    await fill(
        app,
        dlq,
        [
            stamped("job", queue, message_id="a1", body=b'{"n": 1}'),
            stamped("job", queue, message_id="a2", reason="rejected"),
            stamped("other", queue, message_id="b1"),
        ],
    )

    listing = _json(_cuebx("dlq", "ls", "--json", cwd=tmp_path, env=shell))
    assert listing["matched"] == 3
    assert {(g["task"], g["reason"], g["count"]) for g in listing["groups"]} == {
        ("job", "exhausted", 1),
        ("job", "rejected", 1),
        ("other", "exhausted", 1),
    }
    table = _cuebx("dlq", "ls", queue, "--messages", cwd=tmp_path, env=shell)
    assert table.returncode == 0, table.stderr
    assert "a1" in table.stdout
    assert "rejected" in table.stdout

    shown = _json(_cuebx("dlq", "show", "a1", "--json", cwd=tmp_path, env=shell))
    assert (shown["task"], shown["arguments"], shown["error_type"]) == (
        "job",
        {"n": 1},
        "builtins.ValueError",
    )
    missing = _cuebx("dlq", "show", "nope", cwd=tmp_path, env=shell)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"Error: no message 'nope' in '{dlq}'"

    dry = _json(
        _cuebx("dlq", "replay", "--task", "job", "--dry-run", "--json", cwd=tmp_path, env=shell)
    )
    assert (dry["done"], dry["targets"], dry["dry_run"]) == (2, {queue: 2}, True)

    refused = _cuebx("dlq", "purge", "--task", "other", cwd=tmp_path, env=shell)
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    purged = _json(
        _cuebx("dlq", "purge", "--task", "other", "--yes", "--json", cwd=tmp_path, env=shell)
    )
    assert purged["done"] == 1

    exported = _cuebx("dlq", "export", str(tmp_path / "dead.jsonl"), cwd=tmp_path, env=shell)
    assert exported.returncode == 0, exported.stderr
    assert "exported 2" in exported.stdout
    lines = (tmp_path / "dead.jsonl").read_text().splitlines()
    assert [json.loads(line)["message_id"] for line in lines] == ["a1", "a2"]

    replayed = _json(_cuebx("dlq", "replay", "--id", "a1", "--json", cwd=tmp_path, env=shell))
    assert replayed["targets"] == {queue: 1}
    assert await ready(app, queue) == 1
    assert await ready(app, dlq) == 1


async def test_status_and_topology_diff_from_the_shell(
    make_rabbit_app: AppFactory, prefix: str, shell: dict[str, str], tmp_path: Path
) -> None:
    app = _app(make_rabbit_app, prefix)
    await app.connect()
    matches = _cuebx("topology", "diff", cwd=tmp_path, env=shell)
    assert (matches.returncode, "matches the plan" in matches.stdout) == (0, True), matches

    tier = f"{prefix}.jobs.retry.1m"
    await app.broker.delete(type(app.topology())("cuebx", (app.topology().queue(tier),)))
    differs = _cuebx("topology", "diff", cwd=tmp_path, env=shell)
    assert differs.returncode == 1, differs.stderr
    assert tier in differs.stdout
    assert "missing" in differs.stdout
    as_json = _json(_cuebx("topology", "diff", "--json", cwd=tmp_path, env=shell))
    assert as_json["matches"] is False

    found = _json(_cuebx("status", "--json", cwd=tmp_path, env=shell))
    assert found["missing"] == [tier]
    assert found["groups"][0]["main"]["ready"] == 0
    table = _cuebx("status", cwd=tmp_path, env=shell)
    assert table.returncode == 0, table.stderr
    assert "missing" in table.stdout


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_replay_killed_mid_way_loses_nothing(
    make_rabbit_app: AppFactory,
    prefix: str,
    shell: dict[str, str],
    tmp_path: Path,
    queue_type: str,
) -> None:
    app = _app(make_rabbit_app, prefix, queue_type=queue_type)
    queue, dlq = f"{prefix}.jobs", f"{prefix}.jobs.dlq"
    ids = {f"m{i:03d}" for i in range(300)}
    await fill(app, dlq, [stamped("job", queue, message_id=i) for i in sorted(ids)])
    process = subprocess.Popen(
        [*CUEBX, "dlq", "replay", "--all", "--rate", "200"],
        cwd=tmp_path,
        env={**shell, "TEST_QUEUE_TYPE": queue_type},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_for(lambda: _between(app, queue, 40, 250), timeout=20, what="a replay under way")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    seen: list[str] = []
    for name in (queue, dlq):
        while (delivery := await app.broker.get(name)) is not None:
            seen.append(delivery.message_id or "")
            await delivery.ack()
    assert set(seen) == ids  # nothing lost; a message may be in both queues, never in neither
    assert len(seen) < len(ids) + 64  # duplicates at most one batch


async def _between(app: Cuebx, queue: str, low: int, high: int) -> bool:
    count = await ready(app, queue)
    assert count < high, "the replay finished before it could be killed"
    return count >= low


async def test_killing_a_replay_subprocess_is_a_real_kill() -> None:
    # Guards the test above: SIGKILL leaves no chance to clean up, unlike SIGTERM.
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    process.send_signal(signal.SIGKILL)
    with anyio.fail_after(5):
        while process.poll() is None:
            await anyio.sleep(0.01)
    assert process.returncode == -signal.SIGKILL

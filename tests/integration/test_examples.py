"""The examples run as the docs say."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cuebx import Cuebx

EXAMPLES = Path(__file__).parents[2] / "examples"


def _delete_topology(app: Cuebx) -> None:
    import anyio

    async def delete() -> None:
        broker = Cuebx(app.settings.url).broker
        await broker.connect()
        try:
            await broker.delete(app.topology())
        finally:
            await broker.close()

    anyio.run(delete)


@pytest.fixture
def examples_on_path() -> Iterator[None]:
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield
    finally:
        sys.path.remove(str(EXAMPLES))


def _quickstart(env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run examples/quickstart.py as its docs say, to its end."""
    return subprocess.run(
        [sys.executable, "quickstart.py"],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_quickstart_runs_a_producer_and_a_worker_and_retries_the_flaky_task(
    examples_on_path: None, rabbitmq_url: str
) -> None:
    result = _quickstart()
    import quickstart

    _delete_topology(quickstart.app)
    assert result.returncode == 0, result.stderr
    assert "sent welcome to Ann" in result.stdout
    assert "sent welcome to Flaky <f@example.com> (attempt 1)" in result.stdout
    assert "done: 3 emails sent" in result.stdout


def test_quickstart_without_a_broker_runs_in_process_and_says_so_first(
    examples_on_path: None,
) -> None:
    env = {**os.environ, "CUEBX_BROKER_URL": "amqp://guest:guest@127.0.0.1:1/"}
    result = _quickstart(env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "running entirely in process on memory://" in lines[0]
    assert "done: 3 emails sent" in lines[-1]


def test_fastapi_example_enqueues_from_a_request_and_its_lifespan_worker_runs_it(
    examples_on_path: None, rabbitmq_url: str
) -> None:
    import fastapi_app

    try:
        with TestClient(fastapi_app.api) as client:
            response = client.post("/images/42/thumbnail", params={"size": 64})
            assert response.status_code == 202
            task_id = response.json()["task_id"]
            deadline = time.monotonic() + 10
            while not fastapi_app.thumbnails_made and time.monotonic() < deadline:
                time.sleep(0.02)
        assert fastapi_app.thumbnails_made == [(42, 64, task_id)]
    finally:
        _delete_topology(fastapi_app.tasks)


def test_the_testing_example_passes_as_a_user_would_run_it() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CUEBX_BROKER_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "."],
        cwd=EXAMPLES / "testing",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout


def test_the_middleware_example_runs_on_its_own_and_prints_its_timings() -> None:
    result = subprocess.run(
        [sys.executable, "middleware.py"],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sorted(line for line in lines if line.startswith("invoice ")) == [
        "invoice 1 from billing",
        "invoice 2 from billing",
        "invoice 3 from billing",
    ]
    assert len([line for line in lines if line.startswith("render_invoice took ")]) == 3


def test_the_celery_migration_example_runs_on_its_own() -> None:
    result = subprocess.run(
        [sys.executable, "celery_migration.py"],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "dead letter in orders.dlq: rejected {'order_id': -1}" in result.stdout


def test_the_periodic_example_runs_a_day_of_jobs_on_the_memory_clock(
    examples_on_path: None,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CUEBX_BROKER_URL"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "periodic.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "cleanup: 288 runs" in lines  # every 5 minutes
    assert "ping: 2880 runs" in lines  # every 30 seconds
    assert "rebuild_search_index: 24 runs" in lines
    assert "daily: 1 runs" in lines


def test_the_notifications_example_reports_pending_then_sent_or_failed(
    rabbitmq_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    from tests.stores import REDIS_URL, forget_redis_prefix, namespace

    monkeypatch.setenv("NOTIFICATIONS_STORE", f"{REDIS_URL}?prefix={namespace(prefix)}")
    monkeypatch.setenv("NOTIFICATIONS_QUEUE", f"{prefix}.notifications")
    monkeypatch.syspath_prepend(str(EXAMPLES / "notifications"))
    sys.modules.pop("service", None)
    service = importlib.import_module("service")
    try:
        with TestClient(service.api) as client:
            sent = client.post(
                "/notifications",
                json={"type": "email", "recipient": "ann@example.com", "content": "Hello!"},
            )
            assert sent.status_code == 202
            assert sent.json()["status"] == "pending"
            bounced = client.post(
                "/notifications",
                json={"type": "sms", "recipient": "bob@invalid.example", "content": "Hi"},
            )
            ok = _poll(client, sent.json()["id"], "sent")
            assert ok["receipt"] == "email to ann@example.com: 6 characters"
            failed = _poll(client, bounced.json()["id"], "failed")
            assert failed["error"] == "cannot deliver to bob@invalid.example"
            assert client.get("/notifications/no-such-id/status").status_code == 404
    finally:
        _delete_topology(service.tasks)
        forget_redis_prefix(namespace(prefix))
        sys.modules.pop("service", None)


def _poll(client: TestClient, notification_id: str, wanted: str) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while True:
        body: dict[str, object] = client.get(f"/notifications/{notification_id}/status").json()
        if body["status"] == wanted or time.monotonic() > deadline:
            assert body["status"] == wanted, body
            return body
        time.sleep(0.02)

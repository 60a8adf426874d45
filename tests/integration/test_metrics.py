"""Metrics, health probes and JSON logs: the middleware in process, and ``cuebx worker
--metrics-port`` scraped over HTTP while the broker comes and goes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry

from cuebx import Cuebx, Reject, TaskContext
from cuebx.metrics import PrometheusMetrics
from cuebx.ops.health import Health
from cuebx.ops.http import health_routes, serve
from cuebx.testing import drain, running, use_memory_broker
from tests.conftest import AppFactory, wait_for
from tests.proxy import running_proxy

pytestmark = pytest.mark.anyio


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_the_middleware_counts_what_ran_retried_and_died(prefix: str) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    app = Cuebx("memory://", middleware=[metrics])
    queue = f"{prefix}.jobs"

    @app.task(queue=queue)
    async def ok(n: int) -> None: ...

    @app.task(queue=queue, retries=["1s"])
    async def flaky(ctx: TaskContext, n: int) -> None:
        if ctx.attempt == 0:
            raise ConnectionError("first time")

    @app.task(queue=queue)
    async def refuse(n: int) -> None:
        raise Reject("no")

    with use_memory_broker(app):
        async with running(app):
            for n in range(3):
                await ok.delay(n)
            await flaky.delay(1)
            await refuse.delay(2)
            await drain(app)
            await metrics.sample_queues(app.broker, app.topology())

    def task(name: str, **more: str) -> dict[str, str]:
        return {"queue": queue, "task": name, **more}

    assert _value(registry, "cuebx_tasks_total", **task("ok", outcome="succeeded")) == 3
    assert _value(registry, "cuebx_tasks_total", **task("flaky", outcome="failed")) == 1
    assert _value(registry, "cuebx_tasks_total", **task("flaky", outcome="succeeded")) == 1
    assert _value(registry, "cuebx_tasks_total", **task("refuse", outcome="failed")) == 1
    assert _value(registry, "cuebx_task_retries_total", **task("flaky")) == 1
    dead = task("refuse", reason="rejected")
    assert _value(registry, "cuebx_dead_letters_total", **dead) == 1
    assert _value(registry, "cuebx_task_duration_seconds_count", **task("ok")) == 3
    assert _value(registry, "cuebx_task_duration_seconds_count", **task("flaky")) == 2
    # The retried attempt's wait would include its retry delay: first attempts only.
    assert _value(registry, "cuebx_task_queue_wait_seconds_count", **task("flaky")) == 1
    assert _value(registry, "cuebx_tasks_in_progress", **task("ok")) == 0
    published = task("ok", result="confirmed")
    assert _value(registry, "cuebx_published_total", **published) == 3
    assert _value(registry, "cuebx_publish_confirm_seconds_count", **task("ok")) == 3
    ready = {"queue": f"{queue}.dlq", "role": "dead-letter"}
    assert _value(registry, "cuebx_queue_messages_ready", **ready) == 1
    text = metrics.render().decode()
    assert "# TYPE cuebx_tasks_total counter" in text
    assert "# TYPE cuebx_task_duration_seconds histogram" in text
    # A second middleware on the same registry shares its metrics instead of clashing.
    assert PrometheusMetrics(registry).families is metrics.families


async def test_the_http_server_answers_probes_and_refuses_the_rest() -> None:
    health = Health(connected=True, consuming=False)
    async with anyio.create_task_group() as group:
        port = await group.start(serve, health_routes(lambda: health), "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            unhealthy = await client.get("/healthz")
            assert unhealthy.status_code == 503
            assert unhealthy.json()["consuming"] is False
            health = Health(connected=True, consuming=True)
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz?verbose=1")).json()["ready"] is True
            assert (await client.get("/nope")).status_code == 404
            assert (await client.post("/healthz")).status_code == 405
            head = await client.head("/readyz")
            assert (head.status_code, head.content) == (200, b"")
        group.cancel_scope.cancel()


def test_health_of_several_workers_is_alive_only_if_each_is() -> None:
    up = Health(True, True, queues=("a",))
    draining = Health(False, False, stopping=True, queues=("b",))
    down = Health(False, True, queues=("a",))
    assert Health.combine([up, draining]).alive
    assert Health.combine([up, draining]).ready  # one child recycled: the rest still work
    assert Health.combine([draining, draining]).alive
    assert not Health.combine([draining, draining]).ready
    assert not Health.combine([up, down]).alive
    assert not Health.combine([]).alive
    combined = Health.combine([up, up])
    assert (combined.workers, combined.queues) == (2, ("a",))
    assert Health.from_dict(combined.to_dict()) == combined


WORKER = [sys.executable, "-m", "cuebx", "worker", "-A", "metricsapp"]
WORKER_APP = textwrap.dedent(
    """
    import os

    from cuebx import Cuebx

    app = Cuebx(connection_name=os.environ["TEST_CONNECTION"])


    @app.task(queue=os.environ["TEST_QUEUE"])
    async def job(n: int) -> None:
        if n < 0:
            raise ValueError("negative")
    """
)


async def _scrape(client: httpx.AsyncClient, path: str) -> httpx.Response:
    try:
        return await client.get(path, timeout=2)
    except httpx.TransportError:
        return httpx.Response(599)


@pytest.mark.timeout(60)
async def test_a_worker_serves_metrics_and_health_and_turns_unhealthy_without_its_broker(
    make_rabbit_app: AppFactory, prefix: str, tmp_path: Path, rabbitmq_url: str
) -> None:
    queue = f"{prefix}.jobs"
    producer = make_rabbit_app()
    job = producer.task(queue=queue, name="job")(_job)
    await producer.connect()
    (tmp_path / "metricsapp.py").write_text(WORKER_APP)
    target = urlsplit(rabbitmq_url)
    async with running_proxy(target.hostname or "127.0.0.1", target.port or 5672) as proxy:
        url = rabbitmq_url.replace(f":{target.port or 5672}/", f":{proxy.port}/")
        env = {
            **os.environ,
            "CUEBX_BROKER_URL": url,
            "TEST_QUEUE": queue,
            "TEST_CONNECTION": f"{prefix}-metrics",
            "PYTHONPATH": str(Path.cwd()),
        }
        log = tmp_path / "worker.log"
        with log.open("w") as stderr:
            process = subprocess.Popen(
                [*WORKER, "--metrics-port", "0", "--log-format", "json"],
                cwd=tmp_path,
                env=env,
                stderr=stderr,
                stdout=stderr,
            )
        try:
            port = await _served_port(log)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                await wait_for(
                    lambda: _status(client, "/readyz", 200), timeout=15, what="/readyz 200"
                )
                for n in (1, 2, 3, -1):
                    await job.delay(n)
                await wait_for(
                    lambda: _metric(client, queue, 'outcome="succeeded"', 3.0),
                    timeout=15,
                    what="three successes counted",
                )
                text = (await client.get("/metrics")).text
                assert (
                    f'cuebx_dead_letters_total{{queue="{queue}",reason="exhausted",task="job"}} 1.0'
                    in text
                )
                assert (
                    f'cuebx_queue_messages_ready{{queue="{queue}.dlq",role="dead-letter"}} 1.0'
                    in text
                )
                assert (await client.get("/healthz")).status_code == 200

                proxy.accepting = False
                proxy.cut()
                await wait_for(
                    lambda: _status(client, "/healthz", 503), timeout=15, what="/healthz 503"
                )
                assert (await client.get("/healthz")).json()["connected"] is False
                proxy.accepting = True
                await wait_for(
                    lambda: _status(client, "/healthz", 200), timeout=20, what="/healthz back"
                )
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(20):
                while process.poll() is None:
                    await anyio.sleep(0.05)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, log.read_text()
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert len(records) == len(log.read_text().splitlines())  # every line is a JSON object
    failed = [r for r in records if r.get("message_id") and r["level"] == "ERROR"]
    assert failed, records
    assert {"time", "level", "logger", "message", "task", "message_id", "attempt"} <= set(failed[0])
    assert failed[0]["task"] == "job"
    assert "ValueError: negative" in failed[0]["exception"]


async def _job(n: int) -> None: ...


async def _served_port(log: Path) -> int:
    with anyio.fail_after(20):
        while True:
            for line in (await anyio.Path(log).read_text()).splitlines():
                if line.startswith("{") and "serving" in (record := json.loads(line))["message"]:
                    return int(record["message"].rsplit(":", 1)[1])
            await anyio.sleep(0.05)


async def _status(client: httpx.AsyncClient, path: str, code: int) -> bool:
    return (await _scrape(client, path)).status_code == code


async def _metric(client: httpx.AsyncClient, queue: str, label: str, value: float) -> bool:
    response = await _scrape(client, "/metrics")
    for line in response.text.splitlines():
        if line.startswith("cuebx_tasks_total{") and queue in line and label in line:
            return float(line.rsplit(" ", 1)[1]) == value
    return False

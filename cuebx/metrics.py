"""Prometheus metrics: a middleware that counts what the worker and publishers do.

Needs the ``prometheus`` extra: ``pip install 'cuebx[prometheus]'``. ``cuebx worker
--metrics-port 9100`` installs `PrometheusMetrics` and serves ``/metrics`` (with
``/healthz`` and ``/readyz``) on 127.0.0.1; in your own process, add it yourself::

    app = Cuebx(middleware=[PrometheusMetrics()])

and serve `PrometheusMetrics.render` (or prometheus_client's default registry, which it
uses unless given another).

Every name follows Prometheus' conventions (``cuebx_`` prefix, base units, ``_total`` on
counters):

| metric | type | labels |
| --- | --- | --- |
| ``cuebx_tasks_total`` | counter | queue, task, outcome (see below) |
| ``cuebx_task_duration_seconds`` | histogram | queue, task |
| ``cuebx_task_queue_wait_seconds`` | histogram | queue, task |
| ``cuebx_tasks_in_progress`` | gauge | queue, task |
| ``cuebx_task_retries_total`` | counter | queue, task |
| ``cuebx_dead_letters_total`` | counter | queue, task, reason |
| ``cuebx_publish_confirm_seconds`` | histogram | queue, task |
| ``cuebx_published_total`` | counter | queue, task, result (confirmed, failed) |
| ``cuebx_queue_messages_ready`` | gauge | queue, role |
| ``cuebx_queue_consumers`` | gauge | queue, role |

A handler run's outcome is ``succeeded``, ``failed``, ``skipped``, ``postponed`` (held back
by a `Postpone`, a rate limit's denial say: it comes back later) or ``interrupted``.

The queue wait is measured from the message's timestamp (its publish) to the handler's
start, on first attempts only: a retry or a replay keeps the first publish's timestamp, so
its wait would include the retry delay or the days it lay dead. A message with
``x-cuebx-eta`` (a delayed one) waits from that moment instead. Queue depths are read at
scrape time (at most every `depth_interval` seconds), through passive declarations.

With several worker processes, set ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's
multiprocess mode) in every process before it imports prometheus_client: `render` then
aggregates the files of all processes; in-progress gauges add up the live processes, queue
depths keep the latest reading.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
except ImportError as exc:  # pragma: no cover - the test environment has the extra
    raise ImportError(
        "cuebx.metrics needs prometheus-client: pip install 'cuebx[prometheus]'"
    ) from exc

import anyio
from anyio.lowlevel import checkpoint

from cuebx.brokers.base import Broker
from cuebx.message import DeadLetterReason
from cuebx.middleware import Middleware, Outcome, Postpone, Publish, Received, Skip
from cuebx.ops.health import worker_health
from cuebx.ops.http import Response, Route, health_routes, probe_routes
from cuebx.supervisor import Supervisor
from cuebx.topology import Topology
from cuebx.worker import Worker

__all__ = ["PrometheusMetrics", "mark_dead", "supervisor_routes", "worker_routes"]

logger = logging.getLogger("cuebx.metrics")

#: Handler durations: 1 ms to 10 min.
DURATION_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    600,
)
#: Time in the queue: 1 ms to 1 h.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
#: Publisher confirms: 0.5 ms to 10 s.
CONFIRM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)

_ETA = "x-cuebx-eta"
_STARTED = "cuebx.metrics"


class _Families:
    """The metric families of one registry (created once: a registry refuses duplicates)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        task = ("queue", "task")
        self.tasks = Counter(
            "cuebx_tasks", "Handler runs, by how they ended.", (*task, "outcome"), registry=registry
        )
        self.duration = Histogram(
            "cuebx_task_duration_seconds",
            "Handler run time.",
            task,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.wait = Histogram(
            "cuebx_task_queue_wait_seconds",
            "Time from publish to handler start (first attempts).",
            task,
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.in_progress = Gauge(
            "cuebx_tasks_in_progress",
            "Handlers running now.",
            task,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.retries = Counter(
            "cuebx_task_retries", "Messages sent to a retry tier.", task, registry=registry
        )
        self.dead_letters = Counter(
            "cuebx_dead_letters",
            "Messages dead-lettered (or dropped without a dead-letter queue).",
            (*task, "reason"),
            registry=registry,
        )
        self.confirm = Histogram(
            "cuebx_publish_confirm_seconds",
            "Time from publish to the broker's confirm.",
            task,
            buckets=CONFIRM_BUCKETS,
            registry=registry,
        )
        self.published = Counter(
            "cuebx_published",
            "Task messages published, by confirm result.",
            (*task, "result"),
            registry=registry,
        )
        self.ready = Gauge(
            "cuebx_queue_messages_ready",
            "Messages ready in a queue (read at scrape time).",
            ("queue", "role"),
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self.consumers = Gauge(
            "cuebx_queue_consumers",
            "Consumers of a queue (read at scrape time).",
            ("queue", "role"),
            multiprocess_mode="mostrecent",
            registry=registry,
        )


_BY_REGISTRY: dict[int, _Families] = {}


class _TaskSeries:
    """The labelled series of one queue and task, looked up once (labels() costs)."""

    __slots__ = ("duration", "families", "in_progress", "labels", "outcomes", "wait")

    def __init__(self, families: _Families, queue: str, task: str) -> None:
        self.families = families
        self.labels = (queue, task)
        self.duration = families.duration.labels(queue, task)
        self.wait = families.wait.labels(queue, task)
        self.in_progress = families.in_progress.labels(queue, task)
        self.outcomes: dict[str, Any] = {}

    def ended(self, outcome: str) -> None:
        counter = self.outcomes.get(outcome)
        if counter is None:
            counter = self.outcomes[outcome] = self.families.tasks.labels(*self.labels, outcome)
        counter.inc()


class PrometheusMetrics(Middleware):
    """Count tasks, time handlers and publishes, and read queue depths for Prometheus.

    Args:
        registry: where the metrics live; prometheus_client's default registry if None.
            Several `PrometheusMetrics` on one registry share its metrics.
        depth_interval: read queue depths at most this often (seconds), at scrape time.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, depth_interval: float = 5.0
    ) -> None:
        self.registry = registry if registry is not None else prometheus_client.REGISTRY
        families = _BY_REGISTRY.get(id(self.registry))
        if families is None:
            families = _BY_REGISTRY[id(self.registry)] = _Families(self.registry)
        self.families = families
        self.depth_interval = depth_interval
        self._series: dict[tuple[str, str], _TaskSeries] = {}
        self._publishing: dict[int, float] = {}
        self._depths_read = -float("inf")

    def _for(self, queue: str, task: str) -> _TaskSeries:
        series = self._series.get((queue, task))
        if series is None:
            series = self._series[queue, task] = _TaskSeries(self.families, queue, task)
        return series

    # -- publishing -----------------------------------------------------------------------

    async def before_publish(self, publish: Publish) -> None:
        if len(self._publishing) > 100_000:  # publishes whose after_publish never came
            self._publishing.clear()
        self._publishing[id(publish)] = time.perf_counter()

    async def after_publish(self, publish: Publish, error: BaseException | None) -> None:
        started = self._publishing.pop(id(publish), None)
        labels = (publish.routing_key, publish.task_name)
        if error is None and started is not None:
            self.families.confirm.labels(*labels).observe(time.perf_counter() - started)
        result = "confirmed" if error is None else "failed"
        self.families.published.labels(*labels, result).inc()

    # -- handling -------------------------------------------------------------------------

    async def before_handler(self, received: Received) -> None:
        context = received.context
        series = self._for(context.queue, context.task_name)
        series.in_progress.inc()
        received.state[_STARTED] = series
        if context.attempt == 0 and "x-cuebx-replayed" not in context.headers:
            since = _waited_since(context.published_at, context.headers.get(_ETA))
            if since is not None:
                series.wait.observe(max(0.0, time.time() - since))

    async def after_handler(self, received: Received, outcome: Outcome) -> None:
        series = received.state.pop(_STARTED, None)
        error = outcome.error
        # A Postpone (a rate limit's denial, say) is no run: it comes back later.
        held = "postponed" if isinstance(error, Postpone) else "skipped"
        if series is None:
            # Another middleware's Skip or Postpone kept ours from running before the handler.
            context = received.context
            self._for(context.queue, context.task_name).ended(held)
            return
        series.in_progress.dec()
        if error is None:
            series.ended("succeeded")
        elif isinstance(error, Skip | Postpone):
            series.ended(held)
            return
        elif isinstance(error, anyio.get_cancelled_exc_class()):
            series.ended("interrupted")
        else:
            series.ended("failed")
        series.duration.observe(outcome.duration)

    async def on_retry(
        self, received: Received, error: BaseException, *, attempt: int, delay: float
    ) -> None:
        context = received.context
        self.families.retries.labels(context.queue, context.task_name).inc()

    async def on_dead_letter(
        self, received: Received, reason: DeadLetterReason, error: BaseException | str
    ) -> None:
        context = received.context
        self.families.dead_letters.labels(context.queue, context.task_name, reason).inc()

    # -- exposition -----------------------------------------------------------------------

    async def sample_queues(self, broker: Broker, topology: Topology) -> None:
        """Read every queue's depth and consumers into the gauges (at most every
        `depth_interval` seconds); a missing queue, or no broker, leaves no series."""
        now = time.monotonic()
        if now - self._depths_read < self.depth_interval:
            await checkpoint()
            return
        self._depths_read = now
        ready, consumers = self.families.ready, self.families.consumers
        ready.clear()
        consumers.clear()
        if not broker.connected:
            return
        for spec in topology.queues:
            state = await broker.queue_state(spec.name)
            if state is not None:
                ready.labels(spec.name, spec.role).set(state.ready)
                consumers.labels(spec.name, spec.role).set(state.consumers)

    def render(self) -> bytes:
        """The exposition text; all processes' in multiprocess mode."""
        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            # Its __init__ carries no annotations.
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return prometheus_client.generate_latest(registry)

    def route(self, broker: Broker, topology: Topology, *, timeout: float = 5.0) -> Route:
        """The ``/metrics`` route of `cuebx.ops.http.serve`: depths read, then rendered."""

        async def answer() -> Response:
            try:
                with anyio.move_on_after(timeout):
                    await self.sample_queues(broker, topology)
            except Exception as exc:  # the broker went away mid-scrape: serve the rest
                logger.warning("could not read queue depths: %s", exc)
            return 200, prometheus_client.CONTENT_TYPE_LATEST, self.render()

        return answer


def _waited_since(published_at: datetime | None, eta: Any) -> float | None:
    """When the message became due: its eta (epoch ms) if later, else its publish time."""
    since = None if published_at is None else _epoch(published_at)
    if isinstance(eta, int | float) and not isinstance(eta, bool):
        since = eta / 1000 if since is None else max(since, eta / 1000)
    return since


def _epoch(moment: datetime) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def supervisor_routes(
    supervisor: Supervisor, metrics: PrometheusMetrics, broker: Broker, topology: Topology
) -> Mapping[str, Route]:
    """``/metrics``, ``/healthz`` and ``/readyz`` served by the parent of worker processes.

    Alive while no worker process is stale (a blocked event loop) and the supervisor has
    not given up: a process being restarted is the supervisor's job, not a reason for a
    liveness probe to kill them all. Ready while every process consumes. ``/metrics`` adds
    up every process's numbers (prometheus_client's multiprocess mode: the parent sets
    ``PROMETHEUS_MULTIPROC_DIR`` before anything imports prometheus_client) and reads queue
    depths through `broker`, the parent's own connection.
    """

    def alive() -> bool:
        report = supervisor.health()
        return not report["stale"] and report["status"] != "stopped"

    return {
        **probe_routes(alive, lambda: bool(supervisor.health()["ready"]), supervisor.health),
        "/metrics": metrics.route(broker, topology),
    }


def mark_dead(pid: int) -> None:
    """Forget a worker process's live gauges (multiprocess mode), once it has exited."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def worker_routes(
    worker: Worker, metrics: PrometheusMetrics, topology: Topology
) -> Mapping[str, Route]:
    """``/metrics``, ``/healthz`` and ``/readyz`` for one worker (`cuebx.ops.http.serve`)."""
    return {
        **health_routes(lambda: worker_health(worker)),
        "/metrics": metrics.route(worker.broker, topology),
    }

"""The cuebx app the benchmark runs, configured by environment.

``cuebx worker -A bench_app:app`` imports this module in a subprocess: the runner passes the
queue-name prefix of its run and the address of its UDP collector in the environment. Every
handled message sends one datagram to the collector, so completion is observed outside the
worker and nothing is counted that did not run.

Queues (all under the run's prefix, which is also the exchange name):

- ``<prefix>.work``: task ``work(i, sent)``, the drain and latency handler (sends a datagram);
- ``<prefix>.enqueue``: task ``noop(i, sent)``, published to by the enqueue benchmark, never
  consumed (the runner purges it between variants);
- ``<prefix>.idle.0`` … ``<prefix>.idle.9``: tasks ``idle0`` … ``idle9`` for the idle-RSS
  benchmark.

With ``CUEBX_BENCH_PLUGIN=1`` the app has `NoOpPlugin` installed: the "plugin" side of the
benchmark, which shows what the extension seam costs when a plug-in is there. With
``CUEBX_BENCH_PLUGIN_KIND=metrics`` in the runner's environment as well, the plugin side has
``cuebx.metrics.PrometheusMetrics`` instead: what metrics cost per task.
With ``CUEBX_BENCH_STORE=<url>`` it records task status in that store (``benchmarks/results.py``).

With ``CUEBX_BENCH_SCHEDULER=N`` (set in the runner's environment, so every cuebx side has it)
the app has N periodic jobs firing every second into ``<prefix>.scheduled``: compare a run
with it to one without to see what carrying the scheduler costs a worker's drain rate.
"""

from __future__ import annotations

import inspect
import os
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from wire import (
    DATAGRAM,
    ENV_PLUGIN,
    ENV_PREFIX,
    ENV_SCHEDULER,
    ENV_UDP,
    enqueue_queue,
    idle_queues,
    parse_address,
    work_queue,
)

from cuebx import Cuebx, Middleware, Outcome, Publish, Received

#: "metrics": the plug-in side installs the Prometheus middleware instead of the no-op one.
ENV_PLUGIN_KIND = "CUEBX_BENCH_PLUGIN_KIND"

if TYPE_CHECKING:
    from cuebx.message import DeadLetterReason
    from cuebx.middleware import WorkerView

__all__ = ["NoOpPlugin", "app", "build_app"]


class NoOpPlugin(Middleware):
    """A plug-in that overrides every hook and does nothing in any of them.

    cuebx skips a hook that a middleware does not override, so a middleware that overrides
    nothing would measure nothing: this one makes the publish path and the worker call every
    hook they have, with an empty body, which is the seam's own cost.
    """

    async def before_publish(self, publish: Publish) -> None:
        return None

    async def after_publish(self, publish: Publish, error: BaseException | None) -> None:
        return None

    async def after_publish_many(
        self, publishes: Sequence[Publish], errors: Sequence[BaseException | None]
    ) -> None:
        return None

    async def on_worker_start(self, worker: WorkerView) -> None:
        return None

    async def on_worker_stop(self, worker: WorkerView) -> None:
        return None

    async def serve(self, worker: WorkerView) -> None:
        return None

    async def before_handler(self, received: Received) -> None:
        return None

    async def after_handler(self, received: Received, outcome: Outcome) -> None:
        return None

    async def on_retry(
        self, received: Received, error: BaseException, *, attempt: int, delay: float
    ) -> None:
        return None

    async def on_dead_letter(
        self, received: Received, reason: DeadLetterReason, error: BaseException | str
    ) -> None:
        return None


def _check_every_hook_overridden() -> None:
    """Fail when `Middleware` has a hook `NoOpPlugin` misses: that hook would not be measured."""
    missing = [
        name
        for name, hook in vars(Middleware).items()
        if inspect.iscoroutinefunction(hook) and name not in vars(NoOpPlugin)
    ]
    if missing:
        raise RuntimeError(f"bench_app.NoOpPlugin does not override {', '.join(missing)}")


def build_app(
    prefix: str,
    udp: str,
    *,
    url: str | None = None,
    plugin: bool = False,
    store: str | None = None,
) -> Cuebx:
    """Build the benchmark app for one run: its exchange and queues are named by `prefix`.

    With `plugin`, `NoOpPlugin` is installed: same tasks, same queues, every hook called.
    """
    middleware: list[Middleware] = []
    if plugin and os.environ.get(ENV_PLUGIN_KIND) == "metrics":
        from prometheus_client import CollectorRegistry

        from cuebx.metrics import PrometheusMetrics

        middleware.append(PrometheusMetrics(CollectorRegistry()))
    elif plugin:
        _check_every_hook_overridden()
        middleware.append(NoOpPlugin())
    app = Cuebx(
        url,
        exchange=prefix,
        connection_name=f"cuebx benchmark {prefix}"
        + (f" ({type(middleware[0]).__name__})" if middleware else ""),
        middleware=middleware,
        store=store or None,
    )
    address = parse_address(udp)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pack = DATAGRAM.pack
    now = time.time

    @app.task(queue=work_queue(prefix))
    async def work(i: int, sent: float) -> None:
        started = now()
        sock.sendto(pack(i, sent, started), address)

    @app.task(queue=enqueue_queue(prefix))
    async def noop(i: int, sent: float) -> None:
        return None

    for k, queue in enumerate(idle_queues(prefix)):

        async def idle(i: int, sent: float) -> None:
            return None

        app.task(queue=queue, name=f"idle{k}")(idle)

    jobs = int(os.environ.get(ENV_SCHEDULER) or 0)
    if jobs:

        @app.task(queue=f"{prefix}.scheduled")
        async def scheduled() -> None:
            return None

        for k in range(jobs):
            app.schedule(scheduled, every="1s", name=f"job{k}")
    return app


# The worker subprocess's app. Built without connecting, so importing this module from the
# runner (which builds its own app for its own prefix) costs nothing.
app = build_app(
    os.environ.get(ENV_PREFIX, "bench.unset"),
    os.environ.get(ENV_UDP, "127.0.0.1:9"),
    plugin=os.environ.get(ENV_PLUGIN) == "1",
    store=os.environ.get("CUEBX_BENCH_STORE"),
)

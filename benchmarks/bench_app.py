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
"""

from __future__ import annotations

import os
import socket
import time

from wire import (
    DATAGRAM,
    ENV_PREFIX,
    ENV_UDP,
    enqueue_queue,
    idle_queues,
    parse_address,
    work_queue,
)

from cuebx import Cuebx

__all__ = ["app", "build_app"]


def build_app(prefix: str, udp: str, *, url: str | None = None) -> Cuebx:
    """Build the benchmark app for one run: its exchange and queues are named by `prefix`."""
    app = Cuebx(url, exchange=prefix, connection_name=f"cuebx benchmark {prefix}")
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
    return app


# The worker subprocess's app. Built without connecting, so importing this module from the
# runner (which builds its own app for its own prefix) costs nothing.
app = build_app(
    os.environ.get(ENV_PREFIX, "bench.unset"),
    os.environ.get(ENV_UDP, "127.0.0.1:9"),
)

"""The app benchmarks/processes.py runs, configured by environment.

Two tasks on the run's own exchange and queues (named by its prefix):

- ``work(i, sent)`` on ``<prefix>.work``: the drain handler, which does nothing but send one
  datagram to the runner's collector (as ``bench_app.work`` does);
- ``spin(i, sent)`` on ``<prefix>.spin``: a CPU-bound sync handler (it runs in a worker thread
  and holds the GIL for ``CUEBX_BENCH_SPIN`` loop iterations, about 5 ms by default), then
  sends its datagram. One process can run such handlers on one core only.
"""

from __future__ import annotations

import os
import socket
import time

from wire import DATAGRAM, ENV_PREFIX, ENV_UDP, parse_address

from cuebx import Cuebx

__all__ = ["ENV_SPIN", "app", "build_app", "spin_queue", "work_queue"]

#: Loop iterations per `spin` call.
ENV_SPIN = "CUEBX_BENCH_SPIN"
DEFAULT_SPIN = 60_000


def work_queue(prefix: str) -> str:
    return f"{prefix}.work"


def spin_queue(prefix: str) -> str:
    return f"{prefix}.spin"


def build_app(
    prefix: str, udp: str, *, url: str | None = None, iterations: int = DEFAULT_SPIN
) -> Cuebx:
    """The benchmark app of one run: its exchange and queues are named by `prefix`."""
    app = Cuebx(url, exchange=prefix, connection_name=f"cuebx processes benchmark {prefix}")
    address = parse_address(udp)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pack = DATAGRAM.pack
    now = time.time

    @app.task(queue=work_queue(prefix))
    async def work(i: int, sent: float) -> None:
        sock.sendto(pack(i, sent, now()), address)

    @app.task(queue=spin_queue(prefix))
    def spin(i: int, sent: float) -> None:
        started = now()
        total = 0
        for k in range(iterations):
            total += k * k
        sock.sendto(pack(i, sent, started), address)

    return app


app = build_app(
    os.environ.get(ENV_PREFIX, "bench.unset"),
    os.environ.get(ENV_UDP, "127.0.0.1:9"),
    iterations=int(os.environ.get(ENV_SPIN, DEFAULT_SPIN)),
)

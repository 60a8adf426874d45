"""What the runner, ``bench_app`` and the floor consumer agree on, with nothing imported.

The floor consumer imports this module, not ``bench_app``: importing cuebx would add to its
start-up time and memory and blur the comparison.
"""

from __future__ import annotations

import struct

__all__ = [
    "DATAGRAM",
    "ENV_PLUGIN",
    "ENV_PREFIX",
    "ENV_SCHEDULER",
    "ENV_UDP",
    "IDLE_QUEUES",
    "enqueue_queue",
    "idle_queues",
    "parse_address",
    "work_queue",
]

ENV_PREFIX = "CUEBX_BENCH_PREFIX"
ENV_UDP = "CUEBX_BENCH_UDP"
#: "1": the worker's app has the no-op plug-in (``bench_app.NoOpPlugin``) installed.
ENV_PLUGIN = "CUEBX_BENCH_PLUGIN"
#: "N": the worker's app carries a scheduler with N periodic jobs, each firing every second into
#: ``<prefix>.scheduled`` (not consumed), to show what the scheduler costs a draining worker.
ENV_SCHEDULER = "CUEBX_BENCH_SCHEDULER"
IDLE_QUEUES = 10

#: One datagram per handled message: the task's ``i``, its ``sent`` argument (the publish
#: time, for the latency benchmark) and ``time.time()`` when the handler started.
DATAGRAM = struct.Struct("<qdd")


def work_queue(prefix: str) -> str:
    """The queue of the drain and latency benchmarks."""
    return f"{prefix}.work"


def enqueue_queue(prefix: str) -> str:
    """The queue the enqueue benchmark publishes into (nobody consumes it)."""
    return f"{prefix}.enqueue"


def idle_queues(prefix: str) -> list[str]:
    """The queues of the idle-RSS benchmark."""
    return [f"{prefix}.idle.{k}" for k in range(IDLE_QUEUES)]


def parse_address(text: str) -> tuple[str, int]:
    """``"127.0.0.1:5000"`` -> ``("127.0.0.1", 5000)``."""
    host, _, port = text.rpartition(":")
    return host, int(port)

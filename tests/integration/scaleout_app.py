"""The app the scale-out tests run in ``cuebx worker --processes N``, configured by env.

Each handler writes ``<event> <pid> <message id> <n> <time>`` lines to a ledger file shared by
every process, so a test sees which worker process ran what, and when.
"""

from __future__ import annotations

import multiprocessing
import os
import time

import anyio

from cuebx import Cuebx, TaskContext

if os.environ.get("TEST_CRASH_ON_IMPORT") and multiprocessing.parent_process() is not None:
    # Only in spawned worker processes: the supervisor itself imports the app fine.
    raise RuntimeError("TEST_CRASH_ON_IMPORT: this worker process cannot import the app")

app = Cuebx(
    queue_type="quorum" if os.environ.get("TEST_QUORUM") else "classic",
    connection_name=os.environ.get("TEST_CONNECTION", "scaleout"),
    publish_timeout="5s",
)
QUEUE = os.environ.get("TEST_QUEUE", "scaleout.q")
LEDGER = os.environ.get("TEST_LEDGER", "ledger.txt")

# What `hog` keeps, so that the process's memory stays up.
_hoard: list[bytes] = []


def _write(event: str, ctx: TaskContext, n: int) -> None:
    line = f"{event} {os.getpid()} {ctx.message_id} {n} {time.time():.6f}\n"
    # O_APPEND writes of one short line are atomic, so every process can share the ledger.
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@app.task(queue=QUEUE)
async def ledger(ctx: TaskContext, n: int, pause: float = 0.0) -> None:
    _write("start", ctx, n)
    if pause:
        await anyio.sleep(pause)
    _write("done", ctx, n)


@app.task(queue=QUEUE)
async def block(ctx: TaskContext, seconds: float) -> None:
    """Hold the event loop (a sync call in an async handler): no heartbeat, no stop."""
    _write("start", ctx, 0)
    time.sleep(seconds)  # noqa: ASYNC251 - blocking the loop is the point
    _write("done", ctx, 0)


@app.task(queue=QUEUE)
async def hog(ctx: TaskContext, megabytes: int) -> None:
    """Keep `megabytes` of memory for the life of the process (written, so resident)."""
    _hoard.append(b"\x01" * (megabytes * 1024 * 1024))
    _write("done", ctx, megabytes)


def make_app() -> Cuebx:
    """The app, for `cuebx.supervisor.Supervisor` (a module-level function, so picklable)."""
    return app

"""The app the resilience tests run in ``cuebx worker`` subprocesses, configured by env."""

from __future__ import annotations

import os

import anyio

from cuebx import Cuebx, TaskContext

app = Cuebx(
    queue_type="quorum" if os.environ.get("TEST_QUORUM") else "classic",
    delivery_limit=int(os.environ.get("TEST_DELIVERY_LIMIT", "10")),
    connection_name=os.environ.get("TEST_CONNECTION", "resilience"),
    publish_timeout="5s",
)
QUEUE = os.environ.get("TEST_QUEUE", "resilience.q")
LEDGER = os.environ.get("TEST_LEDGER", "ledger.txt")
WORKER = os.environ.get("TEST_WORKER", "w")


def _write(line: str) -> None:
    # O_APPEND writes of one short line are atomic, so several processes can share a ledger.
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


@app.task(queue=QUEUE)
async def ledger(ctx: TaskContext, n: int, pause: float = 0.0) -> None:
    _write(f"start {WORKER} {ctx.message_id} {n}")
    if pause:
        await anyio.sleep(pause)
    _write(f"done {WORKER} {ctx.message_id} {n}")


@app.task(queue=QUEUE)
async def crash(ctx: TaskContext) -> None:
    _write(f"crash {WORKER} {ctx.message_id}")
    os._exit(3)  # dies like a segfault or the OOM killer: no ack, no cleanup

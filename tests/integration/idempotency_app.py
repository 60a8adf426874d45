"""The app the idempotency lease test runs in ``cuebx worker`` subprocesses, set by env."""

from __future__ import annotations

import os

import anyio

from cuebx import Cuebx, Idempotency

app = Cuebx(
    exchange=os.environ.get("TEST_EXCHANGE", "cuebx"),
    store=os.environ.get("TEST_STORE", "memory://"),
    connection_name=os.environ.get("TEST_CONNECTION", "idempotency"),
    middleware=[Idempotency(lease=os.environ.get("TEST_LEASE", "1s"))],
)
QUEUE = os.environ.get("TEST_QUEUE", "idempotency.q")
LEDGER = os.environ.get("TEST_LEDGER", "ledger.txt")


@app.task(queue=QUEUE, idempotency_key=lambda order, **_: f"order:{order}")
async def charge(order: int) -> str:
    """The first run hangs (the test kills its worker); any later run completes."""
    path = anyio.Path(LEDGER)
    async with await path.open("a") as ledger:
        await ledger.write(f"start {os.getpid()} {order}\n")
    first = (await path.read_text()).count("start") == 1
    if first:
        await anyio.sleep(60)
    return f"charged {order}"

"""Your own plug-ins: time every task, and stamp every message with the service that sent it.

Run it with ``python examples/middleware.py``: it uses the in-memory broker, so it needs no
RabbitMQ, and prints how long each task took.
"""

from __future__ import annotations

import logging
import time

import anyio

from cuebx import Cuebx, Middleware, Outcome, Publish, Received, TaskContext
from cuebx.testing import drain

log = logging.getLogger("example.timing")


class Timing(Middleware):
    """Log how long each handler ran, and keep the figures (for a dashboard, or a test)."""

    def __init__(self) -> None:
        self.durations: dict[str, list[float]] = {}

    async def after_handler(self, received: Received, outcome: Outcome) -> None:
        name = received.context.task_name
        self.durations.setdefault(name, []).append(outcome.duration)
        status = "ok" if outcome.succeeded else type(outcome.error).__name__
        log.info("%s took %.1f ms (%s)", name, outcome.duration * 1000, status)


class Origin(Middleware):
    """Add an ``x-origin`` header naming this service to every message it publishes."""

    def __init__(self, service: str) -> None:
        self.service = service

    async def before_publish(self, publish: Publish) -> None:
        publish.headers["x-origin"] = self.service


timing = Timing()
app = Cuebx("memory://", middleware=[timing, Origin("billing")])


@app.task(queue="invoices")
async def render_invoice(ctx: TaskContext, invoice_id: int) -> None:
    await anyio.sleep(0.01)  # the real work
    print(f"invoice {invoice_id} from {ctx.headers['x-origin']}")


async def main() -> None:
    async with app:
        worker = await app.start_consumers()
        for invoice_id in (1, 2, 3):
            await render_invoice.delay(invoice_id)
        await drain(app)  # from the testing kit: until every handler has finished
        await worker.stop()
    for seconds in timing.durations["render_invoice"]:
        print(f"render_invoice took {seconds * 1000:.1f} ms")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    started = time.perf_counter()
    anyio.run(main)
    print(f"done in {time.perf_counter() - started:.2f}s")

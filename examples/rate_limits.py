"""Rate limits across all workers, and concurrency, kept by the broker.

Run it with ``python examples/rate_limits.py``. It uses the in-memory broker, whose clock
jumps over the limiter's windows: the starts it prints are on the broker's clock. With
RabbitMQ the same code limits every worker and process that consumes these queues.
"""

from __future__ import annotations

from collections import Counter

import anyio

# --8<-- [start:app]
from cuebx import Cuebx

app = Cuebx("memory://")
stripe = app.limiter("stripe", "5/s")  # shared by every task that names it


@app.task(queue="charges", rate_limit="stripe")
async def charge(order_id: int) -> None:
    started.append(("charge", app.broker.clock.time()))


@app.task(queue="refunds", rate_limit=stripe)
async def refund(order_id: int) -> None:
    started.append(("refund", app.broker.clock.time()))


@app.task(queue="geocoding", rate_limit="2/s")  # a limit of its own
async def geocode(address: str) -> None:
    started.append(("geocode", app.broker.clock.time()))


@app.task(queue="exports", concurrency=2)  # at most two at once, across all workers
async def export(report: str) -> None: ...


# --8<-- [end:app]

started: list[tuple[str, float]] = []


async def main() -> None:
    from cuebx.testing import drain, running

    async with running(app):
        begin = app.broker.clock.time()
        await charge.map([(n,) for n in range(12)])
        await refund.map([(n,) for n in range(3)])
        await geocode.map([(f"{n} Main St",) for n in range(4)])
        await drain(app)
    per_second = Counter((task, int(at - begin)) for task, at in started)
    for second in range(4):
        counts = {task: per_second[task, second] for task in ("charge", "refund", "geocode")}
        shared = counts["charge"] + counts["refund"]
        print(
            f"second {second}: stripe {shared} (charge {counts['charge']}, refund "
            f"{counts['refund']}), geocode {counts['geocode']}"
        )


if __name__ == "__main__":
    anyio.run(main)

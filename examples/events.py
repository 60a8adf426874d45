"""Events: one "order created", received by inventory, shipping, email and analytics.

Run it with ``python examples/events.py``. It uses the in-memory broker, whose clock jumps
over the email's retry delay; with RabbitMQ (``Cuebx("amqp://...")``) the same code runs in
four queues, and each service can run its subscribers in a worker of its own.
"""

from __future__ import annotations

import anyio
import msgspec

# --8<-- [start:app]
from cuebx import Cuebx, TaskContext

app = Cuebx("memory://")


class OrderCreated(msgspec.Struct):
    order_id: int
    user_id: int
    total: float
    items: list[str]


@app.on("order.created", queue="inventory")
async def reserve_items(order: OrderCreated) -> None:
    print(f"inventory: reserved {', '.join(order.items)} for order {order.order_id}")


@app.on("order.created", queue="shipping")
async def prepare_shipment(order: OrderCreated) -> None:
    print(f"shipping: label printed for order {order.order_id}")


@app.on("order.created", queue="email", retries=["30s", "5m"])
async def send_confirmation(ctx: TaskContext, order: OrderCreated) -> None:
    if ctx.attempt == 0:
        raise ConnectionError("the mail server is down")  # only this subscriber retries
    print(f"email: confirmation for order {order.order_id} sent (attempt {ctx.attempt})")


class OrderFigures(msgspec.Struct):
    """Analytics reads two fields of any order event: the others are ignored."""

    order_id: int
    total: float = 0.0


@app.on("order.*", queue="analytics")
async def track(ctx: TaskContext, order: OrderFigures) -> None:
    print(f"analytics: {ctx.headers['x-cuebx-event']} {order.order_id} ({order.total:.2f})")


async def place_order() -> None:
    # The order service knows nothing of who listens.
    await app.emit("order.created", OrderCreated(1001, 7, 59.90, ["tea", "cups"]))
    await app.emit("order.cancelled", {"order_id": 1000})


# --8<-- [end:app]


async def main() -> None:
    from cuebx.testing import drain, running

    async with running(app):
        await place_order()
        kept = await app.emit("user.deleted", {"user_id": 7})  # nobody subscribes
        await drain(app)
    print(f"unrouted: {app.events.unrouted} (kept: {not kept.routed})")


if __name__ == "__main__":
    anyio.run(main)

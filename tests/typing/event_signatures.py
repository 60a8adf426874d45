"""Checked by mypy (strict, with warn_unused_ignores), never run: subscribers are typed tasks.

Each wrong call carries a ``type: ignore`` for the exact error: if cuebx's typing stopped
catching it, the ignore would become unused and mypy would fail the test command.
"""

from __future__ import annotations

import msgspec

from cuebx import Cuebx, Emitted, Limiter, TaskContext, TaskHandle

app = Cuebx("memory://")
stripe: Limiter = app.limiter("stripe", "100/s")


class OrderCreated(msgspec.Struct):
    id: int


@app.on("order.created", queue="inventory", retries=["10s"], rate_limit=stripe)
async def reserve(ctx: TaskContext, order: OrderCreated) -> None: ...


@app.task(queue="exports", concurrency=2, rate_limit="5/s")
async def export(day: str) -> None: ...


async def good_calls() -> tuple[Emitted, TaskHandle[None], TaskHandle[None]]:
    emitted = await app.emit("order.created", OrderCreated(1), mandatory=True)
    return emitted, await reserve.delay(OrderCreated(2)), await export.delay("mon")


async def bad_calls() -> None:
    await reserve.delay(1)  # type: ignore[arg-type]
    await app.emit("order.created", OrderCreated(1), countdown=5)  # type: ignore[call-arg]

"""A FastAPI app that enqueues tasks and runs their worker in its own lifespan.

Run it with ``uvicorn fastapi_app:api`` in this folder, then
``curl -X POST localhost:8000/images/42/thumbnail``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from cuebx import Cuebx, TaskContext

tasks = Cuebx(connection_name="cuebx-fastapi-example")

thumbnails_made: list[tuple[int, int, str]] = []


@tasks.task(queue="example.thumbnails", retries=["1s", "10s"], prefetch=4, timeout="1m")
async def make_thumbnail(ctx: TaskContext, image_id: int, size: int = 128) -> None:
    """Render a thumbnail (here: remember that we did, with the task id)."""
    thumbnails_made.append((image_id, size, ctx.message_id))


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    async with tasks:  # connect and declare the topology before serving requests
        worker = await tasks.start_consumers()  # returns once consumers are registered
        yield
        await worker.stop()  # finish running tasks, requeue the rest


api = FastAPI(lifespan=lifespan)


@api.post("/images/{image_id}/thumbnail", status_code=202)
async def request_thumbnail(image_id: int, size: int = 128) -> dict[str, str]:
    handle = await make_thumbnail.delay(image_id, size=size)
    return {"task_id": handle.id}

"""The notification service's status flow, on cuebx: pending → processing → sent / failed.

``POST /notifications`` publishes a task and answers at once with its id;
``GET /notifications/{id}/status`` reads the task's state from the result store, which the
worker keeps up to date (no table of notifications, no status column written by hand).

Run the API and a worker in one process (the worker in the API's lifespan)::

    NOTIFICATIONS_STORE=redis://localhost:6379/0 uvicorn service:api     # in this folder

or the worker on its own, as in production: ``cuebx worker -A service:tasks`` with
``NOTIFICATIONS_WORKER=0`` for the API. Then::

    curl -X POST localhost:8000/notifications -H 'content-type: application/json' \\
         -d '{"type": "email", "recipient": "ann@example.com", "content": "Hello!"}'
    curl localhost:8000/notifications/<id>/status
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Literal

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from cuebx import Cuebx, Reject, TaskStatus

tasks = Cuebx(
    store=os.environ.get("NOTIFICATIONS_STORE", "redis://localhost:6379/0"),
    result_ttl="7d",
    connection_name="notifications",
)
QUEUE = os.environ.get("NOTIFICATIONS_QUEUE", "notifications")

Kind = Literal["email", "sms"]

#: What the seed service's clients know: cuebx's states, as its status column had them.
SEED_STATUS = {
    "pending": "pending",
    "started": "processing",
    "retrying": "processing",
    "succeeded": "sent",
    "failed": "failed",
    "dead-lettered": "failed",
    "skipped": "sent",
}


@tasks.task(queue=QUEUE, retries=["1s", "10s"], idempotent=True)
async def send_notification(kind: Kind, recipient: str, content: str) -> str:
    """Send one notification; return the provider's receipt (kept as the task's result)."""
    if recipient.endswith("@invalid.example"):
        raise Reject(f"cannot deliver to {recipient}")
    return f"{kind} to {recipient}: {len(content)} characters"


class NotificationIn(BaseModel):
    type: Kind
    recipient: str
    content: str


class NotificationStatus(BaseModel):
    id: str
    status: str
    state: str
    attempt: int
    updated_at: datetime | None
    error: str | None
    receipt: str | None = None


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    async with tasks:
        if os.environ.get("NOTIFICATIONS_WORKER", "1") == "1":
            worker = await tasks.start_consumers()
            yield
            await worker.stop()
        else:
            yield


api = FastAPI(lifespan=lifespan)


@api.post("/notifications", status_code=202)
async def create(notification: NotificationIn) -> dict[str, str]:
    handle = await send_notification.delay(
        notification.type, notification.recipient, notification.content
    )
    return {"id": handle.id, "status": "pending"}


@api.get("/notifications/{notification_id}/status")
async def status(notification_id: str) -> NotificationStatus:
    found: TaskStatus = await tasks.status(notification_id)
    if found.state == "unknown":
        raise HTTPException(404, f"no notification {notification_id} (or it expired)")
    receipt = None
    if found.state == "succeeded":
        receipt = await send_notification.handle(notification_id).result(timeout=1)
    return NotificationStatus(
        id=notification_id,
        status=SEED_STATUS[found.state],
        state=found.state,
        attempt=found.attempt,
        updated_at=found.updated_at,
        error=found.error or None,
        receipt=receipt,
    )

"""A signup flow whose welcome email retries on the broker (tested in test_signups.py)."""

from __future__ import annotations

from cuebx import Cuebx, Reject, TaskContext

app = Cuebx()  # CUEBX_BROKER_URL in production; the tests swap in an in-memory broker


async def deliver_email(to: str, subject: str) -> None:
    """Talk to the mail server (a stand-in here; tests replace it)."""


@app.task(queue="signups", retries=["30s", "5m", "1h"])
async def send_welcome(ctx: TaskContext, email: str) -> None:
    if "@" not in email:
        raise Reject(f"{email!r} is not an email address")  # no retry can fix this
    await deliver_email(email, f"Welcome! (task {ctx.message_id})")

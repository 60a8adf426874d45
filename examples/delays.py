"""Delayed tasks: a countdown, an eta and a retry after a delay, all held by the broker.

Run it with ``python examples/delays.py``: it uses the in-memory broker, whose clock jumps
over the delays, so a day of reminders takes a few milliseconds. With RabbitMQ
(``Cuebx("amqp://...")``) the same code waits real time, in RabbitMQ's queues.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio

# --8<-- [start:app]
from cuebx import Cuebx, Retry, TaskContext

app = Cuebx("memory://")  # delay_unit="100ms", delay_levels=32: the defaults


def now() -> str:
    """The broker's time (on memory://, it jumps over delays)."""
    return f"{datetime.fromtimestamp(app.broker.clock.time(), UTC):%a %H:%M:%S}"


@app.task(queue="reminders")
async def remind(user_id: int, text: str) -> None:
    print(f"{now()} reminder for user {user_id}: {text}")


@app.task(queue="webhooks", retries=["1m", "10m", "1h"])
async def call_webhook(ctx: TaskContext, url: str) -> None:
    if ctx.attempt == 0:
        # The other side said "429, retry in 90 s": this attempt ends, the next one is in
        # 90 s, and it counts as one of the three retries.
        raise Retry("rate limited", delay="90s")
    print(f"{now()} called {url} on attempt {ctx.attempt}")


async def schedule_reminders(user_id: int) -> None:
    await remind.apply_async(args=(user_id, "your trial ends tomorrow"), countdown="24h")
    await remind.apply_async(args=(user_id, "in ten minutes"), countdown=600)
    morning = datetime.now(UTC).replace(hour=9, minute=0, second=0) + timedelta(days=2)
    await remind.apply_async(args=(user_id, "good morning"), eta=morning)


# --8<-- [end:app]


# --8<-- [start:celery]
async def celery_habits() -> None:
    # send_reminder.apply_async(args=(1, "hi"), countdown=600)
    await remind.apply_async(args=(1, "hi"), countdown=600)
    # send_reminder.apply_async(args=(1, "hi"), eta=datetime(2027, 1, 1, 9, tzinfo=UTC))
    await remind.apply_async(args=(1, "hi"), eta=datetime(2027, 1, 1, 9, tzinfo=UTC))


# --8<-- [end:celery]


async def main() -> None:
    from cuebx.testing import drain, running

    async with running(app):
        print(f"{now()} scheduling")
        await schedule_reminders(42)
        await call_webhook.delay("https://example.com/hook")
        await drain(app)  # until every delay has run out: no wall time on memory://


if __name__ == "__main__":
    anyio.run(main)

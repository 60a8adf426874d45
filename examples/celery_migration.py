"""The cuebx side of docs/celery.md: Celery habits in their cuebx form.

``python celery_migration.py`` runs the tasks below in process on ``memory://`` and prints
what happened; mypy checks the file with the rest of the examples.
"""

from __future__ import annotations

# --8<-- [start:app]
from cuebx import Cuebx, Reject, Retry, TaskContext

app = Cuebx()  # the URL comes from CUEBX_BROKER_URL, like Celery's broker_url


class MailServerBusy(Exception):
    """The mail server asked us to come back later."""


class UnknownAddress(Exception):
    """No retry can fix this one."""


@app.task(
    queue="emails",  # task_routes / apply_async(queue=)
    retries=["10s", "1m", "10m"],  # max_retries=3, and each delay written out
    retry_on=(MailServerBusy, ConnectionError),  # autoretry_for
    dont_retry_on=UnknownAddress,  # dead-lettered at once, with reason "failed"
    timeout="2m",  # task_time_limit
    prefetch=20,  # worker_prefetch_multiplier: here, 20 at once per worker
)
async def send_email(to: str, subject: str, body: str = "") -> None:
    await deliver(to, subject, body)


# --8<-- [end:app]
busy_once: set[str] = set()


async def deliver(to: str, subject: str, body: str) -> None:
    """A stand-in for the mail client: 'busy@' is refused once, 'nobody@' always."""
    if to.startswith("nobody@"):
        raise UnknownAddress(to)
    if to.startswith("busy@") and to not in busy_once:
        busy_once.add(to)
        raise MailServerBusy("421 try again later")
    print(f"sent {subject!r} to {to}")


# --8<-- [start:bound]
@app.task(queue="orders", retries=["30s", "5m"])
async def charge_order(ctx: TaskContext, order_id: int) -> None:
    # bind=True and self.request: the context is injected, and not part of .delay()
    print(f"charging order {order_id}: task {ctx.message_id}, attempt {ctx.attempt}")
    if order_id < 0:
        raise Reject(f"order {order_id} does not exist")  # dead-letter now, no retries
    if ctx.attempt == 0 and order_id == 7:
        raise Retry("payment provider rate-limited us")  # self.retry(): the next tier


# --8<-- [end:bound]


# --8<-- [start:publish]
async def checkout(order_id: int, email: str) -> str:
    await send_email.delay(email, "Your order")  # .delay(): typed against send_email
    handle = await charge_order.apply_async(
        args=(order_id,),
        priority=5,  # needs Cuebx(max_priority=N) to take effect
        headers={"x-tenant": "acme"},
        correlation_id=f"checkout-{order_id}",
        message_id=f"charge-{order_id}",  # Celery's task_id=
    )
    return handle.id  # the task id; there is no AsyncResult to wait on


# --8<-- [end:publish]


async def main() -> None:
    from cuebx.testing import dead_letters, drain, running, use_memory_broker

    with use_memory_broker(app):
        async with running(app):
            print("task id:", await checkout(7, "busy@example.com"))
            await charge_order.delay(-1)
            await send_email.delay("nobody@example.com", "Hello")
            await drain(app)  # the broker's clock jumps over the retry delays
        for queue in ("emails", "orders"):
            for dead in await dead_letters(app, queue):
                print(f"dead letter in {queue}.dlq: {dead.reason} {dead.arguments}")


if __name__ == "__main__":
    import anyio

    anyio.run(main)

"""Quick start: a task with broker-side retries, a producer and a worker in one process.

Run it with ``python quickstart.py``; it uses RabbitMQ at ``CUEBX_BROKER_URL`` (default
``amqp://guest:guest@localhost:5672/``), or, when none answers or with ``--memory``, runs
entirely in process on the in-memory broker. To run the worker on its own instead, start
``cuebx worker -A quickstart`` in this folder and publish from another process.
"""

from __future__ import annotations

import logging
import os
import sys

import anyio

from cuebx import BrokerUnavailableError, Cuebx, TaskContext
from cuebx.brokers.base import mask_url
from cuebx.testing import use_memory_broker

app = Cuebx(connection_name="cuebx-quickstart", connect_timeout="3s")

PEOPLE = [("ann@example.com", "Ann"), ("bob@example.com", "Bob"), ("f@example.com", "Flaky")]
sent: list[str] = []
all_sent = anyio.Event()


QUEUE = os.environ.get("QUICKSTART_QUEUE", "quickstart.emails")


@app.task(queue=QUEUE, retries=["200ms", "1s"])
async def send_welcome(ctx: TaskContext, email: str, name: str) -> None:
    """Pretend to send a welcome email; the first try for 'Flaky' fails and is retried."""
    if name == "Flaky" and ctx.attempt == 0:
        raise ConnectionError("SMTP server busy")
    sent.append(email)
    print(f"worker:   sent welcome to {name} <{email}> (attempt {ctx.attempt})", flush=True)
    if len(sent) == len(PEOPLE):
        all_sent.set()


async def demo() -> None:
    async with app:  # connect and declare the queues, retry tiers and dead-letter queue
        worker = await app.start_consumers()
        for email, name in PEOPLE:
            handle = await send_welcome.delay(email, name)
            print(f"producer: queued welcome for {name} as task {handle.id}", flush=True)
        with anyio.fail_after(10):
            await all_sent.wait()
        await worker.stop()
    print(f"done: {len(sent)} emails sent, 'Flaky' on its second attempt", flush=True)


async def main(force_memory: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="worker:   %(levelname)s %(message)s")
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)  # cuebx reports a refused connection
    url = mask_url(app.settings.url)
    if not force_memory:
        try:
            await app.connect()
        except BrokerUnavailableError:
            print(
                f"no RabbitMQ answers at {url}: running entirely in process on memory://",
                flush=True,
            )
        else:
            print(f"cuebx quick start on RabbitMQ at {url}", flush=True)
            await demo()
            return
    else:
        print("running entirely in process on memory:// (--memory)", flush=True)
    with use_memory_broker(app, "memory://?clock=real"):  # retry TTLs run in real time
        await demo()


if __name__ == "__main__":
    anyio.run(main, "--memory" in sys.argv[1:])

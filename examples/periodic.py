"""Periodic tasks: the jobs of docs/periodic.md, and a day of them on memory:// in no time.

    python examples/periodic.py

With a broker, ``cuebx worker -A periodic`` runs the tasks and takes part in firing the jobs;
``cuebx schedule -A periodic`` lists them.
"""

from __future__ import annotations

from collections import Counter

import anyio

from cuebx import Cuebx, TaskContext
from cuebx.testing import use_memory_broker

# --8<-- [start:jobs]
app = Cuebx()  # CUEBX_BROKER_URL, else RabbitMQ on localhost
ran: Counter[str] = Counter()


# A task without arguments and its schedule, in one decorator.
@app.periodic(cron="*/5 * * * *", tz="Europe/Paris")
async def cleanup() -> None:
    ran["cleanup"] += 1


# An existing task, scheduled twice with different arguments: each job has its own name.
@app.task(queue="reports")
async def send_report(ctx: TaskContext, kind: str) -> None:
    # The job and the slot come with the message; the message id is cron:<job>:<slot>.
    ran[ctx.headers["x-cuebx-job"]] += 1


app.schedule(send_report, cron="0 8 * * mon", tz="Europe/Paris", args=("weekly",), name="weekly")
app.schedule(send_report, cron="0 7 * * *", kwargs={"kind": "daily"}, name="daily", misfire="skip")


@app.task
async def ping() -> None:
    ran["ping"] += 1


app.schedule(ping, every="30s")


# At most one run at a time: a slot whose previous run still goes on is skipped.
@app.periodic(every="1h", overlap="skip", overlap_timeout="3h", queue="search")
async def rebuild_search_index() -> None:
    ran["rebuild_search_index"] += 1


# --8<-- [end:jobs]


# --8<-- [start:test]
async def main() -> None:
    """Run a day of the schedule on the in-memory broker: its clock jumps from slot to slot."""
    with use_memory_broker(app) as broker:
        # From half a minute before an hour to just before the same hour the next day.
        hour = (broker.clock.time() // 3600 + 1) * 3600
        await broker.clock.advance(hour - 30 - broker.clock.time())
        worker = await app.start_consumers()
        await broker.clock.sleep_until(hour + 24 * 3600 - 1)
        await worker.stop()
        await app.close()
    for job, runs in sorted(ran.items()):
        print(f"{job}: {runs} runs")


# --8<-- [end:test]


if __name__ == "__main__":
    anyio.run(main)

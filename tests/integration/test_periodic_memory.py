"""Periodic tasks on memory://: weeks of schedule on the autojump clock, in no wall time."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest

from cuebx import Cuebx, PublishError, current_context
from cuebx.brokers.memory import MemoryBroker
from cuebx.message import OutgoingMessage
from cuebx.scheduling.leader import read_status
from cuebx.scheduling.schedules import slot_text
from cuebx.scheduling.state import JobStatus, status_queue_name
from cuebx.worker import Worker

pytestmark = pytest.mark.anyio

DAY = 86_400
WEEK = 7 * DAY
PARIS = ZoneInfo("Europe/Paris")


class Fires:
    """What the workers ran: the slot (``x-cuebx-slot``) and message id of each run."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, str]] = []

    def record(self) -> None:
        context = current_context()
        self.runs.append((context.headers["x-cuebx-slot"], context.message_id))

    @property
    def slots(self) -> list[str]:
        return [slot for slot, _ in self.runs]


def make_app(broker: MemoryBroker, fires: Fires, *, refresh: str = "1h", **job: Any) -> Cuebx:
    """An app with one job ``tick`` (``every="1h"`` unless told), on the shared broker."""
    app = Cuebx("memory://", broker=broker)

    @app.task
    async def tick() -> None:
        fires.record()

    app.schedule(tick, **(job or {"every": "1h"}))
    app.scheduler.configure(refresh=refresh)
    return app


@asynccontextmanager
async def running(*apps: Cuebx) -> AsyncIterator[list[Worker]]:
    workers = [await app.start_consumers() for app in apps]
    try:
        yield workers
    finally:
        for worker in workers:
            await worker.stop()


@pytest.fixture
async def broker() -> AsyncIterator[MemoryBroker]:
    broker = MemoryBroker("memory://periodic")
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.close()


async def until_time(broker: MemoryBroker, epoch: float) -> None:
    await broker.clock.sleep_until(epoch)


def hours(fires: Fires) -> list[int]:
    return [int(datetime.fromisoformat(s).timestamp()) // 3600 for s in fires.slots]


async def test_a_week_ahead_fires_every_hourly_slot_once_in_no_wall_time(
    broker: MemoryBroker,
) -> None:
    fires = Fires()
    start = broker.clock.time()
    with anyio.fail_after(10):
        async with running(make_app(broker, fires)):
            await until_time(broker, start + WEEK + 1)
    first = int(start) // 3600 + 1
    assert hours(fires) == list(range(first, first + 7 * 24))
    assert all(mid == f"cron:tick:{slot}" for slot, mid in fires.runs)


async def test_a_weekday_cron_fires_five_times_a_week_at_its_wall_time(
    broker: MemoryBroker,
) -> None:
    fires = Fires()
    start = broker.clock.time()
    app = make_app(broker, fires, cron="0 9 * * mon-fri", tz="Europe/Paris")
    async with running(app):
        await until_time(broker, start + WEEK)
    local = [datetime.fromisoformat(s).astimezone(PARIS) for s in fires.slots]
    assert len(local) == 5
    assert {(t.hour, t.minute) for t in local} == {(9, 0)}
    assert sorted(t.isoweekday() for t in local) == [1, 2, 3, 4, 5]


async def test_the_default_refresh_keeps_cycling_the_state_without_extra_fires(
    broker: MemoryBroker,
) -> None:
    """Every minute the leader re-publishes its state (for RabbitMQ's consumer timeout)."""
    fires = Fires()
    start = broker.clock.time()
    app = make_app(broker, fires, refresh="1m", every="6h")
    async with running(app):
        await until_time(broker, start + DAY + 1)
        status = await read_status(broker, status_queue_name("cuebx", "tick"))
    assert len(fires.runs) == 4
    assert status is not None
    assert broker.clock.time() - status.written <= 60


def next_transition(after: datetime, *, forward: bool) -> datetime:
    """Midnight (Paris) of the next day on which Paris moves its clocks forward or back."""
    day = after.astimezone(PARIS).replace(hour=0, minute=0, second=0, microsecond=0)
    while True:
        day += timedelta(days=1)
        before = day.replace(hour=0).utcoffset()
        later = (day + timedelta(hours=5)).astimezone(PARIS).utcoffset()
        assert before is not None
        assert later is not None
        if (later > before) == forward and later != before:
            return day


@pytest.mark.parametrize("forward", [True, False], ids=["spring-forward", "fall-back"])
async def test_a_cron_across_a_dst_change_fires_at_the_right_wall_times(
    broker: MemoryBroker, forward: bool
) -> None:
    now = datetime.fromtimestamp(broker.clock.time(), UTC)
    change = next_transition(now, forward=forward)
    # Start the day before, at noon.
    await broker.clock.advance((change - timedelta(hours=12)).timestamp() - broker.clock.time())
    fires, hourly = Fires(), Fires()
    app = make_app(broker, fires, cron="30 2 * * *", tz="Europe/Paris")

    @app.task
    async def chime() -> None:
        hourly.record()

    app.schedule(chime, cron="0 * * * *", tz="Europe/Paris")
    async with running(app):
        await until_time(broker, (change + timedelta(days=2)).timestamp())
    local = [datetime.fromisoformat(s).astimezone(PARIS) for s in fires.slots]
    on_the_day = local[0]
    assert on_the_day.date() == change.date()
    if forward:
        # 02:30 does not exist that night: it runs when the clocks have moved on, at 03:00.
        assert (on_the_day.hour, on_the_day.minute) == (3, 0)
        assert len([t for t in hourly.slots if t.startswith(change.strftime("%Y-%m-%d"))]) >= 22
    else:
        # 02:30 happens twice that night: it runs once, the first time (summer time).
        assert (on_the_day.hour, on_the_day.minute, on_the_day.utcoffset()) == (
            2,
            30,
            timedelta(hours=2),
        )
    assert [(t.hour, t.minute) for t in local[1:]] == [(2, 30)] * (len(local) - 1)
    assert len(local) == 2
    # The hourly chime keeps real time through the change: one run per hour, none doubled.
    chimes = [int(datetime.fromisoformat(s).timestamp()) for s in hourly.slots]
    assert chimes == list(range(chimes[0], chimes[0] + 3600 * len(chimes), 3600))


@pytest.mark.parametrize(("misfire", "expected"), [("once", 1), ("skip", 0)])
async def test_slots_missed_while_no_scheduler_ran(
    broker: MemoryBroker, misfire: str, expected: int
) -> None:
    fires = Fires()
    app = make_app(broker, fires, cron="0 8 * * *", misfire=misfire)
    start = broker.clock.time()
    async with running(app):
        await until_time(broker, start + 2 * DAY)
    before = len(fires.runs)
    assert before == 2
    # Three days without any scheduler; then one starts, ten minutes before a day's 08:00
    # would be long gone.
    outage = (int(start) // DAY + 5) * DAY + 8 * 3600 + 7200 - broker.clock.time()
    await broker.clock.advance(outage)
    async with running(app):
        await until_time(broker, broker.clock.time() + 3600)
    caught_up = fires.slots[before:]
    assert len(caught_up) == expected
    if expected:  # the latest missed slot, 08:00 of that day
        assert caught_up[0].endswith("T08:00:00Z")


@pytest.mark.parametrize(("overlap", "expected"), [("allow", [1, 2, 3, 4]), ("skip", [1, 4])])
async def test_overlap_decides_whether_a_slot_fires_while_the_previous_run_goes_on(
    overlap: str, expected: list[int]
) -> None:
    broker = MemoryBroker("memory://overlap", clock="manual")
    await broker.connect()
    app = Cuebx("memory://", broker=broker)
    started: list[str] = []
    release = anyio.Event()

    @app.task
    async def slow() -> None:
        slot = current_context().headers["x-cuebx-slot"]
        started.append(slot)
        if len(started) == 1:
            await release.wait()

    app.schedule(slow, every="1m", overlap=overlap)
    status_queue = status_queue_name("cuebx", "slow")

    async def moved_to(slot: float) -> None:
        def seen(status: JobStatus | None) -> bool:
            return status is not None and (status.next or 0) > slot

        with anyio.fail_after(5):
            while not seen(await read_status(broker, status_queue)):
                await anyio.sleep(0.001)

    # Half a minute before the next minute: the job's start does not cross a slot.
    await broker.clock.advance(90 - broker.clock.time() % 60)
    try:
        async with running(app):
            # The job starts (from its seed, which waits a little for an older state).
            status = None
            with anyio.fail_after(5):
                while status is None:
                    await broker.clock.advance(1)
                    status = await read_status(broker, status_queue)
            assert status.next is not None
            first = status.next
            for n in range(3):
                await broker.clock.advance(first + 60 * n - broker.clock.time())
                await moved_to(first + 60 * n)
            release.set()
            with anyio.fail_after(5):
                while len(started) < len(expected) - 1 or not app.workers[0].idle:
                    await anyio.sleep(0.001)
            await broker.clock.advance(first + 180 - broker.clock.time())
            await moved_to(first + 180)
            with anyio.fail_after(5):
                while len(started) < len(expected):
                    await anyio.sleep(0.001)
    finally:
        await app.close()
    slots = [(int(datetime.fromisoformat(s).timestamp()) - first) // 60 + 1 for s in started]
    assert slots == expected


async def test_a_schedule_changed_by_a_deploy_starts_from_now_without_a_burst(
    broker: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    fires = Fires()
    start = broker.clock.time()
    async with running(make_app(broker, fires, every="1h")):
        await until_time(broker, start + 3 * 3600)
    assert len(fires.runs) == 3
    await broker.clock.advance(5 * 3600)  # the deploy takes a while: five hourly slots pass
    deployed = broker.clock.time()
    with caplog.at_level(logging.WARNING, logger="cuebx.scheduler"):
        async with running(make_app(broker, fires, cron="30 * * * *")):
            await until_time(broker, deployed + 2 * 3600)
    after = fires.slots[3:]
    assert [s[14:] for s in after] == ["30:00Z", "30:00Z"]
    assert all(datetime.fromisoformat(s).timestamp() > deployed for s in after)
    assert "its schedule changed from 'every 1h' to 'cron 30 * * * * UTC'" in caplog.text


async def test_a_job_removed_from_the_app_is_not_fired_by_a_newer_worker(
    broker: MemoryBroker,
) -> None:
    fires = Fires()
    start = broker.clock.time()
    async with running(make_app(broker, fires)):
        await until_time(broker, start + 2 * 3600)
    newer = Cuebx("memory://", broker=broker)

    @newer.task
    async def tick() -> None:
        fires.record()

    async with running(newer):
        await until_time(broker, start + 6 * 3600)
    assert len(fires.runs) == 2
    assert await broker.queue_length("cuebx.scheduler.tick") == 1  # kept, not deleted


@pytest.mark.parametrize("schedulers", [2, 3])
async def test_several_schedulers_started_at_once_fire_each_slot_once_and_hand_over(
    broker: MemoryBroker, schedulers: int, caplog: pytest.LogCaptureFixture
) -> None:
    fires = Fires()
    apps = [make_app(broker, fires, every="10m") for _ in range(schedulers)]
    start = broker.clock.time()
    with caplog.at_level(logging.INFO, logger="cuebx.scheduler"):
        async with running(*apps) as workers:
            await until_time(broker, start + 3600)
            # The active scheduler's worker stops; another takes over at once.
            leaders = [w for w, app in zip(workers, apps, strict=True) if app.scheduler.leading]
            assert len(leaders) == 1
            await leaders[0].stop()
            await until_time(broker, start + 2 * 3600)
            became = [r for r in caplog.records if "is now the active scheduler" in r.message]
    first = int(start) // 600 + 1
    tens = [int(datetime.fromisoformat(s).timestamp()) // 600 for s in fires.slots]
    assert tens == list(range(first, first + 12))
    assert len(became) == 2  # the first leader, then the one that took over


async def test_a_leader_whose_channel_closed_steps_down_and_never_fires_from_memory(
    broker: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """What a lost connection does on RabbitMQ: the channel closes, the state goes back."""
    fires = Fires()
    first, second = make_app(broker, fires, every="10m"), make_app(broker, fires, every="10m")
    start = broker.clock.time()
    with caplog.at_level(logging.INFO, logger="cuebx.scheduler"):
        async with running(first, second):
            await until_time(broker, start + 1800)
            leader = first if first.scheduler.leading else second
            # Close the channel of the consumer that holds the state (the test stands in for
            # a lost connection; memory:// has no reconnection to reopen it).
            [held] = [
                c for c in broker._consumers if c.queue.name == "cuebx.scheduler.tick" and c.unacked
            ]
            broker._close_consumer(held)
            await until_time(broker, start + 3600)
            assert leader.scheduler.leading == frozenset()
    tens = [int(datetime.fromisoformat(s).timestamp()) // 600 for s in fires.slots]
    first_ten = int(start) // 600 + 1
    assert tens == list(range(first_ten, first_ten + 6))
    assert "its channel closed" in caplog.text


async def test_a_scheduler_in_line_offers_a_fresh_state_when_none_is_left(
    broker: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """A state queue left empty (purged by hand) does not stop the job for good."""
    fires = Fires()
    app = make_app(broker, fires, refresh="1m", every="10m")
    await broker.declare(app.scheduler.topology())
    swallowed: list[bytes] = []

    async def swallow(delivery: Any) -> None:
        swallowed.append(delivery.body)
        await delivery.ack()

    # Another consumer is first in line and loses every state it gets.
    thief = await broker.consume("cuebx.scheduler.tick", 10, swallow)
    start = broker.clock.time()
    with caplog.at_level(logging.WARNING, logger="cuebx.scheduler"):
        async with running(app):
            await until_time(broker, start + 11 * 60)
            assert len(swallowed) >= 2  # the seed at start, then one offered by the watch
            await thief.close()
            await until_time(broker, start + 40 * 60)
    assert "offering a fresh state" in caplog.text
    assert len(fires.runs) >= 2


async def test_a_fire_the_broker_did_not_confirm_is_tried_again_and_not_lost(
    broker: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    fires = Fires()
    app = make_app(broker, fires, every="1h")
    start = broker.clock.time()
    with caplog.at_level(logging.ERROR, logger="cuebx.scheduler"):
        async with running(app):
            await until_time(broker, start + 3600 + 1)
            assert len(fires.runs) == 1
            # The task's queue disappears: its next fire is returned as unroutable...
            await broker.delete(app.topology())
            await until_time(broker, (int(start) // 3600 + 2) * 3600 + 1)
            # ...and once it is back, the same slot fires, late but within the grace.
            await broker.declare(app.topology())
            await until_time(broker, (int(start) // 3600 + 2) * 3600 + 9)
            # (Deleting the queue also ended the worker's consumer: the message waits there.)
            [late] = broker.messages("default")
    assert "firing failed: the slot stays due" in caplog.text
    [on_time] = fires.runs
    assert int(datetime.fromisoformat(on_time[0]).timestamp()) // 3600 == int(start) // 3600 + 1
    assert late.message_id == f"cron:tick:{slot_text((int(start) // 3600 + 2) * 3600)}"


class _StateRefused(MemoryBroker):
    """A broker that refuses the scheduler's state messages while `refusing` is set."""

    refusing = False

    async def publish(self, exchange: str, routing_key: str, message: OutgoingMessage) -> None:
        if self.refusing and ".scheduler." in routing_key:
            raise PublishError(f"message {message.message_id} to {routing_key!r} was nacked")
        await super().publish(exchange, routing_key, message)


async def test_a_fired_slot_whose_state_was_not_stored_is_not_fired_again() -> None:
    broker = _StateRefused()
    fires = Fires()
    app = make_app(broker, fires, every="1h")
    start = broker.clock.time()
    async with running(app):
        await until_time(broker, start + 1)
        broker.refusing = True  # the fire goes out, its state does not
        await until_time(broker, start + 3600 + 30)
        broker.refusing = False
        await until_time(broker, start + 3600 + 60)
    next_slot = slot_text((int(start) // 3600 + 1) * 3600)
    assert [run[0] for run in fires.runs] == [next_slot]  # once, though the state failed


async def test_with_overlap_skip_a_dead_lettered_run_ends_its_run_too(
    broker: MemoryBroker,
) -> None:
    app = Cuebx("memory://", broker=broker)
    runs: list[str] = []

    @app.task(queue="fragile")
    async def fragile() -> None:
        runs.append(current_context().headers["x-cuebx-slot"])
        raise ValueError("broken")  # no retries: dead-lettered at once

    app.schedule(fragile, every="1h", overlap="skip")
    app.scheduler.configure(refresh="1h")
    start = broker.clock.time()
    async with running(app):
        await until_time(broker, start + 4 * 3600)
    assert len(runs) >= 3  # each run ended (dead-lettered), so none held the next back

"""The memory broker's clock: auto (jumps when the broker is idle), manual and real modes."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from cuebx.brokers.amqp import AmqpBroker
from cuebx.brokers.base import Delivery, SystemClock
from cuebx.brokers.memory import Clock, ClockMode, MemoryBroker
from cuebx.message import OutgoingMessage
from cuebx.topology import QueueSpec, Topology

pytestmark = pytest.mark.anyio

_ids = itertools.count()


def _to(queue: str) -> dict[str, Any]:
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue}


#: ``work`` (consumed by the tests), ``hour`` (a TTL tier that dead-letters to ``work``),
#: ``later`` (dead-letters to ``end`` after 10 s) and ``end`` (nobody consumes it).
TOPOLOGY = Topology(
    "clock",
    (
        QueueSpec("end", "dead-letter", {}),
        QueueSpec("work", "main", {}),
        QueueSpec("hour", "retry", {"x-message-ttl": 3_600_000, **_to("work")}),
        QueueSpec("later", "retry", {"x-message-ttl": 10_000, **_to("end")}),
    ),
)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


async def connected(mode: ClockMode) -> MemoryBroker:
    broker = MemoryBroker("memory://clock", clock=mode)
    await broker.connect()
    await broker.declare(TOPOLOGY)
    return broker


@pytest.fixture
async def auto() -> AsyncIterator[MemoryBroker]:
    broker = await connected("auto")
    try:
        yield broker
    finally:
        await broker.close()


@pytest.fixture
async def manual() -> AsyncIterator[MemoryBroker]:
    broker = await connected("manual")
    try:
        yield broker
    finally:
        await broker.close()


def message(body: bytes = b"{}") -> OutgoingMessage:
    n = next(_ids)
    return OutgoingMessage(
        body=body,
        message_id=f"m{n}",
        correlation_id=f"m{n}",
        content_type="application/json",
        headers={},
        timestamp=datetime(2024, 5, 1, tzinfo=UTC),
    )


async def until(condition: Callable[[], bool], within: float = 1.0) -> None:
    """Wait for `condition`, failing the test after `within` seconds of real time."""
    with anyio.fail_after(within):
        while not condition():
            await anyio.sleep(0.001)


async def all_blocked() -> None:
    """Wait until every other task, the clock's timer too, waits on something."""
    with anyio.fail_after(1):
        await anyio.wait_all_tasks_blocked()


# -- choosing a mode --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "options", "mode"),
    [
        ("memory://", {}, "auto"),
        ("memory://?clock=manual", {}, "manual"),
        ("memory://name?clock=real", {}, "real"),
        ("memory://", {"clock": "manual"}, "manual"),
        ("memory://", {"real_time": True}, "real"),
        ("memory://?clock=real", {"clock": "real", "real_time": True}, "real"),
        ("memory://?other=1", {}, "auto"),
    ],
)
def test_the_clock_is_auto_unless_the_url_or_an_argument_chooses_another_mode(
    url: str, options: dict[str, Any], mode: str
) -> None:
    assert MemoryBroker(url, **options).clock.mode == mode


def test_an_unknown_clock_mode_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"unknown clock mode 'fast' for memory://\?clock=fast"):
        MemoryBroker("memory://?clock=fast")
    with pytest.raises(ValueError, match=r"unknown clock mode 'slow'.*'auto'.*'manual'.*'real'"):
        MemoryBroker(clock="slow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown clock mode 'later'"):
        Clock("later")  # type: ignore[arg-type]


def test_two_different_clock_modes_are_refused_naming_both() -> None:
    with pytest.raises(ValueError, match=r"\?clock=manual in the URL, clock='auto'"):
        MemoryBroker("memory://?clock=manual", clock="auto")
    with pytest.raises(ValueError, match="clock='manual', real_time=True"):
        MemoryBroker(clock="manual", real_time=True)


# -- auto: time jumps when the broker is idle -------------------------------------------------


async def test_an_auto_clock_expires_a_ttl_on_its_own_in_no_wall_time(
    auto: MemoryBroker,
) -> None:
    got: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery)
        await delivery.ack()

    await auto.consume("work", 1, handler)
    started = time.monotonic()

    await auto.publish("", "hour", message())
    await until(lambda: bool(got))

    assert time.monotonic() - started < 0.5
    assert auto.clock.now() == 3600
    assert got[0].headers["x-death"][0]["reason"] == "expired"


async def test_an_auto_clock_never_jumps_while_a_handler_awaits_real_time(
    auto: MemoryBroker,
) -> None:
    seen: list[tuple[bytes, float, float]] = []

    async def handler(delivery: Delivery) -> None:
        before = auto.clock.now()
        if delivery.body == b"slow":
            await anyio.sleep(0.05)  # real I/O, as far as the broker can tell
        seen.append((delivery.body, before, auto.clock.now()))
        await delivery.ack()

    await auto.consume("work", 5, handler)
    await auto.publish("", "work", message(b"slow"))
    await until(lambda: not auto.is_idle())
    await auto.publish("", "hour", message(b"retried"))  # due in an hour

    await until(lambda: len(seen) == 2)

    # The hour passed only once the slow handler had acked.
    assert seen == [(b"slow", 0, 0), (b"retried", 3600, 3600)]


async def test_an_auto_clock_does_not_jump_between_the_publishes_of_a_busy_publisher(
    auto: MemoryBroker,
) -> None:
    for n in range(50):
        await auto.publish("", "later", message(str(n).encode()))
        assert auto.messages("end") == [], f"time jumped after publish {n}"

    await until(lambda: len(auto.messages("end")) == 50)

    # All fifty entered at time 0, so they all expired together, ten seconds later.
    assert auto.clock.now() == 10
    assert len({m.headers["x-death"][0]["time"] for m in auto.messages("end")}) == 1


async def test_an_idle_auto_clock_waits_without_running_and_wakes_for_new_work(
    auto: MemoryBroker,
) -> None:
    # Nothing due: the timer waits on an event, so every task is blocked.
    await all_blocked()
    assert auto.clock.now() == 0

    await auto.publish("", "later", message())

    await until(lambda: len(auto.messages("end")) == 1)
    assert auto.clock.now() == 10
    await all_blocked()


async def test_an_auto_clock_waits_without_running_while_a_handler_holds_a_delivery(
    auto: MemoryBroker,
) -> None:
    release = anyio.Event()

    async def handler(delivery: Delivery) -> None:
        await release.wait()
        await delivery.ack()

    await auto.consume("work", 1, handler)
    await auto.publish("", "work", message())
    await auto.publish("", "later", message())

    # Something is due, but the broker works: the timer waits for it without polling.
    await all_blocked()
    assert (auto.clock.now(), auto.messages("later") != []) == (0, True)

    release.set()

    await until(lambda: len(auto.messages("end")) == 1)
    assert auto.clock.now() == 10


async def test_an_auto_clock_stops_with_the_broker_and_runs_again_after_a_reconnect() -> None:
    tasks_before = len(asyncio.all_tasks())
    broker = await connected("auto")
    try:
        await broker.consume("work", 1, _hold_forever)
        await broker.publish("", "work", message())  # held unacked: time cannot jump
        await broker.publish("", "later", message())
        await all_blocked()

        await broker.close()

        assert len(asyncio.all_tasks()) == tasks_before  # no timer left behind
        assert broker.is_idle()
        assert (broker.clock.now(), len(broker.messages("later"))) == (0, 1)

        await broker.connect()

        await until(lambda: len(broker.messages("end")) == 1)
        assert broker.clock.now() == 10
    finally:
        await broker.close()
    assert len(asyncio.all_tasks()) == tasks_before


async def _hold_forever(delivery: Delivery) -> None:
    await anyio.sleep_forever()


async def test_advance_still_moves_an_auto_clock_by_hand(auto: MemoryBroker) -> None:
    await auto.publish("", "later", message())

    await auto.clock.advance(4)

    assert auto.clock.now() == 4
    await until(lambda: len(auto.messages("end")) == 1)
    assert auto.clock.now() == 10


# -- manual: time moves only when told ---------------------------------------------------------


async def test_a_manual_clock_stands_still_until_advanced(manual: MemoryBroker) -> None:
    await manual.publish("", "later", message())
    await all_blocked()
    assert (manual.clock.now(), len(manual.messages("later"))) == (0, 1)

    await manual.clock.advance(10)

    assert len(manual.messages("end")) == 1


# -- sleeping on broker time ------------------------------------------------------------------


async def test_sleep_on_an_auto_clock_ends_by_a_jump_in_no_wall_time(auto: MemoryBroker) -> None:
    started = time.monotonic()

    with anyio.fail_after(1):
        await auto.clock.sleep(86_400)

    assert auto.clock.now() == 86_400
    assert time.monotonic() - started < 0.5


async def test_sleepers_and_ttl_expiries_wake_in_time_order(auto: MemoryBroker) -> None:
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await auto.clock.sleep(seconds)
        woke.append((name, auto.clock.now()))

    async def expired(delivery: Delivery) -> None:
        woke.append(("expired", auto.clock.now()))
        await delivery.ack()

    await auto.consume("end", 1, expired)
    with anyio.fail_after(1):
        async with anyio.create_task_group() as group:
            group.start_soon(sleeper, "fifteen", 15)
            group.start_soon(sleeper, "five", 5)
            await auto.publish("", "later", message())

    assert woke == [("five", 5), ("expired", 10), ("fifteen", 15)]


async def test_sleep_until_wakes_at_an_epoch_time_and_never_earlier(auto: MemoryBroker) -> None:
    target = auto.clock.time() + 90.123456789

    await auto.clock.sleep_until(target)

    assert auto.clock.time() >= target
    assert auto.clock.time() - target < 1e-6


async def test_a_manual_clock_ends_sleeps_only_through_advance(manual: MemoryBroker) -> None:
    woke: list[float] = []

    async def sleeper() -> None:
        await manual.clock.sleep(5)
        woke.append(manual.clock.now())

    with anyio.fail_after(1):
        async with anyio.create_task_group() as group:
            group.start_soon(sleeper)
            await all_blocked()
            await manual.clock.advance(4.999)
            await all_blocked()
            assert woke == []

            await manual.clock.advance(0.001)

    assert woke == [5.0]


async def test_a_cancelled_sleep_leaves_nothing_due(auto: MemoryBroker) -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()  # before the clock could jump to its end
        await auto.clock.sleep(10)

    await all_blocked()
    assert auto.clock.now() == 0


async def test_a_real_clock_ends_a_sleep_in_real_time_or_by_advance() -> None:
    broker = MemoryBroker(clock="real")  # not even connected: sleeps time themselves
    started = time.monotonic()

    await broker.clock.sleep(0.02)

    assert time.monotonic() - started >= 0.02
    with anyio.fail_after(1):
        async with anyio.create_task_group() as group:
            group.start_soon(broker.clock.sleep, 3600)
            await all_blocked()
            await broker.clock.advance(3600)
    assert broker.clock.now() >= 3600.02


@pytest.mark.parametrize("seconds", [0, -1])
async def test_a_sleep_of_no_time_returns_at_once(manual: MemoryBroker, seconds: float) -> None:
    with anyio.fail_after(1):
        await manual.clock.sleep(seconds)
        await manual.clock.sleep_until(manual.clock.time() + seconds)
    assert manual.clock.now() == 0


async def test_sleeping_for_no_number_is_a_value_error(manual: MemoryBroker) -> None:
    with pytest.raises(ValueError, match="NaN"):
        await manual.clock.sleep(math.nan)
    with pytest.raises(ValueError, match="not a time"):
        await manual.clock.sleep_until(math.inf)


async def test_an_infinite_sleep_waits_until_cancelled(auto: MemoryBroker) -> None:
    with anyio.move_on_after(0.01) as scope:
        await auto.clock.sleep(math.inf)
    assert scope.cancelled_caught
    assert auto.clock.now() == 0


# -- the wall clock the broker shows ----------------------------------------------------------


async def test_time_and_wall_are_the_creation_time_plus_the_clock(manual: MemoryBroker) -> None:
    start = manual.clock.time()
    assert abs(start - time.time()) < 5

    await manual.clock.advance(3600)

    assert manual.clock.time() == pytest.approx(start + 3600, abs=1e-6)
    shown = datetime.fromtimestamp(manual.clock.time(), UTC)
    assert abs(manual.clock.wall() - shown) <= timedelta(microseconds=1)


async def test_the_amqp_broker_runs_on_the_system_clock() -> None:
    clock = AmqpBroker("amqp://guest:guest@127.0.0.1:1/").clock  # never connected
    assert isinstance(clock, SystemClock)
    assert abs(clock.time() - time.time()) < 1
    started = time.monotonic()

    await clock.sleep_until(clock.time() + 0.02)
    await clock.sleep(0.01)

    assert time.monotonic() - started >= 0.03
    with anyio.fail_after(1):
        await clock.sleep_until(0)  # the past: at once

"""The delay ladder's pure planning: names, arguments, ways through the levels, rounding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from cuebx import Cuebx, DelayError
from cuebx.brokers.memory.exchanges import headers_match
from cuebx.delays import Delays, Ladder, due_us, now_us
from cuebx.message import HEADER_DELAY_TO, HEADER_ETA, OutgoingMessage, retry_copy
from cuebx.topology import Binding, ExchangeSpec, Topology

#: Four levels of 100 ms: delays of up to 15 units (1.5 s).
SMALL = Ladder("shop", unit_ms=100, levels=4)


@pytest.mark.parametrize(
    ("units", "hops", "way"),
    [
        (1, (0,), {}),
        (2, (1,), {"cuebx-delay-after-1": -1}),
        (5, (2, 0), {"cuebx-delay-after-2": 0}),
        (8, (3,), {"cuebx-delay-after-3": -1}),
        (
            15,
            (3, 2, 1, 0),
            {"cuebx-delay-after-3": 2, "cuebx-delay-after-2": 1, "cuebx-delay-after-1": 0},
        ),
    ],
)
def test_a_delay_waits_in_the_levels_of_its_set_bits_and_carries_its_way_in_headers(
    units: int, hops: tuple[int, ...], way: dict[str, int]
) -> None:
    assert SMALL.hops(units) == hops
    assert sum(SMALL.ttl_ms(k) for k in hops) == units * 100
    exchange, key, copy = SMALL.prepare(message({}), "q", due_us=units * 100_000, now_us=0)
    # Straight to its first level, through the default exchange.
    assert (exchange, key) == ("", f"shop.delay.{hops[0]}")
    assert {k: v for k, v in copy.headers.items() if k.startswith("cuebx-delay-after-")} == way


def test_the_default_ladder_spans_about_thirteen_years_in_at_most_32_hops() -> None:
    ladder = Ladder("cuebx")
    assert (ladder.unit_ms, ladder.levels) == (100, 32)
    assert ladder.max_delay_ms == (2**32 - 1) * 100
    assert 13.5 < ladder.max_delay_ms / (365.25 * 86_400_000) < 13.7
    # Ten minutes at 100 ms: 6000 units, 13 binary digits.
    assert len(ladder.hops(6000)) <= 13


@pytest.mark.parametrize(
    ("due", "now", "units"),
    [
        (1_000_000, 1_000_000, 0),  # due now
        (900_000, 1_000_000, 0),  # past
        (1_000_001, 1_000_000, 1),  # any wait at all is a whole unit: never early
        (1_100_000, 1_000_000, 1),
        (1_100_001, 1_000_000, 2),
        (1_700_000_010_000_000, 1_700_000_000_000_000, 100),  # exact: no float noise
    ],
)
def test_delays_are_rounded_up_to_whole_units(due: int, now: int, units: int) -> None:
    assert SMALL.units(due, now) == units


def test_a_delay_beyond_the_span_is_refused_naming_the_maximum() -> None:
    SMALL.check(15, "task 'remind'")
    with pytest.raises(DelayError) as caught:
        SMALL.check(16, "task 'remind'")
    message = str(caught.value)
    assert "task 'remind'" in message
    assert "a delay of 1s600ms" in message
    assert "at most 1s500ms" in message
    assert "2^4 - 1 units of 100ms" in message


def test_the_topology_names_levels_after_the_exchange_with_one_ttl_each() -> None:
    topology = SMALL.topology(["emails"])
    assert [q.name for q in topology.queues] == [
        "shop.delay.unroutable",
        "shop.delay.0",
        "shop.delay.1",
        "shop.delay.2",
        "shop.delay.3",
    ]
    assert topology.queue("shop.delay.2").arguments == {
        "x-message-ttl": 400,
        "x-dead-letter-exchange": "shop.delay.1",
    }
    # Level 0 dead-letters to the deliver exchange.
    assert topology.queue("shop.delay.0").arguments == {
        "x-message-ttl": 100,
        "x-dead-letter-exchange": "shop.delay.deliver",
    }
    assert [q.role for q in topology.queues] == ["unroutable"] + ["delay"] * 4
    assert topology.exchanges == (
        ExchangeSpec("shop.delay.unroutable", "fanout"),
        ExchangeSpec(
            "shop.delay.deliver", "headers", {"alternate-exchange": "shop.delay.unroutable"}
        ),
        # Exchange k takes what leaves level k+1: the top level needs none. What matches
        # no binding (a way cuebx did not stamp) is kept in the unroutable queue.
        ExchangeSpec("shop.delay.0", "headers", {"alternate-exchange": "shop.delay.unroutable"}),
        ExchangeSpec("shop.delay.1", "headers", {"alternate-exchange": "shop.delay.unroutable"}),
        ExchangeSpec("shop.delay.2", "headers", {"alternate-exchange": "shop.delay.unroutable"}),
    )


@pytest.mark.parametrize(
    ("exchange", "header", "targets"),
    [
        # Exchange 2 takes what leaves level 3: its cuebx-delay-after-3 names the next level
        # (2, 1 or 0), or -1 for the deliver exchange.
        (
            "shop.delay.2",
            "cuebx-delay-after-3",
            {2: "shop.delay.2", 1: "shop.delay.1", 0: "shop.delay.0", -1: "shop.delay.deliver"},
        ),
        (
            "shop.delay.1",
            "cuebx-delay-after-2",
            {1: "shop.delay.1", 0: "shop.delay.0", -1: "shop.delay.deliver"},
        ),
        ("shop.delay.0", "cuebx-delay-after-1", {0: "shop.delay.0", -1: "shop.delay.deliver"}),
    ],
)
def test_each_level_sends_a_message_straight_to_the_next_level_it_waits_in(
    exchange: str, header: str, targets: dict[int, str]
) -> None:
    bindings = [b for b in SMALL.topology().bindings if b.source == exchange]
    assert all(b.arguments["x-match"] == "all" and len(b.arguments) == 2 for b in bindings)
    assert {b.arguments[header]: b.destination for b in bindings} == targets
    assert all(
        b.destination_type == ("exchange" if b.destination == "shop.delay.deliver" else "queue")
        for b in bindings
    )


@pytest.mark.parametrize("units", range(1, 16))
def test_every_delay_is_routed_through_the_levels_of_its_set_bits_by_those_bindings(
    units: int,
) -> None:
    """Walk the bindings as RabbitMQ would: publish to the first level, dead-letter down."""
    topology = SMALL.topology()
    assert all(x.type in ("headers", "fanout") for x in topology.exchanges)
    exchange, key, copy = SMALL.prepare(message({}), "q", due_us=units * 100_000, now_us=0)
    assert exchange == ""  # the default exchange: straight to the queue named by the key
    visited = [int(key.rsplit(".", 1)[1])]
    exchange = topology.queue(key).arguments["x-dead-letter-exchange"]
    while exchange != SMALL.deliver:
        [binding] = [
            b
            for b in topology.bindings
            if b.source == exchange and headers_match(b.arguments, copy.headers)
        ]
        if binding.destination_type == "exchange":
            exchange = binding.destination
            continue
        level = int(binding.destination.rsplit(".", 1)[1])
        visited.append(level)
        exchange = topology.queue(binding.destination).arguments["x-dead-letter-exchange"]
    assert tuple(visited) == SMALL.hops(units)


def test_the_deliver_exchange_matches_each_queue_exactly_and_the_unroutable_catch_all() -> None:
    bindings = list(SMALL.topology(["emails", "x.emails"]).bindings)
    assert Binding("shop.delay.unroutable", "shop.delay.unroutable") in bindings
    # An exact header match per queue: x.emails never takes the messages of emails.
    assert (
        Binding(
            "shop.delay.deliver", "emails", arguments={"x-match": "all", "cuebx-delay-to": "emails"}
        )
        in bindings
    )
    assert (
        Binding(
            "shop.delay.deliver",
            "x.emails",
            arguments={"x-match": "all", "cuebx-delay-to": "x.emails"},
        )
        in bindings
    )
    # One to the unroutable queue, k + 2 from exchange k (0..2), one per destination.
    assert len(bindings) == 1 + (2 + 3 + 4) + 2


def test_quorum_levels_dead_letter_at_least_once() -> None:
    topology = Ladder("shop", 100, 4, "quorum").topology()
    assert topology.queue("shop.delay.3").arguments == {
        "x-queue-type": "quorum",
        "x-message-ttl": 800,
        "x-dead-letter-exchange": "shop.delay.2",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert topology.queue("shop.delay.unroutable").arguments == {"x-queue-type": "quorum"}


def message(headers: dict[str, Any]) -> OutgoingMessage:
    return OutgoingMessage(
        body=b'{"n": 1}',
        message_id="id-1",
        correlation_id="c-1",
        content_type="application/json",
        headers=headers,
        timestamp=datetime(2024, 5, 1, tzinfo=UTC),
        priority=3,
    )


def test_a_delayed_copy_keeps_id_attempt_and_trace_headers_and_leaves_broker_ones_behind() -> None:
    original = message(
        {
            "x-cuebx-task": "remind",
            "x-retry-attempt": 2,
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "vendor=x",
            "tenant": "a",
            "x-death": [{"queue": "shop.delay.0", "count": 1}],
            "x-first-death-queue": "shop.delay.0",
            "x-cuebx-redeliveries": 1,
        }
    )
    exchange, key, copy = SMALL.prepare(original, "emails", due_us=10_250_700, now_us=10_000_000)
    assert (exchange, key) == ("", "shop.delay.1")
    assert copy.headers == {
        "x-cuebx-task": "remind",
        "x-retry-attempt": 2,
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "vendor=x",
        "tenant": "a",
        HEADER_ETA: 10_250,  # whole ms, floored: never after the ladder delivers it
        HEADER_DELAY_TO: "emails",
        # 3 units: level 1, then level 0, which leaves the ladder by itself.
        "cuebx-delay-after-1": 0,
    }
    assert (copy.body, copy.message_id, copy.correlation_id, copy.priority) == (
        original.body,
        "id-1",
        "c-1",
        3,
    )


def test_a_message_sent_down_again_carries_only_its_new_way() -> None:
    # 13 units: levels 3, 2, 0. Sent down again for 2 units: level 1 alone.
    _, _, first = SMALL.prepare(message({}), "q", due_us=1_300_000, now_us=0)
    assert first.headers["cuebx-delay-after-3"] == 2
    _, key, again = SMALL.prepare(first, "q", due_us=1_500_000, now_us=1_300_000)
    assert key == "shop.delay.1"
    assert {k: v for k, v in again.headers.items() if k.startswith("cuebx-delay-")} == {
        "cuebx-delay-to": "q",
        "cuebx-delay-after-1": -1,
    }
    # A retry of it carries no way at all: it goes to its queue or down a new one.
    assert not any(k.startswith("cuebx-delay-after-") for k in retry_copy(first, 1).headers)


def test_a_delay_beyond_the_span_goes_down_for_the_longest_and_nothing_due_goes_straight() -> None:
    exchange, key, copy = SMALL.prepare(message({}), "emails", due_us=99_000_000, now_us=0)
    assert (exchange, key, copy.headers[HEADER_ETA]) == ("", "shop.delay.3", 99_000)
    original = message({"x-death": []})
    assert SMALL.prepare(original, "emails", due_us=5, now_us=10) == ("", "emails", original)


NOW = 1_700_000_000_000_000  # epoch microseconds


@pytest.mark.parametrize(
    ("countdown", "eta", "due"),
    [
        (None, None, None),
        (0, None, NOW),
        (1.5, None, NOW + 1_500_000),
        (0.6, None, NOW + 600_000),  # not 600000.0000000001: counted to the microsecond
        ("10m", None, NOW + 600_000_000),
        (timedelta(microseconds=1500), None, NOW + 1500),
        (None, datetime(2027, 1, 1, 9, 0, 0, 7, tzinfo=UTC), 1_798_794_000_000_007),
        (
            None,
            datetime(2027, 1, 1, 10, tzinfo=timezone(timedelta(hours=1))),
            1_798_794_000_000_000,
        ),
    ],
)
def test_countdown_and_eta_give_the_due_time_in_whole_microseconds(
    countdown: Any, eta: datetime | None, due: int | None
) -> None:
    assert due_us(countdown=countdown, eta=eta, now=NOW, task="remind") == due


@pytest.mark.parametrize(
    ("countdown", "eta", "match"),
    [
        (None, datetime(2027, 1, 1, 9), r"task 'remind': eta=2027-01-01T09:00:00 has no time zone"),
        ("10s", datetime(2027, 1, 1, 9, tzinfo=UTC), "countdown= or eta=, not both"),
        (-1, None, "countdown must be a duration of zero or more, got -1"),
        (float("nan"), None, "countdown must be a duration"),
        ("soon", None, "cannot read duration 'soon'"),
        (True, None, "True is not a duration"),
        (None, "2027-01-01", "eta must be a datetime"),
    ],
)
def test_a_countdown_or_eta_cuebx_cannot_hold_is_a_delay_error_naming_the_task(
    countdown: Any, eta: Any, match: str
) -> None:
    with pytest.raises(DelayError, match=match):
        due_us(countdown=countdown, eta=eta, now=NOW, task="remind")


class RecordingBroker:
    """Just enough of a broker to see what `Delays` declares."""

    def __init__(self) -> None:
        self.declared: list[Topology] = []

    async def declare(self, topology: Topology) -> None:
        self.declared.append(topology)


@pytest.mark.anyio
async def test_the_ladder_is_declared_once_per_broker_and_new_queues_are_bound_when_used() -> None:
    queues = ["emails"]
    delays = Delays(SMALL, lambda: queues)
    broker, other = RecordingBroker(), RecordingBroker()
    await delays.declare(broker)  # type: ignore[arg-type]
    await delays.declare(broker, "emails")  # type: ignore[arg-type]
    assert len(broker.declared) == 1
    assert broker.declared[0].queues == SMALL.topology().queues
    assert delays.declared_on(broker)  # type: ignore[arg-type]

    queues.append("reports")  # a task registered later: bound when first delayed to
    await delays.declare(broker)  # type: ignore[arg-type]
    assert len(broker.declared) == 1
    await delays.declare(broker, "reports")  # type: ignore[arg-type]
    await delays.declare(broker, "webhooks")  # type: ignore[arg-type]
    assert [t.bindings for t in broker.declared[1:]] == [
        SMALL.deliver_bindings(["reports"]),
        SMALL.deliver_bindings(["webhooks"]),
    ]
    assert all(not t.queues and not t.exchanges for t in broker.declared[1:])

    await delays.declare(other)  # type: ignore[arg-type]
    assert other.declared[0].bindings == SMALL.topology(["emails", "reports"]).bindings
    delays.forget()
    await delays.declare(other)  # type: ignore[arg-type]
    assert len(other.declared) == 2


@pytest.mark.anyio
async def test_a_too_long_countdown_or_a_naive_eta_is_refused_before_anything_is_published() -> (
    None
):
    app = Cuebx("memory://", delay_levels=10)  # 1023 units of 100 ms

    @app.task(queue="reminders")
    async def remind(user_id: int) -> None: ...

    with pytest.raises(
        DelayError, match=r"task 'remind': a delay of 1m42s400ms .* at most 1m42s300ms"
    ):
        await remind.apply_async(args=(1,), countdown="102.4s")
    with pytest.raises(DelayError, match="no time zone"):
        await remind.apply_async(args=(1,), eta=datetime.now() + timedelta(minutes=1))
    assert not app.connected  # refused before connecting, so before publishing


def test_an_apps_ladder_follows_its_settings() -> None:
    app = Cuebx(
        "memory://", exchange="shop", delay_unit="250ms", delay_levels=20, queue_type="quorum"
    )
    assert app.delays.ladder == Ladder("shop", 250, 20, "quorum")


class StoppedClock:
    def time(self) -> float:
        return 1_700_000_000.1234567


def test_the_clock_is_read_in_whole_microseconds_never_ahead_of_it() -> None:
    assert now_us(StoppedClock()) == 1_700_000_000_123_456  # type: ignore[arg-type]

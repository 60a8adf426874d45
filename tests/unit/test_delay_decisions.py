"""The pure decisions and values around delays: settings, signals, admit, retry policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cuebx import ConfigurationError, Cuebx, Postpone, Retry, Skip
from cuebx.message import HEADER_DELAY_TO, HEADER_ETA, OutgoingMessage, eta_of, retry_copy
from cuebx.middleware import Middleware, Received, Stack
from cuebx.policy import (
    DELAYED_RETRY_LIMIT,
    CountRedelivery,
    DeadLetter,
    NotDue,
    RetryAfter,
    RetryPolicy,
    RetryThrough,
    Run,
    admit,
    retry_delays,
)
from cuebx.settings import Settings

app = Cuebx("memory://")


@app.task(queue="reminders")
async def remind(user_id: int) -> None: ...


NOW = 1_700_000_000.0  # epoch seconds


def sort(headers: dict[str, Any], *, now: float | None = NOW, redelivered: bool = False) -> Any:
    return admit(
        queue="reminders",
        headers={"x-cuebx-task": "remind", **headers},
        body=b'{"user_id": 1}',
        content_type="application/json",
        redelivered=redelivered,
        tasks={"remind": remind},
        max_size=1000,
        redelivery_limit=3,
        now=now,
    )


@pytest.mark.parametrize(
    ("eta", "due"),
    [
        (None, True),  # not a delayed message
        (int(NOW * 1000), True),  # due to the millisecond
        (int(NOW * 1000) - 5000, True),
        (int(NOW * 1000) + 1, False),  # one millisecond early is early
        (int(NOW * 1000) + 60_000, False),
        ("soon", True),  # not a number: cuebx did not write it, so it does not hold it back
        (True, True),
        (float("inf"), True),
    ],
)
def test_a_message_before_its_eta_is_not_due_whatever_else_it_holds(eta: Any, due: bool) -> None:
    headers = {} if eta is None else {HEADER_ETA: eta}
    decision = sort(headers)
    if due:
        assert isinstance(decision, Run)
    else:
        assert decision == NotDue(eta)
    # Poison that is not due yet waits too: it is looked at when it is due.
    if not due:
        assert sort({**headers, "x-cuebx-task": "nope"}) == NotDue(eta)


def test_admit_ignores_etas_without_a_clock_and_counts_redeliveries_first() -> None:
    early = {HEADER_ETA: int(NOW * 1000) + 60_000}
    assert isinstance(sort(early, now=None), Run)
    assert isinstance(sort(early, redelivered=True), CountRedelivery)


def test_an_eta_within_float_noise_of_the_clock_is_due() -> None:
    # Epoch seconds as a float are exact to ~0.24 us: a few hundred ns under the eta is due.
    assert isinstance(sort({HEADER_ETA: 1_700_000_000_123}, now=1_700_000_000.1229998), Run)


@pytest.mark.parametrize(
    ("tiers", "attempt", "decision"),
    [
        ((), 0, RetryAfter(1, 90_000)),
        ((), DELAYED_RETRY_LIMIT - 1, RetryAfter(DELAYED_RETRY_LIMIT, 90_000)),
        ((), DELAYED_RETRY_LIMIT, DeadLetter("exhausted")),
        (("q.retry.1s", "q.retry.1s"), 0, RetryAfter(1, 90_000)),
        (("q.retry.1s", "q.retry.1s"), 1, RetryAfter(2, 90_000)),
        (("q.retry.1s", "q.retry.1s"), 2, DeadLetter("exhausted")),
    ],
)
def test_retry_with_a_delay_is_an_attempt_counted_against_the_retries(
    tiers: tuple[str, ...], attempt: int, decision: Any
) -> None:
    policy = RetryPolicy(tiers=tiers, delays_ms=(1000,) * len(tiers), retry_on=(KeyError,))
    assert policy.on_failure(attempt, Retry("rate limited", delay="90s")) == decision


def test_a_retry_without_a_delay_still_goes_through_the_tiers() -> None:
    policy = RetryPolicy(tiers=("q.retry.1s",), delays_ms=(1000,))
    assert policy.on_failure(0, Retry()) == RetryThrough("q.retry.1s", 1, 1000)
    assert policy.on_failure(0, Retry(delay=0)) == RetryAfter(1, 0)


@pytest.mark.parametrize(
    ("delay", "ms"), [("90s", 90_000), (1.5, 1500), (timedelta(minutes=2), 120_000), (0, 0)]
)
def test_retry_reads_its_delay_once(delay: Any, ms: int) -> None:
    assert Retry(delay=delay).delay_ms == ms
    assert Retry().delay_ms is None


def test_a_retry_delay_that_is_not_a_duration_fails_where_it_is_raised() -> None:
    with pytest.raises(ValueError, match=r"Retry\(delay=\): cannot read duration 'later'"):
        Retry(delay="later")


def test_retry_with_a_delay_is_not_a_retries_spec() -> None:
    with pytest.raises(ConfigurationError, match=r"Retry\(delay=\) is raised in a handler"):
        retry_delays(Retry(every="1m", times=2, delay="1m"), task="t")


def test_postpone_reads_its_delay_and_says_why() -> None:
    postpone = Postpone("1m30s", "rate limit full")
    assert (postpone.delay_ms, postpone.reason) == (90_000, "rate limit full")
    with pytest.raises(ValueError, match=r"Postpone\(delay\)"):
        Postpone("later")


@pytest.mark.anyio
@pytest.mark.parametrize("signal", [Postpone("1s"), Skip("done")])
async def test_a_before_handler_hook_that_postpones_or_skips_stops_the_hooks_after_it(
    signal: Exception,
) -> None:
    called: list[str] = []

    class Signals(Middleware):
        async def before_handler(self, received: Received) -> None:
            called.append("first")
            raise signal

    class After(Middleware):
        async def before_handler(self, received: Received) -> None:
            called.append("second")

    with pytest.raises(type(signal)):
        await Stack([Signals(), After()]).run_before_handler(None)  # type: ignore[arg-type]
    assert called == ["first"]


@pytest.mark.parametrize(
    ("value", "eta"),
    [
        (1_700_000_000_000, 1_700_000_000_000),
        (1.7e12, 1_700_000_000_000),
        ("1", None),
        (None, None),
    ],
)
def test_eta_of_reads_epoch_milliseconds(value: Any, eta: int | None) -> None:
    assert eta_of({} if value is None else {HEADER_ETA: value}) == eta


def test_a_retry_copy_leaves_the_delay_of_the_attempt_that_ended_behind() -> None:
    message = OutgoingMessage(
        body=b"{}",
        message_id="m",
        correlation_id="m",
        content_type=None,
        headers={HEADER_ETA: 1, HEADER_DELAY_TO: "q", "traceparent": "t", "x-retry-attempt": 0},
        timestamp=datetime(2024, 5, 1, tzinfo=UTC),
    )
    assert retry_copy(message, 1).headers == {"traceparent": "t", "x-retry-attempt": 1}


def test_the_ladder_settings_default_to_32_levels_of_100ms() -> None:
    settings = Settings.build("memory://")
    assert (settings.delay_unit_ms, settings.delay_levels) == (100, 32)
    settings = Settings.build("memory://", delay_unit="1s", delay_levels=20)
    assert (settings.delay_unit_ms, settings.delay_levels) == (1000, 20)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"delay_unit": 0}, "delay_unit must be at least 1ms"),
        ({"delay_unit": "0.4ms"}, "delay_unit must be at least 1ms"),
        ({"delay_unit": "fast"}, "Cuebx: delay_unit: cannot read duration 'fast'"),
        ({"delay_levels": 0}, r"delay_levels must be an integer 1\.\.64, got 0"),
        ({"delay_levels": 65}, r"delay_levels must be an integer 1\.\.64"),
        ({"delay_levels": True}, r"delay_levels must be an integer"),
        ({"delay_unit": "1d", "delay_levels": 64}, "beyond what an AMQP integer holds"),
    ],
)
def test_ladder_settings_that_cannot_work_are_refused_naming_them(
    options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Cuebx("memory://", **options)

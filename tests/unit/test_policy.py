"""Retry decisions: the retries= forms, and what happens after a failed attempt."""

from datetime import timedelta

import pytest

from cuebx import ConfigurationError, Cuebx, Reject, Retry
from cuebx.policy import DeadLetter, RetryPolicy, RetryThrough, retry_delays


class Transient(Exception):
    pass


class Permanent(Exception):
    pass


def test_a_list_of_delays_gives_one_delay_per_retry_in_order() -> None:
    assert retry_delays(["30s", "5m", "1h"], task="t") == (30_000, 300_000, 3_600_000)


def test_a_list_accepts_every_duration_form() -> None:
    delays = ["250ms", 2, 0.5, timedelta(minutes=1), "1h30m"]
    assert retry_delays(delays, task="t") == (250, 2_000, 500, 60_000, 5_400_000)


def test_a_tuple_of_delays_is_a_list_of_delays() -> None:
    assert retry_delays(("30s", "5m"), task="t") == (30_000, 300_000)


def test_retry_every_times_repeats_one_delay() -> None:
    assert retry_delays(Retry(every="1m", times=3), task="t") == (60_000, 60_000, 60_000)


def test_retry_with_zero_times_means_no_retries() -> None:
    assert retry_delays(Retry(every="1m", times=0), task="t") == ()


@pytest.mark.parametrize("retries", [None, [], ()])
def test_none_or_an_empty_list_means_no_retries(retries: list[str] | None) -> None:
    assert retry_delays(retries, task="t") == ()


@pytest.mark.parametrize(
    "retries",
    [Retry(times=3), Retry(every="1m"), Retry()],
    ids=["without-every", "without-times", "without-both"],
)
def test_retry_without_every_or_times_is_refused(retries: Retry) -> None:
    with pytest.raises(ConfigurationError, match=r"task 'send'.*every= and times="):
        retry_delays(retries, task="send")


@pytest.mark.parametrize("times", [1.5, "3", True])
def test_retry_times_must_be_an_integer(times: object) -> None:
    with pytest.raises(ConfigurationError, match="times="):
        retry_delays(Retry(every="1m", times=times), task="send")  # type: ignore[arg-type]


def test_retry_times_must_not_be_negative() -> None:
    with pytest.raises(ConfigurationError, match="negative"):
        retry_delays(Retry(every="1m", times=-1), task="send")


@pytest.mark.parametrize("retries", [["30s", 0], ["0s"], ["0ms"], Retry(every=0, times=2)])
def test_a_zero_retry_delay_is_refused(retries: object) -> None:
    with pytest.raises(ConfigurationError, match=r"task 'send'.*above zero"):
        retry_delays(retries, task="send")  # type: ignore[arg-type]


@pytest.mark.parametrize("retries", ["30s", b"30s", 3, {"30s": 1}])
def test_a_bare_value_instead_of_a_list_is_refused(retries: object) -> None:
    with pytest.raises(ConfigurationError, match=r"task 'send'.*expected a list of delays"):
        retry_delays(retries, task="send")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["soon", -5, True, float("inf")])
def test_an_unreadable_delay_is_a_configuration_error_naming_the_task(bad: object) -> None:
    with pytest.raises(ConfigurationError, match=r"retries of task 'send'"):
        retry_delays(["30s", bad], task="send")  # type: ignore[list-item]


def test_a_configuration_error_is_also_a_value_error() -> None:
    with pytest.raises(ValueError, match="send"):
        retry_delays("30s", task="send")  # type: ignore[arg-type]


TIERS = ("q.retry.30s", "q.retry.5m", "q.retry.1h")


def test_each_failed_attempt_goes_through_the_next_tier_with_the_next_attempt_number() -> None:
    policy = RetryPolicy(tiers=TIERS)
    error = Transient("boom")

    timeline = [policy.on_failure(attempt, error) for attempt in range(4)]

    assert timeline == [
        RetryThrough("q.retry.30s", 1),
        RetryThrough("q.retry.5m", 2),
        RetryThrough("q.retry.1h", 3),
        DeadLetter("exhausted"),
    ]


@pytest.mark.parametrize("retries", [0, 1, 2, 5])
def test_n_retries_mean_at_most_n_plus_one_attempts(retries: int) -> None:
    policy = RetryPolicy(tiers=("q.retry.1s",) * retries)
    attempts = 0
    attempt = 0
    while True:
        attempts += 1
        decision = policy.on_failure(attempt, Transient())
        if isinstance(decision, DeadLetter):
            break
        attempt = decision.attempt
    assert attempts == retries + 1
    assert decision == DeadLetter("exhausted")


def test_a_task_without_retries_is_exhausted_after_its_first_failure() -> None:
    assert RetryPolicy().on_failure(0, Transient()) == DeadLetter("exhausted")


def test_an_attempt_number_beyond_the_ladder_is_exhausted() -> None:
    assert RetryPolicy(tiers=TIERS).on_failure(99, Transient()) == DeadLetter("exhausted")


def test_reject_dead_letters_at_once_without_retries() -> None:
    policy = RetryPolicy(tiers=TIERS)
    assert policy.on_failure(0, Reject("bad input")) == DeadLetter("rejected")


def test_reject_wins_even_when_retry_on_would_match_it() -> None:
    policy = RetryPolicy(tiers=TIERS, retry_on=(Reject,))
    assert policy.on_failure(0, Reject()) == DeadLetter("rejected")


def test_an_exception_outside_retry_on_fails_without_retries() -> None:
    policy = RetryPolicy(tiers=TIERS, retry_on=(Transient,))
    assert policy.on_failure(0, Permanent()) == DeadLetter("failed")
    assert policy.on_failure(0, Transient()) == RetryThrough("q.retry.30s", 1)


def test_retry_on_matches_subclasses() -> None:
    policy = RetryPolicy(tiers=TIERS, retry_on=(OSError,))
    assert policy.on_failure(0, ConnectionResetError()) == RetryThrough("q.retry.30s", 1)


def test_dont_retry_on_wins_over_retry_on() -> None:
    policy = RetryPolicy(tiers=TIERS, retry_on=(Exception,), dont_retry_on=(Permanent,))
    assert policy.on_failure(0, Permanent()) == DeadLetter("failed")
    assert policy.on_failure(0, Transient()) == RetryThrough("q.retry.30s", 1)


def test_a_raised_retry_retries_even_when_retry_on_does_not_match() -> None:
    policy = RetryPolicy(tiers=TIERS, retry_on=(Transient,), dont_retry_on=(Exception,))
    assert policy.on_failure(1, Retry("rate limited")) == RetryThrough("q.retry.5m", 2)


def test_a_raised_retry_after_the_last_tier_is_exhausted() -> None:
    policy = RetryPolicy(tiers=TIERS)
    assert policy.on_failure(3, Retry("rate limited")) == DeadLetter("exhausted")
    assert RetryPolicy().on_failure(0, Retry()) == DeadLetter("exhausted")


def test_a_task_policy_maps_each_retry_to_its_tier_queue() -> None:
    app = Cuebx("memory://")

    @app.task(queue="q", retries=["30s", "5m"], retry_on=Transient, dont_retry_on=[Permanent])
    async def job() -> None: ...

    policy = job.retry_policy
    assert policy.tiers == ("q.retry.30s", "q.retry.5m")
    assert policy.retry_on == (Transient,)
    assert policy.dont_retry_on == (Permanent,)
    assert policy.on_failure(0, Transient()) == RetryThrough("q.retry.30s", 1, 30_000)


def test_a_task_retries_any_exception_by_default() -> None:
    app = Cuebx("memory://")

    @app.task(queue="q", retries=["30s"])
    async def job() -> None: ...

    assert job.retry_policy.on_failure(0, KeyError("x")) == RetryThrough("q.retry.30s", 1, 30_000)

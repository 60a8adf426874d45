"""Durations: strings, numbers and timedeltas to milliseconds, and canonical labels."""

import math
from datetime import timedelta

import pytest

from cuebx.durations import label, to_ms, to_seconds


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("250ms", 250),
        ("30s", 30_000),
        ("5m", 300_000),
        ("1h", 3_600_000),
        ("1h30m", 5_400_000),
        ("1d", 86_400_000),
        ("1.5s", 1_500),
        ("1.5h", 5_400_000),
        ("1m30s", 90_000),
        ("1d2h3m4s5ms", 93_784_005),
        ("0s", 0),
        ("30", 30_000),
        ("0.25", 250),
    ],
)
def test_a_duration_string_is_read_as_milliseconds(text: str, ms: int) -> None:
    assert to_ms(text) == ms


def test_a_duration_string_ignores_case_and_surrounding_spaces() -> None:
    assert to_ms("  30S ") == 30_000
    assert to_ms("1H30M") == 5_400_000


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (0, 0),
        (5, 5_000),
        (0.25, 250),
        (1.5, 1_500),
        (timedelta(milliseconds=250), 250),
        (timedelta(minutes=1, seconds=30), 90_000),
        (timedelta(days=1), 86_400_000),
    ],
)
def test_numbers_are_seconds_and_timedeltas_are_exact(value: float | timedelta, ms: int) -> None:
    assert to_ms(value) == ms


def test_to_seconds_gives_a_float_number_of_seconds() -> None:
    assert to_seconds("1m30s") == 90.0
    assert to_seconds("250ms") == 0.25
    assert to_seconds(timedelta(seconds=2)) == 2.0


@pytest.mark.parametrize("text", ["abc", "", "5x", "s", "1h-30m", "ms5", "1 h", "-5s", "5 minutes"])
def test_an_unreadable_string_raises_value_error_naming_the_string(text: str) -> None:
    with pytest.raises(ValueError, match="cannot read duration") as info:
        to_ms(text)
    assert repr(text) in str(info.value)


def test_the_error_names_what_the_duration_was_for() -> None:
    with pytest.raises(ValueError, match=r"^timeout of task 'send': .*'soon'"):
        to_ms("soon", what="timeout of task 'send'")


@pytest.mark.parametrize("value", [-1, -0.5, timedelta(seconds=-1)])
def test_a_negative_duration_is_refused(value: float | timedelta) -> None:
    with pytest.raises(ValueError, match="negative"):
        to_ms(value)


@pytest.mark.parametrize("value", [True, False])
def test_a_bool_is_not_a_duration(value: bool) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        to_ms(value)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_an_infinite_or_nan_duration_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="not a finite number"):
        to_ms(value)


@pytest.mark.parametrize("value", [None, [30], b"30s"])
def test_a_value_of_another_type_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        to_ms(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0s"),
        (250, "250ms"),
        (1_000, "1s"),
        (1_500, "1s500ms"),
        (30_000, "30s"),
        (60_000, "1m"),
        (90_000, "1m30s"),
        (300_000, "5m"),
        (3_600_000, "1h"),
        (5_400_000, "1h30m"),
        (86_400_000, "1d"),
        (90_061_001, "1d1h1m1s1ms"),
    ],
)
def test_a_label_gives_non_zero_units_largest_first(ms: int, text: str) -> None:
    assert label(ms) == text


def test_spellings_of_one_duration_share_one_label() -> None:
    assert {label(to_ms(v)) for v in ["90m", "1h30m", "1.5h", 5400, timedelta(minutes=90)]} == {
        "1h30m"
    }


@pytest.mark.parametrize("ms", [1, 250, 1_500, 90_000, 5_400_000, 86_400_000, 93_784_005])
def test_a_label_reads_back_as_the_same_duration(ms: int) -> None:
    assert to_ms(label(ms)) == ms


def test_a_negative_label_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        label(-1)

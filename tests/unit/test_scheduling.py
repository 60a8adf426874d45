"""The pure parts of cuebx.scheduling: slots of cron and every, misfire decisions, states."""

from __future__ import annotations

import builtins
from datetime import UTC, datetime
from typing import Any

import pytest

from cuebx import Cuebx
from cuebx.errors import ConfigurationError
from cuebx.scheduling import Cron, Every
from cuebx.scheduling.misfire import GRACE, decide
from cuebx.scheduling.schedules import build_schedule, slot_text
from cuebx.scheduling.state import JobState, decode, encode, topology, wins_over


def at(text: str) -> int:
    """Epoch seconds of a UTC time written ``2025-03-30T01:00:00``."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def utc(slot: int | None) -> str | None:
    return None if slot is None else slot_text(slot)


# -- next slot ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "after", "expected"),
    [
        (Every(30), "2025-01-01T00:00:00", "2025-01-01T00:00:30Z"),
        (Every(30), "2025-01-01T00:00:29", "2025-01-01T00:00:30Z"),
        (Every(3600), "2025-01-01T10:00:00", "2025-01-01T11:00:00Z"),
        (Every(86400), "2025-01-01T10:00:00", "2025-01-02T00:00:00Z"),
        (Cron("*/5 * * * *"), "2025-01-01T10:02:00", "2025-01-01T10:05:00Z"),
        (Cron("*/5 * * * *"), "2025-01-01T10:05:00", "2025-01-01T10:10:00Z"),
        (Cron("0 8 * * mon"), "2025-01-06T08:00:00", "2025-01-13T08:00:00Z"),
        (Cron("*/15 * * * * *"), "2025-01-01T10:00:00", "2025-01-01T10:00:15Z"),
        (Cron("@daily"), "2025-01-01T10:00:00", "2025-01-02T00:00:00Z"),
        (Cron("0 9 * * *", "Europe/Paris"), "2025-01-01T00:00:00", "2025-01-01T08:00:00Z"),
        (Cron("0 9 * * *", "Europe/Paris"), "2025-07-01T00:00:00", "2025-07-01T07:00:00Z"),
        # Spring forward in Paris (02:00 -> 03:00 on 2025-03-30): 02:30 does not exist, and
        # runs when the clocks have moved on, as Debian's cron does.
        (Cron("30 2 * * *", "Europe/Paris"), "2025-03-29T12:00:00", "2025-03-30T01:00:00Z"),
        (Cron("30 2 * * *", "Europe/Paris"), "2025-03-30T01:00:00", "2025-03-31T00:30:00Z"),
        # Fall back (03:00 -> 02:00 on 2025-10-26): 02:30 happens twice and runs once.
        (Cron("30 2 * * *", "Europe/Paris"), "2025-10-25T12:00:00", "2025-10-26T00:30:00Z"),
        (Cron("30 2 * * *", "Europe/Paris"), "2025-10-26T00:30:00", "2025-10-27T01:30:00Z"),
        # An hourly job keeps real time: both 02:00 of the fall-back night run.
        (Cron("0 * * * *", "Europe/Paris"), "2025-10-26T00:00:00", "2025-10-26T01:00:00Z"),
        # The 1st or 21st that is also the last Monday of its month: never (cronsim looks 50
        # years ahead).
        (Cron("* * */20 * 1L"), "2025-01-01T00:00:00", None),
    ],
)
def test_the_next_slot_of_a_schedule(schedule: Any, after: str, expected: str | None) -> None:
    assert utc(schedule.next_after(at(after))) == expected


@pytest.mark.parametrize(
    ("schedule", "at_or_before", "expected"),
    [
        (Every(30), "2025-01-01T00:00:30", "2025-01-01T00:00:30Z"),
        (Every(30), "2025-01-01T00:00:59", "2025-01-01T00:00:30Z"),
        (Cron("0 8 * * mon"), "2025-01-06T08:00:00", "2025-01-06T08:00:00Z"),
        (Cron("0 8 * * mon"), "2025-01-06T07:59:59", "2024-12-30T08:00:00Z"),
    ],
)
def test_the_latest_slot_at_or_before_a_time(
    schedule: Any, at_or_before: str, expected: str
) -> None:
    assert utc(schedule.latest_at_or_before(at(at_or_before))) == expected


def test_slots_read_as_utc_iso_8601() -> None:
    assert slot_text(at("2025-03-30T01:00:00")) == "2025-03-30T01:00:00Z"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of cron= and every="),
        ({"cron": "* * * * *", "every": "1m"}, "exactly one of cron= and every="),
        ({"every": "1m", "tz": "Europe/Paris"}, "tz= applies to cron= only"),
        ({"every": "1500ms"}, "whole number of seconds"),
        ({"every": "0s"}, "at least 1s"),
        ({"every": "soon"}, "cannot read duration"),
        ({"cron": "61 * * * *"}, "does not read: Bad minute"),
        ({"cron": "* * * *"}, "does not read"),
        ({"cron": ""}, "must be a cron expression"),
        ({"cron": "* * */20 * 1L"}, "never fires"),
        ({"cron": "0 9 * * *", "tz": "Mars/Olympus"}, "tz='Mars/Olympus' is not a time zone"),
    ],
)
def test_a_wrong_schedule_is_refused_naming_the_job_and_the_option(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match="job 'report'") as caught:
        build_schedule("job 'report'", **options)
    assert message in str(caught.value)


def test_cron_without_the_extra_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_import = builtins.__import__

    def no_cronsim(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "cronsim":
            raise ImportError("No module named 'cronsim'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cronsim)
    with pytest.raises(ConfigurationError, match=r"pip install 'cuebx\[cron\]'"):
        build_schedule("job 'report'", cron="0 8 * * *")
    assert build_schedule("job 'ping'", every="30s") == Every(30)


def test_a_schedule_change_changes_the_fingerprint() -> None:
    prints = {
        Every(30).fingerprint,
        Every(60).fingerprint,
        Cron("0 8 * * *").fingerprint,
        Cron("0 8 * * *", "Europe/Paris").fingerprint,
        Cron("0 9 * * *").fingerprint,
    }
    assert len(prints) == 5
    assert Cron("0 8 * * *").fingerprint == build_schedule("j", cron=" 0  8 * * * ").fingerprint


# -- misfire decisions ----------------------------------------------------------------------

EVERY_MINUTE = Every(60)
DAILY_8 = Cron("0 8 * * *")


@pytest.mark.parametrize(
    ("schedule", "cursor", "now", "misfire", "fire", "new_cursor", "missed"),
    [
        # Nothing due yet.
        (EVERY_MINUTE, "10:00:00", "10:00:59", "once", None, "10:00:00", None),
        # On time, and late within the grace: the slot itself fires.
        (EVERY_MINUTE, "10:00:00", "10:01:00", "once", "10:01:00", "10:01:00", None),
        (EVERY_MINUTE, "10:00:00", "10:01:09", "skip", "10:01:00", "10:01:00", None),
        # Several late slots after a quick failover fire one by one, oldest first.
        (Every(2), "10:00:00", "10:00:07", "skip", "10:00:02", "10:00:02", None),
        # A daily slot missed by an outage: one catch-up run, or none.
        (
            DAILY_8,
            "2025-01-01T08:00:00",
            "2025-01-02T09:00:00",
            "once",
            "2025-01-02T08:00:00",
            "2025-01-02T08:00:00",
            ("2025-01-02T08:00:00", "2025-01-02T08:00:00"),
        ),
        (
            DAILY_8,
            "2025-01-01T08:00:00",
            "2025-01-02T09:00:00",
            "skip",
            None,
            "2025-01-02T08:00:00",
            ("2025-01-02T08:00:00", "2025-01-02T08:00:00"),
        ),
        # Three days missed: still one catch-up run, for the latest.
        (
            DAILY_8,
            "2025-01-01T08:00:00",
            "2025-01-04T09:00:00",
            "once",
            "2025-01-04T08:00:00",
            "2025-01-04T08:00:00",
            ("2025-01-02T08:00:00", "2025-01-04T08:00:00"),
        ),
        # Missed slots followed by a late one: the late one stands for them.
        (EVERY_MINUTE, "10:00:00", "10:05:03", "once", None, "10:04:00", ("10:01:00", "10:04:00")),
    ],
)
def test_what_the_scheduler_fires(
    schedule: Any,
    cursor: str,
    now: str,
    misfire: Any,
    fire: str | None,
    new_cursor: str,
    missed: tuple[str, str] | None,
) -> None:
    day = "2025-01-01T"

    def t(text: str) -> int:
        return at(text if "T" in text else day + text)

    step = decide(schedule, t(cursor), t(now), misfire)
    assert (step.fire, step.cursor) == (None if fire is None else t(fire), t(new_cursor))
    assert step.missed == (None if missed is None else (t(missed[0]), t(missed[1])))


def test_the_grace_is_more_than_a_failover_takes() -> None:
    assert GRACE >= 10


def test_a_late_slot_followed_by_the_next_fires_in_turn() -> None:
    cursor = at("2025-01-01T10:00:00")
    now = at("2025-01-01T10:00:07")
    fired = []
    for _ in range(5):
        step = decide(Every(2), cursor, now, "once")
        if step.fire is None:
            break
        fired.append(step.fire - cursor)
        cursor = step.cursor
    assert fired == [2, 2, 2]  # 10:00:02, :04, :06, then nothing until :08


# -- the state on the broker ----------------------------------------------------------------


def test_a_real_state_wins_over_a_seed_and_the_newest_over_older() -> None:
    seed = JobState(job="j", seq=99)
    old = JobState(job="j", cursor=100, seq=3)
    new = JobState(job="j", cursor=160, seq=4)
    assert wins_over(old, seed)
    assert wins_over(new, old)
    assert not wins_over(old, new)
    assert not wins_over(seed, old)


def test_a_state_round_trips_through_its_message() -> None:
    state = JobState(job="j", fingerprint="every 1m", cursor=60, fired=60, seq=2, leader="w")
    message = encode(state, "state")
    assert message.message_id.startswith("state:")
    assert decode(JobState, message.body) == state


def test_the_scheduler_queues_follow_the_app_queue_type() -> None:
    plan = topology("shop", [("cleanup", False), ("report", True)], "quorum")
    assert {q.name: dict(q.arguments) for q in plan.queues} == {
        "shop.scheduler.cleanup": {"x-queue-type": "quorum", "x-single-active-consumer": True},
        "shop.scheduler-status.cleanup": {"x-queue-type": "quorum", "x-max-length": 1},
        "shop.scheduler.report": {"x-queue-type": "quorum", "x-single-active-consumer": True},
        "shop.scheduler-status.report": {"x-queue-type": "quorum", "x-max-length": 1},
        "shop.scheduler-running.report": {"x-queue-type": "quorum", "x-max-length": 1},
    }
    assert all(q.routing_keys == () for q in plan.queues)


# -- registration ---------------------------------------------------------------------------


def test_periodic_registers_the_task_and_its_job() -> None:
    app = Cuebx("memory://")

    @app.periodic(cron="*/5 * * * *", tz="Europe/Paris", queue="maintenance")
    async def cleanup() -> None: ...

    job = app.scheduler.jobs["cleanup"]
    assert app.tasks["cleanup"] is cleanup
    assert cleanup.queue == "maintenance"
    assert job.fingerprint == "cron */5 * * * * Europe/Paris"
    assert job.message_id(at("2025-03-30T01:00:00")) == "cron:cleanup:2025-03-30T01:00:00Z"


def test_schedule_adds_a_job_with_arguments_to_an_existing_task() -> None:
    app = Cuebx("memory://")

    @app.task
    async def send_report(kind: str, *, to: str = "ops") -> None: ...

    weekly = app.schedule(send_report, cron="0 8 * * mon", args=("weekly",), name="weekly")
    daily = app.schedule(send_report, every="1d", kwargs={"kind": "daily", "to": "me"})
    assert (weekly.args, daily.kwargs) == (("weekly",), {"kind": "daily", "to": "me"})
    assert set(app.scheduler.jobs) == {"weekly", "send_report"}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda app, t: app.schedule(t, every="1m", args=(1,)),
            "args/kwargs do not fit task 'send'",
        ),
        (lambda app, t: app.schedule(t, every="1m", args="x"), "args must be a tuple"),
        (
            lambda app, t: app.schedule(t, every="1m", kwargs={"who": "a"}, misfire="twice"),
            "misfire must be 'once' or 'skip'",
        ),
        (
            lambda app, t: app.schedule(t, every="1m", kwargs={"who": "a"}, overlap="never"),
            "overlap must be 'allow' or 'skip'",
        ),
        (
            lambda app, t: app.schedule(t, every="1m", kwargs={"who": "a"}, name="a b"),
            "a job name is",
        ),
        (
            lambda app, t: app.schedule(t, every="1m", kwargs={"who": "a"}, overlap_timeout="0s"),
            "overlap_timeout must be above zero",
        ),
    ],
)
def test_a_wrong_job_option_names_the_job(call: Any, message: str) -> None:
    app = Cuebx("memory://")

    @app.task
    async def send(who: str) -> None: ...

    with pytest.raises(ConfigurationError, match=r"job '") as caught:
        call(app, send)
    assert message in str(caught.value)
    assert app.scheduler.jobs == {}


def test_two_jobs_of_one_name_are_refused() -> None:
    app = Cuebx("memory://")

    @app.task
    async def ping() -> None: ...

    app.schedule(ping, every="30s")
    with pytest.raises(ConfigurationError, match="job 'ping' is already scheduled"):
        app.schedule(ping, every="1m")


def test_periodic_refuses_a_function_with_arguments_and_leaves_no_task_behind() -> None:
    app = Cuebx("memory://")

    def needs(who: str) -> None: ...

    with pytest.raises(ConfigurationError, match="job 'needs': args/kwargs do not fit"):
        app.periodic(every="1m")(needs)
    assert "needs" not in app.tasks


def test_schedule_refuses_a_task_of_another_app() -> None:
    app, other = Cuebx("memory://"), Cuebx("memory://")

    @other.task
    async def ping() -> None: ...

    with pytest.raises(ConfigurationError, match="is not a task of this app"):
        app.schedule(ping, every="1m")


def test_the_scheduler_can_be_turned_off_and_its_refresh_set() -> None:
    app = Cuebx("memory://")
    app.scheduler.configure(enabled=False, refresh="2m")
    assert (app.scheduler.enabled, app.scheduler.refresh) == (False, 120.0)
    with pytest.raises(ConfigurationError, match="refresh must be at least 1s"):
        app.scheduler.configure(refresh="10ms")

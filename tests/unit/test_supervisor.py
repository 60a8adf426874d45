"""The supervisor's pure parts: restart decisions, sizes, process counts, exit descriptions."""

from __future__ import annotations

import functools
import os
import signal

import pytest

from cuebx import ConfigurationError
from cuebx.supervisor import (
    GiveUp,
    Restart,
    RestartPolicy,
    Supervisor,
    TaskCounter,
    cpu_count,
    describe_exit,
    parse_processes,
    parse_size,
    resident_memory,
)
from tests.integration import scaleout_app


def test_a_crash_is_restarted_after_a_backoff_that_doubles_per_crash_of_its_slot() -> None:
    policy = RestartPolicy(backoff=0.5, max_backoff=3.0)
    delays = [policy.crashed(1, float(t), was_ready=True) for t in range(5)]
    assert delays == [Restart(0.5), Restart(1.0), Restart(2.0), Restart(3.0), Restart(3.0)]
    assert policy.crashed(2, 5.0, was_ready=True) == Restart(0.5)  # each slot its own


def test_the_backoff_starts_over_once_the_crashes_of_a_slot_left_the_window() -> None:
    policy = RestartPolicy(window=60.0, backoff=0.5)
    assert policy.crashed(1, 0.0, was_ready=True) == Restart(0.5)
    assert policy.crashed(1, 1.0, was_ready=True) == Restart(1.0)
    assert policy.crashed(1, 100.0, was_ready=True) == Restart(0.5)


def test_more_crashes_than_max_restarts_within_the_window_give_up() -> None:
    policy = RestartPolicy(max_restarts=3, window=10.0)
    for t in range(3):
        assert isinstance(policy.crashed(t, float(t), was_ready=True), Restart)
    decision = policy.crashed(9, 3.0, was_ready=True)
    assert decision == GiveUp("4 crashes within 10s (at most 3 restarts)")
    # The same crashes spread wider than the window are fine.
    spread = RestartPolicy(max_restarts=3, window=10.0)
    assert all(isinstance(spread.crashed(1, t * 6.0, was_ready=True), Restart) for t in range(8))


def test_a_slot_that_never_gets_ready_gives_up_after_max_start_failures_in_a_row() -> None:
    policy = RestartPolicy(max_start_failures=3)
    assert isinstance(policy.crashed(2, 0.0, was_ready=False), Restart)
    assert isinstance(policy.crashed(2, 1.0, was_ready=False), Restart)
    assert isinstance(policy.crashed(1, 1.5, was_ready=False), Restart)  # another slot's streak
    assert policy.crashed(2, 2.0, was_ready=False) == GiveUp(
        "worker-2 exited before it was ready 3 times in a row"
    )


def test_a_process_that_got_ready_ends_its_slots_start_failure_streak() -> None:
    policy = RestartPolicy(max_start_failures=2)
    assert isinstance(policy.crashed(1, 0.0, was_ready=False), Restart)
    policy.ready(1)
    assert isinstance(policy.crashed(1, 1.0, was_ready=False), Restart)
    assert isinstance(policy.crashed(1, 2.0, was_ready=False), GiveUp)


def test_restart_policy_options_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="max_start_failures must be an integer >= 1"):
        RestartPolicy(max_start_failures=0)


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (0, "exited with code 0"),
        (3, "exited with code 3"),
        (-signal.SIGKILL, "was killed by SIGKILL"),
        (-signal.SIGSEGV, "was killed by SIGSEGV"),
        (-99, "was killed by signal 99"),
        (None, "is still running"),
    ],
)
def test_an_exit_is_described_by_its_code_or_signal(code: int | None, said: str) -> None:
    assert describe_exit(code) == said


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MiB", 512 * 1024**2),
        ("512M", 512 * 1024**2),
        ("512m", 512 * 1024**2),
        ("512MB", 512 * 1000**2),
        ("2GiB", 2 * 1024**3),
        ("2 GB", 2 * 1000**3),
        ("1.5GiB", int(1.5 * 1024**3)),
        ("300k", 300 * 1024),
        ("300KB", 300_000),
        ("1048576", 1048576),
        ("100B", 100),
        (4096, 4096),
    ],
)
def test_sizes_read_binary_and_decimal_units(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "12 parsecs", "0", "0MiB", "-5M", "MiB", True])
def test_anything_else_is_not_a_size_and_the_error_names_the_option(text: object) -> None:
    with pytest.raises(ConfigurationError, match=r"^--max-memory-per-child: "):
        parse_size(text, "--max-memory-per-child")  # type: ignore[arg-type]


def test_processes_is_a_whole_number_or_auto_for_one_per_cpu() -> None:
    assert parse_processes("4") == 4
    assert parse_processes(2) == 2
    assert parse_processes("auto") == parse_processes(" AUTO ") == cpu_count()
    assert cpu_count() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", ""])
def test_processes_refuses_anything_else(value: str) -> None:
    with pytest.raises(ConfigurationError, match=r"processes: expected a whole number above zero"):
        parse_processes(value)


def test_resident_memory_is_this_processes_rss_in_bytes() -> None:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    expected = int(line.split()[1]) * 1024
    measured = resident_memory()
    assert measured is not None
    assert abs(measured - expected) < 32 * 1024**2  # the same figure, give or take allocations


@pytest.mark.anyio
async def test_the_task_counter_calls_back_once_when_the_count_reaches_the_limit() -> None:
    reached: list[int] = []
    counter = TaskCounter(3, reached.append)
    for _ in range(5):
        await counter.after_handler(None, None)  # type: ignore[arg-type]  # it reads neither
    assert counter.count == 5
    assert reached == [3]


def test_a_supervisor_refuses_an_app_factory_it_cannot_send_to_a_spawned_process() -> None:
    with pytest.raises(ConfigurationError, match=r"cannot be pickled.*module-level function"):
        Supervisor(lambda: scaleout_app.app)


def test_a_supervisor_checks_its_counts_and_sizes() -> None:
    with pytest.raises(ConfigurationError, match="processes must be an integer >= 1"):
        Supervisor(scaleout_app.make_app, processes=0)
    with pytest.raises(ConfigurationError, match="max_tasks_per_child must be an integer >= 1"):
        Supervisor(scaleout_app.make_app, max_tasks_per_child=0)
    with pytest.raises(ConfigurationError, match="max_memory_per_child: expected a size"):
        Supervisor(scaleout_app.make_app, max_memory_per_child="big")


def test_a_partial_over_a_module_level_function_is_a_fine_app_factory() -> None:
    supervisor = Supervisor(
        functools.partial(scaleout_app.make_app), processes=3, max_memory_per_child="1GiB"
    )
    assert supervisor.spec.max_memory == 1024**3
    assert supervisor.health() == {
        "status": "starting",
        "ready": False,
        "processes": 3,
        "restarts": 0,
        "stale": [],
        "children": [],
    }

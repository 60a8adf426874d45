"""``cuebx worker``'s process options, in process: parsed, checked, turned into a supervisor."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cuebx.cli import _supervisor, main
from cuebx.supervisor import Supervisor, cpu_count
from tests.integration import scaleout_app

APP = "tests.integration.scaleout_app"


def _worker_params(*args: str) -> dict[str, object]:
    worker = main.commands["worker"]
    # Under the group's context, as the command line makes it: a context made without it
    # would have click cache the worker's help option without -h for later tests.
    with main.make_context("cuebx", ["worker"]) as parent:
        with worker.make_context("worker", list(args), parent=parent) as context:
            return context.params


def test_one_process_is_the_default() -> None:
    params = _worker_params("-A", APP)
    assert params["processes"] == "1"
    assert params["max_tasks_per_child"] is None
    assert params["max_memory_per_child"] is None


def test_the_help_names_the_process_options() -> None:
    text = CliRunner().invoke(main, ["worker", "--help"], terminal_width=100).output
    for option in ("--processes N|auto", "--max-tasks-per-child N", "--max-memory-per-child SIZE"):
        assert option in text


def _plan(**options: object) -> Supervisor | None:
    settings = {
        "processes": "1",
        "max_tasks_per_child": None,
        "max_memory_per_child": None,
        "log_level": "INFO",
        "prefetch": None,
        "publish_timeout": 5.0,
        **options,
    }
    return _supervisor(APP, scaleout_app.app.worker(), **settings)  # type: ignore[arg-type]


def test_one_process_without_limits_runs_in_the_command_itself() -> None:
    assert _plan() is None


def test_more_processes_or_a_limit_make_a_supervisor() -> None:
    several = _plan(processes="3", prefetch=7)
    assert isinstance(several, Supervisor)
    assert several.processes == 3
    assert several.spec.prefetch == 7
    assert several.spec.queues == scaleout_app.app.worker().queue_names
    assert several.stop_deadline == 30.0 + 5.0 + 10  # shutdown timeout, then confirms
    recycled = _plan(max_tasks_per_child=100)
    assert isinstance(recycled, Supervisor)
    assert (recycled.processes, recycled.spec.max_tasks) == (1, 100)
    capped = _plan(max_memory_per_child="1GiB")
    assert isinstance(capped, Supervisor)
    assert capped.spec.max_memory == 1024**3
    auto = _plan(processes="auto")
    assert isinstance(auto, Supervisor)
    assert auto.processes == cpu_count()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--processes", "0"], "Error: --processes: expected a whole number above zero or 'auto'"),
        (["--processes", "many"], "Error: --processes: expected a whole number above zero"),
        (["--max-memory-per-child", "lots"], "Error: --max-memory-per-child: expected a size"),
        (["--max-tasks-per-child", "0"], "Invalid value for '--max-tasks-per-child'"),
    ],
)
def test_a_bad_process_option_is_one_error_line(args: list[str], error: str) -> None:
    result = CliRunner().invoke(main, ["worker", "-A", APP, *args])
    assert result.exit_code != 0
    assert error in result.output
    assert "Traceback" not in result.output

"""The command line's help, option spellings and error lines, in process (no broker)."""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import pytest
from click.testing import CliRunner

from cuebx import cli
from cuebx.cli import main, one_line_error
from cuebx.errors import BrokerUnavailableError, CuebxError, TopologyError

COMMANDS = [[], ["worker"], ["topology"]]


def _help(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), prog_name="cuebx")
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", COMMANDS, ids=["cuebx", "worker", "topology"])
def test_dash_h_gives_the_same_help_as_dash_dash_help(command: list[str]) -> None:
    text = _help(*command, "-h")
    assert text == _help(*command, "--help")
    assert text.startswith(f"Usage: {' '.join(['cuebx', *command])} [OPTIONS]")


@pytest.mark.parametrize("command", [[], ["worker"]], ids=["cuebx", "worker"])
def test_help_has_examples_and_names_the_broker_url_variable(command: list[str]) -> None:
    text = _help(*command, "-h")
    examples = text.split("Examples:\n", 1)[1].splitlines()
    assert examples[0].split()[:4] == ["cuebx", "worker", "-A", "myapp"]  # \b: not rewrapped
    assert "CUEBX_BROKER_URL" in text
    assert "Cuebx() is given no URL" in " ".join(text.split())


@pytest.mark.parametrize("command", ["worker", "topology"])
def test_help_shows_cuebx_app_as_the_variable_for_dash_a(command: str) -> None:
    assert "[env var: CUEBX_APP; required]" in " ".join(_help(command, "-h").split())


def _worker_params(*args: str) -> dict[str, object]:
    worker = main.commands["worker"]
    with worker.make_context("worker", list(args)) as context:
        return context.params


@pytest.mark.parametrize("spelling", ["--log-level", "--loglevel", "-l"])
def test_every_log_level_spelling_sets_the_log_level(spelling: str) -> None:
    assert _worker_params("-A", "myapp", spelling, "warning")["log_level"] == "WARNING"


def test_cuebx_app_is_read_when_dash_a_is_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUEBX_APP", "shop.tasks:app")
    assert _worker_params()["app_path"] == "shop.tasks:app"
    assert _worker_params("-A", "other")["app_path"] == "other"


def test_without_dash_a_or_cuebx_app_the_worker_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CUEBX_APP", raising=False)
    result = CliRunner().invoke(main, ["worker"])
    assert result.exit_code == 2
    assert "Missing option '-A' / '--app'" in result.output


def test_a_plain_expected_error_is_its_message() -> None:
    assert one_line_error(TopologyError("queue 'q': no"), CuebxError) == "queue 'q': no"


def test_errors_in_nested_groups_are_found_and_each_message_said_once() -> None:
    refused = TopologyError("cannot consume queue 'a'")
    group = ExceptionGroup(
        "outer",
        [
            ExceptionGroup("inner", [refused, TopologyError("cannot consume queue 'a'")]),
            BrokerUnavailableError("cannot connect"),
        ],
    )
    assert one_line_error(group, CuebxError) == "cannot consume queue 'a'; cannot connect"


def test_a_group_with_anything_unexpected_is_left_to_its_traceback() -> None:
    group = ExceptionGroup("g", [ExceptionGroup("h", [TopologyError("x"), KeyError("bug")])])
    assert one_line_error(group, CuebxError) is None
    assert one_line_error(KeyError("bug"), CuebxError) is None


def test_options_errors_may_be_lookup_or_value_errors() -> None:
    expected = (LookupError, ValueError)
    assert one_line_error(ExceptionGroup("g", [LookupError("no queue 'x'")]), expected) == (
        "no queue 'x'"
    )


def test_the_help_shown_in_docs_cli_md_is_the_real_one() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    shown = docs.split("```console\n$ cuebx --help\n", 1)[1].split("```", 1)[0]
    result = CliRunner().invoke(main, ["--help"], prog_name="cuebx", terminal_width=80)
    assert result.output == shown


def test_worker_processes_load_the_app_with_the_scheduler_as_the_command_line_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "periodicapp.py").write_text(
        "from cuebx import Cuebx\n"
        "app = Cuebx('memory://')\n"
        "@app.periodic(every='1h')\n"
        "async def tick() -> None: ...\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    # What each worker process calls (pickled): the flag must reach it.
    assert not cli._worker_app("periodicapp", scheduler=False).scheduler.enabled
    assert pickle.loads(pickle.dumps(functools.partial(cli._worker_app, "periodicapp")))
